//! Host selectors: the `--where EXPR` of the CLI's commands, as pure values.
//! An expression is a list of conditions, separated by spaces (or given as
//! several `--where` options), that must all hold:
//!
//! | condition | holds for |
//! |---|---|
//! | `state=new`, `state=web*` | the current state (first element of the chain) |
//! | `chain=wipe,*` | the whole state chain |
//! | `hostname=web*`, `serial=CZ*`, `uuid=…` | the field, by glob (`*`, `?`) |
//! | `mac=52:54:00:*` | any of the host's MACs (any spelling) |
//! | `metadata.rack=R7` | a metadata value (dotted path; numbers as written) |
//! | `bmc=ipmi://*` | the host's BMC URL, where it has one |
//! | `id=7`, `id=100-199` | the id, or a range of ids |
//! | `held`, `held=loop` | held hosts (for that cause) |
//! | `overdue`, `installing` | hosts whose install is overdue, in progress |
//! | `seen<1h`, `seen>7d`, `seen=never` | when the host last asked `/bootstrap` |
//!
//! `key!=value` and a leading `!` (`!held`) negate. Hostnames match without
//! regard to case; everything else as written.

use crate::hosts::Host;
use crate::identity::Mac;
use crate::lifecycle;
use crate::runtime::HostRuntime;
use serde_json::Value;
use std::fmt;

/// A host field a condition compares.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    State,
    Chain,
    Hostname,
    Serial,
    Uuid,
    Mac,
    Bmc,
    Metadata(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    /// The field matches the glob.
    Glob(Field, String),
    Id(u64, u64),
    Held(Option<String>),
    Overdue,
    Installing,
    /// Last seen less than this many seconds ago.
    SeenWithin(u64),
    /// Last seen more than this many seconds ago (or never).
    SeenBefore(u64),
    SeenNever,
}

/// One condition, possibly negated.
#[derive(Debug, Clone, PartialEq)]
struct Cond {
    test: Test,
    negated: bool,
    text: String,
}

/// A parsed `--where` expression: all of its conditions must hold. An
/// empty selector holds for every host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    conds: Vec<Cond>,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self.conds.iter().map(|c| c.text.as_str()).collect();
        f.write_str(&parts.join(" "))
    }
}

/// Parses `30s`, `15m`, `1h`, `2d`, `1w` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 30s, 15m, 1h, 2d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration (like 30s, 15m, 1h, 2d)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

fn parse_cond(raw: &str) -> Result<Cond, String> {
    let text = raw.to_string();
    let (negated, body) = match raw.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let bad = |why: &str| format!("--where {raw:?}: {why}");
    let flag = |t: Test| {
        Ok(Cond {
            test: t,
            negated,
            text: text.clone(),
        })
    };
    match body {
        "held" => return flag(Test::Held(None)),
        "overdue" => return flag(Test::Overdue),
        "installing" => return flag(Test::Installing),
        _ => {}
    }
    if let Some(rest) = body.strip_prefix("seen") {
        let (test, value) = if let Some(v) = rest.strip_prefix('<') {
            (0, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (1, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            if v == "never" {
                return flag(Test::SeenNever);
            }
            return Err(bad("use seen<DURATION, seen>DURATION or seen=never"));
        } else {
            return Err(bad("use seen<DURATION, seen>DURATION or seen=never"));
        };
        let secs = parse_duration(value).map_err(|e| bad(&e))?;
        return flag(if test == 0 {
            Test::SeenWithin(secs)
        } else {
            Test::SeenBefore(secs)
        });
    }
    let (key, value, ne) =
        match body.split_once("!=") {
            Some((k, v)) => (k, v, true),
            None => match body.split_once('=') {
                Some((k, v)) => (k, v, false),
                None => return Err(bad(
                    "expected KEY=VALUE, KEY!=VALUE, held, overdue, installing or seen<DURATION",
                )),
            },
        };
    let negated = negated ^ ne;
    let cond = |test| {
        Ok(Cond {
            test,
            negated,
            text: text.clone(),
        })
    };
    let field = match key {
        "state" => Field::State,
        "chain" => Field::Chain,
        "hostname" => Field::Hostname,
        "serial" => Field::Serial,
        "uuid" => Field::Uuid,
        "mac" | "macs" => Field::Mac,
        "bmc" => Field::Bmc,
        "held" => {
            let cause = value.to_string();
            if !matches!(cause.as_str(), "failed" | "loop" | "overdue") {
                return Err(bad("held= takes failed, loop or overdue"));
            }
            return cond(Test::Held(Some(cause)));
        }
        "id" => {
            let parse = |s: &str| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| bad("id= takes a number or a range like 100-199"))
            };
            let (lo, hi) = match value.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let n = parse(value)?;
                    (n, n)
                }
            };
            if lo > hi {
                return Err(bad("the range is empty"));
            }
            return cond(Test::Id(lo, hi));
        }
        k => match k.strip_prefix("metadata.") {
            Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => {
                Field::Metadata(path.split('.').map(str::to_string).collect())
            }
            _ => {
                return Err(bad(
                    "unknown key (state, chain, hostname, serial, uuid, mac, bmc, metadata.PATH, id, held, seen)",
                ))
            }
        },
    };
    if value.is_empty() {
        return Err(bad("empty value"));
    }
    cond(Test::Glob(field, value.to_string()))
}

impl Selector {
    /// Parses one or more `--where` expressions; their conditions are ANDed.
    pub fn parse<S: AsRef<str>>(exprs: &[S]) -> Result<Selector, String> {
        let mut conds = Vec::new();
        for e in exprs {
            for word in e.as_ref().split_whitespace() {
                if word.eq_ignore_ascii_case("and") {
                    continue;
                }
                conds.push(parse_cond(word)?);
            }
        }
        Ok(Selector { conds })
    }

    pub fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }

    /// Whether a host (with its runtime facts, at `now`) is selected.
    pub fn matches(&self, host: &Host, rt: &HostRuntime, now: u64) -> bool {
        self.conds
            .iter()
            .all(|c| c.negated != test(&c.test, host, rt, now))
    }
}

fn test(t: &Test, host: &Host, rt: &HostRuntime, now: u64) -> bool {
    match t {
        Test::Glob(field, pattern) => field_matches(field, pattern, host),
        Test::Id(lo, hi) => (*lo..=*hi).contains(&host.id),
        Test::Held(None) => rt.hold.is_some(),
        Test::Held(Some(cause)) => rt.hold.as_ref().is_some_and(|h| h.cause.as_str() == cause),
        Test::Overdue => lifecycle::overdue_attempt(host, rt, now).is_some(),
        Test::Installing => lifecycle::installing(host, rt),
        Test::SeenWithin(s) => rt
            .seen
            .as_ref()
            .is_some_and(|x| now.saturating_sub(x.at) < *s),
        Test::SeenBefore(s) => rt
            .seen
            .as_ref()
            .is_none_or(|x| now.saturating_sub(x.at) > *s),
        Test::SeenNever => rt.seen.is_none(),
    }
}

fn field_matches(field: &Field, pattern: &str, host: &Host) -> bool {
    match field {
        Field::State => glob(pattern, host.current_state()),
        Field::Chain => glob(pattern, &host.state),
        Field::Hostname => glob(&pattern.to_lowercase(), &host.hostname.to_lowercase()),
        Field::Serial => glob(pattern, &host.serial),
        Field::Uuid => glob(&pattern.to_lowercase(), &host.uuid.to_lowercase()),
        Field::Mac => {
            let wanted = match Mac::parse(pattern) {
                Ok(m) => m.to_string(),
                Err(_) => pattern.to_uppercase().replace('-', ":"),
            };
            host.mac_list()
                .iter()
                .any(|m| glob(&wanted, &m.to_string()))
        }
        Field::Bmc => host.bmc.as_deref().is_some_and(|b| glob(pattern, b)),
        Field::Metadata(path) => {
            let mut cur = Some(&Value::Object(host.metadata.clone()));
            for p in path {
                cur = cur.and_then(|v| match v {
                    Value::Object(m) => m.get(p),
                    Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                });
            }
            match cur {
                Some(Value::String(s)) => glob(pattern, s),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => glob(pattern, &v.to_string()),
                _ => false,
            }
        }
    }
}

/// Matches `text` against a glob with `*` (any run) and `?` (one
/// character); everything else is literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{HoldCause, Seen};

    fn host() -> Host {
        let mut h = Host::new(
            150,
            &[Mac::parse("52:54:00:00:00:01").unwrap()],
            "CZ123K",
            "",
            "wipe,web",
        );
        h.hostname = "Web-01.example".into();
        h.metadata = serde_json::json!({"rack": "R7", "net": {"vlan": 12}})
            .as_object()
            .unwrap()
            .clone();
        h
    }

    fn sel(e: &str) -> Selector {
        Selector::parse(&[e]).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob("web*", "web-01"));
        assert!(glob("*01", "web-01"));
        assert!(glob("w?b*", "web"));
        assert!(!glob("web", "web-01"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn conditions_and_together() {
        let (h, rt) = (host(), HostRuntime::default());
        for yes in [
            "state=wipe",
            "chain=wipe,*",
            "hostname=web-*",
            "serial=CZ*",
            "metadata.rack=R7 id=100-199",
            "metadata.net.vlan=12",
            "mac=52-54-00-00-00-01",
            "mac=52:54:00:*",
            "!held",
            "seen=never",
            "seen>1h",
            "state!=finished",
        ] {
            assert!(sel(yes).matches(&h, &rt, 1000), "{yes}");
        }
        for no in [
            "state=web",
            "metadata.rack=R8",
            "metadata.missing=x",
            "id=1-100",
            "held",
            "overdue",
            "seen<1h",
            "state=wipe metadata.rack=R8",
        ] {
            assert!(!sel(no).matches(&h, &rt, 1000), "{no}");
        }
        let mut rt = HostRuntime::default();
        rt.hold(10, HoldCause::Loop, "x".into());
        rt.seen = Some(Seen {
            at: 900,
            platform: "efi".into(),
            remote: String::new(),
        });
        assert!(sel("held held=loop seen<5m").matches(&h, &rt, 1000));
        assert!(!sel("held=failed").matches(&h, &rt, 1000));
    }

    #[test]
    fn bad_expressions_are_explained() {
        for (bad, why) in [
            ("colour=red", "unknown key"),
            ("id=9-1", "empty"),
            ("seen<soon", "not a duration"),
            ("held=maybe", "failed, loop or overdue"),
            ("state", "expected KEY=VALUE"),
            ("state=", "empty value"),
            ("metadata.=x", "unknown key"),
        ] {
            let e = Selector::parse(&[bad]).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_duration("2d").unwrap(), 172_800);
    }
}
