//! The transport boundary, shaped like verbs, and its TCP implementation.
//!
//! A role's runtime sees queue pairs: it posts two-sided SENDs and one-sided WRITEs (optionally
//! with immediate data) and READs into the peer's registered regions, and it receives
//! completions, error completions and incoming messages as [`TransportEvent`]s. The RDMA
//! backend maps these one to one onto `ibv_post_send` and the completion queue; this module
//! implements the same semantics over one TCP connection per queue pair, which is also how a
//! long-distance DR link without RDMA runs.
//!
//! Facts of RC queue pairs this implementation keeps, because the protocol relies on them:
//! - Work requests on one queue pair execute and complete in posting order.
//! - A one-sided WRITE is placed in the responder's memory by the transport, without the
//!   responder's role logic being involved; WRITE-with-immediate then delivers the immediate as
//!   a receive completion, after the data is placed.
//! - The responder checks the key, the bounds and the access rights of every one-sided access
//!   ("the NIC"); a failure is a remote-access error completion at the initiator, nothing is
//!   changed, and the queue pair goes to the error state: every later work request completes
//!   with a flush error.
//! - A peer that goes away, or stops answering for longer than the transport timeout, fails
//!   every outstanding work request (flush error) and reports the queue pair down.
//!
//! Frames (all little-endian) carry a fixed 32-byte header and at most
//! [`FRAME_PAYLOAD_BYTES_MAX`] bytes of payload. The responder acknowledges requests
//! cumulatively, as a NIC coalesces its ACKs: one-sided requests after each burst it processed,
//! SENDs with its next frame or after `DELAYED_ACK` (a SEND's completion gates nothing in the
//! protocol, and an ACK on its own costs a send(2) on both ends over loopback), and so are
//! WRITEs whose initiator marked them [`FRAME_FLAG_ACK_MAY_WAIT`] (like InfiniBand's AckReq bit
//! left clear: see [`QueuePair::post_write_unhurried`]).
//!
//! # Backends
//! A [`QueuePair`] is either this TCP emulation ([`QueuePair::start`]) or, with the `verbs`
//! feature, a real RC queue pair on an RDMA device (`QueuePair::start_verbs`, see the `verbs`
//! module). The daemons call the same methods on both and get the same events; only
//! construction differs, and a [`RegionTable`] made with `RegionTable::new_verbs` registers its
//! regions with the device instead of checking accesses itself.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use crate::Sender;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::TcpStream;

/// Remote access rights of a registered region.
pub const ACCESS_REMOTE_WRITE: u32 = 1;
pub const ACCESS_REMOTE_READ: u32 = 2;

/// Largest payload of one frame: the largest write the engine replicates plus room, so that a
/// peer cannot make us buffer more than this for one request.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 4 << 20;
pub const FRAME_HEADER_BYTES: usize = 32;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"ORDT");

/// Work requests posted and not yet completed on one queue pair. The protocol's own limits
/// (order batches, payload writes and aux writes in flight) stay far below this; reaching it is
/// a bug in the caller, reported as [`PostError::QueueFull`].
pub const SEND_QUEUE_DEPTH: usize = 4096;

/// How long outstanding work may go unanswered before the queue pair is failed. RDMA's RC
/// transport gives up after `retry_cnt` (at most 7) retransmissions of a local ACK timeout; over
/// a WAN TCP link a few seconds covers retransmissions without hiding a dead peer for long.
pub const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the ACK of a peer's SEND may wait for a frame of ours to ride on. A peer's one-sided
/// WRITE or READ is acknowledged at once (its protocol waits on those completions: payloads in
/// sync mode, status entries, heartbeats) unless the peer marked the WRITE
/// [`FRAME_FLAG_ACK_MAY_WAIT`], but no role waits on the completion of a SEND: its
/// answer, if any, is a message of the protocol. Over loopback a send(2) costs both processes
/// the receive path of the other socket, so at one write in flight an ACK sent on its own was a
/// syscall on the critical path of every write (the primary acknowledging the DR's answer to an
/// order batch just before the next batch goes out on the same connection). Like TCP's delayed
/// ACK, but short: a millisecond is far below `TRANSPORT_TIMEOUT` and bounds how long a peer's
/// send queue holds completed SENDs.
const DELAYED_ACK: Duration = Duration::from_millis(1);
/// Peer requests (SENDs and unhurried WRITEs) left unacknowledged at most, whatever the time:
/// a burst of them is acknowledged at once past this.
const DELAYED_ACK_REQUESTS_MAX: u64 = 64;

/// Frame flag (header byte 5) of a WRITE whose initiator does not need its ACK at once: the
/// responder acknowledges it as it does a SEND. Any other flag, or this one on another kind of
/// frame, is a protocol error.
pub const FRAME_FLAG_ACK_MAY_WAIT: u8 = 1;

/// What a peer needs to access one of our regions remotely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDescriptor {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
    pub access: u32,
}

/// Memory a region is backed by. The TCP transport writes and reads it when a remote access
/// arrives and only inside `with_bytes`, so the owner may hold it in a `RefCell`. The verbs
/// transport instead registers the memory with the NIC, which needs [`RegionMemory::stable_span`].
pub trait RegionMemory {
    /// Runs `f` on the region's bytes.
    fn with_bytes(&self, f: &mut dyn FnMut(&mut [u8]));

    /// The region's bytes as a span that never moves, for registration with an RDMA device;
    /// `None` (the default) for memory that may move, which only the TCP transport can serve.
    fn stable_span(&self) -> Option<StableSpan> {
        None
    }
}

/// A span of memory that stays where it is for as long as the [`RegionMemory`] that hands it
/// out lives, so that an RDMA device may read and write it directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StableSpan {
    ptr: *mut u8,
    len: usize,
}

impl StableSpan {
    /// # Safety
    /// `[ptr, ptr + len)` must be valid for reads and writes, and must be neither moved, freed,
    /// unmapped nor remapped, for as long as the `RegionMemory` value returning this span lives
    /// (a memory mapping or a heap buffer owned by that value and never replaced qualifies).
    /// The owner also accepts that, while the span is registered, the device writes these bytes
    /// whenever a peer's WRITE arrives, concurrently with the owner's own accesses: like memory
    /// shared with another process, what the owner reads there may change under it and must be
    /// validated (the protocol checks checksums and bounds of everything it reads back).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> StableSpan {
        assert!(!ptr.is_null(), "a stable span needs memory");
        StableSpan { ptr, len }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct Registration {
    /// The device's registration of `memory`, for verbs tables; declared before `memory` so it
    /// is deregistered before the memory can be released. `None` once revoked.
    #[cfg(feature = "verbs")]
    registered: Option<crate::verbs::RegisteredRegion>,
    descriptor: RegionDescriptor,
    memory: Rc<dyn RegionMemory>,
    revoked: bool,
}

/// The regions one queue pair may access, like a protection domain's memory regions (with
/// verbs it is one: each verbs table has its own protection domain, so a peer can reach only
/// the regions of the connection it was granted them on).
#[derive(Default)]
pub struct RegionTable {
    registrations: RefCell<Vec<Registration>>,
    /// The device and protection domain of a verbs table; `None` for a TCP table.
    #[cfg(feature = "verbs")]
    verbs: Option<crate::verbs::TableDomain>,
}

impl std::fmt::Debug for RegionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let descriptors: Vec<RegionDescriptor> = self
            .registrations
            .borrow()
            .iter()
            .map(|r| r.descriptor)
            .collect();
        f.debug_struct("RegionTable")
            .field("regions", &descriptors)
            .finish()
    }
}

/// Why a remote access is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    UnknownKey,
    Revoked,
    OutOfBounds,
    NotPermitted,
}

impl RegionTable {
    /// A table served by the TCP transport.
    pub fn new() -> Rc<Self> {
        Rc::new(RegionTable::default())
    }

    /// A table whose regions are registered with `domain`'s device, in a protection domain of
    /// its own, for a queue pair started with [`QueuePair::start_verbs`].
    #[cfg(feature = "verbs")]
    pub fn new_verbs(domain: &Rc<crate::verbs::VerbsDomain>) -> Result<Rc<Self>, String> {
        Ok(Rc::new(RegionTable {
            registrations: RefCell::new(Vec::new()),
            verbs: Some(crate::verbs::TableDomain::new(domain)?),
        }))
    }

    /// Registers `len` bytes of `memory` with `access` rights.
    ///
    /// TCP: the key is random, so a peer cannot guess another connection's key; the address is
    /// a per-registration base so that bounds are checked on absolute addresses as a NIC does.
    /// Verbs: a memory region over the memory's stable span with the least rights that serve
    /// `access` (a remote write needs LOCAL_WRITE|REMOTE_WRITE, a remote read REMOTE_READ); the
    /// descriptor carries the region's real address and rkey.
    pub fn try_register(
        &self,
        memory: Rc<dyn RegionMemory>,
        len: u64,
        access: u32,
    ) -> Result<RegionDescriptor, String> {
        #[cfg(feature = "verbs")]
        if let Some(verbs) = &self.verbs {
            let registered = verbs.register(&memory, len, access)?;
            let descriptor = RegionDescriptor {
                addr: registered.addr(),
                len,
                rkey: registered.rkey(),
                access,
            };
            self.registrations.borrow_mut().push(Registration {
                registered: Some(registered),
                descriptor,
                memory,
                revoked: false,
            });
            return Ok(descriptor);
        }
        let mut registrations = self.registrations.borrow_mut();
        let rkey = loop {
            let candidate = crate::random_u32();
            if candidate != 0 && registrations.iter().all(|r| r.descriptor.rkey != candidate) {
                break candidate;
            }
        };
        let addr = (u64::from(crate::random_u32()) | 1) << 20;
        let descriptor = RegionDescriptor {
            addr,
            len,
            rkey,
            access,
        };
        registrations.push(Registration {
            #[cfg(feature = "verbs")]
            registered: None,
            descriptor,
            memory,
            revoked: false,
        });
        Ok(descriptor)
    }

    /// The protection domain a verbs queue pair on this table uses: the table's own, or a new
    /// one for an empty TCP table (a queue pair that grants the peer nothing).
    #[cfg(feature = "verbs")]
    pub(crate) fn verbs_pd(
        &self,
        domain: &Rc<crate::verbs::VerbsDomain>,
    ) -> Result<std::sync::Arc<ordinal_hw::ProtectionDomain>, String> {
        match &self.verbs {
            Some(verbs) => verbs.pd_for(domain),
            None if self.registrations.borrow().is_empty() => domain.new_pd(),
            None => Err("the region table is a TCP table with regions the RDMA device does not know: make it with RegionTable::new_verbs".into()),
        }
    }

    /// The descriptors registered so far.
    pub fn descriptors(&self) -> Vec<RegionDescriptor> {
        self.registrations
            .borrow()
            .iter()
            .map(|r| r.descriptor)
            .collect()
    }

    /// Revokes remote access to the region with `rkey`: every later access fails with a
    /// remote-access error. This is how the aux and the DR fence an old primary.
    pub fn revoke(&self, rkey: u32) {
        for registration in self.registrations.borrow_mut().iter_mut() {
            if registration.descriptor.rkey == rkey {
                registration.revoked = true;
                // Verbs: deregistering invalidates the rkey in the NIC, which then refuses
                // every later access with a remote-access error, as the TCP check does.
                #[cfg(feature = "verbs")]
                drop(registration.registered.take());
            }
        }
    }

    /// Runs `f` on the bytes `[addr, addr + len)` of a region, if `rkey` grants `access` there.
    fn access(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        access: u32,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), AccessError> {
        let registrations = self.registrations.borrow();
        let registration = registrations
            .iter()
            .find(|r| r.descriptor.rkey == rkey)
            .ok_or(AccessError::UnknownKey)?;
        if registration.revoked {
            return Err(AccessError::Revoked);
        }
        let descriptor = registration.descriptor;
        if descriptor.access & access != access {
            return Err(AccessError::NotPermitted);
        }
        let start = addr
            .checked_sub(descriptor.addr)
            .ok_or(AccessError::OutOfBounds)?;
        let end = start.checked_add(len).ok_or(AccessError::OutOfBounds)?;
        if end > descriptor.len {
            return Err(AccessError::OutOfBounds);
        }
        let (start, end) = (start as usize, end as usize);
        registration
            .memory
            .with_bytes(&mut |bytes| f(&mut bytes[start..end]));
        Ok(())
    }
}

/// The kind of a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Send,
    Write,
    WriteWithImm,
    Read,
}

/// How a work request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkStatus {
    Success,
    /// The responder refused the access (key, bounds, rights, revoked).
    RemoteAccessError,
    /// The responder could not take the request (malformed, or it is shutting the pair down).
    RemoteOperationError,
    /// The queue pair failed before this request completed; it may or may not have executed.
    Flushed,
}

/// An event from a queue pair, tagged with the queue pair's id.
#[derive(Debug)]
pub enum TransportEvent {
    /// A work request we posted completed.
    Completion {
        qp: u32,
        wr_id: u64,
        opcode: Opcode,
        status: WorkStatus,
        /// The bytes read, for a successful READ.
        data: Option<Vec<u8>>,
    },
    /// The peer SENT a message.
    Received { qp: u32, bytes: Vec<u8> },
    /// The peer's WRITE-with-immediate was placed in our region.
    ReceivedImm { qp: u32, imm: u32 },
    /// The queue pair is down (peer gone, timeout, protocol error); all its outstanding work
    /// requests were completed with `Flushed` just before.
    Down { qp: u32, reason: String },
}

/// Why a work request could not be posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostError {
    /// The queue pair is down; post on a new one.
    Down,
    /// More than `SEND_QUEUE_DEPTH` work requests outstanding.
    QueueFull,
    /// The payload exceeds `FRAME_PAYLOAD_BYTES_MAX` (verbs: or a SEND exceeds the peer's
    /// receive buffers, `verbs::RECV_BUFFER_BYTES`).
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum FrameKind {
    Send = 1,
    Write = 2,
    WriteWithImm = 3,
    Read = 4,
    ReadResponse = 5,
    Ack = 6,
    Nak = 7,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<FrameKind> {
        Some(match value {
            1 => FrameKind::Send,
            2 => FrameKind::Write,
            3 => FrameKind::WriteWithImm,
            4 => FrameKind::Read,
            5 => FrameKind::ReadResponse,
            6 => FrameKind::Ack,
            7 => FrameKind::Nak,
            _ => return None,
        })
    }
}

/// A frame header. `value` is the remote address (WRITE, READ) or the cumulative count of
/// processed requests (ACK, NAK); `aux` is the READ length or the NAK status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    kind: FrameKind,
    /// `FRAME_FLAG_*` bits.
    flags: u8,
    payload_len: u32,
    imm: u32,
    value: u64,
    rkey: u32,
    aux: u32,
}

impl FrameHeader {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        out.extend_from_slice(&[self.kind as u8, self.flags, 0, 0]);
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&self.imm.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.aux.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<FrameHeader, String> {
        assert!(bytes.len() >= FRAME_HEADER_BYTES);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        if u32_at(0) != FRAME_MAGIC {
            return Err(format!("bad frame magic {:#010x}", u32_at(0)));
        }
        let kind = FrameKind::from_u8(bytes[4])
            .ok_or_else(|| format!("unknown frame kind {}", bytes[4]))?;
        if bytes[6..8] != [0, 0] {
            return Err("reserved frame bytes are not zero".into());
        }
        let flags = bytes[5];
        if flags & !FRAME_FLAG_ACK_MAY_WAIT != 0 {
            return Err(format!("unknown frame flags {flags:#04x}"));
        }
        if flags != 0 && !matches!(kind, FrameKind::Write | FrameKind::WriteWithImm) {
            return Err(format!("frame flags {flags:#04x} on a {kind:?} frame"));
        }
        let payload_len = u32_at(8);
        if payload_len as usize > FRAME_PAYLOAD_BYTES_MAX {
            return Err(format!(
                "frame payload of {payload_len} bytes exceeds {FRAME_PAYLOAD_BYTES_MAX}"
            ));
        }
        Ok(FrameHeader {
            kind,
            flags,
            payload_len,
            imm: u32_at(12),
            value: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            rkey: u32_at(24),
            aux: u32_at(28),
        })
    }
}

const NAK_REMOTE_ACCESS: u32 = 1;
const NAK_REMOTE_OPERATION: u32 = 2;

#[derive(Clone, Copy, Debug)]
struct PostedRequest {
    wr_id: u64,
    opcode: Opcode,
    /// Bytes a READ asked for: its response must carry exactly that many.
    read_len: u32,
}

struct QpState {
    id: u32,
    events: Sender<TransportEvent>,
    /// Frames waiting for the writer task.
    out: RefCell<Vec<u8>>,
    /// The writer task holds frames it has not finished writing: nothing else may write to the
    /// socket meanwhile, or its bytes would land in the middle of theirs.
    writer_busy: Cell<bool>,
    wake_writer: Sender<()>,
    /// Work requests posted and not completed, oldest first.
    posted: RefCell<VecDeque<PostedRequest>>,
    /// Requests of the peer we processed (for cumulative ACKs).
    processed: Cell<u64>,
    /// `processed` as of the last ACK or NAK we sent: an ACK is owed while it is lower.
    processed_acked: Cell<u64>,
    /// A delayed-ACK timer is pending.
    delayed_ack_armed: Cell<bool>,
    /// Requests of ours that completed (matched against the peer's cumulative ACKs).
    completed: Cell<u64>,
    /// The socket, to shut it down when the pair fails (which ends a pending read).
    fd: std::os::fd::RawFd,
    /// Set once the pair failed; posts fail from then on.
    down: Cell<bool>,
    /// Time of the last frame received, for the transport timeout.
    last_heard: Cell<std::time::Instant>,
    regions: Rc<RegionTable>,
}

/// One queue pair: over one TCP connection, or (feature `verbs`) an RC queue pair on an RDMA
/// device. Cloning shares the pair.
#[derive(Clone)]
pub struct QueuePair {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Tcp(TcpPair),
    #[cfg(feature = "verbs")]
    Verbs(Rc<crate::verbs::VerbsHandle>),
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("id", &self.id())
            .field("backend", &self.backend_name())
            .field("down", &self.is_down())
            .field("posted", &self.outstanding())
            .finish()
    }
}

/// The id of the next queue pair started on this thread (both backends draw from it, so ids
/// stay unique within a daemon).
pub(crate) fn next_qp_id() -> u32 {
    thread_local! {
        static NEXT_QP_ID: Cell<u32> = const { Cell::new(1) };
    }
    NEXT_QP_ID.with(|next| next.replace(next.get() + 1))
}

impl QueuePair {
    /// Starts a queue pair on an established (and authenticated) connection. `regions` are the
    /// local regions the peer may access through it; events go to `events`, which bounds how far
    /// the peer can get ahead of the role (a full channel stops reading the socket, and TCP
    /// pushes back on the peer, as receive-not-ready does on RDMA).
    pub fn start(
        stream: TcpStream,
        regions: Rc<RegionTable>,
        events: Sender<TransportEvent>,
    ) -> QueuePair {
        QueuePair {
            backend: Backend::Tcp(TcpPair::start(stream, regions, events)),
        }
    }

    /// Starts an RC queue pair on `domain`'s device for an established (and authenticated)
    /// connection: exchanges endpoints over `stream` (`side` says who speaks first), connects
    /// the queue pair, and keeps `stream` open as the connection's liveness channel. `regions`
    /// should be a `RegionTable::new_verbs` table of the same domain (an empty TCP table grants
    /// nothing). See the `verbs` module for what differs from TCP.
    #[cfg(feature = "verbs")]
    pub async fn start_verbs(
        domain: &Rc<crate::verbs::VerbsDomain>,
        stream: TcpStream,
        regions: Rc<RegionTable>,
        events: Sender<TransportEvent>,
        side: crate::verbs::Side,
    ) -> Result<QueuePair, String> {
        let handle = crate::verbs::start(domain, stream, regions, events, side).await?;
        Ok(QueuePair {
            backend: Backend::Verbs(Rc::new(handle)),
        })
    }

    /// Wraps a started verbs queue pair (see `link::PreparedQp::start`).
    #[cfg(feature = "verbs")]
    pub(crate) fn from_verbs(handle: crate::verbs::VerbsHandle) -> Result<QueuePair, String> {
        Ok(QueuePair {
            backend: Backend::Verbs(Rc::new(handle)),
        })
    }

    /// "tcp" or "verbs", for status output and logs.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Tcp(_) => "tcp",
            #[cfg(feature = "verbs")]
            Backend::Verbs(_) => "verbs",
        }
    }

    pub fn id(&self) -> u32 {
        match &self.backend {
            Backend::Tcp(pair) => pair.state.id,
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.id(),
        }
    }

    pub fn is_down(&self) -> bool {
        match &self.backend {
            Backend::Tcp(pair) => pair.state.down.get(),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.is_down(),
        }
    }

    /// Work requests posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        match &self.backend {
            Backend::Tcp(pair) => pair.state.posted.borrow().len(),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.outstanding(),
        }
    }

    /// Posts a two-sided SEND of `bytes` (copied).
    pub fn post_send(&self, wr_id: u64, bytes: &[u8]) -> Result<(), PostError> {
        match &self.backend {
            Backend::Tcp(pair) => pair.post_send(wr_id, bytes),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.post_send(wr_id, bytes),
        }
    }

    /// Posts a one-sided WRITE of `bytes` (copied) to `remote_addr` in the peer's region `rkey`,
    /// with immediate data if `imm` is set.
    pub fn post_write(
        &self,
        wr_id: u64,
        bytes: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), PostError> {
        match &self.backend {
            Backend::Tcp(pair) => pair.post_write(wr_id, bytes, remote_addr, rkey, imm, false),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.post_write(wr_id, bytes, remote_addr, rkey, imm),
        }
    }

    /// [`QueuePair::post_write`] for a write whose completion nobody waits on soon: over TCP
    /// the responder may hold its ACK back as it does a SEND's, until it sends us a frame
    /// anyway, `DELAYED_ACK` passes or `DELAYED_ACK_REQUESTS_MAX` requests are owed, so the
    /// completion can come up to a millisecond late. That saves the responder a send(2), and us
    /// a wake-up, per write. Over verbs the NIC acknowledges as it always does. A caller that
    /// keeps a window of such writes in flight must post one with `post_write` before the
    /// window closes, or wait out the delay.
    pub fn post_write_unhurried(
        &self,
        wr_id: u64,
        bytes: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), PostError> {
        match &self.backend {
            Backend::Tcp(pair) => pair.post_write(wr_id, bytes, remote_addr, rkey, imm, true),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.post_write(wr_id, bytes, remote_addr, rkey, imm),
        }
    }

    /// Posts a one-sided READ of `len` bytes at `remote_addr` in the peer's region `rkey`; the
    /// bytes come with the completion.
    pub fn post_read(
        &self,
        wr_id: u64,
        remote_addr: u64,
        rkey: u32,
        len: u32,
    ) -> Result<(), PostError> {
        match &self.backend {
            Backend::Tcp(pair) => pair.post_read(wr_id, remote_addr, rkey, len),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.post_read(wr_id, remote_addr, rkey, len),
        }
    }

    /// Fails the queue pair now (used on shutdown and by the watchdog).
    pub fn fail(&self, reason: &str) {
        match &self.backend {
            Backend::Tcp(pair) => fail_pair(&pair.state, reason),
            #[cfg(feature = "verbs")]
            Backend::Verbs(handle) => handle.fail(reason),
        }
    }

    /// For tests of a crashed peer host: resets a verbs queue pair in the device without telling
    /// the peer (the liveness channel stays open), so the peer's work requests go unanswered
    /// and it must notice through the RC retry timeout. Does nothing on TCP.
    #[doc(hidden)]
    pub fn reset_silently_for_tests(&self) {
        #[cfg(feature = "verbs")]
        if let Backend::Verbs(handle) = &self.backend {
            handle.reset_silently_for_tests();
        }
    }
}

/// The TCP implementation of a queue pair.
#[derive(Clone)]
struct TcpPair {
    state: Rc<QpState>,
}

impl TcpPair {
    fn start(
        stream: TcpStream,
        regions: Rc<RegionTable>,
        events: Sender<TransportEvent>,
    ) -> TcpPair {
        // Order records are tiny and latency-bound: never let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let id = next_qp_id();
        let (wake_writer, writer_wakeups) = local_channel::new_bounded(1);
        let wake_writer = Rc::new(wake_writer);
        let state = Rc::new(QpState {
            id,
            events,
            out: RefCell::new(Vec::with_capacity(64 << 10)),
            writer_busy: Cell::new(false),
            wake_writer,
            posted: RefCell::new(VecDeque::new()),
            processed: Cell::new(0),
            processed_acked: Cell::new(0),
            delayed_ack_armed: Cell::new(false),
            completed: Cell::new(0),
            fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
            down: Cell::new(false),
            last_heard: Cell::new(std::time::Instant::now()),
            regions,
        });
        let (reader, writer) = futures_lite::io::split(stream);
        glommio::spawn_local(writer_task(state.clone(), writer, writer_wakeups)).detach();
        glommio::spawn_local(reader_task(state.clone(), reader)).detach();
        glommio::spawn_local(watchdog_task(Rc::downgrade(&state))).detach();
        TcpPair { state }
    }

    fn post_send(&self, wr_id: u64, bytes: &[u8]) -> Result<(), PostError> {
        self.post(
            wr_id,
            Opcode::Send,
            FrameHeader {
                kind: FrameKind::Send,
                flags: 0,
                payload_len: 0,
                imm: 0,
                value: 0,
                rkey: 0,
                aux: 0,
            },
            bytes,
        )
    }

    fn post_write(
        &self,
        wr_id: u64,
        bytes: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
        ack_may_wait: bool,
    ) -> Result<(), PostError> {
        let (kind, opcode) = match imm {
            Some(_) => (FrameKind::WriteWithImm, Opcode::WriteWithImm),
            None => (FrameKind::Write, Opcode::Write),
        };
        self.post(
            wr_id,
            opcode,
            FrameHeader {
                kind,
                flags: if ack_may_wait {
                    FRAME_FLAG_ACK_MAY_WAIT
                } else {
                    0
                },
                payload_len: 0,
                imm: imm.unwrap_or(0),
                value: remote_addr,
                rkey,
                aux: 0,
            },
            bytes,
        )
    }

    fn post_read(
        &self,
        wr_id: u64,
        remote_addr: u64,
        rkey: u32,
        len: u32,
    ) -> Result<(), PostError> {
        if len as usize > FRAME_PAYLOAD_BYTES_MAX {
            return Err(PostError::TooLarge);
        }
        self.post(
            wr_id,
            Opcode::Read,
            FrameHeader {
                kind: FrameKind::Read,
                flags: 0,
                payload_len: 0,
                imm: 0,
                value: remote_addr,
                rkey,
                aux: len,
            },
            &[],
        )
    }

    fn post(
        &self,
        wr_id: u64,
        opcode: Opcode,
        mut header: FrameHeader,
        payload: &[u8],
    ) -> Result<(), PostError> {
        if self.state.down.get() {
            return Err(PostError::Down);
        }
        if payload.len() > FRAME_PAYLOAD_BYTES_MAX {
            return Err(PostError::TooLarge);
        }
        let mut posted = self.state.posted.borrow_mut();
        if posted.len() >= SEND_QUEUE_DEPTH {
            return Err(PostError::QueueFull);
        }
        if posted.is_empty() {
            // The timeout counts from when work starts waiting, not from the last idle period.
            self.state.last_heard.set(std::time::Instant::now());
        }
        let read_len = if opcode == Opcode::Read {
            header.aux
        } else {
            0
        };
        posted.push_back(PostedRequest {
            wr_id,
            opcode,
            read_len,
        });
        header.payload_len = payload.len() as u32;
        let mut out = self.state.out.borrow_mut();
        header.encode(&mut out);
        out.extend_from_slice(payload);
        let eager = opcode == Opcode::Send
            && !self.state.writer_busy.get()
            && out.len() <= EAGER_SEND_BYTES_MAX;
        drop(out);
        if eager {
            send_now(&self.state);
        } else {
            let _ = self.state.wake_writer.try_send(());
        }
        Ok(())
    }
}

/// Frames queued at most for [`send_now`] to write from the poster's own task. Only SENDs go
/// that way: they are the protocol's messages (order batches, the DR's answers), tens to
/// hundreds of bytes, few per pass of a role's loop, and latency-bound. One-sided WRITEs
/// (payloads, status entries) come many to a pass at depth, and the writer task sends them
/// all with one send(2) once the loop yields; over loopback each send(2) also runs the
/// receiver's path, so one per WRITE would cost throughput. The limit keeps a post from
/// copying much into the kernel before the poster's loop carries on.
const EAGER_SEND_BYTES_MAX: usize = 16 << 10;

/// Writes what waits in `out` now, from the poster's task, instead of waking the writer task:
/// a posted order batch leaves before the rest of the poster's loop runs (the copies of a
/// large write's payload, say), and the frame skips a task switch. Callers make sure the writer
/// task holds nothing (`writer_busy` unset), so the socket's bytes stay in `out`'s order; what
/// the kernel does not take at once is left to the writer task, and so is any error (its write
/// meets the same error and fails the pair).
fn send_now(state: &QpState) {
    debug_assert!(!state.writer_busy.get());
    let mut out = state.out.borrow_mut();
    debug_assert!(!out.is_empty(), "called by post, after it queued a frame");
    // An owed ACK rides on whatever goes out anyway, as in the writer task.
    if state.ack_owed() {
        encode_ack(state, &mut out);
    }
    // SAFETY: send(2) reads `out.len()` bytes from `out`, which is borrowed across the call.
    // `fd` is the pair's socket and still open: it closes only once both of the pair's tasks
    // have ended, which happens only after the pair is down, and `post` refuses to reach here
    // on a pair that is down. A shut-down socket only makes send fail (left to the writer).
    let sent = unsafe {
        libc::send(
            state.fd,
            out.as_ptr().cast(),
            out.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent > 0 {
        out.drain(..sent as usize);
    }
    let leftover = !out.is_empty();
    drop(out);
    if leftover {
        let _ = state.wake_writer.try_send(());
    }
}

/// Moves the pair to the error state: every outstanding request completes `Flushed`, then
/// `Down` is reported. Idempotent.
fn fail_pair(state: &QpState, reason: &str) {
    if state.down.replace(true) {
        return;
    }
    let posted: Vec<PostedRequest> = state.posted.borrow_mut().drain(..).collect();
    let events = state.events.clone();
    let qp = state.id;
    let reason = reason.to_string();
    // The events channel may be full; deliver from a task so that failing never blocks.
    glommio::spawn_local(async move {
        for request in posted {
            let _ = events
                .send(TransportEvent::Completion {
                    qp,
                    wr_id: request.wr_id,
                    opcode: request.opcode,
                    status: WorkStatus::Flushed,
                    data: None,
                })
                .await;
        }
        let _ = events.send(TransportEvent::Down { qp, reason }).await;
    })
    .detach();
    let _ = state.wake_writer.try_send(());
}

async fn writer_task(
    state: Rc<QpState>,
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    wakeups: LocalReceiver<()>,
) {
    let mut spare: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        if state.out.borrow().is_empty() {
            // A failed pair still sends what was queued before (a NAK tells the peer why).
            if state.down.get() || wakeups.recv().await.is_none() {
                break;
            }
            continue;
        }
        std::mem::swap(&mut *state.out.borrow_mut(), &mut spare);
        // An owed ACK rides on whatever goes out anyway.
        if state.ack_owed() {
            encode_ack(&state, &mut spare);
        }
        state.writer_busy.set(true);
        let result = writer.write_all(&spare).await;
        state.writer_busy.set(false);
        spare.clear();
        if let Err(error) = result {
            fail_pair(&state, &format!("send failed: {error}"));
            break;
        }
    }
    let _ = writer.close().await;
    // SAFETY: `fd` is the socket owned by the stream whose halves are still alive (the reader
    // task owns the other half), so it is open; shutdown(2) only ends its traffic, which makes
    // a pending read return end-of-file instead of waiting for a peer that may never write.
    unsafe {
        libc::shutdown(state.fd, libc::SHUT_RDWR);
    }
}

/// Reads frames, executes the peer's requests against our regions and turns the peer's
/// answers into completions.
async fn reader_task(state: Rc<QpState>, mut reader: futures_lite::io::ReadHalf<TcpStream>) {
    let mut buffer = vec![0u8; 2 * (FRAME_HEADER_BYTES + FRAME_PAYLOAD_BYTES_MAX)];
    let mut filled = 0usize;
    let reason = loop {
        if state.down.get() {
            break String::from("queue pair failed");
        }
        let read = match reader.read(&mut buffer[filled..]).await {
            Ok(0) => break String::from("peer closed the connection"),
            Ok(read) => read,
            Err(error) => break format!("receive failed: {error}"),
        };
        filled += read;
        state.last_heard.set(std::time::Instant::now());
        let mut at = 0usize;
        let mut handled = Handled::Answer;
        let outcome = loop {
            if filled - at < FRAME_HEADER_BYTES {
                break Ok(());
            }
            let header = match FrameHeader::decode(&buffer[at..at + FRAME_HEADER_BYTES]) {
                Ok(header) => header,
                Err(error) => break Err(error),
            };
            let frame_end = at + FRAME_HEADER_BYTES + header.payload_len as usize;
            if frame_end > filled {
                break Ok(());
            }
            let payload = &buffer[at + FRAME_HEADER_BYTES..frame_end];
            match handle_frame(&state, header, payload).await {
                Ok(this) => handled = handled.max(this),
                Err(error) => break Err(error),
            }
            at = frame_end;
        };
        if let Err(error) = outcome {
            break error;
        }
        buffer.copy_within(at..filled, 0);
        filled -= at;
        if handled == Handled::PeerOneSided && !state.down.get() {
            // One cumulative ACK per burst, as a NIC coalesces its ACKs. Let the role's loop
            // run first: what it answers is queued before the writer runs, and the ACK travels
            // in the same send instead of costing the peer a wake-up of its own.
            futures_lite::future::yield_now().await;
            // The writer may have run meanwhile and taken the ACK along already.
            if state.ack_owed() {
                encode_ack(&state, &mut state.out.borrow_mut());
                let _ = state.wake_writer.try_send(());
            }
        } else if handled == Handled::Deferrable && !state.down.get() {
            if state.processed.get() - state.processed_acked.get() >= DELAYED_ACK_REQUESTS_MAX {
                encode_ack(&state, &mut state.out.borrow_mut());
                let _ = state.wake_writer.try_send(());
            } else {
                arm_delayed_ack(&state);
            }
        }
    };
    fail_pair(&state, &reason);
}

/// What a frame was, as far as acknowledging it goes; ordered by urgency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Handled {
    /// An answer of the peer to a request of ours: nothing to acknowledge.
    Answer,
    /// A SEND of the peer, or a WRITE it marked `FRAME_FLAG_ACK_MAY_WAIT`: acknowledged with
    /// our next frame or after `DELAYED_ACK`.
    Deferrable,
    /// A one-sided request of the peer: acknowledged at once.
    PeerOneSided,
}

/// Appends a cumulative ACK of every request of the peer processed so far.
fn encode_ack(state: &QpState, out: &mut Vec<u8>) {
    FrameHeader {
        kind: FrameKind::Ack,
        flags: 0,
        payload_len: 0,
        imm: 0,
        value: state.processed.get(),
        rkey: 0,
        aux: 0,
    }
    .encode(out);
    state.processed_acked.set(state.processed.get());
}

/// Makes sure an owed ACK goes out within `DELAYED_ACK` even if we send nothing else.
fn arm_delayed_ack(state: &Rc<QpState>) {
    if state.delayed_ack_armed.replace(true) {
        return;
    }
    let state = Rc::downgrade(state);
    glommio::spawn_local(async move {
        glommio::timer::sleep(DELAYED_ACK).await;
        let Some(state) = state.upgrade() else { return };
        state.delayed_ack_armed.set(false);
        if state.ack_owed() && !state.down.get() {
            encode_ack(&state, &mut state.out.borrow_mut());
            let _ = state.wake_writer.try_send(());
        }
    })
    .detach();
}

/// Handles one frame; says whether (and how soon) it needs an ACK.
async fn handle_frame(
    state: &Rc<QpState>,
    header: FrameHeader,
    payload: &[u8],
) -> Result<Handled, String> {
    match header.kind {
        FrameKind::Send => {
            state.processed.set(state.processed.get() + 1);
            state
                .events
                .send(TransportEvent::Received {
                    qp: state.id,
                    bytes: payload.to_vec(),
                })
                .await
                .map_err(|_| String::from("role stopped"))?;
            Ok(Handled::Deferrable)
        }
        FrameKind::Write | FrameKind::WriteWithImm => {
            let placed = state.regions.access(
                header.rkey,
                header.value,
                payload.len() as u64,
                ACCESS_REMOTE_WRITE,
                &mut |target| target.copy_from_slice(payload),
            );
            if placed.is_err() {
                nak(state, NAK_REMOTE_ACCESS);
                return Err(format!("refused the peer's remote write: {placed:?}"));
            }
            state.processed.set(state.processed.get() + 1);
            if header.kind == FrameKind::WriteWithImm {
                state
                    .events
                    .send(TransportEvent::ReceivedImm {
                        qp: state.id,
                        imm: header.imm,
                    })
                    .await
                    .map_err(|_| String::from("role stopped"))?;
            }
            if header.flags & FRAME_FLAG_ACK_MAY_WAIT != 0 {
                Ok(Handled::Deferrable)
            } else {
                Ok(Handled::PeerOneSided)
            }
        }
        FrameKind::Read => {
            if header.payload_len != 0 {
                nak(state, NAK_REMOTE_OPERATION);
                return Err("READ request with a payload".into());
            }
            let len = header.aux as usize;
            if len > FRAME_PAYLOAD_BYTES_MAX {
                nak(state, NAK_REMOTE_OPERATION);
                return Err(format!("READ of {len} bytes is too large"));
            }
            let mut out = state.out.borrow_mut();
            let start = out.len();
            FrameHeader {
                kind: FrameKind::ReadResponse,
                flags: 0,
                payload_len: header.aux,
                imm: 0,
                value: 0,
                rkey: 0,
                aux: 0,
            }
            .encode(&mut out);
            let read = state.regions.access(
                header.rkey,
                header.value,
                len as u64,
                ACCESS_REMOTE_READ,
                &mut |source| out.extend_from_slice(source),
            );
            if let Err(error) = read {
                out.truncate(start);
                drop(out);
                nak(state, NAK_REMOTE_ACCESS);
                return Err(format!("refused the peer's remote read: {error:?}"));
            }
            drop(out);
            state.processed.set(state.processed.get() + 1);
            let _ = state.wake_writer.try_send(());
            Ok(Handled::PeerOneSided)
        }
        FrameKind::ReadResponse => {
            let request = state.posted.borrow_mut().pop_front();
            match request {
                Some(request)
                    if request.opcode == Opcode::Read
                        && payload.len() == request.read_len as usize =>
                {
                    complete(state, request, WorkStatus::Success, Some(payload.to_vec())).await?;
                    Ok(Handled::Answer)
                }
                _ => Err("READ response without a READ of that length outstanding".into()),
            }
        }
        FrameKind::Ack => {
            // `value` counts every request of ours the peer processed, READs included (whose
            // responses came before this ACK and completed them already).
            let completed_before = state.completed_total();
            if header.value < completed_before {
                return Err("cumulative ACK went backwards".into());
            }
            let mut newly = header.value - completed_before;
            while newly > 0 {
                let request = state.posted.borrow_mut().pop_front();
                match request {
                    Some(request) if request.opcode != Opcode::Read => {
                        complete(state, request, WorkStatus::Success, None).await?;
                    }
                    _ => return Err("ACK for a request never posted".into()),
                }
                newly -= 1;
            }
            Ok(Handled::Answer)
        }
        FrameKind::Nak => {
            let completed_before = state.completed_total();
            let failed_index = header.value;
            if failed_index < completed_before {
                return Err("NAK for a completed request".into());
            }
            for _ in completed_before..failed_index {
                let request = state.posted.borrow_mut().pop_front();
                let request = request.ok_or("NAK beyond the posted requests")?;
                complete(state, request, WorkStatus::Success, None).await?;
            }
            let status = if header.aux == NAK_REMOTE_ACCESS {
                WorkStatus::RemoteAccessError
            } else {
                WorkStatus::RemoteOperationError
            };
            let request = state.posted.borrow_mut().pop_front();
            if let Some(request) = request {
                complete(state, request, status, None).await?;
            }
            Err(format!("peer refused our request: {status:?}"))
        }
    }
}

impl QpState {
    /// Requests of ours completed so far.
    fn completed_total(&self) -> u64 {
        self.completed.get()
    }

    /// Some request of the peer was processed and not yet acknowledged.
    fn ack_owed(&self) -> bool {
        self.processed.get() > self.processed_acked.get()
    }
}

async fn complete(
    state: &Rc<QpState>,
    request: PostedRequest,
    status: WorkStatus,
    data: Option<Vec<u8>>,
) -> Result<(), String> {
    state.completed.set(state.completed.get() + 1);
    state
        .events
        .send(TransportEvent::Completion {
            qp: state.id,
            wr_id: request.wr_id,
            opcode: request.opcode,
            status,
            data,
        })
        .await
        .map_err(|_| String::from("role stopped"))
}

/// Tells the peer which of its requests failed, then the pair is failed by the caller.
fn nak(state: &QpState, status: u32) {
    let mut out = state.out.borrow_mut();
    FrameHeader {
        kind: FrameKind::Nak,
        flags: 0,
        payload_len: 0,
        imm: 0,
        value: state.processed.get(),
        rkey: 0,
        aux: status,
    }
    .encode(&mut out);
    state.processed_acked.set(state.processed.get());
    drop(out);
    let _ = state.wake_writer.try_send(());
}

async fn watchdog_task(state: std::rc::Weak<QpState>) {
    loop {
        glommio::timer::sleep(TRANSPORT_TIMEOUT / 5).await;
        let Some(state) = state.upgrade() else { return };
        if state.down.get() {
            return;
        }
        let waiting = !state.posted.borrow().is_empty();
        if waiting && state.last_heard.get().elapsed() > TRANSPORT_TIMEOUT {
            fail_pair(
                &state,
                &format!("peer did not answer for {} s", TRANSPORT_TIMEOUT.as_secs()),
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two TCP queue pairs connected over loopback on this executor, with their event channels.
    async fn connected_pairs() -> (
        (QueuePair, LocalReceiver<TransportEvent>),
        (QueuePair, LocalReceiver<TransportEvent>),
    ) {
        let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (connected, accepted) =
            futures_lite::future::zip(TcpStream::connect(addr), async { listener.accept().await })
                .await;
        let pair = |stream: TcpStream| {
            let (events, received) = local_channel::new_bounded(1024);
            (
                QueuePair::start(stream, RegionTable::new(), Rc::new(events)),
                received,
            )
        };
        (
            pair(connected.expect("connect")),
            pair(accepted.expect("accept")),
        )
    }

    fn run<F, Fut>(test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .spawn(test)
            .expect("executor")
            .join()
            .expect("test body");
    }

    async fn next_completion(events: &LocalReceiver<TransportEvent>) -> (u64, WorkStatus) {
        loop {
            match events.recv().await.expect("events") {
                TransportEvent::Completion { wr_id, status, .. } => return (wr_id, status),
                TransportEvent::Down { reason, .. } => panic!("pair went down: {reason}"),
                _ => {}
            }
        }
    }

    #[test]
    fn a_send_nobody_answers_completes_through_the_delayed_ack() {
        // The receiver sends nothing back, so the ACK cannot ride on a frame of its own: the
        // delayed-ACK timer must send it, or the sender's work request would stay outstanding
        // until the transport timeout failed the pair.
        run(|| async {
            let ((sender, sender_events), (receiver, receiver_events)) = connected_pairs().await;
            sender.post_send(7, b"order batch").expect("post");
            match receiver_events.recv().await.expect("events") {
                TransportEvent::Received { bytes, .. } => assert_eq!(bytes, b"order batch"),
                other => panic!("expected the message, got {other:?}"),
            }
            assert_eq!(
                next_completion(&sender_events).await,
                (7, WorkStatus::Success)
            );
            assert_eq!(sender.outstanding(), 0);
            drop(receiver);
        });
    }

    #[test]
    fn a_burst_of_sends_is_acknowledged_in_full() {
        // More SENDs than may wait for a delayed ACK, then a few more: every one completes, in
        // order, and nothing stays outstanding.
        run(|| async {
            let ((sender, sender_events), (_receiver, receiver_events)) = connected_pairs().await;
            let sends = 3 * DELAYED_ACK_REQUESTS_MAX + 5;
            for wr_id in 0..sends {
                sender.post_send(wr_id, &wr_id.to_le_bytes()).expect("post");
            }
            for wr_id in 0..sends {
                match receiver_events.recv().await.expect("events") {
                    TransportEvent::Received { bytes, .. } => {
                        assert_eq!(bytes, wr_id.to_le_bytes())
                    }
                    other => panic!("expected message {wr_id}, got {other:?}"),
                }
            }
            for wr_id in 0..sends {
                assert_eq!(
                    next_completion(&sender_events).await,
                    (wr_id, WorkStatus::Success)
                );
            }
            assert_eq!(sender.outstanding(), 0);
        });
    }

    #[test]
    fn an_answer_carries_the_ack_of_the_message_it_answers() {
        // Request and answer: both sides' SENDs complete, the answerer's through the requester's
        // delayed ACK, the requester's through the ACK riding on the answer or its timer.
        run(|| async {
            let ((requester, requester_events), (answerer, answerer_events)) =
                connected_pairs().await;
            // The answerer's answers complete while it waits for the next question: the ACK rides
            // on the question.
            let mut answers_completed = 0;
            for round in 0..20u64 {
                requester.post_send(round, b"question").expect("post");
                loop {
                    match answerer_events.recv().await.expect("events") {
                        TransportEvent::Received { bytes, .. } => {
                            assert_eq!(bytes, b"question");
                            break;
                        }
                        TransportEvent::Completion { wr_id, status, .. } => {
                            assert_eq!((wr_id, status), (answers_completed, WorkStatus::Success));
                            answers_completed += 1;
                        }
                        other => panic!("expected the question, got {other:?}"),
                    }
                }
                answerer.post_send(round, b"answer").expect("post");
                let mut answered = false;
                let mut completed = false;
                while !(answered && completed) {
                    match requester_events.recv().await.expect("events") {
                        TransportEvent::Received { bytes, .. } => {
                            assert_eq!(bytes, b"answer");
                            answered = true;
                        }
                        TransportEvent::Completion { wr_id, status, .. } => {
                            assert_eq!((wr_id, status), (round, WorkStatus::Success));
                            completed = true;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            assert_eq!(requester.outstanding(), 0);
            // The last answers (at least the last one) are acknowledged by the requester's timer.
            assert!(answers_completed < 20);
            while answers_completed < 20 {
                assert_eq!(
                    next_completion(&answerer_events).await,
                    (answers_completed, WorkStatus::Success)
                );
                answers_completed += 1;
            }
            assert_eq!(answerer.outstanding(), 0);
        });
    }

    /// Bytes of frames queued on `qp` that nothing has written to its socket yet.
    fn queued_bytes(qp: &QueuePair) -> usize {
        #[allow(irrefutable_let_patterns)]
        let Backend::Tcp(pair) = &qp.backend
        else {
            panic!("a TCP pair")
        };
        pair.state.out.borrow().len()
    }

    #[test]
    fn a_small_send_leaves_before_the_poster_yields_and_frames_keep_their_order() {
        // A small SEND posted while the writer task holds nothing is written by the post
        // itself: when post_send returns, before this task has yielded to any other, nothing of
        // it is left queued (the kernel's socket buffer takes a few bytes at once). A SEND above
        // the eager limit stays queued for the writer task, and so does a small one posted
        // behind it: the peer gets all three in the order they were posted, and all complete.
        run(|| async {
            let ((sender, sender_events), (receiver, receiver_events)) = connected_pairs().await;
            sender.post_send(1, b"first").expect("post");
            assert_eq!(
                queued_bytes(&sender),
                0,
                "the small send went out with the post"
            );
            let large = vec![7u8; EAGER_SEND_BYTES_MAX + 1];
            sender.post_send(2, &large).expect("post");
            sender.post_send(3, b"third").expect("post");
            assert_eq!(
                queued_bytes(&sender),
                2 * FRAME_HEADER_BYTES + large.len() + 5,
                "the large send and the one behind it wait for the writer task"
            );
            for expected in [&b"first"[..], &large, b"third"] {
                match receiver_events.recv().await.expect("events") {
                    TransportEvent::Received { bytes, .. } => assert_eq!(bytes, expected),
                    other => panic!("expected a message, got {other:?}"),
                }
            }
            for wr_id in 1..=3 {
                assert_eq!(
                    next_completion(&sender_events).await,
                    (wr_id, WorkStatus::Success)
                );
            }
            drop(receiver);
        });
    }

    /// Plain memory for a test region.
    struct TestMemory(RefCell<Vec<u8>>);

    impl RegionMemory for TestMemory {
        fn with_bytes(&self, f: &mut dyn FnMut(&mut [u8])) {
            f(&mut self.0.borrow_mut())
        }
    }

    /// A writer and a target pair over loopback, the target exposing `len` bytes for remote
    /// writes; returns the pairs, the target's memory and the region's descriptor.
    async fn write_target(
        len: usize,
    ) -> (
        (QueuePair, LocalReceiver<TransportEvent>),
        (QueuePair, LocalReceiver<TransportEvent>),
        Rc<TestMemory>,
        RegionDescriptor,
    ) {
        let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (connected, accepted) =
            futures_lite::future::zip(TcpStream::connect(addr), async { listener.accept().await })
                .await;
        let memory = Rc::new(TestMemory(RefCell::new(vec![0u8; len])));
        let table = RegionTable::new();
        let region = table
            .try_register(memory.clone(), len as u64, ACCESS_REMOTE_WRITE)
            .expect("register");
        let (writer_tx, writer_rx) = local_channel::new_bounded(1024);
        let (target_tx, target_rx) = local_channel::new_bounded(1024);
        let writer = QueuePair::start(
            connected.expect("connect"),
            RegionTable::new(),
            Rc::new(writer_tx),
        );
        let target = QueuePair::start(accepted.expect("accept"), table, Rc::new(target_tx));
        ((writer, writer_rx), (target, target_rx), memory, region)
    }

    #[test]
    fn an_unhurried_write_is_placed_at_once_and_acknowledged_late() {
        // The bytes and the immediate reach the target as soon as the frame does; only the ACK
        // waits, for the delayed-ACK timer here, since the target sends nothing else.
        run(|| async {
            let ((writer, writer_events), (_target, target_events), memory, region) =
                write_target(4096).await;
            let posted = std::time::Instant::now();
            writer
                .post_write_unhurried(5, &[0xAB; 512], region.addr + 1024, region.rkey, Some(77))
                .expect("post");
            match target_events.recv().await.expect("events") {
                TransportEvent::ReceivedImm { imm, .. } => assert_eq!(imm, 77),
                other => panic!("expected the immediate, got {other:?}"),
            }
            assert!(memory.0.borrow()[1024..1536]
                .iter()
                .all(|&byte| byte == 0xAB));
            assert!(memory.0.borrow()[..1024].iter().all(|&byte| byte == 0));
            assert_eq!(
                next_completion(&writer_events).await,
                (5, WorkStatus::Success)
            );
            assert!(
                posted.elapsed() >= DELAYED_ACK,
                "the ACK of an unhurried write waits for the delayed-ACK timer"
            );
            assert_eq!(writer.outstanding(), 0);
        });
    }

    #[test]
    fn a_burst_of_unhurried_writes_completes_in_full_and_in_order() {
        // More unhurried writes than may wait for a delayed ACK, then a few more, then an
        // ordinary write: every one completes, in posting order, and nothing stays outstanding.
        run(|| async {
            let ((writer, writer_events), (_target, _target_events), memory, region) =
                write_target(64 << 10).await;
            let writes = 3 * DELAYED_ACK_REQUESTS_MAX + 5;
            for wr_id in 0..writes {
                let at = region.addr + wr_id % 128 * 512;
                writer
                    .post_write_unhurried(wr_id, &[wr_id as u8; 512], at, region.rkey, None)
                    .expect("post");
            }
            writer
                .post_write(writes, &[0xEE; 512], region.addr, region.rkey, None)
                .expect("post");
            for wr_id in 0..=writes {
                assert_eq!(
                    next_completion(&writer_events).await,
                    (wr_id, WorkStatus::Success)
                );
            }
            assert_eq!(writer.outstanding(), 0);
            assert!(memory.0.borrow()[..512].iter().all(|&byte| byte == 0xEE));
        });
    }

    #[test]
    fn frame_flags_are_checked() {
        // The one flag there is decodes on a WRITE; unknown bits, or the flag on another kind
        // of frame, are refused rather than ignored.
        let encoded = |kind: FrameKind, flags: u8| {
            let mut bytes = Vec::new();
            FrameHeader {
                kind,
                flags,
                payload_len: 0,
                imm: 0,
                value: 0,
                rkey: 0,
                aux: 0,
            }
            .encode(&mut bytes);
            bytes
        };
        for kind in [FrameKind::Write, FrameKind::WriteWithImm] {
            let header = FrameHeader::decode(&encoded(kind, FRAME_FLAG_ACK_MAY_WAIT));
            assert_eq!(header.map(|h| h.flags), Ok(FRAME_FLAG_ACK_MAY_WAIT));
            let error = FrameHeader::decode(&encoded(kind, 0x80)).unwrap_err();
            assert!(error.contains("unknown frame flags"), "{error}");
        }
        for kind in [FrameKind::Send, FrameKind::Read, FrameKind::Ack] {
            let error = FrameHeader::decode(&encoded(kind, FRAME_FLAG_ACK_MAY_WAIT)).unwrap_err();
            assert!(error.contains("frame flags"), "{error}");
        }
        let mut reserved = encoded(FrameKind::Write, 0);
        reserved[7] = 1;
        let error = FrameHeader::decode(&reserved).unwrap_err();
        assert!(error.contains("reserved"), "{error}");
    }
}
