//! `GET /fail?id=N&bootid=B&reason=TEXT`: the installer, the installed
//! system's first-boot agent or the post-install script reports that the
//! install failed. With the same bootid rules as `/finish`, the attempt
//! ends as failed with the reason (one line, at most
//! [`crate::runtime::MAX_REASON`] characters), the bootid is used up and
//! the host is put on hold (cause `failed`): it keeps its state chain, but
//! installs nothing until `kiwispray-hosts release`.

use super::{
    check_installing, id_and_bootid, log, store_failure, Params, Request, Response, Service,
};
use crate::events::Event;
use crate::runtime::{self, one_line, HoldCause, Outcome, MAX_REASON};

impl Service {
    pub(super) fn fail(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let (id, bootid) = id_and_bootid(params)?;
        let reason = params
            .one("reason")
            .map_err(|e| Response::error(400, e))?
            .map(|r| one_line(r, MAX_REASON))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "no reason given".to_string());
        let snap = self.snapshot()?;
        check_installing(&snap.db, &snap.rt, id, &bootid)?;
        drop(snap);
        let (remote, via) = (req.remote.clone(), req.via.clone());
        let why = reason.clone();
        let result = self
            .store
            .modify(move |txn| -> Result<String, Response> {
                let (host, _) = check_installing(&txn.db, txn.runtime_table(), id, &bootid)?;
                let now = runtime::now();
                let ended = txn.update_runtime(id, |rt| {
                    let ended = rt.end_attempt(now, Outcome::Failed, Some(why.clone()));
                    rt.hold(now, HoldCause::Failed, why.clone());
                    ended
                });
                let attempt = ended.map_or(String::new(), |a| {
                    format!("attempt {} of {}: ", a.n, a.state)
                });
                txn.record(
                    Event::now(id, &host.state, &host.state, "fail", &remote)
                        .via(&via)
                        .with_detail(format!("{attempt}{why}")),
                );
                txn.record(
                    Event::now(id, &host.state, &host.state, "hold", &remote)
                        .via(&via)
                        .with_detail(format!("failed: {why}")),
                );
                Ok(host.state)
            })
            .map_err(|e| store_failure(&e))?;
        let state = result?;
        log(&format!(
            "host {id}: install of {state:?} failed (from {}): {reason}; held until `kiwispray-hosts release {id}`",
            req.origin()
        ));
        Ok(Response::text(200, format!("held: {reason}")))
    }
}
