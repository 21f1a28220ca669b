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
//!   length (u32), then `length` bytes of data for `NBD_CMD_WRITE` only. Every other command,
//!   known or not, carries no data, so an unknown command never breaks framing.
//! - S (simple reply): `SIMPLE_REPLY_MAGIC` (u32), error (u32), cookie (u64), then `length` bytes
//!   for a successful `NBD_CMD_READ` only. `NBD_CMD_DISC` gets no reply. Replies may come in any
//!   order. The spec calls the request identifier "cookie" (formerly "handle"); we say handle.
//! - S (structured reply chunk, only after `NBD_OPT_STRUCTURED_REPLY` was acknowledged):
//!   `STRUCTURED_REPLY_MAGIC` (u32), flags (u16), type (u16), cookie (u64), payload length (u32),
//!   payload. A reply is one or more chunks; the last carries `REPLY_FLAG_DONE`.
//!
//! Simple versus structured, once structured replies are negotiated: a READ MUST get a
//! structured reply, even for an error found before reading (such as bad flags); any reply with a
//! payload MUST be structured; every other request MAY get either style, and errors SHOULD be
//! structured so that they can carry a message for a human. Without negotiation the server MUST
//! send simple replies only.

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
/// `NBD_STRUCTURED_REPLY_MAGIC`: starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, u16) and client flags (u32).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (u16). HAS_FLAGS must always be set; READ_ONLY obliges the server to fail
// writes (WRITE, WRITE_ZEROES and TRIM: EPERM); SEND_FLUSH announces NBD_CMD_FLUSH, SEND_FUA the
// command flag FUA, SEND_TRIM NBD_CMD_TRIM, SEND_WRITE_ZEROES NBD_CMD_WRITE_ZEROES together with
// its flag NO_HOLE. SEND_DF announces the READ flag DF; the server MUST set it if READ accepts DF
// and MUST leave it clear unless structured replies were negotiated. CAN_MULTI_CONN promises that
// FLUSH and FUA take effect for every connection to the export by the time they are answered;
// without it clients should use one connection only. SEND_FAST_ZERO announces the WRITE_ZEROES
// flag FAST_ZERO; a server that does not set it should refuse that flag with EINVAL.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
/// No data allowed (else `NBD_REP_ERR_INVALID`); `NBD_REP_ACK` switches transmission to
/// structured replies, `NBD_REP_ERR_UNSUP` keeps simple replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Metadata contexts (such as `base:allocation`) exist only for `NBD_CMD_BLOCK_STATUS`. A server
/// that does not implement these options answers `NBD_REP_ERR_UNSUP`, which the spec names as an
/// allowed answer; clients then proceed without contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

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
/// Info type 1: type (u16), then the export's canonical name (the rest of the reply).
pub const INFO_NAME: u16 = 1;
/// Info type 2: type (u16), then a description for humans (the rest of the reply).
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type 3, 14 bytes: type (u16), minimum block, preferred block, maximum payload (u32 each).
/// A client that asks for it in `NBD_OPT_GO` must then honour these constraints. A server may
/// send it unasked; it must not assume that such a client honours it.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands. DISC and FLUSH must carry offset 0 and length 0. TRIM and WRITE_ZEROES have an
// offset and length but no payload; BLOCK_STATUS needs a metadata context, which this crate
// never grants, so it is refused with EINVAL like any unknown command.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags (u16). Unknown flags, or flags not documented for the command, get EINVAL.
/// Valid on every command once `FLAG_SEND_FUA` is advertised (the server must accept it even
/// where it means nothing); a write-type command must be durable before it is answered.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES only: the zeroed range must stay allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ only, and only when `FLAG_SEND_DF` was advertised: at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES only, and only when `FLAG_SEND_FAST_ZERO` was advertised.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks: flags and types. A type with bit 15 set is an error chunk whose
// payload starts with error (u32, non-zero) and message length (u16), then the message.
/// Marks the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; must carry `REPLY_FLAG_DONE`. Valid for any request.
pub const REPLY_TYPE_NONE: u16 = 0;
/// READ content: offset (u64), then data; at least 1 byte of data, within the request's range.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// READ content that reads as zeroes: offset (u64), hole size (u32, non-zero).
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Error (u32), message length (u16), message. Valid for any request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Like `REPLY_TYPE_ERROR`, followed by the offset (u64) where the error occurred.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

pub const GREETING_BYTES: usize = 8 + 8 + 2;
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 4 + 4 + 8;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// The fixed part of an `REPLY_TYPE_OFFSET_DATA` payload: the offset.
pub const OFFSET_DATA_HEADER_BYTES: usize = 8;
/// The fixed part of an error chunk payload: error and message length.
pub const ERROR_CHUNK_HEADER_BYTES: usize = 4 + 2;
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Strings (export names, messages) must not be longer than this.
pub const STRING_BYTES_MAX: usize = 4096;

/// Error values of a reply. The spec restricts the error field to these numbers (plus
/// `NBD_ENOTSUP` = 95, which only answers `NBD_CMD_FLAG_FAST_ZERO`, never advertised here).
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

    /// A short message for a human, sent with the error in a structured reply.
    pub fn message(self) -> &'static str {
        match self {
            Self::Perm => "operation not permitted",
            Self::Io => "input/output error",
            Self::NoMem => "cannot allocate memory",
            Self::Invalid => "invalid argument",
            Self::NoSpace => "no space left on device",
            Self::Overflow => "value too large",
            Self::Shutdown => "server is shutting down",
        }
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
