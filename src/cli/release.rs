//! `kiwispray-hosts release HOST... [--where EXPR]`: clears the hold of held
//! hosts, in one commit, so that their next boot installs again and the loop count starts
//! anew. A host that is not held is reported and left as it is.

use super::hosts::{confirm, select};
use super::{out, Ctx, Error, Exit, ReleaseArgs, Result};
use crate::events::Event;
use crate::runtime;

pub fn release(ctx: &Ctx, a: &ReleaseArgs) -> Result<Exit> {
    let store = ctx.store();
    let snap = store.snapshot()?;
    let ids = select(&snap, &a.targets)?;
    if a.confirm.dry_run {
        let mut s = String::new();
        for id in &ids {
            match &snap.runtime(*id).hold {
                Some(h) => s.push_str(&format!(
                    "host {id}: would be released (held: {}: {})\n",
                    h.cause.as_str(),
                    h.reason
                )),
                None => s.push_str(&format!("host {id}: not held, nothing to do\n")),
            }
        }
        s.push_str("dry run: nothing was written\n");
        out(&s)?;
        return Ok(Exit::Ok);
    }
    drop(snap);
    confirm(&a.confirm, "release", &ids)?;
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
