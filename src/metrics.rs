//! Prometheus counters and histograms that survive restarts and add up
//! across handler processes: requests by path and status, request latency,
//! boots by outcome and store commit latency. Each process counts in memory
//! ([`count_request`], [`count_boot`], [`observe_commit`]) and adds what it
//! counted to one shared file beside the database,
//! `.known_hosts.json.metrics` (a JSON object of series to totals), under an
//! exclusive lock: at least every [`FLUSH_INTERVAL`] in a FastCGI process,
//! before a CGI process writes its answer, and before every `/metrics`
//! answer. So a socket-activated restart, lighttpd's spawned processes and
//! CGI all count into the same totals, and a scrape sees every process's
//! requests up to its last flush (at most [`FLUSH_INTERVAL`] behind, and
//! what a killed process had not flushed is lost). Deleting the file resets
//! the counters, which Prometheus treats as any counter reset.
//!
//! Lifecycle counters (finishes, failures, install durations) are not kept
//! here: [`crate::api`] derives them from the event log, which is their
//! record anyway.
//!
//! This module also renders the text exposition format (version 0.0.4).

use fs2::FileExt;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a FastCGI process keeps counts in memory at most.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Upper bounds (seconds) of the request latency buckets.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the store commit latency buckets.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds (seconds) of the install duration buckets: 1 min to 4 h.
pub const INSTALL_BUCKETS: &[f64] = &[
    60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0, 7200.0, 14400.0,
];

/// The boot outcomes counted by `kiwispray_boots_total`.
pub const BOOT_OUTCOMES: &[&str] = &[
    "registered",
    "wait",
    "install",
    "local_disk",
    "conflict",
    "held",
    "refused",
    "deferred",
];

/// Counts of this process not yet added to the shared file: series (as
/// written in the exposition, e.g. `name{a="b"}`) to increments.
static PENDING: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());
static LAST_FLUSH: Mutex<Option<Instant>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A label value escaped for the exposition format.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `name{labels}`, or `name` without labels.
pub fn series(name: &str, labels: &str) -> String {
    if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    }
}

/// Adds to a counter in `map`.
pub fn add(map: &mut BTreeMap<String, f64>, key: String, v: f64) {
    *map.entry(key).or_insert(0.0) += v;
}

/// Records one observation of histogram `name` with `labels` into `map`:
/// the cumulative buckets, `_sum` and `_count`.
pub fn observe_into(
    map: &mut BTreeMap<String, f64>,
    name: &str,
    labels: &str,
    buckets: &[f64],
    value: f64,
) {
    for b in buckets.iter().filter(|b| value <= **b) {
        add(map, bucket_key(name, labels, &fmt_f64(*b)), 1.0);
    }
    add(map, bucket_key(name, labels, "+Inf"), 1.0);
    add(map, series(&format!("{name}_sum"), labels), value);
    add(map, series(&format!("{name}_count"), labels), 1.0);
}

fn bucket_key(name: &str, labels: &str, le: &str) -> String {
    let sep = if labels.is_empty() { "" } else { "," };
    format!("{name}_bucket{{{labels}{sep}le=\"{le}\"}}")
}

/// A number as the exposition writes it.
pub fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.is_nan() {
        "NaN".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Requests counted since the last flush, kept without strings so that
/// counting costs a few comparisons on the request path.
struct Requests {
    /// (path, status, count)
    counts: Vec<(&'static str, u16, u64)>,
    latency: Vec<Latency>,
    /// (boot outcome, count)
    boots: Vec<(&'static str, u64)>,
}

struct Latency {
    path: &'static str,
    /// Cumulative, per bound of [`REQUEST_BUCKETS`].
    buckets: [u64; REQUEST_BUCKETS.len()],
    count: u64,
    sum: f64,
}

static REQUESTS: Mutex<Requests> = Mutex::new(Requests {
    counts: Vec::new(),
    latency: Vec::new(),
    boots: Vec::new(),
});

/// Counts a request the handler answered, with its latency. `path` is one
/// of the handler's paths (or `other`), so the label set stays small.
pub fn count_request(path: &'static str, status: u16, seconds: f64) {
    let mut r = lock(&REQUESTS);
    match r
        .counts
        .iter_mut()
        .find(|(p, s, _)| *p == path && *s == status)
    {
        Some(c) => c.2 += 1,
        None => r.counts.push((path, status, 1)),
    }
    let i = match r.latency.iter().position(|l| l.path == path) {
        Some(i) => i,
        None => {
            r.latency.push(Latency {
                path,
                buckets: [0; REQUEST_BUCKETS.len()],
                count: 0,
                sum: 0.0,
            });
            r.latency.len() - 1
        }
    };
    let l = &mut r.latency[i];
    for (n, b) in l.buckets.iter_mut().zip(REQUEST_BUCKETS) {
        if seconds <= *b {
            *n += 1;
        }
    }
    l.count += 1;
    l.sum += seconds;
}

/// Moves the counted requests into the pending series.
fn absorb_requests() {
    absorb_commits();
    let (counts, latency, boots) = {
        let mut r = lock(&REQUESTS);
        (
            std::mem::take(&mut r.counts),
            std::mem::take(&mut r.latency),
            std::mem::take(&mut r.boots),
        )
    };
    if counts.is_empty() && latency.is_empty() && boots.is_empty() {
        return;
    }
    let mut p = lock(&PENDING);
    for (outcome, n) in boots {
        let labels = format!("outcome=\"{}\"", escape(outcome));
        add(&mut p, series("kiwispray_boots_total", &labels), n as f64);
    }
    for (path, status, n) in counts {
        let labels = format!("path=\"{}\",status=\"{status}\"", escape(path));
        add(
            &mut p,
            series("kiwispray_http_requests_total", &labels),
            n as f64,
        );
    }
    let name = "kiwispray_http_request_duration_seconds";
    for l in latency {
        let labels = format!("path=\"{}\"", escape(l.path));
        for (n, b) in l.buckets.iter().zip(REQUEST_BUCKETS) {
            if *n > 0 {
                add(&mut p, bucket_key(name, &labels, &fmt_f64(*b)), *n as f64);
            }
        }
        add(&mut p, bucket_key(name, &labels, "+Inf"), l.count as f64);
        add(&mut p, series(&format!("{name}_sum"), &labels), l.sum);
        add(
            &mut p,
            series(&format!("{name}_count"), &labels),
            l.count as f64,
        );
    }
}

/// Counts a `/bootstrap` by what it decided (one of [`BOOT_OUTCOMES`]).
pub fn count_boot(outcome: &'static str) {
    // Counted like requests, without building the series name each time.
    let mut r = lock(&REQUESTS);
    match r.boots.iter_mut().find(|(o, _)| *o == outcome) {
        Some(c) => c.1 += 1,
        None => r.boots.push((outcome, 1)),
    }
}

/// Records how long one commit of the store took (lock, read, write, sync).
pub fn observe_commit(seconds: f64) {
    // Counted per bucket here; the series are named when they are absorbed.
    let mut c = lock(&COMMITS);
    for (n, b) in c.buckets.iter_mut().zip(COMMIT_BUCKETS) {
        if seconds <= *b {
            *n += 1;
        }
    }
    c.count += 1;
    c.sum += seconds;
}

/// Commit durations since they were last absorbed: per bound of
/// [`COMMIT_BUCKETS`] (cumulative), their number and sum.
struct Commits {
    buckets: [u64; COMMIT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

static COMMITS: Mutex<Commits> = Mutex::new(Commits {
    buckets: [0; COMMIT_BUCKETS.len()],
    count: 0,
    sum: 0.0,
});

/// Moves the commit durations into the pending counts.
fn absorb_commits() {
    let c = std::mem::replace(
        &mut *lock(&COMMITS),
        Commits {
            buckets: [0; COMMIT_BUCKETS.len()],
            count: 0,
            sum: 0.0,
        },
    );
    if c.count == 0 {
        return;
    }
    let name = "kiwispray_store_commit_duration_seconds";
    let mut p = lock(&PENDING);
    for (n, b) in c.buckets.iter().zip(COMMIT_BUCKETS) {
        if *n > 0 {
            add(&mut p, bucket_key(name, "", &fmt_f64(*b)), *n as f64);
        }
    }
    add(&mut p, bucket_key(name, "", "+Inf"), c.count as f64);
    add(&mut p, series(&format!("{name}_sum"), ""), c.sum);
    add(&mut p, series(&format!("{name}_count"), ""), c.count as f64);
}

/// The shared counter file of the database at `db`.
pub fn file_for(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "known_hosts.json".into());
    db.with_file_name(format!(".{name}.metrics"))
}

/// Adds this process's pending counts to `file` and returns the totals.
/// On failure the counts stay pending for the next try.
pub fn flush(file: &Path) -> io::Result<BTreeMap<String, f64>> {
    absorb_requests();
    let pending = std::mem::take(&mut *lock(&PENDING));
    *lock(&LAST_FLUSH) = Some(Instant::now());
    match merge_into(file, &pending) {
        Ok(totals) => Ok(totals),
        Err(e) => {
            let mut p = lock(&PENDING);
            for (k, v) in pending {
                add(&mut p, k, v);
            }
            Err(e)
        }
    }
}

/// Adds this process's pending counts to `file`, if it has any (a CGI
/// process before it answers).
pub fn save(file: &Path) -> io::Result<()> {
    absorb_requests();
    if lock(&PENDING).is_empty() {
        return Ok(());
    }
    flush(file).map(|_| ())
}

/// Flushes if [`FLUSH_INTERVAL`] has passed since the last flush and there
/// is something to add.
pub fn flush_if_due(file: &Path) {
    let due = lock(&LAST_FLUSH).is_none_or(|t| t.elapsed() >= FLUSH_INTERVAL);
    if !due {
        return;
    }
    absorb_requests();
    if !lock(&PENDING).is_empty() {
        if let Err(e) = flush(file) {
            crate::api::log(&format!("cannot save metrics to {}: {e}", file.display()));
        }
    }
}

/// Starts a thread that flushes every [`FLUSH_INTERVAL`], so an idle
/// FastCGI process does not sit on its counts.
pub fn start_flusher(file: PathBuf) {
    let started = std::thread::Builder::new()
        .name("kiwispray-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(FLUSH_INTERVAL / 4);
            flush_if_due(&file);
        });
    if let Err(e) = started {
        crate::api::log(&format!("cannot start the metrics flusher: {e}"));
    }
}

fn merge_into(file: &Path, pending: &BTreeMap<String, f64>) -> io::Result<BTreeMap<String, f64>> {
    let lock_path = PathBuf::from(format!("{}.lock", file.display()));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    lock_file.lock_exclusive()?;
    let mut totals: BTreeMap<String, f64> = match fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            crate::api::log(&format!(
                "{} does not parse ({e}); the counters start again from 0",
                file.display()
            ));
            BTreeMap::new()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(e),
    };
    if pending.is_empty() {
        return Ok(totals);
    }
    for (k, v) in pending {
        add(&mut totals, k.clone(), *v);
    }
    let tmp = PathBuf::from(format!("{}.tmp", file.display()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&totals).map_err(io::Error::other)?)?;
    drop(f);
    fs::rename(&tmp, file)?;
    drop(lock_file);
    Ok(totals)
}

/// What a metric family is, for its `# TYPE` line.
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Writes a metric family: its `# HELP` and `# TYPE` lines and every
/// series of `values` that belongs to it. A histogram's buckets come out in
/// the order of `buckets`, each label set complete.
pub fn family(
    out: &mut String,
    name: &str,
    kind: Kind,
    help: &str,
    values: &BTreeMap<String, f64>,
    buckets: &[f64],
) {
    let type_name = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    };
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {type_name}");
    if kind != Kind::Histogram {
        for (k, v) in values {
            let base = k.split('{').next().unwrap_or("");
            if base == name {
                let _ = writeln!(out, "{k} {}", fmt_f64(*v));
            }
        }
        return;
    }
    let count = format!("{name}_count");
    for (k, c) in values {
        let (base, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
        if base != count {
            continue;
        }
        let labels = rest.strip_suffix('}').unwrap_or("");
        for b in buckets
            .iter()
            .map(|b| fmt_f64(*b))
            .chain(["+Inf".to_string()])
        {
            let key = bucket_key(name, labels, &b);
            let v = values.get(&key).copied().unwrap_or(0.0);
            let _ = writeln!(out, "{key} {}", fmt_f64(v));
        }
        let sum = values
            .get(&series(&format!("{name}_sum"), labels))
            .copied()
            .unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{} {}",
            series(&format!("{name}_sum"), labels),
            fmt_f64(sum)
        );
        let _ = writeln!(out, "{} {}", series(&count, labels), fmt_f64(*c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_complete() {
        let mut m = BTreeMap::new();
        observe_into(&mut m, "h", "a=\"x\"", &[1.0, 2.0], 1.5);
        observe_into(&mut m, "h", "a=\"x\"", &[1.0, 2.0], 0.5);
        let mut out = String::new();
        family(&mut out, "h", Kind::Histogram, "test", &m, &[1.0, 2.0]);
        assert_eq!(
            out,
            "# HELP h test\n# TYPE h histogram\nh_bucket{a=\"x\",le=\"1\"} 1\n\
             h_bucket{a=\"x\",le=\"2\"} 2\nh_bucket{a=\"x\",le=\"+Inf\"} 2\n\
             h_sum{a=\"x\"} 2\nh_count{a=\"x\"} 2\n"
        );
    }

    #[test]
    fn flushes_add_up_in_the_shared_file() {
        let dir = std::env::temp_dir().join(format!("ks-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = file_for(&dir.join("known_hosts.json"));
        let _ = fs::remove_file(&file);
        let mut a = BTreeMap::new();
        add(&mut a, "c".into(), 2.0);
        merge_into(&file, &a).unwrap();
        let totals = merge_into(&file, &a).unwrap();
        assert_eq!(totals.get("c"), Some(&4.0));
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
