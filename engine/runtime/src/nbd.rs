//! NBD exports: the sans-I/O session of `ordinal-nbd` driven over glommio sockets, backed by the
//! primary (writes go through [`PrimaryHandle`], so an NBD write is acknowledged exactly when the
//! protocol's mode allows) or, after a failover, by the promoted DR's own volume.
//!
//! What the commands mean here (every client connection sees the same volume):
//! - READ comes from the local volume, which holds every acknowledged write.
//! - WRITE is acknowledged as the mode says (`order-sync`: written locally and its order held
//!   by the DR). A failed or fenced primary answers `EIO`, never a silent success.
//! - FLUSH (and the FUA flag) returns once every write answered before it, on any connection,
//!   is on stable storage locally and its order is held by the DR, as [`PrimaryHandle::flush`]
//!   describes; so the export advertises `NBD_FLAG_CAN_MULTI_CONN`.
//! - WRITE_ZEROES writes real zeroes through the replication, in chunks of the largest write,
//!   so the DR's copy stays identical; it succeeds only if every chunk was acknowledged.
//! - TRIM is accepted and does nothing: the spec lets a server ignore it (the client may not
//!   rely on the contents afterwards), and changing nothing keeps the DR identical for free.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::{Semaphore, StaticPermit};
use ordinal_nbd::{Event, NbdError, ServerConfig, ServerSession};
use ordinal_proto::Geometry;

use crate::primary::{PrimaryHandle, WriteOutcome};
use crate::storage::Volume;

/// The export name clients ask for (the empty default name is accepted too).
pub const EXPORT_NAME: &str = "ordinal";

/// Chunks of one WRITE_ZEROES in flight at once: enough to keep the ring busy, few enough
/// that a WRITE_ZEROES over the whole volume holds at most this many zero buffers.
const ZERO_CHUNKS_INFLIGHT: usize = 8;
/// Bytes the reader buffers from the socket: a few of the largest writes.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Bytes of WRITE, WRITE_ZEROES and READ data one connection may have handed to the engine and
/// not yet answered. The session bounds only what waits to be handed over; without this a
/// client could pipeline thousands of large requests (or WRITE_ZEROES of 4 GiB each) and make
/// the server hold their buffers at once. At the limit the reader stops reading the socket.
const IN_FLIGHT_BYTES_MAX: u64 = 64 << 20;

/// Reserves `bytes` of the connection's in-flight budget (a request larger than the whole
/// budget takes all of it); the reservation ends when the permit is dropped. Each request takes
/// exactly one reservation, in the reader, so no request holds part of the budget while it waits
/// for more (which could deadlock).
async fn reserve(budget: &Rc<Semaphore>, bytes: u64) -> Option<StaticPermit> {
    budget
        .acquire_static_permit(bytes.clamp(1, IN_FLIGHT_BYTES_MAX))
        .await
        .ok()
}

/// What an NBD export serves.
#[derive(Clone, Debug)]
pub enum Export {
    /// The replicated volume of a running primary.
    Primary(PrimaryHandle),
    /// The volume of a DR promoted by a failover, read-write and no longer replicated (nothing
    /// protects it until a new DR is set up).
    Promoted {
        volume: Rc<Volume>,
        geometry: Geometry,
    },
}

type Finish = Pin<Box<dyn Future<Output = Result<(), String>>>>;

impl Export {
    fn role(&self) -> &'static str {
        match self {
            Export::Primary(_) => "primary",
            Export::Promoted { .. } => "dr",
        }
    }

    fn geometry(&self) -> Geometry {
        match self {
            Export::Primary(handle) => handle.geometry(),
            Export::Promoted { geometry, .. } => *geometry,
        }
    }

    fn server_config(&self) -> ServerConfig {
        let geometry = self.geometry();
        ServerConfig {
            export_name: EXPORT_NAME.into(),
            size_bytes: geometry.volume_bytes,
            read_only: false,
            block_bytes: geometry.sector_bytes.clamp(512, 65536),
            payload_bytes_max: geometry.payload_bytes_max,
            multi_conn: true,
        }
    }

    /// Hands a write over (on the primary, admitted in the order of these calls) and returns
    /// the future of its outcome.
    async fn start_write(&self, offset: u64, data: Vec<u8>) -> Finish {
        match self {
            Export::Primary(handle) => {
                let pending = handle.start_write(offset, data).await;
                Box::pin(async move {
                    match pending.outcome().await {
                        WriteOutcome::Acked { .. } => Ok(()),
                        WriteOutcome::Failed(why) => Err(why),
                    }
                })
            }
            Export::Promoted { volume, .. } => {
                let volume = volume.clone();
                Box::pin(async move { volume.write_at(offset, &data).await })
            }
        }
    }

    /// The most a WRITE_ZEROES of `len` bytes has in flight at once.
    fn zeroes_window_bytes(&self, len: u64) -> u64 {
        len.min(ZERO_CHUNKS_INFLIGHT as u64 * u64::from(self.geometry().payload_bytes_max))
    }

    /// Writes zeroes over `offset..offset + len` in chunks of the largest write, at most
    /// `ZERO_CHUNKS_INFLIGHT` of them in flight.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), String> {
        let chunk_bytes = u64::from(self.geometry().payload_bytes_max);
        let mut in_flight = VecDeque::new();
        let mut at = offset;
        let end = offset + len;
        let mut result = Ok(());
        while at < end {
            let take = chunk_bytes.min(end - at);
            in_flight.push_back(self.start_write(at, vec![0; take as usize]).await);
            at += take;
            if in_flight.len() >= ZERO_CHUNKS_INFLIGHT {
                if let Some(finish) = in_flight.pop_front() {
                    result = result.and(finish.await);
                }
            }
            if result.is_err() {
                break;
            }
        }
        for finish in in_flight {
            result = result.and(finish.await);
        }
        result
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        match self {
            Export::Primary(handle) => handle.read(offset, len).await,
            Export::Promoted { volume, .. } => volume.read(offset, len).await,
        }
    }

    async fn flush(&self) -> Result<(), String> {
        match self {
            Export::Primary(handle) => handle.flush().await,
            Export::Promoted { volume, .. } => volume.flush().await,
        }
    }
}

/// Binds `listen` and serves `export` until the process ends; each client connection is its
/// own task. Fails only if the address cannot be bound.
pub async fn serve(listen: SocketAddr, export: Export) -> Result<(), String> {
    let listener = crate::listen_exclusive(listen)
        .map_err(|error| format!("cannot serve NBD on {listen}: {error}"))?;
    if let Ok(addr) = listener.local_addr() {
        let role = match export {
            Export::Primary(_) => crate::control::Role::Primary,
            Export::Promoted { .. } => crate::control::Role::Dr,
        };
        crate::admin::announce(role, "serving NBD on", addr);
    }
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(serve_client(stream, export.clone())).detach();
            }
            Err(error) => {
                crate::log!("{}: NBD accept failed: {error}", export.role());
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct Connection {
    session: RefCell<ServerSession>,
    /// Wakes the writer task: output or a finished reply is waiting.
    wake_writer: LocalSender<()>,
    /// Wakes the reader: a reply made room in a backpressured session.
    wake_reader: LocalSender<()>,
    /// What this connection has handed to the engine and not yet answered, plus READ data not
    /// yet sent, in bytes.
    budget: Rc<Semaphore>,
    /// Bytes of output sent so far.
    sent_bytes: Cell<u64>,
    /// READ replies in the output: where each ends (in `sent_bytes` terms) and its reservation.
    unsent_reads: RefCell<VecDeque<(u64, Option<StaticPermit>)>>,
    closing: Cell<bool>,
    role: &'static str,
    /// Requests answered with an error on this connection, for the log's counting.
    failed_requests: Cell<u64>,
}

impl Connection {
    fn wake(&self) {
        let _ = self.wake_writer.try_send(());
        let _ = self.wake_reader.try_send(());
    }

    /// Counts `bytes` of output as sent and gives back the reservations of READ replies that
    /// are now out.
    fn sent(&self, bytes: usize) {
        let sent = self.sent_bytes.get() + bytes as u64;
        self.sent_bytes.set(sent);
        let mut unsent = self.unsent_reads.borrow_mut();
        while unsent.front().is_some_and(|&(end, _)| end <= sent) {
            unsent.pop_front();
        }
    }

    /// Sends the outcome of a WRITE, WRITE_ZEROES, TRIM or FLUSH.
    fn answer(&self, cookie: u64, result: Result<(), String>) {
        let mut session = self.session.borrow_mut();
        let _ = match result {
            Ok(()) => session.reply_ok(cookie),
            Err(why) => {
                // A client that writes on after EIO (a fenced primary refuses everything) could
                // otherwise fill the log with one line per request: the first failure is logged
                // whole, then the 10th, 100th, 1000th... with the count.
                let failed = self.failed_requests.get() + 1;
                self.failed_requests.set(failed);
                if failed == 1 {
                    crate::log!("{}: NBD request failed: {why}", self.role);
                } else if crate::is_power_of_ten(failed) {
                    crate::log!(
                        "{}: {failed} NBD requests failed on this connection so far; the latest: {why}",
                        self.role
                    );
                }
                session.reply_error(cookie, NbdError::Io)
            }
        };
        drop(session);
        self.wake();
    }
}

async fn serve_client(stream: TcpStream, export: Export) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "a client".to_string(), |addr| addr.to_string());
    let session = match ServerSession::new(export.server_config()) {
        Ok(session) => session,
        Err(error) => {
            crate::log!("{}: {error}", export.role());
            return;
        }
    };
    let (wake_writer, writer_wakeups) = local_channel::new_bounded(1);
    let (wake_reader, reader_wakeups) = local_channel::new_bounded(1);
    let connection = Rc::new(Connection {
        session: RefCell::new(session),
        wake_writer,
        wake_reader,
        budget: Rc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX)),
        sent_bytes: Cell::new(0),
        unsent_reads: RefCell::new(VecDeque::new()),
        closing: Cell::new(false),
        role: export.role(),
        failed_requests: Cell::new(0),
    });
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let writer_connection = connection.clone();
    let writer_task = glommio::spawn_local(async move {
        loop {
            let chunk = writer_connection
                .session
                .borrow()
                .poll_output()
                .map(<[u8]>::to_vec);
            match chunk {
                Some(chunk) => {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                    writer_connection
                        .session
                        .borrow_mut()
                        .consume_output(chunk.len());
                    writer_connection.sent(chunk.len());
                    let _ = writer_connection.wake_reader.try_send(());
                }
                None => {
                    let finished = {
                        let session = writer_connection.session.borrow();
                        let done = session.is_closed() || writer_connection.closing.get();
                        done && session.pending_requests() == 0
                    };
                    if finished {
                        let _ = writer.close().await;
                        return;
                    }
                    if writer_wakeups.recv().await.is_none() {
                        return;
                    }
                }
            }
        }
    });
    connection.wake();
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let mut filled = 0usize;
    'connection: loop {
        // Parse what we have; the session stops consuming while it pushes back.
        let used = connection
            .session
            .borrow_mut()
            .handle_input(&buffer[..filled]);
        buffer.copy_within(used..filled, 0);
        filled -= used;
        loop {
            let event = connection.session.borrow_mut().poll_event();
            let Some(event) = event else { break };
            match event {
                Event::Write {
                    handle: cookie,
                    offset,
                    data,
                    fua,
                } => {
                    let permit = reserve(&connection.budget, data.len() as u64).await;
                    // Handed over in arrival order, so the primary numbers them in that order.
                    let finish = export.start_write(offset, data).await;
                    let (connection, export) = (connection.clone(), export.clone());
                    glommio::spawn_local(async move {
                        let _permit = permit;
                        let mut result = finish.await;
                        if fua && result.is_ok() {
                            result = export.flush().await;
                        }
                        connection.answer(cookie, result);
                    })
                    .detach();
                }
                Event::WriteZeroes {
                    handle: cookie,
                    offset,
                    len,
                    fua,
                } => {
                    // One reservation for the request's whole window, taken here: a task that
                    // held some of the budget while waiting for more could deadlock with others.
                    let window = export.zeroes_window_bytes(u64::from(len));
                    let permit = reserve(&connection.budget, window).await;
                    let (connection, export) = (connection.clone(), export.clone());
                    glommio::spawn_local(async move {
                        let _permit = permit;
                        let mut result = export.write_zeroes(offset, u64::from(len)).await;
                        if fua && result.is_ok() {
                            result = export.flush().await;
                        }
                        connection.answer(cookie, result);
                    })
                    .detach();
                }
                Event::Trim { handle: cookie, .. } => {
                    // Nothing is discarded (see the module docs), so FUA has nothing to make
                    // durable either.
                    connection.answer(cookie, Ok(()));
                }
                Event::Read {
                    handle: cookie,
                    offset,
                    len,
                } => {
                    let permit = reserve(&connection.budget, u64::from(len)).await;
                    let (connection, export) = (connection.clone(), export.clone());
                    glommio::spawn_local(async move {
                        let data = export.read(offset, len as usize).await;
                        let mut session = connection.session.borrow_mut();
                        let _ = match data {
                            Ok(data) => session.reply_read(cookie, &data),
                            Err(why) => {
                                crate::log!("{}: NBD read failed: {why}", connection.role);
                                session.reply_error(cookie, NbdError::Io)
                            }
                        };
                        // The data now waits in the output: its share of the budget is given
                        // back once it is sent, or a client that reads no replies could make
                        // the output grow without bound.
                        let queued_through =
                            connection.sent_bytes.get() + session.output_pending_bytes() as u64;
                        drop(session);
                        connection
                            .unsent_reads
                            .borrow_mut()
                            .push_back((queued_through, permit));
                        connection.wake();
                    })
                    .detach();
                }
                Event::Flush { handle: cookie } => {
                    let (connection, export) = (connection.clone(), export.clone());
                    glommio::spawn_local(async move {
                        let result = export.flush().await;
                        connection.answer(cookie, result);
                    })
                    .detach();
                }
                Event::Disconnect => break 'connection,
                Event::Error(error) => {
                    crate::log!(
                        "{}: NBD client {peer} broke the protocol ({error}); closing its connection",
                        export.role()
                    );
                    break 'connection;
                }
            }
        }
        // Only the writer: waking the reader from here would make it spin while it waits.
        let _ = connection.wake_writer.try_send(());
        if connection.session.borrow().is_closed() {
            break;
        }
        if !connection.session.borrow().wants_input() || filled == buffer.len() {
            // Replies in flight will make room; each one wakes us.
            if reader_wakeups.recv().await.is_none() {
                break;
            }
            continue;
        }
        if filled > 0 {
            // The session pushed back while these bytes waited and has room again (handing
            // requests over may wait, and replies drain meanwhile): parse them before reading
            // the socket, which a client that sent everything already will never fill.
            continue;
        }
        match reader.read(&mut buffer[filled..]).await {
            Ok(0) => break,
            Err(error) => {
                crate::log!("{}: NBD client {peer}: {error}", export.role());
                break;
            }
            Ok(read) => filled += read,
        }
    }
    // Requests already handed over finish and are answered if the client is still there.
    connection.closing.set(true);
    connection.wake();
    writer_task.await;
}

#[cfg(test)]
mod tests {
    use crate::is_power_of_ten;

    #[test]
    fn failures_are_logged_at_powers_of_ten() {
        let logged: Vec<u64> = (1..=20_000).filter(|&n| is_power_of_ten(n)).collect();
        assert_eq!(logged, [1, 10, 100, 1000, 10_000]);
    }
}
