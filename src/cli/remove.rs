//! `kiwispray-hosts remove HOST`: forgets a host and its runtime facts.
use super::hosts::{resolve, CAUSE};
use super::{out, Ctx, Error, Exit, RemoveArgs, Result};
use crate::events::Event;
use crate::hosts::Host;

pub fn remove(ctx: &Ctx, a: &RemoveArgs) -> Result<Exit> {
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    let removed = store.modify(move |txn| -> Result<Host> {
        let h = txn
            .remove_host(id)
            .ok_or_else(|| Error::not_found(format!("host {id} was removed meanwhile")))?;
        txn.record(Event::now(id, &h.state, "", CAUSE, ""));
        Ok(h)
    })??;
    out(&format!(
        "removed host {} ({}, {})\n",
        removed.id, removed.hostname, removed.macs
    ))?;
    Ok(Exit::Ok)
}
