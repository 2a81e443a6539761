//! The read-only TFTP front end of the boot service, for firmware that
//! speaks only TFTP (Debian's signed GRUB under Secure Boot). A small
//! synchronous server on `std::net::UdpSocket`: one listener thread per
//! address it is told to bind, and one thread per transfer on its own
//! ephemeral UDP socket bound to the listen IP (the transfer's TID).
//!
//! The namespace (a leading `/` is optional):
//! - `ks/<endpoint>?<query>`: answered by [`Service`] exactly as over
//!   FastCGI (method GET, path `/<endpoint>`); a 200 body is the file,
//!   another status a TFTP ERROR with the first line of the body;
//! - `images/<...>`: files under `<root>/images/`;
//! - anything else: files under `<root>/boot/` (symlinks followed).
//!
//! Hostile-input rules are those of the web server: `..`, hidden
//! components, backslashes and control characters are refused, only
//! regular files are served, and the secrets (`known_hosts.json`,
//! `bmc-credentials.json`, templates (`*.tmpl`, `*.grub`), anything outside `boot/` and
//! `images/`) never are. Only octet mode is served; netascii is refused
//! with a reason. Bounds: at most [`Limits::max_transfers`] transfers at
//! once, retransmission after the (negotiated) timeout, at most
//! [`Limits::tries`] sends of each packet. Files are read block by block
//! with positioned reads; dynamic answers are held in memory. Each
//! transfer logs one line on stderr, with any `bootid=` value redacted.

pub mod packet;

use crate::api::{Request, Service};
use packet::Packet;
use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The dynamic endpoints reachable under `ks/`: those the web server
/// passes to the handler from any client.
pub const ENDPOINTS: &[&str] = &["bootstrap", "post-install", "finish", "fail", "state"];

/// The bounds of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most transfers at once; more requests get ERROR 0 "busy, try again".
    pub max_transfers: usize,
    /// Largest block size granted (RFC 2348 allows up to 65464).
    pub max_blksize: u16,
    /// Time before a packet is sent again, unless the client negotiated one.
    pub timeout: Duration,
    /// Sends of one packet before the transfer is given up.
    pub tries: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_transfers: 64,
            max_blksize: 1468,
            timeout: Duration::from_secs(1),
            tries: 5,
        }
    }
}

/// One address to serve on, and the web server the machines reach
/// (`HOST:PORT`, what templates see as the server).
#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: SocketAddr,
    pub http: String,
}

/// Parses `ADDR[:PORT]` (`10.0.0.1`, `10.0.0.1:6969`, `::1`, `[::1]:69`);
/// the port defaults to 69. Only IP addresses: the server binds exactly
/// where it is told.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("needs an IP address: the TFTP front end binds only where it is told".into());
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 69))
        .map_err(|_| format!("{s:?} is not an IP address with an optional port"))
}

/// `HOST:PORT` of an address, with brackets for IPv6.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The transfers running now, by peer: the count is the bound, and a
/// request repeated by a peer whose transfer runs is not started twice.
type Active = Arc<Mutex<HashSet<SocketAddr>>>;

/// Binds every address (all or none), calls `bound`, and serves them until
/// the process ends. Returns only on a bind error.
pub fn serve(
    service: Arc<Service>,
    listen: Vec<Listen>,
    limits: Limits,
    bound: impl FnOnce(),
) -> Result<(), String> {
    let mut sockets = Vec::new();
    for l in &listen {
        let s = UdpSocket::bind(l.addr).map_err(|e| format!("cannot bind UDP {}: {e}", l.addr))?;
        sockets.push((s, l.clone()));
    }
    bound();
    let active: Active = Arc::new(Mutex::new(HashSet::new()));
    let mut threads = Vec::new();
    for (socket, l) in sockets {
        let (service, limits, active) = (service.clone(), limits.clone(), active.clone());
        let t = std::thread::Builder::new()
            .name(format!("tftp {}", l.addr))
            .spawn(move || listen_loop(&service, socket, &l, &limits, &active))
            .map_err(|e| format!("cannot start the TFTP listener: {e}"))?;
        threads.push(t);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn listen_loop(
    service: &Arc<Service>,
    socket: UdpSocket,
    l: &Listen,
    limits: &Limits,
    active: &Active,
) {
    // Large enough for any request this server accepts; a longer one is
    // cut by the kernel, and then no longer ends in NUL and is refused.
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log(&format!("receive on {} failed: {e}", l.addr));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let started = Instant::now();
        let refuse = |code: u16, reason: &str, name: &str| {
            let _ = socket.send_to(&packet::error(code, reason), peer);
            log_transfer(peer, name, 0, started, &format!("refused: {reason}"));
        };
        let req = match packet::parse(&buf[..n]) {
            Ok(Packet::Read(r)) => r,
            Ok(Packet::Write(r)) => {
                refuse(packet::ERR_ACCESS, "read-only", &r.filename);
                continue;
            }
            // Never answer an ERROR with an ERROR.
            Ok(Packet::Error { .. }) => continue,
            Ok(_) => {
                refuse(packet::ERR_ILLEGAL, "expected a read request", "-");
                continue;
            }
            Err(reason) => {
                refuse(packet::ERR_ILLEGAL, &reason, "-");
                continue;
            }
        };
        {
            let mut set = lock(active);
            if set.contains(&peer) {
                // The client repeated its request; the running transfer
                // retransmits on its own.
                continue;
            }
            if set.len() >= limits.max_transfers {
                drop(set);
                refuse(packet::ERR_UNDEFINED, "busy, try again", &req.filename);
                continue;
            }
            set.insert(peer);
        }
        let guard = Slot(active.clone(), peer);
        let (service, limits, http) = (service.clone(), limits.clone(), l.http.clone());
        let local = l.addr.ip();
        let spawned = std::thread::Builder::new()
            .name("tftp transfer".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    transfer(&service, local, &http, peer, &req, &limits)
                }));
                // The place is free before the line is logged.
                drop(guard);
                let (bytes, outcome) = outcome.unwrap_or((0, "internal error".into()));
                log_transfer(peer, &req.filename, bytes, started, &outcome);
            });
        if spawned.is_err() {
            refuse(packet::ERR_UNDEFINED, "busy, try again", "-");
        }
    }
}

/// Frees a transfer's place when the transfer ends, however it ends.
struct Slot(Active, SocketAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a request names, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `ks/<endpoint>?<query>`.
    Dynamic { endpoint: String, query: String },
    /// A file below the deployment root (`boot/...` or `images/...`).
    File(PathBuf),
}

/// Why a request is not served: a TFTP error code and a reason.
pub type Refusal = (u16, String);

/// Maps a requested name to what answers it, refusing hostile names.
/// Pure: nothing is opened.
pub fn map_name(name: &str) -> Result<Target, Refusal> {
    let access = |r: &str| Err((packet::ERR_ACCESS, r.to_string()));
    if name.contains('\\') {
        return access("backslashes are not allowed");
    }
    if name.chars().any(char::is_control) {
        return access("control characters are not allowed");
    }
    let name = name.strip_prefix('/').unwrap_or(name);
    if let Some(rest) = name.strip_prefix("ks/") {
        let (endpoint, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !ENDPOINTS.contains(&endpoint) {
            return Err((packet::ERR_NOT_FOUND, format!("no endpoint ks/{endpoint}")));
        }
        return Ok(Target::Dynamic {
            endpoint: endpoint.to_string(),
            query: query.to_string(),
        });
    }
    let mut parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err((packet::ERR_NOT_FOUND, "no file name".into()));
    }
    for p in &parts {
        if *p == ".." || *p == "." {
            return access("'..' and '.' are not allowed");
        }
        if p.starts_with('.') {
            return access("hidden files are not served");
        }
    }
    let last = parts[parts.len() - 1];
    // Templates of any flavour (`host.tmpl`, `host.grub`) are rendered by
    // the service, never served as they are.
    let template = last
        .rsplit_once('.')
        .is_some_and(|(_, ext)| crate::flavour::by_extension(ext).is_some());
    if template || last == "bmc-credentials.json" || last == "known_hosts.json" {
        return access("this file is not served");
    }
    let base = if parts[0] == "images" {
        parts.remove(0);
        if parts.is_empty() {
            return Err((packet::ERR_NOT_FOUND, "no file name".into()));
        }
        "images"
    } else {
        "boot"
    };
    let mut path = PathBuf::from(base);
    path.extend(parts);
    Ok(Target::File(path))
}

/// The content of a transfer.
enum Source {
    Memory(Vec<u8>),
    File(File, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Memory(b) => b.len() as u64,
            Source::File(_, n) => *n,
        }
    }

    /// Block `index` (from 0) of `blksize` bytes, shorter at the end.
    fn block(&self, index: u64, blksize: u16, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let start = index * u64::from(blksize);
        let end = (start + u64::from(blksize)).min(self.size());
        let len = end.saturating_sub(start) as usize;
        buf.clear();
        match self {
            Source::Memory(b) => {
                if len > 0 {
                    buf.extend_from_slice(&b[start as usize..end as usize]);
                }
            }
            Source::File(f, _) => {
                buf.resize(len, 0);
                f.read_exact_at(buf, start)?;
            }
        }
        Ok(())
    }
}

/// Opens what a request names: a regular file (symlinks followed), or the
/// service's answer.
fn open(
    service: &Service,
    target: &Target,
    local: IpAddr,
    http: &str,
    peer: SocketAddr,
) -> Result<Source, Refusal> {
    match target {
        Target::File(rel) => {
            let path = service.config.root.join(rel);
            open_file(&path)
        }
        Target::Dynamic { endpoint, query } => {
            let port = http
                .rsplit_once(':')
                .map(|(_, p)| p)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .unwrap_or("80");
            let req = Request {
                method: "GET".into(),
                path: format!("/{endpoint}"),
                query: query.clone(),
                remote: peer.ip().to_canonical().to_string(),
                host_header: http.to_string(),
                server_addr: local.to_string(),
                server_port: port.to_string(),
                ..Request::default()
            };
            let r = crate::fcgi::answer(service, &req);
            if r.status == 200 {
                return Ok(Source::Memory(r.body));
            }
            let code = match r.status {
                404 => packet::ERR_NOT_FOUND,
                403 => packet::ERR_ACCESS,
                _ => packet::ERR_UNDEFINED,
            };
            Err((code, error_line(&r.body)))
        }
    }
}

/// The first line of an error body, a leading `# ` removed, printable, at
/// most 200 bytes.
pub fn error_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("# ").unwrap_or(first);
    packet::printable(first, 200)
}

fn open_file(path: &Path) -> Result<Source, Refusal> {
    let not_found = || (packet::ERR_NOT_FOUND, "file not found".to_string());
    // Looked at before opening, so that a FIFO or device is never opened.
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::PermissionDenied => (packet::ERR_ACCESS, "permission denied".to_string()),
        _ => not_found(),
    })?;
    if !meta.is_file() {
        return Err(not_found());
    }
    let file = File::open(path).map_err(|_| (packet::ERR_ACCESS, "cannot open the file".into()))?;
    let meta = file.metadata().map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    Ok(Source::File(file, meta.len()))
}

/// Serves one read request from a fresh socket; returns the bytes sent and
/// the outcome for the log.
fn transfer(
    service: &Service,
    local: IpAddr,
    http: &str,
    peer: SocketAddr,
    req: &packet::Request,
    limits: &Limits,
) -> (u64, String) {
    let socket = match UdpSocket::bind(SocketAddr::new(local, 0)) {
        Ok(s) => s,
        Err(e) => return (0, format!("cannot bind a transfer socket: {e}")),
    };
    let fail = |code: u16, reason: String| {
        let _ = socket.send_to(&packet::error(code, &reason), peer);
        (0, format!("refused: {reason}"))
    };
    if req.mode != "octet" {
        return fail(
            packet::ERR_UNDEFINED,
            format!("{} mode is not served; ask for octet", req.mode),
        );
    }
    let mut negotiated = match packet::negotiate(req, limits.max_blksize) {
        Ok(n) => n,
        Err(reason) => return fail(packet::ERR_OPTIONS, reason),
    };
    let target = match map_name(&req.filename) {
        Ok(t) => t,
        Err((code, reason)) => return fail(code, reason),
    };
    let source = match open(service, &target, local, http, peer) {
        Ok(s) => s,
        Err((code, reason)) => return fail(code, reason),
    };
    if source.size() == 0 {
        // RFC 2349 lets the server leave tsize out; curl takes "tsize 0"
        // in an OACK for an error, so an empty file gets no tsize.
        negotiated.acknowledged.retain(|o| *o != "tsize");
    }
    let timeout = negotiated
        .timeout
        .map_or(limits.timeout, |s| Duration::from_secs(s.into()));
    Lockstep {
        socket: &socket,
        peer,
        timeout,
        tries: limits.tries.max(1),
    }
    .run(&source, &negotiated)
}

/// The DATA/ACK exchange of one transfer.
struct Lockstep<'a> {
    socket: &'a UdpSocket,
    peer: SocketAddr,
    timeout: Duration,
    tries: u32,
}

impl Lockstep<'_> {
    fn run(&self, source: &Source, n: &packet::Negotiated) -> (u64, String) {
        let size = source.size();
        let bs = u64::from(n.blksize);
        // The last block is shorter than blksize: empty when the size is a
        // multiple of it. Blocks are numbered from 1; 0 is the OACK.
        let last = size / bs + 1;
        let mut sent_bytes = 0u64;
        let mut current: u64 = if n.acknowledged.is_empty() { 1 } else { 0 };
        let mut block = Vec::with_capacity(n.blksize.into());
        let mut out = if current == 0 {
            packet::oack(n, size)
        } else {
            Vec::new()
        };
        let mut buf = [0u8; 1024];
        loop {
            if current > 0 {
                if let Err(e) = source.block(current - 1, n.blksize, &mut block) {
                    let _ = self.socket.send_to(
                        &packet::error(packet::ERR_UNDEFINED, "cannot read the file"),
                        self.peer,
                    );
                    return (sent_bytes, format!("failed: read error {e}"));
                }
                out = packet::data(current as u16, &block);
            }
            // Send, and wait for the ACK of this packet, resending on timeout.
            let mut tries = 0;
            let acked = 'wait: loop {
                if tries == self.tries {
                    break 'wait false;
                }
                if self.socket.send_to(&out, self.peer).is_err() {
                    break 'wait false;
                }
                tries += 1;
                let deadline = Instant::now() + self.timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        continue 'wait;
                    }
                    let _ = self.socket.set_read_timeout(Some(left));
                    let (len, from) = match self.socket.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) =>
                        {
                            continue
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let parsed = packet::parse(&buf[..len]);
                    if from != self.peer {
                        if !matches!(parsed, Ok(Packet::Error { .. })) {
                            let _ = self.socket.send_to(
                                &packet::error(packet::ERR_UNKNOWN_TID, "unknown transfer ID"),
                                from,
                            );
                        }
                        continue;
                    }
                    match parsed {
                        Ok(Packet::Ack(b)) if b == current as u16 => break 'wait true,
                        // A duplicate or old ACK: sending again would
                        // double every later packet (sorcerer's apprentice).
                        Ok(Packet::Ack(_)) => continue,
                        Ok(Packet::Error { code, message }) => {
                            return (
                                sent_bytes,
                                format!("ended by the client: error {code} {message:?}"),
                            );
                        }
                        Ok(_) | Err(_) => {
                            let _ = self.socket.send_to(
                                &packet::error(packet::ERR_ILLEGAL, "expected an ACK"),
                                self.peer,
                            );
                            return (sent_bytes, "failed: the client sent no ACK".into());
                        }
                    }
                }
            };
            if !acked {
                let what = if current == 0 {
                    "OACK".to_string()
                } else {
                    format!("block {current}")
                };
                return (
                    sent_bytes,
                    format!(
                        "gave up: {what} not acknowledged after {} tries",
                        self.tries
                    ),
                );
            }
            if current > 0 {
                sent_bytes += block.len() as u64;
            }
            if current == last {
                return (sent_bytes, "sent".into());
            }
            current += 1;
        }
    }
}

/// Redacts the value of any `bootid=` in a name.
pub fn redact(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find("bootid=") {
        let after = i + "bootid=".len();
        out.push_str(&rest[..after]);
        out.push_str("<redacted>");
        rest = &rest[after..];
        rest = rest.find('&').map_or("", |j| &rest[j..]);
    }
    out.push_str(rest);
    out
}

fn log_transfer(peer: SocketAddr, name: &str, bytes: u64, started: Instant, outcome: &str) {
    log(&format!(
        "tftp {peer} {:?} {bytes} bytes {:.3} s: {outcome}",
        packet::printable(&redact(name), 600),
        started.elapsed().as_secs_f64()
    ));
}

fn log(msg: &str) {
    crate::api::log(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_into_boot_and_images() {
        assert_eq!(
            map_name("/grub/grub.cfg").unwrap(),
            Target::File("boot/grub/grub.cfg".into())
        );
        assert_eq!(
            map_name("shimx64.efi").unwrap(),
            Target::File("boot/shimx64.efi".into())
        );
        assert_eq!(
            map_name("images/s/initrd").unwrap(),
            Target::File("images/s/initrd".into())
        );
        assert_eq!(
            map_name("/ks/bootstrap?net0=52:54:00:00:00:01&loader=grub").unwrap(),
            Target::Dynamic {
                endpoint: "bootstrap".into(),
                query: "net0=52:54:00:00:00:01&loader=grub".into()
            }
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for name in [
            "../known_hosts.json",
            "grub/../../etc/passwd",
            "images/../known_hosts.json",
            "/.hidden",
            "images/s/.secret",
            "a\\b",
            "a\u{1}b",
            "images/s/host.tmpl",
            "images/s/host.grub",
            "images/bmc-credentials.json",
            "known_hosts.json",
            "bmc-credentials.json",
            "./x",
        ] {
            let e = map_name(name).unwrap_err();
            assert_eq!(e.0, packet::ERR_ACCESS, "{name}: {e:?}");
        }
        for name in [
            "ks/hosts",
            "ks/metrics",
            "ks/api/v1/hosts",
            "ks/",
            "/",
            "images/",
        ] {
            assert_eq!(
                map_name(name).unwrap_err().0,
                packet::ERR_NOT_FOUND,
                "{name}"
            );
        }
    }

    #[test]
    fn bootids_are_redacted() {
        assert_eq!(
            redact("ks/post-install?id=3&bootid=abc123&x=1"),
            "ks/post-install?id=3&bootid=<redacted>&x=1"
        );
        assert_eq!(
            redact("ks/finish?bootid=abc"),
            "ks/finish?bootid=<redacted>"
        );
        assert_eq!(
            redact("a?bootid=1&bootid=2"),
            "a?bootid=<redacted>&bootid=<redacted>"
        );
        assert_eq!(redact("plain"), "plain");
    }

    #[test]
    fn error_lines() {
        assert_eq!(
            error_line(b"# kiwispray: no such host\nexit 1\n"),
            "kiwispray: no such host"
        );
        assert_eq!(
            error_line(b"kiwispray: bad\x07 value\n"),
            "kiwispray: bad value"
        );
        assert_eq!(error_line(&[b'x'; 300]).len(), 200);
        assert_eq!(error_line(b""), "");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("127.0.0.1").unwrap(),
            "127.0.0.1:69".parse().unwrap()
        );
        assert_eq!(
            parse_listen("127.0.0.1:6969").unwrap(),
            "127.0.0.1:6969".parse().unwrap()
        );
        assert_eq!(parse_listen("::1").unwrap(), "[::1]:69".parse().unwrap());
        assert_eq!(parse_listen("[::1]").unwrap(), "[::1]:69".parse().unwrap());
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("").is_err());
        assert_eq!(host_port("::1".parse().unwrap(), 80), "[::1]:80");
    }
}
