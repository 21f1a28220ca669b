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
    // Refused before connecting: a depth of 0 would wait for replies to writes never sent.
    let (code, _, stderr) = ordinal(&["bench", "--nbd", "127.0.0.1:9", "--queue-depths", "0"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("queue depth 0: from 1 to 256"), "{stderr}");
    // Sizes that would overflow when turned into bytes are refused by the parser: 2^44 + 64
    // MiB once wrapped silently to a 64 MiB ring.
    let (code, _, stderr) = ordinal(&[
        "aux",
        "--psk-file",
        "/nonexistent",
        "--ring-mib",
        "17592186044480",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is not in 1..=1048576"), "{stderr}");
    let (code, _, stderr) = ordinal(&[
        "dr",
        "--psk-file",
        "/nonexistent",
        "--max-write-kib",
        "4194304",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is not in 1..=65536"), "{stderr}");
    // The watch's interval is added to a clock reading each line, which an unbounded one
    // would overflow (a panic): refused by the parser past a day.
    let (code, _, stderr) = ordinal(&[
        "status",
        "--node",
        "127.0.0.1:9",
        "--psk-file",
        "/nonexistent",
        "--watch",
        "--interval-ms",
        "100000000000",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is not in 50..=86400000"), "{stderr}");
    // A setting of the degrade policy without it: refused before the volume is opened.
    let psk = std::env::temp_dir().join(format!("ordinal-cli-psk-{}", std::process::id()));
    std::fs::write(&psk, "0123456789abcdef0123456789abcdef").expect("psk");
    let (code, _, stderr) = ordinal(&[
        "primary",
        "--psk-file",
        &psk.to_string_lossy(),
        "--volume",
        "/nonexistent",
        "--dr",
        "127.0.0.1:9",
        "--aux",
        "127.0.0.1:9",
        "--degrade-after-ms",
        "100",
    ]);
    let _ = std::fs::remove_file(&psk);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--degrade-after-ms needs --on-link-loss degrade"),
        "{stderr}"
    );
    let (code, stdout, _) = ordinal(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("sim"), "{stdout}");
}

/// A config file's settings reach the command (here the key file and the node address of
/// `status`), the command line wins over it, and a typo in it is refused by name.
#[test]
fn a_config_file_gives_flags_and_its_typos_are_named() {
    let dir = std::env::temp_dir().join(format!("ordinal-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let psk = dir.join("psk");
    std::fs::write(&psk, "0123456789abcdef0123456789abcdef").expect("psk");
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let config = dir.join("ordinal.toml");
    std::fs::write(
        &config,
        format!(
            "psk-file = '{}'\n[status]\nnode = '127.0.0.1:{port}'\n",
            psk.display()
        ),
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();

    // Without the file, --psk-file is missing; with it, status gets as far as connecting.
    let (code, _, stderr) = ordinal(&["status"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--psk-file"), "{stderr}");
    let (code, _, stderr) = ordinal(&["status", "--config", &config]);
    assert_ne!(code, 0);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    // The command line wins.
    let (code, _, stderr) = ordinal(&["status", "--config", &config, "--node", "127.0.0.1:9"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    assert!(!stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");

    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[aux]\nheartbeat-timeout = 500\n").expect("config");
    let (code, _, stderr) = ordinal(&["aux", "--config", &typo.to_string_lossy()]);
    assert_eq!(code, 2);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("[aux] has no setting `heartbeat-timeout`"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example config in tools/ names only settings the commands have.
#[test]
fn the_example_config_is_accepted_by_every_command() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tools/ordinal.example.toml"
    );
    for command in ["primary", "dr", "aux", "failover", "status"] {
        let (code, _, stderr) = ordinal(&[command, "--config", example, "--help"]);
        assert_eq!(code, 0, "{command}: {stderr}");
    }
}

/// `ordinal bench` runs the DR and the aux of the system it measures as processes of their own,
/// as deployed roles run (in one process, each park of one role's executor interrupted the
/// others; see `FarRole` in the bench crate), and ends them when it is done.
#[test]
fn ordinal_bench_runs_the_far_roles_as_processes_and_ends_them() {
    let out = std::env::temp_dir().join(format!("ordinal-bench-roles-{}", std::process::id()));
    let out_text = out.display().to_string();
    let args = [
        "bench",
        "--modes",
        "order-sync",
        "--sizes",
        "4096",
        "--queue-depths",
        "1",
        "--point-ms",
        "300",
        "--out",
        &out_text,
    ];
    let (code, stdout, stderr) = ordinal(&args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(out.join("results.json").exists(), "{stdout}");
    let role_pids: Vec<u32> = stderr
        .lines()
        .filter_map(|line| {
            let (_, pid) = line.split_once(": running as process ")?;
            pid.trim().parse().ok()
        })
        .collect();
    assert_eq!(role_pids.len(), 2, "a DR and an aux process: {stderr}");
    assert!(
        stderr.contains("benchmark role ordinal-dr: running as process"),
        "{stderr}"
    );
    assert!(
        stderr.contains("benchmark role ordinal-aux: running as process"),
        "{stderr}"
    );
    // The DR and the aux share a CPU; order-sync acknowledgements wait for the DR only, so
    // the aux yields to it.
    assert!(
        stderr.contains("benchmark role ordinal-aux: nice 19 (the order-sync acknowledgements"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("benchmark role ordinal-dr: nice"),
        "{stderr}"
    );
    for pid in role_pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "role process {pid} outlived the bench"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
