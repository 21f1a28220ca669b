//! `ordinal bench`: write-ack latency and throughput of a whole system in one process, swept over
//! mode, payload size and queue depth, each point next to raw TCP baselines of the same sizes
//! measured in the same run.
//!
//! One system (aux, DR and primary, each on its own executor and thread, as the daemons run) is
//! started per mode, since the mode is the primary's setting; the points of that mode run on it
//! one after another. The baselines use the same kind of sockets (glommio, `TCP_NODELAY`) between
//! two executors: a ping-pong of the payload out and a 16-byte answer back (what a write and its
//! acknowledgement move), and a one-way stream of payload-sized messages.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hdrhistogram::Histogram;
use ordinal_proto::Mode;
use ordinal_runtime::link::TransportChoice;
use ordinal_runtime::primary::{PrimaryHandle, WriteOutcome};

use crate::loopback::LoopbackConfig;
use crate::loopback::{
    executor_thread, histogram, offset_of, pingpong_sized, with_system, PingPong, PingPongRun, Side,
};

/// The most writes a point keeps in flight.
pub const QUEUE_DEPTH_MAX: usize = 256;

/// Bytes of the answer in the ping-pong baseline: about an acknowledgement.
pub const ACK_BYTES: usize = 16;

#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Where state files go, and the volumes unless they are on a RAM filesystem (a fresh
    /// subdirectory per mode, removed afterwards).
    pub dir: PathBuf,
    /// Put the volumes on a RAM filesystem made for each mode (`crate::ramdisk`) where one can
    /// be had and every size is a multiple of its 4096-byte blocks; else files under `dir`.
    pub ram_volumes: bool,
    pub transport: TransportChoice,
    pub modes: Vec<Mode>,
    pub sizes: Vec<usize>,
    pub queue_depths: Vec<usize>,
    /// Measured time per point, after a warm-up of a tenth of it.
    pub point_time: Duration,
    /// The primary's knobs and the staging ring, for every point.
    pub tuning: ordinal_runtime::primary::Tuning,
    pub ring_bytes: u64,
    /// Over verbs: perftest's figures on the same device as further baselines.
    pub perftest: Option<crate::perftest::PerftestConfig>,
}

/// One measured point.
#[derive(Debug)]
pub struct Point {
    pub mode: Mode,
    pub write_bytes: usize,
    pub queue_depth: usize,
    /// Write-ack latency of every acknowledged write, nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// The primary's order round trips (an order batch posted to the DR's answer) during the
    /// measured time: the part of a write's latency that perftest's `ib_send_lat` bounds.
    pub order_round_trip_ns: Histogram<u64>,
    /// At queue depth 1: the raw TCP ping-pong of the size, measured in slices between this
    /// point's writes (`INTERLEAVED_SLICES`), the baseline its latency ratio is taken against.
    pub pingpong_ns: Option<Histogram<u64>>,
    pub writes: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// The primary's replication lag through the measured time, every `lag_interval`.
    pub lag: Vec<LagSample>,
    pub lag_interval: Duration,
    /// Whether the system's volumes were on a RAM filesystem (`crate::ramdisk`) rather than
    /// files under the sweep's `dir`.
    pub volumes_on_ram: bool,
}

/// The primary's lag at one instant: ops and bytes admitted whose payload had not reached the
/// DR's ring yet. A failover at that instant could not recover them: the recovery point at that
/// instant. Those already acknowledged would be listed in the loss report (in `sync` mode none
/// is: a write is acknowledged only once its payload is at the DR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LagSample {
    /// Since the measured time began.
    pub at: Duration,
    pub ops: u64,
    pub bytes: u64,
}

/// Samples of the lag per point at most: the interval grows with the point's time to stay under.
pub const LAG_SAMPLES_MAX: usize = 200;
/// The shortest sampling interval: the status the sampler reads is refreshed by the primary's
/// loop, and finer sampling would only cost the measured writes CPU.
const LAG_INTERVAL_MIN: Duration = Duration::from_millis(5);

impl Point {
    /// The largest lag sampled: the most a failover at the worst sampled moment would not recover.
    pub fn lag_max(&self) -> LagSample {
        let ops = self.lag.iter().max_by_key(|sample| sample.ops);
        let bytes = self
            .lag
            .iter()
            .map(|sample| sample.bytes)
            .max()
            .unwrap_or(0);
        LagSample {
            at: ops.map_or(Duration::ZERO, |sample| sample.at),
            ops: ops.map_or(0, |sample| sample.ops),
            bytes,
        }
    }

    pub fn writes_per_second(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }

    pub fn megabytes_per_second(&self) -> f64 {
        self.writes_per_second() * self.write_bytes as f64 / 1e6
    }
}

/// The raw TCP baselines of one payload size.
#[derive(Debug)]
pub struct Baseline {
    pub write_bytes: usize,
    /// Payload out, `ACK_BYTES` back, one at a time, nanoseconds.
    pub pingpong_ns: Histogram<u64>,
    /// One-way stream of payload-sized messages.
    pub stream_megabytes_per_second: f64,
}

/// perftest's figures on the device of a verbs run.
#[derive(Debug)]
pub struct PerftestFigures {
    pub device: String,
    /// `ib_send_lat` of the order message (half a round trip).
    pub order_send_lat: crate::perftest::LatencyRow,
    pub sizes: Vec<crate::perftest::PerftestBaseline>,
}

impl PerftestFigures {
    pub fn of_size(&self, write_bytes: usize) -> Option<&crate::perftest::PerftestBaseline> {
        self.sizes
            .iter()
            .find(|size| size.write_bytes == write_bytes)
    }
}

#[derive(Debug)]
pub struct Sweep {
    pub points: Vec<Point>,
    pub baselines: Vec<Baseline>,
    pub perftest: Option<PerftestFigures>,
}

impl Sweep {
    pub fn baseline(&self, write_bytes: usize) -> Option<&Baseline> {
        self.baselines
            .iter()
            .find(|baseline| baseline.write_bytes == write_bytes)
    }

    /// The ping-pong a point's latency is compared with: the one measured between its own
    /// writes where there is one (queue depth 1), else its size's baseline.
    pub fn pingpong_of<'a>(&'a self, point: &'a Point) -> Option<&'a Histogram<u64>> {
        point.pingpong_ns.as_ref().or_else(|| {
            self.baseline(point.write_bytes)
                .map(|baseline| &baseline.pingpong_ns)
        })
    }
}

/// A point at queue depth 1 is measured in this many slices, each followed by a slice of
/// ping-pong as long: the latency target is a ratio of the two p50s, so both are taken on the
/// same machine at the same minutes.
pub const INTERLEAVED_SLICES: u32 = 10;

/// Refuses what the loopback system cannot run.
pub fn validate(config: &SweepConfig) -> Result<(), String> {
    if config.modes.is_empty() || config.sizes.is_empty() || config.queue_depths.is_empty() {
        return Err("give at least one mode, size and queue depth".into());
    }
    if let Some(size) = config
        .sizes
        .iter()
        .find(|&&size| size == 0 || size % 512 != 0 || size > 1 << 20)
    {
        return Err(format!(
            "payload size {size}: sizes must be multiples of 512 from 512 to 1 MiB (the volumes' sector)"
        ));
    }
    if let Some(depth) = config
        .queue_depths
        .iter()
        .find(|&&depth| !(1..=QUEUE_DEPTH_MAX).contains(&depth))
    {
        return Err(format!("queue depth {depth}: from 1 to {QUEUE_DEPTH_MAX}"));
    }
    if config.point_time < Duration::from_millis(100) {
        return Err("each point needs at least 100 ms".into());
    }
    let largest = config.sizes.iter().copied().max().unwrap_or(0);
    let ring_mib_min = crate::loopback::ring_mib_min_for(largest);
    if config.ring_bytes < ring_mib_min << 20 {
        return Err(format!(
            "a staging ring of {} KiB is too small for {largest}-byte writes: {ring_mib_min} MiB at least",
            config.ring_bytes >> 10
        ));
    }
    config.tuning.validate()
}

/// How long a sweep waits for its system's links before measuring anyway.
const CONNECT_WAIT_MAX: Duration = Duration::from_secs(60);

/// Runs every point and every baseline; `progress` hears about each as it finishes.
pub fn run(config: &SweepConfig, progress: &mut dyn FnMut(&str)) -> Result<Sweep, String> {
    validate(config)?;
    let mut baselines = Vec::new();
    for &write_bytes in &config.sizes {
        let rounds = (config.point_time.as_secs_f64() * 2000.0).clamp(200.0, 20_000.0) as u64;
        let pingpong_ns = pingpong_sized(write_bytes, ACK_BYTES, rounds)?;
        let stream_megabytes_per_second = tcp_stream(write_bytes, config.point_time)?;
        progress(&format!(
            "baseline {write_bytes} B: ping-pong p50 {:.1} us, stream {stream_megabytes_per_second:.0} MB/s",
            pingpong_ns.value_at_quantile(0.5) as f64 / 1000.0
        ));
        baselines.push(Baseline {
            write_bytes,
            pingpong_ns,
            stream_megabytes_per_second,
        });
    }
    let perftest = match &config.perftest {
        None => None,
        Some(perftest) => {
            let order_send_lat = crate::perftest::order_send_latency(perftest)?;
            progress(&format!(
                "perftest on {}: ib_send_lat {} B typical {:.2} us (half a round trip)",
                perftest.device,
                crate::perftest::ORDER_MESSAGE_BYTES,
                order_send_lat.typical_us
            ));
            let mut sizes = Vec::new();
            for &write_bytes in &config.sizes {
                let baseline = crate::perftest::baseline(perftest, write_bytes)?;
                progress(&format!(
                    "perftest on {}: {write_bytes} B ib_write_lat typical {:.2} us, ib_write_bw {:.1} MB/s",
                    perftest.device, baseline.write_lat.typical_us, baseline.write_bw_mb_per_s
                ));
                sizes.push(baseline);
            }
            Some(PerftestFigures {
                device: perftest.device.clone(),
                order_send_lat,
                sizes,
            })
        }
    };
    let mut pingpongs = Vec::new();
    if config.queue_depths.contains(&1) {
        for &write_bytes in &config.sizes {
            let pair = PingPong::start(write_bytes, ACK_BYTES)?;
            pingpongs.push((write_bytes, std::sync::Arc::new(pair)));
        }
    }
    let mut points = Vec::new();
    for &mode in &config.modes {
        let ram = if config.ram_volumes {
            match crate::ramdisk::volumes_on_ram(&config.dir, &config.sizes) {
                Ok((filesystem, volumes)) => {
                    progress(&format!(
                        "{}: volumes on ext4 on {} (RAM)",
                        mode.name(),
                        filesystem.device().display()
                    ));
                    Some((filesystem, volumes))
                }
                Err(why) => {
                    progress(&format!(
                        "{}: volumes under {} ({why})",
                        mode.name(),
                        config.dir.display()
                    ));
                    None
                }
            }
        } else {
            None
        };
        let system = LoopbackConfig {
            dir: config.dir.join(format!(
                "ordinal-bench-{}-{}",
                mode.name(),
                std::process::id()
            )),
            volumes: ram.as_ref().map(|(_, volumes)| volumes.clone()),
            // Files take 512-byte sectors (tmpfs and this machine's disks take direct I/O at
            // that alignment), so the sweep can go down to 512-byte writes.
            sector_bytes: match ram {
                Some(_) => crate::ramdisk::RAM_DISK_SECTOR_BYTES,
                None => 512,
            },
            mode,
            write_bytes: config.sizes.iter().copied().max().unwrap_or(4096),
            latency_samples: 0,
            queue_depth: 1,
            throughput_time: config.point_time,
            transport: config.transport.clone(),
            tuning: config.tuning,
            ring_bytes: config.ring_bytes,
        };
        let plan: Vec<(usize, usize)> = config
            .sizes
            .iter()
            .flat_map(|&size| config.queue_depths.iter().map(move |&depth| (size, depth)))
            .collect();
        let point_time = config.point_time;
        let pingpongs = pingpongs.clone();
        let (sender, receiver) = std::sync::mpsc::channel();
        let measured = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                with_system(&system, move |handle| async move {
                    // Measure from a connected system: over verbs in an emulated guest the queue
                    // pairs take seconds to connect, which the first point would otherwise
                    // spend with its writes waiting (seen: 0 writes in a 300 ms point).
                    let deadline = Instant::now() + CONNECT_WAIT_MAX;
                    while !(handle.status().dr_link_up && handle.status().aux_connected)
                        && Instant::now() < deadline
                    {
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                    for (write_bytes, queue_depth) in plan {
                        let pingpong = pingpongs
                            .iter()
                            .find(|(size, _)| *size == write_bytes && queue_depth == 1)
                            .map(|(_, pair)| pair.clone());
                        let point = measure(
                            &handle,
                            mode,
                            write_bytes,
                            queue_depth,
                            point_time,
                            pingpong,
                        )
                        .await;
                        let failed = point.is_err();
                        if sender.send(point).is_err() || failed {
                            break;
                        }
                    }
                })
            });
            let mut measured = Vec::new();
            for point in receiver.iter() {
                let mut point = point?;
                point.volumes_on_ram = ram.is_some();
                let lag_max = point.lag_max();
                progress(&format!(
                    "{} {} B QD {}: p50 {:.1} us, p99 {:.1} us, {:.0} writes/s, {:.1} MB/s, lag at most {} ops ({:.2} MiB){}",
                    point.mode.name(),
                    point.write_bytes,
                    point.queue_depth,
                    point.latency_ns.value_at_quantile(0.5) as f64 / 1000.0,
                    point.latency_ns.value_at_quantile(0.99) as f64 / 1000.0,
                    point.writes_per_second(),
                    point.megabytes_per_second(),
                    lag_max.ops,
                    lag_max.bytes as f64 / f64::from(1 << 20),
                    if point.failed > 0 {
                        format!(", {} FAILED", point.failed)
                    } else {
                        String::new()
                    }
                ));
                measured.push(point);
            }
            worker
                .join()
                .map_err(|_| "the system thread panicked".to_string())??;
            Ok::<_, String>(measured)
        })?;
        let _ = std::fs::remove_dir_all(&system.dir);
        // The system has stopped: its RAM filesystem can go.
        drop(ram);
        points.extend(measured);
    }
    Ok(Sweep {
        points,
        baselines,
        perftest,
    })
}

/// `queue_depth` writers, each one write at a time, for a tenth of `time` unmeasured and then
/// `time` measured. With `pingpong` (queue depth 1 only), the measured time is cut into
/// `INTERLEAVED_SLICES` slices with as long a slice of ping-pong after each; the writes' time
/// excludes those pauses.
async fn measure(
    handle: &PrimaryHandle,
    mode: Mode,
    write_bytes: usize,
    queue_depth: usize,
    time: Duration,
    pingpong: Option<std::sync::Arc<PingPong>>,
) -> Result<Point, String> {
    assert!(
        pingpong.is_none() || queue_depth == 1,
        "one writer pauses for the ping-pong"
    );
    let latencies = Rc::new(RefCell::new(histogram()));
    let (writes, failed) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    let warm_until = Instant::now() + time / 10;
    let measured_from = Rc::new(Cell::new(None::<Instant>));
    // Pauses for the ping-pong push the end on.
    let deadline = Rc::new(Cell::new(warm_until + time));
    let paused = Rc::new(Cell::new(Duration::ZERO));
    let pingpong_ns = Rc::new(RefCell::new(None::<Result<Histogram<u64>, String>>));
    // The primary's order round trips are cumulative: taken when the measured time starts and
    // subtracted at the end.
    let order_round_trips_before = {
        let handle = handle.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(warm_until.saturating_duration_since(Instant::now())).await;
            handle.order_round_trips_ns()
        })
    };
    let mut writers = Vec::new();
    for writer in 0..queue_depth as u64 {
        let (handle, latencies, writes, failed) = (
            handle.clone(),
            latencies.clone(),
            writes.clone(),
            failed.clone(),
        );
        let measured_from = measured_from.clone();
        let (deadline, paused, pingpong, pingpong_ns) = (
            deadline.clone(),
            paused.clone(),
            pingpong.clone(),
            pingpong_ns.clone(),
        );
        writers.push(glommio::spawn_local(async move {
            let mut index = writer << 40;
            let slice = time / INTERLEAVED_SLICES;
            let mut next_pause = warm_until + slice;
            loop {
                let began = Instant::now();
                if began >= deadline.get() {
                    break;
                }
                if let Some(pair) = pingpong.as_ref().filter(|_| began >= next_pause) {
                    let pair = pair.clone();
                    // The pair's client blocks its caller, so it is driven from glommio's
                    // blocking thread while this executor (the primary's) idles.
                    let slice_of_pingpong = glommio::executor()
                        .spawn_blocking(move || pair.run(PingPongRun::For(slice)))
                        .await;
                    let mut merged = pingpong_ns.borrow_mut();
                    *merged = Some(match (merged.take(), slice_of_pingpong) {
                        (_, Err(error)) | (Some(Err(error)), _) => Err(error),
                        (None, Ok(slice)) => Ok(slice),
                        (Some(Ok(mut sum)), Ok(slice)) => sum
                            .add(slice)
                            .map(|()| sum)
                            .map_err(|error| format!("ping-pong histogram: {error}")),
                    });
                    let pause = began.elapsed();
                    paused.set(paused.get() + pause);
                    deadline.set(deadline.get() + pause);
                    next_pause = Instant::now() + slice;
                    continue;
                }
                let outcome = handle
                    .write(
                        offset_of(index, write_bytes),
                        vec![index as u8; write_bytes],
                    )
                    .await;
                index += 1;
                if began < warm_until {
                    continue;
                }
                if measured_from.get().is_none() {
                    measured_from.set(Some(began));
                }
                match outcome {
                    WriteOutcome::Acked { .. } => {
                        writes.set(writes.get() + 1);
                        let _ = latencies
                            .borrow_mut()
                            .record(began.elapsed().as_nanos() as u64);
                    }
                    WriteOutcome::Failed(_) => failed.set(failed.get() + 1),
                }
            }
        }));
    }
    let lag_interval = (time / LAG_SAMPLES_MAX as u32).max(LAG_INTERVAL_MIN);
    let sampler = {
        let handle = handle.clone();
        let deadline = deadline.clone();
        glommio::spawn_local(async move {
            let mut lag = Vec::with_capacity(LAG_SAMPLES_MAX);
            let mut next = warm_until;
            while next < deadline.get() && lag.len() < LAG_SAMPLES_MAX {
                glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
                let status = handle.status();
                lag.push(LagSample {
                    at: Instant::now().saturating_duration_since(warm_until),
                    ops: status.lag_ops,
                    bytes: status.lag_bytes,
                });
                // A sample taken late (the loop was busy with a large write) moves the grid on
                // rather than taking the missed samples at once.
                let now = Instant::now();
                next += lag_interval;
                while next <= now {
                    next += lag_interval;
                }
            }
            lag
        })
    };
    for writer in writers {
        writer.await;
    }
    let lag = sampler.await;
    let elapsed = measured_from
        .get()
        .map_or(Duration::ZERO, |from| {
            from.elapsed().saturating_sub(paused.get())
        })
        .max(Duration::from_millis(1));
    let latency_ns = latencies.borrow().clone();
    let mut order_round_trip_ns = handle.order_round_trips_ns();
    order_round_trip_ns
        .subtract(order_round_trips_before.await)
        .map_err(|error| format!("order round trips: {error}"))?;
    let pingpong_ns = pingpong_ns.take().transpose()?;
    if pingpong.is_some() && pingpong_ns.is_none() {
        return Err(format!(
            "{} {write_bytes} B QD 1: the point ended before its first ping-pong slice",
            mode.name()
        ));
    }
    Ok(Point {
        mode,
        write_bytes,
        queue_depth,
        latency_ns,
        order_round_trip_ns,
        pingpong_ns,
        writes: writes.get(),
        failed: failed.get(),
        elapsed,
        lag,
        lag_interval,
        // Set by the sweep, which knows where the system's volumes are.
        volumes_on_ram: false,
    })
}

/// A one-way TCP stream of `message_bytes` messages for `time`; megabytes per second received.
pub fn tcp_stream(message_bytes: usize, time: Duration) -> Result<f64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    let addr = listener.local_addr().map_err(|error| error.to_string())?;
    drop(listener);
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let (result_tx, result_rx) = std::sync::mpsc::channel();
    let receiver = executor_thread("stream-receiver", Side::Far, move || async move {
        let listener = glommio::net::TcpListener::bind(addr).map_err(|error| error.to_string())?;
        let _ = bound_tx.send(());
        let mut stream = listener.accept().await.map_err(|error| error.to_string())?;
        let mut message = vec![0u8; message_bytes];
        let mut received = 0u64;
        let mut started = None;
        while stream.read_exact(&mut message).await.is_ok() {
            started.get_or_insert_with(Instant::now);
            received += message_bytes as u64;
        }
        let seconds = started.map_or(1.0, |at: Instant| at.elapsed().as_secs_f64());
        let _ = result_tx.send(received as f64 / seconds / 1e6);
        Ok(())
    })?;
    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "stream receiver did not start".to_string())?;
    let sender = executor_thread("stream-sender", Side::Near, move || async move {
        let mut stream = glommio::net::TcpStream::connect(addr)
            .await
            .map_err(|error| error.to_string())?;
        let message = vec![0x5au8; message_bytes];
        let deadline = Instant::now() + time;
        while Instant::now() < deadline {
            stream
                .write_all(&message)
                .await
                .map_err(|error| error.to_string())?;
        }
        stream.close().await.map_err(|error| error.to_string())
    })?;
    let megabytes_per_second = result_rx
        .recv_timeout(time + Duration::from_secs(60))
        .map_err(|_| "stream did not finish".to_string())?;
    let _ = sender.join();
    let _ = receiver.join();
    Ok(megabytes_per_second)
}
