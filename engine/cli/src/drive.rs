//! `ordinal drive`: the demo's workload and checks against daemons that already run, on other
//! machines. It writes through the primary's NBD export until the primary stops answering (it was
//! killed: a process, or a whole machine), asks the DR for the failover's loss report (the DR
//! fails over by itself when the aux reports the primary lost, or on this request), and checks
//! the run with the simulator's invariant checker on the DR's volume, which must be local.
//!
//! The aux's table is on another machine, so I2 and the aux half of I5 are not checked here
//! (`ordinal demo`, with every node local, checks them).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::demo::{acked_lost, start_workload, verify, Observed};
use crate::report::LossSummary;

#[derive(Args, Debug)]
pub struct DriveArgs {
    /// The primary's NBD export (host:port).
    #[arg(long)]
    pub nbd: String,
    /// The DR daemon (host:port).
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub dr: String,
    #[arg(long)]
    pub psk_file: PathBuf,
    /// The DR's volume (on this machine), checked after the failover. It must have been all
    /// zeros and 64 MiB, as the primary's, when the daemons started.
    #[arg(long)]
    pub dr_volume: PathBuf,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The primary counts as gone once no write was acknowledged for this long (ms).
    #[arg(long, default_value_t = 3000)]
    pub stall_ms: u64,
    /// Give up after this many seconds without a first acknowledgement or a loss report.
    #[arg(long, default_value_t = 180)]
    pub timeout_s: u64,
}

fn resolve(what: &str, address: &str) -> Result<SocketAddr, String> {
    address
        .to_socket_addrs()
        .map_err(|error| format!("{what} {address}: {error}"))?
        .next()
        .ok_or_else(|| format!("{what} {address}: no address"))
}

pub fn run(args: DriveArgs) -> Result<ExitCode, String> {
    let psk = ordinal_runtime::read_psk(&args.psk_file)?;
    let nbd = resolve("NBD export", &args.nbd)?;
    let dr = resolve("DR", &args.dr)?;
    let limit = Duration::from_secs(args.timeout_s);
    let started = Instant::now();
    // The primary may still be connecting to its peers: keep trying until the limit.
    let (workload, _threads) = loop {
        match start_workload(nbd, args.seed) {
            Ok(started) => break started,
            Err(error) if started.elapsed() < limit => {
                eprintln!("drive: {error} (retrying)");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error),
        }
    };
    println!("drive: writing through {nbd}");
    // Write until acknowledgements stop for stall_ms after at least one.
    let stall = Duration::from_millis(args.stall_ms);
    let (mut last_count, mut last_change) = (0u64, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let count = workload.acked_count.load(Ordering::Acquire);
        if count != last_count {
            (last_count, last_change) = (count, Instant::now());
        } else if count > 0 && last_change.elapsed() >= stall {
            break;
        } else if count == 0 && started.elapsed() >= limit {
            return Err(format!("no write acknowledged within {} s", args.timeout_s));
        }
    }
    workload.stop.store(true, Ordering::Relaxed);
    let sent = workload.writes.lock().expect("lock").len();
    println!(
        "drive: the primary stopped answering after {last_count} acknowledged of {sent} sent; asking the DR for the failover"
    );
    // The sender and receiver threads may stay blocked on a dead machine's socket: they are
    // left behind, and the record of what they sent and what was acknowledged is final now.
    let writes = workload.writes.lock().expect("lock").clone();
    let acked = workload.acked.lock().expect("lock").clone();
    let report_json = ordinal_runtime::admin::request(dr, &psk, "failover", limit)?;
    let report = LossSummary::parse(&report_json)?;
    println!("{}", report.human());
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let dr_volume_at_promotion = read(&args.dr_volume)?;
    // Nothing may land on the promoted DR's volume from the old primary (I5).
    std::thread::sleep(Duration::from_secs(1));
    let observed = Observed {
        dr_volume_at_promotion,
        dr_volume_at_end: read(&args.dr_volume)?,
        aux_region_at_fence: None,
        aux_region_at_end: None,
    };
    let violations = verify(args.seed, &writes, &acked, &report, &observed);
    let acked_lost = acked_lost(&report, &acked);
    println!(
        "drive: seed {}: {} acked of {} sent; cut {}, {} applied from the ring at failover ({} through the aux table), {} lost ({acked_lost} of them acked): {}",
        args.seed,
        acked.iter().filter(|a| **a).count(),
        writes.len(),
        report.cut,
        report.applied_landed + report.applied_from_ring,
        report.applied_from_ring,
        report.lost.len(),
        if violations.is_empty() { "verified" } else { "VIOLATED" }
    );
    for violation in &violations {
        println!("  {violation}");
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
