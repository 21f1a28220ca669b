//! Session tests in memory and over loopback TCP, hostile inputs, and randomized input tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::client::{
    decode_simple_reply, encode_info_request, encode_option, encode_request,
    encode_request_flagged, Expected, InFlight, ReplyReader,
};
use crate::wire::*;
use crate::*;

const TIMEOUT: Duration = Duration::from_secs(10);
const SIZE_BYTES: u64 = 64 * 4096;
/// What every session of `config()` advertises.
const BASE_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

fn config() -> ServerConfig {
    ServerConfig {
        export_name: "vol".into(),
        size_bytes: SIZE_BYTES,
        read_only: false,
        block_bytes: 4096,
        payload_bytes_max: 16 * 4096,
        multi_conn: false,
    }
}

fn read_only() -> ServerConfig {
    ServerConfig {
        read_only: true,
        ..config()
    }
}

/// An `NBD_OPT_INFO` or `NBD_OPT_GO` option.
fn info_option(option: u32, name: &[u8], infos: &[u16]) -> Vec<u8> {
    encode_option(option, &encode_info_request(name, infos))
}

fn read_event(handle: u64) -> Event {
    let (offset, len) = (0, 4096);
    Event::Read {
        handle,
        offset,
        len,
    }
}

/// A structured reply chunk as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    flags: u16,
    chunk_type: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl Chunk {
    /// Error value and message of an error chunk.
    fn error(&self) -> (u32, String) {
        assert!(
            self.payload.len() >= ERROR_CHUNK_HEADER_BYTES,
            "short error chunk"
        );
        let message_len = usize::from(be_u16(&self.payload, 4));
        assert_eq!(self.payload.len(), ERROR_CHUNK_HEADER_BYTES + message_len);
        let message = String::from_utf8(self.payload[6..].to_vec()).expect("UTF-8 message");
        (be_u32(&self.payload, 0), message)
    }
}

/// A session driven in memory, with its output collected for parsing as a client would.
struct Wire {
    server: ServerSession,
    out: Vec<u8>,
}

impl Wire {
    fn new(config: ServerConfig) -> Self {
        let server = ServerSession::new(config).expect("valid config");
        let mut wire = Self {
            server,
            out: Vec::new(),
        };
        wire.drain();
        wire
    }

    /// A session in transmission after `NBD_OPT_GO`, with simple replies.
    fn transmitting(config: ServerConfig) -> Self {
        let mut wire = Self::new(config);
        wire.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        wire.go(b"vol", &[]);
        assert!(wire.server.is_transmitting() && wire.out.is_empty());
        assert!(!wire.server.structured_replies());
        wire
    }

    /// A session in transmission after `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_GO`.
    fn transmitting_structured(config: ServerConfig) -> Self {
        let mut wire = Self::new(config);
        wire.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        wire.feed(&encode_option(OPT_STRUCTURED_REPLY, b""));
        let ack = (OPT_STRUCTURED_REPLY, REP_ACK, Vec::new());
        assert_eq!(wire.option_reply(), ack);
        wire.go(b"vol", &[INFO_BLOCK_SIZE]);
        assert!(wire.server.is_transmitting() && wire.out.is_empty());
        assert!(wire.server.structured_replies());
        wire
    }

    fn feed(&mut self, bytes: &[u8]) {
        assert_eq!(self.server.handle_input(bytes), bytes.len());
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(output) = self.server.poll_output() {
            let n = output.len();
            self.out.extend_from_slice(output);
            self.server.consume_output(n);
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        assert!(self.out.len() >= n, "output is short");
        self.out.drain(..n).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }

    /// Checks the greeting and answers it with `client_flags`.
    fn hello(&mut self, client_flags: u32) {
        let greeting = self.take(GREETING_BYTES);
        assert_eq!(be_u64(&greeting, 0), NBD_MAGIC);
        assert_eq!(be_u64(&greeting, 8), IHAVEOPT);
        assert_eq!(be_u16(&greeting, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.feed(&client_flags.to_be_bytes());
    }

    /// Option, reply type and data of the next option reply.
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let head = self.take(OPTION_REPLY_HEADER_BYTES);
        assert_eq!(be_u64(&head, 0), OPTION_REPLY_MAGIC);
        let data = self.take(usize_from(be_u32(&head, 16)));
        (be_u32(&head, 8), be_u32(&head, 12), data)
    }

    /// Sends `NBD_OPT_INFO` or `NBD_OPT_GO` and collects the information replies up to the ACK,
    /// keyed by information type (each type at most once).
    fn info(&mut self, option: u32, name: &[u8], infos: &[u16]) -> HashMap<u16, Vec<u8>> {
        self.feed(&info_option(option, name, infos));
        let mut replies = HashMap::new();
        loop {
            match self.option_reply() {
                (reply_option, REP_INFO, data) => {
                    assert_eq!(reply_option, option);
                    let info = be_u16(&data, 0);
                    assert!(replies.insert(info, data).is_none(), "info {info} repeated");
                }
                reply => {
                    assert_eq!(reply, (option, REP_ACK, Vec::new()));
                    return replies;
                }
            }
        }
    }

    /// Sends `NBD_OPT_GO` and checks that it succeeds with the export's size and the session's
    /// flags; returns the information replies.
    fn go(&mut self, name: &[u8], infos: &[u16]) -> HashMap<u16, Vec<u8>> {
        let replies = self.info(OPT_GO, name, infos);
        let export = &replies[&INFO_EXPORT];
        assert_eq!(export.len(), 12);
        assert_eq!(be_u64(export, 2), SIZE_BYTES);
        assert_eq!(be_u16(export, 10), self.server.transmission_flags());
        assert!(self.server.is_transmitting());
        replies
    }

    /// Error, handle and data of the next simple reply; data follows only a successful READ.
    fn simple_reply(&mut self, read_len: usize) -> (u32, u64, Vec<u8>) {
        let head = self.take(SIMPLE_REPLY_HEADER_BYTES);
        let (error, handle) = decode_simple_reply(&head).expect("simple reply magic");
        let data = self.take(if error == 0 { read_len } else { 0 });
        (error, handle, data)
    }

    /// The next structured reply chunk.
    fn chunk(&mut self) -> Chunk {
        let head = self.take(STRUCTURED_REPLY_HEADER_BYTES);
        assert_eq!(
            be_u32(&head, 0),
            STRUCTURED_REPLY_MAGIC,
            "structured reply magic"
        );
        let payload = self.take(usize_from(be_u32(&head, 16)));
        Chunk {
            flags: be_u16(&head, 4),
            chunk_type: be_u16(&head, 6),
            handle: be_u64(&head, 8),
            payload,
        }
    }

    /// The next reply is an error for `handle`, in the negotiated style: a simple reply, or a
    /// single `NBD_REPLY_TYPE_ERROR` chunk flagged DONE with a message. Returns the message.
    fn error_reply(&mut self, handle: u64, error: NbdError) -> String {
        if !self.server.structured_replies() {
            assert_eq!(self.simple_reply(0), (error.code(), handle, Vec::new()));
            return String::new();
        }
        let chunk = self.chunk();
        assert_eq!(
            (chunk.flags, chunk.chunk_type, chunk.handle),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle)
        );
        let (code, message) = chunk.error();
        assert_eq!(code, error.code());
        assert!(!message.is_empty(), "a structured error explains itself");
        message
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        self.flagged_request(0, kind, handle, offset, len, payload);
    }

    fn flagged_request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        self.feed(&encode_request_flagged(flags, kind, handle, offset, len));
        self.feed(payload);
    }

    /// The session answered `handle` with `error` by itself and told the runtime nothing.
    fn expect_refusal(&mut self, handle: u64, error: NbdError) {
        self.error_reply(handle, error);
        assert_eq!(self.events(), []);
        assert!(self.out.is_empty() && !self.server.is_closed());
        assert_eq!(self.server.pending_requests(), 0);
    }

    /// A valid READ still parses, proving that framing survived what came before.
    fn expect_framing_intact(&mut self, handle: u64) {
        self.request(CMD_READ, handle, 0, 4096, &[]);
        assert_eq!(self.events(), [read_event(handle)]);
        self.server.reply_read(handle, &[3; 4096]).expect("pending");
        self.drain();
        if self.server.structured_replies() {
            let chunk = self.chunk();
            assert_eq!(chunk.handle, handle);
            assert_eq!(chunk.payload[8..], [3; 4096]);
        } else {
            assert_eq!(self.simple_reply(4096), (0, handle, vec![3; 4096]));
        }
        assert!(self.out.is_empty());
    }

    fn expect_error(&mut self, error: ProtocolError) {
        assert_eq!(self.events(), [Event::Error(error)]);
        assert!(self.server.is_closed() && !self.server.wants_input());
        assert_eq!(self.server.handle_input(&[0; 64]), 0);
    }
}

#[test]
fn in_memory_session_serves_go_write_read_flush_and_disconnect() {
    // Checks a whole session in memory: GO with block sizes, WRITE, READ, FLUSH answered out of order, DISC.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    wire.feed(&info_option(OPT_GO, b"vol", &[INFO_BLOCK_SIZE]));
    let (option, reply_type, export) = wire.option_reply();
    assert_eq!((option, reply_type, export.len()), (OPT_GO, REP_INFO, 12));
    assert_eq!(be_u16(&export, 0), INFO_EXPORT);
    assert_eq!(be_u64(&export, 2), SIZE_BYTES);
    assert_eq!(be_u16(&export, 10), BASE_FLAGS);
    let (_, reply_type, sizes) = wire.option_reply();
    assert_eq!((reply_type, sizes.len()), (REP_INFO, 14));
    assert_eq!(be_u16(&sizes, 0), INFO_BLOCK_SIZE);
    assert_eq!(
        [2, 6, 10].map(|at| be_u32(&sizes, at)),
        [4096, 4096, 16 * 4096]
    );
    assert_eq!(wire.option_reply(), (OPT_GO, REP_ACK, Vec::new()));
    assert!(wire.server.is_transmitting() && wire.out.is_empty());

    let data = vec![0xab; 8192];
    wire.request(CMD_WRITE, 1, 4096, 8192, &data);
    wire.request(CMD_READ, 2, 0, 4096, &[]);
    wire.request(CMD_FLUSH, 3, 0, 0, &[]);
    let (handle, offset, fua) = (1, 4096, false);
    let write = Event::Write {
        handle,
        offset,
        data,
        fua,
    };
    assert_eq!(
        wire.events(),
        [write, read_event(2), Event::Flush { handle: 3 }]
    );
    assert_eq!(wire.server.pending_requests(), 3);
    wire.server.reply_ok(3).expect("flush pending");
    wire.server.reply_read(2, &[7; 4096]).expect("read pending");
    wire.server.reply_ok(1).expect("write pending");
    wire.drain();
    assert_eq!(wire.simple_reply(0), (0, 3, Vec::new()));
    assert_eq!(wire.simple_reply(4096), (0, 2, vec![7; 4096]));
    assert_eq!(wire.simple_reply(0), (0, 1, Vec::new()));
    assert_eq!(wire.server.pending_requests(), 0);

    wire.request(CMD_DISC, 4, 0, 0, &[]);
    assert_eq!(wire.events(), [Event::Disconnect]);
    assert!(wire.server.is_closed() && wire.out.is_empty());
}

#[test]
fn export_name_reply_has_zeroes_unless_no_zeroes() {
    // Checks NBD_OPT_EXPORT_NAME: size, read-only flags, 124 zeroes only without NO_ZEROES, unknown name closes.
    let plain = FLAG_C_FIXED_NEWSTYLE;
    for (flags, zeroes) in [
        (plain, EXPORT_NAME_ZEROES_BYTES),
        (plain | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut wire = Wire::new(read_only());
        wire.hello(flags);
        wire.feed(&encode_option(OPT_EXPORT_NAME, b""));
        let reply = wire.take(10 + zeroes);
        assert_eq!(be_u64(&reply, 0), SIZE_BYTES);
        assert_eq!(be_u16(&reply, 8), BASE_FLAGS | FLAG_READ_ONLY);
        assert!(reply[10..].iter().all(|&byte| byte == 0) && wire.out.is_empty());
        assert!(wire.server.is_transmitting());
    }
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    wire.feed(&encode_option(OPT_EXPORT_NAME, b"other"));
    wire.expect_error(ProtocolError::UnknownExport);
    assert!(wire.out.is_empty());
}

#[test]
fn info_list_and_unknown_options_keep_negotiating() {
    // Checks NBD_OPT_INFO, unknown export, malformed GO, NBD_OPT_LIST, unsupported options, then a GO that works.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    let infos = wire.info(OPT_INFO, b"vol", &[]);
    assert_eq!(be_u16(&infos[&INFO_EXPORT], 10), BASE_FLAGS);
    wire.feed(&info_option(OPT_GO, b"other", &[INFO_BLOCK_SIZE]));
    assert_eq!(wire.option_reply(), (OPT_GO, REP_ERR_UNKNOWN, Vec::new()));
    let mut malformed = info_option(OPT_GO, b"vol", &[INFO_BLOCK_SIZE]);
    malformed[OPTION_HEADER_BYTES + 3] = 200; // The name length now runs past the data.
    wire.feed(&malformed);
    assert_eq!(wire.option_reply(), (OPT_GO, REP_ERR_INVALID, Vec::new()));
    wire.feed(&encode_option(OPT_LIST, b""));
    let server = b"\0\0\0\x03vol".to_vec();
    assert_eq!(wire.option_reply(), (OPT_LIST, REP_SERVER, server));
    assert_eq!(wire.option_reply(), (OPT_LIST, REP_ACK, Vec::new()));
    wire.feed(&encode_option(OPT_LIST, b"x"));
    assert_eq!(wire.option_reply(), (OPT_LIST, REP_ERR_INVALID, Vec::new()));
    let starttls = 5;
    wire.feed(&encode_option(starttls, b""));
    assert_eq!(wire.option_reply(), (starttls, REP_ERR_UNSUP, Vec::new()));
    assert!(!wire.server.is_transmitting() && wire.events().is_empty());
    wire.go(b"vol", &[]);
}

#[test]
fn go_sends_block_sizes_unasked_and_the_name_when_asked() {
    // Checks that GO always describes the block constraints, in whole blocks, and names the export on request.
    let mut wire = Wire::new(ServerConfig {
        payload_bytes_max: 16 * 4096 + 1000,
        ..config()
    });
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    let infos = wire.info(OPT_INFO, b"", &[]);
    let sizes = &infos[&INFO_BLOCK_SIZE];
    assert_eq!(sizes.len(), 14);
    assert_eq!(
        [2, 6, 10].map(|at| be_u32(sizes, at)),
        [4096, 4096, 16 * 4096],
        "the maximum payload is advertised in whole blocks"
    );
    assert!(!infos.contains_key(&INFO_NAME));

    let infos = wire.go(b"", &[INFO_NAME, INFO_DESCRIPTION, 99]);
    assert_eq!(
        infos[&INFO_NAME],
        [&INFO_NAME.to_be_bytes()[..], b"vol"].concat()
    );
    assert!(infos.contains_key(&INFO_BLOCK_SIZE));
    assert_eq!(
        infos.len(),
        3,
        "no description and nothing for unknown requests"
    );
    assert_eq!(wire.server.transmission_flags(), BASE_FLAGS);
}

#[test]
fn can_multi_conn_is_advertised_only_when_configured() {
    // Checks NBD_FLAG_CAN_MULTI_CONN in GO and EXPORT_NAME replies, present exactly when multi_conn is set.
    for multi_conn in [false, true] {
        let expected = if multi_conn {
            BASE_FLAGS | FLAG_CAN_MULTI_CONN
        } else {
            BASE_FLAGS
        };
        let config = ServerConfig {
            multi_conn,
            ..config()
        };
        let mut wire = Wire::new(config.clone());
        wire.hello(FLAG_C_FIXED_NEWSTYLE);
        let infos = wire.go(b"vol", &[]);
        assert_eq!(be_u16(&infos[&INFO_EXPORT], 10), expected);

        let mut wire = Wire::new(config);
        wire.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        wire.feed(&encode_option(OPT_EXPORT_NAME, b"vol"));
        assert_eq!(be_u16(&wire.take(10), 8), expected);
    }
}

#[test]
fn structured_reply_option_is_acked_and_refused_with_data() {
    // Checks that NBD_OPT_STRUCTURED_REPLY with data gets ERR_INVALID and changes nothing, and without data gets ACK and SEND_DF.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    wire.feed(&encode_option(OPT_STRUCTURED_REPLY, b"x"));
    let invalid = (OPT_STRUCTURED_REPLY, REP_ERR_INVALID, Vec::new());
    assert_eq!(wire.option_reply(), invalid);
    assert!(!wire.server.structured_replies());
    assert_eq!(wire.server.transmission_flags(), BASE_FLAGS);

    for _ in 0..2 {
        wire.feed(&encode_option(OPT_STRUCTURED_REPLY, b""));
        let ack = (OPT_STRUCTURED_REPLY, REP_ACK, Vec::new());
        assert_eq!(wire.option_reply(), ack);
    }
    assert!(wire.server.structured_replies());
    let infos = wire.go(b"vol", &[]);
    assert_eq!(be_u16(&infos[&INFO_EXPORT], 10), BASE_FLAGS | FLAG_SEND_DF);
}

#[test]
fn meta_context_options_are_unsupported_and_negotiation_goes_on() {
    // Checks that SET_META_CONTEXT and LIST_META_CONTEXT for base:allocation get ERR_UNSUP, before and after structured replies, and GO still works.
    let query = b"base:allocation";
    let mut data = [&3u32.to_be_bytes()[..], b"vol", &1u32.to_be_bytes()].concat();
    data.extend(u32::try_from(query.len()).expect("short").to_be_bytes());
    data.extend(query);
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    for structured in [false, true] {
        if structured {
            wire.feed(&encode_option(OPT_STRUCTURED_REPLY, b""));
            assert_eq!(wire.option_reply().1, REP_ACK);
        }
        for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
            wire.feed(&encode_option(option, &data));
            assert_eq!(wire.option_reply(), (option, REP_ERR_UNSUP, Vec::new()));
        }
    }
    wire.go(b"vol", &[INFO_BLOCK_SIZE]);
    assert!(wire.server.structured_replies());
}

#[test]
fn abort_is_acknowledged_then_closes() {
    // Checks that NBD_OPT_ABORT gets NBD_REP_ACK, a Disconnect event, and no further parsing.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    wire.feed(&encode_option(OPT_ABORT, b""));
    assert_eq!(wire.option_reply(), (OPT_ABORT, REP_ACK, Vec::new()));
    assert_eq!(wire.events(), [Event::Disconnect]);
    assert!(wire.server.is_closed() && wire.out.is_empty());
}

#[test]
fn client_flags_must_be_fixed_newstyle_and_known() {
    // Checks that missing FIXED_NEWSTYLE or unknown client flag bits close the session silently.
    let unknown = ProtocolError::UnknownClientFlags(5);
    for (flags, error) in [(0, ProtocolError::NotFixedNewstyle), (5, unknown)] {
        let mut wire = Wire::new(config());
        wire.hello(flags);
        wire.expect_error(error);
        assert!(wire.out.is_empty());
    }
}

#[test]
fn wrong_magic_closes_in_options_and_requests() {
    // Checks that a bad option magic and a bad request magic each end the session.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut option = encode_option(OPT_LIST, b"");
    option[0] ^= 1;
    wire.feed(&option);
    wire.expect_error(ProtocolError::BadOptionMagic(IHAVEOPT ^ (1 << 56)));

    let mut wire = Wire::transmitting(config());
    let mut request = encode_request(CMD_READ, 1, 0, 4096);
    request[3] ^= 0xff;
    wire.feed(&request);
    wire.expect_error(ProtocolError::BadRequestMagic(REQUEST_MAGIC ^ 0xff));
    assert!(wire.out.is_empty());
}

#[test]
fn oversized_option_data_is_skipped_or_closes() {
    // Checks TOO_BIG for skippable option data, and closing for oversized EXPORT_NAME or huge data.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    wire.feed(&encode_option(OPT_INFO, &vec![0; 10_000]));
    assert_eq!(wire.option_reply(), (OPT_INFO, REP_ERR_TOO_BIG, Vec::new()));
    wire.go(b"vol", &[]);

    for (option, len) in [(OPT_EXPORT_NAME, 5000), (9, u32::MAX)] {
        let mut wire = Wire::new(config());
        wire.hello(FLAG_C_FIXED_NEWSTYLE);
        let mut header = encode_option(option, b"");
        header[12..16].copy_from_slice(&len.to_be_bytes());
        wire.feed(&header);
        wire.expect_error(ProtocolError::OptionTooLong { option, len });
    }
}

#[test]
fn too_many_options_close() {
    // Checks that 32 options are answered and the 33rd closes the session.
    let mut wire = Wire::new(config());
    wire.hello(FLAG_C_FIXED_NEWSTYLE);
    for _ in 0..32 {
        wire.feed(&encode_option(100, b"data"));
        assert_eq!(wire.option_reply(), (100, REP_ERR_UNSUP, Vec::new()));
    }
    wire.feed(&encode_option(100, b""));
    wire.expect_error(ProtocolError::TooManyOptions);
    assert!(wire.out.is_empty());
}

/// Requests the session must refuse by itself, whatever the reply style: kind, offset, length
/// and the error. WRITEs carry their payload.
fn invalid_requests() -> Vec<(u16, u64, u32, NbdError)> {
    let (end, far) = (SIZE_BYTES, u64::MAX - 4095);
    vec![
        (CMD_READ, end - 4096, 8192, NbdError::Invalid),
        (CMD_WRITE, end, 4096, NbdError::NoSpace),
        (CMD_READ, far, 4096, NbdError::Invalid),
        (CMD_WRITE, far, 8192, NbdError::NoSpace),
        (CMD_READ, 0, 0, NbdError::Invalid),
        (CMD_WRITE, 512, 4096, NbdError::Invalid),
        (CMD_READ, 0, 512, NbdError::Invalid),
        (CMD_WRITE, 0, 32 * 4096, NbdError::Invalid),
        (CMD_FLUSH, 4096, 0, NbdError::Invalid),
        (CMD_TRIM, 512, 4096, NbdError::Invalid),
        (CMD_TRIM, 0, 4096 + 512, NbdError::Invalid),
        (CMD_TRIM, 0, 0, NbdError::Invalid),
        (CMD_TRIM, end - 4096, 8192, NbdError::Invalid),
        (CMD_TRIM, far, 8192, NbdError::Invalid),
        (CMD_WRITE_ZEROES, 1024, 4096, NbdError::Invalid),
        (CMD_WRITE_ZEROES, 0, 100, NbdError::Invalid),
        (CMD_WRITE_ZEROES, 0, 0, NbdError::Invalid),
        (CMD_WRITE_ZEROES, end, 4096, NbdError::NoSpace),
        (CMD_WRITE_ZEROES, far, 8192, NbdError::NoSpace),
        (CMD_BLOCK_STATUS, 0, 4096, NbdError::Invalid),
        (5, 0, 4096, NbdError::Invalid),
        (u16::MAX, 0, 4096, NbdError::Invalid),
    ]
}

#[test]
fn invalid_requests_are_refused_without_events_in_both_styles() {
    // Checks range, zero length, alignment, size limit and unknown command refusals for every command, framing kept, simple or structured.
    for mut wire in [
        Wire::transmitting(config()),
        Wire::transmitting_structured(config()),
    ] {
        for (handle, (kind, offset, len, error)) in (10..).zip(invalid_requests()) {
            let payload_bytes = if kind == CMD_WRITE {
                usize_from(len)
            } else {
                0
            };
            wire.request(kind, handle, offset, len, &vec![0x55; payload_bytes]);
            wire.expect_refusal(handle, error);
            wire.expect_framing_intact(handle + 100);
        }
    }
}

#[test]
fn bad_command_flags_are_refused_with_einval() {
    // Checks that unknown flags and flags documented for other commands get EINVAL, with a WRITE's payload skipped.
    let unknown_bit = 1 << 7;
    let cases = [
        (CMD_READ, CMD_FLAG_DF, false),
        (CMD_READ, CMD_FLAG_NO_HOLE, true),
        (CMD_READ, unknown_bit, true),
        (CMD_WRITE, CMD_FLAG_NO_HOLE, true),
        (CMD_WRITE, CMD_FLAG_DF, true),
        (CMD_WRITE, CMD_FLAG_FUA | unknown_bit, true),
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, true),
        (
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            false,
        ),
        (CMD_WRITE_ZEROES, CMD_FLAG_DF, true),
        (CMD_TRIM, CMD_FLAG_NO_HOLE, false),
        (CMD_TRIM, CMD_FLAG_REQ_ONE, true),
        (CMD_FLUSH, CMD_FLAG_NO_HOLE, false),
        (CMD_FLUSH, u16::MAX, true),
    ];
    for (handle, (kind, flags, structured)) in (1..).zip(cases) {
        let mut wire = if structured {
            Wire::transmitting_structured(config())
        } else {
            Wire::transmitting(config())
        };
        let (offset, len) = if kind == CMD_FLUSH { (0, 0) } else { (0, 4096) };
        let payload = if kind == CMD_WRITE {
            vec![9; 4096]
        } else {
            Vec::new()
        };
        wire.flagged_request(flags, kind, handle, offset, len, &payload);
        wire.expect_refusal(handle, NbdError::Invalid);
        wire.expect_framing_intact(handle + 100);
    }
}

#[test]
fn fua_passes_through_and_no_hole_and_df_are_accepted() {
    // Checks that FUA reaches the runtime on WRITE, WRITE_ZEROES and TRIM, is accepted on READ and FLUSH, and that NO_HOLE and DF (structured) are accepted.
    let mut wire = Wire::transmitting_structured(config());
    let fua = CMD_FLAG_FUA;
    wire.flagged_request(fua, CMD_WRITE, 1, 4096, 4096, &[5; 4096]);
    wire.flagged_request(0, CMD_WRITE, 2, 8192, 4096, &[6; 4096]);
    wire.flagged_request(fua | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 8192, &[]);
    wire.flagged_request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, 4096, &[]);
    wire.flagged_request(fua, CMD_TRIM, 5, 4096, 4096, &[]);
    wire.flagged_request(0, CMD_TRIM, 6, 0, 4096, &[]);
    wire.flagged_request(fua, CMD_FLUSH, 7, 0, 0, &[]);
    wire.flagged_request(fua | CMD_FLAG_DF, CMD_READ, 8, 0, 4096, &[]);
    let events = [
        Event::Write {
            handle: 1,
            offset: 4096,
            data: vec![5; 4096],
            fua: true,
        },
        Event::Write {
            handle: 2,
            offset: 8192,
            data: vec![6; 4096],
            fua: false,
        },
        Event::WriteZeroes {
            handle: 3,
            offset: 0,
            len: 8192,
            fua: true,
        },
        Event::WriteZeroes {
            handle: 4,
            offset: 0,
            len: 4096,
            fua: false,
        },
        Event::Trim {
            handle: 5,
            offset: 4096,
            len: 4096,
            fua: true,
        },
        Event::Trim {
            handle: 6,
            offset: 0,
            len: 4096,
            fua: false,
        },
        Event::Flush { handle: 7 },
        read_event(8),
    ];
    assert_eq!(wire.events(), events);
    assert!(wire.out.is_empty());
    for handle in 1..=7 {
        wire.server.reply_ok(handle).expect("pending");
    }
    wire.drain();
    for handle in 1..=7 {
        assert_eq!(wire.simple_reply(0), (0, handle, Vec::new()));
    }
    assert_eq!(wire.server.pending_requests(), 1);
}

#[test]
fn trim_and_write_zeroes_may_exceed_the_maximum_payload() {
    // Checks that TRIM and WRITE_ZEROES without payload cover the whole export in one request, unlike READ.
    let mut wire = Wire::transmitting(config());
    let whole = u32::try_from(SIZE_BYTES).expect("small export");
    wire.request(CMD_TRIM, 1, 0, whole, &[]);
    wire.request(CMD_WRITE_ZEROES, 2, 0, whole, &[]);
    let (offset, len, fua) = (0, whole, false);
    let trim = Event::Trim {
        handle: 1,
        offset,
        len,
        fua,
    };
    let zeroes = Event::WriteZeroes {
        handle: 2,
        offset,
        len,
        fua,
    };
    assert_eq!(wire.events(), [trim, zeroes]);
    wire.server.reply_ok(1).expect("pending");
    wire.server.reply_ok(2).expect("pending");
    wire.drain();
    assert_eq!(wire.simple_reply(0), (0, 1, Vec::new()));
    assert_eq!(wire.simple_reply(0), (0, 2, Vec::new()));
    wire.request(CMD_READ, 3, 0, whole, &[]);
    wire.expect_refusal(3, NbdError::Invalid);
}

#[test]
fn read_only_export_refuses_writes_zeroes_and_trims() {
    // Checks EPERM for WRITE (payload skipped), WRITE_ZEROES and TRIM on a read-only export, while READ and FLUSH work.
    for mut wire in [
        Wire::transmitting(read_only()),
        Wire::transmitting_structured(read_only()),
    ] {
        wire.request(CMD_WRITE, 1, 0, 4096, &[1; 4096]);
        wire.expect_refusal(1, NbdError::Perm);
        wire.flagged_request(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 2, 0, 4096, &[]);
        wire.expect_refusal(2, NbdError::Perm);
        wire.request(CMD_TRIM, 3, 0, 4096, &[]);
        wire.expect_refusal(3, NbdError::Perm);
        wire.expect_framing_intact(4);
        wire.request(CMD_FLUSH, 5, 0, 0, &[]);
        assert_eq!(wire.events(), [Event::Flush { handle: 5 }]);
    }
}

#[test]
fn structured_read_is_one_offset_data_chunk_flagged_done() {
    // Checks the exact bytes of a structured READ reply: magic, DONE, OFFSET_DATA, handle, length, offset, data.
    let mut wire = Wire::transmitting_structured(config());
    wire.request(CMD_READ, 0xfeed, 8192, 8192, &[]);
    let (handle, offset, len) = (0xfeed, 8192, 8192);
    let read = Event::Read {
        handle,
        offset,
        len,
    };
    assert_eq!(wire.events(), [read]);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253).to_le_bytes()[0]).collect();
    wire.server.reply_read(0xfeed, &data).expect("pending");
    wire.drain();
    let head = wire.take(STRUCTURED_REPLY_HEADER_BYTES);
    assert_eq!(head[..4], [0x66, 0x8e, 0x33, 0xef]);
    assert_eq!(be_u16(&head, 4), REPLY_FLAG_DONE);
    assert_eq!(be_u16(&head, 6), REPLY_TYPE_OFFSET_DATA);
    assert_eq!(be_u64(&head, 8), 0xfeed);
    assert_eq!(be_u32(&head, 16), 8 + 8192);
    assert_eq!(be_u64(&wire.take(8), 0), 8192);
    assert_eq!(wire.take(8192), data);
    assert!(wire.out.is_empty());
}

#[test]
fn structured_errors_carry_messages_and_successes_stay_simple() {
    // Checks structured errors for an out-of-range READ and a runtime failure, and simple replies for non-READ successes.
    let mut wire = Wire::transmitting_structured(config());
    wire.request(CMD_READ, 1, SIZE_BYTES, 4096, &[]);
    let message = wire.error_reply(1, NbdError::Invalid);
    assert!(message.contains("end of the export"), "{message}");
    assert!(wire.out.is_empty() && wire.events().is_empty());

    wire.request(CMD_READ, 2, 0, 4096, &[]);
    wire.request(CMD_WRITE, 3, 0, 4096, &[1; 4096]);
    wire.request(CMD_TRIM, 4, 0, 4096, &[]);
    assert_eq!(wire.events().len(), 3);
    wire.server.reply_error(2, NbdError::Io).expect("pending");
    wire.server
        .reply_error(3, NbdError::NoSpace)
        .expect("pending");
    wire.server.reply_ok(4).expect("pending");
    wire.drain();
    assert_eq!(wire.error_reply(2, NbdError::Io), NbdError::Io.message());
    assert_eq!(
        wire.error_reply(3, NbdError::NoSpace),
        "no space left on device"
    );
    assert_eq!(wire.simple_reply(0), (0, 4, Vec::new()));
    assert!(wire.out.is_empty());
}

#[test]
fn replies_are_simple_without_negotiation() {
    // Checks that without STRUCTURED_REPLY a READ, its error and a refusal all come as simple replies, and DF is not advertised.
    let mut wire = Wire::transmitting(config());
    assert_eq!(wire.server.transmission_flags() & FLAG_SEND_DF, 0);
    wire.request(CMD_READ, 1, 0, 4096, &[]);
    wire.request(CMD_READ, 2, 4096, 4096, &[]);
    wire.request(CMD_READ, 3, SIZE_BYTES, 4096, &[]);
    assert_eq!(wire.events().len(), 2);
    wire.server.reply_read(1, &[8; 4096]).expect("pending");
    wire.server.reply_error(2, NbdError::Io).expect("pending");
    wire.drain();
    assert_eq!(
        wire.simple_reply(0),
        (NbdError::Invalid.code(), 3, Vec::new())
    );
    assert_eq!(wire.simple_reply(4096), (0, 1, vec![8; 4096]));
    assert_eq!(
        wire.simple_reply(4096),
        (NbdError::Io.code(), 2, Vec::new())
    );
    assert!(wire.out.is_empty());
}

#[test]
fn write_longer_than_skip_cap_closes() {
    // Checks that a rejected WRITE whose payload is too long to skip closes without a reply.
    let mut wire = Wire::transmitting(config());
    let len = (1 << 25) + 4096;
    wire.feed(&encode_request(CMD_WRITE, 1, 0, len));
    wire.expect_error(ProtocolError::WritePayloadTooLong(len));
    assert!(wire.out.is_empty());
}

#[test]
fn requests_after_disconnect_are_not_parsed() {
    // Checks that input stops right after NBD_CMD_DISC, so a WRITE sent after it is neither consumed nor executed.
    let mut wire = Wire::transmitting(config());
    wire.request(CMD_READ, 1, 0, 4096, &[]);
    let mut stream = encode_request(CMD_DISC, 2, 0, 0).to_vec();
    stream.extend(encode_request(CMD_WRITE, 3, 0, 4096));
    stream.extend([7; 4096]);
    assert_eq!(wire.server.handle_input(&stream), REQUEST_HEADER_BYTES);
    assert_eq!(wire.events(), [read_event(1), Event::Disconnect]);
    assert!(wire.server.is_closed() && !wire.server.wants_input());
    // The request before DISC can still be answered.
    wire.server.reply_read(1, &[0; 4096]).expect("pending");
    wire.drain();
    assert_eq!(wire.simple_reply(4096).1, 1);
    assert_eq!(wire.server.pending_requests(), 0);
}

#[test]
fn a_client_that_vanishes_mid_write_leaves_nothing_pending() {
    // Checks that a WRITE whose payload never completes produces no event and no pending request.
    let mut wire = Wire::transmitting(config());
    wire.request(CMD_WRITE, 1, 0, 8192, &[4; 5000]);
    assert_eq!(wire.events(), []);
    assert_eq!(wire.server.pending_requests(), 0);
    assert!(wire.out.is_empty() && wire.server.wants_input());
}

#[test]
fn duplicate_in_flight_handle_closes() {
    // Checks that reusing the handle of an unanswered request closes, since replies would be ambiguous.
    let mut wire = Wire::transmitting(config());
    wire.request(CMD_READ, 5, 0, 4096, &[]);
    wire.request(CMD_FLUSH, 5, 0, 0, &[]);
    assert_eq!(wire.server.poll_event(), Some(read_event(5)));
    wire.expect_error(ProtocolError::DuplicateHandle(5));
}

#[test]
fn misuse_of_replies_is_refused() {
    // Checks that replies with unknown handles, wrong kinds or wrong lengths send nothing.
    let mut wire = Wire::transmitting_structured(config());
    wire.request(CMD_READ, 1, 0, 4096, &[]);
    wire.request(CMD_WRITE, 2, 0, 4096, &[0; 4096]);
    wire.request(CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(wire.events().len(), 3);
    let session = &mut wire.server;
    assert_eq!(session.reply_ok(9), Err(ReplyError::UnknownHandle(9)));
    assert_eq!(
        session.reply_error(9, NbdError::Io),
        Err(ReplyError::UnknownHandle(9))
    );
    assert_eq!(session.reply_ok(1), Err(ReplyError::WrongKind(1)));
    assert_eq!(session.reply_read(2, &[]), Err(ReplyError::WrongKind(2)));
    assert_eq!(
        session.reply_read(3, &[0; 4096]),
        Err(ReplyError::WrongKind(3))
    );
    let (handle, expected, actual) = (1, 4096, 10);
    let mismatch = ReplyError::ReadLengthMismatch {
        handle,
        expected,
        actual,
    };
    assert_eq!(session.reply_read(1, &[0; 10]), Err(mismatch));
    assert_eq!(session.output_pending_bytes(), 0);
    assert_eq!(session.pending_requests(), 3);
}

#[test]
fn byte_by_byte_input_frames_like_bulk_input() {
    // Checks that a whole client stream fed one byte at a time gives the same events and output as at once.
    let mut stream = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    stream.extend(encode_option(OPT_LIST, b""));
    stream.extend(encode_option(OPT_STRUCTURED_REPLY, b""));
    stream.extend(info_option(OPT_GO, b"vol", &[INFO_BLOCK_SIZE]));
    stream.extend(encode_request_flagged(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 4096));
    stream.extend((0..4096u32).map(|i| i.to_le_bytes()[0]));
    stream.extend(encode_request(CMD_WRITE, 2, SIZE_BYTES, 4096));
    stream.extend([9; 4096]);
    stream.extend(encode_request(CMD_TRIM, 5, 0, 4096));
    stream.extend(encode_request(CMD_READ, 3, 4096, 4096));
    stream.extend(encode_request(CMD_DISC, 4, 0, 0));

    let mut bulk = Wire::new(config());
    bulk.feed(&stream);
    let mut trickle = Wire::new(config());
    for byte in &stream {
        trickle.feed(std::slice::from_ref(byte));
    }
    let events = bulk.events();
    assert_eq!(events.len(), 4);
    assert!(matches!(events[0], Event::Write { fua: true, .. }));
    assert_eq!(events[3], Event::Disconnect);
    assert_eq!(trickle.events(), events);
    assert_eq!(trickle.out, bulk.out);
}

#[test]
fn backpressure_stops_input_until_events_are_taken() {
    // Checks that input stops at 64 queued events (TRIMs count too) or 1 MiB of queued WRITE data, and resumes once events are taken.
    let mut wire = Wire::transmitting(config());
    let stream: Vec<u8> = (0..100)
        .flat_map(|handle| encode_request(0, handle, 0, 4096))
        .collect();
    let used = wire.server.handle_input(&stream);
    assert_eq!(used, 64 * REQUEST_HEADER_BYTES);
    assert!(!wire.server.wants_input());
    assert_eq!(wire.events().len(), 64);
    assert_eq!(
        wire.server.handle_input(&stream[used..]),
        stream.len() - used
    );
    assert_eq!(wire.events().len(), 36);
    assert_eq!(wire.server.pending_requests(), 100);

    let trims: Vec<u8> = (100..200)
        .flat_map(|handle| encode_request(CMD_TRIM, handle, 0, 4096))
        .collect();
    assert_eq!(
        wire.server.handle_input(&trims),
        64 * REQUEST_HEADER_BYTES,
        "64 queued TRIMs stop input"
    );
    assert!(!wire.server.wants_input());
    assert!(matches!(
        wire.server.poll_event(),
        Some(Event::Trim { handle: 100, .. })
    ));
    assert!(wire.server.wants_input());
    wire.events();

    let write = |handle| {
        [
            &encode_request(CMD_WRITE, handle, 0, 65536)[..],
            &[0; 65536],
        ]
        .concat()
    };
    let stream: Vec<u8> = (200..220).flat_map(write).collect();
    let used = wire.server.handle_input(&stream);
    assert_eq!(
        used,
        16 * (REQUEST_HEADER_BYTES + 65536),
        "1 MiB of WRITE data stops input"
    );
    assert!(!wire.server.wants_input());
    assert!(matches!(
        wire.server.poll_event(),
        Some(Event::Write { handle: 200, .. })
    ));
    assert!(wire.server.wants_input());
}

#[test]
fn invalid_configs_are_refused() {
    // Checks that configurations the protocol or the engine cannot serve are refused.
    let configs = [config(), config(), config(), config(), config()];
    let [mut odd_block, mut small_block, mut small_payload, mut partial_block, mut nul] = configs;
    odd_block.block_bytes = 1000;
    small_block.block_bytes = 256;
    small_payload.payload_bytes_max = 1024;
    partial_block.size_bytes += 512;
    nul.export_name = "a\0b".into();
    for config in [odd_block, small_block, small_payload, partial_block, nul] {
        assert!(ServerSession::new(config).is_err());
    }
}

#[test]
fn client_reassembles_fragmented_and_interleaved_structured_replies() {
    // Checks the client's reply decoder on chunks a server may legally send: split content, holes, interleaving, NONE, errors.
    fn chunk(flags: u16, chunk_type: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("short");
        [
            &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..],
            &flags.to_be_bytes(),
            &chunk_type.to_be_bytes(),
            &handle.to_be_bytes(),
            &len.to_be_bytes(),
            payload,
        ]
        .concat()
    }
    let in_flight = InFlight::default();
    {
        let mut expected = in_flight.lock().expect("lock");
        expected.insert(
            1,
            Expected::Read {
                offset: 512,
                len: 1536,
            },
        );
        expected.insert(2, Expected::Status);
        expected.insert(
            3,
            Expected::Read {
                offset: 0,
                len: 512,
            },
        );
    }
    let data_at = |offset: u64, byte: u8, len: usize| {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend(vec![byte; len]);
        payload
    };
    let hole = [&1024u64.to_be_bytes()[..], &512u32.to_be_bytes()].concat();
    let error = [&5u32.to_be_bytes()[..], &2u16.to_be_bytes(), b"no"].concat();
    let mut stream = chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &data_at(1536, 0xbb, 512));
    stream.extend(chunk(0, REPLY_TYPE_ERROR, 3, &error));
    stream.extend(chunk(0, REPLY_TYPE_OFFSET_HOLE, 1, &hole));
    stream.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 2, &[]));
    stream.extend(chunk(
        0,
        REPLY_TYPE_OFFSET_DATA,
        1,
        &data_at(512, 0xaa, 512),
    ));
    stream.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]));
    stream.extend(chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        3,
        &data_at(0, 1, 512),
    ));

    let mut reader = ReplyReader::new(true);
    let mut source = &stream[..];
    let mut next = || {
        reader
            .next_reply(&mut source, &in_flight)
            .expect("valid reply")
    };
    let status = Reply {
        handle: 2,
        error: 0,
        data: Vec::new(),
    };
    assert_eq!(next(), status);
    let read = [vec![0xaa; 512], vec![0; 512], vec![0xbb; 512]].concat();
    assert_eq!(next().data, read);
    let failed = Reply {
        handle: 3,
        error: 5,
        data: Vec::new(),
    };
    assert_eq!(
        next(),
        failed,
        "an error chunk fails the reply despite later data"
    );
    assert!(in_flight.lock().expect("lock").is_empty());

    // A simple reply to a READ after negotiation, a chunk without negotiation, and a READ that
    // claims success with part of its data are all protocol errors.
    let mut simple = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    simple.extend([0; 4]);
    simple.extend(7u64.to_be_bytes());
    let short = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        7,
        &data_at(0, 1, 100),
    );
    for (structured, bytes) in [(true, &simple), (false, &short), (true, &short)] {
        in_flight.lock().expect("lock").insert(
            7,
            Expected::Read {
                offset: 0,
                len: 512,
            },
        );
        let reply = ReplyReader::new(structured).next_reply(&mut &bytes[..], &in_flight);
        assert!(matches!(reply, Err(ClientError::Protocol(_))), "{reply:?}");
        in_flight.lock().expect("lock").clear();
    }
}

/// xorshift64: a tiny deterministic generator, good enough to produce varied inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }

    /// Mostly no command flags, sometimes valid ones, sometimes anything.
    fn command_flags(&mut self) -> u16 {
        match self.below(8) {
            0 | 1 => CMD_FLAG_FUA,
            2 => [CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO][self.below(3)],
            3 => be_u16(&self.bytes(2), 0),
            _ => 0,
        }
    }
}

/// Every command the session knows, and two it does not.
const RANDOM_COMMANDS: [u16; 8] = [
    CMD_READ,
    CMD_WRITE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    CMD_BLOCK_STATUS,
    5,
    CMD_READ,
];

/// A random client stream: a valid prefix of `depth` handshake steps, then random, framed and
/// mutated pieces.
fn random_stream(rng: &mut Rng, depth: usize) -> Vec<u8> {
    let mut input = Vec::new();
    if depth >= 1 {
        input.extend(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    }
    if depth >= 2 {
        if rng.below(2) == 0 {
            input.extend(encode_option(OPT_STRUCTURED_REPLY, b""));
        }
        input.extend(info_option(OPT_GO, b"f", &[]));
    }
    for _ in 0..rng.below(10) {
        match rng.below(10) {
            0 => {
                let len = rng.below(64);
                input.extend(rng.bytes(len));
            }
            1 => {
                let (option, len) = (rng.below(11), rng.below(32));
                let option = u32::try_from(option).unwrap_or(0);
                let len = if rng.below(4) == 0 { 0 } else { len };
                let mut frame = encode_option(option, &rng.bytes(len));
                if rng.below(8) == 0 {
                    frame[12..16].copy_from_slice(&rng.bytes(4));
                }
                input.extend(frame);
            }
            2 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            _ => {
                // Mostly well-formed requests, with one field sometimes out of range.
                let kind = RANDOM_COMMANDS[rng.below(RANDOM_COMMANDS.len())];
                let kind = if rng.below(32) == 0 { CMD_DISC } else { kind };
                let mut offset = rng.next() % 16 * 512;
                let mut len = [512, 1024, 2048, 4096][rng.below(4)];
                match rng.below(12) {
                    0 => offset = rng.next(),
                    1 => len = [0, 700, 8192][rng.below(3)],
                    2 => len = be_u32(&rng.bytes(4), 0),
                    _ if kind == CMD_FLUSH || kind == CMD_DISC => (offset, len) = (0, 0),
                    _ => {}
                }
                let flags = rng.command_flags();
                input.extend(encode_request_flagged(
                    flags,
                    kind,
                    rng.next() % 4,
                    offset,
                    len,
                ));
                if kind == CMD_WRITE {
                    input.extend(rng.bytes(usize_from(len).min(5000)));
                }
            }
        }
    }
    input
}

/// Event kinds counted by the randomized tests.
#[derive(Debug, Default)]
struct Seen {
    reads: usize,
    writes: usize,
    fua_requests: usize,
    write_zeroes: usize,
    trims: usize,
    flushes: usize,
    disconnects: usize,
    errors: usize,
}

impl Seen {
    fn all_at_least(&self, n: usize) -> bool {
        [
            self.reads,
            self.writes,
            self.fua_requests,
            self.write_zeroes,
            self.trims,
            self.flushes,
            self.disconnects,
            self.errors,
        ]
        .iter()
        .all(|&count| count >= n)
    }
}

/// The range of a request the runtime sees lies in whole blocks inside the export.
fn assert_valid_range(config: &ServerConfig, offset: u64, len: usize) {
    let block_bytes = usize_from(config.block_bytes);
    assert!(len > 0 && len % block_bytes == 0, "length {len}");
    assert_eq!(offset % u64::from(config.block_bytes), 0, "offset {offset}");
    let end = offset + u64::try_from(len).expect("usize fits u64");
    assert!(end <= config.size_bytes, "range ends at {end}");
}

/// Answers one event the way a runtime would, at random, after checking that the request is
/// valid.
fn answer(
    session: &mut ServerSession,
    config: &ServerConfig,
    event: Event,
    rng: &mut Rng,
    seen: &mut Seen,
) {
    let payload_max = usize_from(config.payload_bytes_max);
    let answered = match event {
        Event::Read {
            handle,
            offset,
            len,
        } => {
            seen.reads += 1;
            let len = usize_from(len);
            assert!(len <= payload_max);
            assert_valid_range(config, offset, len);
            match rng.below(2) {
                0 => session.reply_read(handle, &vec![0; len]),
                _ => session.reply_error(handle, NbdError::Io),
            }
        }
        Event::Write {
            handle,
            offset,
            data,
            fua,
        } => {
            seen.writes += 1;
            seen.fua_requests += usize::from(fua);
            assert!(data.len() <= payload_max);
            assert_valid_range(config, offset, data.len());
            session.reply_ok(handle)
        }
        Event::WriteZeroes {
            handle,
            offset,
            len,
            fua,
        } => {
            seen.write_zeroes += 1;
            seen.fua_requests += usize::from(fua);
            assert_valid_range(config, offset, usize_from(len));
            session.reply_ok(handle)
        }
        Event::Trim {
            handle,
            offset,
            len,
            fua,
        } => {
            seen.trims += 1;
            seen.fua_requests += usize::from(fua);
            assert_valid_range(config, offset, usize_from(len));
            session.reply_error(handle, NbdError::Io)
        }
        Event::Flush { handle } => {
            seen.flushes += 1;
            session.reply_ok(handle)
        }
        Event::Disconnect | Event::Error(_) => {
            assert!(session.is_closed(), "only the last event ends a session");
            if event == Event::Disconnect {
                seen.disconnects += 1;
            } else {
                seen.errors += 1;
            }
            Ok(())
        }
    };
    answered.expect("the request is pending");
}

fn random_config() -> ServerConfig {
    ServerConfig {
        export_name: "f".into(),
        size_bytes: 16 * 512,
        read_only: false,
        block_bytes: 512,
        payload_bytes_max: 2048,
        multi_conn: true,
    }
}

/// Feeds `input` in random chunks, answering every request, and checks the invariants.
fn drive(config: &ServerConfig, input: &[u8], rng: &mut Rng, seen: &mut Seen) {
    let mut session = ServerSession::new(config.clone()).expect("valid config");
    let mut rest = input;
    loop {
        while let Some(event) = session.poll_event() {
            answer(&mut session, config, event, rng, seen);
        }
        assert_eq!(session.pending_requests(), 0);
        let output_bytes = session.output_pending_bytes();
        assert!(
            output_bytes <= 64 * 1024,
            "output grew to {output_bytes} bytes"
        );
        session.consume_output(output_bytes);
        if rest.is_empty() || session.is_closed() {
            return;
        }
        let chunk = (1 + rng.below(64)).min(rest.len());
        let used = session.handle_input(&rest[..chunk]);
        assert!(
            used == chunk || !session.wants_input(),
            "input stopped for no reason"
        );
        assert!(session.buffered_input_bytes() <= session.buffered_input_bytes_max());
        rest = &rest[used..];
    }
}

#[test]
fn random_inputs_never_panic_and_stay_bounded() {
    // Checks 10,000 random and mutated client streams over every command and flag: no panic, bounded buffers, only valid requests reach the runtime.
    let config = random_config();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = Seen::default();
    for case in 0..10_000 {
        let input = random_stream(&mut rng, case % 3);
        drive(&config, &input, &mut rng, &mut seen);
    }
    // The generator must reach every kind of event, or the test proves little.
    assert!(seen.all_at_least(100), "events seen: {seen:?}");
}

#[test]
fn random_requests_get_exactly_one_well_formed_reply_each() {
    // Checks 2,000 random request sequences, simple and structured: the client's strict decoder finds one reply per request, in the negotiated style, with the runtime's data.
    let config = random_config();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut seen = Seen::default();
    let mut refusals = 0;
    for case in 0..2_000 {
        let structured = case % 2 == 0;
        let mut session = ServerSession::new(config.clone()).expect("valid config");
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        if structured {
            input.extend(encode_option(OPT_STRUCTURED_REPLY, b""));
        }
        input.extend(info_option(OPT_GO, b"f", &[]));
        assert_eq!(session.handle_input(&input), input.len());
        let handshake_bytes = session.output_pending_bytes();
        session.consume_output(handshake_bytes);
        assert_eq!(session.structured_replies(), structured);

        let in_flight = InFlight::default();
        let mut output = Vec::new();
        for handle in 0..rng.next() % 40 {
            let kind = RANDOM_COMMANDS[rng.below(RANDOM_COMMANDS.len())];
            let mut offset = rng.next() % 20 * 512;
            let mut len = [512, 1024, 2048, 4096][rng.below(4)];
            match rng.below(6) {
                0 => len = [0, 700, 8192][rng.below(3)],
                1 if kind != CMD_WRITE => len = be_u32(&rng.bytes(4), 0),
                _ if kind == CMD_FLUSH => (offset, len) = (0, 0),
                _ => {}
            }
            let flags = rng.command_flags();
            let expected = match kind {
                CMD_READ => Expected::Read { offset, len },
                _ => Expected::Status,
            };
            in_flight.lock().expect("lock").insert(handle, expected);
            let mut request = encode_request_flagged(flags, kind, handle, offset, len).to_vec();
            if kind == CMD_WRITE {
                request.extend(vec![0x5a; usize_from(len)]);
            }
            assert_eq!(session.handle_input(&request), request.len());
            let refused = session.output_pending_bytes() > 0;
            refusals += usize::from(refused);
            while let Some(event) = session.poll_event() {
                // Read data tells the handle, to check it reaches the right reply.
                if let Event::Read { handle, len, .. } = event {
                    seen.reads += 1;
                    let data = vec![handle.to_le_bytes()[0]; usize_from(len)];
                    session.reply_read(handle, &data).expect("pending");
                } else {
                    answer(&mut session, &config, event, &mut rng, &mut seen);
                }
            }
            while let Some(bytes) = session.poll_output() {
                output.extend_from_slice(bytes);
                let n = bytes.len();
                session.consume_output(n);
            }
        }

        let mut reader = ReplyReader::new(structured);
        let mut source = &output[..];
        while !source.is_empty() {
            let reply = reader
                .next_reply(&mut source, &in_flight)
                .expect("a well-formed reply to a request in flight");
            if reply.error == 0 && !reply.data.is_empty() {
                let byte = reply.handle.to_le_bytes()[0];
                assert!(
                    reply.data.iter().all(|&b| b == byte),
                    "data of another read"
                );
            }
        }
        assert!(
            in_flight.lock().expect("lock").is_empty(),
            "a request got no reply"
        );
    }
    assert!(seen.reads >= 1000 && seen.write_zeroes >= 100 && seen.trims >= 100);
    assert!(refusals >= 1000, "refusals: {refusals}");
}

/// Serves one connection from a shared RAM disk until the session closes.
fn serve(mut stream: TcpStream, config: ServerConfig, disk: &Mutex<Vec<u8>>) {
    stream.set_read_timeout(Some(TIMEOUT)).expect("set timeout");
    let mut session = ServerSession::new(config).expect("valid config");
    let (mut received, mut chunk) = (Vec::new(), vec![0; 1 << 16]);
    loop {
        let used = session.handle_input(&received);
        received.drain(..used);
        while let Some(event) = session.poll_event() {
            let mut disk = disk.lock().expect("disk");
            let at = |offset: u64| usize::try_from(offset).expect("validated offset");
            let answered = match event {
                Event::Read {
                    handle,
                    offset,
                    len,
                } => session.reply_read(handle, &disk[at(offset)..][..usize_from(len)]),
                Event::Write {
                    handle,
                    offset,
                    data,
                    ..
                } => {
                    disk[at(offset)..][..data.len()].copy_from_slice(&data);
                    session.reply_ok(handle)
                }
                Event::WriteZeroes {
                    handle,
                    offset,
                    len,
                    ..
                } => {
                    disk[at(offset)..][..usize_from(len)].fill(0);
                    session.reply_ok(handle)
                }
                // Discarding is optional; this disk marks trimmed bytes to prove the call came.
                Event::Trim {
                    handle,
                    offset,
                    len,
                    ..
                } => {
                    disk[at(offset)..][..usize_from(len)].fill(0xdd);
                    session.reply_ok(handle)
                }
                Event::Flush { handle } => session.reply_ok(handle),
                Event::Disconnect | Event::Error(_) => Ok(()),
            };
            answered.expect("the request is pending");
        }
        while let Some(output) = session.poll_output() {
            stream.write_all(output).expect("send");
            let n = output.len();
            session.consume_output(n);
        }
        if session.is_closed() {
            return;
        }
        if received.is_empty() || !session.wants_input() {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Serves `connections` connections at once, each in its own thread, from one shared disk;
/// the join handle returns the disk once all have closed.
fn spawn_server(
    config: ServerConfig,
    connections: usize,
) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let size = usize::try_from(config.size_bytes).expect("small export");
    let server = thread::spawn(move || {
        let disk = Arc::new(Mutex::new(vec![0; size]));
        let sessions: Vec<_> = (0..connections)
            .map(|_| {
                let stream = listener.accept().expect("accept").0;
                let (config, disk) = (config.clone(), Arc::clone(&disk));
                thread::spawn(move || serve(stream, config, &disk))
            })
            .collect();
        for session in sessions {
            session.join().expect("session thread");
        }
        let disk = disk.lock().expect("disk");
        disk.clone()
    });
    (addr, server)
}

#[test]
fn client_and_session_work_over_loopback_tcp() {
    // Checks the blocking client against a session over real TCP: write, read back, error, flush, pipelining, disconnect.
    let (addr, server) = spawn_server(config(), 1);
    let mut client = Client::connect(addr, "vol", TIMEOUT).expect("connect");
    assert_eq!(client.size_bytes(), SIZE_BYTES);
    assert_eq!(client.transmission_flags(), BASE_FLAGS);
    assert!(!client.structured_replies());
    let block: Vec<u8> = (0..8192u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
    client.write(4096, &block).expect("write");
    assert_eq!(client.read(4096, 8192).expect("read"), block);
    client.flush().expect("flush");
    match client.write(3, &[0; 4096]) {
        Err(ClientError::Server { error }) => assert_eq!(error, NbdError::Invalid.code()),
        other => panic!("misaligned write gave {other:?}"),
    }

    let (mut sender, mut receiver) = client.into_split();
    let receiving = thread::spawn(move || {
        let replies = (0..9).map(|_| receiver.recv_reply().expect("reply"));
        replies.collect::<Vec<_>>()
    });
    for handle in 0..8u8 {
        let offset = (16 + u64::from(handle)) * 4096;
        sender
            .send_write(handle.into(), offset, &[handle + 1; 4096])
            .expect("send");
    }
    sender.send_flush(8).expect("send flush");
    let mut replies = receiving.join().expect("receiver thread");
    replies.sort_by_key(|reply| reply.handle);
    for (handle, reply) in (0..).zip(replies) {
        assert_eq!(
            reply,
            Reply {
                handle,
                error: 0,
                data: Vec::new()
            }
        );
    }
    sender.send_disconnect().expect("disconnect");

    let disk = server.join().expect("server thread");
    assert_eq!(disk[4096..12288], block[..]);
    for (handle, written) in (1..=8u8).zip(disk[16 * 4096..].chunks(4096)) {
        assert!(written.iter().all(|&byte| byte == handle));
    }
}

#[test]
fn structured_client_writes_zeroes_trims_and_reads_over_loopback_tcp() {
    // Checks a structured-reply client over TCP: FUA write, WRITE_ZEROES, TRIM, reads back, and structured errors.
    let (addr, server) = spawn_server(config(), 1);
    let options = ConnectOptions {
        structured_replies: true,
    };
    let mut client = Client::connect_with(addr, "vol", TIMEOUT, options).expect("connect");
    assert!(client.structured_replies());
    assert_eq!(client.transmission_flags(), BASE_FLAGS | FLAG_SEND_DF);
    client.write_fua(0, &[1; 16384]).expect("FUA write");
    client.write_zeroes(4096, 4096).expect("write zeroes");
    client.trim(12288, 4096).expect("trim");
    let expected = [[1; 4096], [0; 4096], [1; 4096], [0xdd; 4096]].concat();
    assert_eq!(client.read(0, 16384).expect("read"), expected);
    let past_end = [
        client.read(SIZE_BYTES, 4096).map(drop),
        client.write_zeroes(SIZE_BYTES, 4096),
        client.trim(SIZE_BYTES - 4096, 8192),
    ];
    let errors = past_end.map(|result| match result {
        Err(ClientError::Server { error }) => error,
        other => panic!("request past the end gave {other:?}"),
    });
    let (invalid, no_space) = (NbdError::Invalid.code(), NbdError::NoSpace.code());
    assert_eq!(errors, [invalid, no_space, invalid]);
    client.flush().expect("flush");
    client.disconnect().expect("disconnect");
    let disk = server.join().expect("server thread");
    assert_eq!(disk[..16384], expected[..]);
}

#[test]
fn several_clients_at_once_share_one_export() {
    // Checks four simultaneous connections (as nbdcopy opens with CAN_MULTI_CONN), each writing its own region, then each reading all.
    const CLIENTS: u8 = 4;
    let config = ServerConfig {
        multi_conn: true,
        ..config()
    };
    let (addr, server) = spawn_server(config, usize::from(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            let options = ConnectOptions {
                structured_replies: index % 2 == 0,
            };
            Client::connect_with(addr, "vol", TIMEOUT, options).expect("connect")
        })
        .collect();
    let region = |index: u8| u64::from(index) * 16 * 4096;
    let writers: Vec<_> = (0..CLIENTS)
        .zip(clients)
        .map(|(index, mut client)| {
            thread::spawn(move || {
                assert_ne!(client.transmission_flags() & FLAG_CAN_MULTI_CONN, 0);
                for block in 0..16 {
                    let offset = region(index) + block * 4096;
                    client.write_fua(offset, &[index + 1; 4096]).expect("write");
                }
                client.flush().expect("flush");
                client
            })
        })
        .collect();
    let clients: Vec<_> = writers
        .into_iter()
        .map(|writer| writer.join().expect("writer thread"))
        .collect();
    // Every write was answered before any read starts: all connections see all of them.
    for mut client in clients {
        for index in 0..CLIENTS {
            let data = client.read(region(index), 16 * 4096).expect("read");
            assert!(data.iter().all(|&byte| byte == index + 1));
        }
        client.disconnect().expect("disconnect");
    }
    let disk = server.join().expect("server thread");
    assert_eq!(disk.len(), usize::try_from(SIZE_BYTES).expect("small"));
}

#[test]
fn client_reports_unknown_export() {
    // Checks that the client turns NBD_REP_ERR_UNKNOWN into ClientError::Rejected and that disconnect works.
    let (addr, server) = spawn_server(config(), 1);
    match Client::connect(addr, "nope", TIMEOUT) {
        Err(ClientError::Rejected { reply_type, .. }) => assert_eq!(reply_type, REP_ERR_UNKNOWN),
        other => panic!("unknown export gave {other:?}"),
    }
    server.join().expect("server thread");

    let (addr, server) = spawn_server(config(), 1);
    let client = Client::connect(addr, "", TIMEOUT).expect("default export");
    client.disconnect().expect("disconnect");
    server.join().expect("server thread");
}
