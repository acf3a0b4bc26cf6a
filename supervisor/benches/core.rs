//! The core's cost, with no IO: full job lifecycles (submit → dispatch →
//! running → succeeded) through a core with 1,000 agents, at a standing
//! queue of 1k, 10k and 100k jobs; and the memory each queued job costs.
//!
//! Each measured iteration is one job's whole life at a steady queue depth:
//! one submission joins the back of the queue, one running job finishes,
//! which dispatches the queue's head, which then reports started. If one
//! scheduling decision cost grew with the queue, the deeper queues would
//! show it.
//!
//!   cargo xtask bench          (or: cargo bench -p foreman --bench core)

use std::collections::{BTreeMap, VecDeque};
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use foreman::core::*;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const AGENTS: usize = 1_000;
const USERS: usize = 1_000;

struct Bench {
    core: Core,
    now: u64,
    request: u64,
    users: Vec<Arc<str>>,
    plan: Arc<str>,
    spec: SubmitSpec,
    /// Running attempts, oldest first: (agent, conn, job, attempt).
    running: VecDeque<(AgentId, ConnId, JobId, u32)>,
    conns: BTreeMap<AgentId, ConnId>,
    runs: Vec<(AgentId, JobId, u32)>,
}

fn config() -> CoreConfig {
    CoreConfig {
        pool_sequential_cpus: AGENTS as u32,
        ..CoreConfig::default()
    }
}

impl Bench {
    fn new(agents: usize) -> Bench {
        let mut bench = Bench {
            core: Core::new(config()),
            now: 1_000_000,
            request: 0,
            users: (0..USERS).map(|i| Arc::from(format!("user{i}"))).collect(),
            plan: Arc::from("basic"),
            spec: SubmitSpec::command(["python", "simulate.py", "--steps", "1000"]),
            running: VecDeque::new(),
            conns: BTreeMap::new(),
            runs: Vec::new(),
        };
        for i in 0..agents {
            let agent = AgentId::new(&format!("agent{i}"));
            let conn = ConnId(i as u64);
            bench.conns.insert(agent.clone(), conn);
            let input = Input::AgentConnected {
                conn,
                agent,
                cpus: 1,
                labels: BTreeMap::new(),
                attempts: vec![],
            };
            bench.feed(input);
        }
        bench
    }

    /// Applies one input, keeping the runs it sends. The clock stands still:
    /// timers are armed and disarmed as usual but none comes due.
    fn feed(&mut self, input: Input) {
        for effect in self.core.handle(Millis(self.now), input) {
            if let Effect::Send {
                agent,
                msg: ToAgent::Run { job, attempt, .. },
                ..
            } = effect
            {
                self.runs.push((agent, job, attempt));
            }
        }
    }

    fn submit(&mut self) {
        self.request += 1;
        let user = self.users[self.request as usize % USERS].clone();
        let input = Input::Submit {
            request: RequestId(self.request),
            user,
            plan: self.plan.clone(),
            spec: self.spec.clone(),
        };
        self.feed(input);
    }

    /// Every run sent so far reports started.
    fn start_runs(&mut self) {
        for (agent, job, attempt) in std::mem::take(&mut self.runs) {
            let conn = self.conns[&agent];
            self.feed(Input::AgentMessage {
                conn,
                agent: agent.clone(),
                msg: AgentMsg::Started { job, attempt },
            });
            self.running.push_back((agent, conn, job, attempt));
        }
    }

    /// Fills every agent and leaves `queued` jobs waiting.
    fn saturate(&mut self, queued: usize) {
        for _ in 0..AGENTS + queued {
            self.submit();
        }
        self.start_runs();
        assert_eq!(self.core.queued(Kind::Sequential), queued);
    }

    /// One job's whole life at a steady queue depth.
    fn one_lifecycle(&mut self) {
        self.submit();
        let (agent, conn, job, attempt) = self.running.pop_front().expect("agents are busy");
        let msg = AgentMsg::Finished {
            job,
            attempt,
            outcome: Outcome::Exited { code: 0 },
            output_tail: String::new(),
            run_ms: 1,
        };
        self.feed(Input::AgentMessage { conn, agent, msg });
        self.start_runs();
    }
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("lifecycle_1000_agents");
    group.throughput(Throughput::Elements(1));
    for queued in [1_000, 10_000, 100_000] {
        let mut bench = Bench::new(AGENTS);
        bench.saturate(queued);
        group.bench_with_input(BenchmarkId::new("queued", queued), &queued, |b, _| {
            b.iter(|| bench.one_lifecycle());
        });
        assert_eq!(
            bench.core.queued(Kind::Sequential),
            queued,
            "the queue stayed at its depth"
        );
        bench.core.check_invariants();
    }
    group.finish();
}

/// Bytes the core holds per queued job: a core with no agents takes N
/// submissions; the allocator's net growth divided by N.
fn memory_per_queued_job() {
    for queued in [1_000usize, 10_000, 100_000] {
        let mut bench = Bench::new(0);
        let region = Region::new(GLOBAL);
        for _ in 0..queued {
            bench.submit();
        }
        let stats = region.change();
        let net = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
            + stats.bytes_reallocated as i64;
        black_box(&bench.core);
        println!(
            "memory: {queued} queued jobs hold {net} bytes: {} bytes per queued job",
            net / queued as i64
        );
    }
}

/// Heap allocations one lifecycle makes, at a steady queue of 1,000.
fn allocations_per_lifecycle() {
    let mut bench = Bench::new(AGENTS);
    bench.saturate(1_000);
    let rounds = 10_000;
    let region = Region::new(GLOBAL);
    for _ in 0..rounds {
        bench.one_lifecycle();
    }
    let stats = region.change();
    println!(
        "allocations: {:.1} per lifecycle ({:.0} bytes)",
        stats.allocations as f64 / rounds as f64,
        stats.bytes_allocated as f64 / rounds as f64
    );
}

fn main() {
    memory_per_queued_job();
    allocations_per_lifecycle();
    let mut criterion = Criterion::default().configure_from_args();
    lifecycle(&mut criterion);
    criterion.final_summary();
}
