//! `kiwispray-hosts history [HOST]`: the event log, newest last, for one
//! host (also a removed one, by its id) or all; `--json` for scripts.

use super::display::event_line;
use super::hosts::resolve;
use super::{json_text, out, Ctx, Error, Exit, HistoryArgs, Result};
use crate::events;
use serde_json::Value;

pub fn history(ctx: &Ctx, a: &HistoryArgs) -> Result<Exit> {
    let store = ctx.store();
    let id = match &a.host {
        None => None,
        Some(sel) => {
            let db = store.snapshot()?;
            match resolve(&db, sel) {
                Ok(id) => Some(id),
                // A removed host is still in the log under its id.
                Err(e) if e.exit == Exit::NotFound => match sel.trim().parse::<u64>() {
                    Ok(id) => Some(id),
                    Err(_) => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    };
    let (events, bad) = events::read(store.events_path(), id).map_err(|e| {
        Error::io(format!(
            "cannot read {}: {e}",
            store.events_path().display()
        ))
    })?;
    if bad > 0 {
        eprintln!(
            "kiwispray-hosts: note: {bad} line(s) of {} are not events and were skipped",
            store.events_path().display()
        );
    }
    let shown = match a.last {
        Some(n) => &events[events.len().saturating_sub(n)..],
        None => &events[..],
    };
    if a.json {
        out(&json_text(
            &serde_json::to_value(shown).unwrap_or(Value::Null),
        ))?;
    } else {
        let mut s = String::new();
        for e in shown {
            s.push_str(&event_line(e));
            s.push('\n');
        }
        out(&s)?;
    }
    Ok(Exit::Ok)
}
