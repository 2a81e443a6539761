//! Observability through the real stack (nginx or lighttpd, set by
//! KIWISPRAY_WEB, and kiwispray-fcgi), the real CLI, Prometheus's own
//! `promtool` and a real browser (headless Chromium, driven over plain
//! WebDriver HTTP by `chromedriver`):
//!
//! - `/metrics` passes `promtool check metrics`, and after a scripted life
//!   cycle (registrations, CLI state changes, install boots, `/finish`,
//!   `/fail`, a conflict, a refused state, an overdue install) its figures
//!   match the database, the event log and the requests made; its counters
//!   survive a restart of the handler and add up over CGI processes
//!   (lighttpd's mod_cgi, one process per request).
//! - `/api/v1/` serves the hosts exactly as `kiwispray-hosts list --json`
//!   prints them, never a bootid, with incremental events (`?since=`), and
//!   it, `/metrics` and `/ui/` are refused to clients other than localhost.
//! - `/ui/` in Chromium, with 10,000 hosts: the table shows hosts and
//!   states and highlights held, failed and overdue hosts; search filters;
//!   a host's detail opens with its timeline; an install, a registration
//!   and a removal that happen meanwhile show up without a reload; no
//!   request leaves for another origin. With `KIWISPRAY_SCREENSHOTS=<dir>` it saves the
//!   screenshots the README shows.
//! - The README's scrape config and sample alerts pass `promtool check`.

mod common;

use common::{bin_dir, web, Options, Reply, Stack};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BOOTID3: &str = "0123456789abcdef0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mac(i: u32) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn mac_q(i: u32) -> String {
    mac(i).replace(':', "-")
}

/// A root with `n` hosts (at least 4): 1 and 2 in state `img`, 3 in `img`
/// with an install that started two hours ago (deadline 60 min: overdue),
/// 4 in the unbootable state `a/b`; the rest `finished`, every tenth `new`.
/// Image `img`'s host.tmpl prints the bootid on a line of its own.
fn prepare(n: u32) -> Options {
    Options {
        prepare: Some(Box::new(move |root: &Path| {
            let hosts: Vec<Value> = (1..=n)
                .map(|i| {
                    let state = match i {
                        1..=3 => "img",
                        4 => "a/b",
                        i if i % 10 == 0 => "new",
                        _ => "finished",
                    };
                    json!({
                        "id": i, "macs": mac(i), "serial": format!("SN{i:05}"),
                        "uuid": "", "hostname": format!("node-{i:05}"), "state": state,
                        "metadata": {"rack": format!("r{}", i / 40)}
                    })
                })
                .collect();
            fs::write(
                root.join("known_hosts.json"),
                serde_json::to_string_pretty(&hosts).unwrap(),
            )
            .unwrap();
            let started = now() - 7200;
            fs::write(
                root.join(".known_hosts.json.runtime"),
                format!(
                    "{}\n",
                    json!({"id": 3, "bootid": BOOTID3, "attempts": [
                        {"n": 1, "state": "img", "started": started, "deadline_minutes": 60}
                    ]})
                ),
            )
            .unwrap();
            let img = root.join("images/img");
            fs::create_dir_all(&img).unwrap();
            fs::write(
                img.join("host.tmpl"),
                "#!ipxe\necho INSTALL @state@\necho BOOTID @bootid@\n",
            )
            .unwrap();
        })),
        ..Options::default()
    }
}

/// Runs `kiwispray-hosts --root ROOT ARGS` and returns stdout; fails the
/// test on a non-zero exit.
fn cli(root: &Path, args: &[&str]) -> String {
    let out = Command::new(bin_dir().join("kiwispray-hosts"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run kiwispray-hosts");
    assert!(
        out.status.success(),
        "kiwispray-hosts {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn list_json(root: &Path) -> Vec<Value> {
    serde_json::from_str::<Value>(&cli(root, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Counts requests to the handler, by path and status, as the test sends
/// them.
#[derive(Default)]
struct Sent(BTreeMap<(String, u16), u64>);

impl Sent {
    fn get(&mut self, s: &Stack, target: &str) -> Reply {
        let r = s.get_as_pxe(target);
        let path = target.split('?').next().unwrap().to_string();
        *self.0.entry((path, r.status)).or_default() += 1;
        r
    }
}

fn bootid_of(r: &Reply) -> String {
    let text = r.text();
    text.lines()
        .find_map(|l| l.strip_prefix("echo BOOTID "))
        .unwrap_or_else(|| panic!("not an install script: {text}"))
        .to_string()
}

/// Parses the text exposition into series -> value (no comments).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            )
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// `promtool check metrics` on `text`: its exit status and output.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; make deps-test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits for the handler's counters to reach the shared file, then reads
/// `/metrics` (the scrape itself flushes the handler that answers it).
fn scrape(s: &Stack) -> (String, BTreeMap<String, f64>) {
    let r = s.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    let m = parse_metrics(&text);
    (text, m)
}

#[test]
fn metrics_pass_promtool_and_match_the_database_after_a_life_cycle() {
    let s = Stack::start_with(prepare(6));
    let mut sent = Sent::default();
    // Two new machines register, and one of them boots again: wait.
    for i in [101, 102, 101] {
        let r = sent.get(&s, &format!("/bootstrap?net0={}", mac_q(i)));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The operator sets one to img via the CLI; it installs and finishes;
    // its next boot is the local disk.
    cli(&s.root, &["set", "7", "--state", "img"]);
    let b = bootid_of(&sent.get(&s, &format!("/bootstrap?net0={}", mac_q(101))));
    assert_eq!(
        sent.get(&s, &format!("/finish?id=7&bootid={b}")).status,
        200
    );
    let r = sent.get(&s, &format!("/bootstrap?net0={}", mac_q(101)));
    assert!(r.text().contains("finished"), "{}", r.text());
    // Host 1 installs and finishes, host 2 installs and fails (held), and
    // boots again while held.
    let b1 = bootid_of(&sent.get(&s, &format!("/bootstrap?net0={}", mac_q(1))));
    let b2 = bootid_of(&sent.get(&s, &format!("/bootstrap?net0={}", mac_q(2))));
    assert_eq!(
        sent.get(&s, &format!("/finish?id=1&bootid={b1}")).status,
        200
    );
    // A wrong bootid is refused and counted with its status.
    assert_eq!(
        sent.get(&s, &format!("/finish?id=2&bootid={}", "f".repeat(32)))
            .status,
        403
    );
    assert_eq!(
        sent.get(&s, &format!("/fail?id=2&bootid={b2}&reason=disk+full"))
            .status,
        200
    );
    sent.get(&s, &format!("/bootstrap?net0={}", mac_q(2)));
    // A machine with the MACs of two hosts is a conflict; host 4's state
    // cannot be booted; host 5 is finished.
    sent.get(
        &s,
        &format!("/bootstrap?net0={}&net1={}", mac_q(5), mac_q(6)),
    );
    sent.get(&s, &format!("/bootstrap?net0={}", mac_q(4)));
    sent.get(&s, &format!("/bootstrap?net0={}", mac_q(5)));
    // A chain through the CLI, and a host 1 reinstall in progress.
    cli(&s.root, &["set", "1", "--state", "img,finished"]);
    sent.get(&s, &format!("/bootstrap?net0={}", mac_q(1)));

    let (text, m) = scrape(&s);
    let (ok, out) = promtool(&text);
    assert!(ok && out.trim().is_empty(), "promtool: {out}\n{text}");

    // Gauges against the database as the CLI sees it.
    let hosts = list_json(&s.root);
    assert_eq!(metric(&m, "kiwispray_database_hosts"), hosts.len() as f64);
    let mut by_state: BTreeMap<String, f64> = BTreeMap::new();
    let mut held: BTreeMap<String, f64> = BTreeMap::new();
    for h in &hosts {
        let rt = &h["runtime"];
        if rt["held"].is_null() {
            let first = h["state"].as_str().unwrap().split(',').next().unwrap();
            *by_state.entry(first.to_string()).or_default() += 1.0;
        } else {
            *held
                .entry(rt["held"]["cause"].as_str().unwrap().to_string())
                .or_default() += 1.0;
        }
    }
    let shown: BTreeMap<String, f64> = m
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("kiwispray_hosts{state=\"")
                .map(|s| (s.trim_end_matches("\"}").to_string(), *v))
        })
        .collect();
    assert_eq!(shown, by_state, "{text}");
    assert_eq!(held.get("failed"), Some(&1.0));
    assert_eq!(metric(&m, "kiwispray_hosts_held{cause=\"failed\"}"), 1.0);
    let count = |f: &dyn Fn(&Value) -> bool| hosts.iter().filter(|h| f(h)).count() as f64;
    assert_eq!(
        metric(&m, "kiwispray_installs_in_progress"),
        count(&|h| h["runtime"]["installing"] == true)
    );
    assert_eq!(
        metric(&m, "kiwispray_installs_in_progress"),
        2.0,
        "hosts 1, 3"
    );
    assert_eq!(
        metric(&m, "kiwispray_installs_overdue"),
        count(&|h| h["runtime"]["overdue"] == true)
    );
    assert_eq!(metric(&m, "kiwispray_installs_overdue"), 1.0, "host 3");
    let size = fs::metadata(s.root.join("known_hosts.json")).unwrap().len();
    assert_eq!(
        metric(&m, "kiwispray_database_size_bytes{file=\"hosts\"}"),
        size as f64
    );

    // Lifecycle counters against the event log.
    let events = s.events();
    let of = |cause: &str| events.iter().filter(|e| e["cause"] == cause).count() as f64;
    assert_eq!(
        metric(&m, "kiwispray_installs_finished_total{image=\"img\"}"),
        of("finish")
    );
    assert_eq!(of("finish"), 2.0);
    assert_eq!(
        metric(&m, "kiwispray_installs_failed_total{image=\"img\"}"),
        of("fail")
    );
    assert_eq!(
        metric(
            &m,
            "kiwispray_install_duration_seconds_count{image=\"img\"}"
        ),
        2.0
    );
    let total_events: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("kiwispray_events_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total_events, events.len() as f64);

    // Boots by outcome, as scripted above.
    for (outcome, n) in [
        ("registered", 2.0),
        ("wait", 1.0),
        ("install", 4.0),
        ("local_disk", 2.0),
        ("held", 1.0),
        ("conflict", 1.0),
        ("refused", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!("kiwispray_boots_total{{outcome=\"{outcome}\"}}")
            ),
            n,
            "{outcome}\n{text}"
        );
    }
    // Requests by path and status: every one the test sent.
    for ((path, status), n) in &sent.0 {
        assert_eq!(
            metric(
                &m,
                &format!("kiwispray_http_requests_total{{path=\"{path}\",status=\"{status}\"}}")
            ),
            *n as f64,
            "{path} {status}\n{text}"
        );
    }
    let bootstraps = sent.0[&("/bootstrap".to_string(), 200)] as f64;
    assert_eq!(
        metric(
            &m,
            "kiwispray_http_request_duration_seconds_count{path=\"/bootstrap\"}"
        ),
        bootstraps
    );
    assert!(metric(&m, "kiwispray_store_commit_duration_seconds_count") >= 8.0);

    // The counters survive a restart of the handler (and the web server)
    // on the same database: they only grow.
    // (A process flushes its counts at most FLUSH_INTERVAL after counting
    // them; what a killed process had not flushed is lost.)
    let file = s.root.join(".known_hosts.json.metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(&file)
        .unwrap_or_default()
        .contains("path=\\\"/metrics\\\"")
    {
        assert!(Instant::now() < deadline, "the scrape was never flushed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut s = s;
    s.stop();
    let old = s.root.clone();
    let s2 = Stack::start_with(Options {
        prepare: Some(Box::new(move |root: &Path| {
            for f in [
                "known_hosts.json",
                ".known_hosts.json.runtime",
                ".known_hosts.json.metrics",
                "events.jsonl",
            ] {
                fs::copy(old.join(f), root.join(f)).unwrap();
            }
            fs::create_dir_all(root.join("images/img")).unwrap();
        })),
        ..Options::default()
    });
    drop(s);
    let (text2, m2) = scrape(&s2);
    assert!(promtool(&text2).0);
    for (k, v) in m.iter().filter(|(k, _)| {
        k.starts_with("kiwispray_boots_total")
            || k.starts_with("kiwispray_http_requests_total")
            || k.starts_with("kiwispray_installs_finished_total")
    }) {
        assert!(metric(&m2, k) >= *v, "{k} was {v}, is {}", metric(&m2, k));
    }
    assert_eq!(
        metric(
            &m2,
            "kiwispray_http_requests_total{path=\"/metrics\",status=\"200\"}"
        ),
        metric(
            &m,
            "kiwispray_http_requests_total{path=\"/metrics\",status=\"200\"}"
        ) + 1.0,
        "the first scrape is counted"
    );
}

/// Drops the `seconds` of open attempts, which grow while the test runs.
fn settled(mut v: Value) -> Value {
    if let Some(hosts) = v.as_array_mut() {
        for h in hosts {
            if let Some(a) = h["runtime"]["attempts"].as_array_mut() {
                for a in a.iter_mut().filter(|a| a["outcome"].is_null()) {
                    a.as_object_mut().unwrap().remove("seconds");
                }
            }
        }
    }
    v
}

#[test]
fn api_v1_serves_the_cli_json_incremental_events_and_only_to_localhost() {
    let s = Stack::start_with(prepare(30));
    let b = bootid_of(&s.get_as_pxe(&format!("/bootstrap?net0={}", mac_q(1))));
    let r = s.get("/api/v1/hosts");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let text = r.text();
    assert!(
        !text.contains(&b) && !text.contains(BOOTID3),
        "a bootid leaked"
    );
    assert!(!text.contains("bootid"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["api"], "v1");
    let cli_hosts = Value::Array(list_json(&s.root));
    assert_eq!(settled(v["hosts"].clone()), settled(cli_hosts));

    // The summary adds up to the hosts.
    let sum: Value = serde_json::from_str(&s.get("/api/v1/summary").text()).unwrap();
    let states: u64 = sum["states"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(states + sum["held"].as_u64().unwrap(), 30);
    assert_eq!(sum["hosts"], 30);
    assert_eq!(sum["installing"], 2);
    assert_eq!(sum["overdue"], 1);
    assert_eq!(sum["states"]["new"], 3, "{sum}");

    // One host with its events, then only what was appended since.
    let d: Value = serde_json::from_str(&s.get("/api/v1/hosts/1").text()).unwrap();
    assert_eq!(d["host"]["hostname"], "node-00001");
    let causes: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["install-boot"]);
    let next = d["next"].as_u64().unwrap();
    assert_eq!(
        next,
        fs::metadata(s.root.join("events.jsonl")).unwrap().len()
    );
    let r = s.get(&format!("/finish?id=1&bootid={b}"));
    assert_eq!(r.status, 200);
    cli(&s.root, &["set", "2", "--hostname", "renamed"]);
    let d: Value =
        serde_json::from_str(&s.get(&format!("/api/v1/hosts/1?since={next}")).text()).unwrap();
    let fresh: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert_eq!(fresh, ["finish"], "host 2's event is not host 1's");
    assert_eq!(d["host"]["state"], "finished");
    assert_eq!(d["reset"], false);
    let d: Value = serde_json::from_str(&s.get("/api/v1/hosts/1?since=99999999").text()).unwrap();
    assert_eq!(d["reset"], true);
    assert_eq!(d["events"].as_array().unwrap().len(), 2);

    // Bad input: a one-line 4xx.
    for (target, status, what) in [
        ("/api/v1/hosts/999", 404, "no host with id 999"),
        ("/api/v1/hosts/x1", 400, "not a host id"),
        ("/api/v1/hosts/1?since=-1", 400, "not an offset"),
        ("/api/v1/hosts/1?since=1&since=2", 400, "more than once"),
        ("/api/v1/nothing", 404, "no such path"),
    ] {
        let r = s.get(target);
        assert_eq!(r.status, status, "{target}: {}", r.text());
        let line = r.assert_one_line_4xx(what);
        assert!(line.contains(what), "{target}: {line}");
    }
    let r = s.request("POST", "/api/v1/hosts", &[], b"x=1");
    assert!(
        r.status == 405 || (web() == "lighttpd" && r.status == 403),
        "{}",
        r.status
    );

    // The UI's files are served, with their types.
    let r = s.get("/ui/");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("<script src=\"app.js\">"));
    let r = s.get("/ui/app.js");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().contains("javascript"));

    // Only localhost: a client on another address is refused.
    for target in ["/metrics", "/api/v1/hosts", "/ui/", "/ui/app.js", "/hosts"] {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--interface", "127.0.0.2"])
            .arg(format!("http://127.0.0.1:{}{target}", s.port))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403", "{target}");
    }
}

// --- the browser ---------------------------------------------------------

/// A WebDriver session with headless Chromium through chromedriver, over
/// plain HTTP/1.1 on loopback.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: common::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start() -> Browser {
        let port = common::free_port();
        let profile = common::TempDir::new("chromium");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (Debian package chromium-driver; make deps-test)");
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.call("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let dir = b._profile.path().display().to_string();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1320,760",
                         format!("--user-data-dir={dir}")]
            },
            "goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"}
        }}});
        let v = b.call("POST", "/session", Some(caps)).expect("new session");
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        // chromedriver may keep the connection open: read until the reply
        // is complete.
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let r = loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            out.extend_from_slice(&buf[..n]);
            match Reply::parse(&out, false) {
                Ok(r) if r.header("content-length").is_some() || n == 0 => break r,
                Ok(r) if r.header("transfer-encoding").is_some() => break r,
                Err(e) if n == 0 => return Err(e),
                _ => {}
            }
        };
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("{method} {path}: {} {v}", r.status));
        }
        Ok(v.get("value").cloned().unwrap_or(Value::Null))
    }

    fn cmd(&self, method: &str, what: &str, body: Value) -> Value {
        let path = format!("/session/{}{what}", self.session);
        let body = if method == "GET" { None } else { Some(body) };
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({"text": text}),
        );
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, what: &str, script: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.js(script) == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let status = self.js("return document.getElementById('status').textContent");
                panic!("{what}: not within {limit:?} (page status: {status})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG screenshot into `$KIWISPRAY_SCREENSHOTS`, if set.
    fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("KIWISPRAY_SCREENSHOTS") else {
            return;
        };
        let v = self.cmd("GET", "/screenshot", Value::Null);
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"));
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), png).unwrap();
    }

    /// Every request the browser started, as (URL, URL of the document
    /// that made it), from Chromium's performance log (DevTools
    /// `Network.requestWillBeSent`).
    fn requested_urls(&self) -> Vec<(String, String)> {
        let v = self.cmd("POST", "/se/log", json!({"type": "performance"}));
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e["message"].as_str()?).ok())
            .filter(|m| m["message"]["method"] == "Network.requestWillBeSent")
            .map(|m| {
                let p = &m["message"]["params"];
                let text = |v: &Value| v.as_str().unwrap_or("").to_string();
                (text(&p["request"]["url"]), text(&p["documentURL"]))
            })
            .collect()
    }
}

impl Browser {
    /// The page's console messages (errors include refused requests).
    fn console(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", json!({"type": "browser"}));
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn fleet_page_in_chromium_with_10000_hosts_filters_opens_details_and_follows_installs() {
    let s = Stack::start_with(prepare(10_000));
    // Host 2 installs and fails: held, failed.
    let b2 = bootid_of(&s.get_as_pxe(&format!("/bootstrap?net0={}", mac_q(2))));
    assert_eq!(
        s.get(&format!("/fail?id=2&bootid={b2}&reason=no+disk+found"))
            .status,
        200
    );
    let origin = format!("http://127.0.0.1:{}", s.port);
    let browser = Browser::start();
    let t0 = Instant::now();
    browser.go(&format!("{origin}/ui/"));
    browser.wait_for(
        "the table holds all hosts",
        "return document.getElementById('count').textContent === '10000 of 10000 hosts'",
        Duration::from_secs(60),
    );
    let loaded = t0.elapsed();

    // Only the rows in view are in the DOM; they show ids and states, and
    // the held, failed and overdue hosts are highlighted.
    let rows = browser.js(
        "return [...document.querySelectorAll('#rows .row')].map(r => \
         [Number(r.dataset.id), r.querySelector('.c-state').textContent, r.className])",
    );
    let rows = rows.as_array().unwrap();
    assert!(
        rows.len() > 10 && rows.len() < 200,
        "{} rows drawn",
        rows.len()
    );
    assert_eq!(rows[0], json!([1, "img", "row grid "]));
    assert_eq!(rows[1][1], "img");
    assert!(rows[1][2].as_str().unwrap().contains("failed"), "{rows:?}");
    assert!(rows[2][2].as_str().unwrap().contains("overdue"), "{rows:?}");
    assert_eq!(rows[3][1], "a/b");
    assert_eq!(rows[4][1], "finished");
    assert_eq!(rows[9][1], "new");
    let status3 =
        browser.js("return document.querySelector('.row[data-id=\"3\"] .c-status').textContent");
    assert!(
        status3.as_str().unwrap().starts_with("OVERDUE 2 h"),
        "{status3}"
    );
    let chips = browser.js(
        "return Object.fromEntries([...document.querySelectorAll('#summary .chip')].map(c => \
         [c.dataset.state, Number(c.querySelector('b').textContent)]))",
    );
    assert_eq!(chips["all"], 10_000);
    assert_eq!(chips["new"], 1000);
    assert_eq!(chips["held"], 1);
    assert_eq!(chips["failed"], 1);
    assert_eq!(chips["overdue"], 1);
    assert_eq!(chips["finished"], 10_000 - 1000 - 4);
    // A state's count filters the table on that state.
    browser.click("#summary .chip[data-state=\"new\"]");
    browser.wait_for(
        "filtered by the new chip",
        "return document.getElementById('count').textContent === '1000 of 10000 hosts' && \
         document.getElementById('search').value === 'state:new' && \
         document.querySelector('#rows .row').dataset.id === '10'",
        Duration::from_secs(5),
    );
    browser.click("#summary .chip[data-state=\"all\"]");

    // Sorting and filtering 10,000 hosts take well under a frame budget of
    // a second; scrolling to the end draws the last hosts.
    let refilter_ms = browser
        .js("const t = performance.now(); refilter(); return performance.now() - t")
        .as_f64()
        .unwrap();
    assert!(refilter_ms < 1000.0, "refilter took {refilter_ms} ms");
    browser.click("#head button[data-sort=\"hostname\"]");
    browser.click("#head button[data-sort=\"hostname\"]");
    browser.wait_for(
        "sorted by hostname, descending",
        "return document.querySelector('#rows .row').dataset.id === '10000'",
        Duration::from_secs(5),
    );
    browser.click("#head button[data-sort=\"id\"]");
    browser.js("const v = document.getElementById('viewport'); v.scrollTop = v.scrollHeight;");
    browser.wait_for(
        "the last host drawn after scrolling",
        "return !!document.querySelector('.row[data-id=\"10000\"]')",
        Duration::from_secs(5),
    );
    browser.js("document.getElementById('viewport').scrollTop = 0;");

    // Search filters (by hostname, then by serial).
    browser.type_into("#search", "node-04242");
    browser.wait_for(
        "search for one hostname",
        "return document.getElementById('count').textContent === '1 of 10000 hosts' && \
         document.querySelectorAll('#rows .row').length === 1 && \
         document.querySelector('#rows .row').dataset.id === '4242'",
        Duration::from_secs(5),
    );
    browser.js("const q = document.getElementById('search'); q.value = 'SN0999'; q.dispatchEvent(new Event('input'));");
    browser.wait_for(
        "search by serial prefix",
        "return document.getElementById('count').textContent === '10 of 10000 hosts'",
        Duration::from_secs(5),
    );
    browser.js("const q = document.getElementById('search'); q.value = ''; q.dispatchEvent(new Event('input'));");
    browser.wait_for(
        "search cleared",
        "return document.getElementById('count').textContent === '10000 of 10000 hosts'",
        Duration::from_secs(5),
    );

    // A host's detail: metadata, hold and its event timeline.
    browser.click(".row[data-id=\"2\"]");
    browser.wait_for(
        "host 2's detail",
        "return !document.getElementById('detail').hidden && \
         document.getElementById('detail-title').textContent === 'Host 2 (node-00002)' && \
         document.querySelectorAll('#events li').length === 3",
        Duration::from_secs(10),
    );
    let detail = browser
        .js("return document.getElementById('detail').textContent")
        .as_str()
        .unwrap()
        .to_string();
    for want in [
        "SN00002",
        "metadata.rack",
        "r0",
        "failed since",
        "no disk found",
        "install-boot",
        "hold",
    ] {
        assert!(detail.contains(want), "{want:?} not in {detail}");
    }
    browser.screenshot("fleet-failed-host.png");

    // Meanwhile host 1 starts an install and a new machine registers: both
    // show up without a reload, and host 1's open timeline grows.
    browser.click(".row[data-id=\"1\"]");
    browser.wait_for(
        "host 1's detail",
        "return document.getElementById('detail-title').textContent === 'Host 1 (node-00001)'",
        Duration::from_secs(10),
    );
    browser.js("window.__marker = 'not reloaded'");
    s.get_as_pxe(&format!("/bootstrap?net0={}", mac_q(1)));
    s.get_as_pxe(&format!("/bootstrap?net0={}", mac_q(20_001)));
    browser.wait_for(
        "the install and the registration appear",
        "const r = document.querySelector('.row[data-id=\"1\"] .c-status'); \
         return !!r && r.textContent.startsWith('installing ') && r.textContent.endsWith('(attempt 1)') && \
         document.getElementById('count').textContent === '10001 of 10001 hosts' && \
         [...document.querySelectorAll('#events li')].some(li => li.textContent.includes('install-boot'))",
        Duration::from_secs(20),
    );
    assert_eq!(browser.js("return window.__marker"), "not reloaded");
    browser.js("const q = document.getElementById('search'); q.value = 'img'; q.dispatchEvent(new Event('input'));");
    browser.wait_for(
        "filtered to img",
        "return document.getElementById('count').textContent === '3 of 10001 hosts'",
        Duration::from_secs(5),
    );
    browser.js("const q = document.getElementById('search'); q.value = ''; q.dispatchEvent(new Event('input'));");
    browser.click("#detail-close");
    browser.wait_for(
        "search cleared, detail closed",
        "return document.getElementById('count').textContent === '10001 of 10001 hosts' && \
         document.getElementById('detail').hidden",
        Duration::from_secs(5),
    );
    browser.screenshot("fleet-overview.png");

    // A host removed while its detail is open: the panel says so and the
    // table goes on refreshing.
    browser.js("const v = document.getElementById('viewport'); v.scrollTop = 4235 * 28;");
    browser.wait_for(
        "host 4242 in view",
        "return !!document.querySelector('.row[data-id=\"4242\"]')",
        Duration::from_secs(5),
    );
    browser.click(".row[data-id=\"4242\"]");
    browser.wait_for(
        "host 4242's detail",
        "return document.getElementById('detail-title').textContent === 'Host 4242 (node-04242)'",
        Duration::from_secs(10),
    );
    cli(&s.root, &["remove", "4242", "--yes"]);
    browser.wait_for(
        "the removal shows",
        "return document.getElementById('detail-title').textContent.includes('no host with id 4242') && \
         document.getElementById('count').textContent === '10000 of 10000 hosts' && \
         !document.querySelector('.row[data-id=\"4242\"]')",
        Duration::from_secs(20),
    );

    // No request left for another origin.
    // The page's own requests are all same-origin (or data: URLs), and
    // nothing in the browser went to any other network address (chrome://
    // pages, such as the start page before the first navigation, are the
    // browser's own and not network requests).
    let urls = browser.requested_urls();
    let ours = format!("{origin}/");
    assert!(
        urls.iter()
            .any(|(u, _)| u.starts_with(&format!("{origin}/api/v1/hosts/1?since="))),
        "{urls:?}"
    );
    let network = ["http:", "https:", "ws:", "wss:", "ftp:"];
    let foreign: Vec<&(String, String)> = urls
        .iter()
        .filter(|(u, doc)| {
            let same = u.starts_with(&ours) || u.starts_with("data:");
            (doc.starts_with(&ours) && !same)
                || (network.iter().any(|n| u.starts_with(n)) && !u.starts_with(&ours))
        })
        .collect();
    assert!(foreign.is_empty(), "requests to other origins: {foreign:?}");
    // Nor did the page try one that its Content-Security-Policy (only its
    // own origin) refused, or fail to load anything else.
    let console = browser.console();
    let refused: Vec<&String> = console
        .iter()
        .filter(|m| {
            m.contains("Content Security Policy")
                || m.contains("Refused to")
                // The removed host's 404 is the one expected failure.
                || (m.contains("Failed to load")
                    && !m.starts_with(&format!("{origin}/api/v1/hosts/4242?")))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the page tried other origins: {refused:?}"
    );
    let resources = browser.js(
        "return performance.getEntriesByType('resource').map(e => e.name)\
         .filter(n => !n.startsWith(location.origin + '/'))",
    );
    assert_eq!(resources, json!([]), "resource timing shows other origins");
    eprintln!(
        "fleet page: 10,000 hosts loaded in {loaded:?}, refilter+sort {refilter_ms:.1} ms, {} requests",
        urls.len()
    );
}

/// lighttpd with the shipped `lighttpd/kiwispray-cgi.conf`: every request
/// runs the handler as a process of its own, so every counter must come
/// from the shared file and the event log, never from one process's memory.
#[test]
fn metrics_add_up_across_cgi_processes_under_lighttpd_mod_cgi() {
    let dir = common::TempDir::new("cgi-metrics");
    let d = dir.path();
    let root = d.join("root");
    fs::create_dir_all(&root).unwrap();
    for sub in ["templates", "images"] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(common::repo().join(sub))
            .arg(root.join(sub))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cp -a {sub}");
    }
    (prepare(4).prepare.unwrap())(&root);
    let port = common::free_port();
    let ui = common::repo().join("ui");
    let site: String = fs::read_to_string(common::repo().join("lighttpd/kiwispray-cgi.conf"))
        .unwrap()
        .lines()
        .filter(|l| {
            Path::new("/proc/net/if_inet6").exists()
                || !l.starts_with("$SERVER[\"socket\"] == \"[::]")
        })
        .map(|l| {
            let l = if l.starts_with("var.kiwispray_root = ") {
                format!("var.kiwispray_root = \"{}\"", root.display())
            } else if l.starts_with("var.kiwispray_bin = ") {
                format!(
                    "var.kiwispray_bin = \"{}\"",
                    bin_dir().join("kiwispray-fcgi").display()
                )
            } else {
                l.replace(":5000", &format!(":{port}"))
                    .replace(
                        "/var/log/lighttpd/kiwispray.access.log",
                        &d.join("access.log").display().to_string(),
                    )
                    .replace("/usr/share/kiwispray/ui/", &format!("{}/", ui.display()))
            };
            format!("{l}\n")
        })
        .collect();
    fs::write(d.join("site.conf"), site).unwrap();
    fs::create_dir_all(d.join("docroot")).unwrap();
    fs::write(
        d.join("lighttpd.conf"),
        format!(
            "server.document-root = \"{d}/docroot\"\nserver.bind = \"{d}/main.sock\"\n\
             server.errorlog = \"{d}/error.log\"\nserver.upload-dirs = ( \"{d}\" )\n\
             include \"{d}/site.conf\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut web = Command::new("lighttpd")
        .arg("-D")
        .arg("-f")
        .arg(d.join("lighttpd.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lighttpd is installed");
    let get = |target: &str| -> Reply {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.write_all(
                    format!("GET {target} HTTP/1.0\r\nHost: 127.0.0.1:5000\r\n\r\n").as_bytes(),
                )?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out)
            });
            match attempt {
                Ok(out) => return Reply::parse(&out, false).unwrap(),
                Err(e) if Instant::now() > deadline => panic!("GET {target}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A new machine registers and then waits twice; host 1 installs
        // and finishes: each request a process of its own.
        for _ in 0..3 {
            assert_eq!(get(&format!("/bootstrap?net0={}", mac_q(50))).status, 200);
        }
        let b = bootid_of(&get(&format!("/bootstrap?net0={}", mac_q(1))));
        assert_eq!(get(&format!("/finish?id=1&bootid={b}")).status, 200);
        // With at most one install at a time (host 3's is open), host 2's
        // install boot is deferred.
        fs::write(root.join("kiwispray.json"), r#"{"max_installs": 1}"#).unwrap();
        let r = get(&format!("/bootstrap?net0={}", mac_q(2)));
        assert!(!r.text().contains("echo BOOTID"), "{}", r.text());
        get("/metrics");
        let r = get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        let (ok, out) = promtool(&r.text());
        assert!(ok && out.trim().is_empty(), "{out}");
        let m = parse_metrics(&r.text());
        assert_eq!(
            metric(&m, "kiwispray_boots_total{outcome=\"registered\"}"),
            1.0
        );
        assert_eq!(metric(&m, "kiwispray_boots_total{outcome=\"wait\"}"), 2.0);
        assert_eq!(
            metric(&m, "kiwispray_boots_total{outcome=\"install\"}"),
            1.0
        );
        assert_eq!(
            metric(&m, "kiwispray_boots_total{outcome=\"deferred\"}"),
            1.0
        );
        assert_eq!(
            metric(
                &m,
                "kiwispray_http_requests_total{path=\"/bootstrap\",status=\"200\"}"
            ),
            5.0
        );
        assert_eq!(
            metric(
                &m,
                "kiwispray_http_requests_total{path=\"/metrics\",status=\"200\"}"
            ),
            1.0,
            "the first scrape, a process of its own"
        );
        assert_eq!(
            metric(&m, "kiwispray_installs_finished_total{image=\"img\"}"),
            1.0
        );
        assert!(metric(&m, "kiwispray_store_commit_duration_seconds_count") >= 3.0);
        // The API's paths reach the handler through the CGI alias
        // (PATH_INFO), and the page's files are served.
        let r = get("/api/v1/hosts/1?since=0");
        assert_eq!(r.status, 200, "{}", r.text());
        let v: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(v["host"]["state"], "finished");
        assert_eq!(get("/api/v1/summary").status, 200);
        assert_eq!(get("/ui/").status, 200);
        assert_eq!(get("/ui/app.js").status, 200);
        // Regression: the CGI config sent /fail to no file (lighttpd's
        // 404); it reaches the handler, which refuses a wrong bootid.
        let r = get("/fail?id=1&bootid=00000000000000000000000000000000");
        assert_eq!(r.status, 409, "{}", r.text());
        assert!(r.text().contains("not being installed"), "{}", r.text());
    }));
    let _ = web.kill();
    let _ = web.wait();
    if let Err(e) = result {
        eprintln!(
            "lighttpd error log:\n{}",
            fs::read_to_string(d.join("error.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}

/// The `yaml` blocks of the README's Metrics section, in order.
fn readme_yaml_blocks() -> Vec<String> {
    let readme = fs::read_to_string(common::repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section")
        .split("\n## ")
        .next()
        .unwrap()
        .to_string();
    section
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn readme_scrape_config_and_sample_alerts_pass_promtool() {
    let blocks = readme_yaml_blocks();
    assert_eq!(blocks.len(), 2, "a scrape config and the alert rules");
    let dir = common::TempDir::new("promtool");
    let config = dir.path().join("prometheus.yml");
    let rules = dir.path().join("rules.yml");
    fs::write(&config, &blocks[0]).unwrap();
    fs::write(&rules, &blocks[1]).unwrap();
    for (what, file) in [("config", &config), ("rules", &rules)] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(file)
            .output()
            .expect("promtool is installed");
        assert!(
            out.status.success(),
            "promtool check {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        blocks[1].contains("expr: kiwispray_installs_overdue > 0")
            && blocks[1].contains("for: 10m")
    );
}
