//! The daemons (`ordinal primary|dr|aux`) and the operator commands (`failover`, `status`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ordinal_proto::{Geometry, LinkLossPolicy, Mode};
use ordinal_runtime::aux::{run_aux, AuxOptions};
use ordinal_runtime::dr::{run_dr, DrOptions};
use ordinal_runtime::link::TransportChoice;
use ordinal_runtime::primary::{run_primary, PrimaryOptions};

/// Settings every node of one replicated volume must share.
#[derive(Args, Debug, Clone)]
pub struct Shared {
    /// Read settings from this TOML file (keys are these flags' names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// File holding the pre-shared key of this replication group (at least 16 bytes).
    #[arg(long)]
    pub psk_file: PathBuf,
    /// Directory for this node's state files (DR order log and staging ring, aux table).
    #[arg(long, default_value = "ordinal-state")]
    pub state_dir: PathBuf,
    /// Size of the DR's staging ring in MiB: how much payload may be in flight or unapplied
    /// (1 MiB to 1 TiB; the primary and the DR each hold it in memory).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub ring_mib: u64,
    /// Slots of the status table (a power of two): how many ops may be in flight at once.
    #[arg(long, default_value_t = 4096)]
    pub table_slots: u32,
    /// Sector size in bytes: writes are aligned to it (at least the volume's direct-I/O alignment).
    #[arg(long, default_value_t = 4096)]
    pub sector_bytes: u32,
    /// Largest single write in KiB (up to 65536: 64 MiB).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_write_kib: u32,
    /// Epoch of the replication stream (raised by each failover).
    #[arg(long, default_value_t = 1)]
    pub epoch: u32,
    /// Pin this daemon's executor to this CPU (default: not pinned).
    #[arg(long)]
    pub cpu: Option<usize>,
    #[command(flatten)]
    pub link: TransportArgs,
}

/// The primary's knobs for its link (`ordinal primary`'s, `ordinal bench`'s and `ordinal
/// tune`'s flags).
#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// Most order records in one SEND to the DR (1 to 256). Under load, orders that wait
    /// while a batch is in flight go together in the next one.
    #[arg(long, default_value_t = ordinal_proto::primary::ORDER_BATCH_RECORDS_DEFAULT)]
    pub order_batch_records: usize,
    /// Order batches sent to the DR and not yet acknowledged (1 to 64). Fewer means larger
    /// batches on a long link.
    #[arg(long, default_value_t = ordinal_proto::primary::ORDER_BATCHES_INFLIGHT_DEFAULT)]
    pub order_batches_inflight: usize,
    /// Payload writes into the DR's staging ring posted and not yet completed (1 to 4096).
    #[arg(long, default_value_t = ordinal_proto::primary::PAYLOAD_WRITES_INFLIGHT_DEFAULT)]
    pub payload_writes_inflight: u64,
}

impl TuningArgs {
    pub fn tuning(&self) -> Result<ordinal_runtime::primary::Tuning, String> {
        let tuning = ordinal_runtime::primary::Tuning {
            order_batch_records_max: self.order_batch_records,
            order_batches_inflight_max: self.order_batches_inflight,
            payload_writes_inflight_max: self.payload_writes_inflight,
        };
        tuning.validate()?;
        Ok(tuning)
    }
}

/// How queue pairs reach the peers (the daemons' and `ordinal bench`'s flags).
#[derive(Args, Debug, Clone)]
pub struct TransportArgs {
    /// How queue pairs reach the peers: tcp (RDMA semantics over TCP; no hardware needed) or
    /// verbs (RC queue pairs on the RDMA device --device). Every node of a group uses the same.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// RDMA device for --transport verbs (see `ibv_devices`; soft-RoCE's is rxe0).
    #[arg(long, default_value = "rxe0")]
    pub device: String,
    /// With --transport verbs: how long a queue pair keeps polling after its last completion
    /// before it sleeps (µs). Longer saves a wake-up per message at the cost of CPU.
    #[arg(long, default_value_t = 50)]
    pub poll_spin_us: u64,
    /// With --transport verbs: largest work request posted inline (bytes; the device may grant
    /// less). Inline saves the NIC a read of the payload for small messages (order batches,
    /// status-table writes).
    #[arg(long, default_value_t = ordinal_runtime::link::INLINE_MAX_BYTES_DEFAULT,
          value_parser = clap::value_parser!(u32).range(..=4096))]
    pub inline_max_bytes: u32,
}

impl TransportArgs {
    pub fn choice(&self) -> Result<TransportChoice, String> {
        TransportChoice::parse(
            &self.transport,
            &self.device,
            Duration::from_micros(self.poll_spin_us),
            self.inline_max_bytes,
        )
    }
}

impl Shared {
    fn transport(&self) -> Result<TransportChoice, String> {
        self.link.choice()
    }

    fn psk(&self) -> Result<Vec<u8>, String> {
        ordinal_runtime::read_psk(&self.psk_file)
    }

    fn geometry(&self, volume_bytes: u64) -> Result<Geometry, String> {
        let geometry = Geometry {
            volume_bytes,
            sector_bytes: self.sector_bytes,
            ring_bytes: self.ring_mib << 20,
            table_slots: self.table_slots,
            payload_bytes_max: self.max_write_kib << 10,
        };
        geometry
            .validate()
            .map_err(|error| format!("invalid settings: {error}"))?;
        Ok(geometry)
    }
}

#[derive(Args, Debug)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub shared: Shared,
    /// The volume to serve and replicate (file or block device).
    #[arg(long)]
    pub volume: PathBuf,
    /// Address of the DR daemon.
    #[arg(long)]
    pub dr: SocketAddr,
    /// Address of the aux daemon.
    #[arg(long)]
    pub aux: SocketAddr,
    /// Where operator requests (status) are served.
    #[arg(long, default_value = "127.0.0.1:7410")]
    pub listen: SocketAddr,
    /// Where the NBD export is served.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// When a write is acknowledged: order-sync (its order is at the DR), sync (its data is
    /// applied at the DR) or async (its status is on the aux).
    #[arg(long, default_value = "order-sync")]
    pub mode: String,
    /// When the DR link is down: block writes, or degrade (acknowledge, report as degraded).
    #[arg(long, default_value = "block")]
    pub on_link_loss: String,
    /// With --on-link-loss degrade: degrade as soon as the DR leaves an order batch unanswered
    /// this long, instead of only once its link is declared down (5 s of silence over TCP).
    /// The most a slow or silent link holds a write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub degrade_after_ms: Option<u64>,
    /// Heartbeat interval to the aux in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub heartbeat_ms: u64,
    /// How long after a confirmed heartbeat writes may still be acknowledged; keep it at most
    /// half the aux's heartbeat timeout.
    #[arg(long, default_value_t = 400)]
    pub lease_ms: u64,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Args, Debug)]
pub struct DrArgs {
    #[command(flatten)]
    pub shared: Shared,
    /// The DR copy of the volume (same size as the primary's).
    #[arg(long)]
    pub volume: PathBuf,
    /// Where the primary and operators connect.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,
    /// Address of the aux daemon (needed to recover in-flight writes at failover).
    #[arg(long)]
    pub aux: Option<SocketAddr>,
    /// Do not fail over by itself when the aux reports the primary lost.
    #[arg(long)]
    pub no_auto_failover: bool,
    /// Once promoted by a failover, serve the volume over NBD here (read-write); nothing is
    /// served before.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub nbd_listen: SocketAddr,
    /// Hold each apply to the volume back this long (ms), for testing the failover path: with
    /// applies held back (16 at a time), verified payloads wait in the staging ring and a
    /// failover must apply them from there. The primary slows to the DR's apply rate once the
    /// ring or the status table is full. A failover's own applies are not held.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=60_000))]
    pub apply_delay_ms: u64,
    /// Sync the order log to its device before acknowledging order records, so that an
    /// acknowledged record survives a power loss of the DR machine (DRBD's protocol C for the
    /// order record). Without it the DR acknowledges once the record is in the page cache,
    /// which survives the DR process being killed but not its machine losing power.
    #[arg(long)]
    pub durable_order_log: bool,
}

#[derive(Args, Debug)]
pub struct AuxArgs {
    #[command(flatten)]
    pub shared: Shared,
    /// Where the primary and the DR connect.
    #[arg(long, default_value = "127.0.0.1:7430")]
    pub listen: SocketAddr,
    /// The primary is declared dead when its heartbeat has not advanced for this long (ms); a
    /// primary that connected and has not written its first heartbeat yet gets ten times as long.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_timeout_ms: u64,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Read settings from this TOML file (keys are these flags' names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the DR daemon.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub dr: SocketAddr,
    #[arg(long)]
    pub psk_file: PathBuf,
    /// Fail over even if the aux cannot be reached (in-flight writes are then neither recovered
    /// nor listed).
    #[arg(long)]
    pub without_aux: bool,
    /// Also write the loss report (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Read settings from this TOML file (keys are these flags' names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of any ordinal daemon.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub node: SocketAddr,
    #[arg(long)]
    pub psk_file: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep asking and print one line per interval: rates, lag, ring fill, ack latency (primary),
    /// apply progress (DR), heartbeat (aux). Ctrl-C ends it.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// With --watch: milliseconds between lines (50 to 86,400,000, a day).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=86_400_000))]
    pub interval_ms: u64,
    /// With --watch: stop after this many lines (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

fn run_on_executor<F, Fut>(name: &str, cpu: Option<usize>, body: F) -> Result<ExitCode, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let placement = match cpu {
        Some(cpu) => glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu)),
        None => glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound),
    };
    let executor = placement
        .name(name)
        .make()
        .map_err(|error| format!("cannot start the io_uring executor: {error}"))?;
    executor.run(async move { body().await })?;
    Ok(ExitCode::SUCCESS)
}

pub fn primary(args: PrimaryArgs) -> Result<ExitCode, String> {
    let psk = args.shared.psk()?;
    let mode = Mode::parse(&args.mode).ok_or_else(|| {
        format!(
            "unknown mode {:?}: use order-sync, sync or async",
            args.mode
        )
    })?;
    let link_loss_policy = match args.on_link_loss.as_str() {
        "block" => LinkLossPolicy::Block,
        "degrade" => LinkLossPolicy::Degrade,
        other => {
            return Err(format!(
                "unknown link-loss policy {other:?}: use block or degrade"
            ))
        }
    };
    if args.degrade_after_ms.is_some() && link_loss_policy != LinkLossPolicy::Degrade {
        return Err("--degrade-after-ms needs --on-link-loss degrade".into());
    }
    let volume_bytes = ordinal_runtime::storage::device_size_bytes(&args.volume)?;
    let geometry = args.shared.geometry(volume_bytes)?;
    let options = PrimaryOptions {
        listen: args.listen,
        volume: args.volume,
        psk,
        geometry,
        mode,
        link_loss_policy,
        degrade_after: args.degrade_after_ms.map(Duration::from_millis),
        epoch: args.shared.epoch,
        dr: args.dr,
        aux: args.aux,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        lease: Duration::from_millis(args.lease_ms),
        local_writes_inflight_max: 64,
        transport: args.shared.transport()?,
        tuning: args.tuning.tuning()?,
    };
    let nbd_listen = args.nbd_listen;
    run_on_executor("ordinal-primary", args.shared.cpu, move || async move {
        run_primary(options, move |handle| {
            let export = ordinal_runtime::nbd::Export::Primary(handle);
            glommio::spawn_local(async move {
                if let Err(error) = ordinal_runtime::nbd::serve(nbd_listen, export).await {
                    eprintln!("primary: {error}");
                    std::process::exit(2);
                }
            })
            .detach();
        })
        .await
    })
}

pub fn dr(args: DrArgs) -> Result<ExitCode, String> {
    let psk = args.shared.psk()?;
    let volume_bytes = ordinal_runtime::storage::device_size_bytes(&args.volume)?;
    let options = DrOptions {
        listen: args.listen,
        state_dir: args.shared.state_dir.clone(),
        volume: args.volume,
        psk,
        geometry: args.shared.geometry(volume_bytes)?,
        epoch: args.shared.epoch,
        aux: args.aux,
        auto_failover: !args.no_auto_failover,
        applies_inflight_max: 16,
        transport: args.shared.transport()?,
        nbd_listen: Some(args.nbd_listen),
        apply_delay: std::time::Duration::from_millis(args.apply_delay_ms),
        durable_order_log: args.durable_order_log,
    };
    run_on_executor("ordinal-dr", args.shared.cpu, move || run_dr(options))
}

pub fn aux(args: AuxArgs) -> Result<ExitCode, String> {
    let psk = args.shared.psk()?;
    // The aux holds only the status table; the volume size does not concern it.
    let geometry = args.shared.geometry(u64::from(args.shared.sector_bytes))?;
    let options = AuxOptions {
        listen: args.listen,
        state_dir: args.shared.state_dir.clone(),
        psk,
        geometry,
        epoch: args.shared.epoch,
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        transport: args.shared.transport()?,
    };
    run_on_executor("ordinal-aux", args.shared.cpu, move || run_aux(options))
}

pub fn failover(args: FailoverArgs) -> Result<ExitCode, String> {
    let psk = ordinal_runtime::read_psk(&args.psk_file)?;
    let request = if args.without_aux {
        "failover without-aux"
    } else {
        "failover"
    };
    let report = ordinal_runtime::admin::request(
        args.dr,
        &psk,
        request,
        Duration::from_secs(args.timeout_s),
    )?;
    if report.contains("\"error\"") {
        return Err(format!("the DR refused: {report}"));
    }
    if let Some(path) = &args.report {
        std::fs::write(path, &report)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    }
    let summary = crate::report::LossSummary::parse(&report)?;
    println!("{}", summary.human());
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

pub fn status(args: StatusArgs) -> Result<ExitCode, String> {
    let psk = ordinal_runtime::read_psk(&args.psk_file)?;
    if args.watch {
        return crate::watch::run(
            args.node,
            &psk,
            Duration::from_millis(args.interval_ms),
            args.count,
        );
    }
    let answer =
        ordinal_runtime::admin::request(args.node, &psk, "status", Duration::from_secs(5))?;
    if args.json {
        println!("{answer}");
    } else {
        // One "key: value" line per field, in the order the daemon gave them.
        let body = answer.trim().trim_start_matches('{').trim_end_matches('}');
        for field in body.split(',') {
            if let Some((key, value)) = field.split_once(':') {
                println!("{:<22} {}", key.trim_matches('"'), value.trim_matches('"'));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
