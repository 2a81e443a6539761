//! A connection flood through the real web server (nginx with the shipped
//! `nginx/kiwispray.conf`, or lighttpd with `lighttpd/kiwispray.conf` when
//! `KIWISPRAY_WEB=lighttpd`) in front of the real `kiwispray-fcgi`, while
//! machines keep booting.
//!
//! For 10 s, 2,000 client connections: 1,000 that send nothing, 500 that
//! trickle a request header one byte at a time, and 500 busy keep-alive
//! clients that ask for `/bootstrap` as fast as they are answered. Beside
//! them a few "normal" clients make the requests of booting machines on
//! fresh connections and, like iPXE, retry a 503 after its `Retry-After`.
//! The handler runs with `max_connections` 64, as the RPM installs it.
//!
//! It pins the bug where the web server answered 502 (without
//! `Retry-After`) to most of the flood and to a third of the normal
//! requests, because the handler closed connections beyond its limit: now
//! no client gets a 502, every 503 carries `Retry-After`, at least 99% of
//! the normal requests are served (at once or on retry), and the handler
//! never runs more threads than `max_connections` plus a few.
//!
//! The flood client is plain std threads and sockets on 127.0.0.1, bounded
//! in count and in time. Needs nginx or lighttpd (`make deps-test`) and
//! about 2,100 file descriptors.

mod common;

use common::{Options, Stack};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(10);
/// Connections that connect and send nothing.
const IDLE: usize = 1000;
/// Connections that send a request header one byte at a time.
const TRICKLE: usize = 500;
/// Keep-alive clients that send `/bootstrap` as fast as they are answered.
const BUSY: usize = 500;
/// A normal request (a booting machine) starts this often: 160 in the flood.
const NORMAL_GAP: Duration = Duration::from_millis(62);
/// Attempts of one normal request (the first and the retries).
const NORMAL_ATTEMPTS: usize = 6;
/// The handler's connection limit, as the RPM installs it.
const MAX_CONNECTIONS: u64 = 64;
/// Threads of the handler beyond `MAX_CONNECTIONS`: the main thread, the
/// two overload threads and the database writer, with room to spare.
const EXTRA_THREADS: u64 = 8;

/// One parsed HTTP response.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    /// The server closes the connection after this answer.
    close: bool,
}

/// Reads one response from a keep-alive connection. `Ok(None)`: the
/// connection was closed before any byte of a response.
fn read_answer(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Answer>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = None;
    let mut retry_after = None;
    let mut close = false;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("end of stream in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.parse::<usize>().ok(),
            "retry-after" => retry_after = Some(v.parse().unwrap_or(u64::MAX)),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(format!("chunk size {line:?}: {e}")))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut body = vec![0; n];
        r.read_exact(&mut body)?;
    } else {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        close = true;
    }
    Ok(Some(Answer {
        status,
        retry_after,
        close,
    }))
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Responses by status, to the flood's busy clients.
    flood: Mutex<BTreeMap<u16, u64>>,
    /// Responses by status, to every attempt of a normal request.
    normal: Mutex<BTreeMap<u16, u64>>,
    /// 503s without a usable Retry-After (flood and normal).
    no_retry_after: AtomicU64,
    /// Busy-client requests that ended in a connection error.
    flood_errors: AtomicU64,
    /// Normal requests served on the first attempt, after retries, never.
    served_first: AtomicU64,
    served_retry: AtomicU64,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn count(map: &Mutex<BTreeMap<u16, u64>>, status: u16) {
        *map.lock().unwrap().entry(status).or_default() += 1;
    }

    fn note(&self, map: &Mutex<BTreeMap<u16, u64>>, a: &Answer) {
        Tally::count(map, a.status);
        if a.status == 503 && !a.retry_after.is_some_and(|s| (1..=60).contains(&s)) {
            self.no_retry_after.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sum(map: &Mutex<BTreeMap<u16, u64>>, pred: impl Fn(u16) -> bool) -> u64 {
        map.lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| pred(**s))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The `kiwispray-fcgi` process that `serve.sh` (pid `parent`) started.
fn handler_pid(parent: u32) -> u32 {
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm.ends_with("(kiwispray-fcgi") && ppid == Some(parent) {
            return pid;
        }
    }
    panic!("no kiwispray-fcgi under serve.sh (pid {parent})");
}

fn threads_of(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit on open files of this process (its children inherit it).
fn open_files_limit() -> u64 {
    fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// A MAC in iPXE's `hexhyp` spelling for client `n` of group `group`.
fn mac(group: u8, n: u32) -> String {
    let b = n.to_be_bytes();
    format!(
        "02-{group:02x}-{:02x}-{:02x}-{:02x}-{:02x}",
        b[0], b[1], b[2], b[3]
    )
}

/// One normal request on a fresh connection, as a booting machine makes it:
/// a 503 is retried after its Retry-After, up to `NORMAL_ATTEMPTS` times.
fn normal_request(addr: SocketAddr, target: &str, tally: &Tally) {
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nUser-Agent: iPXE/1.21.1\r\n\
         Connection: close\r\n\r\n"
    );
    let mut why = String::new();
    for attempt in 0..NORMAL_ATTEMPTS {
        let answer = connect(addr).and_then(|mut s| {
            s.write_all(req.as_bytes())?;
            read_answer(&mut BufReader::new(s))
        });
        match answer {
            Ok(Some(a)) => {
                tally.note(&tally.normal, &a);
                if a.status == 200 {
                    let served = if attempt == 0 {
                        &tally.served_first
                    } else {
                        &tally.served_retry
                    };
                    served.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                why = format!("{target}: {} on attempt {}", a.status, attempt + 1);
                match a.retry_after {
                    // As iPXE does; more than 5 s would not be a busy
                    // handler but a misconfiguration.
                    Some(s) if a.status == 503 && (1..=5).contains(&s) => {
                        thread::sleep(Duration::from_secs(s))
                    }
                    _ => break,
                }
            }
            Ok(None) => {
                why = format!("{target}: closed without an answer");
                break;
            }
            Err(e) => {
                why = format!("{target}: {e}");
                break;
            }
        }
    }
    tally.failed.lock().unwrap().push(why);
}

/// A busy keep-alive client: `/bootstrap` again and again until `stop`.
fn busy_client(addr: SocketAddr, n: u32, stop: &AtomicBool, tally: &Tally) {
    let req = format!(
        "GET /bootstrap?net0={} HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n",
        mac(0xb0, n)
    );
    while !stop.load(Ordering::Relaxed) {
        let Ok(s) = connect(addr) else {
            tally.flood_errors.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut answered = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if w.write_all(req.as_bytes()).is_err() {
                // The server closed an idle keep-alive connection.
                if answered == 0 {
                    tally.flood_errors.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            match read_answer(&mut r) {
                Ok(Some(a)) => {
                    answered += 1;
                    tally.note(&tally.flood, &a);
                    if a.close {
                        break;
                    }
                }
                // Closed between two requests: a keep-alive race, not an
                // error, unless the connection never answered at all.
                Ok(None) => {
                    if answered == 0 {
                        tally.flood_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Err(_) => {
                    tally.flood_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Connections that trickle a request header, one byte per round.
fn trickle(addr: SocketAddr, count: usize, stop: &AtomicBool) -> usize {
    let line = b"GET /bootstrap?net0=02-7c-00-00-00-01 HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n";
    let filler = b"X-Slow: 1\r\n";
    let mut socks: Vec<TcpStream> = (0..count).filter_map(|_| connect(addr).ok()).collect();
    let opened = socks.len();
    for s in &mut socks {
        let _ = s.write_all(line);
    }
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        for s in &mut socks {
            let _ = s.write_all(&filler[i % filler.len()..][..1]);
        }
        i += 1;
        thread::sleep(Duration::from_millis(100));
    }
    opened
}

fn spawn_small<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(f)
        .expect("start a client thread")
}

/// Lines of the web server's error log that tell of a connection to the
/// handler gone wrong (the bug left 140,000 "reset by peer" in nginx's).
fn upstream_errors(stack: &Stack) -> Vec<String> {
    const SIGNS: &[&str] = &[
        "reset by peer",
        "prematurely closed",
        "no live upstreams",
        "connect() to",
        "Broken pipe",
        "overloaded",
        "establishing connection failed",
    ];
    stack
        .nginx_error_log()
        .lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}

/// A stack whose handler serves at most `max` connections at once.
fn stack_with_max_connections(max: u64) -> Stack {
    Stack::start_with(Options {
        prepare: Some(Box::new(move |root| {
            fs::write(
                root.join("kiwispray.json"),
                format!("{{\"max_connections\": {max}}}\n"),
            )
            .unwrap();
        })),
        ..Options::default()
    })
}

#[test]
fn flood_never_gives_502() {
    let limit = open_files_limit();
    assert!(
        limit >= 4096,
        "the flood needs about 2,100 open files (and the web server as many); \
         the limit is {limit}: raise it with `ulimit -n 4096`"
    );
    let mut stack = stack_with_max_connections(MAX_CONNECTIONS);
    let handler = handler_pid(stack.pid().unwrap());
    let addr: SocketAddr = stack.addr().parse().unwrap();
    // A known machine for the normal clients, and each busy client's
    // machine registered once, so the flood reads and does not grow the
    // database.
    let known = mac(0xa0, 1);
    assert_eq!(
        stack.get_as_pxe(&format!("/bootstrap?net0={known}")).status,
        200
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));

    // The handler's threads, sampled every 5 ms until the end.
    let sampler = {
        let done = done.clone();
        spawn_small(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(threads_of(handler).unwrap_or(0));
                thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };

    let started = Instant::now();
    let idle: Vec<TcpStream> = (0..IDLE).filter_map(|_| connect(addr).ok()).collect();
    let tricklers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            spawn_small(move || trickle(addr, TRICKLE / 4, &stop))
        })
        .collect();
    let busy: Vec<_> = (0..BUSY as u32)
        .map(|n| {
            let (stop, tally) = (stop.clone(), tally.clone());
            spawn_small(move || busy_client(addr, n, &stop, &tally))
        })
        .collect();
    // The normal requests: one started every NORMAL_GAP, each on its own
    // thread, so that a request waiting to retry does not delay the next.
    let normal = {
        let (stop, tally, known) = (stop.clone(), tally.clone(), known.clone());
        spawn_small(move || {
            let mut requests = Vec::new();
            let mut made = 0u32;
            let first = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let target = match made % 3 {
                    // A new machine registers.
                    0 => format!("/bootstrap?net0={}", mac(0xc0, made)),
                    // A known machine boots.
                    1 => format!("/bootstrap?net0={known}"),
                    // Its state is asked for.
                    _ => "/state?id=1".to_string(),
                };
                let tally = tally.clone();
                requests.push(spawn_small(move || normal_request(addr, &target, &tally)));
                made += 1;
                // On a schedule, however long starting a thread takes.
                let next = first + NORMAL_GAP * made;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for r in requests {
                r.join().unwrap();
            }
            made
        })
    };

    let flood_end = started + FLOOD;
    while Instant::now() < flood_end {
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let trickled: usize = tricklers.into_iter().map(|t| t.join().unwrap()).sum();
    for b in busy {
        b.join().unwrap();
    }
    let normal_made = normal.join().unwrap();
    let idle_open = idle.len();
    drop(idle);
    done.store(true, Ordering::Relaxed);
    let peak_threads = sampler.join().unwrap();
    let elapsed = started.elapsed();

    let flood = tally.flood.lock().unwrap().clone();
    let normal_statuses = tally.normal.lock().unwrap().clone();
    let served_first = tally.served_first.load(Ordering::Relaxed);
    let served_retry = tally.served_retry.load(Ordering::Relaxed);
    let failed = tally.failed.lock().unwrap().clone();
    let served = served_first + served_retry;
    let total = normal_made as u64;
    let flood_answers: u64 = flood.values().sum();
    eprintln!(
        "flood through {} for {elapsed:.1?}: {idle_open} idle and {trickled} trickling \
         connections; busy clients got {flood:?} ({} connection errors); normal requests: \
         {served} of {total} served ({served_first} at once, {served_retry} on retry), \
         attempts answered {normal_statuses:?}; {} 503s without Retry-After; handler \
         threads peaked at {peak_threads} (max_connections {MAX_CONNECTIONS})",
        common::web(),
        tally.flood_errors.load(Ordering::Relaxed),
        tally.no_retry_after.load(Ordering::Relaxed),
    );

    // The flood was real.
    assert!(
        idle_open >= IDLE * 9 / 10,
        "only {idle_open} idle connections opened"
    );
    assert!(
        trickled >= TRICKLE * 9 / 10,
        "only {trickled} trickling connections opened"
    );
    assert!(
        flood_answers >= 1000,
        "the busy clients got only {flood_answers} answers"
    );
    assert!(total >= 100, "only {total} normal requests were made");
    // No 502 (nor any other 5xx but 503) while the handler is up.
    let bad = |s: u16| s >= 500 && s != 503;
    assert_eq!(
        Tally::sum(&tally.flood, bad) + Tally::sum(&tally.normal, bad),
        0,
        "5xx other than 503: flood {flood:?}, normal {normal_statuses:?}"
    );
    // Every 503 says when to come back.
    assert_eq!(
        tally.no_retry_after.load(Ordering::Relaxed),
        0,
        "503 without Retry-After"
    );
    // At least 99% of the normal requests served, at once or on retry.
    assert!(
        served * 100 >= total * 99,
        "only {served} of {total} normal requests served: {failed:?}"
    );
    // Threads bounded by the connection limit.
    assert!(
        peak_threads <= MAX_CONNECTIONS + EXTRA_THREADS,
        "{peak_threads} handler threads for max_connections {MAX_CONNECTIONS}"
    );
    let errors = upstream_errors(&stack);
    assert!(
        errors.is_empty(),
        "{} upstream errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // The stack is up and serves as before.
    assert!(stack.running(), "the stack died:\n{}", stack.serve_log());
    assert_eq!(
        stack.get_as_pxe(&format!("/bootstrap?net0={known}")).status,
        200
    );
    assert_eq!(stack.get("/state?id=1").status, 200);
}

/// A handler that cannot answer for a while (every slot waits for the
/// database lock, held here as a slow `kiwispray-hosts` or disk would):
/// the requests beyond its slots get 503 with Retry-After through the web
/// server, never 502, and are served on retry once it answers again.
#[test]
fn stuck_handler_answers_503_with_retry_after_not_502() {
    use fs2::FileExt;
    const MAX: u64 = 8;
    const REQUESTS: u32 = 40;
    const BURST: usize = 1100;
    let mut stack = stack_with_max_connections(MAX);
    let handler = handler_pid(stack.pid().unwrap());
    let addr: SocketAddr = stack.addr().parse().unwrap();
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(stack.root.join(".known_hosts.json.lock"))
        .unwrap();
    lock.lock_exclusive().unwrap();
    let tally = Arc::new(Tally::default());
    // New machines registering: each registration waits for the lock.
    let requests: Vec<_> = (0..REQUESTS)
        .map(|n| {
            let tally = tally.clone();
            spawn_small(move || {
                normal_request(addr, &format!("/bootstrap?net0={}", mac(0xd0, n)), &tally)
            })
        })
        .collect();
    // Meanwhile a burst of more requests than nginx passes on (1024): each
    // is answered, served or 503 with Retry-After, none 502 or closed.
    thread::sleep(Duration::from_millis(300));
    let burst = {
        let tally = tally.clone();
        spawn_small(move || {
            let req =
                b"GET /state?id=1 HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nConnection: close\r\n\r\n";
            let socks: Vec<TcpStream> = (0..BURST)
                .filter_map(|_| {
                    let mut s = connect(addr).ok()?;
                    s.write_all(req).ok()?;
                    Some(s)
                })
                .collect();
            let sent = socks.len();
            let mut unanswered = 0;
            for s in socks {
                match read_answer(&mut BufReader::new(s)) {
                    Ok(Some(a)) => tally.note(&tally.flood, &a),
                    _ => unanswered += 1,
                }
            }
            (sent, unanswered)
        })
    };
    let mut peak_threads = 0;
    let release = Instant::now() + Duration::from_secs(3);
    while Instant::now() < release {
        peak_threads = peak_threads.max(threads_of(handler).unwrap_or(0));
        thread::sleep(Duration::from_millis(5));
    }
    lock.unlock().unwrap();
    for r in requests {
        r.join().unwrap();
    }
    let (burst_sent, burst_unanswered) = burst.join().unwrap();
    let burst_statuses = tally.flood.lock().unwrap().clone();
    let statuses = tally.normal.lock().unwrap().clone();
    let served =
        tally.served_first.load(Ordering::Relaxed) + tally.served_retry.load(Ordering::Relaxed);
    let failed = tally.failed.lock().unwrap().clone();
    eprintln!(
        "stuck handler behind {}: {served} of {REQUESTS} registrations served ({} on retry); \
         attempts answered {statuses:?}; a burst of {burst_sent} got {burst_statuses:?} \
         ({burst_unanswered} unanswered); handler threads peaked at {peak_threads} \
         (max_connections {MAX})",
        common::web(),
        tally.served_retry.load(Ordering::Relaxed),
    );
    let bad = |s: u16| s >= 500 && s != 503;
    assert_eq!(
        Tally::sum(&tally.normal, bad) + Tally::sum(&tally.flood, bad),
        0,
        "5xx other than 503: {statuses:?}, burst {burst_statuses:?}"
    );
    assert!(
        burst_sent >= BURST * 9 / 10,
        "only {burst_sent} of the burst connected"
    );
    assert_eq!(
        burst_unanswered, 0,
        "burst requests closed without an answer"
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "no request was refused while every slot was stuck: {statuses:?}"
    );
    assert_eq!(
        tally.no_retry_after.load(Ordering::Relaxed),
        0,
        "503 without Retry-After"
    );
    assert_eq!(
        served, REQUESTS as u64,
        "not all served on retry: {failed:?}"
    );
    assert!(
        peak_threads <= MAX + EXTRA_THREADS,
        "{peak_threads} handler threads for max_connections {MAX}"
    );
    assert_eq!(
        stack.hosts().len(),
        REQUESTS as usize,
        "each machine registered once"
    );
    let errors = upstream_errors(&stack);
    assert!(
        errors.is_empty(),
        "{} upstream errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(stack.running(), "the stack died:\n{}", stack.serve_log());
}
