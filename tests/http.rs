//! The HTTP interface through the real stack: nginx with the shipped
//! `nginx/kiwispray.conf` in front of the real `kiwispray-fcgi`, started by
//! `nginx/serve.sh` (see `tests/common`). Every path of the interface is
//! driven with good, bad and concurrent requests, and `known_hosts.json` is
//! checked on disk after each. Rendered scripts are compared with the golden
//! files in `tests/golden/`.
//!
//! Needs nginx (`make deps-test`); the namespace test also needs root and
//! `ip` (iproute2).

mod common;

use common::{enc, golden, mac_db, mac_hexhyp, Options, Reply, Stack};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::sync::Arc;

/// A `/bootstrap` query as `bootstrap.ipxe` sends it, with unused NICs empty.
fn boot_query(macs: &[&str], serial: &str, uuid: &str) -> String {
    let mut q = String::from("/bootstrap?");
    for i in 0..8 {
        q.push_str(&format!(
            "net{i}={}&",
            macs.get(i).map_or(String::new(), |m| enc(m))
        ));
    }
    q.push_str(&format!(
        "dhcp_mac={}&serial={}&uuid={}&platform=efi&buildarch=x86_64&manufacturer=QEMU&product=Standard%20PC",
        macs.first().map_or(String::new(), |m| enc(m)),
        enc(serial),
        enc(uuid)
    ));
    q
}

fn boot(s: &Stack, macs: &[&str], serial: &str, uuid: &str) -> Reply {
    let r = s.get_as_pxe(&boot_query(macs, serial, uuid));
    assert_eq!(r.status, 200, "bootstrap {macs:?}: {}", r.text());
    assert!(
        r.text().starts_with("#!ipxe\n"),
        "not an iPXE script: {}",
        r.text()
    );
    r
}

fn is_bootid(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A stack whose database holds `hosts`.
fn stack_with_hosts(hosts: Value) -> Stack {
    stack_with(hosts, false, |_| {})
}

fn stack_with(hosts: Value, discover: bool, prepare: impl FnOnce(&Path) + 'static) -> Stack {
    Stack::with_hosts(hosts, discover, prepare)
}

fn host(id: u64, macs: &str, serial: &str, state: &str) -> Value {
    json!({"id": id, "macs": macs, "serial": serial, "uuid": "", "hostname": "not-set",
           "state": state, "metadata": {}, "bootid": null})
}

/// Asserts that nothing in `known_hosts.json` changed: same inode, mtime
/// and bytes.
fn assert_unchanged(s: &Stack, before: &common::FileStamp, what: &str) {
    let now = s.db_stamp();
    assert!(
        now == *before,
        "{what}: known_hosts.json was rewritten or changed:\n{}",
        golden::diff(
            &String::from_utf8_lossy(&before.content),
            &String::from_utf8_lossy(&now.content)
        )
    );
}

fn no_internal_errors(s: &Stack) {
    let log = s.serve_log();
    assert!(
        !log.contains("panicked") && !log.contains("internal error"),
        "the handler logged an internal error:\n{log}"
    );
}

// --- static files and what must not be served -------------------------------

#[test]
fn static_bootstrap_ipxe_and_images_with_ranges() {
    let s = stack_with(json!([]), false, |root| {
        fs::create_dir_all(root.join("images/img1")).unwrap();
        let blob: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(root.join("images/img1/pxeboot.kernel"), blob).unwrap();
    });
    let r = s.get("/bootstrap.ipxe");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type").unwrap().starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    let shipped = fs::read(common::repo().join("templates/bootstrap.ipxe")).unwrap();
    assert_eq!(r.body, shipped, "bootstrap.ipxe is the shipped file");
    let text = r.text();
    assert!(text.starts_with("#!ipxe\n"));
    assert!(text.contains("chain --replace --autofree bootstrap?net0=${net0/mac:hexhyp}"));
    for p in [
        "serial=${serial:uristring}",
        // Not :uristring: Debian's iPXE encodes a UUID that way as raw
        // bytes and cuts the query short (found by the end-to-end tests).
        "&uuid=${uuid}&",
        "dhcp_mac=",
        "net7=",
    ] {
        assert!(text.contains(p), "bootstrap.ipxe lacks {p}");
    }
    assert!(
        text.trim_end().ends_with("exit 1"),
        "falls through with a non-zero exit"
    );

    let r = s.request(
        "GET",
        "/images/img1/pxeboot.kernel",
        &[("Range", "bytes=100-199")],
        b"",
    );
    assert_eq!(r.status, 206, "range request: {:?}", r.headers);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/4096"));
    let blob = fs::read(s.root.join("images/img1/pxeboot.kernel")).unwrap();
    assert_eq!(r.body, &blob[100..200]);
    let r = s.get("/images/img1/pxeboot.kernel");
    assert_eq!((r.status, r.body.len()), (200, 4096));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
}

#[test]
fn private_files_and_path_traversal_are_not_served() {
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SECRET-SERIAL", "new")]),
        false,
        |root| {
            fs::create_dir_all(root.join("images/img1/sub")).unwrap();
            fs::write(
                root.join("images/img1/host.tmpl"),
                "#!ipxe\nSECRET-TEMPLATE\n",
            )
            .unwrap();
            fs::write(
                root.join("images/img1/post_install.tmpl"),
                "SECRET-TEMPLATE\n",
            )
            .unwrap();
            fs::write(root.join("images/img1/.hidden"), "SECRET-HIDDEN\n").unwrap();
            fs::write(root.join("events.jsonl"), "{\"SECRET-EVENT\":1}\n").unwrap();
            // A file outside the root.
            fs::write(
                root.parent().unwrap().join("outside.txt"),
                "SECRET-OUTSIDE\n",
            )
            .unwrap();
        },
    );
    let before = s.db_stamp();
    let targets = [
        "/known_hosts.json",
        "/events.jsonl",
        "/.known_hosts.json.lock",
        "/templates/new.tmpl",
        "/templates/x",
        "/templates/",
        "/images/img1/host.tmpl",
        "/images/img1/post_install.tmpl",
        "/images/img1/host%2etmpl",
        "/images/img1/.hidden",
        "/images/../known_hosts.json",
        "/images/%2e%2e/known_hosts.json",
        "/images/%2E%2E/known_hosts.json",
        "/images/%2e%2e%2fknown_hosts.json",
        "/images/img1/..%2f..%2fknown_hosts.json",
        "/images/img1/sub/%2e%2e/%2e%2e/%2e%2e/known_hosts.json",
        "/images/../../outside.txt",
        "/images/%2e%2e/%2e%2e/outside.txt",
        "/images/..%2f..%2foutside.txt",
        "//known_hosts.json",
        "/bootstrap.ipxe/../known_hosts.json",
        "/./known_hosts.json",
        "/images/img1/sub/",
        "/images/",
    ];
    for t in targets {
        let r = s.request("GET", t, &[], b"");
        let text = r.text();
        assert!(
            (400..500).contains(&r.status),
            "{t}: expected a 4xx, got {} {text:?}",
            r.status
        );
        for secret in ["SECRET", "\"macs\"", "pxeboot"] {
            assert!(!text.contains(secret), "{t} leaked {secret}: {text}");
        }
        r.assert_one_line_4xx(t);
    }
    assert_unchanged(&s, &before, "static requests");
}

// --- /bootstrap ---------------------------------------------------------------

#[test]
fn registration_gets_next_id_and_normalised_macs() {
    let s = stack_with_hosts(json!([host(7, "52:54:00:00:00:07", "OLD", "finished")]));
    let serial = "SN 12#34 &x=y";
    let r = s.get_as_pxe(&format!(
        "/bootstrap?net0=52-54-00-ab-cd-ef&net1=52:54:00:AB:CD:F0&net2=525400abcdf1&net3=5254.00AB.cdf2\
         &net4=&net5=&net6=&net7=&dhcp_mac=52-54-00-AB-CD-EF&serial={}&uuid=6E1E6C9A-6F3B-4A49-9C3E-1D2B3C4D5E6F",
        enc(serial)
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("registered as host 8"), "{}", r.text());
    let h = s.host(8).expect("host 8 registered");
    assert_eq!(
        h["macs"],
        "52:54:00:AB:CD:EF 52:54:00:AB:CD:F0 52:54:00:AB:CD:F1 52:54:00:AB:CD:F2"
    );
    assert_eq!(h["serial"], serial);
    assert_eq!(h["hostname"], "not-set");
    assert_eq!(h["state"], "new");
    assert_eq!(h["metadata"], json!({}));
    assert!(h["bootid"].is_null());
    assert_eq!(s.hosts().len(), 2);
    let ev = s.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0]["host"].clone(), ev[0]["cause"].clone()),
        (json!(8), json!("register"))
    );
    assert_eq!(
        (ev[0]["from"].clone(), ev[0]["to"].clone()),
        (json!(""), json!("new"))
    );
    assert_eq!(ev[0]["remote"], "127.0.0.1");
    assert!(ev[0]["time"].as_str().unwrap().ends_with('Z'));

    // The same machine again: known, nothing written.
    let before = s.db_stamp();
    let r = s.get_as_pxe(&format!(
        "/bootstrap?net0=52:54:00:ab:cd:f2&serial={}",
        enc(serial)
    ));
    assert!(r.text().contains("host 8"), "{}", r.text());
    assert_unchanged(&s, &before, "second boot of a new machine");
    assert_eq!(s.events().len(), 1);
}

#[test]
fn bootstrap_new_golden() {
    let s = Stack::start();
    let r = boot(
        &s,
        &["52-54-00-12-34-56", "52-54-00-12-34-57"],
        "SN 1#2",
        "",
    );
    golden::check("bootstrap-new.ipxe", &r.text());
    assert_eq!(s.hosts().len(), 1);
}

#[test]
fn placeholders_never_identify_a_machine() {
    let s = Stack::start();
    let zero = "00000000-0000-0000-0000-000000000000";
    boot(&s, &["52-54-00-00-00-01"], "To be filled by O.E.M.", zero);
    boot(&s, &["52-54-00-00-00-02"], "To be filled by O.E.M.", zero);
    boot(
        &s,
        &["52-54-00-00-00-03"],
        "Default string",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
    );
    boot(
        &s,
        &["52-54-00-00-00-04"],
        "Default string",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
    );
    let hosts = s.hosts();
    assert_eq!(
        hosts.len(),
        4,
        "same placeholder serials must not merge machines: {hosts:?}"
    );
    let ids: Vec<u64> = hosts.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    // A known MAC with a placeholder serial is that host, not a conflict.
    let before = s.db_stamp();
    let r = boot(&s, &["52-54-00-00-00-02"], "Default string", zero);
    assert!(r.text().contains("host 2"), "{}", r.text());
    assert_unchanged(&s, &before, "known MAC with placeholder keys");
}

#[test]
fn identified_by_any_key_and_new_macs_are_added() {
    let uuid = "6e1e6c9a-6f3b-4a49-9c3e-1d2b3c4d5e6f";
    let s = Stack::start();
    boot(&s, &["52-54-00-00-00-01"], "SN-A", uuid);
    assert_eq!(s.field(1, "macs"), "52:54:00:00:00:01");

    // Serial identifies; the unknown MAC is added, so the file is rewritten.
    let before = s.db_stamp();
    let r = boot(&s, &["52-54-00-00-00-02"], "SN-A", "");
    assert!(r.text().contains("host 1"), "{}", r.text());
    assert_ne!(s.db_stamp(), before);
    assert_eq!(s.field(1, "macs"), "52:54:00:00:00:01 52:54:00:00:00:02");

    // UUID (in another case) identifies.
    boot(&s, &["52:54:00:00:00:03"], "", &uuid.to_uppercase());
    assert_eq!(
        s.field(1, "macs"),
        "52:54:00:00:00:01 52:54:00:00:00:02 52:54:00:00:00:03"
    );

    // Any MAC identifies; known MACs in another spelling change nothing.
    let before = s.db_stamp();
    boot(
        &s,
        &["52:54:00:00:00:03", "525400000001", "52-54-00-00-00-02"],
        "",
        "",
    );
    assert_unchanged(&s, &before, "all MACs already recorded");
    assert_eq!(s.hosts().len(), 1);
}

#[test]
fn conflicting_keys_change_nothing() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN-ONE", "new"),
        host(2, "52:54:00:00:00:02", "SN-TWO", "image1"),
    ]));
    let before = s.db_stamp();
    let r = boot(
        &s,
        &["52-54-00-00-00-01", "52-54-00-00-00-09"],
        "SN-TWO",
        "",
    );
    let text = r.text();
    assert!(
        text.contains("MAC 52:54:00:00:00:01 belongs to host 1"),
        "{text}"
    );
    assert!(
        text.contains("serial \"SN-TWO\" belongs to host 2"),
        "{text}"
    );
    assert!(text.contains("reboot"), "{text}");
    golden::check("bootstrap-conflict.ipxe", &text);
    assert_unchanged(&s, &before, "conflict");
    assert!(s.events().is_empty());
    assert!(
        s.handler_log().iter().any(|l| l.contains("conflict")),
        "conflict is logged: {:?}",
        s.handler_log()
    );
}

#[test]
fn no_valid_mac_registers_nothing() {
    let s = Stack::start();
    let before = s.db_stamp();
    for q in [
        "/bootstrap",
        "/bootstrap?serial=SN-1&uuid=6e1e6c9a-6f3b-4a49-9c3e-1d2b3c4d5e6f",
        "/bootstrap?net0=&net1=&dhcp_mac=&serial=SN-1",
        "/bootstrap?net0=zz",
        "/bootstrap?net0=00-00-00-00-00-00",
        "/bootstrap?net0=ff-ff-ff-ff-ff-ff",
        "/bootstrap?net0=01-00-5e-00-00-01",
        "/bootstrap?net0=52-54-00-00-00",
        "/bootstrap?net0=52-54-00-00-00-01-02",
        "/bootstrap?net0=52:54-00:00-00:01",
        "/bootstrap?net0=g2-54-00-00-00-01",
    ] {
        let r = s.get(q);
        r.assert_one_line_4xx(q);
    }
    assert_unchanged(&s, &before, "requests without a valid MAC");
    assert!(s.events().is_empty());
}

/// HEAD must not have the effects of GET: no registration, no bootid.
#[test]
fn regression_head_on_state_changing_paths_changes_nothing() {
    let s = stack_with_hosts(json!([host(1, "52:54:00:00:00:01", "SN-1", "image1")]));
    let before = s.db_stamp();
    for q in [
        "/bootstrap?net0=52-54-00-00-00-09",
        "/bootstrap?net0=52-54-00-00-00-01",
        "/finish?id=1&bootid=00000000000000000000000000000000",
        "/post-install?id=1&bootid=00000000000000000000000000000000",
    ] {
        let r = s.request("HEAD", q, &[], b"");
        assert_eq!(r.status, 405, "HEAD {q}");
    }
    assert_unchanged(&s, &before, "HEAD requests");
    assert!(s.events().is_empty());
}

/// A NIC that reports an unusable MAC (all zeros, as some firmware does for
/// unconfigured ports) must not keep a machine whose other MACs are valid
/// from booting.
#[test]
fn regression_one_unusable_mac_does_not_reject_the_machine() {
    let s = Stack::start();
    let r = boot(
        &s,
        &[
            "52-54-00-00-00-01",
            "00-00-00-00-00-00",
            "ff-ff-ff-ff-ff-ff",
        ],
        "SN",
        "",
    );
    assert!(r.text().contains("registered as host 1"), "{}", r.text());
    assert_eq!(s.field(1, "macs"), "52:54:00:00:00:01");
}

#[test]
fn finished_host_boots_local_disk_and_writes_nothing() {
    let s = stack_with_hosts(json!([host(3, "52:54:00:00:00:03", "SN-3", "finished")]));
    let before = s.db_stamp();
    for _ in 0..3 {
        let r = boot(&s, &["52-54-00-00-00-03"], "SN-3", "");
        golden::check("bootstrap-finished.ipxe", &r.text());
    }
    assert_unchanged(&s, &before, "finished host booting");
    assert!(s.events().is_empty());
}

#[test]
fn install_state_gets_a_fresh_bootid_each_boot() {
    let s = stack_with_hosts(json!([host(5, "52:54:00:00:00:05", "SN-5", "image1")]));
    let r = boot(&s, &["52-54-00-00-00-05"], "SN-5", "");
    let b1 = s.field(5, "bootid");
    assert!(is_bootid(&b1), "bootid {b1:?}");
    let text = r.text();
    assert!(text.contains(&format!("bootid={b1}")), "{text}");
    golden::check(
        "bootstrap-install.ipxe",
        &golden::normalise(&text, &[(&b1, "@BOOTID@")]),
    );
    let r = boot(&s, &["52-54-00-00-00-05"], "SN-5", "");
    let b2 = s.field(5, "bootid");
    assert!(is_bootid(&b2));
    assert_ne!(b1, b2, "a fresh bootid each boot");
    assert!(r.text().contains(&b2));
    assert_eq!(s.field(5, "state"), "image1");
    let ev = s.events();
    assert_eq!(ev.len(), 2);
    assert!(ev
        .iter()
        .all(|e| e["cause"] == "install-boot" && e["host"] == 5));
}

#[test]
fn template_lookup_order() {
    // Four install boots in a row: above the loop breaker's default.
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SN", "img")]),
        false,
        |root| fs::write(root.join("kiwispray.json"), r#"{"max_install_boots": 10}"#).unwrap(),
    );
    let script = |s: &Stack| boot(s, &["52-54-00-00-00-01"], "", "").text();
    assert!(
        script(&s).contains("installing image img on host 1"),
        "known_host.tmpl"
    );
    fs::write(
        s.root.join("templates/img.tmpl"),
        "#!ipxe\necho FROM-TEMPLATES @state@ @id@\n",
    )
    .unwrap();
    assert_eq!(script(&s), "#!ipxe\necho FROM-TEMPLATES img 1\n");
    fs::create_dir_all(s.root.join("images/img")).unwrap();
    fs::write(
        s.root.join("images/img/host.tmpl"),
        "#!ipxe\necho FROM-IMAGE @bootid@\n",
    )
    .unwrap();
    let out = script(&s);
    assert_eq!(
        out,
        format!("#!ipxe\necho FROM-IMAGE {}\n", s.field(1, "bootid"))
    );
    fs::remove_file(s.root.join("images/img/host.tmpl")).unwrap();
    assert!(script(&s).contains("FROM-TEMPLATES"));
}

#[test]
fn unsafe_states_get_an_error_script_and_touch_no_file_outside() {
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SN-1", "new")]),
        false,
        |root| {
            let leak = "#!ipxe\necho LEAKED\n";
            let parent = root.parent().unwrap();
            fs::write(parent.join("host.tmpl"), leak).unwrap();
            fs::write(parent.join("evil.tmpl"), leak).unwrap();
            fs::write(root.join("host.tmpl"), leak).unwrap();
            fs::write(root.join("evil.tmpl"), leak).unwrap();
            fs::create_dir_all(root.join("images/a/b")).unwrap();
            fs::write(root.join("images/a/b/host.tmpl"), leak).unwrap();
            fs::create_dir_all(root.join("templates/a")).unwrap();
            fs::write(root.join("templates/a/b.tmpl"), leak).unwrap();
        },
    );
    for (i, state) in [
        "..",
        "a/b",
        "../evil",
        "../../evil",
        ".hidden",
        "/etc/passwd",
        "x y",
        "..,image1",
    ]
    .iter()
    .enumerate()
    {
        s.edit_host(1, |h| {
            h.insert("state".into(), json!(state));
        });
        let before = s.db_stamp();
        let r = boot(&s, &["52-54-00-00-00-01"], "SN-1", "");
        let text = r.text();
        assert!(
            !text.contains("LEAKED"),
            "state {state:?} reached a file outside: {text}"
        );
        assert!(
            text.contains("is not a safe name"),
            "state {state:?}: {text}"
        );
        assert!(text.contains("reboot"), "{text}");
        if i == 0 {
            golden::check("bootstrap-unsafe-state.ipxe", &text);
        }
        assert_unchanged(&s, &before, state);
        for p in [
            "/post-install?id=1&bootid=0123456789abcdef0123456789abcdef",
            "/finish?id=1&bootid=x",
        ] {
            s.get(p).assert_one_line_4xx(p);
        }
        assert_unchanged(&s, &before, state);
    }
}

// --- /post-install, /finish, /state -------------------------------------------

#[test]
fn post_install_answers_only_the_current_bootid() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN-1", "image1,image2"),
        host(2, "52:54:00:00:00:02", "SN-2", "new"),
    ]));
    s.edit_host(1, |h| {
        h.insert("hostname".into(), json!("web-1"));
        h.insert(
            "metadata".into(),
            json!({"ssh_key": "ssh-ed25519 AAAA test@x", "role": "it's & <web>"}),
        );
    });
    boot(&s, &["52-54-00-00-00-01"], "", "");
    let bootid = s.field(1, "bootid");
    let before = s.db_stamp();
    let r = s.get_as_pxe(&format!("/post-install?id=1&bootid={bootid}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("#!/bin/sh\n"));
    golden::check(
        "post-install.sh",
        &golden::normalise(&r.text(), &[(&bootid, "@BOOTID@")]),
    );

    let cases: Vec<(String, u16)> = vec![
        (format!("/post-install?id=99&bootid={bootid}"), 404),
        (
            "/post-install?id=1&bootid=0123456789abcdef0123456789abcdef".into(),
            403,
        ),
        (
            format!("/post-install?id=1&bootid={}", bootid.to_uppercase()),
            403,
        ),
        (format!("/post-install?id=1&bootid={}", &bootid[..31]), 403),
        ("/post-install?id=1".into(), 400),
        ("/post-install?id=1&bootid=".into(), 400),
        ("/post-install?bootid=abc".into(), 400),
        (format!("/post-install?id=2&bootid={bootid}"), 409),
    ];
    for (t, status) in &cases {
        let r = s.get(t);
        r.assert_one_line_4xx(t);
        assert_eq!(r.status, *status, "{t}: {}", r.text());
    }
    // The image's own post_install.tmpl is preferred.
    fs::create_dir_all(s.root.join("images/image1")).unwrap();
    fs::write(
        s.root.join("images/image1/post_install.tmpl"),
        "#!/bin/sh\necho image1 @id@ @hostname|shell@ @metadata.role|url@\n",
    )
    .unwrap();
    let r = s.get(&format!("/post-install?id=1&bootid={bootid}"));
    assert_eq!(
        r.text(),
        "#!/bin/sh\necho image1 1 'web-1' it%27s%20%26%20%3Cweb%3E\n"
    );
    assert_unchanged(&s, &before, "post-install");
}

/// The shipped post-install script, run for real: hostile metadata lands
/// byte for byte where it belongs, runs nothing, and /finish is reported.
#[test]
fn shipped_post_install_runs_safely_and_reports_finish() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN-1", "image1,image2"),
        host(2, "52:54:00:00:00:02", "SN-2", "image1"),
    ]));
    let target = common::TempDir::new("post-install-target");
    let pwned = target.path().join("pwned");
    let key = format!(
        "ssh-ed25519 AAAA x@y\nKS_END\ntouch {p}\n'$(touch {p})' \"`touch {p}`\"",
        p = pwned.display()
    );
    let hostname = format!("web-1'; touch {}; '", pwned.display());
    let metadata = json!({"ssh_key": key, "role": "it's & <web> ${x}"});
    s.edit_host(1, |h| {
        h.insert("hostname".into(), json!(hostname));
        h.insert("metadata".into(), metadata.clone());
    });
    let run = |id: u64| {
        boot(&s, &[&format!("52-54-00-00-00-0{id}")], "", "");
        let bootid = s.field(id, "bootid");
        let r = s.get(&format!("/post-install?id={id}&bootid={bootid}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let root = target.path().join(format!("host{id}"));
        fs::create_dir_all(&root).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r.text())
            .env("KS_ROOT", &root)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains(&format!("host {id} reported finished")),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root
    };
    let root = run(1);
    assert!(!pwned.exists(), "a metadata value ran a command");
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        format!("{hostname}\n")
    );
    assert_eq!(
        fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
        format!("{key}\n")
    );
    let written: Value = serde_json::from_str(
        &fs::read_to_string(root.join("etc/kiwispray/metadata.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written, metadata);
    assert_eq!(s.field(1, "state"), "image2");
    // No metadata and no hostname: nothing is installed for them.
    let root = run(2);
    assert!(!root.join("root/.ssh").exists());
    assert!(!root.join("etc/hostname").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/kiwispray/metadata.json")).unwrap(),
        "{}\n"
    );
    assert_eq!(s.field(2, "state"), "finished");
}

#[test]
fn finish_advances_the_chain_and_uses_up_the_bootid() {
    let s = stack_with_hosts(json!([host(4, "52:54:00:00:00:04", "SN-4", "wipe,image1")]));
    boot(&s, &["52-54-00-00-00-04"], "", "");
    let b1 = s.field(4, "bootid");

    let before = s.db_stamp();
    let r = s.get("/finish?id=4&bootid=0123456789abcdef0123456789abcdef");
    assert_eq!(r.status, 403, "{}", r.text());
    r.assert_one_line_4xx("wrong bootid");
    s.get("/finish?id=4").assert_one_line_4xx("missing bootid");
    s.get(&format!("/finish?id=5&bootid={b1}"))
        .assert_one_line_4xx("unknown host");
    assert_unchanged(&s, &before, "bad /finish");

    let r = s.get(&format!("/finish?id=4&bootid={b1}"));
    assert_eq!((r.status, r.text()), (200, "image1\n".to_string()));
    assert_eq!(s.field(4, "state"), "image1");
    assert_eq!(s.field(4, "bootid"), "");
    let r = s.get(&format!("/finish?id=4&bootid={b1}"));
    r.assert_one_line_4xx("bootid used up");
    let r = s.get(&format!("/post-install?id=4&bootid={b1}"));
    r.assert_one_line_4xx("bootid used up for post-install");
    assert_eq!(s.get("/state?id=4").text(), "image1\n");

    boot(&s, &["52-54-00-00-00-04"], "", "");
    let b2 = s.field(4, "bootid");
    assert_ne!(b1, b2);
    let r = s.get(&format!("/finish?id=4&bootid={b2}"));
    assert_eq!((r.status, r.text()), (200, "finished\n".to_string()));
    assert_eq!(s.get("/state?id=4").text(), "finished\n");

    let ev: Vec<(String, String, String)> = s
        .events()
        .iter()
        .map(|e| {
            assert_eq!(e["host"], 4);
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
                e["cause"].as_str().unwrap().into(),
            )
        })
        .collect();
    let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        ev,
        vec![
            t("wipe,image1", "wipe,image1", "install-boot"),
            t("wipe,image1", "image1", "finish"),
            t("image1", "image1", "install-boot"),
            t("image1", "finished", "finish"),
        ]
    );
    // Finished now: boots the disk without writing.
    let before = s.db_stamp();
    let r = boot(&s, &["52-54-00-00-00-04"], "", "");
    assert!(r.text().contains("exit 1"));
    assert_unchanged(&s, &before, "finished");
}

#[test]
fn state_is_one_line_and_changes_nothing() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN-1", "wipe,image1"),
        host(2, "52:54:00:00:00:02", "SN-2", "new"),
    ]));
    let before = s.db_stamp();
    let r = s.get("/state?id=1");
    assert_eq!((r.status, r.text()), (200, "wipe,image1\n".to_string()));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(s.get("/state?id=2").text(), "new\n");
    let r = s.request("HEAD", "/state?id=1", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/state?id=3").status, 404);
    assert_unchanged(&s, &before, "/state");
}

// --- discover mode and POST /update ------------------------------------------

#[test]
fn discover_mode_registers_and_update_merges() {
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SN-1", "new")]),
        true,
        |root| {
            fs::create_dir_all(root.join("images/discover")).unwrap();
            fs::write(
                root.join("images/discover/host.tmpl"),
                "#!ipxe\necho DISCOVER @id@ @bootid@\n",
            )
            .unwrap();
            fs::write(
                root.join("images/discover/post_install.tmpl"),
                "#!/bin/sh\necho discover post-install @id@\n",
            )
            .unwrap();
        },
    );
    let r = boot(&s, &["52-54-00-00-00-02"], "SN-2", "");
    assert!(r.text().contains("registered as host 2"), "{}", r.text());
    assert!(r.text().contains("iseq discover discover"), "{}", r.text());
    assert_eq!(s.field(2, "state"), "discover,new");
    assert_eq!(s.events()[0]["to"], "discover,new");
    let r = boot(&s, &["52-54-00-00-00-02"], "SN-2", "");
    let bootid = s.field(2, "bootid");
    assert_eq!(r.text(), format!("#!ipxe\necho DISCOVER 2 {bootid}\n"));
    let r = s.get(&format!("/post-install?id=2&bootid={bootid}"));
    assert_eq!(r.text(), "#!/bin/sh\necho discover post-install 2\n");

    let url = format!("/update?id=2&bootid={bootid}");
    let r = s.post_form(
        &url,
        &format!(
            "mac=52-54-00-00-00-03&mac={}&mac=52:54:00:00:00:02&metadata={}&metadata={}",
            enc("52:54:00:00:00:04"),
            enc(r#"{"hw": {"cpus": 4, "disk": "sda"}, "note": "a&b"}"#),
            enc(r#"{"hw": {"ram": "16G", "cpus": 8}}"#)
        ),
    );
    assert_eq!((r.status, r.text()), (200, "updated\n".to_string()));
    assert_eq!(
        s.field(2, "macs"),
        "52:54:00:00:00:02 52:54:00:00:00:03 52:54:00:00:00:04"
    );
    assert_eq!(
        s.host(2).unwrap()["metadata"],
        json!({"hw": {"cpus": 8, "disk": "sda", "ram": "16G"}, "note": "a&b"})
    );
    // A second update merges into what is stored.
    let r = s.post_form(
        &url,
        &format!("metadata={}", enc(r#"{"hw": {"disk": "nvme0n1"}}"#)),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        s.host(2).unwrap()["metadata"]["hw"],
        json!({"cpus": 8, "disk": "nvme0n1", "ram": "16G"})
    );

    let before = s.db_stamp();
    let big = format!("metadata={}", "a".repeat(70 * 1024));
    // (what, query, form fields, expected status)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u16);
    let bad: Vec<Case> = vec![
        (
            "bad JSON",
            format!("metadata={}", enc("{\"a\":")),
            vec![],
            400,
        ),
        (
            "JSON not an object",
            format!("metadata={}", enc("[1,2]")),
            vec![],
            400,
        ),
        (
            "unknown field",
            "mac=52-54-00-00-00-05&hostname=x".into(),
            vec![],
            400,
        ),
        ("bad MAC", "mac=52-54-00-00-00".into(), vec![], 400),
        (
            "MAC of another host",
            "mac=52:54:00:00:00:01".into(),
            vec![],
            409,
        ),
        ("bad UTF-8", "metadata=%ff".into(), vec![], 400),
        ("NUL", "metadata=%00".into(), vec![], 400),
        (
            "wrong content type",
            "{\"hw\":1}".into(),
            vec![("Content-Type", "application/json")],
            415,
        ),
        ("body too large", big, vec![], 413),
    ];
    for (what, body, headers, status) in bad {
        let mut h = headers.clone();
        if h.is_empty() {
            h.push(("Content-Type", "application/x-www-form-urlencoded"));
        }
        let r = s.request("POST", &url, &h, body.as_bytes());
        let line = r.assert_one_line_4xx(what);
        assert_eq!(r.status, status, "{what}: {line}");
        assert_unchanged(&s, &before, what);
    }
    for (what, target) in [
        (
            "wrong bootid",
            "/update?id=2&bootid=0123456789abcdef0123456789abcdef".to_string(),
        ),
        ("missing bootid", "/update?id=2".into()),
        ("unknown host", format!("/update?id=9&bootid={bootid}")),
        (
            "not in discover",
            "/update?id=1&bootid=0123456789abcdef0123456789abcdef".into(),
        ),
        ("bad id", "/update?id=x".into()),
    ] {
        s.post_form(&target, "mac=52-54-00-00-00-06")
            .assert_one_line_4xx(what);
    }
    let r = s.get(&url);
    assert_eq!(r.status, 405, "GET /update");
    r.assert_one_line_4xx("GET /update");
    assert_unchanged(&s, &before, "bad updates");

    // Finishing discovery leaves the host waiting in "new"; /update is over.
    let r = s.get(&format!("/finish?id=2&bootid={bootid}"));
    assert_eq!(r.text(), "new\n");
    let r = s.post_form(&url, "mac=52-54-00-00-00-07");
    r.assert_one_line_4xx("update after finish");
    assert_eq!(s.field(2, "state"), "new");
    let causes: Vec<Value> = s.events().iter().map(|e| e["cause"].clone()).collect();
    assert_eq!(
        causes,
        vec![
            json!("register"),
            json!("install-boot"),
            json!("update"),
            json!("update"),
            json!("finish")
        ]
    );
}

// --- /hosts -----------------------------------------------------------------------

#[test]
fn hosts_table_from_localhost() {
    let s = stack_with_hosts(json!([
        host(1, "52:54:00:00:00:01", "SN 1", "new"),
        host(12, "52:54:00:00:00:02", "X", "wipe,image1"),
    ]));
    let r = s.get("/hosts");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "ID  HOSTNAME  STATE        SERIAL\n\
         1   not-set   new          SN 1\n\
         12  not-set   wipe,image1  X\n"
    );
    let r = s.request("POST", "/hosts", &[], b"");
    r.assert_one_line_4xx("POST /hosts");
}

/// Runs the stack in a network namespace this test creates, with a second
/// address on its loopback interface: a request from that address is not
/// from localhost, and nginx must deny `/hosts` to it.
#[test]
fn hosts_denied_to_non_loopback_clients() {
    if !Path::new("/proc/self/ns/net").exists() || !command_ok("ip", &["netns", "list"]) {
        panic!("this test needs `ip netns` (iproute2) and root");
    }
    let ns = format!("kshttp-{}", std::process::id());
    command_ok("ip", &["netns", "del", &ns]);
    assert!(
        command_ok("ip", &["netns", "add", &ns]),
        "ip netns add {ns}"
    );
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _guard = DelNs(ns.clone());
    assert!(command_ok("ip", &["-n", &ns, "link", "set", "lo", "up"]));
    assert!(command_ok(
        "ip",
        &["-n", &ns, "addr", "add", "10.213.7.1/32", "dev", "lo"]
    ));
    let s = Stack::start_with(Options {
        netns: Some(ns.clone()),
        prepare: Some(Box::new(|root: &Path| {
            fs::write(
                root.join("known_hosts.json"),
                serde_json::to_string(&json!([host(1, "52:54:00:00:00:01", "SN-1", "new")]))
                    .unwrap(),
            )
            .unwrap();
        })),
        ..Options::default()
    });
    let req = b"GET /hosts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let local = s.ns_raw(req, "127.0.0.1").unwrap();
    assert_eq!(local.status, 200, "{}", local.text());
    assert!(local.text().contains("SN-1"));
    let remote = s.ns_raw(req, "10.213.7.1").unwrap();
    assert_eq!(remote.status, 403, "{}", remote.text());
    assert!(!remote.text().contains("SN-1"));
    remote.assert_one_line_4xx("/hosts from 10.213.7.1");
    // The boot paths answer every address.
    let r = s
        .ns_raw(b"GET /state?id=1 HTTP/1.0\r\n\r\n", "10.213.7.1")
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "new\n".to_string()));
}

fn command_ok(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// --- bad requests -----------------------------------------------------------------

#[test]
fn bad_requests_get_a_one_line_4xx_and_change_nothing() {
    let s = stack_with_hosts(json!([host(1, "52:54:00:00:00:01", "SN-1", "image1")]));
    boot(&s, &["52-54-00-00-00-01"], "", "");
    let before = s.db_stamp();
    let events_before = s.events().len();
    let huge = format!(
        "/bootstrap?net0=52-54-00-00-00-02&serial={}",
        "A".repeat(64 * 1024)
    );
    let many: String = (0..10_000).map(|i| format!("p{i}=1&")).collect();
    let hundred: String = (0..100).map(|i| format!("p{i}=1&")).collect();
    let long_serial = format!(
        "/bootstrap?net0=52-54-00-00-00-02&serial={}",
        "A".repeat(300)
    );
    let targets: Vec<(&str, String)> = vec![
        ("GET", "/state?id=abc".into()),
        ("GET", "/state?id=-1".into()),
        ("GET", "/state?id=1.0".into()),
        ("GET", "/state?id=%201".into()),
        ("GET", "/state?id=0x1".into()),
        ("GET", "/state?id=99999999999999999999999".into()),
        ("GET", "/state?id=18446744073709551616".into()),
        ("GET", "/state?id=2".into()),
        ("GET", "/state?id=".into()),
        ("GET", "/state".into()),
        ("GET", "/state?id=1&id=1".into()),
        ("GET", "/state?id=%ff".into()),
        ("GET", "/state?id=%c3%28".into()),
        ("GET", "/state?id=%00".into()),
        ("GET", "/state?id=1%0a".into()),
        ("GET", "/state?id=%zz".into()),
        ("GET", "/state?id=1%".into()),
        ("GET", "/finish".into()),
        ("GET", "/finish?bootid=abc".into()),
        ("GET", "/finish?id=1&bootid=%ff".into()),
        ("GET", "/post-install".into()),
        (
            "GET",
            "/bootstrap?net0=52-54-00-00-00-02&net0=52-54-00-00-00-03".into(),
        ),
        ("GET", "/bootstrap?net0=52-54-00-00-00-02&serial=%ff".into()),
        (
            "GET",
            "/bootstrap?net0=52-54-00-00-00-02&serial=a%00b".into(),
        ),
        ("GET", long_serial),
        ("GET", huge),
        ("GET", format!("/bootstrap?{many}")),
        ("GET", format!("/state?{many}")),
        ("GET", format!("/state?id=1&{hundred}")),
        ("GET", format!("/state?id=1&{}", "a&".repeat(4000))),
        (
            "GET",
            format!("/bootstrap?net0=52-54-00-00-00-02&{}", "&".repeat(9000)),
        ),
        ("GET", "/nothing".into()),
        ("GET", "/bootstrap/extra".into()),
        ("GET", "/bootstrap.php".into()),
        ("GET", "/BOOTSTRAP".into()),
        ("GET", "/hosts/".into()),
        ("GET", "/state/1".into()),
        ("GET", "/index.html".into()),
        ("GET", "/".into()),
        ("POST", "/bootstrap?net0=52-54-00-00-00-02".into()),
        ("PUT", "/finish?id=1".into()),
        ("DELETE", "/hosts".into()),
        ("PATCH", "/state?id=1".into()),
        ("POST", "/bootstrap.ipxe".into()),
        ("DELETE", "/images/x".into()),
        ("GET", "/update?id=1".into()),
        ("OPTIONS", "/bootstrap".into()),
    ];
    for (method, target) in &targets {
        let r = s.request(method, target, &[], b"");
        let short: String = target.chars().take(80).collect();
        r.assert_one_line_4xx(&format!("{method} {short}"));
    }
    // Raw bytes nginx or the handler must reject.
    let raws: Vec<Vec<u8>> = vec![
        b"GET /state?id=1\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /state?id=\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /bootstrap?net0=52-54-00-00-00-02&serial=\xc3\x28 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /state?id=1 HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET state?id=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"BREW /state?id=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"POST /update?id=1&bootid=x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n".to_vec(),
        b"POST /update?id=1&bootid=x HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    for raw in &raws {
        let r = s.raw(raw);
        r.assert_one_line_4xx(&String::from_utf8_lossy(raw));
    }
    assert_unchanged(&s, &before, "bad requests");
    assert_eq!(s.events().len(), events_before);
    no_internal_errors(&s);
    // Still serving.
    assert_eq!(s.get("/state?id=1").text(), "image1\n");
}

// --- templates --------------------------------------------------------------------

#[test]
fn templates_placeholders_filters_and_pass_through() {
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SN 1&2", "tpl")]),
        false,
        |root| {
            fs::write(
                root.join("templates/tpl.tmpl"),
                "#!ipxe\n\
             id=@id@ host=@HOST@ state=@state@ name=@hostname@\n\
             missing=@nothing@ meta=@metadata.missing@ @metadata.net.missing|shell@\n\
             vlan=@metadata.net.vlan@ first=@metadata.list.0@\n\
             shell=@hostname|shell@ url=@hostname|url@ serial=@serial|url@\n\
             raw=@metadata.text@ json=@metadata.net|json@\n\
             server=@SERVER_IP@:@SERVER_PORT@\n\
             ipxe=${net0/mac:hexhyp} ${serial:uristring} brace={a,b} fn() { echo \\{x\\}; }\n\
             mail=root@example.com @ @@ @id| @.id@\n",
            )
            .unwrap();
        },
    );
    s.edit_host(1, |h| {
        h.insert("hostname".into(), json!("it's & <web>"));
        h.insert(
            "metadata".into(),
            json!({"net": {"vlan": 12}, "list": ["x"], "text": "a&b<c>\"d\""}),
        );
    });
    let r = boot(&s, &["52-54-00-00-00-01"], "", "");
    assert_eq!(
        r.text(),
        "#!ipxe\n\
         id=1 host=1 state=tpl name=it's & <web>\n\
         missing=@nothing@ meta=@metadata.missing@ @metadata.net.missing|shell@\n\
         vlan=12 first=x\n\
         shell='it'\\''s & <web>' url=it%27s%20%26%20%3Cweb%3E serial=SN%201%262\n\
         raw=a&b<c>\"d\" json={\"vlan\":12}\n\
         server=127.0.0.1:5000\n\
         ipxe=${net0/mac:hexhyp} ${serial:uristring} brace={a,b} fn() { echo \\{x\\}; }\n\
         mail=root@example.com @ @@ @id| @.id@\n"
    );
    // The server address follows the Host header the machine used.
    let r = s.request(
        "GET",
        "/bootstrap?net0=52-54-00-00-00-01",
        &[("Host", "[::1]:8080")],
        b"",
    );
    assert!(r.text().contains("server=[::1]:8080\n"), "{}", r.text());
}

#[test]
fn template_with_unknown_filter_names_file_line_and_column() {
    let s = stack_with(
        json!([host(1, "52:54:00:00:00:01", "SN-1", "bad")]),
        false,
        |root| {
            fs::create_dir_all(root.join("images/bad")).unwrap();
            fs::write(
                root.join("images/bad/host.tmpl"),
                "#!ipxe\necho ok\n  x @id|html@\n",
            )
            .unwrap();
        },
    );
    let r = boot(&s, &["52-54-00-00-00-01"], "", "");
    let file = s.root.join("images/bad/host.tmpl");
    let at = format!("{}:3:5", file.display());
    let text = r.text();
    assert!(text.contains(&at), "error script names {at}: {text}");
    assert!(text.contains("html"), "{text}");
    assert!(text.contains("reboot"), "{text}");
    assert!(
        s.handler_log().iter().any(|l| l.contains(&at)),
        "log names {at}: {:?}",
        s.handler_log()
    );
    // Fixing the template is seen by the next boot.
    fs::write(&file, "#!ipxe\necho fixed @id@\n").unwrap();
    assert_eq!(
        boot(&s, &["52-54-00-00-00-01"], "", "").text(),
        "#!ipxe\necho fixed 1\n"
    );
}

// --- the database file ---------------------------------------------------------

#[test]
fn corrupt_database_fails_loudly_is_kept_and_recovers() {
    let s = stack_with_hosts(json!([host(1, "52:54:00:00:00:01", "SN-1", "image1")]));
    boot(&s, &["52-54-00-00-00-01"], "", "");
    let bootid = s.field(1, "bootid");
    let good = s.db_bytes();
    let corrupt = "[\n  {\"id\": 1,,\n]\n";
    fs::write(s.db_path(), corrupt).unwrap();
    let path = s.db_path().display().to_string();
    let requests: Vec<(&str, String, &str)> = vec![
        ("GET", boot_query(&["52-54-00-00-00-01"], "", ""), ""),
        ("GET", boot_query(&["52-54-00-00-00-09"], "", ""), ""),
        ("GET", "/state?id=1".into(), ""),
        ("GET", "/hosts".into(), ""),
        ("GET", format!("/finish?id=1&bootid={bootid}"), ""),
        ("GET", format!("/post-install?id=1&bootid={bootid}"), ""),
        (
            "POST",
            format!("/update?id=1&bootid={bootid}"),
            "mac=52-54-00-00-00-08",
        ),
    ];
    for (method, target, body) in &requests {
        let r = s.request(
            method,
            target,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        );
        let text = r.text();
        assert!(r.status >= 400, "{target}: {} {text}", r.status);
        assert!(
            text.contains(&path) && text.contains("line 2") && text.contains("column"),
            "{target}: the error names the file, line and column: {text}"
        );
        assert_eq!(text.trim_end().lines().count(), 1, "{text}");
        assert_eq!(
            fs::read_to_string(s.db_path()).unwrap(),
            corrupt,
            "never overwritten"
        );
    }
    // Fixed from outside: the next request sees it.
    fs::write(s.db_path(), &good).unwrap();
    assert_eq!(s.get("/state?id=1").text(), "image1\n");
    let r = s.get(&format!("/finish?id=1&bootid={bootid}"));
    assert_eq!((r.status, r.text()), (200, "finished\n".to_string()));
    boot(&s, &["52-54-00-00-00-09"], "", "");
    assert_eq!(s.hosts().len(), 2);
}

#[test]
fn outside_edits_are_seen_by_the_next_request() {
    let s = stack_with_hosts(json!([host(1, "52:54:00:00:00:01", "SN-1", "new")]));
    assert_eq!(s.get("/state?id=1").text(), "new\n");
    // Replaced by rename (as another tool would save it).
    s.edit_host(1, |h| {
        h.insert("state".into(), json!("image1"));
    });
    assert_eq!(s.get("/state?id=1").text(), "image1\n");
    // Rewritten in place, same inode and size.
    let text = fs::read_to_string(s.db_path())
        .unwrap()
        .replace("\"image1\"", "\"image2\"");
    fs::write(s.db_path(), text).unwrap();
    assert_eq!(s.get("/state?id=1").text(), "image2\n");
    // A host added from outside is known to /bootstrap at once.
    let mut hosts = s.hosts();
    hosts.push(host(5, "52:54:00:00:00:05", "SN-5", "finished"));
    s.write_hosts(&hosts);
    let r = boot(&s, &["52-54-00-00-00-05"], "", "");
    assert!(r.text().contains("host 5"), "{}", r.text());
    // Removed from outside: unknown again, registered with a new id: 2,
    // or 6 if host 5's last boot is still in the runtime log, whose facts
    // must never pass to another machine.
    s.write_hosts(&hosts[..1]);
    let r = boot(&s, &["52-54-00-00-00-05"], "", "");
    assert!(
        r.text().contains("registered as host 2") || r.text().contains("registered as host 6"),
        "{}",
        r.text()
    );
    // Unknown fields written by other tools survive the handler's writes.
    s.edit_host(1, |h| {
        h.insert("rack".into(), json!({"row": 3}));
    });
    boot(&s, &["52-54-00-00-00-01", "52-54-00-00-00-11"], "", "");
    assert_eq!(s.host(1).unwrap()["rack"], json!({"row": 3}));
    assert_eq!(s.field(1, "macs"), "52:54:00:00:00:01 52:54:00:00:00:11");
}

// --- concurrency ------------------------------------------------------------------

#[test]
fn many_new_machines_at_once_none_lost() {
    const MACHINES: u32 = 200;
    const THREADS: u32 = 32;
    let s = Arc::new(Stack::start());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for n in (t..MACHINES).step_by(THREADS as usize) {
                    let m0 = mac_hexhyp(n + 1, 0);
                    let m1 = mac_hexhyp(n + 1, 1);
                    let r = s.get_as_pxe(&boot_query(&[&m0, &m1], &format!("SER {n}#"), ""));
                    assert_eq!(r.status, 200, "machine {n}: {}", r.text());
                    let text = r.text();
                    let id: u64 = text
                        .split("registered as host ")
                        .nth(1)
                        .and_then(|t| t.split_whitespace().next())
                        .and_then(|t| t.parse().ok())
                        .unwrap_or_else(|| panic!("machine {n}: {text}"));
                    seen.push((n, id));
                }
                seen
            })
        })
        .collect();
    let mut answered: Vec<(u32, u64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    answered.sort_by_key(|(_, id)| *id);
    let ids: Vec<u64> = answered.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ids,
        (1..=MACHINES as u64).collect::<Vec<_>>(),
        "ids unique and dense"
    );
    let hosts = s.hosts();
    assert_eq!(hosts.len(), MACHINES as usize);
    for (n, id) in &answered {
        let h = s.host(*id).unwrap();
        assert_eq!(
            h["macs"],
            format!("{} {}", mac_db(n + 1, 0), mac_db(n + 1, 1))
        );
        assert_eq!(h["serial"], format!("SER {n}#"));
    }
    let ev = s.events();
    assert_eq!(ev.len(), MACHINES as usize);
    assert!(ev.iter().all(|e| e["cause"] == "register"));
    // All of them again, concurrently: known, nothing new.
    let before = s.db_stamp();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for n in (t..MACHINES).step_by(THREADS as usize) {
                    let r = s.get_as_pxe(&boot_query(&[&mac_hexhyp(n + 1, 1)], "", ""));
                    assert!(r.text().contains("waits for an operator"), "{}", r.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_unchanged(&s, &before, "known machines rebooting");
    no_internal_errors(&s);
}

#[test]
fn concurrent_finish_and_bootstrap_for_one_host() {
    let s = Arc::new(stack_with_hosts(json!([host(
        1,
        "52:54:00:00:00:01",
        "SN-1",
        "a,b,c,d,e,f,g,h"
    )])));
    for round in 0..6 {
        boot(&s, &["52-54-00-00-00-01"], "", "");
        let state_before = s.field(1, "state");
        let bootid = s.field(1, "bootid");
        let events_before = s.events().len();
        // Eight /finish with the same bootid and four reboots at once.
        let finishers: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                let url = format!("/finish?id=1&bootid={bootid}");
                std::thread::spawn(move || s.get(&url))
            })
            .collect();
        let booters: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.get_as_pxe(&boot_query(&["52-54-00-00-00-01"], "", ""))
                })
            })
            .collect();
        let finishes: Vec<Reply> = finishers.into_iter().map(|t| t.join().unwrap()).collect();
        for b in booters {
            let r = b.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let ok = finishes.iter().filter(|r| r.status == 200).count();
        for r in finishes.iter().filter(|r| r.status != 200) {
            r.assert_one_line_4xx("concurrent finish");
        }
        assert!(ok <= 1, "round {round}: a bootid was used {ok} times");
        let hosts = s.hosts();
        assert_eq!(hosts.len(), 1);
        let state = s.field(1, "state");
        let expected = if ok == 1 {
            lifecycle_advance(&state_before)
        } else {
            state_before.clone()
        };
        assert_eq!(state, expected, "round {round}: {ok} finish succeeded");
        let finish_events = s.events()[events_before..]
            .iter()
            .filter(|e| e["cause"] == "finish")
            .count();
        assert_eq!(finish_events, ok);
        let b = s.field(1, "bootid");
        assert!(b.is_empty() || is_bootid(&b));
    }
    no_internal_errors(&s);
}

fn lifecycle_advance(chain: &str) -> String {
    let rest: Vec<&str> = chain.split(',').skip(1).collect();
    if rest.is_empty() {
        "finished".into()
    } else {
        rest.join(",")
    }
}
