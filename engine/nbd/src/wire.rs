//! Numbers and layouts of the NBD protocol that this crate relies on.
//!
//! Source: `doc/proto.md` of the reference implementation (github.com/NetworkBlockDevice/nbd).
//! Every integer on the wire is unsigned and big-endian.
//!
//! Handshake (fixed newstyle):
//! - S: `NBD_MAGIC` (u64), `IHAVEOPT` (u64), handshake flags (u16).
//! - C: client flags (u32). The server must drop the connection on a flag it does not know.
//! - C, repeated: `IHAVEOPT` (u64), option (u32), data length (u32), data.
//! - S, per option except `NBD_OPT_EXPORT_NAME`: `OPTION_REPLY_MAGIC` (u64), option (u32), reply
//!   type (u32), data length (u32), data.
//! - S, after `NBD_OPT_EXPORT_NAME`: export size (u64), transmission flags (u16), then 124 zero
//!   bytes unless the client set `NBD_FLAG_C_NO_ZEROES`. A refusal can only be a disconnect.
//! - `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length (u32), name, count (u16), count × info type
//!   (u16). Replies: `NBD_REP_INFO`s, at least `NBD_INFO_EXPORT`, then `NBD_REP_ACK`; after the
//!   ACK to GO both sides are in transmission.
//!
//! Transmission:
//! - C: `REQUEST_MAGIC` (u32), command flags (u16), type (u16), cookie (u64), offset (u64),
//!   length (u32), then `length` bytes of data for `NBD_CMD_WRITE` only.
//! - S (simple reply): `SIMPLE_REPLY_MAGIC` (u32), error (u32), cookie (u64), then `length` bytes
//!   for a successful `NBD_CMD_READ` only. `NBD_CMD_DISC` gets no reply. Replies may come in any
//!   order. The spec calls the request identifier "cookie" (formerly "handle"); we say handle.

/// ASCII `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// ASCII `IHAVEOPT`: ends the greeting and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server, u16) and client flags (u32).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (u16). HAS_FLAGS must always be set; READ_ONLY obliges the server to fail
// writes; SEND_FLUSH announces NBD_CMD_FLUSH.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option reply types; bit 31 marks errors. NBD_REP_SERVER data: name length (u32), name.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

/// Info type 0, 12 bytes: type (u16), export size (u64), transmission flags (u16).
pub const INFO_EXPORT: u16 = 0;
/// Info type 3, 14 bytes: type (u16), minimum block, preferred block, maximum payload (u32 each).
/// A client that asks for it in `NBD_OPT_GO` must then honour these constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands. DISC and FLUSH must carry offset 0 and length 0.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

pub const GREETING_BYTES: usize = 8 + 8 + 2;
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 4 + 4 + 8;
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Strings (export names, messages) must not be longer than this.
pub const STRING_BYTES_MAX: usize = 4096;

/// Error values of a reply. The spec restricts the error field to these numbers (plus
/// `NBD_ENOTSUP` = 95, which only concerns commands this crate does not implement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdError {
    /// `NBD_EPERM`: for example a write on a read-only export.
    Perm = 1,
    /// `NBD_EIO`: the backing store failed.
    Io = 5,
    /// `NBD_ENOMEM`: the spec asks servers to avoid it where possible.
    NoMem = 12,
    /// `NBD_EINVAL`: unknown command or flag, misaligned request, read beyond the end.
    Invalid = 22,
    /// `NBD_ENOSPC`: a write beyond the end of the export.
    NoSpace = 28,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow = 75,
    /// `NBD_ESHUTDOWN`: the server is shutting down; the client must then disconnect.
    Shutdown = 108,
}

impl NbdError {
    /// The number sent in the error field of a reply.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error with this number, if it is one of the known values.
    pub fn from_code(code: u32) -> Option<Self> {
        use NbdError::*;
        [Perm, Io, NoMem, Invalid, NoSpace, Overflow, Shutdown]
            .into_iter()
            .find(|e| e.code() == code)
    }
}

pub(crate) fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub(crate) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub(crate) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(bytes, at)) << 32) | u64::from(be_u32(bytes, at + 4))
}

/// Wire lengths are u32 and every supported target has at least 32-bit `usize`; saturating only
/// matters where such a length could not be buffered anyway.
pub(crate) fn usize_from(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}
