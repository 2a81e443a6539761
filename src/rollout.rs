//! Rollouts as pure values: a list of hosts installed in waves of a fixed
//! size, the record of which waves have started, and what each host's
//! configuration and runtime facts say about its progress. Persisting the
//! record and setting states belong to `kiwispray-hosts rollout`.
//!
//! A host of a wave is *done* once its state chain has run out (it is
//! `finished`), *failed* once it is held (a `/fail`, a loop, an overdue
//! hold) or its install is overdue, *left* if someone set it to a state
//! that is not part of the rollout's chain, and *pending* otherwise. A wave
//! is complete when none of its hosts is pending.

use crate::hosts::{Host, STATE_FINISHED};
use crate::lifecycle;
use crate::runtime::HostRuntime;
use serde::{Deserialize, Serialize};

/// One wave: its hosts and when it was started (unix seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub hosts: Vec<u64>,
    pub started: u64,
}

/// A rollout, as kept in the deployment root between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The `--where` expression the hosts were chosen by.
    pub selector: String,
    /// The state chain each host is set to.
    pub state: String,
    pub batch: usize,
    /// Stop once this many hosts have failed (`None`: never).
    pub max_failures: Option<usize>,
    /// Every host of the rollout, in the order they are installed.
    pub hosts: Vec<u64>,
    pub waves: Vec<Wave>,
    /// Unix seconds.
    pub created: u64,
    /// Each wave is kicked through its BMCs (`--power-cycle`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub power_cycle: bool,
}

/// Where one host of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Not in a wave yet.
    Waiting,
    /// In a wave, installing or about to.
    Pending,
    Done,
    Failed,
    /// Set to a state outside the rollout by someone else.
    Left,
    /// Removed from the database.
    Gone,
}

impl Progress {
    pub fn as_str(self) -> &'static str {
        match self {
            Progress::Waiting => "waiting",
            Progress::Pending => "installing",
            Progress::Done => "finished",
            Progress::Failed => "failed",
            Progress::Left => "left",
            Progress::Gone => "gone",
        }
    }
}

/// Whether `state` is what `chain` becomes after some `/finish`es.
fn is_suffix_of(state: &str, chain: &str) -> bool {
    let mut c = chain.to_string();
    loop {
        if c == state {
            return true;
        }
        if c == STATE_FINISHED {
            return false;
        }
        c = lifecycle::advance(&c);
    }
}

/// The progress of one host that is in a wave.
pub fn host_progress(chain: &str, host: Option<&Host>, rt: &HostRuntime, now: u64) -> Progress {
    let Some(host) = host else {
        return Progress::Gone;
    };
    if host.state == STATE_FINISHED {
        return Progress::Done;
    }
    if !is_suffix_of(&host.state, chain) {
        return Progress::Left;
    }
    if rt.hold.is_some() || lifecycle::overdue_attempt(host, rt, now).is_some() {
        return Progress::Failed;
    }
    Progress::Pending
}

/// What a rollout does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Wait for the current wave.
    Wait,
    /// Start a wave with these hosts.
    Start(Vec<u64>),
    /// Stop: too many failures.
    Stop(usize),
    /// Every wave is complete.
    Complete,
}

impl Rollout {
    /// The hosts of the waves started so far.
    pub fn started(&self) -> impl Iterator<Item = u64> + '_ {
        self.waves.iter().flat_map(|w| w.hosts.iter().copied())
    }

    /// Decides the next step from the progress of the started hosts.
    pub fn next_step(&self, progress: &dyn Fn(u64) -> Progress) -> Step {
        let failed = self
            .started()
            .filter(|id| progress(*id) == Progress::Failed)
            .count();
        if let Some(max) = self.max_failures {
            if failed >= max {
                return Step::Stop(failed);
            }
        }
        if self
            .waves
            .last()
            .is_some_and(|w| w.hosts.iter().any(|id| progress(*id) == Progress::Pending))
        {
            return Step::Wait;
        }
        let started = self.started().count();
        if started >= self.hosts.len() {
            return Step::Complete;
        }
        let end = (started + self.batch.max(1)).min(self.hosts.len());
        Step::Start(self.hosts[started..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rollout(n: u64, batch: usize, max: Option<usize>) -> Rollout {
        Rollout {
            selector: "state=new".into(),
            state: "wipe,img".into(),
            batch,
            max_failures: max,
            hosts: (1..=n).collect(),
            waves: Vec::new(),
            created: 0,
            power_cycle: false,
        }
    }

    #[test]
    fn waves_start_when_the_last_one_is_complete_and_stop_at_max_failures() {
        let mut r = rollout(5, 2, Some(2));
        let mut p: HashMap<u64, Progress> = HashMap::new();
        let get = |p: &HashMap<u64, Progress>| {
            let p = p.clone();
            move |id: u64| *p.get(&id).unwrap_or(&Progress::Waiting)
        };
        assert_eq!(r.next_step(&get(&p)), Step::Start(vec![1, 2]));
        r.waves.push(Wave {
            hosts: vec![1, 2],
            started: 0,
        });
        p.insert(1, Progress::Pending);
        p.insert(2, Progress::Done);
        assert_eq!(r.next_step(&get(&p)), Step::Wait);
        p.insert(1, Progress::Failed);
        assert_eq!(r.next_step(&get(&p)), Step::Start(vec![3, 4]));
        r.waves.push(Wave {
            hosts: vec![3, 4],
            started: 0,
        });
        p.insert(3, Progress::Pending);
        p.insert(4, Progress::Failed);
        assert_eq!(r.next_step(&get(&p)), Step::Stop(2));
        r.max_failures = Some(5);
        assert_eq!(r.next_step(&get(&p)), Step::Wait);
        p.insert(3, Progress::Left);
        assert_eq!(r.next_step(&get(&p)), Step::Start(vec![5]));
        r.waves.push(Wave {
            hosts: vec![5],
            started: 0,
        });
        p.insert(5, Progress::Done);
        assert_eq!(r.next_step(&get(&p)), Step::Complete);
    }

    #[test]
    fn a_host_is_done_when_its_chain_has_run_out() {
        let rt = HostRuntime::default();
        let h = |state: &str| Host::new(1, &[], "S", "", state);
        assert_eq!(
            host_progress("wipe,img", Some(&h("wipe,img")), &rt, 0),
            Progress::Pending
        );
        assert_eq!(
            host_progress("wipe,img", Some(&h("img")), &rt, 0),
            Progress::Pending
        );
        assert_eq!(
            host_progress("wipe,img", Some(&h("finished")), &rt, 0),
            Progress::Done
        );
        assert_eq!(
            host_progress("wipe,img", Some(&h("new")), &rt, 0),
            Progress::Left
        );
        assert_eq!(host_progress("wipe,img", None, &rt, 0), Progress::Gone);
        let mut held = HostRuntime::default();
        held.hold(0, crate::runtime::HoldCause::Failed, "x".into());
        assert_eq!(
            host_progress("img", Some(&h("img")), &held, 0),
            Progress::Failed
        );
    }
}
