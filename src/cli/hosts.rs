//! The host-database commands of `kiwispray-hosts`: `list`, `show`, `add`,
//! `set`, `remove`, `release` and `history`. Input is validated completely before the
//! store is touched; the change itself is decided again under the store's
//! lock (another writer may have changed the database in between), saved
//! atomically and recorded in the event log with cause `cli`.

use super::{
    json_text, out, AddArgs, Ctx, Error, Exit, HistoryArgs, ListArgs, ReleaseArgs, RemoveArgs,
    Result, SetArgs, ShowArgs,
};
use crate::events::{self, rfc3339_secs, Event};
use crate::hosts::{
    Database, Host, Key, HOSTNAME_NOT_SET, STATE_DISCOVER, STATE_FINISHED, STATE_NEW,
};
use crate::identity::{canonical_uuid, Mac};
use crate::lifecycle::{self, NextBoot};
use crate::runtime::{self, human_duration, HostRuntime};
use serde_json::{Map, Value};
use std::path::Path;

/// The cause recorded for every change the CLI makes.
pub const CAUSE: &str = "cli";

/// Finds the host a selector names: an id, a MAC, a serial or a UUID.
pub fn resolve(db: &Database, selector: &str) -> Result<u64> {
    let s = selector.trim();
    if s.is_empty() {
        return Err(Error::usage(
            "empty host name; give an id, MAC, serial or UUID",
        ));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(id) = s.parse::<u64>() {
            if db.contains(id) {
                return Ok(id);
            }
        }
    }
    let mut found: Vec<u64> = Vec::new();
    if let Ok(mac) = Mac::parse(s) {
        found.extend(db.lookup(&Key::Mac(mac)));
    }
    // A serial or UUID that identifies machines is in the index; only a
    // placeholder needs a look at every host.
    if let Some(uuid) = canonical_uuid(s) {
        match db.placeholders().uuid_key(&uuid) {
            Some(key) => found.extend(db.lookup(&Key::Uuid(key))),
            None => found.extend(
                db.hosts()
                    .filter(|h| canonical_uuid(&h.uuid).as_deref() == Some(&uuid))
                    .map(|h| h.id),
            ),
        }
    }
    match db.placeholders().serial_key(s) {
        Some(key) => found.extend(db.lookup(&Key::Serial(key))),
        None => found.extend(
            db.hosts()
                .filter(|h| !h.serial.trim().is_empty() && h.serial.trim() == s)
                .map(|h| h.id),
        ),
    }
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [] => Err(Error::not_found(format!(
            "no host with id, MAC, serial or UUID {:?} (see kiwispray-hosts list)",
            short(s)
        ))),
        [one] => Ok(*one),
        many => Err(Error::usage(format!(
            "{:?} matches several hosts ({}); name one by its id",
            short(s),
            many.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Checks a state chain for `set` and `add`: safe names, and each element
/// is built in or has an image or template, so a typo cannot leave a
/// machine unbootable.
pub fn check_states(root_images: &Path, root_templates: &Path, chain: &str) -> Result<String> {
    let chain = chain.trim();
    if chain.is_empty() {
        return Err(Error::usage("empty state"));
    }
    let parts = crate::lifecycle::check_chain(chain).map_err(Error::usage)?;
    for p in &parts {
        if matches!(*p, STATE_NEW | STATE_FINISHED | STATE_DISCOVER) {
            continue;
        }
        if root_images.join(p).is_dir() || root_templates.join(format!("{p}.tmpl")).is_file() {
            continue;
        }
        return Err(Error::usage(format!(
            "state {p:?} has neither {} nor {} (import it with kiwispray-hosts import-image {p} <build>)",
            root_images.join(p).display(),
            root_templates.join(format!("{p}.tmpl")).display()
        )));
    }
    Ok(parts.join(","))
}

/// A hostname a template can use unquoted: RFC 1123 labels.
pub fn check_hostname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "hostname {:?} is not valid (letters, digits and '-' in dot-separated labels)",
            short(name)
        )))
    }
}

/// Parses a JSON object given on the command line.
pub fn parse_object(what: &str, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(Error::usage(format!(
            "{what} must be a JSON object like '{{\"key\": \"value\"}}', not {}",
            short(&other.to_string())
        ))),
        Err(e) => Err(Error::usage(format!("{what} is not valid JSON: {e}"))),
    }
}

fn split_key(key: &str) -> Result<Vec<String>> {
    let parts: Vec<String> = key.split('.').map(str::to_string).collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::usage(format!(
            "metadata key {:?} is not valid (names separated by dots)",
            short(key)
        )));
    }
    Ok(parts)
}

/// One `--meta-set KEY=VALUE`: the path and the value (JSON if it parses,
/// else a string).
pub fn parse_meta_set(arg: &str) -> Result<(Vec<String>, Value)> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| Error::usage(format!("--meta-set {:?}: expected KEY=VALUE", short(arg))))?;
    let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((split_key(k.trim())?, value))
}

/// Sets a dotted path, creating objects on the way; a non-object in the
/// way is an error.
pub fn set_path(
    map: &mut Map<String, Value>,
    path: &[String],
    value: Value,
) -> std::result::Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = map;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            other => {
                return Err(format!(
                    "metadata {} is {}, not an object; unset it first",
                    path[..=i].join("."),
                    other
                ))
            }
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// Removes a dotted path; whether it was there.
pub fn unset_path(map: &mut Map<String, Value>, path: &[String]) -> bool {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = map;
    for p in parents {
        cur = match cur.get_mut(p) {
            Some(Value::Object(m)) => m,
            _ => return false,
        };
    }
    cur.remove(last).is_some()
}

fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// What a table cell shows of a text: control characters made visible.
fn cell(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

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

/// One short word or phrase for `list`: held, overdue, installing.
pub fn status(host: &Host, rt: &HostRuntime, now: u64) -> String {
    if let Some(h) = &rt.hold {
        return format!(
            "HELD ({}) {}",
            h.cause.as_str(),
            human_duration(now.saturating_sub(h.since))
        );
    }
    if let Some(a) = lifecycle::overdue_attempt(host, rt, now) {
        return format!(
            "OVERDUE {} (attempt {}, deadline {} min)",
            human_duration(a.elapsed(now)),
            a.n,
            a.deadline_minutes
        );
    }
    if lifecycle::installing(host, rt) {
        if let Some(a) = rt.open_attempt() {
            return format!(
                "installing {} (attempt {})",
                human_duration(a.elapsed(now)),
                a.n
            );
        }
        return "installing".into();
    }
    "-".into()
}

/// "3 min ago (efi)" for `list -v` and `show`.
fn seen_text(rt: &HostRuntime, now: u64) -> String {
    match &rt.seen {
        None => "-".into(),
        Some(s) => {
            let mut t = format!("{} ago", human_duration(now.saturating_sub(s.at)));
            if !s.platform.is_empty() {
                t.push_str(&format!(" ({})", cell(&s.platform)));
            }
            t
        }
    }
}

pub fn list(ctx: &Ctx, a: &ListArgs) -> Result<Exit> {
    let snap = ctx.store().snapshot()?;
    let now = runtime::now();
    let (held, overdue, state) = match a.state.as_deref() {
        Some("held") => (true, a.overdue, None),
        Some("overdue") => (a.held, true, None),
        s => (a.held, a.overdue, s),
    };
    let hosts: Vec<Host> = snap
        .hosts()
        .filter(|h| state.is_none_or(|s| h.current_state() == s))
        .filter(|h| !held || snap.runtime(h.id).hold.is_some())
        .filter(|h| !overdue || lifecycle::overdue_attempt(h, snap.runtime(h.id), now).is_some())
        .collect();
    if a.json {
        let v: Vec<Value> = hosts
            .iter()
            .map(|h| host_json(h, snap.runtime(h.id), now))
            .collect();
        out(&json_text(&Value::Array(v)))?;
        return Ok(Exit::Ok);
    }
    let mut rows = vec![if a.verbose {
        [
            "ID",
            "HOSTNAME",
            "STATE",
            "STATUS",
            "SERIAL",
            "UUID",
            "LAST SEEN",
            "MACS",
            "METADATA",
        ]
        .map(String::from)
        .to_vec()
    } else {
        ["ID", "HOSTNAME", "STATE", "STATUS", "SERIAL", "MACS"]
            .map(String::from)
            .to_vec()
    }];
    for h in hosts {
        let rt = snap.runtime(h.id);
        let macs: Vec<String> = h.macs.split_whitespace().map(String::from).collect();
        if a.verbose {
            rows.push(vec![
                h.id.to_string(),
                cell(&h.hostname),
                cell(&h.state),
                status(&h, rt, now),
                cell(&h.serial),
                cell(&h.uuid),
                seen_text(rt, now),
                cell(&macs.join(",")),
                if h.metadata.is_empty() {
                    "-".into()
                } else {
                    Value::Object(h.metadata.clone()).to_string()
                },
            ]);
        } else {
            let m = match macs.len() {
                0 => "-".to_string(),
                1 => macs[0].clone(),
                n => format!("{} (+{})", macs[0], n - 1),
            };
            rows.push(vec![
                h.id.to_string(),
                cell(&h.hostname),
                cell(&h.state),
                status(&h, rt, now),
                cell(&h.serial),
                m,
            ]);
        }
    }
    out(&table(&rows))?;
    Ok(Exit::Ok)
}

fn tree(out: &mut String, v: &Map<String, Value>, depth: usize) {
    for (k, v) in v {
        let pad = "  ".repeat(depth + 1);
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push_str(&format!("{pad}{k}:\n"));
                tree(out, m, depth + 1);
            }
            Value::String(s) => out.push_str(&format!("{pad}{k}: {}\n", cell(s))),
            other => out.push_str(&format!("{pad}{k}: {other}\n")),
        }
    }
}

fn event_line(e: &Event) -> String {
    let change = if e.from == e.to {
        format!("{} (unchanged state)", cell(&e.to))
    } else if e.from.is_empty() {
        format!("-> {}", cell(&e.to))
    } else {
        format!("{} -> {}", cell(&e.from), cell(&e.to))
    };
    let remote = if e.remote.is_empty() {
        String::new()
    } else {
        format!(" from {}", cell(&e.remote))
    };
    let detail = if e.detail.is_empty() {
        String::new()
    } else {
        format!(": {}", cell(&e.detail))
    };
    format!(
        "{}  host {}  {:<12} {change}{remote}{detail}",
        e.time, e.host, e.cause
    )
}

pub fn show(ctx: &Ctx, a: &ShowArgs) -> Result<Exit> {
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    let host = db.get(id).expect("resolved");
    let rt = db.runtime(id);
    let now = runtime::now();
    let (events, _) = events::read(store.events_path(), Some(id)).map_err(|e| {
        Error::io(format!(
            "cannot read {}: {e}",
            store.events_path().display()
        ))
    })?;
    let recent = &events[events.len().saturating_sub(a.events)..];
    if a.json {
        out(&json_text(
            &serde_json::json!({ "host": host_json(&host, rt, now), "events": recent }),
        ))?;
        return Ok(Exit::Ok);
    }
    let mut s = String::new();
    s.push_str(&format!("id:        {}\n", host.id));
    s.push_str(&format!("hostname:  {}\n", cell(&host.hostname)));
    s.push_str(&format!("state:     {}", cell(&host.state)));
    let next = match lifecycle::next_boot(&host.state) {
        NextBoot::Wait => "waits for an operator".to_string(),
        NextBoot::LocalDisk => "boots its local disk".to_string(),
        NextBoot::Install(_) if rt.hold.is_some() => "held: installs nothing".to_string(),
        NextBoot::Install(s) => format!("installs {s}"),
        NextBoot::Refuse(r) => format!("cannot boot: {r}"),
    };
    s.push_str(&format!("  (next boot: {next})\n"));
    s.push_str(&format!("macs:      {}\n", cell(&host.macs)));
    s.push_str(&format!("serial:    {}\n", cell(&host.serial)));
    s.push_str(&format!("uuid:      {}\n", cell(&host.uuid)));
    s.push_str(&format!("status:    {}\n", status(&host, rt, now)));
    if let Some(hold) = &rt.hold {
        s.push_str(&format!(
            "hold:      {} since {} ({} ago): {}\n           release with: kiwispray-hosts release {}\n",
            hold.cause.as_str(),
            rfc3339_secs(hold.since),
            human_duration(now.saturating_sub(hold.since)),
            cell(&hold.reason),
            host.id
        ));
    }
    s.push_str(&format!("last seen: {}", seen_text(rt, now)));
    match &rt.seen {
        Some(seen) if !seen.remote.is_empty() => {
            s.push_str(&format!(" from {}\n", cell(&seen.remote)))
        }
        _ => s.push('\n'),
    }
    for (k, v) in &host.extra {
        s.push_str(&format!("{k}: {v}\n"));
    }
    if host.metadata.is_empty() {
        s.push_str("metadata:  -\n");
    } else {
        s.push_str("metadata:\n");
        tree(&mut s, &host.metadata, 0);
    }
    if rt.attempts.is_empty() {
        s.push_str("attempts:  -\n");
    } else {
        s.push_str("attempts:\n");
        for at in &rt.attempts {
            let outcome = match (at.outcome, lifecycle::overdue_attempt(&host, rt, now)) {
                (Some(o), _) => o.as_str().to_string(),
                (None, Some(o)) if o.n == at.n => "OVERDUE".to_string(),
                (None, _) => "in progress".to_string(),
            };
            s.push_str(&format!(
                "  {:>3}  {}  {}  {} after {} (deadline {} min){}{}\n",
                at.n,
                rfc3339_secs(at.started),
                cell(&at.state),
                outcome,
                human_duration(at.elapsed(now)),
                at.deadline_minutes,
                at.digest
                    .as_deref()
                    .map_or(String::new(), |d| format!(", image {d}")),
                at.reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(": {}", cell(r)))
            ));
        }
    }
    if recent.is_empty() {
        s.push_str("events:    -\n");
    } else {
        s.push_str(&format!("events (last {}):\n", recent.len()));
        for e in recent {
            s.push_str(&format!("  {}\n", event_line(e)));
        }
    }
    out(&s)?;
    Ok(Exit::Ok)
}

/// Refuses identity keys another host has.
fn check_keys_free(db: &Database, keys: &[Key], except: Option<u64>) -> Result<()> {
    for k in keys {
        if let Some(other) = db.lookup(k).iter().find(|i| Some(**i) != except) {
            return Err(Error::conflict(format!(
                "{k} already belongs to host {other}"
            )));
        }
    }
    Ok(())
}

pub fn add(ctx: &Ctx, a: &AddArgs) -> Result<Exit> {
    let mut macs: Vec<Mac> = Vec::new();
    for m in &a.macs {
        let mac = Mac::parse(m).map_err(|e| Error::usage(format!("--mac: {e}")))?;
        if !macs.contains(&mac) {
            macs.push(mac);
        }
    }
    let serial = a.serial.clone().unwrap_or_default();
    if serial.chars().any(char::is_control) || serial.chars().count() > 256 {
        return Err(Error::usage(
            "--serial must be at most 256 characters without control characters",
        ));
    }
    let uuid = match a.uuid.as_deref() {
        None => String::new(),
        Some(u) => canonical_uuid(u).ok_or_else(|| {
            Error::usage(format!(
                "--uuid {:?} is not a UUID (32 hex digits)",
                short(u)
            ))
        })?,
    };
    let hostname = a
        .hostname
        .clone()
        .unwrap_or_else(|| HOSTNAME_NOT_SET.to_string());
    check_hostname(&hostname)?;
    let state = match &a.state {
        Some(s) => check_states(&ctx.config.images_dir(), &ctx.config.templates_dir(), s)?,
        None => STATE_NEW.to_string(),
    };
    let metadata = match &a.meta {
        Some(m) => parse_object("--meta", m)?,
        None => Map::new(),
    };
    let store = ctx.store();
    let probe = Host::new(0, &macs, &serial, &uuid, &state);
    let db = store.snapshot()?;
    let keys = crate::hosts::keys_of(&probe, db.placeholders());
    if keys.is_empty() {
        return Err(Error::usage(
            "give at least one --mac, or a serial or UUID that identifies the machine \
             (placeholder serials such as \"Default string\" do not)",
        ));
    }
    if !serial.is_empty() && db.placeholders().serial_key(&serial).is_none() {
        eprintln!("kiwispray-hosts: note: serial {serial:?} is a placeholder shared by many machines; it does not identify this one");
    }
    check_keys_free(&db, &keys, None)?;
    let host = store.modify(move |txn| -> Result<Host> {
        let keys = crate::hosts::keys_of(&probe, txn.db.placeholders());
        check_keys_free(&txn.db, &keys, None)?;
        let id = txn.next_id();
        let mut host = Host::new(id, &macs, &serial, &uuid, &state);
        host.hostname = hostname;
        host.metadata = metadata;
        txn.db.insert(host.clone()).map_err(Error::io)?;
        txn.record(Event::now(id, "", &host.state, CAUSE, ""));
        Ok(host)
    })??;
    if a.json {
        out(&json_text(&host.to_value()))?;
    } else {
        out(&format!(
            "added host {} ({}), state {}\n",
            host.id, host.macs, host.state
        ))?;
    }
    Ok(Exit::Ok)
}

/// The edits of one `set`, validated.
struct Edit {
    state: Option<String>,
    hostname: Option<String>,
    merge: Option<Map<String, Value>>,
    sets: Vec<(Vec<String>, Value)>,
    unsets: Vec<Vec<String>>,
}

impl Edit {
    fn apply(&self, h: &mut Host) -> std::result::Result<(), String> {
        if let Some(s) = &self.state {
            if *s != h.state {
                h.state = s.clone();
            }
        }
        if let Some(n) = &self.hostname {
            h.hostname = n.clone();
        }
        if let Some(m) = &self.merge {
            crate::api::merge(&mut h.metadata, m.clone());
        }
        for (path, v) in &self.sets {
            set_path(&mut h.metadata, path, v.clone())?;
        }
        for path in &self.unsets {
            if !unset_path(&mut h.metadata, path) {
                eprintln!(
                    "kiwispray-hosts: note: metadata {} was not set",
                    path.join(".")
                );
            }
        }
        Ok(())
    }
}

pub fn set(ctx: &Ctx, a: &SetArgs) -> Result<Exit> {
    let state = match &a.state {
        Some(s) => Some(check_states(
            &ctx.config.images_dir(),
            &ctx.config.templates_dir(),
            s,
        )?),
        None => None,
    };
    if let Some(h) = &a.hostname {
        check_hostname(h)?;
    }
    let merge = match &a.meta {
        Some(m) => Some(parse_object("--meta", m)?),
        None => None,
    };
    let sets = a
        .meta_set
        .iter()
        .map(|s| parse_meta_set(s))
        .collect::<Result<Vec<_>>>()?;
    let unsets = a
        .meta_unset
        .iter()
        .map(|k| split_key(k))
        .collect::<Result<Vec<_>>>()?;
    if state.is_none()
        && a.hostname.is_none()
        && merge.is_none()
        && sets.is_empty()
        && unsets.is_empty()
    {
        return Err(Error::usage(
            "nothing to change: give --state, --hostname, --meta, --meta-set or --meta-unset",
        ));
    }
    let edit = Edit {
        state,
        hostname: a.hostname.clone(),
        merge,
        sets,
        unsets,
    };
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    // Try the edit on the current copy first, so that errors are reported
    // without taking the lock.
    let mut trial = db.get(id).expect("resolved");
    edit.apply(&mut trial).map_err(Error::usage)?;
    let host = store.modify(move |txn| -> Result<Host> {
        let before = txn
            .db
            .get(id)
            .ok_or_else(|| Error::not_found(format!("host {id} was removed meanwhile")))?;
        let mut failed = None;
        txn.db.update(id, |h| {
            if let Err(e) = edit.apply(h) {
                failed = Some(e);
                *h = before.clone();
            }
        });
        if let Some(e) = failed {
            return Err(Error::usage(e));
        }
        let after = txn.db.get(id).expect("exists");
        if after.state != before.state {
            // A new intent: the installer of the old state may no longer
            // report, and the loop count starts anew. A hold stays.
            let now = runtime::now();
            txn.update_runtime(id, |rt| {
                rt.abandon_open(now, Some("state changed by an operator".into()));
                rt.reset_count();
            });
        }
        if after != before {
            txn.record(Event::now(id, &before.state, &after.state, CAUSE, ""));
        }
        if after.state != before.state && txn.runtime(id).hold.is_some() {
            eprintln!(
                "kiwispray-hosts: note: host {id} is held; it installs nothing until: kiwispray-hosts release {id}"
            );
        }
        Ok(after)
    })??;
    if a.json {
        out(&json_text(&host.to_value()))?;
    } else {
        out(&format!(
            "host {}: hostname {}, state {}\n",
            host.id, host.hostname, host.state
        ))?;
    }
    Ok(Exit::Ok)
}

pub fn remove(ctx: &Ctx, a: &RemoveArgs) -> Result<Exit> {
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    let removed = store.modify(move |txn| -> Result<Host> {
        let h = txn
            .remove_host(id)
            .ok_or_else(|| Error::not_found(format!("host {id} was removed meanwhile")))?;
        txn.record(Event::now(id, &h.state, "", CAUSE, ""));
        Ok(h)
    })??;
    out(&format!(
        "removed host {} ({}, {})\n",
        removed.id, removed.hostname, removed.macs
    ))?;
    Ok(Exit::Ok)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_meta_paths() {
        let mut m = Map::new();
        let (p, v) = parse_meta_set("net.vlan=12").unwrap();
        set_path(&mut m, &p, v).unwrap();
        let (p, v) = parse_meta_set("net.name=it's a b").unwrap();
        set_path(&mut m, &p, v).unwrap();
        assert_eq!(
            Value::Object(m.clone()),
            json!({"net": {"vlan": 12, "name": "it's a b"}})
        );
        let (p, v) = parse_meta_set("net.vlan.x=1").unwrap();
        assert!(set_path(&mut m, &p, v).unwrap_err().contains("net.vlan"));
        assert!(unset_path(&mut m, &["net".into(), "vlan".into()]));
        assert!(!unset_path(&mut m, &["nope".into(), "x".into()]));
        assert!(parse_meta_set("novalue").is_err());
        assert!(parse_meta_set("a..b=1").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(check_hostname("web-01.example.com").is_ok());
        for bad in ["", "-a", "a_b", "a..b", "${x}", "a b"] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }
}
