//! Loading and saving the host database: the one code path through which
//! the FastCGI handler and the CLI read and change `known_hosts.json`.
//!
//! - Reads are cached: the parsed database is kept in memory and re-read only
//!   when the file's identity (device, inode, size, mtime, ctime) changed, so
//!   an edit from outside is seen by the next request while a boot storm of
//!   installed machines costs two `stat`s each.
//! - Every read-modify-write holds an exclusive `fs2` lock on a lock file
//!   beside the database, across processes, re-reads the file under the lock
//!   if it changed, and replaces it atomically: temp file in the same
//!   directory, fsync, rename, fsync of the directory.
//! - Bootids, the frequent write while machines install, go to a journal
//!   beside the database (`.known_hosts.json.bootids`, hidden, so that the
//!   web server never serves it) instead: a commit whose changes are all
//!   bootids appends one JSON line per host, `{"file":<inode>,"id":N,
//!   "bootid":"..."}` (`null` for a cleared bootid), with one write and one
//!   fsync, so its cost does not grow with the fleet. A line applies only to
//!   the file whose inode it names: every full rewrite writes the current
//!   bootids into the new file and then empties the journal, and lines left
//!   for an older file (by a crash in between) are ignored. Loading applies
//!   the journal after the file; readers see it grow by its size and times
//!   and apply only the new lines. A torn last line (a crash in the middle
//!   of an append) is ignored; any other line that does not parse is
//!   reported like a corrupt database and never removed. The journal is
//!   folded into the file once it grows past half the file's size.
//! - Concurrent writers within one process are committed in groups by one
//!   writer thread per store: while it writes, further changes queue up, and
//!   the next write commits the whole queue at once. Keeping every commit
//!   on one thread also keeps the memory a commit uses in one allocator
//!   arena, instead of one copy per request thread.
//! - The file is written straight from each host's cached JSON, without
//!   building the whole text in memory, and readers never see a renamed
//!   file before the cache knows it, so a write is never followed by a
//!   needless re-read and re-parse.
//! - A file that does not parse is reported with its line and column and is
//!   never overwritten.

use crate::events::{self, Event};
use crate::hosts::Database;
use crate::identity::Placeholders;
use fs2::FileExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

/// The journal is folded into the file once it is larger than this share
/// of the file (and than [`JOURNAL_MIN_FOLD`]).
const JOURNAL_FOLD_DIVISOR: u64 = 2;
/// The journal is never folded below this size.
const JOURNAL_MIN_FOLD: u64 = 256 * 1024;

/// Why the database could not be read or saved.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The file (or the bootid journal) is not valid. It is left untouched.
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
}

/// One line of the bootid journal.
#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    /// The inode of the `known_hosts.json` the line applies to.
    file: u64,
    id: u64,
    bootid: Option<String>,
}

/// How much of the journal the cached database reflects.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct JournalState {
    /// The journal as it was read (`None`: it did not exist).
    stamp: Option<Stamp>,
    /// Bytes read: complete lines only.
    read: u64,
    /// Complete lines read, for the line numbers of errors.
    lines: usize,
    /// Lines for another file (left by a crash during a full rewrite).
    stale: usize,
    /// Whether bytes after the last complete line were seen (a torn line,
    /// or an append still in progress).
    torn: bool,
}

impl JournalState {
    /// Whether a commit may append to the journal as it is.
    fn appendable(&self) -> bool {
        self.stale == 0 && !self.torn
    }
}

struct Cached {
    loaded: bool,
    /// The database file as it was read (`None`: it did not exist).
    file: Option<Stamp>,
    journal: JournalState,
    result: Result<Arc<Database>, StoreError>,
}

impl Cached {
    fn fresh(&self, file: Option<Stamp>, journal: Option<Stamp>) -> bool {
        self.loaded && self.file == file && self.journal.stamp == journal
    }
}

/// Where the outcome of a change goes, and how its caller is woken.
type Done = Arc<(Mutex<Option<Result<(), StoreError>>>, Condvar)>;

/// One queued change to the database.
type Run = Box<dyn FnOnce(&mut Txn) + Send>;

/// A change waiting to be committed, and where its outcome goes.
struct Job {
    run: Run,
    done: Done,
}

/// The database being changed inside one commit, and the events the
/// changes record.
pub struct Txn {
    pub db: Database,
    events: Vec<Event>,
}

impl Txn {
    /// Records an event; it is written to the event log once the change is
    /// saved.
    pub fn record(&mut self, event: Event) {
        self.events.push(event);
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
    journal_path: PathBuf,
    events_path: PathBuf,
    placeholders: Arc<Placeholders>,
    cache: Mutex<Cached>,
    /// Whether temp files left by a killed writer were looked for.
    swept: std::sync::atomic::AtomicBool,
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

/// The bootid journal of the database at `path`: `.<name>.bootids` beside
/// it.
pub fn journal_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "known_hosts.json".into());
    path.with_file_name(format!(".{name}.bootids"))
}

/// Parses the journal's complete lines (`text` up to its last newline);
/// `first_line` is the line number of the first one. Returns the lines
/// and how many there were, blank ones included.
fn parse_journal(
    path: &Path,
    text: &[u8],
    first_line: usize,
) -> Result<(Vec<JournalLine>, usize), StoreError> {
    let mut out = Vec::new();
    let mut number = first_line;
    for raw in text.split_inclusive(|b| *b == b'\n') {
        if raw.iter().all(u8::is_ascii_whitespace) {
            number += 1;
            continue;
        }
        let line: JournalLine = serde_json::from_slice(raw).map_err(|e| {
            let message = e.to_string();
            StoreError::Corrupt {
                path: path.to_path_buf(),
                line: number,
                column: e.column(),
                message: message
                    .rfind(" at line ")
                    .map_or(message.clone(), |i| message[..i].to_string()),
            }
        })?;
        out.push(line);
        number += 1;
    }
    Ok((out, number - first_line))
}

/// `known_hosts.json` at `path` as JSON, with the bootids of its journal
/// applied: what the file holds once the journal is folded into it. For
/// tools and tests that look at the file itself rather than through a
/// [`Store`]. A missing file is an empty array.
pub fn read_json(path: &Path) -> Result<serde_json::Value, StoreError> {
    let (ino, text) = match File::open(path) {
        Ok(mut f) => {
            let ino = f.metadata().map_err(|e| io_error("read", path, e))?.ino();
            let mut text = Vec::new();
            f.read_to_end(&mut text)
                .map_err(|e| io_error("read", path, e))?;
            (ino, text)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (0, Vec::new()),
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
    let journal = journal_path(path);
    let text = match fs::read(&journal) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", &journal, e)),
    };
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if let Some(hosts) = value.as_array_mut() {
        for line in parse_journal(&journal, &text[..complete], 1)?.0 {
            if line.file != ino {
                continue;
            }
            let host = hosts.iter_mut().find(|h| h["id"].as_u64() == Some(line.id));
            if let Some(serde_json::Value::Object(h)) = host {
                h.insert("bootid".into(), line.bootid.into());
            }
        }
    }
    Ok(value)
}

impl Store {
    /// The database at `path`, with its lock file (`.<name>.lock`) and its
    /// bootid journal (`.<name>.bootids`) beside it and the event log at
    /// `events_path`.
    pub fn new(path: PathBuf, events_path: PathBuf, placeholders: Placeholders) -> Store {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "known_hosts.json".into());
        let lock_path = path.with_file_name(format!(".{name}.lock"));
        let journal_path = journal_path(&path);
        let placeholders = Arc::new(placeholders);
        Store {
            inner: Arc::new(Inner {
                path,
                lock_path,
                journal_path,
                events_path,
                cache: Mutex::new(Cached {
                    loaded: false,
                    file: None,
                    journal: JournalState::default(),
                    result: Ok(Arc::new(Database::empty(placeholders.clone()))),
                }),
                placeholders,
                swept: std::sync::atomic::AtomicBool::new(false),
            }),
            writer: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The bootid journal beside the database.
    pub fn journal_path(&self) -> &Path {
        &self.inner.journal_path
    }

    pub fn events_path(&self) -> &Path {
        &self.inner.events_path
    }

    /// The current database, re-read only if the file or the journal
    /// changed.
    pub fn snapshot(&self) -> Result<Arc<Database>, StoreError> {
        self.inner.snapshot()
    }

    /// Applies `change` to the database under the cross-process lock and
    /// saves the result if anything changed: new bootids alone are appended
    /// to the journal, anything else replaces the file atomically. Returns
    /// what `change` returned, once it is on disk.
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
            done: done.clone(),
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

impl Inner {
    fn snapshot(&self) -> Result<Arc<Database>, StoreError> {
        let file = stat(&self.path)?;
        let journal = stat(&self.journal_path)?;
        let mut cache = lock(&self.cache);
        if cache.fresh(file, journal) {
            return cache.result.clone();
        }
        // This process may have written the file or the journal between
        // the stats above and taking the lock; the cache then already
        // holds it. Look again before reading.
        let file = stat(&self.path)?;
        let journal = stat(&self.journal_path)?;
        if cache.fresh(file, journal) {
            return cache.result.clone();
        }
        // An append changes the times before the size: a journal of the
        // same size may be in the middle of one.
        let grown = match (cache.journal.stamp, journal) {
            (None, Some(_)) => true,
            (Some(old), Some(new)) => {
                old.dev == new.dev && old.ino == new.ino && new.len >= old.len
            }
            _ => false,
        };
        if cache.loaded && cache.file == file && file.is_some() && cache.result.is_ok() && grown {
            // Only the journal grew: apply its new lines.
            let ino = file.map_or(0, |f| f.ino);
            let mut db = match &cache.result {
                Ok(db) => (**db).clone(),
                Err(_) => unreachable!("checked above"),
            };
            let mut state = cache.journal;
            match self.read_journal(ino, &mut state, &mut db) {
                Ok(true) => {
                    cache.journal = state;
                    cache.result = Ok(Arc::new(db));
                    return cache.result.clone();
                }
                // Replaced or cut short meanwhile: read everything again.
                Ok(false) => {}
                Err(e) => {
                    // Kept until the journal changes again.
                    cache.journal = state;
                    cache.result = Err(e);
                    return cache.result.clone();
                }
            }
        }
        let (file, journal, result) = self.load();
        cache.file = file;
        cache.journal = journal;
        cache.loaded = true;
        cache.result = result;
        cache.result.clone()
    }

    /// Reads the file and then the whole journal.
    fn load(
        &self,
    ) -> (
        Option<Stamp>,
        JournalState,
        Result<Arc<Database>, StoreError>,
    ) {
        let mut journal = JournalState::default();
        let (file, db) = self.read_file();
        let mut db = match db {
            Ok(db) => db,
            Err(e) => return (file, journal, Err(e)),
        };
        let ino = file.map_or(0, |f| f.ino);
        match self.read_journal(ino, &mut journal, &mut db) {
            Ok(_) => (file, journal, Ok(Arc::new(db))),
            Err(e) => (file, journal, Err(e)),
        }
    }

    fn read_file(&self) -> (Option<Stamp>, Result<Database, StoreError>) {
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

    /// Applies the journal's complete lines after `state.read` to `db`,
    /// which was loaded from the file with inode `ino`, and advances
    /// `state`. Lines for another file are skipped; bytes after the last
    /// newline are left for later. Returns `false`, changing nothing, if
    /// the journal is no longer the one `state` describes (replaced or cut
    /// short); it must then be read from the start, onto the file's
    /// database.
    fn read_journal(
        &self,
        ino: u64,
        state: &mut JournalState,
        db: &mut Database,
    ) -> Result<bool, StoreError> {
        let path = &self.journal_path;
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if state.read > 0 {
                    return Ok(false);
                }
                *state = JournalState::default();
                return Ok(true);
            }
            Err(e) => return Err(io_error("read", path, e)),
        };
        let meta = f.metadata().map_err(|e| io_error("read", path, e))?;
        let stamp = Stamp::of(&meta);
        if state
            .stamp
            .is_some_and(|s| s.ino != stamp.ino || s.dev != stamp.dev)
            || stamp.len < state.read
        {
            return Ok(false);
        }
        let mut text = Vec::with_capacity((stamp.len - state.read) as usize);
        f.seek(io::SeekFrom::Start(state.read))
            .and_then(|_| (&mut f).take(stamp.len - state.read).read_to_end(&mut text))
            .map_err(|e| io_error("read", path, e))?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        // The last bootid per host, so that a long journal costs one
        // change per host.
        let mut last: HashMap<u64, Option<String>> = HashMap::new();
        let mut order = Vec::new();
        let (parsed, count) = match parse_journal(path, &text[..complete], state.lines + 1) {
            Ok(p) => p,
            Err(e) => {
                // Remembered, so that the error is not read again until
                // the journal changes.
                state.stamp = Some(stamp);
                return Err(e);
            }
        };
        let lines = state.lines + count;
        let mut stale = state.stale;
        for line in parsed {
            if line.file != ino {
                stale += 1;
                continue;
            }
            if last.insert(line.id, line.bootid).is_none() {
                order.push(line.id);
            }
        }
        for id in order {
            if let Some(bootid) = last.remove(&id) {
                // A line for a host that is gone changes nothing.
                db.replace_bootid(id, bootid);
            }
        }
        *state = JournalState {
            stamp: Some(stamp),
            read: state.read + complete as u64,
            lines,
            stale,
            torn: complete < text.len(),
        };
        Ok(true)
    }

    /// Commits a group of changes and tells each caller the outcome.
    /// Returns the replaced file, still open: freeing its blocks takes
    /// milliseconds for a large database, which the callers need not wait
    /// for.
    fn commit_group(&self, jobs: Vec<Job>) -> Option<File> {
        let dones: Vec<_> = jobs.iter().map(|j| j.done.clone()).collect();
        let runs: Vec<_> = jobs.into_iter().map(|j| j.run).collect();
        let mut replaced = None;
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
        for done in dones {
            let (m, cv) = &*done;
            *lock(m) = Some(status.clone());
            cv.notify_all();
        }
        replaced
    }

    /// Gives a file this store creates (the new database, the lock file,
    /// the journal) the owner of the database, else of its directory, so
    /// that `kiwispray-hosts` run as root does not leave files the service's
    /// own user cannot write. Only root can change owners; for anyone else
    /// the files are theirs already or stay as they are.
    fn keep_owner(&self, f: &File) {
        let (dir, _) = self.dir_and_name();
        let like = fs::metadata(&self.path).or_else(|_| fs::metadata(&dir));
        if let (Ok(like), Ok(have)) = (like, f.metadata()) {
            if (have.uid(), have.gid()) != (like.uid(), like.gid()) {
                let _ = std::os::unix::fs::fchown(f, Some(like.uid()), Some(like.gid()));
            }
        }
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
        let (file, journal) = {
            let cache = lock(&self.cache);
            (cache.file, cache.journal)
        };
        let mut txn = Txn {
            db: (*current).clone(),
            events: Vec::new(),
        };
        drop(current);
        txn.db.clear_changed();
        for run in runs {
            run(&mut txn);
        }
        let fold_at = file
            .map_or(0, |f| f.len / JOURNAL_FOLD_DIVISOR)
            .max(JOURNAL_MIN_FOLD);
        let append = !txn.db.needs_rewrite()
            && file.is_some()
            && journal.appendable()
            && journal.read < fold_at;
        // A journal this process cannot append to (e.g. left by another
        // user) does not stop installs: the change is saved in full.
        let opened = if append && !txn.db.bootid_changes().is_empty() {
            match OpenOptions::new()
                .append(true)
                .create(true)
                .open(&self.journal_path)
            {
                Ok(f) => {
                    self.keep_owner(&f);
                    Some(f)
                }
                Err(e) => {
                    eprintln!(
                        "kiwispray: cannot open the bootid journal {}: {e}; saving the whole database",
                        self.journal_path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        if let Some(f) = opened {
            let ino = file.map_or(0, |f| f.ino);
            self.append_journal(f, ino, txn.db, journal)?;
        } else if txn.db.is_changed() {
            txn.db.clear_changed();
            *replaced = self.save(Arc::new(txn.db), journal)?;
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

    /// Appends the bootid changes of `db` to the journal, opened for
    /// appending as `f` (one write, one fsync), and makes `db` the cached
    /// database.
    fn append_journal(
        &self,
        mut f: File,
        ino: u64,
        mut db: Database,
        journal: JournalState,
    ) -> Result<(), StoreError> {
        let path = &self.journal_path;
        let mut text = Vec::new();
        let mut lines = 0;
        for (id, bootid) in db.bootid_changes() {
            let line = JournalLine {
                file: ino,
                id: *id,
                bootid: bootid.clone(),
            };
            serde_json::to_writer(&mut text, &line)
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            text.push(b'\n');
            lines += 1;
        }
        db.clear_changed();
        let created = journal.stamp.is_none();
        let stamp = (|| -> io::Result<Stamp> {
            if created {
                if let Ok(m) = fs::metadata(&self.path) {
                    f.set_permissions(fs::Permissions::from_mode(m.permissions().mode()))?;
                }
            }
            f.write_all(&text)?;
            f.sync_data()?;
            if created {
                File::open(self.dir_and_name().0)?.sync_all()?;
            }
            Ok(Stamp::of(&f.metadata()?))
        })()
        .map_err(|e| {
            // Nothing of a failed commit may apply: cut off what was
            // written of it (a disk that is full can still shrink a file).
            let _ = f.set_len(journal.read);
            io_error("append to", path, e)
        })?;
        let mut cache = lock(&self.cache);
        cache.journal = JournalState {
            stamp: Some(stamp),
            read: journal.read + text.len() as u64,
            lines: journal.lines + lines,
            stale: 0,
            torn: false,
        };
        cache.result = Ok(Arc::new(db));
        Ok(())
    }

    /// Removes temp files of writers that were killed while saving. Temp
    /// files are only written under the lock, which the caller holds, so
    /// every one found belongs to a writer that is gone.
    fn remove_stale_temp_files(&self) {
        let (dir, name) = self.dir_and_name();
        let prefix = format!(".{name}.tmp.");
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

    /// Empties the journal and records that in the cache.
    fn truncate_journal(&self, cache: &mut Cached) -> io::Result<()> {
        let f = match OpenOptions::new().write(true).open(&self.journal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                cache.journal = JournalState::default();
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        f.set_len(0)?;
        cache.journal = JournalState {
            stamp: Some(Stamp::of(&f.metadata()?)),
            ..JournalState::default()
        };
        Ok(())
    }

    /// Replaces the file atomically and durably, makes `db` the cached
    /// database in the same step as the rename, and then empties the
    /// journal, whose bootids `db` holds. Returns the replaced file, still
    /// open, so that its blocks are not freed inside the rename (and its
    /// inode is not reused while the journal names it).
    fn save(&self, db: Arc<Database>, journal: JournalState) -> Result<Option<File>, StoreError> {
        let (dir, name) = self.dir_and_name();
        if journal.stamp.is_some() && journal.stale > 0 && journal.lines == journal.stale {
            // Only lines for files that are gone: empty the journal before
            // a new file (which might get one of their inodes) appears.
            let mut cache = lock(&self.cache);
            self.truncate_journal(&mut cache)
                .map_err(|e| io_error("empty", &self.journal_path, e))?;
        }
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
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
            // Readers that see the new file find it in the cache. The
            // journal's lines are for the old file now: none of them
            // applies to the new one.
            let mut cache = lock(&self.cache);
            let journal = stat(&self.journal_path)?;
            if let Err(e) = fs::rename(&tmp, &self.path) {
                let _ = fs::remove_file(&tmp);
                return Err(io_error("save", &self.path, e));
            }
            cache.file = stat(&self.path)?;
            // Lines of unknown number, all stale: counted as one.
            let stale = usize::from(journal.is_some_and(|j| j.len > 0));
            cache.journal = JournalState {
                stamp: journal,
                read: journal.map_or(0, |j| j.len),
                lines: stale,
                stale,
                torn: false,
            };
            cache.loaded = true;
            cache.result = Ok(db);
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("save", &self.path, e))?;
        let mut cache = lock(&self.cache);
        if cache.journal.stamp.is_some_and(|j| j.len > 0) {
            if let Err(e) = self.truncate_journal(&mut cache) {
                // The change is saved; the old lines are ignored, and the
                // next write tries again.
                eprintln!(
                    "kiwispray: cannot empty the bootid journal {}: {e}",
                    self.journal_path.display()
                );
            }
        }
        Ok(old)
    }
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

    #[test]
    fn missing_file_is_empty_and_first_write_creates_it() {
        let dir = temp_root("missing");
        let s = store(&dir);
        assert!(s.snapshot().unwrap().is_empty());
        let id = s
            .modify(|t| {
                let id = t.db.next_id();
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
                        let id = txn.db.next_id();
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
                panic!("boom");
            })
            .unwrap_err();
        assert_eq!(err, StoreError::Internal("boom".into()));
        assert!(!dir.join("known_hosts.json").exists());
        s.modify(|t| t.db.insert(Host::new(1, &[], "", "", "new")))
            .unwrap()
            .unwrap();
        assert_eq!(s.snapshot().unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
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
        assert!(s
            .modify(move |t| t.db.set_bootid(id, Some(bootid)))
            .unwrap());
    }

    fn bootid(s: &Store, id: u64) -> Option<String> {
        s.snapshot().unwrap().get(id).unwrap().bootid
    }

    fn journal_lines(dir: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(dir.join(".known_hosts.json.bootids"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn bootid_only_commits_append_to_the_journal_and_other_stores_see_them() {
        let dir = temp_root("journal");
        let path = dir.join("known_hosts.json");
        let s = store(&dir);
        hosts_in_install(&s, 3);
        let other = store(&dir);
        assert_eq!(bootid(&other, 2), None);
        let before = fs::metadata(&path).unwrap();
        let text = fs::read(&path).unwrap();
        set_bootid(&s, 2, "b2-first");
        set_bootid(&s, 2, "b2-second");
        set_bootid(&s, 3, "b3");
        let after = fs::metadata(&path).unwrap();
        assert_eq!(after.ino(), before.ino(), "the file was not replaced");
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec())
        );
        assert_eq!(fs::read(&path).unwrap(), text);
        let lines = journal_lines(&dir);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            serde_json::json!({"file": before.ino(), "id": 2, "bootid": "b2-first"})
        );
        // Another store (as another process) sees the bootids, having read
        // the file before: it applies only the new lines.
        assert_eq!(bootid(&other, 2).as_deref(), Some("b2-second"));
        assert_eq!(bootid(&other, 3).as_deref(), Some("b3"));
        assert_eq!(bootid(&s, 2).as_deref(), Some("b2-second"));
        // A cleared bootid is a null line; a fresh store sees it too.
        assert!(s.modify(|t| t.db.set_bootid(3, None)).unwrap());
        assert_eq!(journal_lines(&dir)[3]["bootid"], serde_json::Value::Null);
        assert_eq!(bootid(&store(&dir), 3), None);
        assert_eq!(bootid(&other, 3), None);
        assert_eq!(fs::metadata(&path).unwrap().ino(), before.ino());
        // The file with the journal folded in, for tools that read it.
        let folded = read_json(&path).unwrap();
        assert_eq!(folded[1]["bootid"], "b2-second");
        assert_eq!(folded[2]["bootid"], serde_json::Value::Null);
        let raw: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(raw[1]["bootid"], serde_json::Value::Null);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_rewrite_folds_the_journal_into_the_file_and_empties_it() {
        let dir = temp_root("fold");
        let path = dir.join("known_hosts.json");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 1, "b1");
        assert_eq!(journal_lines(&dir).len(), 1);
        let other = store(&dir);
        assert_eq!(bootid(&other, 1).as_deref(), Some("b1"));
        let ino = fs::metadata(&path).unwrap().ino();
        s.modify(|t| t.db.update(2, |h| h.hostname = "web2".into()))
            .unwrap()
            .unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), ino);
        assert!(journal_lines(&dir).is_empty(), "journal emptied");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"bootid\": \"b1\""), "{text}");
        // Both stores, and a fresh one, still see the bootid.
        for st in [&s, &other, &store(&dir)] {
            assert_eq!(bootid(st, 1).as_deref(), Some("b1"));
            assert_eq!(st.snapshot().unwrap().get(2).unwrap().hostname, "web2");
        }
        // Appends go on against the new file.
        set_bootid(&other, 2, "b2");
        let lines = journal_lines(&dir);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["file"], fs::metadata(&path).unwrap().ino());
        assert_eq!(bootid(&s, 2).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn journal_lines_for_an_older_file_are_ignored() {
        let dir = temp_root("stale");
        let path = dir.join("known_hosts.json");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 1, "from-journal");
        assert_eq!(bootid(&s, 1).as_deref(), Some("from-journal"));
        // Someone replaces the file from outside, as it was on disk
        // (without the journal's bootid).
        let text = fs::read_to_string(&path).unwrap();
        let tmp = dir.join("edit.tmp");
        fs::write(&tmp, text.replace("SN2", "SN2-edited")).unwrap();
        fs::rename(&tmp, &path).unwrap();
        assert_eq!(journal_lines(&dir).len(), 1, "the old line is still there");
        for st in [&s, &store(&dir)] {
            let db = st.snapshot().unwrap();
            assert_eq!(db.get(1).unwrap().bootid, None, "stale line ignored");
            assert_eq!(db.get(2).unwrap().serial, "SN2-edited");
        }
        // The next bootid does not go after the stale line: the file is
        // rewritten and the journal emptied.
        let ino = fs::metadata(&path).unwrap().ino();
        set_bootid(&s, 2, "b2");
        assert_ne!(fs::metadata(&path).unwrap().ino(), ino);
        assert!(journal_lines(&dir).is_empty());
        assert_eq!(bootid(&store(&dir), 2).as_deref(), Some("b2"));
        assert_eq!(bootid(&store(&dir), 1), None);
        // From then on bootids are appended again.
        set_bootid(&s, 1, "b1");
        assert_eq!(journal_lines(&dir).len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_folded_away() {
        let dir = temp_root("torn");
        let path = dir.join("known_hosts.json");
        let journal = dir.join(".known_hosts.json.bootids");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 1, "b1");
        // A crash in the middle of an append leaves half a line.
        let ino = fs::metadata(&path).unwrap().ino();
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        write!(f, "{{\"file\":{ino},\"id\":2,\"boo").unwrap();
        drop(f);
        for st in [&s, &store(&dir)] {
            assert_eq!(bootid(st, 1).as_deref(), Some("b1"));
            assert_eq!(bootid(st, 2), None);
        }
        // The next bootid is not appended after the torn line: the file
        // is rewritten with every bootid and the journal emptied.
        set_bootid(&s, 2, "b2");
        assert_ne!(fs::metadata(&path).unwrap().ino(), ino);
        assert_eq!(fs::metadata(&journal).unwrap().len(), 0);
        let fresh = store(&dir);
        assert_eq!(bootid(&fresh, 1).as_deref(), Some("b1"));
        assert_eq!(bootid(&fresh, 2).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_journal_line_is_reported_and_never_removed() {
        let dir = temp_root("badjournal");
        let path = dir.join("known_hosts.json");
        let journal = dir.join(".known_hosts.json.bootids");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        set_bootid(&s, 1, "b1");
        let ino = fs::metadata(&path).unwrap().ino();
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        writeln!(f, "{{\"file\":{ino},\"id\":\"two\",\"bootid\":null}}").unwrap();
        writeln!(f, "{{\"file\":{ino},\"id\":2,\"bootid\":\"b2\"}}").unwrap();
        drop(f);
        let bad = fs::read(&journal).unwrap();
        let db_text = fs::read(&path).unwrap();
        for st in [&s, &store(&dir)] {
            let err = st.snapshot().unwrap_err();
            match &err {
                StoreError::Corrupt {
                    path, line, column, ..
                } => {
                    assert_eq!(path, &journal);
                    assert_eq!(*line, 2);
                    assert!(*column > 1, "{err}");
                }
                other => panic!("{other}"),
            }
            assert!(err.to_string().contains(".known_hosts.json.bootids"));
            // Neither a bootid nor any other change is written.
            let e = st
                .modify(|t| t.db.update(2, |h| h.hostname = "x".into()))
                .unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }));
            assert!(st.modify(|t| t.db.set_bootid(2, None)).is_err());
        }
        assert_eq!(fs::read(&journal).unwrap(), bad);
        assert_eq!(fs::read(&path).unwrap(), db_text);
        // Once fixed, the store recovers and reads both lines.
        let fixed = String::from_utf8(bad).unwrap().replace("\"two\"", "2");
        fs::write(&journal, fixed).unwrap();
        assert_eq!(bootid(&s, 2).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_journal_is_folded_into_the_file() {
        let dir = temp_root("long");
        let path = dir.join("known_hosts.json");
        let journal = dir.join(".known_hosts.json.bootids");
        let s = store(&dir);
        hosts_in_install(&s, 2);
        let ino = fs::metadata(&path).unwrap().ino();
        // Lines as if many boots happened: enough to pass the limit.
        let mut text = String::new();
        let mut n = 0;
        while text.len() < JOURNAL_MIN_FOLD as usize {
            text.push_str(&format!(
                "{{\"file\":{ino},\"id\":1,\"bootid\":\"{n:032x}\"}}\n"
            ));
            n += 1;
        }
        fs::write(&journal, text).unwrap();
        assert_eq!(bootid(&s, 1), Some(format!("{:032x}", n - 1)));
        set_bootid(&s, 2, "b2");
        assert_ne!(fs::metadata(&path).unwrap().ino(), ino, "folded");
        assert_eq!(fs::metadata(&journal).unwrap().len(), 0);
        let fresh = store(&dir);
        assert_eq!(bootid(&fresh, 1), Some(format!("{:032x}", n - 1)));
        assert_eq!(bootid(&fresh, 2).as_deref(), Some("b2"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_bootid_and_full_writes_lose_nothing() {
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
                            let new = txn.db.next_id();
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
        let path = dir.join("known_hosts.json");
        let on_disk = Database::parse(&fs::read(&path).unwrap(), Default::default()).unwrap();
        for st in stores.iter().map(|s| s.as_ref()).chain([&store(&dir)]) {
            let db = st.snapshot().unwrap();
            assert_eq!(db.len(), 12 + 12 * 3);
            for t in 0..12u64 {
                let h = db.get(t + 1).unwrap();
                assert_eq!(h.bootid, Some(format!("t{t}-r14")), "host {}", t + 1);
                assert_eq!(h.hostname, format!("h{t}-14"));
                // The file holds the hostnames; the journal the rest.
                assert_eq!(on_disk.get(t + 1).unwrap().hostname, h.hostname);
            }
        }
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
        // A bootid goes to the journal, a state change rewrites the file.
        s.modify(|t| t.db.set_bootid(1, Some("b1".into()))).unwrap();
        s.modify(|t| t.db.update(1, |h| h.state = "finished".into()))
            .unwrap();
        for name in ["known_hosts.json", ".known_hosts.json.lock"] {
            let m = fs::metadata(dir.join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{name}");
        }
        let fresh = store(&dir);
        s.modify(|t| t.db.set_bootid(1, Some("b2".into()))).unwrap();
        let journal = dir.join(".known_hosts.json.bootids");
        if journal.exists() {
            let m = fs::metadata(&journal).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "journal");
        }
        assert_eq!(
            fresh.snapshot().unwrap().get(1).unwrap().bootid.as_deref(),
            Some("b2")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
