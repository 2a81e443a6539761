//! `kiwispray-hosts reinstall HOST... --state S`: reinstalls machines from
//! the desk. (1) The state is set as `set --state` sets it (same checks,
//! one commit, the open install ended and the loop count reset; event
//! cause `reinstall`); (2) each BMC is asked for one network boot (IPMI
//! `chassis bootdev pxe`, with `options=efiboot` where the host last
//! booted with UEFI; Redfish `BootSourceOverrideEnabled: Once`, `Target:
//! Pxe`); (3) the machine is power-cycled, or switched on if it is off.
//!
//! Hosts without a BMC or credentials refuse the whole command before
//! anything is written. A host whose BMC step fails gets its previous
//! state back in a second commit (unless someone changed it meanwhile),
//! and the table says which step failed and what happened to the state:
//! never a half-done host without saying so.

use super::display::cell;
use super::hosts::{all_or_nothing, check_states, confirm, select};
use super::power::{self, Job, Outcome};
use super::{out, BmcOpts, Ctx, Exit, ReinstallArgs, Result};
use crate::bmc::{self, Bmc};
use crate::events::Event;
use crate::runtime;
use std::collections::HashMap;

/// The cause of the events of `reinstall`.
pub const CAUSE: &str = "reinstall";

/// The BMC steps of a reinstall: one network boot, then power.
pub fn kick(b: &mut dyn Bmc, job: &Job) -> std::result::Result<String, String> {
    b.boot_pxe_once(job.efi)
        .map_err(|e| format!("network boot once: {e}"))?;
    let power = bmc::cycle_or_on(b).map_err(|e| format!("power: {e}"))?;
    Ok(format!(
        "network boot once ({}), {power}",
        if job.efi { "UEFI" } else { "BIOS" }
    ))
}

/// Sets `ids` to `chain` in one commit, as `set` does; the states they had.
pub fn set_states(
    ctx: &Ctx,
    ids: &[u64],
    chain: &str,
    cause: &'static str,
) -> Result<HashMap<u64, String>> {
    let ids = ids.to_vec();
    let chain = chain.to_string();
    let before = ctx.store().modify(move |txn| {
        let now = runtime::now();
        let mut before = HashMap::new();
        for id in ids {
            let Some(h) = txn.db.get(id) else { continue };
            before.insert(id, h.state.clone());
            if h.state == chain {
                continue;
            }
            let c = chain.clone();
            txn.db.update(id, |h| h.state = c);
            txn.update_runtime(id, |rt| {
                rt.abandon_open(now, Some(format!("state changed by {cause}")));
                rt.reset_count();
            });
            if txn.runtime(id).hold.is_some() {
                eprintln!(
                    "kiwispray-hosts: note: host {id} is held; it installs nothing until: kiwispray-hosts release {id}"
                );
            }
            txn.record(Event::now(id, &h.state, &chain, cause, ""));
        }
        before
    })?;
    Ok(before)
}

/// Gives the hosts whose BMC step failed their previous state back, where
/// it is still `chain`; what happened to each, for the table.
pub fn roll_back(
    ctx: &Ctx,
    failed: &[(u64, String)],
    chain: &str,
    before: &HashMap<u64, String>,
    cause: &'static str,
) -> HashMap<u64, String> {
    let list: Vec<(u64, String, String)> = failed
        .iter()
        .filter_map(|(id, why)| before.get(id).map(|b| (*id, b.clone(), why.clone())))
        .collect();
    let chain_owned = chain.to_string();
    let done = ctx.store().modify(move |txn| {
        let chain = chain_owned;
        let mut said = HashMap::new();
        for (id, old, why) in list {
            let Some(h) = txn.db.get(id) else {
                said.insert(id, "host removed meanwhile".to_string());
                continue;
            };
            if old == chain {
                said.insert(id, format!("state stays {chain} (it was already)"));
                continue;
            }
            if h.state != chain {
                said.insert(id, format!("state left at {} (changed meanwhile)", h.state));
                continue;
            }
            let o = old.clone();
            txn.db.update(id, |h| h.state = o);
            let detail: String = format!("rolled back: the BMC step failed: {why}")
                .chars()
                .take(400)
                .collect();
            txn.record(Event::now(id, &chain, &old, cause, "").with_detail(detail));
            said.insert(id, format!("state set back to {old}"));
        }
        said
    });
    match done {
        Ok(s) => s,
        Err(e) => failed
            .iter()
            .map(|(id, _)| {
                (
                    *id,
                    format!("state LEFT AT {chain}: rolling it back failed: {e}"),
                )
            })
            .collect(),
    }
}

pub fn reinstall(ctx: &Ctx, a: &ReinstallArgs) -> Result<Exit> {
    let chain = check_states(
        &ctx.config.images_dir(),
        &ctx.config.templates_dir(),
        &a.state,
    )?;
    if a.bmc.jobs == 0 {
        return Err(super::Error::usage("--jobs must be at least 1"));
    }
    let store = ctx.store();
    let snap = store.snapshot()?;
    let ids = select(&snap, &a.targets)?;
    let (jobs, refused) = power::prepare(ctx, &snap, &ids)?;
    if !refused.is_empty() {
        return Err(all_or_nothing(
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
    if a.confirm.dry_run {
        let mut s = String::new();
        for j in &jobs {
            s.push_str(&format!(
                "host {} ({}): state {} -> {}, bmc {}: network boot once ({}), power-cycle\n",
                j.id,
                cell(&j.hostname),
                j.state,
                chain,
                j.bmc,
                if j.efi { "UEFI" } else { "BIOS" }
            ));
        }
        s.push_str(&format!(
            "dry run: {} host(s) would be reinstalled; nothing was written, no BMC contacted\n",
            jobs.len()
        ));
        out(&s)?;
        return Ok(Exit::Ok);
    }
    confirm(&a.confirm, "reinstall", &ids)?;
    drop(snap);
    let (outcomes, ok) = set_and_kick(ctx, jobs, &chain, &a.bmc, CAUSE)?;
    let shown = power::report(&outcomes, "reinstall", a.json)?;
    let ok = ok && shown;
    Ok(if ok { Exit::Ok } else { Exit::Io })
}

/// Sets the jobs' hosts to `chain`, kicks them through their BMCs, rolls
/// back the ones whose BMC failed; the outcomes (a failed one says what
/// became of its state) and whether all succeeded.
pub fn set_and_kick(
    ctx: &Ctx,
    jobs: Vec<Job>,
    chain: &str,
    opts: &BmcOpts,
    cause: &'static str,
) -> Result<(Vec<Outcome>, bool)> {
    let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
    let before = set_states(ctx, &ids, chain, cause)?;
    let mut outcomes = power::run(jobs, opts, kick);
    power::record(ctx, "reinstall", &outcomes, &|_| chain.to_string());
    let failed: Vec<(u64, String)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|e| (o.id, e.clone())))
        .collect();
    if !failed.is_empty() {
        let said = roll_back(ctx, &failed, chain, &before, cause);
        for o in &mut outcomes {
            if let (Err(e), Some(s)) = (&o.result, said.get(&o.id)) {
                o.result = Err(format!("{e}; {s}"));
            }
        }
    }
    let ok = failed.is_empty();
    Ok((outcomes, ok))
}
