//! `POST /update?id=N&bootid=B`: a discovery image reports the machine's
//! MACs and metadata (a form with `mac=` and `metadata=` JSON fields). It is
//! accepted only while the host is being installed in state `discover`,
//! with its current bootid, and it never takes a MAC of another host.

use super::{
    check_installing, id_and_bootid, shorten, store_failure, Params, Request, Response, Service,
    MAX_BODY,
};
use crate::events::Event;
use crate::hosts::Database;
use crate::hosts::STATE_DISCOVER;
use crate::identity::Mac;
use crate::runtime::RuntimeTable;
use serde_json::{Map, Value};

impl Service {
    pub(super) fn update(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let media = req.content_type.split(';').next().unwrap_or("").trim();
        if !media.is_empty() && !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(Response::error(
                415,
                format!("expected a form (application/x-www-form-urlencoded), got {media:?}"),
            ));
        }
        if req.body.len() > MAX_BODY {
            return Err(Response::error(
                413,
                format!("body larger than {MAX_BODY} bytes"),
            ));
        }
        let form = Params::parse(&req.body, "form").map_err(|e| Response::error(400, e))?;
        let mut macs = Vec::new();
        let mut metadata = Map::new();
        for (k, v) in form.iter() {
            match k {
                "mac" => {
                    let m = Mac::parse(v).map_err(|e| Response::error(400, format!("mac: {e}")))?;
                    if !macs.contains(&m) {
                        macs.push(m);
                    }
                }
                "metadata" => match serde_json::from_str::<Value>(v) {
                    Ok(Value::Object(m)) => merge(&mut metadata, m),
                    Ok(_) => return Err(Response::error(400, "metadata must be a JSON object")),
                    Err(e) => {
                        return Err(Response::error(
                            400,
                            format!("metadata is not valid JSON: {e}"),
                        ))
                    }
                },
                other => {
                    return Err(Response::error(
                        400,
                        format!(
                            "unknown form field {:?} (expected mac, metadata)",
                            shorten(other)
                        ),
                    ))
                }
            }
        }
        let (id, bootid) = id_and_bootid(params)?;
        let check = move |db: &Database, rt: &RuntimeTable, macs: &[Mac]| -> Result<(), Response> {
            let (host, _) = check_installing(db, rt, id, &bootid)?;
            if host.current_state() != STATE_DISCOVER {
                return Err(Response::error(
                    409,
                    format!(
                        "host {id} is in state {:?}; /update is accepted only in state discover",
                        host.state
                    ),
                ));
            }
            for m in macs {
                if let Some(other) = db
                    .lookup(&crate::hosts::Key::Mac(*m))
                    .iter()
                    .find(|o| **o != id)
                {
                    return Err(Response::error(
                        409,
                        format!("MAC {m} belongs to host {other}"),
                    ));
                }
            }
            Ok(())
        };
        // Checked on the cached copy first, so that bad requests never
        // queue behind writers; the check is repeated under the lock.
        let snap = self.snapshot()?;
        check(&snap.db, &snap.rt, &macs)?;
        drop(snap);
        let (remote, via) = (req.remote.clone(), req.via.clone());
        let result = self
            .store
            .modify(move |txn| -> Result<String, Response> {
                check(&txn.db, txn.runtime_table(), &macs)?;
                let state = txn
                    .db
                    .update(id, |h| {
                        let mut list = h.mac_list();
                        for m in macs {
                            if !list.contains(&m) {
                                list.push(m);
                            }
                        }
                        h.macs = crate::identity::format_mac_list(&list);
                        merge(&mut h.metadata, metadata);
                        h.state.clone()
                    })
                    .expect("checked");
                txn.record(Event::now(id, &state, &state, "update", &remote).via(&via));
                Ok(state)
            })
            .map_err(|e| store_failure(&e))?;
        result?;
        Ok(Response::text(200, "updated"))
    }
}

/// Deep-merges `from` into `into`: objects merge, other values replace.
pub fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}
