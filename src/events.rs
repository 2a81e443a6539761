//! The event log: one JSON object per line, appended beside the database
//! for every registration, install boot and state change, so an operator can
//! tell what happened to a machine and when. Appends are single `write`
//! calls on a file opened with `O_APPEND`, so lines from several processes
//! never interleave.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// UTC, RFC 3339, e.g. `2026-11-27T14:03:07Z`.
    pub time: String,
    pub host: u64,
    /// The state chain before; empty for a registration.
    pub from: String,
    /// The state chain after.
    pub to: String,
    /// What caused it: `register`, `install-boot`, `finish`, `fail`,
    /// `hold`, `release`, `overdue`, `update`, `cli`, ...
    pub cause: String,
    /// The address of the machine or web client that caused it, if known.
    /// Behind an edge server listed in `trusted_proxies`, the machine's own
    /// address as the edge reported it.
    #[serde(default)]
    pub remote: String,
    /// The edge server (a trusted proxy) the request came through; empty
    /// for a request that reached the central server directly.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    /// What else there is to say, in one line: the attempt and image of an
    /// install boot, the outcome and duration of a finish, the reason of a
    /// failure or hold. Never a secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Event {
    pub fn now(host: u64, from: &str, to: &str, cause: &str, remote: &str) -> Event {
        Event {
            time: rfc3339(SystemTime::now()),
            host,
            from: from.to_string(),
            to: to.to_string(),
            cause: cause.to_string(),
            remote: remote.to_string(),
            via: String::new(),
            detail: String::new(),
        }
    }

    /// The event with the edge server its request came through.
    pub fn via(mut self, edge: &str) -> Event {
        self.via = edge.to_string();
        self
    }

    /// The event with a detail line.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = detail.into();
        self
    }
}

/// Appends events, one line each, in a single write.
pub fn append(path: &Path, events: &[Event]) -> io::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::with_capacity(events.len() * 128);
    for e in events {
        serde_json::to_writer(&mut buf, e).map_err(io::Error::other)?;
        buf.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&buf)
}

/// Reads the event log, skipping (and counting) lines that do not parse.
/// A missing log is an empty one.
pub fn read(path: &Path, host: Option<u64>) -> io::Result<(Vec<Event>, usize)> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut events = Vec::new();
    let mut bad = 0;
    for line in io::BufReader::new(f).split(b'\n') {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Event>(&line) {
            Ok(e) if host.is_none_or(|h| h == e.host) => events.push(e),
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    Ok((events, bad))
}

/// Formats a time as RFC 3339 in UTC with whole seconds.
pub fn rfc3339(t: SystemTime) -> String {
    rfc3339_secs(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Unix seconds as UTC in RFC 3339.
pub fn rfc3339_secs(secs: u64) -> String {
    let secs = secs.min(i64::MAX as u64) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (after H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661);
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_788_187);
        assert_eq!(rfc3339(t), "2026-11-27T14:03:07Z");
    }

    #[test]
    fn append_and_read_back() {
        let dir = std::env::temp_dir().join(format!("ks-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        append(&path, &[Event::now(1, "", "new", "register", "10.0.0.5")]).unwrap();
        append(&path, &[Event::now(2, "new", "img", "cli", "")]).unwrap();
        append(
            &path,
            &[Event::now(2, "img", "img", "finish", "10.0.1.5").via("10.0.0.2")],
        )
        .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        let (all, bad) = read(&path, None).unwrap();
        assert_eq!((all.len(), bad), (3, 1));
        let (two, _) = read(&path, Some(2)).unwrap();
        assert_eq!(two[0].to, "img");
        assert_eq!((two[0].via.as_str(), two[1].via.as_str()), ("", "10.0.0.2"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().next().is_some_and(|l| !l.contains("via")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
