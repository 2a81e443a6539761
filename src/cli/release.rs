//! `kiwispray-hosts release HOST...`: clears the hold of held hosts, in one
//! commit, so that their next boot installs again and the loop count starts
//! anew. A host that is not held is reported and left as it is.
use super::hosts::resolve;
use super::{out, Ctx, Error, Exit, ReleaseArgs, Result};
use crate::events::Event;
use crate::runtime;

pub fn release(ctx: &Ctx, a: &ReleaseArgs) -> Result<Exit> {
    let store = ctx.store();
    let db = store.snapshot()?;
    let mut ids = Vec::new();
    for sel in &a.hosts {
        let id = resolve(&db, sel)?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    drop(db);
    let results =
        store.modify(move |txn| -> Result<Vec<(u64, Option<runtime::Hold>)>> {
            let mut results = Vec::new();
            for id in ids {
                let host = txn
                    .db
                    .get(id)
                    .ok_or_else(|| Error::not_found(format!("host {id} was removed meanwhile")))?;
                let hold =
                    txn.update_runtime(id, |rt| rt.hold.is_some().then(|| rt.release()).flatten());
                if let Some(h) = &hold {
                    txn.record(
                        Event::now(id, &host.state, &host.state, "release", "")
                            .with_detail(format!("was held ({}): {}", h.cause.as_str(), h.reason)),
                    );
                }
                results.push((id, hold));
            }
            Ok(results)
        })??;
    let mut s = String::new();
    for (id, hold) in results {
        match hold {
            Some(h) => s.push_str(&format!(
                "host {id}: released (was held: {}); its next boot installs again\n",
                h.cause.as_str()
            )),
            None => s.push_str(&format!("host {id}: not held, nothing to do\n")),
        }
    }
    out(&s)?;
    Ok(Exit::Ok)
}
