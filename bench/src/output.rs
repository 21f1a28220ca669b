//! What `ordinal bench` leaves behind: a JSON file with every parameter and percentile, one
//! HdrHistogram percentile distribution (`.hgrm`, the text format HdrHistogram's plotters read)
//! per point and baseline, and four SVG plots drawn here (no plotting dependency: a line chart
//! is a few polylines).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use crate::sweep::{Point, Sweep, ACK_BYTES};

/// The percentiles every summary lists.
const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99_9", 0.999),
    ("p99_99", 0.9999),
];

fn us(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1000.0
}

fn summary_json(histogram: &Histogram<u64>) -> String {
    let mut json = format!("{{\"count\":{}", histogram.len());
    for (name, quantile) in QUANTILES {
        let _ = write!(
            json,
            ",\"{name}\":{:.1}",
            us(histogram.value_at_quantile(quantile))
        );
    }
    let _ = write!(
        json,
        ",\"min\":{:.1},\"max\":{:.1},\"mean\":{:.1}}}",
        us(histogram.min()),
        us(histogram.max()),
        histogram.mean() / 1000.0
    );
    json
}

/// A point's lag series: the largest sample and every sample as [milliseconds, ops, bytes].
fn lag_json(point: &Point) -> String {
    let max = point.lag_max();
    let mut json = format!(
        "{{\"interval_ms\":{:.1},\"ops_max\":{},\"bytes_max\":{},\"series\":[",
        point.lag_interval.as_secs_f64() * 1000.0,
        max.ops,
        max.bytes
    );
    for (index, sample) in point.lag.iter().enumerate() {
        let _ = write!(
            json,
            "{}[{:.1},{},{}]",
            if index > 0 { "," } else { "" },
            sample.at.as_secs_f64() * 1000.0,
            sample.ops,
            sample.bytes
        );
    }
    json.push_str("]}");
    json
}

/// Every figure of the run as JSON (latencies in microseconds).
pub fn json(sweep: &Sweep, parameters: &str) -> String {
    let mut json = format!(
        "{{\"parameters\":{parameters},\"ack_bytes_in_pingpong\":{ACK_BYTES},\"baselines\":["
    );
    for (index, baseline) in sweep.baselines.iter().enumerate() {
        let _ = write!(
            json,
            "{}{{\"write_bytes\":{},\"pingpong_us\":{},\"stream_mb_per_s\":{:.1}}}",
            if index > 0 { "," } else { "" },
            baseline.write_bytes,
            summary_json(&baseline.pingpong_ns),
            baseline.stream_megabytes_per_second
        );
    }
    json.push(']');
    if let Some(perftest) = &sweep.perftest {
        let _ = write!(
            json,
            ",\"perftest\":{{\"device\":{:?},\"order_message_bytes\":{},\"ib_send_lat_us\":{{\"typical\":{:.2},\"p99\":{:.2}}},\"sizes\":[",
            perftest.device,
            crate::perftest::ORDER_MESSAGE_BYTES,
            perftest.order_send_lat.typical_us,
            perftest.order_send_lat.p99_us
        );
        for (index, size) in perftest.sizes.iter().enumerate() {
            let _ = write!(
                json,
                "{}{{\"write_bytes\":{},\"ib_write_lat_us\":{{\"typical\":{:.2},\"p99\":{:.2}}},\"ib_write_bw_mb_per_s\":{:.1}}}",
                if index > 0 { "," } else { "" },
                size.write_bytes,
                size.write_lat.typical_us,
                size.write_lat.p99_us,
                size.write_bw_mb_per_s
            );
        }
        json.push_str("]}");
    }
    json.push_str(",\"points\":[");
    for (index, point) in sweep.points.iter().enumerate() {
        let baseline = sweep.baseline(point.write_bytes);
        let latency_ratio = |quantile| {
            sweep.pingpong_of(point).map_or(0.0, |pingpong| {
                point.latency_ns.value_at_quantile(quantile) as f64
                    / pingpong.value_at_quantile(quantile).max(1) as f64
            })
        };
        let stream_ratio = baseline.map_or(0.0, |baseline| {
            point.megabytes_per_second() / baseline.stream_megabytes_per_second.max(1e-9)
        });
        let _ = write!(
            json,
            "{}{{\"mode\":\"{}\",\"write_bytes\":{},\"queue_depth\":{},\"writes\":{},\"failed\":{},\"seconds\":{:.3},\"writes_per_s\":{:.0},\"mb_per_s\":{:.1},\"latency_us\":{},\"order_round_trip_us\":{},\"p50_over_pingpong_p50\":{:.2},\"p99_over_pingpong_p99\":{:.2},\"mb_per_s_over_stream\":{:.2},\"volumes\":\"{}\",\"lag\":{}}}",
            if index > 0 { "," } else { "" },
            point.mode.name(),
            point.write_bytes,
            point.queue_depth,
            point.writes,
            point.failed,
            point.elapsed.as_secs_f64(),
            point.writes_per_second(),
            point.megabytes_per_second(),
            summary_json(&point.latency_ns),
            summary_json(&point.order_round_trip_ns),
            latency_ratio(0.5),
            latency_ratio(0.99),
            stream_ratio,
            if point.volumes_on_ram { "ram" } else { "files" },
            lag_json(point)
        );
        if let Some(pingpong) = &point.pingpong_ns {
            // Inside the point's object: the ping-pong measured between its writes.
            json.pop();
            let _ = write!(
                json,
                ",\"pingpong_interleaved_us\":{}}}",
                summary_json(pingpong)
            );
        }
        let perftest = sweep.perftest.as_ref();
        if let Some((perftest, size)) =
            perftest.and_then(|perftest| Some((perftest, perftest.of_size(point.write_bytes)?)))
        {
            // Inside the point's object: its ratios to perftest's figures of the same size, and
            // its order round trip's to a round trip of `ib_send_lat`.
            json.pop();
            let _ = write!(
                json,
                ",\"p50_over_2x_ib_write_lat\":{:.2},\"mb_per_s_over_ib_write_bw\":{:.2},\"order_round_trip_p50_over_2x_ib_send_lat\":{:.2}}}",
                us(point.latency_ns.value_at_quantile(0.5)) / (2.0 * size.write_lat.typical_us),
                point.megabytes_per_second() / size.write_bw_mb_per_s.max(1e-9),
                us(point.order_round_trip_ns.value_at_quantile(0.5))
                    / (2.0 * perftest.order_send_lat.typical_us)
            );
        }
    }
    json.push_str("]}\n");
    json
}

/// The human table: each point next to its baselines and the ratios.
pub fn table(sweep: &Sweep) -> String {
    let mut table = format!(
        "{:<11} {:>8} {:>4} {:>10} {:>10} {:>10} {:>10} {:>9} {:>11} {:>7} {:>11} {:>7} {:>10} {:>7} {:>8} {:>8}\n",
        "mode",
        "bytes",
        "QD",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "writes/s",
        "MB/s",
        "ping p50 us",
        "ratio",
        "ping p99 us",
        "ratio",
        "stream MB/s",
        "ratio",
        "lag ops",
        "lag MiB"
    );
    for point in &sweep.points {
        let baseline = sweep.baseline(point.write_bytes);
        let pingpong = |quantile| {
            sweep
                .pingpong_of(point)
                .map_or(0.0, |pingpong| us(pingpong.value_at_quantile(quantile)))
        };
        let stream = baseline.map_or(0.0, |b| b.stream_megabytes_per_second);
        let p50 = us(point.latency_ns.value_at_quantile(0.5));
        let p99 = us(point.latency_ns.value_at_quantile(0.99));
        let lag_max = point.lag_max();
        let _ = writeln!(
            table,
            "{:<11} {:>8} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>10.0} {:>9.1} {:>11.1} {:>6.2}x {:>11.1} {:>6.2}x {:>10.0} {:>6.2}x {:>8} {:>8.2}{}",
            point.mode.name(),
            point.write_bytes,
            point.queue_depth,
            p50,
            p99,
            us(point.latency_ns.value_at_quantile(0.999)),
            point.writes_per_second(),
            point.megabytes_per_second(),
            pingpong(0.5),
            p50 / pingpong(0.5).max(1e-9),
            pingpong(0.99),
            p99 / pingpong(0.99).max(1e-9),
            stream,
            point.megabytes_per_second() / stream.max(1e-9),
            lag_max.ops,
            lag_max.bytes as f64 / f64::from(1 << 20),
            if point.failed > 0 { format!("  {} FAILED", point.failed) } else { String::new() }
        );
    }
    if let Some(perftest) = &sweep.perftest {
        let _ = writeln!(
            table,
            "\nperftest on {} in the same run: ib_send_lat {} B (the order message) typical {:.2} us, so {:.1} us a round trip",
            perftest.device,
            crate::perftest::ORDER_MESSAGE_BYTES,
            perftest.order_send_lat.typical_us,
            2.0 * perftest.order_send_lat.typical_us
        );
        let _ = writeln!(
            table,
            "{:<11} {:>8} {:>4} {:>10} {:>18} {:>7} {:>9} {:>16} {:>7} {:>14} {:>7}",
            "mode",
            "bytes",
            "QD",
            "p50 us",
            "2x ib_write_lat us",
            "ratio",
            "MB/s",
            "ib_write_bw MB/s",
            "ratio",
            "order RT p50 us",
            "ratio"
        );
        let send_round_trip = 2.0 * perftest.order_send_lat.typical_us;
        for point in &sweep.points {
            let Some(size) = perftest.of_size(point.write_bytes) else {
                continue;
            };
            let p50 = us(point.latency_ns.value_at_quantile(0.5));
            let round_trip = 2.0 * size.write_lat.typical_us;
            let _ = writeln!(
                table,
                "{:<11} {:>8} {:>4} {:>10.1} {:>18.1} {:>6.2}x {:>9.1} {:>16.1} {:>6.2}x {:>14.1} {:>6.2}x",
                point.mode.name(),
                point.write_bytes,
                point.queue_depth,
                p50,
                round_trip,
                p50 / round_trip.max(1e-9),
                point.megabytes_per_second(),
                size.write_bw_mb_per_s,
                point.megabytes_per_second() / size.write_bw_mb_per_s.max(1e-9),
                us(point.order_round_trip_ns.value_at_quantile(0.5)),
                us(point.order_round_trip_ns.value_at_quantile(0.5)) / send_round_trip.max(1e-9)
            );
        }
    }
    table
}

/// A percentile distribution in HdrHistogram's `.hgrm` text format, values in microseconds.
pub fn hgrm(histogram: &Histogram<u64>) -> String {
    let mut text = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for step in histogram.iter_quantiles(5) {
        total += step.count_since_last_iteration();
        let quantile = step.quantile_iterated_to();
        let inverse = if quantile < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - quantile))
        } else {
            String::new()
        };
        let _ = writeln!(
            text,
            "{:>12.3} {:>14.12} {:>10} {inverse}",
            us(step.value_iterated_to()),
            quantile,
            total
        );
    }
    let _ = writeln!(
        text,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        histogram.mean() / 1000.0,
        histogram.stdev() / 1000.0
    );
    let _ = writeln!(
        text,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        us(histogram.max()),
        histogram.len()
    );
    text
}

/// One series of a line chart.
struct Series {
    name: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#555555"];

/// A line chart as SVG. `x_log` plots log10 of x; ticks are (value, label) in data units.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_log: bool,
    x_ticks: &[(f64, String)],
    series: &[Series],
) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 440.0, 70.0, 170.0, 40.0, 50.0);
    let x_of = |x: f64| if x_log { x.max(1e-12).log10() } else { x };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (mut x_min, mut x_max) = x_ticks
        .iter()
        .map(|(x, _)| x_of(*x))
        .chain(all.iter().map(|(x, _)| x_of(*x)))
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if x_min >= x_max {
        (x_min, x_max) = (x_min - 1.0, x_min + 1.0);
    }
    let y_max = all.iter().map(|(_, y)| *y).fold(0.0, f64::max).max(1e-9) * 1.1;
    let plot_width = width - left - right;
    let plot_height = height - top - bottom;
    let px = |x: f64| left + (x_of(x) - x_min) / (x_max - x_min) * plot_width;
    let py = |y: f64| top + plot_height - y / y_max * plot_height;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        left + plot_width / 2.0
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_width}\" height=\"{plot_height}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for (x, label) in x_ticks {
        let at = px(*x);
        let _ = writeln!(
            svg,
            "<line x1=\"{at:.1}\" y1=\"{top}\" x2=\"{at:.1}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{at:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            top + plot_height,
            top + plot_height + 16.0
        );
    }
    for step in 0..=5 {
        let y = y_max / 1.1 * f64::from(step) / 5.0;
        let at = py(y);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{at:.1}\" x2=\"{}\" y2=\"{at:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_width,
            left - 6.0,
            at + 4.0,
            if y >= 100.0 { format!("{y:.0}") } else { format!("{y:.1}") }
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text><text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">{y_label}</text>",
        left + plot_width / 2.0,
        height - 10.0,
        top + plot_height / 2.0
    );
    for (index, line) in series.iter().enumerate() {
        let points: Vec<String> = line
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if line.dashed {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            line.color,
            points.join(" ")
        );
        let legend_y = top + 14.0 + 18.0 * index as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{}</text>",
            left + plot_width + 10.0,
            left + plot_width + 34.0,
            line.color,
            left + plot_width + 40.0,
            legend_y + 4.0,
            line.name
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The four plots: latency percentile curves per mode (smallest size, QD 1), p50 latency
/// against payload size (QD 1), throughput against payload size (largest QD), and the lag over
/// time (largest size, largest QD).
pub fn plots(sweep: &Sweep) -> Vec<(&'static str, String)> {
    let mut modes: Vec<_> = sweep.points.iter().map(|point| point.mode).collect();
    modes.dedup();
    let mut sizes: Vec<usize> = sweep.points.iter().map(|point| point.write_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let lowest_depth = sweep
        .points
        .iter()
        .map(|p| p.queue_depth)
        .min()
        .unwrap_or(1);
    let highest_depth = sweep
        .points
        .iter()
        .map(|p| p.queue_depth)
        .max()
        .unwrap_or(1);
    let smallest = sizes.first().copied().unwrap_or(4096);
    let find = |mode, size, depth| {
        sweep
            .points
            .iter()
            .find(|p| p.mode == mode && p.write_bytes == size && p.queue_depth == depth)
    };
    let curve = |histogram: &Histogram<u64>| -> Vec<(f64, f64)> {
        histogram
            .iter_quantiles(5)
            .map(|step| (step.quantile_iterated_to(), us(step.value_iterated_to())))
            .filter(|(quantile, _)| *quantile <= 0.99999)
            .map(|(quantile, value)| (1.0 / (1.0 - quantile), value))
            .collect()
    };
    let mut percentile_series: Vec<Series> = modes
        .iter()
        .enumerate()
        .filter_map(|(index, &mode)| {
            find(mode, smallest, lowest_depth).map(|point| Series {
                name: mode.name().into(),
                color: COLORS[index % 3],
                dashed: false,
                points: curve(&point.latency_ns),
            })
        })
        .collect();
    if let Some(baseline) = sweep.baseline(smallest) {
        percentile_series.push(Series {
            name: "TCP ping-pong".into(),
            color: COLORS[3],
            dashed: true,
            points: curve(&baseline.pingpong_ns),
        });
    }
    let percentile_ticks: Vec<(f64, String)> = [
        (1.0, "0%"),
        (10.0, "90%"),
        (100.0, "99%"),
        (1000.0, "99.9%"),
        (10000.0, "99.99%"),
        (100000.0, "99.999%"),
    ]
    .into_iter()
    .map(|(x, label)| (x, label.to_string()))
    .collect();
    let size_ticks: Vec<(f64, String)> = sizes
        .iter()
        .map(|&size| (size as f64, size_label(size)))
        .collect();
    let by_size = |depth: usize, value: &dyn Fn(&crate::sweep::Point) -> f64| -> Vec<Series> {
        modes
            .iter()
            .enumerate()
            .map(|(index, &mode)| Series {
                name: mode.name().into(),
                color: COLORS[index % 3],
                dashed: false,
                points: sizes
                    .iter()
                    .filter_map(|&size| find(mode, size, depth).map(|p| (size as f64, value(p))))
                    .collect(),
            })
            .collect()
    };
    let mut latency_series = by_size(lowest_depth, &|p| us(p.latency_ns.value_at_quantile(0.5)));
    latency_series.push(Series {
        name: "TCP ping-pong".into(),
        color: COLORS[3],
        dashed: true,
        points: sweep
            .baselines
            .iter()
            .map(|b| {
                (
                    b.write_bytes as f64,
                    us(b.pingpong_ns.value_at_quantile(0.5)),
                )
            })
            .collect(),
    });
    let mut throughput_series = by_size(highest_depth, &|p| p.megabytes_per_second());
    throughput_series.push(Series {
        name: "TCP stream".into(),
        color: COLORS[3],
        dashed: true,
        points: sweep
            .baselines
            .iter()
            .map(|b| (b.write_bytes as f64, b.stream_megabytes_per_second))
            .collect(),
    });
    // The recovery point over time where the lag can grow most: the largest payload at the
    // highest queue depth.
    let largest = sizes.last().copied().unwrap_or(4096);
    let lag_series: Vec<Series> = modes
        .iter()
        .enumerate()
        .filter_map(|(index, &mode)| {
            find(mode, largest, highest_depth).map(|point| Series {
                name: mode.name().into(),
                color: COLORS[index % 3],
                dashed: false,
                points: point
                    .lag
                    .iter()
                    .map(|sample| {
                        (
                            sample.at.as_secs_f64(),
                            sample.bytes as f64 / f64::from(1 << 20),
                        )
                    })
                    .collect(),
            })
        })
        .collect();
    let lag_seconds = sweep
        .points
        .iter()
        .flat_map(|point| point.lag.last())
        .map(|sample| sample.at.as_secs_f64())
        .fold(0.0, f64::max);
    let time_ticks: Vec<(f64, String)> = (0..=4)
        .map(|step| {
            let at = lag_seconds * f64::from(step) / 4.0;
            (at, format!("{at:.2}"))
        })
        .collect();
    vec![
        (
            "latency-percentiles.svg",
            line_chart(
                &format!(
                    "Write-ack latency by percentile ({}, QD {lowest_depth})",
                    size_label(smallest)
                ),
                "percentile",
                "latency (us)",
                true,
                &percentile_ticks,
                &percentile_series,
            ),
        ),
        (
            "latency-by-size.svg",
            line_chart(
                &format!("Median write-ack latency by payload size (QD {lowest_depth})"),
                "payload size",
                "p50 latency (us)",
                true,
                &size_ticks,
                &latency_series,
            ),
        ),
        (
            "throughput-by-size.svg",
            line_chart(
                &format!("Throughput by payload size (QD {highest_depth})"),
                "payload size",
                "MB/s",
                true,
                &size_ticks,
                &throughput_series,
            ),
        ),
        (
            "lag-over-time.svg",
            line_chart(
                &format!(
                    "Replication lag over time ({}, QD {highest_depth})",
                    size_label(largest)
                ),
                "seconds into the measurement",
                "lag (MiB not yet in the DR's ring)",
                false,
                &time_ticks,
                &lag_series,
            ),
        ),
    ]
}

/// Writes the JSON, the `.hgrm` files and the plots under `out`; returns what it wrote.
pub fn write_all(sweep: &Sweep, parameters: &str, out: &Path) -> Result<Vec<PathBuf>, String> {
    let hgrm_dir = out.join("hgrm");
    std::fs::create_dir_all(&hgrm_dir)
        .map_err(|error| format!("cannot create {}: {error}", hgrm_dir.display()))?;
    let mut files: Vec<(PathBuf, String)> =
        vec![(out.join("results.json"), json(sweep, parameters))];
    for point in &sweep.points {
        let name = format!(
            "{}-{}B-qd{}.hgrm",
            point.mode.name(),
            point.write_bytes,
            point.queue_depth
        );
        files.push((hgrm_dir.join(name), hgrm(&point.latency_ns)));
    }
    for baseline in &sweep.baselines {
        let name = format!("tcp-pingpong-{}B.hgrm", baseline.write_bytes);
        files.push((hgrm_dir.join(name), hgrm(&baseline.pingpong_ns)));
    }
    for (name, svg) in plots(sweep) {
        files.push((out.join(name), svg));
    }
    for (path, text) in &files {
        std::fs::write(path, text)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    }
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Baseline, LagSample, Point};
    use ordinal_proto::Mode;
    use std::time::Duration;

    fn histogram_of(values_us: &[u64]) -> Histogram<u64> {
        let mut histogram = crate::loopback::histogram();
        for value in values_us {
            histogram.record(value * 1000).unwrap();
        }
        histogram
    }

    /// Lag samples 10 ms apart, (ops, bytes) each.
    fn lag_of(samples: &[(u64, u64)]) -> Vec<LagSample> {
        samples
            .iter()
            .enumerate()
            .map(|(index, &(ops, bytes))| LagSample {
                at: Duration::from_millis(10 * index as u64),
                ops,
                bytes,
            })
            .collect()
    }

    fn sweep() -> Sweep {
        let point = |mode, write_bytes, queue_depth, latency: &[u64]| Point {
            mode,
            write_bytes,
            queue_depth,
            latency_ns: histogram_of(latency),
            order_round_trip_ns: histogram_of(&[60, 60, 72]),
            pingpong_ns: None,
            writes: 1000,
            failed: 0,
            elapsed: Duration::from_secs(1),
            lag: match mode {
                Mode::Sync => lag_of(&[(1, 65536), (1, 65536)]),
                _ => lag_of(&[(2, 131_072), (7, 458_752), (3, 196_608)]),
            },
            lag_interval: Duration::from_millis(10),
            volumes_on_ram: mode == Mode::OrderSync,
        };
        Sweep {
            points: vec![
                point(Mode::OrderSync, 4096, 1, &[100, 120, 140]),
                point(Mode::OrderSync, 65536, 1, &[200, 220, 260]),
                point(Mode::Sync, 4096, 1, &[150, 160, 170]),
                point(Mode::Sync, 65536, 1, &[400, 410, 420]),
            ],
            baselines: vec![
                Baseline {
                    write_bytes: 4096,
                    pingpong_ns: histogram_of(&[50, 60]),
                    stream_megabytes_per_second: 2000.0,
                },
                Baseline {
                    write_bytes: 65536,
                    pingpong_ns: histogram_of(&[80, 90]),
                    stream_megabytes_per_second: 1500.0,
                },
            ],
            perftest: None,
        }
    }

    #[test]
    fn the_json_carries_every_point_with_its_ratios() {
        let json = json(&sweep(), "{\"transport\":\"tcp\"}");
        assert_eq!(json.matches("\"mode\":").count(), 4, "{json}");
        assert!(
            json.contains("\"parameters\":{\"transport\":\"tcp\"}"),
            "{json}"
        );
        // order-sync 4 KiB: p50 120 us over a ping-pong p50 of 50 us.
        // (120 us to 3 significant digits)
        assert!(json.contains("\"p50\":120.1"), "{json}");
        assert!(json.contains("\"p50_over_pingpong_p50\":2.40"), "{json}");
        // And its p99, 140 us, over the ping-pong's p99 of 60 us.
        assert!(json.contains("\"p99_over_pingpong_p99\":2.33"), "{json}");
        // Where each point's volumes were.
        assert_eq!(json.matches("\"volumes\":\"ram\"").count(), 2, "{json}");
        assert_eq!(json.matches("\"volumes\":\"files\"").count(), 2, "{json}");
        assert!(!json.contains("pingpong_interleaved_us"), "{json}");
        // 1000 writes of 4 KiB in a second over a 2000 MB/s stream.
        assert!(json.contains("\"mb_per_s_over_stream\":0.00"), "{json}"); // The lag series of each point, and its largest sample.
        assert!(
            json.contains("\"lag\":{\"interval_ms\":10.0,\"ops_max\":7,\"bytes_max\":458752,\"series\":[[0.0,2,131072],[10.0,7,458752],[20.0,3,196608]]}"),
            "{json}"
        );
    }

    #[test]
    fn a_point_with_its_own_pingpong_is_compared_with_that_one() {
        // The ping-pong measured between the point's writes (80 us, 80.1 in the histogram)
        // replaces the size's baseline (50 us) for that point only.
        let mut sweep = sweep();
        sweep.points[0].pingpong_ns = Some(histogram_of(&[80, 80, 80]));
        let json = json(&sweep, "{}");
        assert!(json.contains("\"p50_over_pingpong_p50\":1.50"), "{json}");
        assert!(
            json.contains("\"pingpong_interleaved_us\":{\"count\":3,\"p50\":80.1"),
            "{json}"
        );
        assert_eq!(json.matches("pingpong_interleaved_us").count(), 1, "{json}");
        // The other 4 KiB point keeps the baseline: 160 / 50.
        assert!(json.contains("\"p50_over_pingpong_p50\":3.20"), "{json}");
        let table = table(&sweep);
        let first = table.lines().nth(1).expect("a row");
        assert!(
            first.contains(" 80.1 ") && first.contains("1.50x"),
            "{table}"
        );
        // Its p99 too: 140 us over the same ping-pong's 80 us.
        assert!(first.contains("1.75x"), "{table}");
    }

    #[test]
    fn a_verbs_run_lists_perftest_and_each_point_ratio_to_it() {
        let mut sweep = sweep();
        sweep.perftest = Some(crate::sweep::PerftestFigures {
            device: "rxe0".into(),
            order_send_lat: crate::perftest::LatencyRow {
                typical_us: 12.0,
                p99_us: 40.0,
            },
            sizes: vec![crate::perftest::PerftestBaseline {
                write_bytes: 4096,
                write_lat: crate::perftest::LatencyRow {
                    typical_us: 20.0,
                    p99_us: 50.0,
                },
                write_bw_mb_per_s: 40.0,
            }],
        });
        let json = json(&sweep, "{}");
        assert!(
            json.contains("\"perftest\":{\"device\":\"rxe0\",\"order_message_bytes\":80,\"ib_send_lat_us\":{\"typical\":12.00,\"p99\":40.00}"),
            "{json}"
        );
        // order-sync 4 KiB: p50 120 us over 2 x 20 us; 1000 writes of 4 KiB a second over 40 MB/s.
        // Its order round trip, p50 60 us, over 2 x ib_send_lat's 12 us.
        assert!(
            json.contains("\"p50_over_2x_ib_write_lat\":3.00,\"mb_per_s_over_ib_write_bw\":0.10,\"order_round_trip_p50_over_2x_ib_send_lat\":2.50}"),
            "{json}"
        );
        // Only the sizes perftest measured get the ratios: two points of 4 KiB.
        assert_eq!(
            json.matches("p50_over_2x_ib_write_lat").count(),
            2,
            "{json}"
        );
        let table = table(&sweep);
        assert!(
            table.contains(
                "ib_send_lat 80 B (the order message) typical 12.00 us, so 24.0 us a round trip"
            ),
            "{table}"
        );
        assert_eq!(table.matches(" 40.0   3.00x").count(), 1, "{table}");
        assert_eq!(table.matches(" 60.0   2.50x").count(), 2, "{table}");
    }

    #[test]
    fn the_largest_lag_is_the_worst_moment_sampled() {
        let sweep = sweep();
        let max = sweep.points[0].lag_max();
        assert_eq!(
            (max.at, max.ops, max.bytes),
            (Duration::from_millis(10), 7, 458_752)
        );
        let table = table(&sweep);
        let order_sync_row = table.lines().nth(1).unwrap();
        assert!(order_sync_row.ends_with(" 7     0.44"), "{table}");
    }

    #[test]
    fn an_hgrm_ends_at_the_whole_count_and_the_maximum() {
        let text = hgrm(&histogram_of(&[10, 20, 30, 40]));
        assert!(text.starts_with("       Value"), "{text}");
        assert!(text.contains("#[Max     =       40.0"), "{text}");
        assert!(text.contains("Total count    =            4]"), "{text}");
        let last_row = text
            .lines()
            .rev()
            .find(|line| !line.starts_with('#'))
            .unwrap();
        let fields: Vec<&str> = last_row.split_whitespace().collect();
        assert_eq!(fields[1..], ["1.000000000000", "4"], "{text}");
    }

    #[test]
    fn each_plot_has_a_line_per_mode_and_one_for_its_baseline() {
        let plots = plots(&sweep());
        assert_eq!(plots.len(), 4);
        for (name, svg) in plots {
            assert!(
                svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
                "{name}"
            );
            // The lag has no baseline: a raw TCP stream replicates nothing.
            let lines = if name == "lag-over-time.svg" { 2 } else { 3 };
            assert_eq!(
                svg.matches("<polyline").count(),
                lines,
                "{name}: order-sync, sync and (but for the lag) the baseline"
            );
            assert!(
                svg.contains(">order-sync<") && svg.contains(">sync<"),
                "{name}"
            );
        }
    }
}
