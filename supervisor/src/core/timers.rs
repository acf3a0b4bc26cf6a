//! Timers as data: each job and each agent has at most one pending deadline.
//! The core's caller learns the earliest from `next_deadline()` and comes back
//! with an input at or after it.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{AgentId, JobId, Millis};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    Job(JobId),
    Agent(AgentId),
}

#[derive(Clone, Debug, Default)]
pub struct Timers {
    armed: BTreeMap<TimerKey, Millis>,
    by_time: BTreeSet<(Millis, TimerKey)>,
}

impl Timers {
    /// Arms `key` at `at`, or disarms it with `None`; replaces any earlier deadline.
    pub fn set(&mut self, key: TimerKey, at: Option<Millis>) {
        match at {
            Some(at) => {
                if let Some(old) = self.armed.insert(key.clone(), at) {
                    if old == at {
                        return;
                    }
                    self.by_time.remove(&(old, key.clone()));
                }
                self.by_time.insert((at, key));
            }
            None => {
                if let Some(old) = self.armed.remove(&key) {
                    self.by_time.remove(&(old, key));
                }
            }
        }
    }

    pub fn get(&self, key: &TimerKey) -> Option<Millis> {
        self.armed.get(key).copied()
    }

    pub fn next(&self) -> Option<Millis> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Disarms and returns the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Millis) -> Option<(Millis, TimerKey)> {
        let (at, _) = self.by_time.first()?;
        if *at > now {
            return None;
        }
        let (at, key) = self.by_time.pop_first()?;
        self.armed.remove(&key);
        Some((at, key))
    }

    pub fn len(&self) -> usize {
        self.armed.len()
    }
}
