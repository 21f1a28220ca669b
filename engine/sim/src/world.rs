//! The simulated world: a primary, a DR and an aux (the real state machines from
//! `ordinal-proto`), the links between them with RDMA semantics, a clock, a client workload and
//! the faults a seed draws.
//!
//! RDMA semantics modelled:
//! - each path (queue pair direction) delivers reliably and in order; there is no order across
//!   paths (order records, payloads and aux writes travel on different queue pairs);
//! - a one-sided write lands in the target's memory without its CPU; the writer's completion and,
//!   for a write-with-immediate, the target's completion come after it lands;
//! - when a connection breaks (crash, link loss, access revoked), a SEND in flight is delivered
//!   whole or not at all, and a one-sided write in flight lands partially: its MTU-sized chunks
//!   in any subset (NICs may place packets out of order), and its completions are lost.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use ordinal_proto::aux::{aux_region_bytes, Aux, AuxAction, AuxConfig, AUX_PRIMARY_AREA_OFFSET};
use ordinal_proto::dr::{dr_log_bytes, log_record, Dr, DrAction, DrConfig, DrRole, LossReport};
use ordinal_proto::primary::{
    AuxWriteTag, Primary, PrimaryAction, PrimaryConfig, PrimaryStop, WriteRefused,
    AUX_ENTRIES_OFFSET,
};
use ordinal_proto::wire::{AuxEntry, OrderRecord, PrimaryStatus, AUX_ENTRY_BYTES};
use ordinal_proto::{LinkLossPolicy, Mode, Nanos, Seq};

use crate::checker::{self, Verdict, Violation};
use crate::params::{Fault, Params, PrimaryEnd};
use crate::rng::Rng;

/// The ways traffic moves. Scenario tests can hold a path to freeze what travels on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Order batches, primary -> DR (SEND).
    OrderToDr,
    /// Acks, credits and hellos, DR -> primary (SEND).
    DrToPrimary,
    /// Payloads landing in the DR ring (WRITE with immediate).
    PayloadToDr,
    /// Payload write completions reaching the primary.
    PayloadCompletion,
    /// The DR's CPU learning that a payload landed (its receive completion).
    DrNotify,
    /// Status entries and heartbeats landing on the aux (WRITE).
    AuxWrite,
    /// Aux write completions reaching the primary.
    AuxCompletion,
    /// The DR's volume writes (applies).
    Apply,
}

const PATHS: usize = 8;

impl Path {
    fn index(self) -> usize {
        self as usize
    }
    fn on_dr_link(self) -> bool {
        matches!(
            self,
            Path::OrderToDr | Path::DrToPrimary | Path::PayloadToDr | Path::PayloadCompletion
        )
    }
    fn on_aux_link(self) -> bool {
        matches!(self, Path::AuxWrite | Path::AuxCompletion)
    }
}

#[derive(Debug)]
enum Cargo {
    Send {
        bytes: Vec<u8>,
    },
    Payload {
        seq: Seq,
        ring_offset: u64,
        data: Vec<u8>,
        imm: u32,
    },
    PayloadDone {
        seq: Seq,
    },
    Notify {
        imm: u32,
    },
    AuxWrite {
        offset: usize,
        data: Vec<u8>,
        tag: AuxWriteTag,
    },
    AuxDone {
        tag: AuxWriteTag,
        ok: bool,
    },
    Apply {
        seq: Seq,
        volume_offset: u64,
        data: Vec<u8>,
    },
}

#[derive(Debug)]
struct Flight {
    path: Path,
    /// Connection generation (DR link, aux link) or DR incarnation (notify, apply).
    generation: u32,
    resolved: bool,
    cargo: Cargo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Flight(usize),
    LocalWriteDone(Seq),
    ClientIssue,
    Tick,
    Fault(usize),
    Restart(Node),
    DrLinkUp,
    AuxLinkUp,
    PrimaryEnds,
    FailoverStep,
    HealCut,
    SlowLinkEnds,
    DrLinkBack,
    EndRun,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Dr,
    Aux,
}

/// Where the failover stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// The aux declared the primary dead (or a failover was requested).
    FailoverRequested,
    /// The DR refused the stream and asked the aux to fence.
    DrFenced,
    /// The aux is fenced and its frozen table was read.
    TableRead,
    /// The DR applied the usable prefix and took the new epoch.
    Promoted,
    /// The run is over.
    Done,
}

/// How often each fault and each interesting outcome happened in a run: the evidence that a soak
/// reaches the cases it claims to check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub primary_crashes: u64,
    pub primary_cut_from_aux: u64,
    pub primary_cut_from_all: u64,
    pub operator_failovers: u64,
    pub primary_slow_clock: u64,
    pub dr_crashes: u64,
    pub aux_crashes: u64,
    pub link_losses: u64,
    pub slow_links: u64,
    /// Payload writes that landed partially (some chunks, not all) when a connection broke.
    pub torn_payloads: u64,
    /// Aux writes that landed partially when a connection broke.
    pub torn_aux_writes: u64,
    /// Order batches delivered whole as their connection broke.
    pub batches_delivered_at_break: u64,
    /// Fences of a primary that was alive and reachable (false alarms).
    pub false_alarms: u64,
    /// Failovers that had to wait for the old primary's lease to run out.
    pub lease_waits: u64,
    /// Acknowledgements an old primary with a slow clock gave after promotion (each accounted).
    pub acks_after_promotion: u64,
    /// Acknowledgements given while the DR did not hold the order (async, degraded).
    pub degraded_acks: u64,
    /// Degraded acknowledgements outside async mode while the primary still counted the DR
    /// link up: the DR was slow to answer (`Params::degrade_after_ns`).
    pub degraded_acks_link_up: u64,
    /// Old primaries that found themselves fenced after promotion.
    pub old_primaries_fenced: u64,
    /// Local writes on the primary that failed (it stops; failover follows).
    pub local_write_failures: u64,
    /// Polls in which the primary's runtime took several events before the primary acted
    /// (`Params::primary_poll_window_ns`).
    pub primary_polls: u64,
}

impl Coverage {
    pub fn add(&mut self, other: &Coverage) {
        self.primary_crashes += other.primary_crashes;
        self.primary_cut_from_aux += other.primary_cut_from_aux;
        self.primary_cut_from_all += other.primary_cut_from_all;
        self.operator_failovers += other.operator_failovers;
        self.primary_slow_clock += other.primary_slow_clock;
        self.dr_crashes += other.dr_crashes;
        self.aux_crashes += other.aux_crashes;
        self.link_losses += other.link_losses;
        self.slow_links += other.slow_links;
        self.torn_payloads += other.torn_payloads;
        self.torn_aux_writes += other.torn_aux_writes;
        self.batches_delivered_at_break += other.batches_delivered_at_break;
        self.false_alarms += other.false_alarms;
        self.lease_waits += other.lease_waits;
        self.acks_after_promotion += other.acks_after_promotion;
        self.degraded_acks += other.degraded_acks;
        self.degraded_acks_link_up += other.degraded_acks_link_up;
        self.old_primaries_fenced += other.old_primaries_fenced;
        self.local_write_failures += other.local_write_failures;
        self.primary_polls += other.primary_polls;
    }

    /// Name and count of every counter, for printing.
    pub fn rows(&self) -> [(&'static str, u64); 20] {
        [
            ("primary crashes", self.primary_crashes),
            ("primaries cut off from the aux", self.primary_cut_from_aux),
            (
                "primaries cut off from everything",
                self.primary_cut_from_all,
            ),
            (
                "operator failovers of a live primary",
                self.operator_failovers,
            ),
            ("primaries with a slow clock", self.primary_slow_clock),
            ("DR crashes and restarts", self.dr_crashes),
            ("aux crashes and restarts", self.aux_crashes),
            ("primary-DR link losses", self.link_losses),
            ("slow-link episodes", self.slow_links),
            ("torn payload writes", self.torn_payloads),
            ("torn aux writes", self.torn_aux_writes),
            (
                "batches delivered as their link broke",
                self.batches_delivered_at_break,
            ),
            ("false alarms (live primary fenced)", self.false_alarms),
            ("failovers waiting out a lease", self.lease_waits),
            (
                "acks after promotion (slow clock), all accounted",
                self.acks_after_promotion,
            ),
            (
                "acks without the DR holding the order (async, degraded)",
                self.degraded_acks,
            ),
            (
                "  of them degraded on a slow DR answer, link up",
                self.degraded_acks_link_up,
            ),
            (
                "old primaries fenced after promotion",
                self.old_primaries_fenced,
            ),
            (
                "local writes that failed (primary stops)",
                self.local_write_failures,
            ),
            (
                "polls of several events before the primary acted",
                self.primary_polls,
            ),
        ]
    }
}

/// What the world knows about each client write, independently of the protocol.
#[derive(Clone, Debug)]
pub struct OpTruth {
    pub seq: Seq,
    pub volume_offset: u64,
    pub data: Vec<u8>,
    pub acked_at: Option<Nanos>,
    pub acked_degraded: bool,
    pub failed: bool,
    /// The aux table held a valid "replicated" entry for this op at some point (I2).
    pub aux_recorded_replicated: bool,
    /// The op's whole payload landed in the DR's ring at some point (I6 in sync mode).
    pub payload_landed: bool,
}

pub struct World {
    pub params: Params,
    /// Within a poll (`Params::primary_poll_window_ns`) the primary's actions wait; `owed`
    /// says some input produced work since they were last taken.
    primary_actions_deferred: bool,
    primary_actions_owed: bool,
    rng: Rng,
    now: Nanos,
    steps: u64,
    queue: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    scheduled: u64,
    flights: Vec<Flight>,
    path_clock: [Nanos; PATHS],
    held: [bool; PATHS],
    parked: Vec<usize>,
    dr_link_slowdown: u64,

    primary: Option<Primary>,
    primary_cut_from_aux: bool,
    primary_cut_from_dr: bool,
    /// The primary-DR link is down by a link-loss fault (independent of the primary's end).
    dr_link_lost: bool,
    staging: Vec<u8>,

    dr: Option<Dr<Vec<u8>>>,
    dr_log_at_rest: Option<Vec<u8>>,
    dr_incarnation: u32,
    pub(crate) dr_ring: Vec<u8>,
    pub(crate) dr_volume: Vec<u8>,
    ring_revoked: bool,

    aux: Option<Aux<Vec<u8>>>,
    aux_region_at_rest: Option<Vec<u8>>,
    aux_revoked: bool,

    dr_link_generation: u32,
    dr_link_up: bool,
    dr_link_up_pending: bool,
    aux_link_generation: u32,
    aux_link_up: bool,
    aux_link_up_pending: bool,

    pub(crate) initial_image: Vec<u8>,
    pub(crate) truth: Vec<OpTruth>,
    waiting_clients: VecDeque<(u64, Vec<u8>)>,
    clients_outstanding: u64,
    issued: u64,
    client_issue_pending: bool,
    workload_on: bool,

    pub(crate) phase: Phase,
    failover_requested_at: Option<Nanos>,
    pub(crate) promoted_at: Option<Nanos>,
    pub(crate) report: Option<LossReport>,
    frozen_table: Option<Vec<u8>>,
    pub(crate) aux_region_at_fence: Option<Vec<u8>>,
    pub(crate) volume_at_promotion: Option<Vec<u8>>,
    pub(crate) violations: Vec<Violation>,
    pub(crate) coverage: Coverage,
    /// The next local write on the primary fails (`Fault::LocalWriteFailure`).
    fail_next_local_write: bool,
    /// Applies of the current DR incarnation not yet completed.
    applies_in_flight: u64,
    /// The last apply completed but not yet reported to the DR (reported in batches).
    apply_done_unreported: Option<Seq>,
    /// Seqs the old primary acknowledged after the DR was promoted (possible only with a slow
    /// clock; each must be applied or reported).
    pub(crate) acked_after_promotion: Vec<Seq>,
    trace: Option<Vec<String>>,
    tick_pending: bool,
}

fn jitter(rng: &mut Rng, (base, spread): (Nanos, Nanos)) -> Nanos {
    base + if spread == 0 { 0 } else { rng.range(0, spread) }
}

impl World {
    pub fn new(params: Params) -> World {
        params
            .geometry
            .validate()
            .expect("simulated geometry is valid");
        let geometry = params.geometry;
        let mut rng = Rng::new(params.seed);
        let mut initial_image = vec![0u8; geometry.volume_bytes as usize];
        rng.fill(&mut initial_image);
        let dr_ring = vec![0u8; geometry.ring_bytes as usize];
        let dr_config = DrConfig {
            applies_inflight_max: params.applies_inflight_max,
            mutations: params.mutations,
            ..DrConfig::new(geometry)
        };
        let dr = Dr::open(
            dr_config,
            vec![0u8; dr_log_bytes(geometry.table_slots)],
            1,
            &dr_ring,
        )
        .expect("fresh DR log opens");
        let aux_config = AuxConfig {
            geometry,
            heartbeat_timeout_ns: params.heartbeat_timeout_ns,
        };
        let aux = Aux::open(
            aux_config,
            vec![0u8; aux_region_bytes(geometry.table_slots)],
            1,
            0,
        )
        .expect("fresh aux region opens");
        let primary_config = PrimaryConfig {
            order_batch_records_max: params.order_batch_records_max,
            order_batches_inflight_max: params.order_batches_inflight_max,
            payload_writes_inflight_max: params.payload_writes_inflight_max,
            heartbeat_interval_ns: params.heartbeat_interval_ns,
            lease_ns: params.heartbeat_timeout_ns / 2,
            link_loss_policy: params.link_loss_policy,
            degrade_after_ns: params.degrade_after_ns,
            mutations: params.mutations,
            ..PrimaryConfig::new(geometry, params.mode)
        };
        let mut world = World {
            rng,
            now: 0,
            steps: 0,
            queue: BinaryHeap::new(),
            scheduled: 0,
            flights: Vec::new(),
            path_clock: [0; PATHS],
            held: [false; PATHS],
            parked: Vec::new(),
            dr_link_slowdown: 1,
            primary: Some(Primary::new(primary_config)),
            primary_cut_from_aux: false,
            primary_cut_from_dr: false,
            dr_link_lost: false,
            staging: vec![0u8; geometry.ring_bytes as usize],
            dr: Some(dr),
            dr_log_at_rest: None,
            dr_incarnation: 1,
            dr_ring,
            dr_volume: initial_image.clone(),
            ring_revoked: false,
            aux: Some(aux),
            aux_region_at_rest: None,
            aux_revoked: false,
            dr_link_generation: 1,
            dr_link_up: false,
            dr_link_up_pending: false,
            aux_link_generation: 1,
            aux_link_up: false,
            aux_link_up_pending: false,
            initial_image,
            truth: Vec::new(),
            waiting_clients: VecDeque::new(),
            clients_outstanding: 0,
            issued: 0,
            client_issue_pending: false,
            workload_on: params.ops_total > 0,
            phase: Phase::Running,
            failover_requested_at: None,
            promoted_at: None,
            report: None,
            frozen_table: None,
            aux_region_at_fence: None,
            volume_at_promotion: None,
            violations: Vec::new(),
            coverage: Coverage::default(),
            fail_next_local_write: false,
            primary_actions_deferred: false,
            primary_actions_owed: false,
            applies_in_flight: 0,
            apply_done_unreported: None,
            acked_after_promotion: Vec::new(),
            trace: None,
            tick_pending: false,
            params,
        };
        if world.params.primary_clock_percent < 100 {
            world.coverage.primary_slow_clock += 1;
        }
        for index in 0..world.params.faults.len() {
            let at = world.params.faults[index].0;
            world.schedule_at(at, Event::Fault(index));
        }
        world.schedule_in(0, Event::DrLinkUp);
        world.dr_link_up_pending = true;
        world.schedule_in(0, Event::AuxLinkUp);
        world.aux_link_up_pending = true;
        world.ensure_tick();
        if world.workload_on {
            world.schedule_in(0, Event::ClientIssue);
            world.client_issue_pending = true;
        }
        world
    }

    /// Records a readable line for every step from now on (for replaying a failing seed).
    pub fn enable_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    pub fn take_trace(&mut self) -> Vec<String> {
        self.trace.take().unwrap_or_default()
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>12}ns {}", self.now, line()));
        }
    }

    pub fn now(&self) -> Nanos {
        self.now
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn report(&self) -> Option<&LossReport> {
        self.report.as_ref()
    }
    pub fn truth(&self) -> &[OpTruth] {
        &self.truth
    }
    pub fn primary(&self) -> Option<&Primary> {
        self.primary.as_ref()
    }
    pub fn dr(&self) -> Option<&Dr<Vec<u8>>> {
        self.dr.as_ref()
    }
    pub fn dr_volume(&self) -> &[u8] {
        &self.dr_volume
    }
    pub fn aux_table_entry(&self, seq: Seq) -> Option<AuxEntry> {
        let area = self.aux_area()?;
        let at = AUX_ENTRIES_OFFSET + self.params.geometry.slot_of(seq) * AUX_ENTRY_BYTES;
        AuxEntry::decode(&area[at..at + AUX_ENTRY_BYTES])
            .ok()
            .flatten()
            .filter(|entry| entry.seq == seq)
    }

    pub(crate) fn aux_region_now(&self) -> Option<&[u8]> {
        match (&self.aux, &self.aux_region_at_rest) {
            (Some(aux), _) => Some(aux.region()),
            (None, Some(region)) => Some(region),
            (None, None) => None,
        }
    }

    fn aux_area(&self) -> Option<&[u8]> {
        let region: &[u8] = match (&self.aux, &self.aux_region_at_rest) {
            (Some(aux), _) => aux.region(),
            (None, Some(region)) => region,
            (None, None) => return None,
        };
        Some(&region[AUX_PRIMARY_AREA_OFFSET..])
    }

    // ----- scheduling -----

    fn schedule_at(&mut self, at: Nanos, event: Event) {
        self.scheduled += 1;
        self.queue
            .push(Reverse((at.max(self.now), self.scheduled, event)));
    }

    fn schedule_in(&mut self, delay: Nanos, event: Event) {
        self.schedule_at(self.now + delay, event);
    }

    fn ensure_tick(&mut self) {
        if !self.tick_pending && self.phase != Phase::Done {
            self.tick_pending = true;
            self.schedule_in(self.params.tick_ns, Event::Tick);
        }
    }

    fn latency(&mut self, path: Path) -> Nanos {
        let params = &self.params;
        let spec = match path {
            Path::OrderToDr | Path::DrToPrimary | Path::PayloadToDr | Path::PayloadCompletion => {
                let (base, spread) = params.dr_link_ns;
                (base * self.dr_link_slowdown, spread * self.dr_link_slowdown)
            }
            Path::AuxWrite | Path::AuxCompletion => params.aux_link_ns,
            Path::DrNotify => params.dr_notify_ns,
            Path::Apply => params.apply_ns,
        };
        jitter(&mut self.rng, spec)
    }

    /// Sends cargo on a path: in order behind whatever is already on it.
    fn launch(&mut self, path: Path, cargo: Cargo) {
        let generation = match path {
            p if p.on_dr_link() => self.dr_link_generation,
            p if p.on_aux_link() => self.aux_link_generation,
            _ => self.dr_incarnation,
        };
        let delay = self.latency(path);
        let at = (self.now + delay).max(self.path_clock[path.index()]);
        self.path_clock[path.index()] = at;
        self.flights.push(Flight {
            path,
            generation,
            resolved: false,
            cargo,
        });
        let id = self.flights.len() - 1;
        self.schedule_at(at, Event::Flight(id));
    }

    // ----- scenario controls -----

    /// Holds everything on `path` where it is (in flight) until [`World::release`].
    pub fn hold(&mut self, path: Path) {
        self.held[path.index()] = true;
    }

    /// Lets `path` move again; what was held arrives now, in order.
    pub fn release(&mut self, path: Path) {
        self.held[path.index()] = false;
        let parked = std::mem::take(&mut self.parked);
        for id in parked {
            if self.flights[id].path == path {
                self.path_clock[path.index()] = self.path_clock[path.index()].max(self.now);
                self.schedule_in(0, Event::Flight(id));
            } else {
                self.parked.push(id);
            }
        }
    }

    /// Issues one client write now (scenario tests). Returns the client's index in `truth` order
    /// once admitted; writes refused for backpressure wait and are retried.
    pub fn client_write(&mut self, volume_offset: u64, data: Vec<u8>) {
        self.waiting_clients.push_back((volume_offset, data));
        self.clients_outstanding += 1;
        self.admit_waiting();
    }

    /// Runs until nothing is left to do except timers, or `limit_ns` of simulated time passed.
    pub fn run_for(&mut self, limit_ns: Nanos) {
        let until = self.now + limit_ns;
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > until {
                break;
            }
            self.step();
        }
        self.now = self.now.max(until);
    }

    /// Kills the primary now (scenario tests).
    pub fn crash_primary(&mut self) {
        self.end_primary(PrimaryEnd::Crash);
    }

    /// Cuts the live primary off from the aux (and, with `also_dr`, from the DR) now; the cut
    /// heals a while after the DR is promoted (scenario tests).
    pub fn cut_primary_off(&mut self, also_dr: bool) {
        self.end_primary(if also_dr {
            PrimaryEnd::CutFromAll
        } else {
            PrimaryEnd::CutFromAux
        });
    }

    /// Kills the DR process now; it stays down until [`World::restart_dr`] (scenario tests).
    pub fn crash_dr(&mut self) {
        self.params.faults.push((
            self.now,
            Fault::DrCrash {
                down_ns: Nanos::MAX / 4,
            },
        ));
        let index = self.params.faults.len() - 1;
        self.inject(index);
    }

    /// Restarts a crashed DR from its log and ring (scenario tests).
    pub fn restart_dr(&mut self) {
        self.restart(Node::Dr);
    }

    /// Restarts a crashed DR from an empty state directory, as an operator who wiped or replaced
    /// it would: a blank log and ring, so it holds none of what it acknowledged before (scenario
    /// tests; what it forgot is lost, which no invariant can survive, so the checker is not for
    /// this).
    pub fn restart_dr_from_empty_state(&mut self) {
        if self.dr_log_at_rest.is_some() {
            self.dr_log_at_rest = Some(vec![0u8; dr_log_bytes(self.params.geometry.table_slots)]);
            self.dr_ring.fill(0);
        }
        self.restart(Node::Dr);
    }

    /// Runs the whole failover (fence, read the aux table, recover, promote) and returns the
    /// report. Panics if it does not finish within a simulated minute.
    pub fn fail_over(&mut self) -> LossReport {
        if self.phase == Phase::Running {
            self.request_failover();
        }
        let deadline = self.now + 60_000_000_000;
        while self.phase < Phase::Promoted && self.now < deadline {
            if !self.step() {
                break;
            }
        }
        assert!(
            self.phase >= Phase::Promoted,
            "failover did not finish: {:?}",
            self.phase
        );
        self.report.clone().expect("promoted with a report")
    }

    /// Checks I1-I6 on what happened so far.
    pub fn check(&self) -> Verdict {
        checker::check(self)
    }

    // ----- the seeded run -----

    /// Runs a drawn seed to the end: workload, faults, the primary's end, failover, a while
    /// after promotion (old primary returning), then the invariant check.
    pub fn run_to_end(&mut self) -> Verdict {
        if self.params.primary_end_after_events.is_none() && !self.workload_on {
            self.schedule_in(0, Event::PrimaryEnds);
        }
        while self.phase != Phase::Done {
            if self.now > self.params.time_limit_ns {
                self.violations.push(Violation::Liveness(format!(
                    "run not over at {} ns, phase {:?}",
                    self.now, self.phase
                )));
                break;
            }
            if !self.step() {
                self.violations.push(Violation::Liveness(format!(
                    "nothing left to do in phase {:?}",
                    self.phase
                )));
                break;
            }
        }
        self.check()
    }

    /// One event. Returns false if there was none.
    pub fn step(&mut self) -> bool {
        let Some(Reverse((at, _, event))) = self.queue.pop() else {
            return false;
        };
        let window = self.params.primary_poll_window_ns;
        self.primary_actions_deferred = window > 0;
        self.take_event(at, event);
        // One poll: every event due within the window is handled before the primary acts.
        if window > 0 {
            let mut taken = 1;
            while let Some(Reverse((next_at, _, _))) = self.queue.peek() {
                if *next_at > at + window {
                    break;
                }
                let Some(Reverse((next_at, _, event))) = self.queue.pop() else {
                    break;
                };
                self.take_event(next_at, event);
                taken += 1;
            }
            self.coverage.primary_polls += u64::from(taken > 1);
        }
        self.primary_actions_deferred = false;
        if std::mem::take(&mut self.primary_actions_owed) {
            self.run_primary_actions();
        }
        self.admit_waiting();
        true
    }

    fn take_event(&mut self, at: Nanos, event: Event) {
        self.now = self.now.max(at);
        self.steps += 1;
        if let Some(limit) = self.params.primary_end_after_events {
            if self.steps == limit && self.phase == Phase::Running && self.primary.is_some() {
                self.schedule_in(0, Event::PrimaryEnds);
            }
        }
        self.handle(event);
        if self.primary_actions_deferred {
            // Client writes are taken as they arrive within a poll, before the primary acts.
            self.admit_waiting();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Flight(id) => self.arrive(id),
            Event::LocalWriteDone(seq) => {
                if let Some(primary) = &mut self.primary {
                    if primary.stopped().is_none() {
                        if std::mem::take(&mut self.fail_next_local_write) {
                            primary.handle_local_write_failed(seq);
                        } else {
                            primary.handle_local_write_done(
                                seq,
                                self.now * self.params.primary_clock_percent / 100,
                            );
                        }
                        self.run_primary_actions();
                    }
                }
            }
            Event::ClientIssue => {
                self.client_issue_pending = false;
                self.issue_clients();
            }
            Event::Tick => {
                self.tick_pending = false;
                self.tick();
            }
            Event::Fault(index) => self.inject(index),
            Event::Restart(node) => self.restart(node),
            Event::DrLinkUp => {
                self.dr_link_up_pending = false;
                self.connect_dr();
            }
            Event::AuxLinkUp => {
                self.aux_link_up_pending = false;
                self.connect_aux();
            }
            Event::PrimaryEnds => {
                if self.phase == Phase::Running
                    && self.primary.is_some()
                    && !self.primary_cut_from_aux
                {
                    let end = self.params.primary_end;
                    self.end_primary(end);
                }
            }
            Event::FailoverStep => self.failover_step(),
            Event::HealCut => {
                self.note(|| "the cut around the old primary heals".into());
                self.primary_cut_from_aux = false;
                self.primary_cut_from_dr = false;
                self.schedule_dr_link_up();
                self.schedule_aux_link_up();
            }
            Event::SlowLinkEnds => self.dr_link_slowdown = 1,
            Event::DrLinkBack => {
                self.dr_link_lost = false;
                self.schedule_dr_link_up();
            }
            Event::EndRun => {
                self.note(|| "run over".into());
                self.phase = Phase::Done;
            }
        }
    }

    // ----- workload -----

    fn issue_clients(&mut self) {
        // Clients of a primary that is cut off but alive keep writing to it, even after the DR
        // was promoted: that is what fencing must stand up to.
        if !self.workload_on
            || self
                .primary
                .as_ref()
                .is_none_or(|primary| primary.stopped().is_some())
        {
            return;
        }
        while self.issued < self.params.ops_total
            && self.clients_outstanding < self.params.queue_depth
        {
            let geometry = self.params.geometry;
            let sector = u64::from(geometry.sector_bytes);
            let sectors_max = u64::from(geometry.payload_bytes_max) / sector;
            let len = self.rng.range(1, sectors_max) * sector;
            let offset = self.rng.range(0, (geometry.volume_bytes - len) / sector) * sector;
            let mut data = vec![0u8; len as usize];
            self.rng.fill(&mut data);
            self.issued += 1;
            self.clients_outstanding += 1;
            self.waiting_clients.push_back((offset, data));
        }
        if self.issued == self.params.ops_total
            && self.clients_outstanding == 0
            && self.phase == Phase::Running
        {
            self.schedule_in(0, Event::PrimaryEnds);
        }
    }

    fn admit_waiting(&mut self) {
        while let Some((offset, data)) = self.waiting_clients.front() {
            let Some(primary) = &mut self.primary else {
                return;
            };
            let tag = self.truth.len() as u64;
            match primary.handle_client_write(
                tag,
                *offset,
                data,
                &mut self.staging,
                self.now * self.params.primary_clock_percent / 100,
            ) {
                Ok(admitted) => {
                    let (offset, data) = self.waiting_clients.pop_front().expect("front exists");
                    assert_eq!(
                        admitted.seq,
                        self.truth.len() as u64 + 1,
                        "seqs are assigned densely from 1"
                    );
                    self.note(|| {
                        format!(
                            "primary admits seq {} ({} bytes at {offset})",
                            admitted.seq,
                            data.len()
                        )
                    });
                    self.truth.push(OpTruth {
                        seq: admitted.seq,
                        volume_offset: offset,
                        data,
                        acked_at: None,
                        acked_degraded: false,
                        failed: false,
                        aux_recorded_replicated: false,
                        payload_landed: false,
                    });
                    self.run_primary_actions();
                }
                Err(WriteRefused::Backpressure(limit)) => {
                    self.note(|| format!("primary applies backpressure: {limit:?}"));
                    return;
                }
                Err(WriteRefused::Stopped) => {
                    self.drop_waiting_clients();
                    return;
                }
                Err(WriteRefused::Invalid(error)) => {
                    panic!("the simulated client sent an invalid write: {error}")
                }
            }
        }
    }

    fn client_done(&mut self) {
        self.clients_outstanding -= 1;
        if self.workload_on && !self.client_issue_pending {
            self.client_issue_pending = true;
            self.schedule_in(0, Event::ClientIssue);
        }
    }

    // ----- executing the roles' actions -----

    fn run_primary_actions(&mut self) {
        if self.primary_actions_deferred {
            self.primary_actions_owed = true;
            return;
        }
        let Some(primary) = &mut self.primary else {
            return;
        };
        let actions: Vec<PrimaryAction> = primary.drain_actions().collect();
        for action in actions {
            self.exec_primary(action);
        }
    }

    fn exec_primary(&mut self, action: PrimaryAction) {
        self.note(|| format!("primary: {action:?}"));
        match action {
            PrimaryAction::LocalWrite { seq, .. } => {
                let delay = jitter(&mut self.rng, self.params.local_write_ns);
                self.schedule_in(delay, Event::LocalWriteDone(seq));
            }
            PrimaryAction::SendOrderBatch { buffer, len, .. } => {
                if self.dr_link_up {
                    let bytes = self
                        .primary
                        .as_ref()
                        .expect("acting primary")
                        .order_batch(buffer)[..len]
                        .to_vec();
                    self.launch(Path::OrderToDr, Cargo::Send { bytes });
                }
            }
            PrimaryAction::WritePayload {
                seq,
                ring_offset,
                len,
                imm,
            } => {
                if self.dr_link_up {
                    let data = self.staging
                        [ring_offset as usize..ring_offset as usize + len as usize]
                        .to_vec();
                    self.launch(
                        Path::PayloadToDr,
                        Cargo::Payload {
                            seq,
                            ring_offset,
                            data,
                            imm,
                        },
                    );
                }
            }
            PrimaryAction::WriteAux { offset, len, tag } => {
                if self.aux_link_up {
                    let data = self.primary.as_ref().expect("acting primary").aux_area()
                        [offset..offset + len]
                        .to_vec();
                    self.launch(Path::AuxWrite, Cargo::AuxWrite { offset, data, tag });
                }
            }
            PrimaryAction::AckClient { seq, degraded, .. } => {
                self.check_ack(seq, degraded);
                let op = &mut self.truth[seq as usize - 1];
                op.acked_at = Some(self.now);
                op.acked_degraded = degraded;
                self.coverage.degraded_acks += u64::from(degraded);
                if degraded
                    && self.params.mode != Mode::Async
                    && self.primary.as_ref().is_some_and(Primary::is_dr_link_up)
                {
                    self.coverage.degraded_acks_link_up += 1;
                }
                self.client_done();
            }
            PrimaryAction::FailClient { seq, .. } => {
                self.truth[seq as usize - 1].failed = true;
                self.client_done();
            }
            PrimaryAction::Stopped(why) => {
                // Being fenced is the expected end once the aux or the DR has fenced (a false
                // alarm on a live primary included); any other stop is a bug.
                let fenced = self.aux_revoked || self.ring_revoked || self.phase > Phase::Running;
                // A failed local write is a reason to stop when the simulator injected it.
                let expected = (matches!(
                    why,
                    PrimaryStop::FencedByAux | PrimaryStop::FencedByDr { .. }
                ) && fenced)
                    || (matches!(why, PrimaryStop::LocalWriteFailed { .. })
                        && self.coverage.local_write_failures > 0);
                if !expected {
                    self.violations.push(Violation::Protocol(format!(
                        "primary stopped in phase {:?}: {why:?}",
                        self.phase
                    )));
                } else if !matches!(why, PrimaryStop::LocalWriteFailed { .. }) {
                    self.coverage.old_primaries_fenced += 1;
                }
                self.workload_on = false;
                self.drop_waiting_clients();
            }
        }
    }

    /// Clients not yet admitted when the primary stops or dies get no answer from it.
    fn drop_waiting_clients(&mut self) {
        self.clients_outstanding -= self.waiting_clients.len() as u64;
        self.waiting_clients.clear();
    }

    /// I6 (and I5): checked at the moment of the ack.
    fn check_ack(&mut self, seq: Seq, degraded: bool) {
        if self.phase >= Phase::Promoted {
            if self.params.primary_clock_percent >= 100 {
                // With a clock that keeps time, the lease forbids any acknowledgement after
                // promotion.
                self.violations.push(Violation::I5Fencing(format!("old primary acknowledged seq {seq} after the DR was promoted, within its lease")));
            }
            // With a slow clock the lease can be overrun; then the ack must be of a write the
            // failover accounted for (checked after the run).
            self.acked_after_promotion.push(seq);
            self.coverage.acks_after_promotion += 1;
        }
        // The primary says which acknowledgements were degraded, and I6 spares those; so a
        // degraded one outside async mode and the degrade policy breaks I6 by itself.
        if degraded
            && self.params.mode != Mode::Async
            && self.params.link_loss_policy != LinkLossPolicy::Degrade
        {
            self.violations.push(Violation::I6SyncOrder(format!(
                "seq {seq} acknowledged as degraded under the block policy"
            )));
        }
        let order_bound = matches!(self.params.mode, Mode::OrderSync | Mode::Sync) && !degraded;
        if !order_bound {
            return;
        }
        let op = &self.truth[seq as usize - 1];
        let held = self.dr_record(seq);
        let expected_len = op.data.len() as u32;
        let holds = held.is_some_and(|record| {
            record.volume_offset == op.volume_offset && record.len == expected_len
        });
        if !holds {
            self.violations.push(Violation::I6SyncOrder(format!(
                "seq {seq} acknowledged while the DR does not hold its order record"
            )));
        }
        // Sync mode: the whole payload must have landed in the DR's ring before the ack (it
        // may be overwritten by now, after the DR applied it and the ring space was reused).
        if self.params.mode == Mode::Sync && !op.payload_landed {
            self.violations.push(Violation::I6SyncOrder(format!(
                "seq {seq} acknowledged in sync mode before its payload reached the DR"
            )));
        }
    }

    fn dr_record(&self, seq: Seq) -> Option<OrderRecord> {
        match (&self.dr, &self.dr_log_at_rest) {
            (Some(dr), _) => dr.held_record(seq),
            (None, Some(log)) => log_record(log, &self.params.geometry, seq),
            (None, None) => None,
        }
    }

    fn run_dr_actions(&mut self) {
        let Some(dr) = &mut self.dr else { return };
        let actions: Vec<DrAction> = dr.drain_actions().collect();
        for action in actions {
            self.note(|| format!("dr: {action:?}"));
            match action {
                DrAction::Send(message) => {
                    if self.dr_link_up {
                        self.launch(
                            Path::DrToPrimary,
                            Cargo::Send {
                                bytes: message.as_bytes().to_vec(),
                            },
                        );
                    }
                }
                DrAction::Apply {
                    seq,
                    volume_offset,
                    ring_offset,
                    len,
                } => {
                    let data = self.dr_ring
                        [ring_offset as usize..ring_offset as usize + len as usize]
                        .to_vec();
                    // I3: what is applied must be exactly the bytes the client wrote for this op.
                    match self.truth.get(seq as usize - 1) {
                        Some(op) if op.volume_offset == volume_offset && op.data == data => {}
                        Some(_) => self.violations.push(Violation::I3Integrity(format!(
                            "seq {seq} applied with torn or stale ring bytes"
                        ))),
                        None => self.violations.push(Violation::I3Integrity(format!(
                            "seq {seq} applied but never written by a client"
                        ))),
                    }
                    self.applies_in_flight += 1;
                    self.launch(
                        Path::Apply,
                        Cargo::Apply {
                            seq,
                            volume_offset,
                            data,
                        },
                    );
                }
                DrAction::RevokeRingAccess => {
                    self.ring_revoked = true;
                    self.break_dr_link("DR revoked the primary's ring access");
                }
                DrAction::Promoted { epoch } => {
                    self.note(|| format!("DR promoted at epoch {epoch}"));
                    self.phase = Phase::Promoted;
                    self.promoted_at = Some(self.now);
                    self.volume_at_promotion = Some(self.dr_volume.clone());
                    // The old primary, if alive, gets back in touch after a while: it must find
                    // itself fenced. Then the run ends.
                    if self.primary.is_some() {
                        let heal_at = self.rng.range(1_000_000, 20_000_000);
                        self.schedule_in(heal_at, Event::HealCut);
                    }
                    self.schedule_in(60_000_000, Event::EndRun);
                }
            }
        }
    }

    fn run_aux_actions(&mut self) {
        let Some(aux) = &mut self.aux else { return };
        let actions: Vec<AuxAction> = aux.drain_actions().collect();
        for action in actions {
            self.note(|| format!("aux: {action:?}"));
            match action {
                AuxAction::RevokePrimaryAccess => {
                    let live = self.primary.as_ref().is_some_and(|p| p.stopped().is_none());
                    if live
                        && !self.primary_cut_from_aux
                        && !self.aux_revoked
                        && self.phase == Phase::Running
                    {
                        self.coverage.false_alarms += 1;
                    }
                    self.aux_revoked = true;
                    self.break_aux_link("aux revoked the primary's access");
                }
                AuxAction::NotifyPrimaryLost { .. } => {
                    if self.phase == Phase::Running {
                        self.request_failover();
                    }
                }
                // Only logged by the runtime (the note above records it here).
                AuxAction::TicksStalled { .. } => {}
            }
        }
    }

    // ----- arrivals -----

    fn arrive(&mut self, id: usize) {
        let flight = &self.flights[id];
        if flight.resolved {
            return;
        }
        let path = flight.path;
        if self.held[path.index()] {
            self.parked.push(id);
            return;
        }
        let current = match path {
            p if p.on_dr_link() => flight.generation == self.dr_link_generation && self.dr_link_up,
            p if p.on_aux_link() => {
                flight.generation == self.aux_link_generation && self.aux_link_up
            }
            _ => flight.generation == self.dr_incarnation && self.dr.is_some(),
        };
        self.flights[id].resolved = true;
        if !current {
            return;
        }
        let cargo = std::mem::replace(&mut self.flights[id].cargo, Cargo::PayloadDone { seq: 0 });
        match cargo {
            Cargo::Send { bytes } => self.deliver_send(path, &bytes),
            Cargo::Payload {
                seq,
                ring_offset,
                data,
                imm,
            } => {
                if self.ring_revoked {
                    self.break_dr_link("payload write hit a revoked ring (remote access error)");
                    return;
                }
                self.dr_ring[ring_offset as usize..ring_offset as usize + data.len()]
                    .copy_from_slice(&data);
                self.note(|| format!("payload seq {seq} landed at ring {ring_offset}"));
                if let Some(op) = self.truth.get_mut(seq as usize - 1) {
                    op.payload_landed |= op.data == data;
                }
                self.launch(Path::PayloadCompletion, Cargo::PayloadDone { seq });
                if self.dr.is_some() {
                    self.launch(Path::DrNotify, Cargo::Notify { imm });
                }
            }
            Cargo::PayloadDone { seq } => {
                if let Some(primary) = &mut self.primary {
                    primary.handle_payload_write_done(
                        seq,
                        self.now * self.params.primary_clock_percent / 100,
                    );
                    self.run_primary_actions();
                }
            }
            Cargo::Notify { imm } => {
                let dr = self.dr.as_mut().expect("current incarnation");
                if let Err(error) = dr.handle_payload_landed(imm, &self.dr_ring) {
                    self.violations.push(Violation::Protocol(format!(
                        "DR rejected a completed payload write (imm {imm}): {error}"
                    )));
                }
                self.run_dr_actions();
            }
            Cargo::AuxWrite { offset, data, tag } => {
                if self.aux_revoked {
                    self.launch(Path::AuxCompletion, Cargo::AuxDone { tag, ok: false });
                    return;
                }
                self.land_on_aux(offset, &data, None);
                self.launch(Path::AuxCompletion, Cargo::AuxDone { tag, ok: true });
            }
            Cargo::AuxDone { tag, ok } => {
                if let Some(primary) = &mut self.primary {
                    if ok {
                        primary.handle_aux_write_done(
                            tag,
                            self.now * self.params.primary_clock_percent / 100,
                        );
                    } else {
                        primary.handle_aux_write_failed(
                            true,
                            self.now * self.params.primary_clock_percent / 100,
                        );
                    }
                    self.run_primary_actions();
                }
            }
            Cargo::Apply {
                seq,
                volume_offset,
                data,
            } => {
                self.dr_volume[volume_offset as usize..volume_offset as usize + data.len()]
                    .copy_from_slice(&data);
                self.applies_in_flight -= 1;
                // Like a runtime polling its completions, the world sometimes reports several
                // applies at once, with the last seq (the DR then marks only that one).
                self.apply_done_unreported = Some(seq);
                if self.applies_in_flight == 0 || self.rng.chance(1, 2) {
                    let through = self.apply_done_unreported.take().expect("just set");
                    let dr = self.dr.as_mut().expect("current incarnation");
                    dr.handle_apply_done(through);
                    self.run_dr_actions();
                }
            }
        }
    }

    fn deliver_send(&mut self, path: Path, bytes: &[u8]) {
        match path {
            Path::OrderToDr => {
                let Some(dr) = &mut self.dr else { return };
                let replica = dr.role() == DrRole::Replica;
                if let Err(error) = dr.handle_order_batch(bytes, &self.dr_ring) {
                    if replica {
                        self.violations.push(Violation::Protocol(format!(
                            "DR refused a batch from the primary: {error}"
                        )));
                    } else {
                        self.note(|| format!("DR refused a batch (fenced): {error}"));
                    }
                }
                self.run_dr_actions();
            }
            Path::DrToPrimary => {
                let Some(primary) = &mut self.primary else {
                    return;
                };
                if let Err(error) = primary
                    .handle_dr_message(bytes, self.now * self.params.primary_clock_percent / 100)
                {
                    self.violations.push(Violation::Protocol(format!(
                        "primary rejected a DR message: {error}"
                    )));
                }
                self.run_primary_actions();
            }
            _ => unreachable!("only order batches and DR messages are SENDs"),
        }
    }

    /// Writes bytes into the aux's primary area (whole, or the `chunks` that made it), and notes
    /// every entry that now says "replicated" (ground truth for I2).
    fn land_on_aux(&mut self, offset: usize, data: &[u8], chunks: Option<&[bool]>) {
        let mtu = self.params.mtu_bytes;
        let epoch = 1;
        let region: &mut Vec<u8> = match (&mut self.aux, &mut self.aux_region_at_rest) {
            (Some(aux), _) => aux.nic_region_mut(),
            (None, Some(region)) => region,
            (None, None) => return,
        };
        let area = &mut region[AUX_PRIMARY_AREA_OFFSET..];
        for (index, chunk) in data.chunks(mtu).enumerate() {
            if chunks.is_none_or(|landed| landed[index]) {
                let at = offset + index * mtu;
                area[at..at + chunk.len()].copy_from_slice(chunk);
            }
        }
        if offset + data.len() <= AUX_ENTRIES_OFFSET {
            return;
        }
        let first_slot = offset.saturating_sub(AUX_ENTRIES_OFFSET) / AUX_ENTRY_BYTES;
        let last_slot = (offset + data.len() - 1 - AUX_ENTRIES_OFFSET) / AUX_ENTRY_BYTES;
        for slot in first_slot..=last_slot {
            let at = AUX_ENTRIES_OFFSET + slot * AUX_ENTRY_BYTES;
            if let Ok(Some(entry)) = AuxEntry::decode(&area[at..at + AUX_ENTRY_BYTES]) {
                if entry.status == PrimaryStatus::Replicated && entry.epoch == epoch {
                    if let Some(op) = self.truth.get_mut(entry.seq as usize - 1) {
                        op.aux_recorded_replicated = true;
                    }
                }
            }
        }
    }

    // ----- links and faults -----

    fn connect_dr(&mut self) {
        let alive =
            self.primary.as_ref().is_some_and(|p| p.stopped().is_none()) && self.dr.is_some();
        if self.dr_link_up || !alive || self.primary_cut_from_dr || self.dr_link_lost {
            return;
        }
        self.dr_link_generation += 1;
        self.dr_link_up = true;
        for path in [
            Path::OrderToDr,
            Path::DrToPrimary,
            Path::PayloadToDr,
            Path::PayloadCompletion,
        ] {
            self.path_clock[path.index()] = self.now;
        }
        self.note(|| "primary-DR link up".into());
        let dr = self.dr.as_mut().expect("alive");
        dr.handle_peer_connected();
        self.run_dr_actions();
    }

    fn connect_aux(&mut self) {
        let alive =
            self.primary.as_ref().is_some_and(|p| p.stopped().is_none()) && self.aux.is_some();
        if self.aux_link_up || !alive || self.primary_cut_from_aux {
            return;
        }
        self.aux_link_generation += 1;
        self.aux_link_up = true;
        for path in [Path::AuxWrite, Path::AuxCompletion] {
            self.path_clock[path.index()] = self.now;
        }
        self.note(|| "primary-aux link up".into());
        let primary = self.primary.as_mut().expect("alive");
        primary.handle_aux_up(self.now * self.params.primary_clock_percent / 100);
        self.run_primary_actions();
    }

    fn schedule_dr_link_up(&mut self) {
        if !self.dr_link_up_pending {
            self.dr_link_up_pending = true;
            let delay = self.params.reconnect_ns;
            self.schedule_in(delay, Event::DrLinkUp);
        }
    }

    fn schedule_aux_link_up(&mut self) {
        if !self.aux_link_up_pending {
            self.aux_link_up_pending = true;
            let delay = self.params.reconnect_ns;
            self.schedule_in(delay, Event::AuxLinkUp);
        }
    }

    /// Which chunks of a write in flight made it when its connection broke.
    fn torn_chunks(&mut self, len: usize) -> Vec<bool> {
        let chunks = len.div_ceil(self.params.mtu_bytes);
        if !self.params.partial_at_break {
            return vec![false; chunks];
        }
        match self.rng.range(0, 3) {
            0 => vec![false; chunks],
            1 => vec![true; chunks],
            _ => (0..chunks).map(|_| self.rng.chance(1, 2)).collect(),
        }
    }

    /// The primary-DR connection breaks: SENDs in flight arrive whole or not at all, payload
    /// writes in flight land torn, completions are lost. The primary learns of it at once.
    fn break_dr_link(&mut self, why: &str) {
        if !self.dr_link_up {
            return;
        }
        self.note(|| format!("primary-DR link down: {why}"));
        let generation = self.dr_link_generation;
        // Down first, so that whatever the DR answers to a batch still delivered goes nowhere.
        self.dr_link_up = false;
        self.dr_link_generation += 1;
        for id in 0..self.flights.len() {
            let flight = &self.flights[id];
            if flight.resolved || !flight.path.on_dr_link() || flight.generation != generation {
                continue;
            }
            self.flights[id].resolved = true;
            let cargo =
                std::mem::replace(&mut self.flights[id].cargo, Cargo::PayloadDone { seq: 0 });
            match cargo {
                Cargo::Send { bytes }
                    if self.flights[id].path == Path::OrderToDr
                        && self.params.partial_at_break
                        && self.rng.chance(1, 2) =>
                {
                    if let Some(dr) = &mut self.dr {
                        self.coverage.batches_delivered_at_break += 1;
                        let _ = dr.handle_order_batch(&bytes, &self.dr_ring);
                        self.run_dr_actions();
                    }
                }
                Cargo::Payload {
                    ring_offset,
                    data,
                    seq,
                    ..
                } if !self.ring_revoked || why.contains("revoked") => {
                    let chunks = self.torn_chunks(data.len());
                    if chunks.contains(&true) && chunks.contains(&false) {
                        self.coverage.torn_payloads += 1;
                    }
                    let mtu = self.params.mtu_bytes;
                    for (index, chunk) in data.chunks(mtu).enumerate() {
                        if chunks[index] {
                            let at = ring_offset as usize + index * mtu;
                            self.dr_ring[at..at + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                    self.note(|| format!("payload seq {seq} torn: chunks landed {chunks:?}"));
                    let whole = self.dr_ring
                        [ring_offset as usize..ring_offset as usize + data.len()]
                        == data[..];
                    if let Some(op) = self.truth.get_mut(seq as usize - 1) {
                        op.payload_landed |= whole && op.data == data;
                    }
                }
                _ => {}
            }
        }
        if let Some(primary) = &mut self.primary {
            primary.handle_dr_link_down(self.now * self.params.primary_clock_percent / 100);
            self.run_primary_actions();
        }
        self.schedule_dr_link_up();
    }

    /// The primary-aux connection breaks: aux writes in flight land torn, completions are lost,
    /// and the primary is told its aux writes failed.
    fn break_aux_link(&mut self, why: &str) {
        if !self.aux_link_up {
            return;
        }
        self.note(|| format!("primary-aux link down: {why}"));
        let generation = self.aux_link_generation;
        let revoked = why.contains("revoked");
        for id in 0..self.flights.len() {
            let flight = &self.flights[id];
            if flight.resolved || !flight.path.on_aux_link() || flight.generation != generation {
                continue;
            }
            self.flights[id].resolved = true;
            let cargo =
                std::mem::replace(&mut self.flights[id].cargo, Cargo::PayloadDone { seq: 0 });
            if let Cargo::AuxWrite { offset, data, .. } = cargo {
                let chunks = self.torn_chunks(data.len());
                if chunks.contains(&true) && chunks.contains(&false) {
                    self.coverage.torn_aux_writes += 1;
                }
                self.land_on_aux(offset, &data, Some(&chunks));
            }
        }
        self.aux_link_up = false;
        self.aux_link_generation += 1;
        if let Some(primary) = &mut self.primary {
            primary.handle_aux_write_failed(
                revoked,
                self.now * self.params.primary_clock_percent / 100,
            );
            self.run_primary_actions();
        }
        // The primary reconnects later; if the access was revoked, it then meets the revoked
        // region (a remote access error) and learns it is fenced.
        self.schedule_aux_link_up();
    }

    fn inject(&mut self, index: usize) {
        if self.phase != Phase::Running {
            return;
        }
        let fault = self.params.faults[index].1;
        self.note(|| format!("fault: {fault:?}"));
        match fault {
            Fault::DrCrash { down_ns } => {
                let Some(dr) = self.dr.take() else { return };
                self.coverage.dr_crashes += 1;
                self.break_dr_link("DR crashed");
                // Volume writes in flight land sector by sector, some of them.
                let incarnation = self.dr_incarnation;
                let sector = self.params.geometry.sector_bytes as usize;
                for id in 0..self.flights.len() {
                    let flight = &self.flights[id];
                    if flight.resolved
                        || flight.generation != incarnation
                        || !matches!(flight.path, Path::Apply | Path::DrNotify)
                    {
                        continue;
                    }
                    self.flights[id].resolved = true;
                    if let Cargo::Apply {
                        volume_offset,
                        data,
                        ..
                    } = std::mem::replace(
                        &mut self.flights[id].cargo,
                        Cargo::PayloadDone { seq: 0 },
                    ) {
                        for (index, chunk) in data.chunks(sector).enumerate() {
                            if self.rng.chance(1, 2) {
                                let at = volume_offset as usize + index * sector;
                                self.dr_volume[at..at + chunk.len()].copy_from_slice(chunk);
                            }
                        }
                    }
                }
                self.dr_log_at_rest = Some(dr.into_log());
                // Completions not yet reported die with the process; the restarted DR applies
                // those ops again from its ring.
                self.applies_in_flight = 0;
                self.apply_done_unreported = None;
                self.dr_incarnation += 1;
                self.schedule_in(down_ns, Event::Restart(Node::Dr));
            }
            Fault::AuxCrash { down_ns } => {
                let Some(aux) = self.aux.take() else { return };
                self.coverage.aux_crashes += 1;
                // The aux's memory is a mapped file: it outlives the process. Break the link
                // while the region is still reachable so writes in flight land torn into it.
                self.aux_region_at_rest = Some(aux.into_region());
                self.break_aux_link("aux crashed");
                self.schedule_in(down_ns, Event::Restart(Node::Aux));
            }
            Fault::DrLinkLoss { down_ns } => {
                self.coverage.link_losses += 1;
                self.break_dr_link("link loss");
                // Reconnection is not possible before the link is back.
                self.dr_link_lost = true;
                self.schedule_in(down_ns, Event::DrLinkBack);
            }
            Fault::LocalWriteFailure => {
                self.coverage.local_write_failures += 1;
                self.fail_next_local_write = true;
            }
            Fault::SlowDrLink { factor, for_ns } => {
                self.coverage.slow_links += 1;
                self.dr_link_slowdown = factor;
                self.schedule_in(for_ns, Event::SlowLinkEnds);
            }
        }
    }

    fn restart(&mut self, node: Node) {
        let geometry = self.params.geometry;
        match node {
            Node::Dr => {
                let Some(log) = self.dr_log_at_rest.take() else {
                    return;
                };
                let config = DrConfig {
                    applies_inflight_max: self.params.applies_inflight_max,
                    mutations: self.params.mutations,
                    ..DrConfig::new(geometry)
                };
                match Dr::open(config, log, 1, &self.dr_ring) {
                    Ok(dr) => self.dr = Some(dr),
                    Err(error) => {
                        self.violations.push(Violation::Protocol(format!(
                            "DR could not reopen its log: {error}"
                        )));
                        return;
                    }
                }
                self.note(|| "DR restarted".into());
                self.run_dr_actions();
                self.schedule_dr_link_up();
                if self.phase > Phase::Running {
                    self.schedule_in(0, Event::FailoverStep);
                }
            }
            Node::Aux => {
                let Some(region) = self.aux_region_at_rest.take() else {
                    return;
                };
                let config = AuxConfig {
                    geometry,
                    heartbeat_timeout_ns: self.params.heartbeat_timeout_ns,
                };
                match Aux::open(config, region, 1, self.now) {
                    Ok(aux) => self.aux = Some(aux),
                    Err(error) => {
                        self.violations.push(Violation::Protocol(format!(
                            "aux could not reopen its table: {error}"
                        )));
                        return;
                    }
                }
                self.note(|| "aux restarted".into());
                self.run_aux_actions();
                self.schedule_aux_link_up();
                if self.phase > Phase::Running {
                    self.schedule_in(0, Event::FailoverStep);
                }
            }
        }
    }

    fn end_primary(&mut self, end: PrimaryEnd) {
        self.note(|| format!("the primary ends: {end:?}"));
        match end {
            PrimaryEnd::Crash => {
                self.coverage.primary_crashes += 1;
                self.workload_on = false;
                self.break_dr_link("primary crashed");
                self.break_aux_link("primary crashed");
                self.primary = None;
                self.drop_waiting_clients();
            }
            PrimaryEnd::CutFromAux => {
                self.coverage.primary_cut_from_aux += 1;
                self.primary_cut_from_aux = true;
                self.break_aux_link("primary cut off from the aux");
            }
            PrimaryEnd::OperatorFailover => {
                self.coverage.operator_failovers += 1;
                if self.phase == Phase::Running {
                    self.request_failover();
                }
            }
            PrimaryEnd::CutFromAll => {
                self.coverage.primary_cut_from_all += 1;
                self.primary_cut_from_aux = true;
                self.primary_cut_from_dr = true;
                self.break_aux_link("primary cut off");
                self.break_dr_link("primary cut off");
            }
        }
    }

    fn tick(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        if let Some(primary) = &mut self.primary {
            primary.handle_tick(self.now * self.params.primary_clock_percent / 100);
            self.run_primary_actions();
        }
        if let Some(aux) = &mut self.aux {
            aux.handle_tick(self.now);
            self.run_aux_actions();
        }
        self.ensure_tick();
    }

    // ----- failover -----

    fn request_failover(&mut self) {
        self.note(|| "failover requested".into());
        self.phase = Phase::FailoverRequested;
        self.failover_requested_at = Some(self.now);
        self.schedule_in(0, Event::FailoverStep);
    }

    /// The failover procedure as the DR runs it: fence itself, have the aux fence the primary and
    /// read the frozen table, wait for applies in flight, recover, promote. Each step waits for
    /// the node it needs to be up.
    fn failover_step(&mut self) {
        match self.phase {
            Phase::Running | Phase::Done | Phase::Promoted => {}
            Phase::FailoverRequested => {
                let Some(dr) = &mut self.dr else { return }; // Resumed by the DR's restart.
                dr.begin_failover();
                self.run_dr_actions();
                self.phase = Phase::DrFenced;
                let delay = jitter(&mut self.rng, self.params.dr_link_ns);
                self.schedule_in(delay, Event::FailoverStep);
            }
            Phase::DrFenced => {
                let Some(aux) = &mut self.aux else { return }; // Resumed by the aux's restart.
                let handover_at = aux.handle_fence_request(self.now);
                self.run_aux_actions();
                let aux = self.aux.as_ref().expect("alive");
                // From the revocation on, nothing may change in the table (checked as I5).
                if self.aux_region_at_fence.is_none() {
                    self.aux_region_at_fence = Some(aux.region().clone());
                }
                if handover_at > self.now {
                    if self.frozen_table.is_none() && self.coverage.lease_waits == 0 {
                        self.coverage.lease_waits += 1;
                    }
                    // The old primary's lease may still run: wait it out before reading.
                    self.schedule_at(handover_at, Event::FailoverStep);
                    return;
                }
                self.frozen_table = Some(aux.primary_area().to_vec());
                self.phase = Phase::TableRead;
                let delay = jitter(&mut self.rng, self.params.dr_link_ns);
                self.schedule_in(delay, Event::FailoverStep);
            }
            Phase::TableRead => {
                let Some(dr) = &mut self.dr else { return };
                if dr.role() != DrRole::Fencing || self.report.is_some() {
                    return; // Already recovering (a second wake-up).
                }
                if dr.applies_inflight() {
                    let delay = self.params.apply_ns.0.max(1);
                    self.schedule_in(delay, Event::FailoverStep);
                    return;
                }
                let report = dr.failover(self.frozen_table.as_deref(), &self.dr_ring);
                self.note(|| format!("failover report: {}", report.to_json()));
                self.report = Some(report);
                self.run_dr_actions();
            }
        }
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("seed", &self.params.seed)
            .field("now", &self.now)
            .field("phase", &self.phase)
            .field("admitted", &self.truth.len())
            .field("violations", &self.violations.len())
            .finish_non_exhaustive()
    }
}
