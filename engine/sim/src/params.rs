//! What a seed decides: sizes, mode, latencies, workload and the faults to inject.

use ordinal_proto::{Geometry, LinkLossPolicy, Mode, Mutations, Nanos};

use crate::rng::Rng;

/// How the primary's life ends in a run. Every run ends in a failover, so that every seed is
/// checked against the invariants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryEnd {
    /// The primary process dies: nothing more from it, writes in flight land torn or not at all.
    Crash,
    /// The primary is alive but cut off from the aux (which declares it dead); it can still
    /// reach the DR until the DR fences. After promotion the cut heals: the old primary must
    /// find itself fenced (I5).
    CutFromAux,
    /// The primary is alive but cut off from both the aux and the DR; the cut heals after
    /// promotion.
    CutFromAll,
    /// An operator fails over while the primary is alive and connected (a planned switch, or a
    /// mistaken belief that it died): its lease must run out before the DR takes over, and it
    /// must find itself fenced.
    OperatorFailover,
}

/// A fault injected at a simulated time before the end of the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The DR process dies and restarts `down_ns` later from its persistent log and ring.
    DrCrash { down_ns: Nanos },
    /// The aux process dies and restarts `down_ns` later from its persistent table.
    AuxCrash { down_ns: Nanos },
    /// The primary-DR link fails and comes back `down_ns` later.
    DrLinkLoss { down_ns: Nanos },
    /// The primary-DR link gets `factor` times slower for `for_ns`.
    SlowDrLink { factor: u64, for_ns: Nanos },
    /// The primary's next local write fails: its volume is in an unknown state, so it stops.
    LocalWriteFailure,
}

#[derive(Clone, Debug)]
pub struct Params {
    pub seed: u64,
    pub mode: Mode,
    pub link_loss_policy: LinkLossPolicy,
    /// With the degrade policy: degrade once the DR leaves an order batch unanswered this long,
    /// before the link is declared down (`PrimaryConfig::degrade_after_ns`).
    pub degrade_after_ns: Option<Nanos>,
    pub geometry: Geometry,
    /// Client writes issued in the run (the primary may end before all are issued).
    pub ops_total: u64,
    /// Client writes outstanding at once.
    pub queue_depth: u64,
    pub order_batch_records_max: usize,
    pub order_batches_inflight_max: usize,
    pub payload_writes_inflight_max: u64,
    pub applies_inflight_max: u64,
    /// One-way latency of the primary-DR link (base, jitter).
    pub dr_link_ns: (Nanos, Nanos),
    /// One-way latency of the primary-aux link (base, jitter).
    pub aux_link_ns: (Nanos, Nanos),
    pub local_write_ns: (Nanos, Nanos),
    pub apply_ns: (Nanos, Nanos),
    /// Delay between a payload landing on the DR and the DR's CPU seeing its completion.
    pub dr_notify_ns: (Nanos, Nanos),
    pub reconnect_ns: Nanos,
    pub tick_ns: Nanos,
    pub heartbeat_interval_ns: Nanos,
    pub heartbeat_timeout_ns: Nanos,
    /// The primary ends after this many simulated events (or when the workload is done).
    pub primary_end_after_events: Option<u64>,
    pub primary_end: PrimaryEnd,
    /// How fast the primary's clock runs, in percent of true time. Below 100 the primary's lease
    /// (measured on its own clock) lasts longer than the aux assumes, as with a process paused
    /// between checking its lease and acknowledging; then only epoch fencing keeps I5.
    pub primary_clock_percent: u64,
    /// Faults at simulated times (they only fire while the primary is still running).
    pub faults: Vec<(Nanos, Fault)>,
    /// What happens to traffic in flight when its connection breaks. `true`: SENDs arrive whole
    /// or not at all, at random, and one-sided writes land partially (MTU chunks in any
    /// subset). `false`: nothing in flight arrives (scripted scenarios use this to be exact).
    pub partial_at_break: bool,
    pub mtu_bytes: usize,
    /// Stop with a liveness failure if the run is not over by this simulated time.
    pub time_limit_ns: Nanos,
    pub mutations: Mutations,
    /// How the primary's runtime takes its inputs. 0: it takes the primary's actions after
    /// every input. Above 0: after an event it also handles every event due within this many
    /// nanoseconds, and only then takes the primary's actions, as a busy runtime that drains a
    /// poll's worth of completions and client writes before acting (the primary then does its
    /// work for all of them in one pass).
    pub primary_poll_window_ns: Nanos,
}

impl Params {
    /// A quiet world for scripted scenarios: fixed latencies, no faults, nothing random except
    /// the payload bytes, and the primary never ends by itself.
    pub fn scripted(mode: Mode) -> Params {
        Params {
            seed: 0,
            mode,
            link_loss_policy: LinkLossPolicy::Block,
            degrade_after_ns: None,
            geometry: Geometry {
                volume_bytes: 64 * 1024,
                sector_bytes: 512,
                ring_bytes: 16 * 1024,
                table_slots: 16,
                payload_bytes_max: 4096,
            },
            ops_total: 0,
            queue_depth: 64,
            order_batch_records_max: 16,
            order_batches_inflight_max: 4,
            payload_writes_inflight_max: 8,
            applies_inflight_max: 4,
            dr_link_ns: (100_000, 0),
            aux_link_ns: (5_000, 0),
            local_write_ns: (20_000, 0),
            apply_ns: (10_000, 0),
            dr_notify_ns: (1_000, 0),
            reconnect_ns: 1_000_000,
            tick_ns: 1_000_000,
            heartbeat_interval_ns: 2_000_000,
            heartbeat_timeout_ns: 20_000_000,
            primary_end_after_events: None,
            primary_end: PrimaryEnd::Crash,
            primary_clock_percent: 100,
            faults: Vec::new(),
            partial_at_break: true,
            mtu_bytes: 256,
            time_limit_ns: 60_000_000_000,
            mutations: Mutations::NONE,
            primary_poll_window_ns: 0,
        }
    }

    /// Everything a seed decides. Ranges are chosen so that rings and tables wrap many times per
    /// run, limits are hit, and faults land at every kind of moment.
    ///
    /// A seed's meaning is the sequence of draws below. To keep the seeds in `tests/` replaying
    /// the runs that found their bugs, add new draws only at the end, after every existing one.
    pub fn draw(seed: u64) -> Params {
        let mut rng = Rng::new(seed ^ 0x6F72_6469_6E61_6C00);
        let sector = 512u32;
        let payload_bytes_max = sector * rng.range(1, 8) as u32;
        let ring_bytes = u64::from(payload_bytes_max) * rng.range(2, 12);
        let geometry = Geometry {
            volume_bytes: 64 * 1024,
            sector_bytes: sector,
            ring_bytes,
            table_slots: 1 << rng.range(2, 6),
            payload_bytes_max,
        };
        let dr_base = rng.range(20_000, 2_000_000);
        let aux_base = rng.range(2_000, 40_000);
        let ops_total = rng.range(10, 160);
        let mut faults = Vec::new();
        let horizon = ops_total * dr_base / 2 + 5_000_000;
        for _ in 0..rng.range(0, 3) {
            let at = rng.range(0, horizon);
            let fault = match rng.range(0, 3) {
                0 => Fault::DrCrash {
                    down_ns: rng.range(100_000, 10_000_000),
                },
                1 => Fault::AuxCrash {
                    down_ns: rng.range(100_000, 10_000_000),
                },
                2 => Fault::DrLinkLoss {
                    down_ns: rng.range(100_000, 20_000_000),
                },
                _ => Fault::SlowDrLink {
                    factor: rng.range(2, 20),
                    for_ns: rng.range(1_000_000, 20_000_000),
                },
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        let heartbeat_interval_ns = rng.range(1_000_000, 5_000_000);
        let mut params = Params {
            seed,
            mode: rng.pick(&Mode::ALL),
            link_loss_policy: rng.pick(&[LinkLossPolicy::Block, LinkLossPolicy::Degrade]),
            degrade_after_ns: None,
            geometry,
            ops_total,
            queue_depth: rng.range(1, 16),
            order_batch_records_max: rng.range(1, 16) as usize,
            order_batches_inflight_max: rng.range(1, 4) as usize,
            payload_writes_inflight_max: rng.range(1, 8),
            applies_inflight_max: rng.range(1, 4),
            dr_link_ns: (dr_base, dr_base / 2),
            aux_link_ns: (aux_base, aux_base / 2),
            local_write_ns: (rng.range(5_000, 200_000), 50_000),
            apply_ns: (rng.range(5_000, 200_000), 50_000),
            // A quarter of the seeds have a DR whose CPU is slow to see payload completions
            // (busy, or polling its completion queue lazily): then the primary records
            // "replicated" on the aux before the DR knows, and failover must recover those
            // target ops from the ring (patent claim 18-20).
            dr_notify_ns: if rng.chance(1, 4) {
                (rng.range(1_000_000, 50_000_000), 1_000_000)
            } else {
                (rng.range(500, 50_000), 5_000)
            },
            reconnect_ns: rng.range(100_000, 5_000_000),
            tick_ns: 500_000,
            heartbeat_interval_ns,
            // Sometimes barely above the interval plus link jitter: false alarms on a live
            // primary are part of what fencing must survive.
            heartbeat_timeout_ns: heartbeat_interval_ns * rng.range(3, 10),
            primary_end_after_events: if rng.chance(3, 4) {
                Some(rng.range(1, ops_total * 14))
            } else {
                None
            },
            primary_end: rng.pick(&[
                PrimaryEnd::Crash,
                PrimaryEnd::Crash,
                PrimaryEnd::CutFromAux,
                PrimaryEnd::CutFromAll,
                PrimaryEnd::OperatorFailover,
            ]),
            primary_clock_percent: if rng.chance(1, 4) {
                rng.range(20, 90)
            } else {
                100
            },
            faults,
            partial_at_break: true,
            mtu_bytes: rng.pick(&[128, 256, 512, 1024]),
            time_limit_ns: 30_000_000_000,
            mutations: Mutations::NONE,
            primary_poll_window_ns: 0,
        };
        // Draws added later (see above): a failing local disk in one seed out of twenty.
        if rng.chance(1, 20) {
            let at = rng.range(0, horizon);
            params.faults.push((at, Fault::LocalWriteFailure));
            params.faults.sort_by_key(|(at, _)| *at);
        }
        // Half the seeds: the primary's inputs handled in polls of up to 200 us of events.
        if rng.chance(1, 2) {
            params.primary_poll_window_ns = rng.range(1_000, 200_000);
        }
        // Half the degrade seeds degrade on a slow answer too, not only on a link declared
        // down: from a few one-way latencies (false alarms on a live link) to longer than a
        // slow link's stretch.
        if params.link_loss_policy == LinkLossPolicy::Degrade && rng.chance(1, 2) {
            params.degrade_after_ns = Some(rng.range(100_000, 30_000_000));
        }
        params
    }
}
