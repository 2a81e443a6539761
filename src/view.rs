//! The one JSON form of a host with its runtime facts, as
//! `kiwispray-hosts list --json` prints it and the read-only HTTP API
//! (`/api/v1/hosts`) serves it: the configured fields of `known_hosts.json`
//! plus a `runtime` object (installing, overdue, hold, last seen, attempts
//! with RFC 3339 times). Never the bootid. CLI and API call the same
//! functions here, so the two cannot drift apart.

use crate::events::rfc3339_secs;
use crate::hosts::Host;
use crate::lifecycle;
use crate::runtime::HostRuntime;
use serde_json::Value;

/// A host's runtime facts as `--json` shows them: attempts, hold and last
/// seen with RFC 3339 times; never the bootid.
pub fn runtime_json(host: &Host, rt: &HostRuntime, now: u64) -> Value {
    let installing = lifecycle::installing(host, rt);
    let attempts: Vec<Value> = rt
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({
                "n": a.n,
                "state": a.state,
                "digest": a.digest,
                "started": rfc3339_secs(a.started),
                "ended": a.ended.map(rfc3339_secs),
                "outcome": a.outcome.map(|o| o.as_str()),
                "reason": a.reason,
                "seconds": a.elapsed(now),
                "deadline_minutes": a.deadline_minutes,
                "overdue": a.is_overdue(now) && installing,
            })
        })
        .collect();
    serde_json::json!({
        "installing": installing,
        "overdue": lifecycle::overdue_attempt(host, rt, now).is_some(),
        "held": rt.hold.as_ref().map(|h| serde_json::json!({
            "cause": h.cause.as_str(),
            "since": rfc3339_secs(h.since),
            "reason": h.reason,
        })),
        "last_seen": rt.seen.as_ref().map(|s| serde_json::json!({
            "at": rfc3339_secs(s.at),
            "platform": s.platform,
            "remote": s.remote,
        })),
        "attempts": attempts,
    })
}

/// A host as `--json` shows it: its configuration plus `runtime`.
pub fn host_json(host: &Host, rt: &HostRuntime, now: u64) -> Value {
    let mut v = host.to_value();
    if let Value::Object(m) = &mut v {
        m.insert("runtime".into(), runtime_json(host, rt, now));
    }
    v
}
