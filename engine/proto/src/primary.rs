//! The primary: assigns the operation order, replicates it synchronously in batched SENDs,
//! streams payloads asynchronously in FIFO order as one-sided writes, keeps the primary status
//! table on the aux, and acknowledges clients by the configured mode.
//!
//! Life of one write `s` (cursors are cumulative: "every op up to and including"):
//!
//! ```text
//! admit ─► LocalWrite ──────────────────────────────► local_done(s)
//!       ├► order record ─► SendOrderBatch ─► DR ack ─► order_acked_through >= s
//!       ├► WritePayload (FIFO) ─────────► completion ─► payload_done_through >= s
//!       └► aux entry "queued" ─► WriteAux ─► done ─► aux_queued_done_through >= s
//!            and once payload done and order acked: "replicated" ─► aux_replicated_done_through
//! ack the client when the mode's condition holds; release the ring span when the DR has applied
//! s (its payload is no longer pending there), and the table slot when, in addition, the aux
//! holds "replicated" for s and the client has its answer (patent tables 1-3: an area block is
//! reused only once its order is synced and its data replicated).
//! ```

use std::collections::VecDeque;

use crate::checksum::copy_crc32c;
use crate::config::{Epoch, Geometry, LinkLossPolicy, Mode, Mutation, Mutations, Nanos, Seq};
use crate::ring::RingAllocator;
use crate::wire::{
    AuxEntry, DecodeError, DrState, Heartbeat, Message, MessageKind, OrderRecord, PrimaryStatus,
    Refusal, RefusalReason, AUX_ENTRY_BYTES, MESSAGE_HEADER_BYTES, ORDER_BATCH_RECORDS_MAX,
    ORDER_RECORD_BYTES,
};

/// Groups of status-table writes in flight at once while acknowledgements wait for the aux
/// (async mode, or degraded). With one, an op's "queued" entry waited a whole round trip to
/// the aux whenever the previous op's "replicated" entry was on its way, so an async write took
/// two round trips (at one write in flight on loopback, 213-285 us against order-sync's
/// 173-215; 175-195 us with four groups). Each group is one write, or two where its entries wrap
/// the table, so this keeps the aux queue pair's send queue short too.
///
/// When acknowledgements wait for the DR instead, one group at a time is better: entries that
/// change while it is in flight go together in the next write, half as many writes reach the
/// aux, and on loopback (where the aux and the DR share a CPU) order-sync's p50 at one write in
/// flight was 10-20% higher with four.
pub const AUX_GROUPS_INFLIGHT_MAX: usize = 4;

/// One group of entries writes in flight, and what its completion establishes.
#[derive(Clone, Copy, Debug)]
struct AuxGroup {
    /// Writes of the group not completed yet.
    writes_left: u8,
    /// Once the group completes, every op through here has its "queued" (or "replicated")
    /// entry on the aux, and every op through `replicated_through` its "replicated" one.
    queued_through: Seq,
    replicated_through: Seq,
    /// The ops whose entries the group writes lie within `lowest..=highest`.
    lowest: Seq,
    highest: Seq,
}

/// Byte offset of the heartbeat inside the primary-writable area of the aux region.
pub const AUX_HEARTBEAT_OFFSET: usize = 0;
/// Byte offset of status entry 0 inside the primary-writable area of the aux region.
pub const AUX_ENTRIES_OFFSET: usize = 64;

/// Size of the primary-writable area of the aux region for `table_slots` entries.
pub fn aux_primary_area_bytes(table_slots: u32) -> usize {
    AUX_ENTRIES_OFFSET + table_slots as usize * AUX_ENTRY_BYTES
}

/// Records per order batch at most, by default.
pub const ORDER_BATCH_RECORDS_DEFAULT: usize = 64;
/// Order batches in flight at most, by default.
pub const ORDER_BATCHES_INFLIGHT_DEFAULT: usize = 8;
/// Payload writes in flight at most, by default.
pub const PAYLOAD_WRITES_INFLIGHT_DEFAULT: u64 = 64;

#[derive(Clone, Copy, Debug)]
pub struct PrimaryConfig {
    pub geometry: Geometry,
    pub mode: Mode,
    pub link_loss_policy: LinkLossPolicy,
    /// With `LinkLossPolicy::Degrade`: also degrade while the DR link is still up but the
    /// oldest order batch in flight has waited this long for the DR's answer. `None`: only once
    /// the link is declared down, which takes the transport's timeout (seconds over TCP, the
    /// queue pair's retries over RDMA) while writes wait. A slow or silent link then costs the
    /// clients this long at most instead.
    pub degrade_after_ns: Option<Nanos>,
    pub epoch: Epoch,
    /// Most records in one order batch (<= `ORDER_BATCH_RECORDS_MAX`).
    pub order_batch_records_max: usize,
    /// Order batches sent and not yet acked; the DR keeps this many receive buffers posted.
    pub order_batches_inflight_max: usize,
    /// Payload writes posted and not yet completed.
    pub payload_writes_inflight_max: u64,
    /// Backpressure: ops admitted whose payload has not reached the DR.
    pub lag_ops_max: u64,
    /// Backpressure: bytes admitted whose payload has not reached the DR.
    pub lag_bytes_max: u64,
    /// How often the heartbeat on the aux is advanced.
    pub heartbeat_interval_ns: Nanos,
    /// How long after sending a heartbeat that the aux confirmed the primary may still
    /// acknowledge writes. Must be well below the aux's heartbeat timeout (half of it is the
    /// default): the aux declares the primary dead only a whole timeout after it *saw* the
    /// heartbeat, which is after it was sent, so the lease has run out before any failover can
    /// promote the DR, as long as the two clocks' rates differ by less than a factor of two.
    pub lease_ns: Nanos,
    pub mutations: Mutations,
}

impl PrimaryConfig {
    /// Defaults a user gets without tuning: batches of up to 64 records, 8 in flight, 64 payload
    /// writes in flight, lag bounded by the ring, a heartbeat every 10 ms and a lease of 100 ms
    /// (for an aux heartbeat timeout of 200 ms or more).
    pub fn new(geometry: Geometry, mode: Mode) -> Self {
        PrimaryConfig {
            geometry,
            mode,
            link_loss_policy: LinkLossPolicy::Block,
            degrade_after_ns: None,
            epoch: 1,
            order_batch_records_max: ORDER_BATCH_RECORDS_DEFAULT,
            order_batches_inflight_max: ORDER_BATCHES_INFLIGHT_DEFAULT,
            payload_writes_inflight_max: PAYLOAD_WRITES_INFLIGHT_DEFAULT,
            lag_ops_max: u64::from(geometry.table_slots),
            lag_bytes_max: geometry.ring_bytes,
            heartbeat_interval_ns: 10_000_000,
            lease_ns: 100_000_000,
            mutations: Mutations::NONE,
        }
    }
}

/// Which aux write completed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxWriteTag {
    Entries,
    Heartbeat,
}

/// What the runtime must do for the primary. Buffers named by an action are owned by the
/// primary ([`Primary::order_batch`], [`Primary::aux_area`]) or by the runtime (the staging ring)
/// and stay unchanged until the action's completion is handed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Write the op's bytes, staged at `ring_offset` in the primary's staging ring, to the local
    /// volume; then call `handle_local_write_done(seq)`.
    LocalWrite {
        seq: Seq,
        volume_offset: u64,
        ring_offset: u64,
        len: u32,
    },
    /// SEND `order_batch(buffer)[..len]` to the DR (records `first_seq..=last_seq`).
    SendOrderBatch {
        buffer: usize,
        len: usize,
        first_seq: Seq,
        last_seq: Seq,
    },
    /// One-sided WRITE of the staging ring `[ring_offset, +len)` to the same place in the DR's
    /// ring, with immediate data `imm` (the low 32 bits of seq); then `handle_payload_write_done`.
    WritePayload {
        seq: Seq,
        ring_offset: u64,
        len: u32,
        imm: u32,
    },
    /// One-sided WRITE of `aux_area()[offset..offset + len]` to the same offset of the aux's
    /// primary-writable area; then `handle_aux_write_done(tag)`.
    WriteAux {
        offset: usize,
        len: usize,
        tag: AuxWriteTag,
    },
    /// Tell the client its write `seq` is acknowledged. `degraded` is set when the DR did not
    /// hold the order at that moment (link down, `LinkLossPolicy::Degrade`, or `Mode::Async`).
    AckClient {
        seq: Seq,
        client_tag: u64,
        degraded: bool,
    },
    /// Tell the client its write `seq` failed; it may or may not be on the DR after failover.
    FailClient { seq: Seq, client_tag: u64 },
    /// The primary has stopped for good: another node holds the volume now, or the protocol
    /// broke. The runtime logs `PrimaryStop` and stops serving writes.
    Stopped(PrimaryStop),
}

/// Why the primary stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryStop {
    /// The aux refused a write (remote access revoked): a failover has fenced us.
    FencedByAux,
    /// The DR refused us with a newer epoch or because it is failing over.
    FencedByDr { dr_epoch: Epoch },
    /// The DR's state contradicts this primary's: it holds more order records than this
    /// primary sent, or fewer than it acknowledged, or has applied fewer than it reported. Its
    /// log is persistent and holds only what it was sent, so either the two are not replicating
    /// the same history (a primary started again without its own, a DR whose state directory was
    /// replaced or belongs to another volume) or one side is broken. Replication stops rather
    /// than guess which writes the DR holds.
    DrStateMismatch {
        dr_held_through: Seq,
        dr_applied_through: Seq,
        /// What this primary had sent (on a reconnection: everything it admitted).
        sent_through: Seq,
        /// What the DR had acknowledged holding, and reported applied, before this answer.
        acked_through: Seq,
        applied_through: Seq,
    },
    /// The DR refused a batch as invalid: a bug on one side; replication cannot go on safely.
    RefusedInvalid { seq: Seq },
    /// The local volume failed a write; the volume is in an unknown state.
    LocalWriteFailed { seq: Seq },
}

impl PrimaryStop {
    /// A short, stable name (the status JSON's `stopped` field).
    pub fn name(&self) -> &'static str {
        match self {
            PrimaryStop::FencedByAux => "FencedByAux",
            PrimaryStop::FencedByDr { .. } => "FencedByDr",
            PrimaryStop::DrStateMismatch { .. } => "DrStateMismatch",
            PrimaryStop::RefusedInvalid { .. } => "RefusedInvalid",
            PrimaryStop::LocalWriteFailed { .. } => "LocalWriteFailed",
        }
    }
}

/// What an operator reads in the log and in a failed write's error: the cause, with its
/// figures, and what it means for the data.
impl std::fmt::Display for PrimaryStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PrimaryStop::FencedByAux => write!(
                f,
                "fenced by the aux (its status table refused our write): a failover has taken the volume"
            ),
            PrimaryStop::FencedByDr { dr_epoch } => write!(
                f,
                "fenced by the DR (epoch {dr_epoch}, newer than ours, or failing over): the DR has taken the volume"
            ),
            PrimaryStop::DrStateMismatch {
                dr_held_through,
                dr_applied_through,
                sent_through,
                acked_through,
                applied_through,
            } => write!(
                f,
                "the DR's state does not match this primary's: the DR holds order records through seq {dr_held_through} \
                 and applied through {dr_applied_through}, while this primary sent through {sent_through}, \
                 saw the DR hold through {acked_through} and apply through {applied_through}. \
                 They are not replicating the same history (a primary started again without its own, \
                 or a DR state directory replaced or from another volume); start the pair afresh or fail over"
            ),
            PrimaryStop::RefusedInvalid { seq } => write!(
                f,
                "the DR refused the order batch holding seq {seq} as invalid: one side is broken"
            ),
            PrimaryStop::LocalWriteFailed { seq } => write!(
                f,
                "the local volume failed the write of seq {seq}; its contents are now unknown"
            ),
        }
    }
}

/// Why a client write was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteRefused {
    /// A limit is reached (ring, table, lag): retry after the next completion.
    Backpressure(Limit),
    /// The request itself is bad (range, alignment, size).
    Invalid(DecodeError),
    /// The primary has stopped.
    Stopped,
}

/// Which limit applied the backpressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    TableSlots,
    RingBytes,
    LagOps,
    LagBytes,
}

/// A write the primary admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub seq: Seq,
    /// Where the client's bytes were placed in the staging ring.
    pub ring_offset: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct OpSlot {
    seq: Seq,
    volume_offset: u64,
    ring_offset: u64,
    alloc_end: u64,
    len: u32,
    payload_crc: u32,
    client_tag: u64,
    local_done: bool,
    answered: bool,
}

/// Counters for `ordinal status` and the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrimaryStats {
    pub admitted: u64,
    pub acked: u64,
    pub acked_degraded: u64,
    pub order_batches_sent: u64,
    pub order_records_sent: u64,
    pub payload_writes_posted: u64,
    pub aux_writes_posted: u64,
    pub backpressure: u64,
}

#[derive(Debug)]
pub struct Primary {
    config: PrimaryConfig,
    stopped: Option<PrimaryStop>,
    /// An input changed what the primary may send, acknowledge or release, and `pump` has not
    /// run since. Inputs only record facts; the work they make possible is done once, when the
    /// runtime takes the actions (or when admission or a stop needs it first), so a runtime
    /// that hands over a poll's worth of completions and client writes before taking the
    /// actions pays for one pass, and its order records go out in one batch.
    pump_due: bool,
    dr_link_up: bool,
    aux_up: bool,
    ops: Box<[OpSlot]>,
    ring: RingAllocator,
    next_seq: Seq,
    lag_bytes: u64,
    // Cumulative cursors; see the module docs.
    order_sent_through: Seq,
    order_acked_through: Seq,
    payload_posted_through: Seq,
    payload_done_through: Seq,
    aux_queued_done_through: Seq,
    aux_replicated_done_through: Seq,
    dr_landed_through: Seq,
    dr_applied_through: Seq,
    ring_released_through: Seq,
    slots_released_through: Seq,
    /// All ops up to here meet the mode's ack condition except, maybe, their local write.
    ack_condition_through: Seq,
    /// Order batches sent and not yet acked, oldest first (at most `order_batches_inflight_max`):
    /// the last seq of each and when it was sent.
    order_batches_inflight: VecDeque<(Seq, Nanos)>,
    order_batches_sent: u64,
    order_buffers: Box<[u8]>,
    /// Groups of entries writes in flight, oldest first (an aux queue pair completes in order);
    /// at most `AUX_GROUPS_INFLIGHT_MAX`. No entry is written again while a group holding it is in
    /// flight, since the NIC may still be reading it.
    aux_groups: VecDeque<AuxGroup>,
    /// Entries posted (not necessarily done) say "queued" or better through here, and
    /// "replicated" through the second.
    aux_queued_posted_through: Seq,
    aux_replicated_posted_through: Seq,
    aux_area: Box<[u8]>,
    heartbeat: Heartbeat,
    heartbeat_inflight: bool,
    heartbeat_sent_at: Option<Nanos>,
    /// The latest time seen by any handler.
    now: Nanos,
    /// Writes may be acknowledged only before this time (see `PrimaryConfig::lease_ns`).
    lease_until: Nanos,
    actions: Vec<PrimaryAction>,
    stats: PrimaryStats,
}

const ORDER_BUFFER_BYTES: usize =
    MESSAGE_HEADER_BYTES + ORDER_BATCH_RECORDS_MAX * ORDER_RECORD_BYTES;

impl Primary {
    /// A primary starting a new replication stream (seq 1), with the DR link and aux not yet up.
    pub fn new(config: PrimaryConfig) -> Self {
        config
            .geometry
            .validate()
            .expect("geometry is validated by the caller");
        assert!(
            config.order_batch_records_max >= 1
                && config.order_batch_records_max <= ORDER_BATCH_RECORDS_MAX
        );
        assert!(config.order_batches_inflight_max >= 1);
        assert!(
            config.degrade_after_ns.is_none() || config.link_loss_policy == LinkLossPolicy::Degrade,
            "degrade_after_ns is a setting of the degrade policy"
        );
        assert!(config.payload_writes_inflight_max >= 1);
        assert!(
            config.heartbeat_interval_ns < config.lease_ns,
            "a lease shorter than the heartbeat interval lapses between renewals"
        );
        assert!(
            config.lag_ops_max >= 1
                && config.lag_bytes_max >= u64::from(config.geometry.payload_bytes_max)
        );
        let geometry = config.geometry;
        Primary {
            config,
            stopped: None,
            pump_due: false,
            dr_link_up: false,
            aux_up: false,
            ops: vec![OpSlot::default(); geometry.table_slots as usize].into_boxed_slice(),
            ring: RingAllocator::new(geometry.ring_bytes, u64::from(geometry.sector_bytes)),
            next_seq: 1,
            lag_bytes: 0,
            order_sent_through: 0,
            order_acked_through: 0,
            payload_posted_through: 0,
            payload_done_through: 0,
            aux_queued_done_through: 0,
            aux_replicated_done_through: 0,
            dr_landed_through: 0,
            dr_applied_through: 0,
            ring_released_through: 0,
            slots_released_through: 0,
            ack_condition_through: 0,
            order_batches_inflight: VecDeque::with_capacity(config.order_batches_inflight_max),
            order_batches_sent: 0,
            order_buffers: vec![0; ORDER_BUFFER_BYTES * config.order_batches_inflight_max]
                .into_boxed_slice(),
            aux_groups: VecDeque::with_capacity(AUX_GROUPS_INFLIGHT_MAX),
            aux_queued_posted_through: 0,
            aux_replicated_posted_through: 0,
            aux_area: vec![0; aux_primary_area_bytes(geometry.table_slots)].into_boxed_slice(),
            heartbeat: Heartbeat {
                counter: 0,
                epoch: config.epoch,
            },
            heartbeat_inflight: false,
            heartbeat_sent_at: None,
            now: 0,
            lease_until: 0,
            actions: Vec::with_capacity(64),
            stats: PrimaryStats::default(),
        }
    }

    // ----- getters -----

    pub fn config(&self) -> &PrimaryConfig {
        &self.config
    }
    pub fn stats(&self) -> PrimaryStats {
        self.stats
    }
    pub fn stopped(&self) -> Option<PrimaryStop> {
        self.stopped
    }
    pub fn last_seq(&self) -> Seq {
        self.next_seq - 1
    }
    pub fn order_acked_through(&self) -> Seq {
        self.order_acked_through
    }
    pub fn payload_done_through(&self) -> Seq {
        self.payload_done_through
    }
    pub fn dr_applied_through(&self) -> Seq {
        self.dr_applied_through
    }
    pub fn is_dr_link_up(&self) -> bool {
        self.dr_link_up
    }
    /// Whether writes are acknowledged without the DR right now (the degrade policy, with the
    /// link down or the DR's answer overdue; as of the last input's time).
    pub fn is_degraded(&self) -> bool {
        self.degraded()
    }
    /// Ops admitted whose payload has not reached the DR, and their bytes: the RPO right now.
    pub fn lag(&self) -> (u64, u64) {
        (self.last_seq() - self.payload_done_through, self.lag_bytes)
    }
    pub fn ring_used_bytes(&self) -> u64 {
        self.ring.used_bytes()
    }
    /// The buffer named by `SendOrderBatch { buffer, .. }`.
    pub fn order_batch(&self, buffer: usize) -> &[u8] {
        &self.order_buffers[buffer * ORDER_BUFFER_BYTES..(buffer + 1) * ORDER_BUFFER_BYTES]
    }
    /// The primary's copy of the primary-writable area of the aux region (heartbeat + entries).
    pub fn aux_area(&self) -> &[u8] {
        &self.aux_area
    }

    /// Takes the actions produced so far, in the order they must be executed.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, PrimaryAction> {
        self.pump_if_due();
        self.actions.drain(..)
    }

    /// Swaps the pending actions into `buffer` (which must be empty) without copying them: the
    /// cheap way for a runtime to take them and keep calling handlers while it executes them.
    pub fn swap_actions(&mut self, buffer: &mut Vec<PrimaryAction>) {
        assert!(
            buffer.is_empty(),
            "the previous actions were not all executed"
        );
        self.pump_if_due();
        std::mem::swap(&mut self.actions, buffer);
    }

    // ----- inputs -----

    /// A client write of `data` at `volume_offset`. On success `data` has been copied into
    /// `staging` (the staging ring, `ring_bytes` long) at `Admitted::ring_offset`, checksummed
    /// in the same pass; on refusal `staging` is untouched.
    pub fn handle_client_write(
        &mut self,
        client_tag: u64,
        volume_offset: u64,
        data: &[u8],
        staging: &mut [u8],
        now: Nanos,
    ) -> Result<Admitted, WriteRefused> {
        assert_eq!(
            staging.len() as u64,
            self.config.geometry.ring_bytes,
            "the staging ring is the geometry's ring"
        );
        self.advance_clock(now);
        if self.stopped.is_some() {
            return Err(WriteRefused::Stopped);
        }
        let geometry = self.config.geometry;
        let len = u32::try_from(data.len()).map_err(|_| {
            WriteRefused::Invalid(DecodeError::BadLength {
                len: u32::MAX,
                max: geometry.payload_bytes_max,
            })
        })?;
        let probe = OrderRecord {
            epoch: self.config.epoch,
            seq: self.next_seq,
            volume_offset,
            ring_offset: 0,
            len,
            payload_crc: 0,
        };
        probe.validate(&geometry).map_err(WriteRefused::Invalid)?;

        // Admission looks at released table slots and ring space: if inputs since the last pass
        // may have freed some, that pass runs first, so deferring it never refuses a write.
        let span = match self.admit(len) {
            Err(_) if self.pump_due => {
                self.pump_if_due();
                self.admit(len)
            }
            admitted => admitted,
        };
        let span = span.map_err(|limit| {
            self.stats.backpressure += 1;
            WriteRefused::Backpressure(limit)
        })?;

        let seq = self.next_seq;
        self.next_seq += 1;
        self.lag_bytes += u64::from(len);
        let slot = geometry.slot_of(seq);
        debug_assert!(
            self.ops[slot].seq == 0 || self.ops[slot].seq + u64::from(geometry.table_slots) == seq
        );
        self.ops[slot] = OpSlot {
            seq,
            volume_offset,
            ring_offset: span.ring_offset,
            alloc_end: span.alloc_end,
            len,
            payload_crc: copy_crc32c(
                data,
                &mut staging[span.ring_offset as usize..span.ring_offset as usize + data.len()],
            ),
            client_tag,
            local_done: false,
            answered: false,
        };
        self.stats.admitted += 1;
        self.actions.push(PrimaryAction::LocalWrite {
            seq,
            volume_offset,
            ring_offset: span.ring_offset,
            len,
        });
        self.pump_due = true;
        Ok(Admitted {
            seq,
            ring_offset: span.ring_offset,
        })
    }

    /// Checks the configured limits and takes ring space for a write of `len` bytes.
    fn admit(&mut self, len: u32) -> Result<crate::ring::RingSpan, Limit> {
        let geometry = self.config.geometry;
        let in_table = self.next_seq - 1 - self.slots_released_through;
        if in_table >= u64::from(geometry.table_slots) {
            return Err(Limit::TableSlots);
        }
        if self.last_seq() - self.payload_done_through >= self.config.lag_ops_max {
            return Err(Limit::LagOps);
        }
        if self.lag_bytes + u64::from(len) > self.config.lag_bytes_max {
            return Err(Limit::LagBytes);
        }
        self.ring.allocate(u64::from(len)).ok_or(Limit::RingBytes)
    }

    pub fn handle_local_write_done(&mut self, seq: Seq, now: Nanos) {
        self.advance_clock(now);
        let slot = self.live_slot(seq);
        assert!(
            !self.ops[slot].local_done,
            "local write {seq} completed twice"
        );
        self.ops[slot].local_done = true;
        if seq <= self.ack_condition_through && self.lease_valid() {
            self.answer(seq, true);
        }
        self.release();
    }

    /// The local volume failed a write: the volume is in an unknown state, so stop.
    pub fn handle_local_write_failed(&mut self, seq: Seq) {
        self.stop(PrimaryStop::LocalWriteFailed { seq });
    }

    /// The aux has fenced our epoch: it revoked our writes to its table, or (at the runtime's
    /// connection handshake) refused us for it. No lease can be had again, so we stop for good.
    pub fn handle_aux_fenced_us(&mut self, now: Nanos) {
        self.advance_clock(now);
        self.stop(PrimaryStop::FencedByAux);
    }

    /// The DR refused us: in a message, or (at the runtime's connection handshake) before any
    /// message could flow. Fenced or of a stale epoch, we stop for good; every write not yet
    /// answered fails, and none is acknowledged again (I5).
    pub fn handle_dr_refusal(&mut self, refusal: Refusal) {
        match refusal.reason {
            RefusalReason::StaleEpoch | RefusalReason::Fenced => {
                self.stop(PrimaryStop::FencedByDr {
                    dr_epoch: refusal.dr_epoch,
                })
            }
            RefusalReason::Invalid => self.stop(PrimaryStop::RefusedInvalid { seq: refusal.seq }),
        }
    }

    /// A message from the DR (ack, hello or refusal). Bad input is returned as an error and
    /// changes nothing; impossible content (acks for ops never sent) stops the primary.
    pub fn handle_dr_message(&mut self, bytes: &[u8], now: Nanos) -> Result<(), DecodeError> {
        self.advance_clock(now);
        let message = Message::decode(bytes)?;
        if self.stopped.is_some() {
            return Ok(());
        }
        let epoch = message.header.epoch;
        match message.header.kind {
            MessageKind::OrderBatch => {
                return Err(DecodeError::UnknownKind {
                    found: MessageKind::OrderBatch as u8,
                })
            }
            MessageKind::Refused => {
                let refusal = Refusal::decode(message.body)?;
                self.handle_dr_refusal(refusal);
                return Ok(());
            }
            MessageKind::DrAck | MessageKind::DrHello => {}
        }
        if epoch > self.config.epoch {
            self.stop(PrimaryStop::FencedByDr { dr_epoch: epoch });
            return Ok(());
        }
        if epoch < self.config.epoch {
            return Err(DecodeError::StaleEpoch {
                got: epoch,
                current: self.config.epoch,
            });
        }
        let state = DrState::decode(message.body)?;
        state.check_geometry(&self.config.geometry)?;
        let hello = message.header.kind == MessageKind::DrHello;
        // The DR can only hold what we sent, and never forgets what it acked (its log is
        // persistent). Either breach means replication can no longer be trusted.
        let sent_through = if hello {
            self.last_seq()
        } else {
            self.order_sent_through
        };
        if state.held_through > sent_through
            || state.held_through < self.order_acked_through
            || state.applied_through < self.dr_applied_through
        {
            self.stop(PrimaryStop::DrStateMismatch {
                dr_held_through: state.held_through,
                dr_applied_through: state.applied_through,
                sent_through,
                acked_through: self.order_acked_through,
                applied_through: self.dr_applied_through,
            });
            return Ok(());
        }
        if hello {
            // After (re)connect: resend every order record the DR lacks and every payload it has
            // not verified; what is re-sent lands at the same ring position with the same bytes.
            self.dr_link_up = true;
            self.order_batches_inflight.clear();
            self.order_sent_through = state.held_through;
            self.payload_posted_through = state.landed_through;
            self.advance_payload_done(state.landed_through);
        } else {
            while self
                .order_batches_inflight
                .front()
                .is_some_and(|&(last, _)| last <= state.held_through)
            {
                self.order_batches_inflight.pop_front();
            }
        }
        self.order_acked_through = state.held_through;
        self.dr_landed_through = self.dr_landed_through.max(state.landed_through);
        self.dr_applied_through = state.applied_through;
        self.pump_due = true;
        Ok(())
    }

    /// Payload writes up to and including `seq` completed: their bytes are placed in the DR's
    /// ring. A runtime may report a whole poll of completions with its last seq.
    pub fn handle_payload_write_done(&mut self, seq: Seq, now: Nanos) {
        self.advance_clock(now);
        if self.stopped.is_some() || seq <= self.payload_done_through {
            return; // A duplicate from a resend after reconnect.
        }
        // Completions arrive in posting order (one queue pair), so the last one of a poll
        // reports all before it too.
        assert!(
            seq <= self.payload_posted_through,
            "completion for a payload write never posted"
        );
        self.advance_payload_done(seq);
        self.pump_due = true;
    }

    /// The DR link failed (error completion, connection loss). Nothing in flight on it can be
    /// trusted to have arrived; the DR's hello after reconnect tells what did.
    pub fn handle_dr_link_down(&mut self, now: Nanos) {
        self.advance_clock(now);
        self.dr_link_up = false;
        self.order_batches_inflight.clear();
        self.order_sent_through = self.order_acked_through;
        self.payload_posted_through = self.payload_done_through;
        self.pump_due = true;
    }

    pub fn handle_aux_write_done(&mut self, tag: AuxWriteTag, now: Nanos) {
        self.advance_clock(now);
        if self.stopped.is_some() {
            return;
        }
        match tag {
            AuxWriteTag::Heartbeat => {
                assert!(self.heartbeat_inflight);
                self.heartbeat_inflight = false;
                // The lease runs from when the heartbeat was sent, which is before the aux saw it.
                let sent_at = self
                    .heartbeat_sent_at
                    .expect("a heartbeat in flight was sent");
                self.lease_until = self.lease_until.max(sent_at + self.config.lease_ns);
            }
            AuxWriteTag::Entries => {
                let group = self
                    .aux_groups
                    .front_mut()
                    .expect("aux entries completion without a write");
                group.writes_left -= 1;
                if group.writes_left == 0 {
                    // The aux queue pair completes in order, so every earlier group is done too.
                    let group = self.aux_groups.pop_front().expect("the front group");
                    self.aux_queued_done_through =
                        self.aux_queued_done_through.max(group.queued_through);
                    self.aux_replicated_done_through = self
                        .aux_replicated_done_through
                        .max(group.replicated_through);
                }
            }
        }
        self.pump_due = true;
    }

    /// An aux write failed. A remote-access error means the aux revoked our access: we are fenced.
    pub fn handle_aux_write_failed(&mut self, remote_access_error: bool, now: Nanos) {
        if remote_access_error {
            self.handle_aux_fenced_us(now);
            return;
        }
        self.advance_clock(now);
        self.aux_up = false;
        // What was in flight may not have landed: it is written again once the aux is back.
        self.forget_aux_writes_in_flight();
        self.heartbeat_inflight = false;
        self.pump_due = true;
    }

    /// The aux is reachable (again). Its region survived (memory-mapped file) but writes in
    /// flight when it went away may be lost or torn, so every live entry is written again.
    pub fn handle_aux_up(&mut self, now: Nanos) {
        self.advance_clock(now);
        self.aux_up = true;
        self.heartbeat_inflight = false;
        self.aux_queued_done_through = self.slots_released_through;
        self.aux_replicated_done_through = self.slots_released_through;
        self.forget_aux_writes_in_flight();
        self.pump_due = true;
    }

    /// Drops the groups in flight and posts again, from what is known done, everything after.
    fn forget_aux_writes_in_flight(&mut self) {
        self.aux_groups.clear();
        self.aux_queued_posted_through = self.aux_queued_done_through;
        self.aux_replicated_posted_through = self.aux_replicated_done_through;
    }

    /// Time passes: advance the heartbeat when due.
    pub fn handle_tick(&mut self, now: Nanos) {
        self.advance_clock(now);
        // A lease that ran out stops acknowledgements now, not at the next event.
        self.advance_acks();
        if self.stopped.is_some() || !self.aux_up || self.heartbeat_inflight {
            return;
        }
        if self
            .heartbeat_sent_at
            .is_some_and(|at| now.saturating_sub(at) < self.config.heartbeat_interval_ns)
        {
            return;
        }
        self.heartbeat.counter += 1;
        self.heartbeat
            .encode(&mut self.aux_area[AUX_HEARTBEAT_OFFSET..]);
        self.heartbeat_inflight = true;
        self.heartbeat_sent_at = Some(now);
        self.actions.push(PrimaryAction::WriteAux {
            offset: AUX_HEARTBEAT_OFFSET,
            len: crate::wire::HEARTBEAT_BYTES,
            tag: AuxWriteTag::Heartbeat,
        });
    }

    // ----- internals -----

    fn live_slot(&self, seq: Seq) -> usize {
        let slot = self.config.geometry.slot_of(seq);
        assert_eq!(self.ops[slot].seq, seq, "op {seq} is not live");
        slot
    }

    fn advance_payload_done(&mut self, through: Seq) {
        let through = through.min(self.last_seq());
        while self.payload_done_through < through {
            self.payload_done_through += 1;
            let slot = self.config.geometry.slot_of(self.payload_done_through);
            self.lag_bytes -= u64::from(self.ops[slot].len);
        }
    }

    fn degraded(&self) -> bool {
        (self.config.link_loss_policy == LinkLossPolicy::Degrade
            || self
                .config
                .mutations
                .is_on(Mutation::DegradeWhateverThePolicy))
            && (!self.dr_link_up || self.dr_answer_overdue())
    }

    /// The oldest order batch in flight has waited `degrade_after_ns` or longer for the DR.
    fn dr_answer_overdue(&self) -> bool {
        match (
            self.config.degrade_after_ns,
            self.order_batches_inflight.front(),
        ) {
            (Some(after), Some(&(_, sent_at))) => self.now.saturating_sub(sent_at) >= after,
            _ => false,
        }
    }

    fn order_ok_through(&self) -> Seq {
        if self.config.mutations.is_on(Mutation::AckBeforeOrderAck) {
            self.order_sent_through
        } else {
            self.order_acked_through
        }
    }

    fn advance_clock(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        if !self.lease_valid() {
            // Nothing may be acknowledged now; and when the lease is renewed, every op must be
            // looked at again, including those whose local write finished meanwhile (simulator
            // seed 33055: a lease that lapsed and came back between two acknowledgement passes
            // left two ops unacknowledged for good, and their slots filled the table).
            self.ack_condition_through = 0;
        }
    }

    /// Whether the primary may acknowledge right now: its lease from the aux has not run out.
    /// Without it, a primary cut off from the aux could acknowledge a write after the DR was
    /// promoted (simulator seed 2092821: its local write finished after promotion).
    fn lease_valid(&self) -> bool {
        self.now < self.lease_until
    }

    /// The lease's end (for `ordinal status`).
    pub fn lease_until(&self) -> Nanos {
        self.lease_until
    }

    /// Every op up to the returned seq meets the mode's cumulative ack condition (none while
    /// the lease has run out).
    fn compute_ack_condition(&self) -> Seq {
        if !self.lease_valid() {
            return 0;
        }
        let normal = match self.config.mode {
            Mode::OrderSync => self.order_ok_through(),
            Mode::Sync => self.order_ok_through().min(self.payload_done_through),
            Mode::Async => self.aux_queued_done_through,
        };
        if self.degraded() {
            normal.max(self.aux_queued_done_through)
        } else {
            normal
        }
    }

    /// Runs the pass that inputs since the last one made due (see `pump_due`).
    fn pump_if_due(&mut self) {
        if self.pump_due {
            self.pump_due = false;
            self.pump();
        }
    }

    /// Runs everything that may have become possible after the inputs so far.
    fn pump(&mut self) {
        if self.stopped.is_some() {
            return;
        }
        self.advance_acks();
        self.release();
        self.flush_order_batches();
        self.flush_payloads();
        self.flush_aux_entries();
    }

    fn advance_acks(&mut self) {
        let condition = self.compute_ack_condition();
        let previous = self.ack_condition_through;
        self.ack_condition_through = condition;
        if condition > previous {
            for seq in previous.max(self.slots_released_through) + 1..=condition {
                let slot = self.config.geometry.slot_of(seq);
                if self.ops[slot].local_done && !self.ops[slot].answered {
                    self.answer(seq, true);
                }
            }
        }
    }

    fn answer(&mut self, seq: Seq, success: bool) {
        let slot = self.live_slot(seq);
        let degraded = self.config.mode == Mode::Async
            || seq > self.order_ok_through()
            || (self.config.mode == Mode::Sync && seq > self.payload_done_through);
        let op = &mut self.ops[slot];
        if op.answered {
            return;
        }
        op.answered = true;
        if success {
            debug_assert!(op.local_done);
            self.stats.acked += 1;
            self.stats.acked_degraded += u64::from(degraded);
            self.actions.push(PrimaryAction::AckClient {
                seq,
                client_tag: op.client_tag,
                degraded,
            });
        } else {
            self.actions.push(PrimaryAction::FailClient {
                seq,
                client_tag: op.client_tag,
            });
        }
    }

    /// Gives back ring space and table slots, oldest first (patent table 3).
    fn release(&mut self) {
        let ring_free_through = if self.config.mutations.is_on(Mutation::ReuseRingEarly) {
            self.payload_done_through
        } else {
            self.dr_applied_through
        };
        while self.ring_released_through < ring_free_through {
            let seq = self.ring_released_through + 1;
            let slot = self.config.geometry.slot_of(seq);
            // The local write reads the staging ring, so its span stays until that is done.
            if !self.ops[slot].local_done {
                break;
            }
            self.ring.release_through(self.ops[slot].alloc_end);
            self.ring_released_through = seq;
        }
        let slot_free_through = self
            .ring_released_through
            .min(self.dr_applied_through)
            .min(self.aux_replicated_done_through);
        while self.slots_released_through < slot_free_through {
            let seq = self.slots_released_through + 1;
            let slot = self.config.geometry.slot_of(seq);
            if !self.ops[slot].answered {
                break;
            }
            self.ops[slot].seq = 0;
            self.slots_released_through = seq;
        }
    }

    fn flush_order_batches(&mut self) {
        while self.dr_link_up
            && self.order_sent_through < self.last_seq()
            && self.order_batches_inflight.len() < self.config.order_batches_inflight_max
        {
            let first_seq = self.order_sent_through + 1;
            let last_seq = self
                .last_seq()
                .min(self.order_sent_through + self.config.order_batch_records_max as u64);
            let buffer =
                (self.order_batches_sent % self.config.order_batches_inflight_max as u64) as usize;
            let bytes = &mut self.order_buffers
                [buffer * ORDER_BUFFER_BYTES..(buffer + 1) * ORDER_BUFFER_BYTES];
            let count = (last_seq - first_seq + 1) as usize;
            for (index, seq) in (first_seq..=last_seq).enumerate() {
                let op = &self.ops[self.config.geometry.slot_of(seq)];
                debug_assert_eq!(op.seq, seq);
                let record = OrderRecord {
                    epoch: self.config.epoch,
                    seq,
                    volume_offset: op.volume_offset,
                    ring_offset: op.ring_offset,
                    len: op.len,
                    payload_crc: op.payload_crc,
                };
                let at = MESSAGE_HEADER_BYTES + index * ORDER_RECORD_BYTES;
                record.encode(&mut bytes[at..at + ORDER_RECORD_BYTES]);
            }
            let len = Message::seal(
                bytes,
                MessageKind::OrderBatch,
                count as u16,
                self.config.epoch,
                count * ORDER_RECORD_BYTES,
            );
            self.order_batches_sent += 1;
            self.order_batches_inflight.push_back((last_seq, self.now));
            self.order_sent_through = last_seq;
            self.stats.order_batches_sent += 1;
            self.stats.order_records_sent += count as u64;
            self.actions.push(PrimaryAction::SendOrderBatch {
                buffer,
                len,
                first_seq,
                last_seq,
            });
        }
    }

    fn flush_payloads(&mut self) {
        while self.dr_link_up
            && self.payload_posted_through < self.last_seq()
            // After a reconnect, payloads the DR has not verified are posted again even if their
            // write had completed, so `posted` may be below `done` for a while.
            && self.payload_posted_through.saturating_sub(self.payload_done_through) < self.config.payload_writes_inflight_max
        {
            let seq = self.payload_posted_through + 1;
            let op = &self.ops[self.config.geometry.slot_of(seq)];
            debug_assert_eq!(op.seq, seq);
            self.actions.push(PrimaryAction::WritePayload {
                seq,
                ring_offset: op.ring_offset,
                len: op.len,
                imm: seq as u32,
            });
            self.payload_posted_through = seq;
            self.stats.payload_writes_posted += 1;
        }
    }

    /// Writes the status entries that changed since the last group posted: the new ops
    /// ("queued") and the ops that became "replicated", each a contiguous range of the table
    /// (merged when they touch, split in two where one wraps). Up to `AUX_GROUPS_INFLIGHT_MAX`
    /// groups are in flight while acknowledgements wait for the aux, one otherwise, and an entry
    /// that a group in flight holds is not written again until that group completes: the NIC
    /// may still be reading it.
    fn flush_aux_entries(&mut self) {
        let groups_max = if self.config.mode == Mode::Async || self.degraded() {
            AUX_GROUPS_INFLIGHT_MAX
        } else {
            1
        };
        if !self.aux_up || self.aux_groups.len() >= groups_max {
            return;
        }
        let queued_target = self.last_seq();
        let replicated_source = if self.config.mutations.is_on(Mutation::MarkReplicatedOnPost) {
            self.payload_posted_through
        } else {
            self.payload_done_through
        };
        // "Replicated" needs both halves of the patent's condition: the data is at the DR (the
        // payload write completed) and so is the order (acked), so the DR can apply it. Both are
        // cumulative, so the replicated ops are always a prefix (the DR relies on that).
        let mut replicated_target = replicated_source.min(self.order_acked_through);
        // New "replicated" entries stop below the first entry a group in flight holds. Groups'
        // "queued" ranges start above everything posted before them, so only those can be in
        // the way, and everything posted "queued" lies at or below `aux_queued_posted_through`:
        // the new "queued" range is clear of every group in flight.
        let replicated_from = self.aux_replicated_posted_through + 1;
        for group in &self.aux_groups {
            if group.highest >= replicated_from {
                replicated_target = replicated_target.min(group.lowest.max(replicated_from) - 1);
            }
        }
        let replicated_target = replicated_target.max(self.aux_replicated_posted_through);
        debug_assert!(replicated_target <= queued_target);
        let live_from = self.slots_released_through + 1;
        let replicated = replicated_from.max(live_from)..=replicated_target;
        let queued = (self.aux_queued_posted_through + 1).max(live_from)..=queued_target;
        let ranges = match (replicated.is_empty(), queued.is_empty()) {
            (true, true) => return,
            (false, true) => [Some(replicated), None],
            (true, false) => [Some(queued), None],
            (false, false) if *replicated.end() + 1 >= *queued.start() => [
                Some(*replicated.start().min(queued.start())..=*queued.end()),
                None,
            ],
            (false, false) => [Some(replicated), Some(queued)],
        };
        let mut writes = 0;
        let (mut lowest, mut highest) = (Seq::MAX, 0);
        for range in ranges.into_iter().flatten() {
            debug_assert!(
                self.aux_groups
                    .iter()
                    .all(|group| group.highest < *range.start() || group.lowest > *range.end()),
                "an entry of a group in flight would be rewritten"
            );
            lowest = lowest.min(*range.start());
            highest = highest.max(*range.end());
            writes += self.post_aux_entries(*range.start(), *range.end(), replicated_target);
        }
        self.aux_queued_posted_through = queued_target;
        self.aux_replicated_posted_through = replicated_target;
        self.aux_groups.push_back(AuxGroup {
            writes_left: writes,
            queued_through: queued_target,
            replicated_through: replicated_target,
            lowest,
            highest,
        });
    }

    /// Encodes the entries of ops `first..=last` and posts their write (two where the range wraps
    /// the table); returns the number of writes.
    fn post_aux_entries(&mut self, first: Seq, last: Seq, replicated_through: Seq) -> u8 {
        let geometry = self.config.geometry;
        for seq in first..=last {
            let op = &self.ops[geometry.slot_of(seq)];
            debug_assert_eq!(op.seq, seq);
            let status = if seq <= replicated_through {
                PrimaryStatus::Replicated
            } else {
                PrimaryStatus::Queued
            };
            let entry = AuxEntry {
                seq,
                volume_offset: op.volume_offset,
                epoch: self.config.epoch,
                len: op.len,
                status,
            };
            let at = AUX_ENTRIES_OFFSET + geometry.slot_of(seq) * AUX_ENTRY_BYTES;
            entry.encode(&mut self.aux_area[at..at + AUX_ENTRY_BYTES]);
        }
        let first_slot = geometry.slot_of(first);
        let count = (last - first + 1) as usize;
        let until_end = geometry.table_slots as usize - first_slot;
        let pieces = if count <= until_end {
            [(first_slot, count), (0, 0)]
        } else {
            [(first_slot, until_end), (0, count - until_end)]
        };
        let mut writes = 0;
        for (slot, entries) in pieces.into_iter().filter(|&(_, entries)| entries > 0) {
            self.actions.push(PrimaryAction::WriteAux {
                offset: AUX_ENTRIES_OFFSET + slot * AUX_ENTRY_BYTES,
                len: entries * AUX_ENTRY_BYTES,
                tag: AuxWriteTag::Entries,
            });
            self.stats.aux_writes_posted += 1;
            writes += 1;
        }
        writes
    }

    fn stop(&mut self, why: PrimaryStop) {
        if self.stopped.is_some() {
            return;
        }
        // What the inputs before this one made possible is done first, as if each input had
        // been handled on its own.
        self.pump_if_due();
        self.stopped = Some(why);
        // Every write not yet answered fails: once fenced, no new write may be acknowledged (I5).
        for seq in self.slots_released_through + 1..self.next_seq {
            let slot = self.config.geometry.slot_of(seq);
            if !self.ops[slot].answered {
                self.answer(seq, false);
            }
        }
        self.actions.push(PrimaryAction::Stopped(why));
    }
}
