//! The DR: holds the operation order (persistent order log), learns which payloads landed in its
//! staging ring, verifies their checksums, applies them to its volume strictly in operation order,
//! keeps the DR status table, and returns acks and credits. On failover it computes the target
//! operations from the aux's frozen table, applies the usable prefix and reports every loss.
//!
//! The log region (a memory-mapped file in the runtime, a `Vec<u8>` in the simulator) is laid
//! out as two [`RegionHeader`] copies followed by `table_slots` slots of 64 bytes, each an
//! [`OrderRecord`] and the [`DrStatusEntry`] for the same seq. Nothing else is needed to restart:
//! the cursors are recomputed from the slots (see [`Dr::open`]).

use crate::checksum::crc32c;
use crate::config::{Epoch, Geometry, GeometryError, Mutation, Mutations, Seq};
use crate::primary::AUX_ENTRIES_OFFSET;
use crate::wire::{
    AuxEntry, DecodeError, DrState, DrStatus, DrStatusEntry, Message, MessageKind, OrderRecord,
    PrimaryStatus, Refusal, RefusalReason, RegionHeader, AUX_ENTRY_BYTES, DR_LOG_MAGIC,
    DR_LOG_SLOT_BYTES, DR_STATE_BYTES, MESSAGE_HEADER_BYTES, ORDER_RECORD_BYTES, REFUSAL_BYTES,
    REGION_FLAG_FENCED, REGION_FLAG_PROMOTED, REGION_HEADER_BYTES,
};

/// Bytes needed for the DR log region of `table_slots` slots.
pub fn dr_log_bytes(table_slots: u32) -> usize {
    2 * REGION_HEADER_BYTES + table_slots as usize * DR_LOG_SLOT_BYTES
}

/// Largest message the DR sends.
pub const DR_MESSAGE_BYTES_MAX: usize = MESSAGE_HEADER_BYTES + DR_STATE_BYTES;

#[derive(Clone, Copy, Debug)]
pub struct DrConfig {
    pub geometry: Geometry,
    /// Volume writes (applies) in flight at once. The runtime completes them in order.
    pub applies_inflight_max: u64,
    /// Send a credit update without waiting for the next batch once this many ops were applied
    /// since the last report (and always when the DR has caught up).
    pub credit_batch_ops: u64,
    pub mutations: Mutations,
}

impl DrConfig {
    pub fn new(geometry: Geometry) -> Self {
        DrConfig {
            geometry,
            applies_inflight_max: 16,
            credit_batch_ops: 32,
            mutations: Mutations::NONE,
        }
    }
}

/// What the runtime must do for the DR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrAction {
    /// SEND these bytes to the primary.
    Send(OutMessage),
    /// Copy the ring `[ring_offset, +len)` to the volume at `volume_offset`; then call
    /// `handle_apply_done(seq)`. Applies complete in the order they are emitted.
    Apply {
        seq: Seq,
        volume_offset: u64,
        ring_offset: u64,
        len: u32,
    },
    /// Revoke the primary's remote write access to the staging ring (fencing).
    RevokeRingAccess,
    /// Failover finished: the DR is the primary of `epoch` and its volume is consistent.
    Promoted { epoch: Epoch },
}

impl DrAction {
    /// The apply of a held record: copy its ring span to its place on the volume.
    fn apply(record: &OrderRecord) -> DrAction {
        DrAction::Apply {
            seq: record.seq,
            volume_offset: record.volume_offset,
            ring_offset: record.ring_offset,
            len: record.len,
        }
    }
}

/// A log slot as decoded: the order record, and its DR status entry if that decodes.
type CachedSlot = Option<(OrderRecord, Option<DrStatusEntry>)>;

/// A small message, carried inline so that actions need no allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OutMessage {
    bytes: [u8; DR_MESSAGE_BYTES_MAX],
    len: u8,
}

impl OutMessage {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for OutMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match Message::decode(self.as_bytes()) {
            Ok(message) => write!(
                f,
                "OutMessage({:?}, {} bytes)",
                message.header.kind, self.len
            ),
            Err(error) => write!(f, "OutMessage(undecodable: {error})"),
        }
    }
}

/// The role the DR plays right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrRole {
    /// Receiving and applying the primary's stream.
    Replica,
    /// Failover started: the stream is refused, the ring is closed to the primary.
    Fencing,
    /// Failover computed; applying the usable prefix.
    Recovering { cut: Seq },
    /// The DR is the primary of its epoch.
    Promoted,
}

/// Why the DR log region cannot be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The geometry asked for is itself unusable.
    InvalidGeometry(GeometryError),
    TooSmall {
        needed: usize,
        got: usize,
    },
    Header(DecodeError),
    Geometry(DecodeError),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::InvalidGeometry(error) => write!(f, "cannot open a DR log: {error}"),
            OpenError::TooSmall { needed, got } => {
                write!(f, "DR log region is {got} bytes, needs {needed}")
            }
            OpenError::Header(error) => write!(f, "DR log header unreadable: {error}"),
            OpenError::Geometry(error) => write!(f, "DR log was made for another volume: {error}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Why an op is in the loss report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The aux says "queued" (or has no entry) and the DR never saw the payload: its data had not
    /// been asynchronously replicated when the primary failed.
    PayloadNotReplicated,
    /// The aux says "replicated" but the ring slot's checksum does not match the order record.
    ChecksumMismatch,
    /// Usable itself, but after an op that is not: applying it would break the prefix (I1).
    AfterCut,
    /// Known only from the aux table: the order record never reached the DR.
    OrderNotAtDr,
}

impl LossReason {
    pub fn name(self) -> &'static str {
        match self {
            LossReason::PayloadNotReplicated => "payload-not-replicated",
            LossReason::ChecksumMismatch => "checksum-mismatch",
            LossReason::AfterCut => "after-cut",
            LossReason::OrderNotAtDr => "order-not-at-dr",
        }
    }

    /// The reason [`LossReason::name`] names.
    pub fn from_name(name: &str) -> Option<LossReason> {
        [
            LossReason::PayloadNotReplicated,
            LossReason::ChecksumMismatch,
            LossReason::AfterCut,
            LossReason::OrderNotAtDr,
        ]
        .into_iter()
        .find(|reason| reason.name() == name)
    }
}

/// One write lost by the failover: its seq and byte range (I4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostWrite {
    pub seq: Seq,
    pub volume_offset: u64,
    pub len: u32,
    pub reason: LossReason,
}

/// The outcome of a failover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossReport {
    pub old_epoch: Epoch,
    pub new_epoch: Epoch,
    /// Whether the aux's table was read; without it no target op can be recovered and ops known
    /// only to the aux cannot be listed, so the report may be incomplete.
    pub aux_table_read: bool,
    /// Ops applied on the DR before failover started.
    pub applied_before: Seq,
    /// The DR volume is the initial image with ops `1..=cut` applied, in order (I1).
    pub cut: Seq,
    /// Target ops (aux "replicated", DR "not replicated") applied from the ring.
    pub applied_from_ring: u64,
    /// Ops the DR already knew had landed, applied during failover.
    pub applied_landed: u64,
    /// Highest seq the DR held an order record for.
    pub held_through: Seq,
    /// Every op after the cut, in seq order.
    pub lost: Vec<LostWrite>,
}

impl LossReport {
    /// A JSON rendering, for `ordinal failover` and its report file.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(256 + self.lost.len() * 96);
        out.push_str(&format!(
            "{{\"old_epoch\":{},\"new_epoch\":{},\"aux_table_read\":{},\"applied_before\":{},\"cut\":{},\"applied_from_ring\":{},\"applied_landed\":{},\"held_through\":{},\"lost_count\":{},\"lost\":[",
            self.old_epoch, self.new_epoch, self.aux_table_read, self.applied_before, self.cut, self.applied_from_ring, self.applied_landed, self.held_through, self.lost.len()
        ));
        for (index, lost) in self.lost.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "{{\"seq\":{},\"volume_offset\":{},\"len\":{},\"reason\":\"{}\"}}",
                lost.seq,
                lost.volume_offset,
                lost.len,
                lost.reason.name()
            ));
        }
        out.push_str("]}");
        out
    }
}

/// Counters for `ordinal status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrStats {
    pub batches_received: u64,
    pub records_stored: u64,
    pub payloads_landed: u64,
    pub applied: u64,
    pub refused: u64,
    pub checksum_mismatches: u64,
}

#[derive(Debug)]
pub struct Dr<L> {
    config: DrConfig,
    log: L,
    header: RegionHeader,
    role: DrRole,
    held_through: Seq,
    landed_through: Seq,
    applied_through: Seq,
    apply_posted_through: Seq,
    last_reported_applied: Seq,
    /// Payloads whose write-with-immediate arrived before their order record (the two travel on
    /// different queue pairs, which are not ordered with each other). Indexed by table slot.
    landed_early: Box<[bool]>,
    /// The log's slots as decoded values, kept in step with every write to the log. The log is
    /// the persistent truth and is read back only at open; hot paths read this copy instead of
    /// decoding (and checksumming) a slot again each time they look at it.
    slots: Box<[CachedSlot]>,
    /// Records of the batch being stored, decoded once by the check (at most a batch's worth).
    batch: Vec<OrderRecord>,
    actions: Vec<DrAction>,
    stats: DrStats,
}

impl<L: AsRef<[u8]> + AsMut<[u8]>> Dr<L> {
    /// Opens the DR log region. An all-zero region is formatted for `config.geometry` at `epoch`;
    /// otherwise the region must have been made for the same geometry, and the DR resumes where
    /// it stopped: cursors are rebuilt from the slots, and payloads whose order is held are
    /// checked against the ring (those that landed before a crash are recovered, I3 decides).
    pub fn open(
        config: DrConfig,
        mut log: L,
        epoch: Epoch,
        ring: &[u8],
    ) -> Result<Self, OpenError> {
        let geometry = config.geometry;
        geometry.validate().map_err(OpenError::InvalidGeometry)?;
        let needed = dr_log_bytes(geometry.table_slots);
        let got = log.as_ref().len();
        if got < needed {
            return Err(OpenError::TooSmall { needed, got });
        }
        assert_eq!(
            ring.len() as u64,
            geometry.ring_bytes,
            "ring size is fixed by the geometry"
        );
        let header = if log.as_ref()[..2 * REGION_HEADER_BYTES]
            .iter()
            .all(|&b| b == 0)
        {
            let fresh = RegionHeader {
                magic: DR_LOG_MAGIC,
                flags: 0,
                epoch,
                generation: 0,
                geometry,
            };
            fresh.write_next(log.as_mut())
        } else {
            let header =
                RegionHeader::read_newest(log.as_ref(), DR_LOG_MAGIC).map_err(OpenError::Header)?;
            let theirs = DrState {
                ring_bytes: header.geometry.ring_bytes,
                volume_bytes: header.geometry.volume_bytes,
                table_slots: header.geometry.table_slots,
                ..DrState::default()
            };
            theirs
                .check_geometry(&geometry)
                .map_err(OpenError::Geometry)?;
            header
        };
        // A DR that fenced itself stays fenced across a restart: it must not rejoin the old
        // primary's stream halfway through a failover.
        let role = if header.flags & REGION_FLAG_PROMOTED != 0 {
            DrRole::Promoted
        } else if header.flags & REGION_FLAG_FENCED != 0 {
            DrRole::Fencing
        } else {
            DrRole::Replica
        };
        let mut dr = Dr {
            config,
            log,
            header,
            role,
            held_through: 0,
            landed_through: 0,
            applied_through: 0,
            apply_posted_through: 0,
            last_reported_applied: 0,
            landed_early: vec![false; geometry.table_slots as usize].into_boxed_slice(),
            slots: Vec::new().into_boxed_slice(),
            batch: Vec::with_capacity(crate::wire::ORDER_BATCH_RECORDS_MAX),
            actions: Vec::with_capacity(32),
            stats: DrStats::default(),
        };
        dr.slots = (0..geometry.table_slots as usize)
            .map(|slot| read_log_slot(dr.log.as_ref(), &geometry, slot))
            .collect();
        dr.recover_cursors(ring);
        // Payloads found landed must be applied now: waiting for the next message could wait
        // forever, since the primary keeps their ring space (and stops admitting) until then.
        dr.schedule_applies();
        Ok(dr)
    }

    /// Rebuilds the cursors from the slots.
    ///
    /// Applies happen in seq order and each marks its slot "applied" after the volume write, so
    /// the highest applied seq found is applied. But the slots may no longer show it: a slot is
    /// overwritten by the record `table_slots` later, which the DR accepts only once the slot's
    /// op is applied. So every record not marked applied is above the applied prefix, and the
    /// prefix reaches at least to the lowest of them minus one (the case where a whole lap of
    /// slots holds records not yet applied). The held records continue from the prefix while
    /// consecutive seqs are found.
    fn recover_cursors(&mut self, ring: &[u8]) {
        let slots = self.config.geometry.table_slots;
        let mut highest_applied = 0;
        let mut lowest_unapplied = Seq::MAX;
        for slot in 0..slots as usize {
            match self.read_slot(slot) {
                Some((record, Some(status)))
                    if status.status == DrStatus::Applied && status.seq == record.seq =>
                {
                    highest_applied = highest_applied.max(record.seq);
                }
                // A torn status entry counts as not applied: the op is applied again, which
                // writes the same bytes to the same place.
                Some((record, _)) => lowest_unapplied = lowest_unapplied.min(record.seq),
                None => {}
            }
        }
        let applied_through = if lowest_unapplied == Seq::MAX {
            highest_applied
        } else {
            highest_applied.max(lowest_unapplied - 1)
        };
        self.applied_through = applied_through;
        self.apply_posted_through = applied_through;
        self.last_reported_applied = applied_through;
        self.held_through = applied_through;
        while let Some((record, _)) =
            self.read_slot(self.config.geometry.slot_of(self.held_through + 1))
        {
            if record.seq != self.held_through + 1 {
                break;
            }
            self.held_through += 1;
        }
        self.landed_through = applied_through;
        for seq in applied_through + 1..=self.held_through {
            let (record, status) = self
                .read_slot(self.config.geometry.slot_of(seq))
                .expect("held slot decodes");
            let landed = status.is_some_and(|s| s.seq == seq && s.status >= DrStatus::Landed);
            if !landed && self.payload_matches(&record, ring) {
                self.write_status(seq, DrStatus::Landed);
            }
        }
        self.advance_landed();
    }

    // ----- getters -----

    pub fn role(&self) -> DrRole {
        self.role
    }
    pub fn epoch(&self) -> Epoch {
        self.header.epoch
    }
    pub fn stats(&self) -> DrStats {
        self.stats
    }
    pub fn held_through(&self) -> Seq {
        self.held_through
    }
    pub fn landed_through(&self) -> Seq {
        self.landed_through
    }
    pub fn applied_through(&self) -> Seq {
        self.applied_through
    }
    pub fn log(&self) -> &L {
        &self.log
    }
    pub fn into_log(self) -> L {
        self.log
    }
    pub fn state(&self) -> DrState {
        let geometry = self.config.geometry;
        DrState {
            held_through: self.held_through,
            landed_through: self.landed_through,
            applied_through: self.applied_through,
            ring_bytes: geometry.ring_bytes,
            volume_bytes: geometry.volume_bytes,
            table_slots: geometry.table_slots,
        }
    }

    /// The order record the DR holds for `seq`, if any (for checkers and `ordinal status`).
    pub fn held_record(&self, seq: Seq) -> Option<OrderRecord> {
        let (record, _) = self.read_slot(self.config.geometry.slot_of(seq))?;
        (record.seq == seq).then_some(record)
    }

    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, DrAction> {
        self.actions.drain(..)
    }

    /// Swaps the pending actions into `buffer` (which must be empty) without copying them.
    pub fn swap_actions(&mut self, buffer: &mut Vec<DrAction>) {
        assert!(
            buffer.is_empty(),
            "the previous actions were not all executed"
        );
        std::mem::swap(&mut self.actions, buffer);
    }

    // ----- inputs -----

    /// The primary (re)connected: tell it where we stand so it can resend what we lack.
    /// A fenced or promoted DR answers with a refusal instead, which stops the old primary.
    pub fn handle_peer_connected(&mut self) {
        if self.serves_stream() {
            self.send_state(MessageKind::DrHello);
        } else {
            let reason = if self.role == DrRole::Promoted {
                RefusalReason::StaleEpoch
            } else {
                RefusalReason::Fenced
            };
            self.send_refusal(reason, 0);
        }
    }

    /// Whether the primary's stream is accepted: only by a replica (or, with the test-only
    /// `AcceptStaleEpoch` bug, by a promoted DR that forgot to fence).
    fn serves_stream(&self) -> bool {
        self.role == DrRole::Replica
            || (self.role == DrRole::Promoted
                && self.config.mutations.is_on(Mutation::AcceptStaleEpoch))
    }

    /// The epoch stamped on messages of the replication stream. With the `AcceptStaleEpoch` bug a
    /// promoted DR keeps speaking its old epoch, as a DR that never fenced would.
    fn stream_epoch(&self) -> Epoch {
        if self.role == DrRole::Promoted && self.config.mutations.is_on(Mutation::AcceptStaleEpoch)
        {
            self.header.epoch - 1
        } else {
            self.header.epoch
        }
    }

    /// An order batch arrived. It is stored whole or not at all; a bad batch is answered with a
    /// refusal and returned as an error, and the log is unchanged.
    pub fn handle_order_batch(&mut self, bytes: &[u8], ring: &[u8]) -> Result<(), DecodeError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let checked = self.check_order_batch(bytes, &mut batch);
        if let Err((reason, first_seq, error)) = checked {
            self.batch = batch;
            self.stats.refused += 1;
            self.send_refusal(reason, first_seq);
            return Err(error);
        }
        let body = &bytes[MESSAGE_HEADER_BYTES..];
        self.stats.batches_received += 1;
        for (index, &record) in batch.iter().enumerate() {
            if record.seq <= self.held_through {
                continue; // Resent after reconnect; identical, checked above.
            }
            debug_assert_eq!(record.seq, self.held_through + 1);
            let at = index * ORDER_RECORD_BYTES;
            let slot = self.config.geometry.slot_of(record.seq);
            let log_at = 2 * REGION_HEADER_BYTES + slot * DR_LOG_SLOT_BYTES;
            self.log.as_mut()[log_at..log_at + ORDER_RECORD_BYTES]
                .copy_from_slice(&body[at..at + ORDER_RECORD_BYTES]);
            // The slot's old status entry belongs to the op of the previous lap; it is replaced
            // just below, and until then the copy says what the log says.
            let old_status = self.slots[slot].and_then(|(_, status)| status);
            self.slots[slot] = Some((record, old_status));
            let landed =
                std::mem::take(&mut self.landed_early[slot]) && self.payload_matches(&record, ring);
            // "Not replicated" needs no write: a status entry whose seq is not the record's
            // (left from the slot's previous lap) already says so.
            if landed {
                self.write_status(record.seq, DrStatus::Landed);
            }
            self.held_through = record.seq;
            self.stats.records_stored += 1;
        }
        self.batch = batch;
        self.advance_landed();
        self.schedule_applies();
        self.send_state(MessageKind::DrAck);
        Ok(())
    }

    /// Validates a whole batch against the log without changing anything.
    /// The batch's records are decoded once, into `records`, for the caller to store.
    fn check_order_batch(
        &self,
        bytes: &[u8],
        records: &mut Vec<OrderRecord>,
    ) -> Result<(), (RefusalReason, Seq, DecodeError)> {
        let invalid = |seq: Seq, error: DecodeError| (RefusalReason::Invalid, seq, error);
        let message = Message::decode(bytes).map_err(|error| invalid(0, error))?;
        let epoch = self.header.epoch;
        if message.header.kind != MessageKind::OrderBatch {
            return Err(invalid(
                0,
                DecodeError::UnknownKind {
                    found: message.header.kind as u8,
                },
            ));
        }
        let stream_epoch = self.stream_epoch();
        if message.header.epoch < stream_epoch {
            return Err((
                RefusalReason::StaleEpoch,
                0,
                DecodeError::StaleEpoch {
                    got: message.header.epoch,
                    current: epoch,
                },
            ));
        }
        if message.header.epoch > stream_epoch {
            return Err(invalid(
                0,
                DecodeError::NewerEpoch {
                    got: message.header.epoch,
                    current: epoch,
                },
            ));
        }
        if !self.serves_stream() {
            let reason = if self.role == DrRole::Promoted {
                RefusalReason::StaleEpoch
            } else {
                RefusalReason::Fenced
            };
            return Err((
                reason,
                0,
                DecodeError::StaleEpoch {
                    got: message.header.epoch,
                    current: epoch,
                },
            ));
        }
        let window_high = self.applied_through + u64::from(self.config.geometry.table_slots);
        let mut expected = None;
        for index in 0..message.header.count as usize {
            let at = index * ORDER_RECORD_BYTES;
            let record = OrderRecord::decode(&message.body[at..at + ORDER_RECORD_BYTES])
                .map_err(|error| invalid(0, error))?;
            record
                .validate(&self.config.geometry)
                .map_err(|error| invalid(record.seq, error))?;
            if record.epoch != message.header.epoch {
                return Err(invalid(
                    record.seq,
                    DecodeError::StaleEpoch {
                        got: record.epoch,
                        current: message.header.epoch,
                    },
                ));
            }
            if let Some(expected) = expected {
                if record.seq != expected {
                    return Err(invalid(
                        record.seq,
                        DecodeError::SequenceGap {
                            expected,
                            got: record.seq,
                        },
                    ));
                }
            }
            expected = Some(record.seq + 1);
            // Records in a batch are consecutive, so the batch may start anywhere up to
            // `held_through + 1`: earlier records are resends that must match the log exactly.
            if index == 0 && record.seq > self.held_through + 1 {
                return Err(invalid(
                    record.seq,
                    DecodeError::SequenceGap {
                        expected: self.held_through + 1,
                        got: record.seq,
                    },
                ));
            }
            if record.seq <= self.held_through {
                match self.held_record(record.seq) {
                    Some(held) if held == record => {}
                    Some(_) => {
                        return Err(invalid(
                            record.seq,
                            DecodeError::SequenceConflict { seq: record.seq },
                        ))
                    }
                    None => {
                        let low = self
                            .held_through
                            .saturating_sub(u64::from(self.config.geometry.table_slots))
                            + 1;
                        return Err(invalid(
                            record.seq,
                            DecodeError::SequenceOutOfWindow {
                                seq: record.seq,
                                low,
                                high: window_high,
                            },
                        ));
                    }
                }
            } else if record.seq > window_high {
                return Err(invalid(
                    record.seq,
                    DecodeError::SequenceOutOfWindow {
                        seq: record.seq,
                        low: self.applied_through + 1,
                        high: window_high,
                    },
                ));
            }
            records.push(record);
        }
        Ok(())
    }

    /// A payload write-with-immediate completed on the DR: the bytes are in the ring.
    /// `imm` carries the low 32 bits of the seq; the full seq is the one in the DR's window.
    pub fn handle_payload_landed(&mut self, imm: u32, ring: &[u8]) -> Result<(), DecodeError> {
        if !self.serves_stream() {
            return Ok(()); // The ring is closed; failover decides from the aux table.
        }
        // The seq is the one within a table's length of the DR's position. Looking back one
        // table too matters: after a reconnect the primary re-sends every payload the DR had
        // not verified when it said hello, and the DR may have applied some of them since.
        // Two tables (at most 2^25 seqs) are far inside the 2^32 the immediate can tell apart.
        let slots = u64::from(self.config.geometry.table_slots);
        let low = self.applied_through.saturating_sub(slots) + 1;
        let high = self.applied_through + slots;
        let seq = low + u64::from(imm.wrapping_sub(low as u32));
        if seq > high {
            return Err(DecodeError::SequenceOutOfWindow { seq, low, high });
        }
        self.stats.payloads_landed += 1;
        if seq <= self.landed_through {
            return Ok(()); // Re-sent after reconnect; already verified.
        }
        if seq > self.held_through {
            self.landed_early[self.config.geometry.slot_of(seq)] = true;
            return Ok(());
        }
        let record = self.held_record(seq).expect("held seq has its record");
        if !self.payload_matches(&record, ring) {
            // The write completed, yet the bytes are not the ones ordered: never apply them (I3).
            self.stats.checksum_mismatches += 1;
            return Err(DecodeError::BadChecksum {
                what: "payload",
                stored: record.payload_crc,
                computed: crc32c(ring_span(ring, &record)),
            });
        }
        self.write_status(seq, DrStatus::Landed);
        self.advance_landed();
        self.schedule_applies();
        Ok(())
    }

    /// The volume writes of every apply up to and including `through` are durable (applies
    /// complete in order; a runtime may report a whole poll of them with the last seq).
    ///
    /// Only `through` is marked "applied" in the log. Recovery takes the highest mark as the
    /// applied prefix and applies what follows again: the same bytes to the same places, from
    /// ring space the primary still keeps, because credits never run ahead of the marks.
    pub fn handle_apply_done(&mut self, through: Seq) {
        assert!(
            through > self.applied_through,
            "apply completion {through} reported twice"
        );
        assert!(
            through <= self.apply_posted_through,
            "apply {through} was never posted"
        );
        self.write_status(through, DrStatus::Applied);
        self.stats.applied += through - self.applied_through;
        self.applied_through = through;
        match self.role {
            DrRole::Replica => {
                self.schedule_applies();
                let caught_up = self.applied_through == self.landed_through;
                if self.applied_through - self.last_reported_applied >= self.config.credit_batch_ops
                    || caught_up
                {
                    self.send_state(MessageKind::DrAck);
                }
            }
            DrRole::Recovering { cut } => {
                if self.applied_through == cut {
                    self.promote();
                }
            }
            DrRole::Fencing | DrRole::Promoted => {}
        }
    }

    /// Failover, first step: refuse the old primary from now on and close the ring to it. Ops
    /// already being applied finish; nothing new is learned from the stream.
    pub fn begin_failover(&mut self) {
        assert!(
            matches!(self.role, DrRole::Replica | DrRole::Fencing),
            "failover starts from a replica, not {:?}",
            self.role
        );
        if self.role == DrRole::Replica {
            let mut header = self.header;
            header.flags |= REGION_FLAG_FENCED;
            self.header = header.write_next(self.log.as_mut());
        }
        self.role = DrRole::Fencing;
        self.actions.push(DrAction::RevokeRingAccess);
    }

    /// Whether applies started before failover are still in flight; wait for them before
    /// calling [`Dr::failover`].
    pub fn applies_inflight(&self) -> bool {
        self.apply_posted_through > self.applied_through
    }

    /// Failover, second step: with the aux's frozen table (its primary-writable area, or `None`
    /// if the aux is gone) and the ring, pick the target operations exactly as the patent says
    /// (primary "replicated", DR "not replicated"), verify each payload, apply the usable prefix
    /// in operation order and report every op after it. The DR promotes itself once the applies
    /// are done (action `Promoted`).
    pub fn failover(&mut self, aux_area: Option<&[u8]>, ring: &[u8]) -> LossReport {
        assert_eq!(self.role, DrRole::Fencing, "begin_failover first");
        assert!(!self.applies_inflight(), "wait for applies in flight");
        let geometry = self.config.geometry;
        let epoch = self.header.epoch;
        let skip_checksum = self.config.mutations.is_on(Mutation::SkipChecksum);
        let past_gap = self.config.mutations.is_on(Mutation::ApplyPastGap);
        let mut report = LossReport {
            old_epoch: epoch,
            new_epoch: epoch + 1,
            aux_table_read: aux_area.is_some(),
            applied_before: self.applied_through,
            cut: self.applied_through,
            applied_from_ring: 0,
            applied_landed: 0,
            held_through: self.held_through,
            lost: Vec::new(),
        };
        // What the aux says, read as a watermark: the highest seq with a valid "replicated"
        // entry of this epoch. The primary marks "replicated" only for a prefix of ops (every
        // payload up to it completed and every order up to it was acked, both cumulative), so one
        // such entry vouches for every op below it. Reading it per entry instead would lose ops
        // whenever status writes land out of order: at a crash, a later write of entries may have
        // landed while an earlier one did not, or only some chunks of one write (simulator seed
        // 12946). Torn, stale and empty entries record nothing.
        let replicated_watermark =
            aux_area.map_or(0, |area| replicated_watermark(area, &geometry, epoch));
        let aux_replicated = |seq: Seq| seq <= replicated_watermark;
        let mut cut_found = false;
        for seq in self.applied_through + 1..=self.held_through {
            let record = self.held_record(seq).expect("held seq has its record");
            let slot = self.config.geometry.slot_of(seq);
            let (_, status) = self.read_slot(slot).expect("held slot decodes");
            let dr_landed = status.is_some_and(|s| s.seq == seq && s.status >= DrStatus::Landed);
            let (usable, reason, target) = if dr_landed {
                (true, LossReason::AfterCut, false)
            } else if aux_replicated(seq) {
                let matches = skip_checksum || self.payload_matches(&record, ring);
                (
                    matches,
                    if matches {
                        LossReason::AfterCut
                    } else {
                        LossReason::ChecksumMismatch
                    },
                    true,
                )
            } else {
                (false, LossReason::PayloadNotReplicated, false)
            };
            if usable && (!cut_found || past_gap) {
                self.write_status(seq, DrStatus::Landed);
                self.apply_posted_through = seq;
                self.actions.push(DrAction::apply(&record));
                report.cut = seq;
                if target {
                    report.applied_from_ring += 1
                } else {
                    report.applied_landed += 1
                }
            } else {
                cut_found = true;
                report.lost.push(LostWrite {
                    seq,
                    volume_offset: record.volume_offset,
                    len: record.len,
                    reason,
                });
            }
        }
        if past_gap {
            report.lost.retain(|lost| lost.seq > report.cut);
        }
        // Ops the DR never got the order for, but which the primary had admitted (and maybe
        // acknowledged in async or degraded mode): the aux entries name them and their ranges.
        if let Some(area) = aux_area {
            let mut only_on_aux: Vec<LostWrite> = (0..geometry.table_slots as usize)
                .filter_map(|slot| {
                    let at = AUX_ENTRIES_OFFSET + slot * AUX_ENTRY_BYTES;
                    let entry = AuxEntry::decode(area.get(at..at + AUX_ENTRY_BYTES)?).ok()??;
                    // The aux's memory is untrusted input like any other: the entry must be of this
                    // epoch, in its seq's slot, with a seq and a byte range that make sense.
                    let in_volume = entry
                        .volume_offset
                        .checked_add(u64::from(entry.len))
                        .is_some_and(|end| end <= geometry.volume_bytes);
                    (entry.epoch == epoch
                        && entry.seq > self.held_through
                        && entry.seq < SEQ_LIMIT
                        && in_volume
                        && geometry.slot_of(entry.seq) == slot)
                        .then_some(LostWrite {
                            seq: entry.seq,
                            volume_offset: entry.volume_offset,
                            len: entry.len,
                            reason: LossReason::OrderNotAtDr,
                        })
                })
                .collect();
            only_on_aux.sort_by_key(|lost| lost.seq);
            report.lost.extend(only_on_aux);
        }
        debug_assert!(report.lost.windows(2).all(|pair| pair[0].seq < pair[1].seq));
        // Everything up to the cut is being applied, so it has landed (applied <= landed holds).
        self.landed_through = self.landed_through.max(report.cut);
        self.role = DrRole::Recovering { cut: report.cut };
        if self.applied_through == report.cut {
            self.promote();
        }
        report
    }

    // ----- internals -----

    fn promote(&mut self) {
        let mut header = self.header;
        header.epoch += 1;
        header.flags |= REGION_FLAG_PROMOTED;
        self.header = header.write_next(self.log.as_mut());
        self.role = DrRole::Promoted;
        self.actions.push(DrAction::Promoted {
            epoch: self.header.epoch,
        });
    }

    fn read_slot(&self, slot: usize) -> Option<(OrderRecord, Option<DrStatusEntry>)> {
        debug_assert_eq!(
            self.slots[slot],
            read_log_slot(self.log.as_ref(), &self.config.geometry, slot),
            "slot copy out of step with the log"
        );
        self.slots[slot]
    }

    fn write_status(&mut self, seq: Seq, status: DrStatus) {
        let slot = self.config.geometry.slot_of(seq);
        let at = 2 * REGION_HEADER_BYTES + slot * DR_LOG_SLOT_BYTES + ORDER_RECORD_BYTES;
        let entry = DrStatusEntry { seq, status };
        entry.encode(&mut self.log.as_mut()[at..at + crate::wire::DR_STATUS_BYTES]);
        let cached = self.slots[slot]
            .as_mut()
            .expect("status is written only for a held record");
        cached.1 = Some(entry);
    }

    fn payload_matches(&self, record: &OrderRecord, ring: &[u8]) -> bool {
        self.config.mutations.is_on(Mutation::SkipChecksum)
            || crc32c(ring_span(ring, record)) == record.payload_crc
    }

    fn advance_landed(&mut self) {
        while self.landed_through < self.held_through {
            let seq = self.landed_through + 1;
            match self.read_slot(self.config.geometry.slot_of(seq)) {
                Some((record, Some(status)))
                    if record.seq == seq
                        && status.seq == seq
                        && status.status >= DrStatus::Landed =>
                {
                    self.landed_through = seq;
                }
                _ => break,
            }
        }
    }

    fn schedule_applies(&mut self) {
        if self.role != DrRole::Replica {
            return;
        }
        while self.apply_posted_through < self.landed_through
            && self.apply_posted_through - self.applied_through < self.config.applies_inflight_max
        {
            let seq = self.apply_posted_through + 1;
            let record = self.held_record(seq).expect("landed seq has its record");
            self.actions.push(DrAction::apply(&record));
            self.apply_posted_through = seq;
        }
    }

    fn send_state(&mut self, kind: MessageKind) {
        let mut out = OutMessage {
            bytes: [0; DR_MESSAGE_BYTES_MAX],
            len: 0,
        };
        self.state().encode(&mut out.bytes[MESSAGE_HEADER_BYTES..]);
        out.len = Message::seal(&mut out.bytes, kind, 0, self.stream_epoch(), DR_STATE_BYTES) as u8;
        self.last_reported_applied = self.applied_through;
        self.actions.push(DrAction::Send(out));
    }

    fn send_refusal(&mut self, reason: RefusalReason, seq: Seq) {
        let mut out = OutMessage {
            bytes: [0; DR_MESSAGE_BYTES_MAX],
            len: 0,
        };
        Refusal {
            reason,
            dr_epoch: self.header.epoch,
            seq,
        }
        .encode(&mut out.bytes[MESSAGE_HEADER_BYTES..]);
        out.len = Message::seal(
            &mut out.bytes,
            MessageKind::Refused,
            0,
            self.header.epoch,
            REFUSAL_BYTES,
        ) as u8;
        self.actions.push(DrAction::Send(out));
    }
}

/// The highest seq of `epoch` that the aux's primary-writable area marks "replicated".
pub fn replicated_watermark(aux_area: &[u8], geometry: &Geometry, epoch: Epoch) -> Seq {
    (0..geometry.table_slots as usize)
        .filter_map(|slot| {
            let at = AUX_ENTRIES_OFFSET + slot * AUX_ENTRY_BYTES;
            let entry = AuxEntry::decode(aux_area.get(at..at + AUX_ENTRY_BYTES)?).ok()??;
            let genuine = entry.epoch == epoch
                && entry.status == PrimaryStatus::Replicated
                && entry.seq < SEQ_LIMIT
                && geometry.slot_of(entry.seq) == slot;
            genuine.then_some(entry.seq)
        })
        .max()
        .unwrap_or(0)
}

/// Seqs at or above this are refused when read back from disk: far beyond any real stream
/// (2^62 writes), and it keeps the cursor arithmetic clear of overflow.
const SEQ_LIMIT: Seq = 1 << 62;

fn read_log_slot(log: &[u8], geometry: &Geometry, slot: usize) -> CachedSlot {
    let at = 2 * REGION_HEADER_BYTES + slot * DR_LOG_SLOT_BYTES;
    let bytes = log.get(at..at + DR_LOG_SLOT_BYTES)?;
    let record = OrderRecord::decode(&bytes[..ORDER_RECORD_BYTES]).ok()?;
    // A record read back from disk is as untrusted as one off the wire (a damaged or tampered
    // file can carry a valid checksum): it must fit this geometry and sit in its seq's slot.
    if record.validate(geometry).is_err()
        || record.seq >= SEQ_LIMIT
        || geometry.slot_of(record.seq) != slot
    {
        return None;
    }
    Some((
        record,
        DrStatusEntry::decode(&bytes[ORDER_RECORD_BYTES..]).ok(),
    ))
}

/// The order record for `seq` in a DR log region at rest (no DR running), if it holds one.
pub fn log_record(log: &[u8], geometry: &Geometry, seq: Seq) -> Option<OrderRecord> {
    let (record, _) = read_log_slot(log, geometry, geometry.slot_of(seq))?;
    (record.seq == seq).then_some(record)
}

/// The ring bytes an order record names. The record was validated against the geometry, so the
/// span is inside the ring.
pub fn ring_span<'a>(ring: &'a [u8], record: &OrderRecord) -> &'a [u8] {
    &ring[record.ring_offset as usize..(record.ring_offset + u64::from(record.len)) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sample_geometry;
    use crate::primary::aux_primary_area_bytes;

    /// A DR holding ops 1..=count, whose payloads (distinct bytes per op) are in `ring` but
    /// which it has not seen land: exactly the DR of a primary that died with payloads in flight.
    fn dr_holding(count: u64, ring: &mut [u8]) -> Dr<Vec<u8>> {
        let geometry = sample_geometry();
        let mut dr = Dr::open(
            DrConfig::new(geometry),
            vec![0; dr_log_bytes(geometry.table_slots)],
            1,
            ring,
        )
        .expect("fresh log");
        let mut message = vec![0u8; MESSAGE_HEADER_BYTES + count as usize * ORDER_RECORD_BYTES];
        for seq in 1..=count {
            let ring_offset = (seq - 1) * 512;
            let span = &mut ring[ring_offset as usize..ring_offset as usize + 512];
            span.fill(seq as u8);
            let record = OrderRecord {
                epoch: 1,
                seq,
                volume_offset: seq * 4096,
                ring_offset,
                len: 512,
                payload_crc: crc32c(span),
            };
            let at = MESSAGE_HEADER_BYTES + (seq as usize - 1) * ORDER_RECORD_BYTES;
            record.encode(&mut message[at..at + ORDER_RECORD_BYTES]);
        }
        Message::seal(
            &mut message,
            MessageKind::OrderBatch,
            count as u16,
            1,
            count as usize * ORDER_RECORD_BYTES,
        );
        dr.handle_order_batch(&message, ring).expect("valid batch");
        dr.drain_actions().for_each(drop);
        assert_eq!((dr.held_through(), dr.landed_through()), (count, 0));
        dr
    }

    fn aux_area_with(entries: &[(Seq, PrimaryStatus)]) -> Vec<u8> {
        let geometry = sample_geometry();
        let mut area = vec![0u8; aux_primary_area_bytes(geometry.table_slots)];
        for &(seq, status) in entries {
            let at = AUX_ENTRIES_OFFSET + geometry.slot_of(seq) * AUX_ENTRY_BYTES;
            AuxEntry {
                seq,
                volume_offset: seq * 4096,
                epoch: 1,
                len: 512,
                status,
            }
            .encode(&mut area[at..at + AUX_ENTRY_BYTES]);
        }
        area
    }

    /// The aux table is read as a watermark: "replicated" for op 4 vouches for ops 1-3 even if
    /// their own entries still say "queued" (status writes can land out of order at a crash;
    /// simulator seed 12946). All four are target ops, recovered from the ring.
    #[test]
    fn a_replicated_entry_vouches_for_every_op_below_it() {
        let mut ring = vec![0u8; sample_geometry().ring_bytes as usize];
        let mut dr = dr_holding(4, &mut ring);
        dr.begin_failover();
        let area = aux_area_with(&[
            (1, PrimaryStatus::Queued),
            (2, PrimaryStatus::Queued),
            (3, PrimaryStatus::Queued),
            (4, PrimaryStatus::Replicated),
        ]);
        let report = dr.failover(Some(&area), &ring);
        assert_eq!((report.cut, report.applied_from_ring), (4, 4));
        assert!(report.lost.is_empty());
        let applied: Vec<Seq> = dr
            .drain_actions()
            .filter_map(|a| {
                if let DrAction::Apply { seq, .. } = a {
                    Some(seq)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(applied, vec![1, 2, 3, 4]);
    }

    /// A log slot read back from disk is untrusted: a record with a valid checksum but a ring
    /// position outside the ring (a damaged or foreign file) is ignored at open, not trusted
    /// until it makes the DR read outside its ring.
    #[test]
    fn a_tampered_log_record_is_ignored_at_open() {
        let geometry = sample_geometry();
        let mut ring = vec![0u8; geometry.ring_bytes as usize];
        let dr = dr_holding(2, &mut ring);
        let mut log = dr.into_log();
        let at = 2 * REGION_HEADER_BYTES + geometry.slot_of(2) * DR_LOG_SLOT_BYTES;
        let mut record =
            OrderRecord::decode(&log[at..at + ORDER_RECORD_BYTES]).expect("stored record");
        record.ring_offset = geometry.ring_bytes; // Beyond the ring, with a valid checksum.
        record.encode(&mut log[at..at + ORDER_RECORD_BYTES]);
        let reopened = Dr::open(DrConfig::new(geometry), log, 1, &ring).expect("opens");
        assert_eq!(
            reopened.held_through(),
            1,
            "op 2's record must not be trusted"
        );
        assert_eq!(reopened.held_record(2), None);
    }

    /// An unusable geometry is refused at open with a message that says what is wrong.
    #[test]
    fn an_invalid_geometry_is_refused_at_open() {
        let geometry = Geometry {
            table_slots: 3,
            ..sample_geometry()
        };
        let ring = vec![0u8; geometry.ring_bytes as usize];
        let error = Dr::open(DrConfig::new(geometry), vec![0u8; 1 << 16], 1, &ring)
            .expect_err("3 slots is not a power of two");
        assert!(matches!(error, OpenError::InvalidGeometry(_)));
        assert!(
            error
                .to_string()
                .contains("table slots 3 is not a power of two"),
            "{error}"
        );
    }

    /// Without the aux table nothing the DR did not see land may be applied: all are lost, each
    /// reported by seq and range.
    #[test]
    fn without_the_aux_table_no_target_op_is_recovered() {
        let mut ring = vec![0u8; sample_geometry().ring_bytes as usize];
        let mut dr = dr_holding(3, &mut ring);
        dr.begin_failover();
        let report = dr.failover(None, &ring);
        assert_eq!(report.cut, 0);
        assert!(!report.aux_table_read);
        let lost: Vec<(Seq, u64, LossReason)> = report
            .lost
            .iter()
            .map(|l| (l.seq, l.volume_offset, l.reason))
            .collect();
        assert_eq!(
            lost,
            vec![
                (1, 4096, LossReason::PayloadNotReplicated),
                (2, 8192, LossReason::PayloadNotReplicated),
                (3, 12288, LossReason::PayloadNotReplicated)
            ]
        );
    }

    /// A target op whose ring slot does not match its checksum is never applied (I3): the cut
    /// stops before it and it is reported as a checksum mismatch, the ops after it as after-cut.
    #[test]
    fn a_torn_target_op_is_never_applied() {
        let mut ring = vec![0u8; sample_geometry().ring_bytes as usize];
        let mut dr = dr_holding(3, &mut ring);
        ring[512 + 100] ^= 0xFF; // Op 2's slot, torn.
        dr.begin_failover();
        let area = aux_area_with(&[(3, PrimaryStatus::Replicated)]);
        let report = dr.failover(Some(&area), &ring);
        assert_eq!(report.cut, 1);
        let lost: Vec<(Seq, LossReason)> = report.lost.iter().map(|l| (l.seq, l.reason)).collect();
        assert_eq!(
            lost,
            vec![(2, LossReason::ChecksumMismatch), (3, LossReason::AfterCut)]
        );
    }
}
