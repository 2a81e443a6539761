//! Loading and saving the host database: the one code path through which
//! the FastCGI handler and the CLI read and change `known_hosts.json`.
//!
//! - Reads are cached: the parsed database is kept in memory and re-read only
//!   when the file's identity (device, inode, size, mtime, ctime) changed, so
//!   an edit from outside is seen by the next request while a boot storm of
//!   installed machines costs one `stat` each.
//! - Every read-modify-write holds an exclusive `fs2` lock on a lock file
//!   beside the database, across processes, re-reads the file under the lock
//!   if it changed, and replaces it atomically: temp file in the same
//!   directory, fsync, rename, fsync of the directory.
//! - Concurrent writers within one process are committed in groups by one
//!   writer thread per store: while it writes the file, further changes
//!   queue up, and the next write commits the whole queue at once. Keeping
//!   every commit on one thread also keeps the memory a commit uses in one
//!   allocator arena, instead of one copy per request thread.
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
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

/// Why the database could not be read or saved.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The file is not a host database. It is left untouched.
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

/// What identifies one version of the file on disk.
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

struct Cached {
    /// `None` when the file did not exist; `Some(None)`-like states are not
    /// needed because a missing file is simply the empty database.
    stamp: Option<Stamp>,
    loaded: bool,
    result: Result<Arc<Database>, StoreError>,
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

impl Store {
    /// The database at `path`, with its lock file (`.<name>.lock`) beside it
    /// and the event log at `events_path`.
    pub fn new(path: PathBuf, events_path: PathBuf, placeholders: Placeholders) -> Store {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "known_hosts.json".into());
        let lock_path = path.with_file_name(format!(".{name}.lock"));
        let placeholders = Arc::new(placeholders);
        Store {
            inner: Arc::new(Inner {
                path,
                lock_path,
                events_path,
                cache: Mutex::new(Cached {
                    stamp: None,
                    loaded: false,
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

    pub fn events_path(&self) -> &Path {
        &self.inner.events_path
    }

    /// The current database, re-read only if the file changed.
    pub fn snapshot(&self) -> Result<Arc<Database>, StoreError> {
        self.inner.snapshot()
    }

    /// Applies `change` to the database under the cross-process lock and
    /// saves the result atomically if anything changed. Returns what
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
    fn stat(&self) -> Result<Option<Stamp>, StoreError> {
        match fs::metadata(&self.path) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &self.path, e)),
        }
    }

    fn snapshot(&self) -> Result<Arc<Database>, StoreError> {
        let stamp = self.stat()?;
        let mut cache = lock(&self.cache);
        if cache.loaded && cache.stamp == stamp {
            return cache.result.clone();
        }
        if cache.loaded {
            // The file may have been replaced by this process between the
            // stat above and taking the lock; the cache then already holds
            // it. Look again before reading.
            let now = self.stat()?;
            if cache.stamp == now {
                return cache.result.clone();
            }
        }
        let (stamp, result) = self.read_file();
        cache.stamp = stamp;
        cache.loaded = true;
        cache.result = result;
        cache.result.clone()
    }

    fn read_file(&self) -> (Option<Stamp>, Result<Arc<Database>, StoreError>) {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return (
                    None,
                    Ok(Arc::new(Database::empty(self.placeholders.clone()))),
                )
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
            return (
                stamp,
                Ok(Arc::new(Database::empty(self.placeholders.clone()))),
            );
        }
        let result = Database::parse(&text, self.placeholders.clone())
            .map(Arc::new)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: e.line,
                column: e.column,
                message: e.message,
            });
        (stamp, result)
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
        lock_file
            .lock_exclusive()
            .map_err(|e| io_error("lock", &self.lock_path, e))?;
        if !self.swept.swap(true, Ordering::Relaxed) {
            self.remove_stale_temp_files();
        }
        let current = self.snapshot()?;
        let mut txn = Txn {
            db: (*current).clone(),
            events: Vec::new(),
        };
        drop(current);
        txn.db.clear_changed();
        for run in runs {
            run(&mut txn);
        }
        if txn.db.is_changed() {
            txn.db.clear_changed();
            *replaced = self.save(Arc::new(txn.db))?;
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

    /// Replaces the file atomically and durably, and makes `db` the cached
    /// database in the same step as the rename. Returns the replaced file,
    /// still open, so that its blocks are not freed inside the rename.
    fn save(&self, db: Arc<Database>) -> Result<Option<File>, StoreError> {
        let (dir, name) = self.dir_and_name();
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
            cache.stamp = self.stat()?;
            cache.loaded = true;
            cache.result = Ok(db);
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("save", &self.path, e))?;
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
}
