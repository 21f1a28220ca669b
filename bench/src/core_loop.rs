//! The protocol core alone: a primary and a DR state machine wired back to back in memory, with
//! every action executed at once and no I/O. What it measures is the cost of the protocol
//! logic per write (admission, order batching, record encode and decode with their checksums,
//! payload checksum on both sides, aux status entries, acks, credits, applies), which bounds the
//! write rate one core can drive before any network or disk is involved.
//!
//! One-sided writes cost nothing here: the primary's staging ring *is* the DR's ring (the same
//! buffer), so a payload "lands" the moment it is posted, exactly as if the NIC had copied it.
//! Each pass of the loop takes every step already queued, as a runtime's poll returns every
//! completion and message that is ready, and then admits writes and takes the primary's actions
//! once, as the primary's runtime does (its loop takes up to 64 waiting inputs per pass).
//! Consecutive completions of one kind are reported together, as one poll of a completion
//! queue returns them.

use std::collections::VecDeque;

use ordinal_proto::dr::{dr_log_bytes, Dr, DrAction, DrConfig, OutMessage};
use ordinal_proto::primary::{AuxWriteTag, Primary, PrimaryAction, PrimaryConfig, WriteRefused};
use ordinal_proto::{Geometry, Mode, Nanos};

/// Time stands still in this loop: only the cost of the logic is measured.
const NOW: Nanos = 0;

/// What happens next in the loop. Kept in a FIFO so that writes in flight accumulate and the
/// primary batches them, as it would under load.
#[derive(Clone, Copy, Debug)]
enum Step {
    LocalDone(u64),
    OrderBatch {
        buffer: usize,
        len: usize,
    },
    PayloadLanded {
        seq: u64,
        imm: u32,
    },
    /// The next message of `dr_messages` (kept apart so that every queued step stays small:
    /// a message is ten times the size of any other step).
    DrMessage,
    ApplyDone(u64),
    AuxDone(AuxWriteTag),
}

/// The daemons' default ring (`--ring-mib 64`).
pub const RING_BYTES_DEFAULT: u64 = 64 << 20;

/// Parameters of one run.
#[derive(Clone, Copy, Debug)]
pub struct CoreLoopConfig {
    pub payload_bytes: usize,
    /// Order batches in flight: fewer means larger batches (the DR's receive buffers).
    pub order_batches_inflight: usize,
    pub queue_depth: usize,
    pub writes: u64,
    pub mode: Mode,
    /// The staging ring's size (the DR's ring is the same buffer). Its writes move through the
    /// whole ring, so a ring larger than the caches makes every payload copy miss them.
    pub ring_bytes: u64,
}

/// What one run came to.
#[derive(Clone, Copy, Debug)]
pub struct CoreLoopOutcome {
    pub acked: u64,
    /// Time spent in the write loop only: building the state machines and first touching the
    /// ring's pages (which a runtime does once, at start) are not part of the cost per write.
    pub elapsed: std::time::Duration,
}

/// Runs `config.writes` client writes through primary and DR.
pub fn run(config: CoreLoopConfig) -> CoreLoopOutcome {
    let geometry = Geometry {
        volume_bytes: 1 << 30,
        sector_bytes: 512,
        ring_bytes: config.ring_bytes,
        table_slots: 1 << 14,
        payload_bytes_max: 1 << 20,
    };
    let primary_config = PrimaryConfig {
        lease_ns: Nanos::MAX / 4,
        order_batch_records_max: 64,
        order_batches_inflight_max: config.order_batches_inflight,
        payload_writes_inflight_max: 256,
        ..PrimaryConfig::new(geometry, config.mode)
    };
    let mut primary = Primary::new(primary_config);
    let mut ring = vec![0u8; geometry.ring_bytes as usize];
    let dr_config = DrConfig {
        applies_inflight_max: 256,
        credit_batch_ops: 64,
        ..DrConfig::new(geometry)
    };
    let mut dr = Dr::open(
        dr_config,
        vec![0u8; dr_log_bytes(geometry.table_slots)],
        1,
        &ring,
    )
    .expect("fresh log");
    let payload = vec![0xA5u8; config.payload_bytes];
    let mut steps: VecDeque<Step> = VecDeque::with_capacity(4096);
    let mut dr_messages: VecDeque<OutMessage> = VecDeque::with_capacity(256);
    let mut primary_actions: Vec<PrimaryAction> = Vec::with_capacity(256);
    let mut dr_actions: Vec<DrAction> = Vec::with_capacity(256);

    primary.handle_aux_up(NOW);
    // One heartbeat, confirmed below, gives a lease longer than the run.
    primary.handle_tick(NOW);
    dr.handle_peer_connected();
    dr_actions.extend(dr.drain_actions());
    for action in dr_actions.drain(..) {
        if let DrAction::Send(message) = action {
            primary
                .handle_dr_message(message.as_bytes(), NOW)
                .expect("hello");
        }
    }

    // Fault the ring in now: the runtime's ring is a mapping touched once at start, and the
    // first-touch page faults (64 MiB, zeroed by the kernel) are no part of a write's cost.
    ring.fill(0);
    let started = std::time::Instant::now();
    let volume_slots = geometry.volume_bytes / config.payload_bytes as u64;
    let (mut issued, mut acked, mut outstanding) = (0u64, 0u64, 0usize);
    while acked < config.writes {
        while outstanding < config.queue_depth && issued < config.writes {
            let offset = (issued % volume_slots) * config.payload_bytes as u64;
            // The client's bytes are copied into the staging ring (checksummed on the way).
            match primary.handle_client_write(issued, offset, &payload, &mut ring, NOW) {
                Ok(_) => {
                    issued += 1;
                    outstanding += 1;
                }
                Err(WriteRefused::Backpressure(_)) => break,
                Err(other) => panic!("write refused: {other:?}"),
            }
        }
        primary.swap_actions(&mut primary_actions);
        for action in primary_actions.drain(..) {
            match action {
                PrimaryAction::LocalWrite { seq, .. } => steps.push_back(Step::LocalDone(seq)),
                PrimaryAction::SendOrderBatch { buffer, len, .. } => {
                    steps.push_back(Step::OrderBatch { buffer, len })
                }
                PrimaryAction::WritePayload { seq, imm, .. } => {
                    steps.push_back(Step::PayloadLanded { seq, imm })
                }
                PrimaryAction::WriteAux { tag, .. } => steps.push_back(Step::AuxDone(tag)),
                PrimaryAction::AckClient { .. } => {
                    acked += 1;
                    outstanding -= 1;
                }
                PrimaryAction::FailClient { .. } | PrimaryAction::Stopped(_) => {
                    panic!("unexpected {action:?}")
                }
            }
        }
        // One pass of a runtime's loop: every step already queued (a poll of each completion
        // queue and receive queue), then admission and the primary's actions once, as the
        // primary's runtime does. Steps these cause wait for the next pass.
        let queued = steps.len();
        let mut taken = 0;
        while taken < queued {
            let Some(step) = steps.pop_front() else {
                break;
            };
            taken += 1;
            match step {
                Step::LocalDone(seq) => primary.handle_local_write_done(seq, NOW),
                Step::OrderBatch { buffer, len } => {
                    let bytes = &primary.order_batch(buffer)[..len];
                    dr.handle_order_batch(bytes, &ring).expect("valid batch");
                }
                Step::PayloadLanded { seq, imm } => {
                    // Completions are taken as a poll of the completion queue returns them: every
                    // landing is verified by the DR, and the primary hears once, of the last one.
                    dr.handle_payload_landed(imm, &ring)
                        .expect("payload verifies");
                    let mut through = seq;
                    while let Some(&Step::PayloadLanded { seq, imm }) = steps.front() {
                        steps.pop_front();
                        taken += 1;
                        dr.handle_payload_landed(imm, &ring)
                            .expect("payload verifies");
                        through = seq;
                    }
                    primary.handle_payload_write_done(through, NOW);
                }
                Step::DrMessage => {
                    let message = dr_messages.pop_front().expect("one message per step");
                    primary
                        .handle_dr_message(message.as_bytes(), NOW)
                        .expect("valid DR message")
                }
                Step::ApplyDone(seq) => {
                    let mut through = seq;
                    while let Some(&Step::ApplyDone(seq)) = steps.front() {
                        steps.pop_front();
                        taken += 1;
                        through = seq;
                    }
                    dr.handle_apply_done(through);
                }
                Step::AuxDone(tag) => primary.handle_aux_write_done(tag, NOW),
            }
        }
        dr.swap_actions(&mut dr_actions);
        for action in dr_actions.drain(..) {
            match action {
                DrAction::Send(message) => {
                    dr_messages.push_back(message);
                    steps.push_back(Step::DrMessage);
                }
                DrAction::Apply { seq, .. } => steps.push_back(Step::ApplyDone(seq)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    CoreLoopOutcome {
        acked,
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop itself must be right for its figures to mean anything: every write is acked in
    /// every mode, with the DR applying all of them.
    #[test]
    fn every_write_is_acked_in_every_mode() {
        for mode in Mode::ALL {
            let acked = run(CoreLoopConfig {
                payload_bytes: 4096,
                order_batches_inflight: 4,
                queue_depth: 32,
                writes: 20_000,
                mode,
                ring_bytes: RING_BYTES_DEFAULT,
            })
            .acked;
            assert_eq!(acked, 20_000, "{mode}");
        }
    }
}
