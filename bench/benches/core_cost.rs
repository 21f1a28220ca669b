//! Cost of the protocol core per write, primary and DR together on one core, no I/O.
//!
//! Run: `cargo bench -p ordinal-bench --bench core_cost`
//! (`ORDINAL_BENCH_BATCHES_INFLIGHT=N` sets the order batches in flight, default 2: fewer in
//! flight means larger batches, as a long link gives them; `ORDINAL_BENCH_WRITES` and
//! `ORDINAL_BENCH_SMALL_ONLY` shorten the run for profiling; `ORDINAL_BENCH_SIZES=512,1024`
//! picks the payload sizes; `ORDINAL_BENCH_RING_MIB=N` the staging ring's size, default the
//! daemons' 64 MiB.)
//!
//! Where the time goes at 512 B: the payload's copy into the staging ring misses the caches,
//! because successive writes move through the whole ring. Four alternated runs on a 2-vCPU
//! VM (`ORDINAL_BENCH_SMALL_ONLY=1`, `ORDINAL_BENCH_RING_MIB` 64 then 4) printed 4.8-5.4 M
//! writes/s with the 64 MiB ring and 5.4-6.3 M with a 4 MiB one, which stays in the caches: about
//! 30 ns of the 160-200 ns per write is that memory traffic rather than logic.
//! (Tried and not kept: a copy by memcpy then a CRC of the source, and non-temporal stores;
//! neither moved the 64 MiB figure, the second made the DR's verifying read miss instead.)
//!
//! Prints, per payload size and mode, the write rate and the cost per write as hdrhistogram
//! percentiles over repeated runs, and next to it a baseline measured in the same run: the
//! bare CRC-32C of the payload twice (primary computes, DR verifies), the floor no protocol
//! with end-to-end payload checksums can go below.

use std::hint::black_box;
use std::time::Instant;

use hdrhistogram::Histogram;
use ordinal_bench::core_loop::{run, CoreLoopConfig, RING_BYTES_DEFAULT};
use ordinal_proto::checksum::crc32c;
use ordinal_proto::Mode;

const RUNS: usize = 7;

fn main() {
    // ORDINAL_BENCH_WRITES shortens a run (for profiling under callgrind, say).
    let inflight: usize = std::env::var("ORDINAL_BENCH_BATCHES_INFLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let writes_per_run: u64 = std::env::var("ORDINAL_BENCH_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let only_small = std::env::var_os("ORDINAL_BENCH_SMALL_ONLY").is_some();
    let ring_bytes = match std::env::var("ORDINAL_BENCH_RING_MIB") {
        Ok(mib) => match mib.trim().parse::<u64>() {
            Ok(mib) if (4..=4096).contains(&mib) => mib << 20,
            _ => {
                eprintln!("ORDINAL_BENCH_RING_MIB: {mib:?} is not a ring size from 4 to 4096 MiB");
                std::process::exit(2);
            }
        },
        Err(_) => RING_BYTES_DEFAULT,
    };
    println!("protocol core, primary + DR state machines on one core, no I/O; {RUNS} runs of {writes_per_run} writes each, queue depth 32, {inflight} order batches in flight, {} MiB staging ring", ring_bytes >> 20);
    println!(
        "{:>8} {:>11} {:>12} {:>10} {:>10} {:>10} {:>14} {:>8}",
        "payload",
        "mode",
        "Mops/s p50",
        "ns/op p50",
        "ns/op min",
        "ns/op max",
        "2xCRC ns/op",
        "ratio"
    );
    let sizes: Vec<usize> = match std::env::var("ORDINAL_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|size| match size.trim().parse::<usize>() {
                Ok(bytes) if bytes > 0 && bytes % 512 == 0 && bytes <= 1 << 20 => bytes,
                _ => {
                    eprintln!("ORDINAL_BENCH_SIZES: {size:?} is not a multiple of 512 up to 1 MiB");
                    std::process::exit(2);
                }
            })
            .collect(),
        Err(_) if only_small => vec![512],
        Err(_) => vec![512, 4096, 65536],
    };
    for &payload_bytes in &sizes {
        let crc_ns = crc_baseline_ns(payload_bytes);
        for mode in Mode::ALL {
            let mut histogram = Histogram::<u64>::new(3).expect("3 significant digits");
            for _ in 0..RUNS {
                let outcome = run(CoreLoopConfig {
                    payload_bytes,
                    order_batches_inflight: inflight,
                    queue_depth: 32,
                    writes: writes_per_run,
                    mode,
                    ring_bytes,
                });
                let elapsed = outcome.elapsed;
                assert_eq!(outcome.acked, writes_per_run);
                // Picoseconds per op, so that 3 significant digits keep sub-nanosecond detail.
                histogram
                    .record((elapsed.as_nanos() * 1000 / u128::from(writes_per_run)) as u64)
                    .expect("in range");
            }
            let ns = |ps: u64| ps as f64 / 1000.0;
            let p50 = ns(histogram.value_at_quantile(0.5));
            println!(
                "{:>8} {:>11} {:>12.2} {:>10.1} {:>10.1} {:>10.1} {:>14.1} {:>8.2}",
                payload_bytes,
                mode.name(),
                1e3 / p50,
                p50,
                ns(histogram.min()),
                ns(histogram.max()),
                crc_ns,
                p50 / crc_ns
            );
        }
    }
}

/// Nanoseconds for two CRC-32Cs of a payload, best of several runs.
fn crc_baseline_ns(payload_bytes: usize) -> f64 {
    let payload = vec![0xA5u8; payload_bytes];
    let rounds = (64 << 20) / payload_bytes;
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..rounds {
                black_box(crc32c(black_box(&payload)));
                black_box(crc32c(black_box(&payload)));
            }
            started.elapsed().as_nanos() as f64 / rounds as f64
        })
        .fold(f64::MAX, f64::min)
}
