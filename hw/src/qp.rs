//! Reliable-connected queue pairs: creation, checked state transitions, posting.
//!
//! # Connection
//! Each side creates a QP, moves it to INIT, and sends its [`Endpoint`] (QP number, first
//! packet sequence number, GID, LID) to the peer out of band. With the peer's endpoint each
//! side moves to RTR (ready to receive) and then RTS (ready to send). ibv_modify_qp(3) lists
//! the attributes each RC transition requires; the masks below are exactly those:
//! - RESET->INIT: STATE, PKEY_INDEX, PORT, ACCESS_FLAGS
//! - INIT->RTR: STATE, AV, PATH_MTU, DEST_QPN, RQ_PSN, MAX_DEST_RD_ATOMIC, MIN_RNR_TIMER
//! - RTR->RTS: STATE, SQ_PSN, MAX_QP_RD_ATOMIC, RETRY_CNT, RNR_RETRY, TIMEOUT
//!
//! "If any of the modify attributes or the modify mask are invalid, none of the attributes
//! will be modified (including the QP state)": a failed transition leaves the QP where it was.
//!
//! # Timers and retries (the defaults, and why)
//! - `timeout` is the local ACK timeout: the requester retransmits when a packet is not
//!   acknowledged within 4.096 µs × 2^timeout (rxe computes exactly
//!   `nsecs_to_jiffies(4096 << timeout)`; 0 means wait forever, which this crate refuses).
//!   Default [`DEFAULT_TIMEOUT`] = 14, i.e. 67.1 ms: well above a data-centre or metro round
//!   trip (a spurious retransmission costs bandwidth, not correctness), small enough that a
//!   dead peer is noticed in well under two seconds. Raise it by one (doubling) for each
//!   doubling of a long-distance link's round trip beyond ~30 ms.
//! - `retry_cnt` (3 bits) is how many times the requester retransmits after a timeout before
//!   failing the work request with `IBV_WC_RETRY_EXC_ERR` and moving the QP to the error
//!   state. Default [`DEFAULT_RETRY_CNT`] = 6, not 7: rxe treats 7 as "retry forever"
//!   (`if (qp->comp.retry_cnt != 7) qp->comp.retry_cnt--;`), and perftest with its default of 7
//!   never reported a killed peer in the soft-RoCE report, while retry_count 3 did.
//! - A dead peer therefore surfaces after (retry_cnt + 1) timeouts: the first transmission's
//!   timer plus one per retry. With the defaults that is nominally 7 × 67.1 ms = 470 ms
//!   ([`RtsParams::dead_peer_nominal`]); rxe in a QEMU guest measured 466-496 ms, and
//!   67 ms nominal took 95-147 ms with timeout 12 and 3 retries. Devices round timers (rxe to a jiffy, 4 ms at
//!   HZ=250) and some raise small timeouts to a device minimum, so the bound this crate
//!   promises, [`RtsParams::dead_peer_bound`], is four times the nominal value — room for the
//!   device to raise the exponent by two — i.e. 1.88 s with the defaults.
//! - `min_rnr_timer` is set on the responder: how long it tells a sender to wait (an RNR NAK)
//!   when a SEND arrives and no receive is posted. The 5-bit code maps to IBTA table 45 (see
//!   [`rnr_delay`]). Default [`DEFAULT_MIN_RNR_TIMER`] = 24, i.e. 40.96 ms: the protocol keeps
//!   receives posted ahead of the sender (credits), so an RNR means the receiver is stalled,
//!   and retrying every 41 ms rather than every few µs keeps a stalled receiver from being
//!   flooded while still recovering from a short stall.
//! - `rnr_retry` (3 bits) is how many RNR NAKs the sender tolerates before failing with
//!   `IBV_WC_RNR_RETRY_EXC_ERR`; 7 means forever (IBTA and rxe alike), which this crate
//!   refuses. Default [`DEFAULT_RNR_RETRY`] = 6: a receiver stalled for longer than about
//!   7 × 41 ms = 287 ms fails the sender's work request instead of hanging it.
//! - `path_mtu` comes from the port's active MTU ([`crate::PortInfo::active_mtu`]); it must
//!   not exceed it (and, between two hosts, must be the smaller of the two sides').
//! - `max_rd_atomic` / `max_dest_rd_atomic`: RDMA READs in flight per QP as initiator and as
//!   responder. Default [`DEFAULT_RD_ATOMIC`] = 16, lowered to the device's
//!   `max_qp_init_rd_atom` / `max_qp_rd_atom`.
//! - `max_inline_data`: the largest SEND or WRITE whose payload the CPU copies into the work
//!   request itself, so no memory region is needed and the buffer is free when the post
//!   returns. The device may grant more than asked; [`QueuePair::caps`] reads back what it
//!   granted and posting checks inline sizes against that.
//!
//! # Safety contract of posting
//! [`QueuePair::post_send`] and [`QueuePair::post_recv`] are `unsafe` with one contract:
//! every byte range a work request names — its scatter/gather entries, and for one-sided
//! operations the local side of the transfer — must stay valid, registered, and must not be
//! moved, freed, reused for other data or deregistered until that work request's completion
//! has been polled (or, for unsignaled sends, until a later signaled send on the same QP has
//! completed, which retires the earlier ones; or until the QP has been destroyed).
//! ibv_post_send(3): "The buffers used by a WR can only be safely reused after WR the request
//! is fully executed and a work completion has been retrieved from the corresponding
//! completion queue (CQ). However, if the IBV_SEND_INLINE flag was set, the buffer can be
//! reused immediately after the call returns." So buffers of inline sends may be released or
//! overwritten as soon as `post_send` returns. The work request structures themselves are
//! built in the QP's scratch space and are not needed after the call (the provider copies
//! them into its queue).

use std::fmt;
use std::mem::{offset_of, size_of, MaybeUninit};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys as sys;

use crate::cq::CompletionQueue;
use crate::device::{Gid, Mtu};
use crate::error::{Errno, Error, Result, Transition};
use crate::memory::{Access, ProtectionDomain, RemoteAddr, Sge};

/// Local ACK timeout exponent: 4.096 µs × 2^14 = 67.1 ms. See the module docs.
pub const DEFAULT_TIMEOUT: u8 = 14;
/// Transport retries after a timeout; 6 because rxe treats 7 as infinite. See the module docs.
pub const DEFAULT_RETRY_CNT: u8 = 6;
/// RNR NAK retries; 7 would be infinite. See the module docs.
pub const DEFAULT_RNR_RETRY: u8 = 6;
/// RNR NAK timer code 24 = 40.96 ms (IBTA table 45). See the module docs.
pub const DEFAULT_MIN_RNR_TIMER: u8 = 24;
/// RDMA READs in flight per QP, each way, before clamping to the device's limits.
pub const DEFAULT_RD_ATOMIC: u8 = 16;
/// The margin between the nominal dead-peer time and the promised bound.
pub const DEAD_PEER_MARGIN: u32 = 4;

/// The bytes [`Endpoint::encode`] produces.
pub const ENDPOINT_BYTES: usize = 26;

// ibv_send_wr, ibv_wc and ibv_gid are written by hand in rdma-sys (bindgen cannot do their
// unions); a layout slip there would corrupt every post and poll, so pin them to verbs.h's
// x86_64 layout.
const _: () = assert!(size_of::<sys::ibv_sge>() == 16);
const _: () = assert!(size_of::<sys::ibv_recv_wr>() == 32);
const _: () = assert!(size_of::<sys::ibv_send_wr>() == 128);
const _: () = assert!(offset_of!(sys::ibv_send_wr, imm_data_invalidated_rkey_union) == 36);
const _: () = assert!(offset_of!(sys::ibv_send_wr, wr) == 40);
const _: () = assert!(offset_of!(sys::ibv_send_wr, qp_type) == 72);
const _: () = assert!(offset_of!(sys::ibv_send_wr, bind_mw_tso_union) == 80);
const _: () = assert!(size_of::<sys::ibv_wc>() == 48);
const _: () = assert!(offset_of!(sys::ibv_wc, imm_data_invalidated_rkey_union) == 24);
const _: () = assert!(offset_of!(sys::ibv_wc, wc_flags) == 36);
const _: () = assert!(size_of::<sys::ibv_gid>() == 16);
const _: () = assert!(size_of::<sys::ibv_gid_entry>() == 32);
const _: () = assert!(size_of::<sys::ibv_ah_attr>() == 32);

/// The 4.096 µs × 2^timeout local ACK timeout a `timeout` exponent stands for.
pub fn ack_timeout(timeout: u8) -> Duration {
    assert!(
        (1..=31).contains(&timeout),
        "timeout exponent {timeout}: 0 is infinite, the field has 5 bits"
    );
    Duration::from_nanos(4096u64 << timeout)
}

/// The delay an RNR NAK timer code stands for (IBTA table 45 "Encoding for RNR NAK Timer
/// Field"; code 0 is the longest, 655.36 ms).
pub fn rnr_delay(code: u8) -> Duration {
    const MICROS: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560,
        3_840, 5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
        163_840, 245_760, 327_680, 491_520,
    ];
    Duration::from_micros(MICROS[usize::from(code)])
}

/// Queue sizes, asked of the device at creation and read back as granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

impl Default for QpCaps {
    /// Enough for ordinal's links: order records in flight, payload writes with a header SGE
    /// and a data SGE, and inline order records (64 bytes fit any device that inlines at all).
    fn default() -> QpCaps {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_send_sge: 2,
            max_recv_sge: 1,
            max_inline_data: 64,
        }
    }
}

impl fmt::Display for QpCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "send_wr {} recv_wr {} send_sge {} recv_sge {} inline {}",
            self.max_send_wr,
            self.max_recv_wr,
            self.max_send_sge,
            self.max_recv_sge,
            self.max_inline_data
        )
    }
}

/// QP states (`enum ibv_qp_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
    Sqd,
    Sqe,
    Error,
    Unknown,
}

impl QpState {
    pub fn from_raw(raw: u32) -> QpState {
        use sys::ibv_qp_state as s;
        match raw {
            s::IBV_QPS_RESET => QpState::Reset,
            s::IBV_QPS_INIT => QpState::Init,
            s::IBV_QPS_RTR => QpState::Rtr,
            s::IBV_QPS_RTS => QpState::Rts,
            s::IBV_QPS_SQD => QpState::Sqd,
            s::IBV_QPS_SQE => QpState::Sqe,
            s::IBV_QPS_ERR => QpState::Error,
            _ => QpState::Unknown,
        }
    }

    pub fn to_raw(self) -> u32 {
        use sys::ibv_qp_state as s;
        match self {
            QpState::Reset => s::IBV_QPS_RESET,
            QpState::Init => s::IBV_QPS_INIT,
            QpState::Rtr => s::IBV_QPS_RTR,
            QpState::Rts => s::IBV_QPS_RTS,
            QpState::Sqd => s::IBV_QPS_SQD,
            QpState::Sqe => s::IBV_QPS_SQE,
            QpState::Error => s::IBV_QPS_ERR,
            QpState::Unknown => s::IBV_QPS_UNKNOWN,
        }
    }

    /// The name verbs documentation uses: RESET, INIT, RTR, RTS, SQD, SQE, ERR.
    pub fn name(self) -> &'static str {
        match self {
            QpState::Reset => "RESET",
            QpState::Init => "INIT",
            QpState::Rtr => "RTR",
            QpState::Rts => "RTS",
            QpState::Sqd => "SQD",
            QpState::Sqe => "SQE",
            QpState::Error => "ERR",
            QpState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for QpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the peer needs to connect its QP to ours, exchanged out of band.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// QP number (24 bits).
    pub qpn: u32,
    /// First packet sequence number this QP sends with (24 bits); the peer expects it.
    pub psn: u32,
    /// Our source GID: on RoCE the IP address packets are routed to.
    pub gid: Gid,
    /// Our LID; 0 on RoCE.
    pub lid: u16,
}

impl Endpoint {
    /// A fixed 26-byte little-endian encoding: qpn, psn, gid, lid.
    pub fn encode(&self) -> [u8; ENDPOINT_BYTES] {
        let mut out = [0u8; ENDPOINT_BYTES];
        out[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        out[4..8].copy_from_slice(&self.psn.to_le_bytes());
        out[8..24].copy_from_slice(&self.gid.0);
        out[24..26].copy_from_slice(&self.lid.to_le_bytes());
        out
    }

    /// Decodes [`Endpoint::encode`]'s bytes, refusing values a QP cannot have (the bytes come
    /// from the network).
    pub fn decode(bytes: &[u8]) -> Option<Endpoint> {
        if bytes.len() != ENDPOINT_BYTES {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let endpoint = Endpoint {
            qpn: u32_at(0),
            psn: u32_at(4),
            gid: Gid(bytes[8..24].try_into().unwrap()),
            lid: u16::from_le_bytes([bytes[24], bytes[25]]),
        };
        let fits_24_bits = |v: u32| v < (1 << 24);
        (fits_24_bits(endpoint.qpn) && fits_24_bits(endpoint.psn)).then_some(endpoint)
    }
}

/// INIT->RTR attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtrParams {
    pub remote: Endpoint,
    /// The path MTU: the smaller of both ports' active MTUs.
    pub path_mtu: Mtu,
    /// Index of our source GID (see [`crate::Context::select_gid`]).
    pub sgid_index: u8,
    /// See [`DEFAULT_MIN_RNR_TIMER`].
    pub min_rnr_timer: u8,
    /// Incoming READs served at once; lowered to the device's `max_qp_rd_atom`.
    pub max_dest_rd_atomic: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub service_level: u8,
}

impl RtrParams {
    /// The defaults of the module docs for connecting to `remote` over a path of `path_mtu`.
    pub fn new(remote: Endpoint, path_mtu: Mtu, sgid_index: u8) -> RtrParams {
        RtrParams {
            remote,
            path_mtu,
            sgid_index,
            min_rnr_timer: DEFAULT_MIN_RNR_TIMER,
            max_dest_rd_atomic: DEFAULT_RD_ATOMIC,
            // RoCE v2 packets are routed IP: 64 hops is the usual IP default.
            hop_limit: 64,
            traffic_class: 0,
            service_level: 0,
        }
    }
}

/// RTR->RTS attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtsParams {
    /// Local ACK timeout exponent (1..=31); see [`ack_timeout`].
    pub timeout: u8,
    /// Transport retries (0..=6; 7 is infinite on rxe and refused).
    pub retry_cnt: u8,
    /// RNR retries (0..=6; 7 is infinite and refused).
    pub rnr_retry: u8,
    /// Outgoing READs in flight; lowered to the device's `max_qp_init_rd_atom`.
    pub max_rd_atomic: u8,
}

impl Default for RtsParams {
    fn default() -> RtsParams {
        RtsParams {
            timeout: DEFAULT_TIMEOUT,
            retry_cnt: DEFAULT_RETRY_CNT,
            rnr_retry: DEFAULT_RNR_RETRY,
            max_rd_atomic: DEFAULT_RD_ATOMIC,
        }
    }
}

impl RtsParams {
    /// The time a dead peer nominally takes to surface as `RetryExcErr`: one timeout for the
    /// first transmission and one per retry.
    pub fn dead_peer_nominal(&self) -> Duration {
        ack_timeout(self.timeout) * (u32::from(self.retry_cnt) + 1)
    }

    /// The bound this crate promises for a dead peer to surface: [`DEAD_PEER_MARGIN`] times
    /// the nominal time (see the module docs). 1.88 s with the defaults.
    pub fn dead_peer_bound(&self) -> Duration {
        self.dead_peer_nominal() * DEAD_PEER_MARGIN
    }

    /// The time a receiver that posts no receive nominally takes to surface at the sender as
    /// `RnrRetryExcErr`: the first attempt and each of `rnr_retry` retries wait the delay
    /// the peer's `min_rnr_timer` code asks for. With the defaults 7 × 40.96 ms = 287 ms.
    pub fn rnr_stall_nominal(&self, peer_min_rnr_timer: u8) -> Duration {
        rnr_delay(peer_min_rnr_timer) * (u32::from(self.rnr_retry) + 1)
    }

    fn check(&self) {
        assert!(
            (1..=31).contains(&self.timeout),
            "timeout {}: 0 waits forever, the field has 5 bits",
            self.timeout
        );
        assert!(
            self.retry_cnt <= 6,
            "retry_cnt {}: 7 retries forever on rxe",
            self.retry_cnt
        );
        assert!(
            self.rnr_retry <= 6,
            "rnr_retry {}: 7 retries forever",
            self.rnr_retry
        );
        assert!(self.max_rd_atomic > 0, "max_rd_atomic 0 forbids READs");
    }
}

/// The operation of a send-queue work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// Two-sided: consumes a receive at the peer.
    Send,
    /// Two-sided, with a 32-bit immediate (host order here) delivered in the receive's
    /// completion.
    SendWithImm(u32),
    /// One-sided: the local bytes are placed at the remote address.
    RdmaWrite(RemoteAddr),
    /// One-sided write that also consumes a receive at the peer, whose completion carries the
    /// immediate and arrives after the data is placed.
    RdmaWriteWithImm(RemoteAddr, u32),
    /// One-sided: the remote bytes are placed in the local SGEs (which need LOCAL_WRITE).
    RdmaRead(RemoteAddr),
}

/// A send-queue work request.
#[derive(Clone, Copy, Debug)]
pub struct SendWr<'a> {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: &'a [Sge],
    /// Produce a completion (IBV_SEND_SIGNALED). Unsignaled requests complete silently when
    /// a later signaled one completes, and their send-queue slots are only known to be free
    /// then: signal at least one request in every `max_send_wr`. A failed or flushed request
    /// always produces a completion.
    pub signaled: bool,
    /// Copy the payload into the request (IBV_SEND_INLINE): SEND and WRITE only, at most the
    /// granted `max_inline_data` bytes, lkeys not checked, buffers free on return.
    pub inline: bool,
    /// Wait for earlier READs on this QP to finish first (IBV_SEND_FENCE).
    pub fence: bool,
}

impl<'a> SendWr<'a> {
    /// An unsignaled, non-inline request.
    pub fn new(wr_id: u64, op: SendOp, sges: &'a [Sge]) -> SendWr<'a> {
        SendWr {
            wr_id,
            op,
            sges,
            signaled: false,
            inline: false,
            fence: false,
        }
    }

    pub fn signaled(mut self) -> Self {
        self.signaled = true;
        self
    }

    pub fn inline(mut self) -> Self {
        self.inline = true;
        self
    }

    pub fn fence(mut self) -> Self {
        self.fence = true;
        self
    }

    fn bytes(&self) -> u64 {
        self.sges.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A receive-queue work request.
#[derive(Clone, Copy, Debug)]
pub struct RecvWr<'a> {
    pub wr_id: u64,
    pub sges: &'a [Sge],
}

/// A reliable-connected queue pair (`ibv_qp` of type IBV_QPT_RC), destroyed on drop. It
/// keeps its protection domain and completion queues alive.
pub struct QueuePair {
    raw: *mut sys::ibv_qp,
    requested: QpCaps,
    granted: QpCaps,
    psn: u32,
    /// The state our last successful transition set; the device may since have moved the QP
    /// to ERR on its own ([`QueuePair::state`] asks it).
    state: QpState,
    port: u8,
    rts: Option<RtsParams>,
    // Scratch space for building linked work-request lists; empty between calls.
    send_wrs: Vec<sys::ibv_send_wr>,
    recv_wrs: Vec<sys::ibv_recv_wr>,
    sges: Vec<sys::ibv_sge>,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: a QP may be moved to the thread that posts to it: libibverbs QP verbs may be called
// from any thread, and the scratch vectors hold no pointers between calls. It is deliberately
// not Sync: posting takes `&mut self` (doorbell batches are built in the QP's own scratch
// space), which gives each QP one owner at a time, as a thread-per-core reactor wants.
unsafe impl Send for QueuePair {}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qp_num())
            .field("psn", &self.psn)
            .field("state", &self.state)
            .field("caps", &self.granted)
            .finish()
    }
}

impl QueuePair {
    /// Creates an RC QP in the RESET state with `caps` (the device may grant more). Sends are
    /// signaled only when a work request asks (sq_sig_all = 0). The CQs must have room for
    /// every completion this QP can have outstanding.
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        assert!(
            Arc::ptr_eq(pd.context(), send_cq.context())
                && Arc::ptr_eq(pd.context(), recv_cq.context()),
            "PD and CQs belong to different devices"
        );
        assert!(caps.max_send_wr > 0 && caps.max_recv_wr > 0, "empty queues");
        assert!(caps.max_send_sge > 0 && caps.max_recv_sge > 0, "no SGEs");
        let attributes = pd.context().attributes();
        assert!(
            caps.max_send_wr <= attributes.max_qp_wr && caps.max_recv_wr <= attributes.max_qp_wr,
            "queue depth above the device's max_qp_wr {}",
            attributes.max_qp_wr
        );
        // A CQ overrun makes the CQ unusable (ibv_poll_cq(3)): each CQ must hold every
        // completion the queues feeding it can have outstanding. Other QPs sharing a CQ are
        // the caller's to account for.
        if Arc::ptr_eq(send_cq, recv_cq) {
            assert!(
                send_cq.entries() >= caps.max_send_wr + caps.max_recv_wr,
                "shared CQ of {} entries too small for both queues ({caps})",
                send_cq.entries()
            );
        } else {
            assert!(
                send_cq.entries() >= caps.max_send_wr && recv_cq.entries() >= caps.max_recv_wr,
                "CQs of {} and {} entries too small for the queues ({caps})",
                send_cq.entries(),
                recv_cq.entries()
            );
        }

        let mut init = MaybeUninit::<sys::ibv_qp_init_attr>::zeroed();
        // SAFETY: all-zero is a valid ibv_qp_init_attr (null pointers, zero numbers).
        let init = unsafe { init.assume_init_mut() };
        init.send_cq = send_cq.raw();
        init.recv_cq = recv_cq.raw();
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = caps.max_send_wr;
        init.cap.max_recv_wr = caps.max_recv_wr;
        init.cap.max_send_sge = caps.max_send_sge;
        init.cap.max_recv_sge = caps.max_recv_sge;
        init.cap.max_inline_data = caps.max_inline_data;
        // SAFETY: the PD and CQs are live (we hold Arcs); `init` is a valid init struct.
        let raw = unsafe { sys::ibv_create_qp(pd.raw(), init) };
        if raw.is_null() {
            return Err(Error::CreateQp {
                caps,
                errno: Errno::last(),
            });
        }
        // ibv_create_qp(3): "will update the qp_init_attr->cap struct with the actual QP
        // values of the QP that was created; the values will be greater than or equal to the
        // values requested."
        let granted = QpCaps {
            max_send_wr: init.cap.max_send_wr,
            max_recv_wr: init.cap.max_recv_wr,
            max_send_sge: init.cap.max_send_sge,
            max_recv_sge: init.cap.max_recv_sge,
            max_inline_data: init.cap.max_inline_data,
        };
        let qp = QueuePair {
            raw,
            requested: caps,
            granted,
            psn: random_psn(),
            state: QpState::Reset,
            port: 0,
            rts: None,
            send_wrs: Vec::with_capacity(granted.max_send_wr as usize),
            recv_wrs: Vec::with_capacity(granted.max_recv_wr as usize),
            sges: Vec::new(),
            send_cq: Arc::clone(send_cq),
            recv_cq: Arc::clone(recv_cq),
            pd: Arc::clone(pd),
        };
        assert!(
            granted.max_send_wr >= caps.max_send_wr,
            "device granted less"
        );
        assert!(
            granted.max_inline_data >= caps.max_inline_data,
            "device granted less"
        );
        Ok(qp)
    }

    /// The QP number peers address.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: `raw` is live.
        unsafe { (*self.raw).qp_num }
    }

    /// The first PSN this QP sends with (random, 24 bits).
    pub fn psn(&self) -> u32 {
        self.psn
    }

    /// The queue sizes the device granted (at least those requested).
    pub fn caps(&self) -> QpCaps {
        self.granted
    }

    /// The queue sizes requested at creation.
    pub fn requested_caps(&self) -> QpCaps {
        self.requested
    }

    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    pub fn send_cq(&self) -> &Arc<CompletionQueue> {
        &self.send_cq
    }

    pub fn recv_cq(&self) -> &Arc<CompletionQueue> {
        &self.recv_cq
    }

    /// The RTS parameters in force, once connected.
    pub fn rts_params(&self) -> Option<RtsParams> {
        self.rts
    }

    /// Our side of the connection, for the peer's [`QueuePair::to_rtr`].
    pub fn endpoint(&self, gid: Gid, lid: u16) -> Endpoint {
        Endpoint {
            qpn: self.qp_num(),
            psn: self.psn,
            gid,
            lid,
        }
    }

    /// The state the device reports (ibv_query_qp), which may be ERR after a failure even
    /// though no transition asked for it.
    pub fn state(&self) -> Result<QpState> {
        let mut attr = MaybeUninit::<sys::ibv_qp_attr>::zeroed();
        let mut init = MaybeUninit::<sys::ibv_qp_init_attr>::zeroed();
        // SAFETY: `raw` is live; both out-structures are writable.
        let rc = unsafe {
            sys::ibv_query_qp(
                self.raw,
                attr.as_mut_ptr(),
                sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as libc::c_int,
                init.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::QueryQp(Errno(rc)));
        }
        // SAFETY: filled by the provider (and zeroed before).
        Ok(QpState::from_raw(unsafe { attr.assume_init() }.qp_state))
    }

    fn check_from(&self, from: QpState, to: QpState) -> Result<Transition> {
        let transition = Transition { from, to };
        if self.state != from {
            return Err(Error::BadTransition {
                transition,
                actual: self.state,
            });
        }
        Ok(transition)
    }

    fn modify(
        &mut self,
        transition: Transition,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
    ) -> Result<()> {
        attr.qp_state = transition.to.to_raw();
        let mask = mask | sys::ibv_qp_attr_mask::IBV_QP_STATE;
        // SAFETY: `raw` is live; `attr` is a valid attribute struct for the mask.
        let rc = unsafe { sys::ibv_modify_qp(self.raw, attr, mask.0 as libc::c_int) };
        if rc != 0 {
            // ibv_modify_qp(3) returns the errno value.
            return Err(Error::ModifyQp {
                transition,
                errno: Errno(rc),
            });
        }
        self.state = transition.to;
        Ok(())
    }

    /// RESET->INIT on `port`, granting peers `access` to this QP's responder: REMOTE_WRITE
    /// and REMOTE_READ (memory regions must grant them too).
    pub fn to_init(&mut self, port: u8, access: Access) -> Result<()> {
        let transition = self.check_from(QpState::Reset, QpState::Init)?;
        assert!(port >= 1, "ports count from 1");
        assert!(
            (Access::REMOTE_WRITE | Access::REMOTE_READ).contains(access),
            "QP access {access}: only REMOTE_WRITE and REMOTE_READ apply to a QP"
        );
        let mut attr = zeroed_attr();
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = access.bits();
        use sys::ibv_qp_attr_mask as m;
        self.modify(
            transition,
            &mut attr,
            m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
        )?;
        self.port = port;
        Ok(())
    }

    /// INIT->RTR: connects the receive side to `params.remote`.
    pub fn to_rtr(&mut self, params: &RtrParams) -> Result<()> {
        let transition = self.check_from(QpState::Init, QpState::Rtr)?;
        assert!(params.min_rnr_timer <= 31, "min_rnr_timer has 5 bits");
        assert!(params.remote.qpn < 1 << 24 && params.remote.psn < 1 << 24);
        assert!(
            params.max_dest_rd_atomic > 0,
            "max_dest_rd_atomic 0 refuses READs"
        );
        let device = self.pd.context().attributes();
        let mut attr = zeroed_attr();
        attr.path_mtu = params.path_mtu.to_raw();
        attr.dest_qp_num = params.remote.qpn;
        attr.rq_psn = params.remote.psn;
        attr.max_dest_rd_atomic = params.max_dest_rd_atomic.min(device.max_qp_rd_atom).max(1);
        attr.min_rnr_timer = params.min_rnr_timer;
        attr.ah_attr.dlid = params.remote.lid;
        attr.ah_attr.sl = params.service_level;
        attr.ah_attr.port_num = self.port;
        // RoCE has no LIDs: packets carry a global route header addressed by GID, and a port
        // with IBV_QPF_GRH_REQUIRED insists on it (ibv_modify_qp(3)). On InfiniBand a zero
        // GID means "same subnet, route by LID".
        if !params.remote.gid.is_zero() {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = sys::ibv_gid {
                raw: params.remote.gid.0,
            };
            attr.ah_attr.grh.sgid_index = params.sgid_index;
            attr.ah_attr.grh.hop_limit = params.hop_limit;
            attr.ah_attr.grh.traffic_class = params.traffic_class;
            attr.ah_attr.grh.flow_label = 0;
        }
        use sys::ibv_qp_attr_mask as m;
        self.modify(
            transition,
            &mut attr,
            m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
        )
    }

    /// RTR->RTS: enables sending, starting at our PSN, with `params`' timers.
    pub fn to_rts(&mut self, params: &RtsParams) -> Result<()> {
        let transition = self.check_from(QpState::Rtr, QpState::Rts)?;
        params.check();
        let device = self.pd.context().attributes();
        let mut attr = zeroed_attr();
        attr.sq_psn = self.psn;
        attr.timeout = params.timeout;
        attr.retry_cnt = params.retry_cnt;
        attr.rnr_retry = params.rnr_retry;
        attr.max_rd_atomic = params.max_rd_atomic.min(device.max_qp_init_rd_atom).max(1);
        use sys::ibv_qp_attr_mask as m;
        self.modify(
            transition,
            &mut attr,
            m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
        )?;
        self.rts = Some(*params);
        Ok(())
    }

    /// Moves the QP to ERR from any state: every outstanding and every later work request
    /// completes with `WrFlushErr` and is not executed. This is how a QP is drained before it
    /// is destroyed, or fenced.
    pub fn to_error(&mut self) -> Result<()> {
        let transition = Transition {
            from: self.state,
            to: QpState::Error,
        };
        let mut attr = zeroed_attr();
        self.modify(transition, &mut attr, sys::ibv_qp_attr_mask(0))
    }

    /// Moves the QP to RESET from any state, discarding its queues (no completions) so that
    /// it can be connected again from scratch. A peer still sending to it gets no answer.
    pub fn to_reset(&mut self) -> Result<()> {
        let transition = Transition {
            from: self.state,
            to: QpState::Reset,
        };
        let mut attr = zeroed_attr();
        self.modify(transition, &mut attr, sys::ibv_qp_attr_mask(0))?;
        self.rts = None;
        Ok(())
    }

    /// Posts `list` to the send queue as one linked list: one doorbell for the whole batch.
    ///
    /// # Safety
    /// The module's posting contract: every buffer a work request names stays valid, and is
    /// neither moved, freed, reused nor deregistered, until its completion is polled (or a
    /// later signaled completion retires it, or the QP is destroyed). Buffers of inline
    /// requests may be released as soon as this returns.
    ///
    /// # Panics
    /// On programmer errors: more requests than the send queue holds, more SGEs than granted,
    /// inline data longer than granted or on a READ.
    pub unsafe fn post_send(&mut self, list: &[SendWr<'_>]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        let caps = self.granted;
        assert!(
            list.len() <= caps.max_send_wr as usize,
            "{} work requests in one batch; the send queue holds {}",
            list.len(),
            caps.max_send_wr
        );
        self.send_wrs.clear();
        self.sges.clear();
        for wr in list {
            assert!(
                wr.sges.len() <= caps.max_send_sge as usize,
                "{} SGEs; the QP takes {}",
                wr.sges.len(),
                caps.max_send_sge
            );
            if wr.inline {
                assert!(
                    !matches!(wr.op, SendOp::RdmaRead(_)),
                    "inline applies to SEND and WRITE only"
                );
                assert!(
                    wr.bytes() <= u64::from(caps.max_inline_data),
                    "{} inline bytes; the QP inlines up to {}",
                    wr.bytes(),
                    caps.max_inline_data
                );
            }
            self.sges.extend(wr.sges.iter().map(|s| sys::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            }));
        }
        let mut sge_at = 0;
        for wr in list {
            // SAFETY: ibv_send_wr is plain data; all-zero is its "nothing set" value.
            let mut raw: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            raw.wr_id = wr.wr_id;
            raw.num_sge = wr.sges.len() as libc::c_int;
            raw.sg_list = if wr.sges.is_empty() {
                std::ptr::null_mut()
            } else {
                // In bounds: `sges` holds every request's entries, in order.
                self.sges[sge_at..].as_mut_ptr()
            };
            sge_at += wr.sges.len();
            let mut flags = 0;
            if wr.signaled {
                flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if wr.inline {
                flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
            }
            if wr.fence {
                flags |= sys::ibv_send_flags::IBV_SEND_FENCE.0;
            }
            raw.send_flags = flags;
            use sys::ibv_wr_opcode as o;
            let (opcode, remote, imm) = match wr.op {
                SendOp::Send => (o::IBV_WR_SEND, None, None),
                SendOp::SendWithImm(imm) => (o::IBV_WR_SEND_WITH_IMM, None, Some(imm)),
                SendOp::RdmaWrite(r) => (o::IBV_WR_RDMA_WRITE, Some(r), None),
                SendOp::RdmaWriteWithImm(r, imm) => {
                    (o::IBV_WR_RDMA_WRITE_WITH_IMM, Some(r), Some(imm))
                }
                SendOp::RdmaRead(r) => (o::IBV_WR_RDMA_READ, Some(r), None),
            };
            raw.opcode = opcode;
            if let Some(imm) = imm {
                // verbs.h: "Immediate data in network byte order".
                raw.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            }
            if let Some(remote) = remote {
                raw.wr.rdma = sys::rdma_t {
                    remote_addr: remote.addr,
                    rkey: remote.rkey,
                };
            }
            self.send_wrs.push(raw);
        }
        // Link the list only now: the vector no longer grows, so the addresses are final.
        let base = self.send_wrs.as_mut_ptr();
        for i in 0..list.len() - 1 {
            // SAFETY: `i + 1 < len`; both are elements of the vector.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the list and its SGE arrays are valid for the call; the buffers they name
        // are the caller's responsibility (this function's contract).
        let rc = unsafe { sys::ibv_post_send(self.raw, base, &mut bad) };
        let index = bad_wr_index(base, bad, list.len());
        self.send_wrs.clear();
        self.sges.clear();
        if rc != 0 {
            return Err(Error::PostSend {
                index,
                errno: Errno(rc),
            });
        }
        Ok(())
    }

    /// Posts `list` to the receive queue as one linked list.
    ///
    /// # Safety
    /// As [`QueuePair::post_send`]: every buffer named stays valid, unmoved and registered
    /// until its completion is polled or the QP is destroyed.
    ///
    /// # Panics
    /// More requests than the receive queue holds, or more SGEs than granted.
    pub unsafe fn post_recv(&mut self, list: &[RecvWr<'_>]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        let caps = self.granted;
        assert!(
            list.len() <= caps.max_recv_wr as usize,
            "{} receives in one batch; the receive queue holds {}",
            list.len(),
            caps.max_recv_wr
        );
        self.recv_wrs.clear();
        self.sges.clear();
        for wr in list {
            assert!(
                wr.sges.len() <= caps.max_recv_sge as usize,
                "{} SGEs; the QP takes {} per receive",
                wr.sges.len(),
                caps.max_recv_sge
            );
            self.sges.extend(wr.sges.iter().map(|s| sys::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            }));
        }
        let mut sge_at = 0;
        for wr in list {
            let sg_list = if wr.sges.is_empty() {
                std::ptr::null_mut()
            } else {
                self.sges[sge_at..].as_mut_ptr()
            };
            sge_at += wr.sges.len();
            self.recv_wrs.push(sys::ibv_recv_wr {
                wr_id: wr.wr_id,
                next: std::ptr::null_mut(),
                sg_list,
                num_sge: wr.sges.len() as libc::c_int,
            });
        }
        let base = self.recv_wrs.as_mut_ptr();
        for i in 0..list.len() - 1 {
            // SAFETY: `i + 1 < len`; both are elements of the vector.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: as in post_send.
        let rc = unsafe { sys::ibv_post_recv(self.raw, base, &mut bad) };
        let index = bad_wr_index(base, bad, list.len());
        self.recv_wrs.clear();
        self.sges.clear();
        if rc != 0 {
            return Err(Error::PostRecv {
                index,
                errno: Errno(rc),
            });
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once. Completions already in the CQs stay there.
        let rc = unsafe { sys::ibv_destroy_qp(self.raw) };
        debug_assert_eq!(rc, 0, "ibv_destroy_qp failed");
    }
}

fn zeroed_attr() -> sys::ibv_qp_attr {
    // SAFETY: ibv_qp_attr is plain data; all-zero is valid (and what verbs users memset).
    unsafe { std::mem::zeroed() }
}

/// Which element of a posted list `bad` points at, if any. Providers report the first request
/// they could not queue; rxe reports none (null) when the doorbell itself fails.
fn bad_wr_index<T>(base: *const T, bad: *const T, len: usize) -> Option<usize> {
    if bad.is_null() {
        return None;
    }
    let offset = (bad as usize).checked_sub(base as usize)?;
    assert_eq!(
        offset % size_of::<T>(),
        0,
        "bad_wr not on an element boundary"
    );
    let index = offset / size_of::<T>();
    assert!(index < len, "bad_wr outside the posted list");
    Some(index)
}

/// A random 24-bit starting PSN, so that packets of an earlier connection between the same
/// QP numbers are not taken for this one's.
fn random_psn() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom(2) into a 4-byte buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let value = if n == 4 {
        u32::from_le_bytes(bytes)
    } else {
        // No entropy source: the time is unpredictable enough for this purpose.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos())
    };
    value & 0x00ff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_formula_and_default_dead_peer_bound() {
        // 4.096 µs × 2^timeout; the defaults give 7 × 67.1 ms nominal and four times that as
        // the promised bound.
        assert_eq!(ack_timeout(1), Duration::from_nanos(8192));
        assert_eq!(ack_timeout(14), Duration::from_nanos(67_108_864));
        let defaults = RtsParams::default();
        assert_eq!(
            (defaults.timeout, defaults.retry_cnt, defaults.rnr_retry),
            (14, 6, 6)
        );
        assert_eq!(
            defaults.dead_peer_nominal(),
            Duration::from_nanos(469_762_048)
        );
        assert_eq!(
            defaults.dead_peer_bound(),
            Duration::from_nanos(1_879_048_192)
        );
        assert!(defaults.dead_peer_bound() < Duration::from_secs(2));
        assert_eq!(
            defaults.rnr_stall_nominal(DEFAULT_MIN_RNR_TIMER),
            Duration::from_micros(7 * 40_960)
        );
    }

    #[test]
    #[should_panic(expected = "retry_cnt 7")]
    fn retry_count_seven_is_refused() {
        // rxe retries forever with 7: a dead peer would never surface.
        RtsParams {
            retry_cnt: 7,
            ..RtsParams::default()
        }
        .check();
    }

    #[test]
    #[should_panic(expected = "0 is infinite")]
    fn timeout_zero_is_refused() {
        // Timeout 0 disables the ACK timer.
        ack_timeout(0);
    }

    #[test]
    fn rnr_table_matches_ibta() {
        // A few anchors of IBTA table 45, and the default's 40.96 ms.
        assert_eq!(rnr_delay(0), Duration::from_micros(655_360));
        assert_eq!(rnr_delay(1), Duration::from_micros(10));
        assert_eq!(rnr_delay(16), Duration::from_micros(2_560));
        assert_eq!(rnr_delay(31), Duration::from_micros(491_520));
        assert_eq!(
            rnr_delay(DEFAULT_MIN_RNR_TIMER),
            Duration::from_micros(40_960)
        );
        // Codes 1..=31 increase monotonically; 0 is the special longest value.
        for code in 1..31 {
            assert!(rnr_delay(code) < rnr_delay(code + 1));
        }
    }

    #[test]
    fn endpoint_round_trips_and_rejects_bad_bytes() {
        // The out-of-band encoding is fixed-size and refuses 25-bit QP numbers or PSNs.
        let endpoint = Endpoint {
            qpn: 0x11,
            psn: 0xab_cdef,
            gid: Gid([7; 16]),
            lid: 3,
        };
        let bytes = endpoint.encode();
        assert_eq!(Endpoint::decode(&bytes), Some(endpoint));
        assert_eq!(Endpoint::decode(&bytes[..25]), None);
        let mut too_big = bytes;
        too_big[3] = 1; // qpn = 0x0100_0011
        assert_eq!(Endpoint::decode(&too_big), None);
    }

    #[test]
    fn bad_wr_index_maps_pointers_to_list_positions() {
        // The provider's bad_wr pointer becomes the index of the refused request.
        let list = [0u64; 4];
        let base = list.as_ptr();
        assert_eq!(bad_wr_index(base, std::ptr::null(), 4), None);
        assert_eq!(bad_wr_index(base, base, 4), Some(0));
        assert_eq!(bad_wr_index(base, base.wrapping_add(3), 4), Some(3));
    }

    #[test]
    fn transition_errors_name_the_transition_and_errno() {
        // Errors say which transition failed and why, in the words of the verbs docs.
        let err = Error::ModifyQp {
            transition: Transition {
                from: QpState::Init,
                to: QpState::Rtr,
            },
            errno: Errno(libc::EINVAL),
        };
        assert_eq!(
            err.to_string(),
            "ibv_modify_qp INIT->RTR failed: EINVAL (22): Invalid argument"
        );
        let err = Error::BadTransition {
            transition: Transition {
                from: QpState::Rtr,
                to: QpState::Rts,
            },
            actual: QpState::Init,
        };
        assert_eq!(
            err.to_string(),
            "QP transition RTR->RTS refused: the QP is in INIT, not RTR"
        );
        let err = Error::PostSend {
            index: Some(3),
            errno: Errno(libc::ENOMEM),
        };
        assert_eq!(
            err.to_string(),
            "ibv_post_send failed at work request 3: ENOMEM (12): Cannot allocate memory"
        );
        let err = Error::PostRecv {
            index: None,
            errno: Errno(libc::EINVAL),
        };
        assert!(err.to_string().contains("the doorbell"), "{err}");
    }

    #[test]
    fn random_psns_fit_24_bits() {
        // PSNs are 24-bit; two draws almost never collide.
        let a = random_psn();
        let b = random_psn();
        assert!(a < 1 << 24 && b < 1 << 24);
        assert!(a != b || random_psn() != a);
    }

    #[test]
    fn qp_states_map_to_verbs_names() {
        // State names follow the verbs documentation; raw values follow verbs.h.
        for state in [
            QpState::Reset,
            QpState::Init,
            QpState::Rtr,
            QpState::Rts,
            QpState::Sqd,
            QpState::Sqe,
            QpState::Error,
        ] {
            assert_eq!(QpState::from_raw(state.to_raw()), state);
        }
        assert_eq!(QpState::Error.name(), "ERR");
        assert_eq!(QpState::Rts.to_raw(), 3);
    }
}
