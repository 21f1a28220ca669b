//! `wan-link`: an emulated long-distance link between two network namespaces (see
//! `ordinal_bench::wan_link` for the model and why it exists). It creates a TUN device of the
//! given name in each namespace, carries every packet between them through a delay and a rate
//! limit per direction, and runs until SIGINT or SIGTERM, then prints what it carried. The
//! devices vanish with the process; their addresses and routes are the caller's (tools/wan.sh).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use ordinal_bench::wan_link::{LinkConfig, LinkCounters, LinkModel, Nanos};

#[derive(Parser, Debug)]
#[command(
    name = "wan-link",
    about = "Carries IP packets between a TUN device in each of two network namespaces with a delay, a rate limit and strict priority for DSCP EF, as a WAN link would (tools/wan.sh uses it)"
)]
struct Args {
    /// Network namespace of the near end (as `ip netns` names it).
    #[arg(long)]
    near_netns: String,
    /// Network namespace of the far end.
    #[arg(long)]
    far_netns: String,
    /// Name of the TUN device created in each namespace.
    #[arg(long, default_value = "wan0")]
    device: String,
    /// Delay each way, in milliseconds (0 to 10,000); the round trip is twice this.
    #[arg(long, default_value_t = 5.0)]
    delay_ms: f64,
    /// Rate of each direction, in Mbit/s (1 to 100,000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate_mbit: u64,
    /// Queue of each direction, in KiB (16 to 1,048,576): a packet that finds it full is dropped.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    queue_kib: u64,
    /// One FIFO queue for everything instead of strict priority for DSCP EF.
    #[arg(long)]
    fifo: bool,
}

/// Packets read from one device per pass at most, so that a flood one way cannot starve the
/// other direction's deliveries.
const READS_PER_PASS_MAX: usize = 64;

/// The longest the loop sleeps with nothing due, so that a stop request is seen promptly.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Room for any packet a TUN device hands over (its MTU is 1,500 unless raised; 64 KiB covers
/// any IPv4 packet).
const PACKET_BYTES_MAX: usize = 1 << 16;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

fn main() {
    let args = Args::parse();
    if !(0.0..=10_000.0).contains(&args.delay_ms) {
        eprintln!("wan-link: --delay-ms must be between 0 and 10000");
        std::process::exit(2);
    }
    if args.device.is_empty() || args.device.len() > 15 {
        eprintln!("wan-link: --device must be 1 to 15 characters (a Linux interface name)");
        std::process::exit(2);
    }
    match run(&args) {
        Ok(()) => {}
        Err(error) => {
            eprintln!("wan-link: {error}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let config = LinkConfig {
        one_way_delay_ns: (args.delay_ms * 1e6) as Nanos,
        rate_bits_per_s: args.rate_mbit * 1_000_000,
        queue_bytes_max: (args.queue_kib as usize) << 10,
        honour_dscp: !args.fifo,
    };
    let mut near = tun_in_netns(&args.near_netns, &args.device)?;
    let mut far = tun_in_netns(&args.far_netns, &args.device)?;
    // SAFETY: installing a handler that only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
        // Sleeps end within a microsecond of their deadline rather than the default 50 us: a
        // packet's delay is only as exact as the wake-up that delivers it.
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    println!(
        "wan-link: ready: {} in {} <-> {} in {}, {} ms each way, {} Mbit/s, {} KiB queues, {}",
        args.device,
        args.near_netns,
        args.device,
        args.far_netns,
        args.delay_ms,
        args.rate_mbit,
        args.queue_kib,
        if args.fifo {
            "one FIFO queue"
        } else {
            "strict priority for DSCP EF"
        }
    );
    let _ = std::io::stdout().flush();

    let mut outbound = LinkModel::new(config);
    let mut inbound = LinkModel::new(config);
    let mut lost_on_delivery = [0u64; 2];
    let started = Instant::now();
    let now = || started.elapsed().as_nanos() as Nanos;
    let mut buffer = vec![0u8; PACKET_BYTES_MAX];
    while !STOP.load(Ordering::Acquire) {
        let due = [outbound.next_event_at(), inbound.next_event_at()]
            .into_iter()
            .flatten()
            .min();
        let wait = match due {
            Some(at) => Duration::from_nanos(at.saturating_sub(now())).min(IDLE_WAIT),
            None => IDLE_WAIT,
        };
        wait_readable(&[&near, &far], wait)?;
        for (from, model) in [(&mut near, &mut outbound), (&mut far, &mut inbound)] {
            for _ in 0..READS_PER_PASS_MAX {
                match from.read(&mut buffer) {
                    Ok(0) => break,
                    // A drop for a full queue is the link's behaviour, counted by the model.
                    Ok(read) => _ = model.offer(now(), buffer[..read].to_vec()),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == ErrorKind::Interrupted => break,
                    Err(error) => return Err(format!("reading a TUN device: {error}")),
                }
            }
        }
        let at = now();
        for (index, (model, to)) in [(&mut outbound, &mut far), (&mut inbound, &mut near)]
            .into_iter()
            .enumerate()
        {
            model.advance(at);
            for packet in model.take_delivered(at) {
                // The far stack refusing a packet (its backlog full) loses it, as a NIC would.
                if to.write(&packet).is_err() {
                    lost_on_delivery[index] += 1;
                }
            }
        }
    }
    report("near -> far", outbound.counters(), lost_on_delivery[0]);
    report("far -> near", inbound.counters(), lost_on_delivery[1]);
    Ok(())
}

fn report(direction: &str, counters: LinkCounters, lost_on_delivery: u64) {
    println!(
        "wan-link: {direction}: {} packets ({:.1} MiB) carried, {} of them expedited; {} dropped at a full queue, {} refused by the receiving stack",
        counters.delivered_packets,
        counters.delivered_bytes as f64 / (1u64 << 20) as f64,
        counters.expedited_packets,
        counters.dropped_packets,
        lost_on_delivery
    );
}

/// Creates a TUN device named `name` in the network namespace `netns` and returns its file,
/// non-blocking. The calling thread enters the namespace for the creation (a TUN device is made
/// in the namespace of the thread that opens `/dev/net/tun`) and returns to its own after,
/// whether or not the creation worked.
fn tun_in_netns(netns: &str, name: &str) -> Result<File, String> {
    let own = File::open("/proc/thread-self/ns/net")
        .map_err(|error| format!("cannot open this thread's network namespace: {error}"))?;
    let target = File::open(format!("/var/run/netns/{netns}")).map_err(|error| {
        format!("no network namespace {netns:?} (ip netns add {netns}): {error}")
    })?;
    enter_netns(&target).map_err(|error| format!("cannot enter {netns:?}: {error}"))?;
    let created = create_tun(name);
    enter_netns(&own).map_err(|error| format!("cannot return from {netns:?}: {error}"))?;
    created.map_err(|error| format!("cannot create TUN device {name:?} in {netns:?}: {error}"))
}

fn enter_netns(namespace: &File) -> std::io::Result<()> {
    // SAFETY: setns on a namespace file we hold open; it changes only this thread's namespace.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, and the rest of the union.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<InterfaceRequest>() == 40);

fn create_tun(name: &str) -> std::io::Result<File> {
    let path = c"/dev/net/tun";
    // SAFETY: open with a NUL-terminated path; the descriptor is owned by the File made below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut request = InterfaceRequest {
        name: [0; 16],
        // A layer-3 device with no packet-information prefix: each read is one IP packet.
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _union_rest: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is laid out as and
    // outlives the call.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut request as *mut InterfaceRequest) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits until either file is readable or `wait` has passed (or a signal came).
fn wait_readable(files: &[&File; 2], wait: Duration) -> Result<(), String> {
    let mut fds = files.map(|file| libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let timeout = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ppoll reads two pollfd entries and a timespec that live across the call.
    let result = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &timeout, std::ptr::null()) };
    if result < 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() != ErrorKind::Interrupted {
            return Err(format!("waiting for packets: {error}"));
        }
    }
    Ok(())
}
