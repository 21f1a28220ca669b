//! `ordinal demo`: a whole primary/DR/aux system on this machine, driven through NBD, with a
//! node killed (`kill -9`) mid-flight, a failover, and a byte-for-byte check of the DR volume
//! against an expected image computed independently of the engine.
//!
//! Each run is checked by the simulator's invariant checker (`ordinal_sim::check_history`, I1-I6
//! and the loss report), fed only with what an outside observer sees: the writes sent (NBD write
//! number k is op k: one connection, admitted in arrival order), which were acknowledged, the
//! loss report, the DR volume's bytes when it was promoted and after every process stopped, and
//! the aux table file (which ops it recorded as replicated, and that it did not change after
//! the fence).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

use ordinal_runtime::primary::LOG_DEGRADED_ON_LATE_ANSWER;
use ordinal_runtime::transport::TRANSPORT_TIMEOUT;
use ordinal_sim::rng::Rng;

use crate::relay::Relay;
use crate::report::LossSummary;

pub(crate) const VOLUME_BYTES: u64 = 64 << 20;
const BLOCK_BYTES: u64 = 4096;
const WRITE_BLOCKS_MAX: u64 = 16;
const QUEUE_DEPTH: u64 = 32;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// How many independent runs (each: start, load, kill, fail over, verify).
    #[arg(long, default_value_t = 1)]
    pub runs: u64,
    /// Seed of the first run (workload and kill instant); later runs use the next seeds.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Which node to kill -9 under load: primary, or dr / aux (killed and restarted under load,
    /// then the primary is killed). Or a link falls silent under load (a relay holds every byte
    /// and closes nothing), tcp only: dr-link, between primary and DR, in odd-seeded runs for
    /// longer than the transport timeout so that the connections fail and are dialled again,
    /// and every third run kills the primary while the link is still silent, the others once it
    /// carries again and a write sent after that was acknowledged; aux-link, between primary
    /// and aux: the aux misses the heartbeats and fences the primary. In odd-seeded runs the
    /// link stays silent, the DR fails over by itself, and the old primary, alive and still
    /// reaching the DR, runs on for a while before it is killed; in even-seeded runs the DR
    /// has --no-auto-failover, the link carries again past the transport timeout, the primary
    /// must then fail its writes, and the failover is asked for.
    #[arg(long, default_value = "primary", value_parser = ["primary", "dr", "aux", "dr-link", "aux-link"])]
    pub kill: String,
    /// Writes acknowledged before the kill, at most (the instant is drawn per run).
    #[arg(long, default_value_t = 3000)]
    pub writes: u64,
    /// Print one line per run instead of the full demo output.
    #[arg(long)]
    pub quiet: bool,
    /// Keep the run directories (logs, volumes, state) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Transport of the daemons: tcp (no hardware needed) or verbs (RDMA device --device;
    /// tools/guest/run.sh gives a soft-RoCE one).
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// RDMA device for --transport verbs.
    #[arg(long, default_value = "rxe0")]
    pub device: String,
    /// Pass `--apply-delay-ms` to the DR: its applies lag, so that the failover must apply
    /// verified payloads from the staging ring ("applied from the ring at failover").
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=60_000))]
    pub dr_apply_delay_ms: u64,
    /// The primary's `--on-link-loss`: block (acknowledgements wait for the DR) or degrade
    /// (while the DR link is down, a write is acknowledged once the aux names it). With
    /// degrade, writes acknowledged from the moment a dr-link fault starts or the DR is killed
    /// are checked as possibly degraded: they need not be held by the DR (I6), but each must still be applied
    /// or in the loss report (I4).
    #[arg(long, default_value = "block", value_parser = ["block", "degrade"])]
    pub on_link_loss: String,
    /// The primary's `--degrade-after-ms` (with degrade only): it degrades once the DR leaves an
    /// order batch unanswered this long, before the link is declared down. In a run where it
    /// did, every acknowledgement is checked as possibly degraded (I4, not I6).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub degrade_after_ms: Option<u64>,
}

/// Draws below `n` (at least 1) from the simulator's seeded PRNG.
fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.range(0, n.max(1) - 1)
}

/// The bytes of write `k` of run `seed`: every 8-byte word names the write, so a misplaced or
/// stale block is recognisable in a dump.
fn write_bytes(seed: u64, k: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for word in 0..len / 8 {
        let value = (seed << 48) ^ (k << 20) ^ word as u64;
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

struct Node {
    child: Child,
    args: Vec<String>,
    log: PathBuf,
}

fn spawn(
    exe: &Path,
    args: &[String],
    log: &Path,
    expect: &[&str],
) -> Result<(Node, Vec<SocketAddr>), String> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|error| format!("cannot open {}: {error}", log.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", exe.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::new();
    for what in expect {
        let line = lines
            .next()
            .ok_or_else(|| format!("{} exited during start-up; see {}", args[0], log.display()))?
            .map_err(|error| error.to_string())?;
        if !line.contains(what) {
            return Err(format!("{}: unexpected start-up line {line:?}", args[0]));
        }
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{}: no address in {line:?}", args[0]))?;
        addrs.push(addr);
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((
        Node {
            child,
            args: args.to_vec(),
            log: log.to_path_buf(),
        },
        addrs,
    ))
}

impl Node {
    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no chance to clean up, as a crash.
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one run established.
pub struct RunOutcome {
    /// What was done to the system before the failover, in words.
    pub fault: String,
    pub sent: u64,
    pub acked: u64,
    pub report: LossSummary,
    pub acked_lost: u64,
    pub latencies_us: hdrhistogram::Histogram<u64>,
    pub elapsed: Duration,
    pub violations: Vec<String>,
}

pub(crate) struct Workload {
    /// (offset, len) of write k at index k - 1.
    pub(crate) writes: Mutex<Vec<(u64, u64)>>,
    pub(crate) acked: Mutex<Vec<bool>>,
    pub(crate) acked_count: AtomicU64,
    pub(crate) replied: AtomicU64,
    pub(crate) stop: AtomicBool,
    /// Set at the first write answered with an error: the client stops writing then, as a file
    /// system turns read-only on EIO (a fenced primary refuses everything after it, and the
    /// record of writes sent stays bounded).
    pub(crate) refused: AtomicBool,
    /// When write k's acknowledgement arrived, at index k - 1.
    pub(crate) ack_times: Mutex<Vec<Option<Instant>>>,
    pub(crate) latencies_us: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Workload {
    /// Writes answered with an error so far. Acknowledgements are loaded first: the receiver
    /// counts a reply before it counts its acknowledgement, so this never goes below zero.
    fn answered_with_error(&self) -> u64 {
        let acked = self.acked_count.load(Ordering::Acquire);
        self.replied.load(Ordering::Acquire) - acked
    }

    /// When the latest acknowledgement arrived.
    fn last_ack_at(&self) -> Option<Instant> {
        self.ack_times
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .max()
            .copied()
    }
}

pub(crate) fn start_workload(
    nbd: SocketAddr,
    seed: u64,
) -> Result<(Arc<Workload>, Vec<std::thread::JoinHandle<()>>), String> {
    let client = ordinal_nbd::Client::connect(nbd, "ordinal", Duration::from_secs(10))
        .map_err(|error| format!("NBD connect to {nbd}: {error}"))?;
    let (mut sender, mut receiver) = client.into_split();
    let workload = Arc::new(Workload {
        writes: Mutex::new(Vec::new()),
        acked: Mutex::new(Vec::new()),
        acked_count: AtomicU64::new(0),
        replied: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        refused: AtomicBool::new(false),
        ack_times: Mutex::new(Vec::new()),
        latencies_us: Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        ),
    });
    let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let (w, times) = (workload.clone(), sent_at.clone());
    // Each reply frees a place in the queue. The sender blocks on these while the queue is full:
    // polling on a short sleep instead cost the daemons their CPU in an emulated guest, where
    // every timer wake-up is expensive and the queue stays full while the DR's ring is.
    // At most a queue's worth is kept: a full channel wakes the sender as well as a longer one.
    let (replies_tx, replies_rx) = std::sync::mpsc::sync_channel::<()>(QUEUE_DEPTH as usize);
    let sender_thread = std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut k = 0u64;
        while !w.stop.load(Ordering::Relaxed) && !w.refused.load(Ordering::Relaxed) {
            if k - w.replied.load(Ordering::Acquire) >= QUEUE_DEPTH {
                // Bounded wait: `stop` is looked at again at least this often.
                let _ = replies_rx.recv_timeout(Duration::from_millis(20));
                continue;
            }
            k += 1;
            let len = BLOCK_BYTES * (1 + below(&mut rng, WRITE_BLOCKS_MAX));
            let offset = BLOCK_BYTES * below(&mut rng, (VOLUME_BYTES - len) / BLOCK_BYTES + 1);
            let data = write_bytes(seed, k, len as usize);
            w.writes.lock().expect("lock").push((offset, len));
            w.acked.lock().expect("lock").push(false);
            w.ack_times.lock().expect("lock").push(None);
            times.lock().expect("lock").push(Instant::now());
            if sender.send_write(k, offset, &data).is_err() {
                return;
            }
        }
    });
    let w = workload.clone();
    let receiver_thread = std::thread::spawn(move || {
        while let Ok(reply) = receiver.recv_reply() {
            let k = reply.handle;
            w.replied.fetch_add(1, Ordering::Release);
            // Full (the sender is not waiting) or the sender is gone: the reply still counts.
            let _ = replies_tx.try_send(());
            if reply.error != 0 {
                w.refused.store(true, Ordering::Relaxed);
            }
            if reply.error == 0 && k >= 1 {
                let latency = sent_at.lock().expect("lock")[(k - 1) as usize].elapsed();
                w.acked.lock().expect("lock")[(k - 1) as usize] = true;
                w.acked_count.fetch_add(1, Ordering::Release);
                w.ack_times.lock().expect("lock")[(k - 1) as usize] = Some(Instant::now());
                let _ = w
                    .latencies_us
                    .lock()
                    .expect("lock")
                    .record(latency.as_micros().max(1) as u64);
            }
        }
    });
    Ok((workload, vec![sender_thread, receiver_thread]))
}

fn wait_for_acks(workload: &Workload, target: u64, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    while workload.acked_count.load(Ordering::Acquire) < target {
        if start.elapsed() > limit {
            return Err(format!(
                "only {} of {target} writes acknowledged after {} s",
                workload.acked_count.load(Ordering::Acquire),
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

pub fn run_once(args: &DemoArgs, exe: &Path, seed: u64, dir: &Path) -> Result<RunOutcome, String> {
    let (kill, writes_max) = (args.kill.as_str(), args.writes);
    let started = Instant::now();
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let mut rng = Rng::new(seed ^ 0xD1B5_4A32_D192_ED03);
    let psk_path = dir.join("psk");
    let mut key = [0u8; 32];
    ordinal_runtime::fill_random(&mut key);
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&psk_path, &key).map_err(|error| error.to_string())?;
    for name in ["primary.vol", "dr.vol"] {
        let file = std::fs::File::create(dir.join(name)).map_err(|error| error.to_string())?;
        file.set_len(VOLUME_BYTES)
            .map_err(|error| error.to_string())?;
    }
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let common = |role: &str| -> Vec<String> {
        vec![
            role.to_string(),
            "--psk-file".into(),
            path("psk"),
            "--state-dir".into(),
            path(&format!("{role}-state")),
            "--ring-mib".into(),
            "16".into(),
            "--table-slots".into(),
            "1024".into(),
            "--max-write-kib".into(),
            "64".into(),
            "--transport".into(),
            args.transport.clone(),
            "--device".into(),
            args.device.clone(),
        ]
    };
    let mut aux_args = common("aux");
    aux_args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let (mut aux, addrs) = spawn(exe, &aux_args, &dir.join("aux.log"), &["listening on"])?;
    let aux_addr = addrs[0];
    let mut dr_args = common("dr");
    dr_args.extend([
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--volume".into(),
        path("dr.vol"),
        "--aux".into(),
        aux_addr.to_string(),
        "--nbd-listen".into(),
        "127.0.0.1:0".into(),
        "--apply-delay-ms".into(),
        args.dr_apply_delay_ms.to_string(),
    ]);
    // Even-seeded aux-link runs leave the failover to the operator (see there).
    let aux_fences_alone = kill == "aux-link" && seed % 2 == 0;
    if aux_fences_alone {
        dr_args.push("--no-auto-failover".into());
    }
    let (mut dr, addrs) = spawn(exe, &dr_args, &dir.join("dr.log"), &["listening on"])?;
    let dr_addr = addrs[0];
    // The primary reaches the DR or the aux through a relay when that link is what fails.
    let relay = match kill {
        "dr-link" => Some(Relay::start(dr_addr)?),
        "aux-link" => Some(Relay::start(aux_addr)?),
        _ => None,
    };
    let through_relay = |link: &str, addr: SocketAddr| match &relay {
        Some(relay) if kill == link => relay.addr(),
        _ => addr,
    };
    let mut primary_args = common("primary");
    primary_args.extend([
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--nbd-listen".into(),
        "127.0.0.1:0".into(),
        "--volume".into(),
        path("primary.vol"),
        "--dr".into(),
        through_relay("dr-link", dr_addr).to_string(),
        "--aux".into(),
        through_relay("aux-link", aux_addr).to_string(),
        "--on-link-loss".into(),
        args.on_link_loss.clone(),
    ]);
    if let Some(after) = args.degrade_after_ms {
        primary_args.extend(["--degrade-after-ms".into(), after.to_string()]);
    }
    let (mut primary, addrs) = spawn(
        exe,
        &primary_args,
        &dir.join("primary.log"),
        &["listening on", "serving NBD on"],
    )?;
    let (workload, threads) = start_workload(addrs[1], seed)?;
    let kill_after = 1 + below(&mut rng, writes_max.max(1));
    let limit = Duration::from_secs(60);
    let mut fault = format!("kill {kill}");
    let psk = key.into_bytes();
    let mut killed_while_silent = false;
    // For aux-link: the failover's report and the files, taken when the DR had promoted itself.
    let mut at_promotion: Option<AtPromotion> = None;
    let mut lease_broken: Option<String> = None;
    // When a dr-link fault started or the DR was killed: with degrade, acknowledgements from
    // then on may be degraded.
    let mut link_fault_from: Option<Instant> = None;
    // A link fault must find its link up. Acknowledgements alone do not show that: with
    // degrade they come without the DR, and a small draw of kill_after waits for none. (A
    // degrade run whose relay fell silent before the primary ever reached the DR waited for
    // a "DR link down" that could not come.)
    let primary_log = dir.join("primary.log");
    match kill {
        "dr-link" => wait_for_log(&primary_log, "primary: connected to the DR", limit)?,
        "aux-link" => wait_for_log(&primary_log, "primary: connected to the aux", limit)?,
        _ => {}
    }
    match kill {
        "primary" => {}
        "aux-link" if aux_fences_alone => {
            // The aux fences the primary once the heartbeats stop, but the DR (started with
            // --no-auto-failover) does not fail over. Past the transport timeout the primary's
            // aux connection fails; when the link carries again, the aux refuses it at the
            // handshake, and the primary must stop and fail its writes rather than wait for
            // good. The failover is then asked for, as an operator would.
            let relay = relay.as_ref().expect("started above for a link fault");
            wait_for_acks(&workload, kill_after / 2, limit)?;
            let errors_before = workload.answered_with_error();
            let silence = TRANSPORT_TIMEOUT + Duration::from_millis(1000 + below(&mut rng, 1000));
            relay.set_silent(true);
            std::thread::sleep(silence);
            relay.set_silent(false);
            let started = Instant::now();
            while !workload.refused.load(Ordering::Acquire) {
                if started.elapsed() > limit {
                    return Err(format!(
                        "the primary fenced by the aux still held its writes {} s after the link carried again",
                        limit.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let refused_after = started.elapsed();
            let errors = workload.answered_with_error() - errors_before;
            let log = std::fs::read_to_string(&primary_log).unwrap_or_default();
            let refused_at_handshake = log.lines().any(|line| {
                line.contains("primary: aux: ") && line.ends_with("this primary is fenced")
            });
            let how = if refused_at_handshake {
                "refused at the aux's handshake"
            } else {
                "told otherwise"
            };
            fault = format!(
                "aux link silent {:.1} s, the aux fenced the primary (no automatic failover), carried again; the primary, {how}, answered {errors} writes with an error {:.2} s later; kill primary, failover asked",
                silence.as_secs_f64(),
                refused_after.as_secs_f64()
            );
        }
        "aux-link" => {
            let relay = relay.as_ref().expect("started above for a link fault");
            wait_for_acks(&workload, kill_after / 2, limit)?;
            let errors_before = workload.answered_with_error();
            relay.set_silent(true);
            let silenced = Instant::now();
            // Nobody asks for this failover: the aux misses the heartbeats past its timeout
            // and tells the DR, which fails over by itself.
            wait_for_failover_done(dr_addr, &psk, limit)?;
            let promotion_seen = Instant::now();
            let taken = AtPromotion::take(dr_addr, &psk, dir)?;
            // The old primary runs on, cut off from the aux but still reaching the DR: its
            // lease ran out before the promotion, and the DR refuses it now.
            let ran_on = Duration::from_millis(500 + below(&mut rng, 1000));
            std::thread::sleep(ran_on);
            let last_ack = workload.last_ack_at();
            let last_ack_after = last_ack.map_or(0.0, |at| {
                at.saturating_duration_since(silenced).as_secs_f64()
            });
            // The lease promises more (no acknowledgement once the DR may be promoted); what
            // an observer can hold it to is none after the promotion was seen.
            if last_ack.is_some_and(|at| at > promotion_seen) {
                lease_broken = Some(format!(
                    "lease: the old primary acknowledged a write {last_ack_after:.3} s after its aux link fell silent, after the DR had promoted itself ({:.3} s)",
                    (promotion_seen - silenced).as_secs_f64()
                ));
            }
            fault = format!(
                "aux link silent; last acknowledgement {last_ack_after:.2} s later; the DR failed over by itself, seen {:.1} s later; the old primary ran on {:.1} s and answered {} writes with an error; kill primary",
                (promotion_seen - silenced).as_secs_f64(),
                ran_on.as_secs_f64(),
                workload.answered_with_error() - errors_before
            );
            at_promotion = Some(taken);
        }
        "dr-link" => {
            let relay = relay.as_ref().expect("started above for a link fault");
            wait_for_acks(&workload, kill_after / 2, limit)?;
            // Odd seeds hold the link silent past the transport timeout: the queue pairs fail
            // and the primary dials again (into a link that still carries nothing, at first).
            // Even seeds keep it shorter: the connections survive and their bytes arrive late.
            let silence = if seed % 2 == 1 {
                TRANSPORT_TIMEOUT + Duration::from_millis(500 + below(&mut rng, 2000))
            } else {
                Duration::from_millis(200 + below(&mut rng, 2000))
            };
            relay.set_silent(true);
            link_fault_from = Some(Instant::now());
            // Every write past these was sent into the silence.
            let sent_before_silence = workload.writes.lock().expect("lock").len() as u64;
            if seed.is_multiple_of(3) {
                // The disaster the aux is there for: the DR cut off, then the primary lost.
                if args.on_link_loss == "degrade" {
                    // Once the primary has acknowledged a write sent into the silence, which
                    // only the aux names: the loss report must then list what the DR never
                    // heard of, acknowledged or not. That takes the link declared down (the
                    // transport timeout) or, with --degrade-after-ms, the DR's answer overdue.
                    // (Waiting instead for one more acknowledgement after the link was
                    // declared down could wait for good: with --degrade-after-ms the degraded
                    // writes may have filled the status table by then, and a full table waits
                    // for the DR.)
                    wait_for_acks(&workload, sent_before_silence + 1, limit).map_err(|error| {
                        format!("with the DR link silent and --on-link-loss degrade: {error}")
                    })?;
                } else {
                    let until_kill = silence.mul_f64((1 + below(&mut rng, 9)) as f64 / 10.0);
                    std::thread::sleep(until_kill);
                }
                killed_while_silent = true;
                fault = format!(
                    "link silent ({:.1} s so far), kill primary",
                    link_fault_from.expect("set above").elapsed().as_secs_f64()
                );
            } else {
                std::thread::sleep(silence);
                relay.set_silent(false);
                // Service resumed: a write sent after the link returned was acknowledged
                // (acknowledgements beyond the writes sent before cannot be of those).
                let sent_before = workload.writes.lock().expect("lock").len() as u64;
                wait_for_acks(&workload, sent_before + 1, limit)
                    .map_err(|error| format!("after the link carried again: {error}"))?;
                fault = format!(
                    "link silent {:.1} s, carried again, kill primary",
                    silence.as_secs_f64()
                );
            }
        }
        "dr" | "aux" => {
            wait_for_acks(&workload, kill_after / 2, limit)?;
            let node = if kill == "dr" { &mut dr } else { &mut aux };
            if kill == "dr" {
                // Its connections close with it: with degrade, the primary acknowledges
                // without the DR from here until it is back.
                link_fault_from = Some(Instant::now());
            }
            node.kill();
            std::thread::sleep(Duration::from_millis(below(&mut rng, 300)));
            // Restart on the same address (it was announced; the others reconnect to it).
            let addr = if kill == "dr" { dr_addr } else { aux_addr };
            let mut args = node.args.clone();
            let at = args
                .iter()
                .position(|a| a == "--listen")
                .expect("listen flag")
                + 1;
            args[at] = addr.to_string();
            let log = node.log.clone();
            let (restarted, _) = spawn(exe, &args, &log, &["listening on"])?;
            *node = restarted;
        }
        other => {
            return Err(format!(
                "unknown node to kill {other:?}: use primary, dr, aux, dr-link or aux-link"
            ))
        }
    }
    if !killed_while_silent && at_promotion.is_none() && !aux_fences_alone {
        wait_for_acks(&workload, kill_after, limit)?;
        // Let a random slice of in-flight work proceed, then crash the primary mid-flight.
        std::thread::sleep(Duration::from_micros(below(&mut rng, 3000)));
    }
    primary.kill();
    workload.stop.store(true, Ordering::Relaxed);
    let at_promotion = match at_promotion {
        Some(taken) => taken,
        None => AtPromotion::take(dr_addr, &psk, dir)?,
    };
    let AtPromotion {
        report,
        dr_volume: dr_volume_at_promotion,
        aux_region: aux_region_at_fence,
    } = at_promotion;
    for thread in threads {
        let _ = thread.join();
    }
    dr.kill();
    aux.kill();
    drop(relay);
    let primary_log_text = std::fs::read_to_string(&primary_log).unwrap_or_default();
    if kill == "dr-link" {
        // What the primary made of the silence, from its log: a silence past the transport
        // timeout fails the connections, a shorter one must not.
        let downs = primary_log_text.matches("primary: DR link down").count();
        fault.push_str(&format!(
            " (the primary's DR link went down {downs} time(s)"
        ));
        if args.degrade_after_ms.is_some() {
            // The primary logs the 1st, 10th, 100th... time with the count so far.
            let late = primary_log_text
                .lines()
                .filter(|line| line.contains(LOG_DEGRADED_ON_LATE_ANSWER))
                .filter_map(|line| {
                    line.rsplit_once(" (")?
                        .1
                        .split(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0);
            let at_least = if late > 1 { "at least " } else { "" };
            fault.push_str(&format!(
                ", degraded on a late answer {at_least}{late} time(s)"
            ));
        }
        fault.push(')');
    }
    let observed = Observed {
        dr_volume_at_promotion,
        dr_volume_at_end: read_file(&dir.join("dr.vol"))?,
        aux_region_at_fence: Some(aux_region_at_fence),
        aux_region_at_end: Some(read_file(&aux_region_path(dir))?),
    };
    let writes = workload.writes.lock().expect("lock").clone();
    let acked = workload.acked.lock().expect("lock").clone();
    // With --degrade-after-ms the primary may also degrade whenever the DR is late, fault or
    // not; over NBD a client cannot tell which acknowledgements those were. So once the
    // primary's log says it did, every acknowledgement is checked as possibly degraded (held
    // to I4, not to I6); as long as it never did, I6 holds for them as without the flag.
    let degraded_on_late_answer =
        args.degrade_after_ms.is_some() && primary_log_text.contains(LOG_DEGRADED_ON_LATE_ANSWER);
    let degraded: Vec<bool> = match (args.on_link_loss.as_str(), link_fault_from) {
        ("degrade", _) if degraded_on_late_answer => vec![true; writes.len()],
        ("degrade", Some(from)) => workload
            .ack_times
            .lock()
            .expect("lock")
            .iter()
            .map(|at| at.is_some_and(|at| at >= from))
            .collect(),
        _ => Vec::new(),
    };
    let mut violations = verify_degraded(seed, &writes, &acked, &degraded, &report, &observed);
    violations.extend(lease_broken);
    let acked_lost = acked_lost(&report, &acked);
    let latencies_us = workload.latencies_us.lock().expect("lock").clone();
    Ok(RunOutcome {
        fault,
        sent: writes.len() as u64,
        acked: acked.iter().filter(|a| **a).count() as u64,
        report,
        acked_lost,
        latencies_us,
        elapsed: started.elapsed(),
        violations,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn aux_region_path(dir: &Path) -> PathBuf {
    dir.join("aux-state").join("aux-table.region")
}

/// The failover's loss report (asked for, or fetched if the DR already failed over by itself)
/// and the DR volume and aux table as they were right after it.
struct AtPromotion {
    report: LossSummary,
    dr_volume: Vec<u8>,
    aux_region: Vec<u8>,
}

impl AtPromotion {
    fn take(dr: SocketAddr, psk: &[u8], dir: &Path) -> Result<AtPromotion, String> {
        let report_json =
            ordinal_runtime::admin::request(dr, psk, "failover", Duration::from_secs(60))?;
        let report = LossSummary::parse(&report_json)?;
        std::fs::write(dir.join("loss-report.json"), &report_json)
            .map_err(|error| error.to_string())?;
        Ok(AtPromotion {
            report,
            dr_volume: read_file(&dir.join("dr.vol"))?,
            aux_region: read_file(&aux_region_path(dir))?,
        })
    }
}

/// Waits until the log at `path` has a line containing `what`.
fn wait_for_log(path: &Path, what: &str, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|log| log.contains(what)) {
        if start.elapsed() > limit {
            return Err(format!(
                "{} has no {what:?} after {} s",
                path.display(),
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until the DR's status says its failover is done, without asking for one.
fn wait_for_failover_done(dr: SocketAddr, psk: &[u8], limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = ordinal_runtime::admin::request(dr, psk, "status", Duration::from_secs(10))?;
        if status.contains("\"failover\":\"Done\"") {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the DR did not fail over by itself within {} s: {status}",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What was read from the DR's and the aux's files, right after the failover answered and again
/// once every process was stopped.
pub(crate) struct Observed {
    pub(crate) dr_volume_at_promotion: Vec<u8>,
    pub(crate) dr_volume_at_end: Vec<u8>,
    /// `None` when the aux's file is out of reach (it runs on another machine): then I2 and the
    /// aux half of I5 are not checked.
    pub(crate) aux_region_at_fence: Option<Vec<u8>>,
    pub(crate) aux_region_at_end: Option<Vec<u8>>,
}

/// How many of the ops the report lists as lost had been acknowledged to the client.
pub(crate) fn acked_lost(report: &LossSummary, acked: &[bool]) -> u64 {
    report
        .lost
        .iter()
        .filter(|entry| {
            entry
                .seq
                .checked_sub(1)
                .and_then(|index| acked.get(index as usize))
                .copied()
                .unwrap_or(false)
        })
        .count() as u64
}

/// Marks the ops the frozen aux table records as replicated (for I2). Every entry of the old
/// epoch must name an op the client sent, with the byte range it wrote.
fn mark_replicated_on_aux(
    ops: &mut [ordinal_sim::OpTruth],
    aux_region: &[u8],
    old_epoch: u32,
) -> Vec<String> {
    use ordinal_proto::aux::AUX_PRIMARY_AREA_OFFSET;
    use ordinal_proto::primary::AUX_ENTRIES_OFFSET;
    use ordinal_proto::wire::{AuxEntry, PrimaryStatus, AUX_ENTRY_BYTES};
    let mut violations = Vec::new();
    let first = AUX_PRIMARY_AREA_OFFSET + AUX_ENTRIES_OFFSET;
    let entries = aux_region.get(first..).unwrap_or_default();
    for (slot, bytes) in entries.chunks_exact(AUX_ENTRY_BYTES).enumerate() {
        let entry = match AuxEntry::decode(bytes) {
            Ok(Some(entry)) => entry,
            Ok(None) => continue,
            Err(error) => {
                violations.push(format!("aux table slot {slot} does not decode: {error}"));
                continue;
            }
        };
        if entry.epoch != old_epoch {
            continue;
        }
        let Some(op) = entry
            .seq
            .checked_sub(1)
            .and_then(|index| ops.get_mut(index as usize))
        else {
            violations.push(format!(
                "aux table names op {} that was never sent",
                entry.seq
            ));
            continue;
        };
        if op.volume_offset != entry.volume_offset || op.data.len() != entry.len as usize {
            violations.push(format!(
                "aux table has op {} at {}+{}, but the client wrote {}+{}",
                entry.seq,
                entry.volume_offset,
                entry.len,
                op.volume_offset,
                op.data.len()
            ));
        }
        if entry.status == PrimaryStatus::Replicated {
            op.aux_recorded_replicated = true;
        }
    }
    violations
}

/// Checks the run with the simulator's invariant checker (I1-I6 and the loss report), fed with
/// what an outside observer saw: the writes sent and which were acknowledged, the loss report,
/// and the bytes of the DR volume and of the aux table.
pub(crate) fn verify(
    seed: u64,
    writes: &[(u64, u64)],
    acked: &[bool],
    report: &LossSummary,
    observed: &Observed,
) -> Vec<String> {
    verify_degraded(seed, writes, acked, &[], report, observed)
}

/// [`verify`], with the writes whose acknowledgement may have been degraded (`--on-link-loss
/// degrade`, the DR link down) marked at their index: those need not be held by the DR (I6).
/// Missing entries count as not degraded.
pub(crate) fn verify_degraded(
    seed: u64,
    writes: &[(u64, u64)],
    acked: &[bool],
    degraded: &[bool],
    report: &LossSummary,
    observed: &Observed,
) -> Vec<String> {
    let report = match report.to_report() {
        Ok(report) => report,
        Err(error) => return vec![error],
    };
    let mut ops: Vec<ordinal_sim::OpTruth> = writes
        .iter()
        .zip(acked)
        .enumerate()
        .map(|(index, (&(offset, len), &was_acked))| {
            let seq = index as u64 + 1;
            ordinal_sim::OpTruth {
                seq,
                volume_offset: offset,
                data: write_bytes(seed, seq, len as usize),
                // Only whether it was acknowledged matters to the checks, not when.
                acked_at: was_acked.then_some(1),
                acked_degraded: was_acked && degraded.get(index).copied().unwrap_or(false),
                failed: false,
                aux_recorded_replicated: false,
                payload_landed: false,
            }
        })
        .collect();
    let mut violations = match &observed.aux_region_at_fence {
        Some(region) => mark_replicated_on_aux(&mut ops, region, report.old_epoch),
        None => Vec::new(),
    };
    let initial_image = vec![0u8; VOLUME_BYTES as usize];
    let verdict = ordinal_sim::check_history(&ordinal_sim::History {
        initial_image: &initial_image,
        ops: &ops,
        report: Some(&report),
        acks_wait_for_order: true,
        volume_at_promotion: &observed.dr_volume_at_promotion,
        volume_at_end: &observed.dr_volume_at_end,
        // The old primary was killed before the failover: it acknowledged nothing after.
        acked_after_promotion: &[],
        aux_region_at_fence: observed.aux_region_at_fence.as_deref(),
        aux_region_at_end: observed.aux_region_at_end.as_deref(),
    });
    violations.extend(
        verdict
            .violations
            .iter()
            .map(|violation| violation.to_string()),
    );
    violations
}

pub fn run(args: DemoArgs) -> Result<ExitCode, String> {
    if args.kill.ends_with("-link") && args.transport != "tcp" {
        return Err(format!(
            "--kill {} needs --transport tcp: its relay carries TCP connections",
            args.kill
        ));
    }
    if args.degrade_after_ms.is_some() && args.on_link_loss != "degrade" {
        return Err("--degrade-after-ms needs --on-link-loss degrade".into());
    }
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let base = std::env::temp_dir().join(format!("ordinal-demo-{}", std::process::id()));
    let mut failed = 0u64;
    let mut total =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let started = Instant::now();
    for run in 0..args.runs {
        let seed = args.seed + run;
        let dir = base.join(format!("seed-{seed}"));
        if !args.quiet {
            println!(
                "ordinal demo: aux, DR and primary on loopback (run directory {})",
                dir.display()
            );
            println!(
                "driving writes over NBD; node to kill -9 mid-flight: {}",
                args.kill
            );
        }
        let outcome = run_once(&args, &exe, seed, &dir);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                failed += 1;
                println!(
                    "seed {seed}: FAILED to run: {error} (logs in {})",
                    dir.display()
                );
                continue;
            }
        };
        total.add(&outcome.latencies_us).expect("same bounds");
        let verdict = if outcome.violations.is_empty() {
            "verified"
        } else {
            "VIOLATED"
        };
        if args.quiet {
            println!(
                "seed {seed}: {} after {} acked of {} sent; cut {}, {} applied from the ring at failover ({} through the aux table), {} lost ({} of them acked): {verdict} ({:.1} s)",
                outcome.fault, outcome.acked, outcome.sent, outcome.report.cut,
                outcome.report.applied_landed + outcome.report.applied_from_ring, outcome.report.applied_from_ring,
                outcome.report.lost.len(), outcome.acked_lost, outcome.elapsed.as_secs_f64()
            );
        } else {
            print_full(&outcome);
        }
        for violation in &outcome.violations {
            println!("  {violation}");
        }
        if outcome.violations.is_empty() {
            if !args.keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
        } else {
            failed += 1;
            println!("  run directory kept: {}", dir.display());
        }
    }
    if args.runs > 1 || args.quiet {
        println!(
            "{} run(s), {} failed, {:.1} s; write-ack latency over all runs: p50 {} us, p99 {} us, max {} us",
            args.runs,
            failed,
            started.elapsed().as_secs_f64(),
            total.value_at_quantile(0.5),
            total.value_at_quantile(0.99),
            total.max()
        );
    }
    if failed == 0 && !args.keep {
        let _ = std::fs::remove_dir_all(&base);
    }
    let _ = std::io::stdout().flush();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_full(outcome: &RunOutcome) {
    let h = &outcome.latencies_us;
    println!(
        "{} writes sent, {} acknowledged (order-sync) before the primary was killed{}",
        outcome.sent,
        outcome.acked,
        match outcome.fault.as_str() {
            "kill primary" => String::new(),
            "kill dr" => String::from(" (the DR was killed and restarted under load first)"),
            "kill aux" => String::from(" (the aux was killed and restarted under load first)"),
            link => format!(" ({link})"),
        }
    );
    println!(
        "write-ack latency: p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us ({} samples)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    );
    println!("{}", outcome.report.human());
    println!(
        "acknowledged writes reported lost: {} (order-sync acknowledges once the order is at the DR; their data was still in flight)",
        outcome.acked_lost
    );
    println!(
        "verification of the DR volume against the expected image of writes 1..={}: {}",
        outcome.report.cut,
        if outcome.violations.is_empty() {
            "byte for byte identical; every acknowledged write applied or reported"
        } else {
            "FAILED"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LostEntry;
    use ordinal_proto::aux::{aux_region_bytes, AUX_PRIMARY_AREA_OFFSET};
    use ordinal_proto::primary::AUX_ENTRIES_OFFSET;
    use ordinal_proto::wire::{AuxEntry, PrimaryStatus, AUX_ENTRY_BYTES};

    const SEED: u64 = 7;
    const SLOTS: u32 = 16;

    /// Two 4 KiB writes, both acknowledged; the report says op 1 is applied and op 2 lost.
    fn scenario() -> (Vec<(u64, u64)>, Vec<bool>, LossSummary, Observed) {
        let writes = vec![(0, 4096), (8192, 4096)];
        let report = LossSummary {
            old_epoch: 1,
            new_epoch: 2,
            aux_table_read: true,
            applied_before: 1,
            cut: 1,
            applied_from_ring: 0,
            applied_landed: 0,
            held_through: 2,
            lost: vec![LostEntry {
                seq: 2,
                volume_offset: 8192,
                len: 4096,
                reason: "payload-not-replicated".into(),
            }],
        };
        let mut volume = vec![0u8; VOLUME_BYTES as usize];
        volume[..4096].copy_from_slice(&write_bytes(SEED, 1, 4096));
        let aux = vec![0u8; aux_region_bytes(SLOTS)];
        let observed = Observed {
            dr_volume_at_promotion: volume.clone(),
            dr_volume_at_end: volume,
            aux_region_at_fence: Some(aux.clone()),
            aux_region_at_end: Some(aux),
        };
        (writes, vec![true, true], report, observed)
    }

    fn record_on_aux(region: &mut [u8], seq: u64, volume_offset: u64, status: PrimaryStatus) {
        let at = AUX_PRIMARY_AREA_OFFSET + AUX_ENTRIES_OFFSET + seq as usize * AUX_ENTRY_BYTES;
        AuxEntry {
            seq,
            volume_offset,
            epoch: 1,
            len: 4096,
            status,
        }
        .encode(&mut region[at..at + AUX_ENTRY_BYTES]);
    }

    /// The checker holds on an honest run and names each invariant a doctored run breaks.
    #[test]
    fn verify_finds_what_an_outside_observer_can_see() {
        let (writes, acked, report, observed) = scenario();
        assert_eq!(
            verify(SEED, &writes, &acked, &report, &observed),
            Vec::<String>::new()
        );

        let expect = |violations: Vec<String>, name: &str| {
            assert!(
                violations
                    .iter()
                    .any(|violation| violation.starts_with(name)),
                "expected a {name} violation, got {violations:?}"
            );
        };
        // The DR volume misses op 1: I1.
        let (writes, acked, report, mut observed) = scenario();
        observed.dr_volume_at_promotion[..4096].fill(0);
        observed.dr_volume_at_end[..4096].fill(0);
        expect(verify(SEED, &writes, &acked, &report, &observed), "I1");
        // The aux recorded op 2 as replicated, yet it is beyond the cut: I2.
        let (writes, acked, report, mut observed) = scenario();
        record_on_aux(
            observed.aux_region_at_fence.as_mut().expect("aux region"),
            2,
            8192,
            PrimaryStatus::Replicated,
        );
        observed.aux_region_at_end = observed.aux_region_at_fence.clone();
        expect(verify(SEED, &writes, &acked, &report, &observed), "I2");
        // ...but "queued" is what it should say for a lost op, and that holds.
        let (writes, acked, report, mut observed) = scenario();
        record_on_aux(
            observed.aux_region_at_fence.as_mut().expect("aux region"),
            2,
            8192,
            PrimaryStatus::Queued,
        );
        observed.aux_region_at_end = observed.aux_region_at_fence.clone();
        assert_eq!(
            verify(SEED, &writes, &acked, &report, &observed),
            Vec::<String>::new()
        );
        // The report forgets the acknowledged op 2: I4.
        let (writes, acked, mut report, observed) = scenario();
        report.lost.clear();
        expect(verify(SEED, &writes, &acked, &report, &observed), "I4");
        // The DR volume changed after promotion, or the aux table after the fence: I5.
        let (writes, acked, report, mut observed) = scenario();
        observed.dr_volume_at_end[100] ^= 1;
        expect(verify(SEED, &writes, &acked, &report, &observed), "I5");
        let (writes, acked, report, mut observed) = scenario();
        record_on_aux(
            observed.aux_region_at_end.as_mut().expect("aux region"),
            2,
            8192,
            PrimaryStatus::Queued,
        );
        expect(verify(SEED, &writes, &acked, &report, &observed), "I5");
        // Op 2 was acknowledged though the DR never held its order: I6.
        let (writes, acked, mut report, observed) = scenario();
        report.held_through = 1;
        expect(verify(SEED, &writes, &acked, &report, &observed), "I6");
        // The report lists op 2 with a range the client never wrote.
        let (writes, acked, mut report, observed) = scenario();
        report.lost[0].volume_offset = 4096;
        expect(
            verify(SEED, &writes, &acked, &report, &observed),
            "loss report",
        );
        // The aux table names a range the client never wrote.
        let (writes, acked, report, mut observed) = scenario();
        record_on_aux(
            observed.aux_region_at_fence.as_mut().expect("aux region"),
            2,
            4096,
            PrimaryStatus::Queued,
        );
        observed.aux_region_at_end = observed.aux_region_at_fence.clone();
        expect(
            verify(SEED, &writes, &acked, &report, &observed),
            "aux table",
        );
    }
}
