//! A TCP relay that stands for the network link between two daemons in `ordinal demo --kill
//! link`: one side dials the relay, the relay dials the other side, and bytes are carried both
//! ways until the link is made silent.
//!
//! A silent link carries nothing in either direction and closes nothing, as a WAN link that
//! drops every packet: the relay stops reading, so each side's data waits in its socket buffers
//! and then in its own send queue, a connection closed meanwhile is not seen closed by the
//! other side, and a new connection is accepted (the relay is local) but carries no byte.
//! TCP never corrupts or reorders a stream, and neither does this: when the link carries again,
//! every byte still held goes through in order, and the daemons see either a late stream or,
//! if they gave up on it meanwhile (their transport timeout), a connection they close and dial
//! again.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a waiting relay thread looks at the silence and stop flags: short against the
/// silences the demo draws (a fifth of a second and more), long against a busy loop.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Connections carried at once, at most; further ones are closed at once. The daemons keep one
/// connection per queue pair (two from a primary to its DR, one to its aux) and replace a
/// failed one, so a few dozen is far more than a run needs, while it bounds the threads a
/// misbehaving dialler could make the relay start.
const CONNECTIONS_MAX: usize = 32;

/// Bytes read per call (a buffer per direction of each connection).
const CHUNK_BYTES: usize = 64 << 10;

pub(crate) struct Relay {
    addr: SocketAddr,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port and carries every connection made to it to `target`.
    pub(crate) fn start(target: SocketAddr) -> Result<Relay, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|error| format!("link relay: cannot listen: {error}"))?;
        let addr = listener
            .local_addr()
            .map_err(|error| format!("link relay: {error}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|error| format!("link relay: {error}"))?;
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (flags_silent, flags_stop) = (silent.clone(), stop.clone());
        let acceptor = std::thread::Builder::new()
            .name("link-relay".into())
            .spawn(move || accept_loop(listener, target, flags_silent, flags_stop))
            .map_err(|error| format!("link relay: cannot start a thread: {error}"))?;
        Ok(Relay {
            addr,
            silent,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address to dial instead of the target's.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes the link drop everything (`true`) or carry again (`false`).
    pub(crate) fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Waits while the link is silent; false once the relay is stopping.
fn wait_while_silent(silent: &AtomicBool, stop: &AtomicBool) -> bool {
    while silent.load(Ordering::Acquire) {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    !stop.load(Ordering::Acquire)
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        pumps.retain(|pump| !pump.is_finished());
        let near = match listener.accept() {
            Ok((near, _)) => near,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            Err(error) => {
                eprintln!("link relay: accept failed: {error}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        if pumps.len() >= CONNECTIONS_MAX {
            eprintln!("link relay: {CONNECTIONS_MAX} connections carried already; one refused");
            continue;
        }
        let (silent, stop) = (silent.clone(), stop.clone());
        // The far side is dialled once the link carries: a silent link lets no SYN through.
        let started = std::thread::Builder::new()
            .name("link-relay-conn".into())
            .spawn(move || carry(near, target, silent, stop));
        match started {
            Ok(pump) => pumps.push(pump),
            Err(error) => eprintln!("link relay: cannot start a thread: {error}"),
        }
    }
    for pump in pumps {
        let _ = pump.join();
    }
}

/// Carries one connection both ways until either side closes it or the relay stops.
fn carry(near: TcpStream, target: SocketAddr, silent: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    if !wait_while_silent(&silent, &stop) {
        return;
    }
    let far = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(far) => far,
        Err(error) => {
            eprintln!("link relay: cannot reach {target}: {error}");
            return;
        }
    };
    let _ = far.set_nodelay(true);
    let _ = near.set_nodelay(true);
    let streams = (near.try_clone(), far.try_clone());
    let (Ok(near_reader), Ok(far_reader)) = streams else {
        eprintln!("link relay: cannot clone a socket");
        return;
    };
    let (back_silent, back_stop) = (silent.clone(), stop.clone());
    let back = std::thread::Builder::new()
        .name("link-relay-back".into())
        .spawn(move || pump(far_reader, near, &back_silent, &back_stop));
    pump(near_reader, far, &silent, &stop);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

/// Copies `from` to `to` while the link carries, and passes on the end of the stream (or an
/// error, as a closed connection) once it does.
fn pump(mut from: TcpStream, mut to: TcpStream, silent: &AtomicBool, stop: &AtomicBool) {
    // A read or a write waits at most this long before it looks at the flags again.
    let _ = from.set_read_timeout(Some(POLL_INTERVAL * 4));
    let _ = to.set_write_timeout(Some(POLL_INTERVAL * 4));
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        if !wait_while_silent(silent, stop) {
            break;
        }
        let read = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Bytes read just before the link fell silent are held until it carries again.
        if !wait_while_silent(silent, stop) || !write_fully(&mut to, &buffer[..read], stop) {
            break;
        }
    }
    // The end of the stream is a packet too: it passes only while the link carries.
    if wait_while_silent(silent, stop) {
        let _ = to.shutdown(Shutdown::Write);
    } else {
        let _ = to.shutdown(Shutdown::Both);
    }
    let _ = from.shutdown(Shutdown::Read);
}

/// Writes all of `bytes`, waiting for room as long as the relay is not stopping; false if the
/// connection failed or the relay stops (the connection is then closed, never cut mid-stream
/// and carried on).
fn write_fully(to: &mut TcpStream, bytes: &[u8], stop: &AtomicBool) -> bool {
    let mut written = 0;
    while written < bytes.len() {
        match to.write(&bytes[written..]) {
            Ok(0) => return false,
            Ok(count) => written += count,
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads whatever arrives within `wait` (nothing: an empty vector; end of stream: `None`).
    fn read_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer) {
            Ok(0) => None,
            Ok(read) => Some(buffer[..read].to_vec()),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Some(Vec::new())
            }
            Err(error) => panic!("read failed: {error}"),
        }
    }

    #[test]
    fn a_silent_link_holds_bytes_and_the_end_of_the_stream_until_it_carries_again() {
        let target = TcpListener::bind("127.0.0.1:0").expect("bind");
        let relay = Relay::start(target.local_addr().expect("addr")).expect("relay");
        let mut near = TcpStream::connect(relay.addr()).expect("connect");
        let (mut far, _) = target.accept().expect("accept");

        near.write_all(b"order").expect("write");
        assert_eq!(
            read_within(&mut far, Duration::from_secs(5)),
            Some(b"order".to_vec())
        );

        relay.set_silent(true);
        near.write_all(b"late").expect("write");
        far.write_all(b"answer").expect("write");
        near.shutdown(Shutdown::Write).expect("shutdown");
        let wait = Duration::from_millis(300);
        assert_eq!(
            read_within(&mut far, wait),
            Some(Vec::new()),
            "carried while silent"
        );
        assert_eq!(
            read_within(&mut near, wait),
            Some(Vec::new()),
            "carried while silent"
        );

        relay.set_silent(false);
        assert_eq!(
            read_within(&mut far, Duration::from_secs(5)),
            Some(b"late".to_vec())
        );
        assert_eq!(
            read_within(&mut far, Duration::from_secs(5)),
            None,
            "end of stream"
        );
        assert_eq!(
            read_within(&mut near, Duration::from_secs(5)),
            Some(b"answer".to_vec())
        );
    }

    #[test]
    fn a_connection_made_while_silent_reaches_the_far_side_only_once_it_carries() {
        let target = TcpListener::bind("127.0.0.1:0").expect("bind");
        target.set_nonblocking(true).expect("nonblocking");
        let relay = Relay::start(target.local_addr().expect("addr")).expect("relay");
        relay.set_silent(true);
        let mut near = TcpStream::connect(relay.addr()).expect("connect");
        near.write_all(b"hello").expect("write");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(target.accept(), Err(error) if error.kind() == ErrorKind::WouldBlock),
            "the far side was dialled through a silent link"
        );

        relay.set_silent(false);
        let started = std::time::Instant::now();
        let mut far = loop {
            match target.accept() {
                Ok((far, _)) => break far,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    assert!(started.elapsed() < Duration::from_secs(5), "never dialled");
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(error) => panic!("accept failed: {error}"),
            }
        };
        far.set_nonblocking(false).expect("blocking");
        assert_eq!(
            read_within(&mut far, Duration::from_secs(5)),
            Some(b"hello".to_vec())
        );
    }
}
