//! The read-only JSON API under `/api/v1/`, which the fleet page (`/ui/`)
//! reads; the web server configs allow it from the local machine only, like
//! `/hosts`. GET (or HEAD) only; changes nothing.
//!
//! - `/api/v1/summary`: host counts per current state (held hosts counted
//!   apart), held per cause, installs in progress and overdue.
//! - `/api/v1/hosts`: every host, each as `kiwispray-hosts list --json`
//!   prints it ([`crate::view::host_json`], the one serialiser of both).
//! - `/api/v1/hosts/<id>[?since=OFFSET]`: one host and its events from the
//!   event log. `next` in the answer is the log offset to pass as `since`
//!   next time, which returns only the events appended meanwhile; a log
//!   that was replaced or shrank is read again from 0 (`reset: true`).
//!
//! Every answer is an object with `"api": "v1"`; fields are only ever
//! added within v1. Bad input gets a 4xx with a one-line reason.

use super::{shorten, Params, Request, Response, Service};
use crate::events::{rfc3339_secs, Event};
use crate::runtime;
use crate::view::host_json;
use serde_json::{json, Map, Value};
use std::io::{Read, Seek, SeekFrom};

/// The most bytes of event log one answer reads.
const MAX_EVENT_READ: u64 = 64 * 1024 * 1024;

fn json_response(v: &Value) -> Response {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    Response {
        status: 200,
        headers: vec![("Content-Type", "application/json".into())],
        body,
    }
}

impl Service {
    /// Answers a path under `/api/` (`path` starts there).
    pub(super) fn api(&self, req: &Request, path: &str) -> Response {
        if req.method != "GET" && req.method != "HEAD" {
            return Response::error(
                405,
                format!("{} is not allowed on {}", req.method, shorten(path)),
            );
        }
        let params = match Params::parse(req.query.as_bytes(), "query string") {
            Ok(p) => p,
            Err(e) => return Response::error(400, e),
        };
        let result = match path {
            "/api/v1/summary" => self.api_summary(),
            "/api/v1/hosts" | "/api/v1/hosts/" => self.api_hosts(),
            p => match p.strip_prefix("/api/v1/hosts/") {
                Some(id) => self.api_host(id, &params),
                None => Err(Response::error(
                    404,
                    format!("no such path {:?}", shorten(path)),
                )),
            },
        };
        result.unwrap_or_else(|e| e)
    }

    fn api_summary(&self) -> Result<Response, Response> {
        let snap = self.snapshot()?;
        let now = runtime::now();
        let mut states: Map<String, Value> = Map::new();
        let mut held: Map<String, Value> = Map::new();
        let (mut hosts, mut n_held, mut installing) = (0u64, 0u64, 0u64);
        let bump = |m: &mut Map<String, Value>, k: &str| {
            let n = m.get(k).and_then(Value::as_u64).unwrap_or(0);
            m.insert(k.to_string(), (n + 1).into());
        };
        for h in snap.hosts() {
            hosts += 1;
            let rt = snap.runtime(h.id);
            if crate::lifecycle::installing(&h, rt) {
                installing += 1;
            }
            match &rt.hold {
                Some(hold) => {
                    n_held += 1;
                    bump(&mut held, hold.cause.as_str());
                }
                None => bump(&mut states, h.current_state()),
            }
        }
        let overdue = super::overdue::overdue(&snap.db, &snap.rt, now).len();
        Ok(json_response(&json!({
            "api": "v1",
            "generated": rfc3339_secs(now),
            "hosts": hosts,
            "states": states,
            "held": n_held,
            "held_by_cause": held,
            "installing": installing,
            "overdue": overdue,
        })))
    }

    fn api_hosts(&self) -> Result<Response, Response> {
        let snap = self.snapshot()?;
        let now = runtime::now();
        let hosts: Vec<Value> = snap
            .hosts()
            .map(|h| host_json(&h, snap.runtime(h.id), now))
            .collect();
        Ok(json_response(&json!({
            "api": "v1",
            "generated": rfc3339_secs(now),
            "hosts": hosts,
        })))
    }

    fn api_host(&self, raw_id: &str, params: &Params) -> Result<Response, Response> {
        if raw_id.is_empty() || raw_id.len() > 19 || !raw_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Response::error(
                400,
                format!("{:?} is not a host id (a whole number)", shorten(raw_id)),
            ));
        }
        let id: u64 = raw_id
            .parse()
            .map_err(|_| Response::error(400, format!("id {raw_id:?} is out of range")))?;
        let since = match params.one("since").map_err(|e| Response::error(400, e))? {
            None | Some("") => 0,
            Some(s) if s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>()
                    .map_err(|_| Response::error(400, "since is out of range"))?
            }
            Some(s) => {
                return Err(Response::error(
                    400,
                    format!("since {:?} is not an offset (a whole number)", shorten(s)),
                ))
            }
        };
        let snap = self.snapshot()?;
        let now = runtime::now();
        let host = snap
            .get(id)
            .ok_or_else(|| Response::error(404, format!("no host with id {id}")))?;
        let value = host_json(&host, snap.runtime(id), now);
        drop(snap);
        let (events, next, reset) = self.events_since(id, since)?;
        Ok(json_response(&json!({
            "api": "v1",
            "generated": rfc3339_secs(now),
            "host": value,
            "events": events,
            "next": next,
            "reset": reset,
        })))
    }

    /// The events of host `id` from offset `since` of the event log, the
    /// offset after the last complete line read, and whether the log had to
    /// be read from 0 again.
    fn events_since(&self, id: u64, since: u64) -> Result<(Vec<Event>, u64, bool), Response> {
        let path = self.store.events_path();
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), 0, since > 0))
            }
            Err(e) => {
                return Err(Response::error(
                    500,
                    format!("cannot read the event log: {e}"),
                ))
            }
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let (start, reset) = if since > len {
            (0, true)
        } else {
            (since, false)
        };
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.take(MAX_EVENT_READ).read_to_end(&mut buf))
            .map_err(|e| Response::error(500, format!("cannot read the event log: {e}")))?;
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let events = buf[..end]
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Event>(line).ok())
            .filter(|e| e.host == id)
            .collect();
        Ok((events, start + end as u64, reset))
    }
}
