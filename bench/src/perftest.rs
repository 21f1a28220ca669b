//! perftest (`ib_send_lat`, `ib_write_lat`, `ib_write_bw` from the linux-rdma perftest package)
//! as the baselines of a verbs run: what the same RDMA device does with nothing but the verb,
//! measured in the same run as ordinal.
//!
//! Each test runs as a server and a client process on this machine, on the device and GID
//! index ordinal uses, the client connecting to the server's TCP port on the loopback address
//! for perftest's own exchange of queue pair numbers. Facts of perftest's output relied on here:
//! - latency tests print a row `#bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%`
//!   in microseconds, and their latency is half a round trip (the tests ping-pong);
//! - `ib_write_bw` prints `#bytes #iterations BW_peak BW_average MsgRate`, where its MB/sec are
//!   MiB/s (its format factor for MB is 0x100000), converted here to MB/s of 10^6 bytes, the
//!   unit of ordinal's figures.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run perftest next to ordinal.
#[derive(Clone, Debug)]
pub struct PerftestConfig {
    pub device: String,
    /// The GID index ordinal's queue pairs use on `device`.
    pub gid_index: u8,
    /// Iterations per test (`-n`).
    pub iterations: u32,
}

/// Bytes of the order message perftest's `ib_send_lat` is run with: the message header and one
/// order record, what ordinal SENDs for one write at a time.
pub const ORDER_MESSAGE_BYTES: usize =
    ordinal_proto::wire::MESSAGE_HEADER_BYTES + ordinal_proto::wire::ORDER_RECORD_BYTES;

/// How long a test may take before it is killed and reported as failed.
const TEST_TIME_MAX: Duration = Duration::from_secs(180);
/// How long the client keeps retrying while the server is not listening yet.
const SERVER_START_MAX: Duration = Duration::from_secs(10);

/// One latency row: half a round trip, as perftest reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyRow {
    pub typical_us: f64,
    pub p99_us: f64,
}

/// The perftest figures of one payload size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerftestBaseline {
    pub write_bytes: usize,
    /// `ib_write_lat` of the size: a WRITE of that size each way.
    pub write_lat: LatencyRow,
    /// `ib_write_bw` of the size, MB/s of 10^6 bytes.
    pub write_bw_mb_per_s: f64,
}

/// Finds perftest's latency row for `bytes`. A row whose figures are not positive and finite
/// is no measurement: in an emulated guest perftest printed `inf` (its clock calibration had
/// failed).
pub fn parse_latency(output: &str, bytes: usize) -> Option<LatencyRow> {
    output.lines().find_map(|line| {
        let fields: Vec<f64> = numeric_fields(line)?;
        (fields.len() >= 9
            && fields[0] == bytes as f64
            && measured(fields[4])
            && measured(fields[7]))
        .then(|| LatencyRow {
            typical_us: fields[4],
            p99_us: fields[7],
        })
    })
}

/// Finds `ib_write_bw`'s average bandwidth for `bytes`, in MB/s of 10^6 bytes (it printed 0.00
/// in an emulated guest once, which is no measurement either).
pub fn parse_bandwidth(output: &str, bytes: usize) -> Option<f64> {
    output.lines().find_map(|line| {
        let fields: Vec<f64> = numeric_fields(line)?;
        (fields.len() >= 5 && fields[0] == bytes as f64 && measured(fields[3]))
            .then(|| fields[3] * 1.048_576)
    })
}

fn measured(value: f64) -> bool {
    value.is_finite() && value > 0.0
}

/// Attempts at a test whose output holds no valid figure before giving up.
const ATTEMPTS: usize = 3;

/// Runs `test` until `parse` finds its figure in the output, [`ATTEMPTS`] times at most.
fn measure<T>(
    config: &PerftestConfig,
    test: &str,
    bytes: usize,
    parse: fn(&str, usize) -> Option<T>,
) -> Result<T, String> {
    let args = ["-s".to_string(), bytes.to_string()];
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        last = run(config, test, &args)?;
        if let Some(figure) = parse(&last, bytes) {
            return Ok(figure);
        }
    }
    Err(format!(
        "{test} -s {bytes} gave no valid figure in {ATTEMPTS} attempts; the last output: {last}"
    ))
}

/// Every whitespace-separated field of `line` as a number, or `None` if one is not.
fn numeric_fields(line: &str) -> Option<Vec<f64>> {
    let fields: Option<Vec<f64>> = line.split_whitespace().map(|f| f.parse().ok()).collect();
    fields.filter(|fields| !fields.is_empty())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `test` (an `ib_*` binary) as server and client with `args`; returns the client's output.
pub fn run(config: &PerftestConfig, test: &str, args: &[String]) -> Result<String, String> {
    let port = {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
        listener
            .local_addr()
            .map_err(|error| error.to_string())?
            .port()
    };
    let common: Vec<String> = [
        "-d",
        &config.device,
        "-x",
        &config.gid_index.to_string(),
        "-F",
        "-p",
        &port.to_string(),
        "-n",
        &config.iterations.to_string(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .chain(args.iter().cloned())
    .collect();
    let server = Command::new(test)
        .args(&common)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot start {test} (is perftest installed?): {error}"))?;
    let server = KillOnDrop(server);
    let started = Instant::now();
    loop {
        let mut client = Command::new(test)
            .args(&common)
            .arg("127.0.0.1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start {test}: {error}"))?;
        let deadline = Instant::now() + TEST_TIME_MAX;
        let status = loop {
            if let Some(status) = client.try_wait().map_err(|error| error.to_string())? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = client.kill();
                let _ = client.wait();
                return Err(format!(
                    "{test} {args:?} took longer than {TEST_TIME_MAX:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = client
            .wait_with_output()
            .map_err(|error| error.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if status.success() {
            drop(server);
            return Ok(text);
        }
        // A client that finds no server fails at once; the server may still be starting.
        if started.elapsed() > SERVER_START_MAX {
            return Err(format!(
                "{test} {args:?} failed ({status}): {}{}",
                text,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ib_send_lat` of the order message: the verb under ordinal's order round trip.
pub fn order_send_latency(config: &PerftestConfig) -> Result<LatencyRow, String> {
    measure(config, "ib_send_lat", ORDER_MESSAGE_BYTES, parse_latency)
}

/// `ib_write_lat` and `ib_write_bw` of `bytes`.
pub fn baseline(config: &PerftestConfig, bytes: usize) -> Result<PerftestBaseline, String> {
    Ok(PerftestBaseline {
        write_bytes: bytes,
        write_lat: measure(config, "ib_write_lat", bytes, parse_latency)?,
        write_bw_mb_per_s: measure(config, "ib_write_bw", bytes, parse_bandwidth)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rows as perftest 4.5 prints them on soft-RoCE (taken from a guest run).
    const SEND_LAT: &str = "---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 2       2000          10.95          236.29       11.55    \t       12.78       \t8.86   \t\t38.51   \t\t141.97 
---------------------------------------------------------------------------------------";
    const WRITE_BW: &str = " GID: 00:00:00:00:00:00:00:00:00:00:255:255:10:77:00:01
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      2000             50.88              48.69  \t\t   0.000779
---------------------------------------------------------------------------------------";

    #[test]
    fn the_latency_row_of_the_size_gives_typical_and_99th_percentile() {
        assert_eq!(
            parse_latency(SEND_LAT, 2),
            Some(LatencyRow {
                typical_us: 11.55,
                p99_us: 38.51
            })
        );
        assert_eq!(parse_latency(SEND_LAT, 80), None, "no row of that size");
        assert_eq!(
            parse_latency(WRITE_BW, 65536),
            None,
            "a bandwidth row is too short"
        );
        // As printed in an emulated guest whose clock calibration failed.
        let broken = " 80       2000          inf          inf       inf    inf   nan   inf   inf ";
        assert_eq!(parse_latency(broken, 80), None);
    }

    #[test]
    fn bandwidth_is_converted_from_perftest_mib_to_megabytes() {
        let mb = parse_bandwidth(WRITE_BW, 65536).unwrap();
        assert!((mb - 48.69 * 1.048_576).abs() < 1e-9, "{mb}");
        assert_eq!(parse_bandwidth(WRITE_BW, 4096), None);
        // Address lines and headers are not rows; nor is a bandwidth of zero.
        assert_eq!(parse_bandwidth(" GID: 00:00:00", 0), None);
        assert_eq!(
            parse_bandwidth(" 4096  2000  0.00  0.00  0.000000", 4096),
            None
        );
    }
}
