//! Reliability of the host database and the handler under faults: processes
//! killed in the middle of writes, a full disk, several handler and CLI
//! processes writing at once, a corrupt database, hostile requests (through
//! nginx and straight to the FastCGI socket) and connection floods.
//!
//! The tests run the real `kiwispray-fcgi` on a Unix socket of their own
//! and talk FastCGI to it with the small client below, so that they can
//! kill and restart it at will and send records nginx never would; the
//! HTTP-level tests use the shared nginx harness in `common`. Databases come
//! from `tests/bench/gen-hosts.sh`, the benchmark's generator. The disk-full
//! test mounts a tmpfs and needs root; without root it says so and checks
//! only what it can.

mod common;

use common::{repo, Stack, TempDir};
use kiwispray::hosts::Key;
use kiwispray::identity::Mac;
use kiwispray::store::{Snapshot, Store};
use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FCGI: &str = env!("CARGO_BIN_EXE_kiwispray-fcgi");
const HOSTS: &str = env!("CARGO_BIN_EXE_kiwispray-hosts");

// ---------------------------------------------------------------- FastCGI

/// One FastCGI record.
fn record(kind: u8, id: u16, content: &[u8]) -> Vec<u8> {
    assert!(content.len() <= 65535);
    let pad = (8 - content.len() % 8) % 8;
    let mut r = vec![
        1,
        kind,
        (id >> 8) as u8,
        id as u8,
        (content.len() >> 8) as u8,
        content.len() as u8,
        pad as u8,
        0,
    ];
    r.extend_from_slice(content);
    r.extend(std::iter::repeat_n(0, pad));
    r
}

fn nv_len(n: usize, out: &mut Vec<u8>) {
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&((n as u32) | 0x8000_0000).to_be_bytes());
    }
}

/// The bytes of a complete responder request.
fn fcgi_bytes(params: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut out = record(1, 1, &[0, 1, 0, 0, 0, 0, 0, 0]);
    let mut pairs = Vec::new();
    for (k, v) in params {
        nv_len(k.len(), &mut pairs);
        nv_len(v.len(), &mut pairs);
        pairs.extend_from_slice(k.as_bytes());
        pairs.extend_from_slice(v);
    }
    for chunk in pairs.chunks(65535) {
        out.extend(record(4, 1, chunk));
    }
    out.extend(record(4, 1, &[]));
    for chunk in body.chunks(65535) {
        out.extend(record(5, 1, chunk));
    }
    out.extend(record(5, 1, &[]));
    out
}

/// A parsed CGI response.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// Reads records until END_REQUEST or end of stream; `None` when the
/// handler closed the connection without a response.
fn read_answer(s: &mut UnixStream) -> Option<Answer> {
    let mut stdout = Vec::new();
    loop {
        let mut h = [0u8; 8];
        if s.read_exact(&mut h).is_err() {
            break;
        }
        let len = u16::from_be_bytes([h[4], h[5]]) as usize + h[6] as usize;
        let mut content = vec![0u8; len];
        if s.read_exact(&mut content).is_err() {
            break;
        }
        content.truncate(u16::from_be_bytes([h[4], h[5]]) as usize);
        match h[1] {
            6 => stdout.extend_from_slice(&content),
            3 => break,
            _ => {}
        }
    }
    if stdout.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&stdout).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers
        .lines()
        .find_map(|l| l.strip_prefix("Status: "))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    Some(Answer {
        status,
        headers: headers.to_string(),
        body: body.to_string(),
    })
}

fn connect(sock: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// Sends one GET through the socket; `Err` if the handler is not there.
fn fcgi_get(sock: &Path, path: &str, query: &[u8]) -> std::io::Result<Option<Answer>> {
    fcgi_send(sock, "GET", path, query, b"", "")
}

fn fcgi_send(
    sock: &Path,
    method: &str,
    path: &str,
    query: &[u8],
    body: &[u8],
    content_length: &str,
) -> std::io::Result<Option<Answer>> {
    let mut s = connect(sock)?;
    let length = if content_length.is_empty() {
        body.len().to_string()
    } else {
        content_length.to_string()
    };
    let params: Vec<(&str, &[u8])> = vec![
        ("REQUEST_METHOD", method.as_bytes()),
        ("DOCUMENT_URI", path.as_bytes()),
        ("QUERY_STRING", query),
        ("CONTENT_LENGTH", length.as_bytes()),
        ("CONTENT_TYPE", b"application/x-www-form-urlencoded"),
        ("REMOTE_ADDR", b"127.0.0.1"),
        ("SERVER_ADDR", b"127.0.0.1"),
        ("SERVER_PORT", b"5000"),
        ("HTTP_HOST", b"127.0.0.1:5000"),
    ];
    s.write_all(&fcgi_bytes(&params, body))?;
    Ok(read_answer(&mut s))
}

// ---------------------------------------------------------------- handler

/// A deployment root with the shipped templates and a generated database.
fn root_with_hosts(tag: &str, hosts: usize) -> TempDir {
    let dir = TempDir::new(tag);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(repo().join("templates"))
        .arg(dir.path().join("templates"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "copy templates");
    fs::create_dir_all(dir.path().join("images")).unwrap();
    let out = Command::new(repo().join("tests/bench/gen-hosts.sh"))
        .arg(hosts.to_string())
        .output()
        .expect("run gen-hosts.sh");
    assert!(out.status.success(), "gen-hosts.sh failed");
    fs::write(dir.path().join("known_hosts.json"), out.stdout).unwrap();
    dir
}

/// A running `kiwispray-fcgi --bind unix:<sock>`, killed on drop.
struct Handler {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Handler {
    fn start(root: &Path, sock: &Path, extra: &[&str]) -> Handler {
        let log = sock.with_extension("log");
        let _ = fs::remove_file(sock);
        let child = Command::new(FCGI)
            .arg("--root")
            .arg(root)
            .arg("--bind")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("start kiwispray-fcgi");
        let h = Handler {
            child,
            sock: sock.to_path_buf(),
            log,
        };
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "kiwispray-fcgi did not listen on {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn status_field(&self, name: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
    }

    fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test with the handler's log.
    fn check_alive(&mut self, after: &str) {
        if !self.alive() {
            panic!("the handler died after {after}:\n{}", self.log_text());
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The database as the service sees it: `known_hosts.json` and the runtime
/// log beside it.
fn load_db(root: &Path) -> Snapshot {
    let store = Store::new(
        root.join("known_hosts.json"),
        root.join("events.jsonl"),
        Default::default(),
    );
    let db = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    (*db).clone()
}

fn storm_mac(n: u32) -> String {
    format!(
        "52-54-00-{:02x}-{:02x}-{:02x}",
        (n >> 16) & 0xff,
        (n >> 8) & 0xff,
        n & 0xff
    )
}

fn register(sock: &Path, n: u32) -> std::io::Result<Option<Answer>> {
    fcgi_get(
        sock,
        "/bootstrap",
        format!("net0={}&serial=REL{n:06}&platform=efi", storm_mac(n)).as_bytes(),
    )
}

fn registered_id(a: &Answer) -> Option<u64> {
    let rest = a.body.split("registered as host ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn cli(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(HOSTS)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run kiwispray-hosts")
}

/// A small fixed-seed generator, so that failures repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------- crash safety

/// Registrations through the handler and hostname changes through the CLI
/// while both are killed with SIGKILL at random moments: the database
/// always parses, every registration answered 200 is there, and every CLI
/// change that exited 0 is there.
#[test]
fn sigkill_of_handler_and_cli_mid_write_loses_nothing() {
    let root = root_with_hosts("crash", 300);
    let sock = root.path().join("fcgi.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let handler = Arc::new(Mutex::new(Handler::start(root.path(), &sock, &[])));
    let deadline = Instant::now() + Duration::from_secs(8);

    let mut load = Vec::new();
    for t in 0..4u32 {
        let (sock, stop, answered) = (sock.clone(), stop.clone(), answered.clone());
        load.push(std::thread::spawn(move || {
            let mut n = t * 100_000;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if let Ok(Some(a)) = register(&sock, n) {
                    if a.status == 200 {
                        let id = registered_id(&a)
                            .unwrap_or_else(|| panic!("200 without a host id: {}", a.body));
                        answered.lock().unwrap().push((n, id));
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }
    // The CLI, killed at random moments; its successes are recorded.
    let cli_done: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let cli_thread = {
        let (root, stop, cli_done) = (root.path().to_path_buf(), stop.clone(), cli_done.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut id = 1;
            while !stop.load(Ordering::Relaxed) && id <= 300 {
                let name = format!("cli-{id}.example.net");
                let mut child = Command::new(HOSTS)
                    .arg("--root")
                    .arg(&root)
                    .args(["set", &id.to_string(), "--hostname", &name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_millis(rng.below(40)));
                if rng.below(2) == 0 {
                    let _ = child.kill();
                }
                if child.wait().unwrap().success() {
                    cli_done.lock().unwrap().push((id, name));
                }
                id += 1;
            }
        })
    };
    // The handler, killed and restarted.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut kills = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(150 + rng.below(450)));
        let mut h = handler.lock().unwrap();
        h.kill();
        kills += 1;
        // The file parses at every moment the handler is dead.
        load_db(root.path());
        *h = Handler::start(root.path(), &sock, &[]);
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    cli_thread.join().unwrap();
    handler.lock().unwrap().kill();

    let db = load_db(root.path());
    let answered = answered.lock().unwrap();
    let cli_done = cli_done.lock().unwrap();
    assert!(kills >= 5, "only {kills} kills");
    assert!(
        answered.len() > 50,
        "too few registrations: {}",
        answered.len()
    );
    assert!(!cli_done.is_empty(), "no CLI change completed");
    let mut ids = HashSet::new();
    for (n, id) in answered.iter() {
        let mac = Mac::parse(&storm_mac(*n)).unwrap();
        assert_eq!(
            db.lookup(&Key::Mac(mac)),
            &[*id],
            "registration {n} (host {id}) was answered 200 but is not in the database"
        );
        assert!(ids.insert(*id), "host id {id} given to two machines");
    }
    for (id, name) in cli_done.iter() {
        assert_eq!(
            db.get(*id).map(|h| h.hostname),
            Some(name.clone()),
            "kiwispray-hosts set {id} exited 0 but its change is lost"
        );
    }
    // A later writer sweeps temp files left by killed ones.
    let out = cli(root.path(), &["set", "1", "--hostname", "after-crash"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leftovers: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    eprintln!(
        "crash test: {kills} handler kills, {} registrations, {} CLI changes kept",
        answered.len(),
        cli_done.len()
    );
}

// ---------------------------------------------------------------- concurrency

/// Three handler processes (as with several FastCGI processes behind one
/// nginx) and three CLI loops write at the same time: nothing is lost.
#[test]
fn several_handlers_and_clis_lose_no_update() {
    let root = root_with_hosts("concurrent", 1000);
    let handlers: Vec<Handler> = (0..3)
        .map(|i| Handler::start(root.path(), &root.path().join(format!("h{i}.sock")), &[]))
        .collect();
    let mut threads = Vec::new();
    let results: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    for (i, h) in handlers.iter().enumerate() {
        for t in 0..2u32 {
            let sock = h.sock.clone();
            let results = results.clone();
            threads.push(std::thread::spawn(move || {
                for k in 0..60u32 {
                    let n = (i as u32 * 2 + t) * 1000 + k + 1;
                    let a = register(&sock, n).unwrap().expect("an answer");
                    assert_eq!(a.status, 200, "{}", a.body);
                    results
                        .lock()
                        .unwrap()
                        .push((n, registered_id(&a).unwrap()));
                }
            }));
        }
    }
    for c in 0..3u64 {
        let root = root.path().to_path_buf();
        threads.push(std::thread::spawn(move || {
            for k in 0..15u64 {
                let id = 1 + c * 100 + k;
                let out = cli(
                    &root,
                    &[
                        "set",
                        &id.to_string(),
                        "--meta-set",
                        &format!("writer=cli{c}"),
                    ],
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let db = load_db(root.path());
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 360);
    assert_eq!(db.len(), 1000 + 360);
    let ids: HashSet<u64> = results.iter().map(|r| r.1).collect();
    assert_eq!(ids.len(), 360, "duplicate ids");
    for (n, id) in results.iter() {
        let mac = Mac::parse(&storm_mac(*n)).unwrap();
        assert_eq!(db.lookup(&Key::Mac(mac)), &[*id]);
    }
    for c in 0..3u64 {
        for k in 0..15u64 {
            let h = db.get(1 + c * 100 + k).unwrap();
            assert_eq!(h.metadata["writer"], format!("cli{c}"));
            // The generated metadata beside it is kept.
            assert!(h.metadata.contains_key("rack"));
        }
    }
}

/// Issue 9: 4 handler processes and 4 `kiwispray-hosts set` loops on one
/// root; 305 of 985 `/post-install` calls right after an install boot got
/// 403, each with the bootid another process had just issued: a reader
/// loaded `known_hosts.json`, a full rewrite emptied the bootid journal,
/// and the reader then loaded the empty journal. Runtime facts now live in
/// their own log, which no rewrite of the database touches.
#[test]
fn regression_a_fresh_bootid_is_accepted_by_every_other_process() {
    const INSTALLS: usize = 2400;
    let root = root_with_hosts("freshbootid", 400);
    // Thousands of install boots without /finish: no loop breaker here.
    fs::write(
        root.path().join("kiwispray.json"),
        r#"{"max_install_boots": 1000000}"#,
    )
    .unwrap();
    let handlers: Vec<Handler> = (0..4)
        .map(|i| Handler::start(root.path(), &root.path().join(format!("h{i}.sock")), &[]))
        .collect();
    let socks: Vec<PathBuf> = handlers.iter().map(|h| h.sock.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for c in 0..4u64 {
        let root = root.path().to_path_buf();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A finished host (i % 10 == 1): every set is a full rewrite.
                let id = 1 + 10 * ((c * 10 + k) % 40);
                let out = cli(
                    &root,
                    &["set", &id.to_string(), "--meta-set", &format!("k={c}-{k}")],
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                k += 1;
            }
            k
        }));
    }
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut installers = Vec::new();
    for t in 0..8usize {
        let socks = socks.clone();
        let done = done.clone();
        let refused = refused.clone();
        installers.push(std::thread::spawn(move || {
            // Hosts 10, 20, ..., 400 are in state image1; thread t owns
            // every eighth of them.
            let mine: Vec<u32> = (1..=40u32)
                .filter(|h| *h as usize % 8 == t)
                .map(|h| h * 10)
                .collect();
            let mut k = 0usize;
            while done.fetch_add(1, Ordering::Relaxed) < INSTALLS {
                let i = mine[k % mine.len()];
                let a = &socks[(t + k) % 4];
                let b = &socks[(t + k + 1) % 4];
                let q = format!(
                    "net0=0c-c4-7a-{:02x}-{:02x}-{:02x}",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                );
                let boot = fcgi_get(a, "/bootstrap", q.as_bytes())
                    .unwrap()
                    .expect("an answer");
                assert_eq!(boot.status, 200, "{}", boot.body);
                let bootid: String = boot
                    .body
                    .split("bootid=")
                    .nth(1)
                    .unwrap_or_else(|| panic!("no bootid in {}", boot.body))
                    .chars()
                    .take(32)
                    .collect();
                let q = format!("id={i}&bootid={bootid}");
                let post = fcgi_get(b, "/post-install", q.as_bytes())
                    .unwrap()
                    .expect("an answer");
                if post.status != 200 {
                    refused.lock().unwrap().push(format!(
                        "host {i}: {} {}",
                        post.status,
                        post.body.trim()
                    ));
                }
                k += 1;
            }
        }));
    }
    for t in installers {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let sets: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let refused = refused.lock().unwrap();
    assert!(
        refused.is_empty(),
        "{} of {INSTALLS} fresh bootids refused by another process: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    assert!(sets >= 20, "only {sets} CLI writes ran beside the installs");
    // The log was compacted meanwhile, and every attempt is there.
    let db = load_db(root.path());
    let attempts: u64 = (1..=40u64)
        .map(|h| db.runtime(h * 10).attempts.last().map_or(0, |a| a.n))
        .sum();
    assert_eq!(attempts as usize, INSTALLS);
    eprintln!("{INSTALLS} installs through 4 handlers, {sets} CLI rewrites beside them: 0 refused");
}

// ---------------------------------------------------------------- corrupt file

#[test]
fn corrupt_database_is_reported_never_overwritten_and_recovers() {
    let root = root_with_hosts("corrupt", 50);
    let db_path = root.path().join("known_hosts.json");
    let good = fs::read(&db_path).unwrap();
    // Truncated in the middle of host 10 (as after a bad copy).
    let cut = good.len() / 5;
    let bad = good[..cut].to_vec();
    fs::write(&db_path, &bad).unwrap();
    let expected_line = bad.iter().filter(|b| **b == b'\n').count() + 1;
    let h = Handler::start(root.path(), &root.path().join("fcgi.sock"), &[]);

    for (path, query) in [
        ("/bootstrap", "net0=52-54-00-aa-bb-01".to_string()),
        ("/bootstrap", "net0=0c-c4-7a-00-00-01".to_string()),
        ("/state", "id=1".to_string()),
        (
            "/finish",
            "id=10&bootid=0123456789abcdef0123456789abcdef".to_string(),
        ),
    ] {
        let a = fcgi_get(&h.sock, path, query.as_bytes()).unwrap().unwrap();
        assert_eq!(a.status, 500, "{path}: {}", a.body);
        assert!(
            a.body.contains("known_hosts.json")
                && a.body.contains(&format!("line {expected_line}"))
                && a.body.contains("column"),
            "{path}: {}",
            a.body
        );
    }
    let out = cli(root.path(), &["set", "1", "--hostname", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("known_hosts.json") && err.contains(&format!("line {expected_line}")),
        "{err}"
    );
    assert_eq!(
        fs::read(&db_path).unwrap(),
        bad,
        "a corrupt database was overwritten"
    );

    // Fixed by the operator: the next request sees it.
    fs::write(&db_path, &good).unwrap();
    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=52-54-00-aa-bb-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(registered_id(&a), Some(51));
    assert_eq!(load_db(root.path()).len(), 51);
}

// ---------------------------------------------------------------- disk full

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The root on a tmpfs too small for a second copy of the database, then
/// filled up: registrations (appended in place) and CLI changes (a second
/// copy) fail with "No space left on device", the old database stays byte
/// for byte, and no temp file is left behind. Once there is room again, a
/// registration is appended.
#[test]
fn disk_full_fails_clearly_and_keeps_the_old_database() {
    if !is_root() {
        eprintln!("disk_full test: not root, cannot mount a tmpfs; skipped");
        return;
    }
    let dir = TempDir::new("diskfull");
    let mnt = dir.path().join("root");
    fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "kiwispray-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mount a tmpfs as root");
    let _mount = Mount(mnt.clone());
    let src = root_with_hosts("diskfull-src", 1300);
    Command::new("cp")
        .arg("-a")
        .arg(src.path().join("templates"))
        .arg(&mnt)
        .status()
        .unwrap();
    let db_path = mnt.join("known_hosts.json");
    fs::copy(src.path().join("known_hosts.json"), &db_path).unwrap();
    let before = fs::read(&db_path).unwrap();
    assert!(before.len() > 550 * 1024, "database too small for the test");
    // The socket lives outside the full file system.
    let h = Handler::start(&mnt, &dir.path().join("fcgi.sock"), &[]);
    // Warm up the store's own files, then fill the file system.
    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=0c-c4-7a-00-00-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let filler = mnt.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    let before = fs::read(&db_path).unwrap();

    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=52-54-00-dd-00-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 500, "{}", a.body);
    assert!(
        a.body.contains("No space left on device") && a.body.contains("known_hosts.json"),
        "{}",
        a.body
    );
    let out = cli(&mnt, &["set", "1", "--hostname", "full"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(fs::read(&db_path).unwrap(), before, "old database changed");
    let temps: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(temps.is_empty(), "temp files left on a full disk");
    // Reads still work.
    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=0c-c4-7a-00-00-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    // With room again, the registration is appended to the same file.
    fs::remove_file(&filler).unwrap();
    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=52-54-00-dd-00-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(load_db(&mnt).len(), 1301);
    let after = fs::read(&db_path).unwrap();
    assert_eq!(
        after[..before.len() - 3],
        before[..before.len() - 3],
        "appended in place"
    );
}

// ---------------------------------------------------------------- hostile input

/// Every dynamic path, straight to the handler: long queries, many
/// parameters, invalid UTF-8, NUL, huge bodies. Each gets a 4xx, the
/// handler stays up, its memory stays bounded and nothing is written.
#[test]
fn hostile_requests_to_the_handler_get_4xx_and_change_nothing() {
    let root = root_with_hosts("hostile", 200);
    let db_path = root.path().join("known_hosts.json");
    let mut h = Handler::start(root.path(), &root.path().join("fcgi.sock"), &[]);
    // Warm up (loads the database), then take the baseline.
    fcgi_get(&h.sock, "/bootstrap", b"net0=0c-c4-7a-00-00-01").unwrap();
    let before = fs::read(&db_path).unwrap();
    let rss_before = h.status_field("VmRSS");

    let long = vec![b'a'; 64 * 1024];
    let many: Vec<u8> = (0..10_000)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes();
    // Malformed for every path.
    let queries: Vec<(&str, Vec<u8>)> = vec![
        ("64 KiB", [b"net0=".as_slice(), &long].concat()),
        ("10,000 parameters", many.clone()),
        (
            "invalid UTF-8",
            b"net0=52-54-00-aa-00-01&serial=\xff\xfe".to_vec(),
        ),
        (
            "encoded invalid UTF-8",
            b"net0=52-54-00-aa-00-01&serial=%ff%fe".to_vec(),
        ),
        ("NUL", b"net0=52-54-00-aa-00-01&serial=a\0b".to_vec()),
        (
            "encoded NUL",
            b"net0=52-54-00-aa-00-01&serial=a%00b".to_vec(),
        ),
        ("bad escape", b"net0=52-54-00-aa-00-01&serial=%zz".to_vec()),
    ];
    // Wrong for the path they are sent to.
    let semantic: Vec<(&str, &str, Vec<u8>)> = vec![
        ("/bootstrap", "bad MAC", b"net0=52-54-00-aa-00".to_vec()),
        (
            "/bootstrap",
            "multicast MAC",
            b"net0=01-00-5e-00-00-01".to_vec(),
        ),
        ("/bootstrap", "no MAC", b"serial=UNKNOWN-SERIAL".to_vec()),
        (
            "/bootstrap",
            "repeated",
            b"net0=52-54-00-aa-00-01&net0=52-54-00-aa-00-02".to_vec(),
        ),
        (
            "/bootstrap",
            "long serial",
            [b"net0=52-54-00-aa-00-01&serial=".as_slice(), &long[..300]].concat(),
        ),
        (
            "/finish",
            "id out of range",
            b"id=99999999999999999999999&bootid=x".to_vec(),
        ),
        ("/finish", "id not a number", b"id=1;rm&bootid=x".to_vec()),
        ("/post-install", "no bootid", b"id=10".to_vec()),
        ("/state", "negative id", b"id=-1".to_vec()),
    ];
    for (path, what, q) in &semantic {
        let a = fcgi_get(&h.sock, path, q).unwrap().unwrap();
        assert!(
            (400..500).contains(&a.status),
            "{path} with {what}: {} {}",
            a.status,
            a.body
        );
    }
    for path in ["/bootstrap", "/post-install", "/finish", "/state", "/hosts"] {
        for (what, q) in &queries {
            match fcgi_get(&h.sock, path, q) {
                Ok(Some(a)) => assert!(
                    (400..500).contains(&a.status),
                    "{path} with {what}: {} {}",
                    a.status,
                    a.body
                ),
                // The PARAMS stream is larger than the handler accepts.
                Ok(None) | Err(_) => assert!(q.len() > 60_000, "{path} with {what}: no answer"),
            }
        }
    }
    // Bodies: 100 MiB announced (not sent), a 100 MiB body sent, junk forms.
    for (what, body, length) in [
        ("100 MiB announced", Vec::new(), "104857600"),
        ("bad length", Vec::new(), "-1"),
        (
            "form with NUL",
            b"mac=52-54-00-aa-00-09&metadata=%00".to_vec(),
            "",
        ),
        ("unknown field", b"evil=1".to_vec(), ""),
        ("10,000 fields", many.clone(), ""),
    ] {
        let a = fcgi_send(&h.sock, "POST", "/update", b"id=1&bootid=x", &body, length)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert!(
            (400..500).contains(&a.status),
            "{what}: {} {}",
            a.status,
            a.body
        );
    }
    {
        // 100 MiB really sent: answered 413 or the connection is closed.
        let mut s = connect(&h.sock).unwrap();
        let params: Vec<(&str, &[u8])> = vec![
            ("REQUEST_METHOD", b"POST"),
            ("DOCUMENT_URI", b"/update"),
            ("QUERY_STRING", b"id=1&bootid=x"),
            ("CONTENT_LENGTH", b"104857600"),
        ];
        let mut head = fcgi_bytes(&params, b"");
        head.truncate(head.len() - 8); // no end of stdin yet
        s.write_all(&head).unwrap();
        let chunk = record(5, 1, &vec![b'a'; 65528]);
        let mut sent = 0usize;
        while sent < 100 << 20 {
            if s.write_all(&chunk).is_err() {
                break;
            }
            sent += 65528;
        }
        if let Some(a) = read_answer(&mut s) {
            assert_eq!(a.status, 413, "{}", a.body);
        }
    }
    // Wrong methods.
    for (method, path) in [
        ("POST", "/bootstrap"),
        ("DELETE", "/finish"),
        ("GET", "/update"),
    ] {
        let a = fcgi_send(&h.sock, method, path, b"", b"", "")
            .unwrap()
            .unwrap();
        assert_eq!(a.status, 405, "{method} {path}: {}", a.body);
    }

    h.check_alive("hostile requests");
    let a = fcgi_get(&h.sock, "/bootstrap", b"net0=0c-c4-7a-00-00-01")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        fs::read(&db_path).unwrap(),
        before,
        "hostile input changed the database"
    );
    let rss_after = h.status_field("VmRSS");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
}

/// Malformed FastCGI records on the handler's socket: each connection is
/// closed (or answered), the handler stays up and serves the next request.
#[test]
fn malformed_fastcgi_records_close_the_connection_only() {
    let root = root_with_hosts("records", 20);
    let mut h = Handler::start(root.path(), &root.path().join("fcgi.sock"), &[]);
    let before = fs::read(root.path().join("known_hosts.json")).unwrap();
    let valid = fcgi_bytes(
        &[
            ("REQUEST_METHOD", b"GET"),
            ("DOCUMENT_URI", b"/bootstrap"),
            ("QUERY_STRING", b"net0=52-54-00-ee-00-01"),
        ],
        b"",
    );
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("version 2", {
            let mut v = valid.clone();
            v[0] = 2;
            v
        }),
        ("truncated header", valid[..5].to_vec()),
        ("truncated body", valid[..12].to_vec()),
        ("short BEGIN_REQUEST", record(1, 1, &[0, 1])),
        ("request id 0", record(1, 0, &[0, 1, 0, 0, 0, 0, 0, 0])),
        ("STDOUT from the web server", record(6, 1, b"x")),
        ("END_REQUEST from the web server", record(3, 1, &[0; 8])),
        ("unknown type", record(200, 1, b"x")),
        ("unknown role", record(1, 1, &[0, 9, 0, 0, 0, 0, 0, 0])),
        ("huge name length", {
            let mut v = record(1, 1, &[0, 1, 0, 0, 0, 0, 0, 0]);
            v.extend(record(4, 1, &[0xff, 0xff, 0xff, 0xff, 1, b'a', b'b']));
            v.extend(record(4, 1, &[]));
            v
        }),
        ("PARAMS over the limit", {
            let mut v = record(1, 1, &[0, 1, 0, 0, 0, 0, 0, 0]);
            let mut pair = Vec::new();
            nv_len(4, &mut pair);
            nv_len(65000, &mut pair);
            pair.extend_from_slice(b"JUNK");
            pair.extend(std::iter::repeat_n(b'x', 65000));
            for _ in 0..4 {
                v.extend(record(4, 1, &pair[..65000]));
            }
            v
        }),
        (
            "garbage",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect(),
        ),
    ];
    cases.push(("no data", Vec::new()));
    for (what, bytes) in &cases {
        let mut s = connect(&h.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        if let Some(a) = read_answer(&mut s) {
            assert!(
                a.status >= 400 || a.body.is_empty(),
                "{what}: answered {} {}",
                a.status,
                a.body
            );
        }
        h.check_alive(what);
        let a = fcgi_get(&h.sock, "/state", b"id=1").unwrap().unwrap();
        assert_eq!(a.status, 200, "after {what}: {}", a.body);
    }
    assert_eq!(
        fs::read(root.path().join("known_hosts.json")).unwrap(),
        before
    );
}

// ---------------------------------------------------------------- floods

/// More connections straight to the socket than `--max-connections`: the
/// surplus gets 503 with Retry-After, and threads and descriptors stay
/// bounded; once the flood is over, requests are served again.
#[test]
fn connection_flood_is_shed_with_503_and_bounded_threads() {
    let root = root_with_hosts("flood", 20);
    let max = 8;
    let mut h = Handler::start(
        root.path(),
        &root.path().join("fcgi.sock"),
        &["--max-connections", &max.to_string()],
    );
    // Idle connections that hold every slot.
    let mut idle = Vec::new();
    for _ in 0..max {
        idle.push(connect(&h.sock).unwrap());
    }
    std::thread::sleep(Duration::from_millis(200));
    // A flood of real requests beyond the limit.
    let mut flood = Vec::new();
    for _ in 0..300 {
        match connect(&h.sock) {
            Ok(mut s) => {
                let _ = s.write_all(&fcgi_bytes(
                    &[
                        ("REQUEST_METHOD", b"GET"),
                        ("DOCUMENT_URI", b"/state"),
                        ("QUERY_STRING", b"id=1"),
                    ],
                    b"",
                ));
                flood.push(s);
            }
            Err(_) => break,
        }
    }
    let threads = h.status_field("Threads");
    let fds = h.fds();
    let mut shed = 0;
    let mut closed = 0;
    for mut s in flood {
        match read_answer(&mut s) {
            Some(a) if a.status == 503 => {
                assert!(a.headers.contains("Retry-After"), "{}", a.headers);
                shed += 1;
            }
            // Served once a slot was free.
            Some(a) => assert_eq!(a.status, 200, "{}", a.body),
            None => closed += 1,
        }
    }
    assert!(shed > 0, "no 503 among {closed} closed connections");
    assert!(
        threads <= (max + 8) as u64,
        "{threads} threads for at most {max} connections"
    );
    assert!(fds < 200, "{fds} open descriptors during a flood of 300");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    h.check_alive("the flood");
    let a = fcgi_get(&h.sock, "/state", b"id=1").unwrap().unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    eprintln!("flood: {shed} answered 503, {closed} closed, {threads} threads, {fds} fds");
}

// ---------------------------------------------------------------- through nginx

/// The same hostile inputs through the real nginx: 4xx, nothing written.
/// Slow clients holding connections open do not stop other machines from
/// booting.
#[test]
fn hostile_http_through_nginx_gets_4xx_and_slow_clients_do_not_block() {
    let stack = Stack::start();
    let ok = stack.get("/bootstrap?net0=52-54-00-c0-00-01");
    assert_eq!(ok.status, 200);
    let before = stack.db_bytes();
    let long = "a".repeat(64 * 1024);
    let many = (0..10_000)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&");
    for path in [
        "/bootstrap",
        "/post-install",
        "/finish",
        "/state",
        "/update",
        "/hosts",
    ] {
        for q in [
            format!("net0={long}"),
            many.clone(),
            "serial=%ff%fe&net0=52-54-00-c0-00-02".to_string(),
            "serial=a%00b&net0=52-54-00-c0-00-02".to_string(),
        ] {
            let r = stack.get(&format!("{path}?{q}"));
            assert!(
                (400..500).contains(&r.status),
                "{path} (query of {} bytes): {}",
                q.len(),
                r.status
            );
        }
        // Raw invalid bytes in the request line.
        let r = stack.raw(
            format!("GET {path}?serial=\u{1}\u{7f}%FF\u{0} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert!(
            (400..500).contains(&r.status),
            "{path} raw bytes: {}",
            r.status
        );
    }
    // A 100 MiB body is refused by nginx before it reaches the handler.
    {
        let mut s = std::net::TcpStream::connect(stack.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST /update?id=1&bootid=x HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 104857600\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 413"),
            "{}",
            reply.lines().next().unwrap_or("")
        );
    }
    // Slow clients: 100 connections sending a header a byte at a time.
    let slow: Vec<_> = (0..100)
        .filter_map(|_| {
            let mut s = std::net::TcpStream::connect(stack.addr()).ok()?;
            s.write_all(b"GET /bootstrap?net0=52-54-00-c0-00-03 HTTP/1.1\r\nHo")
                .ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(slow.len(), 100);
    let start = Instant::now();
    for i in 0..20 {
        let r = stack.get(&format!("/bootstrap?net0=52-54-00-c1-00-{i:02x}"));
        assert_eq!(
            r.status, 200,
            "a machine was refused while slow clients hold connections"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(slow);
    // Only the 20 real machines were written.
    let hosts = stack.hosts();
    assert_eq!(hosts.len(), 21);
    assert!(before.len() < stack.db_bytes().len());
}

// ---------------------------------------------------------------- security

/// The bootid: 128 random bits in hex, new on every install boot, the old
/// one refused at once, used up by /finish; /state tells only the state.
#[test]
fn bootid_is_random_per_boot_and_used_up_by_finish() {
    let root = root_with_hosts("bootid", 30);
    // 20 install boots in a row: above the loop breaker's default.
    fs::write(
        root.path().join("kiwispray.json"),
        r#"{"max_install_boots": 100}"#,
    )
    .unwrap();
    let h = Handler::start(root.path(), &root.path().join("fcgi.sock"), &[]);
    // Host 10 is in state image1 (gen-hosts.sh).
    let query = b"net0=0c-c4-7a-00-00-0a&net1=ac-1f-6b-00-00-0a";
    let mut seen = HashSet::new();
    let mut last = String::new();
    for _ in 0..20 {
        let a = fcgi_get(&h.sock, "/bootstrap", query).unwrap().unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let db = load_db(root.path());
        let bootid = db.runtime(10).bootid.clone().expect("a bootid");
        assert_eq!(bootid.len(), 32);
        assert!(bootid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(a.body.contains(&bootid), "the script carries the bootid");
        assert!(seen.insert(bootid.clone()), "bootid repeated");
        last = bootid;
    }
    // Roughly half of 128 bits differ between two bootids.
    let bits: Vec<u32> = seen
        .iter()
        .map(|b| {
            let x = u128::from_str_radix(b, 16).unwrap();
            let y = u128::from_str_radix(&last, 16).unwrap();
            (x ^ y).count_ones()
        })
        .filter(|d| *d > 0)
        .collect();
    let mean = bits.iter().sum::<u32>() as f64 / bits.len() as f64;
    assert!((40.0..88.0).contains(&mean), "mean Hamming distance {mean}");
    // An earlier bootid is refused; so is a guess of the right length.
    let old = seen.iter().find(|b| **b != last).unwrap();
    for wrong in [
        old.as_str(),
        "00000000000000000000000000000000",
        &last[..31],
        "",
    ] {
        for path in ["/post-install", "/finish"] {
            let a = fcgi_get(&h.sock, path, format!("id=10&bootid={wrong}").as_bytes())
                .unwrap()
                .unwrap();
            assert!(
                a.status == 403 || a.status == 400,
                "{path} with bootid {wrong:?}: {} {}",
                a.status,
                a.body
            );
        }
    }
    let a = fcgi_get(
        &h.sock,
        "/post-install",
        format!("id=10&bootid={last}").as_bytes(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let a = fcgi_get(
        &h.sock,
        "/finish",
        format!("id=10&bootid={last}").as_bytes(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(load_db(root.path()).runtime(10).bootid, None);
    // Used up: neither /finish nor /post-install accepts it again.
    for path in ["/finish", "/post-install"] {
        let a = fcgi_get(&h.sock, path, format!("id=10&bootid={last}").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(a.status, 409, "{path} after /finish: {}", a.body);
    }
    // /state reveals the state chain and nothing else.
    let a = fcgi_get(&h.sock, "/state", b"id=2").unwrap().unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "finished\n");
    let a = fcgi_get(&h.sock, "/state", b"id=10").unwrap().unwrap();
    assert_eq!(a.body, "finished\n");
}

/// Metadata and hostnames written through `@x|shell@` reach the shell as
/// one word, whatever they contain.
#[test]
fn shell_filtered_values_cannot_inject_commands() {
    let root = root_with_hosts("shell", 10);
    let evil = "x'; touch /tmp/kiwispray-pwned; echo '$(id)`id`\"\\\n;";
    let out = cli(root.path(), &["set", "10", "--hostname", "host-10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        root.path(),
        &[
            "set",
            "10",
            "--meta",
            &serde_json::json!({ "note": evil }).to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(
        root.path().join("templates/post_install.tmpl"),
        "#!/bin/sh\nnote=@metadata.note|shell@\nmeta=@metadata|shell@\nprintf '%s' \"$note\" > \"$1/note\"\nprintf '%s' \"$meta\" > \"$1/meta\"\n",
    )
    .unwrap();
    let h = Handler::start(root.path(), &root.path().join("fcgi.sock"), &[]);
    fcgi_get(&h.sock, "/bootstrap", b"net0=0c-c4-7a-00-00-0a").unwrap();
    let bootid = load_db(root.path()).runtime(10).bootid.clone().unwrap();
    let a = fcgi_get(
        &h.sock,
        "/post-install",
        format!("id=10&bootid={bootid}").as_bytes(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let out_dir = root.path().join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let script = root.path().join("post.sh");
    fs::write(&script, &a.body).unwrap();
    let run = Command::new("sh")
        .arg(&script)
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(fs::read_to_string(out_dir.join("note")).unwrap(), evil);
    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out_dir.join("meta")).unwrap()).unwrap();
    assert_eq!(meta["note"], evil);
    assert!(!Path::new("/tmp/kiwispray-pwned").exists());
}
