//! `ordinal bench`: a whole system in this process (aux, DR and primary on their own executors),
//! swept over mode, payload size and queue depth, with raw TCP baselines of the same sizes from
//! the same run; prints a table and writes JSON, HdrHistogram distributions and SVG plots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ordinal_bench::{output, sweep};
use ordinal_proto::Mode;
use ordinal_runtime::link::TransportChoice;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Modes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "order-sync,sync,async")]
    pub modes: Vec<String>,
    /// Payload sizes in bytes (comma-separated; multiples of 512 up to 1 MiB).
    #[arg(long, value_delimiter = ',', default_value = "512,4096,65536,1048576")]
    pub sizes: Vec<usize>,
    /// Queue depths: writes kept in flight (comma-separated, 1 to 256).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub queue_depths: Vec<usize>,
    /// Measured milliseconds per point (after a tenth of that unmeasured).
    #[arg(long, default_value_t = 1000)]
    pub point_ms: u64,
    /// Where the results go: results.json, hgrm/*.hgrm, *.svg.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Where the volumes live during the run (tmpfs by default, so the disk is not measured).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// tcp, or verbs on --device (an RDMA device, e.g. in the soft-RoCE guest).
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    #[arg(long, default_value = "rxe0")]
    pub device: String,
    /// With --transport verbs: how long a queue pair polls after its last completion (µs).
    #[arg(long, default_value_t = 50)]
    pub poll_spin_us: u64,
}

pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let modes = args
        .modes
        .iter()
        .map(|name| {
            Mode::parse(name)
                .ok_or_else(|| format!("unknown mode {name:?}: use order-sync, sync or async"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let transport = TransportChoice::parse(
        &args.transport,
        &args.device,
        Duration::from_micros(args.poll_spin_us),
    )?;
    let config = sweep::SweepConfig {
        dir: args.dir.clone(),
        transport,
        modes,
        sizes: args.sizes.clone(),
        queue_depths: args.queue_depths.clone(),
        point_time: Duration::from_millis(args.point_ms),
    };
    sweep::validate(&config)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|error| format!("cannot create {}: {error}", args.out.display()))?;
    println!(
        "ordinal bench: {} transport, modes {}, sizes {:?}, queue depths {:?}, {} ms per point",
        args.transport,
        args.modes.join(","),
        args.sizes,
        args.queue_depths,
        args.point_ms
    );
    let sweep = sweep::run(&config, &mut |line| eprintln!("  {line}"))?;
    println!("{}", output::table(&sweep));
    let parameters = format!(
        "{{\"transport\":\"{}\",\"modes\":[{}],\"sizes\":{:?},\"queue_depths\":{:?},\"point_ms\":{},\"volumes_dir\":{:?},\"cpus\":{}}}",
        args.transport,
        args.modes.iter().map(|mode| format!("\"{mode}\"")).collect::<Vec<_>>().join(","),
        args.sizes,
        args.queue_depths,
        args.point_ms,
        args.dir.display().to_string(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let written = output::write_all(&sweep, &parameters, &args.out)?;
    println!("wrote {} files under {}", written.len(), args.out.display());
    let failed: u64 = sweep.points.iter().map(|point| point.failed).sum();
    if failed > 0 {
        return Err(format!("{failed} write(s) failed during the run"));
    }
    // The in-process daemons never return; everything is written, so end here.
    std::process::exit(0);
}
