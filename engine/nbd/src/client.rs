//! A blocking NBD client over `std::net::TcpStream`, for test drivers and demos.

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

/// One simple reply. `data` holds the payload of a successful READ and is empty otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success, else an NBD error value (see [`NbdError::from_code`]).
    pub error: u32,
    pub data: Vec<u8>,
}

/// Handles waiting for a reply, with the payload length each expects (non-zero for READs only):
/// a simple reply does not say how much data follows it.
type InFlight = Arc<Mutex<HashMap<u64, u32>>>;

fn protocol(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

fn lock(in_flight: &InFlight) -> MutexGuard<'_, HashMap<u64, u32>> {
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
}

/// A blocking NBD client connected to one export.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    receiver: ClientReceiver,
    size_bytes: u64,
    transmission_flags: u16,
    next_handle: u64,
}

impl Client {
    /// Connects, performs the fixed newstyle handshake and enters transmission with `NBD_OPT_GO`
    /// (asking for `NBD_INFO_BLOCK_SIZE`, so the caller must respect the server's alignment).
    /// Every later socket operation fails with [`ClientError::Timeout`] after `timeout`.
    pub fn connect(
        addr: SocketAddr,
        export_name: &str,
        timeout: Duration,
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
        let go = encode_info_request(export_name.as_bytes(), &[INFO_BLOCK_SIZE]);
        let mut hello = client_flags.to_be_bytes().to_vec();
        hello.extend(encode_option(OPT_GO, &go));
        stream.write_all(&hello)?;

        let mut export = None;
        for _ in 0..OPTION_REPLIES_MAX {
            let mut head = [0; OPTION_REPLY_HEADER_BYTES];
            stream.read_exact(&mut head)?;
            let (reply_type, len) = (be_u32(&head, 12), usize_from(be_u32(&head, 16)));
            let magic_and_option = (be_u64(&head, 0), be_u32(&head, 8));
            if magic_and_option != (OPTION_REPLY_MAGIC, OPT_GO) || len > OPTION_REPLY_BYTES_MAX {
                return Err(protocol(format!("bad option reply header {head:02x?}")));
            }
            let mut data = vec![0; len];
            stream.read_exact(&mut data)?;
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
                    };
                    return Ok(Self {
                        sender: ClientSender { stream, in_flight },
                        receiver,
                        size_bytes,
                        transmission_flags,
                        next_handle: CONVENIENCE_HANDLE_FIRST,
                    });
                }
                REP_INFO if data.get(..2).map(|kind| be_u16(kind, 0)) == Some(INFO_EXPORT) => {
                    if data.len() != 12 {
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

    /// Sends a WRITE without waiting for its reply.
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.sender.send_write(handle, offset, data)
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
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::InvalidArgument("write longer than 4 GiB"))?;
        self.send(CMD_WRITE, handle, offset, len, data, 0)
    }

    /// Sends a READ of `len` bytes at `offset`.
    pub fn send_read(&mut self, handle: u64, offset: u64, len: u32) -> Result<(), ClientError> {
        self.send(CMD_READ, handle, offset, len, &[], len)
    }

    /// Sends a FLUSH.
    pub fn send_flush(&mut self, handle: u64) -> Result<(), ClientError> {
        self.send(CMD_FLUSH, handle, 0, 0, &[], 0)
    }

    /// Sends `NBD_CMD_DISC` (which gets no reply) and closes the sending direction.
    pub fn send_disconnect(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&encode_request(CMD_DISC, 0, 0, 0))?;
        self.stream.shutdown(Shutdown::Write)?;
        Ok(())
    }

    fn send(
        &mut self,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
        read_len: u32,
    ) -> Result<(), ClientError> {
        // Registered before sending, so the receiver always knows the handle when the reply comes.
        {
            let mut in_flight = lock(&self.in_flight);
            if in_flight.contains_key(&handle) {
                return Err(ClientError::HandleInUse(handle));
            }
            in_flight.insert(handle, read_len);
        }
        self.stream
            .write_all(&encode_request(kind, handle, offset, len))?;
        self.stream.write_all(payload)?;
        Ok(())
    }
}

impl ClientReceiver {
    /// Waits for the next reply.
    pub fn recv_reply(&mut self) -> Result<Reply, ClientError> {
        let mut head = [0; SIMPLE_REPLY_HEADER_BYTES];
        self.stream.read_exact(&mut head)?;
        let (error, handle) = decode_simple_reply(&head)?;
        let read_len = lock(&self.in_flight)
            .remove(&handle)
            .ok_or(ClientError::UnexpectedHandle(handle))?;
        let mut data = Vec::new();
        if error == 0 && read_len > 0 {
            data = vec![0; usize_from(read_len)];
            self.stream.read_exact(&mut data)?;
        }
        Ok(Reply {
            handle,
            error,
            data,
        })
    }
}

/// A request header.
pub(crate) fn encode_request(
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_BYTES] {
    let mut head = [0; REQUEST_HEADER_BYTES];
    head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Bytes 4..6 are the command flags: none are used.
    head[6..8].copy_from_slice(&kind.to_be_bytes());
    head[8..16].copy_from_slice(&handle.to_be_bytes());
    head[16..24].copy_from_slice(&offset.to_be_bytes());
    head[24..].copy_from_slice(&len.to_be_bytes());
    head
}

/// The error and handle of a simple reply header.
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
