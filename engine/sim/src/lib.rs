//! A seeded, deterministic simulator for ordinal: the real primary, DR and aux state machines
//! from `ordinal-proto`, driven through a simulated world with RDMA semantics (reliable in-order
//! delivery per queue pair, no order across queue pairs, one-sided writes that land torn when a
//! connection breaks mid-write), a simulated clock, a client workload and injected faults
//! (primary crash or cut-off at any step, DR and aux crash and restart, link loss, slow links,
//! lag limits). Every run ends in a failover, after which the checker classifies every
//! acknowledged write and checks the invariants I1-I6 of SPEC §3.
//!
//! A seed decides everything ([`Params::draw`]); the same seed replays the same run, and
//! [`replay_seed`] prints it step by step. Scenario tests drive a [`World`] by hand
//! ([`Params::scripted`], [`World::hold`], [`World::crash_primary`], [`World::fail_over`]).
//!
//! What this is not: a model of performance. Latencies exist to reorder events realistically,
//! not to predict throughput.

pub mod checker;
pub mod params;
pub mod rng;
pub mod soak;
pub mod world;

pub use checker::{check_history, History, Verdict, Violation};
pub use params::{Fault, Params, PrimaryEnd};
pub use soak::{replay_seed, run_seed, soak, SoakSummary};
pub use world::{Coverage, OpTruth, Path, Phase, World};
