//! Fleet operations through the real `kiwispray-hosts`: `--where`
//! selectors on set, remove, release, render and list; dry runs; the
//! confirmation a change to several hosts needs; one commit for a bulk
//! change, all or nothing.

mod common;

use common::{bin_dir, repo, TempDir};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// A root with `n` generated hosts (gen-hosts.sh: 80% finished, 10% new,
/// 10% image1; metadata rack R00.. by id / 40) and an image `img`.
fn root(tag: &str, n: usize) -> TempDir {
    let dir = TempDir::new(tag);
    let out = Command::new(repo().join("tests/bench/gen-hosts.sh"))
        .arg(n.to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::write(dir.path().join("known_hosts.json"), out.stdout).unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(repo().join("templates"))
        .arg(dir.path().join("templates"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    fs::create_dir_all(dir.path().join("images/img")).unwrap();
    fs::write(
        dir.path().join("images/img/host.tmpl"),
        "#!ipxe\necho INSTALL @id@ @hostname@\n",
    )
    .unwrap();
    dir
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(root: &Path, args: &[&str]) -> Out {
    let out = Command::new(bin_dir().join("kiwispray-hosts"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn hosts(root: &Path) -> Vec<Value> {
    let out = cli(root, &["list", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn db(root: &Path) -> Vec<u8> {
    fs::read(root.join("known_hosts.json")).unwrap()
}

fn events(root: &Path) -> Vec<Value> {
    fs::read_to_string(root.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The ids gen-hosts.sh puts in state `new` in rack R01 (ids 40..79).
fn new_in_r01(n: u64) -> Vec<u64> {
    (1..=n).filter(|i| i % 10 == 5 && i / 40 == 1).collect()
}

#[test]
fn bulk_set_by_selector_is_one_commit_with_one_event_per_host() {
    let r = root("bulkset", 400);
    let want = new_in_r01(400);
    assert_eq!(want.len(), 4);
    let before = db(r.path());
    let out = cli(
        r.path(),
        &[
            "set",
            "--where",
            "state=new metadata.rack=R01",
            "--state",
            "img",
        ],
    );
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(
        out.stderr.contains("this would change 4 hosts: add --yes"),
        "{}",
        out.stderr
    );
    assert_eq!(db(r.path()), before, "nothing written without --yes");
    // A dry run shows every host and what would change, and writes nothing.
    let out = cli(
        r.path(),
        &[
            "set",
            "--where",
            "state=new",
            "--where",
            "metadata.rack=R01",
            "--state",
            "img",
            "--dry-run",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    for id in &want {
        assert!(
            out.stdout
                .contains(&format!("host {id} (not-set): state new -> img")),
            "{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("dry run: 4 host(s) would change"),
        "{}",
        out.stdout
    );
    assert_eq!(db(r.path()), before);
    let ino = fs::metadata(r.path().join("known_hosts.json")).unwrap();
    let out = cli(
        r.path(),
        &[
            "set",
            "--where",
            "state=new metadata.rack=R01",
            "--state",
            "img",
            "--yes",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("4 hosts changed in one commit"),
        "{}",
        out.stdout
    );
    let changed: Vec<u64> = hosts(r.path())
        .iter()
        .filter(|h| h["state"] == "img")
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(changed, want);
    let ev = events(r.path());
    assert_eq!(ev.len(), 4, "one event per host");
    assert!(ev
        .iter()
        .all(|e| e["from"] == "new" && e["to"] == "img" && e["cause"] == "cli"));
    use std::os::unix::fs::MetadataExt;
    let after = fs::metadata(r.path().join("known_hosts.json")).unwrap();
    assert_ne!(after.ino(), ino.ino(), "replaced atomically");
    // HOST arguments and --where together: the named hosts that match.
    let out = cli(
        r.path(),
        &[
            "set",
            "45",
            "46",
            "55",
            "--where",
            "state=img",
            "--hostname",
            "picked",
            "--yes",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let picked: Vec<u64> = hosts(r.path())
        .iter()
        .filter(|h| h["hostname"] == "picked")
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(picked, [45, 55]);
}

#[test]
fn a_host_that_cannot_take_the_change_stops_the_whole_command() {
    let r = root("allornothing", 100);
    let out = cli(r.path(), &["set", "3", "--meta-set", "net=plain"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let before = db(r.path());
    let events_before = events(r.path()).len();
    let out = cli(
        r.path(),
        &[
            "set",
            "--where",
            "id=1-5",
            "--meta-set",
            "net.vlan=7",
            "--yes",
        ],
    );
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("1 host(s) cannot take the change, so nothing was changed: host 3: metadata net is \"plain\""),
        "{}",
        out.stderr
    );
    assert_eq!(db(r.path()), before);
    assert_eq!(events(r.path()).len(), events_before);
    // Unknown states and bad expressions are refused before anything.
    let out = cli(
        r.path(),
        &["set", "--where", "id=1-5", "--state", "ghost", "--yes"],
    );
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("state \"ghost\""), "{}", out.stderr);
    let out = cli(
        r.path(),
        &["set", "--where", "colour=red", "--state", "img", "--yes"],
    );
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unknown key"), "{}", out.stderr);
    let out = cli(
        r.path(),
        &["set", "--where", "id=900-999", "--state", "img", "--yes"],
    );
    assert_eq!(out.code, 3);
    assert!(
        out.stderr.contains("no host matches --where id=900-999"),
        "{}",
        out.stderr
    );
    let out = cli(r.path(), &["set", "--state", "img"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("name the hosts"), "{}", out.stderr);
    assert_eq!(db(r.path()), before);
}

#[test]
fn a_terminal_confirms_a_change_to_several_hosts() {
    if Command::new("script").arg("--version").output().is_err() {
        panic!("script (util-linux) is needed to give the CLI a terminal");
    }
    let r = root("confirm", 40);
    let cmd = format!(
        "{} --root {} set --where id=1-3 --hostname confirmed",
        bin_dir().join("kiwispray-hosts").display(),
        r.path().display()
    );
    for (answer, changed) in [("n\n", false), ("y\n", true)] {
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("change 3 hosts? [y/N]"), "{text}");
        let n = hosts(r.path())
            .iter()
            .filter(|h| h["hostname"] == "confirmed")
            .count();
        assert_eq!(n, if changed { 3 } else { 0 }, "answer {answer:?}: {text}");
    }
}

#[test]
fn remove_release_render_and_list_take_selectors() {
    let r = root("selectors", 100);
    let out = cli(
        r.path(),
        &["list", "--where", "hostname=node0001*.rack00.*"],
    );
    assert_eq!(out.code, 0);
    let lines: Vec<&str> = out.stdout.lines().skip(1).collect();
    // node00010 .. node00019 in rack 00; 15 is `new` and has no hostname.
    assert_eq!(lines.len(), 9, "{}", out.stdout);
    let out = cli(
        r.path(),
        &["render", "10", "20", "--server", "10.0.0.1:5000"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("==> host 10 (node00010.rack00.example.net) <==\n#!ipxe\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("==> host 20 "), "{}", out.stdout);
    let out = cli(r.path(), &["remove", "--where", "id=90-99", "--dry-run"]);
    assert_eq!(out.code, 0);
    assert!(
        out.stdout.contains("dry run: 10 host(s) would be removed"),
        "{}",
        out.stdout
    );
    assert_eq!(hosts(r.path()).len(), 100);
    let out = cli(r.path(), &["remove", "--where", "id=90-99", "--yes"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(hosts(r.path()).len(), 90);
    assert_eq!(events(r.path()).len(), 10);
    let out = cli(r.path(), &["release", "--where", "held"]);
    assert_eq!(out.code, 3, "no host is held");
    assert!(
        out.stderr.contains("no host matches --where held"),
        "{}",
        out.stderr
    );
}

/// A stack with hosts 1..=n in state `img` and `settings` as kiwispray.json.
fn stack_in_img(n: u64, settings: &str) -> common::Stack {
    let settings = settings.to_string();
    common::Stack::start_with(common::Options {
        prepare: Some(Box::new(move |root: &Path| {
            let hosts: Vec<Value> = (1..=n)
                .map(|i| {
                    serde_json::json!({"id": i, "macs": format!("52:54:00:00:10:{i:02X}"),
                    "serial": format!("CAP{i}"), "uuid": "", "hostname": format!("cap{i}"),
                    "state": "img", "metadata": {}})
                })
                .collect();
            fs::write(
                root.join("known_hosts.json"),
                Value::Array(hosts).to_string(),
            )
            .unwrap();
            fs::create_dir_all(root.join("images/img")).unwrap();
            fs::write(
                root.join("images/img/host.tmpl"),
                "#!ipxe\necho INSTALL @id@\necho BOOTID @bootid@\n",
            )
            .unwrap();
            fs::write(root.join("kiwispray.json"), settings).unwrap();
        })),
        ..common::Options::default()
    })
}

#[test]
fn max_installs_caps_open_attempts_under_concurrent_boots() {
    let s = std::sync::Arc::new(stack_in_img(30, r#"{"max_installs": 5}"#));
    let mut threads = Vec::new();
    for i in 1..=30u64 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            let r = s.get_as_pxe(&format!("/bootstrap?net0=52-54-00-00-10-{i:02x}"));
            assert_eq!(r.status, 200, "{}", r.text());
            (i, r.text())
        }));
    }
    let answers: Vec<(u64, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let started: Vec<&(u64, String)> = answers
        .iter()
        .filter(|(_, t)| t.contains("BOOTID"))
        .collect();
    let waiting: Vec<&(u64, String)> = answers
        .iter()
        .filter(|(_, t)| t.contains("waits its turn"))
        .collect();
    assert_eq!(started.len(), 5, "{answers:?}");
    assert_eq!(waiting.len(), 25);
    let w = &waiting[0].1;
    assert!(
        w.contains("5 of at most 5 machines are installing now"),
        "{w}"
    );
    assert!(
        w.contains("sleep 60\nchain --autofree bootstrap.ipxe || reboot"),
        "{w}"
    );
    let list = cli(&s.root, &["list", "--where", "installing"]);
    assert_eq!(list.stdout.lines().count(), 1 + 5, "{}", list.stdout);
    // Waiting machines got no bootid and counted no attempt.
    let (wid, _) = waiting[0];
    let one = cli(&s.root, &["show", &wid.to_string(), "--json"]);
    let v: Value = serde_json::from_str(&one.stdout).unwrap();
    assert!(v["host"]["runtime"]["attempts"]
        .as_array()
        .unwrap()
        .is_empty());
    // A machine already installing may boot again; two finishes free two slots.
    let (sid, text) = started[0];
    let again = s.get_as_pxe(&format!("/bootstrap?net0=52-54-00-00-10-{sid:02x}"));
    assert!(again.text().contains("BOOTID"), "{}", again.text());
    let _ = text;
    for (id, _) in &started[1..3] {
        let b = s.field(*id, "bootid");
        assert_eq!(s.get(&format!("/finish?id={id}&bootid={b}")).status, 200);
    }
    let mut more = 0;
    for (id, _) in &waiting {
        let r = s.get_as_pxe(&format!("/bootstrap?net0=52-54-00-00-10-{id:02x}"));
        if r.text().contains("BOOTID") {
            more += 1;
        }
    }
    assert_eq!(more, 2);
}

#[test]
fn import_inventory_adds_updates_and_refuses_all_or_nothing() {
    let r = root("inventory", 20);
    // Host 1 of gen-hosts.sh: MAC 0C:C4:7A:00:00:01, serial CZ0000001K.
    let bad = "\u{feff}mac,serial,hostname,state,metadata.rack\r\n\
               0c-c4-7a-00-00-01,,renamed1,,R9\r\n\
               52:54:00:aa:00:01;52:54:00:aa:00:02,NEW-1,new1,img,R9\r\n\
               zz:zz,NEW-2,new2,,\r\n\
               0c-c4-7a-00-00-03,CZ0000002K,new3,,\r\n\
               52:54:00:aa:00:04,,wéb,,\r\n\
               52:54:00:aa:00:01,,again,,\r\n\
               52:54:00:aa:00:05,,ghosty,ghost,\r\n";
    let file = r.path().join("vendor.csv");
    fs::write(&file, bad).unwrap();
    let before = db(r.path());
    let out = cli(r.path(), &["import-inventory", file.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    for want in [
        "line 2: update host 1 (renamed1): hostname",
        "line 3: add host 21 (new1, 52:54:00:AA:00:01 52:54:00:AA:00:02)",
        "line 4: refused: mac \"zz:zz\"",
        "line 5: refused: its keys belong to different hosts (host 3 and host 2)",
        "line 6: refused: hostname \"wéb\" is not valid",
        "line 7: refused: MAC 52:54:00:AA:00:01 is also on line 3",
        "line 8: refused: state \"ghost\"",
        "1 would be added, 1 would be updated, 0 unchanged, 5 refused; nothing was written",
    ] {
        assert!(out.stdout.contains(want), "{want}\n{}", out.stdout);
    }
    assert_eq!(db(r.path()), before, "a refusal writes nothing");
    let out = cli(
        r.path(),
        &["import-inventory", file.to_str().unwrap(), "--skip-bad"],
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stdout
            .contains("1 added, 1 updated, 0 unchanged, 5 refused (one commit)"),
        "{}",
        out.stdout
    );
    let hs = hosts(r.path());
    assert_eq!(hs.len(), 21);
    let h1 = hs.iter().find(|h| h["id"] == 1).unwrap();
    assert_eq!(h1["hostname"], "renamed1");
    assert_eq!(h1["metadata"]["rack"], "R9");
    assert_eq!(h1["metadata"]["role"], "compute", "other metadata kept");
    let h21 = hs.iter().find(|h| h["id"] == 21).unwrap();
    assert_eq!(h21["state"], "img");
    assert_eq!(events(r.path()).len(), 2);
    // JSON, again: now unchanged; a dry run writes nothing.
    let json = r.path().join("vendor.json");
    fs::write(
        &json,
        r#"[{"mac": ["0c:c4:7a:00:00:01"], "hostname": "renamed1", "metadata": {"rack": "R9"}},
            {"serial": "NEW-9", "mac": "52:54:00:aa:00:09", "metadata.net.vlan": 7}]"#,
    )
    .unwrap();
    let out = cli(
        r.path(),
        &["import-inventory", json.to_str().unwrap(), "--dry-run"],
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stdout
            .contains("1 would be added, 0 would be updated, 1 unchanged, 0 refused; dry run"),
        "{}",
        out.stdout
    );
    assert_eq!(hosts(r.path()).len(), 21);
    let out = cli(
        r.path(),
        &["import-inventory", json.to_str().unwrap(), "--json"],
    );
    assert_eq!(out.code, 0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["added"], 1);
    assert_eq!(v["written"], true);
    let h = hosts(r.path())
        .into_iter()
        .find(|h| h["serial"] == "NEW-9")
        .unwrap();
    assert_eq!(h["metadata"]["net"]["vlan"], 7);
    // A file that is not an inventory is one clear error.
    fs::write(&file, "colour,size\nred,1\n").unwrap();
    let out = cli(r.path(), &["import-inventory", file.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("unknown column \"colour\""),
        "{}",
        out.stderr
    );
}

/// Waits (at most 20 s) until `cond` holds for the hosts of `s`.
fn wait_for(s: &common::Stack, what: &str, cond: impl Fn(&[Value]) -> bool) {
    for _ in 0..200 {
        if cond(&s.hosts()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}: {:?}", s.hosts());
}

fn state_of(hosts: &[Value], id: u64) -> String {
    hosts
        .iter()
        .find(|h| h["id"] == id)
        .map(|h| h["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Boots host `id` (MAC 52:54:00:00:10:<id>) and reports /finish or /fail.
fn install(s: &common::Stack, id: u64, ok: bool) {
    let r = s.get_as_pxe(&format!("/bootstrap?net0=52-54-00-00-10-{id:02x}"));
    let text = r.text();
    let bootid = text
        .lines()
        .find_map(|l| l.strip_prefix("echo BOOTID "))
        .unwrap_or_else(|| panic!("host {id} did not get an install: {text}"))
        .to_string();
    let path = if ok { "finish" } else { "fail" };
    let r = s.get(&format!(
        "/{path}?id={id}&bootid={bootid}&reason=disk%20missing"
    ));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn start_rollout(s: &common::Stack, args: &[&str]) -> std::process::Child {
    Command::new(bin_dir().join("kiwispray-hosts"))
        .arg("--root")
        .arg(&s.root)
        .arg("rollout")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn rollout_drives_waves_stops_at_max_failures_and_resumes() {
    let s = stack_in_img(6, "{}");
    // All six start as new.
    let out = cli(
        &s.root,
        &["set", "--where", "id=1-6", "--state", "new", "--yes"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let child = start_rollout(
        &s,
        &[
            "--where",
            "state=new",
            "--state",
            "img",
            "--batch",
            "2",
            "--max-failures",
            "1",
            "--poll",
            "1",
            "--yes",
        ],
    );
    wait_for(&s, "wave 1", |h| {
        state_of(h, 1) == "img" && state_of(h, 2) == "img"
    });
    assert_eq!(state_of(&s.hosts(), 3), "new", "one wave at a time");
    install(&s, 1, true);
    install(&s, 2, true);
    wait_for(&s, "wave 2", |h| {
        state_of(h, 3) == "img" && state_of(h, 4) == "img"
    });
    // The rollout records a wave just after committing its states.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status = cli(&s.root, &["rollout", "--status"]);
        if status.stdout.contains("wave 2 of 3") || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        status
            .stdout
            .contains("wave 2 of 3: 2 finished, 2 installing, 0 failed"),
        "{}",
        status.stdout
    );
    install(&s, 3, false);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("wave 1: set 2 host(s) to img: 1 2"),
        "{stdout}"
    );
    assert!(stdout.contains("stopped: 1 host(s) failed"), "{stdout}");
    let hosts = s.hosts();
    assert_eq!(state_of(&hosts, 5), "new", "not started, untouched");
    assert_eq!(state_of(&hosts, 6), "new");
    let status = cli(&s.root, &["rollout", "--status"]);
    assert!(
        status.stdout.contains("host 3: failed"),
        "{}",
        status.stdout
    );
    // Different parameters while one is in progress are refused.
    let out = cli(
        &s.root,
        &[
            "rollout",
            "--where",
            "state=new",
            "--state",
            "img",
            "--batch",
            "3",
        ],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("is in progress"), "{}", out.stderr);
    // Fix, release and resume: it goes on with wave 2, then wave 3.
    assert_eq!(cli(&s.root, &["release", "3"]).code, 0);
    let child = start_rollout(&s, &["--poll", "1"]);
    install(&s, 3, true);
    install(&s, 4, true);
    wait_for(&s, "wave 3", |h| {
        state_of(h, 5) == "img" && state_of(h, 6) == "img"
    });
    install(&s, 5, true);
    install(&s, 6, true);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("resuming the rollout"), "{stderr}");
    assert!(
        stdout.contains("rollout complete: wave 3 of 3: 6 finished"),
        "{stdout}"
    );
    assert!(s.hosts().iter().all(|h| h["state"] == "finished"));
    let rollout_events = s
        .events()
        .iter()
        .filter(|e| e["cause"] == "rollout")
        .count();
    assert_eq!(rollout_events, 6, "one event per host it set");
    assert!(!s.root.join(".kiwispray-rollout.json").exists());
}
