//! How the CLI shows hosts to a person and to scripts: aligned tables,
//! control characters made visible, the STATUS and "last seen" texts, event
//! lines; the `--json` form of a host is [`crate::view`]'s, shared with the
//! HTTP API. Used by `list`, `show`, `history` and `release`.

pub use crate::view::{host_json, runtime_json};

use crate::events::Event;
use crate::hosts::Host;
use crate::lifecycle;
use crate::runtime::{human_duration, HostRuntime};
use serde_json::{Map, Value};

pub fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// What a table cell shows of a text: control characters made visible.
pub fn cell(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// One short word or phrase for `list`: held, overdue, installing.
pub fn status(host: &Host, rt: &HostRuntime, now: u64) -> String {
    if let Some(h) = &rt.hold {
        return format!(
            "HELD ({}) {}",
            h.cause.as_str(),
            human_duration(now.saturating_sub(h.since))
        );
    }
    if let Some(a) = lifecycle::overdue_attempt(host, rt, now) {
        return format!(
            "OVERDUE {} (attempt {}, deadline {} min)",
            human_duration(a.elapsed(now)),
            a.n,
            a.deadline_minutes
        );
    }
    if lifecycle::installing(host, rt) {
        if let Some(a) = rt.open_attempt() {
            return format!(
                "installing {} (attempt {})",
                human_duration(a.elapsed(now)),
                a.n
            );
        }
        return "installing".into();
    }
    "-".into()
}

/// "3 min ago (efi)" for `list -v` and `show`.
pub fn seen_text(rt: &HostRuntime, now: u64) -> String {
    match &rt.seen {
        None => "-".into(),
        Some(s) => {
            let mut t = format!("{} ago", human_duration(now.saturating_sub(s.at)));
            if !s.platform.is_empty() {
                t.push_str(&format!(" ({})", cell(&s.platform)));
            }
            t
        }
    }
}

pub fn tree(out: &mut String, v: &Map<String, Value>, depth: usize) {
    for (k, v) in v {
        let pad = "  ".repeat(depth + 1);
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push_str(&format!("{pad}{k}:\n"));
                tree(out, m, depth + 1);
            }
            Value::String(s) => out.push_str(&format!("{pad}{k}: {}\n", cell(s))),
            other => out.push_str(&format!("{pad}{k}: {other}\n")),
        }
    }
}

pub fn event_line(e: &Event) -> String {
    let change = if e.from == e.to {
        format!("{} (unchanged state)", cell(&e.to))
    } else if e.from.is_empty() {
        format!("-> {}", cell(&e.to))
    } else {
        format!("{} -> {}", cell(&e.from), cell(&e.to))
    };
    let remote = if e.remote.is_empty() {
        String::new()
    } else {
        format!(" from {}", cell(&e.remote))
    };
    let remote = if e.via.is_empty() {
        remote
    } else {
        format!("{remote} via edge {}", cell(&e.via))
    };
    let detail = if e.detail.is_empty() {
        String::new()
    } else {
        format!(": {}", cell(&e.detail))
    };
    format!(
        "{}  host {}  {:<12} {change}{remote}{detail}",
        e.time, e.host, e.cause
    )
}
