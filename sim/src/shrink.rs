//! Shrinking a failing scenario: delta debugging (ddmin) over its jobs and
//! faults, then simplifications (fewer users, run-wide expectations and
//! agents, shorter jobs and settle time, times pulled together), each kept only if the scenario
//! still fails the same way, until a whole round changes nothing.
//!
//! "The same way" is the failure's signature: the run's verdict, the
//! checker of its first violation (or the crash), and the jobs that
//! violation names, by their names in the scenario (ids change as jobs go;
//! names stay). A candidate that fails otherwise (a liveness failure once
//! the fault that healed the world is gone, say) is not the same bug and
//! is not kept.
//!
//! Pure: the runs are the caller's (`Oracle`), so that the search itself
//! is tested without a simulator, and a budget (runs, time) is the
//! caller's too. Deterministic: the same scenario, seed and oracle give the
//! same steps.

use std::collections::BTreeSet;

use crate::scenario::{Scenario, Target};

/// How one run of a candidate ended, as the shrinker needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `pass`, `correctness failure`, `liveness failure`, `crash`, ...
    pub verdict: String,
    /// Each violation as (checker, message), in the order found; a crash
    /// as ("crash", its message).
    pub violations: Vec<(String, String)>,
}

/// What makes two failures the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub verdict: String,
    pub checker: String,
    /// The scenario's job names the first violation names.
    pub jobs: Vec<String>,
    /// For a crash, its message with every number blanked (a panic names
    /// ids and times, which change as the scenario shrinks).
    pub crash: Option<String>,
}

/// `message` with each run of digits as `#`.
fn shape(message: &str) -> String {
    let mut shaped = String::with_capacity(message.len());
    for c in message.chars() {
        if !c.is_ascii_digit() {
            shaped.push(c);
        } else if !shaped.ends_with('#') {
            shaped.push('#');
        }
    }
    shaped
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {}", self.verdict, self.checker)?;
        if !self.jobs.is_empty() {
            write!(f, " about {}", self.jobs.join(", "))?;
        }
        Ok(())
    }
}

impl Signature {
    /// The signature of a failing run of `scenario`; `None` if it passed.
    pub fn of(scenario: &Scenario, outcome: &Outcome) -> Option<Signature> {
        let (checker, message) = outcome.violations.first()?;
        Some(Signature {
            verdict: outcome.verdict.clone(),
            checker: checker.clone(),
            jobs: named_jobs(scenario, message),
            crash: (checker == "crash").then(|| shape(message)),
        })
    }

    /// Whether `outcome`, a run of `scenario`, fails this way: the same
    /// verdict, and its first violation from the same checker, naming the
    /// same jobs (a crash: the same message but for its numbers).
    pub fn matches(&self, scenario: &Scenario, outcome: &Outcome) -> bool {
        let Some((checker, message)) = outcome.violations.first() else {
            return false;
        };
        let named = named_jobs(scenario, message);
        outcome.verdict == self.verdict
            && *checker == self.checker
            && self.jobs.iter().all(|j| named.contains(j))
            && self.crash.as_ref().is_none_or(|c| *c == shape(message))
    }
}

/// The names of `scenario`'s jobs that `message` holds as whole words.
fn named_jobs(scenario: &Scenario, message: &str) -> Vec<String> {
    let word = |c: char| c.is_alphanumeric() || c == '-' || c == '_';
    scenario
        .jobs
        .iter()
        .map(|j| &j.name)
        .filter(|name| {
            message.match_indices(name.as_str()).any(|(i, _)| {
                let before = message[..i].chars().next_back();
                let after = message[i + name.len()..].chars().next();
                !before.is_some_and(word) && !after.is_some_and(word)
            })
        })
        .cloned()
        .collect()
}

/// Runs candidates: `Some(outcome)`, or `None` once the budget is spent
/// (the shrink then stops with the smallest failing scenario so far).
pub trait Oracle {
    fn run(&mut self, scenario: &Scenario) -> Option<Outcome>;
}

impl<F: FnMut(&Scenario) -> Option<Outcome>> Oracle for F {
    fn run(&mut self, scenario: &Scenario) -> Option<Outcome> {
        self(scenario)
    }
}

/// How a shrink went.
#[derive(Debug)]
pub struct Shrunk {
    pub scenario: Scenario,
    /// Candidates run.
    pub runs: usize,
    /// The budget ran out before a round changed nothing.
    pub cut_short: bool,
}

/// A scenario's size, as the steps print it.
pub fn size(s: &Scenario) -> String {
    format!(
        "{} jobs, {} faults, {} agents, {} users, plan {} ms, longest job {} ms, settle {} ms",
        s.jobs.len(),
        s.faults.len(),
        s.topology.agents,
        s.users.len(),
        s.plan_end_ms(),
        s.jobs.iter().map(|j| j.duration_ms).max().unwrap_or(0),
        s.expect.settle_ms
    )
}

struct Search<'a> {
    signature: &'a Signature,
    oracle: &'a mut dyn Oracle,
    /// Called with each kept step and the scenario as it now is (to print
    /// it, and to write it down so that a later shrink resumes there).
    step: &'a mut dyn FnMut(&str, &Scenario),
    runs: usize,
    spent: bool,
}

impl Search<'_> {
    /// Whether `candidate` is a valid scenario that fails the same way.
    fn fails(&mut self, candidate: Scenario) -> Option<Scenario> {
        if self.spent {
            return None;
        }
        // Through the parser: a candidate is what its file would say, and
        // one that is not a valid scenario is never run.
        let candidate =
            Scenario::parse(&candidate.name, &candidate.name, &candidate.to_toml()).ok()?;
        self.runs += 1;
        match self.oracle.run(&candidate) {
            None => {
                self.spent = true;
                None
            }
            Some(outcome) => self
                .signature
                .matches(&candidate, &outcome)
                .then_some(candidate),
        }
    }

    /// Tries `edit` of `current`; keeps it if it fails the same way.
    fn try_edit(
        &mut self,
        current: &mut Scenario,
        what: &str,
        edit: impl FnOnce(&Scenario) -> Option<Scenario>,
    ) -> bool {
        let Some(candidate) = edit(current) else {
            return false;
        };
        if candidate == *current {
            return false;
        }
        match self.fails(candidate) {
            Some(smaller) => {
                *current = smaller;
                (self.step)(what, current);
                true
            }
            None => false,
        }
    }

    /// ddmin over `count(current)` items, removing with `remove`: the
    /// complement of one chunk at a time, chunks halving as they fail.
    fn ddmin(
        &mut self,
        current: &mut Scenario,
        what: &str,
        count: fn(&Scenario) -> usize,
        remove: fn(&Scenario, &BTreeSet<usize>) -> Scenario,
    ) -> bool {
        let mut changed = false;
        let mut chunks = 2;
        loop {
            let len = count(current);
            if len == 0 || self.spent {
                return changed;
            }
            let chunks_now = chunks.min(len);
            let size = len.div_ceil(chunks_now);
            let mut removed = false;
            for start in (0..len).step_by(size) {
                let gone: BTreeSet<usize> = (start..(start + size).min(len)).collect();
                let label = format!("{what}: removed {} of {len}", gone.len());
                if self.try_edit(current, &label, |s| Some(remove(s, &gone))) {
                    changed = true;
                    removed = true;
                    chunks = (chunks_now - 1).max(2);
                    break;
                }
            }
            if !removed {
                if chunks_now >= len {
                    return changed;
                }
                chunks = (chunks_now * 2).min(len);
            }
        }
    }
}

fn without_jobs(s: &Scenario, gone: &BTreeSet<usize>) -> Scenario {
    let mut s = s.clone();
    let names: BTreeSet<String> = gone.iter().map(|&i| s.jobs[i].name.clone()).collect();
    s.jobs = keep_unless(std::mem::take(&mut s.jobs), gone);
    // What named them goes with them.
    s.faults
        .retain(|f| !f.job.as_ref().is_some_and(|j| names.contains(j)));
    let e = &mut s.expect;
    e.states.retain(|n, _| !names.contains(n));
    e.attempts.retain(|n, _| !names.contains(n));
    e.outputs.retain(|n, _| !names.contains(n));
    e.exit_codes.retain(|n, _| !names.contains(n));
    e.reasons.retain(|n, _| !names.contains(n));
    e.dispatch_order.retain(|n| !names.contains(n));
    s
}

fn without_faults(s: &Scenario, gone: &BTreeSet<usize>) -> Scenario {
    let mut s = s.clone();
    s.faults = keep_unless(std::mem::take(&mut s.faults), gone);
    s
}

fn keep_unless<T>(items: Vec<T>, gone: &BTreeSet<usize>) -> Vec<T> {
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !gone.contains(i))
        .map(|(_, item)| item)
        .collect()
}

/// Users no job submits as.
fn without_idle_users(s: &Scenario) -> Option<Scenario> {
    let mut s = s.clone();
    let users: BTreeSet<String> = s.jobs.iter().map(|j| j.user.clone()).collect();
    s.users.retain(|u| users.contains(&u.name));
    Some(s)
}

/// No rare events to reach and no dispatch order to keep: expectations
/// of the whole run, not of the failure (which names its own).
fn fewer_expectations(s: &Scenario) -> Option<Scenario> {
    let mut s = s.clone();
    s.expect.reached.clear();
    s.expect.dispatch_order.clear();
    Some(s)
}

/// One agent fewer (the last), if no fault names it.
fn one_agent_fewer(s: &Scenario) -> Option<Scenario> {
    let agents = s.topology.agents;
    let last_named = s.faults.iter().any(|f| match &f.agent {
        Some(Target::One(n)) => *n + 1 >= agents,
        _ => false,
    });
    if agents <= 1 || last_named {
        return None;
    }
    let mut s = s.clone();
    s.topology.agents -= 1;
    s.topology.agent_cpus.truncate(s.topology.agents);
    Some(s)
}

/// Every job's process half as long (at least 1 ms).
fn shorter_jobs(s: &Scenario) -> Option<Scenario> {
    let mut s = s.clone();
    for j in &mut s.jobs {
        j.duration_ms = (j.duration_ms / 2).max(1);
    }
    Some(s)
}

/// Half the settle time (at least a second).
fn shorter_settle(s: &Scenario) -> Option<Scenario> {
    let mut s = s.clone();
    s.expect.settle_ms = (s.expect.settle_ms / 2).max(1_000);
    Some(s)
}

/// Every submission and fault at half its time.
fn times_together(s: &Scenario) -> Option<Scenario> {
    let mut s = s.clone();
    for j in &mut s.jobs {
        j.at_ms /= 2;
    }
    for f in &mut s.faults {
        f.at_ms /= 2;
    }
    Some(s)
}

/// Shrinks `scenario`, which fails as `signature` says, with `oracle`'s
/// runs. `step` hears every kept step.
pub fn shrink(
    scenario: &Scenario,
    signature: &Signature,
    oracle: &mut dyn Oracle,
    step: &mut dyn FnMut(&str, &Scenario),
) -> Shrunk {
    let mut search = Search {
        signature,
        oracle,
        step,
        runs: 0,
        spent: false,
    };
    let mut current = scenario.clone();
    loop {
        let mut changed = search.ddmin(&mut current, "jobs", |s| s.jobs.len(), without_jobs);
        changed |= search.ddmin(&mut current, "faults", |s| s.faults.len(), without_faults);
        changed |= search.try_edit(&mut current, "users no job has", without_idle_users);
        changed |= search.try_edit(
            &mut current,
            "expectations of the whole run",
            fewer_expectations,
        );
        while search.try_edit(&mut current, "one agent fewer", one_agent_fewer) {
            changed = true;
        }
        for (what, edit) in [
            (
                "jobs half as long",
                shorter_jobs as fn(&Scenario) -> Option<Scenario>,
            ),
            ("settle time halved", shorter_settle),
            ("times pulled together", times_together),
        ] {
            // Halving until it no longer fails the same way (bounded: each
            // halving that changes nothing is not run).
            while search.try_edit(&mut current, what, edit) {
                changed = true;
            }
        }
        if !changed || search.spent {
            break;
        }
    }
    Shrunk {
        scenario: current,
        runs: search.runs,
        cut_short: search.spent,
    }
}

#[cfg(test)]
mod tests;
