//! The invariants of SPEC §3, checked after a failover against what the world knows
//! independently of the protocol: every byte every client wrote, when it was acknowledged, what
//! the aux table said, and what the DR volume holds.
//!
//! Jepsen-style, every acknowledged write is classified as *applied* (its seq is within the
//! recovered prefix), *reported lost* (listed with the right byte range in the loss report), or
//! *silently lost* (neither: a bug).
//!
//! Some checks happen while the world runs, at the moment they are about (I3 when a payload is
//! applied, I5 and I6 when a client is acknowledged); they are collected in the world's
//! violation list and reported here too.

use core::fmt;

use ordinal_proto::Seq;

use ordinal_proto::dr::LossReport;

use crate::world::{OpTruth, Phase, World};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    I1Prefix(String),
    I2Completeness(String),
    I3Integrity(String),
    I4SilentLoss(String),
    I5Fencing(String),
    I6SyncOrder(String),
    /// The failover report is wrong about an op (range, order, duplicates).
    Report(String),
    /// A role refused honest input or stopped when it should not have.
    Protocol(String),
    /// The run did not finish.
    Liveness(String),
    /// An assertion in the protocol or the world failed: a bug caught in the act.
    Panic(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, text) = match self {
            Violation::I1Prefix(text) => ("I1 prefix", text),
            Violation::I2Completeness(text) => ("I2 completeness", text),
            Violation::I3Integrity(text) => ("I3 integrity", text),
            Violation::I4SilentLoss(text) => ("I4 exact loss report", text),
            Violation::I5Fencing(text) => ("I5 fencing", text),
            Violation::I6SyncOrder(text) => ("I6 sync order", text),
            Violation::Report(text) => ("loss report", text),
            Violation::Protocol(text) => ("protocol", text),
            Violation::Liveness(text) => ("liveness", text),
            Violation::Panic(text) => ("panic", text),
        };
        write!(f, "{name}: {text}")
    }
}

/// What a checked run came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Client writes the primary admitted.
    pub admitted: u64,
    /// Acknowledged writes within the recovered prefix.
    pub acked_applied: u64,
    /// Acknowledged writes listed in the loss report.
    pub acked_reported_lost: u64,
    /// Acknowledged writes neither applied nor reported (each is also an I4 violation).
    pub acked_silently_lost: u64,
    /// The recovered prefix.
    pub cut: Seq,
    /// Target ops recovered from the ring during failover.
    pub applied_from_ring: u64,
    /// Faults and outcomes the run went through.
    pub coverage: crate::world::Coverage,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What the checker needs to know about one run, whoever observed it: the simulator's world, or
/// a harness watching real processes from outside (what each client wrote and was told, the loss
/// report, and the bytes of the DR volume and the aux table).
#[derive(Clone, Copy, Debug)]
pub struct History<'a> {
    /// The DR volume before the first op.
    pub initial_image: &'a [u8],
    /// Every op the primary admitted, in seq order (op `k` at index `k - 1`).
    pub ops: &'a [OpTruth],
    /// The failover's loss report, if a failover happened.
    pub report: Option<&'a LossReport>,
    /// Whether acknowledgements (not degraded ones) wait for the DR to hold the order record
    /// (`order-sync` and `sync`): then I6 bounds them by the report's `held_through`.
    pub acks_wait_for_order: bool,
    /// The DR volume when it was promoted, and at the end of the run (I1, I5).
    pub volume_at_promotion: &'a [u8],
    pub volume_at_end: &'a [u8],
    /// Seqs the old primary acknowledged after the DR was promoted (I5).
    pub acked_after_promotion: &'a [Seq],
    /// The aux region when it was fenced, and at the end of the run (I5).
    pub aux_region_at_fence: Option<&'a [u8]>,
    pub aux_region_at_end: Option<&'a [u8]>,
}

/// The DR volume that applying ops `1..=cut` in order to the initial image gives.
fn expected_image(history: &History<'_>, cut: Seq) -> Vec<u8> {
    let mut image = history.initial_image.to_vec();
    for op in &history.ops[..cut as usize] {
        let at = op.volume_offset as usize;
        image[at..at + op.data.len()].copy_from_slice(&op.data);
    }
    image
}

/// The smallest prefix whose image is `volume`, to make an I1 failure readable. Each candidate
/// costs a copy of the image, so big runs skip the search.
fn matching_prefix(history: &History<'_>, volume: &[u8]) -> Option<Seq> {
    const SEARCH_BYTES_MAX: usize = 1 << 30;
    if history.ops.len().saturating_mul(volume.len()) > SEARCH_BYTES_MAX {
        return None;
    }
    let mut image = history.initial_image.to_vec();
    if image == volume {
        return Some(0);
    }
    for op in history.ops {
        let at = op.volume_offset as usize;
        image[at..at + op.data.len()].copy_from_slice(&op.data);
        if image == volume {
            return Some(op.seq);
        }
    }
    None
}

/// Checks a simulated run: the world's own in-flight findings, then [`check_history`].
pub fn check(world: &World) -> Verdict {
    let mut violations = world.violations.clone();
    let promoted = world.phase() >= Phase::Promoted;
    match (world.report(), promoted) {
        (None, true) => violations.push(Violation::Liveness(
            "promoted without a failover report".into(),
        )),
        (None, false) => violations.push(Violation::Liveness(format!(
            "no failover happened (phase {:?})",
            world.phase()
        ))),
        (Some(_), false) => violations.push(Violation::Liveness(format!(
            "failover computed but the DR was not promoted (phase {:?})",
            world.phase()
        ))),
        (Some(_), true) => {}
    }
    let mut verdict = match world.report() {
        None => Verdict {
            admitted: world.truth().len() as u64,
            ..Verdict::default()
        },
        Some(report) => check_history(&History {
            initial_image: &world.initial_image,
            ops: world.truth(),
            report: Some(report),
            // The world also checks I6 at the moment of each ack, against what the DR held
            // then; the bound by the report is the one an outside observer can check.
            acks_wait_for_order: matches!(
                world.params.mode,
                ordinal_proto::Mode::OrderSync | ordinal_proto::Mode::Sync
            ),
            volume_at_promotion: world
                .volume_at_promotion
                .as_deref()
                .unwrap_or(world.dr_volume()),
            volume_at_end: world.dr_volume(),
            acked_after_promotion: &world.acked_after_promotion,
            aux_region_at_fence: world.aux_region_at_fence.as_deref(),
            aux_region_at_end: world.aux_region_now(),
        }),
    };
    violations.append(&mut verdict.violations);
    verdict.violations = violations;
    verdict.coverage = world.coverage;
    verdict
}

/// Checks I1-I6 and the loss report on a history, classifying every acknowledged write as
/// applied, reported lost or silently lost.
pub fn check_history(history: &History<'_>) -> Verdict {
    let mut verdict = Verdict {
        admitted: history.ops.len() as u64,
        ..Verdict::default()
    };
    debug_assert!(history
        .ops
        .iter()
        .enumerate()
        .all(|(index, op)| op.seq == index as Seq + 1));
    let Some(report) = history.report else {
        verdict
            .violations
            .push(Violation::Liveness("no failover happened".into()));
        return verdict;
    };
    let cut = report.cut;
    verdict.cut = cut;
    verdict.applied_from_ring = report.applied_from_ring;
    let truth = history.ops;

    // I1: the DR volume is the initial image with ops 1..=cut applied in order, exactly.
    if cut > truth.len() as u64 {
        verdict.violations.push(Violation::I1Prefix(format!(
            "cut {cut} is beyond the {} ops ever admitted",
            truth.len()
        )));
        return verdict;
    }
    let volume = history.volume_at_promotion;
    let expected = expected_image(history, cut);
    if volume != expected {
        let first = volume
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let matching = matching_prefix(history, volume);
        verdict.violations.push(Violation::I1Prefix(format!(
            "DR volume differs from prefix {cut} at byte {first}; it matches prefix {matching:?}"
        )));
    }

    // I2: nothing the aux recorded as replicated is lost.
    for op in truth
        .iter()
        .filter(|op| op.aux_recorded_replicated && op.seq > cut)
    {
        verdict.violations.push(Violation::I2Completeness(format!(
            "seq {} was recorded replicated on the aux but is beyond the cut {cut}",
            op.seq
        )));
    }

    // The report itself: strictly increasing seqs, all beyond the cut, ranges that match.
    let mut previous = cut;
    for lost in &report.lost {
        if lost.seq <= previous {
            verdict.violations.push(Violation::Report(format!(
                "lost seq {} is not after {previous} (order, duplicate, or within the prefix)",
                lost.seq
            )));
        }
        previous = previous.max(lost.seq);
        match truth.get(lost.seq as usize - 1) {
            Some(op)
                if op.volume_offset == lost.volume_offset && op.data.len() == lost.len as usize => {
            }
            Some(op) => verdict.violations.push(Violation::Report(format!(
                "lost seq {} reported as {} bytes at {}, was {} bytes at {}",
                lost.seq,
                lost.len,
                lost.volume_offset,
                op.data.len(),
                op.volume_offset
            ))),
            None => verdict.violations.push(Violation::Report(format!(
                "lost seq {} was never admitted",
                lost.seq
            ))),
        }
    }

    // I4: every acknowledged write is applied or reported, by seq and byte range.
    for op in truth.iter().filter(|op| op.acked_at.is_some()) {
        if op.seq <= cut {
            verdict.acked_applied += 1;
        } else if report
            .lost
            .binary_search_by_key(&op.seq, |lost| lost.seq)
            .is_ok()
        {
            verdict.acked_reported_lost += 1;
        } else {
            verdict.acked_silently_lost += 1;
            verdict.violations.push(Violation::I4SilentLoss(format!(
                "seq {} ({} bytes at {}) was acknowledged{} but is neither applied nor reported",
                op.seq,
                op.data.len(),
                op.volume_offset,
                if op.acked_degraded { " (degraded)" } else { "" }
            )));
        }
    }

    // I5: a write acknowledged by the old primary after promotion (a slow clock overran its
    // lease) must be one the failover knew of: a new write must never be acknowledged.
    for &seq in history.acked_after_promotion {
        let accounted = seq <= cut
            || report
                .lost
                .binary_search_by_key(&seq, |lost| lost.seq)
                .is_ok();
        if !accounted {
            verdict.violations.push(Violation::I5Fencing(format!("old primary acknowledged seq {seq} after promotion, a write the failover never saw")));
        }
    }

    // I5: after promotion nothing the old primary does reaches the DR volume or the aux table.
    if history.volume_at_end != history.volume_at_promotion {
        verdict.violations.push(Violation::I5Fencing(
            "the DR volume changed after promotion".into(),
        ));
    }
    if let (Some(at_fence), Some(at_end)) = (history.aux_region_at_fence, history.aux_region_at_end)
    {
        if at_fence != at_end {
            verdict.violations.push(Violation::I5Fencing(
                "the aux table changed after it was fenced".into(),
            ));
        }
    }

    // I6, seen after the fact: an acknowledged write's order record was held by the DR, so it
    // is within what the DR's log held at failover.
    if history.acks_wait_for_order {
        if let Some(op) = truth
            .iter()
            .find(|op| op.acked_at.is_some() && !op.acked_degraded && op.seq > report.held_through)
        {
            verdict.violations.push(Violation::I6SyncOrder(format!(
                "seq {} was acknowledged but the DR held order records only through {}",
                op.seq, report.held_through
            )));
        }
    }
    verdict
}
