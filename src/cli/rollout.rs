//! `kiwispray-hosts rollout`: installs the hosts a `--where` expression
//! selects in waves of `--batch`, in the foreground. Each wave's states are
//! set in one commit; then it waits until every host of the wave has
//! finished, failed (held) or gone overdue, and starts the next. It stops
//! once `--max-failures` hosts have failed, leaving the rest untouched.
//! Its record is kept in `.kiwispray-rollout.json` in the deployment root,
//! so an interrupted rollout resumes where it stopped when run again, and
//! `rollout --status` shows it. The decisions are in [`crate::rollout`].
//! With `--power-cycle` each wave, once set, is kicked through its BMCs the
//! way `reinstall` kicks a host (one network boot, then a power cycle); a
//! rollout with it checks before it starts that every host has a BMC and
//! credentials.

use super::hosts::{check_states, confirm, select};
use super::{json_text, out, Confirm, Ctx, Error, Exit, Result, RolloutArgs, Targets};
use crate::events::Event;
use crate::rollout::{host_progress, Progress, Rollout, Step, Wave};
use crate::runtime;
use crate::store::Snapshot;
use fs2::FileExt;
use std::collections::BTreeMap;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The record of the rollout in progress, beside the database.
pub const ROLLOUT_FILE: &str = ".kiwispray-rollout.json";

fn record_path(ctx: &Ctx) -> PathBuf {
    ctx.config.root.join(ROLLOUT_FILE)
}

fn load(path: &Path) -> Result<Option<Rollout>> {
    match fs::read(path) {
        Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|e| {
            Error::io(format!(
                "{} is not a rollout record: {e} (fix it, or remove it with rollout --cancel)",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Saves the record atomically (temp file, fsync, rename).
fn save(path: &Path, r: &Rollout) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(r).map_err(|e| Error::io(e.to_string()))?;
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("cannot save {}: {e}", path.display()))
    })
}

fn progress_of(r: &Rollout, snap: &Snapshot, now: u64) -> BTreeMap<u64, Progress> {
    let started: std::collections::HashSet<u64> = r.started().collect();
    r.hosts
        .iter()
        .map(|id| {
            let p = if started.contains(id) {
                host_progress(&r.state, snap.get(*id).as_ref(), snap.runtime(*id), now)
            } else {
                Progress::Waiting
            };
            (*id, p)
        })
        .collect()
}

fn counts(p: &BTreeMap<u64, Progress>) -> BTreeMap<&'static str, usize> {
    let mut c = BTreeMap::new();
    for v in p.values() {
        *c.entry(v.as_str()).or_insert(0) += 1;
    }
    c
}

fn summary(r: &Rollout, p: &BTreeMap<u64, Progress>) -> String {
    let c = counts(p);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    format!(
        "wave {} of {}: {} finished, {} installing, {} failed, {} left, {} waiting",
        r.waves.len(),
        r.hosts.len().div_ceil(r.batch.max(1)),
        get("finished"),
        get("installing"),
        get("failed"),
        get("left") + get("gone"),
        get("waiting")
    )
}

fn status(ctx: &Ctx, a: &RolloutArgs) -> Result<Exit> {
    let Some(r) = load(&record_path(ctx))? else {
        out("no rollout in progress\n")?;
        return Ok(Exit::Ok);
    };
    let snap = ctx.store().snapshot()?;
    let p = progress_of(&r, &snap, runtime::now());
    if a.json {
        let hosts: Vec<serde_json::Value> = p
            .iter()
            .map(|(id, s)| serde_json::json!({"id": id, "progress": s.as_str()}))
            .collect();
        out(&json_text(&serde_json::json!({
            "where": r.selector, "state": r.state, "batch": r.batch,
            "max_failures": r.max_failures, "waves": r.waves.len(), "hosts": hosts,
        })))?;
        return Ok(Exit::Ok);
    }
    let mut s = format!(
        "rollout of {} to {:?} (--where {}), batches of {}, max failures {}\n{}\n",
        r.hosts.len(),
        r.state,
        r.selector,
        r.batch,
        r.max_failures.map_or("-".to_string(), |m| m.to_string()),
        summary(&r, &p)
    );
    for (id, state) in &p {
        if matches!(state, Progress::Failed | Progress::Left | Progress::Gone) {
            s.push_str(&format!("  host {id}: {}\n", state.as_str()));
        }
    }
    out(&s)?;
    Ok(Exit::Ok)
}

pub fn rollout(ctx: &Ctx, a: &RolloutArgs) -> Result<Exit> {
    if a.status {
        return status(ctx, a);
    }
    let path = record_path(ctx);
    // One rollout at a time: the lock is held while this one runs.
    let lock_path = ctx.config.root.join(".kiwispray-rollout.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("cannot open {}: {e}", lock_path.display())))?;
    if lock.try_lock_exclusive().is_err() {
        return Err(Error::conflict(
            "another rollout is running on this deployment root (see rollout --status)",
        ));
    }
    if a.cancel {
        match fs::remove_file(&path) {
            Ok(()) => out("rollout cancelled; hosts are left as they are\n")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => out("no rollout in progress\n")?,
            Err(e) => return Err(Error::io(format!("cannot remove {}: {e}", path.display()))),
        }
        return Ok(Exit::Ok);
    }
    let store = ctx.store();
    let given = !a.wheres.is_empty() || a.state.is_some() || a.batch.is_some();
    let mut r = match load(&path)? {
        Some(mut r) => {
            let same = a.wheres.is_empty() || a.wheres.join(" ") == r.selector;
            let same = same
                && a.state.as_ref().is_none_or(|s| *s == r.state)
                && a.batch.is_none_or(|b| b == r.batch);
            if given && !same {
                return Err(Error::usage(format!(
                    "a rollout of {:?} (--where {}) is in progress: run rollout without \
                     --where/--state/--batch to resume it, or rollout --cancel first",
                    r.state, r.selector
                )));
            }
            if a.max_failures.is_some() {
                r.max_failures = a.max_failures;
            }
            if a.power_cycle && !r.power_cycle {
                r.power_cycle = true;
                save(&path, &r)?;
            }
            eprintln!(
                "kiwispray-hosts: resuming the rollout of {:?} (--where {})",
                r.state, r.selector
            );
            r
        }
        None => {
            let (Some(state), Some(batch)) = (&a.state, a.batch) else {
                return Err(Error::usage(
                    "no rollout in progress: give --where EXPR, --state S and --batch N",
                ));
            };
            if a.wheres.is_empty() {
                return Err(Error::usage(
                    "give --where EXPR: which hosts to roll out to",
                ));
            }
            if batch == 0 {
                return Err(Error::usage("--batch must be at least 1"));
            }
            let state = check_states(&ctx.config.images_dir(), &ctx.config.templates_dir(), state)?;
            let snap = store.snapshot()?;
            let targets = Targets {
                hosts: Vec::new(),
                wheres: a.wheres.clone(),
            };
            let ids = select(&snap, &targets)?;
            if a.power_cycle {
                let (_, refused) = super::power::prepare(ctx, &snap, &ids)?;
                if !refused.is_empty() {
                    return Err(super::hosts::all_or_nothing(
                        refused
                            .iter()
                            .map(|o| {
                                format!(
                                    "host {}: {}",
                                    o.id,
                                    o.result.as_ref().err().cloned().unwrap_or_default()
                                )
                            })
                            .collect(),
                    ));
                }
            }
            confirm(
                &Confirm {
                    dry_run: false,
                    yes: a.yes,
                },
                "roll out to",
                &ids,
            )?;
            let r = Rollout {
                selector: a.wheres.join(" "),
                state,
                batch,
                max_failures: a.max_failures,
                hosts: ids,
                waves: Vec::new(),
                created: runtime::now(),
                power_cycle: a.power_cycle,
            };
            save(&path, &r)?;
            r
        }
    };
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let snap = store.snapshot()?;
        let now = runtime::now();
        let p = progress_of(&r, &snap, now);
        drop(snap);
        let step = r.next_step(&|id| p.get(&id).copied().unwrap_or(Progress::Waiting));
        let line = summary(&r, &p);
        match step {
            Step::Wait => {
                if tty {
                    eprint!("\r\x1b[K{line}");
                } else if line != last {
                    eprintln!("{line}");
                }
                last = line;
                std::thread::sleep(Duration::from_secs(a.poll.max(1)));
            }
            Step::Start(ids) => {
                let wave = r.waves.len() + 1;
                let chain = r.state.clone();
                let set = ids.clone();
                store.modify(move |txn| {
                    let now = runtime::now();
                    for id in set {
                        let Some(before) = txn.db.get(id) else {
                            continue;
                        };
                        if before.state == chain {
                            continue;
                        }
                        let c = chain.clone();
                        txn.db.update(id, |h| h.state = c);
                        txn.update_runtime(id, |rt| {
                            rt.abandon_open(now, Some("state changed by a rollout".into()));
                            rt.reset_count();
                        });
                        txn.record(
                            Event::now(id, &before.state, &chain, "rollout", "")
                                .with_detail(format!("wave {wave}")),
                        );
                    }
                })?;
                r.waves.push(Wave {
                    hosts: ids.clone(),
                    started: runtime::now(),
                });
                save(&path, &r)?;
                let list: Vec<String> = ids.iter().map(u64::to_string).collect();
                if tty {
                    eprint!("\r\x1b[K");
                }
                out(&format!(
                    "wave {wave}: set {} host(s) to {}: {}\n",
                    ids.len(),
                    r.state,
                    list.join(" ")
                ))?;
                if r.power_cycle {
                    kick_wave(ctx, &ids, wave)?;
                }
            }
            Step::Stop(failed) => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                out(&format!(
                    "stopped: {failed} host(s) failed (max failures {}); {}; the hosts not started are left untouched (rollout --status; fix and release them, then run rollout again)\n",
                    r.max_failures.unwrap_or(0),
                    line
                ))?;
                return Ok(Exit::Problems);
            }
            Step::Complete => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                let failed = p.values().filter(|s| **s == Progress::Failed).count();
                out(&format!("rollout complete: {line}\n"))?;
                if failed == 0 {
                    let _ = fs::remove_file(&path);
                }
                return Ok(if failed == 0 {
                    Exit::Ok
                } else {
                    Exit::Problems
                });
            }
        }
    }
}

/// Kicks a wave's hosts through their BMCs: one network boot, then a power
/// cycle. A host whose BMC fails is reported (and recorded); it keeps its
/// install state, so the rollout sees it boot when someone powers it by
/// hand, or counts it as failed once it is overdue.
fn kick_wave(ctx: &Ctx, ids: &[u64], wave: usize) -> Result<()> {
    let snap = ctx.store().snapshot()?;
    let (jobs, refused) = super::power::prepare(ctx, &snap, ids)?;
    let mut outcomes = super::power::run(jobs, &super::BmcOpts::default(), super::reinstall::kick);
    outcomes.extend(refused);
    outcomes.sort_by_key(|o| o.id);
    super::power::record(ctx, &format!("rollout wave {wave}"), &outcomes, &|id| {
        snap.get(id).map(|h| h.state).unwrap_or_default()
    });
    let mut s = String::new();
    for o in &outcomes {
        match &o.result {
            Ok(r) => s.push_str(&format!("wave {wave}: host {}: {r}\n", o.id)),
            Err(e) => s.push_str(&format!(
                "wave {wave}: host {}: BMC FAILED: {e} (it installs when it next boots from the network)\n",
                o.id
            )),
        }
    }
    out(&s)
}
