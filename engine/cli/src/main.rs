//! `ordinal`: the command-line entry point.
//!
//! The daemons (`primary`, `dr`, `aux`), the operator commands (`failover`, `status`), the
//! one-command `demo` of a whole system on this machine, and `sim`, the seeded fault simulator
//! that re-checks the protocol's invariants I1-I6 over many crash schedules.

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod bench;
mod config;
mod demo;
mod drive;
mod node;
mod relay;
mod report;
mod sim;
mod tune;
mod watch;

#[derive(Parser, Debug)]
#[command(
    name = "ordinal",
    version,
    about = "Replication engine for disaster recovery of block volumes: synchronous order, asynchronous data."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a volume and replicate it to the DR (NBD export, operator requests).
    Primary(node::PrimaryArgs),
    /// Hold the DR copy: receive orders and payloads, apply them, fail over when asked.
    Dr(node::DrArgs),
    /// Hold the primary's status table next to it and watch its heartbeat.
    Aux(node::AuxArgs),
    /// On the DR: fence the primary, recover from the aux's table, promote, print the loss report.
    Failover(node::FailoverArgs),
    /// Show a daemon's role, epoch, progress, lag and peers.
    Status(node::StatusArgs),
    /// Start aux, DR and primary on loopback, write through NBD, kill -9 a node mid-flight, fail
    /// over and verify the DR volume byte for byte.
    Demo(demo::DemoArgs),
    /// Write through a running primary's NBD export until it dies, then check the DR's failover
    /// (I1, I3-I6 on the DR's volume): the demo's checks for nodes on other machines.
    Drive(drive::DriveArgs),
    /// Run the deterministic fault simulator over many seeds and check I1-I6 after every failover.
    Sim(sim::SimArgs),
    /// Measure write-ack latency and throughput of a whole system in this process, swept over
    /// mode, payload size and queue depth, next to raw TCP baselines; writes JSON and plots.
    Bench(bench::BenchArgs),
    /// Search the primary's knobs (queue depth, order batching, payload writes in flight, ring
    /// size, inline size) on this link, one `ordinal bench` trial per configuration, and print
    /// the best next to the defaults measured in the same run.
    Tune(tune::TuneArgs),
}

fn main() -> ExitCode {
    // `ordinal bench` (and `ordinal tune`, through it) runs the DR and the aux of each system it
    // measures as this program started again; such a process runs its role here and exits.
    ordinal_bench::loopback::serve_role_if_asked();
    let args = match config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(args) => args,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ordinal: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Sim(args) => sim::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Primary(args) => node::primary(args),
        Command::Dr(args) => node::dr(args),
        Command::Aux(args) => node::aux(args),
        Command::Failover(args) => node::failover(args),
        Command::Status(args) => node::status(args),
        Command::Demo(args) => demo::run(args),
        Command::Drive(args) => drive::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ordinal: {error}");
            ExitCode::from(2)
        }
    }
}
