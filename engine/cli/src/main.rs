//! `ordinal`: the command-line entry point.
//!
//! Today it offers `ordinal sim`, the seeded fault simulator that anyone can run to re-check a
//! build: every seed is a whole primary/DR/aux run with injected faults, ending in a failover
//! whose outcome is checked against the invariants I1-I6.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod sim;

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
    /// Run the deterministic fault simulator over many seeds and check I1-I6 after every failover.
    Sim(sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => sim::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ordinal: {error}");
            ExitCode::from(2)
        }
    }
}
