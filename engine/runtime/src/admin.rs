//! What every daemon shares: the accept loop with its handshake, operator requests (status,
//! failover) on authenticated admin connections, the ticker, and the event loop's two inputs.
//!
//! Admin requests and answers are length-prefixed UTF-8 (a 4-byte little-endian length), a
//! request at most [`ADMIN_REQUEST_BYTES_MAX`] long, an answer at most
//! [`ADMIN_ANSWER_BYTES_MAX`]; answers are JSON.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::Sender;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::LocalReceiver;
use glommio::net::{TcpListener, TcpStream};

use crate::control::{self, ControlError, Grant, Hello, NodeInfo, Purpose, Refusal, Role};
use crate::link::{PreparedQp, Side, Transport};
use crate::transport::{RegionDescriptor, RegionTable, TransportEvent};

pub const ADMIN_REQUEST_BYTES_MAX: usize = 4096;
/// A loss report lists at most one entry per table slot; 64 MiB covers 2^20 slots.
pub const ADMIN_ANSWER_BYTES_MAX: usize = 64 << 20;

/// An operator request waiting for its answer from the daemon's event loop.
#[derive(Debug)]
pub struct AdminRequest {
    pub request: String,
    pub answer: Sender<String>,
}

/// An authenticated connection that is not an admin one, with its queue pair connected, handed
/// to the daemon (which starts the pair).
#[derive(Debug)]
pub struct Accepted {
    pub hello: Hello,
    pub qp: PreparedQp,
    pub regions: Rc<RegionTable>,
}

/// Decides what an authenticated hello is granted; registers regions in the given table. A
/// plain `String` error converts into a [`Refusal`] of no particular kind.
pub type Decide = Rc<dyn Fn(&Hello, &RegionTable) -> Result<Grant, Refusal>>;

/// What an accept loop needs besides its listener.
#[derive(Clone)]
pub struct AcceptContext {
    pub psk: Rc<Vec<u8>>,
    pub our_role: Role,
    pub decide: Decide,
    pub transport: Transport,
    pub events: Sender<TransportEvent>,
    pub accepted: Sender<Accepted>,
    pub admin: Sender<AdminRequest>,
}

impl std::fmt::Debug for AcceptContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptContext")
            .field("our_role", &self.our_role)
            .field("transport", &self.transport.name())
            .finish()
    }
}

/// Accepts connections forever: each is authenticated within the handshake deadline, and its
/// queue pair connected, in its own task, so a slow or hostile peer delays nobody else. Admin
/// connections are served here; others go to `accepted`.
pub async fn accept_loop(listener: TcpListener, context: AcceptContext) {
    let our_role = context.our_role;
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                crate::log!("{}: accept failed: {error}", our_role.name());
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let context = context.clone();
        glommio::spawn_local(async move {
            let AcceptContext {
                psk,
                decide,
                transport,
                events,
                accepted,
                admin,
                ..
            } = context;
            let mut stream = stream;
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            // The peer's region table (a protection domain on verbs) is made only once the peer
            // has proven the key: an unauthenticated connection costs no device resources.
            let mut regions: Option<Rc<RegionTable>> = None;
            let outcome = control::server_handshake(&mut stream, &psk, our_role, |hello| {
                if hello.purpose == Purpose::Admin {
                    return if hello.role == Role::Admin {
                        Ok(Grant {
                            info: NodeInfo {
                                geometry: None,
                                epoch: 0,
                            },
                            descriptors: Vec::new(),
                        })
                    } else {
                        Err("admin connections come from the admin role".into())
                    };
                }
                let table = transport.regions()?;
                regions = Some(table.clone());
                decide(hello, &table)
            })
            .await;
            match (outcome, regions) {
                (Ok(hello), _) if hello.purpose == Purpose::Admin => {
                    serve_admin(stream, admin).await
                }
                (Ok(hello), Some(regions)) => {
                    if hello.purpose == Purpose::OrderQp {
                        mark_latency_critical(&stream);
                    }
                    match transport
                        .prepare(stream, regions.clone(), events, Side::Server)
                        .await
                    {
                        Ok(qp) => {
                            let _ = accepted.send(Accepted { hello, qp, regions }).await;
                        }
                        Err(error) => crate::log!(
                            "{}: cannot connect a queue pair with {peer}: {error}",
                            our_role.name()
                        ),
                    }
                }
                (Ok(_), None) => unreachable!("a granted connection has its region table"),
                (Err(error), _) => {
                    crate::log!(
                        "{}: refused connection from {peer}: {error}",
                        our_role.name()
                    );
                }
            }
        })
        .detach();
    }
}

async fn serve_admin(mut stream: TcpStream, admin: Sender<AdminRequest>) {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > ADMIN_REQUEST_BYTES_MAX {
            return;
        }
        let mut request = vec![0u8; len];
        if stream.read_exact(&mut request).await.is_err() {
            return;
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        let (answer_tx, answer_rx) = glommio::channels::local_channel::new_bounded(1);
        let answer_tx = Rc::new(answer_tx);
        if admin
            .send(AdminRequest {
                request,
                answer: answer_tx,
            })
            .await
            .is_err()
        {
            return;
        }
        let Some(answer) = answer_rx.recv().await else {
            return;
        };
        let bytes = answer.as_bytes();
        if stream
            .write_all(&length_prefixed(
                &bytes[..bytes.len().min(ADMIN_ANSWER_BYTES_MAX)],
            ))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// `bytes` after their length (4 bytes, little-endian), in one buffer: written with one call,
/// so that Nagle's algorithm never holds the second part back until the peer's delayed ACK of
/// the first (40 ms on Linux, twice per request; `ordinal status` took 90 ms on loopback).
fn length_prefixed(bytes: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(4 + bytes.len());
    framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    framed.extend_from_slice(bytes);
    framed
}

/// Sends one admin request to a daemon and returns its answer (blocking; for the CLI).
pub fn request(
    addr: SocketAddr,
    psk: &[u8],
    request: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|error| format!("cannot connect to {addr}: {error}"))?;
    let _ = stream.set_nodelay(true);
    control::blocking_client_handshake(
        &mut stream,
        psk,
        Role::Admin,
        Purpose::Admin,
        NodeInfo {
            geometry: None,
            epoch: 0,
        },
    )
    .map_err(|error| format!("{addr}: {error}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| error.to_string())?;
    assert!(request.len() <= ADMIN_REQUEST_BYTES_MAX);
    stream
        .write_all(&length_prefixed(request.as_bytes()))
        .map_err(|error| format!("{addr}: sending the request failed: {error}"))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|error| format!("{addr}: no answer within {} s: {error}", timeout.as_secs()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > ADMIN_ANSWER_BYTES_MAX {
        return Err(format!("{addr}: answer of {len} bytes is too large"));
    }
    let mut answer = vec![0u8; len];
    stream
        .read_exact(&mut answer)
        .map_err(|error| format!("{addr}: answer cut short: {error}"))?;
    String::from_utf8(answer).map_err(|_| format!("{addr}: answer is not UTF-8"))
}

/// One input of a daemon's event loop.
#[derive(Debug)]
pub enum Input<E> {
    Transport(TransportEvent),
    Accepted(Accepted),
    Admin(AdminRequest),
    Local(E),
    Tick,
}

/// The receiving ends a daemon's loop waits on; the sending ends go to the tasks.
pub struct Inputs<E> {
    pub transport: LocalReceiver<TransportEvent>,
    pub accepted: LocalReceiver<Accepted>,
    pub admin: LocalReceiver<AdminRequest>,
    pub local: LocalReceiver<E>,
    pub ticks: LocalReceiver<()>,
}

impl<E> std::fmt::Debug for Inputs<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inputs")
    }
}

pub struct Senders<E> {
    pub transport: Sender<TransportEvent>,
    pub accepted: Sender<Accepted>,
    pub admin: Sender<AdminRequest>,
    pub local: Sender<E>,
}

impl<E> Senders<E> {
    /// What `accept_loop` needs to serve `our_role`'s listener: the daemon's key, its answer to
    /// each authenticated hello, and the channels its loop reads.
    pub fn accept_context(
        &self,
        our_role: Role,
        psk: &[u8],
        decide: Decide,
        transport: &Transport,
    ) -> AcceptContext {
        AcceptContext {
            psk: Rc::new(psk.to_vec()),
            our_role,
            decide,
            transport: transport.clone(),
            events: self.transport.clone(),
            accepted: self.accepted.clone(),
            admin: self.admin.clone(),
        }
    }
}

impl<E> std::fmt::Debug for Senders<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Senders")
    }
}

/// Bounds of the event loop's channels. Transport events are bounded so a fast peer stalls on
/// TCP rather than growing our memory; the others are few by nature.
const TRANSPORT_EVENTS_MAX: usize = 8192;
const LOCAL_EVENTS_MAX: usize = 8192;

/// A tick this much later than asked is logged: the executor's thread did not run for that long
/// (a blocking call on it, or the machine stalled), which delays heartbeats and timeouts alike.
const TICK_LATE_LOGGED: Duration = Duration::from_millis(200);

/// Makes the channels of a daemon's loop and starts its ticker (`tick` apart); `role` names the
/// daemon in the log line of a late tick.
pub fn inputs<E: 'static>(role: &'static str, tick: Duration) -> (Inputs<E>, Senders<E>) {
    use glommio::channels::local_channel::new_bounded;
    let (transport_tx, transport_rx) = new_bounded(TRANSPORT_EVENTS_MAX);
    let (accepted_tx, accepted_rx) = new_bounded(16);
    let (admin_tx, admin_rx) = new_bounded(16);
    let (local_tx, local_rx) = new_bounded(LOCAL_EVENTS_MAX);
    let (tick_tx, tick_rx) = new_bounded(1);
    glommio::spawn_local(async move {
        loop {
            let asked = std::time::Instant::now();
            glommio::timer::sleep(tick).await;
            let late = asked.elapsed().saturating_sub(tick);
            if late >= TICK_LATE_LOGGED {
                crate::log!(
                    "{role}: this process's loop did not run for {} ms",
                    late.as_millis()
                );
            }
            // A tick already pending is as good as two.
            if let Err(glommio::GlommioError::Closed(_)) = tick_tx.try_send(()) {
                return;
            }
        }
    })
    .detach();
    let (transport_tx, accepted_tx, admin_tx, local_tx) = (
        Rc::new(transport_tx),
        Rc::new(accepted_tx),
        Rc::new(admin_tx),
        Rc::new(local_tx),
    );
    (
        Inputs {
            transport: transport_rx,
            accepted: accepted_rx,
            admin: admin_rx,
            local: local_rx,
            ticks: tick_rx,
        },
        Senders {
            transport: transport_tx,
            accepted: accepted_tx,
            admin: admin_tx,
            local: local_tx,
        },
    )
}

impl<E> Inputs<E> {
    /// Waits for the next input. Completions and messages come first: they free resources
    /// that new work waits for.
    pub async fn next(&self) -> Input<E> {
        use futures_lite::future::or;
        let transport = async { self.transport.recv().await.map(Input::Transport) };
        let local = async { self.local.recv().await.map(Input::Local) };
        let accepted = async { self.accepted.recv().await.map(Input::Accepted) };
        let admin = async { self.admin.recv().await.map(Input::Admin) };
        let tick = async { self.ticks.recv().await.map(|()| Input::Tick) };
        or(transport, or(local, or(accepted, or(admin, tick))))
            .await
            .expect("the daemon holds a sender of every channel")
    }
}

/// Connects to `addr` and authenticates as `role` for `purpose`; returns the stream (its queue
/// pair is started by the daemon's loop, so that no event can arrive for a pair the loop does
/// not know yet) and what the peer granted.
pub async fn connect(
    addr: SocketAddr,
    psk: &[u8],
    role: Role,
    purpose: Purpose,
    info: NodeInfo,
) -> Result<(TcpStream, Grant), ConnectError> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))
        .await
        .map_err(|error| format!("cannot reach {addr}: {error}"))?;
    let grant = control::client_handshake(&mut stream, psk, role, purpose, info)
        .await
        .map_err(|error| ConnectError {
            fenced_at: match &error {
                ControlError::Fenced { epoch, .. } => Some(*epoch),
                _ => None,
            },
            text: format!("{addr}: {error}"),
        })?;
    Ok((stream, grant))
}

/// Why dialling a peer failed: the text to log, and whether the peer said it has fenced our
/// epoch (then no retry can succeed). Converts to its text where only that matters.
#[derive(Debug)]
pub struct ConnectError {
    pub text: String,
    /// The peer's epoch, when it refused us because it has fenced ours.
    pub fenced_at: Option<ordinal_proto::Epoch>,
}

impl From<String> for ConnectError {
    fn from(text: String) -> ConnectError {
        ConnectError {
            text,
            fenced_at: None,
        }
    }
}

impl From<ConnectError> for String {
    fn from(error: ConnectError) -> String {
        error.text
    }
}

/// Connects to `addr`, authenticates as `role` for `purpose` and connects a queue pair over
/// `transport`; returns the pair (started by the daemon's loop, so that no event can arrive for a
/// pair the loop does not know yet) and what the peer granted.
pub async fn connect_qp(
    transport: &Transport,
    events: &Sender<TransportEvent>,
    addr: SocketAddr,
    psk: &[u8],
    role: Role,
    purpose: Purpose,
    info: NodeInfo,
) -> Result<(PreparedQp, Grant), ConnectError> {
    let (stream, grant) = connect(addr, psk, role, purpose, info).await?;
    if purpose == Purpose::OrderQp {
        mark_latency_critical(&stream);
    }
    let qp = transport
        .prepare(stream, transport.regions()?, events.clone(), Side::Client)
        .await
        .map_err(|error| format!("{addr}: {error}"))?;
    Ok((qp, grant))
}

/// Marks the order connection's packets for priority queuing, both ways. Order records are tiny
/// and every `order-sync` acknowledgement waits for one round trip of them, while payloads are
/// bulk: on a shared bottleneck (a WAN link, a router's queue) an order record that waits
/// behind megabytes of payload costs their transfer time, which is exactly what `order-sync`
/// exists to avoid. So: DSCP EF (expedited forwarding, RFC 3246) for the network, and socket
/// priority 6 (`TC_PRIO_INTERACTIVE`, band 0 of Linux's default `prio` map) for the sender's own
/// queue. `IP_TOS` also sets the priority from the TOS bits, so the priority is set after it.
/// Best effort: a refusal leaves ordinary queuing, which is only slower.
/// (On verbs the same role falls to the queue pair's traffic class; not set yet.)
fn mark_latency_critical(stream: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    const DSCP_EF_TOS: libc::c_int = 46 << 2;
    const PRIORITY_INTERACTIVE: libc::c_int = 6;
    let fd = stream.as_raw_fd();
    for (level, option, value) in [
        (libc::IPPROTO_IP, libc::IP_TOS, DSCP_EF_TOS),
        (libc::SOL_SOCKET, libc::SO_PRIORITY, PRIORITY_INTERACTIVE),
    ] {
        // SAFETY: setsockopt on a socket we own, reading one c_int that lives across the call.
        let result = unsafe {
            libc::setsockopt(
                fd,
                level,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            crate::log!(
                "cannot mark the order connection for priority queuing (option {option}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Connects a queue pair to `addr` for `purpose` (see [`connect_qp`]), retrying every `pause`
/// until it succeeds (logging failures as `log_as`), and returns it with the first region the
/// peer granted (`what` names that region in the error when none was granted).
pub async fn connect_granted(
    (transport, events): (Transport, Sender<TransportEvent>),
    addr: SocketAddr,
    psk: &[u8],
    (role, purpose, info): (Role, Purpose, NodeInfo),
    (log_as, what): (&str, &str),
    pause: Duration,
) -> (PreparedQp, RegionDescriptor) {
    keep_trying(log_as, pause, || async {
        let (qp, grant) = connect_qp(&transport, &events, addr, psk, role, purpose, info).await?;
        let region = *grant
            .descriptors
            .first()
            .ok_or_else(|| format!("{addr} granted no {what}"))?;
        Ok((qp, region))
    })
    .await
}

/// Runs `attempt` every `pause` until it succeeds, logging every 25th failure as `what`.
pub async fn keep_trying<T, F, Fut>(what: &str, pause: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut failures = 0u64;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                if failures % 25 == 0 {
                    crate::log!("{what}: {error} (retrying)");
                }
                failures += 1;
            }
        }
        glommio::timer::sleep(pause).await;
    }
}

/// Prints the line parent processes wait for to learn a daemon's address.
pub fn announce(role: Role, what: &str, addr: SocketAddr) {
    println!("ordinal {} {what} {addr}", role.name());
    let _ = std::io::stdout().flush();
}

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
