//! The boot lifecycle as pure functions: which host a booting machine is,
//! what it boots next, and how a state chain advances. Nothing here touches
//! files; [`crate::api`] applies the decisions through the store.
//!
//! States: `new` (registered, waiting for an operator), `finished`
//! (installed, boots its local disk) and any other name, which is an image
//! state: the machine boots the installer for that image. A state may be a
//! comma-separated chain such as `wipe,image1`; its first element is the
//! current state and `/finish` drops it.
//!
//! Install safety is decided here too: before an install boot starts a new
//! attempt, [`install_decision`] holds a host that loops through the
//! installer or whose install ran past its deadline.

use crate::hosts::{Database, Host, Key, STATE_DISCOVER, STATE_FINISHED, STATE_NEW};
use crate::identity::Mac;
use crate::runtime::{human_duration, Attempt, HoldCause, HostRuntime};

/// What a booting machine reports about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Valid MACs, in the order reported, without duplicates.
    pub macs: Vec<Mac>,
    pub serial: String,
    pub uuid: String,
}

/// Who a booting machine is.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    Known(u64),
    Unknown,
    /// The reported keys point at different hosts: each key with its hosts.
    Conflict(Vec<(Key, Vec<u64>)>),
}

/// The identity keys in a report, placeholders left out.
pub fn report_keys(db: &Database, report: &Report) -> Vec<Key> {
    let p = db.placeholders();
    let mut keys: Vec<Key> = report.macs.iter().copied().map(Key::Mac).collect();
    if let Some(s) = p.serial_key(&report.serial) {
        keys.push(Key::Serial(s));
    }
    if let Some(u) = p.uuid_key(&report.uuid) {
        keys.push(Key::Uuid(u));
    }
    keys
}

/// Finds the host a report belongs to. A machine is known if its serial,
/// its UUID or any of its MACs matches a host; keys that match different
/// hosts are a conflict, which is never resolved by guessing.
pub fn identify(db: &Database, report: &Report) -> Identity {
    let keys = report_keys(db, report);
    let mut ids: Vec<u64> = Vec::with_capacity(1);
    for key in &keys {
        for id in db.lookup(key) {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
    }
    match ids.len() {
        0 => Identity::Unknown,
        1 => Identity::Known(ids[0]),
        _ => Identity::Conflict(
            keys.into_iter()
                .filter_map(|key| {
                    let hits = db.lookup(&key).to_vec();
                    (!hits.is_empty()).then_some((key, hits))
                })
                .collect(),
        ),
    }
}

/// Explains a conflict in one line per key.
pub fn describe_conflict(matched: &[(Key, Vec<u64>)]) -> Vec<String> {
    matched
        .iter()
        .map(|(key, ids)| {
            let hosts: Vec<String> = ids.iter().map(|i| format!("host {i}")).collect();
            format!("{key} belongs to {}", hosts.join(" and "))
        })
        .collect()
}

/// The MACs of a report that its host does not have yet.
pub fn unrecorded_macs(host: &Host, report: &Report) -> Vec<Mac> {
    let known = host.mac_list();
    report
        .macs
        .iter()
        .filter(|m| !known.contains(m))
        .copied()
        .collect()
}

/// What the next boot of a known host does.
#[derive(Debug, Clone, PartialEq)]
pub enum NextBoot {
    /// Waits for an operator (`templates/new.tmpl`).
    Wait,
    /// Boots the local disk (`templates/finished.tmpl`).
    LocalDisk,
    /// Boots the installer of this image state, with a fresh bootid.
    Install(String),
    /// The state cannot be booted; the reason is shown on the console.
    Refuse(String),
}

/// Decides the next boot from a host's state chain.
pub fn next_boot(state_chain: &str) -> NextBoot {
    let current = crate::hosts::current_state(state_chain);
    match current {
        STATE_NEW => NextBoot::Wait,
        STATE_FINISHED => NextBoot::LocalDisk,
        "" => NextBoot::Refuse("the host has no state; set one with kiwispray-hosts set".into()),
        s => match check_state_name(s) {
            Ok(()) => NextBoot::Install(s.to_string()),
            Err(e) => NextBoot::Refuse(e),
        },
    }
}

/// A state names a directory under `images/` and a file under
/// `templates/`, so it must be one safe path component.
pub fn check_state_name(state: &str) -> Result<(), String> {
    let ok = !state.is_empty()
        && state.len() <= 128
        && state != "."
        && state != ".."
        && !state.starts_with('.')
        && state
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "state {:?} is not a safe name (letters, digits, '.', '_', '-', '+', '@'; no leading dot)",
            state.chars().take(64).collect::<String>()
        ))
    }
}

/// Checks every element of a state chain.
pub fn check_chain(chain: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = chain.split(',').map(str::trim).collect();
    for p in &parts {
        check_state_name(p)?;
    }
    Ok(parts)
}

/// The chain after `/finish`: the first element dropped, `finished` once
/// nothing is left.
pub fn advance(state_chain: &str) -> String {
    let rest: Vec<&str> = state_chain
        .split(',')
        .skip(1)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if rest.is_empty() {
        STATE_FINISHED.to_string()
    } else {
        rest.join(",")
    }
}

/// The state a machine gets when it registers.
pub fn initial_state(discover: bool) -> String {
    if discover {
        format!("{STATE_DISCOVER},{STATE_NEW}")
    } else {
        STATE_NEW.to_string()
    }
}

/// Whether a host is between an install boot and its `/finish`: in an
/// image state, with a bootid that is not used up.
pub fn installing(host: &Host, rt: &HostRuntime) -> bool {
    matches!(next_boot(&host.state), NextBoot::Install(_))
        && rt.bootid.as_deref().is_some_and(|b| !b.is_empty())
}

/// The open attempt of a host being installed, if it is overdue at `now`.
pub fn overdue_attempt<'a>(host: &Host, rt: &'a HostRuntime, now: u64) -> Option<&'a Attempt> {
    if !installing(host, rt) {
        return None;
    }
    rt.open_attempt()
        .filter(|a| a.state == host.current_state() && a.is_overdue(now))
}

/// What an install boot of `state` does.
#[derive(Debug, Clone, PartialEq)]
pub enum InstallDecision {
    /// Start a new attempt with a fresh bootid.
    Start,
    /// Start nothing; hold the host for this reason.
    Hold(HoldCause, String),
    /// Start nothing now: this many hosts install already, the cap.
    Defer(usize),
}

/// The rollout cap: a host that is not installing yet may start only while
/// fewer than `max_installs` hosts are.
pub fn capacity_decision(
    rt: &HostRuntime,
    installing: usize,
    max_installs: Option<usize>,
) -> Option<InstallDecision> {
    match max_installs {
        Some(max) if !rt.is_installing() && installing >= max => {
            Some(InstallDecision::Defer(installing))
        }
        _ => None,
    }
}

/// The install-safety rules, applied when a host in image state `state`
/// boots: a host whose open attempt is overdue is held when `hold_overdue`
/// is set, and one that already started `max_boots` attempts of `state`
/// without a `/finish` is held as a loop.
pub fn install_decision(
    rt: &HostRuntime,
    state: &str,
    now: u64,
    max_boots: u32,
    hold_overdue: bool,
) -> InstallDecision {
    if hold_overdue {
        if let Some(a) = rt
            .open_attempt()
            .filter(|a| a.state == state && a.is_overdue(now))
        {
            return InstallDecision::Hold(
                HoldCause::Overdue,
                format!(
                    "install {} of {state} has run {}, past its deadline of {} min",
                    a.n,
                    human_duration(a.elapsed(now)),
                    a.deadline_minutes
                ),
            );
        }
    }
    let run = rt.unfinished_run(state);
    if run >= max_boots as usize {
        return InstallDecision::Hold(
            HoldCause::Loop,
            format!(
                "{run} install boots of {state} in a row without /finish (max_install_boots {max_boots})"
            ),
        );
    }
    InstallDecision::Start
}

/// Compares a presented bootid with the stored one in constant time.
pub fn bootid_matches(stored: &str, presented: &str) -> bool {
    let (a, b) = (stored.as_bytes(), presented.as_bytes());
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Placeholders;
    use std::sync::Arc;

    fn db() -> Database {
        Database::parse(
            br#"[
            {"id": 1, "macs": "52:54:00:00:00:01 52:54:00:00:00:02", "serial": "Default string", "uuid": "00000000-0000-0000-0000-000000000000", "state": "finished"},
            {"id": 2, "macs": "52:54:00:00:00:03", "serial": "SN2", "uuid": "11111111-2222-3333-4444-555555555555", "state": "new"}
        ]"#,
            Arc::new(Placeholders::default()),
        )
        .unwrap()
    }

    fn mac(s: &str) -> Mac {
        Mac::parse(s).unwrap()
    }

    #[test]
    fn identified_by_any_mac_serial_or_uuid() {
        let d = db();
        let by_mac = Report {
            macs: vec![mac("52:54:00:99:99:99"), mac("52-54-00-00-00-02")],
            ..Report::default()
        };
        assert_eq!(identify(&d, &by_mac), Identity::Known(1));
        let by_serial = Report {
            macs: vec![mac("52:54:00:99:99:99")],
            serial: "SN2".into(),
            ..Report::default()
        };
        assert_eq!(identify(&d, &by_serial), Identity::Known(2));
        let by_uuid = Report {
            uuid: "11111111-2222-3333-4444-555555555555".to_uppercase(),
            ..Report::default()
        };
        assert_eq!(identify(&d, &by_uuid), Identity::Known(2));
    }

    #[test]
    fn placeholders_never_identify() {
        let d = db();
        let r = Report {
            macs: vec![mac("52:54:00:99:99:99")],
            serial: "Default string".into(),
            uuid: "00000000-0000-0000-0000-000000000000".into(),
        };
        assert_eq!(identify(&d, &r), Identity::Unknown);
    }

    #[test]
    fn keys_of_two_hosts_conflict() {
        let d = db();
        let r = Report {
            macs: vec![mac("52:54:00:00:00:01")],
            serial: "SN2".into(),
            ..Report::default()
        };
        match identify(&d, &r) {
            Identity::Conflict(m) => {
                let lines = describe_conflict(&m);
                assert_eq!(
                    lines,
                    vec![
                        "MAC 52:54:00:00:00:01 belongs to host 1".to_string(),
                        "serial \"SN2\" belongs to host 2".to_string()
                    ]
                );
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn next_boot_by_state() {
        assert_eq!(next_boot("new"), NextBoot::Wait);
        assert_eq!(next_boot("finished"), NextBoot::LocalDisk);
        assert_eq!(next_boot("wipe,image1"), NextBoot::Install("wipe".into()));
        assert_eq!(
            next_boot("discover,new"),
            NextBoot::Install("discover".into())
        );
        for bad in ["..", "../etc", "a/b", ".hidden", "", "x y", "a\0b"] {
            assert!(matches!(next_boot(bad), NextBoot::Refuse(_)), "{bad:?}");
        }
    }

    #[test]
    fn chains_advance_to_finished() {
        assert_eq!(advance("wipe,image1"), "image1");
        assert_eq!(advance("image1"), "finished");
        assert_eq!(advance("discover,new"), "new");
        assert_eq!(initial_state(true), "discover,new");
        assert!(check_chain("wipe,image1").is_ok());
        assert!(check_chain("wipe,../x").is_err());
    }

    #[test]
    fn the_boot_after_max_install_boots_is_held_as_a_loop() {
        let mut rt = HostRuntime::default();
        for n in 0..3 {
            assert_eq!(
                install_decision(&rt, "img", n, 3, false),
                InstallDecision::Start
            );
            rt.start_attempt(n, "img", None, 60, format!("b{n}"));
        }
        match install_decision(&rt, "img", 10, 3, false) {
            InstallDecision::Hold(HoldCause::Loop, why) => {
                assert!(why.starts_with("3 install boots of img"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // Another state has its own count.
        assert_eq!(
            install_decision(&rt, "other", 10, 3, false),
            InstallDecision::Start
        );
    }

    #[test]
    fn an_overdue_install_is_held_only_with_hold_overdue() {
        let mut rt = HostRuntime::default();
        rt.start_attempt(0, "img", None, 1, "b".into());
        assert_eq!(
            install_decision(&rt, "img", 61, 3, false),
            InstallDecision::Start
        );
        assert!(matches!(
            install_decision(&rt, "img", 61, 3, true),
            InstallDecision::Hold(HoldCause::Overdue, _)
        ));
        assert_eq!(
            install_decision(&rt, "img", 59, 3, true),
            InstallDecision::Start
        );
    }

    #[test]
    fn bootids_compare_exactly() {
        assert!(bootid_matches("abc", "abc"));
        assert!(!bootid_matches("abc", "abd"));
        assert!(!bootid_matches("abc", "ab"));
        assert!(!bootid_matches("", ""));
    }
}
