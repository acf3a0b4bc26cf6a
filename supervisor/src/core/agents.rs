//! The agents the core knows: their link, capacity and the attempts they hold.
//! Connected agents are indexed by free CPUs, so placing a job is a range
//! lookup (best fit: the least free CPUs that still fit), never a scan.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::io::GoneReason;
use super::types::{AgentId, ConnId, JobId, Millis};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "link", rename_all = "snake_case")]
pub enum Link {
    Connected {
        conn: ConnId,
        since: Millis,
    },
    /// Gone; its jobs wait for it until `since + agent_grace_ms`.
    Disconnected {
        since: Millis,
        reason: GoneReason,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub id: AgentId,
    pub link: Link,
    pub cpus: u32,
    pub labels: BTreeMap<String, String>,
    /// CPUs held by attempts, and by processes dying (below).
    pub used_cpus: u32,
    /// Jobs whose held attempt is on this agent.
    pub jobs: BTreeSet<JobId>,
    /// Processes of attempts the core does not own that this connection
    /// reported running and was told to kill: (job, attempt) → CPUs. Their
    /// CPUs stay held until the agent reports them finished, so nothing is
    /// dispatched onto CPUs a dying process still uses. A new connection's
    /// hello says afresh what still runs.
    #[serde(skip)]
    pub dying: BTreeMap<(JobId, u32), u32>,
}

impl Agent {
    pub fn free_cpus(&self) -> u32 {
        self.cpus.saturating_sub(self.used_cpus)
    }

    pub fn conn(&self) -> Option<ConnId> {
        match self.link {
            Link::Connected { conn, .. } => Some(conn),
            Link::Disconnected { .. } => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Agents {
    map: BTreeMap<AgentId, Agent>,
    /// (free CPUs, agent) for connected agents only.
    free: BTreeSet<(u32, AgentId)>,
    /// Connected agents by CPUs: size → how many.
    sizes: BTreeMap<u32, usize>,
}

impl Agents {
    pub fn get(&self, id: &AgentId) -> Option<&Agent> {
        self.map.get(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Agent> {
        self.map.values()
    }

    /// Applies `change` to an agent, keeping the free index true.
    pub fn update<R>(&mut self, id: &AgentId, change: impl FnOnce(&mut Agent) -> R) -> Option<R> {
        let agent = self.map.get_mut(id)?;
        if agent.conn().is_some() {
            self.free.remove(&(agent.free_cpus(), agent.id.clone()));
            size_out(&mut self.sizes, agent.cpus);
        }
        let result = change(agent);
        if agent.conn().is_some() {
            self.free.insert((agent.free_cpus(), agent.id.clone()));
            *self.sizes.entry(agent.cpus).or_default() += 1;
        }
        Some(result)
    }

    /// Inserts a new agent (connected or not).
    pub fn insert(&mut self, agent: Agent) {
        assert!(
            !self.map.contains_key(&agent.id),
            "agent {} inserted twice",
            agent.id
        );
        if agent.conn().is_some() {
            self.free.insert((agent.free_cpus(), agent.id.clone()));
            *self.sizes.entry(agent.cpus).or_default() += 1;
        }
        self.map.insert(agent.id.clone(), agent);
    }

    pub fn remove(&mut self, id: &AgentId) -> Option<Agent> {
        let agent = self.map.remove(id)?;
        if agent.conn().is_some() {
            self.free.remove(&(agent.free_cpus(), agent.id.clone()));
            size_out(&mut self.sizes, agent.cpus);
        }
        Some(agent)
    }

    /// The CPUs of the largest connected agent; `None` with none connected.
    pub fn largest(&self) -> Option<u32> {
        self.sizes.keys().next_back().copied()
    }

    /// The connected agent with the fewest free CPUs that still has `cpus` free.
    pub fn best_fit(&self, cpus: u32) -> Option<&AgentId> {
        self.free
            .range((cpus, AgentId::new(""))..)
            .next()
            .map(|(_, id)| id)
    }

    /// The index agrees with the agents; panics otherwise.
    pub fn check(&self) {
        let expected: BTreeSet<(u32, AgentId)> = self
            .map
            .values()
            .filter(|a| a.conn().is_some())
            .map(|a| (a.free_cpus(), a.id.clone()))
            .collect();
        assert_eq!(
            expected, self.free,
            "free-CPU index out of step with agents"
        );
        let mut sizes = BTreeMap::new();
        for agent in self.map.values().filter(|a| a.conn().is_some()) {
            *sizes.entry(agent.cpus).or_insert(0) += 1;
        }
        assert_eq!(sizes, self.sizes, "size index out of step with agents");
        for (id, agent) in &self.map {
            assert_eq!(id, &agent.id);
        }
    }
}

fn size_out(sizes: &mut BTreeMap<u32, usize>, cpus: u32) {
    let count = sizes
        .get_mut(&cpus)
        .expect("a connected agent's size is indexed");
    *count -= 1;
    if *count == 0 {
        sizes.remove(&cpus);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::panic_message;
    use super::*;

    #[test]
    fn the_agents_check_names_a_free_index_out_of_step() {
        let mut agents = Agents::default();
        agents.insert(Agent {
            id: AgentId::new("a1"),
            link: Link::Connected {
                conn: ConnId(1),
                since: Millis(0),
            },
            cpus: 2,
            labels: BTreeMap::new(),
            used_cpus: 0,
            jobs: BTreeSet::new(),
            dying: BTreeMap::new(),
        });
        agents.check();
        assert_eq!(agents.best_fit(2), Some(&AgentId::new("a1")));
        assert_eq!(agents.largest(), Some(2));
        let mut lost_size = agents.clone();
        agents.free.clear();
        let message = panic_message("a lost index entry", || agents.check());
        assert!(message.contains("free-CPU index out of step"), "{message}");
        lost_size.sizes.clear();
        let message = panic_message("a lost size", || lost_size.check());
        assert!(message.contains("size index out of step"), "{message}");
    }
}
