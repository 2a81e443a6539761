//! The shared harness of the integration tests: it runs the real stack
//! (`nginx/serve.sh`, i.e. real nginx with the shipped `nginx/kiwispray.conf`
//! and the real `kiwispray-fcgi` behind it; real lighttpd with
//! `lighttpd/kiwispray.conf` when `KIWISPRAY_WEB=lighttpd`) on a free
//! loopback port with a temporary deployment root, and talks to it over
//! plain HTTP/1.1.
//!
//! - [`Stack::start`] / [`Stack::start_with`] start the stack (optionally in
//!   discover mode, or with a root prepared beforehand through
//!   [`Options::prepare`]) and wait until it answers; dropping the [`Stack`]
//!   sends SIGTERM to `serve.sh`, which stops nginx and the handler, and
//!   removes the temporary directories (kept with `KIWISPRAY_KEEP=1`).
//! - [`Stack::get`], [`Stack::post_form`], [`Stack::request`] and
//!   [`Stack::raw`] send one request each on a fresh connection (`raw` sends
//!   the bytes exactly as given) and return a parsed [`Reply`].
//! - [`Stack::hosts`], [`Stack::host`], [`Stack::db_bytes`],
//!   [`Stack::db_stamp`] and [`Stack::events`] read `known_hosts.json` and
//!   the event log as they are on disk, so that tests check the file after
//!   each request; [`Stack::handler_log`] returns what the handler logged.
//! - [`golden`] compares rendered scripts with files under `tests/golden/`.
//!
//! The stack needs nginx (`make deps-test` installs it). Each test file that
//! uses this module declares `mod common;`; not every file uses every helper.

#![allow(dead_code)]

pub mod golden;

use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The checkout the tests run from.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding the `kiwispray-fcgi` binary cargo built for the tests.
/// The web server the stack runs on: `KIWISPRAY_WEB` (`nginx`, the
/// default, or `lighttpd`), so the same suite runs against both.
pub fn web() -> String {
    std::env::var("KIWISPRAY_WEB").unwrap_or_else(|_| "nginx".into())
}

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_kiwispray-fcgi"))
        .parent()
        .expect("binary has a directory")
        .to_path_buf()
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory removed on drop (kept when `KIWISPRAY_KEEP=1`).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "kiwispray-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KIWISPRAY_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

/// A TCP port on loopback that nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// How to start a stack.
/// Prepares a deployment root before the stack starts.
pub type Prepare = Box<dyn FnOnce(&Path)>;

#[derive(Default)]
pub struct Options {
    /// Start the handler in discover mode (`DISCOVER=1`).
    pub discover: bool,
    /// Called with the deployment root before the stack starts, once the
    /// shipped `templates/` and `images/` are copied into it; a missing
    /// `known_hosts.json` is created by `serve.sh`.
    pub prepare: Option<Prepare>,
    /// Run the stack inside this network namespace (`ip netns exec`); the
    /// caller creates and removes the namespace, and requests must then be
    /// sent from inside it (see [`Stack::ns_raw`]).
    pub netns: Option<String>,
    /// Extra environment for `serve.sh`.
    pub env: Vec<(String, String)>,
}

/// A running stack: `serve.sh` with nginx and `kiwispray-fcgi`.
pub struct Stack {
    pub port: u16,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub netns: Option<String>,
    child: Option<Child>,
    _dirs: TempDir,
}

impl Stack {
    /// A stack on a fresh root filled with the shipped defaults.
    pub fn start() -> Stack {
        Stack::start_with(Options::default())
    }

    /// A stack whose database holds `hosts` (a JSON array in the seed's
    /// format), in discover mode if asked, after `prepare` has changed the
    /// root.
    pub fn with_hosts(
        hosts: serde_json::Value,
        discover: bool,
        prepare: impl FnOnce(&Path) + 'static,
    ) -> Stack {
        Stack::start_with(Options {
            discover,
            prepare: Some(Box::new(move |root: &Path| {
                fs::write(
                    root.join("known_hosts.json"),
                    serde_json::to_string_pretty(&hosts).unwrap(),
                )
                .unwrap();
                prepare(root);
            })),
            ..Options::default()
        })
    }

    pub fn start_with(mut opts: Options) -> Stack {
        let dirs = TempDir::new("stack");
        let root = dirs.path().join("root");
        let run_dir = dirs.path().join("run");
        fs::create_dir_all(&root).unwrap();
        if let Some(prepare) = opts.prepare.take() {
            // Give `prepare` the shipped defaults to change, as `serve.sh`
            // would fill them; what it writes is kept.
            for d in ["templates", "images"] {
                let ok = Command::new("cp")
                    .arg("-a")
                    .arg(repo().join(d))
                    .arg(root.join(d))
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "cp -a {d}");
            }
            prepare(&root);
        }
        let mut stack = Stack {
            port: 0,
            root,
            run_dir,
            netns: opts.netns.clone(),
            child: None,
            _dirs: dirs,
        };
        let mut errors = Vec::new();
        // A port found free may be taken before nginx binds it: try again.
        for _ in 0..4 {
            stack.port = free_port();
            let _ = fs::remove_dir_all(&stack.run_dir);
            stack.child = Some(stack.launch(&opts));
            match stack.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return stack,
                Err(e) => {
                    errors.push(format!("{e}\n--- serve.sh output:\n{}", stack.serve_log()));
                    stack.stop();
                }
            }
        }
        panic!("the stack did not start:\n{}", errors.join("\n"));
    }

    fn launch(&self, opts: &Options) -> Child {
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                c.arg(repo().join("nginx/serve.sh"));
                c
            }
            None => Command::new(repo().join("nginx/serve.sh")),
        };
        let log = fs::File::create(self.log_path()).unwrap();
        cmd.env("PORT", self.port.to_string())
            .env("ROOT", &self.root)
            .env("RUN_DIR", &self.run_dir)
            .env("BIN_DIR", bin_dir())
            .env("WEB", web())
            .env_remove("DHCP_IFACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        if opts.discover {
            cmd.env("DISCOVER", "1");
        } else {
            cmd.env_remove("DISCOVER");
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("start nginx/serve.sh")
    }

    fn log_path(&self) -> PathBuf {
        self._dirs.path().join("serve.log")
    }

    /// Waits until nginx answers `/bootstrap.ipxe` and the handler answers
    /// `/state`, or `serve.sh` exits.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("serve.sh exited early with {status}"));
            }
            let ready = if self.netns.is_some() {
                self.ns_raw(b"GET /state?id=0 HTTP/1.0\r\n\r\n", "127.0.0.1")
                    .is_ok_and(|r| r.status == 404)
            } else {
                self.try_request("GET", "/bootstrap.ipxe", &[], b"")
                    .is_ok_and(|r| r.status == 200)
                    && self
                        .try_request("GET", "/state?id=0", &[], b"")
                        .is_ok_and(|r| r.status == 404)
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no answer on port {} within {limit:?}", self.port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the stack: SIGTERM to `serve.sh`, which stops nginx and the
    /// handler; if that takes too long, SIGKILL to its process group.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = child.wait();
    }

    /// Whether `serve.sh` is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The process id of `serve.sh`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything `serve.sh`, nginx and the handler wrote to stdout/stderr.
    pub fn serve_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The handler's log lines (`kiwispray: ...`).
    pub fn handler_log(&self) -> Vec<String> {
        self.serve_log()
            .lines()
            .filter(|l| l.starts_with("kiwispray: "))
            .map(str::to_string)
            .collect()
    }

    /// nginx's error log.
    pub fn nginx_error_log(&self) -> String {
        fs::read_to_string(self.run_dir.join("error.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    // --- requests ---------------------------------------------------------

    fn try_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.addr()));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("Connection: close\r\n\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.try_raw(&bytes, method == "HEAD")
    }

    fn try_raw(&self, bytes: &[u8], head: bool) -> std::io::Result<Reply> {
        let mut s = TcpStream::connect(self.addr())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(bytes)?;
        let mut out = Vec::new();
        // nginx may close early (e.g. on an overlong request); what it
        // answered so far is still the reply.
        if let Err(e) = s.read_to_end(&mut out) {
            if out.is_empty() {
                return Err(e);
            }
        }
        Reply::parse(&out, head)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Any method, with extra headers and a body. A `Host` header is added
    /// unless given; the connection is closed after the reply.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        self.try_request(method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    pub fn get(&self, target: &str) -> Reply {
        self.request("GET", target, &[], b"")
    }

    /// A GET with the `Host` header a machine would send to the standard
    /// port, so that rendered scripts do not depend on the test's port.
    pub fn get_as_pxe(&self, target: &str) -> Reply {
        self.request("GET", target, &[("Host", "127.0.0.1:5000")], b"")
    }

    /// A POST of an `application/x-www-form-urlencoded` body.
    pub fn post_form(&self, target: &str, body: &str) -> Reply {
        self.request(
            "POST",
            target,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
    }

    /// Sends `bytes` exactly as given on a fresh connection and reads the
    /// reply until the server closes the connection (so ask for
    /// `Connection: close` or use HTTP/1.0).
    pub fn raw(&self, bytes: &[u8]) -> Reply {
        self.try_raw(bytes, false)
            .unwrap_or_else(|e| panic!("raw request: {e}"))
    }

    /// Sends `bytes` from inside the stack's network namespace to
    /// `address:port` (with bash's `/dev/tcp`), for stacks started with
    /// [`Options::netns`].
    pub fn ns_raw(&self, bytes: &[u8], address: &str) -> Result<Reply, String> {
        let ns = self
            .netns
            .as_deref()
            .ok_or("the stack has no network namespace")?;
        let script = format!(
            "exec 3<>/dev/tcp/{address}/{} || exit 7; cat >&3; timeout 20 cat <&3",
            self.port
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "bash", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(bytes)
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.stdout.is_empty() {
            return Err(format!(
                "no answer from {address}:{} in {ns}: {}",
                self.port,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Reply::parse(&out.stdout, false)
    }

    // --- the database on disk ---------------------------------------------

    pub fn db_path(&self) -> PathBuf {
        self.root.join("known_hosts.json")
    }

    /// `known_hosts.json` exactly as it is on disk.
    pub fn db_bytes(&self) -> Vec<u8> {
        fs::read(self.db_path()).expect("read known_hosts.json")
    }

    /// The hosts in `known_hosts.json`; panics if the file is not a JSON
    /// array.
    /// The bootids of the journal beside it are applied, as the service
    /// sees them.
    pub fn hosts(&self) -> Vec<Value> {
        let v = kiwispray::store::read_json(&self.db_path()).expect("known_hosts.json is JSON");
        v.as_array().expect("known_hosts.json is an array").clone()
    }

    /// One host by id, from the file.
    pub fn host(&self, id: u64) -> Option<Value> {
        self.hosts()
            .into_iter()
            .find(|h| h["id"].as_u64() == Some(id))
    }

    /// A host's field as a string (`""` for null or missing).
    pub fn field(&self, id: u64, name: &str) -> String {
        let h = self
            .host(id)
            .unwrap_or_else(|| panic!("no host {id} in the file"));
        match &h[name] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// What identifies this version of the file: inode, mtime, contents.
    pub fn db_stamp(&self) -> FileStamp {
        FileStamp::of(&self.db_path())
    }

    /// Writes `known_hosts.json` as another process would (temp file and
    /// rename, so the inode changes).
    pub fn write_db(&self, text: &str) {
        let tmp = self.root.join(".known_hosts.json.test-edit");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.db_path()).unwrap();
    }

    /// Writes the hosts as a pretty-printed JSON array.
    pub fn write_hosts(&self, hosts: &[Value]) {
        self.write_db(&serde_json::to_string_pretty(&Value::Array(hosts.to_vec())).unwrap());
    }

    /// Changes one host's fields in the file, from outside the service.
    pub fn edit_host(&self, id: u64, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let mut hosts = self.hosts();
        let h = hosts
            .iter_mut()
            .find(|h| h["id"].as_u64() == Some(id))
            .unwrap_or_else(|| panic!("no host {id}"));
        f(h.as_object_mut().unwrap());
        self.write_hosts(&hosts);
    }

    /// The lines of `events.jsonl`, parsed.
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(self.root.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Inode, modification time and contents of a file: equal stamps mean the
/// file was not rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub ino: u64,
    pub mtime: (i64, i64),
    pub content: Vec<u8>,
}

impl FileStamp {
    pub fn of(path: &Path) -> FileStamp {
        let m = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        FileStamp {
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            content: fs::read(path).unwrap(),
        }
    }
}

/// A parsed HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// Parses a whole reply (status line, headers, body by Content-Length,
    /// chunked, or up to the end).
    pub fn parse(bytes: &[u8], head: bool) -> Result<Reply, String> {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(bytes)))?;
        let head_text = std::str::from_utf8(&bytes[..end]).map_err(|e| e.to_string())?;
        let mut lines = head_text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &bytes[end + 4..];
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if head {
            return Ok(reply);
        }
        reply.body = if reply
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            dechunk(rest)?
        } else if let Some(len) = reply
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            if rest.len() < len {
                return Err(format!("body has {} of {len} bytes", rest.len()));
            }
            rest[..len].to_vec()
        } else {
            rest.to_vec()
        };
        Ok(reply)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a 4xx whose body is exactly one line of plain text, and
    /// returns that line.
    pub fn assert_one_line_4xx(&self, what: &str) -> String {
        let text = self.text();
        // lighttpd refuses a request it cannot parse (a query with %ff, an
        // overlong request line, an unknown method: 501) before any handler
        // runs, so its error handler does not apply: its own short HTML
        // page, with the status.
        if web() == "lighttpd"
            && ((400..500).contains(&self.status) || self.status == 501)
            && text.contains(&format!("<title>{} ", self.status))
        {
            return format!("{} (lighttpd)", self.status);
        }
        assert!(
            (400..500).contains(&self.status),
            "{what}: expected a 4xx, got {} {text:?}",
            self.status
        );
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{what}: expected text/plain, got {:?}: {text:?}",
            self.header("content-type")
        );
        let line = text.strip_suffix('\n').unwrap_or(&text);
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "{what}: expected one line of reason, got {text:?}"
        );
        line.to_string()
    }
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&b[..nl]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("short chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(s: &str) -> String {
    kiwispray::render::percent_encode(s)
}

/// A distinct, valid, locally administered MAC for machine `n`, NIC `nic`,
/// in iPXE's `hexhyp` spelling.
pub fn mac_hexhyp(n: u32, nic: u8) -> String {
    let b = n.to_be_bytes();
    format!(
        "02-{nic:02x}-{:02x}-{:02x}-{:02x}-{:02x}",
        b[0], b[1], b[2], b[3]
    )
}

/// The same MAC in the database's spelling.
pub fn mac_db(n: u32, nic: u8) -> String {
    mac_hexhyp(n, nic).replace('-', ":").to_uppercase()
}
