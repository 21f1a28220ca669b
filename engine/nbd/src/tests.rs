//! Session tests in memory and over loopback TCP, hostile inputs, and a randomized input test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use crate::client::{decode_simple_reply, encode_info_request, encode_option, encode_request};
use crate::wire::*;
use crate::*;

const TIMEOUT: Duration = Duration::from_secs(10);
const SIZE_BYTES: u64 = 64 * 4096;

fn config() -> ServerConfig {
    ServerConfig {
        export_name: "vol".into(),
        size_bytes: SIZE_BYTES,
        read_only: false,
        block_bytes: 4096,
        payload_bytes_max: 16 * 4096,
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

    /// A session in transmission after `NBD_OPT_GO`.
    fn transmitting(config: ServerConfig) -> Self {
        let mut wire = Self::new(config);
        wire.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        wire.feed(&info_option(OPT_GO, b"vol", &[]));
        assert_eq!(wire.option_reply().1, REP_INFO);
        assert_eq!(wire.option_reply().1, REP_ACK);
        assert!(wire.server.is_transmitting() && wire.out.is_empty());
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

    /// Error, handle and data of the next simple reply; data follows only a successful READ.
    fn simple_reply(&mut self, read_len: usize) -> (u32, u64, Vec<u8>) {
        let head = self.take(SIMPLE_REPLY_HEADER_BYTES);
        let (error, handle) = decode_simple_reply(&head).expect("simple reply magic");
        let data = self.take(if error == 0 { read_len } else { 0 });
        (error, handle, data)
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        self.feed(&encode_request(kind, handle, offset, len));
        self.feed(payload);
    }

    /// The session answered `handle` with `error` by itself and told the runtime nothing.
    fn expect_refusal(&mut self, handle: u64, error: NbdError) {
        assert_eq!(self.simple_reply(0), (error.code(), handle, Vec::new()));
        assert_eq!(self.events(), []);
        assert!(self.out.is_empty() && !self.server.is_closed());
    }

    /// A valid READ still parses, proving that framing survived what came before.
    fn expect_framing_intact(&mut self, handle: u64) {
        self.request(CMD_READ, handle, 0, 4096, &[]);
        assert_eq!(self.events(), [read_event(handle)]);
        self.server.reply_read(handle, &[3; 4096]).expect("pending");
        self.drain();
        assert_eq!(self.simple_reply(4096), (0, handle, vec![3; 4096]));
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
    assert_eq!(be_u16(&export, 10), FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
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
    let (handle, offset) = (1, 4096);
    let write = Event::Write {
        handle,
        offset,
        data,
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
        let mut wire = Wire::new(ServerConfig {
            read_only: true,
            ..config()
        });
        wire.hello(flags);
        wire.feed(&encode_option(OPT_EXPORT_NAME, b""));
        let reply = wire.take(10 + zeroes);
        assert_eq!(be_u64(&reply, 0), SIZE_BYTES);
        assert_eq!(
            be_u16(&reply, 8),
            FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_READ_ONLY
        );
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
    wire.feed(&info_option(OPT_INFO, b"vol", &[]));
    assert_eq!(wire.option_reply().1, REP_INFO);
    assert_eq!(wire.option_reply(), (OPT_INFO, REP_ACK, Vec::new()));
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
    wire.feed(&encode_option(8, b""));
    assert_eq!(wire.option_reply(), (8, REP_ERR_UNSUP, Vec::new()));
    assert!(!wire.server.is_transmitting() && wire.events().is_empty());
    wire.feed(&info_option(OPT_GO, b"vol", &[]));
    assert_eq!(wire.option_reply().1, REP_INFO);
    assert_eq!(wire.option_reply().1, REP_ACK);
    assert!(wire.server.is_transmitting());
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
    wire.feed(&info_option(OPT_GO, b"vol", &[]));
    assert_eq!(wire.option_reply().1, REP_INFO);
    assert_eq!(wire.option_reply().1, REP_ACK);

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

#[test]
fn invalid_requests_are_refused_without_events() {
    // Checks range, zero length, alignment, size limit, flags and unknown command refusals, framing kept.
    let mut wire = Wire::transmitting(config());
    let (end, far) = (SIZE_BYTES, u64::MAX - 4095);
    let cases: [(u16, u64, u32, NbdError); 10] = [
        (CMD_READ, end - 4096, 8192, NbdError::Invalid),
        (CMD_WRITE, end, 4096, NbdError::NoSpace),
        (CMD_READ, far, 4096, NbdError::Invalid),
        (CMD_WRITE, far, 8192, NbdError::NoSpace),
        (CMD_READ, 0, 0, NbdError::Invalid),
        (CMD_WRITE, 512, 4096, NbdError::Invalid),
        (CMD_READ, 0, 512, NbdError::Invalid),
        (CMD_WRITE, 0, 32 * 4096, NbdError::Invalid),
        (CMD_FLUSH, 4096, 0, NbdError::Invalid),
        (4, 0, 4096, NbdError::Invalid),
    ];
    for (handle, (kind, offset, len, error)) in (10..).zip(cases) {
        let payload_bytes = if kind == CMD_WRITE {
            usize_from(len)
        } else {
            0
        };
        wire.request(kind, handle, offset, len, &vec![0x55; payload_bytes]);
        wire.expect_refusal(handle, error);
        wire.expect_framing_intact(handle + 100);
    }
    let mut flagged = encode_request(CMD_READ, 7, 0, 4096);
    flagged[5] = 1; // NBD_CMD_FLAG_FUA, which this server does not advertise.
    wire.feed(&flagged);
    wire.expect_refusal(7, NbdError::Invalid);
    wire.expect_framing_intact(8);
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
fn read_only_export_refuses_writes() {
    // Checks that a WRITE on a read-only export gets EPERM with its payload skipped, while reads work.
    let mut wire = Wire::transmitting(ServerConfig {
        read_only: true,
        ..config()
    });
    wire.request(CMD_WRITE, 1, 0, 4096, &[1; 4096]);
    wire.expect_refusal(1, NbdError::Perm);
    wire.expect_framing_intact(2);
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
    let mut wire = Wire::transmitting(config());
    wire.request(CMD_READ, 1, 0, 4096, &[]);
    wire.request(CMD_WRITE, 2, 0, 4096, &[0; 4096]);
    assert_eq!(wire.events().len(), 2);
    let session = &mut wire.server;
    assert_eq!(session.reply_ok(9), Err(ReplyError::UnknownHandle(9)));
    assert_eq!(
        session.reply_error(9, NbdError::Io),
        Err(ReplyError::UnknownHandle(9))
    );
    assert_eq!(session.reply_ok(1), Err(ReplyError::WrongKind(1)));
    assert_eq!(session.reply_read(2, &[]), Err(ReplyError::WrongKind(2)));
    let (handle, expected, actual) = (1, 4096, 10);
    let mismatch = ReplyError::ReadLengthMismatch {
        handle,
        expected,
        actual,
    };
    assert_eq!(session.reply_read(1, &[0; 10]), Err(mismatch));
    assert_eq!(session.output_pending_bytes(), 0);
    assert_eq!(session.pending_requests(), 2);
}

#[test]
fn byte_by_byte_input_frames_like_bulk_input() {
    // Checks that a whole client stream fed one byte at a time gives the same events and output as at once.
    let mut stream = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    stream.extend(encode_option(OPT_LIST, b""));
    stream.extend(info_option(OPT_GO, b"vol", &[INFO_BLOCK_SIZE]));
    stream.extend(encode_request(CMD_WRITE, 1, 0, 4096));
    stream.extend((0..4096u32).map(|i| i.to_le_bytes()[0]));
    stream.extend(encode_request(CMD_WRITE, 2, SIZE_BYTES, 4096));
    stream.extend([9; 4096]);
    stream.extend(encode_request(CMD_READ, 3, 4096, 4096));
    stream.extend(encode_request(CMD_DISC, 4, 0, 0));

    let mut bulk = Wire::new(config());
    bulk.feed(&stream);
    let mut trickle = Wire::new(config());
    for byte in &stream {
        trickle.feed(std::slice::from_ref(byte));
    }
    let events = bulk.events();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2], Event::Disconnect);
    assert_eq!(trickle.events(), events);
    assert_eq!(trickle.out, bulk.out);
}

#[test]
fn backpressure_stops_input_until_events_are_taken() {
    // Checks that input stops at 64 queued events or 1 MiB of queued WRITE data and resumes once events are taken.
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
}

/// A random client stream: a valid prefix of `depth` handshake steps, then random, framed and
/// mutated pieces.
fn random_stream(rng: &mut Rng, depth: usize) -> Vec<u8> {
    let mut input = Vec::new();
    if depth >= 1 {
        input.extend(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    }
    if depth >= 2 {
        input.extend(info_option(OPT_GO, b"f", &[]));
    }
    for _ in 0..rng.below(10) {
        match rng.below(10) {
            0 => {
                let len = rng.below(64);
                input.extend(rng.bytes(len));
            }
            1 => {
                let (option, len) = (rng.below(10), rng.below(32));
                let option = u32::try_from(option).unwrap_or(0);
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
                let kind = [CMD_READ, CMD_WRITE, CMD_FLUSH, 4][rng.below(4)];
                let kind = if rng.below(32) == 0 { CMD_DISC } else { kind };
                let mut offset = rng.next() % 16 * 512;
                let mut len = [512, 1024, 2048][rng.below(3)];
                match rng.below(12) {
                    0 => offset = rng.next(),
                    1 => len = [0, 700, 4096][rng.below(3)],
                    2 => len = be_u32(&rng.bytes(4), 0),
                    _ if kind == CMD_FLUSH || kind == CMD_DISC => (offset, len) = (0, 0),
                    _ => {}
                }
                input.extend(encode_request(kind, rng.next() % 4, offset, len));
                if kind == CMD_WRITE {
                    input.extend(rng.bytes(usize_from(len).min(5000)));
                }
            }
        }
    }
    input
}

/// Feeds `input` in random chunks, answering every request, checks the invariants and counts
/// the events by kind (read, write, flush, disconnect, error).
fn drive(config: &ServerConfig, input: &[u8], rng: &mut Rng, seen: &mut [usize; 5]) {
    let mut session = ServerSession::new(config.clone()).expect("valid config");
    let mut rest = input;
    loop {
        while let Some(event) = session.poll_event() {
            let answered = match event {
                Event::Read { handle, len, .. } => {
                    seen[0] += 1;
                    match rng.below(2) {
                        0 => session.reply_read(handle, &vec![0; usize_from(len)]),
                        _ => session.reply_error(handle, NbdError::Io),
                    }
                }
                Event::Write { handle, data, .. } => {
                    seen[1] += 1;
                    assert!(!data.is_empty() && data.len() <= usize_from(config.payload_bytes_max));
                    session.reply_ok(handle)
                }
                Event::Flush { handle } => {
                    seen[2] += 1;
                    session.reply_ok(handle)
                }
                Event::Disconnect | Event::Error(_) => {
                    assert!(session.is_closed(), "only the last event ends a session");
                    seen[if event == Event::Disconnect { 3 } else { 4 }] += 1;
                    Ok(())
                }
            };
            answered.expect("the request is pending");
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
    // Checks 10,000 random and mutated client streams: no panic, bounded buffers, consistent consumption.
    let config = ServerConfig {
        export_name: "f".into(),
        size_bytes: 16 * 512,
        read_only: false,
        block_bytes: 512,
        payload_bytes_max: 2048,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = [0; 5];
    for case in 0..10_000 {
        let input = random_stream(&mut rng, case % 3);
        drive(&config, &input, &mut rng, &mut seen);
    }
    // The generator must reach every kind of event, or the test proves little.
    assert!(
        seen.iter().all(|&count| count >= 100),
        "events seen: {seen:?}"
    );
}

/// Serves one connection from a RAM disk until the session closes; returns the disk.
fn serve(mut stream: TcpStream, config: ServerConfig) -> Vec<u8> {
    stream.set_read_timeout(Some(TIMEOUT)).expect("set timeout");
    let mut disk = vec![0; usize::try_from(config.size_bytes).expect("small export")];
    let mut session = ServerSession::new(config).expect("valid config");
    let (mut received, mut chunk) = (Vec::new(), vec![0; 1 << 16]);
    loop {
        let used = session.handle_input(&received);
        received.drain(..used);
        while let Some(event) = session.poll_event() {
            let answered = match event {
                Event::Read {
                    handle,
                    offset,
                    len,
                } => {
                    let start = usize::try_from(offset).expect("validated offset");
                    session.reply_read(handle, &disk[start..][..usize_from(len)])
                }
                Event::Write {
                    handle,
                    offset,
                    data,
                } => {
                    let start = usize::try_from(offset).expect("validated offset");
                    disk[start..][..data.len()].copy_from_slice(&data);
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
            return disk;
        }
        if received.is_empty() || !session.wants_input() {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return disk,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn spawn_server(config: ServerConfig) -> (std::net::SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let server = thread::spawn(move || serve(listener.accept().expect("accept").0, config));
    (addr, server)
}

#[test]
fn client_and_session_work_over_loopback_tcp() {
    // Checks the blocking client against a session over real TCP: write, read back, error, flush, pipelining, disconnect.
    let (addr, server) = spawn_server(config());
    let mut client = Client::connect(addr, "vol", TIMEOUT).expect("connect");
    assert_eq!(client.size_bytes(), SIZE_BYTES);
    assert_eq!(
        client.transmission_flags(),
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH
    );
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
fn client_reports_unknown_export() {
    // Checks that the client turns NBD_REP_ERR_UNKNOWN into ClientError::Rejected and that disconnect works.
    let (addr, server) = spawn_server(config());
    match Client::connect(addr, "nope", TIMEOUT) {
        Err(ClientError::Rejected { reply_type, .. }) => assert_eq!(reply_type, REP_ERR_UNKNOWN),
        other => panic!("unknown export gave {other:?}"),
    }
    server.join().expect("server thread");

    let (addr, server) = spawn_server(config());
    let client = Client::connect(addr, "", TIMEOUT).expect("default export");
    client.disconnect().expect("disconnect");
    server.join().expect("server thread");
}
