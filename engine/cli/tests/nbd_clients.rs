//! The NBD export with real clients from Debian's packages (qemu-utils: `qemu-io`, `qemu-img`;
//! libnbd-bin: `nbdinfo`, `nbdcopy`) against real `ordinal` daemons on loopback: patterns written
//! and read back, images copied in and out (nbdcopy over several connections at once), the DR's
//! copy compared byte for byte once it caught up; a client that carries on at the promoted DR
//! after the primary is killed, with the DR's contents checked against the loss report; a fenced
//! primary that answers writes with an error; hostile clients next to a working one.
//!
//! `tools/setup.sh` installs the clients. Without them these tests say loudly that they skip,
//! and fail instead when `ORDINAL_NBD_CLIENTS_REQUIRED` is set (as `.ci/run` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const VOLUME_BYTES: u64 = 32 << 20;
const BLOCK: u64 = 4096;
const CLIENTS: [&str; 4] = ["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"];

fn clients_present() -> bool {
    let missing: Vec<&str> = CLIENTS
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let what = format!(
        "NBD client tools missing: {} (tools/setup.sh installs qemu-utils and libnbd-bin)",
        missing.join(", ")
    );
    assert!(
        std::env::var_os("ORDINAL_NBD_CLIENTS_REQUIRED").is_none(),
        "{what}"
    );
    eprintln!("SKIPPED: {what}");
    false
}

/// A daemon whose stdout lines arrive on a channel; killed when dropped.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    fn start(args: &[String], log: &Path) -> Daemon {
        let log = std::fs::File::create(log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ordinal"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Daemon { child, lines }
    }

    /// The address at the end of the next stdout line containing `what`.
    fn address(&self, what: &str, limit: Duration) -> SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what:?} line within {limit:?}"));
            if line.contains(what) {
                return line.rsplit(' ').next().unwrap().parse().unwrap();
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Aux, DR and primary on loopback with 32 MiB volumes; the DR fails over only when asked.
struct Cluster {
    dir: PathBuf,
    psk: PathBuf,
    primary: Daemon,
    dr: Daemon,
    _aux: Daemon,
    primary_admin: SocketAddr,
    primary_nbd: SocketAddr,
    dr_admin: SocketAddr,
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        Cluster::start_with(name, &[])
    }

    /// [`Cluster::start`] with more flags for the DR.
    fn start_with(name: &str, dr_flags: &[&str]) -> Cluster {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let psk = dir.join("psk");
        std::fs::write(&psk, "correct horse battery staple").unwrap();
        for volume in ["primary.vol", "dr.vol"] {
            let file = std::fs::File::create(dir.join(volume)).unwrap();
            file.set_len(VOLUME_BYTES).unwrap();
        }
        let common = |role: &str| -> Vec<String> {
            let mut args: Vec<String> = vec![role.into(), "--psk-file".into()];
            args.push(psk.display().to_string());
            args.push("--state-dir".into());
            args.push(dir.join(format!("{role}-state")).display().to_string());
            args.extend(
                [
                    "--ring-mib",
                    "8",
                    "--table-slots",
                    "1024",
                    "--listen",
                    "127.0.0.1:0",
                ]
                .map(String::from),
            );
            args
        };
        let aux = Daemon::start(&common("aux"), &dir.join("aux.log"));
        let aux_addr = aux.address("listening on", Duration::from_secs(10));
        let mut dr_args = common("dr");
        dr_args.extend(["--volume".into(), dir.join("dr.vol").display().to_string()]);
        dr_args.extend(["--aux".into(), aux_addr.to_string()]);
        dr_args.extend(["--nbd-listen", "127.0.0.1:0", "--no-auto-failover"].map(String::from));
        dr_args.extend(dr_flags.iter().map(|flag| flag.to_string()));
        let dr = Daemon::start(&dr_args, &dir.join("dr.log"));
        let dr_admin = dr.address("listening on", Duration::from_secs(10));
        let mut primary_args = common("primary");
        primary_args.extend([
            "--volume".into(),
            dir.join("primary.vol").display().to_string(),
        ]);
        primary_args.extend([
            "--dr".into(),
            dr_admin.to_string(),
            "--aux".into(),
            aux_addr.to_string(),
        ]);
        primary_args.extend(["--nbd-listen", "127.0.0.1:0"].map(String::from));
        let primary = Daemon::start(&primary_args, &dir.join("primary.log"));
        let primary_admin = primary.address("listening on", Duration::from_secs(10));
        let primary_nbd = primary.address("serving NBD on", Duration::from_secs(10));
        let cluster = Cluster {
            dir,
            psk,
            primary,
            dr,
            _aux: aux,
            primary_admin,
            primary_nbd,
            dr_admin,
        };
        cluster.wait_for(cluster.primary_admin, "\"dr_link_up\":true");
        cluster.wait_for(cluster.primary_admin, "\"aux_connected\":true");
        cluster
    }

    fn status(&self, node: SocketAddr) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
            .args(["status", "--json", "--node", &node.to_string()])
            .arg("--psk-file")
            .arg(&self.psk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn wait_for(&self, node: SocketAddr, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status(node);
            if status.contains(what) {
                return;
            }
            assert!(Instant::now() < deadline, "never {what}: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails over to the DR and returns the loss report (JSON).
    fn failover(&self) -> String {
        let report = self.dir.join("loss-report.json");
        let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
            .args(["failover", "--dr", &self.dr_admin.to_string()])
            .arg("--psk-file")
            .arg(&self.psk)
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "failover failed: {}",
            text(&output)
        );
        std::fs::read_to_string(report).unwrap()
    }
}

fn number(json: &str, key: &str) -> u64 {
    let pattern = format!("\"{key}\":");
    let at = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pattern.len();
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn url(addr: SocketAddr) -> String {
    format!("nbd://{addr}/ordinal")
}

/// Runs a client tool and returns its output; panics with it unless it exited 0.
fn run(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).output().unwrap();
    let all = text(&output);
    assert!(output.status.success(), "{tool} {args:?} failed:\n{all}");
    all
}

/// `qemu-io` on the export with one `-c` per command; its output.
fn qemu_io(addr: SocketAddr, commands: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".into(), url(addr)];
    for command in commands {
        args.extend(["-c".into(), command.clone()]);
    }
    let output = Command::new("qemu-io").args(&args).output().unwrap();
    text(&output)
}

fn assert_clean(output: &str) {
    assert!(
        !output.contains("failed") && !output.contains("error"),
        "qemu-io reported a failure:\n{output}"
    );
}

/// Waits until the DR applied everything the primary acknowledged, then compares the volumes.
fn assert_dr_identical(cluster: &Cluster) {
    let last_acked = number(&cluster.status(cluster.primary_admin), "last_acked_seq");
    assert!(last_acked > 0, "nothing was written");
    let deadline = Instant::now() + Duration::from_secs(30);
    while number(&cluster.status(cluster.dr_admin), "applied_through") < last_acked {
        assert!(
            Instant::now() < deadline,
            "the DR never applied op {last_acked}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let primary = std::fs::read(cluster.dir.join("primary.vol")).unwrap();
    let dr = std::fs::read(cluster.dir.join("dr.vol")).unwrap();
    let first_difference = primary.iter().zip(&dr).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "the DR's copy differs from the primary's"
    );
}

/// Writes an image of `bytes` pseudo-random bytes (from `seed`) into the export with
/// `qemu-img convert`, copies the whole export back out with `nbdcopy` over four connections,
/// and returns both.
fn image_in_and_out(dir: &Path, addr: SocketAddr, bytes: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let image: Vec<u8> = (0..bytes)
        .map(|i| (i.wrapping_mul(seed) >> 11) as u8)
        .collect();
    let image_path = dir.join("image.raw");
    std::fs::write(&image_path, &image).unwrap();
    let image_arg = image_path.display().to_string();
    let convert = [
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &image_arg,
        &url(addr),
    ];
    run("qemu-img", &convert);
    let out_path = dir.join("out.raw");
    let out_arg = out_path.display().to_string();
    run("nbdcopy", &["--connections=4", &url(addr), &out_arg]);
    (image, std::fs::read(&out_path).unwrap())
}

#[test]
fn real_clients_write_read_and_copy_images_through_the_primary() {
    if !clients_present() {
        return;
    }
    let cluster = Cluster::start("nbd-clients-primary");
    let nbd = cluster.primary_nbd;

    let info = run("nbdinfo", &[&url(nbd)]);
    assert!(
        info.contains(&format!("export-size: {VOLUME_BYTES}")),
        "{info}"
    );
    for flag in [
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "can_flush: true",
    ] {
        assert!(info.contains(flag), "nbdinfo lacks {flag}:\n{info}");
    }
    assert!(info.contains("block_size_minimum: 4096"), "{info}");

    // Patterns, FUA, zeroes, discard and flush, each read back and checked by qemu-io itself.
    let commands = [
        "write -P 0xa5 0 1M",
        "write -z 256k 64k",
        "write -f -P 0x5a 2M 4k",
        "discard 3M 64k",
        "flush",
        "read -P 0xa5 0 256k",
        "read -P 0 256k 64k",
        "read -P 0xa5 320k 704k",
        "read -P 0x5a 2M 4k",
    ]
    .map(String::from);
    let output = qemu_io(nbd, &commands);
    assert_clean(&output);
    assert_eq!(output.matches("wrote ").count(), 3, "{output}");
    assert_eq!(output.matches("read ").count(), 4, "{output}");

    // The export's block size constraints reach the client: qemu turns a write smaller than a
    // block into a read-modify-write of the whole block (the server itself refuses misaligned
    // requests, as the hostile-client test shows).
    let commands = [
        "write -P 0x66 512 512",
        "read -P 0xa5 0 512",
        "read -P 0x66 512 512",
        "read -P 0xa5 1024 3072",
    ]
    .map(String::from);
    assert_clean(&qemu_io(nbd, &commands));

    // An image in with qemu-img, out with nbdcopy (several connections), and the other way.
    let (image, out) = image_in_and_out(&cluster.dir, nbd, 8 << 20, 2_654_435_761);
    let image_path = cluster.dir.join("image.raw");
    let image_arg = image_path.display().to_string();
    let out_path = cluster.dir.join("out.raw");
    let out_arg = out_path.display().to_string();
    assert_eq!(out.len() as u64, VOLUME_BYTES);
    assert!(
        out[..image.len()] == image[..],
        "nbdcopy read back other bytes than qemu-img wrote"
    );

    let reversed: Vec<u8> = image.iter().rev().copied().collect();
    std::fs::write(&image_path, &reversed).unwrap();
    run("nbdcopy", &["--connections=4", &image_arg, &url(nbd)]);
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url(nbd), &out_arg],
    );
    let out = std::fs::read(&out_path).unwrap();
    assert!(
        out[..reversed.len()] == reversed[..],
        "qemu-img read back other bytes than nbdcopy wrote"
    );
    let compared = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &url(nbd), &out_arg],
    );
    assert!(compared.contains("identical"), "{compared}");

    assert_dr_identical(&cluster);

    // `status --watch` on the primary and on the DR: a header and one line per interval.
    for (node, header) in [
        (cluster.primary_admin, "acked/s"),
        (cluster.dr_admin, "applied/s"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
            .args(["status", "--watch", "--count", "3", "--interval-ms", "100"])
            .args(["--node", &node.to_string()])
            .arg("--psk-file")
            .arg(&cluster.psk)
            .output()
            .unwrap();
        let shown = text(&output);
        assert!(output.status.success(), "{shown}");
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 4, "{shown}");
        assert!(lines[0].contains(header), "{shown}");
    }
    let watched = Command::new(env!("CARGO_BIN_EXE_ordinal"))
        .args([
            "status",
            "--watch",
            "--count",
            "1",
            "--node",
            &cluster.primary_admin.to_string(),
        ])
        .arg("--psk-file")
        .arg(&cluster.psk)
        .output()
        .unwrap();
    assert!(
        text(&watched).trim_end().ends_with(" ok"),
        "{}",
        text(&watched)
    );
}

/// Which blocks the "wrote" lines of qemu-io name, in the order it printed them.
fn acknowledged_offsets(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("wrote 4096/4096 bytes at offset "))
        .map(|offset| offset.trim().parse().unwrap())
        .collect()
}

fn pattern_of(block: u64) -> u8 {
    (block % 250) as u8 + 1
}

#[test]
fn a_client_carries_on_at_the_promoted_dr_after_the_primary_is_killed() {
    if !clients_present() {
        return;
    }
    let mut cluster = Cluster::start("nbd-clients-failover");
    // One qemu-io writes block after block, each once, with its own pattern; the primary is
    // killed while it runs.
    const BLOCKS: u64 = 3000;
    let commands: Vec<String> = (0..BLOCKS)
        .map(|block| format!("write -P {} {} 4k", pattern_of(block), block * BLOCK))
        .collect();
    let mut args = vec!["-f".to_string(), "raw".into(), url(cluster.primary_nbd)];
    for command in &commands {
        args.extend(["-c".into(), command.clone()]);
    }
    let mut writer = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(writer.stdout.take().unwrap());
    let mut output = String::new();
    while output.matches("wrote ").count() < 300 {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "qemu-io ended early:\n{output}"
        );
        output.push_str(&line);
    }
    cluster.primary.kill();
    stdout.read_to_string(&mut output).unwrap();
    let _ = writer.wait();
    let acked = acknowledged_offsets(&output);
    assert!(
        acked.len() >= 300 && (acked.len() as u64) < BLOCKS,
        "{} acked",
        acked.len()
    );
    for (index, offset) in acked.iter().enumerate() {
        assert_eq!(
            *offset,
            index as u64 * BLOCK,
            "qemu-io acknowledged out of order"
        );
    }

    let report = cluster.failover();
    let dr_nbd = cluster
        .dr
        .address("serving NBD on", Duration::from_secs(10));
    let lost: Vec<(u64, u64)> = report
        .split("\"volume_offset\":")
        .skip(1)
        .map(|entry| {
            let offset = number(&format!("\"o\":{entry}"), "o");
            (offset, number(entry, "len"))
        })
        .collect();

    // Read the promoted DR through NBD and check each block against what qemu-io was told.
    let copy = cluster.dir.join("dr-copy.raw");
    let copy_arg = copy.display().to_string();
    run("nbdcopy", &[&url(dr_nbd), &copy_arg]);
    let copy = std::fs::read(&copy).unwrap();
    let mut present = 0;
    for block in 0..BLOCKS {
        let bytes = &copy[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
        let has_pattern = bytes.iter().all(|&b| b == pattern_of(block));
        let zero = bytes.iter().all(|&b| b == 0);
        assert!(
            has_pattern || zero,
            "block {block} holds neither its pattern nor zeroes"
        );
        let offset = block * BLOCK;
        let listed_lost = lost
            .iter()
            .any(|&(at, len)| at <= offset && offset < at + len);
        let acknowledged = (block as usize) < acked.len();
        if acknowledged && !listed_lost {
            assert!(
                has_pattern,
                "acknowledged block {block} is missing and not in the loss report"
            );
        }
        if listed_lost {
            assert!(zero, "block {block} is listed as lost but was applied");
        }
        // I1: what the DR holds is a prefix of the order the writes were made in.
        if has_pattern {
            assert_eq!(present, block, "block {block} applied after a hole");
            present += 1;
        }
    }
    assert!(present >= 1, "the DR holds nothing");

    // The client carries on at the DR: write, flush, read back; an image in and out.
    let commands = ["write -P 0x77 16M 1M", "flush", "read -P 0x77 16M 1M"].map(String::from);
    assert_clean(&qemu_io(dr_nbd, &commands));
    let (image, out) = image_in_and_out(&cluster.dir, dr_nbd, 4 << 20, 40_503);
    assert!(
        out[..image.len()] == image[..],
        "the promoted DR gave back other bytes than it took"
    );
    assert!(
        out[16 << 20..17 << 20].iter().all(|&b| b == 0x77),
        "the image copy disturbed other blocks"
    );
    let info = run("nbdinfo", &[&url(dr_nbd)]);
    assert!(
        info.contains(&format!("export-size: {VOLUME_BYTES}")),
        "{info}"
    );
}

#[test]
fn a_fenced_primary_answers_writes_with_an_error() {
    if !clients_present() {
        return;
    }
    let cluster = Cluster::start("nbd-clients-fenced");
    assert_clean(&qemu_io(
        cluster.primary_nbd,
        &["write -P 0x11 0 64k".to_string()],
    ));
    // The primary is alive: the failover fences it through the aux and the DR's epoch.
    let _report = cluster.failover();
    cluster.wait_for(cluster.primary_admin, "Fenced");
    let output = qemu_io(cluster.primary_nbd, &["write -P 0x22 0 64k".to_string()]);
    assert!(
        output.contains("write failed"),
        "a fenced primary took a write:\n{output}"
    );
    let dr_nbd = cluster
        .dr
        .address("serving NBD on", Duration::from_secs(10));
    assert_clean(&qemu_io(dr_nbd, &["read -P 0x11 0 64k".to_string()]));
}

/// Bytes of an NBD request header.
fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut bytes = 0x2560_9513u32.to_be_bytes().to_vec();
    bytes.extend(0u16.to_be_bytes());
    bytes.extend(kind.to_be_bytes());
    bytes.extend(handle.to_be_bytes());
    bytes.extend(offset.to_be_bytes());
    bytes.extend(len.to_be_bytes());
    bytes
}

/// A raw client through the handshake (fixed newstyle, NBD_OPT_EXPORT_NAME, no zeroes).
fn raw_client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    let mut option = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    option.extend(1u32.to_be_bytes());
    option.extend(7u32.to_be_bytes());
    option.extend(b"ordinal");
    stream.write_all(&option).unwrap();
    let mut export = [0u8; 10];
    stream.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        VOLUME_BYTES
    );
    stream
}

#[test]
fn hostile_clients_are_cut_off_while_a_real_client_carries_on() {
    if !clients_present() {
        return;
    }
    let cluster = Cluster::start("nbd-clients-hostile");
    let nbd = cluster.primary_nbd;
    // Garbage instead of a handshake.
    let mut garbage = TcpStream::connect(nbd).unwrap();
    let _ = garbage.write_all(&[0xff; 64]);
    // A client that vanishes in the middle of a write's payload.
    let mut vanishing = raw_client(nbd);
    vanishing.write_all(&request(1, 7, 0, 64 << 10)).unwrap();
    vanishing.write_all(&[0x33; 1000]).unwrap();
    drop(vanishing);
    // A client whose requests are out of range, misaligned, unknown or oversized gets error
    // replies.
    let mut wrong = raw_client(nbd);
    let requests = [
        request(0, 1, VOLUME_BYTES, 4096),
        request(0, 2, 100, 4096),
        request(42, 3, 0, 0),
        // A READ longer than the largest payload (1 MiB).
        request(0, 6, 0, 64 << 20),
    ];
    for (index, bytes) in requests.iter().enumerate() {
        wrong.write_all(bytes).unwrap();
        let mut reply = [0u8; 16];
        wrong.read_exact(&mut reply).unwrap();
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        assert_eq!(error, 22, "request {index} was not refused with EINVAL");
    }
    // A request after DISC is never answered: the server closes.
    wrong.write_all(&request(2, 4, 0, 0)).unwrap();
    wrong.write_all(&request(0, 5, 0, 4096)).unwrap();
    let mut rest = Vec::new();
    let _ = wrong.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the server answered after DISC");

    // Meanwhile a real client's writes and reads are untouched, and the vanished client's
    // half write changed nothing.
    let commands = [
        "write -P 0x42 1M 1M",
        "read -P 0x42 1M 1M",
        "read -P 0 0 64k",
    ]
    .map(String::from);
    assert_clean(&qemu_io(nbd, &commands));
    assert!(cluster
        .status(cluster.primary_admin)
        .contains("\"stopped\":\"\""));
    assert_dr_identical(&cluster);
}

/// The most memory the process ever had resident (`VmHWM`), in MiB.
fn peak_resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib >> 10
}

#[test]
fn a_client_that_pipelines_reads_and_reads_no_replies_cannot_make_the_primary_hold_them_all() {
    if !clients_present() {
        return;
    }
    let cluster = Cluster::start("nbd-clients-pipelined-reads");
    let before = peak_resident_mib(cluster.primary.child.id());
    // 384 READs of 1 MiB sent at once, and no reply read for two seconds: without a bound the
    // primary would hold all 384 MiB of replies (several copies of them, measured: 686 MiB at
    // its peak); with 64 MiB per connection in flight it stops reading requests instead.
    const REQUESTS: u64 = 384;
    let mut client = raw_client(cluster.primary_nbd);
    for handle in 0..REQUESTS {
        let offset = (handle % 32) << 20;
        client
            .write_all(&request(0, handle, offset, 1 << 20))
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut data = vec![0u8; 1 << 20];
    for _ in 0..REQUESTS {
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
            0,
            "a READ failed"
        );
        client.read_exact(&mut data).unwrap();
    }
    let grown = peak_resident_mib(cluster.primary.child.id()) - before;
    assert!(
        grown < 320,
        "the primary's peak resident memory grew by {grown} MiB"
    );
}

#[test]
fn ordinal_bench_measures_a_running_primary_through_nbd_with_writes_pipelined() {
    // Checks that `ordinal bench --nbd` writes the asked number of writes per size and queue
    // depth through the primary's NBD export, pipelining up to the depth on one connection,
    // and that every one of them reached the primary and was acknowledged.
    let cluster = Cluster::start("bench-nbd");
    let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
        .args(["bench", "--nbd", &cluster.primary_nbd.to_string()])
        .args([
            "--sizes",
            "4096,65536",
            "--queue-depths",
            "1,8",
            "--writes",
            "40",
        ])
        .output()
        .unwrap();
    let stdout = text(&output);
    assert!(output.status.success(), "{stdout}");
    for line in [
        "nbd 4096 B QD 1: 40 writes",
        "nbd 4096 B QD 8: 40 writes",
        "nbd 65536 B QD 1: 40 writes",
        "nbd 65536 B QD 8: 40 writes",
    ] {
        assert!(stdout.contains(line), "{line} missing from: {stdout}");
    }
    let status = cluster.status(cluster.primary_admin);
    assert_eq!(number(&status, "acked"), 160, "{status}");
    // Without `--durable-order-log` the DR leaves its log to the page cache.
    let dr_status = writes_then_dr_status(&cluster, 40, false);
    assert_eq!(number(&dr_status, "order_log_syncs"), 0, "{dr_status}");
}

/// Writes `writes` 4 KiB blocks, one at a time, through the primary's NBD export, checks that
/// the primary acknowledged all it has been sent so far, and returns the DR's status after
/// checking that it says whether its order log is `durable`.
fn writes_then_dr_status(cluster: &Cluster, writes: u64, durable: bool) -> String {
    let acked_before = number(&cluster.status(cluster.primary_admin), "acked");
    let output = Command::new(env!("CARGO_BIN_EXE_ordinal"))
        .args(["bench", "--nbd", &cluster.primary_nbd.to_string()])
        .args(["--sizes", "4096", "--queue-depths", "1"])
        .args(["--writes", &writes.to_string()])
        .output()
        .unwrap();
    let stdout = text(&output);
    assert!(output.status.success(), "{stdout}");
    let status = cluster.status(cluster.primary_admin);
    assert_eq!(number(&status, "acked"), acked_before + writes, "{status}");
    let dr_status = cluster.status(cluster.dr_admin);
    let said = format!("\"durable_order_log\":{durable}");
    assert!(dr_status.contains(&said), "{dr_status}");
    dr_status
}

#[test]
fn a_dr_with_a_durable_order_log_syncs_it_before_each_acknowledgement() {
    // Checks that `ordinal dr --durable-order-log` syncs its order log before it answers: with
    // one write in flight, each write's order batch is answered on its own, so 40 writes take at
    // least 40 syncs; and that the writes are acknowledged as usual meanwhile. (The test above
    // checks that a DR without the flag never syncs.)
    let cluster = Cluster::start_with("durable-log", &["--durable-order-log"]);
    let dr_status = writes_then_dr_status(&cluster, 40, true);
    let syncs = number(&dr_status, "order_log_syncs");
    assert!(syncs >= 40, "{syncs} syncs for 40 writes: {dr_status}");
    // A promotion is synced too, before the DR reports it.
    let mut cluster = cluster;
    cluster.primary.kill();
    let report = cluster.failover();
    assert!(report.contains("\"lost\""), "{report}");
    let promoted = cluster.status(cluster.dr_admin);
    assert!(
        number(&promoted, "order_log_syncs") > syncs,
        "no sync for the promotion: {promoted}"
    );
}
