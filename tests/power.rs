//! Out-of-band power against real BMC protocol implementations, through the
//! real `kiwispray-hosts`:
//!
//! - Redfish: sushy-tools' emulator (PyPI, in a venv outside the tree,
//!   `/var/cache/kiwispray-venv` unless `KIWISPRAY_VENV` says otherwise;
//!   created on first use) with its fake driver, over HTTPS on 127.0.0.1
//!   with a certificate from a CA made for the test, and HTTP basic auth
//!   (bcrypt htpasswd). A small WSGI shim in front of the emulator records
//!   each request's method, path, user and body, so the test sees exactly
//!   what reached the BMC.
//! - IPMI: OpenIPMI's `ipmi_sim` on 127.0.0.1 with a LAN channel and a
//!   chassis-control program that records what the simulator was told,
//!   driven by the real `ipmitool -I lanplus`; and a stand-in `ipmitool`
//!   that records its arguments and environment, to show the password is
//!   never on a command line.
//! - The shipped nginx and lighttpd configurations never serve
//!   `bmc-credentials.json`.
//!
//! Every test also checks that no password appears in the CLI's output,
//! `--json`, the event log or the database.
//!
//! Needs python3 with venv (Debian python3-venv), openssl, ipmitool,
//! openipmi, nginx and lighttpd (`make deps-test`).

mod common;

use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kiwispray-hosts");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PASSWORD: &str = "Rf-s3cret-4711";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "ks-power-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A deployment root with the shipped templates and an image `img1`.
fn root(dir: &Path) -> PathBuf {
    let r = dir.join("root");
    fs::create_dir_all(r.join("images/img1")).unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(Path::new(REPO).join("templates"))
        .arg(r.join("templates"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    fs::write(r.join("known_hosts.json"), "[]\n").unwrap();
    r
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(root: &Path, args: &[&str]) -> Run {
    cli_env(root, args, &[])
}

fn cli_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(BIN);
    c.arg("--root").arg(root).args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o: Output = c.output().unwrap();
    let r = Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    };
    // whatever happened, no password in what the operator sees
    for secret in [PASSWORD, "wrong-Pw-99", "Ipmi-pw-55"] {
        assert!(
            !r.stdout.contains(secret) && !r.stderr.contains(secret),
            "a password in the output of {args:?}:\n{}\n{}",
            r.stdout,
            r.stderr
        );
    }
    r
}

/// No password in the database or the event log.
fn no_secret_on_disk(root: &Path) {
    for f in ["known_hosts.json", "events.jsonl"] {
        let text = fs::read_to_string(root.join(f)).unwrap_or_default();
        for secret in [PASSWORD, "wrong-Pw-99", "Ipmi-pw-55"] {
            assert!(!text.contains(secret), "a password in {f}: {text}");
        }
    }
}

fn events(root: &Path) -> Vec<Value> {
    fs::read_to_string(root.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

// --- Redfish -----------------------------------------------------------------

/// The venv with sushy-tools, created (once) if it is missing.
fn venv() -> PathBuf {
    let v = std::env::var_os("KIWISPRAY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiwispray-venv"));
    let emulator = v.join("bin/sushy-emulator");
    if emulator.exists() {
        return v;
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("kiwispray-venv.lock"))
        .unwrap();
    fs2::FileExt::lock_exclusive(&lock).unwrap();
    if !emulator.exists() {
        run_ok(Command::new("python3").args(["-m", "venv"]).arg(&v));
        run_ok(Command::new(v.join("bin/pip")).args(["install", "-q", "sushy-tools"]));
    }
    v
}

/// Records every request before the emulator (and its auth) sees it.
const RECORDER: &str = r#"
import base64, io, json, os, sys
from sushy_tools.emulator import main as m
log = open(os.environ["KS_REDFISH_LOG"], "a")
orig_run = m.app.run
def run(*a, **k):
    inner = m.app.wsgi_app
    def rec(env, start):
        n = int(env.get("CONTENT_LENGTH") or 0)
        body = env["wsgi.input"].read(n) if n else b""
        env["wsgi.input"] = io.BytesIO(body)
        user = ""
        auth = env.get("HTTP_AUTHORIZATION", "")
        if auth.startswith("Basic "):
            user = base64.b64decode(auth[6:]).decode("utf-8", "replace").split(":", 1)[0]
        seen = []
        def st(s, h, *x):
            seen.append(s)
            return start(s, h, *x)
        res = inner(env, st)
        log.write(json.dumps({"method": env["REQUEST_METHOD"], "path": env["PATH_INFO"],
                              "user": user, "body": body.decode("utf-8", "replace"),
                              "status": seen[0] if seen else ""}) + "\n")
        log.flush()
        return res
    m.app.wsgi_app = rec
    return orig_run(*a, **k)
m.app.run = run
sys.exit(m.main())
"#;

struct Emulator {
    child: Child,
    port: u16,
    log: PathBuf,
    ca: PathBuf,
    system: String,
    _dir: Tmp,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    fn start() -> Emulator {
        let venv = venv();
        let dir = Tmp::new("sushy");
        let d = dir.path();
        // a CA, and a certificate for 127.0.0.1 signed by it
        let ossl = |args: &[&str]| run_ok(Command::new("openssl").current_dir(d).args(args));
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kiwispray test BMC CA",
        ]);
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "bmc.key",
            "-out",
            "bmc.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            "bmc.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "bmc.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        // basic auth: bcrypt htpasswd, as the emulator wants it
        let hash = Command::new(venv.join("bin/python3"))
            .args(["-c", "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt()).decode())", PASSWORD])
            .output()
            .unwrap();
        assert!(hash.status.success());
        fs::write(
            d.join("htpasswd"),
            format!("admin:{}", String::from_utf8_lossy(&hash.stdout)),
        )
        .unwrap();
        let port = free_port();
        let state = d.join("state");
        fs::create_dir_all(&state).unwrap();
        fs::write(
            d.join("emulator.conf"),
            format!(
                "SUSHY_EMULATOR_AUTH_FILE = {:?}\nSUSHY_EMULATOR_STATE_DIR = {:?}\n",
                d.join("htpasswd").display().to_string(),
                state.display().to_string()
            ),
        )
        .unwrap();
        fs::write(d.join("recorder.py"), RECORDER).unwrap();
        let log = d.join("requests.jsonl");
        let out = fs::File::create(d.join("emulator.out")).unwrap();
        let child = Command::new(venv.join("bin/python3"))
            .arg(d.join("recorder.py"))
            .args(["--fake", "-i", "127.0.0.1", "-p", &port.to_string()])
            .arg("--config")
            .arg(d.join("emulator.conf"))
            .arg("--ssl-certificate")
            .arg(d.join("bmc.pem"))
            .arg("--ssl-key")
            .arg(d.join("bmc.key"))
            .env("KS_REDFISH_LOG", &log)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut e = Emulator {
            child,
            port,
            log,
            ca: d.join("ca.pem"),
            system: String::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || e.child.try_wait().unwrap().is_some() {
                panic!(
                    "sushy-emulator did not start: {}",
                    fs::read_to_string(e._dir.path().join("emulator.out")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        e.system = e.systems()[0].clone();
        e
    }

    /// The emulator's state, read with curl (not through the code under test).
    fn get(&self, path: &str) -> Value {
        let o = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&self.ca)
            .args(["-u", &format!("admin:{PASSWORD}")])
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    fn systems(&self) -> Vec<String> {
        self.get("/redfish/v1/Systems")["Members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["@odata.id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn power(&self) -> String {
        self.get(&self.system)["PowerState"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The fake driver applies power changes 1 to 11 s later.
    fn wait_power(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.power() != want {
            assert!(Instant::now() < deadline, "power never became {want}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn redfish_root(dir: &Path, e: &Emulator, cred: &str) -> PathBuf {
    let r = root(dir);
    write_private(&r.join("bmc-credentials.json"), cred);
    let out = cli(
        &r,
        &[
            "add",
            "--mac",
            "52:54:00:aa:00:01",
            "--hostname",
            "rf01",
            "--bmc",
            &format!("redfish://127.0.0.1:{}", e.port),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    r
}

#[test]
fn redfish_power_and_reinstall_reach_the_emulator_over_verified_tls() {
    let e = Emulator::start();
    let dir = Tmp::new("rf");
    let cred = format!(
        r#"{{"default": {{"user": "admin", "password": "{PASSWORD}", "ca_file": "{}"}}}}"#,
        e.ca.display()
    );
    let r = redfish_root(dir.path(), &e, &cred);

    // the host carries its BMC: show, list -v, --json
    let url = format!("redfish://127.0.0.1:{}", e.port);
    assert!(cli(&r, &["show", "1"])
        .stdout
        .contains(&format!("bmc:       {url}")));
    assert!(cli(&r, &["list", "-v"]).stdout.contains(&url));
    let j: Value = serde_json::from_str(&cli(&r, &["list", "--json"]).stdout).unwrap();
    assert_eq!(j[0]["bmc"], Value::String(url.clone()));

    // status: off (the fake system starts off)
    let out = cli(&r, &["power", "1", "status", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v[0]["power"], "off", "{v}");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(e.power(), "Off");

    // on: the emulator switches the system on
    let out = cli(&r, &["power", "1", "on"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("powered on"), "{}", out.stdout);
    e.wait_power("On");
    let out = cli(&r, &["power", "52:54:00:aa:00:01", "status"]);
    assert!(out.stdout.contains(" on"), "{}", out.stdout);

    // cycle of a machine that is on: a restart (off, then on again)
    let out = cli(&r, &["power", "1", "cycle"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("power-cycled"), "{}", out.stdout);
    e.wait_power("On");

    // off
    let out = cli(&r, &["power", "1", "off"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    e.wait_power("Off");
    assert!(cli(&r, &["power", "1", "status"]).stdout.contains(" off"));

    // reinstall: state set, one PXE boot asked, powered on (it was off)
    let out = cli(&r, &["reinstall", "1", "--state", "img1"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("network boot once"), "{}", out.stdout);
    assert!(out.stdout.contains("was off, powered on"), "{}", out.stdout);
    let db: Value =
        serde_json::from_str(&fs::read_to_string(r.join("known_hosts.json")).unwrap()).unwrap();
    assert_eq!(db[0]["state"], "img1");
    e.wait_power("On");
    let boot = &e.get(&e.system)["Boot"];
    assert_eq!(boot["BootSourceOverrideTarget"], "Pxe", "{boot}");

    // what reached the BMC: the requests, their user, the boot override body
    let reqs = e.requests();
    let patch: Vec<&Value> = reqs
        .iter()
        .filter(|q| q["method"] == "PATCH" && q["path"] == Value::String(e.system.clone()))
        .collect();
    assert_eq!(patch.len(), 1, "{reqs:?}");
    let body: Value = serde_json::from_str(patch[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["Boot"]["BootSourceOverrideEnabled"], "Once");
    assert_eq!(body["Boot"]["BootSourceOverrideTarget"], "Pxe");
    assert!(
        patch[0]["status"].as_str().unwrap().starts_with("20"),
        "{:?}",
        patch[0]
    );
    let resets: Vec<String> = reqs
        .iter()
        .filter(|q| {
            q["method"] == "POST"
                && q["path"]
                    .as_str()
                    .unwrap()
                    .ends_with("ComputerSystem.Reset")
        })
        .map(|q| {
            let b: Value = serde_json::from_str(q["body"].as_str().unwrap()).unwrap();
            b["ResetType"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(resets, ["On", "ForceRestart", "ForceOff", "On"], "{reqs:?}");
    // the PXE request came before the power request of the reinstall
    let i_patch = reqs.iter().position(|q| q["method"] == "PATCH").unwrap();
    let i_last_reset = reqs.iter().rposition(|q| q["method"] == "POST").unwrap();
    assert!(i_patch < i_last_reset);
    assert!(reqs.iter().all(|q| q["user"] == "admin"), "{reqs:?}");
    assert!(!fs::read_to_string(&e.log).unwrap().contains(PASSWORD));

    // events: each action with cause power, the reinstall's state change
    let ev = events(&r);
    let power: Vec<&Value> = ev.iter().filter(|x| x["cause"] == "power").collect();
    assert!(power.len() >= 7, "{ev:?}");
    assert!(
        power.iter().any(|x| x["detail"] == "power on: powered on"),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|x| x["cause"] == "reinstall" && x["to"] == "img1"),
        "{ev:?}"
    );
    no_secret_on_disk(&r);
}

#[test]
fn redfish_wrong_password_is_a_clear_error_and_reinstall_rolls_back() {
    let e = Emulator::start();
    let dir = Tmp::new("rfpw");
    let cred = format!(
        r#"{{"default": {{"user": "admin", "password": "wrong-Pw-99", "ca_file": "{}"}}}}"#,
        e.ca.display()
    );
    let r = redfish_root(dir.path(), &e, &cred);
    let n0 = e.requests().len();
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("wrong user or password"),
        "{}",
        out.stdout
    );
    let out = cli(&r, &["power", "1", "status", "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v[0]["ok"], false);
    assert!(v[0]["error"].as_str().unwrap().contains("HTTP 401"), "{v}");

    // reinstall: the BMC refuses, so the state goes back to new
    let out = cli(&r, &["reinstall", "1", "--state", "img1"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("state set back to new"),
        "{}",
        out.stdout
    );
    let db: Value =
        serde_json::from_str(&fs::read_to_string(r.join("known_hosts.json")).unwrap()).unwrap();
    assert_eq!(db[0]["state"], "new");
    let ev = events(&r);
    assert!(
        ev.iter()
            .any(|x| x["cause"] == "reinstall" && x["from"] == "img1" && x["to"] == "new"),
        "{ev:?}"
    );
    // the wrong password went over the wire, but only to the BMC
    let reqs = e.requests();
    assert!(reqs.len() > n0);
    assert!(
        reqs[n0..]
            .iter()
            .all(|q| q["status"].as_str().unwrap().starts_with("401")),
        "{reqs:?}"
    );
    no_secret_on_disk(&r);
}

#[test]
fn redfish_self_signed_certificate_refused_unless_ca_file_or_insecure() {
    let e = Emulator::start();
    let dir = Tmp::new("rftls");
    let cred = format!(r#"{{"default": {{"user": "admin", "password": "{PASSWORD}"}}}}"#);
    let r = redfish_root(dir.path(), &e, &cred);
    let before = e.requests().len();
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("certificate is not trusted"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("ca_file"), "{}", out.stdout);
    // nothing reached the service: the handshake failed first
    assert_eq!(e.requests().len(), before);

    // the BMC's CA named for this BMC only
    write_private(
        &r.join("bmc-credentials.json"),
        &format!(
            r#"{{"default": {{"user": "admin", "password": "{PASSWORD}"}},
                "bmcs": {{"redfish://127.0.0.1:{}": {{"ca_file": "{}"}}}}}}"#,
            e.port,
            e.ca.display()
        ),
    );
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    // explicit insecure
    write_private(
        &r.join("bmc-credentials.json"),
        &format!(
            r#"{{"default": {{"user": "admin", "password": "{PASSWORD}", "insecure": true}}}}"#
        ),
    );
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    no_secret_on_disk(&r);
}

// --- credentials and selection, without a BMC -----------------------------------

#[test]
fn credentials_file_others_can_read_is_refused_by_the_cli() {
    let dir = Tmp::new("mode");
    let r = root(dir.path());
    let p = r.join("bmc-credentials.json");
    fs::write(
        &p,
        format!(r#"{{"default": {{"user": "a", "password": "{PASSWORD}"}}}}"#),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        cli(
            &r,
            &[
                "add",
                "--mac",
                "52:54:00:aa:00:09",
                "--bmc",
                "ipmi://127.0.0.1:9"
            ]
        )
        .code,
        0
    );
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    let out = cli(&r, &["reinstall", "1", "--state", "img1"]);
    assert_eq!(out.code, 2);
    let db = fs::read_to_string(r.join("known_hosts.json")).unwrap();
    assert!(db.contains("\"state\": \"new\""), "{db}");
    // a path set in kiwispray.json
    let elsewhere = dir.path().join("creds.json");
    write_private(
        &elsewhere,
        &format!(r#"{{"default": {{"user": "a", "password": "{PASSWORD}"}}}}"#),
    );
    fs::write(
        r.join("kiwispray.json"),
        format!(r#"{{"bmc_credentials": "{}"}}"#, elsewhere.display()),
    )
    .unwrap();
    let out = cli(&r, &["power", "1", "status"]);
    assert!(!out.stderr.contains("chmod 600"), "{}", out.stderr);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr); // nothing listens on port 9
}

#[test]
fn bmc_urls_are_checked_and_kept_out_of_the_seed_format_when_unset() {
    let dir = Tmp::new("url");
    let r = root(dir.path());
    assert_eq!(cli(&r, &["add", "--mac", "52:54:00:aa:00:01"]).code, 0);
    let db = fs::read_to_string(r.join("known_hosts.json")).unwrap();
    assert!(!db.contains("bmc"), "{db}");
    for bad in [
        "10.0.0.1",
        "http://x",
        "redfish://root:pw@10.0.0.1",
        "ipmi://a b",
    ] {
        let out = cli(&r, &["set", "1", "--bmc", bad]);
        assert_eq!(out.code, 2, "{bad}: {}", out.stderr);
        assert!(!out.stderr.contains("pw@"), "{}", out.stderr);
    }
    assert_eq!(cli(&r, &["set", "1", "--bmc", "ipmi://10.0.7.21"]).code, 0);
    let out = cli(&r, &["list", "--where", "bmc=ipmi://*"]);
    assert!(out.stdout.contains("52:54:00:AA:00:01"), "{}", out.stdout);
    assert_eq!(cli(&r, &["set", "1", "--no-bmc"]).code, 0);
    let db = fs::read_to_string(r.join("known_hosts.json")).unwrap();
    assert!(!db.contains("bmc"), "{db}");
    // a host without a BMC: power says so, reinstall refuses before writing
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 4);
    assert!(out.stdout.contains("no BMC"), "{}", out.stdout);
    let out = cli(&r, &["reinstall", "1", "--state", "img1"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("nothing was changed"), "{}", out.stderr);
    // several hosts need --yes for a power change, not for status
    assert_eq!(cli(&r, &["add", "--mac", "52:54:00:aa:00:02"]).code, 0);
    let out = cli(&r, &["power", "1", "2", "off"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--yes"), "{}", out.stderr);
    let out = cli(&r, &["power", "--where", "id=1-2", "off", "--dry-run"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("dry run: 2 host(s)"), "{}", out.stdout);
}

// --- IPMI ----------------------------------------------------------------------

/// The simulator's chassis control: records each call; power is a file.
const CHASSIS: &str = r#"#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/chassis.log"
shift
op=$1; shift
case $op in
get) for p; do case $p in
        power) if [ -e "$d/on" ]; then echo power:1; else echo power:0; fi ;;
        boot) echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)" ;;
     esac; done ;;
set) while [ $# -gt 1 ]; do case $1 in
        power) if [ "$2" = 1 ]; then touch "$d/on"; else rm -f "$d/on"; fi ;;
        boot) echo "$2" > "$d/boot" ;;
     esac; shift 2; done ;;
esac
"#;

struct IpmiSim {
    child: Child,
    port: u16,
    dir: PathBuf,
    _tmp: Tmp,
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl IpmiSim {
    fn start() -> IpmiSim {
        let tmp = Tmp::new("ipmisim");
        let d = tmp.path().to_path_buf();
        fs::write(d.join("chassis.sh"), CHASSIS).unwrap();
        fs::set_permissions(d.join("chassis.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_udp_port();
        fs::write(
            d.join("lan.conf"),
            format!(
                "name \"kstest\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n    \
                 allowed_auths_callback md5\n    allowed_auths_user md5\n    allowed_auths_operator md5\n    allowed_auths_admin md5\n    \
                 guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{} 0x20\"\n  \
                 user 2 true \"admin\" \"Ipmi-pw-55\" admin 10 md5\n",
                d.join("chassis.sh").display()
            ),
        )
        .unwrap();
        fs::write(
            d.join("sim.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .unwrap();
        fs::create_dir_all(d.join("state")).unwrap();
        let out = fs::File::create(d.join("sim.out")).unwrap();
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("ipmi_sim (Debian package openipmi)");
        // ready once it listens on its UDP port
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = Command::new("ss")
                .args(["-Hlun", &format!("sport = :{port}")])
                .output()
                .unwrap();
            if !o.stdout.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim does not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        IpmiSim {
            child,
            port,
            dir: d,
            _tmp: tmp,
        }
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("chassis.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

#[test]
fn ipmi_power_and_pxe_once_reach_ipmi_sim_through_ipmitool() {
    let sim = IpmiSim::start();
    let dir = Tmp::new("ipmi");
    let r = root(dir.path());
    write_private(
        &r.join("bmc-credentials.json"),
        &format!(
            r#"{{"bmcs": {{"ipmi://127.0.0.1:{}": {{"user": "admin", "password": "Ipmi-pw-55", "cipher_suite": 3}}}}}}"#,
            sim.port
        ),
    );
    let bmc = format!("ipmi://127.0.0.1:{}", sim.port);
    assert_eq!(
        cli(&r, &["add", "--mac", "52:54:00:bb:00:01", "--bmc", &bmc]).code,
        0
    );
    let status = |want: &str| {
        let out = cli(&r, &["power", "1", "status", "--json"]);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v[0]["power"], want, "{v}");
    };
    status("off");
    assert_eq!(cli(&r, &["power", "1", "on"]).code, 0);
    status("on");
    assert!(
        sim.calls().contains(&"0x20 set power 1".to_string()),
        "{:?}",
        sim.calls()
    );
    let out = cli(&r, &["power", "1", "cycle"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("power-cycled"));
    // ipmi_sim powers off, then on again once off is seen
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = sim.calls();
        let off = c.iter().rposition(|l| l == "0x20 set power 0");
        let on = c.iter().rposition(|l| l == "0x20 set power 1");
        if matches!((off, on), (Some(a), Some(b)) if b > a) {
            break;
        }
        assert!(Instant::now() < deadline, "no power cycle: {c:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cli(&r, &["power", "1", "off"]).code, 0);
    status("off");

    // reinstall: PXE once, then on (it was off)
    let n = sim.calls().len();
    let out = cli(&r, &["reinstall", "1", "--state", "img1"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("network boot once (BIOS), was off, powered on"),
        "{}",
        out.stdout
    );
    let calls = sim.calls()[n..].to_vec();
    let boot = calls
        .iter()
        .position(|l| l == "0x20 set boot pxe")
        .expect("boot pxe");
    let on = calls
        .iter()
        .position(|l| l == "0x20 set power 1")
        .expect("power on");
    assert!(boot < on, "{calls:?}");
    status("on");

    // a wrong password: a clear error, not the password
    write_private(
        &r.join("bmc-credentials.json"),
        &format!(
            r#"{{"bmcs": {{"ipmi://127.0.0.1:{}": {{"user": "admin", "password": "wrong-Pw-99", "cipher_suite": 3}}}}}}"#,
            sim.port
        ),
    );
    let out = cli(&r, &["power", "1", "status"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("wrong user or password"),
        "{}",
        out.stdout
    );
    no_secret_on_disk(&r);
}

#[test]
fn ipmi_password_never_on_the_command_line() {
    let dir = Tmp::new("argv");
    let r = root(dir.path());
    // a stand-in ipmitool: records its arguments and whether it got the
    // password in its environment; answers like ipmitool
    let fake = dir.path().join("ipmitool");
    let rec = dir.path().join("argv.log");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"ARGS $*\" >> {0}\n[ \"$IPMI_PASSWORD\" = Ipmi-pw-55 ] && echo ENV-OK >> {0}\n\
             for a; do [ \"$prev\" = -f ] && echo \"FILE $(cat \"$a\")\" >> {0}; prev=$a; done\n\
             echo 'Chassis Power is on'\n",
            rec.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    write_private(
        &r.join("bmc-credentials.json"),
        r#"{"default": {"user": "admin", "password": "Ipmi-pw-55"},
            "bmcs": {"ipmi://10.9.9.2": {"password_file": "pw"}}}"#,
    );
    write_private(&r.join("pw"), "Ipmi-pw-55\n");
    for (mac, bmc) in [
        ("52:54:00:cc:00:01", "ipmi://10.9.9.1"),
        ("52:54:00:cc:00:02", "ipmi://10.9.9.2"),
    ] {
        assert_eq!(cli(&r, &["add", "--mac", mac, "--bmc", bmc]).code, 0);
    }
    let out = cli_env(
        &r,
        &["power", "1", "2", "status", "--jobs", "2"],
        &[("KIWISPRAY_IPMITOOL", fake.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let log = fs::read_to_string(&rec).unwrap();
    let args: Vec<&str> = log.lines().filter(|l| l.starts_with("ARGS")).collect();
    assert_eq!(args.len(), 2, "{log}");
    for a in &args {
        assert!(
            !a.contains("Ipmi-pw-55"),
            "password on the command line: {a}"
        );
        assert!(!a.contains(" -P "), "{a}");
        assert!(
            a.contains("-I lanplus") && a.ends_with("power status"),
            "{a}"
        );
    }
    // one got it in the environment (-E), the other reads the file (-f)
    assert!(args.iter().any(|a| a.contains(" -E ")), "{log}");
    assert!(args.iter().any(|a| a.contains(" -f ")), "{log}");
    assert_eq!(log.matches("ENV-OK").count(), 1, "{log}");
    assert!(log.contains("FILE Ipmi-pw-55"), "{log}");
    no_secret_on_disk(&r);
}

#[test]
fn power_runs_at_most_jobs_at_once_with_a_timeout_per_host() {
    let dir = Tmp::new("jobs");
    let r = root(dir.path());
    let fake = dir.path().join("ipmitool");
    let live = dir.path().join("live");
    fs::create_dir_all(&live).unwrap();
    // each call sleeps 1 s; the host at 10.9.0.5 never answers
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \"$*\" in *10.9.0.5*) exec sleep 30;; esac\n\
             t={0}/$$; touch $t; ls {0} | wc -l >> {0}.peak\nsleep 1\nrm -f $t\necho 'Chassis Power is off'\n",
            live.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    write_private(
        &r.join("bmc-credentials.json"),
        r#"{"default": {"user": "u", "password": "Ipmi-pw-55"}}"#,
    );
    for i in 1..=6 {
        let mac = format!("52:54:00:dd:00:0{i}");
        let bmc = format!("ipmi://10.9.0.{i}");
        assert_eq!(cli(&r, &["add", "--mac", &mac, "--bmc", &bmc]).code, 0);
    }
    let start = Instant::now();
    let out = cli_env(
        &r,
        &[
            "power",
            "--where",
            "bmc=ipmi://*",
            "status",
            "--jobs",
            "2",
            "--timeout",
            "4",
            "--json",
        ],
        &[("KIWISPRAY_IPMITOOL", fake.to_str().unwrap())],
    );
    let took = start.elapsed();
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let ok: Vec<bool> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["ok"] == true)
        .collect();
    assert_eq!(ok, [true, true, true, true, false, true], "{v}");
    assert!(v[4]["error"].as_str().unwrap().contains("4 s"), "{v}");
    let peak = fs::read_to_string(format!("{}.peak", live.display())).unwrap();
    let max = peak
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .max()
        .unwrap();
    assert!(max <= 2, "more than 2 at once: {peak}");
    // 5 hosts of 1 s two at a time, and one of 4 s: well under 6 x 1 s + 30 s
    assert!(took < Duration::from_secs(12), "{took:?}");
}

// --- the web servers -------------------------------------------------------------

fn fetch(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    r.read_to_string(&mut text).unwrap();
    (code, text)
}

#[test]
fn bmc_credentials_json_is_never_served_by_nginx_or_lighttpd() {
    for web in ["nginx", "lighttpd"] {
        let stack = common::Stack::start_with(common::Options {
            prepare: Some(Box::new(|root: &Path| {
                let text = format!(r#"{{"default": {{"user": "a", "password": "{PASSWORD}"}}}}"#);
                write_private(&root.join("bmc-credentials.json"), &text);
                fs::create_dir_all(root.join("images/img1")).unwrap();
                // even where an operator put a copy among the images
                fs::write(root.join("images/img1/bmc-credentials.json"), &text).unwrap();
                fs::write(root.join("images/img1/other.json"), "{}").unwrap();
            })),
            env: vec![("WEB".into(), web.into())],
            ..Default::default()
        });
        // the control: a file beside it is served
        assert_eq!(fetch(stack.port, "/images/img1/other.json").0, 200, "{web}");
        for path in [
            "/bmc-credentials.json",
            "/images/img1/bmc-credentials.json",
            "/images/img1/%62mc-credentials.json",
            "/images/img1/./bmc-credentials.json",
            "/images/../bmc-credentials.json",
        ] {
            let (code, body) = fetch(stack.port, path);
            assert!((400..500).contains(&code), "{web} {path}: {code}");
            assert!(!body.contains(PASSWORD), "{web} {path}: {body}");
        }
    }
}

#[test]
fn rollout_power_cycle_kicks_each_wave_through_its_bmcs() {
    let dir = Tmp::new("rollout");
    let r = root(dir.path());
    let fake = dir.path().join("ipmitool");
    let rec = dir.path().join("calls.log");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *'power status') echo 'Chassis Power is off';; esac\n",
            rec.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    write_private(
        &r.join("bmc-credentials.json"),
        r#"{"default": {"user": "u", "password": "Ipmi-pw-55"}}"#,
    );
    for i in 1..=3 {
        let mac = format!("52:54:00:ee:00:0{i}");
        let meta = r#"{"rack": "R9"}"#;
        let mut args = vec!["add", "--mac", &mac, "--meta", meta];
        let bmc = format!("ipmi://10.8.0.{i}");
        if i < 3 {
            args.extend(["--bmc", &bmc]);
        }
        assert_eq!(cli(&r, &args).code, 0);
    }
    // a host without a BMC: the rollout does not start
    let out = cli(
        &r,
        &[
            "rollout",
            "--where",
            "metadata.rack=R9",
            "--state",
            "img1",
            "--batch",
            "1",
            "--power-cycle",
            "--yes",
        ],
    );
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("host 3: no BMC"), "{}", out.stderr);
    assert!(!r.join(".kiwispray-rollout.json").exists());

    // two hosts with BMCs, one wave each: the first is set and kicked, the
    // second waits for it
    let mut child = Command::new(BIN)
        .arg("--root")
        .arg(&r)
        .args([
            "rollout",
            "--where",
            "metadata.rack=R9 bmc=ipmi://*",
            "--state",
            "img1",
            "--batch",
            "1",
        ])
        .args(["--power-cycle", "--yes", "--poll", "1"])
        .env("KIWISPRAY_IPMITOOL", &fake)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut calls = String::new();
    while !calls.contains("power on") {
        assert!(Instant::now() < deadline, "wave 1 not kicked: {calls}");
        std::thread::sleep(Duration::from_millis(200));
        calls = fs::read_to_string(&rec).unwrap_or_default();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let calls = fs::read_to_string(&rec).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 3, "{calls}");
    assert!(
        lines[0].contains("-H 10.8.0.1") && lines[0].ends_with("chassis bootdev pxe"),
        "{calls}"
    );
    assert!(
        lines[1].ends_with("power status") && lines[2].ends_with("power on"),
        "{calls}"
    );
    assert!(
        !calls.contains("10.8.0.2"),
        "the second wave was kicked early: {calls}"
    );
    assert!(
        stdout.contains("wave 1: host 1: network boot once (BIOS), was off, powered on"),
        "{stdout}"
    );
    let db: Value =
        serde_json::from_str(&fs::read_to_string(r.join("known_hosts.json")).unwrap()).unwrap();
    assert_eq!(
        (db[0]["state"].as_str(), db[1]["state"].as_str()),
        (Some("img1"), Some("new"))
    );
    let rec_file = fs::read_to_string(r.join(".kiwispray-rollout.json")).unwrap();
    assert!(rec_file.contains("\"power_cycle\": true"), "{rec_file}");
    no_secret_on_disk(&r);
}

#[test]
fn reinstall_asks_an_efi_boot_for_a_host_last_seen_booting_uefi() {
    let stack = common::Stack::start_with(common::Options {
        prepare: Some(Box::new(|root: &Path| {
            fs::create_dir_all(root.join("images/img1")).unwrap();
        })),
        ..Default::default()
    });
    // two machines boot through nginx: one with UEFI, one with BIOS
    for (mac, platform) in [
        ("52:54:00:ff:00:01", "efi"),
        ("52:54:00:ff:00:02", "pcbios"),
    ] {
        let q = format!(
            "/bootstrap?net0={}&dhcp_mac={}&serial=&uuid=&platform={platform}&buildarch=x86_64",
            common::enc(mac),
            common::enc(mac)
        );
        assert_eq!(stack.get(&q).status, 200);
    }
    let r = stack.root.clone();
    let dir = Tmp::new("efi");
    let fake = dir.path().join("ipmitool");
    let rec = dir.path().join("calls.log");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *'power status') echo 'Chassis Power is on';; esac\n",
            rec.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    write_private(
        &r.join("bmc-credentials.json"),
        r#"{"default": {"user": "u", "password": "Ipmi-pw-55"}}"#,
    );
    assert_eq!(cli(&r, &["set", "1", "--bmc", "ipmi://10.6.0.1"]).code, 0);
    assert_eq!(cli(&r, &["set", "2", "--bmc", "ipmi://10.6.0.2"]).code, 0);
    let out = cli_env(
        &r,
        &["reinstall", "1", "2", "--state", "img1", "--yes"],
        &[("KIWISPRAY_IPMITOOL", fake.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("network boot once (UEFI), power-cycled"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("network boot once (BIOS), power-cycled"),
        "{}",
        out.stdout
    );
    let calls = fs::read_to_string(&rec).unwrap();
    let one: Vec<&str> = calls
        .lines()
        .filter(|l| l.contains("-H 10.6.0.1 "))
        .collect();
    let two: Vec<&str> = calls
        .lines()
        .filter(|l| l.contains("-H 10.6.0.2 "))
        .collect();
    assert!(
        one[0].ends_with("chassis bootdev pxe options=efiboot"),
        "{calls}"
    );
    assert!(two[0].ends_with("chassis bootdev pxe"), "{calls}");
    assert!(
        one[2].ends_with("power cycle") && two[2].ends_with("power cycle"),
        "{calls}"
    );
    // the next boots install: the handler sees the state
    assert_eq!(stack.field(1, "state"), "img1");
    assert_eq!(stack.field(2, "state"), "img1");
    no_secret_on_disk(&r);
}
