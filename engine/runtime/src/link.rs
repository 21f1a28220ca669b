//! Which transport a daemon's queue pairs run on (`--transport tcp|verbs`), chosen once per
//! daemon, and the two-step start every queue pair goes through: *prepare* in the connection's
//! own task (the verbs endpoint exchange is a round trip on the control stream), then *start* in
//! the role's loop, synchronously, so that no event of a queue pair can reach the loop before the
//! loop knows the pair.

use std::rc::Rc;

use glommio::net::TcpStream;
use ordinal_proto::Geometry;

use crate::transport::{QueuePair, RegionTable, TransportEvent};
use crate::Sender;

/// The largest inline payload a verbs queue pair asks of its device unless configured otherwise:
/// 256 bytes carry a one-record order batch (32 + 48 bytes) and status-table writes inline.
pub const INLINE_MAX_BYTES_DEFAULT: u32 = 256;

/// The transport named on the command line; opened on the daemon's executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// One TCP connection per queue pair, with RDMA's semantics (see `transport`).
    Tcp,
    /// RC queue pairs on an RDMA device (such as soft-RoCE's `rxe0`). A queue pair's poller
    /// keeps polling for `poll_spin` after its last completion before it sleeps on the
    /// completion channel: longer costs CPU and saves a wake-up per message. Work requests of
    /// up to `inline_max_bytes` (as far as the device allows) are posted inline.
    Verbs {
        device: String,
        poll_spin: std::time::Duration,
        inline_max_bytes: u32,
    },
}

impl TransportChoice {
    pub fn parse(
        transport: &str,
        device: &str,
        poll_spin: std::time::Duration,
        inline_max_bytes: u32,
    ) -> Result<TransportChoice, String> {
        match transport {
            "tcp" => Ok(TransportChoice::Tcp),
            "verbs" if cfg!(feature = "verbs") => Ok(TransportChoice::Verbs {
                device: device.to_string(),
                poll_spin,
                inline_max_bytes,
            }),
            "verbs" => Err("this build has no RDMA support (feature verbs)".into()),
            other => Err(format!("unknown transport {other:?}: use tcp or verbs")),
        }
    }
}

/// Which end of a connection a queue pair is at (the client speaks first when pairs connect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// An opened transport.
#[derive(Clone, Debug)]
pub enum Transport {
    Tcp,
    #[cfg(feature = "verbs")]
    Verbs(Rc<crate::verbs::VerbsDomain>),
}

impl Transport {
    /// Opens the transport; for verbs, the device, with send arenas that hold
    /// `payload_writes_inflight` of `geometry`'s largest write (the primary's payload writes in
    /// flight; roles that write no payloads pass the default, which leaves room to spare).
    pub fn open(
        choice: &TransportChoice,
        geometry: &Geometry,
        payload_writes_inflight: u64,
    ) -> Result<Transport, String> {
        match choice {
            TransportChoice::Tcp => {
                let _ = (geometry, payload_writes_inflight);
                Ok(Transport::Tcp)
            }
            #[cfg(feature = "verbs")]
            TransportChoice::Verbs {
                device,
                poll_spin,
                inline_max_bytes,
            } => {
                // Every queue pair copies what it sends into its registered arena until the
                // completion; the data pair has up to `payload_writes_inflight` payloads in
                // flight. The arena must also hold the largest frame the boundary accepts.
                // The primary's lag is bounded by the ring, so no more than the ring is ever in
                // flight, however many writes may be.
                let payloads = (payload_writes_inflight as usize
                    * geometry.payload_bytes_max as usize)
                    .min(geometry.ring_bytes as usize);
                let arena = (payloads + (payloads >> 2))
                    .max(crate::transport::FRAME_PAYLOAD_BYTES_MAX * 2)
                    .next_power_of_two();
                let config = crate::verbs::VerbsConfig {
                    send_arena_bytes: arena,
                    spin_after_completion: *poll_spin,
                    inline_max_bytes: *inline_max_bytes,
                    ..crate::verbs::VerbsConfig::default()
                };
                let domain = crate::verbs::VerbsDomain::open_with(device, config)?;
                Ok(Transport::Verbs(domain))
            }
            #[cfg(not(feature = "verbs"))]
            TransportChoice::Verbs { .. } => {
                Err("this build has no RDMA support (feature verbs)".into())
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            #[cfg(feature = "verbs")]
            Transport::Verbs(_) => "verbs",
        }
    }

    /// A table for the regions one connection may access (a protection domain of its own on
    /// verbs, so that a key granted on one connection works on no other).
    pub fn regions(&self) -> Result<Rc<RegionTable>, String> {
        match self {
            Transport::Tcp => Ok(RegionTable::new()),
            #[cfg(feature = "verbs")]
            Transport::Verbs(domain) => RegionTable::new_verbs(domain),
        }
    }

    /// Connects a queue pair over an authenticated stream; it starts with [`PreparedQp::start`].
    pub async fn prepare(
        &self,
        stream: TcpStream,
        regions: Rc<RegionTable>,
        events: Sender<TransportEvent>,
        side: Side,
    ) -> Result<PreparedQp, String> {
        match self {
            Transport::Tcp => {
                let _ = side;
                Ok(PreparedQp(Prepared::Tcp {
                    stream,
                    regions,
                    events,
                }))
            }
            #[cfg(feature = "verbs")]
            Transport::Verbs(domain) => {
                let side = match side {
                    Side::Client => crate::verbs::Side::Client,
                    Side::Server => crate::verbs::Side::Server,
                };
                let prepared = crate::verbs::prepare(domain, stream, regions, events, side).await?;
                Ok(PreparedQp(Prepared::Verbs(prepared)))
            }
        }
    }
}

/// A queue pair connected to its peer whose events nobody hears yet.
#[derive(Debug)]
pub struct PreparedQp(Prepared);

#[derive(Debug)]
enum Prepared {
    Tcp {
        stream: TcpStream,
        regions: Rc<RegionTable>,
        events: Sender<TransportEvent>,
    },
    #[cfg(feature = "verbs")]
    Verbs(crate::verbs::Prepared),
}

impl PreparedQp {
    /// Starts the queue pair: from now on its events reach the role's loop.
    pub fn start(self) -> Result<QueuePair, String> {
        match self.0 {
            Prepared::Tcp {
                stream,
                regions,
                events,
            } => Ok(QueuePair::start(stream, regions, events)),
            #[cfg(feature = "verbs")]
            Prepared::Verbs(prepared) => QueuePair::from_verbs(prepared.activate()?),
        }
    }
}
