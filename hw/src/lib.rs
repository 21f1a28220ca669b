//! `ordinal-hw`: a safe wrapper over libibverbs (through `rdma-sys`) for ordinal's RDMA
//! transport.
//!
//! What it is: owned handles for the verbs objects ordinal uses — device contexts, protection
//! domains, memory regions, completion channels and queues, reliable-connected queue pairs —
//! each freed exactly once on drop, each child keeping its parents alive through an `Arc`, so
//! teardown order cannot go wrong. Queue pairs move through checked transitions whose errors
//! name the transition and the errno; posting builds one linked list per batch (one doorbell)
//! and is `unsafe` with a single written contract (see [`qp`]). The defaults for timers and
//! retries are chosen so that a dead peer surfaces as an error completion within a stated
//! bound ([`RtsParams::dead_peer_bound`]); the reasoning is in [`qp`]'s docs.
//!
//! What it is not: no connection manager (endpoints are exchanged out of band by the caller),
//! no async runtime (a reactor waits on [`CompletionChannel`]'s non-blocking fd and calls
//! [`CompletionQueue::try_get_event`] and [`CompletionQueue::poll`]), no protocol logic, no
//! shared receive queues, atomics, memory windows or UD/UC transports.
//!
//! Building needs libibverbs' headers (`libibverbs-dev librdmacm-dev libclang-dev
//! pkg-config` on Debian), which is why this crate is a workspace member but not a default
//! member. Running needs an RDMA device; soft-RoCE (`rdma_rxe`) is enough. The hardware tests
//! in `tests/verbs.rs` run when `ORDINAL_RDMA_DEVICE` names one (e.g. `rxe0`).

pub mod cq;
pub mod device;
pub mod error;
pub mod memory;
pub mod qp;

pub use cq::{CompletionChannel, CompletionQueue, WcOpcode, WcStatus, WorkCompletion};
pub use device::{
    Context, Device, DeviceAttributes, DeviceInfo, Gid, GidEntry, GidSelector, GidType, LinkLayer,
    Mtu, PortInfo, PortState,
};
pub use error::{Errno, Error, Result, Transition};
pub use memory::{
    Access, MemoryRegion, PageBuffer, ProtectionDomain, RawMemory, RegionBuffer, RemoteAddr,
    RemoteRegion, Sge,
};
pub use qp::{
    ack_timeout, rnr_delay, Endpoint, QpCaps, QpState, QueuePair, RecvWr, RtrParams, RtsParams,
    SendOp, SendWr,
};
