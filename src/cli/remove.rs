//! `kiwispray-hosts remove HOST... [--where EXPR]`: forgets hosts and their
//! runtime facts, in one commit.

use super::hosts::{all_or_nothing, confirm, select, CAUSE};
use super::{out, Ctx, Exit, RemoveArgs, Result};
use crate::events::Event;
use crate::hosts::Host;

pub fn remove(ctx: &Ctx, a: &RemoveArgs) -> Result<Exit> {
    let store = ctx.store();
    let snap = store.snapshot()?;
    let ids = select(&snap, &a.targets)?;
    if a.confirm.dry_run {
        let mut s = String::new();
        for id in &ids {
            let h = snap.get(*id).expect("selected");
            s.push_str(&format!(
                "host {id} ({}, {}): would be removed\n",
                h.hostname, h.macs
            ));
        }
        s.push_str(&format!(
            "dry run: {} host(s) would be removed; nothing was written\n",
            ids.len()
        ));
        out(&s)?;
        return Ok(Exit::Ok);
    }
    drop(snap);
    confirm(&a.confirm, "remove", &ids)?;
    let removed = store.modify(move |txn| -> Result<Vec<Host>> {
        let mut removed = Vec::new();
        let mut reasons = Vec::new();
        for id in ids {
            match txn.remove_host(id) {
                Some(h) => {
                    txn.record(Event::now(id, &h.state, "", CAUSE, ""));
                    removed.push(h);
                }
                None => reasons.push(format!("host {id} was removed meanwhile")),
            }
        }
        if !reasons.is_empty() {
            txn.abort();
            return Err(all_or_nothing(reasons));
        }
        Ok(removed)
    })??;
    let mut s = String::new();
    for h in &removed {
        s.push_str(&format!(
            "removed host {} ({}, {})\n",
            h.id, h.hostname, h.macs
        ));
    }
    out(&s)?;
    Ok(Exit::Ok)
}
