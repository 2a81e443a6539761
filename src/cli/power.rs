//! `kiwispray-hosts power HOST... on|off|cycle|status`: drives hosts'
//! BMCs ([`crate::bmc`]) in parallel, at most `--jobs` at once and each
//! within `--timeout`, and prints a table of host, BMC and result (or
//! `--json`). Each action is an event with cause `power`. Also what
//! `reinstall` and `rollout --power-cycle` share: finding each host's BMC
//! and credentials ([`prepare`]), running a step on all of them
//! ([`run`]), recording ([`record`]) and showing ([`report`]) the results.
//! No password reaches any of it: drivers return scrubbed messages and
//! credentials print as `<hidden>`.

use super::display::{cell, table};
use super::hosts::{confirm, select};
use super::{json_text, out, BmcOpts, Ctx, Error, Exit, PowerArgs, Result, Targets};
use crate::bmc::credentials::{Credential, Credentials};
use crate::bmc::{self, Action, Bmc, BmcUrl};
use crate::events::{self, Event};
use crate::store::Snapshot;
use serde_json::Value;
use std::time::Duration;

/// The cause of the events of power actions.
pub const CAUSE: &str = "power";

/// One host to drive: who it is, its BMC and how to log in.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub hostname: String,
    pub state: String,
    pub bmc: String,
    pub url: BmcUrl,
    pub cred: Credential,
    /// The host last booted with UEFI.
    pub efi: bool,
}

/// The result of one host.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: u64,
    pub hostname: String,
    pub bmc: String,
    pub result: std::result::Result<String, String>,
}

/// The BMC and credentials of each host; the hosts that have none (or a
/// BMC URL that does not parse) with the reason, as failed outcomes.
pub fn prepare(ctx: &Ctx, snap: &Snapshot, ids: &[u64]) -> Result<(Vec<Job>, Vec<Outcome>)> {
    let mut jobs = Vec::new();
    let mut refused = Vec::new();
    let mut creds: Option<std::result::Result<Credentials, String>> = None;
    for id in ids {
        let Some(h) = snap.get(*id) else { continue };
        let rt = snap.runtime(*id);
        let fail = |bmc: &str, why: String| Outcome {
            id: *id,
            hostname: h.hostname.clone(),
            bmc: bmc.to_string(),
            result: Err(why),
        };
        let Some(text) = h.bmc.clone() else {
            refused.push(fail(
                "-",
                format!("no BMC (set one with: kiwispray-hosts set {id} --bmc URL)"),
            ));
            continue;
        };
        let url = match BmcUrl::parse(&text) {
            Ok(u) => u,
            Err(e) => {
                refused.push(fail(&text, e));
                continue;
            }
        };
        // the file is read once, and only if some host has a BMC; a file
        // others can read refuses the whole command
        let c = creds.get_or_insert_with(|| Credentials::load(&ctx.config.bmc_credentials));
        let c = match c {
            Ok(c) => c,
            Err(e) => return Err(Error::usage(e.clone())),
        };
        match c.for_bmc(&url).and_then(|cred| cred.secret().map(|_| cred)) {
            Ok(cred) => jobs.push(Job {
                id: *id,
                hostname: h.hostname.clone(),
                state: h.state.clone(),
                bmc: text,
                url,
                cred,
                efi: rt.seen.as_ref().is_some_and(|s| s.platform == "efi"),
            }),
            Err(e) => refused.push(fail(&text, e)),
        }
    }
    Ok((jobs, refused))
}

/// Runs `step` for every job, at most `opts.jobs` at once, each within
/// `opts.timeout` seconds.
pub fn run(
    jobs: Vec<Job>,
    opts: &BmcOpts,
    step: fn(&mut dyn Bmc, &Job) -> std::result::Result<String, String>,
) -> Vec<Outcome> {
    let timeout = Duration::from_secs(opts.timeout.max(1));
    let heads: Vec<(u64, String, String)> = jobs
        .iter()
        .map(|j| (j.id, j.hostname.clone(), j.bmc.clone()))
        .collect();
    let results = bmc::run_parallel(jobs, opts.jobs, timeout, move |job: Job| {
        let mut driver = bmc::driver(&job.url, &job.cred, timeout)?;
        step(driver.as_mut(), &job)
    });
    heads
        .into_iter()
        .zip(results)
        .map(|((id, hostname, bmc), result)| Outcome {
            id,
            hostname,
            bmc,
            result,
        })
        .collect()
}

/// Records one event per outcome (cause `power`, the state unchanged,
/// the action and its result as the detail).
pub fn record(ctx: &Ctx, what: &str, outcomes: &[Outcome], states: &dyn Fn(u64) -> String) {
    let evs: Vec<Event> = outcomes
        .iter()
        .map(|o| {
            let st = states(o.id);
            let detail = match &o.result {
                Ok(r) => format!("{what}: {r}"),
                Err(e) => format!("{what} failed: {e}"),
            };
            let detail: String = detail.chars().take(400).collect();
            Event::now(o.id, &st, &st, CAUSE, "").with_detail(detail)
        })
        .collect();
    if let Err(e) = events::append(&ctx.config.events, &evs) {
        eprintln!(
            "kiwispray-hosts: warning: cannot append to {}: {e}",
            ctx.config.events.display()
        );
    }
}

/// The table (or JSON) of outcomes; whether all succeeded.
pub fn report(outcomes: &[Outcome], action: &str, json: bool) -> Result<bool> {
    let all_ok = outcomes.iter().all(|o| o.result.is_ok());
    if json {
        let v: Vec<Value> = outcomes
            .iter()
            .map(|o| {
                let mut m = serde_json::json!({
                    "id": o.id,
                    "hostname": o.hostname,
                    "bmc": if o.bmc == "-" { Value::Null } else { Value::String(o.bmc.clone()) },
                    "action": action,
                    "ok": o.result.is_ok(),
                });
                match &o.result {
                    Ok(r) => {
                        m["result"] = Value::String(r.clone());
                        if action == "status" {
                            m["power"] = Value::String(r.clone());
                        }
                    }
                    Err(e) => m["error"] = Value::String(e.clone()),
                }
                m
            })
            .collect();
        out(&json_text(&Value::Array(v)))?;
    } else {
        let mut rows = vec![["HOST", "HOSTNAME", "BMC", "RESULT"]
            .map(String::from)
            .to_vec()];
        for o in outcomes {
            rows.push(vec![
                o.id.to_string(),
                cell(&o.hostname),
                cell(&o.bmc),
                match &o.result {
                    Ok(r) => r.clone(),
                    Err(e) => format!("FAILED: {}", cell(e)),
                },
            ]);
        }
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        let mut s = table(&rows);
        if failed > 0 {
            s.push_str(&format!("{failed} of {} host(s) failed\n", outcomes.len()));
        }
        out(&s)?;
    }
    Ok(all_ok)
}

/// Splits `HOST... ACTION` (the action may also come first).
fn split_words(words: &[String]) -> Result<(Action, Vec<String>)> {
    let usage = || {
        Error::usage("give the hosts and an action: power HOST... on|off|cycle|status (or --where EXPR ACTION)")
    };
    let (last, rest) = words.split_last().ok_or_else(usage)?;
    if let Some(a) = Action::parse(last) {
        return Ok((a, rest.to_vec()));
    }
    let (first, rest) = words.split_first().ok_or_else(usage)?;
    if let Some(a) = Action::parse(first) {
        return Ok((a, rest.to_vec()));
    }
    Err(Error::usage(format!(
        "no action among the arguments: the last must be on, off, cycle or status, not {:?}",
        super::hosts::short(last)
    )))
}

fn step_for(action: Action) -> fn(&mut dyn Bmc, &Job) -> std::result::Result<String, String> {
    match action {
        Action::On => |b, _| bmc::perform(b, Action::On),
        Action::Off => |b, _| bmc::perform(b, Action::Off),
        Action::Cycle => |b, _| bmc::perform(b, Action::Cycle),
        Action::Status => |b, _| bmc::perform(b, Action::Status),
    }
}

pub fn power(ctx: &Ctx, a: &PowerArgs) -> Result<Exit> {
    let (action, hosts) = split_words(&a.words)?;
    if a.bmc.jobs == 0 {
        return Err(Error::usage("--jobs must be at least 1"));
    }
    let targets = Targets {
        hosts,
        wheres: a.wheres.clone(),
    };
    let store = ctx.store();
    let snap = store.snapshot()?;
    let ids = select(&snap, &targets)?;
    if a.confirm.dry_run {
        let mut s = String::new();
        for id in &ids {
            let h = snap.get(*id).expect("selected");
            s.push_str(&format!(
                "host {} ({}): bmc {}: would {}\n",
                id,
                cell(&h.hostname),
                h.bmc.as_deref().unwrap_or("-"),
                match action {
                    Action::Status => "ask its power".to_string(),
                    other => format!("power {}", other.as_str()),
                }
            ));
        }
        s.push_str(&format!(
            "dry run: {} host(s); no BMC was contacted\n",
            ids.len()
        ));
        out(&s)?;
        return Ok(Exit::Ok);
    }
    if action != Action::Status {
        confirm(&a.confirm, &format!("power {}", action.as_str()), &ids)?;
    }
    let (jobs, refused) = prepare(ctx, &snap, &ids)?;
    let mut outcomes = run(jobs, &a.bmc, step_for(action));
    outcomes.extend(refused);
    outcomes.sort_by_key(|o| o.id);
    let what = format!("power {}", action.as_str());
    record(ctx, &what, &outcomes, &|id| {
        snap.get(id).map(|h| h.state).unwrap_or_default()
    });
    let ok = report(&outcomes, action.as_str(), a.json)?;
    Ok(if ok { Exit::Ok } else { Exit::Io })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_action_is_the_last_or_the_first_word() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (a, h) = split_words(&w(&["1", "web02", "cycle"])).unwrap();
        assert_eq!((a, h), (Action::Cycle, w(&["1", "web02"])));
        let (a, h) = split_words(&w(&["status"])).unwrap();
        assert_eq!((a, h.len()), (Action::Status, 0));
        let (a, h) = split_words(&w(&["off", "3"])).unwrap();
        assert_eq!((a, h), (Action::Off, w(&["3"])));
        assert!(split_words(&w(&["1", "2"])).is_err());
        assert!(split_words(&[]).is_err());
    }
}
