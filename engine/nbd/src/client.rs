//! A blocking NBD client over `std::net::TcpStream`, for test drivers and demos.
//!
//! It sends what it is asked to, without checking the server's transmission flags, so that tests
//! can probe how a server handles requests it did not advertise. Replies are checked strictly:
//! structured chunks only after negotiation, never a simple reply to a READ once structured
//! replies were negotiated, content inside the requested range and, for a success, adding up
//! to its length.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::wire::*;

/// Option replies longer than this are refused rather than allocated.
const OPTION_REPLY_BYTES_MAX: usize = STRING_BYTES_MAX + 128;
/// A server that keeps sending option replies without ending the list is broken.
const OPTION_REPLIES_MAX: usize = 64;
/// Handles of the convenience calls start here, away from small handles chosen by callers.
const CONVENIENCE_HANDLE_FIRST: u64 = 1 << 63;
/// Longest payload of an error chunk: error, message length, the longest legal message and the
/// offset of `NBD_REPLY_TYPE_ERROR_OFFSET`.
const ERROR_CHUNK_BYTES_MAX: usize = ERROR_CHUNK_HEADER_BYTES + STRING_BYTES_MAX + 8;

/// What [`Client::connect_with`] negotiates besides the export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`). A server that refuses leaves
    /// the connection with simple replies; [`Client::structured_replies`] tells which.
    pub structured_replies: bool,
}

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// A socket operation exceeded the timeout given to [`Client::connect`].
    Timeout,
    /// The server closed the connection.
    Closed,
    /// Another socket error.
    Io(io::Error),
    /// The server sent something the protocol does not allow.
    Protocol(String),
    /// The server refused `NBD_OPT_GO` with this error reply type and message.
    Rejected { reply_type: u32, message: String },
    /// A convenience call was answered with this NBD error value.
    Server { error: u32 },
    /// A request with this handle is already waiting for its reply.
    HandleInUse(u64),
    /// A reply carried a handle that no request is waiting for (or not the expected one).
    UnexpectedHandle(u64),
    /// The caller passed a value the protocol cannot carry.
    InvalidArgument(&'static str),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => write!(f, "NBD socket operation timed out"),
            Self::Closed => write!(f, "NBD server closed the connection"),
            Self::Io(error) => write!(f, "NBD socket error: {error}"),
            Self::Protocol(what) => write!(f, "NBD server broke the protocol: {what}"),
            Self::Rejected {
                reply_type,
                message,
            } => {
                write!(
                    f,
                    "NBD server refused the export (reply {reply_type:#x}): {message}"
                )
            }
            Self::Server { error } => match NbdError::from_code(*error) {
                Some(known) => write!(f, "NBD request failed with {known:?} ({error})"),
                None => write!(f, "NBD request failed with error {error}"),
            },
            Self::HandleInUse(handle) => write!(f, "NBD handle {handle:#x} is already in flight"),
            Self::UnexpectedHandle(handle) => {
                write!(f, "NBD reply for unexpected handle {handle:#x}")
            }
            Self::InvalidArgument(what) => write!(f, "invalid NBD request: {what}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::UnexpectedEof => Self::Closed,
            _ => Self::Io(error),
        }
    }
}

/// One reply: a simple reply, or all chunks of a structured reply put together. `data` holds
/// the payload of a successful READ and is empty otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success, else an NBD error value (see [`NbdError::from_code`]); for a structured
    /// reply, the first error chunk's.
    pub error: u32,
    pub data: Vec<u8>,
}

/// What the reply to a request in flight carries on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expected {
    /// The `len` bytes at `offset`: a simple reply does not say how much data follows it, and
    /// structured content must lie inside this range.
    Read { offset: u64, len: u32 },
    /// No data.
    Status,
}

/// Handles waiting for a reply, with what each reply carries.
pub(crate) type InFlight = Arc<Mutex<HashMap<u64, Expected>>>;

fn protocol(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

fn lock(in_flight: &InFlight) -> MutexGuard<'_, HashMap<u64, Expected>> {
    // The map stays consistent even if a holder panicked: every update is a single operation.
    in_flight.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The sending half of a connection in transmission.
#[derive(Debug)]
pub struct ClientSender {
    stream: TcpStream,
    in_flight: InFlight,
}

/// The receiving half of a connection in transmission.
#[derive(Debug)]
pub struct ClientReceiver {
    stream: TcpStream,
    in_flight: InFlight,
    replies: ReplyReader,
}

/// A blocking NBD client connected to one export.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    receiver: ClientReceiver,
    size_bytes: u64,
    transmission_flags: u16,
    structured_replies: bool,
    next_handle: u64,
}

impl Client {
    /// Connects, performs the fixed newstyle handshake and enters transmission with `NBD_OPT_GO`
    /// (asking for `NBD_INFO_BLOCK_SIZE`, so the caller must respect the server's alignment).
    /// Every later socket operation fails with [`ClientError::Timeout`] after `timeout`. Replies
    /// are simple.
    pub fn connect(
        addr: SocketAddr,
        export_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, export_name, timeout, ConnectOptions::default())
    }

    /// Like [`Self::connect`], negotiating what `options` asks for before `NBD_OPT_GO`.
    pub fn connect_with(
        addr: SocketAddr,
        export_name: &str,
        timeout: Duration,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        if export_name.len() > STRING_BYTES_MAX {
            return Err(ClientError::InvalidArgument("export name over 4096 bytes"));
        }
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;

        let mut greeting = [0; GREETING_BYTES];
        stream.read_exact(&mut greeting)?;
        if be_u64(&greeting, 0) != NBD_MAGIC || be_u64(&greeting, 8) != IHAVEOPT {
            return Err(protocol("greeting is not NBDMAGIC IHAVEOPT"));
        }
        let handshake_flags = be_u16(&greeting, 16);
        if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server does not offer fixed newstyle"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if handshake_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;

        let mut structured_replies = false;
        if options.structured_replies {
            stream.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]))?;
            let (reply_type, _) = read_option_reply(&mut stream, OPT_STRUCTURED_REPLY)?;
            // The spec asks clients to accept NBD_REP_ERR_UNSUP (and so any refusal) as "simple
            // replies only".
            structured_replies = match reply_type {
                REP_ACK => true,
                error if error & REP_ERR_BIT != 0 => false,
                other => {
                    let what = format!("NBD_OPT_STRUCTURED_REPLY answered with {other:#x}");
                    return Err(protocol(what));
                }
            };
        }

        let go = encode_info_request(export_name.as_bytes(), &[INFO_BLOCK_SIZE]);
        stream.write_all(&encode_option(OPT_GO, &go))?;
        let mut export = None;
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply_type, data) = read_option_reply(&mut stream, OPT_GO)?;
            match reply_type {
                REP_ACK => {
                    let Some((size_bytes, transmission_flags)) = export else {
                        return Err(protocol("NBD_REP_ACK without NBD_INFO_EXPORT"));
                    };
                    if transmission_flags & FLAG_HAS_FLAGS == 0 {
                        return Err(protocol("transmission flags lack HAS_FLAGS"));
                    }
                    let in_flight = InFlight::default();
                    let receiver = ClientReceiver {
                        stream: stream.try_clone()?,
                        in_flight: Arc::clone(&in_flight),
                        replies: ReplyReader::new(structured_replies),
                    };
                    return Ok(Self {
                        sender: ClientSender { stream, in_flight },
                        receiver,
                        size_bytes,
                        transmission_flags,
                        structured_replies,
                        next_handle: CONVENIENCE_HANDLE_FIRST,
                    });
                }
                REP_INFO if data.get(..2).map(|kind| be_u16(kind, 0)) == Some(INFO_EXPORT) => {
                    if data.len() != 12 {
                        let len = data.len();
                        return Err(protocol(format!("NBD_INFO_EXPORT of {len} bytes")));
                    }
                    export = Some((be_u64(&data, 2), be_u16(&data, 10)));
                }
                error if error & REP_ERR_BIT != 0 => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(ClientError::Rejected {
                        reply_type: error,
                        message,
                    });
                }
                // The spec requires clients to ignore information and replies they do not know.
                _ => {}
            }
        }
        Err(protocol("option reply list does not end"))
    }

    /// Size of the export.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Transmission flags the server advertised (`wire::FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// True if the server accepted structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// Sends a WRITE without waiting for its reply.
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.sender.send_write(handle, offset, data)
    }

    /// Sends a WRITE with `NBD_CMD_FLAG_FUA` without waiting for its reply.
    pub fn send_write_fua(
        &mut self,
        handle: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.sender.send_write_fua(handle, offset, data)
    }

    /// Sends a WRITE_ZEROES without waiting for its reply.
    pub fn send_write_zeroes(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.sender.send_write_zeroes(handle, offset, len, fua)
    }

    /// Sends a TRIM without waiting for its reply.
    pub fn send_trim(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.sender.send_trim(handle, offset, len, fua)
    }

    /// Sends a READ without waiting for its reply.
    pub fn send_read(&mut self, handle: u64, offset: u64, len: u32) -> Result<(), ClientError> {
        self.sender.send_read(handle, offset, len)
    }

    /// Sends a FLUSH without waiting for its reply.
    pub fn send_flush(&mut self, handle: u64) -> Result<(), ClientError> {
        self.sender.send_flush(handle)
    }

    /// Waits for the next reply, in whatever order the server sends them.
    pub fn recv_reply(&mut self) -> Result<Reply, ClientError> {
        self.receiver.recv_reply()
    }

    /// Writes and waits for success. Like the other convenience calls, it expects no pipelined
    /// request to be outstanding.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let handle = self.take_handle();
        self.sender.send_write(handle, offset, data)?;
        self.expect_reply(handle).map(drop)
    }

    /// Writes with `NBD_CMD_FLAG_FUA` and waits for success.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let handle = self.take_handle();
        self.sender.send_write_fua(handle, offset, data)?;
        self.expect_reply(handle).map(drop)
    }

    /// Zeroes `len` bytes at `offset` and waits for success.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        let handle = self.take_handle();
        self.sender.send_write_zeroes(handle, offset, len, false)?;
        self.expect_reply(handle).map(drop)
    }

    /// Trims `len` bytes at `offset` and waits for success.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        let handle = self.take_handle();
        self.sender.send_trim(handle, offset, len, false)?;
        self.expect_reply(handle).map(drop)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let handle = self.take_handle();
        self.sender.send_read(handle, offset, len)?;
        self.expect_reply(handle)
    }

    /// Flushes and waits for success.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let handle = self.take_handle();
        self.sender.send_flush(handle)?;
        self.expect_reply(handle).map(drop)
    }

    /// Sends `NBD_CMD_DISC` and closes the sending direction.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.sender.send_disconnect()
    }

    /// Splits the connection so that one thread sends while another receives replies.
    pub fn into_split(self) -> (ClientSender, ClientReceiver) {
        (self.sender, self.receiver)
    }

    fn take_handle(&mut self) -> u64 {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        handle
    }

    fn expect_reply(&mut self, handle: u64) -> Result<Vec<u8>, ClientError> {
        let reply = self.receiver.recv_reply()?;
        if reply.handle != handle {
            return Err(ClientError::UnexpectedHandle(reply.handle));
        }
        if reply.error != 0 {
            return Err(ClientError::Server { error: reply.error });
        }
        Ok(reply.data)
    }
}

impl ClientSender {
    /// Sends a WRITE of `data` at `offset`.
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.send_write_flagged(0, handle, offset, data)
    }

    /// Sends a WRITE of `data` at `offset` with `NBD_CMD_FLAG_FUA`: the server answers only
    /// once the data is durable.
    pub fn send_write_fua(
        &mut self,
        handle: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.send_write_flagged(CMD_FLAG_FUA, handle, offset, data)
    }

    /// Sends a WRITE_ZEROES of `len` bytes at `offset`, with `NBD_CMD_FLAG_FUA` if `fua`.
    pub fn send_write_zeroes(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        let head = encode_request_flagged(fua_flag(fua), CMD_WRITE_ZEROES, handle, offset, len);
        self.send(&head, &[], Expected::Status)
    }

    /// Sends a TRIM of `len` bytes at `offset`, with `NBD_CMD_FLAG_FUA` if `fua`.
    pub fn send_trim(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        let head = encode_request_flagged(fua_flag(fua), CMD_TRIM, handle, offset, len);
        self.send(&head, &[], Expected::Status)
    }

    /// Sends a READ of `len` bytes at `offset`.
    pub fn send_read(&mut self, handle: u64, offset: u64, len: u32) -> Result<(), ClientError> {
        let head = encode_request(CMD_READ, handle, offset, len);
        self.send(&head, &[], Expected::Read { offset, len })
    }

    /// Sends a FLUSH.
    pub fn send_flush(&mut self, handle: u64) -> Result<(), ClientError> {
        let head = encode_request(CMD_FLUSH, handle, 0, 0);
        self.send(&head, &[], Expected::Status)
    }

    /// Sends `NBD_CMD_DISC` (which gets no reply) and closes the sending direction.
    pub fn send_disconnect(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&encode_request(CMD_DISC, 0, 0, 0))?;
        self.stream.shutdown(Shutdown::Write)?;
        Ok(())
    }

    fn send_write_flagged(
        &mut self,
        flags: u16,
        handle: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::InvalidArgument("write longer than 4 GiB"))?;
        let head = encode_request_flagged(flags, CMD_WRITE, handle, offset, len);
        self.send(&head, data, Expected::Status)
    }

    fn send(
        &mut self,
        head: &[u8; REQUEST_HEADER_BYTES],
        payload: &[u8],
        expected: Expected,
    ) -> Result<(), ClientError> {
        let handle = be_u64(head, 8);
        // Registered before sending, so the receiver always knows the handle when the reply comes.
        {
            let mut in_flight = lock(&self.in_flight);
            if in_flight.contains_key(&handle) {
                return Err(ClientError::HandleInUse(handle));
            }
            in_flight.insert(handle, expected);
        }
        self.stream.write_all(head)?;
        self.stream.write_all(payload)?;
        Ok(())
    }
}

impl ClientReceiver {
    /// Waits for the next complete reply; chunks of structured replies to other requests that
    /// arrive meanwhile are kept until their own reply is complete.
    pub fn recv_reply(&mut self) -> Result<Reply, ClientError> {
        self.replies.next_reply(&mut self.stream, &self.in_flight)
    }
}

fn fua_flag(fua: bool) -> u16 {
    if fua {
        CMD_FLAG_FUA
    } else {
        0
    }
}

/// A structured reply whose final chunk has not arrived yet.
#[derive(Debug)]
struct PartialReply {
    /// The first error chunk's error, or 0.
    error: u32,
    /// The READ's buffer, filled by content chunks; empty for other requests.
    data: Vec<u8>,
    /// Bytes described by content chunks so far; they must not overlap, so a complete READ
    /// has exactly its length covered.
    covered: u64,
}

/// Decodes replies, simple or structured, from a byte source.
#[derive(Debug)]
pub(crate) struct ReplyReader {
    structured_replies: bool,
    partial: HashMap<u64, PartialReply>,
}

impl ReplyReader {
    pub(crate) fn new(structured_replies: bool) -> Self {
        Self {
            structured_replies,
            partial: HashMap::new(),
        }
    }

    /// Reads messages from `source` until one completes a reply to a request in `in_flight`,
    /// which it then removes.
    pub(crate) fn next_reply(
        &mut self,
        source: &mut impl Read,
        in_flight: &InFlight,
    ) -> Result<Reply, ClientError> {
        loop {
            let mut magic = [0; 4];
            source.read_exact(&mut magic)?;
            match u32::from_be_bytes(magic) {
                SIMPLE_REPLY_MAGIC => return self.simple_reply(source, in_flight),
                STRUCTURED_REPLY_MAGIC if self.structured_replies => {
                    if let Some(reply) = self.chunk(source, in_flight)? {
                        return Ok(reply);
                    }
                }
                magic => return Err(protocol(format!("bad reply magic {magic:#x}"))),
            }
        }
    }

    fn simple_reply(
        &mut self,
        source: &mut impl Read,
        in_flight: &InFlight,
    ) -> Result<Reply, ClientError> {
        let mut head = [0; SIMPLE_REPLY_HEADER_BYTES - 4];
        source.read_exact(&mut head)?;
        let (error, handle) = (be_u32(&head, 0), be_u64(&head, 4));
        let expected = lock(in_flight)
            .get(&handle)
            .copied()
            .ok_or(ClientError::UnexpectedHandle(handle))?;
        if self.partial.contains_key(&handle) {
            return Err(protocol(format!(
                "simple reply amid chunks for {handle:#x}"
            )));
        }
        let read_len = match expected {
            Expected::Read { .. } if self.structured_replies => {
                return Err(protocol(format!("simple reply to READ {handle:#x}")));
            }
            Expected::Read { len, .. } => len,
            Expected::Status => 0,
        };
        lock(in_flight).remove(&handle);
        let mut data = Vec::new();
        if error == 0 && read_len > 0 {
            data = vec![0; usize_from(read_len)];
            source.read_exact(&mut data)?;
        }
        Ok(Reply {
            handle,
            error,
            data,
        })
    }

    /// Reads one structured chunk (its magic already read); the reply once it is complete.
    fn chunk(
        &mut self,
        source: &mut impl Read,
        in_flight: &InFlight,
    ) -> Result<Option<Reply>, ClientError> {
        let mut head = [0; STRUCTURED_REPLY_HEADER_BYTES - 4];
        source.read_exact(&mut head)?;
        let (flags, chunk_type) = (be_u16(&head, 0), be_u16(&head, 2));
        let (handle, len) = (be_u64(&head, 4), usize_from(be_u32(&head, 12)));
        let expected = lock(in_flight)
            .get(&handle)
            .copied()
            .ok_or(ClientError::UnexpectedHandle(handle))?;
        let read = match expected {
            Expected::Read { offset, len } => Some((offset, len)),
            Expected::Status => None,
        };
        // Bound the payload before allocating it.
        let len_max = match (chunk_type, read) {
            (REPLY_TYPE_NONE, _) => 0,
            (REPLY_TYPE_OFFSET_DATA, Some((_, read_len))) => {
                OFFSET_DATA_HEADER_BYTES + usize_from(read_len)
            }
            (REPLY_TYPE_OFFSET_HOLE, Some(_)) => 12,
            (error, _) if error & REPLY_TYPE_ERROR_BIT != 0 => ERROR_CHUNK_BYTES_MAX,
            (other, _) => {
                let what = format!("chunk type {other} for request {handle:#x}");
                return Err(protocol(what));
            }
        };
        if len > len_max {
            return Err(protocol(format!("chunk type {chunk_type} of {len} bytes")));
        }
        let mut payload = vec![0; len];
        source.read_exact(&mut payload)?;

        let partial = self.partial.entry(handle).or_insert_with(|| PartialReply {
            error: 0,
            data: vec![0; read.map_or(0, |(_, read_len)| usize_from(read_len))],
            covered: 0,
        });
        match chunk_type {
            REPLY_TYPE_NONE if flags & REPLY_FLAG_DONE == 0 => {
                return Err(protocol("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"));
            }
            REPLY_TYPE_NONE => {}
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                // Offset, then data (at least one byte) or a hole size (12 bytes in all).
                let chunk_len = match chunk_type {
                    REPLY_TYPE_OFFSET_DATA => len.saturating_sub(OFFSET_DATA_HEADER_BYTES),
                    _ if len == 12 => usize_from(be_u32(&payload, 8)),
                    _ => 0,
                };
                let chunk_offset = payload.get(..8).map(|bytes| be_u64(bytes, 0));
                let (read_offset, _) = read.unwrap_or_default();
                // Where the content starts in the buffer, if it lies inside the request.
                let start = chunk_offset
                    .and_then(|at| at.checked_sub(read_offset))
                    .and_then(|at| usize::try_from(at).ok())
                    .filter(|&at| {
                        chunk_len > 0
                            && at
                                .checked_add(chunk_len)
                                .is_some_and(|end| end <= partial.data.len())
                    });
                let Some(start) = start else {
                    let what = format!("content chunk malformed or outside the READ {handle:#x}");
                    return Err(protocol(what));
                };
                let target = &mut partial.data[start..start + chunk_len];
                match chunk_type {
                    REPLY_TYPE_OFFSET_DATA => target.copy_from_slice(&payload[8..]),
                    _ => target.fill(0),
                }
                partial.covered += u64::try_from(chunk_len).unwrap_or(u64::MAX);
            }
            _ => {
                let error = payload.get(..4).map_or(0, |bytes| be_u32(bytes, 0));
                let message_len = payload.get(4..6).map(|bytes| usize::from(be_u16(bytes, 0)));
                if error == 0 || message_len.is_none_or(|message| 6 + message > len) {
                    let what = format!("malformed error chunk for {handle:#x}");
                    return Err(protocol(what));
                }
                if partial.error == 0 {
                    partial.error = error;
                }
            }
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        let Some(done) = self.partial.remove(&handle) else {
            return Err(protocol("structured reply vanished"));
        };
        lock(in_flight).remove(&handle);
        let complete = u64::try_from(done.data.len()).unwrap_or(u64::MAX);
        if done.error == 0 && done.covered != complete {
            let what = format!("READ {handle:#x} succeeded with part of its data");
            return Err(protocol(what));
        }
        let data = if done.error == 0 {
            done.data
        } else {
            Vec::new()
        };
        Ok(Some(Reply {
            handle,
            error: done.error,
            data,
        }))
    }
}

/// The next option reply to `option`: its type and data.
fn read_option_reply(stream: &mut TcpStream, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut head = [0; OPTION_REPLY_HEADER_BYTES];
    stream.read_exact(&mut head)?;
    let (reply_type, len) = (be_u32(&head, 12), usize_from(be_u32(&head, 16)));
    let magic_and_option = (be_u64(&head, 0), be_u32(&head, 8));
    if magic_and_option != (OPTION_REPLY_MAGIC, option) || len > OPTION_REPLY_BYTES_MAX {
        return Err(protocol(format!("bad option reply header {head:02x?}")));
    }
    let mut data = vec![0; len];
    stream.read_exact(&mut data)?;
    Ok((reply_type, data))
}

/// A request header without command flags.
pub(crate) fn encode_request(
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_BYTES] {
    encode_request_flagged(0, kind, handle, offset, len)
}

/// A request header with command flags (`wire::CMD_FLAG_*`).
pub(crate) fn encode_request_flagged(
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_BYTES] {
    let mut head = [0; REQUEST_HEADER_BYTES];
    head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    head[4..6].copy_from_slice(&flags.to_be_bytes());
    head[6..8].copy_from_slice(&kind.to_be_bytes());
    head[8..16].copy_from_slice(&handle.to_be_bytes());
    head[16..24].copy_from_slice(&offset.to_be_bytes());
    head[24..].copy_from_slice(&len.to_be_bytes());
    head
}

/// The error and handle of a simple reply header.
#[cfg(test)]
pub(crate) fn decode_simple_reply(head: &[u8]) -> Result<(u32, u64), ClientError> {
    let magic = be_u32(head, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(protocol(format!("bad simple reply magic {magic:#x}")));
    }
    Ok((be_u32(head, 4), be_u64(head, 8)))
}

/// An option header followed by its data.
pub(crate) fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    [
        &IHAVEOPT.to_be_bytes()[..],
        &option.to_be_bytes(),
        &len.to_be_bytes(),
        data,
    ]
    .concat()
}

/// The data of `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub(crate) fn encode_info_request(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let count = u16::try_from(infos.len()).unwrap_or(u16::MAX);
    let mut data = [&name_len.to_be_bytes()[..], name, &count.to_be_bytes()].concat();
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}
