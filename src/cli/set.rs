//! `kiwispray-hosts set HOST... [--where EXPR]`: changes the state chain,
//! hostname or metadata of one host or many, in one locked, atomic commit
//! with one event per host: all or nothing. A new state ends an install in progress (its bootid is used
//! up) and starts the loop count anew; a hold stays until `release`.

use super::hosts::{
    all_or_nothing, check_hostname, check_states, confirm, parse_meta_set, parse_object, select,
    set_path, split_key, unset_path, CAUSE,
};
use super::{json_text, out, Ctx, Error, Exit, Result, SetArgs};
use crate::events::Event;
use crate::hosts::Host;
use crate::runtime;
use serde_json::{Map, Value};

/// The edits of one `set`, validated.
struct Edit {
    state: Option<String>,
    hostname: Option<String>,
    merge: Option<Map<String, Value>>,
    sets: Vec<(Vec<String>, Value)>,
    unsets: Vec<Vec<String>>,
    /// `Some(None)`: forget the BMC.
    bmc: Option<Option<String>>,
}

impl Edit {
    fn apply(&self, h: &mut Host) -> std::result::Result<(), String> {
        if let Some(s) = &self.state {
            if *s != h.state {
                h.state = s.clone();
            }
        }
        if let Some(n) = &self.hostname {
            h.hostname = n.clone();
        }
        if let Some(b) = &self.bmc {
            h.bmc = b.clone();
        }
        if let Some(m) = &self.merge {
            crate::api::merge(&mut h.metadata, m.clone());
        }
        for (path, v) in &self.sets {
            set_path(&mut h.metadata, path, v.clone())?;
        }
        for path in &self.unsets {
            if !unset_path(&mut h.metadata, path) {
                eprintln!(
                    "kiwispray-hosts: note: metadata {} was not set",
                    path.join(".")
                );
            }
        }
        Ok(())
    }
}

pub fn set(ctx: &Ctx, a: &SetArgs) -> Result<Exit> {
    let state = match &a.state {
        Some(s) => Some(check_states(
            &ctx.config.images_dir(),
            &ctx.config.templates_dir(),
            s,
        )?),
        None => None,
    };
    if let Some(h) = &a.hostname {
        check_hostname(h)?;
    }
    let merge = match &a.meta {
        Some(m) => Some(parse_object("--meta", m)?),
        None => None,
    };
    let sets = a
        .meta_set
        .iter()
        .map(|s| parse_meta_set(s))
        .collect::<Result<Vec<_>>>()?;
    let unsets = a
        .meta_unset
        .iter()
        .map(|k| split_key(k))
        .collect::<Result<Vec<_>>>()?;
    let bmc = match (&a.bmc, a.no_bmc) {
        (Some(b), _) => Some(Some(
            crate::bmc::BmcUrl::parse(b)
                .map_err(Error::usage)?
                .to_string(),
        )),
        (None, true) => Some(None),
        (None, false) => None,
    };
    if state.is_none()
        && bmc.is_none()
        && a.hostname.is_none()
        && merge.is_none()
        && sets.is_empty()
        && unsets.is_empty()
    {
        return Err(Error::usage(
            "nothing to change: give --state, --hostname, --meta, --meta-set, --meta-unset, --bmc or --no-bmc",
        ));
    }
    let edit = Edit {
        state,
        hostname: a.hostname.clone(),
        merge,
        sets,
        unsets,
        bmc,
    };
    let store = ctx.store();
    let snap = store.snapshot()?;
    let ids = select(&snap, &a.targets)?;
    // Try the edit on the current copies first, so that errors are reported
    // without taking the lock, and a dry run shows what would change.
    let mut reasons = Vec::new();
    let mut plan = Vec::new();
    for id in &ids {
        let before = snap.get(*id).expect("selected");
        let mut after = before.clone();
        match edit.apply(&mut after) {
            Ok(()) => plan.push((before, after)),
            Err(e) => reasons.push(format!("host {id}: {e}")),
        }
    }
    drop(snap);
    if !reasons.is_empty() {
        return Err(all_or_nothing(reasons));
    }
    if a.confirm.dry_run {
        let mut s = String::new();
        for (before, after) in &plan {
            s.push_str(&format!(
                "host {} ({}): {}\n",
                before.id,
                before.hostname,
                describe(before, after)
            ));
        }
        s.push_str(&format!(
            "dry run: {} host(s) would change; nothing was written\n",
            plan.iter().filter(|(b, a)| b != a).count()
        ));
        out(&s)?;
        return Ok(Exit::Ok);
    }
    confirm(&a.confirm, "change", &ids)?;
    let hosts = store.modify(move |txn| -> Result<Vec<Host>> {
        let now = runtime::now();
        let mut reasons = Vec::new();
        let mut changed = Vec::new();
        for id in ids {
            let Some(before) = txn.db.get(id) else {
                reasons.push(format!("host {id} was removed meanwhile"));
                continue;
            };
            let mut failed = None;
            txn.db.update(id, |h| {
                if let Err(e) = edit.apply(h) {
                    failed = Some(e);
                    *h = before.clone();
                }
            });
            if let Some(e) = failed {
                reasons.push(format!("host {id}: {e}"));
                continue;
            }
            let after = txn.db.get(id).expect("exists");
            if after.state != before.state {
                // A new intent: the installer of the old state may no
                // longer report, and the loop count starts anew. A hold
                // stays.
                txn.update_runtime(id, |rt| {
                    rt.abandon_open(now, Some("state changed by an operator".into()));
                    rt.reset_count();
                });
                if txn.runtime(id).hold.is_some() {
                    eprintln!(
                        "kiwispray-hosts: note: host {id} is held; it installs nothing until: kiwispray-hosts release {id}"
                    );
                }
            }
            if after != before {
                txn.record(Event::now(id, &before.state, &after.state, CAUSE, ""));
            }
            changed.push(after);
        }
        if !reasons.is_empty() {
            // All or nothing: a host that cannot take the change stops the
            // whole command.
            txn.abort();
            return Err(all_or_nothing(reasons));
        }
        Ok(changed)
    })??;
    if a.json {
        let v: Vec<Value> = hosts.iter().map(Host::to_value).collect();
        out(&json_text(&if v.len() == 1 {
            v[0].clone()
        } else {
            Value::Array(v)
        }))?;
    } else {
        let mut s = String::new();
        for host in &hosts {
            s.push_str(&format!(
                "host {}: hostname {}, state {}{}\n",
                host.id,
                host.hostname,
                host.state,
                host.bmc
                    .as_deref()
                    .map_or(String::new(), |b| format!(", bmc {b}"))
            ));
        }
        if hosts.len() > 1 {
            s.push_str(&format!("{} hosts changed in one commit\n", hosts.len()));
        }
        out(&s)?;
    }
    Ok(Exit::Ok)
}

/// What an edit changes of a host, for `--dry-run`.
fn describe(before: &Host, after: &Host) -> String {
    let mut parts = Vec::new();
    if before.state != after.state {
        parts.push(format!("state {} -> {}", before.state, after.state));
    }
    if before.hostname != after.hostname {
        parts.push(format!(
            "hostname {} -> {}",
            before.hostname, after.hostname
        ));
    }
    if before.bmc != after.bmc {
        parts.push(format!(
            "bmc {} -> {}",
            before.bmc.as_deref().unwrap_or("-"),
            after.bmc.as_deref().unwrap_or("-")
        ));
    }
    if before.metadata != after.metadata {
        parts.push(format!(
            "metadata {} -> {}",
            Value::Object(before.metadata.clone()),
            Value::Object(after.metadata.clone())
        ));
    }
    if parts.is_empty() {
        "unchanged".into()
    } else {
        parts.join(", ")
    }
}
