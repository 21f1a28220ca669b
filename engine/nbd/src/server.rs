//! One NBD server connection as a state machine that does no I/O.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::wire::*;

/// Option data is buffered up to this length: the longest legal string plus the fixed fields of
/// `NBD_OPT_GO` and a few dozen information requests.
const OPTION_DATA_BYTES_MAX: usize = STRING_BYTES_MAX + 128;
/// Longer option data is skipped and answered `NBD_REP_ERR_TOO_BIG` up to this length; beyond it
/// the client is treated as hostile and the connection is closed.
const OPTION_SKIP_BYTES_MAX: usize = 1 << 20;
/// A legitimate client needs a handful of options; more is treated as a denial of service.
const OPTIONS_MAX: u32 = 32;
/// The payload of a rejected WRITE is skipped up to this length (or `payload_bytes_max` if
/// larger); the spec says payloads up to 2^25 bytes should not be considered an attack.
const WRITE_SKIP_BYTES_MAX: usize = 1 << 25;
/// Input is no longer consumed while this many events wait for `poll_event`.
const EVENTS_QUEUED_MAX: usize = 64;
/// Input is no longer consumed while queued WRITE events hold this much data.
const EVENTS_WRITE_BYTES_SOFT_MAX: usize = 1 << 20;
/// Input is no longer consumed while this much output waits to be sent.
const OUTPUT_BYTES_SOFT_MAX: usize = 1 << 20;
/// Input is no longer consumed while this many requests wait for a reply.
const PENDING_REQUESTS_MAX: usize = 4096;

/// What the session serves. Validated by [`ServerSession::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The export's name; the empty name (the default export) is accepted as well.
    pub export_name: String,
    /// Size of the export; a multiple of `block_bytes`.
    pub size_bytes: u64,
    /// Advertise `NBD_FLAG_READ_ONLY` and fail every WRITE, WRITE_ZEROES and TRIM with
    /// `NBD_EPERM`.
    pub read_only: bool,
    /// Minimum and preferred block size: a power of two from 512 to 65536. Offsets and lengths
    /// of READ, WRITE, WRITE_ZEROES and TRIM must be multiples of it (else `NBD_EINVAL`) whether
    /// or not the client asked for `NBD_INFO_BLOCK_SIZE`, because the engine replicates whole
    /// blocks only.
    pub block_bytes: u32,
    /// Largest READ or WRITE length accepted; at least `block_bytes`. Only whole blocks can be
    /// requested, so the limit advertised and enforced is this rounded down to whole blocks.
    /// WRITE_ZEROES and TRIM carry no payload and are not limited by it.
    pub payload_bytes_max: u32,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: the runtime promises that FLUSH and FUA cover the
    /// writes answered on every connection to this export, so clients may spread their requests
    /// over several connections.
    pub multi_conn: bool,
}

/// A configuration that [`ServerSession::new`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub &'static str);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NBD server configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// What the runtime must do next, taken with [`ServerSession::poll_event`].
///
/// Every range is validated: whole blocks, inside the export, `len > 0`. A `fua` request
/// (`NBD_CMD_FLAG_FUA`) must not be answered before what it wrote is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Read `len` bytes at `offset`, then call [`ServerSession::reply_read`] or `reply_error`.
    Read { handle: u64, offset: u64, len: u32 },
    /// Write `data` at `offset`, then call [`ServerSession::reply_ok`] or `reply_error`.
    Write {
        handle: u64,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Write `len` zero bytes at `offset` (`NBD_CMD_WRITE_ZEROES`), then call `reply_ok` or
    /// `reply_error`. The range must read back as zeroes; writing real zeroes always satisfies
    /// the client's `NBD_CMD_FLAG_NO_HOLE`, which is therefore accepted and not reported.
    WriteZeroes {
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// The client no longer needs `len` bytes at `offset` (`NBD_CMD_TRIM`). A hint: the runtime
    /// may discard the range or leave it as is, then call `reply_ok` or `reply_error`. The
    /// client assumes nothing about the range's contents until it writes it again.
    Trim {
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Make every write already answered durable, then reply.
    Flush { handle: u64 },
    /// The client asked to end the session (`NBD_CMD_DISC` or `NBD_OPT_ABORT`). The spec wants
    /// outstanding requests answered first: close once `pending_requests()` is 0 and the output
    /// is drained.
    Disconnect,
    /// The client broke the protocol in a way that loses framing or trust; close the connection
    /// (after sending what is pending, if desired).
    Error(ProtocolError),
}

/// Client behaviour that ends the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The client flags contain bits this server does not know.
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; only fixed newstyle is served.
    NotFixedNewstyle,
    /// An option header did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// More options than a legitimate client sends before transmission.
    TooManyOptions,
    /// Option data too long to skip, or any oversized `NBD_OPT_EXPORT_NAME`.
    OptionTooLong { option: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named another export; that option cannot carry an error reply.
    UnknownExport,
    /// A request header did not start with `NBD_REQUEST_MAGIC`.
    BadRequestMagic(u32),
    /// A request reused the handle of a request still waiting for its reply, so replies could
    /// not be told apart.
    DuplicateHandle(u64),
    /// A rejected WRITE announced a payload too long to skip safely.
    WritePayloadTooLong(u32),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownClientFlags(flags) => write!(f, "unknown client flags {flags:#x}"),
            Self::NotFixedNewstyle => write!(f, "client does not speak fixed newstyle"),
            Self::BadOptionMagic(magic) => write!(f, "bad option magic {magic:#x}"),
            Self::TooManyOptions => write!(f, "more than {OPTIONS_MAX} options"),
            Self::OptionTooLong { option, len } => {
                write!(f, "option {option} has {len} bytes of data")
            }
            Self::UnknownExport => write!(f, "NBD_OPT_EXPORT_NAME for an unknown export"),
            Self::BadRequestMagic(magic) => write!(f, "bad request magic {magic:#x}"),
            Self::DuplicateHandle(handle) => write!(f, "handle {handle:#x} is already in flight"),
            Self::WritePayloadTooLong(len) => write!(f, "rejected write with a {len}-byte payload"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A reply the session refuses to send because it would corrupt the reply stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// No request with this handle waits for a reply.
    UnknownHandle(u64),
    /// `reply_ok` for a READ (whose success must carry data) or `reply_read` for a non-READ.
    WrongKind(u64),
    /// `reply_read` with a length other than the one requested.
    ReadLengthMismatch {
        handle: u64,
        expected: u32,
        actual: usize,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownHandle(handle) => write!(f, "no request {handle:#x} waits for a reply"),
            Self::WrongKind(handle) => write!(f, "wrong reply kind for request {handle:#x}"),
            Self::ReadLengthMismatch {
                handle,
                expected,
                actual,
            } => {
                write!(f, "read {handle:#x} wants {expected} bytes, got {actual}")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// What the next input bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    Request,
    WriteData {
        handle: u64,
        offset: u64,
        len: usize,
        fua: bool,
    },
    /// Data to discard; for an option, `NBD_REP_ERR_TOO_BIG` is sent once it is skipped.
    Skip {
        remaining: usize,
        option: Option<u32>,
    },
    Closed,
}

/// A request handed to the runtime and not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Success carries the data; a structured reply also repeats the offset.
    Read { offset: u64, len: u32 },
    /// WRITE, WRITE_ZEROES, TRIM or FLUSH: success carries no data.
    NoData,
}

/// Why the session answers a request with an error instead of handing it to the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    error: NbdError,
    /// For a human; sent with the error when structured replies are negotiated.
    message: &'static str,
}

fn refuse(error: NbdError, message: &'static str) -> Refusal {
    Refusal { error, message }
}

/// The server side of one NBD connection, fed with bytes and drained of bytes and events.
///
/// Memory is bounded: header bytes live in a fixed array, option data is at most a few KiB, a
/// WRITE payload at most `payload_bytes_max`. `handle_input` stops consuming (returns less than
/// it was given) while queued events (64, or 1 MiB of WRITE data), pending output (1 MiB) or
/// unanswered requests (4096) are at their limits, so the runtime must keep unconsumed bytes,
/// take events, send output, and retry. Output also grows by the READ data the runtime replies
/// with, which only the runtime can bound: it must keep draining output.
///
/// Reply style: simple replies unless the client negotiated `NBD_OPT_STRUCTURED_REPLY`. After
/// that, a successful READ is one `NBD_REPLY_TYPE_OFFSET_DATA` chunk flagged DONE, every error
/// (from the runtime or from validation, for any command) one `NBD_REPLY_TYPE_ERROR` chunk
/// flagged DONE, and the success of any other command a simple reply: the spec requires
/// structured replies for READ and for anything with a payload, allows either style otherwise,
/// and prefers structured errors because they carry a message.
pub struct ServerSession {
    config: ServerConfig,
    input: Input,
    head: [u8; REQUEST_HEADER_BYTES],
    head_len: usize,
    body: Vec<u8>,
    no_zeroes: bool,
    options_seen: u32,
    structured_replies: bool,
    transmitting: bool,
    out: Vec<u8>,
    out_start: usize,
    events: VecDeque<Event>,
    events_write_bytes: usize,
    pending: HashMap<u64, Pending>,
}

impl fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSession")
            .field("input", &self.input)
            .field("structured_replies", &self.structured_replies)
            .field("pending_requests", &self.pending.len())
            .field("output_pending_bytes", &self.output_pending_bytes())
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl ServerSession {
    /// A session that has queued the server greeting and waits for the client flags.
    pub fn new(config: ServerConfig) -> Result<Self, ConfigError> {
        if let Some(why) = config_refusal(&config) {
            return Err(ConfigError(why));
        }
        let mut session = Self {
            config,
            input: Input::ClientFlags,
            head: [0; REQUEST_HEADER_BYTES],
            head_len: 0,
            body: Vec::new(),
            no_zeroes: false,
            options_seen: 0,
            structured_replies: false,
            transmitting: false,
            out: Vec::with_capacity(256),
            out_start: 0,
            events: VecDeque::new(),
            events_write_bytes: 0,
            pending: HashMap::new(),
        };
        let handshake_flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        put(
            &mut session.out,
            &[
                &NBD_MAGIC.to_be_bytes(),
                &IHAVEOPT.to_be_bytes(),
                &handshake_flags.to_be_bytes(),
            ],
        );
        Ok(session)
    }

    /// Parses received bytes and returns how many were consumed. Fewer than `bytes.len()` means
    /// the session is closed or backpressured (see [`Self::wants_input`]): keep the rest.
    pub fn handle_input(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        while used < bytes.len() && self.wants_input() {
            let step = self.step(&bytes[used..]);
            // Every open state needs at least one more byte, so each step makes progress.
            assert!(step > 0, "no progress in {:?}", self.input);
            used += step;
        }
        used
    }

    /// True while the session accepts more input: it is not closed and neither queued events,
    /// pending output nor unanswered requests have reached their limits.
    pub fn wants_input(&self) -> bool {
        self.input != Input::Closed
            && self.events.len() < EVENTS_QUEUED_MAX
            && self.events_write_bytes < EVENTS_WRITE_BYTES_SOFT_MAX
            && self.output_pending_bytes() < OUTPUT_BYTES_SOFT_MAX
            && self.pending.len() < PENDING_REQUESTS_MAX
    }

    /// Bytes to send next, if any; report what was sent with [`Self::consume_output`].
    pub fn poll_output(&self) -> Option<&[u8]> {
        let pending = &self.out[self.out_start..];
        (!pending.is_empty()).then_some(pending)
    }

    /// Marks the first `n` bytes of [`Self::poll_output`] as sent.
    ///
    /// # Panics
    /// If `n` exceeds the pending output.
    pub fn consume_output(&mut self, n: usize) {
        let pending = self.output_pending_bytes();
        assert!(n <= pending, "consumed {n} output bytes of {pending}");
        self.out_start += n;
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
            // A large READ reply must not pin its buffer for the rest of the connection.
            self.out.shrink_to(OUTPUT_BYTES_SOFT_MAX);
        } else if self.out_start >= self.out.len() / 2 {
            // Compacting only once half is sent keeps the copying amortised O(1) per byte.
            self.out.drain(..self.out_start);
            self.out_start = 0;
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        if let Event::Write { data, .. } = &event {
            self.events_write_bytes -= data.len();
        }
        Some(event)
    }

    /// Answers a WRITE, WRITE_ZEROES, TRIM or FLUSH with success.
    pub fn reply_ok(&mut self, handle: u64) -> Result<(), ReplyError> {
        match self.pending.get(&handle) {
            None => Err(ReplyError::UnknownHandle(handle)),
            Some(Pending::Read { .. }) => Err(ReplyError::WrongKind(handle)),
            Some(Pending::NoData) => {
                self.pending.remove(&handle);
                // A simple reply is allowed in both styles for a success without payload.
                self.put_simple_reply(handle, 0);
                Ok(())
            }
        }
    }

    /// Answers a READ with its data, which must have exactly the requested length: a simple
    /// reply carries no length, so any other length would desynchronise the client, and a
    /// structured reply must cover the whole range on success.
    pub fn reply_read(&mut self, handle: u64, data: &[u8]) -> Result<(), ReplyError> {
        match self.pending.get(&handle) {
            None => Err(ReplyError::UnknownHandle(handle)),
            Some(Pending::NoData) => Err(ReplyError::WrongKind(handle)),
            Some(&Pending::Read { len, .. }) if usize_from(len) != data.len() => {
                Err(ReplyError::ReadLengthMismatch {
                    handle,
                    expected: len,
                    actual: data.len(),
                })
            }
            Some(&Pending::Read { offset, .. }) => {
                self.pending.remove(&handle);
                if self.structured_replies {
                    // One chunk for the whole range, so NBD_CMD_FLAG_DF is always honoured. The
                    // data is complete before the chunk starts, so no error can follow it and
                    // the chunk may carry DONE itself.
                    put_chunk(
                        &mut self.out,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        handle,
                        &[&offset.to_be_bytes(), data],
                    );
                } else {
                    self.put_simple_reply(handle, 0);
                    self.out.extend_from_slice(data);
                }
                Ok(())
            }
        }
    }

    /// Answers any request with an error (a READ error carries no data).
    pub fn reply_error(&mut self, handle: u64, error: NbdError) -> Result<(), ReplyError> {
        self.pending
            .remove(&handle)
            .ok_or(ReplyError::UnknownHandle(handle))?;
        self.put_error_reply(handle, refuse(error, error.message()));
        Ok(())
    }

    /// Requests handed out as events and not yet answered. The runtime should stop reading from
    /// the socket above its own limit; the session stops consuming at 4096.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Bytes queued for sending.
    pub fn output_pending_bytes(&self) -> usize {
        self.out.len() - self.out_start
    }

    /// True once the handshake is over and requests flow.
    pub fn is_transmitting(&self) -> bool {
        self.transmitting
    }

    /// True once the client negotiated `NBD_OPT_STRUCTURED_REPLY`; it cannot change after the
    /// handshake.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// True once no more input will be parsed (disconnect, abort or protocol error). Replies to
    /// pending requests are still accepted; close after they and the output are done.
    pub fn is_closed(&self) -> bool {
        self.input == Input::Closed
    }

    /// The transmission flags this session advertises (fixed once transmission starts).
    ///
    /// FUA, TRIM and WRITE_ZEROES are advertised even on a read-only export, where they are
    /// refused with `NBD_EPERM` as the spec asks. `NBD_FLAG_SEND_DF` follows structured replies:
    /// the spec requires it whenever READ accepts `NBD_CMD_FLAG_DF` and forbids it without
    /// structured replies. `NBD_FLAG_SEND_FAST_ZERO` is never set: the runtime cannot tell
    /// whether zeroing is faster than writing, and refusing the flag with `NBD_EINVAL` is what
    /// the spec asks of a server that does not advertise it.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        if self.config.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if self.config.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if self.structured_replies {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    /// Largest READ or WRITE length: `payload_bytes_max` in whole blocks. Advertising a maximum
    /// that is not a multiple of the minimum block would also make libnbd ignore all three
    /// constraints.
    fn payload_bytes_max(&self) -> u32 {
        let block_bytes = self.config.block_bytes;
        self.config.payload_bytes_max - self.config.payload_bytes_max % block_bytes
    }

    /// Upper bound of the bytes held for parsing, for invariant checks.
    #[cfg(test)]
    pub(crate) fn buffered_input_bytes(&self) -> usize {
        self.head_len + self.body.capacity()
    }

    /// Upper bound that [`Self::buffered_input_bytes`] never exceeds.
    #[cfg(test)]
    pub(crate) fn buffered_input_bytes_max(&self) -> usize {
        REQUEST_HEADER_BYTES + OPTION_DATA_BYTES_MAX.max(usize_from(self.config.payload_bytes_max))
    }

    /// Consumes at least one byte of `input` (which is not empty) in the current state.
    fn step(&mut self, input: &[u8]) -> usize {
        match self.input {
            Input::ClientFlags => self.fill_head(input, 4, Self::on_client_flags),
            Input::OptionHeader => {
                self.fill_head(input, OPTION_HEADER_BYTES, Self::on_option_header)
            }
            Input::Request => self.fill_head(input, REQUEST_HEADER_BYTES, Self::on_request),
            Input::OptionData { option, len } => {
                let (take, done) = self.fill_body(input, len);
                if done {
                    let data = std::mem::take(&mut self.body);
                    self.input = Input::OptionHeader;
                    self.on_option(option, &data);
                }
                take
            }
            Input::WriteData {
                handle,
                offset,
                len,
                fua,
            } => {
                let (take, done) = self.fill_body(input, len);
                // A WRITE whose payload never completes (the client vanished) is neither
                // pending nor reported: nothing was acknowledged, so nothing is lost.
                if done {
                    let data = std::mem::take(&mut self.body);
                    self.input = Input::Request;
                    self.pending.insert(handle, Pending::NoData);
                    self.events_write_bytes += data.len();
                    self.events.push_back(Event::Write {
                        handle,
                        offset,
                        data,
                        fua,
                    });
                }
                take
            }
            Input::Skip { remaining, option } => {
                let take = remaining.min(input.len());
                self.input = match option {
                    _ if take < remaining => Input::Skip {
                        remaining: remaining - take,
                        option,
                    },
                    Some(option) => {
                        self.option_reply(option, REP_ERR_TOO_BIG);
                        Input::OptionHeader
                    }
                    None => Input::Request,
                };
                take
            }
            Input::Closed => 0,
        }
    }

    /// Accumulates a fixed-size header and runs `parse` once it is complete.
    fn fill_head(&mut self, input: &[u8], need: usize, parse: fn(&mut Self)) -> usize {
        let take = (need - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
        self.head_len += take;
        if self.head_len == need {
            self.head_len = 0;
            parse(self);
        }
        take
    }

    /// Accumulates a body of `len` bytes; true once complete.
    fn fill_body(&mut self, input: &[u8], len: usize) -> (usize, bool) {
        let take = (len - self.body.len()).min(input.len());
        self.body.extend_from_slice(&input[..take]);
        (take, self.body.len() == len)
    }

    fn on_client_flags(&mut self) {
        let flags = be_u32(&self.head, 0);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return self.fail(ProtocolError::UnknownClientFlags(flags));
        }
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return self.fail(ProtocolError::NotFixedNewstyle);
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.input = Input::OptionHeader;
    }

    fn on_option_header(&mut self) {
        let magic = be_u64(&self.head, 0);
        let option = be_u32(&self.head, 8);
        let len_wire = be_u32(&self.head, 12);
        let len = usize_from(len_wire);
        if magic != IHAVEOPT {
            return self.fail(ProtocolError::BadOptionMagic(magic));
        }
        self.options_seen += 1;
        if self.options_seen > OPTIONS_MAX {
            return self.fail(ProtocolError::TooManyOptions);
        }
        if option == OPT_ABORT {
            // The spec says to ignore data sent with ABORT; the client drops the connection next.
            self.option_reply(option, REP_ACK);
            self.events.push_back(Event::Disconnect);
            self.input = Input::Closed;
        } else if len > OPTION_DATA_BYTES_MAX {
            if option == OPT_EXPORT_NAME || len > OPTION_SKIP_BYTES_MAX {
                self.fail(ProtocolError::OptionTooLong {
                    option,
                    len: len_wire,
                });
            } else {
                self.input = Input::Skip {
                    remaining: len,
                    option: Some(option),
                };
            }
        } else if len == 0 {
            self.input = Input::OptionHeader;
            self.on_option(option, &[]);
        } else {
            self.body = Vec::with_capacity(len);
            self.input = Input::OptionData { option, len };
        }
    }

    /// Answers a complete option; the caller has already set the input state to the next option.
    fn on_option(&mut self, option: u32, data: &[u8]) {
        match option {
            OPT_EXPORT_NAME if self.is_our_export(data) => {
                let (size, flags) = (self.config.size_bytes, self.transmission_flags());
                put(&mut self.out, &[&size.to_be_bytes(), &flags.to_be_bytes()]);
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0; EXPORT_NAME_ZEROES_BYTES]);
                }
                self.enter_transmission();
            }
            OPT_EXPORT_NAME => self.fail(ProtocolError::UnknownExport),
            OPT_LIST if !data.is_empty() => self.option_reply(option, REP_ERR_INVALID),
            OPT_LIST => {
                let name = self.config.export_name.as_bytes();
                let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes();
                put_option_reply(&mut self.out, option, REP_SERVER, &[&name_len, name]);
                self.option_reply(option, REP_ACK);
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                None => self.option_reply(option, REP_ERR_INVALID),
                Some((name, _)) if !self.is_our_export(name) => {
                    self.option_reply(option, REP_ERR_UNKNOWN);
                }
                Some((_, infos_wanted)) => {
                    let (size, flags) = (self.config.size_bytes, self.transmission_flags());
                    let export = [
                        &INFO_EXPORT.to_be_bytes()[..],
                        &size.to_be_bytes(),
                        &flags.to_be_bytes(),
                    ];
                    put_option_reply(&mut self.out, option, REP_INFO, &export);
                    if infos_wanted.contains(&INFO_NAME) {
                        // The canonical name, which tells a client of the default export ("")
                        // what it is connected to.
                        let name = self.config.export_name.as_bytes();
                        let info = [&INFO_NAME.to_be_bytes()[..], name];
                        put_option_reply(&mut self.out, option, REP_INFO, &info);
                    }
                    // NBD_INFO_DESCRIPTION is not answered: there is no description to give,
                    // and the spec lets a server omit any information but NBD_INFO_EXPORT.
                    //
                    // The block sizes go out even unasked: the spec says a server with other
                    // than the default constraints SHOULD advertise them and MAY send
                    // information unasked. Minimum and preferred block are both `block_bytes`:
                    // the engine works in whole blocks, so smaller or unaligned requests are
                    // refused with NBD_EINVAL anyway, asked or not.
                    let block = self.config.block_bytes.to_be_bytes();
                    let payload = self.payload_bytes_max().to_be_bytes();
                    let sizes = [&INFO_BLOCK_SIZE.to_be_bytes()[..], &block, &block, &payload];
                    put_option_reply(&mut self.out, option, REP_INFO, &sizes);
                    self.option_reply(option, REP_ACK);
                    if option == OPT_GO {
                        self.enter_transmission();
                    }
                }
            },
            // The spec: no data allowed, and a server SHOULD reject data with
            // NBD_REP_ERR_INVALID. Asking twice is harmless.
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.option_reply(option, REP_ERR_INVALID);
            }
            OPT_STRUCTURED_REPLY => {
                self.structured_replies = true;
                self.option_reply(option, REP_ACK);
            }
            // Contexts serve only NBD_CMD_BLOCK_STATUS, which is not implemented. The spec names
            // NBD_REP_ERR_UNSUP as the answer of a server without the option; qemu and libnbd
            // then go on to NBD_OPT_GO without contexts (and never send BLOCK_STATUS).
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.option_reply(option, REP_ERR_UNSUP);
            }
            _ => self.option_reply(option, REP_ERR_UNSUP),
        }
    }

    fn on_request(&mut self) {
        let magic = be_u32(&self.head, 0);
        let flags = be_u16(&self.head, 4);
        let kind = be_u16(&self.head, 6);
        let handle = be_u64(&self.head, 8);
        let offset = be_u64(&self.head, 16);
        let len = be_u32(&self.head, 24);
        if magic != REQUEST_MAGIC {
            return self.fail(ProtocolError::BadRequestMagic(magic));
        }
        if kind == CMD_DISC {
            // DISC gets no reply and the client must send nothing after it.
            self.events.push_back(Event::Disconnect);
            self.input = Input::Closed;
            return;
        }
        if self.pending.contains_key(&handle) {
            return self.fail(ProtocolError::DuplicateHandle(handle));
        }
        // Only WRITE carries a payload, whatever its flags: the payload-length flag of extended
        // headers is refused like any unknown flag, since extended headers are never negotiated.
        let payload_bytes = if kind == CMD_WRITE {
            usize_from(len)
        } else {
            0
        };
        let skip_bytes_max = WRITE_SKIP_BYTES_MAX.max(usize_from(self.config.payload_bytes_max));
        let fua = flags & CMD_FLAG_FUA != 0;
        match self.check_request(flags, kind, offset, len) {
            Err(_) if payload_bytes > skip_bytes_max => {
                self.fail(ProtocolError::WritePayloadTooLong(len));
            }
            Err(refusal) => {
                self.put_error_reply(handle, refusal);
                if payload_bytes > 0 {
                    self.input = Input::Skip {
                        remaining: payload_bytes,
                        option: None,
                    };
                }
            }
            Ok(()) => match kind {
                CMD_WRITE => {
                    assert!(payload_bytes > 0, "a valid write has a payload");
                    self.body = Vec::with_capacity(payload_bytes);
                    self.input = Input::WriteData {
                        handle,
                        offset,
                        len: payload_bytes,
                        fua,
                    };
                }
                CMD_READ => {
                    // FUA on a READ is valid but meaningless: a READ writes nothing.
                    self.pending.insert(handle, Pending::Read { offset, len });
                    self.events.push_back(Event::Read {
                        handle,
                        offset,
                        len,
                    });
                }
                CMD_WRITE_ZEROES => {
                    self.pending.insert(handle, Pending::NoData);
                    self.events.push_back(Event::WriteZeroes {
                        handle,
                        offset,
                        len,
                        fua,
                    });
                }
                CMD_TRIM => {
                    self.pending.insert(handle, Pending::NoData);
                    self.events.push_back(Event::Trim {
                        handle,
                        offset,
                        len,
                        fua,
                    });
                }
                _ => {
                    // FUA on a FLUSH asks for nothing a FLUSH does not already do.
                    assert_eq!(kind, CMD_FLUSH, "check_request admits no other command");
                    self.pending.insert(handle, Pending::NoData);
                    self.events.push_back(Event::Flush { handle });
                }
            },
        }
    }

    /// Decides whether a well-framed request goes to the runtime or is refused here.
    ///
    /// The spec's rules, in the order they are checked:
    /// - Unknown commands, and BLOCK_STATUS (no metadata context can have been selected): EINVAL.
    /// - A flag unknown or not documented for the command: EINVAL. FUA is valid on every
    ///   command once advertised (the server must accept it, if need be by ignoring it);
    ///   NO_HOLE on WRITE_ZEROES only; DF on READ only, and only with structured replies
    ///   (that is when SEND_DF is advertised). FAST_ZERO is not advertised, so EINVAL.
    /// - FLUSH must have offset and length 0.
    /// - WRITE, WRITE_ZEROES and TRIM on a read-only export: EPERM.
    /// - Offset and length must be multiples of `block_bytes` even when the client did not ask
    ///   for `NBD_INFO_BLOCK_SIZE`: the engine replicates whole blocks only, and the spec lets a
    ///   server with non-default constraints cleanly error such requests (EINVAL). A length of 0
    ///   is unspecified by the spec (the server should not disconnect): EINVAL.
    /// - READ and WRITE must not exceed the maximum payload (EINVAL). WRITE_ZEROES and TRIM
    ///   carry no payload; the spec lets clients exceed the maximum for them, so they are only
    ///   limited by the 32-bit length field.
    /// - The range must lie inside the export: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for
    ///   READ and TRIM, as the spec asks.
    fn check_request(&self, flags: u16, kind: u16, offset: u64, len: u32) -> Result<(), Refusal> {
        let flags_valid = match kind {
            CMD_READ if self.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => return Err(refuse(NbdError::Invalid, "unsupported command")),
        };
        if flags & !flags_valid != 0 {
            let message = "command flag unknown or not valid for this command";
            return Err(refuse(NbdError::Invalid, message));
        }
        if kind == CMD_FLUSH {
            if offset != 0 || len != 0 {
                let message = "flush with a non-zero offset or length";
                return Err(refuse(NbdError::Invalid, message));
            }
            return Ok(());
        }
        if kind != CMD_READ && self.config.read_only {
            return Err(refuse(NbdError::Perm, "export is read-only"));
        }
        if len == 0 {
            return Err(refuse(NbdError::Invalid, "zero-length request"));
        }
        let block_bytes = u64::from(self.config.block_bytes);
        if offset % block_bytes != 0 || u64::from(len) % block_bytes != 0 {
            let message = "request not aligned to the export's block size";
            return Err(refuse(NbdError::Invalid, message));
        }
        let carries_payload = kind == CMD_READ || kind == CMD_WRITE;
        if carries_payload && len > self.payload_bytes_max() {
            let message = "request longer than the maximum payload";
            return Err(refuse(NbdError::Invalid, message));
        }
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.config.size_bytes => Ok(()),
            _ if kind == CMD_WRITE || kind == CMD_WRITE_ZEROES => Err(refuse(
                NbdError::NoSpace,
                "write beyond the end of the export",
            )),
            _ => Err(refuse(
                NbdError::Invalid,
                "request beyond the end of the export",
            )),
        }
    }

    fn is_our_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.export_name.as_bytes()
    }

    fn enter_transmission(&mut self) {
        self.transmitting = true;
        self.input = Input::Request;
        self.body = Vec::new();
    }

    fn fail(&mut self, error: ProtocolError) {
        self.events.push_back(Event::Error(error));
        self.input = Input::Closed;
        self.body = Vec::new();
    }

    fn option_reply(&mut self, option: u32, reply_type: u32) {
        put_option_reply(&mut self.out, option, reply_type, &[]);
    }

    fn put_simple_reply(&mut self, handle: u64, error: u32) {
        let magic = SIMPLE_REPLY_MAGIC.to_be_bytes();
        put(
            &mut self.out,
            &[&magic, &error.to_be_bytes(), &handle.to_be_bytes()],
        );
    }

    /// An error reply in the negotiated style: structured, with its message, whenever
    /// structured replies were negotiated (required for READ, preferred by the spec for the
    /// rest); else simple, where a READ error carries no data.
    fn put_error_reply(&mut self, handle: u64, refusal: Refusal) {
        if !self.structured_replies {
            return self.put_simple_reply(handle, refusal.error.code());
        }
        let message = refusal.message.as_bytes();
        assert!(
            message.len() <= STRING_BYTES_MAX,
            "error messages are short"
        );
        let message_len = u16::try_from(message.len()).unwrap_or(u16::MAX);
        put_chunk(
            &mut self.out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            &[
                &refusal.error.code().to_be_bytes(),
                &message_len.to_be_bytes(),
                message,
            ],
        );
    }
}

/// Why the session cannot serve `config`, if it cannot.
fn config_refusal(config: &ServerConfig) -> Option<&'static str> {
    let block_bytes = config.block_bytes;
    if config.export_name.len() > STRING_BYTES_MAX || config.export_name.contains('\0') {
        return Some("export name longer than 4096 bytes or containing NUL");
    }
    if !block_bytes.is_power_of_two() || !(512..=65536).contains(&block_bytes) {
        return Some("block_bytes is not a power of two from 512 to 65536");
    }
    if config.payload_bytes_max < block_bytes {
        return Some("payload_bytes_max is below block_bytes");
    }
    (config.size_bytes % u64::from(block_bytes) != 0).then_some("size_bytes is not whole blocks")
}

fn put(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
}

fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    assert!(len <= OPTION_DATA_BYTES_MAX, "option replies are small");
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    let magic = OPTION_REPLY_MAGIC.to_be_bytes();
    put(
        out,
        &[
            &magic,
            &option.to_be_bytes(),
            &reply_type.to_be_bytes(),
            &len,
        ],
    );
    put(out, parts);
}

/// One structured reply chunk: header, then the payload `parts`.
fn put_chunk(out: &mut Vec<u8>, flags: u16, chunk_type: u16, handle: u64, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    // READ lengths are whole blocks of at least 512 bytes, so even the largest leaves room
    // for the 8-byte offset in the 32-bit chunk length.
    let len = u32::try_from(len).expect("a validated reply fits a chunk");
    let magic = STRUCTURED_REPLY_MAGIC.to_be_bytes();
    put(
        out,
        &[
            &magic,
            &flags.to_be_bytes(),
            &chunk_type.to_be_bytes(),
            &handle.to_be_bytes(),
            &len.to_be_bytes(),
        ],
    );
    put(out, parts);
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the information types
/// requested; `None` if the lengths do not add up exactly.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize_from(be_u32(data.get(..4)?, 0));
    let rest = &data[4..];
    let name = rest.get(..name_len)?;
    let rest = &rest[name_len..];
    let count = usize::from(be_u16(rest.get(..2)?, 0));
    let list = &rest[2..];
    if list.len() != count.checked_mul(2)? {
        return None;
    }
    let infos = list.chunks_exact(2).map(|info| be_u16(info, 0)).collect();
    Some((name, infos))
}
