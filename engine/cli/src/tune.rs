//! `ordinal tune`: searches the primary's knobs for the link at hand and prints the best
//! configuration with its figures, next to the defaults measured in the same run.
//!
//! Each trial is one `ordinal bench` point (one mode, one size, one queue depth) in a child
//! process of its own, so that no trial inherits the threads, memory or ring of the one before.
//! The search goes one knob at a time (queue depth, order batch size, order batches in flight,
//! payload writes in flight, ring size, and on verbs the inline size), keeping the others at
//! their best so far. A single trial on a shared machine varies by several per cent from run
//! to run, so a value replaces the best only if it beats it by `--margin-percent`; and at the
//! end the defaults and the winner are measured again, alternately, `--confirm` times each, and
//! their runs of median throughput are compared: the figures printed last are those.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;

use crate::node::TransportArgs;

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// The mode to tune for.
    #[arg(long, default_value = "order-sync")]
    pub mode: String,
    /// Payload size in bytes (a multiple of 512, up to 1 MiB).
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Queue depths to try (writes kept in flight; comma-separated, 1 to 256).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub queue_depths: Vec<usize>,
    /// What to maximise: throughput (writes/s), or, with --p99-max-us, throughput among the
    /// configurations whose p99 write-ack latency stays within that bound.
    #[arg(long, value_name = "US")]
    pub p99_max_us: Option<f64>,
    /// Measured milliseconds per trial.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(200..))]
    pub point_ms: u64,
    /// A value replaces the best so far only if it is better by this much.
    #[arg(long, default_value_t = 5.0)]
    pub margin_percent: f64,
    /// Alternate measurements of the defaults and of the winner at the end, each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub confirm: u64,
    /// Where the volumes live during the trials (tmpfs by default, so the disk is not measured).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub link: TransportArgs,
}

/// One configuration: every knob the search moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Knobs {
    queue_depth: usize,
    order_batch_records: usize,
    order_batches_inflight: usize,
    payload_writes_inflight: u64,
    ring_mib: u64,
    inline_max_bytes: u32,
}

impl Knobs {
    fn flags(&self) -> Vec<String> {
        vec![
            format!("--order-batch-records={}", self.order_batch_records),
            format!("--order-batches-inflight={}", self.order_batches_inflight),
            format!("--payload-writes-inflight={}", self.payload_writes_inflight),
            format!("--ring-mib={}", self.ring_mib),
            format!("--inline-max-bytes={}", self.inline_max_bytes),
        ]
    }

    fn describe(&self) -> String {
        format!(
            "QD {:>3}, batch {:>3}, batches {:>2}, payloads {:>4}, ring {:>4} MiB, inline {:>4}",
            self.queue_depth,
            self.order_batch_records,
            self.order_batches_inflight,
            self.payload_writes_inflight,
            self.ring_mib,
            self.inline_max_bytes
        )
    }
}

/// What one trial measured.
#[derive(Clone, Copy, Debug)]
struct Figures {
    writes_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// The knobs the search moves, in the order it moves them, with the values it tries.
fn candidates(knob: &str, args: &TuneArgs, verbs: bool) -> Vec<u64> {
    match knob {
        "queue depth" => args
            .queue_depths
            .iter()
            .map(|&depth| depth as u64)
            .collect(),
        "order batch size" => vec![1, 8, 16, 64, 256],
        "order batches in flight" => vec![1, 2, 4, 8, 32],
        "payload writes in flight" => vec![8, 16, 64, 256],
        // At least two of the largest write (64 KiB or the size, whichever is larger).
        "ring MiB" => {
            let floor = ordinal_bench::loopback::ring_mib_min_for(args.size);
            [16, 64, 256]
                .into_iter()
                .filter(|&mib| mib >= floor)
                .collect()
        }
        "inline bytes" if verbs => vec![0, 64, 256],
        _ => Vec::new(),
    }
}

fn set(knobs: &mut Knobs, knob: &str, value: u64) {
    match knob {
        "queue depth" => knobs.queue_depth = value as usize,
        "order batch size" => knobs.order_batch_records = value as usize,
        "order batches in flight" => knobs.order_batches_inflight = value as usize,
        "payload writes in flight" => knobs.payload_writes_inflight = value,
        "ring MiB" => knobs.ring_mib = value,
        "inline bytes" => knobs.inline_max_bytes = value as u32,
        _ => unreachable!("unknown knob {knob}"),
    }
}

/// Whether `candidate` beats `best` by the margin, under the objective.
fn better(candidate: &Figures, best: &Figures, args: &TuneArgs) -> bool {
    let within = |figures: &Figures| args.p99_max_us.is_none_or(|max| figures.p99_us <= max);
    match (within(candidate), within(best)) {
        (true, false) => true,
        (false, true) => false,
        // Neither meets the bound: the lower p99 is nearer to meeting it.
        (false, false) => candidate.p99_us < best.p99_us * (1.0 - args.margin_percent / 100.0),
        (true, true) => {
            candidate.writes_per_s > best.writes_per_s * (1.0 + args.margin_percent / 100.0)
        }
    }
}

/// The number after `"key":` at or after `from` in `json`.
fn number_after(json: &str, from: usize, key: &str) -> Option<(f64, usize)> {
    let pattern = format!("\"{key}\":");
    let at = from + json[from..].find(&pattern)? + pattern.len();
    let end = json[at..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .map_or(json.len(), |length| at + length);
    Some((json[at..end].parse().ok()?, end))
}

/// The figures of the one point of an `ordinal bench` results file.
fn parse_point(json: &str) -> Result<Figures, String> {
    let bad = || String::from("results.json has no measured point");
    let points = json.find("\"points\":[").ok_or_else(bad)?;
    let (failed, _) = number_after(json, points, "failed").ok_or_else(bad)?;
    if failed > 0.0 {
        return Err(format!("{failed} writes failed during the trial"));
    }
    let (writes_per_s, _) = number_after(json, points, "writes_per_s").ok_or_else(bad)?;
    let latency = points + json[points..].find("\"latency_us\":").ok_or_else(bad)?;
    let (p50_us, _) = number_after(json, latency, "p50").ok_or_else(bad)?;
    let (p99_us, _) = number_after(json, latency, "p99").ok_or_else(bad)?;
    Ok(Figures {
        writes_per_s,
        p50_us,
        p99_us,
    })
}

/// Runs one trial: `ordinal bench` with `knobs`, one point, in a child process.
fn trial(args: &TuneArgs, knobs: &Knobs, out: &Path) -> Result<Figures, String> {
    let exe = std::env::current_exe().map_err(|error| format!("cannot find ordinal: {error}"))?;
    let output = Command::new(exe)
        .arg("bench")
        .arg(format!("--modes={}", args.mode))
        .arg(format!("--sizes={}", args.size))
        .arg(format!("--queue-depths={}", knobs.queue_depth))
        .arg(format!("--point-ms={}", args.point_ms))
        .arg("--out")
        .arg(out)
        .arg("--dir")
        .arg(&args.dir)
        .arg(format!("--transport={}", args.link.transport))
        .arg(format!("--device={}", args.link.device))
        .arg(format!("--poll-spin-us={}", args.link.poll_spin_us))
        .args(knobs.flags())
        .output()
        .map_err(|error| format!("cannot run ordinal bench: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "ordinal bench failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    let path = out.join("results.json");
    let json = std::fs::read_to_string(&path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    parse_point(&json)
}

fn line(figures: &Figures) -> String {
    format!(
        "{:>9.0} writes/s  p50 {:>8.1} us  p99 {:>8.1} us",
        figures.writes_per_s, figures.p50_us, figures.p99_us
    )
}

/// The run of median throughput, whole: medians taken figure by figure could pair one run's
/// throughput with another's latency.
fn median_run(runs: &[Figures]) -> Figures {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.writes_per_s.total_cmp(&b.writes_per_s));
    sorted[(sorted.len() - 1) / 2]
}

pub fn run(args: TuneArgs) -> Result<ExitCode, String> {
    if ordinal_proto::Mode::parse(&args.mode).is_none() {
        return Err(format!(
            "unknown mode {:?}: use order-sync, sync or async",
            args.mode
        ));
    }
    if args.size == 0 || args.size % 512 != 0 || args.size > 1 << 20 {
        return Err("--size must be a multiple of 512, at most 1 MiB".into());
    }
    if args.queue_depths.is_empty() || args.queue_depths.iter().any(|d| !(1..=256).contains(d)) {
        return Err("--queue-depths: from 1 to 256".into());
    }
    args.link.choice()?;
    let verbs = args.link.transport == "verbs";
    let defaults = ordinal_runtime::primary::Tuning::default();
    let default_knobs = Knobs {
        queue_depth: *args.queue_depths.iter().max().expect("not empty"),
        order_batch_records: defaults.order_batch_records_max,
        order_batches_inflight: defaults.order_batches_inflight_max,
        payload_writes_inflight: defaults.payload_writes_inflight_max,
        ring_mib: (ordinal_bench::loopback::RING_BYTES_DEFAULT >> 20)
            .max(ordinal_bench::loopback::ring_mib_min_for(args.size)),
        inline_max_bytes: ordinal_runtime::link::INLINE_MAX_BYTES_DEFAULT,
    };
    let scratch = std::env::temp_dir().join(format!("ordinal-tune-{}", std::process::id()));
    let mut trials = 0u32;
    let mut measure = |knobs: &Knobs| -> Result<Figures, String> {
        trials += 1;
        let out = scratch.join(format!("trial-{trials}"));
        let figures = trial(&args, knobs, &out);
        let _ = std::fs::remove_dir_all(&out);
        figures
    };
    println!(
        "ordinal tune: {} transport, {} mode, {}-byte writes, {} ms per trial; objective: {}",
        args.link.transport,
        args.mode,
        args.size,
        args.point_ms,
        match args.p99_max_us {
            Some(max) => format!("most writes/s with p99 <= {max} us"),
            None => "most writes/s".into(),
        }
    );
    let mut best_knobs = default_knobs;
    let mut best = measure(&best_knobs)?;
    println!("  start     {}  {}", best_knobs.describe(), line(&best));
    for knob in [
        "queue depth",
        "order batch size",
        "order batches in flight",
        "payload writes in flight",
        "ring MiB",
        "inline bytes",
    ] {
        for value in candidates(knob, &args, verbs) {
            let mut knobs = best_knobs;
            set(&mut knobs, knob, value);
            if knobs == best_knobs {
                continue;
            }
            match measure(&knobs) {
                Ok(figures) => {
                    let wins = better(&figures, &best, &args);
                    println!(
                        "  {}  {}  {}",
                        if wins { "better" } else { "      " },
                        knobs.describe(),
                        line(&figures)
                    );
                    if wins {
                        best_knobs = knobs;
                        best = figures;
                    }
                }
                Err(error) => println!("  failed    {}  {error}", knobs.describe()),
            }
        }
    }
    // The search compared single trials; measure the two contenders alternately.
    let (mut at_default, mut at_best) = (Vec::new(), Vec::new());
    for _ in 0..args.confirm {
        at_default.push(measure(&default_knobs)?);
        if best_knobs != default_knobs {
            at_best.push(measure(&best_knobs)?);
        }
    }
    let default_figures = median_run(&at_default);
    let best_figures = if at_best.is_empty() {
        default_figures
    } else {
        median_run(&at_best)
    };
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "\nthe run of median throughput of {} alternate runs each:\n  defaults  {}  {}\n  best      {}  {}\n  ratio     {:.2}x writes/s, {:.2}x p99",
        args.confirm,
        default_knobs.describe(),
        line(&default_figures),
        best_knobs.describe(),
        line(&best_figures),
        best_figures.writes_per_s / default_figures.writes_per_s,
        best_figures.p99_us / default_figures.p99_us,
    );
    if best_knobs == default_knobs {
        println!(
            "\nbest configuration ({trials} trials): the defaults, with {} writes in flight",
            best_knobs.queue_depth
        );
    } else if better(&best_figures, &default_figures, &args) {
        let mut flags = best_knobs.flags();
        if !verbs {
            flags.retain(|flag| !flag.starts_with("--inline-max-bytes"));
        }
        println!(
            "\nbest configuration ({} trials): keep {} writes in flight and start the primary with\n  {}\n(--ring-mib goes to every node of the group)",
            trials,
            best_knobs.queue_depth,
            flags.join(" ")
        );
    } else {
        println!(
            "\nthe winner of the search did not beat the defaults by {}% when measured again: keep the defaults ({} writes in flight)",
            args.margin_percent, default_knobs.queue_depth
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_point_of_a_bench_results_file() {
        let json = r#"{"parameters":{"sizes":[4096]},"baselines":[{"write_bytes":4096,"pingpong_us":{"p50":69.2,"p99":101.0}}],"points":[{"mode":"order-sync","write_bytes":4096,"queue_depth":8,"writes":34580,"failed":0,"seconds":1.000,"writes_per_s":34579,"mb_per_s":17.7,"latency_us":{"count":34580,"p50":215.3,"p90":346.9,"p99":533.0,"p99_9":1313.8}}]}"#;
        let figures = parse_point(json).expect("parses");
        assert_eq!(figures.writes_per_s, 34579.0);
        assert_eq!(figures.p50_us, 215.3);
        assert_eq!(figures.p99_us, 533.0);
        let failed = json.replace("\"failed\":0", "\"failed\":3");
        assert!(parse_point(&failed)
            .unwrap_err()
            .contains("3 writes failed"));
        assert!(parse_point("{}").is_err());
    }

    #[test]
    fn a_value_wins_only_by_the_margin_and_within_the_latency_bound() {
        let args = TuneArgs {
            mode: "order-sync".into(),
            size: 4096,
            queue_depths: vec![1],
            p99_max_us: Some(1000.0),
            point_ms: 1000,
            margin_percent: 5.0,
            confirm: 1,
            dir: PathBuf::from("/dev/shm"),
            link: TransportArgs {
                transport: "tcp".into(),
                device: "rxe0".into(),
                poll_spin_us: 50,
                inline_max_bytes: 256,
            },
        };
        let figures = |writes_per_s, p99_us| Figures {
            writes_per_s,
            p50_us: 1.0,
            p99_us,
        };
        let best = figures(1000.0, 500.0);
        assert!(
            !better(&figures(1040.0, 500.0), &best, &args),
            "within the margin"
        );
        assert!(better(&figures(1060.0, 500.0), &best, &args));
        assert!(
            !better(&figures(5000.0, 1500.0), &best, &args),
            "breaks the bound"
        );
        assert!(better(
            &figures(10.0, 900.0),
            &figures(5000.0, 1500.0),
            &args
        ));
    }
}
