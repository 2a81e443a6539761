//! Integration tests of `kiwispray-hosts`: the real binary against
//! temporary deployment roots, for every command and its error paths;
//! imports of synthetic KIWI builds of each naming generation; previews
//! compared with what the real handler serves; CLI edits racing with
//! machines registering through nginx; and attended KIWI installers and
//! per-host install disks.
//!
//! Outside tools these tests need: `xz`, `tar`, `sha256sum`/`md5sum`/
//! `sha512sum`, `xorriso` (live ISO import), `nginx` with `curl` (the
//! concurrency test), `gzip`, `bzip2` and, where installed, `zstd`
//! (compressed installer initrds), and `qemu-system-x86_64` with Debian's
//! `ipxe.lkrn` (a generated boot script run in real iPXE, without network).
//! `make test-unit` installs them (Makefile TEST_PKGS).

use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kiwispray-hosts");
const FCGI: &str = env!("CARGO_BIN_EXE_kiwispray-fcgi");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory, removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ks-cli-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A deployment root with the shipped templates and an empty images/.
struct Root {
    dir: TempDir,
}

/// The result of one run of the CLI.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    /// Asserts the exit code and a one-line error that mentions `text`.
    fn fails(self, code: i32, text: &str) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(text),
            "stderr should mention {text:?}:\n{}",
            self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "errors are one line:\n{}",
            self.stderr
        );
        assert!(
            self.stderr.starts_with("kiwispray-hosts: "),
            "{}",
            self.stderr
        );
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

fn cli(args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("KIWISPRAY_ROOT")
        .stdin(Stdio::null());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    Run::from(c.output().unwrap())
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        let meta = fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            copy_dir(&e.path(), &target);
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &target).unwrap();
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

impl Root {
    fn new(tag: &str) -> Root {
        let dir = TempDir::new(tag);
        copy_dir(
            &Path::new(REPO).join("templates"),
            &dir.path().join("templates"),
        );
        fs::create_dir_all(dir.path().join("images")).unwrap();
        Root { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn run(&self, args: &[&str]) -> Run {
        let mut all = vec!["--root", self.path().to_str().unwrap()];
        all.extend_from_slice(args);
        cli(&all, None, &[])
    }
    fn db_path(&self) -> PathBuf {
        self.path().join("known_hosts.json")
    }
    fn db_text(&self) -> String {
        fs::read_to_string(self.db_path()).unwrap_or_default()
    }
    /// The hosts, with the bootids of the journal beside the file.
    fn db(&self) -> Vec<Value> {
        match kiwispray::store::read_json(&self.db_path()) {
            Ok(Value::Array(a)) if self.db_path().exists() => a,
            other => panic!("database is not a JSON array: {other:?}"),
        }
    }
    fn host(&self, id: u64) -> Value {
        self.db()
            .into_iter()
            .find(|h| h["id"] == id)
            .unwrap_or_else(|| panic!("no host {id} in {}", self.db_text()))
    }
    fn events(&self) -> Vec<Value> {
        fs::read_to_string(self.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    fn image_dir(&self, name: &str) {
        fs::create_dir_all(self.path().join("images").join(name)).unwrap();
    }
    /// Everything under images/, hidden entries included.
    fn images_listing(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

const MAC1: &str = "52:54:00:00:00:01";
const MAC2: &str = "52:54:00:00:00:02";
const UUID1: &str = "4c4c4544-0042-3510-8052-b4c04f384a32";

/// A root with one host (id 1, MAC1, serial SN1, UUID1, hostname web1).
fn root_with_host(tag: &str) -> Root {
    let r = Root::new(tag);
    r.run(&[
        "add",
        "--mac",
        MAC1,
        "--mac",
        "52-54-00-00-00-0A",
        "--serial",
        "SN1",
        "--uuid",
        &UUID1.to_uppercase(),
        "--hostname",
        "web1",
        "--meta",
        r#"{"rack": "R7", "net": {"vlan": 10}}"#,
    ])
    .ok();
    r
}

// ---------------------------------------------------------------- basics

#[test]
fn help_for_every_command() {
    let top = cli(&["--help"], None, &[]).ok();
    assert!(top.stdout.contains("Usage:"), "{}", top.stdout);
    assert!(
        top.stdout.contains("Exit status:"),
        "exit codes documented:\n{}",
        top.stdout
    );
    for code in [
        "0  success",
        "1  check found problems",
        "2  bad usage",
        "3  no such host",
        "4  the database",
        "5  refused",
    ] {
        assert!(top.stdout.contains(code), "missing {code:?}");
    }
    for sub in [
        "list",
        "show",
        "add",
        "set",
        "remove",
        "render",
        "history",
        "check",
        "import-image",
        "import-live-iso",
    ] {
        let r = cli(&[sub, "--help"], None, &[]).ok();
        assert!(
            r.stdout.contains(&format!("kiwispray-hosts {sub}")),
            "{sub}:\n{}",
            r.stdout
        );
    }
    let v = cli(&["--version"], None, &[]).ok();
    assert!(v.stdout.starts_with("kiwispray-hosts "), "{}", v.stdout);
}

#[test]
fn usage_errors_exit_2_on_one_line() {
    let r = cli(&[], None, &[]);
    assert_eq!(r.code, 2);
    let t = TempDir::new("usage");
    let root = t.path().to_str().unwrap();
    cli(&["--root", root, "frobnicate"], None, &[]).fails(2, "unrecognized subcommand");
    cli(&["--root", root, "list", "--bogus"], None, &[]).fails(2, "--bogus");
    cli(&["--root", root, "show"], None, &[]).fails(2, "required");
    cli(&["--root", "/nonexistent/ks-root", "list"], None, &[]).fails(3, "not a directory");
    fs::write(t.path().join("kiwispray.json"), "{\"nonsense\": 1}").unwrap();
    cli(&["--root", root, "list"], None, &[]).fails(2, "kiwispray.json");
}

#[test]
fn root_from_flag_env_or_cwd_before_or_after_the_command() {
    let r = root_with_host("rootsel");
    let p = r.path().to_str().unwrap();
    let before = cli(&["--root", p, "list"], None, &[]).ok();
    let after = cli(&["list", "--root", p], None, &[]).ok();
    let env = cli(&["list"], None, &[("KIWISPRAY_ROOT", p)]).ok();
    let cwd = cli(&["list"], Some(r.path()), &[]).ok();
    for out in [&before.stdout, &after.stdout, &env.stdout, &cwd.stdout] {
        assert!(out.contains("web1"), "{out}");
    }
    // The flag wins over the environment.
    let empty = TempDir::new("rootsel-empty");
    let flag = cli(
        &["list", "--root", empty.path().to_str().unwrap()],
        None,
        &[("KIWISPRAY_ROOT", p)],
    )
    .ok();
    assert!(!flag.stdout.contains("web1"), "{}", flag.stdout);
}

// ------------------------------------------------------------ add / list

#[test]
fn add_list_and_show() {
    let r = root_with_host("addlist");
    let h = r.host(1);
    assert_eq!(h["macs"], "52:54:00:00:00:01 52:54:00:00:00:0A");
    assert_eq!(h["uuid"], UUID1, "UUID stored canonical");
    assert_eq!(h["state"], "new");
    assert_eq!(h["metadata"], json!({"rack": "R7", "net": {"vlan": 10}}));
    r.image_dir("image1");
    let two = r
        .run(&[
            "add",
            "--mac",
            MAC2,
            "--state",
            "image1",
            "--hostname",
            "db1",
            "--json",
        ])
        .ok();
    assert_eq!(two.json()["id"], 2);
    let ev = r.events();
    assert_eq!(ev.len(), 2);
    assert_eq!(
        (
            ev[1]["host"].clone(),
            ev[1]["to"].clone(),
            ev[1]["cause"].clone()
        ),
        (json!(2), json!("image1"), json!("cli"))
    );

    let table = r.run(&["list"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("HOSTNAME") && lines[0].contains("MACS"),
        "{table}"
    );
    assert!(
        lines[1].contains("web1") && lines[1].contains("SN1") && lines[1].contains("(+1)"),
        "{table}"
    );
    assert!(
        lines[2].contains("db1") && lines[2].contains("image1"),
        "{table}"
    );
    let verbose = r.run(&["list", "-v"]).ok().stdout;
    assert!(
        verbose.contains("52:54:00:00:00:0A")
            && verbose.contains("\"rack\":\"R7\"")
            && verbose.contains(UUID1),
        "{verbose}"
    );
    let only = r.run(&["list", "--state", "image1", "--json"]).ok().json();
    assert_eq!(only.as_array().unwrap().len(), 1);
    assert_eq!(only[0]["hostname"], "db1");
    assert_eq!(
        r.run(&["list", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // show by id, by a MAC in another spelling, by serial, by UUID.
    for sel in ["1", "52-54-00-00-00-0a", "SN1", &UUID1.to_uppercase()] {
        let s = r.run(&["show", sel]).ok().stdout;
        assert!(
            s.contains("id:        1") && s.contains("hostname:  web1"),
            "{sel}: {s}"
        );
        assert!(
            s.contains("rack: R7") && s.contains("vlan: 10"),
            "metadata tree: {s}"
        );
        assert!(s.contains("cli"), "recent events: {s}");
    }
    let j = r.run(&["show", "2", "--json"]).ok().json();
    assert_eq!(j["host"]["state"], "image1");
    assert_eq!(j["events"][0]["cause"], "cli");
    r.run(&["show", "99"]).fails(3, "no host");
    r.run(&["show", "52:54:00:99:99:99"]).fails(3, "no host");
}

#[test]
fn add_refuses_bad_or_taken_input_and_writes_nothing() {
    let r = root_with_host("addbad");
    let before = r.db_text();
    let events = r.events().len();
    r.run(&["add", "--mac", "52:54:00:zz:00:01"])
        .fails(2, "invalid MAC");
    r.run(&["add", "--mac", "01:00:5e:00:00:01"])
        .fails(2, "multicast");
    r.run(&["add", "--mac", MAC1])
        .fails(5, "MAC 52:54:00:00:00:01 already belongs to host 1");
    r.run(&["add", "--mac", MAC2, "--serial", "SN1"])
        .fails(5, "serial \"SN1\" already belongs to host 1");
    r.run(&["add", "--mac", MAC2, "--uuid", UUID1])
        .fails(5, "already belongs to host 1");
    r.run(&["add", "--mac", MAC2, "--uuid", "not-a-uuid"])
        .fails(2, "not a UUID");
    r.run(&["add", "--mac", MAC2, "--meta", "{\"a\": }"])
        .fails(2, "line 1 column 7");
    r.run(&["add", "--mac", MAC2, "--meta", "[1]"])
        .fails(2, "JSON object");
    r.run(&["add", "--mac", MAC2, "--state", "nosuchimage"])
        .fails(2, "nosuchimage");
    r.run(&["add", "--mac", MAC2, "--state", "../etc"])
        .fails(2, "not a safe name");
    r.run(&["add", "--mac", MAC2, "--hostname", "bad name"])
        .fails(2, "hostname");
    r.run(&["add", "--serial", "To be filled by O.E.M."])
        .fails(2, "at least one --mac");
    r.run(&["add"]).fails(2, "at least one --mac");
    assert_eq!(r.db_text(), before, "nothing written");
    assert_eq!(r.events().len(), events, "no event");
}

// ------------------------------------------------------------------- set

#[test]
fn set_state_chain_hostname_and_metadata() {
    let r = root_with_host("set");
    r.image_dir("wipe");
    fs::write(
        r.path().join("templates/image1.tmpl"),
        "#!ipxe\necho @id@\n",
    )
    .unwrap();
    r.run(&["set", "1", "--state", "wipe,image1"]).ok();
    assert_eq!(r.host(1)["state"], "wipe,image1");
    r.run(&["set", "SN1", "--state", "discover,new"]).ok();
    r.run(&["set", "1", "--state", "finished", "--hostname", "web-01"])
        .ok();
    assert_eq!(r.host(1)["hostname"], "web-01");

    r.run(&[
        "set",
        "1",
        "--meta",
        r#"{"net": {"mask": 24}, "owner": "ops"}"#,
    ])
    .ok();
    assert_eq!(
        r.host(1)["metadata"],
        json!({"rack": "R7", "owner": "ops", "net": {"vlan": 10, "mask": 24}})
    );
    r.run(&[
        "set",
        "1",
        "--meta-set",
        "net.vlan=12",
        "--meta-set",
        "a.b.c=text with spaces",
        "--meta-set",
        "flag=true",
        "--meta-set",
        "s=\"123\"",
    ])
    .ok();
    let m = r.host(1)["metadata"].clone();
    assert_eq!(m["net"]["vlan"], 12);
    assert_eq!(m["a"]["b"]["c"], "text with spaces");
    assert_eq!(m["flag"], true);
    assert_eq!(m["s"], "123");
    r.run(&[
        "set",
        "1",
        "--meta-unset",
        "net.mask",
        "--meta-unset",
        "owner",
    ])
    .ok();
    let m = r.host(1)["metadata"].clone();
    assert!(
        m["net"].get("mask").is_none() && m.get("owner").is_none(),
        "{m}"
    );
    let j = r
        .run(&["set", "1", "--meta-set", "x=1", "--json"])
        .ok()
        .json();
    assert_eq!(j["metadata"]["x"], 1);

    let ev = r.events();
    let states: Vec<(String, String)> = ev
        .iter()
        .filter(|e| e["host"] == 1)
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(states[1], ("new".into(), "wipe,image1".into()));
    assert_eq!(states[2], ("wipe,image1".into(), "discover,new".into()));
    assert_eq!(states[3], ("discover,new".into(), "finished".into()));
    assert!(ev.iter().all(|e| e["cause"] == "cli"));
}

#[test]
fn set_clears_a_stale_bootid_when_the_state_changes() {
    let r = root_with_host("setbootid");
    r.image_dir("image1");
    r.image_dir("image2");
    let text = r.db_text().replace(
        "\"bootid\": null",
        "\"bootid\": \"00112233445566778899aabbccddeeff\"",
    );
    fs::write(r.db_path(), text).unwrap();
    r.run(&["set", "1", "--state", "image1"]).ok();
    assert_eq!(r.host(1)["bootid"], Value::Null);
}

#[test]
fn set_refuses_bad_input_and_writes_nothing() {
    let r = root_with_host("setbad");
    r.run(&["add", "--mac", MAC2]).ok();
    let before = r.db_text();
    let events = r.events().len();
    r.run(&["set", "1"]).fails(2, "nothing to change");
    r.run(&["set", "1", "--state", "imgae1"])
        .fails(2, "\"imgae1\" has neither");
    r.run(&["set", "1", "--state", "new,typo"]).fails(2, "typo");
    r.run(&["set", "1", "--state", "a/b"])
        .fails(2, "not a safe name");
    r.run(&["set", "1", "--state", ""]).fails(2, "empty state");
    r.run(&["set", "1", "--hostname=-x"]).fails(2, "hostname");
    r.run(&["set", "1", "--meta", "{\"a\": 1,}"])
        .fails(2, "line 1 column");
    r.run(&["set", "1", "--meta-set", "novalue"])
        .fails(2, "KEY=VALUE");
    r.run(&["set", "1", "--meta-set", "a..b=1"])
        .fails(2, "not valid");
    r.run(&["set", "1", "--meta-set", "rack.x=1"])
        .fails(2, "not an object");
    r.run(&["set", "77", "--state", "new"]).fails(3, "no host");
    r.run(&["set", "52:54:00:00:00:77", "--state", "new"])
        .fails(3, "no host");
    // A serial shared by two hosts is ambiguous.
    fs::write(
        r.db_path(),
        before.replace("\"serial\": \"\"", "\"serial\": \"SN1\""),
    )
    .unwrap();
    let shared = r.db_text();
    r.run(&["set", "SN1", "--state", "new"])
        .fails(2, "several hosts");
    assert_eq!(r.db_text(), shared, "nothing written");
    assert_eq!(r.events().len(), events, "no event");
}

#[test]
fn corrupt_database_is_reported_and_never_overwritten() {
    let r = root_with_host("corrupt");
    let bad = "[\n  {\"id\": 1, \"macs\": }\n]\n";
    fs::write(r.db_path(), bad).unwrap();
    r.run(&["list"]).fails(4, "line 2");
    r.run(&["set", "1", "--hostname", "x"])
        .fails(4, "not valid at line 2");
    r.run(&["add", "--mac", MAC2]).fails(4, "not overwritten");
    r.run(&["remove", "1"]).fails(4, "line 2");
    assert_eq!(fs::read_to_string(r.db_path()).unwrap(), bad);
}

// ---------------------------------------------------------- remove/history

#[test]
fn remove_and_history() {
    let r = root_with_host("remove");
    r.run(&["add", "--mac", MAC2, "--hostname", "db1"]).ok();
    r.run(&["set", "2", "--hostname", "db2"]).ok();
    let out = r.run(&["remove", "52:54:00:00:00:01"]).ok().stdout;
    assert!(out.contains("removed host 1"), "{out}");
    assert!(r.db().iter().all(|h| h["id"] != 1));
    r.run(&["show", "1"]).fails(3, "no host");
    r.run(&["remove", "1"]).fails(3, "no host");

    let all = r.run(&["history"]).ok().stdout;
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 4, "{all}");
    assert!(
        lines[0].contains("host 1") && lines[0].contains("-> new"),
        "{all}"
    );
    assert!(
        lines[3].contains("host 1") && lines[3].contains("new -> "),
        "newest last: {all}"
    );
    let removed = r.run(&["history", "1"]).ok().stdout;
    assert_eq!(
        removed.lines().count(),
        2,
        "a removed host by its id: {removed}"
    );
    let two = r
        .run(&["history", "52-54-00-00-00-02", "--json"])
        .ok()
        .json();
    assert_eq!(two.as_array().unwrap().len(), 2);
    let last = r.run(&["history", "-n", "1", "--json"]).ok().json();
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0]["host"], 1);
    assert_eq!(last[0]["to"], "");
    r.run(&["history", "52:54:00:00:00:77"]).fails(3, "no host");
}

// ------------------------------------------------------ edit-host.py flags

#[test]
fn seed_flags_keep_working() {
    let r = root_with_host("seed");
    r.image_dir("image1");
    let l = r.run(&["-l"]).ok().stdout;
    assert!(l.contains("web1") && !l.contains("METADATA"), "{l}");
    let ll = r.run(&["-ll"]).ok().stdout;
    assert!(ll.contains("METADATA") && ll.contains("R7"), "{ll}");
    r.run(&[
        "-i",
        "1",
        "-s",
        "image1",
        "-m",
        r#"{"role": "web"}"#,
        "-n",
        "web9",
    ])
    .ok();
    let h = r.host(1);
    assert_eq!(
        (h["state"].as_str(), h["hostname"].as_str()),
        (Some("image1"), Some("web9"))
    );
    assert_eq!(h["metadata"]["role"], "web");
    assert_eq!(h["metadata"]["rack"], "R7", "-m merges");
    let shown = r.run(&["-i", "1"]).ok().stdout;
    assert!(shown.contains("hostname:  web9"), "{shown}");
    r.run(&["-s", "new"]).fails(2, "need -i");
    r.run(&["-l", "list"]).fails(2, "cannot be combined");
    r.run(&["-i", "1", "-s", "nope"]).fails(2, "\"nope\"");
    r.run(&["-i", "5", "-s", "new"]).fails(3, "no host");
    r.run(&["-i", "1", "-m", "{"]).fails(2, "not valid JSON");
}

// ----------------------------------------------------------------- render

/// What the real handler answers for `query` on `path`, run as CGI.
fn handler(root: &Path, path: &str, query: &str, host_header: &str) -> (String, String) {
    let out = Command::new(FCGI)
        .args(["--root", root.to_str().unwrap(), "--cgi"])
        .env_clear()
        .env("REQUEST_METHOD", "GET")
        .env("DOCUMENT_URI", path)
        .env("QUERY_STRING", query)
        .env("HTTP_HOST", host_header)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not a CGI response: {text}"));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn render_matches_the_handler_and_changes_nothing() {
    let r = root_with_host("render");
    r.run(&["add", "--mac", MAC2, "--hostname", "db1"]).ok();
    r.image_dir("image1");
    fs::write(
        r.path().join("images/image1/host.tmpl"),
        "#!ipxe\nkernel http://@SERVER_IP@:@SERVER_PORT@/images/@state@/k id=@id@ bootid=@bootid@ h=@hostname|url@ v=@metadata.net.vlan@ @HOST_DATA@\nboot\n",
    )
    .unwrap();
    fs::write(
        r.path().join("images/image1/post_install.tmpl"),
        "#!/bin/sh\necho @id@ @bootid@ @hostname|shell@\n",
    )
    .unwrap();
    let server = "10.9.8.7:8080";
    let q1 = "net0=52-54-00-00-00-01";

    // new: the handler's read-only path.
    let (status, body) = handler(r.path(), "/bootstrap", q1, server);
    assert!(status.contains("200"), "{status}");
    let preview = r.run(&["render", "1", "--server", server]).ok().stdout;
    assert_eq!(preview, body);
    assert!(preview.contains("registered as host 1"), "{preview}");

    // finished.
    r.run(&["set", "1", "--state", "finished"]).ok();
    let (_, body) = handler(r.path(), "/bootstrap", q1, server);
    assert_eq!(
        r.run(&["render", "SN1", "--server", server]).ok().stdout,
        body
    );

    // An install state: the handler hands out a bootid; the preview then
    // shows the same script, and changes nothing itself.
    r.run(&["set", "1", "--state", "image1"]).ok();
    let (_, body) = handler(r.path(), "/bootstrap", q1, server);
    assert!(
        body.contains("kernel http://10.9.8.7:8080/images/image1/k id=1 bootid="),
        "{body}"
    );
    let db_before = r.db_text();
    let events_before = r.events().len();
    let preview = r.run(&["render", "1", "--server", server]).ok().stdout;
    assert_eq!(preview, body);
    assert!(preview.contains("h=web1 v=10"), "{preview}");
    let bootid = r.host(1)["bootid"].as_str().unwrap().to_string();
    let (_, post) = handler(
        r.path(),
        "/post-install",
        &format!("id=1&bootid={bootid}"),
        server,
    );
    let preview = r
        .run(&["render", "1", "--post-install", "--server", server])
        .ok()
        .stdout;
    assert_eq!(preview, post);
    assert_eq!(preview, format!("#!/bin/sh\necho 1 {bootid} 'web1'\n"));
    assert_eq!(r.db_text(), db_before, "render writes nothing");
    assert_eq!(r.events().len(), events_before, "render records no event");

    // Defaults: "server" in the settings, else port 5000.
    fs::write(
        r.path().join("kiwispray.json"),
        r#"{"server": "[fd00::1]:5001"}"#,
    )
    .unwrap();
    let preview = r.run(&["render", "1"]).ok().stdout;
    assert!(
        preview.contains("http://[fd00::1]:5001/images/image1/k"),
        "{preview}"
    );
    fs::remove_file(r.path().join("kiwispray.json")).unwrap();
    let preview = r.run(&["render", "1"]).ok().stdout;
    assert!(preview.contains(":5000/images/image1/k"), "{preview}");

    // A host that is not installing: its post-install preview comes with a note.
    let run = r
        .run(&["render", "2", "--post-install", "--server", server])
        .ok();
    assert!(run.stderr.contains("not being installed"), "{}", run.stderr);
    assert!(
        run.stdout.contains("KS_ID=2"),
        "shipped post_install.tmpl: {}",
        run.stdout
    );
}

#[test]
fn render_errors_and_unbootable_hosts() {
    let r = root_with_host("renderbad");
    r.run(&["render", "9"]).fails(3, "no host");
    r.run(&["render", "1", "--server", "a b:1"])
        .fails(2, "not HOST:PORT");
    r.run(&["render", "1", "--server", "h:99999"])
        .fails(2, "not HOST:PORT");
    // A state without any template, and an unsafe one written by hand:
    // the preview is the handler's explanation script.
    fs::remove_file(r.path().join("templates/known_host.tmpl")).unwrap();
    let text = r
        .db_text()
        .replace("\"state\": \"new\"", "\"state\": \"ghost\"");
    fs::write(r.db_path(), &text).unwrap();
    let server = "10.0.0.1:5000";
    let (_, body) = handler(r.path(), "/bootstrap", "net0=52-54-00-00-00-01", server);
    let run = r.run(&["render", "1", "--server", server]).ok();
    assert_eq!(run.stdout, body);
    assert!(
        run.stdout.contains("no template for state \"ghost\""),
        "{}",
        run.stdout
    );
    fs::write(r.db_path(), text.replace("ghost", "../x")).unwrap();
    let run = r.run(&["render", "1", "--server", server]).ok();
    assert!(
        run.stdout.starts_with("#!ipxe") && run.stdout.contains("not a safe name"),
        "{}",
        run.stdout
    );
    // Issue 9: the post-install preview built a path from the state
    // unchecked and printed a file from outside the root.
    r.run(&["render", "1", "--post-install"])
        .fails(2, "not a safe name");
    fs::write(r.db_path(), text.replace("ghost", "img")).unwrap();
    fs::write(
        r.path().join("templates/post_install.tmpl"),
        "x @id|html@\n",
    )
    .unwrap();
    r.run(&["render", "1", "--post-install"])
        .fails(2, "unknown filter");
    fs::remove_file(r.path().join("templates/post_install.tmpl")).unwrap();
    r.run(&["render", "1", "--post-install"])
        .fails(3, "no post-install template");
}

// ------------------------------------------------------------------ check

#[test]
fn check_passes_on_a_good_root() {
    let r = root_with_host("checkok");
    let build = TempDir::new("checkok-build");
    let src = make_build(build.path(), Gen::Current, "web.x86_64-1.0", Tamper::None);
    r.run(&["import-image", "web", src.to_str().unwrap()]).ok();
    r.run(&["set", "1", "--state", "web"]).ok();
    let out = r.run(&["check", "--deep"]).ok().stdout;
    assert!(out.starts_with("ok: 1 hosts, 1 images"), "{out}");
    let j = r.run(&["check", "--json"]).ok().json();
    assert_eq!(j["ok"], true);
    // The empty directory is a valid (new) root too, apart from templates.
    let empty = TempDir::new("checkempty");
    let run = cli(
        &["--root", empty.path().to_str().unwrap(), "check"],
        None,
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("templates"), "{}", run.stdout);
}

#[test]
fn check_lists_every_problem() {
    let r = root_with_host("checkbad");
    let build = TempDir::new("checkbad-build");
    let src = make_build(build.path(), Gen::Bare, "img", Tamper::None);
    r.run(&["import-image", "broken", src.to_str().unwrap()])
        .ok();
    r.run(&["import-image", "tampered", src.to_str().unwrap()])
        .ok();
    fs::remove_file(r.path().join("images/broken/pxeboot.kernel")).unwrap();
    // Different content under the same name: only --deep notices.
    let xz = r.path().join("images/tampered/img.xz");
    let good = fs::read(&xz).unwrap();
    let other = make_xz(&vec![7u8; 65536]);
    fs::write(&xz, &other).unwrap();
    assert_ne!(good, other);
    fs::create_dir_all(r.path().join("images/.import-web.12345")).unwrap();
    fs::write(r.path().join("templates/bad.tmpl"), "#!ipxe\n@id|nope@\n").unwrap();
    let hosts = json!([
        {"id": 1, "macs": "52:54:00:00:00:01 bogus", "serial": "SN1", "state": "ghost,new", "hostname": "a"},
        {"id": 2, "macs": "52:54:00:00:00:01", "serial": "SN1", "state": "broken", "hostname": "b"},
        {"id": 2, "macs": "52:54:00:00:00:03", "serial": "", "state": "../x", "hostname": "c"},
        {"id": 4, "macs": "", "serial": "Default string", "state": "new", "hostname": "d"}
    ]);
    fs::write(r.db_path(), serde_json::to_string_pretty(&hosts).unwrap()).unwrap();
    let run = r.run(&["check"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    for expected in [
        "host id 2 appears 2 times",
        "\"bogus\" in macs is not a valid MAC",
        "MAC 52:54:00:00:00:01 belongs to host 1 and host 2",
        "serial \"SN1\" belongs to host 1 and host 2",
        "host 4: no MAC, serial or UUID identifies it",
        "state \"ghost\" is used by host(s) 1",
        "not a safe name",
        "unknown filter \"nope\"",
        "installer kernel images/broken/pxeboot.kernel, which does not exist",
        ".import-web.12345 is left over",
    ] {
        assert!(
            run.stdout.contains(expected),
            "missing {expected:?} in:\n{}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains("checksum mismatch"),
        "only --deep verifies:\n{}",
        run.stdout
    );
    let deep = r.run(&["check", "--deep", "--json"]);
    assert_eq!(deep.code, 1);
    let problems = deep.json()["problems"].clone();
    assert!(
        problems
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("checksum mismatch")),
        "{problems}"
    );
    fs::write(r.db_path(), "[{\"id\": 1,\n \"macs\": ]").unwrap();
    let run = r.run(&["check"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("does not parse at line 2"),
        "{}",
        run.stdout
    );
}

// ------------------------------------------------------------- import-image

#[derive(Clone, Copy, PartialEq, Debug)]
enum Gen {
    /// kiwi before v9.18.18: pxeboot.kernel, pxeboot.initrd.xz, <name>.md5.
    Bare,
    /// kiwi v9.18.18 - v9.24.10: pxeboot.<P>.initrd.xz.
    XzInitrd,
    /// kiwi v9.24.11 and later: pxeboot.<P>.initrd, <P>.sha256.
    Current,
}

#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    None,
    Digest,
    Size,
}

fn make_xz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("xz")
        .args(["-c", "-0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xz is needed (Debian package xz-utils)");
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = c.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn digest(tool: &str, data: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes a synthetic KIWI oem PXE build into `dir/build/` and returns
/// that directory: a tiny raw disk, xz-compressed, with its checksum file.
fn make_build(dir: &Path, gen: Gen, prefix: &str, tamper: Tamper) -> PathBuf {
    let b = dir.join("build");
    fs::create_dir_all(&b).unwrap();
    let raw: Vec<u8> = (0..16 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(b.join(format!("{prefix}.xz")), make_xz(&raw)).unwrap();
    let (ext, tool) = match gen {
        Gen::Bare => ("md5", "md5sum"),
        Gen::XzInitrd => ("sha512", "sha512sum"),
        Gen::Current => ("sha256", "sha256sum"),
    };
    let mut d = digest(tool, &raw);
    let mut blocks = 16;
    match tamper {
        Tamper::None => {}
        Tamper::Digest => d = d.chars().rev().collect(),
        Tamper::Size => blocks = 17,
    }
    fs::write(
        b.join(format!("{prefix}.{ext}")),
        format!("{d} {blocks} 4096\n"),
    )
    .unwrap();
    fs::write(
        b.join(format!("{prefix}.append")),
        "rd.kiwi.install.pxe rd.kiwi.install.image=http://example.com/image.xz console=ttyS0,115200 quiet\n",
    )
    .unwrap();
    fs::write(b.join(format!("{prefix}.initrd")), "system initrd").unwrap();
    fs::write(b.join(format!("{prefix}.packages")), "a list").unwrap();
    let (kernel, initrd) = match gen {
        Gen::Bare => (
            "pxeboot.kernel".to_string(),
            "pxeboot.initrd.xz".to_string(),
        ),
        Gen::XzInitrd => (
            format!("pxeboot.{prefix}.kernel"),
            format!("pxeboot.{prefix}.initrd.xz"),
        ),
        Gen::Current => (
            format!("pxeboot.{prefix}.kernel"),
            format!("pxeboot.{prefix}.initrd"),
        ),
    };
    fs::write(b.join(&kernel), "installer kernel").unwrap();
    fs::write(b.join(&initrd), "installer initrd").unwrap();
    std::os::unix::fs::symlink(&kernel, b.join(format!("{prefix}.kernel"))).unwrap();
    if gen == Gen::Current {
        fs::write(
            b.join(format!("{prefix}.config.bootoptions")),
            "root=UUID=x rw",
        )
        .unwrap();
    }
    b
}

fn tar(build: &Path, out: &Path, xz: bool) {
    let mut c = Command::new("tar");
    c.arg("-C").arg(build);
    if xz {
        c.arg("-J");
    }
    let st = c.arg("-cf").arg(out).arg(".").status().unwrap();
    assert!(st.success());
}

/// Checks the generated host.tmpl of image `name` built from `prefix`.
fn check_host_tmpl(r: &Root, name: &str, prefix: &str, kernel: &str, initrd: &str) {
    let t = fs::read_to_string(r.path().join("images").join(name).join("host.tmpl")).unwrap();
    assert!(t.starts_with("#!ipxe\n"), "{t}");
    let kernel_line = t
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        kernel_line.starts_with(&format!(
            "kernel http://@SERVER_IP@:@SERVER_PORT@/images/{name}/{kernel} "
        )),
        "{kernel_line}"
    );
    assert!(kernel_line.ends_with(" || goto ks-failed"), "{kernel_line}");
    let image_url = format!("http://@SERVER_IP@:@SERVER_PORT@/images/{name}/{prefix}.xz");
    let words: Vec<&str> = kernel_line.split_whitespace().collect();
    let image_arg = words
        .iter()
        .find(|w| w.starts_with("rd.kiwi.install.image="))
        .unwrap();
    assert_eq!(*image_arg, format!("rd.kiwi.install.image={image_url}"));
    assert_eq!(image_arg.matches(".xz").count(), 1);
    assert!(!image_arg.contains('?'));
    assert!(
        !kernel_line.contains("example.com"),
        "placeholder URL replaced: {kernel_line}"
    );
    for w in [
        "rd.kiwi.install.pxe",
        "rd.kiwi.install.pass.bootparam",
        "BOOTIF=01-${netX/mac:hexhyp}",
        &format!("initrd={initrd}"),
        "razorurl=http://@SERVER_IP@:@SERVER_PORT@/post-install?id=@id@&bootid=@bootid@",
        "console=ttyS0,115200",
        "quiet",
    ] {
        assert!(words.contains(&w), "missing {w:?} in {kernel_line}");
    }
    assert!(t.contains("\nimgfree\n"), "{t}");
    assert!(
        t.contains(&format!(
            "\ninitrd http://@SERVER_IP@:@SERVER_PORT@/images/{name}/{initrd} || goto ks-failed\n"
        )),
        "{t}"
    );
    assert!(t.contains("\nboot || goto ks-failed\n"), "{t}");
    assert!(
        t.contains("\n:ks-failed\n") && t.contains("\nreboot\n"),
        "{t}"
    );
}

#[test]
fn import_each_naming_generation_from_tar_tar_xz_and_directory() {
    let cases = [
        (
            Gen::Bare,
            "image1",
            "pxeboot.kernel".to_string(),
            "pxeboot.initrd.xz".to_string(),
            "md5",
        ),
        (
            Gen::XzInitrd,
            "sles.x86_64-1.15.2",
            "pxeboot.sles.x86_64-1.15.2.kernel".to_string(),
            "pxeboot.sles.x86_64-1.15.2.initrd.xz".to_string(),
            "sha512",
        ),
        (
            Gen::Current,
            "web.x86_64-1.2.3",
            "pxeboot.web.x86_64-1.2.3.kernel".to_string(),
            "pxeboot.web.x86_64-1.2.3.initrd".to_string(),
            "sha256",
        ),
    ];
    for (gen, prefix, kernel, initrd, ext) in cases {
        let r = root_with_host(&format!("import-{gen:?}"));
        let work = TempDir::new("import-src");
        let build = make_build(work.path(), gen, prefix, Tamper::None);
        let plain = work.path().join(format!("{prefix}.install.tar"));
        let packed = work.path().join(format!("{prefix}.install.tar.xz"));
        tar(&build, &plain, false);
        tar(&build, &packed, true);
        for (name, src) in [
            ("fromtar", &plain),
            ("fromtarxz", &packed),
            ("fromdir", &build),
        ] {
            let run = r.run(&["import-image", name, src.to_str().unwrap()]).ok();
            assert!(
                run.stdout.contains(&format!("imported image {name}")),
                "{}",
                run.stdout
            );
            let dir = r.path().join("images").join(name);
            let mut files: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let mut want = vec![
                "host.grub".to_string(),
                "host.tmpl".to_string(),
                "image.json".to_string(),
                format!("{prefix}.xz"),
                format!("{prefix}.{ext}"),
                format!("{prefix}.append"),
                format!("{prefix}.initrd"),
                format!("{prefix}.kernel"),
                kernel.clone(),
                initrd.clone(),
            ];
            if gen == Gen::Current {
                want.push(format!("{prefix}.config.bootoptions"));
            }
            want.sort();
            assert_eq!(files, want, "{gen:?} from {}", src.display());
            assert_eq!(
                fs::read_link(dir.join(format!("{prefix}.kernel"))).unwrap(),
                PathBuf::from(&kernel)
            );
            assert_eq!(
                fs::read(dir.join(format!("{prefix}.xz"))).unwrap(),
                fs::read(build.join(format!("{prefix}.xz"))).unwrap()
            );
            check_host_tmpl(&r, name, prefix, &kernel, &initrd);
        }
        assert_eq!(
            r.images_listing(),
            vec!["fromdir", "fromtar", "fromtarxz"],
            "no leftovers"
        );
        // The generated template is what the handler serves an installing host.
        r.run(&["set", "1", "--state", "fromtar"]).ok();
        let (_, body) = handler(
            r.path(),
            "/bootstrap",
            "net0=52-54-00-00-00-01",
            "192.168.100.1:5000",
        );
        let bootid = r.host(1)["bootid"].as_str().unwrap().to_string();
        assert!(
            body.contains(&format!(
                "rd.kiwi.install.image=http://192.168.100.1:5000/images/fromtar/{prefix}.xz "
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "razorurl=http://192.168.100.1:5000/post-install?id=1&bootid={bootid} "
            )),
            "{body}"
        );
        let out = r.run(&["check", "--deep"]).ok().stdout;
        assert!(out.starts_with("ok:"), "{out}");
    }
}

#[test]
fn import_refuses_bad_builds_and_leaves_nothing() {
    let r = Root::new("importbad");
    let work = TempDir::new("importbad-src");
    for (tamper, text) in [
        (Tamper::Digest, "checksum mismatch"),
        (Tamper::Size, "size mismatch"),
    ] {
        let w = TempDir::new("importbad-build");
        let build = make_build(w.path(), Gen::Current, "web.x86_64-1", tamper);
        let t = w.path().join("web.install.tar");
        tar(&build, &t, false);
        r.run(&["import-image", "web", t.to_str().unwrap()])
            .fails(2, text);
        r.run(&["import-image", "web", build.to_str().unwrap()])
            .fails(2, text);
        assert!(
            r.images_listing().is_empty(),
            "left: {:?}",
            r.images_listing()
        );
    }
    // Incomplete builds name what is missing.
    let build = make_build(work.path(), Gen::Current, "web.x86_64-1", Tamper::None);
    fs::remove_file(build.join("web.x86_64-1.config.bootoptions")).unwrap();
    r.run(&["import-image", "web", build.to_str().unwrap()])
        .fails(2, "config.bootoptions");
    fs::remove_file(build.join("web.x86_64-1.sha256")).unwrap();
    r.run(&["import-image", "web", build.to_str().unwrap()])
        .fails(2, "no checksum file");
    let empty = TempDir::new("importbad-empty");
    r.run(&["import-image", "web", empty.path().to_str().unwrap()])
        .fails(2, ".append");
    let junk = work.path().join("junk.tar");
    fs::write(&junk, "this is not a tar archive at all").unwrap();
    r.run(&["import-image", "web", junk.to_str().unwrap()])
        .fails(2, "not a readable tar");
    let broken_xz = make_build(&work.path().join("x"), Gen::Bare, "img", Tamper::None);
    fs::write(broken_xz.join("img.xz"), b"\xfd7zXZ\0garbage").unwrap();
    r.run(&["import-image", "web", broken_xz.to_str().unwrap()])
        .fails(2, "does not decompress");
    r.run(&["import-image", "web", "/nonexistent/build.tar"])
        .fails(3, "does not exist");
    let good = make_build(&work.path().join("g"), Gen::Bare, "img", Tamper::None);
    for bad in ["new", "finished", "../x", "a.xz", ".hidden", "a@b"] {
        r.run(&["import-image", bad, good.to_str().unwrap()])
            .fails(2, bad.trim_start_matches("../"));
    }
    r.run(&[
        "import-image",
        "web",
        good.to_str().unwrap(),
        "--append",
        "x=${evil}",
    ])
    .fails(2, "--append");
    assert!(
        r.images_listing().is_empty(),
        "left: {:?}",
        r.images_listing()
    );
}

#[test]
fn import_replaces_only_with_force() {
    let r = Root::new("importforce");
    let work = TempDir::new("importforce-src");
    let one = make_build(&work.path().join("1"), Gen::Bare, "img", Tamper::None);
    let two = make_build(
        &work.path().join("2"),
        Gen::Current,
        "web.x86_64-2",
        Tamper::None,
    );
    r.run(&[
        "import-image",
        "web",
        one.to_str().unwrap(),
        "--append",
        "console=ttyS1",
    ])
    .ok();
    let tmpl = fs::read_to_string(r.path().join("images/web/host.tmpl")).unwrap();
    assert!(tmpl.contains(" console=ttyS1 || goto ks-failed"), "{tmpl}");
    r.run(&["import-image", "web", two.to_str().unwrap()])
        .fails(5, "--force");
    assert!(
        r.path().join("images/web/img.xz").exists(),
        "old image untouched"
    );
    // A failed forced import keeps the old image too.
    let bad = make_build(
        &work.path().join("3"),
        Gen::Current,
        "web.x86_64-3",
        Tamper::Digest,
    );
    r.run(&["import-image", "web", bad.to_str().unwrap(), "--force"])
        .fails(2, "checksum mismatch");
    assert!(
        r.path().join("images/web/img.xz").exists(),
        "old image kept"
    );
    let j = r
        .run(&[
            "import-image",
            "web",
            two.to_str().unwrap(),
            "--force",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(j["replaced"], true);
    assert!(!r.path().join("images/web/img.xz").exists());
    assert!(r.path().join("images/web/web.x86_64-2.xz").exists());
    assert_eq!(r.images_listing(), vec!["web"], "no leftovers");
}

// --------------------------------------------------------- import-live-iso

fn need_xorriso() {
    assert!(
        Command::new("xorriso").arg("-version").output().is_ok(),
        "these tests need xorriso (Debian package xorriso; `make test-unit` installs it)"
    );
}

fn make_iso(dir: &Path, arches: &[&str], name: &str) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    for a in arches {
        let l = tree.join("boot").join(a).join("loader");
        fs::create_dir_all(&l).unwrap();
        fs::write(l.join("linux"), format!("linux for {a}")).unwrap();
        fs::write(l.join("initrd"), format!("initrd for {a}")).unwrap();
    }
    fs::create_dir_all(tree.join("LiveOS")).unwrap();
    fs::write(tree.join("LiveOS/squashfs.img"), "root").unwrap();
    let iso = dir.join(format!("{name}.iso"));
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-o"])
        .arg(&iso)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

#[test]
fn import_live_iso() {
    need_xorriso();
    let r = root_with_host("liveiso");
    let work = TempDir::new("liveiso-src");
    let iso = make_iso(work.path(), &["x86_64"], "live");
    r.run(&["import-live-iso", "rescue", iso.to_str().unwrap()])
        .ok();
    let dir = r.path().join("images/rescue");
    assert_eq!(
        fs::read_to_string(dir.join("linux")).unwrap(),
        "linux for x86_64"
    );
    assert_eq!(
        fs::read_to_string(dir.join("initrd")).unwrap(),
        "initrd for x86_64"
    );
    assert_eq!(
        fs::read(dir.join("rescue.iso")).unwrap(),
        fs::read(&iso).unwrap()
    );
    let t = fs::read_to_string(dir.join("host.tmpl")).unwrap();
    assert!(
        t.starts_with("#!ipxe\n") && t.contains("\nimgfree\n"),
        "{t}"
    );
    assert!(
        t.contains("kernel http://@SERVER_IP@:@SERVER_PORT@/images/rescue/linux initrd=initrd root=live:http://@SERVER_IP@:@SERVER_PORT@/images/rescue/rescue.iso ip=dhcp"),
        "{t}"
    );
    assert!(
        t.contains(
            "initrd http://@SERVER_IP@:@SERVER_PORT@/images/rescue/initrd || goto ks-failed"
        ),
        "{t}"
    );
    r.run(&["set", "1", "--state", "rescue"]).ok();
    let out = r
        .run(&["render", "1", "--server", "10.1.1.1:5000"])
        .ok()
        .stdout;
    assert!(
        out.contains("root=live:http://10.1.1.1:5000/images/rescue/rescue.iso"),
        "{out}"
    );
    assert!(r.run(&["check"]).ok().stdout.starts_with("ok:"));

    r.run(&["import-live-iso", "rescue", iso.to_str().unwrap()])
        .fails(5, "--force");
    let multi = make_iso(work.path(), &["x86_64", "aarch64"], "multi");
    r.run(&["import-live-iso", "multi", multi.to_str().unwrap()])
        .fails(2, "--arch");
    r.run(&[
        "import-live-iso",
        "multi",
        multi.to_str().unwrap(),
        "--arch",
        "s390x",
    ])
    .fails(2, "s390x");
    r.run(&[
        "import-live-iso",
        "multi",
        multi.to_str().unwrap(),
        "--arch",
        "aarch64",
    ])
    .ok();
    assert_eq!(
        fs::read_to_string(r.path().join("images/multi/linux")).unwrap(),
        "linux for aarch64"
    );
    r.run(&[
        "import-live-iso",
        "rescue",
        multi.to_str().unwrap(),
        "--arch",
        "x86_64",
        "--force",
    ])
    .ok();
    let none = make_iso(work.path(), &[], "none");
    r.run(&["import-live-iso", "none", none.to_str().unwrap()])
        .fails(2, "not a KIWI live ISO");
    let notiso = work.path().join("not.iso");
    fs::write(&notiso, vec![0u8; 70000]).unwrap();
    r.run(&["import-live-iso", "bad", notiso.to_str().unwrap()])
        .fails(2, "not an ISO 9660 image");
    r.run(&["import-live-iso", "bad", "/nonexistent.iso"])
        .fails(3, "does not exist");
    assert_eq!(r.images_listing(), vec!["multi", "rescue"], "no leftovers");
}

// ---------------------------------------------------------------- man page

#[test]
fn committed_man_page_matches_the_cli() {
    let generated = cli(&["--generate-man"], None, &[]).ok().stdout;
    assert!(generated.contains(".TH KIWISPRAY\\-HOSTS 1"), "{generated}");
    for cmd in ["import\\-image", "import\\-live\\-iso", "render", "check"] {
        assert!(generated.contains(&format!(".SS {cmd}\n")), "{cmd}");
    }
    assert!(generated.contains("Exit status:"), "{generated}");
    assert_same_page("man/kiwispray-hosts.1", &generated);
    // The boot service's page, once it is generated the same way.
    let fcgi_page = Path::new(REPO).join("man/kiwispray-fcgi.8");
    if fcgi_page.exists() {
        let out = Command::new(FCGI).arg("--generate-man").output().unwrap();
        assert!(out.status.success(), "kiwispray-fcgi --generate-man failed");
        assert_same_page(
            "man/kiwispray-fcgi.8",
            &String::from_utf8_lossy(&out.stdout),
        );
    }
}

fn assert_same_page(path: &str, generated: &str) {
    let committed = fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or(
                committed.lines().count().min(generated.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{path} is out of date (first difference at line {line}); run `make man` and commit it"
        );
    }
}

// ------------------------------------------------------------ concurrency

/// The stack of nginx/serve.sh, in a network namespace of its own when
/// this test may create one; stopped on drop.
struct Stack {
    child: std::process::Child,
    port: u16,
    netns: bool,
    _run: TempDir,
}

impl Stack {
    fn start(root: &Path) -> Stack {
        assert!(
            Path::new("/usr/sbin/nginx").exists()
                || Command::new("nginx").arg("-v").output().is_ok(),
            "this test needs nginx (`make test-unit` installs it)"
        );
        let run = TempDir::new("stack-run");
        let bin_dir = Path::new(FCGI).parent().unwrap();
        let netns = Command::new("unshare")
            .args(["--net", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let port = if netns {
            5000
        } else {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let serve = Path::new(REPO).join("nginx/serve.sh");
        let mut c = if netns {
            // Private loopback only: nothing is reachable from outside.
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--",
                "bash",
                "-c",
                "ip link set lo up && exec \"$0\"",
            ])
            .arg(&serve);
            c
        } else {
            Command::new(&serve)
        };
        c.env("PORT", port.to_string())
            .env("ROOT", root)
            .env("RUN_DIR", run.path())
            .env("BIN_DIR", bin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().unwrap();
        let stack = Stack {
            child,
            port,
            netns,
            _run: run,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, _) = stack.get("/state?id=0");
            if code == 404 || code == 400 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the stack did not come up (last status {code})"
            );
            thread::sleep(Duration::from_millis(100));
        }
        stack
    }

    /// One GET on the stack's loopback: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut c = if self.netns {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{}/ns/net", self.child.id()))
                .arg("curl");
            c
        } else {
            Command::new("curl")
        };
        let out = c
            .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", &url])
            .stdin(Stdio::null())
            .output()
            .expect("curl is needed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cli_edits_race_with_machines_registering_under_nginx() {
    const MACHINES: usize = 40;
    const CLI_ADDS: usize = 15;
    let r = root_with_host("race");
    fs::write(
        r.path().join("templates/image1.tmpl"),
        "#!ipxe\necho install @id@\n",
    )
    .unwrap();
    let stack = Arc::new(Stack::start(r.path()));
    let done = Arc::new(AtomicUsize::new(0));

    // A reader that checks the file is valid JSON whenever it looks. As
    // documented, a raw read that meets a registration being appended in
    // place may see the file unfinished; reading again must then give a
    // complete file at once, with no host of the last complete read lost.
    let db_path = r.db_path();
    let stop = done.clone();
    let reader = thread::spawn(move || {
        let mut reads = 0;
        let mut known = 0;
        while stop.load(Ordering::Relaxed) < 2 {
            let started = Instant::now();
            let hosts = loop {
                let text = fs::read_to_string(&db_path).unwrap();
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => break v,
                    Err(e) if started.elapsed() > Duration::from_secs(1) => {
                        panic!("invalid JSON for a second mid-race: {e}\n{text}")
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            };
            let n = hosts.as_array().map_or(0, Vec::len);
            assert!(n >= known, "a raw read lost hosts: {n} after {known}");
            known = n;
            reads += 1;
            thread::sleep(Duration::from_millis(2));
        }
        reads
    });

    // Machines boot through nginx, a few at a time.
    let mut boots = Vec::new();
    for t in 0..4 {
        let stack = stack.clone();
        boots.push(thread::spawn(move || {
            for i in (t..MACHINES).step_by(4) {
                let (code, body) = stack.get(&format!(
                    "/bootstrap?net0=52-54-00-10-00-{i:02x}&serial=M{i}"
                ));
                assert_eq!(code, 200, "{body}");
                assert!(body.starts_with("#!ipxe"), "{body}");
            }
        }));
    }
    // Meanwhile the operator adds hosts and edits host 1.
    let root = r.path().to_path_buf();
    let operator = thread::spawn(move || {
        let p = root.to_str().unwrap().to_string();
        for i in 0..CLI_ADDS {
            let mac = format!("52:54:00:20:00:{i:02x}");
            cli(
                &[
                    "--root",
                    &p,
                    "add",
                    "--mac",
                    &mac,
                    "--hostname",
                    &format!("op{i}"),
                ],
                None,
                &[],
            )
            .ok();
            cli(
                &[
                    "--root",
                    &p,
                    "set",
                    "1",
                    "--meta-set",
                    &format!("edits.e{i}={i}"),
                ],
                None,
                &[],
            )
            .ok();
        }
        cli(&["--root", &p, "set", "1", "--state", "image1"], None, &[]).ok();
    });
    for b in boots {
        b.join().unwrap();
    }
    operator.join().unwrap();
    done.store(2, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);

    let hosts = r.db();
    assert_eq!(hosts.len(), 1 + MACHINES + CLI_ADDS, "nothing lost");
    let mut ids: Vec<u64> = hosts.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), hosts.len(), "ids unique");
    for i in 0..MACHINES {
        let mac = format!("52:54:00:10:00:{i:02X}");
        assert_eq!(
            hosts.iter().filter(|h| h["macs"] == mac.as_str()).count(),
            1,
            "{mac}"
        );
    }
    for i in 0..CLI_ADDS {
        assert!(
            hosts
                .iter()
                .any(|h| h["hostname"] == format!("op{i}").as_str()),
            "op{i}"
        );
    }
    let h1 = r.host(1);
    assert_eq!(h1["state"], "image1");
    assert_eq!(
        h1["metadata"]["edits"].as_object().unwrap().len(),
        CLI_ADDS,
        "every edit kept"
    );
    let events = r.events();
    assert_eq!(
        events.iter().filter(|e| e["cause"] == "register").count(),
        MACHINES
    );
    assert_eq!(
        events.iter().filter(|e| e["cause"] == "cli").count(),
        1 + 2 * CLI_ADDS + 1
    );
    // The handler sees the CLI's last change at once.
    let (code, body) = stack.get("/state?id=1");
    assert_eq!((code, body.trim()), (200, "image1"));
    let out = r.run(&["check"]).ok().stdout;
    assert!(
        out.starts_with(&format!("ok: {} hosts", 1 + MACHINES + CLI_ADDS)),
        "{out}"
    );
}

#[test]
fn progress_only_on_a_terminal_for_large_files() {
    let r = Root::new("progress");
    let work = TempDir::new("progress-src");
    let prefix = "big.x86_64-1";
    let build = make_build(work.path(), Gen::Current, prefix, Tamper::None);
    let raw: Vec<u8> = (0..40u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    fs::write(build.join(format!("{prefix}.xz")), make_xz(&raw)).unwrap();
    let sum = digest("sha256sum", &raw);
    fs::write(
        build.join(format!("{prefix}.sha256")),
        format!("{sum} 10240 4096\n"),
    )
    .unwrap();
    drop(raw);
    let quiet = r
        .run(&["import-image", "big", build.to_str().unwrap()])
        .ok();
    assert!(
        quiet.stderr.is_empty(),
        "no progress without a terminal: {}",
        quiet.stderr
    );
    // Under script(1) stderr is a terminal.
    let cmd = format!(
        "{BIN} --root {} import-image big2 {}",
        r.path().display(),
        build.display()
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("verifying {prefix}.xz: 40 of 40 MiB (100%)")),
        "{text}"
    );
    assert!(text.contains("imported image big2"), "{text}");
}

// ------------------------------------------ attended images, install disk

mod common;

/// One entry of a cpio "newc" archive, the format of initrds.
fn newc_entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
    out.extend_from_slice(
        format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .as_bytes(),
    );
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A cpio "newc" archive of `(path, mode, content)` entries, padded with
/// zeros to 512 bytes as GNU cpio does.
fn cpio_newc(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        newc_entry(&mut out, i + 1, name, *mode, data);
    }
    newc_entry(&mut out, 0, "TRAILER!!!", 0, b"");
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

/// `data` compressed by `tool` (`xz`, `gzip`, `zstd`, ...), or `None` when
/// the tool is not installed.
fn compress(tool: &str, data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut c = Command::new(tool)
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = c.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(out.status.success(), "{tool} failed");
    Some(out.stdout)
}

/// What a KIWI installer's `/.profile` holds, attended or not.
fn kiwi_profile(unattended: bool) -> String {
    format!("kiwi_iname='web'\nkiwi_oemunattended='{unattended}'\nkiwi_oemrootMB='2048'\n")
}

/// An installer initrd as dracut and KIWI build it: optionally an
/// uncompressed early-microcode archive, then the main archive (with
/// `/.profile` under `profile_name`) compressed with `tool` ("none": not
/// compressed). `None` when `tool` is not installed.
fn installer_initrd(
    tool: &str,
    microcode: bool,
    profile_name: &str,
    profile: &str,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if microcode {
        out.extend(cpio_newc(&[
            ("kernel", 0o40755, b""),
            ("kernel/x86", 0o40755, b""),
            ("kernel/x86/microcode", 0o40755, b""),
            (
                "kernel/x86/microcode/GenuineIntel.bin",
                0o100644,
                &[0x55u8; 1000],
            ),
        ]));
    }
    let filler: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let main = cpio_newc(&[
        (".", 0o40755, b""),
        ("bin", 0o40755, b""),
        ("bin/dracut-stand-in", 0o100755, &filler),
        ("etc", 0o40755, b""),
        ("etc/profile", 0o100644, b"not the kiwi profile\n"),
        (profile_name, 0o100644, profile.as_bytes()),
        ("usr", 0o40755, b""),
    ]);
    if tool == "none" {
        out.extend(main);
    } else {
        out.extend(compress(tool, &main)?);
    }
    Some(out)
}

/// The installer initrd of a build made by [`make_build`].
fn installer_initrd_path(build: &Path, gen: Gen, prefix: &str) -> PathBuf {
    build.join(match gen {
        Gen::Bare => "pxeboot.initrd.xz".to_string(),
        Gen::XzInitrd => format!("pxeboot.{prefix}.initrd.xz"),
        Gen::Current => format!("pxeboot.{prefix}.initrd"),
    })
}

/// A build whose installer is attended (`unattended` false) or not.
fn kiwi_build(dir: &Path, prefix: &str, unattended: bool) -> PathBuf {
    let build = make_build(dir, Gen::Current, prefix, Tamper::None);
    let initrd = installer_initrd("xz", true, ".profile", &kiwi_profile(unattended)).unwrap();
    fs::write(installer_initrd_path(&build, Gen::Current, prefix), initrd).unwrap();
    build
}

fn image_info(r: &Root, name: &str) -> Value {
    serde_json::from_str(
        &fs::read_to_string(r.path().join("images").join(name).join("image.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn import_image_tells_attended_from_unattended_installers() {
    let r = Root::new("attended-import");
    let work = TempDir::new("attended-import-src");
    // (compression, early microcode, name of the profile in the archive,
    // naming generation, unattended)
    let cases = [
        ("xz", true, ".profile", Gen::Current, false),
        ("gzip", false, "./.profile", Gen::Current, true),
        ("zstd", true, ".profile", Gen::Current, false),
        ("none", true, ".profile", Gen::Current, false),
        ("bzip2", false, ".profile", Gen::XzInitrd, true),
        ("xz", false, ".profile", Gen::Bare, false),
    ];
    for (i, (tool, microcode, profile_name, gen, unattended)) in cases.into_iter().enumerate() {
        let name = format!("img{i}");
        let prefix = if gen == Gen::Bare {
            "img"
        } else {
            "img.x86_64-1"
        };
        let dir = work.path().join(&name);
        let build = make_build(&dir, gen, prefix, Tamper::None);
        let initrd = installer_initrd_path(&build, gen, prefix);
        let Some(data) = installer_initrd(tool, microcode, profile_name, &kiwi_profile(unattended))
        else {
            // Without the tool the test cannot compress, and the import
            // cannot decompress: it says so instead of guessing.
            let mut fake = match tool {
                "zstd" => b"\x28\xb5\x2f\xfd".to_vec(),
                "bzip2" => b"BZh91AY&SY".to_vec(),
                other => panic!("{other} is needed to make a compressed initrd"),
            };
            fake.extend_from_slice(&[0u8; 64]);
            fs::write(&initrd, fake).unwrap();
            let run = r
                .run(&["import-image", &name, build.to_str().unwrap()])
                .ok();
            assert!(
                run.stderr.contains(&format!("{tool} is not installed")),
                "{tool}: {}",
                run.stderr
            );
            assert_eq!(image_info(&r, &name)["unattended"], Value::Null);
            continue;
        };
        fs::write(&initrd, data).unwrap();
        let run = r
            .run(&["import-image", &name, build.to_str().unwrap(), "--json"])
            .ok();
        let j = run.json();
        assert_eq!(j["unattended"], unattended, "{tool}: {}", run.stdout);
        assert!(
            j["files"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "image.json"),
            "{}",
            run.stdout
        );
        let info = image_info(&r, &name);
        assert_eq!(info["unattended"], unattended, "{tool}: {info}");
        assert_eq!(
            info["installer_initrd"],
            initrd.file_name().unwrap().to_str().unwrap()
        );
        if unattended {
            assert_eq!(run.stderr, "", "{tool}");
        } else {
            assert_eq!(run.stderr.lines().count(), 1, "{tool}: {}", run.stderr);
            for part in [
                &format!("kiwispray-hosts: warning: image {name} is attended"),
                "kiwi_oemunattended='true'",
                "<oem-unattended>true</oem-unattended>",
                "--meta-set installdevice=/dev/disk/by-id/",
            ] {
                assert!(
                    run.stderr.contains(part),
                    "{tool}: {part:?} in {}",
                    run.stderr
                );
            }
        }
    }

    // An installer that is no cpio archive (a stand-in) is not judged.
    let build = make_build(
        &work.path().join("stub"),
        Gen::Current,
        "s.x86_64-1",
        Tamper::None,
    );
    let run = r
        .run(&["import-image", "stub", build.to_str().unwrap()])
        .ok();
    assert_eq!(run.stderr, "");
    let info = image_info(&r, "stub");
    assert_eq!(info["unattended"], Value::Null);
    assert!(
        info["unknown_because"]
            .as_str()
            .unwrap()
            .contains("neither a cpio archive"),
        "{info}"
    );
    // A cpio initrd without /.profile is no KIWI installer either.
    fs::write(
        installer_initrd_path(&build, Gen::Current, "s.x86_64-1"),
        cpio_newc(&[("init", 0o100755, b"#!/bin/sh\n")]),
    )
    .unwrap();
    let run = r
        .run(&["import-image", "stub", build.to_str().unwrap(), "--force"])
        .ok();
    assert_eq!(run.stderr, "");
    assert!(image_info(&r, "stub")["unknown_because"]
        .as_str()
        .unwrap()
        .contains("no /.profile"));

    // An install disk for every host in --append: attended, but no warning.
    let build = kiwi_build(&work.path().join("all"), "all.x86_64-1", false);
    let run = r
        .run(&[
            "import-image",
            "all",
            build.to_str().unwrap(),
            "--append",
            "rd.kiwi.oem.installdevice=/dev/vda",
        ])
        .ok();
    assert_eq!(run.stderr, "");
    assert_eq!(image_info(&r, "all")["unattended"], false);
    r.run(&["add", "--mac", MAC1, "--state", "all"]).ok();
    let out = r.run(&["check"]).ok().stdout;
    assert!(out.starts_with("ok:"), "{out}");
}

#[test]
fn attended_image_with_a_per_host_install_disk_passes_check_and_renders_it() {
    let r = root_with_host("attended-disk");
    let work = TempDir::new("attended-disk-src");
    let prefix = "web.x86_64-1.2.3";
    let build = kiwi_build(work.path(), prefix, false);
    let run = r
        .run(&["import-image", "web", build.to_str().unwrap()])
        .ok();
    assert!(run.stderr.contains("is attended"), "{}", run.stderr);
    let disk = "/dev/disk/by-id/nvme-EXAMPLE_SSD_1TB_S4EWNX0N123456";
    r.run(&[
        "set",
        "1",
        "--state",
        "web",
        "--meta-set",
        &format!("installdevice={disk}"),
    ])
    .ok();
    let out = r.run(&["check", "--deep"]).ok().stdout;
    assert!(out.starts_with("ok: 1 hosts, 1 images"), "{out}");

    // What the real handler serves the installing host: the installer's
    // kernel line carries the host's disk.
    let server = "127.0.0.1:5000";
    let (status, body) = handler(r.path(), "/bootstrap", "net0=52-54-00-00-00-01", server);
    assert!(status.contains("200"), "{status}");
    let bootid = r.host(1)["bootid"].as_str().unwrap().to_string();
    let kernel = body
        .lines()
        .find(|l| l.starts_with("kernel ") && l.contains("rd.kiwi.oem.installdevice="))
        .unwrap_or_else(|| panic!("{body}"));
    let words: Vec<&str> = kernel.split_whitespace().collect();
    assert!(
        words.contains(&format!("rd.kiwi.oem.installdevice={disk}").as_str()),
        "{kernel}"
    );
    assert!(
        words.contains(
            &format!("razorurl=http://{server}/post-install?id=1&bootid={bootid}").as_str()
        ),
        "{kernel}"
    );
    assert!(
        body.contains(&format!(
            "\niseq {disk} {disk} || goto ks-no-installdevice\n"
        )),
        "{body}"
    );
    common::golden::check(
        "bootstrap-install-installdevice.ipxe",
        &common::golden::normalise(&body, &[(&bootid, "@BOOTID@")]),
    );
    // The preview is the same script.
    assert_eq!(
        r.run(&["render", "1", "--server", server]).ok().stdout,
        body
    );
}

/// `import-image` writes `host.grub` beside `host.tmpl`: the GRUB flavour
/// boots the same installer with the same arguments, the host's install
/// disk included, and `render --loader grub` shows the same script.
#[test]
fn imported_image_boots_under_grub_with_the_same_kernel_arguments() {
    let r = root_with_host("grub-import");
    let work = TempDir::new("grub-import-src");
    let prefix = "web.x86_64-1.2.3";
    let build = kiwi_build(work.path(), prefix, false);
    let run = r
        .run(&["import-image", "web", build.to_str().unwrap()])
        .ok();
    assert!(run.stdout.contains("host.grub"), "{}", run.stdout);
    let disk = "/dev/disk/by-id/nvme-EXAMPLE_SSD_1TB_S4EWNX0N123456";
    r.run(&[
        "set",
        "1",
        "--state",
        "web",
        "--meta-set",
        &format!("installdevice={disk}"),
    ])
    .ok();
    let server = "127.0.0.1:5000";
    let (status, ipxe) = handler(r.path(), "/bootstrap", "net0=52-54-00-00-00-01", server);
    assert!(status.contains("200"), "{status}");
    let (status, grub) = handler(
        r.path(),
        "/ks/bootstrap",
        "net0=52:54:00:00:00:01&loader=grub",
        server,
    );
    assert!(status.contains("200"), "{status}: {grub}");
    let bootid = r.host(1)["bootid"].as_str().unwrap().to_string();
    // The iPXE kernel line's words, less initrd= and BOOTIF= (GRUB loads
    // the initrd itself and sets BOOTIF from the MAC it booted from), are
    // the GRUB script's ks_args; the bootid is the new attempt's.
    let kernel = ipxe
        .lines()
        .find(|l| l.starts_with("kernel ") && l.contains("installdevice"))
        .unwrap();
    let ipxe_args: Vec<&str> = kernel
        .split_whitespace()
        .skip(2)
        .filter(|w| {
            !w.starts_with("initrd=")
                && !w.starts_with("BOOTIF=")
                && !w.starts_with("rd.kiwi.oem.installdevice=")
                && *w != "||"
                && *w != "goto"
                && *w != "ks-failed"
        })
        .map(|w| w.split("bootid=").next().unwrap())
        .collect();
    let line = grub
        .lines()
        .find(|l| l.starts_with("set ks_args='"))
        .unwrap_or_else(|| panic!("{grub}"));
    let grub_args: Vec<&str> = line["set ks_args='".len()..line.len() - 1]
        .split_whitespace()
        .map(|w| w.split("bootid=").next().unwrap())
        .collect();
    assert_eq!(grub_args, ipxe_args);
    assert!(
        line.contains(&format!(
            "razorurl=http://{server}/post-install?id=1&bootid={bootid}"
        )),
        "{line}"
    );
    assert!(
        grub.contains(&format!("set ks_device='{disk}'\n")),
        "{grub}"
    );
    assert!(
        grub.contains("rd.kiwi.oem.installdevice=$ks_device"),
        "{grub}"
    );
    common::golden::check(
        "bootstrap-install-installdevice.grub",
        &common::golden::normalise(&grub, &[(&bootid, "@BOOTID@")]),
    );
    let check = Command::new("grub-script-check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(grub.as_bytes())?;
            c.wait_with_output()
        })
        .expect("grub-script-check (grub-common)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        r.run(&["render", "1", "--server", server, "--loader", "grub"])
            .ok()
            .stdout,
        grub
    );
    let bad = r.run(&["render", "1", "--loader", "uboot"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("unknown loader"), "{}", bad.stderr);
    assert!(r.path().join("images/web/host.grub").is_file());
}

#[test]
fn attended_image_without_an_install_disk_is_flagged_by_check() {
    let r = root_with_host("attended-nodisk");
    // Many install boots of one host below: no loop breaker here.
    fs::write(
        r.path().join("kiwispray.json"),
        r#"{"max_install_boots": 1000}"#,
    )
    .unwrap();
    let work = TempDir::new("attended-nodisk-src");
    let build = kiwi_build(&work.path().join("a"), "web.x86_64-1", false);
    r.run(&["import-image", "web", build.to_str().unwrap()])
        .ok();
    let build = kiwi_build(&work.path().join("u"), "auto.x86_64-1", true);
    let run = r
        .run(&["import-image", "auto", build.to_str().unwrap()])
        .ok();
    assert_eq!(run.stderr, "", "an unattended image imports quietly");
    r.run(&["set", "1", "--state", "web"]).ok();
    // Host 2 has a disk; host 3 is in the unattended image's state.
    r.run(&[
        "add",
        "--mac",
        MAC2,
        "--state",
        "web",
        "--meta",
        r#"{"installdevice": "/dev/sdb"}"#,
    ])
    .ok();
    r.run(&["add", "--mac", "52:54:00:00:00:03", "--state", "auto"])
        .ok();
    let run = r.run(&["check"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let problems: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("problem: "))
        .collect();
    assert_eq!(problems.len(), 1, "{}", run.stdout);
    for part in [
        "host 1 is in state web",
        "attended",
        "Destroying ALL data on <disk>, continue ?",
        "kiwispray-hosts set 1 --meta-set installdevice=/dev/disk/by-id/",
        "<oem-unattended>true</oem-unattended>",
    ] {
        assert!(problems[0].contains(part), "{part:?} in {}", problems[0]);
    }
    let j = r.run(&["check", "--json"]).json();
    assert_eq!(j["ok"], false);
    assert_eq!(j["problems"].as_array().unwrap().len(), 1, "{j}");
    // The host boots the installer all the same (check only warns), without
    // a disk on its kernel line.
    let (_, body) = handler(
        r.path(),
        "/bootstrap",
        "net0=52-54-00-00-00-01",
        "10.0.0.1:5000",
    );
    assert!(
        body.contains("\niseq @metadata.installdevice|ipxe@ @metadata.installdevice@ || goto ks-no-installdevice\n"),
        "{body}"
    );

    // A disk of the wrong shape is flagged, and a value iPXE would
    // misread never reaches a kernel line: the machine gets an error.
    for (bad, why) in [
        ("sdb", "not a device path"),
        ("/dev/../sdb", "not a device path"),
        ("/dev/sdb1 || shell", "characters"),
        ("/dev/disk/by-id/${evil}", "characters"),
    ] {
        r.run(&["set", "1", "--meta-set", &format!("installdevice={bad}")])
            .ok();
        let run = r.run(&["check"]);
        assert_eq!(run.code, 1);
        assert!(
            run.stdout
                .contains(&format!("host 1: metadata installdevice {bad:?}"))
                && run.stdout.contains(why),
            "{bad}: {}",
            run.stdout
        );
        assert_eq!(
            run.stdout.matches("problem: ").count(),
            1,
            "{bad}: {}",
            run.stdout
        );
        let (status, body) = handler(
            r.path(),
            "/bootstrap",
            "net0=52-54-00-00-00-01",
            "10.0.0.1:5000",
        );
        let unsafe_word = bad.contains(' ') || bad.contains('$');
        if unsafe_word {
            assert!(status.contains("200"), "{status}");
            assert!(
                !body.lines().any(|l| l.starts_with("kernel ")),
                "{bad}: {body}"
            );
            assert!(body.contains("iPXE"), "{bad}: {body}");
        }
    }
    r.run(&[
        "set",
        "1",
        "--meta-set",
        "installdevice=/dev/disk/by-path/pci-0000:00:1f.2-ata-1",
    ])
    .ok();
    let out = r.run(&["check"]).ok().stdout;
    assert!(out.starts_with("ok: 3 hosts, 2 images"), "{out}");

    // A host.tmpl that does not pass the disk (written before, or by
    // hand) is flagged for the hosts that have one.
    let tmpl = r.path().join("images/web/host.tmpl");
    let text = fs::read_to_string(&tmpl).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.contains("installdevice") && !l.starts_with("goto ks-initrd"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(old.contains("\nkernel "), "{old}");
    fs::write(&tmpl, old).unwrap();
    let run = r.run(&["check"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout.matches("problem: ").count(), 2, "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "host 1 is in state web, an attended image, and has installdevice metadata, but"
        ) && run.stdout.contains("does not pass it"),
        "{}",
        run.stdout
    );
}

/// Runs `script` in real iPXE (Debian's `ipxe.lkrn` under QEMU, given the
/// script as its initrd, without any network) and returns what it printed
/// between the lines `KS-BEGIN` and `KS-END`, console line wraps removed.
fn run_in_ipxe(script: &str) -> String {
    let lkrn = Path::new("/usr/lib/ipxe/ipxe.lkrn");
    assert!(
        lkrn.is_file(),
        "this test needs {} (Debian package ipxe; `make test-unit` installs it)",
        lkrn.display()
    );
    let dir = TempDir::new("ipxe");
    let (script_path, serial) = (dir.path().join("s.ipxe"), dir.path().join("serial.log"));
    fs::write(&script_path, script).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-nographic", "-display", "none", "-m", "128"])
        .args(["-net", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(lkrn)
        .arg("-initrd")
        .arg(&script_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("this test needs qemu-system-x86_64 (Debian package qemu-system-x86)");
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
        if text.contains("KS-END") || Instant::now() > deadline {
            break text;
        }
        if let Ok(Some(st)) = qemu.try_wait() {
            panic!("QEMU exited ({st}) before the script ended:\n{text}");
        }
        thread::sleep(Duration::from_millis(200));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    let flat: String = out.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let begin = flat
        .find("KS-BEGIN")
        .unwrap_or_else(|| panic!("iPXE did not run the script:\n{out}"));
    let end = flat
        .find("KS-END")
        .unwrap_or_else(|| panic!("the script did not reach its end in 120 s:\n{out}"));
    flat[begin + "KS-BEGIN".len()..end].to_string()
}

#[test]
fn generated_host_tmpl_takes_the_install_disk_branch_in_real_ipxe() {
    let r = root_with_host("ipxe-disk");
    let work = TempDir::new("ipxe-disk-src");
    let build = kiwi_build(work.path(), "web.x86_64-1", false);
    r.run(&["import-image", "web", build.to_str().unwrap()])
        .ok();
    let disk = "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4";
    r.run(&[
        "set",
        "1",
        "--state",
        "web",
        "--meta-set",
        &format!("installdevice={disk}"),
    ])
    .ok();
    r.run(&["add", "--mac", MAC2, "--state", "web"]).ok();
    for (query, with_disk) in [
        ("net0=52-54-00-00-00-01", true),
        ("net0=52-54-00-00-00-02", false),
    ] {
        let (_, body) = handler(r.path(), "/bootstrap", query, "127.0.0.1:5000");
        // The served script as it is, except that loading the kernel
        // prints its arguments instead, and the initrd line ends the run.
        let script: String = body
            .lines()
            .map(|l| {
                if let Some(args) = l.strip_prefix("kernel ") {
                    format!(
                        "echo KS-KERNEL {}",
                        args.trim_end_matches(" || goto ks-failed")
                    )
                } else if l.starts_with("initrd ") {
                    "echo KS-END".to_string()
                } else if l == "imgfree" {
                    "echo KS-BEGIN".to_string()
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        let printed = run_in_ipxe(&script);
        let kernels: Vec<&str> = printed.split("KS-KERNEL").skip(1).collect();
        assert_eq!(kernels.len(), 1, "one kernel line runs: {printed}");
        let words: Vec<&str> = kernels[0].split_whitespace().collect();
        assert!(
            words
                .iter()
                .any(|w| w.starts_with("razorurl=http://127.0.0.1:5000/post-install?id=")),
            "{printed}"
        );
        let arg = format!("rd.kiwi.oem.installdevice={disk}");
        assert_eq!(
            words.contains(&arg.as_str()),
            with_disk,
            "{query}: {printed}"
        );
        assert!(
            !printed.contains("installdevice|ipxe"),
            "no placeholder reaches the kernel: {printed}"
        );
    }
}

/// Issue 9: for a host whose state was set by hand to `../../etc`, `a/b`
/// or an absolute path, `render HOST --post-install` printed a file from
/// outside the deployment root: the path was built from the state
/// unchecked. Every caller now goes through Config::image_dir.
#[test]
fn regression_render_post_install_never_reads_outside_the_root() {
    let r = root_with_host("outside");
    // A file outside the root that the bad states would reach.
    let outside = r.path().parent().unwrap().join("post_install.tmpl");
    let secret = format!("SECRET-OUTSIDE-THE-ROOT {}\n", std::process::id());
    let wrote_outside = fs::write(&outside, &secret).is_ok();
    fs::create_dir_all(r.path().join("images/a/b")).unwrap();
    fs::write(r.path().join("images/a/b/post_install.tmpl"), &secret).unwrap();
    let text = r.db_text();
    for bad in ["../../etc", "..", "a/b", "/etc", "../images/a"] {
        let edited = text.replace("\"state\": \"new\"", &format!("\"state\": {bad:?}"));
        assert_ne!(edited, text);
        fs::write(r.db_path(), &edited).unwrap();
        let run = r.run(&["render", "1", "--post-install"]);
        assert_eq!(run.code, 2, "{bad}: {}", run.stdout);
        assert!(
            run.stderr.contains("is not a safe name"),
            "{bad}: {}",
            run.stderr
        );
        assert!(!run.stdout.contains("SECRET"), "{bad}: {}", run.stdout);
        let run = r.run(&["render", "1"]).ok();
        assert!(
            run.stdout.contains("is not a safe name"),
            "{bad}: {}",
            run.stdout
        );
        // The handler gives the same refusal on the boot path.
        let (_, body) = handler(
            r.path(),
            "/bootstrap",
            "net0=52-54-00-00-00-01",
            "10.0.0.1:5000",
        );
        assert!(body.contains("is not a safe name"), "{bad}: {body}");
        assert!(!body.contains("SECRET"));
        let run = r.run(&["check"]);
        assert_eq!(run.code, 1);
        assert!(
            run.stdout.contains("not a safe name"),
            "{bad}: {}",
            run.stdout
        );
    }
    if wrote_outside {
        fs::remove_file(&outside).unwrap();
    }
}

// ------------------------------------------------------------ boot files

/// `check --dnsmasq FILE` names every boot file the configuration's boot
/// paths need and lacks: iPXE over TFTP (a plain name, a `tftp://` URL) in
/// its tftp-root, iPXE over HTTP (`/boot/...`) in the root's boot/; a
/// dangling link in boot/ too. Once all are there, check passes.
#[test]
fn check_names_missing_boot_files_of_the_dnsmasq_config() {
    let r = Root::new("checkboot");
    let tftp = TempDir::new("checkboot-tftp");
    let conf = tftp.path().join("kiwispray.conf");
    fs::write(
        &conf,
        format!(
            "interface=br0\nenable-tftp\ntftp-root={}\n\
             dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe\n\
             pxe-service=tag:!ipxe,x86-64_EFI,\"KIWIspray: iPXE, UEFI\",ipxe.efi\n\
             dhcp-boot=tag:!ipxe,tag:efi-http,http://10.0.0.1:5000/boot/snponly.efi\n\
             dhcp-option=tag:!ipxe,tag:efi64,option6:bootfile-url,tftp://[fd00::1]/snponly.efi\n\
             dhcp-option=tag:!ipxe,tag:efi-http,option6:bootfile-url,http://[fd00::1]:5000/boot/ipxe.efi\n\
             dhcp-boot=tag:ipxe,http://10.0.0.1:5000/bootstrap.ipxe\n",
            tftp.path().display()
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let t = tftp.path().display().to_string();
    let b = r.path().join("boot").display().to_string();
    let run = r.run(&["check", "--dnsmasq", conf]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    for want in [
        format!("{conf}:4: {t}/undionly.kpxe is missing; machines booting over TFTP"),
        format!("{conf}:5: {t}/ipxe.efi is missing"),
        format!("{conf}:6: {b}/snponly.efi is missing; machines booting over HTTP"),
        format!("{conf}:7: {t}/snponly.efi is missing"),
        format!("{conf}:8: {b}/ipxe.efi is missing"),
    ] {
        assert!(run.stdout.contains(&want), "{want}\n{}", run.stdout);
    }
    assert!(!run.stdout.contains("bootstrap.ipxe"), "{}", run.stdout);
    assert_eq!(run.stdout.matches("problem:").count(), 5, "{}", run.stdout);

    // A link into an iPXE package that is gone.
    fs::create_dir(r.path().join("boot")).unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/snponly.efi",
        r.path().join("boot/snponly.efi"),
    )
    .unwrap();
    let run = r.run(&["check", "--dnsmasq", conf]);
    assert!(
        run.stdout.contains(&format!(
            "problem: {b}/snponly.efi is a dangling link; the web server cannot serve it"
        )),
        "{}",
        run.stdout
    );
    let json = r.run(&["check", "--dnsmasq", conf, "--json"]).json();
    assert_eq!(json["ok"], false);

    fs::remove_file(r.path().join("boot/snponly.efi")).unwrap();
    for f in [format!("{b}/snponly.efi"), format!("{b}/ipxe.efi")]
        .iter()
        .chain(
            ["undionly.kpxe", "ipxe.efi", "snponly.efi"]
                .map(|n| format!("{t}/{n}"))
                .iter(),
        )
    {
        fs::write(f, b"MZ").unwrap();
    }
    let out = r.run(&["check", "--dnsmasq", conf]).ok().stdout;
    assert!(out.starts_with("ok:"), "{out}");
    // An empty file is no boot file.
    fs::write(format!("{t}/undionly.kpxe"), b"").unwrap();
    let run = r.run(&["check", "--dnsmasq", conf]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("{t}/undionly.kpxe is empty")),
        "{}",
        run.stdout
    );
}

/// Where `boot/` holds the GRUB flavour, `check` wants its templates,
/// `grub/grub.cfg`, a GRUB beside the shim, both signed (the firmware and
/// the shim refuse unsigned binaries under Secure Boot), and a `host.grub`
/// for every image. Debian's signed binaries pass.
#[test]
fn check_validates_the_grub_flavour_files() {
    let shim = Path::new("/usr/lib/shim/shimx64.efi.signed");
    let grub = Path::new("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed");
    let unsigned = Path::new("/usr/lib/ipxe/ipxe.efi");
    for p in [shim, grub, unsigned] {
        assert!(
            p.is_file(),
            "{} (packages shim-signed, grub-efi-amd64-signed, ipxe)",
            p.display()
        );
    }
    let r = Root::new("checkgrub");
    let b = r.path().join("boot");
    fs::create_dir_all(b.join("grub")).unwrap();
    // No GRUB files: nothing about GRUB is asked.
    let run = r.run(&["check"]);
    assert!(!run.stdout.contains("grub"), "{}", run.stdout);
    // A shim alone, unsigned, and no grub.cfg.
    fs::copy(unsigned, b.join("shimx64.efi")).unwrap();
    r.image_dir("web");
    fs::write(r.path().join("images/web/host.tmpl"), "#!ipxe\nboot\n").unwrap();
    fs::remove_file(r.path().join("templates/finished.grub")).unwrap();
    let run = r.run(&["check"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let bd = b.display();
    for want in [
        format!(
            "{}/finished.grub is missing; machines booting GRUB",
            r.path().join("templates").display()
        ),
        format!("{bd}/grub/grub.cfg is missing; GRUB reads it first"),
        format!("{bd}/grubx64.efi is missing: the shim in {bd} loads it"),
        format!("{bd}/shimx64.efi is not signed: under Secure Boot the firmware refuses it"),
        "image web has no host.grub".to_string(),
    ] {
        assert!(run.stdout.contains(&want), "{want}\n{}", run.stdout);
    }
    // An unsigned GRUB beside the shim.
    fs::copy(unsigned, b.join("grubx64.efi")).unwrap();
    let run = r.run(&["check"]);
    assert!(
        run.stdout.contains(&format!(
            "{bd}/grubx64.efi is not signed: under Secure Boot the shim refuses it"
        )),
        "{}",
        run.stdout
    );
    // A GRUB template GRUB cannot parse.
    fs::write(
        r.path().join("templates/finished.grub"),
        "if [ x = y ]; then\necho 'no fi'\n",
    )
    .unwrap();
    let run = r.run(&["check"]);
    assert!(
        run.stdout.contains("finished.grub: GRUB cannot parse it"),
        "{}",
        run.stdout
    );
    // Debian's signed chain, the shipped templates and grub.cfg: ok.
    fs::remove_file(b.join("shimx64.efi")).unwrap();
    fs::remove_file(b.join("grubx64.efi")).unwrap();
    std::os::unix::fs::symlink(shim, b.join("shimx64.efi")).unwrap();
    std::os::unix::fs::symlink(grub, b.join("grubx64.efi")).unwrap();
    std::os::unix::fs::symlink("../../templates/bootstrap.grub", b.join("grub/grub.cfg")).unwrap();
    fs::copy(
        common::repo().join("templates/finished.grub"),
        r.path().join("templates/finished.grub"),
    )
    .unwrap();
    fs::write(r.path().join("images/web/host.grub"), "echo 'web'\n").unwrap();
    let run = r.run(&["check"]);
    assert!(!run.stdout.contains("problem"), "{}", run.stdout);
    assert!(!run.stdout.contains("grub"), "{}", run.stdout);
}
