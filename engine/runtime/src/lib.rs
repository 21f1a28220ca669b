//! The runtime of ordinal: it runs the protocol roles of `ordinal-proto` as real processes.
//!
//! Each daemon is one glommio executor (thread-per-core, io_uring) that owns its role's state
//! machine and executes the actions it emits: local volume writes with direct I/O, SENDs and
//! one-sided WRITEs and READs on the transport's queue pairs, revocation of remote access.
//! The protocol crate never sees glommio: everything it learns arrives through its `handle_*`
//! methods, with the time read here from a monotonic clock.
//!
//! Modules:
//! - [`transport`]: the verbs-shaped boundary and its TCP implementation;
//! - `verbs` (feature `verbs`): the same boundary on an RDMA device (RC queue pairs);
//! - [`control`]: connection setup, pre-shared-key authentication, region descriptors;
//! - [`storage`]: volumes (direct I/O) and memory-mapped region files;
//! - [`primary`], [`dr`], [`aux`]: the three daemons; [`admin`]: status and failover requests;
//! - [`nbd`]: the NBD export of the primary, and of the DR once promoted.
//!
//! # Embedding
//!
//! An appliance that links ordinal runs the primary on a glommio executor of its own with
//! [`primary::run_primary`] and gets a [`primary::PrimaryHandle`]: `write` (acknowledged as the
//! mode says), `read`, `flush` (what it guarantees is documented on it), `status`, and
//! `subscribe` for link changes and for the primary being fenced by a failover. Code on other
//! executors or threads talks to it through channels. `examples/embed.rs` runs a whole system
//! in one process that way, fails over under it, and is run by `cargo test`.
//!
//! What this crate is not: it holds no protocol logic; the decisions are all `ordinal-proto`'s.

/// A line of a daemon's log on stderr, stamped with the UTC time of day to the millisecond, so
/// that the logs of the three roles (often three machines) can be read side by side.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // One write per line: the roles of a system often share a terminal or a pipe, and
        // `eprintln!` writes a line in pieces, which interleave with another process's.
        let line = format!("{} {}\n", $crate::log_stamp(), format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// Whether `n` is 1, 10, 100, ...: events that may repeat without bound are logged at these
/// counts, with the count, so that the log stays readable and bounded.
pub(crate) fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

/// Listens on `addr` as the only listener there. glommio's `TcpListener::bind` sets
/// SO_REUSEPORT (meant for one listener per core of one program), which lets a second daemon
/// bind an address already in use, and the kernel then spreads new connections over both: a
/// DR or aux started twice by mistake would each take part of the peers' queue pairs, silently.
/// std's bind sets only SO_REUSEADDR (a listener may reuse a port whose old connections are in
/// TIME_WAIT, never one another listener holds), so an address in use fails here with
/// EADDRINUSE, and the socket is then handed to glommio. Call it on an executor's thread.
pub fn listen_exclusive(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let listener = std::net::TcpListener::bind(addr)?;
    // SAFETY: `into_raw_fd` gives up ownership of a bound, listening socket, and glommio's
    // listener takes it over (and closes it when dropped); nothing else holds the descriptor.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) })
}

pub mod admin;
pub mod aux;
pub mod control;
pub mod dr;
pub mod link;
pub mod nbd;
pub mod primary;
pub mod storage;
pub mod timeline;
pub mod transport;
#[cfg(feature = "verbs")]
pub mod verbs;

use std::sync::OnceLock;

/// Runs `body` on a glommio executor on a new thread named `name` (thread-per-core: each role
/// owns one executor, as each daemon does in its own process), optionally spinning that long
/// before it parks. An error `body` returns is printed with the name.
pub fn spawn_executor<F, Fut>(
    name: &str,
    spin_before_park: Option<std::time::Duration>,
    body: F,
) -> Result<std::thread::JoinHandle<()>, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    spawn_executor_on(name, None, spin_before_park, body)
}

/// [`spawn_executor`] with the thread bound to CPU `cpu` (any CPU if `None`), as a daemon's
/// `--cpu` binds its executor.
pub fn spawn_executor_on<F, Fut>(
    name: &str,
    cpu: Option<usize>,
    spin_before_park: Option<std::time::Duration>,
    body: F,
) -> Result<std::thread::JoinHandle<()>, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let thread_name = name.to_string();
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let name = thread_name.as_str();
            let placement = cpu.map_or(glommio::Placement::Unbound, glommio::Placement::Fixed);
            let mut builder = glommio::LocalExecutorBuilder::new(placement).name(name);
            if let Some(spin) = spin_before_park {
                builder = builder.spin_before_park(spin);
            }
            match builder.make() {
                Ok(executor) => {
                    if let Err(error) = executor.run(body()) {
                        crate::log!("{name}: stopped: {error}");
                    }
                }
                Err(error) => crate::log!("{name}: cannot start the io_uring executor: {error}"),
            }
        })
        .map_err(|error| format!("cannot start thread {name}: {error}"))
}

/// The wall clock's UTC time of day as `HH:MM:SS.mmm`, for [`log!`] lines.
pub fn log_stamp() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let millis_of_day = since_epoch.as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        millis_of_day / 3_600_000,
        millis_of_day / 60_000 % 60,
        millis_of_day / 1000 % 60,
        millis_of_day % 1000
    )
}

/// A sending end of a glommio local channel, shared by the tasks that feed one loop.
pub type Sender<T> = std::rc::Rc<glommio::channels::local_channel::LocalSender<T>>;
use std::time::Instant;

/// Nanoseconds on the process's monotonic clock: the time the protocol's handlers are given.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Start at one second so that "time 0" never looks like "never" to the protocol.
    1_000_000_000 + start.elapsed().as_nanos() as u64
}

/// Fills `out` from the kernel's random source (getrandom(2)), for nonces and keys.
pub fn fill_random(out: &mut [u8]) {
    let mut filled = 0;
    while filled < out.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `out`, which is writable
        // for that many bytes; getrandom(2) writes at most that many.
        let got =
            unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), out.len() - filled, 0) };
        if got < 0 {
            let error = std::io::Error::last_os_error();
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::Interrupted,
                "getrandom failed: {error}"
            );
            continue;
        }
        filled += got as usize;
    }
}

pub fn random_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    fill_random(&mut nonce);
    nonce
}

pub fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    fill_random(&mut bytes);
    u32::from_le_bytes(bytes)
}

/// Reads a pre-shared key file: its bytes, without a trailing newline, at least
/// [`control::PSK_BYTES_MIN`] long.
pub fn read_psk(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut key = std::fs::read(path).map_err(|error| {
        format!(
            "cannot read the pre-shared key file {}: {error}",
            path.display()
        )
    })?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.len() < control::PSK_BYTES_MIN {
        return Err(format!(
            "the pre-shared key in {} is {} bytes; at least {} are needed",
            path.display(),
            key.len(),
            control::PSK_BYTES_MIN
        ));
    }
    Ok(key)
}
