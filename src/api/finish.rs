//! `GET /finish?id=N&bootid=B`: the installed system reports that the
//! install of the host's current state element succeeded. The state chain
//! advances (the first element is dropped; `finished` once none is left),
//! the attempt is closed as finished with its duration, and the bootid is
//! used up, so the machine never installs again by accident.

use super::{
    check_installing, id_and_bootid, log, store_failure, Params, Request, Response, Service,
};
use crate::events::Event;
use crate::lifecycle;
use crate::runtime::{self, human_duration, Outcome};

impl Service {
    pub(super) fn finish(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let (id, bootid) = id_and_bootid(params)?;
        // Check on the cached copy first, so that bad requests never queue
        // behind writers; the check is repeated under the lock.
        let snap = self.snapshot()?;
        check_installing(&snap.db, &snap.rt, id, &bootid)?;
        drop(snap);
        let (remote, via) = (req.remote.clone(), req.via.clone());
        let result = self
            .store
            .modify(move |txn| -> Result<(String, String), Response> {
                check_installing(&txn.db, txn.runtime_table(), id, &bootid)?;
                let now = runtime::now();
                let (from, to) = txn
                    .db
                    .update(id, |h| {
                        let from = h.state.clone();
                        h.state = lifecycle::advance(&h.state);
                        (from, h.state.clone())
                    })
                    .expect("checked");
                let ended = txn.update_runtime(id, |rt| {
                    let ended = rt.end_attempt(now, Outcome::Finished, None);
                    // A new state element counts its attempts anew.
                    rt.reset_count();
                    ended
                });
                let detail = match ended {
                    Some(a) => format!(
                        "attempt {} of {} finished after {}",
                        a.n,
                        a.state,
                        human_duration(a.elapsed(now))
                    ),
                    None => "finished".to_string(),
                };
                txn.record(
                    Event::now(id, &from, &to, "finish", &remote)
                        .via(&via)
                        .with_detail(detail),
                );
                Ok((from, to))
            })
            .map_err(|e| store_failure(&e))?;
        let (from, to) = result?;
        log(&format!(
            "host {id}: finished {from:?}, now {to:?} (from {})",
            req.origin()
        ));
        Ok(Response::text(200, to))
    }
}
