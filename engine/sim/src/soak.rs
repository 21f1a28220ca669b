//! Running many seeds: each seed is a whole run (workload, faults, failover, check), and a
//! failing seed is replayed with a trace so that it can be read and debugged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ordinal_proto::Mutations;

use crate::checker::{Verdict, Violation};
use crate::params::Params;
use crate::world::World;

/// Runs one seed. A panic (a failed assertion in the protocol or the world) is a violation like
/// any other, reported with its message instead of tearing the soak down.
pub fn run_seed(seed: u64, mutations: Mutations) -> Verdict {
    let mut params = Params::draw(seed);
    params.mutations = mutations;
    std::panic::catch_unwind(|| World::new(params).run_to_end()).unwrap_or_else(|panic| Verdict {
        violations: vec![Violation::Panic(panic_message(&*panic))],
        ..Verdict::default()
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// Runs one seed again with a trace of every step.
pub fn replay_seed(seed: u64, mutations: Mutations) -> (Verdict, Params, Vec<String>) {
    let mut params = Params::draw(seed);
    params.mutations = mutations;
    let mut world = World::new(params.clone());
    world.enable_trace();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run_to_end()));
    let verdict = outcome.unwrap_or_else(|panic| Verdict {
        violations: vec![Violation::Panic(panic_message(&*panic))],
        ..Verdict::default()
    });
    (verdict, params, world.take_trace())
}

/// Totals over a soak.
#[derive(Clone, Debug, Default)]
pub struct SoakSummary {
    pub seeds: u64,
    pub elapsed: Duration,
    pub admitted: u64,
    pub acked_applied: u64,
    pub acked_reported_lost: u64,
    pub applied_from_ring: u64,
    pub coverage: crate::world::Coverage,
    /// The first failing seed found (lowest seed among those seen failing), and its verdict.
    pub failure: Option<(u64, Verdict)>,
}

impl SoakSummary {
    pub fn seeds_per_second(&self) -> f64 {
        self.seeds as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs seeds `first..first + count` on `threads` threads, stopping early at the first failure.
pub fn soak(
    first: u64,
    count: u64,
    threads: usize,
    mutations: Mutations,
    progress: &(dyn Fn(u64) + Sync),
) -> SoakSummary {
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let totals = Mutex::new(SoakSummary::default());
    let end = first + count;
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut local = SoakSummary::default();
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let verdict = run_seed(seed, mutations);
                    local.seeds += 1;
                    local.admitted += verdict.admitted;
                    local.acked_applied += verdict.acked_applied;
                    local.acked_reported_lost += verdict.acked_reported_lost;
                    local.applied_from_ring += verdict.applied_from_ring;
                    local.coverage.add(&verdict.coverage);
                    if !verdict.holds() {
                        stop.store(true, Ordering::Relaxed);
                        if local.failure.as_ref().is_none_or(|(s, _)| seed < *s) {
                            local.failure = Some((seed, verdict));
                        }
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished % 10_000 == 0 {
                        progress(finished);
                    }
                }
                let mut totals = totals.lock().expect("no thread panicked holding it");
                totals.seeds += local.seeds;
                totals.admitted += local.admitted;
                totals.acked_applied += local.acked_applied;
                totals.acked_reported_lost += local.acked_reported_lost;
                totals.applied_from_ring += local.applied_from_ring;
                totals.coverage.add(&local.coverage);
                if let Some((seed, verdict)) = local.failure {
                    if totals.failure.as_ref().is_none_or(|(s, _)| seed < *s) {
                        totals.failure = Some((seed, verdict));
                    }
                }
            });
        }
    });
    let mut summary = totals.into_inner().expect("no thread panicked holding it");
    summary.elapsed = started.elapsed();
    summary
}
