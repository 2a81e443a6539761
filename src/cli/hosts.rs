//! What the host commands of `kiwispray-hosts` share: naming a host (by id,
//! MAC, serial or UUID), checking state chains and hostnames, and parsing
//! metadata edits. The commands themselves have a file each (`list`,
//! `show`, `add`, `set`, `remove`, `release`, `history`). Input is validated
//! completely before the store is touched; a change is decided again under
//! the store's lock (another writer may have changed the database in
//! between), saved atomically and recorded in the event log.

use super::{Confirm, Error, Result, Targets};
use crate::hosts::{Database, Key, STATE_DISCOVER, STATE_FINISHED, STATE_NEW};
use crate::identity::{canonical_uuid, Mac};
use crate::select::Selector;
use crate::store::Snapshot;
use serde_json::{Map, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

/// The cause recorded for every change the CLI makes.
pub const CAUSE: &str = "cli";

/// Finds the host a selector names: an id, a MAC, a serial or a UUID.
pub fn resolve(db: &Database, selector: &str) -> Result<u64> {
    resolve_in(db, selector, true)
}

/// [`resolve`]; `few` when the command names only a few hosts, so that
/// looking at every host's keys once is cheaper than indexing them.
fn resolve_in(db: &Database, selector: &str, few: bool) -> Result<u64> {
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
    let mut keys: Vec<Key> = Vec::new();
    if let Ok(mac) = Mac::parse(s) {
        keys.push(Key::Mac(mac));
    }
    // A serial or UUID that identifies machines is in the index; only a
    // placeholder needs a look at every host.
    if let Some(uuid) = canonical_uuid(s) {
        match db.placeholders().uuid_key(&uuid) {
            Some(key) => keys.push(Key::Uuid(key)),
            None => found.extend(
                db.hosts()
                    .filter(|h| canonical_uuid(&h.uuid).as_deref() == Some(&uuid))
                    .map(|h| h.id),
            ),
        }
    }
    match db.placeholders().serial_key(s) {
        Some(key) => keys.push(Key::Serial(key)),
        None => found.extend(
            db.hosts()
                .filter(|h| !h.serial.trim().is_empty() && h.serial.trim() == s)
                .map(|h| h.id),
        ),
    }
    if few {
        found.extend(db.lookup_any(&keys));
    } else {
        for k in &keys {
            found.extend(db.lookup(k));
        }
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

/// The ids a command works on, in id order: its HOST arguments, each
/// resolved, and the hosts its `--where` conditions select; with both, the
/// named hosts that match. No host at all is an error.
pub fn select(snap: &Snapshot, t: &Targets) -> Result<Vec<u64>> {
    if t.hosts.is_empty() && t.wheres.is_empty() {
        return Err(Error::usage("name the hosts: HOST... and/or --where EXPR"));
    }
    let selector = Selector::parse(&t.wheres).map_err(Error::usage)?;
    let now = crate::runtime::now();
    let mut ids: Vec<u64> = if t.hosts.is_empty() {
        snap.ids().collect()
    } else {
        let mut ids = Vec::with_capacity(t.hosts.len());
        let few = t.hosts.len() <= 2;
        for h in &t.hosts {
            ids.push(resolve_in(snap, h, few)?);
        }
        ids
    };
    ids.sort_unstable();
    ids.dedup();
    if !selector.is_empty() {
        ids.retain(|id| {
            snap.get(*id)
                .is_some_and(|h| selector.matches(&h, snap.runtime(*id), now))
        });
    }
    if ids.is_empty() {
        return Err(Error::not_found(format!(
            "no host matches --where {selector}{}",
            if t.hosts.is_empty() {
                ""
            } else {
                " among the named hosts"
            }
        )));
    }
    Ok(ids)
}

/// A change to more than one host needs `--yes`, or a "y" on a terminal.
pub fn confirm(c: &Confirm, what: &str, ids: &[u64]) -> Result<()> {
    if ids.len() <= 1 || c.yes || c.dry_run {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::usage(format!(
            "this would {what} {} hosts: add --yes to go ahead (or --dry-run to see them)",
            ids.len()
        )));
    }
    eprint!("kiwispray-hosts: {what} {} hosts? [y/N] ", ids.len());
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = stdin.lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(Error::usage("not confirmed; nothing changed"))
    }
}

/// Several reasons as one error line: "host 3: …; host 9: …".
pub fn all_or_nothing(reasons: Vec<String>) -> Error {
    let n = reasons.len();
    let shown: Vec<String> = reasons.into_iter().take(20).collect();
    let more = if n > shown.len() {
        format!("; and {} more", n - shown.len())
    } else {
        String::new()
    };
    Error::usage(format!(
        "{n} host(s) cannot take the change, so nothing was changed: {}{more}",
        shown.join("; ")
    ))
}

pub fn short(s: &str) -> String {
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

pub fn split_key(key: &str) -> Result<Vec<String>> {
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

/// Sets a dotted metadata path (see [`crate::hosts::set_path`]); a
/// non-object in the way is an error that says what to do.
pub fn set_path(
    map: &mut Map<String, Value>,
    path: &[String],
    value: Value,
) -> std::result::Result<(), String> {
    crate::hosts::set_path(map, path, value).map_err(|e| format!("{e}; unset it first"))
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

/// Refuses identity keys another host has.
pub fn check_keys_free(db: &Database, keys: &[Key], except: Option<u64>) -> Result<()> {
    for k in keys {
        if let Some(other) = db.lookup(k).iter().find(|i| Some(**i) != except) {
            return Err(Error::conflict(format!(
                "{k} already belongs to host {other}"
            )));
        }
    }
    Ok(())
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
