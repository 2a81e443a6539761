//! The host database in memory: the records of `known_hosts.json`, their
//! on-disk JSON form, and the indexes that find a machine by id, MAC, serial
//! or UUID. Loading from and saving to disk belongs to [`crate::store`].
//!
//! The file is the seed tool's format: a JSON array of objects with the
//! fields `id`, `macs`, `serial`, `uuid`, `hostname`, `state`, `metadata` and
//! `bootid`. Fields this version does not know are kept and written back.
//! Keys are written sorted and pretty-printed, so the file diffs well.

use crate::identity::{parse_mac_list, Mac, Placeholders};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The hostname a freshly registered machine gets.
pub const HOSTNAME_NOT_SET: &str = "not-set";
/// The state of a registered machine that waits for an operator.
pub const STATE_NEW: &str = "new";
/// The state of an installed machine: it boots from its local disk.
pub const STATE_FINISHED: &str = "finished";
/// The state in which a machine may report its hardware through `/update`.
pub const STATE_DISCOVER: &str = "discover";

/// One machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    #[serde(deserialize_with = "de_id")]
    pub id: u64,
    #[serde(default, deserialize_with = "de_string")]
    pub macs: String,
    #[serde(default, deserialize_with = "de_string")]
    pub serial: String,
    #[serde(default, deserialize_with = "de_string")]
    pub uuid: String,
    #[serde(default, deserialize_with = "de_string")]
    pub hostname: String,
    #[serde(default, deserialize_with = "de_string")]
    pub state: String,
    #[serde(default, deserialize_with = "de_metadata")]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub bootid: Option<String>,
    /// Fields written by other tools; kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn de_id<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom(format!("id {n} is not a whole number"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("id {s:?} is not a whole number"))),
        other => Err(serde::de::Error::custom(format!(
            "id must be a number, found {other}"
        ))),
    }
}

fn de_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, found {other}"
        ))),
    }
}

fn de_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        Value::String(s) if s.trim().is_empty() => Ok(Map::new()),
        other => Err(serde::de::Error::custom(format!(
            "metadata must be an object, found {other}"
        ))),
    }
}

impl Host {
    /// A machine seen for the first time.
    pub fn new(id: u64, macs: &[Mac], serial: &str, uuid: &str, state: &str) -> Host {
        Host {
            id,
            macs: crate::identity::format_mac_list(macs),
            serial: serial.to_string(),
            uuid: uuid.to_string(),
            hostname: HOSTNAME_NOT_SET.to_string(),
            state: state.to_string(),
            metadata: Map::new(),
            bootid: None,
            extra: Map::new(),
        }
    }

    /// The parsed MACs of this host (entries that do not parse are skipped;
    /// `kiwispray-hosts check` reports them).
    pub fn mac_list(&self) -> Vec<Mac> {
        parse_mac_list(&self.macs).0
    }

    /// The first element of the state chain, which decides the next boot.
    pub fn current_state(&self) -> &str {
        current_state(&self.state)
    }

    /// This host as a JSON object with sorted keys.
    pub fn to_value(&self) -> Value {
        // serde_json's Map is ordered by key, so the keys come out sorted.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The first element of a comma-separated state chain such as `wipe,image1`.
pub fn current_state(chain: &str) -> &str {
    chain.split(',').next().unwrap_or("").trim()
}

/// One host with its on-disk JSON, kept so that saving a large database only
/// serialises the hosts that changed.
#[derive(Debug)]
pub struct Entry {
    pub host: Host,
    json: String,
}

impl Entry {
    fn new(host: Host) -> Entry {
        let json = pretty(&host.to_value(), 1);
        Entry { host, json }
    }
}

/// An identity key: what a booting machine is recognised by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Mac(Mac),
    Serial(String),
    Uuid(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Mac(m) => write!(f, "MAC {m}"),
            Key::Serial(s) => write!(f, "serial {s:?}"),
            Key::Uuid(u) => write!(f, "UUID {u}"),
        }
    }
}

/// The whole database. Cheap to clone: the host list and both indexes are
/// shared between clones and copied only when a clone changes them, and
/// each host is shared until it is changed. A write that changes one host
/// therefore copies one list of pointers, not the hosts or the indexes.
#[derive(Debug, Clone, Default)]
pub struct Database {
    entries: Arc<Vec<Arc<Entry>>>,
    by_id: Arc<HashMap<u64, usize>>,
    by_key: Arc<HashMap<Key, Vec<u64>>>,
    /// The highest id in use (0 when empty), so `next_id` is O(1).
    max_id: u64,
    placeholders: Arc<Placeholders>,
    changed: bool,
}

/// Why a JSON document is not a host database.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Database {
    pub fn empty(placeholders: Arc<Placeholders>) -> Database {
        Database {
            placeholders,
            ..Database::default()
        }
    }

    /// Parses the file's contents.
    pub fn parse(text: &[u8], placeholders: Arc<Placeholders>) -> Result<Database, ParseError> {
        let hosts: Vec<Host> = serde_json::from_slice(text).map_err(|e| ParseError {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })?;
        let mut seen = HashMap::new();
        for (i, h) in hosts.iter().enumerate() {
            if let Some(first) = seen.insert(h.id, i) {
                let line = line_of_nth_object(text, i);
                return Err(ParseError {
                    line,
                    column: 1,
                    message: format!(
                        "host id {} appears twice (entries {} and {})",
                        h.id,
                        first + 1,
                        i + 1
                    ),
                });
            }
        }
        let mut db = Database::empty(placeholders);
        db.entries = Arc::new(hosts.into_iter().map(|h| Arc::new(Entry::new(h))).collect());
        db.reindex();
        Ok(db)
    }

    /// The database as the file stores it.
    pub fn to_json(&self) -> String {
        let mut out =
            Vec::with_capacity(self.entries.iter().map(|e| e.json.len() + 6).sum::<usize>() + 4);
        self.write_json(&mut out)
            .expect("writing to memory does not fail");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// Writes the file's contents to `w` (the same bytes as [`Self::to_json`])
    /// without building them in memory first: each host's JSON is kept
    /// from when it was loaded or last changed.
    pub fn write_json(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        if self.entries.is_empty() {
            return w.write_all(b"[]\n");
        }
        w.write_all(b"[\n")?;
        let last = self.entries.len() - 1;
        for (i, e) in self.entries.iter().enumerate() {
            w.write_all(b"    ")?;
            w.write_all(e.json.as_bytes())?;
            w.write_all(if i < last { b",\n" } else { b"\n" })?;
        }
        w.write_all(b"]\n")
    }

    fn reindex(&mut self) {
        let mut by_id = HashMap::with_capacity(self.entries.len());
        let mut by_key: HashMap<Key, Vec<u64>> = HashMap::with_capacity(self.entries.len() * 2);
        for (i, e) in self.entries.iter().enumerate() {
            by_id.insert(e.host.id, i);
            for key in keys_of(&e.host, &self.placeholders) {
                let ids = by_key.entry(key).or_default();
                if !ids.contains(&e.host.id) {
                    ids.push(e.host.id);
                }
            }
        }
        self.max_id = by_id.keys().copied().max().unwrap_or(0);
        self.by_id = Arc::new(by_id);
        self.by_key = Arc::new(by_key);
    }

    pub fn placeholders(&self) -> &Placeholders {
        &self.placeholders
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.entries.iter().map(|e| &e.host)
    }

    pub fn get(&self, id: u64) -> Option<&Host> {
        self.by_id.get(&id).map(|&i| &self.entries[i].host)
    }

    /// The ids of the hosts that carry a key.
    pub fn lookup(&self, key: &Key) -> &[u64] {
        self.by_key.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The id a new host gets: one more than the highest in use.
    pub fn next_id(&self) -> u64 {
        self.max_id + 1
    }

    /// Whether anything was changed since the database was loaded.
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    /// Forgets earlier changes, e.g. once they are saved.
    pub fn clear_changed(&mut self) {
        self.changed = false;
    }

    /// Adds a host; its id must be unused.
    pub fn insert(&mut self, host: Host) -> Result<(), String> {
        if self.by_id.contains_key(&host.id) {
            return Err(format!("host id {} is already in use", host.id));
        }
        let i = self.entries.len();
        let id = host.id;
        let keys = keys_of(&host, &self.placeholders);
        Arc::make_mut(&mut self.entries).push(Arc::new(Entry::new(host)));
        Arc::make_mut(&mut self.by_id).insert(id, i);
        let by_key = Arc::make_mut(&mut self.by_key);
        for key in keys {
            by_key.entry(key).or_default().push(id);
        }
        self.max_id = self.max_id.max(id);
        self.changed = true;
        Ok(())
    }

    /// Changes one host through `f`. Returns `None` if there is no such host.
    /// Nothing is marked changed when `f` leaves the host as it was.
    pub fn update<R>(&mut self, id: u64, f: impl FnOnce(&mut Host) -> R) -> Option<R> {
        let i = *self.by_id.get(&id)?;
        let mut host = self.entries[i].host.clone();
        let result = f(&mut host);
        if host != self.entries[i].host {
            host.id = id;
            let old_keys = keys_of(&self.entries[i].host, &self.placeholders);
            let new_keys = keys_of(&host, &self.placeholders);
            if old_keys != new_keys {
                let by_key = Arc::make_mut(&mut self.by_key);
                for k in old_keys {
                    if let Some(ids) = by_key.get_mut(&k) {
                        ids.retain(|x| *x != id);
                        if ids.is_empty() {
                            by_key.remove(&k);
                        }
                    }
                }
                for k in new_keys {
                    let ids = by_key.entry(k).or_default();
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            Arc::make_mut(&mut self.entries)[i] = Arc::new(Entry::new(host));
            self.changed = true;
        }
        Some(result)
    }

    /// Removes a host and returns it.
    pub fn remove(&mut self, id: u64) -> Option<Host> {
        let i = *self.by_id.get(&id)?;
        let entry = Arc::make_mut(&mut self.entries).remove(i);
        self.changed = true;
        self.reindex();
        Some(entry.host.clone())
    }
}

/// The identity keys of a host, placeholders left out.
pub fn keys_of(host: &Host, placeholders: &Placeholders) -> Vec<Key> {
    let mut keys: Vec<Key> = host.mac_list().into_iter().map(Key::Mac).collect();
    if let Some(s) = placeholders.serial_key(&host.serial) {
        keys.push(Key::Serial(s));
    }
    if let Some(u) = placeholders.uuid_key(&host.uuid) {
        keys.push(Key::Uuid(u));
    }
    keys
}

/// Pretty JSON with four-space indentation, nested `depth` levels deep.
fn pretty(value: &Value, depth: usize) -> String {
    let mut buf = Vec::new();
    let indent = b"    ";
    let fmt = serde_json::ser::PrettyFormatter::with_indent(indent);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    if value.serialize(&mut ser).is_err() {
        return "null".to_string();
    }
    let text = String::from_utf8(buf).unwrap_or_default();
    if depth == 0 {
        return text;
    }
    let pad = "    ".repeat(depth);
    text.replace('\n', &format!("\n{pad}"))
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The line on which the `n`th top-level object of a JSON array starts
/// (best effort, for error messages).
fn line_of_nth_object(text: &[u8], n: usize) -> usize {
    let mut depth = 0i32;
    let mut in_string = false;
    let mut escaped = false;
    let mut line = 1;
    let mut count = 0;
    for &b in text {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => {
                if depth == 1 {
                    if count == n {
                        return line;
                    }
                    count += 1;
                }
                depth += 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(text: &str) -> Database {
        Database::parse(text.as_bytes(), Arc::new(Placeholders::default())).unwrap()
    }

    #[test]
    fn seed_database_round_trips_with_unknown_fields() {
        let text = r#"[{"id": 3, "macs": "52:54:00:00:00:01", "serial": "S1", "uuid": "",
            "hostname": "a", "state": "finished", "metadata": {"z": 1, "a": {"b": "c"}},
            "bootid": null, "rack": "R7"}]"#;
        let d = db(text);
        let out = d.to_json();
        let again = db(&out);
        assert_eq!(again.get(3).unwrap(), d.get(3).unwrap());
        assert_eq!(again.get(3).unwrap().extra["rack"], "R7");
        let bootid = out.find("\"bootid\"").unwrap();
        let hostname = out.find("\"hostname\"").unwrap();
        let rack = out.find("\"rack\"").unwrap();
        assert!(bootid < hostname && hostname < rack, "keys sorted:\n{out}");
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed[0]["metadata"]["a"]["b"], "c");
    }

    #[test]
    fn tolerates_nulls_and_string_ids() {
        let d = db(r#"[{"id": "7", "macs": null, "serial": null, "metadata": null}]"#);
        let h = d.get(7).unwrap();
        assert_eq!(h.macs, "");
        assert!(h.metadata.is_empty());
    }

    #[test]
    fn errors_carry_line_and_column() {
        let err =
            Database::parse(b"[\n {\"id\": 1,\n  \"macs\": }\n]", Default::default()).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.column > 1);
        let dup =
            Database::parse(b"[\n{\"id\": 1},\n{\"id\": 1}\n]", Default::default()).unwrap_err();
        assert_eq!(dup.line, 3);
        assert!(dup.message.contains("appears twice"), "{}", dup.message);
    }

    #[test]
    fn indexes_follow_updates() {
        let mut d = db(r#"[{"id": 1, "macs": "52:54:00:00:00:01", "serial": "Default string"}]"#);
        let mac1 = Key::Mac(Mac::parse("52:54:00:00:00:01").unwrap());
        let mac2 = Key::Mac(Mac::parse("52:54:00:00:00:02").unwrap());
        assert_eq!(d.lookup(&mac1), &[1]);
        assert!(d.lookup(&Key::Serial("Default string".into())).is_empty());
        assert!(!d.is_changed());
        d.update(1, |h| h.state = "new".into());
        assert!(d.is_changed());
        d.update(1, |h| h.macs = "52:54:00:00:00:02".into());
        assert!(d.lookup(&mac1).is_empty());
        assert_eq!(d.lookup(&mac2), &[1]);
        d.insert(Host::new(2, &[], "SN2", "", "new")).unwrap();
        assert_eq!(d.next_id(), 3);
        assert!(d.insert(Host::new(2, &[], "", "", "new")).is_err());
        assert_eq!(d.remove(1).unwrap().id, 1);
        assert!(d.lookup(&mac2).is_empty());
        assert_eq!(d.lookup(&Key::Serial("SN2".into())), &[2]);
    }

    #[test]
    fn empty_database_writes_empty_array() {
        assert_eq!(db("[]").to_json(), "[]\n");
    }
}
