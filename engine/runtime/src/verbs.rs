//! The RDMA verbs backend of the transport boundary: the queue pairs of [`crate::transport`] as
//! real RC queue pairs on an RDMA device (soft-RoCE is enough), built on `ordinal-hw`.
//!
//! What the daemons see is the same as over TCP: [`QueuePair`] posts, [`TransportEvent`]s out,
//! in order, error completion then flushes then `Down`. How each piece maps onto verbs:
//! - **Domain.** A [`VerbsDomain`] per daemon opens the device by name, checks the port is
//!   active, and picks the GID (RoCE v2 IPv4-mapped on Ethernet, index 0 on InfiniBand) and the
//!   port's active MTU. Each [`RegionTable`] made with `RegionTable::new_verbs`, and each queue
//!   pair started on a plain empty table, gets a protection domain of its own: an rkey is then
//!   good only on the connection it was granted on, as with the TCP table (verbs rkeys are
//!   otherwise valid on every QP of their PD).
//! - **Connection.** [`QueuePair::start_verbs`] runs over the already authenticated TCP stream:
//!   the client sends a 48-byte request (magic `ORDV`, version, its [`Endpoint`], MTU, receive
//!   buffer size), the server connects its QP (INIT→RTR→RTS with `ordinal-hw`'s timer and retry
//!   defaults) and answers in kind, the client connects and sends "ready", so neither side sends
//!   before the other can receive. A peer in TCP mode, or anything else, fails the exchange with
//!   an error that says so. The stream then stays open as the liveness channel: a task reads
//!   it, and end-of-file (the peer process died or failed the pair) or an error fails the QP
//!   after [`LIVENESS_GRACE`] (so that completions already on their way, such as a remote-access
//!   error, arrive with their real status first). A crashed machine closes nothing; it surfaces
//!   through the RC retry timeout (`RtsParams::dead_peer_bound`, 1.88 s with the defaults) as
//!   soon as work is outstanding.
//! - **Posting.** SEND → `IBV_WR_SEND`, WRITE → `IBV_WR_RDMA_WRITE[_WITH_IMM]`, READ →
//!   `IBV_WR_RDMA_READ`; every request is signaled. Payloads up to the granted
//!   `max_inline_data` go inline; larger ones are copied into the queue pair's registered send
//!   arena, a FIFO ring of [`VerbsConfig::send_arena_bytes`] (64 MiB by default: 64 payload
//!   writes of the largest 1 MiB, or thousands of typical ones, in flight), freed as completions
//!   are polled (RC completes in posting order). A READ lands in an arena span too and its bytes
//!   come back in the completion's `data`. A full arena or send queue is
//!   [`PostError::QueueFull`]. A SEND larger than the peer's receive buffers is
//!   [`PostError::TooLarge`].
//! - **Receiving.** [`VerbsConfig::recv_depth`] registered buffers of [`RECV_BUFFER_BYTES`]
//!   (the largest protocol message, rounded up), each re-posted as soon as its bytes are copied
//!   out. A SEND becomes `Received`, a WRITE-with-immediate (which consumes a receive, after
//!   its data is placed) `ReceivedImm`.
//! - **Completions.** One CQ per QP, polled by a task of the daemon's executor: busily
//!   (yielding to other tasks) while work is outstanding, for at most
//!   [`BUSY_POLL_OUTSTANDING_MAX`] without a completion, and for [`SPIN_AFTER_COMPLETION`]
//!   after the last completion (both configurable); then it arms the CQ, polls once more to
//!   close the race, and
//!   sleeps. glommio cannot wait on the completion channel's fd, so a helper thread per QP
//!   blocks in `wait_event` and wakes the poller task through its `Waker` (glommio 0.9 wakers
//!   may be woken from any thread: the wake is queued to the executor and its eventfd written;
//!   glommio's shared channels would need a glommio executor on the helper's side too). The
//!   thread ends within [`HELPER_WAIT`] of the poller ending. glommio reaps I/O and wakes from
//!   other threads only when no task is runnable, so a busy poller parks on a short timer
//!   every [`BUSY_SLICE_MAX`]: without that, a QP spinning for 20 ms held up another QP's
//!   completion event (woken through its helper) for the whole 20 ms in the soft-RoCE guest.
//!   Busy polling stays bounded by default because soft-RoCE does its work in the kernel on
//!   the CPUs of the posting and receiving threads; with a hardware NIC longer spins only cost
//!   CPU.
//! - **Statuses.** Success → `Success`; `REM_ACCESS_ERR` → `RemoteAccessError`;
//!   `WR_FLUSH_ERR` and `RETRY_EXC_ERR` (the peer never answered: the request may or may not
//!   have executed) → `Flushed`; everything else (`RNR_RETRY_EXC_ERR`, remote operation or
//!   invalid request errors, local errors) → `RemoteOperationError`, the reason naming the
//!   verbs status. After the first error the QP is down: posts fail, the rest flush, then one
//!   `Down`.
//!
//! Differences from TCP the daemons may notice: backpressure of a stalled receiver is bounded
//! (once its receives are used up the sender's SENDs are refused with RNR NAKs, and after
//! `rnr_retry` of them, about 0.3 s, the sender's QP fails, where TCP would wait); dropping the
//! last handle of a verbs queue pair fails it (a TCP pair lives on until the peer closes).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use ordinal_hw as hw;
use ordinal_hw::{
    Access, CompletionChannel, CompletionQueue, Context, Endpoint, Gid, GidSelector, LinkLayer,
    MemoryRegion, Mtu, PageBuffer, PortState, ProtectionDomain, QpCaps, RawMemory, RecvWr,
    RemoteAddr, RtrParams, RtsParams, SendOp, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};
use ordinal_proto::wire::{MESSAGE_BODY_BYTES_MAX, MESSAGE_HEADER_BYTES};

#[cfg(doc)]
use crate::transport::QueuePair;
use crate::transport::{
    next_qp_id, Opcode, PostError, RegionMemory, RegionTable, TransportEvent, WorkStatus,
    ACCESS_REMOTE_READ, ACCESS_REMOTE_WRITE, FRAME_PAYLOAD_BYTES_MAX, SEND_QUEUE_DEPTH,
    TRANSPORT_TIMEOUT,
};
use crate::Sender;

/// The largest message the protocol SENDs: a wire message with the largest body (an order batch
/// of 256 records). Aux notices are far smaller.
pub const MESSAGE_BYTES_MAX: usize = MESSAGE_HEADER_BYTES + MESSAGE_BODY_BYTES_MAX;
const _: () = assert!(crate::aux::NOTICE_BYTES <= MESSAGE_BYTES_MAX);

/// Bytes of one receive buffer: the largest message rounded up to a power of two (16 KiB), so
/// that every protocol message fits one receive.
pub const RECV_BUFFER_BYTES: usize = MESSAGE_BYTES_MAX.next_power_of_two();
const _: () = assert!(RECV_BUFFER_BYTES == 16 << 10);

/// Receives posted per QP by default: 256 × 16 KiB = 4 MiB registered per QP. The role's event
/// channel holds thousands of events, so the receives run out only when the role has stalled.
pub const RECV_DEPTH_DEFAULT: u32 = 256;

/// The send arena per QP by default. See the module docs.
pub const SEND_ARENA_BYTES_DEFAULT: usize = 64 << 20;

/// Arena spans start on cache lines: copies into them stay aligned.
const ARENA_ALIGN_BYTES: u64 = 64;

/// Inline sizes asked of the device, largest first: 256 bytes carry a one-record order batch
/// (32 + 48 bytes) and aux writes inline; devices that inline less get the next ask.
const INLINE_ASKS_BYTES: [u32; 3] = [INLINE_MAX_BYTES_DEFAULT, 64, 0];
pub use crate::link::INLINE_MAX_BYTES_DEFAULT;

/// How long the poller keeps polling after the last completion before it sleeps: a reply
/// (an order's ACK) usually follows a completion closely.
pub const SPIN_AFTER_COMPLETION: Duration = Duration::from_micros(50);

/// How long the poller busy-polls outstanding work that produces no completion: a round trip
/// on a NIC is microseconds, so longer means a slow link or a dead peer, which is waited for
/// sleeping (a dead peer takes up to `RtsParams::dead_peer_bound`).
pub const BUSY_POLL_OUTSTANDING_MAX: Duration = Duration::from_millis(1);

/// Busy polling yields to other tasks after every poll, but glommio only reaps network and disk
/// I/O, and wakes from other threads (such as another QP's helper), when no task is runnable
/// (or at its 100 ms preemption timer): after this long of continuous busy polling the poller
/// parks on a timer for [`REACTOR_PARK`] so that the reactor runs.
pub const BUSY_SLICE_MAX: Duration = Duration::from_micros(250);

/// The park of a busy poller. It must outlast the time from creating a glommio timer to its
/// first poll, or the timer is already due then and the task never leaves the run queue (a
/// 1 µs timer measured 5-15 µs "parks" that never reached the reactor in a soft-RoCE guest).
pub const REACTOR_PARK: Duration = Duration::from_micros(10);

/// How long the helper thread waits for a completion event before checking whether to stop:
/// the bound on how long the thread outlives its queue pair.
pub const HELPER_WAIT: Duration = Duration::from_millis(100);

/// How long a queue pair whose liveness channel closed waits before moving to the error state,
/// so that completions already on their way (a remote-access error that made the peer fail)
/// arrive with their real status rather than as flushes.
pub const LIVENESS_GRACE: Duration = Duration::from_millis(20);

/// Completions taken per poll.
const POLL_BATCH: usize = 32;

/// Receive work requests carry this bit in their wr_id; send work requests carry their posting
/// sequence number, which never reaches it.
const RECV_TAG: u64 = 1 << 63;

/// Which end of the connection a side is in the endpoint exchange: the client speaks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Settings of a [`VerbsDomain`].
#[derive(Clone, Copy, Debug)]
pub struct VerbsConfig {
    /// The device port (ports count from 1).
    pub port: u8,
    /// How to pick the source GID; `None`: RoCE v2 IPv4-mapped on Ethernet, index 0 otherwise.
    pub gid: Option<GidSelector>,
    /// Send arena per QP (registered and pinned).
    pub send_arena_bytes: usize,
    /// Work requests outstanding per QP, lowered to what the device allows.
    pub send_queue_depth: u32,
    /// Receives posted per QP, lowered to what the device allows.
    pub recv_depth: u32,
    /// Timers and retries of connected QPs; `ordinal-hw`'s defaults (a dead peer within 1.88 s).
    pub rts: RtsParams,
    /// How long a poller keeps polling after a completion before it sleeps
    /// ([`SPIN_AFTER_COMPLETION`]); longer trades CPU for latency on replies that come later.
    pub spin_after_completion: Duration,
    /// How long a poller busy-polls outstanding work without a completion
    /// ([`BUSY_POLL_OUTSTANDING_MAX`]).
    pub busy_poll_outstanding_max: Duration,
    /// Largest inline payload asked of the device ([`INLINE_MAX_BYTES_DEFAULT`]); a device that
    /// grants less gets the next smaller of [`INLINE_ASKS_BYTES`].
    pub inline_max_bytes: u32,
}

impl Default for VerbsConfig {
    fn default() -> VerbsConfig {
        VerbsConfig {
            port: 1,
            gid: None,
            send_arena_bytes: SEND_ARENA_BYTES_DEFAULT,
            send_queue_depth: SEND_QUEUE_DEPTH as u32,
            recv_depth: RECV_DEPTH_DEFAULT,
            rts: RtsParams::default(),
            spin_after_completion: SPIN_AFTER_COMPLETION,
            busy_poll_outstanding_max: BUSY_POLL_OUTSTANDING_MAX,
            inline_max_bytes: INLINE_MAX_BYTES_DEFAULT,
        }
    }
}

/// One daemon's RDMA device: its context, port, GID and MTU, and the settings of its QPs.
pub struct VerbsDomain {
    context: Arc<Context>,
    config: VerbsConfig,
    gid_index: u8,
    gid: Gid,
    lid: u16,
    mtu: Mtu,
}

impl std::fmt::Debug for VerbsDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDomain")
            .field("device", &self.context.name())
            .field("port", &self.config.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &self.gid)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl VerbsDomain {
    /// Opens `device` (such as `rxe0`) with the default settings.
    pub fn open(device: &str) -> Result<Rc<VerbsDomain>, String> {
        VerbsDomain::open_with(device, VerbsConfig::default())
    }

    pub fn open_with(device: &str, config: VerbsConfig) -> Result<Rc<VerbsDomain>, String> {
        assert!(config.send_queue_depth > 0 && config.recv_depth > 0);
        if config.send_arena_bytes < FRAME_PAYLOAD_BYTES_MAX {
            return Err(format!(
                "a send arena of {} bytes cannot hold the largest work request ({FRAME_PAYLOAD_BYTES_MAX} bytes)",
                config.send_arena_bytes
            ));
        }
        let context = Context::open(device).map_err(|error| error.to_string())?;
        let port = context
            .query_port(config.port)
            .map_err(|error| error.to_string())?;
        if port.state != PortState::Active {
            return Err(format!(
                "port {} of RDMA device {device} is {:?}, not active (is its netdev up?)",
                config.port, port.state
            ));
        }
        let selector = config.gid.unwrap_or(match port.link_layer {
            LinkLayer::Ethernet => GidSelector::RoceV2Ipv4,
            _ => GidSelector::Index(0),
        });
        let (gid_index, gid) = context
            .select_gid(config.port, selector)
            .map_err(|error| error.to_string())?;
        // A CQ holds every completion its QP can have outstanding (sends and receives), so the
        // queue depths are lowered together to what the device's queues and CQs allow.
        let device_limits = context.attributes();
        let mut config = config;
        config.recv_depth = config.recv_depth.min(device_limits.max_qp_wr);
        config.send_queue_depth = config.send_queue_depth.min(device_limits.max_qp_wr);
        if device_limits.max_cqe > 0 {
            let room = device_limits.max_cqe.saturating_sub(config.recv_depth);
            assert!(room > 0, "the device's CQs cannot hold the receive queue");
            config.send_queue_depth = config.send_queue_depth.min(room);
        }
        Ok(Rc::new(VerbsDomain {
            context,
            config,
            gid_index,
            gid,
            lid: port.lid,
            mtu: port.active_mtu,
        }))
    }

    pub fn device_name(&self) -> &str {
        self.context.name()
    }

    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The index of [`gid`](Self::gid) in the port's GID table (perftest's `-x`).
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }

    pub fn mtu(&self) -> Mtu {
        self.mtu
    }

    /// The settings in force (queue depths lowered to the device's limits).
    pub fn config(&self) -> VerbsConfig {
        self.config
    }

    pub(crate) fn new_pd(&self) -> Result<Arc<ProtectionDomain>, String> {
        ProtectionDomain::new(&self.context).map_err(|error| error.to_string())
    }
}

/// The device side of a verbs [`RegionTable`]: its domain and its own protection domain.
pub(crate) struct TableDomain {
    domain: Rc<VerbsDomain>,
    pd: Arc<ProtectionDomain>,
}

impl TableDomain {
    pub(crate) fn new(domain: &Rc<VerbsDomain>) -> Result<TableDomain, String> {
        Ok(TableDomain {
            domain: domain.clone(),
            pd: domain.new_pd()?,
        })
    }

    /// The protection domain for a queue pair of `domain` on this table.
    pub(crate) fn pd_for(&self, domain: &Rc<VerbsDomain>) -> Result<Arc<ProtectionDomain>, String> {
        if !Rc::ptr_eq(&self.domain, domain) {
            return Err(format!(
                "the region table belongs to RDMA device {}, the queue pair to {}",
                self.domain.device_name(),
                domain.device_name()
            ));
        }
        Ok(self.pd.clone())
    }

    /// Registers the first `len` bytes of `memory` with the least rights that serve `access`.
    pub(crate) fn register(
        &self,
        memory: &Rc<dyn RegionMemory>,
        len: u64,
        access: u32,
    ) -> Result<RegisteredRegion, String> {
        let known = ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ;
        if access == 0 || access & !known != 0 {
            return Err(format!(
                "region access {access:#x} is not remote write and/or read"
            ));
        }
        let span = memory.stable_span().ok_or(
            "the region's memory can move (RegionMemory::stable_span is None): it cannot be registered with an RDMA device",
        )?;
        let len = usize::try_from(len).map_err(|_| format!("a region of {len} bytes"))?;
        if len == 0 || len > span.len() {
            return Err(format!(
                "a region of {len} bytes over {} bytes of memory",
                span.len()
            ));
        }
        // A remote write needs LOCAL_WRITE as well (ibv_reg_mr(3)); nothing more is granted.
        let mut rights = Access::NONE;
        if access & ACCESS_REMOTE_WRITE != 0 {
            rights = rights | Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        }
        if access & ACCESS_REMOTE_READ != 0 {
            rights = rights | Access::REMOTE_READ;
        }
        // SAFETY: `StableSpan::new`'s contract makes the span valid and fixed for as long as
        // `memory` lives, with its owner accepting device writes; the RegisteredRegion holds an
        // Rc of `memory` and drops the memory region (deregisters) before it.
        let raw = unsafe { RawMemory::new(span.ptr(), len) };
        let mr = MemoryRegion::new(&self.pd, raw, rights).map_err(|error| error.to_string())?;
        Ok(RegisteredRegion {
            mr,
            _memory: memory.clone(),
        })
    }
}

/// A region registered with the device, keeping its memory alive. Dropping it deregisters the
/// region: the NIC refuses later accesses with its rkey (remote-access error at the peer).
pub(crate) struct RegisteredRegion {
    // Declared first: deregistered before the memory below can be released.
    mr: MemoryRegion<RawMemory>,
    _memory: Rc<dyn RegionMemory>,
}

impl RegisteredRegion {
    pub(crate) fn addr(&self) -> u64 {
        self.mr.addr()
    }

    pub(crate) fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoint exchange.

const EXCHANGE_MAGIC: [u8; 4] = *b"ORDV";
/// The TCP transport's frame magic: what a peer in TCP mode sends first.
const TCP_FRAME_MAGIC: [u8; 4] = *b"ORDT";
const EXCHANGE_VERSION: u8 = 1;
const EXCHANGE_BYTES: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExchangeKind {
    Request = 1,
    Answer = 2,
    Ready = 3,
}

/// One message of the exchange (48 bytes, little-endian): magic, version, kind, 2 zero bytes,
/// the endpoint (26 bytes), the MTU (verbs' enum value), a zero byte, the receive buffer size,
/// the receive depth, 4 zero bytes. "Ready" carries only the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exchange {
    kind: ExchangeKind,
    endpoint: Endpoint,
    mtu: Mtu,
    recv_buffer_bytes: u32,
    recv_depth: u32,
}

impl Exchange {
    fn ready() -> Exchange {
        Exchange {
            kind: ExchangeKind::Ready,
            endpoint: Endpoint {
                qpn: 0,
                psn: 0,
                gid: Gid::default(),
                lid: 0,
            },
            mtu: Mtu::Mtu256,
            recv_buffer_bytes: 0,
            recv_depth: 0,
        }
    }

    fn encode(&self) -> [u8; EXCHANGE_BYTES] {
        let mut out = [0u8; EXCHANGE_BYTES];
        out[0..4].copy_from_slice(&EXCHANGE_MAGIC);
        out[4] = EXCHANGE_VERSION;
        out[5] = self.kind as u8;
        out[8..34].copy_from_slice(&self.endpoint.encode());
        out[34] = self.mtu.to_raw() as u8;
        out[36..40].copy_from_slice(&self.recv_buffer_bytes.to_le_bytes());
        out[40..44].copy_from_slice(&self.recv_depth.to_le_bytes());
        out
    }

    /// Decodes what the peer sent, expecting `expected`; the error says what the peer is if it
    /// is not a verbs peer.
    fn decode(bytes: &[u8; EXCHANGE_BYTES], expected: ExchangeKind) -> Result<Exchange, String> {
        check_magic(&bytes[0..4])?;
        if bytes[4] != EXCHANGE_VERSION {
            return Err(format!(
                "the peer speaks verbs exchange version {}, this side {EXCHANGE_VERSION}",
                bytes[4]
            ));
        }
        if bytes[5] != expected as u8 {
            return Err(format!(
                "expected a verbs {expected:?} from the peer, got message kind {}",
                bytes[5]
            ));
        }
        if bytes[6..8] != [0, 0] || bytes[35] != 0 || bytes[44..48] != [0; 4] {
            return Err("reserved bytes of the peer's verbs endpoint are not zero".into());
        }
        let endpoint = Endpoint::decode(&bytes[8..34])
            .ok_or("the peer's QP number or PSN does not fit 24 bits")?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let exchange = Exchange {
            kind: expected,
            endpoint,
            mtu: Mtu::from_raw(u32::from(bytes[34])),
            recv_buffer_bytes: u32_at(36),
            recv_depth: u32_at(40),
        };
        if expected != ExchangeKind::Ready
            && (exchange.recv_buffer_bytes < 64 || exchange.recv_depth == 0)
        {
            return Err(format!(
                "the peer offers {} receives of {} bytes",
                exchange.recv_depth, exchange.recv_buffer_bytes
            ));
        }
        Ok(exchange)
    }
}

/// Checks the first four bytes the peer sent, naming what it is when it is not a verbs peer.
fn check_magic(magic: &[u8]) -> Result<(), String> {
    if magic == EXCHANGE_MAGIC {
        Ok(())
    } else if magic == TCP_FRAME_MAGIC {
        Err("the peer speaks ordinal's TCP transport, not verbs: start both ends with the same transport (an RDMA device on both, or on neither)".into())
    } else {
        Err(format!(
            "the peer is not in verbs mode: it sent \"{}\" where a verbs endpoint (magic \"ORDV\") was expected",
            magic.escape_ascii()
        ))
    }
}

/// Describes a socket error of the exchange; a peer that hung up is said to have done so.
fn exchange_error(error: std::io::Error, doing: &str) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => format!(
            "the peer closed the connection during the verbs endpoint exchange, {doing}: it may run the TCP transport, or it could not connect its queue pair (its log says why)"
        ),
        _ => format!("the verbs endpoint exchange failed {doing}: {error}"),
    }
}

/// Reads exactly `buffer.len()` bytes within the transport timeout.
async fn read_within(stream: &mut TcpStream, buffer: &mut [u8], what: &str) -> Result<(), String> {
    let read = async {
        stream
            .read_exact(buffer)
            .await
            .map_err(|error| exchange_error(error, &format!("waiting for its {what}")))
    };
    let timeout = async {
        glommio::timer::sleep(TRANSPORT_TIMEOUT).await;
        Err(format!(
            "no verbs {what} from the peer within {} s (is it in verbs mode?)",
            TRANSPORT_TIMEOUT.as_secs()
        ))
    };
    futures_lite::future::or(read, timeout).await
}

async fn receive_exchange(stream: &mut TcpStream, kind: ExchangeKind) -> Result<Exchange, String> {
    let what = match kind {
        ExchangeKind::Request => "endpoint request",
        ExchangeKind::Answer => "endpoint answer",
        ExchangeKind::Ready => "ready message",
    };
    let mut bytes = [0u8; EXCHANGE_BYTES];
    // The magic first, so that a short message of another protocol is named, not waited for.
    read_within(stream, &mut bytes[0..4], what).await?;
    check_magic(&bytes[0..4])?;
    read_within(stream, &mut bytes[4..], what).await?;
    Exchange::decode(&bytes, kind)
}

async fn send_exchange(stream: &mut TcpStream, exchange: &Exchange) -> Result<(), String> {
    stream
        .write_all(&exchange.encode())
        .await
        .map_err(|error| exchange_error(error, &format!("sending our {:?}", exchange.kind)))
}

// ---------------------------------------------------------------------------------------------
// Queue pairs.

/// The send arena: a registered buffer handed out in spans by an [`ArenaRing`].
struct Arena {
    mr: MemoryRegion<PageBuffer>,
    ring: ArenaRing,
}

/// Hands out contiguous spans of a ring of `capacity` bytes, first in first out. Positions
/// count bytes since the start and never wrap; `position % capacity` is the offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ArenaRing {
    capacity: u64,
    /// End of the newest span handed out.
    alloc_position: u64,
    /// End of the oldest span still in use (everything before it is free).
    free_position: u64,
}

impl ArenaRing {
    fn new(capacity: u64) -> ArenaRing {
        assert!(capacity >= ARENA_ALIGN_BYTES && capacity % ARENA_ALIGN_BYTES == 0);
        ArenaRing {
            capacity,
            alloc_position: 0,
            free_position: 0,
        }
    }

    /// Hands out `len` contiguous bytes: their offset and the position that frees them. A span
    /// never wraps around the end; the bytes skipped at the end are freed with it. `None` when
    /// the ring has no room (or `len` is 0 or larger than the ring).
    fn reserve(&mut self, len: usize) -> Option<(usize, u64)> {
        let len = (len as u64).div_ceil(ARENA_ALIGN_BYTES) * ARENA_ALIGN_BYTES;
        if len == 0 || len > self.capacity {
            return None;
        }
        let mut start = self.alloc_position;
        let offset = start % self.capacity;
        if offset + len > self.capacity {
            start += self.capacity - offset;
        }
        if self.free_position == self.alloc_position {
            // Nothing is in use: the skipped tail costs nothing.
            self.free_position = start;
        }
        let end = start + len;
        if end - self.free_position > self.capacity {
            return None;
        }
        self.alloc_position = end;
        let offset = start % self.capacity;
        assert!(offset + len <= self.capacity);
        Some((offset as usize, end))
    }

    /// Frees every span up to `end` (completions come in posting order).
    fn release(&mut self, end: u64) {
        assert!(
            self.free_position <= end && end <= self.alloc_position,
            "arena release out of order"
        );
        self.free_position = end;
    }

    #[cfg(test)]
    fn in_use(&self) -> u64 {
        self.alloc_position - self.free_position
    }
}

/// A work request posted and not yet completed.
#[derive(Clone, Copy, Debug)]
struct Posted {
    /// The hardware wr_id: the posting sequence number.
    seq: u64,
    wr_id: u64,
    opcode: Opcode,
    /// The arena span (offset, length, release position) of a non-inline request.
    arena: Option<(usize, usize, u64)>,
}

/// What the device works on. Field order is drop order, and it matters: the QP is destroyed
/// first, so the device no longer touches the arena or the receive buffers when they are
/// deregistered and unmapped.
struct Resources {
    qp: hw::QueuePair,
    arena: Arena,
    recv_pool: MemoryRegion<PageBuffer>,
    posted: VecDeque<Posted>,
    next_seq: u64,
}

pub(crate) struct VerbsQp {
    id: u32,
    events: Sender<TransportEvent>,
    res: RefCell<Resources>,
    cq: Arc<CompletionQueue>,
    doorbell: Arc<Doorbell>,
    /// Set once the pair failed; posts fail from then on.
    down: Cell<bool>,
    /// Why it failed: the first reason wins (see `go_down`).
    reason: RefCell<Option<String>>,
    /// The reason is a closed liveness channel or a flush, which an error may still replace.
    reason_tentative: Cell<bool>,
    /// Set once `Down` was delivered; the poller then ends.
    down_reported: Cell<bool>,
    /// Set once the device QP was moved to the error state (which flushes what is posted).
    error_requested: Cell<bool>,
    /// Set if the device refused that move: the outstanding requests are then flushed here.
    flush_here: Cell<bool>,
    /// The liveness socket while its task holds it, to shut it down when the pair fails.
    liveness_fd: Cell<Option<RawFd>>,
    send_depth: usize,
    spin_after_completion: Duration,
    busy_poll_outstanding_max: Duration,
    inline_bytes_max: usize,
    recv_buffers: usize,
    /// The largest SEND the peer's receive buffers take.
    peer_recv_bytes_max: usize,
    /// The peer's regions are reached through this table's protection domain; kept so its
    /// regions stay registered while the pair lives.
    _regions: Rc<RegionTable>,
}

/// The handle a [`QueuePair`](crate::transport::QueuePair) holds. Dropping the last one fails
/// the pair, which closes the liveness channel so the peer notices at once.
pub(crate) struct VerbsHandle {
    qp: Rc<VerbsQp>,
}

impl Drop for VerbsHandle {
    fn drop(&mut self) {
        self.qp.fail("every handle of the queue pair was dropped");
    }
}

impl VerbsHandle {
    pub(crate) fn id(&self) -> u32 {
        self.qp.id
    }

    pub(crate) fn is_down(&self) -> bool {
        self.qp.down.get()
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.qp.res.borrow().posted.len()
    }

    pub(crate) fn post_send(&self, wr_id: u64, bytes: &[u8]) -> Result<(), PostError> {
        self.qp.post(wr_id, Opcode::Send, bytes, 0, None, None)
    }

    pub(crate) fn post_write(
        &self,
        wr_id: u64,
        bytes: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), PostError> {
        let opcode = match imm {
            Some(_) => Opcode::WriteWithImm,
            None => Opcode::Write,
        };
        let remote = RemoteAddr {
            addr: remote_addr,
            rkey,
        };
        self.qp.post(wr_id, opcode, bytes, 0, Some(remote), imm)
    }

    pub(crate) fn post_read(
        &self,
        wr_id: u64,
        remote_addr: u64,
        rkey: u32,
        len: u32,
    ) -> Result<(), PostError> {
        let remote = RemoteAddr {
            addr: remote_addr,
            rkey,
        };
        self.qp
            .post(wr_id, Opcode::Read, &[], len, Some(remote), None)
    }

    pub(crate) fn fail(&self, reason: &str) {
        self.qp.fail(reason);
    }

    pub(crate) fn reset_silently_for_tests(&self) {
        let mut res = self.qp.res.borrow_mut();
        let _ = res.qp.to_reset();
        // A reset QP completes nothing and touches no memory: forget what was posted.
        res.posted.clear();
        let end = res.arena.ring.alloc_position;
        res.arena.ring.release(end);
    }
}

impl VerbsQp {
    fn post(
        &self,
        wr_id: u64,
        opcode: Opcode,
        bytes: &[u8],
        read_len: u32,
        remote: Option<RemoteAddr>,
        imm: Option<u32>,
    ) -> Result<(), PostError> {
        if self.down.get() {
            return Err(PostError::Down);
        }
        let len = match opcode {
            Opcode::Read => read_len as usize,
            _ => bytes.len(),
        };
        let len_max = match opcode {
            Opcode::Send => self.peer_recv_bytes_max,
            _ => FRAME_PAYLOAD_BYTES_MAX,
        };
        if len > len_max {
            return Err(PostError::TooLarge);
        }
        let mut guard = self.res.borrow_mut();
        let res = &mut *guard;
        if res.posted.len() >= self.send_depth {
            return Err(PostError::QueueFull);
        }
        let inline = opcode != Opcode::Read && len > 0 && len <= self.inline_bytes_max;
        let ring_before = res.arena.ring;
        let mut arena = None;
        let sge = if len == 0 {
            None
        } else if inline {
            // Inline bytes are copied into the work request by the post itself; the lkey is
            // not checked.
            Some(Sge {
                addr: bytes.as_ptr() as u64,
                len: len as u32,
                lkey: 0,
            })
        } else {
            let (offset, end) = res.arena.ring.reserve(len).ok_or(PostError::QueueFull)?;
            if opcode != Opcode::Read {
                res.arena.mr.write(offset, bytes);
            }
            arena = Some((offset, len, end));
            Some(res.arena.mr.sge(offset, len as u32))
        };
        let op = match (opcode, remote) {
            (Opcode::Send, None) => SendOp::Send,
            (Opcode::Write, Some(remote)) => SendOp::RdmaWrite(remote),
            (Opcode::WriteWithImm, Some(remote)) => {
                SendOp::RdmaWriteWithImm(remote, imm.expect("WRITE with immediate has one"))
            }
            (Opcode::Read, Some(remote)) => SendOp::RdmaRead(remote),
            (opcode, remote) => unreachable!("{opcode:?} with remote {remote:?}"),
        };
        let seq = res.next_seq;
        assert!(seq & RECV_TAG == 0);
        let sges = match &sge {
            Some(sge) => std::slice::from_ref(sge),
            None => &[],
        };
        let mut request = SendWr::new(seq, op, sges).signaled();
        if inline {
            request = request.inline();
        }
        // SAFETY: the posting contract of ordinal-hw holds for every buffer this request
        // names. An inline payload is copied during the call (ibv_post_send(3)), so the
        // caller's slice may go right after. An arena span is handed out again only after
        // this request's completion has been polled: every request is signaled, RC completes
        // them in posting order, and the poller releases spans in that order. The arena's
        // memory region and the QP live in the same `Resources`, the QP declared first, so the
        // QP is destroyed (the device stops) before the arena is deregistered and unmapped.
        let result = unsafe { res.qp.post_send(&[request]) };
        match result {
            Ok(()) => {
                res.next_seq += 1;
                res.posted.push_back(Posted {
                    seq,
                    wr_id,
                    opcode,
                    arena,
                });
                Ok(())
            }
            Err(error) => {
                // Nothing was queued: the span is free again (it was the newest).
                res.arena.ring = ring_before;
                if let hw::Error::PostSend { errno, .. } = &error {
                    if errno.0 == libc::ENOMEM {
                        return Err(PostError::QueueFull);
                    }
                }
                drop(guard);
                self.fail(&format!("posting a work request failed: {error}"));
                Err(PostError::Down)
            }
        }
    }

    /// Posts receive buffer `index` again.
    fn post_receive(&self, res: &mut Resources, index: usize) -> Result<(), String> {
        assert!(index < self.recv_buffers);
        let sge = res
            .recv_pool
            .sge(index * RECV_BUFFER_BYTES, RECV_BUFFER_BYTES as u32);
        let request = RecvWr {
            wr_id: RECV_TAG | index as u64,
            sges: std::slice::from_ref(&sge),
        };
        // SAFETY: buffer `index` of the receive pool is free: it was never posted, or its
        // completion has been polled and its bytes copied out. The pool's memory region lives
        // in the same `Resources` as the QP, declared after it, so it outlives the device's
        // use of it.
        unsafe { res.qp.post_recv(&[request]) }.map_err(|error| error.to_string())
    }

    /// Marks the pair down with `reason` and wakes the poller, which reports `Down` once every
    /// posted request has completed. The first reason wins, except over a `tentative` one: a
    /// closed liveness channel or a flush says less than an error completion that follows it
    /// (a peer that refused our request fails its pair and closes the channel, which may be
    /// seen before our remote-access error completion says what really happened).
    fn go_down(&self, reason: &str, tentative: bool) {
        let was_down = self.down.replace(true);
        let replaces = !was_down || (self.reason_tentative.get() && !tentative);
        if !replaces {
            return;
        }
        self.reason_tentative.set(tentative);
        *self.reason.borrow_mut() = Some(reason.to_string());
        if !was_down {
            self.doorbell.ring();
        }
    }

    /// Moves the device QP to the error state, which completes every posted request with a
    /// flush error, and closes the liveness channel so that the peer notices at once.
    fn enter_error_state(&self) {
        if let Some(fd) = self.liveness_fd.take() {
            // SAFETY: the liveness task owns the socket and clears `liveness_fd` before it lets
            // go of it, so `fd` is open and ours. shutdown(2) only ends its traffic, which ends
            // the task's pending read and sends the peer end-of-file.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if self.error_requested.replace(true) {
            return;
        }
        if let Err(error) = self.res.borrow_mut().qp.to_error() {
            crate::log!(
                "verbs qp {}: cannot move the QP to the error state ({error}); flushing its work requests without the device",
                self.id
            );
            self.flush_here.set(true);
        }
        self.doorbell.ring();
    }

    /// Fails the pair now: down, error state, liveness channel closed. Idempotent.
    fn fail(&self, reason: &str) {
        self.go_down(reason, false);
        self.enter_error_state();
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        match self.cq.poll(out) {
            Ok(n) => n,
            Err(error) => {
                self.fail(&format!("polling the completion queue failed: {error}"));
                0
            }
        }
    }

    /// Handles one completion. False when the role's event channel is gone.
    async fn handle(&self, wc: WorkCompletion) -> bool {
        if wc.wr_id & RECV_TAG != 0 {
            self.handle_receive(wc).await
        } else {
            self.handle_send(wc).await
        }
    }

    async fn handle_send(&self, wc: WorkCompletion) -> bool {
        let (posted, data) = {
            let mut res = self.res.borrow_mut();
            let posted = res
                .posted
                .pop_front()
                .expect("a send completion with nothing posted");
            assert_eq!(
                posted.seq, wc.wr_id,
                "send completions out of posting order"
            );
            let data = match (posted.opcode, posted.arena, wc.status) {
                (Opcode::Read, Some((offset, len, _)), WcStatus::Success) => {
                    let mut data = vec![0u8; len];
                    res.arena.mr.read(offset, &mut data);
                    Some(data)
                }
                (Opcode::Read, None, WcStatus::Success) => Some(Vec::new()),
                _ => None,
            };
            if let Some((_, _, end)) = posted.arena {
                res.arena.ring.release(end);
            }
            (posted, data)
        };
        let status = work_status(wc.status);
        if status != WorkStatus::Success {
            // A flush only says that the pair failed earlier: it never hides a better reason.
            let flushed = wc.status == WcStatus::WrFlushErr;
            let reason = format!(
                "{:?} work request {} failed: {}",
                posted.opcode, posted.wr_id, wc.status
            );
            self.go_down(&reason, flushed);
            self.enter_error_state();
        }
        let event = TransportEvent::Completion {
            qp: self.id,
            wr_id: posted.wr_id,
            opcode: posted.opcode,
            status,
            data,
        };
        self.events.send(event).await.is_ok()
    }

    async fn handle_receive(&self, wc: WorkCompletion) -> bool {
        let index = (wc.wr_id & !RECV_TAG) as usize;
        assert!(index < self.recv_buffers, "receive wr_id out of range");
        if wc.status != WcStatus::Success {
            if wc.status == WcStatus::WrFlushErr {
                self.go_down("the queue pair entered the error state (its receives were flushed): the peer's request was refused, or the transport failed", true);
                self.enter_error_state();
            } else {
                self.fail(&format!("a receive failed: {}", wc.status));
            }
            return true;
        }
        let event = {
            let mut guard = self.res.borrow_mut();
            let res = &mut *guard;
            let event = match wc.opcode {
                Some(WcOpcode::Recv) => {
                    let len = wc.byte_len as usize;
                    assert!(len <= RECV_BUFFER_BYTES, "a receive longer than its buffer");
                    let mut bytes = vec![0u8; len];
                    res.recv_pool.read(index * RECV_BUFFER_BYTES, &mut bytes);
                    Some(TransportEvent::Received { qp: self.id, bytes })
                }
                Some(WcOpcode::RecvRdmaWithImm) => Some(TransportEvent::ReceivedImm {
                    qp: self.id,
                    imm: wc.imm_data.unwrap_or(0),
                }),
                _ => None,
            };
            // The buffer's bytes are copied out: post it again at once, so that the peer
            // finds a receive even while the event waits for room in the role's channel.
            let reposted = if self.down.get() {
                Ok(())
            } else {
                self.post_receive(res, index)
            };
            match (event, reposted) {
                (Some(event), Ok(())) => event,
                (None, _) => {
                    drop(guard);
                    self.fail(&format!("a receive completed with opcode {:?}", wc.opcode));
                    return true;
                }
                (Some(_), Err(error)) => {
                    drop(guard);
                    self.fail(&format!("re-posting a receive failed: {error}"));
                    return true;
                }
            }
        };
        self.events.send(event).await.is_ok()
    }

    /// Reports `Down` once the pair is down and every posted request has completed. True once
    /// reported (the poller then ends).
    async fn report_down_if_drained(&self) -> bool {
        if self.down_reported.get() {
            return true;
        }
        if !self.down.get() {
            return false;
        }
        if self.flush_here.get() {
            // The device could not be moved to the error state: complete what it holds here.
            loop {
                let posted = self.res.borrow_mut().posted.pop_front();
                let Some(posted) = posted else { break };
                let event = TransportEvent::Completion {
                    qp: self.id,
                    wr_id: posted.wr_id,
                    opcode: posted.opcode,
                    status: WorkStatus::Flushed,
                    data: None,
                };
                let _ = self.events.send(event).await;
            }
        }
        if !self.res.borrow().posted.is_empty() {
            return false;
        }
        self.down_reported.set(true);
        let reason = self
            .reason
            .borrow()
            .clone()
            .unwrap_or_else(|| "queue pair failed".into());
        let _ = self
            .events
            .send(TransportEvent::Down {
                qp: self.id,
                reason,
            })
            .await;
        true
    }
}

/// The transport's status for a verbs completion status. See the module docs.
fn work_status(status: WcStatus) -> WorkStatus {
    match status {
        WcStatus::Success => WorkStatus::Success,
        WcStatus::RemAccessErr => WorkStatus::RemoteAccessError,
        WcStatus::WrFlushErr | WcStatus::RetryExcErr => WorkStatus::Flushed,
        _ => WorkStatus::RemoteOperationError,
    }
}

/// A verbs queue pair connected to its peer (RTS, receives posted) whose completions nobody
/// polls yet: what arrives waits in the completion queue until [`Prepared::activate`]. This lets
/// the slow, asynchronous part (the endpoint exchange) run in a connection's own task while the
/// role's loop starts the pair when it is ready to hear of it, so that no event can reach the
/// loop before the loop knows the queue pair.
pub(crate) struct Prepared {
    state: Rc<VerbsQp>,
    stream: TcpStream,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("id", &self.state.id)
            .finish()
    }
}

/// Creates, connects and starts a verbs queue pair; see `QueuePair::start_verbs`.
pub(crate) async fn start(
    domain: &Rc<VerbsDomain>,
    stream: TcpStream,
    regions: Rc<RegionTable>,
    events: Sender<TransportEvent>,
    side: Side,
) -> Result<VerbsHandle, String> {
    prepare(domain, stream, regions, events, side)
        .await?
        .activate()
}

/// Creates and connects a verbs queue pair; see [`Prepared`].
pub(crate) async fn prepare(
    domain: &Rc<VerbsDomain>,
    mut stream: TcpStream,
    regions: Rc<RegionTable>,
    events: Sender<TransportEvent>,
    side: Side,
) -> Result<Prepared, String> {
    let _ = stream.set_nodelay(true);
    let config = domain.config;
    let pd = regions.verbs_pd(domain)?;
    let hw_error = |what: &str, error: hw::Error| format!("{what}: {error}");
    let channel = CompletionChannel::new(&domain.context)
        .map_err(|error| hw_error("completion channel", error))?;
    let cq_entries = config.send_queue_depth + config.recv_depth;
    let cq = CompletionQueue::new(&domain.context, cq_entries, Some(&channel))
        .map_err(|error| hw_error("completion queue", error))?;
    let mut created = Err(String::new());
    let smaller_asks = INLINE_ASKS_BYTES
        .into_iter()
        .filter(|ask| *ask < config.inline_max_bytes);
    for inline in std::iter::once(config.inline_max_bytes).chain(smaller_asks) {
        let caps = QpCaps {
            max_send_wr: config.send_queue_depth,
            max_recv_wr: config.recv_depth,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: inline,
        };
        created = hw::QueuePair::new(&pd, &cq, &cq, caps).map_err(|error| error.to_string());
        if created.is_ok() {
            break;
        }
    }
    let mut qp = created?;
    let recv_buffers = config.recv_depth as usize;
    let (arena, recv_pool) = {
        let pd = pd.clone();
        let (arena_bytes, pool_bytes) = (config.send_arena_bytes, recv_buffers * RECV_BUFFER_BYTES);
        // Registering faults in and pins every page of both buffers (64 + 4 MiB by default):
        // milliseconds on a host, but most of a second in an emulated guest. On the executor's
        // thread that would stall the role's loop, and a primary whose heartbeats stall that
        // long while it connects is fenced by its aux (seen in the guest suite); on glommio's
        // blocking thread the loop keeps running.
        glommio::executor()
            .spawn_blocking(move || -> Result<_, String> {
                let arena_buffer = PageBuffer::new(arena_bytes)
                    .map_err(|error| format!("allocating the send arena: {error}"))?;
                // LOCAL_WRITE: READs land in the arena too.
                let arena = MemoryRegion::new(&pd, arena_buffer, Access::LOCAL_WRITE)
                    .map_err(|error| format!("registering the send arena: {error}"))?;
                let pool_buffer = PageBuffer::new(pool_bytes)
                    .map_err(|error| format!("allocating the receive buffers: {error}"))?;
                let recv_pool = MemoryRegion::new(&pd, pool_buffer, Access::LOCAL_WRITE)
                    .map_err(|error| format!("registering the receive buffers: {error}"))?;
                Ok((arena, recv_pool))
            })
            .await?
    };
    qp.to_init(config.port, Access::REMOTE_WRITE | Access::REMOTE_READ)
        .map_err(|error| error.to_string())?;
    let granted = qp.caps();
    let ours = Exchange {
        kind: match side {
            Side::Client => ExchangeKind::Request,
            Side::Server => ExchangeKind::Answer,
        },
        endpoint: qp.endpoint(domain.gid, domain.lid),
        mtu: domain.mtu,
        recv_buffer_bytes: RECV_BUFFER_BYTES as u32,
        recv_depth: config.recv_depth,
    };
    let state = VerbsQp {
        id: next_qp_id(),
        events,
        res: RefCell::new(Resources {
            qp,
            arena: Arena {
                ring: ArenaRing::new(arena.len() as u64),
                mr: arena,
            },
            recv_pool,
            posted: VecDeque::with_capacity(config.send_queue_depth as usize),
            next_seq: 0,
        }),
        cq,
        doorbell: Arc::new(Doorbell::default()),
        down: Cell::new(false),
        reason: RefCell::new(None),
        reason_tentative: Cell::new(false),
        down_reported: Cell::new(false),
        error_requested: Cell::new(false),
        flush_here: Cell::new(false),
        liveness_fd: Cell::new(None),
        send_depth: config.send_queue_depth as usize,
        spin_after_completion: config.spin_after_completion,
        busy_poll_outstanding_max: config.busy_poll_outstanding_max,
        inline_bytes_max: granted.max_inline_data as usize,
        recv_buffers,
        peer_recv_bytes_max: 0,
        _regions: regions,
    };
    // Receives are posted before the peer learns our endpoint, so that its first SEND finds
    // one (a QP takes receives from INIT on).
    {
        let mut res = state.res.borrow_mut();
        for index in 0..recv_buffers {
            state.post_receive(&mut res, index)?;
        }
    }
    let theirs = match side {
        Side::Client => {
            send_exchange(&mut stream, &ours).await?;
            let theirs = receive_exchange(&mut stream, ExchangeKind::Answer).await?;
            connect(domain, &state, &theirs)?;
            send_exchange(&mut stream, &Exchange::ready()).await?;
            theirs
        }
        Side::Server => {
            let theirs = receive_exchange(&mut stream, ExchangeKind::Request).await?;
            connect(domain, &state, &theirs)?;
            send_exchange(&mut stream, &ours).await?;
            receive_exchange(&mut stream, ExchangeKind::Ready).await?;
            theirs
        }
    };
    let state = Rc::new(VerbsQp {
        peer_recv_bytes_max: theirs.recv_buffer_bytes as usize,
        ..state
    });
    state.liveness_fd.set(Some(stream.as_raw_fd()));
    Ok(Prepared { state, stream })
}

impl Prepared {
    /// Starts polling the pair's completions (and watching its liveness stream).
    pub(crate) fn activate(self) -> Result<VerbsHandle, String> {
        let Prepared { state, stream } = self;
        let cq = state.cq.clone();
        let doorbell = state.doorbell.clone();
        COMPLETION_THREADS.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name(format!("ord-cq{}", state.id))
            .spawn(move || {
                completion_events(cq, doorbell);
                COMPLETION_THREADS.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(error) = spawned {
            COMPLETION_THREADS.fetch_sub(1, Ordering::AcqRel);
            return Err(format!("cannot start the completion-event thread: {error}"));
        }
        glommio::spawn_local(poll_completions(state.clone())).detach();
        glommio::spawn_local(watch_liveness(Rc::downgrade(&state), stream)).detach();
        Ok(VerbsHandle { qp: state })
    }
}

/// Moves the QP to RTR and RTS towards `theirs` with the domain's settings.
fn connect(domain: &VerbsDomain, state: &VerbsQp, theirs: &Exchange) -> Result<(), String> {
    // Both sides must use the smaller of the two ports' MTUs.
    let mtu = domain.mtu.min(theirs.mtu);
    let mut res = state.res.borrow_mut();
    res.qp
        .to_rtr(&RtrParams::new(theirs.endpoint, mtu, domain.gid_index))
        .map_err(|error| error.to_string())?;
    res.qp
        .to_rts(&domain.config.rts)
        .map_err(|error| error.to_string())
}

/// The poller task: delivers completions as events, in CQ order, and `Down` at the end.
async fn poll_completions(qp: Rc<VerbsQp>) {
    // However this task ends (done, or dropped with its executor), the helper thread stops.
    let _stop = StopOnDrop(qp.doorbell.clone());
    let mut completions = [WorkCompletion::default(); POLL_BATCH];
    let mut last_completion = Instant::now();
    let mut busy_since = Instant::now();
    loop {
        if let Some(error) = qp.doorbell.helper_error() {
            qp.fail(&format!("waiting for completion events failed: {error}"));
        }
        let n = qp.poll(&mut completions);
        for wc in &completions[..n] {
            if !qp.handle(*wc).await {
                qp.fail("the role stopped taking transport events");
                return;
            }
        }
        if qp.report_down_if_drained().await {
            return;
        }
        let now = Instant::now();
        if n > 0 {
            last_completion = now;
        }
        let outstanding = !qp.res.borrow().posted.is_empty();
        let idle = now - last_completion;
        if (outstanding && idle < qp.busy_poll_outstanding_max) || idle < qp.spin_after_completion {
            if now - busy_since < BUSY_SLICE_MAX {
                futures_lite::future::yield_now().await;
            } else {
                glommio::timer::sleep(REACTOR_PARK).await;
                busy_since = Instant::now();
            }
            continue;
        }
        // Arm, then poll once more: a completion that arrived before the arming raises no
        // event, and would otherwise wait for the next one.
        if let Err(error) = qp.cq.arm() {
            qp.fail(&format!("arming the completion queue failed: {error}"));
            continue;
        }
        let n = qp.poll(&mut completions);
        if n > 0 {
            for wc in &completions[..n] {
                if !qp.handle(*wc).await {
                    qp.fail("the role stopped taking transport events");
                    return;
                }
            }
            last_completion = Instant::now();
            continue;
        }
        if qp.report_down_if_drained().await {
            return;
        }
        if qp.doorbell.helper_error().is_some() {
            // Nothing rings any more: poll on a timer until the flushes have drained.
            glommio::timer::sleep(Duration::from_millis(1)).await;
        } else {
            qp.doorbell.wait().await;
        }
        busy_since = Instant::now();
    }
}

/// The liveness task: the connection's TCP stream carries nothing after the exchange, so
/// end-of-file or an error means the peer process is gone (or failed the pair).
async fn watch_liveness(qp: Weak<VerbsQp>, mut stream: TcpStream) {
    let mut buffer = [0u8; 64];
    let reason = match stream.read(&mut buffer).await {
        Ok(0) => String::from(
            "the peer closed the connection (its process ended, or it failed the queue pair)",
        ),
        Ok(n) => format!("the peer sent {n} unexpected bytes on the liveness channel"),
        Err(error) => format!("the liveness channel failed: {error}"),
    };
    let Some(qp) = qp.upgrade() else { return };
    // The socket closes when this task ends: nobody may shut it down after that.
    qp.liveness_fd.set(None);
    drop(stream);
    if qp.down.get() {
        qp.enter_error_state();
        return;
    }
    qp.go_down(&reason, true);
    glommio::timer::sleep(LIVENESS_GRACE).await;
    qp.enter_error_state();
}

/// Wakes the poller task: from the helper thread when a completion event arrives, and from the
/// executor when the pair fails.
#[derive(Default)]
struct Doorbell {
    state: Mutex<Bell>,
}

#[derive(Default)]
struct Bell {
    rung: bool,
    stopped: bool,
    waker: Option<Waker>,
    helper_error: Option<String>,
}

impl Doorbell {
    fn lock(&self) -> MutexGuard<'_, Bell> {
        // A panic while holding the lock leaves only flags and a waker: still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the poller (any thread). The wake is done under the lock, so that it cannot race
    /// with `stop`: after `stop` returns, no thread wakes the poller's task any more.
    fn ring(&self) {
        let mut bell = self.lock();
        bell.rung = true;
        if let Some(waker) = bell.waker.take() {
            waker.wake();
        }
    }

    /// Waits until rung (the poller).
    async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            let mut bell = self.lock();
            if bell.rung || bell.stopped {
                bell.rung = false;
                Poll::Ready(())
            } else {
                bell.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn stop(&self) {
        let waker = {
            let mut bell = self.lock();
            bell.stopped = true;
            bell.waker.take()
        };
        drop(waker);
    }

    fn stopped(&self) -> bool {
        self.lock().stopped
    }

    fn helper_failed(&self, error: String) {
        let mut bell = self.lock();
        bell.helper_error = Some(error);
        if let Some(waker) = bell.waker.take() {
            waker.wake();
        }
    }

    fn helper_error(&self) -> Option<String> {
        self.lock().helper_error.clone()
    }
}

struct StopOnDrop(Arc<Doorbell>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Completion-event threads running in this process.
static COMPLETION_THREADS: AtomicUsize = AtomicUsize::new(0);

/// How many completion-event helper threads run in this process (one per verbs queue pair
/// whose poller has not ended, or ended less than [`HELPER_WAIT`] ago): for status output and
/// for tests that check the threads end.
pub fn completion_threads_live() -> usize {
    COMPLETION_THREADS.load(Ordering::Acquire)
}

/// The helper thread: waits on the completion channel (which glommio cannot wait on) and rings
/// the doorbell for each event. It owns a reference to the CQ, so the CQ is destroyed (after
/// its events are acknowledged) by whichever of it and the QP lets go last.
fn completion_events(cq: Arc<CompletionQueue>, doorbell: Arc<Doorbell>) {
    while !doorbell.stopped() {
        match cq.wait_event(Some(HELPER_WAIT)) {
            Ok(true) => doorbell.ring(),
            Ok(false) => {}
            Err(error) => {
                doorbell.helper_failed(error.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_round_trips_and_names_foreign_peers() {
        // The 48-byte exchange decodes what it encodes; a TCP-mode peer, garbage, another
        // version or an unexpected kind are refused with errors that say what was seen.
        let exchange = Exchange {
            kind: ExchangeKind::Request,
            endpoint: Endpoint {
                qpn: 0x12,
                psn: 0xab_cdef,
                gid: Gid([9; 16]),
                lid: 0,
            },
            mtu: Mtu::Mtu1024,
            recv_buffer_bytes: RECV_BUFFER_BYTES as u32,
            recv_depth: 256,
        };
        let bytes = exchange.encode();
        assert_eq!(
            Exchange::decode(&bytes, ExchangeKind::Request),
            Ok(exchange)
        );
        let error = Exchange::decode(&bytes, ExchangeKind::Answer).unwrap_err();
        assert!(error.contains("expected a verbs Answer"), "{error}");
        let mut tcp = bytes;
        tcp[0..4].copy_from_slice(b"ORDT");
        let error = Exchange::decode(&tcp, ExchangeKind::Request).unwrap_err();
        assert!(error.contains("TCP transport"), "{error}");
        let mut garbage = bytes;
        garbage[0..4].copy_from_slice(b"GET ");
        let error = Exchange::decode(&garbage, ExchangeKind::Request).unwrap_err();
        assert!(error.contains("not in verbs mode"), "{error}");
        let mut version = bytes;
        version[4] = 9;
        let error = Exchange::decode(&version, ExchangeKind::Request).unwrap_err();
        assert!(error.contains("version 9"), "{error}");
        let ready = Exchange::ready().encode();
        assert!(Exchange::decode(&ready, ExchangeKind::Ready).is_ok());
    }

    #[test]
    fn arena_hands_out_spans_first_in_first_out_and_never_wraps_one() {
        // A 1024-byte ring: spans are rounded to 64 bytes, a span that would cross the end
        // starts over at 0 (the skipped tail is freed with it), and a full ring refuses until
        // the oldest span is released.
        let mut ring = ArenaRing::new(1024);
        assert_eq!(ring.reserve(0), None);
        assert_eq!(ring.reserve(1025), None);
        let (a, a_end) = ring.reserve(600).unwrap();
        assert_eq!((a, a_end), (0, 640));
        let (b, b_end) = ring.reserve(300).unwrap();
        assert_eq!((b, b_end), (640, 960));
        assert_eq!(
            ring.reserve(200),
            None,
            "only 64 bytes left at the end, none before"
        );
        ring.release(a_end);
        // 200 bytes do not fit the 64 at the end: the span starts at 0 of the next lap.
        let (c, c_end) = ring.reserve(200).unwrap();
        assert_eq!((c, c_end), (0, 1024 + 256));
        assert_eq!(ring.in_use(), 1024 + 256 - 640);
        assert_eq!(ring.reserve(500), None, "b still holds [640, 960)");
        ring.release(b_end);
        ring.release(c_end);
        assert_eq!(ring.in_use(), 0);
        let (d, _) = ring.reserve(1024).unwrap();
        assert_eq!(d, 0, "a whole-ring span starts at a lap boundary");
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn arena_refuses_release_beyond_what_was_handed_out() {
        // Releasing past the newest span would free memory the device may still read.
        let mut ring = ArenaRing::new(1024);
        let (_, end) = ring.reserve(64).unwrap();
        ring.release(end + 64);
    }

    #[test]
    fn receive_buffers_hold_every_protocol_message() {
        // The largest order batch (header + 256 records) fits one 16 KiB receive.
        assert_eq!(MESSAGE_BYTES_MAX, 32 + 256 * 48);
        const { assert!(MESSAGE_BYTES_MAX <= RECV_BUFFER_BYTES) };
        const { assert!(RECV_BUFFER_BYTES < 2 * MESSAGE_BYTES_MAX) };
    }

    #[test]
    fn work_statuses_map_as_documented() {
        // Access errors stay access errors; unanswered requests are flushed; the rest are
        // remote operation errors.
        assert_eq!(work_status(WcStatus::Success), WorkStatus::Success);
        assert_eq!(
            work_status(WcStatus::RemAccessErr),
            WorkStatus::RemoteAccessError
        );
        assert_eq!(work_status(WcStatus::WrFlushErr), WorkStatus::Flushed);
        assert_eq!(work_status(WcStatus::RetryExcErr), WorkStatus::Flushed);
        assert_eq!(
            work_status(WcStatus::RnrRetryExcErr),
            WorkStatus::RemoteOperationError
        );
        assert_eq!(
            work_status(WcStatus::RemInvReqErr),
            WorkStatus::RemoteOperationError
        );
    }
}
