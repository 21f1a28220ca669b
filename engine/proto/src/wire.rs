//! Wire and memory formats: fixed-size, little-endian, versioned, each protected by CRC-32C.
//!
//! | format          | size | where it lives                                                |
//! |-----------------|------|---------------------------------------------------------------|
//! | `MessageHeader` | 32   | in front of every two-sided message (order batch, DR state)   |
//! | `OrderRecord`   | 48   | in order batches, and at rest in the DR order log             |
//! | `DrState`       | 48   | DR -> primary: acks, credits and the hello after (re)connect  |
//! | `Refusal`       | 16   | DR -> primary: why a batch was refused                        |
//! | `DrStatusEntry` | 16   | beside each record in the DR order log (the DR status value)  |
//! | `AuxEntry`      | 32   | the primary status table in the aux's memory                  |
//! | `Heartbeat`     | 16   | the primary's liveness word in the aux's memory               |
//! | `RegionHeader`  | 64   | head of the DR log file and of the aux table file (two copies) |
//!
//! Decoding never panics on input: every check returns a [`DecodeError`] naming what was wrong.
//! Structural checks (size, magic, version, checksum, reserved bits) happen in `decode`; checks
//! that need context (volume size, ring size, epoch, expected seq) happen in `validate` or in the
//! role that receives the value.

use core::fmt;

use crate::checksum::crc32c;
use crate::config::{Epoch, Geometry, Seq};

/// Version of every format in this module. A peer or file with another version is refused.
pub const FORMAT_VERSION: u8 = 1;

pub const MESSAGE_MAGIC: u32 = u32::from_le_bytes(*b"ORDM");
pub const RECORD_MAGIC: u16 = u16::from_le_bytes(*b"OR");
pub const DR_LOG_MAGIC: u32 = u32::from_le_bytes(*b"ORDL");
pub const AUX_TABLE_MAGIC: u32 = u32::from_le_bytes(*b"ORDA");

pub const MESSAGE_HEADER_BYTES: usize = 32;
pub const ORDER_RECORD_BYTES: usize = 48;
pub const DR_STATE_BYTES: usize = 48;
pub const REFUSAL_BYTES: usize = 16;
pub const DR_STATUS_BYTES: usize = 16;
pub const DR_LOG_SLOT_BYTES: usize = ORDER_RECORD_BYTES + DR_STATUS_BYTES;
pub const AUX_ENTRY_BYTES: usize = 32;
pub const HEARTBEAT_BYTES: usize = 16;
pub const REGION_HEADER_BYTES: usize = 64;

/// Most order records in one batch. 256 records are 12 KiB: one SEND that still fits a
/// pre-posted receive buffer of modest size, and far more than the batching under any queue
/// depth we benchmark (64) needs.
pub const ORDER_BATCH_RECORDS_MAX: usize = 256;
/// Largest body any message may declare; anything larger is refused before it is read.
pub const MESSAGE_BODY_BYTES_MAX: usize = ORDER_BATCH_RECORDS_MAX * ORDER_RECORD_BYTES;

const _: () = assert!(DR_LOG_SLOT_BYTES == 64, "a log slot is one cache line");
const _: () = assert!(MESSAGE_BODY_BYTES_MAX == 12 * 1024);
const _: () = assert!(AUX_ENTRY_BYTES.is_power_of_two() && HEARTBEAT_BYTES <= 64);

/// Why bytes from the network or from disk were refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    Oversized {
        what: &'static str,
        size: usize,
        max: usize,
    },
    BadMagic {
        what: &'static str,
        found: u32,
    },
    BadVersion {
        what: &'static str,
        found: u8,
    },
    UnknownKind {
        found: u8,
    },
    ReservedNotZero {
        what: &'static str,
    },
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    StaleEpoch {
        got: Epoch,
        current: Epoch,
    },
    NewerEpoch {
        got: Epoch,
        current: Epoch,
    },
    BadLength {
        len: u32,
        max: u32,
    },
    Misaligned {
        what: &'static str,
        value: u64,
        align: u32,
    },
    OffsetOutOfRange {
        offset: u64,
        len: u32,
        volume_bytes: u64,
    },
    RingPositionOutOfRange {
        ring_offset: u64,
        len: u32,
        ring_bytes: u64,
    },
    SequenceGap {
        expected: Seq,
        got: Seq,
    },
    SequenceConflict {
        seq: Seq,
    },
    SequenceOutOfWindow {
        seq: Seq,
        low: Seq,
        high: Seq,
    },
    BadState {
        what: &'static str,
        found: u8,
    },
    BadCount {
        count: usize,
        body_bytes: usize,
    },
    GeometryMismatch {
        field: &'static str,
        ours: u64,
        theirs: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecodeError::*;
        match self {
            Truncated { what, needed, got } => {
                write!(f, "{what} truncated: needed {needed} bytes, got {got}")
            }
            Oversized { what, size, max } => {
                write!(f, "{what} oversized: {size} bytes, limit {max}")
            }
            BadMagic { what, found } => write!(f, "{what} has bad magic {found:#x}"),
            BadVersion { what, found } => write!(
                f,
                "{what} has format version {found}, expected {FORMAT_VERSION}"
            ),
            UnknownKind { found } => write!(f, "unknown message kind {found}"),
            ReservedNotZero { what } => write!(f, "{what} has non-zero reserved bits"),
            BadChecksum {
                what,
                stored,
                computed,
            } => {
                write!(
                    f,
                    "{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            StaleEpoch { got, current } => {
                write!(f, "stale epoch {got}: current epoch is {current}")
            }
            NewerEpoch { got, current } => write!(
                f,
                "epoch {got} is newer than ours ({current}): we are fenced"
            ),
            BadLength { len, max } => {
                write!(f, "write length {len} is zero or above the limit {max}")
            }
            Misaligned { what, value, align } => {
                write!(f, "{what} {value} is not a multiple of {align}")
            }
            OffsetOutOfRange {
                offset,
                len,
                volume_bytes,
            } => {
                write!(f, "write of {len} bytes at offset {offset} is beyond the volume of {volume_bytes} bytes")
            }
            RingPositionOutOfRange {
                ring_offset,
                len,
                ring_bytes,
            } => {
                write!(
                    f,
                    "ring position {ring_offset} + {len} is beyond the ring of {ring_bytes} bytes"
                )
            }
            SequenceGap { expected, got } => {
                write!(f, "sequence gap: expected seq {expected}, got {got}")
            }
            SequenceConflict { seq } => write!(f, "seq {seq} arrived again with different content"),
            SequenceOutOfWindow { seq, low, high } => {
                write!(f, "seq {seq} is outside the window {low}..={high}")
            }
            BadState { what, found } => write!(f, "{what} has unknown state {found}"),
            BadCount { count, body_bytes } => write!(
                f,
                "record count {count} does not match a body of {body_bytes} bytes"
            ),
            GeometryMismatch {
                field,
                ours,
                theirs,
            } => write!(f, "{field} differs: ours {ours}, peer's {theirs}"),
        }
    }
}

impl std::error::Error for DecodeError {}

// Little-endian field access. Callers have checked the length first, so the slicing cannot fail;
// the `try_into` is on a slice of exactly the right length.
#[inline(always)]
fn get_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("length checked"))
}
#[inline(always)]
fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("length checked"))
}
#[inline(always)]
fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("length checked"))
}
#[inline(always)]
fn put_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
}
#[inline(always)]
fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
#[inline(always)]
fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<(), DecodeError> {
    if bytes.len() < needed {
        return Err(DecodeError::Truncated {
            what,
            needed,
            got: bytes.len(),
        });
    }
    Ok(())
}

/// Checks the trailing CRC-32C stored at `crc_at` over `bytes[..crc_at]`.
fn check_crc(what: &'static str, bytes: &[u8], crc_at: usize) -> Result<(), DecodeError> {
    let stored = get_u32(bytes, crc_at);
    let computed = crc32c(&bytes[..crc_at]);
    if stored != computed {
        return Err(DecodeError::BadChecksum {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Kinds of two-sided message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// Primary -> DR: `count` order records.
    OrderBatch = 1,
    /// DR -> primary: cumulative acks and credits ([`DrState`]).
    DrAck = 2,
    /// DR -> primary after (re)connect: where the DR stands, so the primary can resend.
    DrHello = 3,
    /// DR -> primary: a batch was refused ([`Refusal`]).
    Refused = 4,
}

impl MessageKind {
    fn from_u8(value: u8) -> Result<Self, DecodeError> {
        Ok(match value {
            1 => MessageKind::OrderBatch,
            2 => MessageKind::DrAck,
            3 => MessageKind::DrHello,
            4 => MessageKind::Refused,
            found => return Err(DecodeError::UnknownKind { found }),
        })
    }
}

/// Header of every two-sided message.
///
/// Layout: magic u32 | version u8 | kind u8 | count u16 | epoch u32 | body_len u32 |
/// body_crc u32 | reserved [u8; 8] | header_crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    pub kind: MessageKind,
    pub count: u16,
    pub epoch: Epoch,
    pub body_len: u32,
    pub body_crc: u32,
}

impl MessageHeader {
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= MESSAGE_HEADER_BYTES);
        assert!(self.body_len as usize <= MESSAGE_BODY_BYTES_MAX);
        put_u32(out, 0, MESSAGE_MAGIC);
        out[4] = FORMAT_VERSION;
        out[5] = self.kind as u8;
        put_u16(out, 6, self.count);
        put_u32(out, 8, self.epoch);
        put_u32(out, 12, self.body_len);
        put_u32(out, 16, self.body_crc);
        out[20..28].fill(0);
        let crc = crc32c(&out[..28]);
        put_u32(out, 28, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "message header";
        need(WHAT, bytes, MESSAGE_HEADER_BYTES)?;
        let magic = get_u32(bytes, 0);
        if magic != MESSAGE_MAGIC {
            return Err(DecodeError::BadMagic {
                what: WHAT,
                found: magic,
            });
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(DecodeError::BadVersion {
                what: WHAT,
                found: bytes[4],
            });
        }
        check_crc(WHAT, bytes, 28)?;
        if bytes[20..28].iter().any(|&b| b != 0) {
            return Err(DecodeError::ReservedNotZero { what: WHAT });
        }
        let header = MessageHeader {
            kind: MessageKind::from_u8(bytes[5])?,
            count: get_u16(bytes, 6),
            epoch: get_u32(bytes, 8),
            body_len: get_u32(bytes, 12),
            body_crc: get_u32(bytes, 16),
        };
        if header.body_len as usize > MESSAGE_BODY_BYTES_MAX {
            return Err(DecodeError::Oversized {
                what: "message body",
                size: header.body_len as usize,
                max: MESSAGE_BODY_BYTES_MAX,
            });
        }
        Ok(header)
    }
}

/// A whole message, checked: header valid, body present, body checksum right, body length fits
/// its kind.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub header: MessageHeader,
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let header = MessageHeader::decode(bytes)?;
        let total = MESSAGE_HEADER_BYTES + header.body_len as usize;
        need("message body", bytes, total)?;
        if bytes.len() > total {
            return Err(DecodeError::Oversized {
                what: "message",
                size: bytes.len(),
                max: total,
            });
        }
        let body = &bytes[MESSAGE_HEADER_BYTES..total];
        let computed = crc32c(body);
        if computed != header.body_crc {
            return Err(DecodeError::BadChecksum {
                what: "message body",
                stored: header.body_crc,
                computed,
            });
        }
        let expected_body = match header.kind {
            MessageKind::OrderBatch => {
                if header.count == 0 || header.count as usize > ORDER_BATCH_RECORDS_MAX {
                    return Err(DecodeError::BadCount {
                        count: header.count as usize,
                        body_bytes: body.len(),
                    });
                }
                header.count as usize * ORDER_RECORD_BYTES
            }
            MessageKind::DrAck | MessageKind::DrHello => DR_STATE_BYTES,
            MessageKind::Refused => REFUSAL_BYTES,
        };
        if body.len() != expected_body {
            return Err(DecodeError::BadCount {
                count: header.count as usize,
                body_bytes: body.len(),
            });
        }
        Ok(Message { header, body })
    }

    /// Writes a message of `kind` whose body is already at `out[MESSAGE_HEADER_BYTES..][..body_len]`;
    /// returns the total length.
    pub fn seal(
        out: &mut [u8],
        kind: MessageKind,
        count: u16,
        epoch: Epoch,
        body_len: usize,
    ) -> usize {
        let total = MESSAGE_HEADER_BYTES + body_len;
        let body_crc = crc32c(&out[MESSAGE_HEADER_BYTES..total]);
        MessageHeader {
            kind,
            count,
            epoch,
            body_len: body_len as u32,
            body_crc,
        }
        .encode(out);
        total
    }
}

/// The operation order of one write: which bytes of the volume it changes, where its payload
/// goes in the DR's staging ring, and the payload's checksum (I3).
///
/// Layout: magic u16 | version u8 | flags u8 | epoch u32 | seq u64 | volume_offset u64 |
/// ring_offset u64 | len u32 | payload_crc u32 | reserved u32 | header_crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrderRecord {
    pub epoch: Epoch,
    pub seq: Seq,
    pub volume_offset: u64,
    pub ring_offset: u64,
    pub len: u32,
    pub payload_crc: u32,
}

impl OrderRecord {
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= ORDER_RECORD_BYTES);
        assert!(self.seq > 0 && self.len > 0);
        put_u16(out, 0, RECORD_MAGIC);
        out[2] = FORMAT_VERSION;
        out[3] = 0;
        put_u32(out, 4, self.epoch);
        put_u64(out, 8, self.seq);
        put_u64(out, 16, self.volume_offset);
        put_u64(out, 24, self.ring_offset);
        put_u32(out, 32, self.len);
        put_u32(out, 36, self.payload_crc);
        put_u32(out, 40, 0);
        let crc = crc32c(&out[..44]);
        put_u32(out, 44, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "order record";
        need(WHAT, bytes, ORDER_RECORD_BYTES)?;
        let magic = get_u16(bytes, 0);
        if magic != RECORD_MAGIC {
            return Err(DecodeError::BadMagic {
                what: WHAT,
                found: u32::from(magic),
            });
        }
        if bytes[2] != FORMAT_VERSION {
            return Err(DecodeError::BadVersion {
                what: WHAT,
                found: bytes[2],
            });
        }
        check_crc(WHAT, bytes, 44)?;
        if bytes[3] != 0 || get_u32(bytes, 40) != 0 {
            return Err(DecodeError::ReservedNotZero { what: WHAT });
        }
        Ok(OrderRecord {
            epoch: get_u32(bytes, 4),
            seq: get_u64(bytes, 8),
            volume_offset: get_u64(bytes, 16),
            ring_offset: get_u64(bytes, 24),
            len: get_u32(bytes, 32),
            payload_crc: get_u32(bytes, 36),
        })
    }

    /// Checks the record against the volume and ring it will be applied to.
    pub fn validate(&self, geometry: &Geometry) -> Result<(), DecodeError> {
        if self.seq == 0 {
            return Err(DecodeError::SequenceGap {
                expected: 1,
                got: 0,
            });
        }
        if self.len == 0 || self.len > geometry.payload_bytes_max {
            return Err(DecodeError::BadLength {
                len: self.len,
                max: geometry.payload_bytes_max,
            });
        }
        let sector = geometry.sector_bytes;
        for (what, value) in [
            ("volume offset", self.volume_offset),
            ("write length", u64::from(self.len)),
            ("ring position", self.ring_offset),
        ] {
            if value % u64::from(sector) != 0 {
                return Err(DecodeError::Misaligned {
                    what,
                    value,
                    align: sector,
                });
            }
        }
        let len = u64::from(self.len);
        if self
            .volume_offset
            .checked_add(len)
            .map_or(true, |end| end > geometry.volume_bytes)
        {
            return Err(DecodeError::OffsetOutOfRange {
                offset: self.volume_offset,
                len: self.len,
                volume_bytes: geometry.volume_bytes,
            });
        }
        if self
            .ring_offset
            .checked_add(len)
            .map_or(true, |end| end > geometry.ring_bytes)
        {
            return Err(DecodeError::RingPositionOutOfRange {
                ring_offset: self.ring_offset,
                len: self.len,
                ring_bytes: geometry.ring_bytes,
            });
        }
        Ok(())
    }
}

/// Where the DR stands: sent as every ack (kind `DrAck`) and as the hello after (re)connect
/// (kind `DrHello`). All three seqs are cumulative: "every op up to and including this one".
///
/// Layout: held_through u64 | landed_through u64 | applied_through u64 | ring_bytes u64 |
/// volume_bytes u64 | table_slots u32 | crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DrState {
    /// Order records held (persisted in the DR order log): the synchronous part (I6).
    pub held_through: Seq,
    /// Payloads known landed in the staging ring with a verified checksum.
    pub landed_through: Seq,
    /// Applied to the DR volume: the primary may reuse ring space and table slots up to here.
    pub applied_through: Seq,
    pub ring_bytes: u64,
    pub volume_bytes: u64,
    pub table_slots: u32,
}

impl DrState {
    pub fn encode(&self, out: &mut [u8]) {
        assert!(
            self.applied_through <= self.landed_through && self.landed_through <= self.held_through
        );
        put_u64(out, 0, self.held_through);
        put_u64(out, 8, self.landed_through);
        put_u64(out, 16, self.applied_through);
        put_u64(out, 24, self.ring_bytes);
        put_u64(out, 32, self.volume_bytes);
        put_u32(out, 40, self.table_slots);
        let crc = crc32c(&out[..44]);
        put_u32(out, 44, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "DR state";
        need(WHAT, bytes, DR_STATE_BYTES)?;
        check_crc(WHAT, bytes, 44)?;
        let state = DrState {
            held_through: get_u64(bytes, 0),
            landed_through: get_u64(bytes, 8),
            applied_through: get_u64(bytes, 16),
            ring_bytes: get_u64(bytes, 24),
            volume_bytes: get_u64(bytes, 32),
            table_slots: get_u32(bytes, 40),
        };
        if !(state.applied_through <= state.landed_through
            && state.landed_through <= state.held_through)
        {
            return Err(DecodeError::SequenceOutOfWindow {
                seq: state.applied_through,
                low: 0,
                high: state.held_through,
            });
        }
        Ok(state)
    }

    /// The DR and the primary must agree on every size, or ring positions and table slots would
    /// mean different things on each side.
    pub fn check_geometry(&self, geometry: &Geometry) -> Result<(), DecodeError> {
        let pairs = [
            ("volume size", geometry.volume_bytes, self.volume_bytes),
            ("ring size", geometry.ring_bytes, self.ring_bytes),
            (
                "table slots",
                u64::from(geometry.table_slots),
                u64::from(self.table_slots),
            ),
        ];
        for (field, ours, theirs) in pairs {
            if ours != theirs {
                return Err(DecodeError::GeometryMismatch {
                    field,
                    ours,
                    theirs,
                });
            }
        }
        Ok(())
    }
}

/// Why the DR refused a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalReason {
    /// The sender's epoch is older than the DR's: the DR was promoted. The primary is fenced.
    StaleEpoch = 1,
    /// The DR is fencing (failover in progress) and takes nothing more.
    Fenced = 2,
    /// The batch failed validation; the DR's log is unchanged.
    Invalid = 3,
}

/// Layout: reason u8 | reserved [u8; 3] | dr_epoch u32 | seq u64 (the first refused seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub dr_epoch: Epoch,
    pub seq: Seq,
}

impl Refusal {
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.reason as u8;
        out[1..4].fill(0);
        put_u32(out, 4, self.dr_epoch);
        put_u64(out, 8, self.seq);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        need("refusal", bytes, REFUSAL_BYTES)?;
        let reason = match bytes[0] {
            1 => RefusalReason::StaleEpoch,
            2 => RefusalReason::Fenced,
            3 => RefusalReason::Invalid,
            found => {
                return Err(DecodeError::BadState {
                    what: "refusal",
                    found,
                })
            }
        };
        if bytes[1..4].iter().any(|&b| b != 0) {
            return Err(DecodeError::ReservedNotZero { what: "refusal" });
        }
        Ok(Refusal {
            reason,
            dr_epoch: get_u32(bytes, 4),
            seq: get_u64(bytes, 8),
        })
    }
}

/// The DR status value of one op (patent table 4), kept beside its order record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum DrStatus {
    /// Order held, payload not (yet) known to be in the ring: "not replicated".
    NotReplicated = 1,
    /// Payload in the ring with a verified checksum: "replicated".
    Landed = 2,
    /// Applied to the DR volume.
    Applied = 3,
}

/// Layout: seq u64 | status u8 | reserved [u8; 3] | crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrStatusEntry {
    pub seq: Seq,
    pub status: DrStatus,
}

impl DrStatusEntry {
    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.seq);
        out[8] = self.status as u8;
        out[9..12].fill(0);
        let crc = crc32c(&out[..12]);
        put_u32(out, 12, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "DR status entry";
        need(WHAT, bytes, DR_STATUS_BYTES)?;
        check_crc(WHAT, bytes, 12)?;
        let status = match bytes[8] {
            1 => DrStatus::NotReplicated,
            2 => DrStatus::Landed,
            3 => DrStatus::Applied,
            found => return Err(DecodeError::BadState { what: WHAT, found }),
        };
        if bytes[9..12].iter().any(|&b| b != 0) {
            return Err(DecodeError::ReservedNotZero { what: WHAT });
        }
        Ok(DrStatusEntry {
            seq: get_u64(bytes, 0),
            status,
        })
    }
}

/// The primary status value of one op (patent table 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum PrimaryStatus {
    /// Admitted; its payload is queued for (or in) asynchronous replication.
    Queued = 1,
    /// The payload write completed at the DR and the DR holds the order: "replicated".
    Replicated = 2,
}

/// One entry of the primary status table on the aux. It carries the op's seq (so an entry left
/// from an earlier lap of the table is recognisable), its epoch, and its byte range (so the DR
/// can report an acknowledged op exactly even if its order record never reached the DR).
///
/// Layout: seq u64 | volume_offset u64 | epoch u32 | len u32 | status u8 | version u8 |
/// reserved u16 | crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuxEntry {
    pub seq: Seq,
    pub volume_offset: u64,
    pub epoch: Epoch,
    pub len: u32,
    pub status: PrimaryStatus,
}

impl AuxEntry {
    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.seq);
        put_u64(out, 8, self.volume_offset);
        put_u32(out, 16, self.epoch);
        put_u32(out, 20, self.len);
        out[24] = self.status as u8;
        out[25] = FORMAT_VERSION;
        put_u16(out, 26, 0);
        let crc = crc32c(&out[..28]);
        put_u32(out, 28, crc);
    }

    /// `Ok(None)` for a never-written (all-zero) entry.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, DecodeError> {
        const WHAT: &str = "aux entry";
        need(WHAT, bytes, AUX_ENTRY_BYTES)?;
        if bytes[..AUX_ENTRY_BYTES].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if bytes[25] != FORMAT_VERSION {
            return Err(DecodeError::BadVersion {
                what: WHAT,
                found: bytes[25],
            });
        }
        check_crc(WHAT, bytes, 28)?;
        let status = match bytes[24] {
            1 => PrimaryStatus::Queued,
            2 => PrimaryStatus::Replicated,
            found => return Err(DecodeError::BadState { what: WHAT, found }),
        };
        if get_u16(bytes, 26) != 0 {
            return Err(DecodeError::ReservedNotZero { what: WHAT });
        }
        Ok(Some(AuxEntry {
            seq: get_u64(bytes, 0),
            volume_offset: get_u64(bytes, 8),
            epoch: get_u32(bytes, 16),
            len: get_u32(bytes, 20),
            status,
        }))
    }
}

/// The primary's liveness word on the aux. Layout: counter u64 | epoch u32 | crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub counter: u64,
    pub epoch: Epoch,
}

impl Heartbeat {
    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.counter);
        put_u32(out, 8, self.epoch);
        let crc = crc32c(&out[..12]);
        put_u32(out, 12, crc);
    }

    /// `Ok(None)` before the first heartbeat.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, DecodeError> {
        need("heartbeat", bytes, HEARTBEAT_BYTES)?;
        if bytes[..HEARTBEAT_BYTES].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        check_crc("heartbeat", bytes, 12)?;
        Ok(Some(Heartbeat {
            counter: get_u64(bytes, 0),
            epoch: get_u32(bytes, 8),
        }))
    }
}

/// Head of the DR log file and of the aux table file: identity, geometry and epoch. Written in two
/// copies with a generation number, alternating, so that a crash in the middle of rewriting one
/// leaves the other intact; the valid copy with the higher generation wins.
///
/// Layout: magic u32 | version u8 | flags u8 | reserved u16 | epoch u32 | table_slots u32 |
/// generation u64 | volume_bytes u64 | ring_bytes u64 | payload_bytes_max u32 | sector_bytes u32 |
/// reserved [u8; 12] | crc u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHeader {
    pub magic: u32,
    pub flags: u8,
    pub epoch: Epoch,
    pub generation: u64,
    pub geometry: Geometry,
}

/// `RegionHeader::flags`: the DR has been promoted (it is the primary of `epoch`).
pub const REGION_FLAG_PROMOTED: u8 = 1 << 0;
/// `RegionHeader::flags`: the aux has fenced the primary of `epoch - 1`; its table is frozen.
pub const REGION_FLAG_FENCED: u8 = 1 << 1;

impl RegionHeader {
    pub fn encode(&self, out: &mut [u8]) {
        out[..REGION_HEADER_BYTES].fill(0);
        put_u32(out, 0, self.magic);
        out[4] = FORMAT_VERSION;
        out[5] = self.flags;
        put_u32(out, 8, self.epoch);
        put_u32(out, 12, self.geometry.table_slots);
        put_u64(out, 16, self.generation);
        put_u64(out, 24, self.geometry.volume_bytes);
        put_u64(out, 32, self.geometry.ring_bytes);
        put_u32(out, 40, self.geometry.payload_bytes_max);
        put_u32(out, 44, self.geometry.sector_bytes);
        let crc = crc32c(&out[..60]);
        put_u32(out, 60, crc);
    }

    pub fn decode(bytes: &[u8], magic: u32) -> Result<Self, DecodeError> {
        const WHAT: &str = "region header";
        need(WHAT, bytes, REGION_HEADER_BYTES)?;
        let found = get_u32(bytes, 0);
        if found != magic {
            return Err(DecodeError::BadMagic { what: WHAT, found });
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(DecodeError::BadVersion {
                what: WHAT,
                found: bytes[4],
            });
        }
        check_crc(WHAT, bytes, 60)?;
        Ok(RegionHeader {
            magic,
            flags: bytes[5],
            epoch: get_u32(bytes, 8),
            generation: get_u64(bytes, 16),
            geometry: Geometry {
                table_slots: get_u32(bytes, 12),
                volume_bytes: get_u64(bytes, 24),
                ring_bytes: get_u64(bytes, 32),
                payload_bytes_max: get_u32(bytes, 40),
                sector_bytes: get_u32(bytes, 44),
            },
        })
    }

    /// Reads the two copies at the start of `region` and returns the newer valid one.
    pub fn read_newest(region: &[u8], magic: u32) -> Result<Self, DecodeError> {
        need("region headers", region, 2 * REGION_HEADER_BYTES)?;
        let first = RegionHeader::decode(&region[..REGION_HEADER_BYTES], magic);
        let second =
            RegionHeader::decode(&region[REGION_HEADER_BYTES..2 * REGION_HEADER_BYTES], magic);
        match (first, second) {
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(error), Err(_)) => Err(error),
        }
    }

    /// Writes `self` with the next generation into the copy the current generation does not use.
    pub fn write_next(mut self, region: &mut [u8]) -> Self {
        self.generation += 1;
        let copy = (self.generation % 2) as usize;
        self.encode(&mut region[copy * REGION_HEADER_BYTES..(copy + 1) * REGION_HEADER_BYTES]);
        self
    }
}
