//! The fair queue of one kind of job: plan priority first (higher served
//! first), round-robin across users within a priority, FIFO within a user.
//!
//! A waiting job is an entry here and nothing else: no task waits on it, so
//! removing the entry is all a cancel has to do. Users whose plan cap is
//! reached are parked out of the ring, so one scheduling decision looks at
//! one user's head, never at the whole queue.
//!
//! A job larger than every connected agent steps out of line ("aside") so it
//! does not block the jobs behind it; when an agent it fits connects, it goes
//! back to its place among its user's jobs and the usual rule holds again.

use super::types::{JobId, UserKey};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Clone, Debug, Default)]
struct Level {
    /// Users with waiting jobs whose turn comes in this order.
    ring: VecDeque<UserKey>,
    /// Users with waiting jobs who hold all their plan allows.
    parked: BTreeSet<UserKey>,
    /// Each user's waiting jobs, oldest first (sorted by id).
    jobs: BTreeMap<UserKey, VecDeque<JobId>>,
    len: usize,
}

/// Where the next decision looks: the front user of the highest level that
/// has one, and that user's oldest job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub priority: u8,
    pub user: UserKey,
    pub job: JobId,
}

#[derive(Clone, Debug, Default)]
pub struct FairQueue {
    levels: BTreeMap<Reverse<u8>, Level>,
    /// Jobs set aside, smallest first: (CPUs, job) → (priority, user).
    aside: BTreeMap<(u32, JobId), (u8, UserKey)>,
    aside_cpus: BTreeMap<JobId, u32>,
    /// Every waiting job, in line or aside.
    len: usize,
}

impl FairQueue {
    /// Every waiting job, in line or aside.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Takes the head out of line: it needs more CPUs than any connected
    /// agent has. Its user keeps its turn with its next job.
    pub fn set_aside(&mut self, head: &Head, cpus: u32) {
        let removed = self.remove(head.priority, head.user, head.job);
        assert!(removed, "head job {} not in line", head.job);
        self.put_aside(head.priority, head.user, head.job, cpus);
    }

    /// Adds a waiting job straight to the jobs set aside (a snapshot's).
    pub fn put_aside(&mut self, priority: u8, user: UserKey, job: JobId, cpus: u32) {
        let fresh = self.aside_cpus.insert(job, cpus).is_none();
        assert!(fresh, "job {job} set aside twice");
        self.aside.insert((cpus, job), (priority, user));
        self.len += 1;
    }

    /// Puts back in line every job set aside that needs at most `cpus`.
    pub fn bring_back(&mut self, cpus: u32) {
        while let Some(entry) = self.aside.first_entry() {
            if entry.key().0 > cpus {
                break;
            }
            let ((_, job), (priority, user)) = entry.remove_entry();
            self.aside_cpus.remove(&job);
            self.len -= 1;
            self.push(priority, user, job);
        }
    }

    /// The CPUs of a job set aside; `None` if it is in line or not here.
    pub fn aside_cpus(&self, job: JobId) -> Option<u32> {
        self.aside_cpus.get(&job).copied()
    }

    /// The smallest job set aside: (CPUs, job).
    pub fn smallest_aside(&self) -> Option<(u32, JobId)> {
        self.aside.keys().next().copied()
    }

    /// The jobs set aside, by id.
    pub fn aside_jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.aside_cpus.keys().copied()
    }

    /// Adds `job` in id order among the user's jobs (a requeued job goes back
    /// before later submissions). A user new to the level joins the ring's back.
    pub fn push(&mut self, priority: u8, user: UserKey, job: JobId) {
        let level = self.levels.entry(Reverse(priority)).or_default();
        let jobs = level.jobs.entry(user).or_default();
        let was_empty = jobs.is_empty();
        let at = jobs.partition_point(|j| *j < job);
        assert!(jobs.get(at) != Some(&job), "job {job} queued twice");
        jobs.insert(at, job);
        if was_empty {
            level.ring.push_back(user);
        }
        level.len += 1;
        self.len += 1;
    }

    /// Removes a waiting job, in line or aside; false if it was not here.
    pub fn remove(&mut self, priority: u8, user: UserKey, job: JobId) -> bool {
        if let Some(cpus) = self.aside_cpus.remove(&job) {
            self.aside.remove(&(cpus, job));
            self.len -= 1;
            return true;
        }
        let Some(level) = self.levels.get_mut(&Reverse(priority)) else {
            return false;
        };
        let Some(jobs) = level.jobs.get_mut(&user) else {
            return false;
        };
        let Ok(at) = jobs.binary_search(&job) else {
            return false;
        };
        jobs.remove(at);
        if jobs.is_empty() {
            level.jobs.remove(&user);
            if !level.parked.remove(&user) {
                let pos = level.ring.iter().position(|u| *u == user);
                level
                    .ring
                    .remove(pos.expect("user with jobs is in the ring or parked"));
            }
        }
        level.len -= 1;
        self.len -= 1;
        if level.len == 0 {
            self.levels.remove(&Reverse(priority));
        }
        true
    }

    pub fn head(&self) -> Option<Head> {
        self.levels.iter().find_map(|(Reverse(priority), level)| {
            let user = *level.ring.front()?;
            let job = *level.jobs[&user].front().expect("ring users have jobs");
            Some(Head {
                priority: *priority,
                user,
                job,
            })
        })
    }

    /// Takes the head's job; its user moves to the back of the ring.
    pub fn pop_head(&mut self, head: &Head) -> JobId {
        let level = self
            .levels
            .get_mut(&Reverse(head.priority))
            .expect("head level exists");
        let user = level.ring.pop_front().expect("head user in ring");
        debug_assert_eq!(user, head.user);
        let jobs = level.jobs.get_mut(&user).expect("ring user has jobs");
        let job = jobs.pop_front().expect("ring user has jobs");
        debug_assert_eq!(job, head.job);
        if jobs.is_empty() {
            level.jobs.remove(&user);
        } else {
            level.ring.push_back(user);
        }
        level.len -= 1;
        self.len -= 1;
        if level.len == 0 {
            self.levels.remove(&Reverse(head.priority));
        }
        job
    }

    /// The head's user holds all its plan allows: out of the ring until `unpark`.
    pub fn park_head(&mut self, head: &Head) {
        let level = self
            .levels
            .get_mut(&Reverse(head.priority))
            .expect("head level exists");
        let user = level.ring.pop_front().expect("head user in ring");
        debug_assert_eq!(user, head.user);
        level.parked.insert(user);
    }

    /// The user released something: back into every ring it was parked out of.
    pub fn unpark(&mut self, user: UserKey) {
        for level in self.levels.values_mut() {
            if level.parked.remove(&user) {
                level.ring.push_back(user);
            }
        }
    }

    pub fn is_parked(&self, priority: u8, user: UserKey) -> bool {
        self.levels
            .get(&Reverse(priority))
            .is_some_and(|l| l.parked.contains(&user))
    }

    /// The job's place in line, 1 being next: every job of a higher priority,
    /// then the round-robin turns of the other users of its level before it.
    /// Costs one pass over the users of the level, not over the jobs.
    pub fn position(&self, priority: u8, user: UserKey, job: JobId) -> Option<usize> {
        let mut position = 0;
        for (Reverse(p), level) in &self.levels {
            if *p != priority {
                position += level.len;
                continue;
            }
            let index = level.jobs.get(&user)?.binary_search(&job).ok()?;
            let rank = |u: UserKey| {
                level
                    .ring
                    .iter()
                    .position(|r| *r == u)
                    .unwrap_or(usize::MAX)
            };
            let own_rank = rank(user);
            for (other, jobs) in &level.jobs {
                if *other == user {
                    continue;
                }
                position += jobs.len().min(index);
                if jobs.len() > index && rank(*other) < own_rank {
                    position += 1;
                }
            }
            return Some(position + index + 1);
        }
        None
    }

    /// Every waiting job with its priority and user, level by level, in
    /// per-user FIFO order, then the jobs set aside (for invariant checks
    /// and restore tests).
    pub fn entries(&self) -> impl Iterator<Item = (u8, UserKey, JobId)> + '_ {
        self.levels
            .iter()
            .flat_map(|(Reverse(p), level)| {
                level
                    .jobs
                    .iter()
                    .flat_map(move |(user, jobs)| jobs.iter().map(move |j| (*p, *user, *j)))
            })
            .chain(self.aside.iter().map(|((_, j), (p, u))| (*p, *u, *j)))
    }

    /// The queue's own consistency; panics on a violation.
    pub fn check(&self) {
        let mut total = 0;
        for (Reverse(p), level) in &self.levels {
            assert!(level.len > 0, "empty level {p} kept");
            let mut len = 0;
            for (user, jobs) in &level.jobs {
                assert!(!jobs.is_empty(), "user {user:?} kept with no jobs");
                assert!(
                    jobs.iter().zip(jobs.iter().skip(1)).all(|(a, b)| a < b),
                    "user {user:?}'s jobs are not in FIFO (id) order"
                );
                let in_ring = level.ring.iter().filter(|u| *u == user).count();
                let parked = usize::from(level.parked.contains(user));
                assert_eq!(
                    in_ring + parked,
                    1,
                    "user {user:?} must be in the ring or parked, once"
                );
                len += jobs.len();
            }
            assert_eq!(level.ring.len() + level.parked.len(), level.jobs.len());
            assert_eq!(len, level.len, "level {p} length");
            total += len;
        }
        assert_eq!(self.aside.len(), self.aside_cpus.len(), "aside index");
        for (cpus, job) in self.aside.keys() {
            assert_eq!(self.aside_cpus.get(job), Some(cpus), "aside index");
        }
        total += self.aside.len();
        assert_eq!(total, self.len, "queue length");
    }
}

/// A level's order as a snapshot keeps it: the ring's users front to back,
/// and the parked users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelOrder {
    pub priority: u8,
    pub ring: Vec<UserKey>,
    pub parked: Vec<UserKey>,
}

impl FairQueue {
    /// Every level's order, highest priority first.
    pub fn orders(&self) -> Vec<LevelOrder> {
        self.levels
            .iter()
            .map(|(Reverse(priority), level)| LevelOrder {
                priority: *priority,
                ring: level.ring.iter().copied().collect(),
                parked: level.parked.iter().copied().collect(),
            })
            .collect()
    }

    /// Rebuilds a queue from level orders and each user's waiting jobs;
    /// `None` if they do not describe one queue (a user in two places, a
    /// user without jobs, jobs without a user).
    pub fn from_orders(
        orders: &[LevelOrder],
        mut jobs: BTreeMap<(u8, UserKey), VecDeque<JobId>>,
    ) -> Option<FairQueue> {
        let mut queue = FairQueue::default();
        for order in orders {
            let mut level = Level::default();
            for (user, parked) in order
                .ring
                .iter()
                .map(|u| (*u, false))
                .chain(order.parked.iter().map(|u| (*u, true)))
            {
                let user_jobs = jobs.remove(&(order.priority, user))?;
                if user_jobs.is_empty() || level.jobs.contains_key(&user) {
                    return None;
                }
                level.len += user_jobs.len();
                level.jobs.insert(user, user_jobs);
                if parked {
                    level.parked.insert(user);
                } else {
                    level.ring.push_back(user);
                }
            }
            queue.len += level.len;
            if level.len > 0
                && queue
                    .levels
                    .insert(Reverse(order.priority), level)
                    .is_some()
            {
                return None;
            }
        }
        jobs.is_empty().then_some(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::panic_message;
    use super::*;

    #[test]
    fn a_position_counts_every_turn_before_it() {
        let mut q = FairQueue::default();
        // The ring is b, a, c: b and c have one job each, a two.
        let (a, b, c) = (UserKey(0), UserKey(1), UserKey(2));
        q.push(1, b, JobId(1));
        q.push(1, a, JobId(2));
        q.push(1, a, JobId(3));
        q.push(1, c, JobId(4));
        // A job of a higher priority goes before all of them.
        q.push(9, c, JobId(5));
        let positions: Vec<_> = [(b, 1), (a, 2), (c, 4), (a, 3), (c, 5)]
            .into_iter()
            .map(|(user, job)| q.position(if job == 5 { 9 } else { 1 }, user, JobId(job)))
            .collect();
        assert_eq!(positions, [2, 3, 4, 5, 1].map(Some));
        assert_eq!(q.position(1, a, JobId(99)), None);
    }

    #[test]
    fn parked_users_wait_behind_the_ring_and_not_behind_each_other() {
        let mut q = FairQueue::default();
        let (a, b, c) = (UserKey(0), UserKey(1), UserKey(2));
        q.push(1, a, JobId(1));
        q.push(1, b, JobId(2));
        q.push(1, c, JobId(3));
        for parked in [a, b] {
            let head = q.head().expect("a head");
            assert_eq!(head.user, parked);
            q.park_head(&head);
        }
        q.check();
        assert_eq!(q.position(1, c, JobId(3)), Some(1));
        assert_eq!(q.position(1, a, JobId(1)), Some(2));
        assert_eq!(q.position(1, b, JobId(2)), Some(2));
    }

    #[test]
    fn jobs_set_aside_leave_the_line_keep_their_count_and_come_back_smallest_first() {
        let mut q = FairQueue::default();
        let (a, b) = (UserKey(0), UserKey(1));
        q.push(1, a, JobId(1));
        q.push(1, a, JobId(2));
        q.push(1, b, JobId(3));
        q.push(1, b, JobId(4));
        // a's head needs 8 CPUs: it steps aside, and a keeps its turn with
        // its next job.
        let head = q.head().expect("a head");
        q.set_aside(&head, 8);
        let next = q.head().expect("a head");
        assert_eq!(next.job, JobId(2), "a keeps its turn");
        assert_eq!(q.pop_head(&next), JobId(2));
        // b's head needs 4: aside too.
        let head = q.head().expect("a head");
        assert_eq!(head.job, JobId(3));
        q.set_aside(&head, 4);
        q.check();
        assert_eq!(q.len(), 3, "still waiting, aside or in line");
        assert_eq!(q.smallest_aside(), Some((4, JobId(3))));
        assert_eq!(q.aside_cpus(JobId(1)), Some(8));
        assert_eq!(q.aside_cpus(JobId(4)), None, "in line");
        assert_eq!(q.aside_jobs().collect::<Vec<_>>(), vec![JobId(1), JobId(3)]);
        assert_eq!(q.position(1, a, JobId(1)), None, "no place in line aside");
        assert_eq!(q.head().map(|h| h.job), Some(JobId(4)));
        // An agent of 4 connects: only the 4-CPU job comes back, before
        // its user's later job.
        q.bring_back(4);
        q.check();
        assert_eq!(q.smallest_aside(), Some((8, JobId(1))));
        assert_eq!(q.position(1, b, JobId(3)), Some(1));
        // A job aside can be removed (a cancel, a queue timeout).
        assert!(q.remove(1, a, JobId(1)));
        assert_eq!(q.smallest_aside(), None);
        assert_eq!(q.len(), 2);
        q.check();
    }

    #[test]
    fn a_level_order_without_users_adds_no_level() {
        let empty = LevelOrder {
            priority: 3,
            ring: vec![],
            parked: vec![],
        };
        let queue = FairQueue::from_orders(&[empty], BTreeMap::new()).expect("a queue");
        queue.check();
        assert!(queue.orders().is_empty());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn the_queue_check_names_what_is_out_of_step() {
        type Corruption = (&'static str, fn(&mut FairQueue));
        let corruptions: [Corruption; 3] = [
            ("queue length", |q| q.len += 1),
            ("must be in the ring or parked, once", |q| {
                let level = q.levels.values_mut().next().expect("a level");
                let user = level.ring[0];
                level.parked.insert(user);
            }),
            ("not in FIFO (id) order", |q| {
                let level = q.levels.values_mut().next().expect("a level");
                level.jobs.values_mut().next().expect("a user").swap(0, 1);
            }),
        ];
        for (what, corrupt) in corruptions {
            let mut q = FairQueue::default();
            q.push(1, UserKey(0), JobId(1));
            q.push(1, UserKey(0), JobId(2));
            q.push(1, UserKey(1), JobId(3));
            q.check();
            corrupt(&mut q);
            let message = panic_message(what, || q.check());
            assert!(message.contains(what), "{what}: {message}");
        }
    }
}
