//! `ordinal bench`: a whole system in this process (aux, DR and primary on their own executors),
//! swept over mode, payload size and queue depth, with raw TCP baselines of the same sizes from
//! the same run; prints a table and writes JSON, HdrHistogram distributions and SVG plots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ordinal_bench::{output, sweep};
use ordinal_proto::Mode;

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
    /// Where the state files live during the run, and the volumes unless they are on a RAM
    /// filesystem (tmpfs by default, so no disk is measured).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Where the volumes live: `ram` puts them on ext4 on a zram device made for each mode
    /// (needs root, zram and mkfs.ext4, and sizes that are multiples of 4096; else they fall
    /// back to files, saying why); `files` puts them under --dir. On tmpfs every direct write
    /// goes through an io_uring worker thread, a cost deployed volumes do not have.
    #[arg(long, default_value = "ram", value_parser = ["ram", "files"])]
    pub volumes: String,
    #[command(flatten)]
    pub link: crate::node::TransportArgs,
    #[command(flatten)]
    pub tuning: crate::node::TuningArgs,
    /// With --transport verbs: also run perftest (ib_send_lat, ib_write_lat, ib_write_bw, from
    /// the perftest package) on the same device and GID, and print each point next to it.
    #[arg(long)]
    pub perftest: bool,
    /// Iterations of each perftest test.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=10_000_000))]
    pub perftest_iterations: u32,
    /// Size of the DR's staging ring in MiB (at least twice the largest size).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub ring_mib: u64,
    /// Measure a running primary instead, through its NBD export at this address, per size and
    /// queue depth (the mode is the primary's). Prints p50/p99 and MB/s; writes no files.
    #[arg(long, value_name = "ADDR")]
    pub nbd: Option<std::net::SocketAddr>,
    /// With --nbd: writes per size, fewer for large sizes so that each size writes at most
    /// 32 MiB (the lag then stays within a ring of 64 MiB, the default).
    #[arg(long, default_value_t = 100)]
    pub writes: u64,
}

/// `--nbd`: write-ack latency and throughput of a running primary, per size and queue depth
/// (that many writes pipelined on the one connection).
fn against_nbd(
    addr: std::net::SocketAddr,
    sizes: &[usize],
    queue_depths: &[usize],
    writes: u64,
) -> Result<ExitCode, String> {
    // Checked before connecting: a depth of 0 would wait for replies to writes never sent.
    let depth_max = sweep::QUEUE_DEPTH_MAX;
    if let Some(depth) = queue_depths
        .iter()
        .find(|&&depth| !(1..=depth_max).contains(&depth))
    {
        return Err(format!("queue depth {depth}: from 1 to {depth_max}"));
    }
    let error = |error: ordinal_nbd::ClientError| format!("NBD {addr}: {error}");
    let mut client = ordinal_nbd::Client::connect(
        addr,
        ordinal_runtime::nbd::EXPORT_NAME,
        Duration::from_secs(60),
    )
    .map_err(error)?;
    let volume_bytes = client.size_bytes();
    for &size in sizes {
        if size == 0 || size % 4096 != 0 || size as u64 > volume_bytes {
            return Err(format!(
                "size {size}: a multiple of 4096, at most the volume"
            ));
        }
        for &depth in queue_depths {
            let count = writes.min((32 << 20) / size as u64).max(1);
            let mut latencies =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
                    .map_err(|error| error.to_string())?;
            let slots = volume_bytes / size as u64;
            // The send time of each write in flight (at most `depth`), by handle: the server
            // may answer in any order.
            let mut in_flight = std::collections::HashMap::with_capacity(depth);
            let (mut sent, mut answered) = (0u64, 0u64);
            let started = std::time::Instant::now();
            while answered < count {
                while sent < count && in_flight.len() < depth {
                    let data = vec![sent as u8; size];
                    in_flight.insert(sent, std::time::Instant::now());
                    client
                        .send_write(sent, (sent % slots) * size as u64, &data)
                        .map_err(error)?;
                    sent += 1;
                }
                let reply = client.recv_reply().map_err(error)?;
                if reply.error != 0 {
                    return Err(format!(
                        "NBD {addr}: write {} failed with NBD error {}",
                        reply.handle, reply.error
                    ));
                }
                let at = in_flight.remove(&reply.handle).ok_or_else(|| {
                    format!(
                        "NBD {addr}: a reply for handle {}, which is not in flight",
                        reply.handle
                    )
                })?;
                let _ = latencies.record(at.elapsed().as_micros() as u64);
                answered += 1;
            }
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "nbd {size} B QD {depth}: {count} writes, p50 {} us, p99 {} us, max {} us, {:.1} MB/s",
                latencies.value_at_quantile(0.5),
                latencies.value_at_quantile(0.99),
                latencies.max(),
                (count * size as u64) as f64 / seconds / 1e6
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    if let Some(addr) = args.nbd {
        return against_nbd(addr, &args.sizes, &args.queue_depths, args.writes);
    }
    let modes = args
        .modes
        .iter()
        .map(|name| {
            Mode::parse(name)
                .ok_or_else(|| format!("unknown mode {name:?}: use order-sync, sync or async"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let transport = args.link.choice()?;
    let perftest = match (&transport, args.perftest) {
        (_, false) => None,
        (ordinal_runtime::link::TransportChoice::Verbs { device, .. }, true) => {
            let domain = ordinal_runtime::verbs::VerbsDomain::open(device)?;
            Some(ordinal_bench::perftest::PerftestConfig {
                device: device.clone(),
                gid_index: domain.gid_index(),
                iterations: args.perftest_iterations,
            })
        }
        (_, true) => return Err("--perftest needs --transport verbs".into()),
    };
    let config = sweep::SweepConfig {
        dir: args.dir.clone(),
        ram_volumes: args.volumes == "ram",
        transport,
        modes,
        sizes: args.sizes.clone(),
        queue_depths: args.queue_depths.clone(),
        point_time: Duration::from_millis(args.point_ms),
        tuning: args.tuning.tuning()?,
        ring_bytes: args.ring_mib << 20,
        perftest,
    };
    sweep::validate(&config)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|error| format!("cannot create {}: {error}", args.out.display()))?;
    println!(
        "ordinal bench: {} transport, modes {}, sizes {:?}, queue depths {:?}, {} ms per point",
        args.link.transport,
        args.modes.join(","),
        args.sizes,
        args.queue_depths,
        args.point_ms
    );
    let sweep = sweep::run(&config, &mut |line| eprintln!("  {line}"))?;
    println!("{}", output::table(&sweep));
    let parameters = format!(
        "{{\"transport\":\"{}\",\"modes\":[{}],\"sizes\":{:?},\"queue_depths\":{:?},\"point_ms\":{},\"volumes_dir\":{:?},\"cpus\":{},\"ring_mib\":{},\"order_batch_records\":{},\"order_batches_inflight\":{},\"payload_writes_inflight\":{},\"inline_max_bytes\":{}}}",
        args.link.transport,
        args.modes.iter().map(|mode| format!("\"{mode}\"")).collect::<Vec<_>>().join(","),
        args.sizes,
        args.queue_depths,
        args.point_ms,
        args.dir.display().to_string(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.ring_mib,
        args.tuning.order_batch_records,
        args.tuning.order_batches_inflight,
        args.tuning.payload_writes_inflight,
        args.link.inline_max_bytes
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
