//! `kiwispray-hosts list`: the hosts as a table (id, hostname, state,
//! STATUS, serial, MACs; `-v` adds UUID, last seen, BMC and metadata) or as JSON,
//! filtered by current state, held, overdue or `--where`. Reads only.

use super::display::{cell, host_json, seen_text, status, table};
use super::{json_text, out, Ctx, Error, Exit, ListArgs, Result};
use crate::hosts::Host;
use crate::lifecycle;
use crate::runtime;
use crate::select::Selector;
use serde_json::Value;

pub fn list(ctx: &Ctx, a: &ListArgs) -> Result<Exit> {
    let snap = ctx.store().snapshot()?;
    let now = runtime::now();
    let (held, overdue, state) = match a.state.as_deref() {
        Some("held") => (true, a.overdue, None),
        Some("overdue") => (a.held, true, None),
        s => (a.held, a.overdue, s),
    };
    let selector = Selector::parse(&a.wheres).map_err(Error::usage)?;
    let hosts: Vec<Host> = snap
        .hosts()
        .filter(|h| selector.matches(h, snap.runtime(h.id), now))
        .filter(|h| state.is_none_or(|s| h.current_state() == s))
        .filter(|h| !held || snap.runtime(h.id).hold.is_some())
        .filter(|h| !overdue || lifecycle::overdue_attempt(h, snap.runtime(h.id), now).is_some())
        .collect();
    if a.json {
        let v: Vec<Value> = hosts
            .iter()
            .map(|h| host_json(h, snap.runtime(h.id), now))
            .collect();
        out(&json_text(&Value::Array(v)))?;
        return Ok(Exit::Ok);
    }
    let mut rows = vec![if a.verbose {
        [
            "ID",
            "HOSTNAME",
            "STATE",
            "STATUS",
            "SERIAL",
            "UUID",
            "LAST SEEN",
            "BMC",
            "MACS",
            "METADATA",
        ]
        .map(String::from)
        .to_vec()
    } else {
        ["ID", "HOSTNAME", "STATE", "STATUS", "SERIAL", "MACS"]
            .map(String::from)
            .to_vec()
    }];
    for h in hosts {
        let rt = snap.runtime(h.id);
        let macs: Vec<String> = h.macs.split_whitespace().map(String::from).collect();
        if a.verbose {
            rows.push(vec![
                h.id.to_string(),
                cell(&h.hostname),
                cell(&h.state),
                status(&h, rt, now),
                cell(&h.serial),
                cell(&h.uuid),
                seen_text(rt, now),
                cell(h.bmc.as_deref().unwrap_or("")),
                cell(&macs.join(",")),
                if h.metadata.is_empty() {
                    "-".into()
                } else {
                    Value::Object(h.metadata.clone()).to_string()
                },
            ]);
        } else {
            let m = match macs.len() {
                0 => "-".to_string(),
                1 => macs[0].clone(),
                n => format!("{} (+{})", macs[0], n - 1),
            };
            rows.push(vec![
                h.id.to_string(),
                cell(&h.hostname),
                cell(&h.state),
                status(&h, rt, now),
                cell(&h.serial),
                m,
            ]);
        }
    }
    out(&table(&rows))?;
    Ok(Exit::Ok)
}
