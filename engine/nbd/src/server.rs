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
    /// Advertise `NBD_FLAG_READ_ONLY` and fail every WRITE with `NBD_EPERM`.
    pub read_only: bool,
    /// Minimum and preferred block size: a power of two from 512 to 65536. READ and WRITE
    /// offsets and lengths must be multiples of it (else `NBD_EINVAL`) whether or not the client
    /// asked for `NBD_INFO_BLOCK_SIZE`, because the engine replicates whole blocks only.
    pub block_bytes: u32,
    /// Largest READ or WRITE length accepted; at least `block_bytes`.
    pub payload_bytes_max: u32,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Read `len` bytes at `offset`, then call [`ServerSession::reply_read`] or `reply_error`.
    Read { handle: u64, offset: u64, len: u32 },
    /// Write `data` at `offset`, then call [`ServerSession::reply_ok`] or `reply_error`.
    Write {
        handle: u64,
        offset: u64,
        data: Vec<u8>,
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
    Read { len: u32 },
    Write,
    Flush,
}

/// The server side of one NBD connection, fed with bytes and drained of bytes and events.
///
/// Memory is bounded: header bytes live in a fixed array, option data is at most a few KiB, a
/// WRITE payload at most `payload_bytes_max`. `handle_input` stops consuming (returns less than
/// it was given) while queued events (64, or 1 MiB of WRITE data), pending output (1 MiB) or
/// unanswered requests (4096) are at their limits, so the runtime must keep unconsumed bytes,
/// take events, send output, and retry. Output also grows by the READ data the runtime replies
/// with, which only the runtime can bound: it must keep draining output.
pub struct ServerSession {
    config: ServerConfig,
    transmission_flags: u16,
    input: Input,
    head: [u8; REQUEST_HEADER_BYTES],
    head_len: usize,
    body: Vec<u8>,
    no_zeroes: bool,
    options_seen: u32,
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
        let mut transmission_flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
        if config.read_only {
            transmission_flags |= FLAG_READ_ONLY;
        }
        let mut session = Self {
            config,
            transmission_flags,
            input: Input::ClientFlags,
            head: [0; REQUEST_HEADER_BYTES],
            head_len: 0,
            body: Vec::new(),
            no_zeroes: false,
            options_seen: 0,
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

    /// Answers a WRITE or FLUSH with success.
    pub fn reply_ok(&mut self, handle: u64) -> Result<(), ReplyError> {
        match self.pending.get(&handle) {
            None => Err(ReplyError::UnknownHandle(handle)),
            Some(Pending::Read { .. }) => Err(ReplyError::WrongKind(handle)),
            Some(Pending::Write | Pending::Flush) => {
                self.pending.remove(&handle);
                self.put_simple_reply(handle, 0);
                Ok(())
            }
        }
    }

    /// Answers a READ with its data, which must have exactly the requested length: a simple
    /// reply carries no length, so any other length would desynchronise the client.
    pub fn reply_read(&mut self, handle: u64, data: &[u8]) -> Result<(), ReplyError> {
        match self.pending.get(&handle) {
            None => Err(ReplyError::UnknownHandle(handle)),
            Some(Pending::Write | Pending::Flush) => Err(ReplyError::WrongKind(handle)),
            Some(&Pending::Read { len }) if usize_from(len) != data.len() => {
                Err(ReplyError::ReadLengthMismatch {
                    handle,
                    expected: len,
                    actual: data.len(),
                })
            }
            Some(Pending::Read { .. }) => {
                self.pending.remove(&handle);
                self.put_simple_reply(handle, 0);
                self.out.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Answers any request with an error (a READ error carries no data).
    pub fn reply_error(&mut self, handle: u64, error: NbdError) -> Result<(), ReplyError> {
        self.pending
            .remove(&handle)
            .ok_or(ReplyError::UnknownHandle(handle))?;
        self.put_simple_reply(handle, error.code());
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

    /// True once no more input will be parsed (disconnect, abort or protocol error). Replies to
    /// pending requests are still accepted; close after they and the output are done.
    pub fn is_closed(&self) -> bool {
        self.input == Input::Closed
    }

    /// The transmission flags this session advertises.
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
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
            } => {
                let (take, done) = self.fill_body(input, len);
                if done {
                    let data = std::mem::take(&mut self.body);
                    self.input = Input::Request;
                    self.pending.insert(handle, Pending::Write);
                    self.events_write_bytes += data.len();
                    self.events.push_back(Event::Write {
                        handle,
                        offset,
                        data,
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
                let (size, flags) = (self.config.size_bytes, self.transmission_flags);
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
                Some((_, block_size_wanted)) => {
                    let (size, flags) = (self.config.size_bytes, self.transmission_flags);
                    let export = [
                        &INFO_EXPORT.to_be_bytes()[..],
                        &size.to_be_bytes(),
                        &flags.to_be_bytes(),
                    ];
                    put_option_reply(&mut self.out, option, REP_INFO, &export);
                    if block_size_wanted {
                        // Minimum and preferred block are both `block_bytes`: the engine works
                        // in whole blocks, so smaller or unaligned requests are refused anyway.
                        let block = self.config.block_bytes.to_be_bytes();
                        let payload = self.config.payload_bytes_max.to_be_bytes();
                        let sizes = [&INFO_BLOCK_SIZE.to_be_bytes()[..], &block, &block, &payload];
                        put_option_reply(&mut self.out, option, REP_INFO, &sizes);
                    }
                    self.option_reply(option, REP_ACK);
                    if option == OPT_GO {
                        self.enter_transmission();
                    }
                }
            },
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
        let payload_bytes = if kind == CMD_WRITE {
            usize_from(len)
        } else {
            0
        };
        let skip_bytes_max = WRITE_SKIP_BYTES_MAX.max(usize_from(self.config.payload_bytes_max));
        match self.check_request(flags, kind, offset, len) {
            Err(_) if payload_bytes > skip_bytes_max => {
                self.fail(ProtocolError::WritePayloadTooLong(len));
            }
            Err(error) => {
                self.put_simple_reply(handle, error.code());
                if payload_bytes > 0 {
                    self.input = Input::Skip {
                        remaining: payload_bytes,
                        option: None,
                    };
                }
            }
            Ok(()) if kind == CMD_WRITE => {
                assert!(payload_bytes > 0, "a valid write has a payload");
                self.body = Vec::with_capacity(payload_bytes);
                self.input = Input::WriteData {
                    handle,
                    offset,
                    len: payload_bytes,
                };
            }
            Ok(()) if kind == CMD_READ => {
                self.pending.insert(handle, Pending::Read { len });
                self.events.push_back(Event::Read {
                    handle,
                    offset,
                    len,
                });
            }
            Ok(()) => {
                self.pending.insert(handle, Pending::Flush);
                self.events.push_back(Event::Flush { handle });
            }
        }
    }

    /// Decides whether a well-framed request goes to the runtime or is refused here.
    ///
    /// READ and WRITE must be aligned to `block_bytes` in offset and length even when the client
    /// did not ask for `NBD_INFO_BLOCK_SIZE`: the engine replicates whole blocks only. The spec
    /// lets a server with non-default constraints cleanly error such requests.
    fn check_request(&self, flags: u16, kind: u16, offset: u64, len: u32) -> Result<(), NbdError> {
        if flags != 0 {
            // No command flag is valid: FUA and the others are not advertised.
            return Err(NbdError::Invalid);
        }
        match kind {
            CMD_FLUSH if offset == 0 && len == 0 => Ok(()),
            CMD_READ | CMD_WRITE => {
                if kind == CMD_WRITE && self.config.read_only {
                    return Err(NbdError::Perm);
                }
                let block_bytes = u64::from(self.config.block_bytes);
                if len == 0
                    || len > self.config.payload_bytes_max
                    || offset % block_bytes != 0
                    || u64::from(len) % block_bytes != 0
                {
                    return Err(NbdError::Invalid);
                }
                match offset.checked_add(u64::from(len)) {
                    Some(end) if end <= self.config.size_bytes => Ok(()),
                    // The spec asks for ENOSPC on writes and EINVAL on reads beyond the end.
                    _ if kind == CMD_WRITE => Err(NbdError::NoSpace),
                    _ => Err(NbdError::Invalid),
                }
            }
            _ => Err(NbdError::Invalid),
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

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and whether
/// `NBD_INFO_BLOCK_SIZE` was requested; `None` if the lengths do not add up exactly.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], bool)> {
    let name_len = usize_from(be_u32(data.get(..4)?, 0));
    let rest = &data[4..];
    let name = rest.get(..name_len)?;
    let rest = &rest[name_len..];
    let count = usize::from(be_u16(rest.get(..2)?, 0));
    let list = &rest[2..];
    if list.len() != count.checked_mul(2)? {
        return None;
    }
    let block_size_wanted = list
        .chunks_exact(2)
        .any(|info| be_u16(info, 0) == INFO_BLOCK_SIZE);
    Some((name, block_size_wanted))
}
