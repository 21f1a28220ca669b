//! The `ordinal` command as users run it: exit codes and what it prints.

use std::process::Command;

fn ordinal(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
        .args(args)
        .output()
        .expect("ordinal runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A soak that holds exits 0 and says which invariants held.
#[test]
fn a_passing_soak_exits_zero_and_says_so() {
    let (code, stdout, _) = ordinal(&["sim", "--seeds", "300", "--threads", "2"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("300 seeds in"), "{stdout}");
    assert!(stdout.contains("all invariants held"), "{stdout}");
}

/// One seed with --trace prints its parameters and its steps.
#[test]
fn one_seed_replays_with_a_trace() {
    let (code, stdout, _) = ordinal(&["sim", "--seed", "12946", "--trace"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.starts_with("parameters: Params { seed: 12946"),
        "{stdout}"
    );
    assert!(stdout.contains("failover report: {"), "{stdout}");
    assert!(
        stdout.contains("seed 12946: all invariants held"),
        "{stdout}"
    );
}

/// Bad arguments get a clear message and a non-zero exit, not a panic.
#[test]
fn bad_arguments_are_refused_clearly() {
    let (code, _, stderr) = ordinal(&["sim", "--seeds", "0"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid value '0' for '--seeds"),
        "{stderr}"
    );
    let (code, _, stderr) = ordinal(&["sim", "--trace"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--seed"), "{stderr}");
    let (code, stdout, _) = ordinal(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("sim"), "{stdout}");
}
