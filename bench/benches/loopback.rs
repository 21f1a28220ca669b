//! `cargo bench -p ordinal-bench --bench loopback [-- OPTIONS]`: a whole system on loopback TCP
//! against raw TCP ping-pongs measured in the same run (of the write's size with a 16-byte
//! answer, as `ordinal bench`'s baseline, and of the order record's frame alone), and the
//! throughput through the NBD export against the library API's.
//!
//! Options: `--mode order-sync|sync|async`, `--write-bytes N` (4096), `--samples N` (5000, one
//! write at a time), `--queue-depth N` (32), `--seconds S` (5, throughput phase), `--volumes
//! ram|files` (ram: on a RAM filesystem made for the run, see `ordinal_bench::ramdisk`, where
//! the kernel has zram, this is root and the writes are multiples of 4096 bytes; else files
//! under the `--dir`), `--dir D` (/dev/shm: the state files, and the volumes when they are not
//! on a RAM filesystem; tmpfs, so nothing waits for a disk), `--transport tcp|verbs`, `--device rxe0`,
//! `--poll-spin-us N` (50). `ORDINAL_SPIN_US=N` makes every executor
//! of the run, the baseline's too, spin N µs before it parks. `ORDINAL_BENCH_ONE_PROCESS=1` runs
//! the DR and the aux on threads of this process instead of processes of their own.

use std::time::Duration;

use hdrhistogram::Histogram;
use ordinal_bench::breakdown::{Band, STEPS};
use ordinal_bench::loopback::{run, LoopbackConfig, ORDER_FRAME_BYTES};
use ordinal_bench::ramdisk::{volumes_on_ram, RAM_DISK_SECTOR_BYTES};
use ordinal_proto::Mode;
use ordinal_runtime::link::TransportChoice;

fn us(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

fn line(what: &str, histogram: &Histogram<u64>) -> String {
    format!(
        "{what:<44} p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  ({} samples)",
        us(histogram, 0.5),
        us(histogram, 0.99),
        us(histogram, 0.999),
        histogram.len()
    )
}

/// The primary's steps of the one-at-a-time writes, mean microseconds per band of writes
/// ranked by write-ack latency (see `ordinal_bench::breakdown`). The order round trip and the
/// local write overlap; the acknowledgement waits for the later of the two.
fn print_breakdown(bands: &[Band]) {
    println!("  where the time went (mean us per write, writes ranked by write-ack):");
    let mut header = format!("    {:<11} {:>6} {:>9}", "band", "writes", "write-ack");
    for step in STEPS {
        header += &format!(" {step:>11}");
    }
    println!("{header}  local write last");
    for band in bands {
        let mut line = format!(
            "    {:<11} {:>6} {:>9.1}",
            band.label, band.writes, band.write_ack_mean_us
        );
        for mean in band.step_means_us {
            line += &format!(" {mean:>11.1}");
        }
        println!("{line}  {:>15.0}%", band.local_write_last * 100.0);
    }
}

/// What the command line asked for, with whether the volumes should be RAM disks.
fn parse() -> Result<(LoopbackConfig, bool), String> {
    let mut ram_volumes = true;
    let mut config = LoopbackConfig {
        dir: std::path::PathBuf::from("/dev/shm"),
        volumes: None,
        // tmpfs and this machine's disks take direct I/O at 512 bytes.
        sector_bytes: 512,
        mode: Mode::OrderSync,
        write_bytes: 4096,
        latency_samples: 5000,
        queue_depth: 32,
        throughput_time: Duration::from_secs(5),
        transport: TransportChoice::Tcp,
        tuning: Default::default(),
        ring_bytes: ordinal_bench::loopback::RING_BYTES_DEFAULT,
    };
    let mut device = String::from("rxe0");
    let mut transport = String::from("tcp");
    let mut poll_spin_us = 50;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--bench" {
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--mode" => {
                config.mode =
                    Mode::parse(&value).ok_or_else(|| format!("unknown mode {value:?}"))?
            }
            "--write-bytes" => config.write_bytes = number()? as usize,
            "--samples" => config.latency_samples = number()?.max(1),
            "--queue-depth" => config.queue_depth = number()?.max(1) as usize,
            "--seconds" => config.throughput_time = Duration::from_secs(number()?.max(1)),
            "--dir" => config.dir = value.into(),
            "--volumes" => {
                ram_volumes = match value.as_str() {
                    "ram" => true,
                    "files" => false,
                    other => return Err(format!("--volumes: {other:?} is neither ram nor files")),
                }
            }
            "--transport" => transport = value,
            "--device" => device = value,
            "--poll-spin-us" => poll_spin_us = number()?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if config.write_bytes == 0 || config.write_bytes % 512 != 0 || config.write_bytes > 1 << 20 {
        return Err("--write-bytes must be a multiple of 512, at most 1 MiB".into());
    }
    config.transport = TransportChoice::parse(
        &transport,
        &device,
        Duration::from_micros(poll_spin_us),
        ordinal_runtime::link::INLINE_MAX_BYTES_DEFAULT,
    )?;
    config.dir = config
        .dir
        .join(format!("ordinal-loopback-{}", std::process::id()));
    Ok((config, ram_volumes))
}

fn main() {
    // The system's DR and aux run as this program started again (see `FarRole`); such a
    // process runs its role here and exits.
    ordinal_bench::loopback::serve_role_if_asked();
    let (mut config, want_ram_volumes) = match parse() {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("loopback bench: {error}");
            std::process::exit(2);
        }
    };
    let parent = config.dir.parent().unwrap_or(&config.dir).to_path_buf();
    let state_dir = parent.display();
    let (ram_filesystem, volumes) = if want_ram_volumes {
        match volumes_on_ram(&parent, &[config.write_bytes]) {
            Ok((filesystem, volumes)) => {
                config.volumes = Some(volumes);
                config.sector_bytes = RAM_DISK_SECTOR_BYTES;
                let what = format!(
                    "volumes on ext4 on {} (RAM), state files under {state_dir}",
                    filesystem.device().display()
                );
                (Some(filesystem), what)
            }
            Err(why) => (None, format!("volumes under {state_dir} ({why})")),
        }
    } else {
        (None, format!("volumes under {state_dir}"))
    };
    println!(
        "loopback: aux, DR and primary on 127.0.0.1 (one glommio executor each; DR and aux in processes of their own), {} transport, {} mode, {}-byte writes, {volumes}",
        match &config.transport {
            TransportChoice::Tcp => "tcp".to_string(),
            TransportChoice::Verbs {
                device, poll_spin, ..
            } => {
                format!("verbs ({device}, poll spin {} us)", poll_spin.as_micros())
            }
        },
        config.mode.name(),
        config.write_bytes,
    );
    let report = run(&config);
    // The system has stopped: the RAM filesystem can go.
    drop(ram_filesystem);
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!("loopback bench: {error}");
            std::process::exit(1);
        }
    };
    let pingpong_what = format!("raw TCP ping-pong, {ORDER_FRAME_BYTES} B each way");
    println!("{}", line(&pingpong_what, &report.pingpong_ns));
    let write_pingpong_what = format!(
        "raw TCP ping-pong, {} B out, {} B back",
        config.write_bytes,
        ordinal_bench::sweep::ACK_BYTES
    );
    println!("{}", line(&write_pingpong_what, &report.write_pingpong_ns));
    println!(
        "{}",
        line("write-ack, one write at a time", &report.write_ack_ns)
    );
    println!(
        "{}",
        line("  of which: order round trip", &report.order_round_trip_ns)
    );
    print_breakdown(&report.breakdown);
    let ratio = |baseline: &Histogram<u64>, quantile| {
        us(&report.write_ack_ns, quantile) / us(baseline, quantile)
    };
    println!(
        "write-ack / ping-pong of the write's size: p50 {:.2}x  p99 {:.2}x  (target for order-sync: <= 1.30x)",
        ratio(&report.write_pingpong_ns, 0.5),
        ratio(&report.write_pingpong_ns, 0.99)
    );
    println!(
        "write-ack / ping-pong of the order frame alone: p50 {:.2}x  p99 {:.2}x  (stricter: the write's payload is not in it)",
        ratio(&report.pingpong_ns, 0.5),
        ratio(&report.pingpong_ns, 0.99)
    );
    let seconds = report.throughput_elapsed.as_secs_f64();
    println!(
        "throughput at queue depth {}: {:.0} writes/s, {:.1} MB/s over {:.1} s",
        config.queue_depth,
        report.throughput_writes as f64 / seconds,
        report.throughput_writes as f64 * config.write_bytes as f64 / seconds / 1e6,
        seconds
    );
    println!(
        "{}",
        line("write-ack under that load", &report.throughput_ack_ns)
    );
    let nbd_seconds = report.nbd.elapsed.as_secs_f64();
    let nbd_mb_s = report.nbd.writes as f64 * config.write_bytes as f64 / nbd_seconds / 1e6;
    let api_mb_s = report.throughput_writes as f64 * config.write_bytes as f64 / seconds / 1e6;
    println!(
        "through NBD (one connection, {} in flight): {:.0} writes/s, {:.1} MB/s = {:.2}x the library API's",
        config.queue_depth,
        report.nbd.writes as f64 / nbd_seconds,
        nbd_mb_s,
        nbd_mb_s / api_mb_s
    );
    println!(
        "{}",
        line("NBD write-ack under that load", &report.nbd.ack_ns)
    );
    if report.failed_writes > 0 {
        println!("{} write(s) failed (see above)", report.failed_writes);
        std::process::exit(1);
    }
    // The daemons' executors never return; the figures are out, so end the process.
    std::process::exit(0);
}
