//! Runtime facts: what the service has observed about each host, as
//! opposed to what the operator configured in `known_hosts.json`. These are
//! the host's bootid (a secret), its install attempts, when and how it last
//! asked `/bootstrap`, and a hold that stops it from installing.
//!
//! They have one home and one mechanism: a [`RuntimeTable`] of one
//! [`HostRuntime`] per host id, changed only by [`Patch`]es. A patch names
//! a host and replaces whole fields of its record (absent: unchanged,
//! `null`: cleared); applying the patches of a log in order gives the
//! table. [`crate::store`] keeps that log on disk; everything here is
//! values in, values out.
//!
//! A record is joined to its host by id only. The store never hands out the
//! id of a host whose record still exists (see [`RuntimeTable::max_id`]),
//! so a removed host's facts cannot pass to a new one.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Install attempts kept per host; older ones live on in the event log.
pub const MAX_ATTEMPTS: usize = 8;
/// The longest failure reason kept, in characters.
pub const MAX_REASON: usize = 200;

/// How an install attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// `/finish` was called.
    Finished,
    /// `/fail` was called.
    Failed,
    /// The machine booted again without either: a new attempt began, the
    /// host was held, or an operator changed its state.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// One install boot: a fresh bootid for one state element.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Numbered per host from 1.
    pub n: u64,
    /// The state element (the image) being installed.
    pub state: String,
    /// The image's digest from its checksum file, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Unix seconds.
    pub started: u64,
    /// Minutes after `started` at which the attempt is overdue.
    pub deadline_minutes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the event log has recorded that the attempt is overdue.
    #[serde(default, skip_serializing_if = "is_false")]
    pub overdue_logged: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Attempt {
    pub fn is_open(&self) -> bool {
        self.outcome.is_none()
    }

    /// The unix second at which an open attempt becomes overdue.
    pub fn due(&self) -> u64 {
        self.started
            .saturating_add(self.deadline_minutes.saturating_mul(60))
    }

    pub fn is_overdue(&self, now: u64) -> bool {
        self.is_open() && now >= self.due()
    }

    /// Seconds from start to end (or to `now` while open).
    pub fn elapsed(&self, now: u64) -> u64 {
        self.ended.unwrap_or(now).saturating_sub(self.started)
    }

    fn close(&mut self, now: u64, outcome: Outcome, reason: Option<String>) {
        self.ended = Some(now);
        self.outcome = Some(outcome);
        self.reason = reason;
    }
}

/// When a host last asked `/bootstrap`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// Unix seconds.
    pub at: u64,
    /// iPXE's `${platform}` (`pcbios`, `efi`), empty if not reported.
    #[serde(default)]
    pub platform: String,
    /// The address it came from.
    #[serde(default)]
    pub remote: String,
}

/// Why a host is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldCause {
    /// The installed system or the installer reported a failure (`/fail`).
    Failed,
    /// It started `max_install_boots` attempts without a `/finish`.
    Loop,
    /// Its install ran past the deadline (with `hold_overdue`).
    Overdue,
}

impl HoldCause {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldCause::Failed => "failed",
            HoldCause::Loop => "loop",
            HoldCause::Overdue => "overdue",
        }
    }
}

/// A hold: the host keeps its state chain but `/bootstrap` never installs
/// it until `kiwispray-hosts release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    pub cause: HoldCause,
    /// Unix seconds.
    pub since: u64,
    /// One line for the console and `show`.
    pub reason: String,
}

/// Everything the service has observed about one host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRuntime {
    /// The secret of the install in progress; never shown or logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootid: Option<String>,
    /// The latest attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<Seen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// Attempts numbered up to this one do not count towards the loop
    /// breaker (set by a release and by a change of state).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub counted_after: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl HostRuntime {
    pub fn is_empty(&self) -> bool {
        *self == HostRuntime::default()
    }

    /// Whether an install is in progress: an open attempt whose bootid is
    /// not used up.
    pub fn is_installing(&self) -> bool {
        self.bootid.is_some() && self.open_attempt().is_some()
    }

    /// The attempt in progress, if any.
    pub fn open_attempt(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.is_open())
    }

    /// How many attempts in a row for `state`, since the last release or
    /// change of state, did not finish.
    pub fn unfinished_run(&self, state: &str) -> usize {
        self.attempts
            .iter()
            .rev()
            .take_while(|a| {
                a.n > self.counted_after && a.state == state && a.outcome != Some(Outcome::Finished)
            })
            .count()
    }

    /// Starts an attempt: the open one, if any, is abandoned.
    pub fn start_attempt(
        &mut self,
        now: u64,
        state: &str,
        digest: Option<String>,
        deadline_minutes: u64,
        bootid: String,
    ) -> &Attempt {
        self.abandon_open(now, None);
        let n = self.attempts.last().map_or(self.counted_after, |a| a.n) + 1;
        self.attempts.push(Attempt {
            n,
            state: state.to_string(),
            digest,
            started: now,
            deadline_minutes,
            ended: None,
            outcome: None,
            reason: None,
            overdue_logged: false,
        });
        if self.attempts.len() > MAX_ATTEMPTS {
            let cut = self.attempts.len() - MAX_ATTEMPTS;
            self.attempts.drain(..cut);
        }
        self.bootid = Some(bootid);
        self.attempts.last().expect("just pushed")
    }

    /// Ends the open attempt (if any) with `outcome` and uses up the
    /// bootid. Returns the attempt as it ended.
    pub fn end_attempt(
        &mut self,
        now: u64,
        outcome: Outcome,
        reason: Option<String>,
    ) -> Option<Attempt> {
        self.bootid = None;
        let open = self.attempts.last_mut().filter(|a| a.is_open())?;
        open.close(now, outcome, reason);
        Some(open.clone())
    }

    /// Abandons the open attempt, if any, and uses up the bootid.
    pub fn abandon_open(&mut self, now: u64, reason: Option<String>) -> Option<Attempt> {
        self.end_attempt(now, Outcome::Abandoned, reason)
    }

    /// Puts the host on hold, abandoning the open attempt.
    pub fn hold(&mut self, now: u64, cause: HoldCause, reason: String) {
        if cause != HoldCause::Failed {
            self.abandon_open(now, Some(format!("held: {}", cause.as_str())));
        }
        self.bootid = None;
        self.hold = Some(Hold {
            cause,
            since: now,
            reason: one_line(&reason, MAX_REASON),
        });
    }

    /// Clears the hold; earlier attempts no longer count towards the loop
    /// breaker. Returns the hold that was cleared.
    pub fn release(&mut self) -> Option<Hold> {
        self.reset_count();
        self.hold.take()
    }

    /// Makes earlier attempts not count towards the loop breaker.
    pub fn reset_count(&mut self) {
        self.counted_after = self.attempts.last().map_or(self.counted_after, |a| a.n);
    }
}

/// A change to one host's record: each field that is `Some` replaces the
/// record's field (`Some(None)`: clears it). The on-disk form is one JSON
/// object per line with `id` and the changed fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Patch {
    pub id: u64,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub bootid: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub attempts: Option<Option<Vec<Attempt>>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub seen: Option<Option<Seen>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold: Option<Option<Hold>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub counted_after: Option<Option<u64>>,
}

/// A field that is present in the JSON, `null` or not.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn changed<T: Clone + PartialEq>(
    old: &T,
    new: &T,
    empty: impl Fn(&T) -> bool,
) -> Option<Option<T>> {
    if old == new {
        None
    } else if empty(new) {
        Some(None)
    } else {
        Some(Some(new.clone()))
    }
}

impl Patch {
    /// The patch that turns `old` into `new` (`None` if they are equal).
    pub fn diff(id: u64, old: &HostRuntime, new: &HostRuntime) -> Option<Patch> {
        if old == new {
            return None;
        }
        Some(Patch {
            id,
            bootid: changed(&old.bootid, &new.bootid, Option::is_none).map(Option::flatten),
            attempts: changed(&old.attempts, &new.attempts, Vec::is_empty),
            seen: changed(&old.seen, &new.seen, Option::is_none).map(Option::flatten),
            hold: changed(&old.hold, &new.hold, Option::is_none).map(Option::flatten),
            counted_after: changed(&old.counted_after, &new.counted_after, |n| *n == 0),
        })
    }

    /// The patch that writes a whole record (for compaction).
    pub fn whole(id: u64, rt: &HostRuntime) -> Patch {
        Patch::diff(id, &HostRuntime::default(), rt).unwrap_or(Patch {
            id,
            ..Patch::default()
        })
    }

    /// Applies the patch to a record.
    pub fn apply(&self, rt: &mut HostRuntime) {
        if let Some(v) = &self.bootid {
            rt.bootid = v.clone();
        }
        if let Some(v) = &self.attempts {
            rt.attempts = v.clone().unwrap_or_default();
        }
        if let Some(v) = &self.seen {
            rt.seen = v.clone();
        }
        if let Some(v) = &self.hold {
            rt.hold = v.clone();
        }
        if let Some(v) = &self.counted_after {
            rt.counted_after = v.unwrap_or(0);
        }
    }

    /// Whether the patch must survive a crash once acknowledged: anything
    /// but a "last seen" time.
    pub fn durable(&self) -> bool {
        self.bootid.is_some()
            || self.attempts.is_some()
            || self.hold.is_some()
            || self.counted_after.is_some()
    }
}

/// How many shards the table is kept in: a change copies one shard.
const SHARDS: usize = 256;

/// One shard of a [`RuntimeTable`], shared by clones until one changes it.
type Shard = Arc<HashMap<u64, Arc<HostRuntime>>>;

/// The records of all hosts. Cheap to clone: the shards are shared until a
/// clone changes one.
#[derive(Debug, Clone)]
pub struct RuntimeTable {
    /// Shared by clones (a clone costs one reference count); a change
    /// copies the list of shards and the one shard it touches.
    shards: Arc<Vec<Shard>>,
    len: usize,
    max_id: u64,
    /// Records with an install in progress (see [`HostRuntime::is_installing`]).
    installing: usize,
}

impl Default for RuntimeTable {
    fn default() -> Self {
        RuntimeTable {
            shards: Arc::new((0..SHARDS).map(|_| Arc::new(HashMap::new())).collect()),
            len: 0,
            max_id: 0,
            installing: 0,
        }
    }
}

static EMPTY: HostRuntime = HostRuntime {
    bootid: None,
    attempts: Vec::new(),
    seen: None,
    hold: None,
    counted_after: 0,
};

impl RuntimeTable {
    fn shard(id: u64) -> usize {
        (id % SHARDS as u64) as usize
    }

    /// The record of a host (an empty one if it has none).
    pub fn get(&self, id: u64) -> &HostRuntime {
        self.shards[Self::shard(id)]
            .get(&id)
            .map_or(&EMPTY, |r| r.as_ref())
    }

    /// Applies a patch; a record left empty is dropped.
    pub fn apply(&mut self, patch: &Patch) {
        let shard = Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[Self::shard(patch.id)]);
        let mut rt = shard
            .get(&patch.id)
            .map(|r| (**r).clone())
            .unwrap_or_default();
        let was = rt.is_installing();
        patch.apply(&mut rt);
        match (was, rt.is_installing()) {
            (false, true) => self.installing += 1,
            (true, false) => self.installing -= 1,
            _ => {}
        }
        let had = if rt.is_empty() {
            shard.remove(&patch.id).is_some()
        } else {
            shard.insert(patch.id, Arc::new(rt)).is_some()
        };
        match (had, shard.contains_key(&patch.id)) {
            (false, true) => self.len += 1,
            (true, false) => self.len -= 1,
            _ => {}
        }
        if shard.contains_key(&patch.id) {
            self.max_id = self.max_id.max(patch.id);
        } else if patch.id == self.max_id {
            self.max_id = self.ids().max().unwrap_or(0);
        }
    }

    /// How many hosts have an install in progress: an open attempt and its
    /// bootid. What `max_installs` caps.
    pub fn installing(&self) -> usize {
        self.installing
    }

    /// How many hosts have a record.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The highest id with a record (0 if none). A new host gets an id
    /// above both this and the highest host id.
    pub fn max_id(&self) -> u64 {
        self.max_id
    }

    /// The ids with a record, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.shards.iter().flat_map(|s| s.keys().copied())
    }

    /// Every record with its id, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &HostRuntime)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(id, r)| (*id, r.as_ref())))
    }
}

/// `text` as one line of at most `max` characters: control characters
/// become spaces, runs of space are folded, and a cut is marked with `…`.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_end().to_string();
    if out.chars().count() > max {
        let mut cut: String = out.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        out
    }
}

/// The current time in unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A duration in seconds as `3 min`, `2 h 5 min`, `45 s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => match (secs % 3600) / 60 {
            0 => format!("{} h", secs / 3600),
            m => format!("{} h {m} min", secs / 3600),
        },
        _ => format!("{} d {} h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(rt: &mut HostRuntime, now: u64, state: &str) {
        rt.start_attempt(now, state, None, 60, format!("b{now}"));
    }

    #[test]
    fn patches_replace_whole_fields_and_round_trip() {
        let mut rt = HostRuntime::default();
        started(&mut rt, 100, "img");
        let p = Patch::diff(7, &HostRuntime::default(), &rt).unwrap();
        let line = serde_json::to_string(&p).unwrap();
        assert!(
            line.starts_with("{\"id\":7,\"bootid\":\"b100\",\"attempts\":[{"),
            "{line}"
        );
        assert!(
            !line.contains("seen"),
            "unchanged fields are absent: {line}"
        );
        let back: Patch = serde_json::from_str(&line).unwrap();
        assert_eq!(back, p);
        let mut table = RuntimeTable::default();
        table.apply(&back);
        assert_eq!(table.get(7), &rt);
        // Clearing the bootid writes null, and a record left empty is gone.
        let mut cleared = rt.clone();
        cleared.bootid = None;
        let p = Patch::diff(7, &rt, &cleared).unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            "{\"id\":7,\"bootid\":null}"
        );
        let back: Patch = serde_json::from_str("{\"id\":7,\"bootid\":null}").unwrap();
        assert_eq!(back.bootid, Some(None));
        table.apply(&back);
        assert_eq!(table.get(7).bootid, None);
        table.apply(&Patch::diff(7, table.get(7), &HostRuntime::default()).unwrap());
        assert!(table.is_empty());
        assert_eq!(table.max_id(), 0);
    }

    #[test]
    fn loop_count_runs_over_unfinished_attempts_of_one_state() {
        let mut rt = HostRuntime::default();
        started(&mut rt, 1, "img");
        started(&mut rt, 2, "img");
        assert_eq!(rt.attempts[0].outcome, Some(Outcome::Abandoned));
        assert_eq!(rt.unfinished_run("img"), 2);
        assert_eq!(rt.unfinished_run("other"), 0);
        rt.end_attempt(3, Outcome::Finished, None);
        assert_eq!(rt.unfinished_run("img"), 0);
        started(&mut rt, 4, "img");
        rt.hold(5, HoldCause::Loop, "x".into());
        assert_eq!(rt.bootid, None);
        assert!(rt.open_attempt().is_none());
        assert_eq!(rt.unfinished_run("img"), 1);
        assert!(rt.release().is_some());
        assert_eq!(
            rt.unfinished_run("img"),
            0,
            "a release starts the count anew"
        );
        for i in 0..20 {
            started(&mut rt, 10 + i, "img");
        }
        assert_eq!(rt.attempts.len(), MAX_ATTEMPTS);
        assert_eq!(rt.attempts.last().unwrap().n, 23);
    }

    #[test]
    fn overdue_is_measured_from_the_start() {
        let mut rt = HostRuntime::default();
        rt.start_attempt(1000, "img", Some("ab".into()), 2, "b".into());
        let a = rt.open_attempt().unwrap();
        assert!(!a.is_overdue(1119));
        assert!(a.is_overdue(1120));
        rt.end_attempt(1200, Outcome::Failed, Some("disk".into()));
        assert!(!rt.attempts[0].is_overdue(5000));
        assert_eq!(rt.attempts[0].elapsed(5000), 200);
    }

    #[test]
    fn reasons_are_one_bounded_line() {
        assert_eq!(one_line("a\nb\t\tc  ", 50), "a b c");
        assert_eq!(one_line(&"x".repeat(300), 10).chars().count(), 10);
        assert_eq!(human_duration(3 * 60 + 5), "3 min");
        assert_eq!(human_duration(7500), "2 h 5 min");
    }
}
