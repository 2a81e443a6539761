//! `GET /metrics`: the service's figures in the Prometheus text format
//! (version 0.0.4), for the operator's Prometheus; the web server configs
//! allow it from the local machine only, like `/hosts`. Changes nothing.
//!
//! Three sources, each chosen so that a figure survives handler restarts
//! and adds up across handler processes:
//!
//! - gauges from the database as it is now: hosts per current state
//!   (held hosts counted apart, by cause), installs in progress and
//!   overdue, hosts and file sizes;
//! - lifecycle counters from the event log, read incrementally (each
//!   process remembers how far it has read): events by cause, finishes and
//!   failures per image, and install durations per image (from the install
//!   boot to its `/finish`);
//! - counters kept by [`crate::metrics`] in the shared file beside the
//!   database: boots by outcome, requests by path and status, request and
//!   store commit latency.

use super::{log, Response, Service};
use crate::events::Event;
use crate::hosts::{current_state, Host};
use crate::lifecycle::{self, NextBoot};
use crate::metrics::{self as m, family, Kind};
use crate::runtime::{self, HostRuntime};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `path` label of a request: one of the handler's paths, else `other`.
pub fn path_label(path: &str) -> &'static str {
    if let Some(i) = path.find("/api/") {
        return match &path[i..] {
            "/api/v1/summary" => "/api/v1/summary",
            "/api/v1/hosts" => "/api/v1/hosts",
            p if p.starts_with("/api/v1/hosts/") => "/api/v1/hosts/{id}",
            _ => "other",
        };
    }
    match path.rsplit('/').next().unwrap_or("") {
        "bootstrap" => "/bootstrap",
        "post-install" => "/post-install",
        "finish" => "/finish",
        "fail" => "/fail",
        "state" => "/state",
        "update" => "/update",
        "hosts" => "/hosts",
        "metrics" => "/metrics",
        "kiwispray-error" => "/kiwispray-error",
        _ => "other",
    }
}

/// What a `/bootstrap` of a known host decided, as `kiwispray_boots_total`
/// names it.
pub fn boot_outcome(host: &Host, rt: &HostRuntime, registered: bool) -> &'static str {
    if registered {
        return "registered";
    }
    match lifecycle::next_boot(&host.state) {
        NextBoot::Wait => "wait",
        NextBoot::LocalDisk => "local_disk",
        NextBoot::Refuse(_) => "refused",
        NextBoot::Install(_) if rt.hold.is_some() => "held",
        NextBoot::Install(_) if rt.bootid.is_some() => "install",
        // A discover host without a bootid waits like a new one.
        NextBoot::Install(_) => "wait",
    }
}

/// How far this process has read the event log, and what it counted.
struct Scan {
    path: PathBuf,
    dev: u64,
    ino: u64,
    offset: u64,
    /// Each host's open install: image and start (unix seconds).
    open: HashMap<u64, (String, u64)>,
    counts: BTreeMap<String, f64>,
}

impl Scan {
    fn new(path: &Path, dev: u64, ino: u64) -> Scan {
        Scan {
            path: path.to_path_buf(),
            dev,
            ino,
            offset: 0,
            open: HashMap::new(),
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, e: &Event) {
        let image = m::escape(current_state(&e.from));
        m::add(
            &mut self.counts,
            m::series(
                "kiwispray_events_total",
                &format!("cause=\"{}\"", m::escape(&e.cause)),
            ),
            1.0,
        );
        let at = parse_rfc3339(&e.time);
        match e.cause.as_str() {
            "install-boot" => {
                if let Some(at) = at {
                    self.open.insert(e.host, (image, at));
                }
            }
            "finish" => {
                let labels = format!("image=\"{image}\"");
                m::add(
                    &mut self.counts,
                    m::series("kiwispray_installs_finished_total", &labels),
                    1.0,
                );
                if let (Some((img, start)), Some(at)) = (self.open.remove(&e.host), at) {
                    if img == image {
                        m::observe_into(
                            &mut self.counts,
                            "kiwispray_install_duration_seconds",
                            &labels,
                            m::INSTALL_BUCKETS,
                            at.saturating_sub(start) as f64,
                        );
                    }
                }
            }
            "fail" => {
                self.open.remove(&e.host);
                m::add(
                    &mut self.counts,
                    m::series(
                        "kiwispray_installs_failed_total",
                        &format!("image=\"{image}\""),
                    ),
                    1.0,
                );
            }
            "hold" | "cli" | "update" | "release" => {
                self.open.remove(&e.host);
            }
            _ => {}
        }
    }
}

static SCAN: Mutex<Option<Scan>> = Mutex::new(None);

/// The lifecycle counters of the event log at `path`, reading only what
/// was appended since the last call. A log that was replaced or shrank is
/// read again from the start.
fn event_counts(path: &Path) -> BTreeMap<String, f64> {
    let mut guard = super::lock(&SCAN);
    let Ok(meta) = std::fs::metadata(path) else {
        return BTreeMap::new();
    };
    let stale = guard.as_ref().is_none_or(|s| {
        s.path != path || s.dev != meta.dev() || s.ino != meta.ino() || s.offset > meta.len()
    });
    if stale {
        *guard = Some(Scan::new(path, meta.dev(), meta.ino()));
    }
    let scan = guard.as_mut().expect("just set");
    if scan.offset < meta.len() {
        let mut buf = Vec::new();
        let read = std::fs::File::open(path).and_then(|mut f| {
            f.seek(SeekFrom::Start(scan.offset))?;
            f.take(meta.len() - scan.offset).read_to_end(&mut buf)
        });
        if let Err(e) = read {
            log(&format!("cannot read {}: {e}", path.display()));
        }
        // Complete lines only; a line being appended is read next time.
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in buf[..end].split(|b| *b == b'\n') {
            if let Ok(e) = serde_json::from_slice::<Event>(line) {
                scan.count(&e);
            }
        }
        scan.offset += end as u64;
    }
    scan.counts.clone()
}

/// `2026-11-27T14:03:07Z` as unix seconds.
pub fn parse_rfc3339(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from civil (after H. Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).ok()
}

impl Service {
    pub(super) fn metrics(&self) -> Result<Response, Response> {
        let snap = self.snapshot()?;
        let now = runtime::now();
        let mut gauges: BTreeMap<String, f64> = BTreeMap::new();
        let (mut hosts, mut installing) = (0u64, 0u64);
        for h in snap.hosts() {
            hosts += 1;
            let rt = snap.runtime(h.id);
            if lifecycle::installing(&h, rt) {
                installing += 1;
            }
            let key = match &rt.hold {
                Some(hold) => m::series(
                    "kiwispray_hosts_held",
                    &format!("cause=\"{}\"", hold.cause.as_str()),
                ),
                None => m::series(
                    "kiwispray_hosts",
                    &format!("state=\"{}\"", m::escape(h.current_state())),
                ),
            };
            m::add(&mut gauges, key, 1.0);
        }
        let overdue = super::overdue::overdue(&snap.db, &snap.rt, now).len();
        drop(snap);
        for cause in ["failed", "loop", "overdue"] {
            gauges
                .entry(m::series(
                    "kiwispray_hosts_held",
                    &format!("cause=\"{cause}\""),
                ))
                .or_insert(0.0);
        }
        gauges.insert("kiwispray_database_hosts".into(), hosts as f64);
        gauges.insert("kiwispray_installs_in_progress".into(), installing as f64);
        gauges.insert("kiwispray_installs_overdue".into(), overdue as f64);
        for (file, path) in [
            ("hosts", self.store.path()),
            ("runtime", self.store.runtime_log_path()),
            ("events", self.store.events_path()),
        ] {
            let size = std::fs::metadata(path).map_or(0, |md| md.len());
            gauges.insert(
                m::series("kiwispray_database_size_bytes", &format!("file=\"{file}\"")),
                size as f64,
            );
        }

        let mut counters = m::flush(&self.metrics_file()).unwrap_or_else(|e| {
            log(&format!(
                "cannot read metrics from {}: {e}",
                self.metrics_file().display()
            ));
            BTreeMap::new()
        });
        for outcome in m::BOOT_OUTCOMES {
            counters
                .entry(m::series(
                    "kiwispray_boots_total",
                    &format!("outcome=\"{outcome}\""),
                ))
                .or_insert(0.0);
        }
        let events = event_counts(self.store.events_path());

        let mut out = String::with_capacity(8192);
        let g = Kind::Gauge;
        family(
            &mut out,
            "kiwispray_hosts",
            g,
            "Hosts that are not held, by the first element of their state chain.",
            &gauges,
            &[],
        );
        family(
            &mut out,
            "kiwispray_hosts_held",
            g,
            "Held hosts (no install until kiwispray-hosts release), by cause.",
            &gauges,
            &[],
        );
        family(
            &mut out,
            "kiwispray_database_hosts",
            g,
            "Hosts in the database.",
            &gauges,
            &[],
        );
        family(
            &mut out,
            "kiwispray_installs_in_progress",
            g,
            "Hosts being installed (an image state and an active bootid).",
            &gauges,
            &[],
        );
        family(
            &mut out,
            "kiwispray_installs_overdue",
            g,
            "Installs still open after their deadline.",
            &gauges,
            &[],
        );
        family(
            &mut out,
            "kiwispray_database_size_bytes",
            g,
            "Size of the database files: hosts (known_hosts.json), runtime log, event log.",
            &gauges,
            &[],
        );
        let c = Kind::Counter;
        family(
            &mut out,
            "kiwispray_boots_total",
            c,
            "Requests of /bootstrap by what they decided (all handler processes).",
            &counters,
            &[],
        );
        family(
            &mut out,
            "kiwispray_http_requests_total",
            c,
            "Requests answered by the handler, by path and status (all handler processes).",
            &counters,
            &[],
        );
        family(
            &mut out,
            "kiwispray_http_request_duration_seconds",
            Kind::Histogram,
            "Time the handler took to answer a request, by path (all handler processes).",
            &counters,
            m::REQUEST_BUCKETS,
        );
        family(
            &mut out,
            "kiwispray_store_commit_duration_seconds",
            Kind::Histogram,
            "Time of one database commit by the handler: lock, read, write, sync.",
            &counters,
            m::COMMIT_BUCKETS,
        );
        family(
            &mut out,
            "kiwispray_events_total",
            c,
            "Lines of the event log, by cause.",
            &events,
            &[],
        );
        family(
            &mut out,
            "kiwispray_installs_finished_total",
            c,
            "Installs that reported /finish, by image (from the event log).",
            &events,
            &[],
        );
        family(
            &mut out,
            "kiwispray_installs_failed_total",
            c,
            "Installs that reported /fail, by image (from the event log).",
            &events,
            &[],
        );
        family(
            &mut out,
            "kiwispray_install_duration_seconds",
            Kind::Histogram,
            "Time from an install boot to its /finish, by image (from the event log).",
            &events,
            m::INSTALL_BUCKETS,
        );
        let mut r = Response::text(200, out);
        r.headers = vec![(
            "Content-Type",
            "text/plain; version=0.0.4; charset=utf-8".into(),
        )];
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for secs in [0u64, 951_782_400 + 3661, 1_795_788_187] {
            assert_eq!(
                parse_rfc3339(&crate::events::rfc3339_secs(secs)),
                Some(secs)
            );
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn path_labels_are_few() {
        assert_eq!(path_label("/bootstrap"), "/bootstrap");
        assert_eq!(path_label("/cgi-bin/ks/finish"), "/finish");
        assert_eq!(path_label("/api/v1/hosts/17"), "/api/v1/hosts/{id}");
        assert_eq!(path_label("/whatever/../x"), "other");
    }
}
