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

use crate::checksum::{crc32c, crc32c_prefix};
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
fn check_crc<const CRC_AT: usize>(what: &'static str, bytes: &[u8]) -> Result<(), DecodeError> {
    let stored = get_u32(bytes, CRC_AT);
    let computed = crc32c_prefix::<CRC_AT>(bytes);
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
        let crc = crc32c_prefix::<28>(out);
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
        check_crc::<28>(WHAT, bytes)?;
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
        let crc = crc32c_prefix::<44>(out);
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
        check_crc::<44>(WHAT, bytes)?;
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
        // A valid geometry's sector size is a power of two, so alignment is a mask test (this
        // runs once per record on the DR's hot path; a 64-bit division costs tens of cycles).
        debug_assert!(sector.is_power_of_two());
        let misaligned_bits = u64::from(sector) - 1;
        // One test for the three on the way through (valid records are the rule); which one is
        // misaligned is looked up only to name it in the error.
        if (self.volume_offset | u64::from(self.len) | self.ring_offset) & misaligned_bits != 0 {
            let (what, value) = [
                ("volume offset", self.volume_offset),
                ("write length", u64::from(self.len)),
                ("ring position", self.ring_offset),
            ]
            .into_iter()
            .find(|&(_, value)| value & misaligned_bits != 0)
            .expect("one of the three has a misaligned bit");
            return Err(DecodeError::Misaligned {
                what,
                value,
                align: sector,
            });
        }
        let len = u64::from(self.len);
        if self
            .volume_offset
            .checked_add(len)
            .is_none_or(|end| end > geometry.volume_bytes)
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
            .is_none_or(|end| end > geometry.ring_bytes)
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
        let crc = crc32c_prefix::<44>(out);
        put_u32(out, 44, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "DR state";
        need(WHAT, bytes, DR_STATE_BYTES)?;
        check_crc::<44>(WHAT, bytes)?;
        let state = DrState {
            held_through: get_u64(bytes, 0),
            landed_through: get_u64(bytes, 8),
            applied_through: get_u64(bytes, 16),
            ring_bytes: get_u64(bytes, 24),
            volume_bytes: get_u64(bytes, 32),
            table_slots: get_u32(bytes, 40),
        };
        // Applied <= landed <= held: name the seq that breaks it, with the window it must be in.
        if state.landed_through > state.held_through {
            return Err(DecodeError::SequenceOutOfWindow {
                seq: state.landed_through,
                low: state.applied_through,
                high: state.held_through,
            });
        }
        if state.applied_through > state.landed_through {
            return Err(DecodeError::SequenceOutOfWindow {
                seq: state.applied_through,
                low: 0,
                high: state.landed_through,
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
        let crc = crc32c_prefix::<12>(out);
        put_u32(out, 12, crc);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "DR status entry";
        need(WHAT, bytes, DR_STATUS_BYTES)?;
        check_crc::<12>(WHAT, bytes)?;
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
        let crc = crc32c_prefix::<28>(out);
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
        check_crc::<28>(WHAT, bytes)?;
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
        let crc = crc32c_prefix::<12>(out);
        put_u32(out, 12, crc);
    }

    /// `Ok(None)` before the first heartbeat.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, DecodeError> {
        need("heartbeat", bytes, HEARTBEAT_BYTES)?;
        if bytes[..HEARTBEAT_BYTES].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        check_crc::<12>("heartbeat", bytes)?;
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
        let crc = crc32c_prefix::<60>(out);
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
        check_crc::<60>(WHAT, bytes)?;
        let known_flags = REGION_FLAG_PROMOTED | REGION_FLAG_FENCED;
        if bytes[6..8].iter().chain(&bytes[48..60]).any(|&b| b != 0) || bytes[5] & !known_flags != 0
        {
            return Err(DecodeError::ReservedNotZero { what: WHAT });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        crate::config::sample_geometry()
    }

    /// A record that passes `validate` against `geometry()`.
    fn record(seq: Seq) -> OrderRecord {
        OrderRecord {
            epoch: 3,
            seq,
            volume_offset: 4096 * seq,
            ring_offset: 1024 * seq,
            len: 1024,
            payload_crc: 0xDEAD_BEEF ^ seq as u32,
        }
    }

    /// Recomputes the trailing CRC-32C at `crc_at` over `bytes[..crc_at]`, so that a deliberate
    /// change to an earlier field is what the decoder trips over, not the checksum.
    fn fix_crc(bytes: &mut [u8], crc_at: usize) {
        let crc = crc32c(&bytes[..crc_at]);
        put_u32(bytes, crc_at, crc);
    }

    /// A sealed order batch carrying `records`.
    fn batch(records: &[OrderRecord]) -> Vec<u8> {
        let body_len = records.len() * ORDER_RECORD_BYTES;
        let mut buf = vec![0u8; MESSAGE_HEADER_BYTES + body_len];
        for (i, record) in records.iter().enumerate() {
            record.encode(&mut buf[MESSAGE_HEADER_BYTES + i * ORDER_RECORD_BYTES..]);
        }
        let total = Message::seal(
            &mut buf,
            MessageKind::OrderBatch,
            records.len() as u16,
            9,
            body_len,
        );
        assert_eq!(total, buf.len());
        buf
    }

    /// A message with hand-written header fields (any kind byte, count, body length) and correct
    /// header and body checksums, bypassing the asserts in `MessageHeader::encode`.
    fn raw_message(kind: u8, count: u16, body_len: u32, body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; MESSAGE_HEADER_BYTES + body.len()];
        put_u32(&mut buf, 0, MESSAGE_MAGIC);
        buf[4] = FORMAT_VERSION;
        buf[5] = kind;
        put_u16(&mut buf, 6, count);
        put_u32(&mut buf, 8, 9);
        put_u32(&mut buf, 12, body_len);
        put_u32(&mut buf, 16, crc32c(body));
        fix_crc(&mut buf, 28);
        buf[MESSAGE_HEADER_BYTES..].copy_from_slice(body);
        buf
    }

    /// DR state bytes with arbitrary seqs (bypassing the assert in `DrState::encode`).
    fn raw_dr_state(held: Seq, landed: Seq, applied: Seq) -> [u8; DR_STATE_BYTES] {
        let mut buf = [0u8; DR_STATE_BYTES];
        put_u64(&mut buf, 0, held);
        put_u64(&mut buf, 8, landed);
        put_u64(&mut buf, 16, applied);
        put_u64(&mut buf, 24, geometry().ring_bytes);
        put_u64(&mut buf, 32, geometry().volume_bytes);
        put_u32(&mut buf, 40, geometry().table_slots);
        fix_crc(&mut buf, 44);
        buf
    }

    fn sample_dr_state() -> DrState {
        DrState {
            held_through: 40,
            landed_through: 30,
            applied_through: 20,
            ring_bytes: geometry().ring_bytes,
            volume_bytes: geometry().volume_bytes,
            table_slots: geometry().table_slots,
        }
    }

    fn sample_aux_entry() -> AuxEntry {
        AuxEntry {
            seq: 77,
            volume_offset: 8192,
            epoch: 4,
            len: 4096,
            status: PrimaryStatus::Replicated,
        }
    }

    fn sample_region_header(generation: u64) -> RegionHeader {
        RegionHeader {
            magic: DR_LOG_MAGIC,
            flags: REGION_FLAG_PROMOTED | REGION_FLAG_FENCED,
            epoch: 6,
            generation,
            geometry: geometry(),
        }
    }

    fn encoded<const N: usize>(encode: impl FnOnce(&mut [u8])) -> [u8; N] {
        let mut buf = [0u8; N];
        encode(&mut buf);
        buf
    }

    /// A tiny xorshift64 PRNG: deterministic, no dependencies.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn byte(&mut self) -> u8 {
            (self.next() >> 32) as u8
        }

        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.byte();
            }
        }
    }

    #[track_caller]
    fn assert_truncated<T: fmt::Debug>(
        result: Result<T, DecodeError>,
        what: &str,
        needed: usize,
        got: usize,
    ) {
        match result {
            Err(DecodeError::Truncated {
                what: w,
                needed: n,
                got: g,
            }) => assert_eq!((w, n, g), (what, needed, got)),
            other => panic!("expected Truncated for {what}, got {other:?}"),
        }
    }

    // ---- round trips ------------------------------------------------------------------------

    #[test]
    fn message_header_round_trips() {
        // MessageHeader::encode then decode returns the same header for every kind.
        for kind in [
            MessageKind::OrderBatch,
            MessageKind::DrAck,
            MessageKind::DrHello,
            MessageKind::Refused,
        ] {
            let header = MessageHeader {
                kind,
                count: 17,
                epoch: 0xA1B2_C3D4,
                body_len: MESSAGE_BODY_BYTES_MAX as u32,
                body_crc: 0x1234_5678,
            };
            let bytes: [u8; MESSAGE_HEADER_BYTES] = encoded(|out| header.encode(out));
            assert_eq!(&bytes[..4], b"ORDM");
            assert_eq!(MessageHeader::decode(&bytes), Ok(header));
        }
    }

    #[test]
    fn order_batch_message_round_trips() {
        // Message::seal of an order batch decodes to the same header and records.
        let records = [record(1), record(2), record(3)];
        let bytes = batch(&records);
        let message = Message::decode(&bytes).unwrap();
        assert_eq!(message.header.kind, MessageKind::OrderBatch);
        assert_eq!(message.header.count, 3);
        assert_eq!(message.header.epoch, 9);
        assert_eq!(message.header.body_len as usize, 3 * ORDER_RECORD_BYTES);
        assert_eq!(message.body, &bytes[MESSAGE_HEADER_BYTES..]);
        let decoded: Vec<_> = message
            .body
            .chunks_exact(ORDER_RECORD_BYTES)
            .map(|chunk| OrderRecord::decode(chunk).unwrap())
            .collect();
        assert_eq!(decoded, records);
    }

    #[test]
    fn full_order_batch_at_the_body_limit_round_trips() {
        // A full batch of ORDER_BATCH_RECORDS_MAX records (body at the size limit) is accepted.
        let records: Vec<_> = (1..=ORDER_BATCH_RECORDS_MAX as u64).map(record).collect();
        let bytes = batch(&records);
        let message = Message::decode(&bytes).unwrap();
        assert_eq!(message.header.count as usize, ORDER_BATCH_RECORDS_MAX);
        assert_eq!(message.body.len(), MESSAGE_BODY_BYTES_MAX);
    }

    #[test]
    fn dr_state_and_refusal_messages_round_trip() {
        // DrAck, DrHello and Refused messages sealed with their bodies decode to the same values.
        let state = sample_dr_state();
        for kind in [MessageKind::DrAck, MessageKind::DrHello] {
            let mut buf = vec![0u8; MESSAGE_HEADER_BYTES + DR_STATE_BYTES];
            state.encode(&mut buf[MESSAGE_HEADER_BYTES..]);
            let total = Message::seal(&mut buf, kind, 0, 5, DR_STATE_BYTES);
            let message = Message::decode(&buf[..total]).unwrap();
            assert_eq!(message.header.kind, kind);
            assert_eq!(DrState::decode(message.body), Ok(state));
        }
        let refusal = Refusal {
            reason: RefusalReason::Fenced,
            dr_epoch: 8,
            seq: 1234,
        };
        let mut buf = vec![0u8; MESSAGE_HEADER_BYTES + REFUSAL_BYTES];
        refusal.encode(&mut buf[MESSAGE_HEADER_BYTES..]);
        let total = Message::seal(&mut buf, MessageKind::Refused, 0, 8, REFUSAL_BYTES);
        let message = Message::decode(&buf[..total]).unwrap();
        assert_eq!(message.header.kind, MessageKind::Refused);
        assert_eq!(Refusal::decode(message.body), Ok(refusal));
    }

    #[test]
    fn order_record_round_trips() {
        // OrderRecord::encode then decode returns the same record, including extreme field values.
        let extreme = OrderRecord {
            epoch: u32::MAX,
            seq: u64::MAX,
            volume_offset: u64::MAX,
            ring_offset: u64::MAX,
            len: u32::MAX,
            payload_crc: u32::MAX,
        };
        for rec in [record(1), record(200), extreme] {
            let bytes: [u8; ORDER_RECORD_BYTES] = encoded(|out| rec.encode(out));
            assert_eq!(&bytes[..2], b"OR");
            assert_eq!(OrderRecord::decode(&bytes), Ok(rec));
        }
    }

    #[test]
    fn dr_state_round_trips() {
        // DrState round-trips, including the all-equal and all-zero cases.
        let all_equal = DrState {
            held_through: 9,
            landed_through: 9,
            applied_through: 9,
            ..sample_dr_state()
        };
        for state in [sample_dr_state(), all_equal, DrState::default()] {
            let bytes: [u8; DR_STATE_BYTES] = encoded(|out| state.encode(out));
            assert_eq!(DrState::decode(&bytes), Ok(state));
        }
    }

    #[test]
    fn refusal_round_trips_for_every_reason() {
        // Refusal::encode then decode returns the same refusal for each reason.
        for reason in [
            RefusalReason::StaleEpoch,
            RefusalReason::Fenced,
            RefusalReason::Invalid,
        ] {
            let refusal = Refusal {
                reason,
                dr_epoch: 11,
                seq: u64::MAX - 3,
            };
            let bytes: [u8; REFUSAL_BYTES] = encoded(|out| refusal.encode(out));
            assert_eq!(Refusal::decode(&bytes), Ok(refusal));
        }
    }

    #[test]
    fn dr_status_entry_round_trips_for_every_status() {
        // DrStatusEntry::encode then decode returns the same entry for each status.
        for status in [DrStatus::NotReplicated, DrStatus::Landed, DrStatus::Applied] {
            let entry = DrStatusEntry { seq: 4242, status };
            let bytes: [u8; DR_STATUS_BYTES] = encoded(|out| entry.encode(out));
            assert_eq!(DrStatusEntry::decode(&bytes), Ok(entry));
        }
    }

    #[test]
    fn aux_entry_round_trips_and_all_zero_is_none() {
        // AuxEntry round-trips for both statuses, and a never-written (all-zero) entry is Ok(None).
        for status in [PrimaryStatus::Queued, PrimaryStatus::Replicated] {
            let entry = AuxEntry {
                status,
                ..sample_aux_entry()
            };
            let bytes: [u8; AUX_ENTRY_BYTES] = encoded(|out| entry.encode(out));
            assert_eq!(AuxEntry::decode(&bytes), Ok(Some(entry)));
        }
        assert_eq!(AuxEntry::decode(&[0u8; AUX_ENTRY_BYTES]), Ok(None));
        // Trailing bytes beyond the entry do not matter to the all-zero test.
        let mut longer = [0u8; AUX_ENTRY_BYTES + 4];
        longer[AUX_ENTRY_BYTES] = 0xFF;
        assert_eq!(AuxEntry::decode(&longer), Ok(None));
    }

    #[test]
    fn heartbeat_round_trips_and_all_zero_is_none() {
        // Heartbeat round-trips, and the all-zero word before the first heartbeat is Ok(None).
        let beat = Heartbeat {
            counter: 1 << 40,
            epoch: 12,
        };
        let bytes: [u8; HEARTBEAT_BYTES] = encoded(|out| beat.encode(out));
        assert_eq!(Heartbeat::decode(&bytes), Ok(Some(beat)));
        assert_eq!(Heartbeat::decode(&[0u8; HEARTBEAT_BYTES]), Ok(None));
    }

    #[test]
    fn region_header_round_trips() {
        // RegionHeader::encode then decode (with the same magic) returns the same header.
        for header in [
            sample_region_header(0),
            sample_region_header(u64::MAX),
            RegionHeader {
                magic: AUX_TABLE_MAGIC,
                flags: 0,
                ..sample_region_header(3)
            },
        ] {
            let bytes: [u8; REGION_HEADER_BYTES] = encoded(|out| header.encode(out));
            assert_eq!(RegionHeader::decode(&bytes, header.magic), Ok(header));
        }
    }

    #[test]
    fn region_read_newest_picks_the_higher_generation() {
        // read_newest returns the valid copy with the higher generation, whichever slot it is in.
        for (first, second) in [(4, 5), (5, 4)] {
            let mut region = [0u8; 2 * REGION_HEADER_BYTES];
            sample_region_header(first).encode(&mut region[..REGION_HEADER_BYTES]);
            sample_region_header(second).encode(&mut region[REGION_HEADER_BYTES..]);
            let newest = RegionHeader::read_newest(&region, DR_LOG_MAGIC).unwrap();
            assert_eq!(newest, sample_region_header(5));
        }
    }

    #[test]
    fn region_read_newest_survives_one_torn_copy() {
        // read_newest skips a torn copy (even the higher generation); with both torn it errors.
        let mut region = [0u8; 2 * REGION_HEADER_BYTES];
        sample_region_header(4).encode(&mut region[..REGION_HEADER_BYTES]);
        sample_region_header(5).encode(&mut region[REGION_HEADER_BYTES..]);

        let mut torn_newer = region;
        torn_newer[REGION_HEADER_BYTES + 30] ^= 0x40;
        assert_eq!(
            RegionHeader::read_newest(&torn_newer, DR_LOG_MAGIC),
            Ok(sample_region_header(4))
        );

        let mut torn_older = region;
        torn_older[50] ^= 0x01;
        assert_eq!(
            RegionHeader::read_newest(&torn_older, DR_LOG_MAGIC),
            Ok(sample_region_header(5))
        );

        let mut both_torn = torn_newer;
        both_torn[50] ^= 0x01;
        let err = RegionHeader::read_newest(&both_torn, DR_LOG_MAGIC).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::BadChecksum {
                    what: "region header",
                    ..
                }
            ),
            "{err:?}"
        );

        let err =
            RegionHeader::read_newest(&[0u8; 2 * REGION_HEADER_BYTES], DR_LOG_MAGIC).unwrap_err();
        assert_eq!(
            err,
            DecodeError::BadMagic {
                what: "region header",
                found: 0
            }
        );
    }

    #[test]
    fn region_write_next_alternates_copies() {
        // write_next bumps the generation and writes the other copy, keeping the previous one.
        let mut region = [0u8; 2 * REGION_HEADER_BYTES];
        let mut header = sample_region_header(0);
        for expected_generation in 1..=6u64 {
            let before = region;
            header = header.write_next(&mut region);
            assert_eq!(header.generation, expected_generation);
            let copy = (expected_generation % 2) as usize;
            let other = 1 - copy;
            let slot = |i: usize| i * REGION_HEADER_BYTES..(i + 1) * REGION_HEADER_BYTES;
            assert_eq!(
                RegionHeader::decode(&region[slot(copy)], DR_LOG_MAGIC),
                Ok(header)
            );
            assert_eq!(region[slot(other)], before[slot(other)]);
            assert_eq!(RegionHeader::read_newest(&region, DR_LOG_MAGIC), Ok(header));
            if expected_generation > 1 {
                let previous = RegionHeader::decode(&region[slot(other)], DR_LOG_MAGIC).unwrap();
                assert_eq!(previous.generation, expected_generation - 1);
            }
        }
    }

    // ---- structural errors ------------------------------------------------------------------

    #[test]
    fn short_input_is_truncated_for_every_decoder() {
        // Every decoder reports Truncated with the needed and received sizes when input is short.
        let zeros = [0u8; 2 * REGION_HEADER_BYTES];
        for got in [0, 1] {
            assert_truncated(
                MessageHeader::decode(&zeros[..got]),
                "message header",
                32,
                got,
            );
        }
        assert_truncated(
            MessageHeader::decode(&zeros[..31]),
            "message header",
            32,
            31,
        );
        assert_truncated(Message::decode(&zeros[..31]), "message header", 32, 31);
        assert_truncated(OrderRecord::decode(&zeros[..47]), "order record", 48, 47);
        assert_truncated(DrState::decode(&zeros[..47]), "DR state", 48, 47);
        assert_truncated(Refusal::decode(&zeros[..15]), "refusal", 16, 15);
        assert_truncated(
            DrStatusEntry::decode(&zeros[..15]),
            "DR status entry",
            16,
            15,
        );
        assert_truncated(AuxEntry::decode(&zeros[..31]), "aux entry", 32, 31);
        assert_truncated(Heartbeat::decode(&zeros[..15]), "heartbeat", 16, 15);
        assert_truncated(
            RegionHeader::decode(&zeros[..63], DR_LOG_MAGIC),
            "region header",
            64,
            63,
        );
        assert_truncated(
            RegionHeader::read_newest(&zeros[..127], DR_LOG_MAGIC),
            "region headers",
            128,
            127,
        );
    }

    #[test]
    fn message_with_short_body_is_truncated() {
        // A valid header whose declared body is not all present gives Truncated for the body.
        let bytes = batch(&[record(1), record(2)]);
        let short = &bytes[..bytes.len() - 1];
        assert_truncated(
            Message::decode(short),
            "message body",
            bytes.len(),
            bytes.len() - 1,
        );
        assert_truncated(
            Message::decode(&bytes[..MESSAGE_HEADER_BYTES]),
            "message body",
            bytes.len(),
            MESSAGE_HEADER_BYTES,
        );
    }

    #[test]
    fn body_len_above_the_limit_is_oversized() {
        // A header with body_len > MESSAGE_BODY_BYTES_MAX (CRC valid) is Oversized.
        let too_big = MESSAGE_BODY_BYTES_MAX as u32 + 1;
        let header = raw_message(MessageKind::OrderBatch as u8, 1, too_big, &[]);
        let expected = DecodeError::Oversized {
            what: "message body",
            size: MESSAGE_BODY_BYTES_MAX + 1,
            max: MESSAGE_BODY_BYTES_MAX,
        };
        assert_eq!(MessageHeader::decode(&header), Err(expected.clone()));
        assert_eq!(Message::decode(&header).unwrap_err(), expected);
        let huge = raw_message(MessageKind::DrAck as u8, 0, u32::MAX, &[]);
        assert!(matches!(
            Message::decode(&huge),
            Err(DecodeError::Oversized { size, .. }) if size == u32::MAX as usize
        ));
    }

    #[test]
    fn message_with_trailing_bytes_is_oversized() {
        // Bytes after the declared body make the message Oversized.
        let mut bytes = batch(&[record(1)]);
        let total = bytes.len();
        bytes.push(0);
        assert_eq!(
            Message::decode(&bytes).unwrap_err(),
            DecodeError::Oversized {
                what: "message",
                size: total + 1,
                max: total,
            }
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        // Message header, order record and region header reject a wrong magic with BadMagic.
        let mut message = batch(&[record(1)]);
        message[0] ^= 0xFF;
        assert!(matches!(
            Message::decode(&message),
            Err(DecodeError::BadMagic {
                what: "message header",
                ..
            })
        ));
        fix_crc(&mut message, 28);
        assert!(matches!(
            MessageHeader::decode(&message),
            Err(DecodeError::BadMagic {
                what: "message header",
                ..
            })
        ));

        let mut rec: [u8; ORDER_RECORD_BYTES] = encoded(|out| record(1).encode(out));
        rec[1] = b'X';
        fix_crc(&mut rec, 44);
        assert_eq!(
            OrderRecord::decode(&rec),
            Err(DecodeError::BadMagic {
                what: "order record",
                found: u32::from(u16::from_le_bytes(*b"OX")),
            })
        );

        let region: [u8; REGION_HEADER_BYTES] = encoded(|out| sample_region_header(1).encode(out));
        // A DR log header is not an aux table header.
        assert_eq!(
            RegionHeader::decode(&region, AUX_TABLE_MAGIC),
            Err(DecodeError::BadMagic {
                what: "region header",
                found: DR_LOG_MAGIC,
            })
        );
    }

    #[test]
    fn bad_version_is_refused() {
        // Message header, order record, aux entry and region header reject other versions.
        let mut message = batch(&[record(1)]);
        message[4] = FORMAT_VERSION + 1;
        fix_crc(&mut message, 28);
        assert_eq!(
            Message::decode(&message).unwrap_err(),
            DecodeError::BadVersion {
                what: "message header",
                found: FORMAT_VERSION + 1,
            }
        );

        let mut rec: [u8; ORDER_RECORD_BYTES] = encoded(|out| record(1).encode(out));
        rec[2] = 0;
        fix_crc(&mut rec, 44);
        assert_eq!(
            OrderRecord::decode(&rec),
            Err(DecodeError::BadVersion {
                what: "order record",
                found: 0,
            })
        );

        let mut aux: [u8; AUX_ENTRY_BYTES] = encoded(|out| sample_aux_entry().encode(out));
        aux[25] = 7;
        fix_crc(&mut aux, 28);
        assert_eq!(
            AuxEntry::decode(&aux),
            Err(DecodeError::BadVersion {
                what: "aux entry",
                found: 7,
            })
        );

        let mut region: [u8; REGION_HEADER_BYTES] =
            encoded(|out| sample_region_header(1).encode(out));
        region[4] = 2;
        fix_crc(&mut region, 60);
        assert_eq!(
            RegionHeader::decode(&region, DR_LOG_MAGIC),
            Err(DecodeError::BadVersion {
                what: "region header",
                found: 2,
            })
        );
    }

    #[test]
    fn unknown_message_kind_is_refused() {
        // A kind byte outside 1..=4 (header CRC fixed up) is UnknownKind naming the byte.
        for kind in [0u8, 5, 0x80, 0xFF] {
            let message = raw_message(kind, 0, 0, &[]);
            assert_eq!(
                MessageHeader::decode(&message),
                Err(DecodeError::UnknownKind { found: kind })
            );
            assert_eq!(
                Message::decode(&message).unwrap_err(),
                DecodeError::UnknownKind { found: kind }
            );
        }
    }

    #[test]
    fn non_zero_reserved_bytes_are_refused() {
        // Each non-zero reserved byte (CRC fixed up) gives ReservedNotZero naming the format.
        let message = batch(&[record(1)]);
        for at in 20..28 {
            let mut bad = message.clone();
            bad[at] = 1;
            fix_crc(&mut bad, 28);
            assert_eq!(
                Message::decode(&bad).unwrap_err(),
                DecodeError::ReservedNotZero {
                    what: "message header"
                },
                "byte {at}"
            );
        }

        let rec: [u8; ORDER_RECORD_BYTES] = encoded(|out| record(1).encode(out));
        for at in [3, 40, 41, 42, 43] {
            let mut bad = rec;
            bad[at] = 0x10;
            fix_crc(&mut bad, 44);
            assert_eq!(
                OrderRecord::decode(&bad),
                Err(DecodeError::ReservedNotZero {
                    what: "order record"
                }),
                "byte {at}"
            );
        }

        let refusal: [u8; REFUSAL_BYTES] = encoded(|out| {
            Refusal {
                reason: RefusalReason::Invalid,
                dr_epoch: 1,
                seq: 2,
            }
            .encode(out)
        });
        for at in 1..4 {
            let mut bad = refusal;
            bad[at] = 0xFF;
            assert_eq!(
                Refusal::decode(&bad),
                Err(DecodeError::ReservedNotZero { what: "refusal" }),
                "byte {at}"
            );
        }

        let status: [u8; DR_STATUS_BYTES] = encoded(|out| {
            DrStatusEntry {
                seq: 5,
                status: DrStatus::Landed,
            }
            .encode(out)
        });
        for at in 9..12 {
            let mut bad = status;
            bad[at] = 2;
            fix_crc(&mut bad, 12);
            assert_eq!(
                DrStatusEntry::decode(&bad),
                Err(DecodeError::ReservedNotZero {
                    what: "DR status entry"
                }),
                "byte {at}"
            );
        }

        let aux: [u8; AUX_ENTRY_BYTES] = encoded(|out| sample_aux_entry().encode(out));
        for at in [26, 27] {
            let mut bad = aux;
            bad[at] = 0x80;
            fix_crc(&mut bad, 28);
            assert_eq!(
                AuxEntry::decode(&bad),
                Err(DecodeError::ReservedNotZero { what: "aux entry" }),
                "byte {at}"
            );
        }
    }

    #[test]
    fn flipped_bytes_fail_the_checksum() {
        // One changed byte in each CRC-protected format gives BadChecksum naming that format.
        fn check<T: fmt::Debug>(result: Result<T, DecodeError>, expected_what: &str) {
            match result {
                Err(DecodeError::BadChecksum {
                    what,
                    stored,
                    computed,
                }) => {
                    assert_eq!(what, expected_what);
                    assert_ne!(stored, computed);
                }
                other => panic!("expected BadChecksum for {expected_what}, got {other:?}"),
            }
        }

        let message = batch(&[record(1), record(2)]);
        let mut bad = message.clone();
        bad[8] ^= 0x01; // epoch
        check(Message::decode(&bad), "message header");
        let mut bad = message.clone();
        bad[MESSAGE_HEADER_BYTES + 60] ^= 0x20; // inside the second record
        check(Message::decode(&bad), "message body");
        let mut bad = message.clone();
        bad[28] ^= 0x01; // the header CRC itself
        check(MessageHeader::decode(&bad), "message header");

        let mut rec: [u8; ORDER_RECORD_BYTES] = encoded(|out| record(1).encode(out));
        rec[20] ^= 0x02;
        check(OrderRecord::decode(&rec), "order record");

        let mut state: [u8; DR_STATE_BYTES] = encoded(|out| sample_dr_state().encode(out));
        state[0] ^= 0x80;
        check(DrState::decode(&state), "DR state");

        let mut status: [u8; DR_STATUS_BYTES] = encoded(|out| {
            DrStatusEntry {
                seq: 5,
                status: DrStatus::Applied,
            }
            .encode(out)
        });
        status[3] ^= 0x04;
        check(DrStatusEntry::decode(&status), "DR status entry");

        let mut aux: [u8; AUX_ENTRY_BYTES] = encoded(|out| sample_aux_entry().encode(out));
        aux[10] ^= 0x08;
        check(AuxEntry::decode(&aux), "aux entry");

        let mut beat: [u8; HEARTBEAT_BYTES] = encoded(|out| {
            Heartbeat {
                counter: 3,
                epoch: 1,
            }
            .encode(out)
        });
        beat[0] ^= 0x01;
        check(Heartbeat::decode(&beat), "heartbeat");

        let mut region: [u8; REGION_HEADER_BYTES] =
            encoded(|out| sample_region_header(2).encode(out));
        region[33] ^= 0x10;
        check(RegionHeader::decode(&region, DR_LOG_MAGIC), "region header");
    }

    #[test]
    fn unknown_state_bytes_are_bad_state() {
        // Aux entry, DR status entry and refusal with an unknown state byte give BadState.
        let aux: [u8; AUX_ENTRY_BYTES] = encoded(|out| sample_aux_entry().encode(out));
        for found in [0u8, 3, 0xFF] {
            let mut bad = aux;
            bad[24] = found;
            fix_crc(&mut bad, 28);
            assert_eq!(
                AuxEntry::decode(&bad),
                Err(DecodeError::BadState {
                    what: "aux entry",
                    found
                })
            );
        }

        let status: [u8; DR_STATUS_BYTES] = encoded(|out| {
            DrStatusEntry {
                seq: 5,
                status: DrStatus::Landed,
            }
            .encode(out)
        });
        for found in [0u8, 4, 0xFF] {
            let mut bad = status;
            bad[8] = found;
            fix_crc(&mut bad, 12);
            assert_eq!(
                DrStatusEntry::decode(&bad),
                Err(DecodeError::BadState {
                    what: "DR status entry",
                    found
                })
            );
        }

        let refusal: [u8; REFUSAL_BYTES] = encoded(|out| {
            Refusal {
                reason: RefusalReason::StaleEpoch,
                dr_epoch: 1,
                seq: 2,
            }
            .encode(out)
        });
        for found in [0u8, 4, 0xFF] {
            let mut bad = refusal;
            bad[0] = found;
            assert_eq!(
                Refusal::decode(&bad),
                Err(DecodeError::BadState {
                    what: "refusal",
                    found
                })
            );
        }
    }

    #[test]
    fn order_batch_counts_must_match_the_body() {
        // Order batches with count 0, count > max, or body != count * 48 give BadCount.
        let one = batch(&[record(1)]);
        let body = &one[MESSAGE_HEADER_BYTES..];
        let kind = MessageKind::OrderBatch as u8;

        let zero_empty = raw_message(kind, 0, 0, &[]);
        assert_eq!(
            Message::decode(&zero_empty).unwrap_err(),
            DecodeError::BadCount {
                count: 0,
                body_bytes: 0
            }
        );
        let zero_with_body = raw_message(kind, 0, body.len() as u32, body);
        assert_eq!(
            Message::decode(&zero_with_body).unwrap_err(),
            DecodeError::BadCount {
                count: 0,
                body_bytes: ORDER_RECORD_BYTES
            }
        );

        let too_many = raw_message(
            kind,
            ORDER_BATCH_RECORDS_MAX as u16 + 1,
            body.len() as u32,
            body,
        );
        assert_eq!(
            Message::decode(&too_many).unwrap_err(),
            DecodeError::BadCount {
                count: ORDER_BATCH_RECORDS_MAX + 1,
                body_bytes: ORDER_RECORD_BYTES
            }
        );
        let way_too_many = raw_message(kind, u16::MAX, body.len() as u32, body);
        assert!(matches!(
            Message::decode(&way_too_many),
            Err(DecodeError::BadCount { count, .. }) if count == u16::MAX as usize
        ));

        let count_two_body_one = raw_message(kind, 2, body.len() as u32, body);
        assert_eq!(
            Message::decode(&count_two_body_one).unwrap_err(),
            DecodeError::BadCount {
                count: 2,
                body_bytes: ORDER_RECORD_BYTES
            }
        );
        let half_record = raw_message(kind, 1, 24, &body[..24]);
        assert_eq!(
            Message::decode(&half_record).unwrap_err(),
            DecodeError::BadCount {
                count: 1,
                body_bytes: 24
            }
        );
    }

    #[test]
    fn dr_state_and_refusal_messages_need_exact_body_lengths() {
        // DrAck/DrHello bodies other than 48 bytes and Refused bodies other than 16 give BadCount.
        let state: [u8; DR_STATE_BYTES] = encoded(|out| sample_dr_state().encode(out));
        let mut long = state.to_vec();
        long.push(0);
        for kind in [MessageKind::DrAck as u8, MessageKind::DrHello as u8] {
            for body in [&state[..47], &long[..], &[][..]] {
                let message = raw_message(kind, 0, body.len() as u32, body);
                assert_eq!(
                    Message::decode(&message).unwrap_err(),
                    DecodeError::BadCount {
                        count: 0,
                        body_bytes: body.len()
                    },
                    "kind {kind}, body {}",
                    body.len()
                );
            }
        }
        let message = raw_message(MessageKind::Refused as u8, 0, DR_STATE_BYTES as u32, &state);
        assert_eq!(
            Message::decode(&message).unwrap_err(),
            DecodeError::BadCount {
                count: 0,
                body_bytes: DR_STATE_BYTES
            }
        );
    }

    // ---- OrderRecord::validate --------------------------------------------------------------

    #[test]
    fn validate_accepts_records_up_to_the_edges() {
        // Records ending exactly at the end of the volume and of the ring are valid.
        let g = geometry();
        let max = g.payload_bytes_max;
        for rec in [
            record(1),
            OrderRecord {
                volume_offset: g.volume_bytes - u64::from(max),
                ring_offset: g.ring_bytes - u64::from(max),
                len: max,
                ..record(1)
            },
            OrderRecord {
                volume_offset: 0,
                ring_offset: 0,
                len: g.sector_bytes,
                seq: u64::MAX,
                ..record(1)
            },
        ] {
            assert_eq!(rec.validate(&g), Ok(()), "{rec:?}");
        }
    }

    #[test]
    fn validate_seq_zero_is_a_sequence_gap() {
        // A record with seq 0 (seqs start at 1) is SequenceGap { expected: 1, got: 0 }.
        let rec = OrderRecord {
            seq: 0,
            ..record(1)
        };
        assert_eq!(
            rec.validate(&geometry()),
            Err(DecodeError::SequenceGap {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn validate_refuses_zero_and_oversized_lengths() {
        // Length 0 and lengths above payload_bytes_max (aligned or not) are BadLength.
        let g = geometry();
        for len in [
            0,
            g.payload_bytes_max + g.sector_bytes,
            g.payload_bytes_max + 1,
            u32::MAX,
        ] {
            let rec = OrderRecord { len, ..record(1) };
            assert_eq!(
                rec.validate(&g),
                Err(DecodeError::BadLength {
                    len,
                    max: g.payload_bytes_max
                })
            );
        }
    }

    #[test]
    fn validate_refuses_each_misaligned_field() {
        // A misaligned volume offset, length or ring position is Misaligned naming the field.
        let g = geometry();
        let cases = [
            (
                OrderRecord {
                    volume_offset: 4096 + 1,
                    ..record(1)
                },
                "volume offset",
                4097,
            ),
            (
                OrderRecord {
                    len: 1000,
                    ..record(1)
                },
                "write length",
                1000,
            ),
            (
                OrderRecord {
                    ring_offset: 256,
                    ..record(1)
                },
                "ring position",
                256,
            ),
        ];
        for (rec, what, value) in cases {
            assert_eq!(
                rec.validate(&g),
                Err(DecodeError::Misaligned {
                    what,
                    value,
                    align: g.sector_bytes
                })
            );
        }
    }

    #[test]
    fn validate_refuses_writes_beyond_the_volume_without_overflowing() {
        // Writes past the volume, incl. an overflowing end near u64::MAX, are OffsetOutOfRange.
        let g = geometry();
        let sector = u64::from(g.sector_bytes);
        let near_max = u64::MAX - (sector - 1); // aligned, and + 512 == 2^64
        assert_eq!(near_max % sector, 0);
        for (volume_offset, len) in [
            (g.volume_bytes, g.sector_bytes),
            (g.volume_bytes - sector, 2 * g.sector_bytes),
            (near_max, g.sector_bytes),
            (near_max, g.payload_bytes_max),
        ] {
            let rec = OrderRecord {
                volume_offset,
                len,
                ..record(1)
            };
            assert_eq!(
                rec.validate(&g),
                Err(DecodeError::OffsetOutOfRange {
                    offset: volume_offset,
                    len,
                    volume_bytes: g.volume_bytes
                })
            );
        }
    }

    #[test]
    fn validate_refuses_ring_positions_beyond_the_ring_without_overflowing() {
        // Payloads past the ring (incl. overflow near u64::MAX) are RingPositionOutOfRange.
        let g = geometry();
        let sector = u64::from(g.sector_bytes);
        let near_max = u64::MAX - (sector - 1);
        for (ring_offset, len) in [
            (g.ring_bytes, g.sector_bytes),
            (g.ring_bytes - sector, 2 * g.sector_bytes),
            (near_max, g.sector_bytes),
        ] {
            let rec = OrderRecord {
                ring_offset,
                len,
                ..record(1)
            };
            assert_eq!(
                rec.validate(&g),
                Err(DecodeError::RingPositionOutOfRange {
                    ring_offset,
                    len,
                    ring_bytes: g.ring_bytes
                })
            );
        }
    }

    // ---- DrState ----------------------------------------------------------------------------

    #[test]
    fn dr_state_with_seqs_out_of_order_is_out_of_window() {
        // DR state with applied > landed or landed > held (CRC valid) is SequenceOutOfWindow.
        let applied_past_landed = raw_dr_state(10, 5, 6);
        assert!(matches!(
            DrState::decode(&applied_past_landed),
            Err(DecodeError::SequenceOutOfWindow {
                seq: 6,
                high: 5,
                ..
            })
        ));
        let landed_past_held = raw_dr_state(5, 9, 1);
        assert!(matches!(
            DrState::decode(&landed_past_held),
            Err(DecodeError::SequenceOutOfWindow { high: 5, .. })
        ));
        let everything_past_held = raw_dr_state(0, u64::MAX, u64::MAX);
        assert!(matches!(
            DrState::decode(&everything_past_held),
            Err(DecodeError::SequenceOutOfWindow { .. })
        ));
        // The boundary case (all equal) is fine.
        assert!(DrState::decode(&raw_dr_state(7, 7, 7)).is_ok());
    }

    #[test]
    fn dr_state_geometry_mismatch_names_the_field() {
        // check_geometry accepts a match and otherwise reports GeometryMismatch naming the field.
        let g = geometry();
        assert_eq!(sample_dr_state().check_geometry(&g), Ok(()));
        let cases = [
            (
                DrState {
                    volume_bytes: g.volume_bytes * 2,
                    ..sample_dr_state()
                },
                "volume size",
                g.volume_bytes,
                g.volume_bytes * 2,
            ),
            (
                DrState {
                    ring_bytes: 512,
                    ..sample_dr_state()
                },
                "ring size",
                g.ring_bytes,
                512,
            ),
            (
                DrState {
                    table_slots: 128,
                    ..sample_dr_state()
                },
                "table slots",
                u64::from(g.table_slots),
                128,
            ),
        ];
        for (state, field, ours, theirs) in cases {
            let err = state.check_geometry(&g).unwrap_err();
            assert_eq!(
                err,
                DecodeError::GeometryMismatch {
                    field,
                    ours,
                    theirs
                }
            );
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    // ---- Display ----------------------------------------------------------------------------

    #[test]
    fn every_error_displays_a_non_empty_message_naming_the_problem() {
        // Every DecodeError variant displays non-empty text; several name format and problem.
        let all = [
            DecodeError::Truncated {
                what: "order record",
                needed: 48,
                got: 3,
            },
            DecodeError::Oversized {
                what: "message body",
                size: 20000,
                max: MESSAGE_BODY_BYTES_MAX,
            },
            DecodeError::BadMagic {
                what: "region header",
                found: 0xABCD,
            },
            DecodeError::BadVersion {
                what: "aux entry",
                found: 9,
            },
            DecodeError::UnknownKind { found: 77 },
            DecodeError::ReservedNotZero { what: "refusal" },
            DecodeError::BadChecksum {
                what: "heartbeat",
                stored: 1,
                computed: 2,
            },
            DecodeError::StaleEpoch { got: 1, current: 2 },
            DecodeError::NewerEpoch { got: 3, current: 2 },
            DecodeError::BadLength { len: 0, max: 8192 },
            DecodeError::Misaligned {
                what: "ring position",
                value: 3,
                align: 512,
            },
            DecodeError::OffsetOutOfRange {
                offset: 1,
                len: 2,
                volume_bytes: 3,
            },
            DecodeError::RingPositionOutOfRange {
                ring_offset: 1,
                len: 2,
                ring_bytes: 3,
            },
            DecodeError::SequenceGap {
                expected: 1,
                got: 0,
            },
            DecodeError::SequenceConflict { seq: 4 },
            DecodeError::SequenceOutOfWindow {
                seq: 9,
                low: 0,
                high: 5,
            },
            DecodeError::BadState {
                what: "DR status entry",
                found: 8,
            },
            DecodeError::BadCount {
                count: 0,
                body_bytes: 48,
            },
            DecodeError::GeometryMismatch {
                field: "ring size",
                ours: 1,
                theirs: 2,
            },
        ];
        for err in &all {
            let text = err.to_string();
            assert!(!text.trim().is_empty(), "{err:?}");
        }
        let text = |i: usize| all[i].to_string();
        assert_eq!(text(0), "order record truncated: needed 48 bytes, got 3");
        assert!(text(1).contains("message body oversized"));
        assert!(text(2).contains("region header") && text(2).contains("bad magic 0xabcd"));
        assert!(text(3).contains("aux entry") && text(3).contains("version 9"));
        assert!(text(4).contains("unknown message kind 77"));
        assert!(text(5).contains("refusal") && text(5).contains("reserved"));
        assert!(text(6).contains("heartbeat checksum mismatch"));
        assert!(text(6).contains("0x00000001") && text(6).contains("0x00000002"));
        assert!(text(10).contains("ring position 3 is not a multiple of 512"));
        assert!(text(13).contains("sequence gap"));
        assert!(text(16).contains("DR status entry has unknown state 8"));
        assert!(text(18).contains("ring size differs"));

        // And errors produced by real decoders render the same way.
        let err = OrderRecord::decode(&[0u8; 10]).unwrap_err();
        assert!(err.to_string().contains("order record truncated"), "{err}");
        let err = Message::decode(&raw_message(9, 0, 0, &[])).unwrap_err();
        assert_eq!(err.to_string(), "unknown message kind 9");
    }

    // ---- robustness -------------------------------------------------------------------------

    #[test]
    fn random_bytes_never_panic_any_decoder() {
        // 20_000 random byte strings never panic any decoder, and short ones never decode.
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut buf = [0u8; 200];
        let mut accepted = 0usize;
        for _ in 0..20_000 {
            let len = rng.below(200) as usize;
            let bytes = &mut buf[..len];
            rng.fill(bytes);
            let bytes = &*bytes;
            let results = [
                (Message::decode(bytes).is_ok(), MESSAGE_HEADER_BYTES),
                (MessageHeader::decode(bytes).is_ok(), MESSAGE_HEADER_BYTES),
                (OrderRecord::decode(bytes).is_ok(), ORDER_RECORD_BYTES),
                (DrState::decode(bytes).is_ok(), DR_STATE_BYTES),
                (Refusal::decode(bytes).is_ok(), REFUSAL_BYTES),
                (DrStatusEntry::decode(bytes).is_ok(), DR_STATUS_BYTES),
                (AuxEntry::decode(bytes).is_ok(), AUX_ENTRY_BYTES),
                (Heartbeat::decode(bytes).is_ok(), HEARTBEAT_BYTES),
                (
                    RegionHeader::decode(bytes, DR_LOG_MAGIC).is_ok(),
                    REGION_HEADER_BYTES,
                ),
                (
                    RegionHeader::read_newest(bytes, AUX_TABLE_MAGIC).is_ok(),
                    2 * REGION_HEADER_BYTES,
                ),
            ];
            for (ok, needed) in results {
                assert!(
                    !(ok && len < needed),
                    "accepted {len} bytes, needs {needed}"
                );
                accepted += usize::from(ok);
            }
        }
        // Only the CRC-less refusal can plausibly accept random bytes (reason byte in 1..=3 and
        // three zero reserved bytes: ~1 in 2^26), so essentially nothing is accepted.
        assert!(accepted < 10, "{accepted} random inputs accepted");
    }

    #[test]
    fn checksum_valid_random_fields_never_panic_and_reencode_identically() {
        // CRC-valid random fields never panic the deep checks; any Ok re-encodes identically.
        let mut rng = XorShift(0x0123_4567_89AB_CDEF);
        let mut ok_count = [0usize; 8];
        for i in 0..20_000 {
            let format = i % 8;
            // Bias towards small values and zero reserved bytes so that Ok paths are reached too.
            let small = |rng: &mut XorShift| rng.below(6) as u8;
            let maybe_zero = |rng: &mut XorShift| if rng.below(2) == 0 { 0 } else { rng.byte() };
            let ok = match format {
                0 => {
                    let body_len = rng.below(4) as usize * 24;
                    let mut body = vec![0u8; body_len];
                    rng.fill(&mut body);
                    let count = rng.below(4) as u16;
                    let declared = if rng.below(4) == 0 {
                        rng.below(u64::from(u32::MAX)) as u32
                    } else {
                        body_len as u32
                    };
                    let mut bytes = raw_message(small(&mut rng), count, declared, &body);
                    for byte in &mut bytes[20..28] {
                        *byte = if rng.below(16) == 0 { rng.byte() } else { 0 };
                    }
                    fix_crc(&mut bytes, 28);
                    match Message::decode(&bytes) {
                        Ok(message) => {
                            let mut again = bytes.clone();
                            message.header.encode(&mut again);
                            assert_eq!(again, bytes);
                            true
                        }
                        Err(_) => false,
                    }
                }
                1 => {
                    let mut bytes = [0u8; ORDER_RECORD_BYTES];
                    rng.fill(&mut bytes);
                    put_u16(&mut bytes, 0, RECORD_MAGIC);
                    bytes[2] = FORMAT_VERSION;
                    bytes[3] = maybe_zero(&mut rng);
                    put_u32(&mut bytes, 40, u32::from(maybe_zero(&mut rng)));
                    fix_crc(&mut bytes, 44);
                    match OrderRecord::decode(&bytes) {
                        Ok(rec) => {
                            // validate must not panic on arbitrary decoded fields either.
                            let _ = rec.validate(&geometry());
                            if rec.seq > 0 && rec.len > 0 {
                                let again: [u8; ORDER_RECORD_BYTES] =
                                    encoded(|out| rec.encode(out));
                                assert_eq!(again, bytes);
                            }
                            true
                        }
                        Err(_) => false,
                    }
                }
                2 => {
                    let mut bytes = [0u8; DR_STATE_BYTES];
                    rng.fill(&mut bytes);
                    fix_crc(&mut bytes, 44);
                    match DrState::decode(&bytes) {
                        Ok(state) => {
                            let _ = state.check_geometry(&geometry());
                            let again: [u8; DR_STATE_BYTES] = encoded(|out| state.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Err(_) => false,
                    }
                }
                3 => {
                    let mut bytes = [0u8; REFUSAL_BYTES];
                    rng.fill(&mut bytes);
                    bytes[0] = small(&mut rng);
                    for byte in &mut bytes[1..4] {
                        *byte = if rng.below(4) == 0 { rng.byte() } else { 0 };
                    }
                    match Refusal::decode(&bytes) {
                        Ok(refusal) => {
                            let again: [u8; REFUSAL_BYTES] = encoded(|out| refusal.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Err(_) => false,
                    }
                }
                4 => {
                    let mut bytes = [0u8; DR_STATUS_BYTES];
                    rng.fill(&mut bytes);
                    bytes[8] = small(&mut rng);
                    for byte in &mut bytes[9..12] {
                        *byte = if rng.below(4) == 0 { rng.byte() } else { 0 };
                    }
                    fix_crc(&mut bytes, 12);
                    match DrStatusEntry::decode(&bytes) {
                        Ok(entry) => {
                            let again: [u8; DR_STATUS_BYTES] = encoded(|out| entry.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Err(_) => false,
                    }
                }
                5 => {
                    let mut bytes = [0u8; AUX_ENTRY_BYTES];
                    rng.fill(&mut bytes);
                    bytes[24] = small(&mut rng);
                    bytes[25] = if rng.below(8) == 0 {
                        rng.byte()
                    } else {
                        FORMAT_VERSION
                    };
                    put_u16(&mut bytes, 26, u16::from(maybe_zero(&mut rng)));
                    fix_crc(&mut bytes, 28);
                    match AuxEntry::decode(&bytes) {
                        Ok(Some(entry)) => {
                            let again: [u8; AUX_ENTRY_BYTES] = encoded(|out| entry.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Ok(None) => panic!("non-zero aux entry decoded as None"),
                        Err(_) => false,
                    }
                }
                6 => {
                    let mut bytes = [0u8; HEARTBEAT_BYTES];
                    rng.fill(&mut bytes);
                    fix_crc(&mut bytes, 12);
                    match Heartbeat::decode(&bytes) {
                        Ok(Some(beat)) => {
                            let again: [u8; HEARTBEAT_BYTES] = encoded(|out| beat.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Ok(None) => panic!("non-zero heartbeat decoded as None"),
                        Err(_) => false,
                    }
                }
                _ => {
                    let mut bytes = [0u8; REGION_HEADER_BYTES];
                    rng.fill(&mut bytes);
                    put_u32(&mut bytes, 0, AUX_TABLE_MAGIC);
                    bytes[4] = if rng.below(8) == 0 {
                        rng.byte()
                    } else {
                        FORMAT_VERSION
                    };
                    // Reserved bytes must be zero for the header to decode at all; keep them
                    // zero (and the flags known) so that the success path is reached.
                    bytes[6..8].fill(0);
                    bytes[48..60].fill(0);
                    fix_crc(&mut bytes, 60);
                    match RegionHeader::decode(&bytes, AUX_TABLE_MAGIC) {
                        Ok(header) => {
                            let again: [u8; REGION_HEADER_BYTES] =
                                encoded(|out| header.encode(out));
                            assert_eq!(again, bytes);
                            true
                        }
                        Err(_) => false,
                    }
                }
            };
            ok_count[format] += usize::from(ok);
        }
        // Every format's Ok path was actually reached.
        for (format, count) in ok_count.iter().enumerate() {
            assert!(*count > 0, "format {format} never decoded");
        }
    }

    #[test]
    fn every_single_bit_flip_in_an_order_batch_is_detected() {
        // Flipping any one bit of a valid two-record order batch makes Message::decode fail.
        let mut bytes = batch(&[record(1), record(2)]);
        assert!(Message::decode(&bytes).is_ok());
        for bit in 0..bytes.len() * 8 {
            bytes[bit / 8] ^= 1 << (bit % 8);
            let result = Message::decode(&bytes);
            assert!(result.is_err(), "bit {bit} flipped went undetected");
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        assert!(Message::decode(&bytes).is_ok());
    }

    #[test]
    fn every_single_bit_flip_in_checksummed_records_is_detected() {
        // Any single bit flip in each fixed-size CRC-protected format makes its decoder fail.
        fn each_bit(mut bytes: Vec<u8>, decode: impl Fn(&[u8]) -> bool) {
            assert!(decode(&bytes), "unflipped input must decode");
            for bit in 0..bytes.len() * 8 {
                bytes[bit / 8] ^= 1 << (bit % 8);
                assert!(!decode(&bytes), "bit {bit} flipped went undetected");
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
        }
        let rec: [u8; ORDER_RECORD_BYTES] = encoded(|out| record(5).encode(out));
        each_bit(rec.to_vec(), |b| OrderRecord::decode(b).is_ok());
        let state: [u8; DR_STATE_BYTES] = encoded(|out| sample_dr_state().encode(out));
        each_bit(state.to_vec(), |b| DrState::decode(b).is_ok());
        let status: [u8; DR_STATUS_BYTES] = encoded(|out| {
            DrStatusEntry {
                seq: 5,
                status: DrStatus::Applied,
            }
            .encode(out)
        });
        each_bit(status.to_vec(), |b| DrStatusEntry::decode(b).is_ok());
        let aux: [u8; AUX_ENTRY_BYTES] = encoded(|out| sample_aux_entry().encode(out));
        each_bit(aux.to_vec(), |b| AuxEntry::decode(b).is_ok());
        let beat: [u8; HEARTBEAT_BYTES] = encoded(|out| {
            Heartbeat {
                counter: 99,
                epoch: 2,
            }
            .encode(out)
        });
        each_bit(beat.to_vec(), |b| Heartbeat::decode(b).is_ok());
        let region: [u8; REGION_HEADER_BYTES] = encoded(|out| sample_region_header(3).encode(out));
        each_bit(region.to_vec(), |b| {
            RegionHeader::decode(b, DR_LOG_MAGIC).is_ok()
        });
    }

    #[test]
    fn region_header_reserved_bytes_must_be_zero() {
        // A non-zero RegionHeader reserved byte or unknown flag bit gives ReservedNotZero.
        let header: [u8; REGION_HEADER_BYTES] = encoded(|out| sample_region_header(1).encode(out));
        for (at, value) in [(5, 0x80), (6, 1), (7, 1), (48, 1), (52, 1), (59, 1)] {
            let mut bad = header;
            bad[at] = value;
            fix_crc(&mut bad, 60);
            assert_eq!(
                RegionHeader::decode(&bad, DR_LOG_MAGIC),
                Err(DecodeError::ReservedNotZero {
                    what: "region header"
                }),
                "byte {at}"
            );
        }
    }
}
