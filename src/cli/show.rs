//! `kiwispray-hosts show HOST`: every field of one host, its next boot,
//! its hold, its install attempts, when it was last seen, its metadata and
//! its recent events; `--json` for scripts (never the bootid). Reads only.

use super::display::{cell, event_line, host_json, seen_text, status, tree};
use super::hosts::resolve;
use super::{json_text, out, Ctx, Error, Exit, Result, ShowArgs};
use crate::events::{self, rfc3339_secs};
use crate::lifecycle::{self, NextBoot};
use crate::runtime::{self, human_duration};

pub fn show(ctx: &Ctx, a: &ShowArgs) -> Result<Exit> {
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    let host = db.get(id).expect("resolved");
    let rt = db.runtime(id);
    let now = runtime::now();
    let (events, _) = events::read(store.events_path(), Some(id)).map_err(|e| {
        Error::io(format!(
            "cannot read {}: {e}",
            store.events_path().display()
        ))
    })?;
    let recent = &events[events.len().saturating_sub(a.events)..];
    if a.json {
        out(&json_text(
            &serde_json::json!({ "host": host_json(&host, rt, now), "events": recent }),
        ))?;
        return Ok(Exit::Ok);
    }
    let mut s = String::new();
    s.push_str(&format!("id:        {}\n", host.id));
    s.push_str(&format!("hostname:  {}\n", cell(&host.hostname)));
    s.push_str(&format!("state:     {}", cell(&host.state)));
    let next = match lifecycle::next_boot(&host.state) {
        NextBoot::Wait => "waits for an operator".to_string(),
        NextBoot::LocalDisk => "boots its local disk".to_string(),
        NextBoot::Install(_) if rt.hold.is_some() => "held: installs nothing".to_string(),
        NextBoot::Install(s) => format!("installs {s}"),
        NextBoot::Refuse(r) => format!("cannot boot: {r}"),
    };
    s.push_str(&format!("  (next boot: {next})\n"));
    s.push_str(&format!("macs:      {}\n", cell(&host.macs)));
    s.push_str(&format!("serial:    {}\n", cell(&host.serial)));
    s.push_str(&format!("uuid:      {}\n", cell(&host.uuid)));
    s.push_str(&format!(
        "bmc:       {}\n",
        cell(host.bmc.as_deref().unwrap_or(""))
    ));
    s.push_str(&format!("status:    {}\n", status(&host, rt, now)));
    if let Some(hold) = &rt.hold {
        s.push_str(&format!(
            "hold:      {} since {} ({} ago): {}\n           release with: kiwispray-hosts release {}\n",
            hold.cause.as_str(),
            rfc3339_secs(hold.since),
            human_duration(now.saturating_sub(hold.since)),
            cell(&hold.reason),
            host.id
        ));
    }
    s.push_str(&format!("last seen: {}", seen_text(rt, now)));
    match &rt.seen {
        Some(seen) if !seen.remote.is_empty() => {
            s.push_str(&format!(" from {}\n", cell(&seen.remote)))
        }
        _ => s.push('\n'),
    }
    for (k, v) in &host.extra {
        s.push_str(&format!("{k}: {v}\n"));
    }
    if host.metadata.is_empty() {
        s.push_str("metadata:  -\n");
    } else {
        s.push_str("metadata:\n");
        tree(&mut s, &host.metadata, 0);
    }
    if rt.attempts.is_empty() {
        s.push_str("attempts:  -\n");
    } else {
        s.push_str("attempts:\n");
        for at in &rt.attempts {
            let outcome = match (at.outcome, lifecycle::overdue_attempt(&host, rt, now)) {
                (Some(o), _) => o.as_str().to_string(),
                (None, Some(o)) if o.n == at.n => "OVERDUE".to_string(),
                (None, _) => "in progress".to_string(),
            };
            s.push_str(&format!(
                "  {:>3}  {}  {}  {} after {} (deadline {} min){}{}\n",
                at.n,
                rfc3339_secs(at.started),
                cell(&at.state),
                outcome,
                human_duration(at.elapsed(now)),
                at.deadline_minutes,
                at.digest
                    .as_deref()
                    .map_or(String::new(), |d| format!(", image {d}")),
                at.reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(": {}", cell(r)))
            ));
        }
    }
    if recent.is_empty() {
        s.push_str("events:    -\n");
    } else {
        s.push_str(&format!("events (last {}):\n", recent.len()));
        for e in recent {
            s.push_str(&format!("  {}\n", event_line(e)));
        }
    }
    out(&s)?;
    Ok(Exit::Ok)
}
