//! `ordinal sim`: soak the simulator over N seeds, or replay one seed with a trace.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use ordinal_proto::Mutations;
use ordinal_sim::{replay_seed, soak};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Run only this seed (and print its trace if it fails, or always with --trace).
    #[arg(long)]
    seed: Option<u64>,
    /// First seed of the soak.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Worker threads (default: one per available core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the step-by-step trace of `--seed` even when it passes.
    #[arg(long, requires = "seed")]
    trace: bool,
}

/// Lines of trace printed for a failing seed in a soak; `--seed S --trace` prints all of it.
const TRACE_TAIL_LINES: usize = 120;

pub fn run(args: SimArgs) -> Result<ExitCode, String> {
    let mut out = std::io::stdout().lock();
    if let Some(seed) = args.seed {
        let (verdict, params, trace) = replay_seed(seed, Mutations::NONE);
        if args.trace || !verdict.holds() {
            writeln!(out, "parameters: {params:?}").map_err(|e| e.to_string())?;
            for line in &trace {
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
        }
        return report_one(&mut out, seed, &verdict);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    writeln!(
        out,
        "ordinal sim: seeds {}..{} on {threads} threads",
        args.first,
        args.first + args.seeds
    )
    .map_err(|e| e.to_string())?;
    // Workers print progress themselves, so stdout must not stay locked while they run.
    drop(out);
    let progress = |done: u64| {
        if done % 100_000 == 0 {
            println!("  {done} seeds checked");
        }
    };
    let summary = soak(args.first, args.seeds, threads, Mutations::NONE, &progress);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} seeds in {:.1} s ({:.0} seeds/s): {} writes admitted, {} acknowledged and applied, {} acknowledged and reported lost, {} recovered from the ring at failover",
        summary.seeds,
        summary.elapsed.as_secs_f64(),
        summary.seeds_per_second(),
        summary.admitted,
        summary.acked_applied,
        summary.acked_reported_lost,
        summary.applied_from_ring
    )
    .map_err(|e| e.to_string())?;
    writeln!(out, "what the seeds went through:").map_err(|e| e.to_string())?;
    for (name, count) in summary.coverage.rows() {
        writeln!(out, "  {count:>10}  {name}").map_err(|e| e.to_string())?;
    }
    match summary.failure {
        None => {
            writeln!(out, "all invariants held (I1 prefix, I2 completeness, I3 integrity, I4 exact loss report, I5 fencing, I6 sync order)").map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Some((seed, _)) => {
            let (verdict, params, trace) = replay_seed(seed, Mutations::NONE);
            writeln!(out, "FAILED at seed {seed}; parameters: {params:?}")
                .map_err(|e| e.to_string())?;
            let skip = trace.len().saturating_sub(TRACE_TAIL_LINES);
            if skip > 0 {
                writeln!(
                    out,
                    "... {skip} earlier steps (ordinal sim --seed {seed} --trace prints them all)"
                )
                .map_err(|e| e.to_string())?;
            }
            for line in &trace[skip..] {
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            report_one(&mut out, seed, &verdict)
        }
    }
}

fn report_one(
    out: &mut impl Write,
    seed: u64,
    verdict: &ordinal_sim::Verdict,
) -> Result<ExitCode, String> {
    let write =
        |out: &mut dyn Write, text: String| writeln!(out, "{text}").map_err(|e| e.to_string());
    write(
        out,
        format!(
            "seed {seed}: {} admitted, {} acknowledged and applied, {} acknowledged and reported lost, cut at seq {}, {} recovered from the ring",
            verdict.admitted, verdict.acked_applied, verdict.acked_reported_lost, verdict.cut, verdict.applied_from_ring
        ),
    )?;
    if verdict.holds() {
        write(out, format!("seed {seed}: all invariants held"))?;
        return Ok(ExitCode::SUCCESS);
    }
    for violation in &verdict.violations {
        write(out, format!("seed {seed}: VIOLATION {violation}"))?;
    }
    write(out, format!("replay: ordinal sim --seed {seed} --trace"))?;
    Ok(ExitCode::FAILURE)
}
