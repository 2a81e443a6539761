//! The host database in memory: the records of `known_hosts.json`, their
//! on-disk JSON form, and the indexes that find a machine by id, MAC, serial
//! or UUID. Loading from and saving to disk belongs to [`crate::store`].
//!
//! Each host is kept only as its on-disk JSON text, with compact indexes
//! beside it; a [`Host`] is parsed from that text when it is asked for
//! ([`Database::get`], [`Database::hosts`]), so identifying and answering a
//! booting machine parses just that one host, and a database of 10,000 hosts
//! takes about as much memory as its file.
//!
//! The file is the seed tool's format: a JSON array of objects with the
//! fields `id`, `macs`, `serial`, `uuid`, `hostname`, `state` and
//! `metadata`. Fields this version does not know are kept and written back.
//! Keys are written sorted and pretty-printed, so the file diffs well. What
//! the service observes about a host (bootid, attempts, last seen, hold) is
//! not configuration and lives in [`crate::runtime`].

use crate::identity::{parse_mac_list, Mac, Placeholders};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Host {
    pub id: u64,
    pub macs: String,
    pub serial: String,
    pub uuid: String,
    pub hostname: String,
    pub state: String,
    pub metadata: Map<String, Value>,
    /// The machine's BMC, e.g. `ipmi://10.0.7.21` or `redfish://10.0.7.22`
    /// (see [`crate::bmc::BmcUrl`]); written only when set, so a database
    /// without BMCs keeps the seed's format. Never a credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmc: Option<String>,
    /// Fields written by other tools; kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Read by hand rather than derived: serde's `flatten` (for `extra`)
/// buffers every field of every host before reading it, which made
/// reading a host several times slower than the JSON parse itself.
impl<'de> Deserialize<'de> for Host {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HostVisitor { rest: true })
    }
}

/// Reads a host; without `rest`, `metadata` and other tools' fields are
/// skipped (checked as JSON, not kept).
struct HostVisitor {
    rest: bool,
}

impl<'de> serde::de::Visitor<'de> for HostVisitor {
    type Value = Host;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a host object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Host, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let mut id = None;
        let mut host = Host::new(0, &[], "", "", "");
        host.hostname.clear();
        // Keys are borrowed from the text where they have no escapes.
        while let Some(key) = map.next_key::<LightField>()? {
            let LightField::Text(key) = key else {
                return Err(A::Error::custom("a key is not a string"));
            };
            let field = match &*key {
                "id" => {
                    if id.is_some() {
                        return Err(A::Error::duplicate_field("id"));
                    }
                    id = Some(id_from(map.next_value()?).map_err(A::Error::custom)?);
                    continue;
                }
                "macs" => &mut host.macs,
                "serial" => &mut host.serial,
                "uuid" => &mut host.uuid,
                "hostname" => &mut host.hostname,
                "state" => &mut host.state,
                "bmc" => {
                    host.bmc = opt_string_from(map.next_value()?).map_err(A::Error::custom)?;
                    continue;
                }
                _ if !self.rest => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                "metadata" => {
                    host.metadata = metadata_from(map.next_value()?).map_err(A::Error::custom)?;
                    continue;
                }
                _ => {
                    let value = map.next_value()?;
                    host.extra.insert(key.into_owned(), value);
                    continue;
                }
            };
            *field = string_from(map.next_value()?).map_err(A::Error::custom)?;
        }
        host.id = id.ok_or_else(|| A::Error::missing_field("id"))?;
        Ok(host)
    }
}

fn id_from(v: Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("id {n} is not a whole number")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("id {s:?} is not a whole number")),
        other => Err(format!("id must be a number, found {other}")),
    }
}

fn string_from(v: Value) -> Result<String, String> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("expected a string, found {other}")),
    }
}

fn opt_string_from(v: Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(format!("bmc must be a string, found {other}")),
    }
}

fn metadata_from(v: Value) -> Result<Map<String, Value>, String> {
    match v {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        Value::String(s) if s.trim().is_empty() => Ok(Map::new()),
        other => Err(format!("metadata must be an object, found {other}")),
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
            bmc: None,
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

/// One host as it is kept in memory: its id and its on-disk JSON (the text
/// the file holds for it, without the array's indentation). The [`Host`] is
/// parsed from it when asked for, so a large database costs little more
/// memory than its file, and saving it only serialises the hosts that
/// changed.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    json: Arc<str>,
}

impl Entry {
    fn new(host: &Host) -> Entry {
        Entry {
            id: host.id,
            json: pretty(&host.to_value(), 1).into(),
        }
    }

    fn host(&self) -> Host {
        self.read(true)
    }

    fn read(&self, rest: bool) -> Host {
        use serde::Deserializer;
        // The text was written from a `Host`, so it reads back as one.
        let mut de = serde_json::Deserializer::from_str(&self.json);
        (&mut de)
            .deserialize_map(HostVisitor { rest })
            .and_then(|h| de.end().map(|()| h))
            .unwrap_or_else(|e| panic!("host {} does not read back from its JSON: {e}", self.id))
    }
}

/// How many hosts share one copy-on-write chunk of [`Entries`].
const CHUNK: usize = 64;

/// The hosts in file order, in chunks that clones of the database share:
/// a clone costs one reference count; changing one host copies its chunk
/// and the list of chunks (a pointer per 64 hosts), not a pointer per host.
#[derive(Debug, Clone, Default)]
struct Entries {
    chunks: Arc<Vec<Arc<Vec<Entry>>>>,
    len: usize,
}

impl Entries {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn get(&self, i: usize) -> &Entry {
        &self.chunks[i / CHUNK][i % CHUNK]
    }

    fn set(&mut self, i: usize, entry: Entry) {
        Arc::make_mut(&mut Arc::make_mut(&mut self.chunks)[i / CHUNK])[i % CHUNK] = entry;
    }

    fn push(&mut self, entry: Entry) {
        let chunks = Arc::make_mut(&mut self.chunks);
        match chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => Arc::make_mut(chunk).push(entry),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(entry);
                chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Removes entry `i`; the entries after it move up (rare: the chunks
    /// are rebuilt).
    fn remove(&mut self, i: usize) {
        let mut rest = Entries::default();
        for (j, e) in self.iter().enumerate() {
            if j != i {
                rest.push(e.clone());
            }
        }
        *self = rest;
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flat_map(|c| c.iter())
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

/// The 128 bits of a canonical (hyphenated, lowercase) UUID key.
fn uuid_bits(uuid: &str) -> Option<u128> {
    let mut bits = 0u128;
    let mut digits = 0;
    for b in uuid.bytes().filter(|b| *b != b'-') {
        bits = (bits << 4) | u128::from((b as char).to_digit(16)?);
        digits += 1;
        if digits > 32 {
            return None;
        }
    }
    (digits == 32).then_some(bits)
}

/// How many copy-on-write shards each index map is split into.
const SHARDS: usize = 256;
const _: () = assert!(SHARDS.is_power_of_two());

/// A hash map split into shards that clones of the database share, so
/// that a clone costs one reference count and adding a host copies one
/// shard of each index (and the list of shards), not the whole index.
#[derive(Debug, Clone)]
struct Sharded<K, V> {
    shards: Arc<Vec<Arc<HashMap<K, V>>>>,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: Arc::new((0..SHARDS).map(|_| Arc::new(HashMap::new())).collect()),
        }
    }
}

/// Which shard of a [`Sharded`] map a key goes to. This only spreads keys
/// over shards (each shard is a HashMap with its own randomly keyed
/// hasher), so numbers and addresses are mixed with one multiplication.
trait ShardKey {
    fn shard(&self) -> usize;
}

/// The top bits of `x` times 2^64/φ (Fibonacci hashing): an index below
/// [`SHARDS`] that depends on every bit of `x`.
fn spread(x: u64) -> usize {
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

impl ShardKey for u64 {
    fn shard(&self) -> usize {
        spread(*self)
    }
}

impl ShardKey for u128 {
    fn shard(&self) -> usize {
        spread(*self as u64 ^ (*self >> 64) as u64)
    }
}

impl ShardKey for Mac {
    fn shard(&self) -> usize {
        let b = self.bytes();
        spread(u64::from_be_bytes([
            0, 0, b[0], b[1], b[2], b[3], b[4], b[5],
        ]))
    }
}

impl ShardKey for str {
    fn shard(&self) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        spread(h.finish())
    }
}

impl ShardKey for Arc<str> {
    fn shard(&self) -> usize {
        (**self).shard()
    }
}

impl<K: Hash + Eq + Clone + ShardKey, V: Clone> Sharded<K, V> {
    fn shard<Q: ShardKey + ?Sized>(key: &Q) -> usize {
        key.shard()
    }

    fn get<Q: Hash + Eq + ShardKey + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.shards[Self::shard(key)].get(key)
    }

    fn insert(&mut self, key: K, value: V) {
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[Self::shard(&key)]).insert(key, value);
    }

    fn remove<Q: Hash + Eq + ShardKey + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = Self::shard(key);
        if !self.shards[i].contains_key(key) {
            return None;
        }
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[i]).remove(key)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        Arc::make_mut(&mut self.shards)
            .iter_mut()
            .flat_map(|s| Arc::make_mut(s).values_mut())
    }

    fn shrink_to_fit(&mut self) {
        for s in Arc::make_mut(&mut self.shards) {
            Arc::make_mut(s).shrink_to_fit();
        }
    }
}

/// Which hosts carry which identity key. Nearly every key belongs to one
/// host, so those are kept in compact maps (a MAC is 6 bytes, a UUID 16);
/// the rare key that several hosts share (a conflict an operator has to
/// resolve) is kept with all its hosts in `shared`.
#[derive(Debug, Clone, Default)]
struct Index {
    macs: Sharded<Mac, u64>,
    serials: Sharded<Arc<str>, u64>,
    uuids: Sharded<u128, u64>,
    shared: Arc<HashMap<Key, Vec<u64>>>,
}

impl Index {
    fn shrink_to_fit(&mut self) {
        self.macs.shrink_to_fit();
        self.serials.shrink_to_fit();
        self.uuids.shrink_to_fit();
    }

    fn single(&self, key: &Key) -> Option<&u64> {
        match key {
            Key::Mac(m) => self.macs.get(m),
            Key::Serial(s) => self.serials.get(s.as_str()),
            Key::Uuid(u) => uuid_bits(u).and_then(|b| self.uuids.get(&b)),
        }
    }

    fn take_single(&mut self, key: &Key) -> Option<u64> {
        match key {
            Key::Mac(m) => self.macs.remove(m),
            Key::Serial(s) => self.serials.remove(s.as_str()),
            Key::Uuid(u) => uuid_bits(u).and_then(|b| self.uuids.remove(&b)),
        }
    }

    fn put_single(&mut self, key: Key, id: u64) {
        match key {
            Key::Mac(m) => self.macs.insert(m, id),
            Key::Serial(s) => self.serials.insert(Arc::from(s), id),
            Key::Uuid(u) => match uuid_bits(&u) {
                Some(b) => self.uuids.insert(b, id),
                // Not a canonical UUID (never produced by `uuid_key`).
                None => {
                    Arc::make_mut(&mut self.shared).insert(Key::Uuid(u), vec![id]);
                }
            },
        }
    }

    fn lookup(&self, key: &Key) -> &[u64] {
        if let Some(ids) = self.shared.get(key) {
            return ids;
        }
        self.single(key).map(std::slice::from_ref).unwrap_or(&[])
    }

    fn add(&mut self, key: Key, id: u64) {
        if self.shared.contains_key(&key) {
            let ids = Arc::make_mut(&mut self.shared)
                .get_mut(&key)
                .expect("just found");
            if !ids.contains(&id) {
                ids.push(id);
            }
            return;
        }
        match self.single(&key).copied() {
            Some(other) if other != id => {
                self.take_single(&key);
                Arc::make_mut(&mut self.shared).insert(key, vec![other, id]);
            }
            Some(_) => {}
            None => self.put_single(key, id),
        }
    }

    fn remove(&mut self, key: &Key, id: u64) {
        if self.shared.contains_key(key) {
            let shared = Arc::make_mut(&mut self.shared);
            let ids = shared.get_mut(key).expect("just found");
            ids.retain(|x| *x != id);
            match ids.as_slice() {
                [] => {
                    shared.remove(key);
                }
                [last] => {
                    let last = *last;
                    shared.remove(key);
                    self.put_single(key.clone(), last);
                }
                _ => {}
            }
            return;
        }
        if self.single(key) == Some(&id) {
            self.take_single(key);
        }
    }
}

/// The whole database. Cheap to clone: the host list (in chunks) and the
/// indexes are shared between clones and copied only when a clone changes
/// them, and each host's JSON is shared until that host is changed. A write
/// that changes one host therefore copies one chunk of 64 pointers and the
/// list of chunks, not the hosts or the indexes.
#[derive(Debug, Clone, Default)]
pub struct Database {
    entries: Entries,
    by_id: Sharded<u64, usize>,
    /// Built on first use, see [`Self::index`].
    index: std::sync::OnceLock<Index>,
    /// The highest id in use (0 when empty), so `next_id` is O(1).
    max_id: u64,
    placeholders: Arc<Placeholders>,
    /// Whether anything changed since loading or [`Self::clear_changed`].
    changed: bool,
    /// Hosts whose JSON still has the `bootid` field of earlier versions.
    legacy_bootids: usize,
    /// Whether [`Self::write_json`] writes exactly the bytes this database
    /// was read from (or was last saved as), so that new hosts can be
    /// appended to the file in place ([`Self::write_tail`]).
    verbatim: bool,
    /// How many hosts there were at [`Self::clear_changed`], and whether
    /// one of them was changed or removed since: if not, the change only
    /// appended hosts.
    base_len: usize,
    rewritten: bool,
}

/// Why a JSON document is not a host database.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// What loading needs of one host, read without building the [`Host`]:
/// its id and key fields (borrowed from the file's text where they have no
/// escapes). The other fields are checked as `Host` reads them (strings,
/// an object or nothing for `metadata`, any JSON elsewhere) without being
/// kept. `unusual` marks what only the full reading decides exactly: a
/// number where a string belongs, or a field given twice.
struct Light<'a> {
    id: u64,
    macs: std::borrow::Cow<'a, str>,
    serial: std::borrow::Cow<'a, str>,
    uuid: std::borrow::Cow<'a, str>,
    bootid: bool,
    unusual: bool,
}

impl<'de> Deserialize<'de> for Light<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(LightVisitor)
    }
}

struct LightVisitor;

impl<'de> serde::de::Visitor<'de> for LightVisitor {
    type Value = Light<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a host object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Light<'de>, A::Error> {
        use std::borrow::Cow;
        let mut light = Light {
            id: 0,
            macs: Cow::Borrowed(""),
            serial: Cow::Borrowed(""),
            uuid: Cow::Borrowed(""),
            bootid: false,
            unusual: false,
        };
        let mut seen = [false; 9];
        let mut has_id = false;
        while let Some(key) = map.next_key::<LightField>()? {
            let LightField::Text(key) = key else {
                return Err(serde::de::Error::custom("a key is not a string"));
            };
            let slot = match &*key {
                "id" => 0,
                "macs" => 1,
                "serial" => 2,
                "uuid" => 3,
                "hostname" => 4,
                "state" => 5,
                "metadata" => 6,
                "bmc" => 7,
                _ => 8,
            };
            if slot < 8 && std::mem::replace(&mut seen[slot], true) {
                light.unusual = true;
            }
            match slot {
                0 => match map.next_value::<LightField>()? {
                    LightField::Number(Some(n)) => {
                        light.id = n;
                        has_id = true;
                    }
                    _ => light.unusual = true,
                },
                1..=5 | 7 => match map.next_value::<LightField>()? {
                    LightField::Text(t) => match slot {
                        1 => light.macs = t,
                        2 => light.serial = t,
                        3 => light.uuid = t,
                        _ => {}
                    },
                    LightField::Null => {}
                    LightField::Number(_) => light.unusual = true,
                },
                6 => {
                    if !map.next_value::<LightMetadata>()?.0 {
                        light.unusual = true;
                    }
                }
                _ => {
                    light.bootid |= key == "bootid";
                    map.next_value::<Checked>()?;
                }
            }
        }
        light.unusual |= !has_id;
        Ok(light)
    }
}

/// A string field, `null`, or a number (a whole one as `Some`).
enum LightField<'a> {
    Text(std::borrow::Cow<'a, str>),
    Null,
    Number(Option<u64>),
}

impl<'de> Deserialize<'de> for LightField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LightField<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LightField::Text(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LightField::Text(v.to_string().into()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LightField::Null)
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(LightField::Number(Some(v)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LightField::Number(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LightField::Number(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `metadata` as `Host` accepts it: true for an object (or `null`); false
/// for anything the full reading must judge.
struct LightMetadata(bool);

impl<'de> Deserialize<'de> for LightMetadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LightMetadata;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LightMetadata(true))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                Checked::visit_map(Checked, map)?;
                Ok(LightMetadata(true))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(LightMetadata(false))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LightMetadata(false))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LightMetadata(false))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LightMetadata(false))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LightMetadata(false))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Checked::visit_seq(Checked, seq)?;
                Ok(LightMetadata(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// Any JSON value, read as a `serde_json::Value` would be (numbers and
/// strings parsed, so the same documents are refused) but not kept.
#[derive(Clone, Copy)]
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// Reads the top-level array one host at a time, so that loading never
/// holds more than one parsed [`Host`] besides the compact entries.
struct Loader<'a> {
    db: &'a mut Database,
    /// A repeated id: the id and the positions of its two entries.
    duplicate: &'a mut Option<(u64, usize, usize)>,
    /// The whole text, to place an error inside one host in the file.
    text: &'a [u8],
    /// An entry that is not a host, with its place in the file.
    invalid: &'a mut Option<ParseError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Loader<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Loader<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut entries = Entries::default();
        let mut by_id = Sharded::default();
        let mut canonical: Option<bool> = None;
        // Whether the text between the entries is what `write_json` puts
        // there, so that writing the database gives back the same bytes.
        let mut framed = true;
        let mut prev_end: Option<usize> = None;
        while let Some(raw) = seq.next_element::<&serde_json::value::RawValue>()? {
            let start = (raw.get().as_ptr() as usize).wrapping_sub(self.text.as_ptr() as usize);
            framed = framed
                && match prev_end {
                    None => self.text.get(..start) == Some(b"[\n    ".as_slice()),
                    Some(end) => self.text.get(end..start) == Some(b",\n    ".as_slice()),
                };
            prev_end = Some(start + raw.get().len());
            // Most entries need only their id and keys here: the light
            // reading checks the rest the way `Host` would read it, without
            // building it. The first entry (to learn the file's form) and
            // anything unusual take the full reading.
            if canonical == Some(true) {
                if let Ok(light) = serde_json::from_str::<Light>(raw.get()) {
                    if !light.unusual {
                        let i = entries.len();
                        if let Some(&first) = by_id.get(&light.id) {
                            *self.duplicate = Some((light.id, first, i));
                            return Err(serde::de::Error::custom("duplicate host id"));
                        }
                        by_id.insert(light.id, i);
                        self.db.max_id = self.db.max_id.max(light.id);
                        self.db.legacy_bootids += usize::from(light.bootid);
                        entries.push(Entry {
                            id: light.id,
                            json: raw.get().into(),
                        });
                        continue;
                    }
                }
            }
            let host: Host = match serde_json::from_str(raw.get()) {
                Ok(h) => h,
                Err(e) => {
                    // Where the entry starts in the file, plus where in
                    // the entry the error is.
                    let start = (raw.get().as_ptr() as usize)
                        .saturating_sub(self.text.as_ptr() as usize)
                        .min(self.text.len());
                    let before = &self.text[..start];
                    let line0 = before.iter().filter(|b| **b == b'\n').count() + 1;
                    let col0 = start
                        - before
                            .iter()
                            .rposition(|b| *b == b'\n')
                            .map_or(0, |i| i + 1);
                    *self.invalid = Some(ParseError {
                        line: line0 + e.line() - 1,
                        column: if e.line() == 1 {
                            col0 + e.column()
                        } else {
                            e.column()
                        },
                        message: strip_position(&e.to_string()),
                    });
                    return Err(serde::de::Error::custom("not a host"));
                }
            };
            let i = entries.len();
            if let Some(&first) = by_id.get(&host.id) {
                *self.duplicate = Some((host.id, first, i));
                return Err(serde::de::Error::custom("duplicate host id"));
            }
            by_id.insert(host.id, i);
            self.db.max_id = self.db.max_id.max(host.id);
            if host.extra.contains_key("bootid") {
                self.db.legacy_bootids += 1;
            }
            // A file this version wrote (its first host is in the form
            // this version writes) keeps each host's text as it is, which
            // reads back as the same host, instead of serialising all of
            // them anew; any other file is written in this version's form.
            let entry = match canonical {
                Some(true) => Entry {
                    id: host.id,
                    json: raw.get().into(),
                },
                _ => {
                    let e = Entry::new(&host);
                    canonical.get_or_insert(*e.json == *raw.get());
                    e
                }
            };
            entries.push(entry);
        }
        by_id.shrink_to_fit();
        self.db.verbatim = canonical == Some(true)
            && framed
            && prev_end.and_then(|end| self.text.get(end..)) == Some(b"\n]\n".as_slice());
        self.db.base_len = entries.len();
        self.db.entries = entries;
        self.db.by_id = by_id;
        Ok(())
    }
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
        let mut db = Database::empty(placeholders);
        let mut duplicate = None;
        let mut invalid = None;
        let mut de = serde_json::Deserializer::from_slice(text);
        let loaded = serde::de::DeserializeSeed::deserialize(
            Loader {
                db: &mut db,
                duplicate: &mut duplicate,
                text,
                invalid: &mut invalid,
            },
            &mut de,
        )
        .and_then(|()| de.end());
        if let Some((id, first, i)) = duplicate {
            return Err(ParseError {
                line: line_of_nth_object(text, i),
                column: 1,
                message: format!(
                    "host id {id} appears twice (entries {} and {})",
                    first + 1,
                    i + 1
                ),
            });
        }
        if let Some(e) = invalid {
            return Err(e);
        }
        loaded.map_err(|e| ParseError {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })?;
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

    pub fn placeholders(&self) -> &Placeholders {
        &self.placeholders
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every host, in file order, each parsed as it is reached.
    pub fn hosts(&self) -> impl Iterator<Item = Host> + '_ {
        self.entries.iter().map(Entry::host)
    }

    /// The ids of all hosts, in file order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.id)
    }

    /// The host with this id, parsed from its JSON.
    pub fn get(&self, id: u64) -> Option<Host> {
        self.entry(id).map(Entry::host)
    }

    /// The host with this id without its `metadata` and other tools'
    /// fields (empty here): for answers that use only its own fields.
    pub fn get_core(&self, id: u64) -> Option<Host> {
        self.entry(id).map(|e| e.read(false))
    }

    /// Whether a host with this id exists (without parsing it).
    pub fn contains(&self, id: u64) -> bool {
        self.by_id.get(&id).is_some()
    }

    fn entry(&self, id: u64) -> Option<&Entry> {
        self.by_id.get(&id).map(|&i| self.entries.get(i))
    }

    /// The ids of the hosts that carry a key.
    pub fn lookup(&self, key: &Key) -> &[u64] {
        self.index().lookup(key)
    }

    /// The ids of the hosts that carry any of `keys`, sorted. Until the
    /// index is built, this looks at each host's key fields once instead of
    /// building it: cheaper for a command that names one or two hosts.
    pub fn lookup_any(&self, keys: &[Key]) -> Vec<u64> {
        let mut found: Vec<u64> = match self.index.get() {
            Some(index) => keys.iter().flat_map(|k| index.lookup(k)).copied().collect(),
            None if keys.is_empty() => Vec::new(),
            None => self
                .entries
                .iter()
                .filter(|e| {
                    let carried = match serde_json::from_str::<Light>(&e.json) {
                        Ok(l) if !l.unusual => {
                            keys_from(&l.macs, &l.serial, &l.uuid, &self.placeholders)
                        }
                        _ => keys_of(&e.host(), &self.placeholders),
                    };
                    carried.iter().any(|k| keys.contains(k))
                })
                .map(|e| e.id)
                .collect(),
        };
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The key index, built on first use: a command that finds its hosts
    /// by id never pays for it.
    fn index(&self) -> &Index {
        self.index.get_or_init(|| {
            let mut index = Index::default();
            for e in self.entries.iter() {
                let keys = match serde_json::from_str::<Light>(&e.json) {
                    Ok(l) if !l.unusual => {
                        keys_from(&l.macs, &l.serial, &l.uuid, &self.placeholders)
                    }
                    _ => keys_of(&e.host(), &self.placeholders),
                };
                for key in keys {
                    index.add(key, e.id);
                }
            }
            index.shrink_to_fit();
            index
        })
    }

    /// The id a new host gets: one more than the highest in use.
    pub fn next_id(&self) -> u64 {
        self.max_id + 1
    }

    /// Whether anything was changed since the database was loaded (or
    /// since [`Self::clear_changed`]).
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    /// Forgets earlier changes, e.g. once they are saved.
    pub fn clear_changed(&mut self) {
        self.changed = false;
        self.base_len = self.entries.len();
        self.rewritten = false;
    }

    /// When the changes since [`Self::clear_changed`] only added hosts to a
    /// database whose file is [verbatim](Self::write_json): how many hosts
    /// there were before, for [`Self::write_tail`].
    pub fn appended_from(&self) -> Option<usize> {
        (self.changed && !self.rewritten && self.verbatim && self.base_len > 0)
            .then_some(self.base_len)
    }

    /// Marks the database as what its file now holds, byte for byte (it
    /// was just written by [`Self::write_json`] or [`Self::write_tail`]).
    pub fn set_verbatim(&mut self) {
        self.verbatim = true;
    }

    /// What turns the file of the first `from` hosts (at least one) into
    /// the file of all of them: the bytes to write over its last three
    /// (`"\n]\n"`).
    pub fn write_tail(&self, from: usize, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        for e in self.entries.iter().skip(from) {
            w.write_all(b",\n    ")?;
            w.write_all(e.json.as_bytes())?;
        }
        w.write_all(b"\n]\n")
    }

    /// How many hosts, when loaded, still had the `bootid` field of earlier
    /// versions (see [`crate::store::Store::migrate`]).
    pub fn legacy_bootids(&self) -> usize {
        self.legacy_bootids
    }

    /// Adds a host; its id must be unused.
    pub fn insert(&mut self, host: Host) -> Result<(), String> {
        if self.by_id.get(&host.id).is_some() {
            return Err(format!("host id {} is already in use", host.id));
        }
        let i = self.entries.len();
        let id = host.id;
        if let Some(index) = self.index.get_mut() {
            for key in keys_of(&host, &self.placeholders) {
                index.add(key, id);
            }
        }
        self.entries.push(Entry::new(&host));
        self.by_id.insert(id, i);
        self.max_id = self.max_id.max(id);
        self.changed = true;
        Ok(())
    }

    /// Changes one host through `f`. Returns `None` if there is no such host.
    /// Nothing is marked changed when `f` leaves the host as it was.
    pub fn update<R>(&mut self, id: u64, f: impl FnOnce(&mut Host) -> R) -> Option<R> {
        let i = *self.by_id.get(&id)?;
        let before = self.entries.get(i).host();
        let mut host = before.clone();
        let result = f(&mut host);
        host.id = id;
        if host != before {
            if let Some(index) = self.index.get_mut() {
                let old_keys = keys_of(&before, &self.placeholders);
                let new_keys = keys_of(&host, &self.placeholders);
                if old_keys != new_keys {
                    for k in &old_keys {
                        index.remove(k, id);
                    }
                    for k in new_keys {
                        index.add(k, id);
                    }
                }
            }
            self.entries.set(i, Entry::new(&host));
            self.changed = true;
            self.rewritten |= i < self.base_len;
        }
        Some(result)
    }

    /// Removes a host and returns it.
    pub fn remove(&mut self, id: u64) -> Option<Host> {
        let i = *self.by_id.get(&id)?;
        let host = self.entries.get(i).host();
        if let Some(index) = self.index.get_mut() {
            for k in keys_of(&host, &self.placeholders) {
                index.remove(&k, id);
            }
        }
        self.entries.remove(i);
        self.rewritten = true;
        self.by_id.remove(&id);
        for pos in self.by_id.values_mut() {
            if *pos > i {
                *pos -= 1;
            }
        }
        if id == self.max_id {
            self.max_id = self.entries.iter().map(|e| e.id).max().unwrap_or(0);
        }
        self.changed = true;
        Some(host)
    }
}

/// Sets a dotted path in a host's metadata, creating objects on the way;
/// a value that is not an object in the way is an error.
pub fn set_path(map: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty metadata path")?;
    let mut cur = map;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            other => {
                return Err(format!(
                    "metadata {} is {other}, not an object",
                    path[..=i].join(".")
                ))
            }
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// The identity keys of a host, placeholders left out.
pub fn keys_of(host: &Host, placeholders: &Placeholders) -> Vec<Key> {
    keys_from(&host.macs, &host.serial, &host.uuid, placeholders)
}

/// The identity keys of a host's `macs`, `serial` and `uuid` fields.
fn keys_from(macs: &str, serial: &str, uuid: &str, placeholders: &Placeholders) -> Vec<Key> {
    let mut keys: Vec<Key> = parse_mac_list(macs).0.into_iter().map(Key::Mac).collect();
    if let Some(s) = placeholders.serial_key(serial) {
        keys.push(Key::Serial(s));
    }
    if let Some(u) = placeholders.uuid_key(uuid) {
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
    fn bmc_is_read_and_written_only_when_set() {
        let d = db(
            r#"[{"id": 1, "macs": "52:54:00:00:00:01", "bmc": "ipmi://10.0.7.21"},
            {"id": 2, "macs": "52:54:00:00:00:02", "bmc": ""}]"#,
        );
        assert_eq!(d.get(1).unwrap().bmc.as_deref(), Some("ipmi://10.0.7.21"));
        assert_eq!(d.get(2).unwrap().bmc, None);
        assert_eq!(d.get(1).unwrap().to_value()["bmc"], "ipmi://10.0.7.21");
        assert!(d.get(2).unwrap().to_value().get("bmc").is_none());
        assert!(d.get(1).unwrap().extra.is_empty());
    }

    #[test]
    fn seed_database_round_trips_with_unknown_fields() {
        let text = r#"[{"id": 3, "macs": "52:54:00:00:00:01", "serial": "S1", "uuid": "",
            "hostname": "a", "state": "finished", "metadata": {"z": 1, "a": {"b": "c"}},
            "aaa": null, "rack": "R7"}]"#;
        let d = db(text);
        let out = d.to_json();
        let again = db(&out);
        assert_eq!(again.get(3).unwrap(), d.get(3).unwrap());
        assert_eq!(again.get(3).unwrap().extra["rack"], "R7");
        let aaa = out.find("\"aaa\"").unwrap();
        let hostname = out.find("\"hostname\"").unwrap();
        let rack = out.find("\"rack\"").unwrap();
        assert!(aaa < hostname && hostname < rack, "keys sorted:\n{out}");
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
    fn an_entry_that_is_not_a_host_is_placed_in_the_file() {
        let err = Database::parse(
            b"[\n  {\"id\": 1},\n  {\"id\": 2,\n   \"metadata\": 5}\n]",
            Default::default(),
        )
        .unwrap_err();
        assert_eq!(err.line, 4, "{err:?}");
        assert!(
            err.message.contains("metadata must be an object"),
            "{err:?}"
        );
        let err = Database::parse(b"[{\"id\": \"x\"}]", Default::default()).unwrap_err();
        assert_eq!((err.line, err.column > 2), (1, true), "{err:?}");
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
    fn an_earlier_versions_bootid_field_is_counted_and_kept_until_moved() {
        let d = db(r#"[{"id": 1, "state": "image1", "bootid": "b1"}, {"id": 2}]"#);
        assert_eq!(d.legacy_bootids(), 1);
        assert_eq!(d.get(1).unwrap().extra["bootid"], "b1");
        assert!(d.to_json().contains("\"bootid\": \"b1\""));
    }

    #[test]
    fn shared_keys_and_removal_keep_the_index_right() {
        let mut d = db(r#"[
            {"id": 1, "macs": "52:54:00:00:00:01", "serial": "SN"},
            {"id": 2, "macs": "52:54:00:00:00:01", "uuid": "11111111-2222-3333-4444-555555555555"},
            {"id": 3, "macs": "52:54:00:00:00:03", "serial": "SN"}]"#);
        let mac1 = Key::Mac(Mac::parse("52:54:00:00:00:01").unwrap());
        let sn = Key::Serial("SN".into());
        let uuid = Key::Uuid("11111111-2222-3333-4444-555555555555".into());
        assert_eq!(d.lookup(&mac1), &[1, 2]);
        assert_eq!(d.lookup(&sn), &[1, 3]);
        assert_eq!(d.lookup(&uuid), &[2]);
        assert_eq!(d.remove(1).unwrap().serial, "SN");
        assert_eq!(d.lookup(&mac1), &[2]);
        assert_eq!(d.lookup(&sn), &[3]);
        assert_eq!(d.get(3).unwrap().id, 3, "positions follow the removal");
        assert_eq!(d.ids().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(d.next_id(), 4);
        d.remove(3);
        assert_eq!(d.next_id(), 3);
        assert!(d.lookup(&sn).is_empty());
        d.update(2, |h| h.uuid = String::new());
        assert!(d.lookup(&uuid).is_empty());
    }

    /// The light reading at load time (see [`Light`]) accepts exactly what
    /// the full reading accepts, and finds the same keys: each odd entry
    /// follows a canonical first host, so it takes the light path.
    #[test]
    fn the_light_reading_agrees_with_the_full_reading() {
        let first = Entry::new(&Host::new(1, &[], "S-first", "", "new"));
        let odd = [
            r#"{"id": 2, "macs": "52:54:00:00:00:02", "serial": "S\u0032", "uuid": "{0123456789ABCDEF0123456789ABCDEF}"}"#,
            r#"{"id": 2, "serial": 12345}"#,
            r#"{"id": "2", "serial": "S2"}"#,
            r#"{"id": 2, "id": 3}"#,
            r#"{"id": 2, "metadata": " "}"#,
            r#"{"id": 2, "metadata": "x"}"#,
            r#"{"id": 2, "metadata": [1]}"#,
            r#"{"id": 2, "rack": 1e400}"#,
            r#"{"id": 2, "metadata": {"a": 1e400}}"#,
            r#"{"id": 2, "hostname": ["a"]}"#,
            r#"{"id": 2, "hostname": null, "state": 7, "bootid": "x"}"#,
            r#"{"id": -2}"#,
            r#"{"serial": "S2"}"#,
            r#"[2]"#,
            r#"{"id": 2, "extra": {"deep": [[[{"k": "\ud800"}]]]}}"#,
            r#"{"id": 2, "bmc": "ipmi://10.0.0.2"}"#,
            r#"{"id": 2, "bmc": null}"#,
            r#"{"id": 2, "bmc": 7}"#,
            r#"{"id": 2, "bmc": true}"#,
            r#"{"id": 2, "bmc": {"url": "ipmi://x"}}"#,
            r#"{"id": 2, "bmc": "a", "bmc": "b"}"#,
        ];
        for entry in odd {
            let text = format!("[\n    {},\n    {entry}\n]\n", first.json);
            let placeholders = Arc::new(Placeholders::default());
            let light = Database::parse(text.as_bytes(), placeholders.clone());
            let full = serde_json::from_str::<Vec<Host>>(&text);
            assert_eq!(light.is_ok(), full.is_ok(), "{entry}: {light:?} / {full:?}");
            if let (Ok(db), Ok(hosts)) = (light, full) {
                for h in &hosts {
                    for key in keys_of(h, &placeholders) {
                        assert_eq!(db.lookup(&key), [h.id], "{entry}: {key}");
                    }
                    assert_eq!(db.get(h.id).as_ref(), Some(h), "{entry}");
                }
                let bootids = hosts
                    .iter()
                    .filter(|h| h.extra.contains_key("bootid"))
                    .count();
                assert_eq!(db.legacy_bootids(), bootids, "{entry}");
            }
        }
    }

    /// Found by the database fuzz target: serde_json's default float
    /// reading is not exact, so a metadata value such as
    /// 1.54444444444484444444e3 changed its last digit each time the file
    /// was written and read again.
    #[test]
    fn regression_metadata_floats_survive_rewrites_unchanged() {
        let text = r#"[{"id": 1, "metadata": {"size": 1.54444444444484444444e3, "w": 0.1}}]"#;
        let once = db(text).to_json();
        let twice = db(&once).to_json();
        assert_eq!(once, twice);
        assert_eq!(db(&twice).to_json(), twice);
    }

    #[test]
    fn empty_database_writes_empty_array() {
        assert_eq!(db("[]").to_json(), "[]\n");
    }
}
