//! Completion channels, completion queues and work completions.
//!
//! Facts from rdma-core's man pages this module relies on:
//! - ibv_req_notify_cq(3): arming is one-shot: one event for the next completion after the
//!   call, then the CQ must be armed again. With `solicited_only = 0` every new CQE counts.
//! - ibv_get_cq_event(3): the channel fd may be made non-blocking; `ibv_get_cq_event` then
//!   fails with EAGAIN when no event is queued. Every event got must be acknowledged with
//!   `ibv_ack_cq_events`, and "destroying a CQ will wait for all completion events to be
//!   acknowledged", so an unacknowledged event makes `ibv_destroy_cq` hang. Acknowledging
//!   takes a mutex, so acknowledgements are batched.
//! - The usual loop is: arm, wait for the event, acknowledge, arm again, then poll the CQ
//!   empty. An event may arrive with nothing left to poll (a CQE added between arming and
//!   polling was already taken); that is harmless.
//! - ibv_poll_cq(3): each polled completion is removed; for a completion with an error
//!   status only wr_id, status, qp_num and vendor_err are valid. A CQ that overruns raises
//!   IBV_EVENT_CQ_ERR and becomes unusable, so a CQ must have room for every completion that
//!   can be outstanding (this crate sizes it from the QPs' queue depths).
//! - ibv_destroy_cq(3) fails while a QP still uses the CQ (QPs hold an Arc of their CQs);
//!   ibv_destroy_comp_channel(3) fails while a CQ still uses the channel (CQs hold an Arc of
//!   their channel).

use std::ffi::CStr;
use std::fmt;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{Errno, Error, Result};

/// Events acknowledged in one `ibv_ack_cq_events` call; the rest wait for the next batch or
/// for the CQ's drop, which acknowledges whatever is left before destroying it.
const ACK_BATCH: u32 = 32;

/// Completions fetched from the device per `ibv_poll_cq` call (a stack array of this size).
const POLL_BATCH: usize = 32;

/// A completion event channel (`ibv_comp_channel`): a file descriptor that becomes readable
/// when an armed CQ gets a completion. Its fd is non-blocking so that a reactor (epoll,
/// io_uring) can wait on it and then read events without blocking.
///
/// It serves exactly one completion queue, so that an event read through a CQ is always that
/// CQ's and the CQ can account for (acknowledge) every event before it is destroyed.
pub struct CompletionChannel {
    raw: *mut sys::ibv_comp_channel,
    in_use: AtomicBool,
    context: Arc<Context>,
}

// SAFETY: the channel is a file descriptor wrapper; reading events from it is thread-safe in
// libibverbs (a read(2) of one event struct), and the only mutable state is atomic.
unsafe impl Send for CompletionChannel {}
// SAFETY: see `Send`.
unsafe impl Sync for CompletionChannel {}

impl fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionChannel")
            .field("fd", &self.as_raw_fd())
            .finish()
    }
}

impl CompletionChannel {
    pub fn new(context: &Arc<Context>) -> Result<Arc<CompletionChannel>> {
        // SAFETY: the context is open (held by the Arc).
        let raw = unsafe { sys::ibv_create_comp_channel(context.raw()) };
        if raw.is_null() {
            return Err(Error::CreateChannel(Errno::last()));
        }
        let channel = CompletionChannel {
            raw,
            in_use: AtomicBool::new(false),
            context: Arc::clone(context),
        };
        // ibv_get_cq_event(3), non-blocking example: set O_NONBLOCK with fcntl on channel->fd.
        let fd = channel.as_raw_fd();
        // SAFETY: fcntl on a descriptor the channel owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(Error::ChannelNonBlocking(Errno::last()));
        }
        Ok(Arc::new(channel))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    /// Waits until the fd is readable or `timeout` passes (`None`: forever). True if readable.
    fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool> {
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
        };
        let mut pollfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let errno = Errno::last();
            if errno.0 != libc::EINTR {
                return Err(Error::WaitChannel(errno));
            }
        }
    }
}

impl AsRawFd for CompletionChannel {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: `raw` is live; `fd` is set at creation and never changes.
        unsafe { (*self.raw).fd }
    }
}

impl AsFd for CompletionChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open as long as the channel (it is closed in Drop).
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once, after its CQ (the CQ holds an Arc of it).
        let rc = unsafe { sys::ibv_destroy_comp_channel(self.raw) };
        debug_assert_eq!(rc, 0, "ibv_destroy_comp_channel failed");
    }
}

/// A completion queue (`ibv_cq`), optionally attached to a [`CompletionChannel`].
pub struct CompletionQueue {
    raw: *mut sys::ibv_cq,
    entries: u32,
    /// Events got from the channel and not yet acknowledged.
    events_unacked: AtomicU32,
    channel: Option<Arc<CompletionChannel>>,
    context: Arc<Context>,
}

// SAFETY: libibverbs providers lock a CQ's ring inside ibv_poll_cq and ibv_req_notify_cq, so
// the CQ may be polled and armed from any thread, even concurrently; the only state kept here
// is an atomic counter. QPs in other threads hold it through an Arc.
unsafe impl Send for CompletionQueue {}
// SAFETY: see `Send`.
unsafe impl Sync for CompletionQueue {}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("entries", &self.entries)
            .field("channel", &self.channel)
            .finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ with room for at least `entries` completions. With a channel, the CQ can
    /// be armed and waited for; the channel must not already serve another CQ.
    pub fn new(
        context: &Arc<Context>,
        entries: u32,
        channel: Option<&Arc<CompletionChannel>>,
    ) -> Result<Arc<CompletionQueue>> {
        assert!(entries > 0, "a completion queue needs at least one entry");
        let max = context.attributes().max_cqe;
        if max > 0 {
            assert!(
                entries <= max,
                "{entries} CQ entries; the device allows {max}"
            );
        }
        if let Some(channel) = channel {
            if channel.in_use.swap(true, Ordering::AcqRel) {
                return Err(Error::ChannelInUse);
            }
        }
        let channel_raw = channel.map_or(std::ptr::null_mut(), |c| c.raw);
        // SAFETY: the context and channel are live (held by Arcs); cq_context is unused.
        let raw = unsafe {
            sys::ibv_create_cq(
                context.raw(),
                entries as libc::c_int,
                std::ptr::null_mut(),
                channel_raw,
                0,
            )
        };
        if raw.is_null() {
            let errno = Errno::last();
            if let Some(channel) = channel {
                channel.in_use.store(false, Ordering::Release);
            }
            return Err(Error::CreateCq { entries, errno });
        }
        // ibv_create_cq(3): the CQ may be larger than asked; `cqe` holds the real size.
        // SAFETY: `raw` is live.
        let granted = unsafe { (*raw).cqe };
        assert!(granted >= entries as libc::c_int, "CQ smaller than asked");
        Ok(Arc::new(CompletionQueue {
            raw,
            entries: granted as u32,
            events_unacked: AtomicU32::new(0),
            channel: channel.cloned(),
            context: Arc::clone(context),
        }))
    }

    /// The number of completions the CQ holds, as granted by the device.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    /// The channel, whose fd a reactor waits on.
    pub fn channel(&self) -> Option<&Arc<CompletionChannel>> {
        self.channel.as_ref()
    }

    pub(crate) fn raw(&self) -> *mut sys::ibv_cq {
        self.raw
    }

    /// Polls up to `out.len()` completions into `out`; returns how many were written. Never
    /// blocks.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        let mut done = 0;
        while done < out.len() {
            let want = (out.len() - done).min(POLL_BATCH);
            let mut raw: [MaybeUninit<sys::ibv_wc>; POLL_BATCH] =
                [const { MaybeUninit::uninit() }; POLL_BATCH];
            // SAFETY: `raw` has room for `want` ibv_wc entries; the CQ is live.
            let n = unsafe { sys::ibv_poll_cq(self.raw, want as libc::c_int, raw[0].as_mut_ptr()) };
            if n < 0 {
                return Err(Error::PollCq(n));
            }
            let n = n as usize;
            assert!(n <= want, "ibv_poll_cq returned more than asked");
            for (slot, wc) in out[done..done + n].iter_mut().zip(&raw[..n]) {
                // SAFETY: the provider wrote the first `n` entries.
                *slot = WorkCompletion::from_raw(unsafe { wc.assume_init_ref() });
            }
            done += n;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    /// Arms the CQ: the next completion added to it produces one event on the channel
    /// (ibv_req_notify_cq with solicited_only = 0). Poll the CQ empty after arming, or a
    /// completion that arrived before the arming goes unnoticed.
    pub fn arm(&self) -> Result<()> {
        assert!(self.channel.is_some(), "arming a CQ without a channel");
        // SAFETY: the CQ is live.
        let rc = unsafe { sys::ibv_req_notify_cq(self.raw, 0) };
        if rc != 0 {
            return Err(Error::ArmCq(Errno(rc)));
        }
        Ok(())
    }

    /// Takes one event from the channel if one is queued, without blocking. True if an event
    /// was taken (and counted for acknowledgement).
    pub fn try_get_event(&self) -> Result<bool> {
        let channel = self.channel.as_ref().expect("CQ has no channel");
        let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
        let mut cq_context: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; the out-pointers are valid.
        let rc = unsafe { sys::ibv_get_cq_event(channel.raw, &mut cq, &mut cq_context) };
        if rc != 0 {
            let errno = Errno::last();
            if errno.0 == libc::EAGAIN {
                return Ok(false);
            }
            return Err(Error::GetCqEvent(errno));
        }
        // One CQ per channel (enforced at creation), so the event is ours.
        assert_eq!(cq, self.raw, "event for a CQ this channel does not serve");
        let unacked = self.events_unacked.fetch_add(1, Ordering::AcqRel) + 1;
        if unacked >= ACK_BATCH {
            self.ack_events();
        }
        Ok(true)
    }

    /// Waits up to `timeout` (`None`: forever) for an event and takes it. True if one was
    /// taken, false on timeout. For a reactor: wait on the channel fd instead, then call
    /// [`CompletionQueue::try_get_event`].
    pub fn wait_event(&self, timeout: Option<Duration>) -> Result<bool> {
        let channel = self.channel.as_ref().expect("CQ has no channel");
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if self.try_get_event()? {
                return Ok(true);
            }
            let remaining =
                deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if remaining == Some(Duration::ZERO) {
                return Ok(false);
            }
            if !channel.wait_readable(remaining)? && remaining.is_some() {
                return Ok(false);
            }
        }
    }

    /// Acknowledges every event taken so far (ibv_ack_cq_events). Done in batches on its own;
    /// call it to acknowledge early.
    pub fn ack_events(&self) {
        let n = self.events_unacked.swap(0, Ordering::AcqRel);
        if n > 0 {
            // SAFETY: the CQ is live and `n` events were got and not yet acknowledged.
            unsafe { sys::ibv_ack_cq_events(self.raw, n) };
        }
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // ibv_destroy_cq waits for every event got to be acknowledged: do that first.
        self.ack_events();
        // SAFETY: created once, destroyed once, after its QPs (they hold an Arc of it).
        let rc = unsafe { sys::ibv_destroy_cq(self.raw) };
        debug_assert_eq!(rc, 0, "ibv_destroy_cq failed");
        if let Some(channel) = &self.channel {
            channel.in_use.store(false, Ordering::Release);
        }
    }
}

/// The status of a work completion: the names of `enum ibv_wc_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WcStatus {
    #[default]
    Success,
    LocLenErr,
    LocQpOpErr,
    LocEecOpErr,
    LocProtErr,
    /// The QP was in the error state: the work request was flushed, not executed.
    WrFlushErr,
    MwBindErr,
    BadRespErr,
    LocAccessErr,
    RemInvReqErr,
    /// The responder refused the access (key, bounds or rights): nothing was changed there.
    RemAccessErr,
    RemOpErr,
    /// The transport retry count was exhausted: the peer did not acknowledge in time.
    RetryExcErr,
    /// The receiver-not-ready retry count was exhausted: the peer posted no receive.
    RnrRetryExcErr,
    LocRddViolErr,
    RemInvRdReqErr,
    RemAbortErr,
    InvEecnErr,
    InvEecStateErr,
    FatalErr,
    RespTimeoutErr,
    GeneralErr,
    TmErr,
    TmRndvIncomplete,
    /// A value this crate does not know (newer rdma-core).
    Unknown(u32),
}

impl WcStatus {
    pub fn from_raw(raw: u32) -> WcStatus {
        use sys::ibv_wc_status as s;
        use WcStatus::*;
        match raw {
            s::IBV_WC_SUCCESS => Success,
            s::IBV_WC_LOC_LEN_ERR => LocLenErr,
            s::IBV_WC_LOC_QP_OP_ERR => LocQpOpErr,
            s::IBV_WC_LOC_EEC_OP_ERR => LocEecOpErr,
            s::IBV_WC_LOC_PROT_ERR => LocProtErr,
            s::IBV_WC_WR_FLUSH_ERR => WrFlushErr,
            s::IBV_WC_MW_BIND_ERR => MwBindErr,
            s::IBV_WC_BAD_RESP_ERR => BadRespErr,
            s::IBV_WC_LOC_ACCESS_ERR => LocAccessErr,
            s::IBV_WC_REM_INV_REQ_ERR => RemInvReqErr,
            s::IBV_WC_REM_ACCESS_ERR => RemAccessErr,
            s::IBV_WC_REM_OP_ERR => RemOpErr,
            s::IBV_WC_RETRY_EXC_ERR => RetryExcErr,
            s::IBV_WC_RNR_RETRY_EXC_ERR => RnrRetryExcErr,
            s::IBV_WC_LOC_RDD_VIOL_ERR => LocRddViolErr,
            s::IBV_WC_REM_INV_RD_REQ_ERR => RemInvRdReqErr,
            s::IBV_WC_REM_ABORT_ERR => RemAbortErr,
            s::IBV_WC_INV_EECN_ERR => InvEecnErr,
            s::IBV_WC_INV_EEC_STATE_ERR => InvEecStateErr,
            s::IBV_WC_FATAL_ERR => FatalErr,
            s::IBV_WC_RESP_TIMEOUT_ERR => RespTimeoutErr,
            s::IBV_WC_GENERAL_ERR => GeneralErr,
            s::IBV_WC_TM_ERR => TmErr,
            s::IBV_WC_TM_RNDV_INCOMPLETE => TmRndvIncomplete,
            other => Unknown(other),
        }
    }

    /// The raw `ibv_wc_status` code.
    pub fn raw(self) -> u32 {
        use sys::ibv_wc_status as s;
        use WcStatus::*;
        match self {
            Success => s::IBV_WC_SUCCESS,
            LocLenErr => s::IBV_WC_LOC_LEN_ERR,
            LocQpOpErr => s::IBV_WC_LOC_QP_OP_ERR,
            LocEecOpErr => s::IBV_WC_LOC_EEC_OP_ERR,
            LocProtErr => s::IBV_WC_LOC_PROT_ERR,
            WrFlushErr => s::IBV_WC_WR_FLUSH_ERR,
            MwBindErr => s::IBV_WC_MW_BIND_ERR,
            BadRespErr => s::IBV_WC_BAD_RESP_ERR,
            LocAccessErr => s::IBV_WC_LOC_ACCESS_ERR,
            RemInvReqErr => s::IBV_WC_REM_INV_REQ_ERR,
            RemAccessErr => s::IBV_WC_REM_ACCESS_ERR,
            RemOpErr => s::IBV_WC_REM_OP_ERR,
            RetryExcErr => s::IBV_WC_RETRY_EXC_ERR,
            RnrRetryExcErr => s::IBV_WC_RNR_RETRY_EXC_ERR,
            LocRddViolErr => s::IBV_WC_LOC_RDD_VIOL_ERR,
            RemInvRdReqErr => s::IBV_WC_REM_INV_RD_REQ_ERR,
            RemAbortErr => s::IBV_WC_REM_ABORT_ERR,
            InvEecnErr => s::IBV_WC_INV_EECN_ERR,
            InvEecStateErr => s::IBV_WC_INV_EEC_STATE_ERR,
            FatalErr => s::IBV_WC_FATAL_ERR,
            RespTimeoutErr => s::IBV_WC_RESP_TIMEOUT_ERR,
            GeneralErr => s::IBV_WC_GENERAL_ERR,
            TmErr => s::IBV_WC_TM_ERR,
            TmRndvIncomplete => s::IBV_WC_TM_RNDV_INCOMPLETE,
            Unknown(raw) => raw,
        }
    }

    /// libibverbs' own description (`ibv_wc_status_str`), e.g. "remote access error".
    pub fn description(self) -> &'static str {
        // SAFETY: ibv_wc_status_str returns a pointer to a static string for any value
        // (an "unknown" string for values out of range).
        let s = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(self.raw())) };
        s.to_str().unwrap_or("?")
    }

    pub fn is_success(self) -> bool {
        self == WcStatus::Success
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({}: {})", self, self.raw(), self.description())
    }
}

/// What a successful completion completed (`enum ibv_wc_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    CompSwap,
    FetchAdd,
    BindMw,
    LocalInv,
    /// A receive consumed by a SEND or SEND_WITH_IMM.
    Recv,
    /// A receive consumed by an RDMA_WRITE_WITH_IMM (the data went where the writer said).
    RecvRdmaWithImm,
    Unknown(u32),
}

impl WcOpcode {
    pub fn from_raw(raw: u32) -> WcOpcode {
        use sys::ibv_wc_opcode as o;
        match raw {
            o::IBV_WC_SEND => WcOpcode::Send,
            o::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            o::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            o::IBV_WC_COMP_SWAP => WcOpcode::CompSwap,
            o::IBV_WC_FETCH_ADD => WcOpcode::FetchAdd,
            o::IBV_WC_BIND_MW => WcOpcode::BindMw,
            o::IBV_WC_LOCAL_INV => WcOpcode::LocalInv,
            o::IBV_WC_RECV => WcOpcode::Recv,
            o::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            other => WcOpcode::Unknown(other),
        }
    }
}

/// One work completion, copied out of the CQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: WcStatus,
    /// `None` unless the status is success: ibv_poll_cq(3) leaves it undefined otherwise.
    pub opcode: Option<WcOpcode>,
    /// Bytes received (receives) or read; 0 unless the status is success.
    pub byte_len: u32,
    /// The immediate of a SEND_WITH_IMM or RDMA_WRITE_WITH_IMM, in host byte order.
    pub imm_data: Option<u32>,
    /// The local QP the work request was posted on.
    pub qp_num: u32,
    /// The provider's own error detail, for logs.
    pub vendor_err: u32,
}

impl WorkCompletion {
    fn from_raw(wc: &sys::ibv_wc) -> WorkCompletion {
        let status = WcStatus::from_raw(wc.status);
        let ok = status.is_success();
        let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        WorkCompletion {
            wr_id: wc.wr_id,
            status,
            opcode: ok.then(|| WcOpcode::from_raw(wc.opcode)),
            byte_len: if ok { wc.byte_len } else { 0 },
            // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate, which the wire
            // carries in network byte order (__be32).
            imm_data: (ok && with_imm)
                .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_raw_code() {
        // The enum covers all of ibv_wc_status (0..=23) in order; unknown codes survive.
        for raw in 0..=23 {
            let status = WcStatus::from_raw(raw);
            assert!(!matches!(status, WcStatus::Unknown(_)), "{raw} unmapped");
            assert_eq!(status.raw(), raw);
        }
        assert_eq!(WcStatus::from_raw(99), WcStatus::Unknown(99));
        assert_eq!(WcStatus::RemAccessErr.raw(), 10);
        assert_eq!(WcStatus::RetryExcErr.raw(), 12);
        assert_eq!(WcStatus::WrFlushErr.raw(), 5);
    }

    #[test]
    fn status_descriptions_come_from_libibverbs() {
        // ibv_wc_status_str is a pure table lookup in libibverbs: it works without a device.
        assert_eq!(WcStatus::Success.description(), "success");
        assert_eq!(
            WcStatus::RetryExcErr.description(),
            "transport retry counter exceeded"
        );
        assert_eq!(
            WcStatus::RemAccessErr.to_string(),
            "RemAccessErr (10: remote access error)"
        );
        assert_eq!(WcStatus::Unknown(200).description(), "unknown");
    }

    #[test]
    fn completion_conversion_hides_fields_an_error_leaves_undefined() {
        // A successful RECV_RDMA_WITH_IMM gives opcode, length and a host-order immediate; an
        // error completion exposes only wr_id, status, qp_num and vendor_err.
        // SAFETY: ibv_wc is plain data; all-zero is a valid value.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        wc.wr_id = 42;
        wc.status = sys::ibv_wc_status::IBV_WC_SUCCESS;
        wc.opcode = sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
        wc.byte_len = 512;
        wc.wc_flags = sys::ibv_wc_flags::IBV_WC_WITH_IMM.0;
        wc.imm_data_invalidated_rkey_union.imm_data = 0x1234_5678u32.to_be();
        wc.qp_num = 17;
        let ok = WorkCompletion::from_raw(&wc);
        assert_eq!(ok.opcode, Some(WcOpcode::RecvRdmaWithImm));
        assert_eq!(ok.byte_len, 512);
        assert_eq!(ok.imm_data, Some(0x1234_5678));
        assert_eq!(ok.qp_num, 17);

        wc.status = sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR;
        wc.vendor_err = 3;
        let flushed = WorkCompletion::from_raw(&wc);
        assert_eq!(flushed.status, WcStatus::WrFlushErr);
        assert_eq!(flushed.opcode, None);
        assert_eq!(flushed.byte_len, 0);
        assert_eq!(flushed.imm_data, None);
        assert_eq!(
            (flushed.wr_id, flushed.qp_num, flushed.vendor_err),
            (42, 17, 3)
        );
    }
}
