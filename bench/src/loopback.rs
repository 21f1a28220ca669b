//! A whole primary/DR/aux system on loopback TCP (one glommio executor per role, as the daemons
//! run; the DR and the aux in processes of their own where the program allows, see [`FarRole`]),
//! driven through the embeddable API (`PrimaryHandle`), against a raw TCP ping-pong measured in
//! the same run.
//!
//! What it answers: how much does ordinal add to the one network round trip that `order-sync`
//! must wait for? An acknowledgement in `order-sync` needs the order record to be held by the DR
//! (one SEND and its answer) and the local write to be done; the payload goes on asynchronously.
//! So the baseline is a ping-pong of exactly the order record's frame, over the same kind of
//! socket (glommio, `TCP_NODELAY`), between two executors on two threads.
//!
//! The volumes live on `/dev/shm` by default (tmpfs takes `O_DIRECT` on this kernel), so the
//! local write costs a memory copy, not a disk: what is measured is replication, not the disk.
//! Give `--dir` on a real file system to include the disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hdrhistogram::Histogram;
use ordinal_proto::wire::{MESSAGE_HEADER_BYTES, ORDER_RECORD_BYTES};
use ordinal_proto::{Geometry, LinkLossPolicy, Mode};
use ordinal_runtime::aux::{run_aux, AuxOptions};
use ordinal_runtime::dr::{run_dr, DrOptions};
use ordinal_runtime::link::TransportChoice;
use ordinal_runtime::primary::{run_primary, PrimaryHandle, PrimaryOptions, Tuning, WriteOutcome};

/// Bytes of one order record on the wire: the transport's frame header, the message header
/// and one record. The ping-pong baseline sends exactly this many bytes each way.
pub const ORDER_FRAME_BYTES: usize =
    ordinal_runtime::transport::FRAME_HEADER_BYTES + MESSAGE_HEADER_BYTES + ORDER_RECORD_BYTES;

/// Size of each volume of a benchmark's system.
pub const VOLUME_BYTES: u64 = 256 << 20;

#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    /// Where the state files go, and the volumes unless `volumes` names them (a fresh
    /// subdirectory is made and removed).
    pub dir: PathBuf,
    /// The primary's and the DR's volumes, made elsewhere ([`make_volume`]; for example on a
    /// `crate::ramdisk::RamFilesystem`), instead of files under `dir`.
    pub volumes: Option<(PathBuf, PathBuf)>,
    /// Sector size of the system: a multiple of the volumes' direct-I/O alignment.
    pub sector_bytes: u32,
    pub mode: Mode,
    pub write_bytes: usize,
    /// Writes (and ping-pong rounds) measured one at a time, after as many unmeasured ones.
    pub latency_samples: u64,
    /// Writes in flight in the throughput phase.
    pub queue_depth: usize,
    pub throughput_time: Duration,
    /// The roles' transport (the ping-pong baseline is TCP either way; on verbs, compare with
    /// perftest's `ib_send_lat` on the same device, as `tools/guest/bench.sh` does).
    pub transport: TransportChoice,
    /// The primary's knobs.
    pub tuning: Tuning,
    /// The DR's staging ring.
    pub ring_bytes: u64,
}

/// The staging ring of a benchmark's system unless told otherwise: the daemons' default.
pub const RING_BYTES_DEFAULT: u64 = 64 << 20;

/// The largest write of a benchmark's system measuring writes of up to `write_bytes`: no
/// larger than the run needs (on verbs each queue pair registers a send arena sized for it),
/// and at least 64 KiB.
pub fn payload_bytes_max_for(write_bytes: usize) -> u32 {
    write_bytes.max(64 << 10) as u32
}

/// The smallest staging ring (MiB) for such a system: it must hold two of its largest writes.
pub fn ring_mib_min_for(write_bytes: usize) -> u64 {
    (2 * u64::from(payload_bytes_max_for(write_bytes))).div_ceil(1 << 20)
}

/// What one run measured. Latencies are in nanoseconds.
#[derive(Debug)]
pub struct LoopbackReport {
    /// A ping-pong of the order record's frame each way: what the protocol sends and waits
    /// for per write, and nothing else.
    pub pingpong_ns: Histogram<u64>,
    /// A ping-pong of the write's size out and a 16-byte answer back (`crate::sweep::ACK_BYTES`,
    /// as `ordinal bench`'s baseline): the same message size as the client's write.
    pub write_pingpong_ns: Histogram<u64>,
    pub write_ack_ns: Histogram<u64>,
    /// The order round trips (SEND posted to the DR's answer) of the one-at-a-time phase.
    pub order_round_trip_ns: Histogram<u64>,
    /// Where the one-at-a-time writes' time went, by bands of their latency.
    pub breakdown: Vec<crate::breakdown::Band>,
    pub throughput_ack_ns: Histogram<u64>,
    pub throughput_writes: u64,
    pub throughput_elapsed: Duration,
    /// The same throughput phase through the NBD export (one connection, `queue_depth`
    /// requests in flight), so the export's cost shows against the library API's.
    pub nbd: NbdThroughput,
    pub failed_writes: u64,
}

/// Writes through the NBD export: acknowledged count, time taken, and each one's latency.
#[derive(Debug)]
pub struct NbdThroughput {
    pub writes: u64,
    pub elapsed: Duration,
    pub ack_ns: Histogram<u64>,
}

/// Writes `write_bytes` at a time through the NBD export at `addr` for `time`, keeping
/// `queue_depth` in flight on one connection (the blocking client, on the calling thread).
fn nbd_throughput(
    addr: SocketAddr,
    write_bytes: usize,
    queue_depth: usize,
    time: Duration,
) -> Result<NbdThroughput, String> {
    let error = |error: ordinal_nbd::ClientError| format!("NBD client: {error}");
    let client = ordinal_nbd::Client::connect(
        addr,
        ordinal_runtime::nbd::EXPORT_NAME,
        Duration::from_secs(30),
    )
    .map_err(error)?;
    let (mut sender, mut receiver) = client.into_split();
    let mut sent_at = std::collections::HashMap::new();
    let mut ack_ns = histogram();
    let mut writes = 0u64;
    let started = Instant::now();
    let deadline = started + time;
    let mut next = 0u64;
    loop {
        while sent_at.len() < queue_depth && Instant::now() < deadline {
            let data = vec![next as u8; write_bytes];
            sender
                .send_write(next, offset_of(next, write_bytes), &data)
                .map_err(error)?;
            sent_at.insert(next, Instant::now());
            next += 1;
        }
        if sent_at.is_empty() {
            break;
        }
        let reply = receiver.recv_reply().map_err(error)?;
        let began = sent_at
            .remove(&reply.handle)
            .ok_or_else(|| format!("NBD reply for unknown request {}", reply.handle))?;
        if reply.error != 0 {
            return Err(format!(
                "NBD write {} failed with error {}",
                reply.handle, reply.error
            ));
        }
        writes += 1;
        ack_ns.record(began.elapsed().as_nanos() as u64).ok();
    }
    Ok(NbdThroughput {
        writes,
        elapsed: started.elapsed(),
        ack_ns,
    })
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|error| format!("no free loopback port: {error}"))
}

/// Which end of a link an executor plays, for placing it on a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The primary and its load generator; the client of a baseline.
    Near,
    /// The DR and the aux; the server (or receiver) of a baseline.
    Far,
}

/// The CPU an executor of `side` is bound to: with two CPUs or more, the near side on CPU 0 and
/// the far side on CPU 1, so that the two ends of the link under test never queue for one CPU,
/// as they would not on two machines; unbound on one CPU or with `ORDINAL_BENCH_UNPINNED` set.
///
/// Why the aux shares the DR's CPU rather than the primary's: the primary's CPU also runs the
/// load generator and the primary's local writes (tmpfs direct I/O goes through io_uring's
/// worker threads, which inherit the primary's CPU). Measured with the loopback benchmark
/// (order-sync, 4 KiB, one write at a time): write-ack / ping-pong p50 2.30x unbound, 1.60x
/// with the aux on the DR's CPU, 2.06x with the aux on the primary's (one run each). Where the
/// DR's acknowledgement path and the aux meet on that CPU, the aux yields:
/// [`FarRole::yields_cpu_in`].
pub(crate) fn cpu_of(side: Side) -> Option<usize> {
    if std::env::var_os("ORDINAL_BENCH_UNPINNED").is_some() {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
    (cpus >= 2).then_some(match side {
        Side::Near => 0,
        Side::Far => 1,
    })
}

pub(crate) fn executor_thread<F, Fut>(
    name: &str,
    side: Side,
    body: F,
) -> Result<std::thread::JoinHandle<()>, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let spin = std::env::var("ORDINAL_SPIN_US")
        .ok()
        .and_then(|value| value.parse().ok())
        .map(Duration::from_micros);
    ordinal_runtime::spawn_executor_on(name, cpu_of(side), spin, body)
}

/// A raw TCP ping-pong of `message_bytes` each way between two executors on two threads.
pub fn pingpong(message_bytes: usize, rounds: u64) -> Result<Histogram<u64>, String> {
    pingpong_sized(message_bytes, message_bytes, rounds)
}

/// A raw TCP ping-pong of `request_bytes` out and `reply_bytes` back (a write and its
/// acknowledgement), between two executors on two threads: `rounds` unmeasured, then `rounds`
/// measured.
pub fn pingpong_sized(
    request_bytes: usize,
    reply_bytes: usize,
    rounds: u64,
) -> Result<Histogram<u64>, String> {
    let pair = PingPong::start(request_bytes, reply_bytes)?;
    pair.run(PingPongRun::Rounds(rounds))?;
    pair.run(PingPongRun::Rounds(rounds))
}

/// How long one request of a [`PingPong`] runs.
#[derive(Clone, Copy, Debug)]
pub enum PingPongRun {
    Rounds(u64),
    For(Duration),
}

/// A connected ping-pong pair (server and client, each an executor on its own thread, pinned as
/// the system's executors are) that measures on request and idles in between, so that its
/// rounds can be taken in slices between a point's writes: both then see the same machine. On
/// a shared machine the neighbours' load moves a ping-pong's p50 by a third from one second to
/// the next (76 to 111 us over loopback, seen in six runs one after another), which a baseline
/// measured once before the points turns into noise in every ratio.
pub struct PingPong {
    /// `None` once dropped: the client then closes the connection and both threads end.
    requests: std::sync::Mutex<Option<mpsc::Sender<PingPongRun>>>,
    results: std::sync::Mutex<mpsc::Receiver<Result<Histogram<u64>, String>>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for PingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PingPong")
    }
}

/// Longest a single ping-pong request may take before the pair is given up.
const PINGPONG_RUN_MAX: Duration = Duration::from_secs(600);

impl PingPong {
    pub fn start(request_bytes: usize, reply_bytes: usize) -> Result<PingPong, String> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
        let addr = listener.local_addr().map_err(|error| error.to_string())?;
        drop(listener);
        let (bound_tx, bound_rx) = mpsc::channel();
        let server = executor_thread("pingpong-server", Side::Far, move || async move {
            let listener =
                glommio::net::TcpListener::bind(addr).map_err(|error| error.to_string())?;
            let _ = bound_tx.send(());
            let mut stream = listener.accept().await.map_err(|error| error.to_string())?;
            stream
                .set_nodelay(true)
                .map_err(|error| error.to_string())?;
            let mut request = vec![0u8; request_bytes];
            let reply = vec![0xa5u8; reply_bytes];
            while stream.read_exact(&mut request).await.is_ok() {
                stream
                    .write_all(&reply)
                    .await
                    .map_err(|error| error.to_string())?;
            }
            Ok(())
        })?;
        bound_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "ping-pong server did not start".to_string())?;
        let (requests_tx, requests_rx) = mpsc::channel::<PingPongRun>();
        let (results_tx, results_rx) = mpsc::channel();
        let client = executor_thread("pingpong-client", Side::Near, move || async move {
            let mut stream = glommio::net::TcpStream::connect(addr)
                .await
                .map_err(|error| error.to_string())?;
            stream
                .set_nodelay(true)
                .map_err(|error| error.to_string())?;
            let request = vec![0x5au8; request_bytes];
            let mut reply = vec![0u8; reply_bytes];
            // Waiting for the next request blocks this executor's thread, which runs nothing
            // else: between requests the pair is idle, as it must be while the system measures.
            while let Ok(run) = requests_rx.recv() {
                let mut latencies = histogram();
                let began = Instant::now();
                let mut rounds = 0u64;
                let result = loop {
                    let done = match run {
                        PingPongRun::Rounds(wanted) => rounds >= wanted,
                        PingPongRun::For(time) => began.elapsed() >= time,
                    };
                    if done {
                        break Ok(latencies);
                    }
                    let started = Instant::now();
                    if let Err(error) = stream.write_all(&request).await {
                        break Err(error.to_string());
                    }
                    if let Err(error) = stream.read_exact(&mut reply).await {
                        break Err(error.to_string());
                    }
                    latencies.record(started.elapsed().as_nanos() as u64).ok();
                    rounds += 1;
                };
                let failed = result.is_err();
                let _ = results_tx.send(result);
                if failed {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(PingPong {
            requests: std::sync::Mutex::new(Some(requests_tx)),
            results: std::sync::Mutex::new(results_rx),
            threads: std::sync::Mutex::new(vec![client, server]),
        })
    }

    /// Runs the ping-pong as asked and returns its round trips (blocks the calling thread).
    pub fn run(&self, run: PingPongRun) -> Result<Histogram<u64>, String> {
        let requests = self.requests.lock().expect("not poisoned");
        let sender = requests.as_ref().ok_or("the ping-pong pair is closed")?;
        sender
            .send(run)
            .map_err(|_| "the ping-pong client stopped".to_string())?;
        drop(requests);
        self.results
            .lock()
            .expect("not poisoned")
            .recv_timeout(PINGPONG_RUN_MAX)
            .map_err(|_| "ping-pong did not finish".to_string())?
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        // Closing the request channel ends the client, whose closed connection ends the server.
        self.requests.lock().expect("not poisoned").take();
        for thread in self.threads.lock().expect("not poisoned").drain(..) {
            let _ = thread.join();
        }
    }
}

/// Makes a volume file of [`VOLUME_BYTES`] zeroes, written out rather than sparse: the first
/// write to a block would otherwise allocate it (on tmpfs, allocate and clear a page), which
/// would make whichever phase runs first look slower.
pub fn make_volume(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let fail = |error: std::io::Error| format!("cannot make {}: {error}", path.display());
    let mut file = std::fs::File::create(path).map_err(fail)?;
    let zeroes = vec![0u8; 1 << 20];
    for _ in 0..VOLUME_BYTES / zeroes.len() as u64 {
        file.write_all(&zeroes).map_err(fail)?;
    }
    Ok(())
}

/// How often a role of a [`RunningSystem`] looks whether it was asked to stop.
const STOP_POLL: Duration = Duration::from_millis(20);

/// The three role threads of one [`with_system`] call. Dropping it stops them and waits for
/// their threads to end: each role's future is dropped with its executor, and with it every
/// task, queue pair, socket and open file. Before this existed the daemons of each mode ran on
/// until the process exited: their volumes stayed allocated after their directory was removed
/// (deleted, but open), so the second mode of `ordinal bench --modes async,order-sync` in a
/// 2 GiB guest failed with "No space left on device" on its /dev/shm, and their heartbeats and
/// pollers kept taking CPU from every point measured after them.
struct RunningSystem {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<(&'static str, std::thread::JoinHandle<()>)>,
    /// The far roles, where they run as processes of their own (see [`FarRole`]).
    children: Vec<(&'static str, std::process::Child)>,
}

impl RunningSystem {
    fn new() -> RunningSystem {
        RunningSystem {
            stop: std::sync::Arc::default(),
            threads: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Starts a far role: as a process of its own (this program run again, see
    /// [`serve_role_if_asked`]) when the program can, else on a thread of this one.
    fn start_role(&mut self, role: FarRole, plan: &SystemPlan) -> Result<(), String> {
        let name = role.name();
        if ROLES_AS_PROCESSES.load(std::sync::atomic::Ordering::Acquire)
            && std::env::var_os("ORDINAL_BENCH_ONE_PROCESS").is_none()
        {
            let program = std::env::current_exe().map_err(|error| {
                format!("cannot find this program to start the {name}: {error}")
            })?;
            let child = std::process::Command::new(program)
                .env(ROLE_ENV, plan.encode(role))
                .stdin(std::process::Stdio::null())
                .spawn()
                .map_err(|error| format!("cannot start the {name} process: {error}"))?;
            self.children.push((name, child));
            return Ok(());
        }
        let plan = plan.clone();
        self.start(name, Side::Far, move || role.run(plan))
    }

    /// Runs a role on its own executor until it ends by itself or the system is dropped.
    fn start<F, Fut>(&mut self, name: &'static str, side: Side, role: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + 'static,
    {
        let stop = self.stop.clone();
        let thread = executor_thread(name, side, move || {
            let role = role();
            async move {
                let stopped = async move {
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        glommio::timer::sleep(STOP_POLL).await;
                    }
                    Ok(())
                };
                futures_lite::future::or(role, stopped).await
            }
        })?;
        self.threads.push((name, thread));
        Ok(())
    }

    /// Whether every role thread and process has ended.
    #[cfg(test)]
    fn all_ended(&mut self) -> bool {
        self.threads.iter().all(|(_, thread)| thread.is_finished())
            && self
                .children
                .iter_mut()
                .all(|(_, child)| matches!(child.try_wait(), Ok(Some(_))))
    }
}

impl Drop for RunningSystem {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        for (name, thread) in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("loopback system: the {name} thread panicked");
            }
        }
        // The far roles after the primary, which would otherwise log their going away. A role
        // process holds nothing a kill can harm: the system's files are removed after it, and
        // it is waited for so that its volumes are closed first.
        for (name, mut child) in self.children.drain(..) {
            if let Err(error) = child.kill().and_then(|()| child.wait().map(drop)) {
                eprintln!("loopback system: cannot stop the {name} process: {error}");
            }
        }
    }
}

/// The DR and the aux of a benchmark's system, the roles at the far end of its links.
///
/// Why they run as processes of their own where the program allows it: glommio issues
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` every time an executor parks (glommio 0.9,
/// `sys/uring.rs`), which interrupts every CPU running a thread of the same process. With the
/// three roles in one process, each park of one role interrupted the others mid-work, which
/// deployed roles (a process each, on machines of their own) never do to each other. Measured
/// with the loopback benchmark (order-sync, 4 KiB, one write at a time, three runs each, the
/// membarrier call turned into a no-op by an `LD_PRELOAD` shim as the experiment): order round
/// trip p50 103.6-149.9 us with it, 83.9-86.6 us without; the raw ping-pong (two threads of
/// one process either way) 66.4-72.6 us in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FarRole {
    Aux,
    Dr,
}

impl FarRole {
    fn name(self) -> &'static str {
        match self {
            FarRole::Aux => "ordinal-aux",
            FarRole::Dr => "ordinal-dr",
        }
    }

    /// Whether this role runs at the lowest priority in a system of `mode`: the aux, in the
    /// modes whose acknowledgements do not wait for it (`order-sync` and `sync`).
    ///
    /// Why: the DR and the aux share one CPU here (see [`cpu_of`]), where deployed they have a
    /// machine each. At one write at a time, the primary's status-table write for one write
    /// woke the aux just before the next write's order record reached the DR, and the DR then
    /// waited for the aux to finish and park (seen with ftrace, `sched_switch` and the
    /// roles' `sendto`/`recvfrom`: the DR was woken, then ran only once the aux slept, about
    /// 30 us later under tracing). Neither the DR nor the aux slows the other on machines of
    /// their own; at nice 19 the role off the acknowledgement path mostly yields the CPU as
    /// soon as the other one wakes, which is the nearest two CPUs come to that. Not always:
    /// when the DR's own io_uring worker preempts it, the scheduler may run the aux next,
    /// ahead of the runnable DR (seen in the p99 tail). Measured with the
    /// loopback benchmark (4 KiB, `--samples 1000 --seconds 2`, three runs each, alternated),
    /// write-ack p50 and throughput at queue depth 32:
    /// - order-sync: 133.8-159.7 us and 73-78 k writes/s both at nice 0; 98.0-112.6 us and
    ///   89-90 k writes/s with the aux at nice 19;
    /// - sync: 131.5-151.2 us, 75-86 k/s; 98.8-118.1 us, 88-98 k/s with the aux at nice 19.
    ///
    /// The same runs' raw ping-pong p50 was 75.8-105.6 us throughout.
    ///
    /// Not in `async`, although its acknowledgements wait for the aux (the status entry) and
    /// not for the DR: there the DR's progress is the recovery point, and a DR at nice 19 fell
    /// behind. `ordinal bench`, 4 KiB, one write at a time, four runs with the DR at nice 19
    /// and seven at the same priority: lag at most 10, 16, 10 and 307 ops against 3 or 4, for
    /// a write-ack p50 of 81-108 us against 122-155 us. So both far roles keep the same priority in `async`: its latency is
    /// not the figure its users choose it for.
    fn yields_cpu_in(self, mode: Mode) -> bool {
        self == FarRole::Aux && matches!(mode, Mode::OrderSync | Mode::Sync)
    }

    /// Runs this role's daemon on the calling thread's executor, at the lowest priority where
    /// [`FarRole::yields_cpu_in`] says so.
    async fn run(self, plan: SystemPlan) -> Result<(), String> {
        if self.yields_cpu_in(plan.mode) {
            lower_this_threads_priority(self.name(), plan.mode);
        }
        match self {
            FarRole::Aux => run_aux(plan.aux_options()).await,
            FarRole::Dr => run_dr(plan.dr_options()).await,
        }
    }
}

/// Sets the calling thread's nice value to 19, the lowest priority of the normal scheduling
/// class (`setpriority(2)`: on Linux the nice value belongs to a thread, and `PRIO_PROCESS`
/// with `who` 0 names the calling one; threads and io_uring workers it starts later inherit
/// it), and says so with the value read back. Lowering one's own priority needs no
/// privilege; a failure only leaves the role at its priority, so it is reported and the run
/// goes on.
fn lower_this_threads_priority(role: &str, mode: Mode) {
    // SAFETY: setpriority takes three integers and changes only the calling thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        let error = std::io::Error::last_os_error();
        eprintln!("benchmark role {role}: cannot lower its priority: {error}");
        return;
    }
    // SAFETY: getpriority takes two integers and reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // One write, so that the line does not interleave with the other role's (see `log!`).
    let line = format!(
        "benchmark role {role}: nice {nice} (the {} acknowledgements do not wait for it)\n",
        mode.name()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// Set by [`serve_role_if_asked`]: this program can run a far role when started again.
static ROLES_AS_PROCESSES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The environment variable that asks this program to run a far role (its value: the plan).
const ROLE_ENV: &str = "ORDINAL_BENCH_ROLE";

/// What the roles of one system share, all a role process needs to build its options.
#[derive(Clone, Debug)]
pub(crate) struct SystemPlan {
    dir: PathBuf,
    primary_volume: PathBuf,
    dr_volume: PathBuf,
    sector_bytes: u32,
    mode: Mode,
    ring_bytes: u64,
    write_bytes: usize,
    transport: TransportChoice,
    aux: SocketAddr,
    dr: SocketAddr,
}

impl SystemPlan {
    fn psk(&self) -> Vec<u8> {
        b"loopback-benchmark-key-0123456789".to_vec()
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            volume_bytes: VOLUME_BYTES,
            sector_bytes: self.sector_bytes,
            ring_bytes: self.ring_bytes,
            table_slots: 4096,
            payload_bytes_max: payload_bytes_max_for(self.write_bytes),
        }
    }

    fn aux_options(&self) -> AuxOptions {
        AuxOptions {
            listen: self.aux,
            state_dir: self.dir.join("aux-state"),
            psk: self.psk(),
            geometry: self.geometry(),
            epoch: 1,
            // Generous: connecting verbs queue pairs in an emulated guest takes up to a second.
            heartbeat_timeout: Duration::from_secs(3),
            transport: self.transport.clone(),
        }
    }

    fn dr_options(&self) -> DrOptions {
        DrOptions {
            listen: self.dr,
            state_dir: self.dir.join("dr-state"),
            volume: self.dr_volume.clone(),
            psk: self.psk(),
            geometry: self.geometry(),
            epoch: 1,
            aux: Some(self.aux),
            auto_failover: false,
            applies_inflight_max: 16,
            transport: self.transport.clone(),
            nbd_listen: None,
            apply_delay: std::time::Duration::ZERO,
            durable_order_log: false,
        }
    }

    /// One `key=value` per line, for [`ROLE_ENV`].
    fn encode(&self, role: FarRole) -> String {
        let mut lines = vec![
            format!("role={}", role.name()),
            format!("parent={}", std::process::id()),
            format!("dir={}", self.dir.display()),
            format!("primary_volume={}", self.primary_volume.display()),
            format!("dr_volume={}", self.dr_volume.display()),
            format!("sector_bytes={}", self.sector_bytes),
            format!("mode={}", self.mode.name()),
            format!("ring_bytes={}", self.ring_bytes),
            format!("write_bytes={}", self.write_bytes),
            format!("aux={}", self.aux),
            format!("dr={}", self.dr),
        ];
        match &self.transport {
            TransportChoice::Tcp => lines.push("transport=tcp".into()),
            TransportChoice::Verbs {
                device,
                poll_spin,
                inline_max_bytes,
            } => lines.extend([
                "transport=verbs".into(),
                format!("device={device}"),
                format!("poll_spin_us={}", poll_spin.as_micros()),
                format!("inline_max_bytes={inline_max_bytes}"),
            ]),
        }
        lines.join("\n")
    }

    /// The role, the parent's pid and the plan from [`SystemPlan::encode`]'s text.
    fn decode(text: &str) -> Result<(FarRole, u32, SystemPlan), String> {
        let fields: std::collections::HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        let field = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| format!("{ROLE_ENV} has no {key}"))
        };
        let parse_error = |key: &str| format!("{ROLE_ENV}: {key} is not valid");
        let number = |key: &str| -> Result<u64, String> {
            field(key)?.parse().map_err(|_| parse_error(key))
        };
        let address = |key: &str| -> Result<SocketAddr, String> {
            field(key)?.parse().map_err(|_| parse_error(key))
        };
        let role = match field("role")? {
            "ordinal-aux" => FarRole::Aux,
            "ordinal-dr" => FarRole::Dr,
            other => return Err(format!("{ROLE_ENV}: no role {other:?}")),
        };
        let transport = match field("transport")? {
            "tcp" => TransportChoice::Tcp,
            "verbs" => TransportChoice::Verbs {
                device: field("device")?.to_string(),
                poll_spin: Duration::from_micros(number("poll_spin_us")?),
                inline_max_bytes: u32::try_from(number("inline_max_bytes")?)
                    .map_err(|_| parse_error("inline_max_bytes"))?,
            },
            other => return Err(format!("{ROLE_ENV}: no transport {other:?}")),
        };
        let plan = SystemPlan {
            dir: PathBuf::from(field("dir")?),
            primary_volume: PathBuf::from(field("primary_volume")?),
            dr_volume: PathBuf::from(field("dr_volume")?),
            sector_bytes: u32::try_from(number("sector_bytes")?)
                .map_err(|_| parse_error("sector_bytes"))?,
            mode: Mode::parse(field("mode")?).ok_or_else(|| parse_error("mode"))?,
            ring_bytes: number("ring_bytes")?,
            write_bytes: usize::try_from(number("write_bytes")?)
                .map_err(|_| parse_error("write_bytes"))?,
            transport,
            aux: address("aux")?,
            dr: address("dr")?,
        };
        let parent = u32::try_from(number("parent")?).map_err(|_| parse_error("parent"))?;
        Ok((role, parent, plan))
    }
}

/// Call first thing in `main` of a program that starts benchmark systems: from then on their
/// DR and aux run as processes of their own (this program started again), as deployed roles
/// do (see [`FarRole`] for why it matters). When this process is such a role, it runs the role
/// and exits here, and never returns. Programs that do not call it (test harnesses, which
/// cannot be started again as a role) keep every role on a thread of their own.
pub fn serve_role_if_asked() {
    ROLES_AS_PROCESSES.store(true, std::sync::atomic::Ordering::Release);
    let Some(text) = std::env::var_os(ROLE_ENV) else {
        return;
    };
    let (role, parent, plan) = match SystemPlan::decode(&text.to_string_lossy()) {
        Ok(decoded) => decoded,
        Err(error) => {
            eprintln!("benchmark role: {error}");
            std::process::exit(2);
        }
    };
    // The role ends with the program that started it, even if that one is killed. (The signal
    // comes when the thread that started it ends: systems are started from a program's main
    // thread, or one that lives as long as the system.) Asked before the parent is checked, so
    // that a parent that died in between is seen.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and changes nothing else.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != parent {
        std::process::exit(0);
    }
    // One write, so that the line does not interleave with the other role's (see `log!`).
    let line = format!(
        "benchmark role {}: running as process {}\n",
        role.name(),
        std::process::id()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    let thread = executor_thread(role.name(), Side::Far, move || role.run(plan));
    let code = match thread.map(|thread| thread.join()) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) => {
            eprintln!("benchmark role {}: the executor panicked", role.name());
            1
        }
        Err(error) => {
            eprintln!("benchmark role {}: {error}", role.name());
            1
        }
    };
    std::process::exit(code);
}

/// Starts aux and DR (as processes of their own where this program can, see [`FarRole`]) and
/// the primary on a thread, and runs `workload` on the primary's executor once it is ready.
/// Returns what the workload sends back, after the three daemons have stopped.
pub(crate) fn with_system<T, W, Fut>(config: &LoopbackConfig, workload: W) -> Result<T, String>
where
    T: Send + 'static,
    W: FnOnce(PrimaryHandle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let mut system = RunningSystem::new();
    let result = run_system(&mut system, config, workload);
    drop(system);
    result
}

fn run_system<T, W, Fut>(
    system: &mut RunningSystem,
    config: &LoopbackConfig,
    workload: W,
) -> Result<T, String>
where
    T: Send + 'static,
    W: FnOnce(PrimaryHandle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let dir = &config.dir;
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let (primary_volume, dr_volume) = match &config.volumes {
        Some(volumes) => volumes.clone(),
        None => {
            let volumes = (dir.join("primary.vol"), dir.join("dr.vol"));
            make_volume(&volumes.0)?;
            make_volume(&volumes.1)?;
            volumes
        }
    };
    let (aux_addr, dr_addr, primary_addr) = (free_port()?, free_port()?, free_port()?);
    let plan = SystemPlan {
        dir: dir.clone(),
        primary_volume: primary_volume.clone(),
        dr_volume,
        sector_bytes: config.sector_bytes,
        mode: config.mode,
        ring_bytes: config.ring_bytes,
        write_bytes: config.write_bytes,
        transport: config.transport.clone(),
        aux: aux_addr,
        dr: dr_addr,
    };
    system.start_role(FarRole::Aux, &plan)?;
    system.start_role(FarRole::Dr, &plan)?;
    let (psk, geometry) = (plan.psk(), plan.geometry());
    let primary = PrimaryOptions {
        listen: primary_addr,
        volume: primary_volume,
        psk,
        geometry,
        mode: config.mode,
        link_loss_policy: LinkLossPolicy::Block,
        degrade_after: None,
        epoch: 1,
        dr: dr_addr,
        aux: aux_addr,
        heartbeat_interval: Duration::from_millis(20),
        lease: Duration::from_millis(400),
        local_writes_inflight_max: 64,
        transport: config.transport.clone(),
        tuning: config.tuning,
    };
    let (result_tx, result_rx) = mpsc::channel();
    system.start("ordinal-primary", Side::Near, move || {
        run_primary(primary, move |handle| {
            glommio::spawn_local(async move {
                let _ = result_tx.send(workload(handle).await);
            })
            .detach();
        })
    })?;
    result_rx
        .recv_timeout(Duration::from_secs(900))
        .map_err(|_| "the workload did not finish (see the messages above)".to_string())
}

/// A deterministic spread of aligned offsets over the volume. Every bit of `index` must reach
/// the result (splitmix64's finaliser): the throughput writers number their writes
/// `writer << 40 | k`, and a hash that ignored the high bits gave all of them the same offsets at
/// the same time, so their local writes overlapped and ran one after another.
pub(crate) fn offset_of(index: u64, write_bytes: usize) -> u64 {
    let slots = VOLUME_BYTES / write_bytes as u64;
    let mut mixed = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (mixed ^ (mixed >> 31)) % slots * write_bytes as u64
}

async fn measure(handle: PrimaryHandle, config: LoopbackConfig) -> Result<LoopbackReport, String> {
    let bytes = config.write_bytes;
    let mut failed = 0u64;
    // Warm-up (connections, page faults, ring laps), then one write at a time.
    let mut write_ack_ns = histogram();
    let mut order_round_trips_before = None;
    let mut client_samples = Vec::with_capacity(config.latency_samples as usize);
    for index in 0..2 * config.latency_samples {
        if index == config.latency_samples {
            order_round_trips_before = Some(handle.order_round_trips_ns());
            // One write at a time: one more than the samples holds them all.
            handle.record_write_timelines(config.latency_samples as usize + 1);
        }
        let started = Instant::now();
        match handle
            .write(offset_of(index, bytes), vec![index as u8; bytes])
            .await
        {
            WriteOutcome::Acked { seq, .. } => {
                if index >= config.latency_samples {
                    client_samples.push((seq, started, Instant::now()));
                }
            }
            WriteOutcome::Failed(why) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("loopback bench: a write failed: {why}");
                }
            }
        }
        if index >= config.latency_samples {
            write_ack_ns
                .record(started.elapsed().as_nanos() as u64)
                .ok();
        }
    }
    let breakdown = crate::breakdown::bands(&client_samples, &handle.take_write_timelines());
    handle.record_write_timelines(0);
    let mut order_round_trip_ns = handle.order_round_trips_ns();
    if let Some(before) = order_round_trips_before {
        order_round_trip_ns
            .subtract(before)
            .map_err(|error| format!("order round trips: {error}"))?;
    }
    // Throughput: `queue_depth` writers, each one write at a time, for the given time.
    let throughput_ack_ns = Rc::new(std::cell::RefCell::new(histogram()));
    let writes = Rc::new(std::cell::Cell::new(0u64));
    let failures = Rc::new(std::cell::Cell::new(0u64));
    let started = Instant::now();
    let deadline = started + config.throughput_time;
    let mut writers = Vec::new();
    for writer in 0..config.queue_depth as u64 {
        let (handle, latencies, writes, failures) = (
            handle.clone(),
            throughput_ack_ns.clone(),
            writes.clone(),
            failures.clone(),
        );
        writers.push(glommio::spawn_local(async move {
            let mut index = writer << 40;
            while Instant::now() < deadline {
                let began = Instant::now();
                let outcome = handle
                    .write(offset_of(index, bytes), vec![index as u8; bytes])
                    .await;
                index += 1;
                if let WriteOutcome::Failed(_) = outcome {
                    failures.set(failures.get() + 1);
                    continue;
                }
                writes.set(writes.get() + 1);
                latencies
                    .borrow_mut()
                    .record(began.elapsed().as_nanos() as u64)
                    .ok();
            }
        }));
    }
    for writer in writers {
        writer.await;
    }
    let throughput_elapsed = started.elapsed();
    let throughput_ack_ns = throughput_ack_ns.borrow().clone();
    let nbd_addr = free_port()?;
    let export = ordinal_runtime::nbd::Export::Primary(handle.clone());
    glommio::spawn_local(async move {
        if let Err(error) = ordinal_runtime::nbd::serve(nbd_addr, export).await {
            eprintln!("loopback bench: {error}");
        }
    })
    .detach();
    let (queue_depth, time) = (config.queue_depth, config.throughput_time);
    // The blocking client runs on glommio's helper thread while this executor serves it.
    let nbd = glommio::executor()
        .spawn_blocking(move || nbd_throughput(nbd_addr, bytes, queue_depth, time))
        .await?;
    Ok(LoopbackReport {
        pingpong_ns: histogram(),
        write_pingpong_ns: histogram(),
        write_ack_ns,
        order_round_trip_ns,
        breakdown,
        throughput_ack_ns,
        throughput_writes: writes.get(),
        throughput_elapsed,
        nbd,
        failed_writes: failed + failures.get(),
    })
}

/// Ping-pong, then the system, then ping-pong again (the system stopped): both baselines go
/// into one histogram, so a drift of the machine during the run shows in neither side alone.
pub fn run(config: &LoopbackConfig) -> Result<LoopbackReport, String> {
    let write_pingpong = || {
        pingpong_sized(
            config.write_bytes,
            crate::sweep::ACK_BYTES,
            config.latency_samples,
        )
    };
    let mut pingpong_ns = pingpong(ORDER_FRAME_BYTES, config.latency_samples)?;
    let mut write_pingpong_ns = write_pingpong()?;
    let workload_config = config.clone();
    let mut report = with_system(config, move |handle| measure(handle, workload_config))??;
    pingpong_ns
        .add(pingpong(ORDER_FRAME_BYTES, config.latency_samples)?)
        .map_err(|error| error.to_string())?;
    write_pingpong_ns
        .add(write_pingpong()?)
        .map_err(|error| error.to_string())?;
    report.pingpong_ns = pingpong_ns;
    report.write_pingpong_ns = write_pingpong_ns;
    let _ = std::fs::remove_dir_all(&config.dir);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A system's daemons end when it is dropped: each sweep mode starts a fresh system, and
    /// the daemons of the earlier ones must not keep their volumes or take CPU meanwhile.
    #[test]
    fn the_daemons_of_a_system_stop_when_it_is_dropped() {
        let dir = std::env::temp_dir().join(format!("ordinal-system-stop-{}", std::process::id()));
        let config = LoopbackConfig {
            dir: dir.clone(),
            volumes: None,
            sector_bytes: 512,
            mode: Mode::OrderSync,
            write_bytes: 4096,
            latency_samples: 0,
            queue_depth: 1,
            throughput_time: Duration::ZERO,
            transport: TransportChoice::Tcp,
            tuning: Tuning::default(),
            ring_bytes: 8 << 20,
        };
        let mut system = RunningSystem::new();
        let outcome = run_system(&mut system, &config, |handle| async move {
            matches!(
                handle.write(0, vec![7u8; 4096]).await,
                WriteOutcome::Acked { .. }
            )
        });
        assert_eq!(
            outcome,
            Ok(true),
            "a write through the system is acknowledged"
        );
        assert!(
            !system.all_ended(),
            "the daemons run until the system is dropped"
        );
        system
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !system.all_ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let ended = system.all_ended();
        if !ended {
            // Dropping would wait for the threads for good.
            std::mem::forget(system);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            ended,
            "the daemons were still running 20 s after being asked to stop"
        );
    }

    /// A role process gets the system's mode from its plan; the aux yields the shared CPU in
    /// the modes whose acknowledgements do not wait for it, and the DR never does.
    #[test]
    fn a_role_knows_the_mode_and_only_the_role_off_the_ack_path_yields() {
        for mode in [Mode::OrderSync, Mode::Sync, Mode::Async] {
            let plan = SystemPlan {
                dir: PathBuf::from("/tmp/plan"),
                primary_volume: PathBuf::from("/dev/zram7"),
                dr_volume: PathBuf::from("/dev/zram8"),
                sector_bytes: 4096,
                mode,
                ring_bytes: 8 << 20,
                write_bytes: 4096,
                transport: TransportChoice::Tcp,
                aux: "127.0.0.1:1".parse().expect("an address"),
                dr: "127.0.0.1:2".parse().expect("an address"),
            };
            let (role, parent, decoded) =
                SystemPlan::decode(&plan.encode(FarRole::Aux)).expect("decodes");
            assert_eq!((role, parent), (FarRole::Aux, std::process::id()));
            assert_eq!(decoded.mode, mode);
            assert_eq!(decoded.dr_options().volume, PathBuf::from("/dev/zram8"));
            assert_eq!(decoded.primary_volume, PathBuf::from("/dev/zram7"));
            assert_eq!(decoded.geometry().sector_bytes, 4096);
            let yielding: Vec<FarRole> = [FarRole::Aux, FarRole::Dr]
                .into_iter()
                .filter(|role| role.yields_cpu_in(mode))
                .collect();
            let expected = if mode == Mode::Async {
                vec![]
            } else {
                vec![FarRole::Aux]
            };
            assert_eq!(yielding, expected, "{mode:?}");
            let unknown_mode = plan
                .encode(FarRole::Dr)
                .replace(&format!("mode={}", mode.name()), "mode=fast");
            assert!(
                SystemPlan::decode(&unknown_mode).is_err_and(|error| error.contains("mode")),
                "an unknown mode is refused"
            );
        }
    }
}
