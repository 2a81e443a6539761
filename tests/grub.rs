//! The GRUB flavour through the real stack (nginx or lighttpd and
//! `kiwispray-fcgi`): machines that run `bootstrap.grub` ask
//! `/ks/bootstrap?...&loader=grub` and get GRUB script from the `.grub`
//! templates, with the same identity, life cycle and bootids as iPXE
//! machines. Every answer is compared with a golden file and parsed by
//! GRUB's own `grub-script-check`; error answers must be harmless GRUB
//! script, since GRUB runs whatever `source` fetched.

mod common;

use common::{enc, golden, Stack};
use serde_json::{json, Value};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The query `bootstrap.grub` sends: GRUB's colon-separated MACs, the
/// percent-encoded SMBIOS strings, `grub_platform` and `grub_cpu`.
fn grub_query(macs: &[&str], serial: &str, uuid: &str) -> String {
    let mut q = String::from("/ks/bootstrap?");
    for i in 0..4 {
        q.push_str(&format!("net{i}={}&", macs.get(i).copied().unwrap_or("")));
    }
    q.push_str(&format!(
        "dhcp_mac={}&serial={}&uuid={uuid}&platform=efi&buildarch=x86_64&manufacturer=QEMU&product={}&loader=grub",
        macs.first().copied().unwrap_or(""),
        enc(serial),
        enc("Standard PC (Q35 + ICH9, 2009)"),
    ));
    q
}

/// Asserts that GRUB's parser takes `script`.
fn assert_grub_syntax(script: &str) {
    let mut child = Command::new("grub-script-check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grub-script-check (package grub-common)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "grub-script-check refused the script: {}{}\n--- script:\n{script}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn host(id: u64, macs: &str, serial: &str, state: &str) -> Value {
    json!({"id": id, "macs": macs, "serial": serial, "uuid": "", "hostname": "web-01",
           "state": state, "metadata": {}, "bootid": null})
}

fn stack_with_hosts(hosts: Value) -> Stack {
    stack_with(hosts, |_| {})
}

fn stack_with(hosts: Value, prepare: impl FnOnce(&Path) + 'static) -> Stack {
    Stack::with_hosts(hosts, false, prepare)
}

#[test]
fn a_new_machine_registers_through_grub() {
    let s = Stack::start();
    let uuid = "8f1b2c3d-0000-4000-8000-0000000000aa";
    let r = s.get_as_pxe(&grub_query(
        &["52:54:00:12:34:56", "52:54:00:12:34:57"],
        "SN 1#2&x",
        uuid,
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("registered as host 1 and waits for an operator."),
        "{text}"
    );
    golden::check("bootstrap-new.grub", &text);
    assert_grub_syntax(&text);
    let hosts = s.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["macs"], "52:54:00:12:34:56 52:54:00:12:34:57");
    assert_eq!(hosts[0]["serial"], "SN 1#2&x");
    assert_eq!(hosts[0]["uuid"], uuid);
    assert_eq!(hosts[0]["state"], "new");
    let events = s.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["cause"], "register");
}

#[test]
fn one_host_for_both_loaders() {
    let s = Stack::start();
    // Registered by iPXE (hyphenated MACs) ...
    let r = s.get_as_pxe("/bootstrap?net0=52-54-00-00-00-07&serial=SN-7&platform=efi");
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("#!ipxe\n"), "{}", r.text());
    // ... the same machine under GRUB is the same host, and nothing is
    // written for it again.
    let before = fs::read(s.db_path()).unwrap();
    let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:07"], "SN-7", ""));
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("registered as host 1 and waits"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("#!ipxe"), "{}", r.text());
    assert_eq!(s.hosts().len(), 1);
    assert_eq!(fs::read(s.db_path()).unwrap(), before);
    // a loader is chosen per request: iPXE again gets iPXE
    let r = s.get_as_pxe("/bootstrap?net0=52-54-00-00-00-07&serial=SN-7");
    assert!(r.text().starts_with("#!ipxe\n"), "{}", r.text());
}

#[test]
fn a_finished_host_leaves_grub_for_the_disk() {
    let s = stack_with_hosts(json!([host(3, "52:54:00:00:00:03", "SN-3", "finished")]));
    let before = fs::read(s.db_path()).unwrap();
    for _ in 0..2 {
        let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:03"], "SN-3", ""));
        assert_eq!(r.status, 200);
        let text = r.text();
        golden::check("bootstrap-finished.grub", &text);
        assert_grub_syntax(&text);
        assert!(text.lines().any(|l| l == "exit 1"), "{text}");
    }
    assert_eq!(fs::read(s.db_path()).unwrap(), before);
    assert!(s.events().is_empty());
}

#[test]
fn an_install_boot_under_grub_starts_an_attempt_with_a_fresh_bootid() {
    let s = stack_with_hosts(json!([host(5, "52:54:00:00:00:05", "SN-5", "image1")]));
    let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:05"], "SN-5", ""));
    assert_eq!(r.status, 200);
    let b1 = s.field(5, "bootid");
    assert_eq!(b1.len(), 32, "bootid {b1:?}");
    let text = r.text();
    assert!(
        text.contains(&format!(
            "razorurl=http://127.0.0.1:5000/post-install?id=5&bootid={b1}"
        )),
        "{text}"
    );
    golden::check(
        "bootstrap-install.grub",
        &golden::normalise(&text, &[(&b1, "@BOOTID@")]),
    );
    assert_grub_syntax(&text);
    // the next boot is a new attempt, as with iPXE
    let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:05"], "SN-5", ""));
    assert_eq!(r.status, 200);
    let b2 = s.field(5, "bootid");
    assert_ne!(b1, b2);
    let boots: Vec<Value> = s
        .events()
        .into_iter()
        .filter(|e| e["cause"] == "install-boot")
        .collect();
    assert_eq!(boots.len(), 2, "{boots:?}");
    // and /post-install takes the bootid GRUB's kernel line carried
    let r = s.get(&format!("/post-install?id=5&bootid={b2}"));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_conflict_is_explained_in_grub_script() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN-ONE", "new"),
        host(2, "52:54:00:00:00:02", "SN-TWO", "image1"),
    ]));
    let before = fs::read(s.db_path()).unwrap();
    let r = s.get_as_pxe(&grub_query(
        &["52:54:00:00:00:01", "52:54:00:00:00:09"],
        "SN-TWO",
        "",
    ));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with("# kiwispray: "), "{text}");
    assert!(
        text.contains("MAC 52:54:00:00:00:01 belongs to host 1"),
        "{text}"
    );
    golden::check("bootstrap-conflict.grub", &text);
    assert_grub_syntax(&text);
    assert_eq!(fs::read(s.db_path()).unwrap(), before);
}

#[test]
fn errors_to_grub_are_harmless_script_with_the_reason() {
    let s = Stack::start();
    // an unknown loader: a one-line 400, nothing registered
    let r = s.get_as_pxe("/bootstrap?net0=52:54:00:00:00:01&loader=uboot");
    let reason = r.assert_one_line_4xx("unknown loader");
    assert!(reason.contains("unknown loader \"uboot\""), "{reason}");
    // a bad request from GRUB: a 400 whose body GRUB can run
    for (query, why) in [
        ("/ks/bootstrap?net0=zz;reboot&loader=grub", "no valid MAC"),
        (
            "/ks/bootstrap?net0=52:54:00:00:00:01&serial=%zz&loader=grub",
            "percent",
        ),
        (
            "/ks/bootstrap?net0=52:54:00:00:00:01&loader=grub&loader=grub",
            "more than once",
        ),
    ] {
        let r = s.get_as_pxe(query);
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        let text = r.text();
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("# kiwispray: "), "{query}: {text}");
        assert!(first.contains(why), "{query}: {text}");
        for line in text.lines().skip(1) {
            assert!(line.starts_with("echo '"), "{query}: {text}");
        }
        assert_grub_syntax(&text);
    }
    assert!(s.hosts().is_empty());
}

#[test]
fn the_web_server_serves_bootstrap_grub_and_hides_image_templates() {
    let s = stack_with(json!([]), |root| {
        let dir = root.join("images/web");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("host.grub"), "# secret-ish template\n").unwrap();
        fs::write(dir.join("web.xz"), "image").unwrap();
    });
    let r = s.get("/grub/grub.cfg");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        fs::read(common::repo().join("templates/bootstrap.grub")).unwrap()
    );
    assert_eq!(s.get("/images/web/web.xz").status, 200);
    assert_eq!(s.get("/images/web/host.grub").status, 404);
    assert_eq!(s.get("/images/web/host.tmpl").status, 404);
}

#[test]
fn the_shipped_grub_files_parse() {
    let dir = common::repo().join("templates");
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "grub") {
            assert_grub_syntax(&fs::read_to_string(&path).unwrap());
            n += 1;
        }
    }
    assert!(n >= 6, "only {n} .grub files in {}", dir.display());
}

#[test]
fn deferred_and_held_hosts_get_grub_script() {
    // max_installs 1 with one host installing: the second waits, in GRUB.
    let s = stack_with(
        json!([
            host(1, "52:54:00:00:00:01", "SN-1", "image1"),
            host(2, "52:54:00:00:00:02", "SN-2", "image1"),
        ]),
        |root| fs::write(root.join("kiwispray.json"), r#"{"max_installs": 1}"#).unwrap(),
    );
    let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:01"], "SN-1", ""));
    assert!(
        r.text().contains("booting image") || r.text().contains("installing image"),
        "{}",
        r.text()
    );
    let r = s.get_as_pxe(&grub_query(&["52:54:00:00:00:02"], "SN-2", ""));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("waits its turn"), "{text}");
    assert!(text.contains("configfile \"$prefix/grub.cfg\""), "{text}");
    golden::check("bootstrap-deferred.grub", &text);
    assert_grub_syntax(&text);
    assert_eq!(s.field(2, "bootid"), "");
}
