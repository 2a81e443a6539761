//! Install safety through the real stack (nginx or lighttpd, set by
//! KIWISPRAY_WEB, and kiwispray-fcgi) and the real CLI: install attempts,
//! `/fail`, holds and the hold script, `release`, the loop breaker,
//! deadlines and "last seen".

mod common;

use common::{bin_dir, FileStamp, Options, Reply, Stack};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MAC: &str = "52-54-00-00-0a-01";

/// A stack with host 1 in state `img`, whose host.tmpl prints the bootid
/// on a line of its own, and `settings` as kiwispray.json.
fn stack(settings: Value) -> Stack {
    Stack::start_with(Options {
        prepare: Some(Box::new(move |root: &Path| {
            fs::write(
                root.join("known_hosts.json"),
                serde_json::to_string_pretty(&json!([{
                    "id": 1, "macs": "52:54:00:00:0a:01", "serial": "SN-SAFE",
                    "uuid": "", "hostname": "safe", "state": "img", "metadata": {}
                }]))
                .unwrap(),
            )
            .unwrap();
            let img = root.join("images/img");
            fs::create_dir_all(&img).unwrap();
            fs::write(
                img.join("host.tmpl"),
                "#!ipxe\necho INSTALL @state@\necho BOOTID @bootid@\n",
            )
            .unwrap();
            // A build in the current KIWI naming, so that each attempt
            // records the image's digest from its checksum file.
            let p = "img.x86_64-1.0";
            for f in [
                format!("{p}.append"),
                format!("{p}.xz"),
                format!("{p}.initrd"),
                format!("{p}.kernel"),
                format!("pxeboot.{p}.kernel"),
                format!("pxeboot.{p}.initrd"),
                format!("{p}.config.bootoptions"),
            ] {
                fs::write(img.join(f), "x").unwrap();
            }
            fs::write(
                img.join(format!("{p}.sha256")),
                format!("{} 1 512\n", "ab".repeat(32)),
            )
            .unwrap();
            if !settings.is_null() {
                fs::write(root.join("kiwispray.json"), settings.to_string()).unwrap();
            }
        })),
        ..Options::default()
    })
}

fn boot(s: &Stack) -> Reply {
    let r = s.get_as_pxe(&format!("/bootstrap?net0={MAC}&platform=efi"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("#!ipxe\n"), "{}", r.text());
    r
}

/// The bootid an install boot's script carries.
fn bootid_of(r: &Reply) -> String {
    let text = r.text();
    let b = text
        .lines()
        .find_map(|l| l.strip_prefix("echo BOOTID "))
        .unwrap_or_else(|| panic!("not an install script: {text}"))
        .to_string();
    assert_eq!(b.len(), 32, "{text}");
    b
}

/// Runs `kiwispray-hosts --root ROOT ARGS`: exit code, stdout, stderr.
fn cli(s: &Stack, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_dir().join("kiwispray-hosts"))
        .arg("--root")
        .arg(&s.root)
        .args(args)
        .output()
        .expect("run kiwispray-hosts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn show_json(s: &Stack) -> Value {
    let (code, out, err) = cli(s, &["show", "1", "--json", "--events", "100"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn causes(s: &Stack) -> Vec<String> {
    s.events()
        .iter()
        .map(|e| e["cause"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn fail_takes_the_right_bootid_once_and_holds_the_host() {
    let s = stack(Value::Null);
    let b = bootid_of(&boot(&s));
    let before = FileStamp::of(&s.db_path());
    let r = s.get(&format!("/fail?id=1&bootid={}&reason=x", "0".repeat(32)));
    assert_eq!(r.status, 403);
    assert!(r
        .assert_one_line_4xx("wrong bootid")
        .contains("wrong bootid"));
    let r = s.get("/fail?id=1&reason=x");
    assert_eq!(r.status, 400);
    r.assert_one_line_4xx("missing bootid");
    let r = s.get(&format!("/fail?id=9&bootid={b}"));
    assert_eq!(r.status, 404);
    // Control characters are refused like in every query; nothing written.
    let r = s.get(&format!("/fail?id=1&bootid={b}&reason=a%0Ab"));
    assert_eq!(r.status, 400);
    assert!(show_json(&s)["host"]["runtime"]["held"].is_null());
    let long = "disk%20full%20".repeat(40);
    let r = s.get(&format!("/fail?id=1&bootid={b}&reason={long}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("held: disk full"), "{}", r.text());
    // Used up.
    let r = s.get(&format!("/fail?id=1&bootid={b}&reason=again"));
    assert_eq!(r.status, 409, "{}", r.text());
    let r = s.get(&format!("/finish?id=1&bootid={b}"));
    assert_eq!(r.status, 409, "{}", r.text());
    // Configuration untouched: the failure is a runtime fact.
    assert_eq!(FileStamp::of(&s.db_path()), before);
    let v = show_json(&s);
    let rt = &v["host"]["runtime"];
    assert_eq!(rt["held"]["cause"], "failed");
    let reason = rt["held"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("disk full disk full"), "{reason}");
    assert!(
        reason.chars().count() <= 200 && reason.ends_with('…'),
        "{reason}"
    );
    let a = &rt["attempts"][0];
    assert_eq!(a["outcome"], "failed");
    assert_eq!(a["state"], "img");
    assert_eq!(a["digest"], format!("sha256:{}", "ab".repeat(32)));
    assert!(!v.to_string().contains(&b), "the bootid is never shown");
    assert_eq!(causes(&s), ["install-boot", "fail", "hold"]);
    let (_, history, _) = cli(&s, &["history", "1"]);
    assert!(
        history.contains("fail") && history.contains("disk full"),
        "{history}"
    );
    assert!(!history.contains(&b));
}

#[test]
fn a_held_host_is_told_why_installs_nothing_and_installs_again_once_released() {
    let s = stack(Value::Null);
    let b = bootid_of(&boot(&s));
    assert_eq!(
        s.get(&format!("/fail?id=1&bootid={b}&reason=kernel%20panic"))
            .status,
        200
    );
    let before = FileStamp::of(&s.db_path());
    let log_before = fs::read(s.root.join(".known_hosts.json.runtime")).unwrap();
    for _ in 0..3 {
        let text = boot(&s).text();
        assert!(text.contains("is ON HOLD (failed) since"), "{text}");
        assert!(text.contains("Reason: kernel panic"), "{text}");
        assert!(text.contains("kiwispray-hosts release 1"), "{text}");
        assert!(
            text.contains("\nreboot\n") && !text.contains("BOOTID"),
            "{text}"
        );
    }
    // Read-only: no new bootid, no attempt, the database not rewritten.
    assert_eq!(FileStamp::of(&s.db_path()), before);
    std::thread::sleep(Duration::from_millis(300));
    let log_after = fs::read(s.root.join(".known_hosts.json.runtime")).unwrap();
    assert_eq!(
        log_after.len() - log_before.len(),
        log_after[log_before.len()..]
            .split(|c| *c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: Value = serde_json::from_slice(l).unwrap();
                assert_eq!(v.as_object().unwrap().len(), 2, "only last seen: {v}");
                assert!(v["seen"].is_object(), "{v}");
                l.len() + 1
            })
            .sum::<usize>()
    );
    let (code, out, _) = cli(&s, &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("HELD (failed)"), "{out}");
    let (_, out, _) = cli(&s, &["list", "--held"]);
    assert!(out.contains("safe"), "{out}");
    let (_, out, _) = cli(&s, &["list", "--state", "held", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()[0]["id"], 1);
    let (code, out, _) = cli(&s, &["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("host 1 is held (failed)"), "{out}");
    let (code, out, err) = cli(&s, &["release", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host 1: released"), "{out}");
    let (_, out, _) = cli(&s, &["release", "1"]);
    assert!(out.contains("not held"), "{out}");
    let b2 = bootid_of(&boot(&s));
    assert_ne!(b, b2);
    let v = show_json(&s);
    assert_eq!(v["host"]["runtime"]["attempts"][1]["n"], 2);
    assert!(v["host"]["runtime"]["installing"].as_bool().unwrap());
    assert_eq!(s.get(&format!("/finish?id=1&bootid={b2}")).status, 200);
    assert_eq!(
        causes(&s),
        [
            "install-boot",
            "fail",
            "hold",
            "release",
            "install-boot",
            "finish"
        ]
    );
}

#[test]
fn a_loop_of_three_install_boots_is_held_on_the_fourth() {
    let s = stack(Value::Null);
    let mut last = String::new();
    for n in 1..=3 {
        let b = bootid_of(&boot(&s));
        assert_ne!(b, last, "boot {n}");
        last = b;
    }
    let text = boot(&s).text();
    assert!(text.contains("ON HOLD (loop)"), "{text}");
    assert!(
        text.contains("3 install boots of img in a row without /finish"),
        "{text}"
    );
    assert!(!text.contains("BOOTID"));
    // No new bootid, and the last one is used up.
    let r = s.get(&format!("/post-install?id=1&bootid={last}"));
    assert_eq!(r.status, 409, "{}", r.text());
    // Further boots start nothing either.
    assert!(boot(&s).text().contains("ON HOLD (loop)"));
    let v = show_json(&s);
    let attempts = v["host"]["runtime"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts.iter().all(|a| a["outcome"] == "abandoned"),
        "{attempts:?}"
    );
    assert_eq!(v["host"]["runtime"]["held"]["cause"], "loop");
    assert_eq!(
        causes(&s),
        ["install-boot", "install-boot", "install-boot", "hold"]
    );
    let hold = s.events().into_iter().last().unwrap();
    assert!(hold["detail"]
        .as_str()
        .unwrap()
        .starts_with("loop: 3 install boots"));
    assert!(s
        .handler_log()
        .iter()
        .any(|l| l.contains("host 1: held (loop)")));
    // After a release the count starts anew: three more attempts.
    assert_eq!(cli(&s, &["release", "1"]).0, 0);
    for _ in 0..3 {
        bootid_of(&boot(&s));
    }
    assert!(boot(&s).text().contains("ON HOLD (loop)"));
}

#[test]
fn max_install_boots_comes_from_the_settings() {
    let s = stack(json!({"max_install_boots": 1}));
    bootid_of(&boot(&s));
    assert!(boot(&s).text().contains("ON HOLD (loop)"));
    // A change of state by the operator starts the count anew, but the
    // hold stays until a release.
    let (code, _, err) = cli(&s, &["set", "1", "--state", "new"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&s, &["set", "1", "--state", "img"]);
    assert_eq!(code, 0);
    assert!(err.contains("is held"), "{err}");
    assert!(boot(&s).text().contains("ON HOLD (loop)"));
    assert_eq!(cli(&s, &["release", "1"]).0, 0);
    bootid_of(&boot(&s));
}

/// A real one-minute deadline: the test waits for it.
#[test]
fn an_install_past_its_deadline_is_overdue_reported_once_and_held_on_its_next_boot() {
    let s = stack(json!({"install_deadline_minutes": 1, "hold_overdue": true}));
    let b = bootid_of(&boot(&s));
    let (_, out, _) = cli(&s, &["list"]);
    assert!(out.contains("installing"), "{out}");
    let (code, out, _) = cli(&s, &["check"]);
    assert!(!out.contains("overdue"), "{out}");
    let _ = code;
    std::thread::sleep(Duration::from_secs(61));
    let (code, out, _) = cli(&s, &["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "host 1 is overdue: install 1 of img has run 1 min, past its deadline of 1 min"
        ),
        "{out}"
    );
    let (_, out, _) = cli(&s, &["list", "--overdue"]);
    assert!(out.contains("OVERDUE 1 min"), "{out}");
    let (_, out, _) = cli(&s, &["show", "1"]);
    assert!(out.contains("OVERDUE"), "{out}");
    // Recorded once, however often it is checked.
    cli(&s, &["check"]);
    let overdue: Vec<Value> = s
        .events()
        .into_iter()
        .filter(|e| e["cause"] == "overdue")
        .collect();
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    // The machine is still allowed to report: the install may be slow.
    let r = s.get(&format!("/post-install?id=1&bootid={b}"));
    assert_eq!(r.status, 200, "{}", r.text());
    // With hold_overdue, its next boot holds it instead of a new attempt.
    let text = boot(&s).text();
    assert!(text.contains("ON HOLD (overdue)"), "{text}");
    assert!(text.contains("past its deadline of 1 min"), "{text}");
    let v = show_json(&s);
    assert_eq!(
        v["host"]["runtime"]["attempts"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn an_images_own_deadline_is_recorded_with_each_attempt() {
    let s = stack(Value::Null);
    fs::write(
        s.root.join("images/img/image.json"),
        r#"{"install_deadline_minutes": 90}"#,
    )
    .unwrap();
    bootid_of(&boot(&s));
    let v = show_json(&s);
    assert_eq!(v["host"]["runtime"]["attempts"][0]["deadline_minutes"], 90);
    let e = s.events().into_iter().last().unwrap();
    assert_eq!(e["cause"], "install-boot");
    let d = e["detail"].as_str().unwrap();
    assert!(
        d.starts_with("attempt 1 of img, deadline 90 min, image sha256:abab"),
        "{d}"
    );
}

#[test]
fn last_seen_is_recorded_without_rewriting_the_database() {
    let s = stack(Value::Null);
    let b = bootid_of(&boot(&s));
    assert_eq!(s.get(&format!("/finish?id=1&bootid={b}")).status, 200);
    let before = FileStamp::of(&s.db_path());
    let r = s.get_as_pxe(&format!("/bootstrap?net0={MAC}&platform=pcbios"));
    assert!(
        r.text().contains("booting from the local disk"),
        "{}",
        r.text()
    );
    // Queued without waiting: give the writer a moment.
    let mut seen = Value::Null;
    for _ in 0..50 {
        seen = show_json(&s)["host"]["runtime"]["last_seen"].clone();
        if seen["platform"] == "pcbios" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen["platform"], "pcbios", "{seen}");
    let at = seen["at"].as_str().unwrap();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );
    assert_eq!(FileStamp::of(&s.db_path()), before, "not rewritten");
    let (_, out, _) = cli(&s, &["list", "-v"]);
    assert!(
        out.contains("LAST SEEN") && out.contains("s ago (pcbios)"),
        "{out}"
    );
    let attempt = &show_json(&s)["host"]["runtime"]["attempts"][0];
    assert_eq!(attempt["outcome"], "finished");
    let (_, history, _) = cli(&s, &["history", "1"]);
    assert!(
        history.contains("attempt 1 of img finished after"),
        "{history}"
    );
}

#[test]
fn the_shipped_post_install_reports_a_failed_step_to_fail() {
    let s = stack(Value::Null);
    let b = bootid_of(&boot(&s));
    let script = s.get(&format!("/post-install?id=1&bootid={b}"));
    assert_eq!(script.status, 200, "{}", script.text());
    let dir = common::TempDir::new("postfail");
    let path = dir.path().join("post-install.sh");
    fs::write(&path, script.body).unwrap();
    // KS_ROOT is a plain file: no directory can be made below it.
    let not_a_dir = dir.path().join("target");
    fs::write(&not_a_dir, "").unwrap();
    let out = Command::new("sh")
        .arg(&path)
        .env("KS_ROOT", &not_a_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("post-install of host 1 failed: cannot create /etc/kiwispray"),
        "{err}"
    );
    let rt = &show_json(&s)["host"]["runtime"];
    assert_eq!(rt["held"]["cause"], "failed");
    assert_eq!(
        rt["held"]["reason"],
        "post-install: cannot create /etc/kiwispray"
    );
    assert_eq!(rt["attempts"][0]["outcome"], "failed");
}
