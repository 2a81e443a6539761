//! Loading and saving the host database: the one code path through which
//! the FastCGI handler and the CLI read and change the hosts and their
//! runtime facts.
//!
//! A deployment keeps two things, in two files beside each other:
//!
//! - **What the operator configured**, `known_hosts.json`: each host's
//!   identity, state chain, hostname and metadata, in the seed's format.
//!   A change to existing hosts replaces the file atomically: temp file in
//!   the same directory, fsync, rename, fsync of the directory. A change
//!   that only adds hosts (a registration, `add`, new rows of an
//!   inventory) to a file this version wrote is appended in place instead,
//!   so that it costs what it writes, not the size of the fleet: its bytes
//!   and place go first, synced, to a redo record `.known_hosts.json.grow`,
//!   then over the file's closing `]`. A crash in between leaves a file
//!   that does not parse and a record that finishes it: the next reader
//!   replays it (only ever the same bytes at the same place of the same
//!   file). The file only changes when configuration changes, so it never
//!   lags behind the truth, and tools that read it see exactly what the
//!   service uses (a tool that reads it raw may, for the microseconds of
//!   an append, see it unfinished, and should read it again).
//! - **What the service observed**, the runtime log
//!   `.known_hosts.json.runtime` (hidden, so that no web server serves its
//!   secrets): bootids, install attempts, last seen, holds. All of them
//!   are [`crate::runtime::Patch`]es, one JSON line each, appended with one
//!   write per commit group and one `fdatasync` when anything but a "last
//!   seen" time is in it. The table is the log's patches applied in order.
//!   When the log grows past twice what its records need, it is compacted:
//!   one line per record, written to a temp file and renamed over the log.
//!
//! The two are joined by host id only and read independently, so neither
//! write can hide the other's: a rewrite of `known_hosts.json` never
//! touches the log, and a compaction replaces the log with a file that
//! holds every fact of the old one. A fact one process acknowledged is
//! therefore seen by every reader from that moment on: it is either in the
//! log at the offset the reader has not read yet, or in the compacted file
//! that has replaced it.
//!
//! - Reads are cached and take no lock: each file is re-read only when its
//!   identity (device, inode, size, times) changed, so a boot storm of
//!   installed machines costs two `stat`s each. The log is followed by its
//!   tail: a reader keeps the log open (which also keeps its inode from
//!   being reused), reads only what was appended, and stops at the last
//!   complete line; a torn line (an append in progress, or a crash in the
//!   middle of one) is read once complete, or cut off by the next writer.
//! - Every read-modify-write holds an exclusive `fs2` lock on a lock file
//!   beside the database, across processes, and re-reads under the lock
//!   what changed. `known_hosts.json` is written first and the log second:
//!   a crash in between leaves the configured state (say, `finished`) and a
//!   stale fact, never a machine that installs again.
//! - Concurrent writers within one process are committed in groups by one
//!   writer thread per store: while it writes, further changes queue up, and
//!   the next write commits the whole queue at once. Facts that need no
//!   answer ("last seen") are queued without waiting.
//! - A file that does not parse, and a log line that does not (other than
//!   a torn last line), is reported with its line and column and never
//!   overwritten; commits are refused until it is fixed.
//! - A new host never gets the id of a host whose facts are still in the
//!   log, so a removed host's facts cannot pass to a new one.
//! - Databases of earlier versions, whose bootids sat in `known_hosts.json`
//!   and a `.known_hosts.json.bootids` journal, are moved over on first
//!   open ([`Store::migrate`]).

use crate::events::{self, Event};
use crate::hosts::Database;
use crate::identity::Placeholders;
use crate::runtime::{HostRuntime, Patch, RuntimeTable};
use fs2::FileExt;
use serde::Deserialize;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::ops::Deref;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

/// The log is compacted once it is larger than this and holds more than
/// twice as many lines as records.
const LOG_MIN_COMPACT: u64 = 256 * 1024;

/// Why the database could not be read or saved.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The file (or the runtime log) is not valid. It is left untouched.
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Reading, locking or writing failed.
    Io {
        action: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A bug: a change panicked. Nothing was written.
    Internal(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Corrupt {
                path,
                line,
                column,
                message,
            } => write!(
                f,
                "host database {} is not valid at line {line}, column {column}: {message} \
                 (fix or restore the file; it is not overwritten)",
                path.display()
            ),
            StoreError::Io {
                action,
                path,
                message,
            } => write!(f, "cannot {action} {}: {message}", path.display()),
            StoreError::Internal(m) => write!(f, "internal error, nothing saved: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

fn io_error(action: &'static str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Io {
        action,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn same_file(&self, other: &Stamp) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// The hosts and their runtime facts, as one consistent reading.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub db: Arc<Database>,
    pub rt: Arc<RuntimeTable>,
}

impl Snapshot {
    /// A host's runtime facts (empty if it has none).
    pub fn runtime(&self, id: u64) -> &HostRuntime {
        self.rt.get(id)
    }
}

impl Deref for Snapshot {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

/// How much of the runtime log the cached table reflects.
#[derive(Debug, Default)]
struct LogState {
    /// The log, kept open: its inode cannot be reused (by a compaction)
    /// while its stamp is what the cache compares with.
    _pinned: Option<File>,
    /// The log as it was last read (`None`: it did not exist).
    stamp: Option<Stamp>,
    /// Bytes read: complete lines only.
    read: u64,
    /// Complete lines read, for the line numbers of errors and for
    /// deciding when to compact.
    lines: usize,
}

struct Cached {
    loaded: bool,
    /// `known_hosts.json` as it was read (`None`: it did not exist).
    file: Option<Stamp>,
    db: Result<Arc<Database>, StoreError>,
    log: LogState,
    rt: Result<Arc<RuntimeTable>, StoreError>,
    /// The last snapshot handed out, while both parts are current.
    snap: Option<Arc<Snapshot>>,
}

impl Cached {
    fn fresh(&self, file: Option<Stamp>, log: Option<Stamp>) -> bool {
        self.loaded && self.file == file && self.log.stamp == log
    }

    fn snapshot(&mut self) -> Result<Arc<Snapshot>, StoreError> {
        if let Some(s) = &self.snap {
            return Ok(s.clone());
        }
        let db = self.db.clone()?;
        let rt = self.rt.clone()?;
        let snap = Arc::new(Snapshot { db, rt });
        self.snap = Some(snap.clone());
        Ok(snap)
    }
}

/// Where the outcome of a change goes, and how its caller is woken.
type Done = Arc<(Mutex<Option<Result<(), StoreError>>>, Condvar)>;

/// One queued change to the database.
type Run = Box<dyn FnOnce(&mut Txn) + Send>;

/// A change waiting to be committed, and where its outcome goes (`None`:
/// nobody waits for it).
struct Job {
    run: Run,
    done: Option<Done>,
}

/// The hosts and their facts being changed inside one commit, and the
/// events the changes record.
pub struct Txn {
    pub db: Database,
    rt: RuntimeTable,
    patches: Vec<Patch>,
    events: Vec<Event>,
    aborted: bool,
}

impl Txn {
    /// Drops everything this change did so far, and whatever it does after:
    /// a change that cannot be made whole is not made at all. The other
    /// changes of the same commit group are unaffected.
    pub fn abort(&mut self) {
        self.aborted = true;
    }

    /// Records an event; it is written to the event log once the change is
    /// saved.
    pub fn record(&mut self, event: Event) {
        self.events.push(event);
    }

    /// A host's runtime facts.
    pub fn runtime(&self, id: u64) -> &HostRuntime {
        self.rt.get(id)
    }

    /// All runtime facts.
    pub fn runtime_table(&self) -> &RuntimeTable {
        &self.rt
    }

    /// Changes a host's runtime facts through `f`; what changed is saved
    /// as one patch.
    pub fn update_runtime<R>(&mut self, id: u64, f: impl FnOnce(&mut HostRuntime) -> R) -> R {
        let old = self.rt.get(id).clone();
        let mut new = old.clone();
        let r = f(&mut new);
        if let Some(patch) = Patch::diff(id, &old, &new) {
            self.rt.apply(&patch);
            self.patches.push(patch);
        }
        r
    }

    /// The id a new host gets: above every host and every record of facts.
    pub fn next_id(&self) -> u64 {
        self.db.next_id().max(self.rt.max_id() + 1)
    }

    /// Removes a host and its runtime facts.
    pub fn remove_host(&mut self, id: u64) -> Option<crate::hosts::Host> {
        let host = self.db.remove(id)?;
        self.update_runtime(id, |rt| *rt = HostRuntime::default());
        Some(host)
    }
}

/// The host database of one deployment root.
pub struct Store {
    inner: Arc<Inner>,
    /// The queue of the writer thread, started by the first change.
    writer: Mutex<Option<mpsc::Sender<Job>>>,
}

/// What the writer thread shares with the store.
struct Inner {
    path: PathBuf,
    lock_path: PathBuf,
    log_path: PathBuf,
    legacy_journal: PathBuf,
    events_path: PathBuf,
    placeholders: Arc<Placeholders>,
    cache: Mutex<Cached>,
    /// Whether temp files left by a killed writer were looked for.
    swept: AtomicBool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn stat(path: &Path) -> Result<Option<Stamp>, StoreError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path, e)),
    }
}

/// `.<name><suffix>` beside the database at `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "known_hosts.json".into());
    path.with_file_name(format!(".{name}{suffix}"))
}

/// The runtime log of the database at `path`: `.<name>.runtime` beside it.
pub fn runtime_log_path(path: &Path) -> PathBuf {
    beside(path, ".runtime")
}

/// Parses complete log lines (`text` up to its last newline); `first_line`
/// is the line number of the first. Returns the patches and how many lines
/// there were, blank ones included.
fn parse_log(
    path: &Path,
    text: &[u8],
    first_line: usize,
) -> Result<(Vec<Patch>, usize), StoreError> {
    let mut out = Vec::new();
    let mut number = first_line;
    for raw in text.split_inclusive(|b| *b == b'\n') {
        if raw.iter().all(u8::is_ascii_whitespace) {
            number += 1;
            continue;
        }
        let patch: Patch = serde_json::from_slice(raw).map_err(|e| corrupt(path, number, &e))?;
        out.push(patch);
        number += 1;
    }
    Ok((out, number - first_line))
}

fn corrupt(path: &Path, line: usize, e: &serde_json::Error) -> StoreError {
    let message = e.to_string();
    StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        column: e.column(),
        message: message
            .rfind(" at line ")
            .map_or(message.clone(), |i| message[..i].to_string()),
    }
}

/// `known_hosts.json` at `path` as JSON, each host with the `bootid` of
/// its runtime facts: for tests and tools that look at the files rather
/// than through a [`Store`]. A missing file is an empty array.
pub fn read_json(path: &Path) -> Result<serde_json::Value, StoreError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", path, e)),
    };
    let mut value = if text.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?
    };
    let log = runtime_log_path(path);
    let text = match fs::read(&log) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", &log, e)),
    };
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut table = RuntimeTable::default();
    for patch in parse_log(&log, &text[..complete], 1)?.0 {
        table.apply(&patch);
    }
    if let Some(hosts) = value.as_array_mut() {
        for h in hosts.iter_mut() {
            let Some(id) = h["id"].as_u64() else { continue };
            if let serde_json::Value::Object(h) = h {
                h.insert("bootid".into(), table.get(id).bootid.clone().into());
            }
        }
    }
    Ok(value)
}

/// One line of the bootid journal of earlier versions.
#[derive(Deserialize)]
struct LegacyLine {
    file: u64,
    id: u64,
    bootid: Option<String>,
}

impl Store {
    /// The database at `path`, with its lock file (`.<name>.lock`) and its
    /// runtime log (`.<name>.runtime`) beside it and the event log at
    /// `events_path`.
    pub fn new(path: PathBuf, events_path: PathBuf, placeholders: Placeholders) -> Store {
        let lock_path = beside(&path, ".lock");
        let log_path = runtime_log_path(&path);
        let legacy_journal = beside(&path, ".bootids");
        let placeholders = Arc::new(placeholders);
        Store {
            inner: Arc::new(Inner {
                path,
                lock_path,
                log_path,
                legacy_journal,
                events_path,
                cache: Mutex::new(Cached {
                    loaded: false,
                    file: None,
                    db: Ok(Arc::new(Database::empty(placeholders.clone()))),
                    log: LogState::default(),
                    rt: Ok(Arc::new(RuntimeTable::default())),
                    snap: None,
                }),
                placeholders,
                swept: AtomicBool::new(false),
            }),
            writer: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The runtime log beside the database.
    pub fn runtime_log_path(&self) -> &Path {
        &self.inner.log_path
    }

    pub fn events_path(&self) -> &Path {
        &self.inner.events_path
    }

    /// The current hosts and facts, each part re-read only if its file
    /// changed.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        self.inner.snapshot()
    }

    /// Moves the bootids of an earlier version's database (a `bootid` field
    /// in `known_hosts.json`, and the `.known_hosts.json.bootids` journal)
    /// into the runtime log, in one commit. Does nothing, and takes no
    /// lock, when there is nothing to move. Returns how many hosts had one.
    pub fn migrate(&self) -> Result<usize, StoreError> {
        let snap = self.snapshot()?;
        if snap.db.legacy_bootids() == 0 && !self.inner.legacy_journal.exists() {
            return Ok(0);
        }
        let journal = self.inner.legacy_journal.clone();
        let path = self.inner.path.clone();
        let moved = self.modify(move |txn| -> Result<usize, StoreError> {
            // The journal's lines apply to the file whose inode they name.
            let ino = fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
            let mut from_journal = std::collections::HashMap::new();
            if let Ok(text) = fs::read(&journal) {
                for line in text.split(|b| *b == b'\n') {
                    if let Ok(l) = serde_json::from_slice::<LegacyLine>(line) {
                        if l.file == ino {
                            from_journal.insert(l.id, l.bootid);
                        }
                    }
                }
            }
            let ids: Vec<u64> = txn.db.ids().collect();
            let mut moved = 0;
            for id in ids {
                let in_file = txn
                    .db
                    .update(id, |h| h.extra.remove("bootid"))
                    .flatten()
                    .and_then(|v| v.as_str().map(str::to_string));
                let bootid = match from_journal.remove(&id) {
                    Some(b) => b,
                    None => in_file,
                };
                if let Some(b) = bootid.filter(|b| !b.is_empty()) {
                    if txn.runtime(id).bootid.is_none() {
                        txn.update_runtime(id, |rt| rt.bootid = Some(b));
                        moved += 1;
                    }
                }
            }
            Ok(moved)
        })??;
        match fs::remove_file(&self.inner.legacy_journal) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &self.inner.legacy_journal, e)),
        }
        Ok(moved)
    }

    /// Applies `change` under the cross-process lock and saves what it
    /// changed: `known_hosts.json` is replaced atomically if a host changed,
    /// and changed runtime facts are appended to the log. Returns what
    /// `change` returned, once it is on disk.
    pub fn modify<R, F>(&self, change: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> R + Send + 'static,
    {
        let slot: Arc<Mutex<Option<R>>> = Arc::new(Mutex::new(None));
        let done: Done = Arc::new((Mutex::new(None), Condvar::new()));
        let out = slot.clone();
        let job = Job {
            run: Box::new(move |txn| {
                let r = change(txn);
                *lock(&out) = Some(r);
            }),
            done: Some(done.clone()),
        };
        if let Err(job) = self.submit(job) {
            // No writer thread: commit on this thread.
            drop(self.inner.commit_group(vec![job]));
        }
        let status = {
            let (m, cv) = &*done;
            let mut g = lock(m);
            loop {
                if let Some(status) = g.take() {
                    break status;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        status?;
        let value = lock(&slot).take();
        value.ok_or_else(|| StoreError::Internal("change produced no result".into()))
    }

    /// Queues a change that nobody waits for (a "last seen" time): it is
    /// committed with the next group, and a failure is only logged.
    pub fn modify_later<F>(&self, change: F)
    where
        F: FnOnce(&mut Txn) + Send + 'static,
    {
        let job = Job {
            run: Box::new(change),
            done: None,
        };
        if let Err(job) = self.submit(job) {
            drop(self.inner.commit_group(vec![job]));
        }
    }

    /// Hands a job to the writer thread, starting it if needed. Gives the
    /// job back if no thread can run it.
    fn submit(&self, job: Job) -> Result<(), Job> {
        let mut writer = lock(&self.writer);
        if writer.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let inner = self.inner.clone();
            let started = std::thread::Builder::new()
                .name("kiwispray-store".into())
                .spawn(move || {
                    // Ends when the store, and with it the sender, is dropped.
                    while let Ok(first) = rx.recv() {
                        let mut jobs = vec![first];
                        jobs.extend(rx.try_iter());
                        drop(inner.commit_group(jobs));
                    }
                });
            match started {
                Ok(_) => *writer = Some(tx),
                Err(e) => {
                    eprintln!("kiwispray: cannot start the database writer thread: {e}");
                    return Err(job);
                }
            }
        }
        match writer.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            Some(Err(mpsc::SendError(job))) => {
                // The thread is gone; start a new one next time.
                *writer = None;
                Err(job)
            }
            None => unreachable!("writer was just set"),
        }
    }
}

impl Drop for Store {
    /// Commits what is still queued (changes nobody waits for) before the
    /// store goes.
    fn drop(&mut self) {
        let tx = lock(&self.writer).take();
        if let Some(tx) = tx {
            let done: Done = Arc::new((Mutex::new(None), Condvar::new()));
            let job = Job {
                run: Box::new(|_| {}),
                done: Some(done.clone()),
            };
            if tx.send(job).is_ok() {
                let (m, cv) = &*done;
                let mut g = lock(m);
                while g.is_none() {
                    let (next, timeout) = cv
                        .wait_timeout(g, std::time::Duration::from_secs(5))
                        .unwrap_or_else(|p| p.into_inner());
                    g = next;
                    if timeout.timed_out() {
                        break;
                    }
                }
            }
        }
    }
}

impl Inner {
    fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let file = stat(&self.path)?;
        let log = stat(&self.log_path)?;
        let mut cache = lock(&self.cache);
        if cache.fresh(file, log) {
            return cache.snapshot();
        }
        // This process may have written a file between the stats above
        // and taking the lock; the cache then already holds it. Look again
        // before reading.
        let file = stat(&self.path)?;
        if !(cache.loaded && cache.file == file) || cache.db.is_err() {
            let (stamp, db) = self.read_file();
            cache.file = stamp;
            cache.db = db.map(Arc::new);
            cache.snap = None;
        }
        let log = stat(&self.log_path)?;
        if !cache.loaded || cache.log.stamp != log {
            self.read_log(&mut cache);
            cache.snap = None;
        }
        cache.loaded = true;
        cache.snapshot()
    }

    fn read_file(&self) -> (Option<Stamp>, Result<Database, StoreError>) {
        let (stamp, result) = self.read_file_once();
        let Err(StoreError::Corrupt { .. }) = &result else {
            return (stamp, result);
        };
        // A file torn by an interrupted append is finished from its record
        // and read again; any other corrupt file is reported as it is.
        match self.replay_grow() {
            Ok(true) => self.read_file_once(),
            Ok(false) => (stamp, result),
            Err(e) => {
                eprintln!("kiwispray: {e}");
                (stamp, result)
            }
        }
    }

    fn read_file_once(&self) -> (Option<Stamp>, Result<Database, StoreError>) {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return (None, Ok(Database::empty(self.placeholders.clone())))
            }
            Err(e) => return (None, Err(io_error("read", &self.path, e))),
        };
        let meta = match f.metadata() {
            Ok(m) => m,
            Err(e) => return (None, Err(io_error("read", &self.path, e))),
        };
        let stamp = Some(Stamp::of(&meta));
        let mut text = Vec::with_capacity(meta.len() as usize + 1);
        if let Err(e) = f.read_to_end(&mut text) {
            return (None, Err(io_error("read", &self.path, e)));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            // An empty file (e.g. created by `touch`) is an empty database.
            return (stamp, Ok(Database::empty(self.placeholders.clone())));
        }
        let result =
            Database::parse(&text, self.placeholders.clone()).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: e.line,
                column: e.column,
                message: e.message,
            });
        (stamp, result)
    }

    /// Brings the cached table up to the log on disk: the appended tail if
    /// it is the same file, else the whole (compacted) file.
    fn read_log(&self, cache: &mut Cached) {
        let path = &self.log_path;
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                cache.log = LogState::default();
                cache.rt = Ok(Arc::new(RuntimeTable::default()));
                return;
            }
            Err(e) => {
                cache.rt = Err(io_error("read", path, e));
                return;
            }
        };
        let stamp = match f.metadata() {
            Ok(m) => Stamp::of(&m),
            Err(e) => {
                cache.rt = Err(io_error("read", path, e));
                return;
            }
        };
        let follows = cache.log.stamp.is_some_and(|s| s.same_file(&stamp))
            && stamp.len >= cache.log.read
            && cache.rt.is_ok();
        let (mut table, from, lines) = match (&cache.rt, follows) {
            (Ok(rt), true) => ((**rt).clone(), cache.log.read, cache.log.lines),
            _ => (RuntimeTable::default(), 0, 0),
        };
        let mut text = Vec::with_capacity(stamp.len.saturating_sub(from) as usize);
        let read = f
            .seek(io::SeekFrom::Start(from))
            .and_then(|_| (&mut f).take(stamp.len - from).read_to_end(&mut text));
        if let Err(e) = read {
            cache.rt = Err(io_error("read", path, e));
            return;
        }
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        match parse_log(path, &text[..complete], lines + 1) {
            Ok((patches, count)) => {
                for p in &patches {
                    table.apply(p);
                }
                cache.log = LogState {
                    _pinned: Some(f),
                    stamp: Some(stamp),
                    read: from + complete as u64,
                    lines: lines + count,
                };
                cache.rt = Ok(Arc::new(table));
            }
            Err(e) => {
                // Kept until the log changes again.
                cache.log = LogState {
                    _pinned: Some(f),
                    stamp: Some(stamp),
                    read: 0,
                    lines: 0,
                };
                cache.rt = Err(e);
            }
        }
    }

    /// Commits a group of changes and tells each caller the outcome.
    /// Returns the replaced file, still open: freeing its blocks takes
    /// milliseconds for a large database, which the callers need not wait
    /// for.
    fn commit_group(&self, jobs: Vec<Job>) -> Option<File> {
        let dones: Vec<_> = jobs.iter().filter_map(|j| j.done.clone()).collect();
        let unwaited = jobs.iter().any(|j| j.done.is_none());
        let runs: Vec<_> = jobs.into_iter().map(|j| j.run).collect();
        let mut replaced = None;
        let started = std::time::Instant::now();
        let status = match catch_unwind(AssertUnwindSafe(|| self.commit(runs, &mut replaced))) {
            Ok(status) => status,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a change panicked".into());
                Err(StoreError::Internal(what))
            }
        };
        crate::metrics::observe_commit(started.elapsed().as_secs_f64());
        if unwaited {
            if let Err(e) = &status {
                eprintln!("kiwispray: a queued change was not saved: {e}");
            }
        }
        for done in dones {
            let (m, cv) = &*done;
            *lock(m) = Some(status.clone());
            cv.notify_all();
        }
        replaced
    }

    /// Gives a file this store creates (the new database, the lock file,
    /// the log) the owner of the database, else of its directory, so that
    /// `kiwispray-hosts` run as root does not leave files the service's own
    /// user cannot write. Only root can change owners; for anyone else the
    /// files are theirs already or stay as they are.
    fn keep_owner(&self, f: &File) {
        let (dir, _) = self.dir_and_name();
        let like = fs::metadata(&self.path).or_else(|_| fs::metadata(&dir));
        if let (Ok(like), Ok(have)) = (like, f.metadata()) {
            if (have.uid(), have.gid()) != (like.uid(), like.gid()) {
                let _ = std::os::unix::fs::fchown(f, Some(like.uid()), Some(like.gid()));
            }
        }
    }

    /// The permissions a new file of the store gets: the database's, so
    /// that the log is as private as the database.
    fn keep_mode(&self, f: &File) -> io::Result<()> {
        if let Ok(m) = fs::metadata(&self.path) {
            f.set_permissions(fs::Permissions::from_mode(m.permissions().mode() & 0o7777))?;
        }
        Ok(())
    }

    /// Runs the changes and saves the result. `replaced` receives the file
    /// that was replaced, still open, for the caller to close.
    fn commit(&self, runs: Vec<Run>, replaced: &mut Option<File>) -> Result<(), StoreError> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| io_error("create lock file", &self.lock_path, e))?;
        self.keep_owner(&lock_file);
        lock_file
            .lock_exclusive()
            .map_err(|e| io_error("lock", &self.lock_path, e))?;
        if !self.swept.swap(true, Ordering::Relaxed) {
            self.remove_stale_temp_files();
        }
        let current = self.snapshot()?;
        let mut txn = Txn {
            db: (*current.db).clone(),
            rt: (*current.rt).clone(),
            patches: Vec::new(),
            events: Vec::new(),
            aborted: false,
        };
        drop(current);
        txn.db.clear_changed();
        for run in runs {
            // What this change finds, to go back to if it aborts (cheap:
            // both are shared copy-on-write structures).
            let (db, rt) = (txn.db.clone(), txn.rt.clone());
            let (patches, events) = (txn.patches.len(), txn.events.len());
            run(&mut txn);
            if txn.aborted {
                txn.db = db;
                txn.rt = rt;
                txn.patches.truncate(patches);
                txn.events.truncate(events);
                txn.aborted = false;
            }
        }
        // The configuration first: a crash before the log is written
        // leaves a stale fact, never a machine that installs again.
        if txn.db.is_changed() {
            let from = txn.db.appended_from();
            txn.db.clear_changed();
            let db = Arc::new(txn.db);
            let grown = match from {
                Some(from) => self.grow(&db, from)?,
                None => false,
            };
            if !grown {
                *replaced = self.save(db)?;
            }
        }
        if !txn.patches.is_empty() {
            self.append_log(&txn.patches, txn.rt)?;
        }
        if let Err(e) = events::append(&self.events_path, &txn.events) {
            // The change itself is saved; a lost log line must not undo it.
            eprintln!(
                "kiwispray: cannot append to event log {}: {e}",
                self.events_path.display()
            );
        }
        drop(lock_file);
        Ok(())
    }

    /// Appends `patches` to the log (one write, and one `fdatasync` if
    /// any is durable) and makes `table`, which they produced, the cached
    /// one. Called under the lock, after a snapshot, so the cache describes
    /// the whole log: bytes after its last complete line are left by a
    /// crashed writer and are cut off first. A log that is gone or was
    /// replaced from outside meanwhile is written whole instead; one that
    /// has grown long is compacted.
    fn append_log(&self, patches: &[Patch], table: RuntimeTable) -> Result<(), StoreError> {
        let path = &self.log_path;
        let mut text = Vec::with_capacity(patches.len() * 160);
        for p in patches {
            serde_json::to_writer(&mut text, p).map_err(|e| StoreError::Internal(e.to_string()))?;
            text.push(b'\n');
        }
        let durable = patches.iter().any(Patch::durable);
        let (known, start, lines) = {
            let cache = lock(&self.cache);
            (cache.log.stamp, cache.log.read, cache.log.lines)
        };
        let table = Arc::new(table);
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_error("open", path, e))?;
        let meta = f.metadata().map_err(|e| io_error("append to", path, e))?;
        let same = known.is_some_and(|k| k.same_file(&Stamp::of(&meta)));
        if !same && (known.is_some() || meta.len() > 0) {
            return self.compact(table);
        }
        let start = if same { start } else { 0 };
        let written = (|| -> io::Result<Stamp> {
            if !same {
                self.keep_owner(&f);
                self.keep_mode(&f)?;
            }
            if meta.len() != start {
                // A torn line left by a crash.
                f.set_len(start)?;
            }
            f.write_all(&text)?;
            if durable {
                f.sync_data()?;
            }
            if !same {
                File::open(self.dir_and_name().0)?.sync_all()?;
            }
            Ok(Stamp::of(&f.metadata()?))
        })();
        let stamp = match written {
            Ok(s) => s,
            Err(e) => {
                // Nothing of a failed commit may apply: cut off what was
                // written of it (a full disk can still shrink a file).
                let _ = f.set_len(start);
                return Err(io_error("append to", path, e));
            }
        };
        let lines = if same { lines } else { 0 } + patches.len();
        let records = table.len();
        {
            let mut cache = lock(&self.cache);
            cache.log = LogState {
                _pinned: Some(f),
                stamp: Some(stamp),
                read: stamp.len,
                lines,
            };
            cache.rt = Ok(table.clone());
            cache.snap = None;
        }
        if stamp.len > LOG_MIN_COMPACT && lines > 2 * records + 64 {
            if let Err(e) = self.compact(table) {
                // The log is whole; it is compacted on a later commit.
                eprintln!("kiwispray: cannot compact {}: {e}", path.display());
            }
        }
        Ok(())
    }

    /// Replaces the log with one line per record of `table` (under the
    /// lock) and makes it the cached one.
    fn compact(&self, table: Arc<RuntimeTable>) -> Result<(), StoreError> {
        let path = &self.log_path;
        let (dir, _) = self.dir_and_name();
        let tmp = self.temp_path(".runtime");
        let written = (|| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            self.keep_mode(&f)?;
            self.keep_owner(&f);
            let mut w = io::BufWriter::with_capacity(256 * 1024, f);
            let mut ids: Vec<u64> = table.ids().collect();
            ids.sort_unstable();
            for id in ids {
                serde_json::to_writer(&mut w, &Patch::whole(id, table.get(id)))?;
                w.write_all(b"\n")?;
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(f)
        })();
        let f = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_error("compact", path, e));
            }
        };
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("compact", path, e));
        }
        // After the rename, which changes the file's ctime.
        let stamp = Stamp::of(&f.metadata().map_err(|e| io_error("compact", path, e))?);
        {
            let mut cache = lock(&self.cache);
            cache.log = LogState {
                _pinned: Some(f),
                stamp: Some(stamp),
                read: stamp.len,
                lines: table.len(),
            };
            cache.rt = Ok(table);
            cache.snap = None;
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("compact", path, e))
    }

    /// A fresh temp file name beside the database.
    fn temp_path(&self, what: &str) -> PathBuf {
        let (dir, name) = self.dir_and_name();
        dir.join(format!(
            ".{name}.tmp{what}.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Removes temp files of writers that were killed while saving. Temp
    /// files are only written under the lock, which the caller holds, so
    /// every one found belongs to a writer that is gone.
    fn remove_stale_temp_files(&self) {
        let (dir, name) = self.dir_and_name();
        let prefix = format!(".{name}.tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn dir_and_name(&self) -> (PathBuf, String) {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (dir, name)
    }

    /// Replaces the file atomically and durably, and makes `db` the cached
    /// database in the same step as the rename. Returns the replaced file,
    /// still open, so that its blocks are not freed inside the rename.
    fn save(&self, db: Arc<Database>) -> Result<Option<File>, StoreError> {
        let (dir, _) = self.dir_and_name();
        let tmp = self.temp_path("");
        let written = (|| -> io::Result<()> {
            let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            if let Ok(old) = fs::metadata(&self.path) {
                f.set_permissions(fs::Permissions::from_mode(old.permissions().mode()))?;
            }
            self.keep_owner(&f);
            let mut w = io::BufWriter::with_capacity(256 * 1024, f);
            db.write_json(&mut w)?;

            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("save", &self.path, e));
        }
        let old = File::open(&self.path).ok();
        {
            // Readers that see the new file find it in the cache.
            let mut cache = lock(&self.cache);
            if let Err(e) = fs::rename(&tmp, &self.path) {
                let _ = fs::remove_file(&tmp);
                return Err(io_error("save", &self.path, e));
            }
            cache.file = stat(&self.path)?;
            let mut db = Arc::unwrap_or_clone(db);
            db.set_verbatim();
            cache.db = Ok(Arc::new(db));
            cache.snap = None;
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("save", &self.path, e))?;
        Ok(old)
    }

    /// Appends the hosts `from..` of `db` to the file in place, when the
    /// file is the one this store read (its stamp unchanged) and `db`'s
    /// first `from` hosts are its exact bytes: a registration then costs
    /// what it writes, not a rewrite of the whole database. Returns false
    /// (nothing done) when the file does not qualify; the caller saves it
    /// whole.
    ///
    /// The append is made safe by a redo record: the bytes and where they
    /// go are first written, durably, to `.known_hosts.json.grow`, then
    /// written over the file's closing `"\n]\n"`, synced, and the record
    /// emptied. A file torn by a crash in between does not parse; the
    /// reader that finds it so replays the record ([`Self::replay_grow`]),
    /// which only ever writes the same bytes at the same place again.
    fn grow(&self, db: &Arc<Database>, from: usize) -> Result<bool, StoreError> {
        let expected = lock(&self.cache).file;
        let Some(expected) = expected else {
            return Ok(false);
        };
        let mut f = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(_) => return Ok(false),
        };
        let meta = f.metadata().map_err(|e| io_error("save", &self.path, e))?;
        if Stamp::of(&meta) != expected || meta.len() < 3 {
            return Ok(false);
        }
        let offset = meta.len() - 3;
        let mut end = [0u8; 3];
        f.seek(io::SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut end))
            .map_err(|e| io_error("save", &self.path, e))?;
        if &end != b"\n]\n" {
            return Ok(false);
        }
        let mut tail = Vec::new();
        db.write_tail(from, &mut tail)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut before = vec![0u8; offset.min(GROW_CONTEXT) as usize];
        f.seek(io::SeekFrom::Start(offset - before.len() as u64))
            .and_then(|_| f.read_exact(&mut before))
            .map_err(|e| io_error("save", &self.path, e))?;
        let record = GrowRecord {
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            len: tail.len() as u64,
            before,
        };
        self.write_grow_record(&record, &tail)?;
        {
            // The record makes the append durable; readers that see the
            // grown file find it in the cache (as with a rename in `save`).
            let mut cache = lock(&self.cache);
            let written = f
                .seek(io::SeekFrom::Start(offset))
                .and_then(|_| f.write_all(&tail));
            if let Err(e) = written {
                // The record stays: the next reader finishes the append.
                return Err(io_error("save", &self.path, e));
            }
            cache.file = stat(&self.path)?;
            cache.db = Ok(db.clone());
            cache.snap = None;
        }
        f.sync_data().map_err(|e| io_error("save", &self.path, e))?;
        // Emptied, not removed, so that the next append need not sync the
        // directory; a record that outlives this (a crash right here) is
        // of a complete append, which replaying writes once more.
        if let Ok(g) = OpenOptions::new().write(true).open(self.grow_path()) {
            let _ = g.set_len(0);
        }
        Ok(true)
    }

    fn grow_path(&self) -> PathBuf {
        beside(&self.path, ".grow")
    }

    /// Writes the redo record of an append and syncs it (and, when the
    /// record file is new, its directory).
    fn write_grow_record(&self, record: &GrowRecord, tail: &[u8]) -> Result<(), StoreError> {
        let path = self.grow_path();
        let created = !path.exists();
        let mut text =
            serde_json::to_vec(record).map_err(|e| StoreError::Internal(e.to_string()))?;
        text.push(b'\n');
        text.extend_from_slice(tail);
        let written = (|| -> io::Result<()> {
            let mut g = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            if created {
                self.keep_mode(&g)?;
                self.keep_owner(&g);
            }
            g.set_len(0)?;
            g.write_all(&text)?;
            g.sync_data()?;
            if created {
                let (dir, _) = self.dir_and_name();
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        written.map_err(|e| io_error("save", &path, e))
    }

    /// Finishes an append that a crash (or a writer still at work) left
    /// half done: writes the recorded bytes at the recorded place of the
    /// same file and cuts it there. Called when the file does not parse;
    /// returns whether there was a record for this file to replay.
    fn replay_grow(&self) -> Result<bool, StoreError> {
        let path = self.grow_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        let Some(nl) = text.iter().position(|b| *b == b'\n') else {
            return Ok(false);
        };
        let Ok(record) = serde_json::from_slice::<GrowRecord>(&text[..nl]) else {
            return Ok(false);
        };
        let tail = &text[nl + 1..];
        if tail.len() as u64 != record.len {
            // A record being written: its writer has not touched the file.
            return Ok(false);
        }
        let replayed = (|| -> io::Result<bool> {
            let mut f = OpenOptions::new().read(true).write(true).open(&self.path)?;
            let meta = f.metadata()?;
            // The same file, cut or grown only where the append writes,
            // with the same bytes before that place: the record is of this
            // file's last append, not of an earlier one that completed
            // before the file was edited in place.
            if (meta.dev(), meta.ino()) != (record.dev, record.ino)
                || meta.len() < record.offset
                || meta.len() > record.offset + record.len
                || record.before.len() as u64 > record.offset
            {
                return Ok(false);
            }
            let mut before = vec![0u8; record.before.len()];
            f.seek(io::SeekFrom::Start(record.offset - before.len() as u64))?;
            f.read_exact(&mut before)?;
            let mut now = Vec::new();
            f.read_to_end(&mut now)?;
            if before != record.before || now == tail {
                return Ok(false);
            }
            f.seek(io::SeekFrom::Start(record.offset))?;
            f.write_all(tail)?;
            f.set_len(record.offset + record.len)?;
            f.sync_data()?;
            Ok(true)
        })();
        replayed.map_err(|e| io_error("repair", &self.path, e))
    }
}

/// How many bytes before an append its record keeps, to recognise the file.
const GROW_CONTEXT: u64 = 256;

/// Where an append to the database goes (see [`Inner::grow`]).
#[derive(Debug, serde::Serialize, Deserialize)]
struct GrowRecord {
    dev: u64,
    ino: u64,
    offset: u64,
    len: u64,
    /// The file's bytes just before `offset`.
    before: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::Host;

    fn temp_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ks-store-{tag}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn store(dir: &Path) -> Store {
        Store::new(
            dir.join("known_hosts.json"),
            dir.join("events.jsonl"),
            Placeholders::default(),
        )
    }

    /// A database of `n` hosts in state `img`, written through `s`.
    fn hosts_in_install(s: &Store, n: u64) {
        s.modify(move |t| {
            for id in 1..=n {
                t.db.insert(Host::new(id, &[], &format!("SN{id}"), "", "img"))
                    .unwrap();
            }
        })
        .unwrap();
    }

    fn set_bootid(s: &Store, id: u64, bootid: &str) {
        let bootid = bootid.to_string();
        s.modify(move |t| t.update_runtime(id, |rt| rt.bootid = Some(bootid)))
            .unwrap();
    }

    fn bootid(s: &Store, id: u64) -> Option<String> {
        s.snapshot().unwrap().runtime(id).bootid.clone()
    }

    fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(dir.join(".known_hosts.json.runtime"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn new_hosts_are_appended_in_place_and_other_changes_replace_the_file() {
        let dir = temp_root("grow");
        let path = dir.join("known_hosts.json");
        let s = store(&dir);
        hosts_in_install(&s, 3);
        let first = ino(&path);
        // registrations: the same file, grown, reading as the whole database
        for id in 4..=6 {
            s.modify(move |t| {
                t.db.insert(Host::new(id, &[], &format!("SN{id}"), "", "new"))
            })
            .unwrap()
            .unwrap();
            assert_eq!(ino(&path), first, "host {id} was appended in place");
        }
        let text = fs::read_to_string(&path).unwrap();
        let again = store(&dir).snapshot().unwrap();
        assert_eq!(again.len(), 6);
        assert_eq!(again.to_json(), text, "the file is what a full write gives");
        assert_eq!(
            fs::metadata(dir.join(".known_hosts.json.grow"))
                .unwrap()
                .len(),
            0
        );
        // another process appends to the file this one read
        store(&dir)
            .modify(|t| t.db.insert(Host::new(7, &[], "SN7", "", "new")))
            .unwrap()
            .unwrap();
        s.modify(|t| t.db.insert(Host::new(8, &[], "SN8", "", "new")))
            .unwrap()
            .unwrap();
        assert_eq!(ino(&path), first);
        assert_eq!(
            store(&dir).snapshot().unwrap().ids().collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        // a change to an existing host replaces the file
        s.modify(|t| t.db.update(2, |h| h.state = "finished".into()))
            .unwrap();
        assert_ne!(ino(&path), first);
        // a file in another form is written whole, then appended to
        fs::write(&path, "[{\"id\": 1, \"state\": \"new\"}]").unwrap();
        let s = store(&dir);
        s.modify(|t| t.db.insert(Host::new(2, &[], "SN2", "", "new")))
            .unwrap()
            .unwrap();
        let whole = ino(&path);
        s.modify(|t| t.db.insert(Host::new(3, &[], "SN3", "", "new")))
            .unwrap()
            .unwrap();
        assert_eq!(ino(&path), whole);
        assert_eq!(store(&dir).snapshot().unwrap().len(), 3);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A crash in the middle of an append: its record is durable, the file
    /// holds part of the new bytes and does not parse. The next reader
    /// finishes the append; a corrupt file that is not such a torn append
    /// is left as it is, record or not.
    #[test]
    fn a_torn_append_is_finished_by_the_next_reader() {
        let dir = temp_root("torn-grow");
        let path = dir.join("known_hosts.json");
        let grow = dir.join(".known_hosts.json.grow");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        s.modify(|t| t.db.insert(Host::new(3, &[], "SN3", "", "new")))
            .unwrap()
            .unwrap();
        let complete = fs::read(&path).unwrap();
        // the same append, torn: take the file back to two hosts, write the
        // record, then only part of the bytes
        let s2 = store(&dir);
        s2.modify(|t| t.db.remove(3)).unwrap();
        let two = fs::read(&path).unwrap();
        let offset = two.len() as u64 - 3;
        let tail = &complete[offset as usize..];
        let before = two[(offset - GROW_CONTEXT) as usize..offset as usize].to_vec();
        let record = GrowRecord {
            dev: fs::metadata(&path).unwrap().dev(),
            ino: ino(&path),
            offset,
            len: tail.len() as u64,
            before,
        };
        let mut text = serde_json::to_vec(&record).unwrap();
        text.push(b'\n');
        text.extend_from_slice(tail);
        fs::write(&grow, &text).unwrap();
        let mut torn = two[..offset as usize].to_vec();
        torn.extend_from_slice(&tail[..tail.len() / 2]);
        fs::write(&path, &torn).unwrap();
        assert_eq!(ino(&path), record.ino, "written in place");
        let snap = store(&dir).snapshot().unwrap();
        assert_eq!(snap.len(), 3, "the append was finished");
        assert_eq!(fs::read(&path).unwrap(), complete);
        // corrupt elsewhere, with the record of that complete append: untouched
        let mut bad = complete.clone();
        bad[10] = b'#';
        fs::write(&path, &bad).unwrap();
        assert!(matches!(
            store(&dir).snapshot(),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), bad);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_empty_and_first_write_creates_it() {
        let dir = temp_root("missing");
        let s = store(&dir);
        assert!(s.snapshot().unwrap().is_empty());
        let id = s
            .modify(|t| {
                let id = t.next_id();
                t.db.insert(Host::new(id, &[], "S", "", "new")).unwrap();
                t.record(Event::now(id, "", "new", "test", ""));
                id
            })
            .unwrap();
        assert_eq!(id, 1);
        let text = fs::read_to_string(dir.join("known_hosts.json")).unwrap();
        assert!(text.contains("\"serial\": \"S\""), "{text}");
        let (events, _) = events::read(&dir.join("events.jsonl"), None).unwrap();
        assert_eq!(events.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_reported_and_never_overwritten() {
        let dir = temp_root("corrupt");
        let path = dir.join("known_hosts.json");
        fs::write(&path, "[\n  {\"id\": 1,,}\n]").unwrap();
        let s = store(&dir);
        let err = s.snapshot().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("known_hosts.json"));
        let err = s
            .modify(|t| t.db.insert(Host::new(9, &[], "", "", "new")))
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert_eq!(fs::read_to_string(&path).unwrap(), "[\n  {\"id\": 1,,}\n]");
        // Once fixed, the store recovers.
        fs::write(&path, "[{\"id\": 1}]").unwrap();
        assert_eq!(s.snapshot().unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outside_edits_are_seen() {
        let dir = temp_root("edit");
        let s = store(&dir);
        s.modify(|t| t.db.insert(Host::new(1, &[], "", "", "new")))
            .unwrap()
            .unwrap();
        let other = store(&dir);
        other
            .modify(|t| t.db.update(1, |h| h.state = "img".into()))
            .unwrap();
        assert_eq!(s.snapshot().unwrap().get(1).unwrap().state, "img");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = temp_root("threads");
        let stores: Vec<Arc<Store>> = (0..3).map(|_| Arc::new(store(&dir))).collect();
        let mut threads = Vec::new();
        for t in 0..12 {
            let s = stores[t % 3].clone();
            threads.push(std::thread::spawn(move || {
                for _ in 0..10 {
                    s.modify(|txn| {
                        let id = txn.next_id();
                        txn.db.insert(Host::new(id, &[], "", "", "new")).unwrap();
                    })
                    .unwrap();
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let db = store(&dir).snapshot().unwrap();
        assert_eq!(db.len(), 120);
        assert_eq!(db.next_id(), 121);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_panicking_change_saves_nothing_and_the_store_goes_on() {
        let dir = temp_root("panic");
        let s = store(&dir);
        let err = s
            .modify(|t| {
                t.db.insert(Host::new(1, &[], "", "", "new")).unwrap();
                t.update_runtime(1, |rt| rt.bootid = Some("b".into()));
                panic!("boom");
            })
            .unwrap_err();
        assert_eq!(err, StoreError::Internal("boom".into()));
        assert!(!dir.join("known_hosts.json").exists());
        assert!(!dir.join(".known_hosts.json.runtime").exists());
        s.modify(|t| t.db.insert(Host::new(1, &[], "", "", "new")))
            .unwrap()
            .unwrap();
        assert_eq!(s.snapshot().unwrap().len(), 1);
        assert_eq!(bootid(&s, 1), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runtime_facts_are_appended_and_never_rewrite_the_database() {
        let dir = temp_root("append");
        let s = store(&dir);
        hosts_in_install(&s, 3);
        let path = dir.join("known_hosts.json");
        let before = fs::read(&path).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        let other = store(&dir);
        assert_eq!(bootid(&other, 1), None);
        set_bootid(&s, 1, "b1");
        set_bootid(&s, 2, "b2");
        s.modify(|t| t.update_runtime(1, |rt| rt.bootid = None))
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), before, "file untouched");
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
        let lines = log_lines(&dir);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], serde_json::json!({"id": 1, "bootid": "b1"}));
        assert_eq!(lines[2], serde_json::json!({"id": 1, "bootid": null}));
        // Another store (another process) sees every fact.
        assert_eq!(bootid(&other, 1), None);
        assert_eq!(bootid(&other, 2).as_deref(), Some("b2"));
        set_bootid(&other, 3, "b3");
        assert_eq!(bootid(&s, 3).as_deref(), Some("b3"));
        // Tools that read the files see the bootids too.
        let v = read_json(&path).unwrap();
        assert_eq!(v[1]["bootid"], "b2");
        assert_eq!(v[0]["bootid"], serde_json::Value::Null);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 9: a reader loaded `known_hosts.json` and then the bootid
    /// journal, which a full rewrite in between had emptied, so another
    /// process refused a bootid that had just been issued. A rewrite of the
    /// database now never touches the runtime log.
    #[test]
    fn regression_a_rewrite_never_hides_a_fresh_bootid_from_another_process() {
        let dir = temp_root("fresh");
        let writer = store(&dir);
        hosts_in_install(&writer, 4);
        let reader = store(&dir);
        for round in 0..200 {
            let b = format!("r{round}");
            set_bootid(&writer, 1 + round % 4, &b);
            // A full rewrite right after, as `kiwispray-hosts set` does.
            writer
                .modify(move |t| t.db.update(2, |h| h.hostname = format!("h{round}")))
                .unwrap();
            assert_eq!(bootid(&reader, 1 + round % 4).as_deref(), Some(b.as_str()));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_off_by_the_next_writer() {
        let dir = temp_root("torn");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 1, "b1");
        let log = dir.join(".known_hosts.json.runtime");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"id\":2,\"bootid\":\"b").unwrap();
        drop(f);
        let fresh = store(&dir);
        assert_eq!(bootid(&fresh, 1).as_deref(), Some("b1"));
        assert_eq!(bootid(&fresh, 2), None);
        set_bootid(&fresh, 2, "b2");
        assert_eq!(log_lines(&dir).len(), 2, "the torn line is gone");
        assert_eq!(bootid(&store(&dir), 2).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_log_line_is_reported_and_never_removed() {
        let dir = temp_root("badlog");
        let s = store(&dir);
        hosts_in_install(&s, 1);
        set_bootid(&s, 1, "b1");
        let log = dir.join(".known_hosts.json.runtime");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"id\": oops}\n").unwrap();
        drop(f);
        let bad = fs::read(&log).unwrap();
        for st in [&s, &store(&dir)] {
            match st.snapshot().unwrap_err() {
                StoreError::Corrupt { path, line, .. } => {
                    assert_eq!(path, log);
                    assert_eq!(line, 2);
                }
                other => panic!("{other}"),
            }
        }
        assert!(s
            .modify(|t| t.update_runtime(1, |rt| rt.bootid = None))
            .is_err());
        assert_eq!(fs::read(&log).unwrap(), bad);
        // Once fixed by hand, the store goes on.
        let fixed: Vec<u8> = bad.split(|b| *b == b'\n').next().unwrap().to_vec();
        fs::write(&log, [fixed, b"\n".to_vec()].concat()).unwrap();
        assert_eq!(bootid(&s, 1).as_deref(), Some("b1"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_log_is_compacted_and_followers_see_every_fact() {
        let dir = temp_root("compact");
        let s = store(&dir);
        hosts_in_install(&s, 8);
        let follower = store(&dir);
        assert_eq!(bootid(&follower, 1), None);
        let log = dir.join(".known_hosts.json.runtime");
        set_bootid(&s, 1, "first");
        let ino = fs::metadata(&log).unwrap().ino();
        let mut n = 0u64;
        while fs::metadata(&log).unwrap().ino() == ino {
            let id = 1 + n % 8;
            set_bootid(&s, id, &format!("{n:064x}"));
            n += 1;
            assert!(n < 100_000, "never compacted");
        }
        assert!(n > 1000, "compacted early, at {n} lines");
        // Compacted: one line per host.
        assert!(log_lines(&dir).len() <= 8 + 64);
        for id in 1..=8u64 {
            let last = (0..n).rev().find(|k| 1 + k % 8 == id).unwrap();
            assert_eq!(bootid(&follower, id), Some(format!("{last:064x}")));
            assert_eq!(bootid(&store(&dir), id), Some(format!("{last:064x}")));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_removed_hosts_id_is_not_reused_while_its_facts_remain() {
        let dir = temp_root("ids");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 2, "b2");
        // Removed through the store: its facts go with it.
        s.modify(|t| t.remove_host(2)).unwrap();
        assert!(s.snapshot().unwrap().rt.is_empty());
        assert_eq!(s.modify(|t| t.next_id()).unwrap(), 2);
        // Removed by hand from the file: its facts remain, so the id is
        // skipped.
        set_bootid(&s, 1, "b1");
        fs::write(dir.join("known_hosts.json"), "[]").unwrap();
        assert_eq!(s.modify(|t| t.next_id()).unwrap(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_earlier_versions_bootids_are_moved_to_the_log() {
        let dir = temp_root("migrate");
        let path = dir.join("known_hosts.json");
        fs::write(
            &path,
            r#"[{"id": 1, "state": "img", "bootid": "old1", "rack": "R1"},
                {"id": 2, "state": "img", "bootid": "old2"},
                {"id": 3, "state": "new", "bootid": null}]"#,
        )
        .unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        // The journal of that version: a newer bootid for host 2, and a
        // line for a file that is gone.
        fs::write(
            dir.join(".known_hosts.json.bootids"),
            format!(
                "{{\"file\":{ino},\"id\":2,\"bootid\":\"new2\"}}\n{{\"file\":1,\"id\":1,\"bootid\":\"stale\"}}\n"
            ),
        )
        .unwrap();
        let s = store(&dir);
        assert_eq!(s.migrate().unwrap(), 2);
        assert_eq!(bootid(&s, 1).as_deref(), Some("old1"));
        assert_eq!(bootid(&s, 2).as_deref(), Some("new2"));
        assert_eq!(bootid(&s, 3), None);
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("bootid"), "{text}");
        assert!(text.contains("\"rack\": \"R1\""), "{text}");
        assert!(!dir.join(".known_hosts.json.bootids").exists());
        assert_eq!(store(&dir).migrate().unwrap(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_runtime_and_full_writes_lose_nothing() {
        let dir = temp_root("mixed");
        let stores: Vec<Arc<Store>> = (0..3).map(|_| Arc::new(store(&dir))).collect();
        hosts_in_install(&stores[0], 12);
        let mut threads = Vec::new();
        for t in 0..12u64 {
            let s = stores[t as usize % 3].clone();
            threads.push(std::thread::spawn(move || {
                // Thread t owns host t + 1: bootids, and now and then a
                // hostname (a full rewrite); other threads register hosts.
                let id = t + 1;
                for round in 0..15 {
                    set_bootid(&s, id, &format!("t{t}-r{round}"));
                    if round % 5 == 4 {
                        s.modify(move |txn| {
                            txn.db.update(id, |h| h.hostname = format!("h{t}-{round}"))
                        })
                        .unwrap()
                        .unwrap();
                    }
                    if round % 7 == 0 {
                        s.modify(|txn| {
                            let new = txn.next_id();
                            txn.db.insert(Host::new(new, &[], "", "", "new")).unwrap();
                        })
                        .unwrap();
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        for st in stores.iter().map(|s| s.as_ref()).chain([&store(&dir)]) {
            let db = st.snapshot().unwrap();
            assert_eq!(db.len(), 12 + 12 * 3);
            for t in 0..12u64 {
                let h = db.get(t + 1).unwrap();
                assert_eq!(
                    db.runtime(t + 1).bootid,
                    Some(format!("t{t}-r14")),
                    "host {}",
                    t + 1
                );
                assert_eq!(h.hostname, format!("h{t}-14"));
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_aborted_change_leaves_nothing_and_spares_its_group() {
        let dir = temp_root("abort");
        let s = Arc::new(store(&dir));
        hosts_in_install(&s, 2);
        let a = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.modify(|t| {
                    t.db.update(1, |h| h.hostname = "half".into());
                    t.update_runtime(1, |rt| rt.bootid = Some("half".into()));
                    t.record(Event::now(1, "", "", "test", ""));
                    t.abort();
                })
                .unwrap()
            })
        };
        s.modify(|t| t.db.update(2, |h| h.hostname = "kept".into()))
            .unwrap();
        a.join().unwrap();
        let snap = store(&dir).snapshot().unwrap();
        assert_eq!(snap.get(1).unwrap().hostname, "not-set");
        assert_eq!(snap.runtime(1).bootid, None);
        assert_eq!(snap.get(2).unwrap().hostname, "kept");
        assert!(!dir.join("events.jsonl").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn queued_changes_are_committed_before_the_store_goes() {
        let dir = temp_root("later");
        let s = store(&dir);
        hosts_in_install(&s, 1);
        s.modify_later(|t| t.update_runtime(1, |rt| rt.bootid = Some("later".into())));
        drop(s);
        assert_eq!(bootid(&store(&dir), 1).as_deref(), Some("later"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Found in review: `kiwispray-hosts` run as root replaced the database
    /// with a root-owned file, and created the lock file and journal as
    /// root, so the service's own user could no longer save anything.
    #[test]
    fn regression_files_keep_the_database_owner_when_root_writes() {
        let dir = temp_root("owner");
        let s = store(&dir);
        s.modify(|t| t.db.insert(Host::new(1, &[], "", "", "img")))
            .unwrap()
            .unwrap();
        let path = dir.join("known_hosts.json");
        let (uid, gid) = (65534, 65534);
        let me = fs::metadata(&dir).unwrap().uid();
        if std::os::unix::fs::chown(&path, Some(uid), Some(gid)).is_err() {
            eprintln!("SKIPPED: changing owners needs root (running as uid {me})");
            fs::remove_dir_all(&dir).unwrap();
            return;
        }
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let _ = fs::remove_file(dir.join(".known_hosts.json.lock"));
        // A bootid goes to the log, a state change rewrites the file.
        set_bootid(&s, 1, "b1");
        s.modify(|t| t.db.update(1, |h| h.state = "finished".into()))
            .unwrap();
        for name in [
            "known_hosts.json",
            ".known_hosts.json.lock",
            ".known_hosts.json.runtime",
        ] {
            let m = fs::metadata(dir.join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{name}");
        }
        let fresh = store(&dir);
        set_bootid(&s, 1, "b2");
        assert_eq!(bootid(&fresh, 1).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
