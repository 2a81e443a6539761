//! The overdue watch: not a path but a task of the service. An install
//! attempt still open after its deadline is overdue; the event log records
//! that once per attempt (cause `overdue`), and the service's log says so.
//! The FastCGI handler looks every [`WATCH_INTERVAL`]; `kiwispray-hosts
//! check` does the same, for deployments that run the handler as CGI.
//! Holding an overdue host is left to its next boot (`hold_overdue`), so
//! that the watch never takes a machine away from an install that is
//! still running.

use super::{log, Service};
use crate::events::Event;
use crate::hosts::Database;
use crate::runtime::{self, human_duration, Attempt, RuntimeTable};
use crate::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// How often the handler looks for overdue installs.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(30);

/// Every host whose install of its current state element is overdue at
/// `now`, with that attempt, in id order.
pub fn overdue(db: &Database, rt: &RuntimeTable, now: u64) -> Vec<(u64, Attempt)> {
    let mut out: Vec<(u64, Attempt)> = rt
        .iter()
        .filter_map(|(id, r)| {
            let host = db.get(id)?;
            crate::lifecycle::overdue_attempt(&host, r, now).map(|a| (id, a.clone()))
        })
        .collect();
    out.sort_by_key(|(id, _)| *id);
    out
}

/// Records each newly overdue attempt once: an `overdue` event and a log
/// line. Returns the attempts recorded now.
pub fn record_overdue(store: &Store) -> Result<Vec<(u64, Attempt)>, StoreError> {
    let now = runtime::now();
    let snap = store.snapshot()?;
    let new = overdue(&snap.db, &snap.rt, now)
        .into_iter()
        .any(|(_, a)| !a.overdue_logged);
    drop(snap);
    if !new {
        return Ok(Vec::new());
    }
    let recorded = store.modify(move |txn| {
        let mut recorded = Vec::new();
        for (id, a) in overdue(&txn.db, txn.runtime_table(), now) {
            if a.overdue_logged {
                continue;
            }
            txn.update_runtime(id, |rt| {
                if let Some(open) = rt.attempts.last_mut().filter(|o| o.n == a.n) {
                    open.overdue_logged = true;
                }
            });
            let state = txn.db.get(id).map(|h| h.state).unwrap_or_default();
            txn.record(
                Event::now(id, &state, &state, "overdue", "").with_detail(describe(&a, now)),
            );
            recorded.push((id, a));
        }
        recorded
    })?;
    for (id, a) in &recorded {
        log(&format!("host {id}: {}", describe(a, now)));
    }
    Ok(recorded)
}

/// "install 2 of web has run 75 min, past its deadline of 60 min".
pub fn describe(a: &Attempt, now: u64) -> String {
    format!(
        "install {} of {} has run {}, past its deadline of {} min",
        a.n,
        a.state,
        human_duration(a.elapsed(now)),
        a.deadline_minutes
    )
}

/// Starts the handler's overdue watch on a thread of its own.
pub fn start_watch(service: &Arc<Service>) {
    let service = Arc::downgrade(service);
    let started = std::thread::Builder::new()
        .name("kiwispray-overdue".into())
        .spawn(move || loop {
            std::thread::sleep(WATCH_INTERVAL);
            let Some(service) = service.upgrade() else {
                return;
            };
            if let Err(e) = record_overdue(&service.store) {
                log(&format!("overdue watch: {e}"));
            }
        });
    if let Err(e) = started {
        log(&format!("cannot start the overdue watch: {e}"));
    }
}
