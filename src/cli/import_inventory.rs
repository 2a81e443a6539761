//! `kiwispray-hosts import-inventory FILE`: adds and updates hosts from a
//! vendor's inventory. [`crate::inventory`] reads the rows and plans them
//! against the database; this checks the plan again under the lock and
//! commits it as one change (one event per host), or nothing if any row is
//! refused (unless `--skip-bad`).

use super::hosts::{check_hostname, check_states, CAUSE};
use super::{json_text, out, Ctx, Error, Exit, ImportInventoryArgs, Result};
use crate::events::Event;
use crate::inventory::{self, Action, Checks, Plan, Row};
use crate::runtime;
use std::path::PathBuf;

fn check_bmc(b: &str) -> std::result::Result<(), String> {
    crate::bmc::BmcUrl::parse(b).map(|_| ())
}

fn plan_with(ctx: &Ctx, db: &crate::hosts::Database, rows: &[Row], next_id: u64) -> Plan {
    let (images, templates): (PathBuf, PathBuf) =
        (ctx.config.images_dir(), ctx.config.templates_dir());
    let state = move |s: &str| check_states(&images, &templates, s).map_err(|e| e.message);
    let hostname = |h: &str| check_hostname(h).map_err(|e| e.message);
    let bmc = check_bmc;
    inventory::plan(
        db,
        rows,
        next_id,
        &Checks {
            state: &state,
            hostname: &hostname,
            bmc: &bmc,
        },
    )
}

pub fn import_inventory(ctx: &Ctx, a: &ImportInventoryArgs) -> Result<Exit> {
    let text = std::fs::read(&a.file).map_err(|e| {
        let msg = format!("cannot read {}: {e}", a.file.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::not_found(msg)
        } else {
            Error::io(msg)
        }
    })?;
    let text = String::from_utf8(text)
        .map_err(|e| Error::usage(format!("{} is not UTF-8: {e}", a.file.display())))?;
    let ext = a
        .file
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let is_json = match ext.as_deref() {
        Some("json") => true,
        Some("csv") => false,
        _ => text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('['),
    };
    let rows = if is_json {
        inventory::parse_json(&text)
    } else {
        inventory::parse_csv(&text)
    }
    .map_err(|e| Error::usage(format!("{}: {e}", a.file.display())))?;
    let store = ctx.store();
    let snap = store.snapshot()?;
    let next = snap.db.next_id().max(snap.rt.max_id() + 1);
    let plan = plan_with(ctx, &snap.db, &rows, next);
    drop(snap);
    let refused = plan.refused().len();
    let commit = !a.dry_run && (refused == 0 || a.skip_bad);
    let (plan, written) = if commit {
        let config = ctx.config.clone();
        let progress = ctx.progress;
        let skip_bad = a.skip_bad;
        store.modify(move |txn| -> Result<(Plan, bool)> {
            // Planned again under the lock: another writer may have
            // changed the database since.
            let sub = Ctx { config, progress };
            let next = txn.next_id();
            let plan = plan_with(&sub, &txn.db, &rows, next);
            if !skip_bad && !plan.refused().is_empty() {
                txn.abort();
                return Ok((plan, false));
            }
            let now = runtime::now();
            for (_, action) in &plan.rows {
                match action {
                    Action::Add(h) => {
                        if txn.db.insert(h.clone()).is_ok() {
                            txn.record(
                                Event::now(h.id, "", &h.state, CAUSE, "")
                                    .with_detail("import-inventory"),
                            );
                        }
                    }
                    Action::Update(before, after) => {
                        let id = after.id;
                        let next = (**after).clone();
                        txn.db.update(id, |h| *h = next);
                        if before.state != after.state {
                            txn.update_runtime(id, |rt| {
                                rt.abandon_open(
                                    now,
                                    Some("state changed by an inventory import".into()),
                                );
                                rt.reset_count();
                            });
                        }
                        txn.record(
                            Event::now(id, &before.state, &after.state, CAUSE, "")
                                .with_detail("import-inventory"),
                        );
                    }
                    Action::Unchanged(_) | Action::Refused(_) => {}
                }
            }
            Ok((plan, true))
        })??
    } else {
        (plan, false)
    };
    report(&plan, a, written)?;
    Ok(if plan.refused().is_empty() || (a.skip_bad && written) {
        Exit::Ok
    } else {
        Exit::Usage
    })
}

fn report(plan: &Plan, a: &ImportInventoryArgs, written: bool) -> Result<()> {
    let added = plan.count(|x| matches!(x, Action::Add(_)));
    let updated = plan.count(|x| matches!(x, Action::Update(..)));
    let unchanged = plan.count(|x| matches!(x, Action::Unchanged(_)));
    let refused = plan.refused();
    if a.json {
        let rows: Vec<serde_json::Value> = plan
            .rows
            .iter()
            .map(|(line, act)| match act {
                Action::Add(h) => serde_json::json!({"line": line, "action": "add", "host": h.id}),
                Action::Update(_, h) => {
                    serde_json::json!({"line": line, "action": "update", "host": h.id})
                }
                Action::Unchanged(id) => {
                    serde_json::json!({"line": line, "action": "unchanged", "host": id})
                }
                Action::Refused(why) => {
                    serde_json::json!({"line": line, "action": "refused", "reason": why})
                }
            })
            .collect();
        return out(&json_text(&serde_json::json!({
            "written": written,
            "added": added, "updated": updated, "unchanged": unchanged, "refused": refused.len(),
            "rows": rows,
        })));
    }
    let mut s = String::new();
    for (line, act) in &plan.rows {
        match act {
            Action::Add(h) => s.push_str(&format!(
                "line {line}: add host {} ({}, {})\n",
                h.id, h.hostname, h.macs
            )),
            Action::Update(b, h) => s.push_str(&format!(
                "line {line}: update host {} ({}){}\n",
                h.id,
                h.hostname,
                changes(b, h)
            )),
            Action::Unchanged(_) => {}
            Action::Refused(why) => s.push_str(&format!("line {line}: refused: {why}\n")),
        }
    }
    let verb = if written { "" } else { "would be " };
    s.push_str(&format!(
        "{added} {verb}added, {updated} {verb}updated, {unchanged} unchanged, {} refused{}\n",
        refused.len(),
        if written {
            " (one commit)".to_string()
        } else if a.dry_run {
            "; dry run, nothing was written".to_string()
        } else {
            "; nothing was written (fix the refused rows, or --skip-bad)".to_string()
        }
    ));
    out(&s)
}

fn changes(b: &crate::hosts::Host, a: &crate::hosts::Host) -> String {
    let mut parts = Vec::new();
    for (name, x, y) in [
        ("macs", &b.macs, &a.macs),
        ("serial", &b.serial, &a.serial),
        ("uuid", &b.uuid, &a.uuid),
        ("hostname", &b.hostname, &a.hostname),
        ("state", &b.state, &a.state),
    ] {
        if x != y {
            parts.push(format!("{name} {x:?} -> {y:?}"));
        }
    }
    if b.metadata != a.metadata {
        parts.push("metadata".into());
    }
    if b.extra != a.extra {
        parts.push("bmc".into());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    }
}
