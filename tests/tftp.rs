//! The TFTP front end (`kiwispray-fcgi --tftp`), run as the real binary on
//! a free loopback port with a temporary deployment root. Static files are
//! fetched with curl, a real TFTP client; the protocol details (option
//! negotiation, retransmission, giving up, wrong TIDs, refusals, the
//! transfer cap) and the dynamic `ks/` answers are checked with a raw UDP
//! client written here, packet by packet.

mod common;

use common::{repo, TempDir};
use kiwispray::api::{Request, Service};
use kiwispray::config::Config;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `kiwispray-fcgi --tftp 127.0.0.1:PORT`.
struct Server {
    port: u16,
    root: PathBuf,
    log: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP port on loopback that nobody uses right now.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral UDP port")
        .port()
}

/// A deployment root with the shipped templates and empty `boot/` and
/// `images/`, changed by `prepare`.
fn make_root(dir: &Path, prepare: impl FnOnce(&Path)) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::create_dir_all(root.join("images")).unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(repo().join("templates"))
        .arg(root.join("templates"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cp -a templates");
    fs::write(root.join("known_hosts.json"), "[]\n").unwrap();
    prepare(&root);
    root
}

impl Server {
    fn start(args: &[&str], prepare: impl FnOnce(&Path)) -> Server {
        let dir = TempDir::new("tftp");
        let root = make_root(dir.path(), prepare);
        let log = dir.path().join("tftp.log");
        let mut last = String::new();
        // A port found free may be taken before the server binds it.
        for _ in 0..4 {
            let port = free_udp_port();
            let mut child = Command::new(env!("CARGO_BIN_EXE_kiwispray-fcgi"))
                .arg("--root")
                .arg(&root)
                .arg("--tftp")
                .arg(format!("127.0.0.1:{port}"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap())
                .spawn()
                .expect("start kiwispray-fcgi --tftp");
            if wait_ready(&mut child, port) {
                return Server {
                    port,
                    root,
                    log,
                    child,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last = fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("the TFTP server did not start:\n{last}");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `ready` holds for it (a transfer logs after its last
    /// packet), or after 5 s.
    fn log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log_text();
            if ready(&log) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }
}

/// Waits until the server answers, or its process ends.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if answers(port) {
            return true;
        }
    }
    false
}

/// Whether a request for a missing file gets ERROR 1 within 200 ms.
fn answers(port: u16) -> bool {
    let c = Client::new(Duration::from_millis(200));
    c.rrq(port, "kiwispray-ready-probe", &[]);
    c.recv()
        .is_some_and(|(p, _)| error_of(&p).is_some_and(|(code, _)| code == 1))
}

/// A download's content and OACK options, or an ERROR's code and message.
type Fetched = Result<(Vec<u8>, Vec<(String, String)>), (u16, String)>;

/// A raw TFTP client: one UDP socket (its TID), packets built by hand.
struct Client {
    sock: UdpSocket,
}

impl Client {
    fn new(timeout: Duration) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(timeout)).unwrap();
        Client { sock }
    }

    fn rrq(&self, port: u16, name: &str, opts: &[(&str, &str)]) {
        self.send_to(&request(1, name, "octet", opts), port_addr(port));
    }

    fn send_to(&self, bytes: &[u8], to: SocketAddr) {
        self.sock.send_to(bytes, to).unwrap();
    }

    fn ack(&self, to: SocketAddr, block: u16) {
        let mut p = vec![0, 4];
        p.extend_from_slice(&block.to_be_bytes());
        self.send_to(&p, to);
    }

    /// The next packet, or `None` after the read timeout.
    fn recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 70000];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                buf.truncate(n);
                Some((buf, from))
            }
            Err(_) => None,
        }
    }

    /// A whole download in lockstep: the content, or the ERROR's code and
    /// message; with the OACK's options when there was one.
    fn fetch(&self, port: u16, name: &str, opts: &[(&str, &str)]) -> Fetched {
        self.rrq(port, name, opts);
        let mut blksize = 512usize;
        let mut oack = Vec::new();
        let mut out = Vec::new();
        let mut expect: u16 = 1;
        loop {
            let (p, from) = self.recv().expect("an answer from the server");
            if let Some(e) = error_of(&p) {
                return Err(e);
            }
            match op(&p) {
                6 => {
                    oack = options_of(&p);
                    if let Some((_, v)) = oack.iter().find(|(k, _)| k == "blksize") {
                        blksize = v.parse().unwrap();
                    }
                    self.ack(from, 0);
                }
                3 => {
                    let block = u16::from_be_bytes([p[2], p[3]]);
                    assert_eq!(block, expect, "blocks arrive in order");
                    out.extend_from_slice(&p[4..]);
                    self.ack(from, block);
                    if p.len() - 4 < blksize {
                        return Ok((out, oack));
                    }
                    expect = expect.wrapping_add(1);
                }
                other => panic!("unexpected opcode {other}"),
            }
        }
    }
}

fn port_addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn request(opcode: u16, name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut p = opcode.to_be_bytes().to_vec();
    for s in [name, mode]
        .into_iter()
        .chain(opts.iter().flat_map(|(k, v)| [*k, *v]))
    {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

fn op(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[0], p[1]])
}

fn error_of(p: &[u8]) -> Option<(u16, String)> {
    (p.len() >= 5 && op(p) == 5).then(|| {
        let msg = &p[4..p.len() - 1];
        assert_eq!(p[p.len() - 1], 0, "ERROR ends in NUL");
        (
            u16::from_be_bytes([p[2], p[3]]),
            String::from_utf8(msg.to_vec()).unwrap(),
        )
    })
}

fn options_of(p: &[u8]) -> Vec<(String, String)> {
    let fields: Vec<String> = p[2..p.len() - 1]
        .split(|b| *b == 0)
        .map(|f| String::from_utf8(f.to_vec()).unwrap())
        .collect();
    fields
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// Pseudo-random bytes, different for each `seed`.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A file fetched with curl, or curl's exit code.
fn curl(port: u16, path: &str, blksize: Option<u32>, out: &Path) -> Result<Vec<u8>, i32> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-o"]).arg(out);
    if let Some(b) = blksize {
        cmd.args(["--tftp-blksize", &b.to_string()]);
    }
    let status = cmd
        .arg(format!("tftp://127.0.0.1:{port}/{path}"))
        .status()
        .expect("run curl");
    if status.success() {
        Ok(fs::read(out).unwrap())
    } else {
        Err(status.code().unwrap_or(-1))
    }
}

const SIZES: &[usize] = &[0, 511, 512, 513, 1468 * 3, 3 * 1024 * 1024 + 17];

#[test]
fn curl_fetches_static_files_byte_for_byte() {
    let s = Server::start(&[], |root| {
        for (i, n) in SIZES.iter().enumerate() {
            fs::write(root.join(format!("boot/f{n}")), bytes(*n, i as u64)).unwrap();
        }
        fs::create_dir_all(root.join("boot/grub")).unwrap();
        fs::write(root.join("boot/grub/grub.cfg"), "echo hello\n").unwrap();
        fs::create_dir_all(root.join("images/s")).unwrap();
        fs::write(root.join("images/s/initrd"), bytes(100_000, 99)).unwrap();
        // boot/ holds symlinks to files elsewhere; they are followed.
        fs::write(root.join("outside.efi"), b"signed binary").unwrap();
        std::os::unix::fs::symlink(root.join("outside.efi"), root.join("boot/shimx64.efi"))
            .unwrap();
    });
    let out = s.root.parent().unwrap().join("curl.out");
    for (i, n) in SIZES.iter().enumerate() {
        let want = bytes(*n, i as u64);
        for blksize in [None, Some(512), Some(1024), Some(1468)] {
            let got = curl(s.port, &format!("f{n}"), blksize, &out)
                .unwrap_or_else(|c| panic!("curl f{n} blksize {blksize:?}: exit {c}"));
            assert!(
                got == want,
                "f{n} with blksize {blksize:?}: {} bytes",
                got.len()
            );
        }
    }
    assert_eq!(
        curl(s.port, "grub/grub.cfg", None, &out).unwrap(),
        b"echo hello\n"
    );
    assert_eq!(
        curl(s.port, "images/s/initrd", Some(1468), &out).unwrap(),
        bytes(100_000, 99)
    );
    assert_eq!(
        curl(s.port, "shimx64.efi", None, &out).unwrap(),
        b"signed binary"
    );
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"f513\""))
        .expect("a log line for f513");
    assert!(
        line.starts_with("kiwispray: tftp 127.0.0.1:")
            && line.contains(" 513 bytes ")
            && line.ends_with(": sent"),
        "{line}"
    );
}

#[test]
fn options_are_negotiated_with_an_oack() {
    let s = Server::start(&["--tftp-max-blksize", "1400"], |root| {
        fs::write(root.join("boot/f"), bytes(5000, 1)).unwrap();
        fs::write(root.join("boot/exact"), bytes(2800, 2)).unwrap();
    });
    let c = Client::new(Duration::from_secs(5));
    // blksize above the cap is lowered to it; tsize answers the size.
    let (data, oack) = c
        .fetch(
            s.port,
            "f",
            &[
                ("blksize", "8192"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "4"),
            ],
        )
        .unwrap();
    assert_eq!(data, bytes(5000, 1));
    let o = |k: &str| oack.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(o("blksize"), Some("1400"));
    assert_eq!(o("tsize"), Some("5000"));
    assert_eq!(o("timeout"), Some("3"));
    assert_eq!(
        o("windowsize"),
        None,
        "unknown options are not acknowledged"
    );
    // Without options: plain RFC 1350, DATA 1 of 512 bytes at once.
    let c = Client::new(Duration::from_secs(5));
    c.rrq(s.port, "f", &[]);
    let (p, _) = c.recv().unwrap();
    assert_eq!(op(&p), 3);
    assert_eq!(&p[2..4], &[0, 1]);
    assert_eq!(p.len(), 4 + 512);
    // A size that is a multiple of blksize ends with an empty block.
    let c = Client::new(Duration::from_secs(5));
    c.rrq(s.port, "exact", &[("blksize", "1400")]);
    let (p, tid) = c.recv().unwrap();
    assert_eq!(op(&p), 6);
    let mut lens = Vec::new();
    c.ack(tid, 0);
    loop {
        let (p, _) = c.recv().unwrap();
        assert_eq!(op(&p), 3);
        lens.push(p.len() - 4);
        c.ack(tid, u16::from_be_bytes([p[2], p[3]]));
        if p.len() - 4 < 1400 {
            break;
        }
    }
    assert_eq!(lens, vec![1400, 1400, 0]);
    // Values outside the RFCs get ERROR 8; netascii is refused.
    for opts in [
        &[("blksize", "7")][..],
        &[("blksize", "65465")][..],
        &[("timeout", "0")][..],
        &[("tsize", "12")][..],
    ] {
        let c = Client::new(Duration::from_secs(5));
        c.rrq(s.port, "f", opts);
        let (p, _) = c.recv().unwrap();
        assert_eq!(error_of(&p).map(|e| e.0), Some(8), "{opts:?}");
    }
    let c = Client::new(Duration::from_secs(5));
    c.send_to(&request(1, "f", "netascii", &[]), s.addr());
    let (p, _) = c.recv().unwrap();
    let (code, msg) = error_of(&p).unwrap();
    assert_eq!(code, 0);
    assert!(msg.contains("octet"), "{msg}");
}

#[test]
fn block_numbers_roll_over_past_65535() {
    let s = Server::start(&["--tftp-max-blksize", "8"], |root| {
        fs::write(root.join("boot/long"), bytes(8 * 65540 + 3, 7)).unwrap();
    });
    let c = Client::new(Duration::from_secs(5));
    let (data, _) = c.fetch(s.port, "long", &[("blksize", "8")]).unwrap();
    assert!(data == bytes(8 * 65540 + 3, 7), "{} bytes", data.len());
}

#[test]
fn a_missing_ack_is_retransmitted_and_duplicates_are_not_answered() {
    let s = Server::start(&[], |root| {
        fs::write(root.join("boot/f"), bytes(2000, 3)).unwrap();
    });
    let c = Client::new(Duration::from_secs(3));
    c.rrq(s.port, "f", &[]);
    let (first, tid) = c.recv().unwrap();
    let t = Instant::now();
    let (again, tid2) = c.recv().expect("DATA 1 sent again");
    let waited = t.elapsed();
    assert_eq!(first, again);
    assert_eq!(tid, tid2);
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    c.ack(tid, 1);
    let (p, _) = c.recv().unwrap();
    assert_eq!(&p[..4], &[0, 3, 0, 2]);
    // A duplicate ACK 1 does not bring a second DATA 2 before the timeout.
    c.ack(tid, 1);
    c.sock
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    assert!(c.recv().is_none(), "a duplicate ACK was answered");
    c.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    c.ack(tid, 2);
    let (p, _) = c.recv().unwrap();
    assert_eq!(&p[..4], &[0, 3, 0, 3]);
    assert_eq!(p.len() - 4, 512);
    c.ack(tid, 3);
    let (p, _) = c.recv().unwrap();
    assert_eq!(&p[..4], &[0, 3, 0, 4]);
    assert_eq!(p.len() - 4, 2000 - 3 * 512);
    c.ack(tid, 4);
}

#[test]
fn a_transfer_without_acks_is_given_up() {
    let s = Server::start(&["--tftp-tries", "3"], |root| {
        fs::write(root.join("boot/f"), bytes(2000, 4)).unwrap();
    });
    let c = Client::new(Duration::from_millis(2500));
    c.rrq(s.port, "f", &[]);
    let mut copies = 0;
    while let Some((p, _)) = c.recv() {
        assert_eq!(&p[..4], &[0, 3, 0, 1]);
        copies += 1;
    }
    assert_eq!(copies, 3, "DATA 1 sent three times, then no more");
    let log = s.log_when(|l| l.contains("gave up"));
    assert!(
        log.lines().any(|l| l.contains("\"f\" 0 bytes")
            && l.contains("gave up: block 1 not acknowledged after 3 tries")),
        "{log}"
    );
}

#[test]
fn a_packet_from_a_wrong_tid_gets_error_5_and_the_transfer_goes_on() {
    let s = Server::start(&[], |root| {
        fs::write(root.join("boot/f"), bytes(1500, 5)).unwrap();
    });
    let c = Client::new(Duration::from_secs(3));
    let stranger = Client::new(Duration::from_secs(3));
    c.rrq(s.port, "f", &[]);
    let (p, tid) = c.recv().unwrap();
    assert_eq!(&p[..4], &[0, 3, 0, 1]);
    let mut data = p[4..].to_vec();
    stranger.ack(tid, 1);
    let (e, from) = stranger.recv().expect("the stranger gets an answer");
    assert_eq!(from, tid);
    assert_eq!(error_of(&e).map(|e| e.0), Some(5));
    for block in 1..=2u16 {
        c.ack(tid, block);
        let (p, _) = c.recv().unwrap();
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), block + 1);
        data.extend_from_slice(&p[4..]);
    }
    c.ack(tid, 3);
    assert_eq!(data, bytes(1500, 5));
}

#[test]
fn write_requests_and_bad_packets_are_refused() {
    let s = Server::start(&[], |root| {
        fs::write(root.join("boot/f"), b"content").unwrap();
    });
    let c = Client::new(Duration::from_secs(3));
    c.send_to(&request(2, "f", "octet", &[]), s.addr());
    let (p, _) = c.recv().unwrap();
    assert_eq!(error_of(&p), Some((2, "read-only".into())));
    assert_eq!(fs::read(s.root.join("boot/f")).unwrap(), b"content");
    let long = "a".repeat(513);
    let bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 9, 1, 2],
        b"\x00\x01f\x00octet".to_vec(),
        b"\x00\x01f\x00".to_vec(),
        b"\x00\x01f\x00octet\x00blksize\x00".to_vec(),
        b"\x00\x01f\xff\x00octet\x00".to_vec(),
        b"\x00\x04\x00\x01".to_vec(),
        b"\x00\x03\x00\x01data".to_vec(),
        request(1, &long, "octet", &[]),
        vec![0xff; 3000],
    ];
    for b in &bad {
        c.send_to(b, s.addr());
        let (p, _) = c.recv().unwrap_or_else(|| panic!("no answer to {b:?}"));
        let (code, msg) = error_of(&p).unwrap_or_else(|| panic!("{b:?} got {p:?}"));
        assert!(code == 4 || code == 0, "{b:?}: {code}");
        assert!(!msg.is_empty(), "{b:?}: no reason");
    }
    // An ERROR sent to the server is not answered.
    c.send_to(b"\x00\x05\x00\x00x\x00", s.addr());
    c.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(c.recv().is_none());
    // The server still serves.
    let c = Client::new(Duration::from_secs(3));
    assert_eq!(c.fetch(s.port, "f", &[]).unwrap().0, b"content");
}

#[test]
fn traversal_hidden_files_and_secrets_are_refused() {
    let s = Server::start(&[], |root| {
        fs::write(root.join("bmc-credentials.json"), "{\"secret\": 1}").unwrap();
        fs::create_dir_all(root.join("images/s")).unwrap();
        fs::write(root.join("images/s/host.tmpl"), "secret template").unwrap();
        fs::write(root.join("images/s/.hidden"), "hidden").unwrap();
        fs::write(root.join("images/bmc-credentials.json"), "secret").unwrap();
        fs::write(root.join("boot/.hidden"), "hidden").unwrap();
        fs::create_dir_all(root.join("boot/dir")).unwrap();
        let ok = Command::new("mkfifo")
            .arg(root.join("boot/fifo"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mkfifo");
    });
    let names = [
        "../known_hosts.json",
        "/../known_hosts.json",
        "known_hosts.json",
        "/known_hosts.json",
        "bmc-credentials.json",
        "images/bmc-credentials.json",
        "grub/../../known_hosts.json",
        "images/../known_hosts.json",
        "images/s/host.tmpl",
        "images/s/.hidden",
        ".hidden",
        "images/s/./host.tmpl",
        "..\\known_hosts.json",
        "templates/new_host.tmpl",
        "/etc/passwd",
        "dir",
        "fifo",
        "ks/hosts",
        "ks/metrics",
        "ks/api/v1/hosts",
    ];
    for name in names {
        let c = Client::new(Duration::from_secs(3));
        c.rrq(s.port, name, &[]);
        let (p, _) = c.recv().unwrap_or_else(|| panic!("no answer for {name}"));
        let (code, msg) = error_of(&p).unwrap_or_else(|| panic!("{name} was served: {p:?}"));
        assert!(code == 1 || code == 2, "{name}: {code} {msg}");
        c.sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(c.recv().is_none(), "{name}: more than the error");
    }
}

#[test]
fn more_transfers_than_the_cap_are_told_to_try_again() {
    let s = Server::start(&["--tftp-max-transfers", "2"], |root| {
        fs::write(root.join("boot/f"), bytes(3000, 6)).unwrap();
    });
    // The readiness probe's transfer frees its place once it has logged.
    s.log_when(|l| l.contains("kiwispray-ready-probe"));
    // Two transfers hold their places while their DATA 1 waits for an ACK.
    let holders: Vec<(Client, SocketAddr)> = (0..2)
        .map(|_| {
            let c = Client::new(Duration::from_secs(3));
            c.rrq(s.port, "f", &[]);
            let (p, tid) = c.recv().unwrap();
            assert_eq!(&p[..4], &[0, 3, 0, 1], "{}", s.log_text());
            (c, tid)
        })
        .collect();
    let third = Client::new(Duration::from_secs(3));
    third.rrq(s.port, "f", &[]);
    let (p, _) = third.recv().unwrap();
    assert_eq!(error_of(&p), Some((0, "busy, try again".into())));
    // Once they end, there is room again.
    for (c, tid) in &holders {
        let mut data = Vec::new();
        let mut block = 1u16;
        c.ack(*tid, 0); // a stale ACK is ignored
        loop {
            let (p, _) = c
                .recv()
                .unwrap_or_else(|| panic!("block {block}: no DATA\n{}", s.log_text()));
            if u16::from_be_bytes([p[2], p[3]]) != block {
                continue; // a retransmission
            }
            data.extend_from_slice(&p[4..]);
            c.ack(*tid, block);
            if p.len() - 4 < 512 {
                break;
            }
            block += 1;
        }
        assert_eq!(data, bytes(3000, 6));
    }
    std::thread::sleep(Duration::from_millis(200));
    let c = Client::new(Duration::from_secs(3));
    assert_eq!(c.fetch(s.port, "f", &[]).unwrap().0, bytes(3000, 6));
}

#[test]
fn ks_bootstrap_registers_the_host_with_the_service_answer() {
    let s = Server::start(&[], |_| {});
    let query = "net0=52:54:00:00:00:01&serial=X";
    let c = Client::new(Duration::from_secs(5));
    let (body, oack) = c
        .fetch(
            s.port,
            &format!("ks/bootstrap?{query}"),
            &[("tsize", "0"), ("blksize", "1024")],
        )
        .unwrap();
    let tsize: usize = oack
        .iter()
        .find(|(k, _)| k == "tsize")
        .map(|(_, v)| v.parse().unwrap())
        .expect("tsize in the OACK");
    assert_eq!(tsize, body.len());
    let hosts: serde_json::Value =
        serde_json::from_slice(&fs::read(s.root.join("known_hosts.json")).unwrap()).unwrap();
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    let text = serde_json::to_string(&hosts[0]).unwrap();
    assert!(
        text.contains("52:54:00:00:00:01") && text.contains("\"X\""),
        "{text}"
    );
    // The same request answered by the service on a twin root.
    let twin_dir = TempDir::new("tftp-twin");
    let twin = make_root(twin_dir.path(), |_| {});
    let service = Service::new(Config::load(&twin, None).unwrap());
    let want = service.handle(&Request {
        method: "GET".into(),
        path: "/bootstrap".into(),
        query: query.into(),
        remote: "127.0.0.1".into(),
        host_header: "127.0.0.1:80".into(),
        server_addr: "127.0.0.1".into(),
        server_port: "80".into(),
        ..Request::default()
    });
    assert_eq!(want.status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        String::from_utf8(want.body).unwrap()
    );
    // A 4xx answer is an ERROR with its first line; a bootid is not logged.
    let c = Client::new(Duration::from_secs(5));
    let (code, msg) = c
        .fetch(
            s.port,
            "/ks/post-install?id=1&bootid=0123456789abcdef0123456789abcdef",
            &[],
        )
        .unwrap_err();
    assert!(code == 1 || code == 2 || code == 0, "{code}");
    assert!(msg.starts_with("kiwispray: "), "{msg}");
    let (code, msg) = Client::new(Duration::from_secs(5))
        .fetch(s.port, "ks/bootstrap", &[])
        .unwrap_err();
    assert_eq!(code, 0);
    assert!(msg.contains("MAC"), "{msg}");
    let log = s.log_when(|l| l.contains("ks/post-install"));
    assert!(!log.contains("0123456789abcdef"), "{log}");
    assert!(log.contains("bootid=<redacted>"), "{log}");
}

#[test]
fn serve_sh_with_tftp_set_runs_the_front_end_and_stops_it() {
    let port = free_udp_port();
    let mut stack = common::Stack::start_with(common::Options {
        env: vec![("TFTP".into(), format!("127.0.0.1:{port}"))],
        ..common::Options::default()
    });
    // serve.sh waits for nginx, not for the TFTP front end.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers(port) {
        assert!(Instant::now() < deadline, "no TFTP\n{}", stack.serve_log());
    }
    let (body, _) = Client::new(Duration::from_secs(5))
        .fetch(port, "ks/bootstrap?net0=52:54:00:00:00:02&serial=Y", &[])
        .unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("registered as host 1"), "{body}");
    assert_eq!(stack.hosts().len(), 1);
    let log = stack.serve_log();
    assert!(
        log.contains(&format!(
            "TFTP on 127.0.0.1:{port} (web server 127.0.0.1:{})",
            stack.port
        )),
        "{log}"
    );
    // The same host over HTTP: one registration, not two.
    assert_eq!(
        stack
            .get("/bootstrap?net0=52:54:00:00:00:02&serial=Y")
            .status,
        200
    );
    assert_eq!(stack.hosts().len(), 1);
    stack.stop();
    let c = Client::new(Duration::from_millis(500));
    c.rrq(port, "ipxe.efi", &[]);
    assert!(c.recv().is_none(), "the TFTP front end outlived serve.sh");
}

#[test]
fn bad_tftp_options_exit_with_a_message() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("tftp-args");
    let root = make_root(dir.path(), |_| {});
    let cases: &[(&[&str], &str)] = &[
        (&["--tftp", ""], "needs an IP address"),
        (&["--tftp", "localhost"], "not an IP address"),
        (&["--tftp", &taken], "cannot bind UDP"),
        (
            &["--tftp", "127.0.0.1:6969", "--bind", "127.0.0.1:0"],
            "drop --bind",
        ),
        (
            &["--tftp", "127.0.0.1:6969", "--tftp-max-blksize", "7"],
            "tftp-max-blksize",
        ),
        (
            &["--tftp", "127.0.0.1:6969", "--tftp-max-transfers", "0"],
            "tftp-max-transfers",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_kiwispray-fcgi"))
            .arg("--root")
            .arg(&root)
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn random_packets_do_not_stop_the_server() {
    // Enough tries that the transfer outlasts the noise.
    let s = Server::start(&["--tftp-tries", "20"], |root| {
        fs::write(root.join("boot/f"), bytes(5000, 8)).unwrap();
    });
    let noise = bytes(600 * 800, 11);
    let c = Client::new(Duration::from_millis(1));
    // A transfer in progress gets noise on its TID from a stranger too.
    let victim = Client::new(Duration::from_secs(3));
    victim.rrq(s.port, "f", &[]);
    let (_, tid) = victim.recv().unwrap();
    for (i, chunk) in noise.chunks(600).enumerate() {
        let len = chunk[0] as usize * 2 % 600;
        let mut p = chunk[..len].to_vec();
        if p.len() >= 2 {
            p[0] = 0;
            p[1] = chunk[1] % 7;
        }
        let to = if i % 5 == 0 { tid } else { s.addr() };
        let _ = c.sock.send_to(&p, to);
        while c.recv().is_some() {}
    }
    // The transfer survived the noise (DATA 1 is sent again on timeout).
    let mut data = Vec::new();
    let mut block = 1u16;
    loop {
        let (p, from) = victim.recv().expect("the transfer goes on");
        assert_eq!(from, tid);
        if u16::from_be_bytes([p[2], p[3]]) != block {
            continue;
        }
        data.extend_from_slice(&p[4..]);
        victim.ack(tid, block);
        if p.len() - 4 < 512 {
            break;
        }
        block += 1;
    }
    assert_eq!(data, bytes(5000, 8));
    let fresh = Client::new(Duration::from_secs(3));
    assert_eq!(fresh.fetch(s.port, "f", &[]).unwrap().0, bytes(5000, 8));
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

#[test]
fn serves_on_ipv6_loopback() {
    let dir = TempDir::new("tftp-v6");
    let root = make_root(dir.path(), |root| {
        fs::write(root.join("boot/f"), bytes(3000, 9)).unwrap();
    });
    let port = UdpSocket::bind("[::1]:0")
        .and_then(|s| s.local_addr())
        .expect("bind ::1")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiwispray-fcgi"))
        .arg("--root")
        .arg(&root)
        .args(["--tftp", &format!("[::1]:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let ok = Command::new("curl")
            .args(["-sS", "-g", "--max-time", "10", "-o"])
            .arg(&out)
            .arg(format!("tftp://[::1]:{port}/f"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break fs::read(&out).unwrap();
        }
        assert!(Instant::now() < deadline, "no answer on [::1]:{port}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, bytes(3000, 9));
}

/// The GRUB flavour over TFTP, as Debian's signed GRUB under Secure Boot
/// reaches it: `/grub/grub.cfg` is `bootstrap.grub` (through the
/// checkout's `boot/grub/grub.cfg` link), `ks/bootstrap?...&loader=grub`
/// registers the machine and answers GRUB script, and an error answer is a
/// TFTP ERROR with the reason (the `# ` of the GRUB comment removed).
#[test]
fn grub_gets_its_config_and_answers_over_tftp() {
    let s = Server::start(&[], |root| {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(repo().join("boot/grub"))
            .arg(root.join("boot/grub"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cp -a boot/grub");
    });
    let c = Client::new(Duration::from_secs(5));
    let (cfg, _) = c.fetch(s.port, "/grub/grub.cfg", &[]).unwrap();
    assert_eq!(
        cfg,
        fs::read(repo().join("templates/bootstrap.grub")).unwrap()
    );
    let (body, _) = Client::new(Duration::from_secs(5))
        .fetch(
            s.port,
            "/ks/bootstrap?net0=52:54:00:00:00:07&serial=SN%207&platform=efi&buildarch=x86_64&loader=grub",
            &[("blksize", "1024")],
        )
        .unwrap();
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains(
            "echo 'KIWIspray: this machine is registered as host 1 and waits for an operator.'"
        ),
        "{text}"
    );
    assert!(!text.contains("#!ipxe"), "{text}");
    let hosts: serde_json::Value =
        serde_json::from_slice(&fs::read(s.root.join("known_hosts.json")).unwrap()).unwrap();
    assert_eq!(hosts[0]["serial"], "SN 7");
    let (code, msg) = Client::new(Duration::from_secs(5))
        .fetch(s.port, "ks/bootstrap?net0=zz&loader=grub", &[])
        .unwrap_err();
    assert_eq!(code, 0);
    assert!(msg.starts_with("kiwispray: no valid MAC"), "{msg}");
    // the template beside an image is not served
    fs::create_dir_all(s.root.join("images/web")).unwrap();
    fs::write(s.root.join("images/web/host.grub"), "echo x\n").unwrap();
    let (code, _) = Client::new(Duration::from_secs(5))
        .fetch(s.port, "images/web/host.grub", &[])
        .unwrap_err();
    assert_eq!(code, 2);
}
