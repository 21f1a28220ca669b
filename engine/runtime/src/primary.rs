//! The primary daemon: serves the volume, writes locally with direct I/O, sends order batches
//! to the DR (SEND, acked), writes payloads into the DR's staging ring (one-sided WRITE with
//! immediate, in FIFO order) and its status entries and heartbeat into the aux's table
//! (one-sided WRITEs), and answers clients as the protocol's mode allows.
//!
//! Clients reach it through [`PrimaryHandle`] (the embeddable API, which the NBD export uses).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;
use ordinal_proto::primary::{
    AuxWriteTag, Primary, PrimaryAction, PrimaryConfig, PrimaryStop, WriteRefused,
};
use ordinal_proto::wire::{Refusal, RefusalReason};
use ordinal_proto::{Epoch, Geometry, LinkLossPolicy, Mode, Seq};

use crate::admin::{self, ConnectError, Input};
use crate::control::{NodeInfo, Purpose, Role};
use crate::link::{PreparedQp, Transport, TransportChoice};
use crate::storage::{OrderedWrites, Volume, WriteJob};
use crate::timeline::{WriteTimeline, WriteTimelines};
use crate::transport::{Opcode, QueuePair, RegionDescriptor, TransportEvent, WorkStatus};
use crate::Sender;

#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// Operator requests (status) are served here.
    pub listen: SocketAddr,
    pub volume: PathBuf,
    pub psk: Vec<u8>,
    pub geometry: Geometry,
    pub mode: Mode,
    pub link_loss_policy: LinkLossPolicy,
    /// With the degrade policy: degrade as soon as the DR leaves an order batch unanswered this
    /// long, not only once its link is declared down (`PrimaryConfig::degrade_after_ns`).
    pub degrade_after: Option<Duration>,
    pub epoch: Epoch,
    pub dr: SocketAddr,
    pub aux: SocketAddr,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    /// Local volume writes in flight at once.
    pub local_writes_inflight_max: usize,
    pub transport: TransportChoice,
    pub tuning: Tuning,
}

/// The primary's knobs for the link at hand (`ordinal tune` searches them); the defaults are
/// [`PrimaryConfig::new`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Most order records in one SEND (1 to 256).
    pub order_batch_records_max: usize,
    /// Order batches sent and not yet acknowledged (1 to 64; the DR keeps 256 receives posted).
    pub order_batches_inflight_max: usize,
    /// Payload WRITEs posted and not yet completed (1 to 4096).
    pub payload_writes_inflight_max: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        use ordinal_proto::primary as defaults;
        Tuning {
            order_batch_records_max: defaults::ORDER_BATCH_RECORDS_DEFAULT,
            order_batches_inflight_max: defaults::ORDER_BATCHES_INFLIGHT_DEFAULT,
            payload_writes_inflight_max: defaults::PAYLOAD_WRITES_INFLIGHT_DEFAULT,
        }
    }
}

impl Tuning {
    /// Order batches in flight at most: the DR posts `verbs::RECV_DEPTH_DEFAULT` (256)
    /// receives per queue pair, and each batch in flight may hold one of them.
    pub const ORDER_BATCHES_INFLIGHT_MAX: usize = 64;
    /// Payload writes in flight at most: each is a work request on the data queue pair, whose
    /// send queue holds `transport::SEND_QUEUE_DEPTH`.
    pub const PAYLOAD_WRITES_INFLIGHT_MAX: u64 = crate::transport::SEND_QUEUE_DEPTH as u64;

    pub fn validate(&self) -> Result<(), String> {
        let in_range = |name: &str, value: u64, max: u64| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(format!("{name} must be 1 to {max}, not {value}"))
            }
        };
        in_range(
            "the order batch size",
            self.order_batch_records_max as u64,
            ordinal_proto::wire::ORDER_BATCH_RECORDS_MAX as u64,
        )?;
        in_range(
            "the order batches in flight",
            self.order_batches_inflight_max as u64,
            Self::ORDER_BATCHES_INFLIGHT_MAX as u64,
        )?;
        in_range(
            "the payload writes in flight",
            self.payload_writes_inflight_max,
            Self::PAYLOAD_WRITES_INFLIGHT_MAX,
        )
    }
}

/// How a client write ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Acknowledged as op `seq`; `degraded` if the DR did not hold its order at that moment.
    Acked { seq: Seq, degraded: bool },
    /// Not acknowledged; the reason. The write may or may not survive a failover.
    Failed(String),
}

/// Local events of the primary loop.
#[derive(Debug)]
pub enum PrimaryEvent {
    ClientWrite {
        volume_offset: u64,
        data: Vec<u8>,
        reply: Sender<WriteOutcome>,
    },
    LocalWriteDone {
        seq: Seq,
        result: Result<(), String>,
    },
    DrConnected {
        order: PreparedQp,
        data: PreparedQp,
        ring: RegionDescriptor,
    },
    AuxConnected {
        qp: PreparedQp,
        table: RegionDescriptor,
    },
    /// The DR refused our connection because it has fenced our epoch (it failed over).
    DrFenced { epoch: Epoch, why: String },
    /// The aux refused our connection because it has fenced our epoch.
    AuxFenced { why: String },
    /// Answer once every write acknowledged so far has its order held by the DR (see
    /// [`PrimaryHandle::flush`]).
    Flush { reply: Sender<Result<(), String>> },
}

/// How the primary's log line begins when it degrades because the DR's answer is overdue
/// (`PrimaryOptions::degrade_after`); `ordinal demo` looks for it.
pub const LOG_DEGRADED_ON_LATE_ANSWER: &str = "primary: the DR left an order batch unanswered";

/// What an embedder sees of a running primary ([`PrimaryHandle::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryStatus {
    pub epoch: Epoch,
    pub mode: Mode,
    /// The newest op acknowledged to a client.
    pub last_acked_seq: Seq,
    /// The DR holds the order records of every op up to here.
    pub order_acked_through: Seq,
    /// The DR has applied every op up to here to its volume.
    pub dr_applied_through: Seq,
    /// Ops and bytes admitted whose payload has not reached the DR's ring yet.
    pub lag_ops: u64,
    pub lag_bytes: u64,
    pub dr_link_up: bool,
    /// Writes are acknowledged without the DR: the degrade policy, with the DR link down or
    /// (`PrimaryOptions::degrade_after`) the DR's answer overdue.
    pub degraded: bool,
    pub aux_connected: bool,
    /// Set for good once the primary stops taking writes. `FencedByAux` and `FencedByDr` mean
    /// that a failover took the volume over: the DR is now the primary.
    pub stopped: Option<PrimaryStop>,
}

/// A change worth telling an embedder about ([`PrimaryHandle::subscribe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryNotice {
    DrLinkUp,
    /// Writes now block or are acknowledged degraded, as `--on-link-loss` says.
    DrLinkDown,
    AuxUp,
    AuxDown,
    /// The primary stopped for good (fenced by a failover, or a fault); writes fail from now on.
    Stopped(PrimaryStop),
}

/// Subscribers at once; more are refused.
const SUBSCRIBERS_MAX: usize = 64;
/// Notices queued per subscriber; a subscriber that falls further behind misses notices (the
/// current state is always in [`PrimaryHandle::status`]).
const NOTICES_QUEUED_MAX: usize = 64;
/// FLUSH requests waiting for the DR at once; more are answered with an error.
const FLUSHES_WAITING_MAX: usize = 1024;

/// A write handed to the primary, not yet answered.
#[derive(Debug)]
pub struct PendingWrite {
    answer: Option<glommio::channels::local_channel::LocalReceiver<WriteOutcome>>,
}

impl PendingWrite {
    pub async fn outcome(self) -> WriteOutcome {
        match self.answer {
            Some(answer) => answer
                .recv()
                .await
                .unwrap_or_else(|| WriteOutcome::Failed("the primary stopped".into())),
            None => WriteOutcome::Failed("the primary stopped".into()),
        }
    }
}

/// The embeddable client API of a running primary (on the primary's executor).
#[derive(Clone, Debug)]
pub struct PrimaryHandle {
    events: Sender<PrimaryEvent>,
    volume: Rc<Volume>,
    geometry: Geometry,
    order_round_trips: Rc<RefCell<Histogram<u64>>>,
    timelines: Rc<RefCell<WriteTimelines>>,
    status: Rc<Cell<PrimaryStatus>>,
    subscribers: Rc<RefCell<Vec<glommio::channels::local_channel::LocalSender<PrimaryNotice>>>>,
}

impl PrimaryHandle {
    /// Writes `data` at `volume_offset` and waits for the mode's acknowledgement.
    pub async fn write(&self, volume_offset: u64, data: Vec<u8>) -> WriteOutcome {
        self.start_write(volume_offset, data).await.outcome().await
    }

    /// Hands a write to the primary and returns where its outcome will arrive. Writes handed
    /// over one after another from one task are admitted, and numbered, in that order.
    pub async fn start_write(&self, volume_offset: u64, data: Vec<u8>) -> PendingWrite {
        let (reply, answer) = glommio::channels::local_channel::new_bounded(1);
        let sent = self
            .events
            .send(PrimaryEvent::ClientWrite {
                volume_offset,
                data,
                reply: Rc::new(reply),
            })
            .await;
        PendingWrite {
            answer: sent.is_ok().then_some(answer),
        }
    }

    /// Reads from the local volume (which holds every acknowledged write).
    pub async fn read(&self, volume_offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.volume.read(volume_offset, len).await
    }

    /// Makes every write acknowledged before the call durable as far as the mode promises more
    /// than a local write: once it returns Ok, each of those writes is on stable storage locally
    /// (`fdatasync` of the volume) and the DR holds its order record, so a failover either keeps
    /// it or lists it in the loss report, whatever the mode. In `order-sync` and `sync` the DR
    /// held each order already when the write was acknowledged, so only the local sync is added;
    /// in `async` this waits for the DR to catch up on orders. While the DR link is down, with
    /// `--on-link-loss degrade` it returns after the local sync (those writes were acknowledged
    /// degraded: only the aux table covers them), and with `block` it waits for the link, as
    /// writes do. Fails if the primary stopped before the DR held them.
    pub async fn flush(&self) -> Result<(), String> {
        self.volume.flush().await?;
        let (reply, answer) = glommio::channels::local_channel::new_bounded(1);
        let stopped = || String::from("the primary stopped");
        self.events
            .send(PrimaryEvent::Flush {
                reply: Rc::new(reply),
            })
            .await
            .map_err(|_| stopped())?;
        answer.recv().await.unwrap_or_else(|| Err(stopped()))
    }

    /// The primary's state as of its last step.
    pub fn status(&self) -> PrimaryStatus {
        self.status.get()
    }

    /// Notices of link changes and of the primary stopping (a failover fencing it), from now
    /// on. At most 64 subscribers (a dropped receiver frees its place at the next notice); a
    /// subscriber more than 64 notices behind misses some.
    pub fn subscribe(
        &self,
    ) -> Result<glommio::channels::local_channel::LocalReceiver<PrimaryNotice>, String> {
        let mut subscribers = self.subscribers.borrow_mut();
        if subscribers.len() >= SUBSCRIBERS_MAX {
            return Err(format!("already {SUBSCRIBERS_MAX} subscribers"));
        }
        let (sender, receiver) = glommio::channels::local_channel::new_bounded(NOTICES_QUEUED_MAX);
        subscribers.push(sender);
        Ok(receiver)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Order round trips so far, in nanoseconds: from posting an order batch's SEND to the DR's
    /// answer that it holds the batch (what `order-sync` waits for, besides the local write).
    pub fn order_round_trips_ns(&self) -> Histogram<u64> {
        self.order_round_trips.borrow().clone()
    }

    /// Records the steps of up to `capacity` writes from now on (0: stop; the default).
    pub fn record_write_timelines(&self, capacity: usize) {
        self.timelines.borrow_mut().record(capacity);
    }

    /// The timelines recorded of writes acknowledged since the last call.
    pub fn take_write_timelines(&self) -> Vec<WriteTimeline> {
        self.timelines.borrow_mut().take()
    }
}

struct PrimaryNode {
    primary: Primary,
    staging: memmap2::MmapMut,
    volume: Rc<Volume>,
    writes: OrderedWrites,
    /// Client writes not admitted yet, with when they arrived.
    waiting: VecDeque<(u64, Vec<u8>, Sender<WriteOutcome>, std::time::Instant)>,
    replies: HashMap<u64, (Sender<WriteOutcome>, std::time::Instant)>,
    /// From a client write's arrival to its acknowledgement.
    ack_latencies: AckLatencies,
    /// Times the primary degraded because the DR's answer was overdue (for the log).
    late_answer_degradations: u64,
    next_client_tag: u64,
    dr: Option<(QueuePair, QueuePair, RegionDescriptor)>,
    aux: Option<(QueuePair, RegionDescriptor)>,
    dr_connecting: bool,
    aux_connecting: bool,
    last_acked: Seq,
    /// Order batches on the wire: (last seq, when posted), oldest first; at most
    /// `ORDERS_TIMED_MAX` (the protocol keeps far fewer in flight).
    orders_in_flight: VecDeque<(Seq, std::time::Instant)>,
    /// Order round trips: from posting a batch's SEND to the DR's answer that it holds it.
    order_round_trips: Rc<RefCell<Histogram<u64>>>,
    /// Writes' steps, when a benchmark asked for them (see `PrimaryHandle::record_write_timelines`).
    timelines: Rc<RefCell<WriteTimelines>>,
    /// FLUSH requests waiting for the DR to hold orders through their seq; at most
    /// `FLUSHES_WAITING_MAX`.
    flushes: Vec<(Seq, Sender<Result<(), String>>)>,
}

/// Bound of `PrimaryNode::orders_in_flight`.
const ORDERS_TIMED_MAX: usize = 1024;

/// Inputs taken in one pass of the primary's loop before its actions are executed: enough for a
/// poll's worth of completions at queue depth 64, and a bound on how long the first of them
/// waits for its actions.
const INPUTS_PER_PASS_MAX: usize = 64;

/// Runs the primary until it stops; `ready` receives the client API once the volume is open.
pub async fn run_primary(
    options: PrimaryOptions,
    ready: impl FnOnce(PrimaryHandle),
) -> Result<(), String> {
    let geometry = options.geometry;
    geometry
        .validate()
        .map_err(|error| format!("invalid geometry: {error}"))?;
    options.tuning.validate()?;
    let transport = Transport::open(
        &options.transport,
        &options.geometry,
        options.tuning.payload_writes_inflight_max,
    )?;
    let volume = Rc::new(Volume::open(&options.volume, geometry.sector_bytes).await?);
    if volume.size_bytes() != geometry.volume_bytes {
        return Err(format!(
            "volume {} is {} bytes but the replicated volume is {} bytes",
            options.volume.display(),
            volume.size_bytes(),
            geometry.volume_bytes
        ));
    }
    let mut config = PrimaryConfig::new(geometry, options.mode);
    config.order_batch_records_max = options.tuning.order_batch_records_max;
    config.order_batches_inflight_max = options.tuning.order_batches_inflight_max;
    config.payload_writes_inflight_max = options.tuning.payload_writes_inflight_max;
    config.link_loss_policy = options.link_loss_policy;
    if options.degrade_after.is_some() && options.link_loss_policy != LinkLossPolicy::Degrade {
        return Err("a time to degrade after is a setting of the degrade link-loss policy".into());
    }
    config.degrade_after_ns = options.degrade_after.map(|after| after.as_nanos() as u64);
    config.epoch = options.epoch;
    config.heartbeat_interval_ns = options.heartbeat_interval.as_nanos() as u64;
    config.lease_ns = options.lease.as_nanos() as u64;
    if config.lease_ns <= config.heartbeat_interval_ns {
        return Err("the lease must be longer than the heartbeat interval".into());
    }
    let listener = crate::listen_exclusive(options.listen)
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    let local_addr = listener.local_addr().map_err(|error| error.to_string())?;
    let (inputs, senders) = admin::inputs::<PrimaryEvent>("primary", Duration::from_millis(2));
    let decide: admin::Decide = Rc::new(|hello, _| {
        Err(format!(
            "the primary serves no {} connections for {:?}",
            hello.role.name(),
            hello.purpose
        )
        .into())
    });
    glommio::spawn_local(admin::accept_loop(
        listener,
        senders.accept_context(Role::Primary, &options.psk, decide, &transport),
    ))
    .detach();

    let order_round_trips = Rc::new(RefCell::new(
        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
    ));
    let timelines = Rc::new(RefCell::new(WriteTimelines::default()));
    let node = Rc::new(RefCell::new(PrimaryNode {
        primary: Primary::new(config),
        staging: crate::storage::prefaulted_memory(geometry.ring_bytes as usize)?,
        volume: volume.clone(),
        writes: OrderedWrites::new(options.local_writes_inflight_max),
        waiting: VecDeque::new(),
        replies: HashMap::new(),
        ack_latencies: AckLatencies::new(),
        late_answer_degradations: 0,
        next_client_tag: 1,
        dr: None,
        aux: None,
        dr_connecting: false,
        aux_connecting: false,
        last_acked: 0,
        orders_in_flight: VecDeque::new(),
        order_round_trips: order_round_trips.clone(),
        timelines: timelines.clone(),
        flushes: Vec::new(),
    }));
    let status = Rc::new(Cell::new(status_of(&node.borrow())));
    let subscribers = Rc::new(RefCell::new(Vec::new()));
    let info = NodeInfo {
        geometry: Some(geometry),
        epoch: options.epoch,
    };
    admin::announce(Role::Primary, "listening on", local_addr);
    ready(PrimaryHandle {
        events: senders.local.clone(),
        volume,
        geometry,
        order_round_trips,
        timelines,
        status: status.clone(),
        subscribers: subscribers.clone(),
    });

    loop {
        let mut input = inputs.next().await;
        let mut now;
        let mut handled = 0;
        // One pass takes every input already waiting (up to INPUTS_PER_PASS_MAX), and only then
        // admits client writes and executes the primary's actions: the protocol core does the
        // work the inputs made possible once per pass (see `Primary::pump_due`), and the order
        // records of the writes admitted go out in one batch.
        loop {
            now = crate::now_ns();
            handled += 1;
            {
                let mut guard = node.borrow_mut();
                let node = &mut *guard;
                match input {
                    Input::Local(PrimaryEvent::ClientWrite {
                        volume_offset,
                        data,
                        reply,
                    }) => node.waiting.push_back((
                        volume_offset,
                        data,
                        reply,
                        std::time::Instant::now(),
                    )),
                    Input::Local(PrimaryEvent::LocalWriteDone { seq, result }) => {
                        if node.timelines.borrow().is_recording() {
                            let now = std::time::Instant::now();
                            node.timelines.borrow_mut().local_written(seq, now);
                        }
                        let mut startable = Vec::new();
                        node.writes.finished(seq, &mut startable);
                        start_local_writes(node, startable, &senders.local);
                        match result {
                            Ok(()) => node.primary.handle_local_write_done(seq, now),
                            Err(error) => {
                                crate::log!("primary: {error}");
                                node.primary.handle_local_write_failed(seq);
                            }
                        }
                    }
                    Input::Local(PrimaryEvent::DrConnected { order, data, ring }) => {
                        node.dr_connecting = false;
                        // A pair that cannot start leaves the DR unconnected: the next pass retries.
                        match (data.start(), order.start()) {
                            (Ok(data), Ok(order)) => {
                                crate::log!("primary: connected to the DR ({})", transport.name());
                                node.dr = Some((order, data, ring));
                            }
                            (Err(error), _) | (_, Err(error)) => {
                                crate::log!("primary: cannot start the DR queue pairs: {error}")
                            }
                        }
                    }
                    Input::Local(PrimaryEvent::DrFenced { epoch, why }) => {
                        node.dr_connecting = false;
                        // As final as the DR's in-band refusal: the DR never serves the old
                        // epoch again, so the writes waiting for it fail now rather than wait
                        // for good (the clients see errors, never a silent success).
                        crate::log!("primary: DR: {why}: this primary is fenced");
                        node.primary.handle_dr_refusal(Refusal {
                            reason: RefusalReason::Fenced,
                            dr_epoch: epoch,
                            seq: 0,
                        });
                    }
                    Input::Local(PrimaryEvent::AuxFenced { why }) => {
                        node.aux_connecting = false;
                        crate::log!("primary: aux: {why}: this primary is fenced");
                        node.primary.handle_aux_fenced_us(now);
                    }
                    Input::Local(PrimaryEvent::Flush { reply }) => {
                        if node.flushes.len() < FLUSHES_WAITING_MAX {
                            node.flushes.push((node.last_acked, reply));
                        } else {
                            let why =
                                format!("{FLUSHES_WAITING_MAX} flushes already wait for the DR");
                            let _ = reply.try_send(Err(why));
                        }
                    }
                    Input::Local(PrimaryEvent::AuxConnected { qp, table }) => {
                        node.aux_connecting = false;
                        match qp.start() {
                            Ok(qp) => {
                                crate::log!("primary: connected to the aux ({})", transport.name());
                                node.aux = Some((qp, table));
                                node.primary.handle_aux_up(now);
                            }
                            Err(error) => {
                                crate::log!("primary: cannot start the aux queue pair: {error}")
                            }
                        }
                    }
                    Input::Transport(event) => handle_transport(node, event, now),
                    Input::Admin(request) => {
                        let answer = match request.request.as_str() {
                            "status" => status_json(node, options.mode),
                            other => format!(
                                "{{\"error\":{}}}",
                                admin::json_string(&format!("unknown request {other}"))
                            ),
                        };
                        let _ = request.answer.try_send(answer);
                    }
                    Input::Accepted(_) => {}
                    Input::Tick => node.primary.handle_tick(now),
                }
            }
            if handled == INPUTS_PER_PASS_MAX {
                break;
            }
            // Polled once, without waiting: nothing else runs meanwhile.
            match futures_lite::future::poll_once(inputs.next()).await {
                Some(next) => input = next,
                None => break,
            }
        }
        let mut guard = node.borrow_mut();
        let node = &mut *guard;
        if node.dr.is_none() && !node.dr_connecting && node.primary.stopped().is_none() {
            node.dr_connecting = true;
            glommio::spawn_local(connect_to_dr(
                (transport.clone(), senders.transport.clone()),
                options.dr,
                options.psk.clone(),
                info,
                senders.local.clone(),
            ))
            .detach();
        }
        if node.aux.is_none() && !node.aux_connecting && node.primary.stopped().is_none() {
            node.aux_connecting = true;
            glommio::spawn_local(connect_to_aux(
                (transport.clone(), senders.transport.clone()),
                options.aux,
                options.psk.clone(),
                info,
                senders.local.clone(),
            ))
            .detach();
        }
        admit(node, now);
        execute_actions(node, &senders.local);
        settle_flushes(node);
        let (before, after) = (status.get(), status_of(node));
        // A link declared down has its own line; a DR that is late while its link is up has
        // these, so that the log shows when acknowledgements stopped waiting for it. A short
        // --degrade-after-ms on a busy link may flap many times a second: the 1st, 10th,
        // 100th... time is logged, with the count.
        if before.degraded != after.degraded && before.dr_link_up && after.dr_link_up {
            if after.degraded {
                node.late_answer_degradations += 1;
                if crate::is_power_of_ten(node.late_answer_degradations) {
                    crate::log!(
                        "{LOG_DEGRADED_ON_LATE_ANSWER} for {} ms: acknowledging writes without it (degraded) until it answers ({} time(s) so far)",
                        options.degrade_after.unwrap_or_default().as_millis(),
                        node.late_answer_degradations
                    );
                }
            } else if crate::is_power_of_ten(node.late_answer_degradations) {
                crate::log!("primary: the DR answers again: no longer degraded");
            }
        }
        if before != after {
            status.set(after);
            notify(&mut subscribers.borrow_mut(), &before, &after);
        }
    }
}

/// The embedder's view of `node` right now.
fn status_of(node: &PrimaryNode) -> PrimaryStatus {
    let primary = &node.primary;
    let (lag_ops, lag_bytes) = primary.lag();
    PrimaryStatus {
        epoch: primary.config().epoch,
        mode: primary.config().mode,
        last_acked_seq: node.last_acked,
        order_acked_through: primary.order_acked_through(),
        dr_applied_through: primary.dr_applied_through(),
        lag_ops,
        lag_bytes,
        dr_link_up: primary.is_dr_link_up(),
        degraded: primary.is_degraded(),
        aux_connected: node.aux.is_some(),
        stopped: primary.stopped(),
    }
}

/// Sends each subscriber the notices that lead from `before` to `after`.
fn notify(
    subscribers: &mut Vec<glommio::channels::local_channel::LocalSender<PrimaryNotice>>,
    before: &PrimaryStatus,
    after: &PrimaryStatus,
) {
    let mut notices = Vec::new();
    if before.dr_link_up != after.dr_link_up {
        notices.push(if after.dr_link_up {
            PrimaryNotice::DrLinkUp
        } else {
            PrimaryNotice::DrLinkDown
        });
    }
    if before.aux_connected != after.aux_connected {
        notices.push(if after.aux_connected {
            PrimaryNotice::AuxUp
        } else {
            PrimaryNotice::AuxDown
        });
    }
    if let (None, Some(stop)) = (before.stopped, after.stopped) {
        notices.push(PrimaryNotice::Stopped(stop));
    }
    // A full queue means a subscriber that does not keep up: it misses that notice. One whose
    // receiver is gone is dropped, which makes room for new subscribers.
    subscribers.retain(|subscriber| {
        notices.iter().all(|notice| {
            !matches!(
                subscriber.try_send(*notice),
                Err(glommio::GlommioError::Closed(_))
            )
        })
    });
}

/// Answers the FLUSH requests whose writes the DR now holds, or that can no longer wait.
fn settle_flushes(node: &mut PrimaryNode) {
    if node.flushes.is_empty() {
        return;
    }
    let held_through = node.primary.order_acked_through();
    let stopped = node.primary.stopped();
    let degraded = node.primary.is_degraded();
    node.flushes.retain(|(through, reply)| {
        let answer = if *through <= held_through || degraded {
            Ok(())
        } else if let Some(stop) = stopped {
            Err(format!(
                "the primary stopped ({stop}) before the DR held op {through}"
            ))
        } else {
            return true;
        };
        let _ = reply.try_send(answer);
        false
    });
}

/// Admits waiting client writes in arrival order until the protocol pushes back.
fn admit(node: &mut PrimaryNode, now: u64) {
    while let Some((volume_offset, data, reply, arrived)) = node.waiting.pop_front() {
        let tag = node.next_client_tag;
        match node.primary.handle_client_write(
            tag,
            volume_offset,
            &data,
            &mut node.staging[..],
            now,
        ) {
            Ok(admitted) => {
                if node.timelines.borrow().is_recording() {
                    node.timelines.borrow_mut().admitted(admitted.seq, arrived);
                }
                node.next_client_tag += 1;
                node.replies.insert(tag, (reply, arrived));
            }
            Err(WriteRefused::Backpressure(_)) => {
                // Retried after the next completion frees room; order is kept.
                node.waiting
                    .push_front((volume_offset, data, reply, arrived));
                return;
            }
            Err(WriteRefused::Invalid(error)) => {
                let _ = reply.try_send(WriteOutcome::Failed(format!("invalid write: {error}")));
            }
            Err(WriteRefused::Stopped) => {
                let why = match node.primary.stopped() {
                    Some(stop) => format!("the primary stopped: {stop}"),
                    None => String::from("the primary stopped"),
                };
                let _ = reply.try_send(WriteOutcome::Failed(why));
            }
        }
    }
}

async fn connect_to_dr(
    (transport, events): (Transport, Sender<TransportEvent>),
    addr: SocketAddr,
    psk: Vec<u8>,
    info: NodeInfo,
    local: Sender<PrimaryEvent>,
) {
    let event = admin::keep_trying("primary: DR", Duration::from_millis(200), || async {
        // The data connection first: once the order connection is up the DR says hello and
        // the primary starts posting payload writes.
        let connect = |purpose| {
            admin::connect_qp(
                &transport,
                &events,
                addr,
                &psk,
                Role::Primary,
                purpose,
                info,
            )
        };
        // A DR that has fenced our epoch never takes us back: retrying cannot get past it.
        let fenced = |error: ConnectError| match error.fenced_at {
            Some(epoch) => Ok(PrimaryEvent::DrFenced {
                epoch,
                why: error.text,
            }),
            None => Err(error.text),
        };
        let (data, grant) = match connect(Purpose::DataQp).await {
            Ok(connected) => connected,
            Err(error) => return fenced(error),
        };
        let ring = *grant
            .descriptors
            .first()
            .ok_or("the DR granted no staging ring")?;
        let (order, _) = match connect(Purpose::OrderQp).await {
            Ok(connected) => connected,
            Err(error) => return fenced(error),
        };
        Ok(PrimaryEvent::DrConnected { order, data, ring })
    })
    .await;
    let _ = local.send(event).await;
}

async fn connect_to_aux(
    (transport, events): (Transport, Sender<TransportEvent>),
    addr: SocketAddr,
    psk: Vec<u8>,
    info: NodeInfo,
    local: Sender<PrimaryEvent>,
) {
    let event = admin::keep_trying("primary: aux", Duration::from_millis(200), || async {
        match admin::connect_qp(
            &transport,
            &events,
            addr,
            &psk,
            Role::Primary,
            Purpose::AuxTable,
            info,
        )
        .await
        {
            Ok((qp, grant)) => {
                let table = *grant
                    .descriptors
                    .first()
                    .ok_or_else(|| format!("{addr} granted no status table"))?;
                Ok(PrimaryEvent::AuxConnected { qp, table })
            }
            // An aux that fenced our epoch never takes us back: retrying cannot get past it.
            Err(ConnectError {
                text,
                fenced_at: Some(_),
            }) => Ok(PrimaryEvent::AuxFenced { why: text }),
            Err(error) => Err(error.text),
        }
    })
    .await;
    let _ = local.send(event).await;
}

const WR_AUX_ENTRIES: u64 = 0;
const WR_AUX_HEARTBEAT: u64 = 1;

fn handle_transport(node: &mut PrimaryNode, event: TransportEvent, now: u64) {
    let dr_ids = node
        .dr
        .as_ref()
        .map(|(order, data, _)| (order.id(), data.id()));
    let aux_id = node.aux.as_ref().map(|(qp, _)| qp.id());
    match event {
        TransportEvent::Received { qp, bytes } if dr_ids.is_some_and(|(order, _)| order == qp) => {
            let held_before = node.primary.order_acked_through();
            if let Err(error) = node.primary.handle_dr_message(&bytes, now) {
                crate::log!("primary: bad message from the DR: {error}");
            }
            let held = node.primary.order_acked_through();
            if node.timelines.borrow().is_recording() {
                let at = std::time::Instant::now();
                node.timelines
                    .borrow_mut()
                    .order_held(held_before + 1, held, at);
            }
            let mut round_trips = node.order_round_trips.borrow_mut();
            while let Some(&(last_seq, posted_at)) = node.orders_in_flight.front() {
                if last_seq > held {
                    break;
                }
                node.orders_in_flight.pop_front();
                let _ = round_trips.record(posted_at.elapsed().as_nanos() as u64);
            }
        }
        TransportEvent::Completion {
            qp,
            wr_id,
            opcode: Opcode::WriteWithImm,
            status: WorkStatus::Success,
            ..
        } if dr_ids.is_some_and(|(_, data)| data == qp) => {
            node.primary.handle_payload_write_done(wr_id, now);
        }
        TransportEvent::Completion {
            qp, wr_id, status, ..
        } if aux_id == Some(qp) => match status {
            WorkStatus::Success => {
                let tag = if wr_id == WR_AUX_HEARTBEAT {
                    AuxWriteTag::Heartbeat
                } else {
                    AuxWriteTag::Entries
                };
                node.primary.handle_aux_write_done(tag, now);
            }
            WorkStatus::RemoteAccessError => node.primary.handle_aux_write_failed(true, now),
            _ => node.primary.handle_aux_write_failed(false, now),
        },
        TransportEvent::Down { qp, reason } => {
            if dr_ids.is_some_and(|(order, data)| order == qp || data == qp) {
                crate::log!("primary: DR link down: {reason}");
                if let Some((order, data, _)) = node.dr.take() {
                    order.fail("the DR link is down");
                    data.fail("the DR link is down");
                }
                node.primary.handle_dr_link_down(now);
            } else if aux_id == Some(qp) {
                crate::log!("primary: aux link down: {reason}");
                node.aux = None;
                node.primary.handle_aux_write_failed(false, now);
            }
        }
        // Leftover events of pairs replaced since change nothing.
        _ => {}
    }
}

fn start_local_writes(node: &mut PrimaryNode, jobs: Vec<WriteJob>, local: &Sender<PrimaryEvent>) {
    for (seq, volume_offset, len, ring_offset) in jobs {
        let span = &node.staging[ring_offset as usize..ring_offset as usize + len as usize];
        node.volume
            .spawn_write(volume_offset, span, local, move |result| {
                PrimaryEvent::LocalWriteDone { seq, result }
            });
    }
}

/// A work request the queue pair refused is never carried out, but the protocol counts it as
/// posted, and completions are cumulative: a later completion would then vouch for it (a payload
/// that never reached the DR would be marked replicated). So a refusal fails the queue pair,
/// and the protocol's reconnect sends everything not completed again. `Down` needs nothing: the
/// pair's `Down` event is on its way.
fn fail_on_refused_post(
    qp: &QueuePair,
    what: &str,
    posted: Result<(), crate::transport::PostError>,
) {
    match posted {
        Ok(()) | Err(crate::transport::PostError::Down) => {}
        Err(refused) => {
            let reason = format!("the transport refused a {what} ({refused:?})");
            crate::log!("primary: {reason}; failing the queue pair");
            qp.fail(&reason);
        }
    }
}

fn execute_actions(node: &mut PrimaryNode, local: &Sender<PrimaryEvent>) {
    let mut actions: Vec<PrimaryAction> = node.primary.drain_actions().collect();
    // Order batches go first: every order-sync acknowledgement waits for one, while a write's
    // local write and its payload post each copy the whole payload first (the transport
    // writes a small SEND from the post itself, so the batch is on the wire before those
    // copies start). Actions of different kinds are independent of one another (queue pairs
    // keep no order between them); a stable sort keeps each kind's own order.
    actions.sort_by_key(|action| !matches!(action, PrimaryAction::SendOrderBatch { .. }));
    for action in actions {
        match action {
            PrimaryAction::LocalWrite {
                seq,
                volume_offset,
                ring_offset,
                len,
            } => {
                if let Some(job) = node.writes.submit((seq, volume_offset, len, ring_offset)) {
                    start_local_writes(node, vec![job], local);
                }
            }
            PrimaryAction::SendOrderBatch {
                buffer,
                len,
                first_seq,
                last_seq,
            } => {
                if let Some((order, _, _)) = &node.dr {
                    // The clock is read before the post only while timelines are recorded.
                    let recording = node.timelines.borrow().is_recording();
                    let posting = recording.then(std::time::Instant::now);
                    let posted = order.post_send(0, &node.primary.order_batch(buffer)[..len]);
                    let posted_at = std::time::Instant::now();
                    if let Some(posting) = posting {
                        node.timelines
                            .borrow_mut()
                            .order_posted(first_seq, last_seq, posting, posted_at);
                    }
                    if posted.is_ok() && node.orders_in_flight.len() < ORDERS_TIMED_MAX {
                        node.orders_in_flight.push_back((last_seq, posted_at));
                    }
                    fail_on_refused_post(order, "order batch", posted);
                }
            }
            PrimaryAction::WritePayload {
                seq,
                ring_offset,
                len,
                imm,
            } => {
                if let Some((_, data, ring)) = &node.dr {
                    let span =
                        &node.staging[ring_offset as usize..ring_offset as usize + len as usize];
                    let (addr, rkey) = (ring.addr + ring_offset, ring.rkey);
                    let config = node.primary.config();
                    // In order-sync no acknowledgement waits for a payload's completion: it
                    // feeds the lag and the "replicated" entries, which a millisecond does not
                    // hurt (the DR knows what landed without it), so the DR may hold its ACK
                    // back and save a send(2) per write. Measured with the loopback benchmark
                    // (4 KiB, one write at a time, eight alternated runs): order-sync write-ack
                    // p50 94.3 us with every ACK at once, 76.7 us unhurried (medians); the lag
                    // at one write in flight then reads up to 15-21 ops instead of 2. Not in sync
                    // (its acknowledgements wait for the payload), nor in async, whose users
                    // watch the lag as their recovery point: there (`ordinal bench`, 4 KiB,
                    // three alternated runs) unhurried writes left write-ack p50 at one write in
                    // flight as it was (130-147 us against 133-155 us) and raised throughput at
                    // 16 in flight (67-74 k against 58-62 k writes/s), but the lag read up to
                    // 80-337 ops instead of 32-48. Half the window is left for writes
                    // acknowledged at once, so that it never waits on the delayed-ACK timer.
                    let unhurried = config.mode == Mode::OrderSync
                        && (data.outstanding() as u64) < config.payload_writes_inflight_max / 2;
                    let posted = if unhurried {
                        data.post_write_unhurried(seq, span, addr, rkey, Some(imm))
                    } else {
                        data.post_write(seq, span, addr, rkey, Some(imm))
                    };
                    fail_on_refused_post(data, "payload write", posted);
                }
            }
            PrimaryAction::WriteAux { offset, len, tag } => {
                if let Some((qp, table)) = &node.aux {
                    let wr_id = match tag {
                        AuxWriteTag::Heartbeat => WR_AUX_HEARTBEAT,
                        AuxWriteTag::Entries => WR_AUX_ENTRIES,
                    };
                    let bytes = &node.primary.aux_area()[offset..offset + len];
                    let posted =
                        qp.post_write(wr_id, bytes, table.addr + offset as u64, table.rkey, None);
                    fail_on_refused_post(qp, "status table write", posted);
                }
            }
            PrimaryAction::AckClient {
                seq,
                client_tag,
                degraded,
            } => {
                node.last_acked = node.last_acked.max(seq);
                if node.timelines.borrow().is_recording() {
                    let now = std::time::Instant::now();
                    node.timelines.borrow_mut().acked(seq, now);
                }
                if let Some((reply, arrived)) = node.replies.remove(&client_tag) {
                    node.ack_latencies
                        .record(arrived, std::time::Instant::now());
                    let _ = reply.try_send(WriteOutcome::Acked { seq, degraded });
                }
            }
            PrimaryAction::FailClient { seq, client_tag } => {
                if let Some((reply, _)) = node.replies.remove(&client_tag) {
                    let _ = reply.try_send(WriteOutcome::Failed(format!(
                        "op {seq} was not acknowledged"
                    )));
                }
            }
            PrimaryAction::Stopped(stop) => {
                crate::log!("primary: stopped: {stop}; writes are refused from now on");
                for (_, (reply, _)) in node.replies.drain() {
                    let _ = reply
                        .try_send(WriteOutcome::Failed(format!("the primary stopped: {stop}")));
                }
            }
        }
    }
}

/// Acknowledgement latencies of the last whole second and of the second in progress, for
/// `ordinal status --watch`: what clients see now, not since start.
struct AckLatencies {
    current: Histogram<u64>,
    last: Histogram<u64>,
    current_since: std::time::Instant,
}

impl AckLatencies {
    const WINDOW: Duration = Duration::from_secs(1);

    fn new() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        AckLatencies {
            current: histogram(),
            last: histogram(),
            current_since: std::time::Instant::now(),
        }
    }

    /// Records the acknowledgement at `now` of a write that arrived at `arrived` (one clock
    /// read per acknowledgement serves both the latency and the window).
    fn record(&mut self, arrived: std::time::Instant, now: std::time::Instant) {
        self.rotate(now);
        let _ = self.current.record((now - arrived).as_nanos() as u64);
    }

    /// Moves to a new window once the current one is a second old (and forgets both if the last
    /// write is older than that).
    fn rotate(&mut self, now: std::time::Instant) {
        let age = now.saturating_duration_since(self.current_since);
        if age < Self::WINDOW {
            return;
        }
        std::mem::swap(&mut self.current, &mut self.last);
        self.current.reset();
        if age >= 2 * Self::WINDOW {
            self.last.reset();
        }
        self.current_since = now;
    }

    fn last_second(&mut self) -> &Histogram<u64> {
        self.rotate(std::time::Instant::now());
        &self.last
    }
}

fn status_json(node: &mut PrimaryNode, mode: Mode) -> String {
    let ack = node.ack_latencies.last_second();
    let ack_latency = format!(
        "{{\"count\":{},\"p50\":{},\"p99\":{}}}",
        ack.len(),
        ack.value_at_quantile(0.5) / 1000,
        ack.value_at_quantile(0.99) / 1000
    );
    let primary = &node.primary;
    let stats = primary.stats();
    let (lag_ops, lag_bytes) = primary.lag();
    format!(
        "{{\"role\":\"primary\",\"epoch\":{},\"mode\":\"{}\",\"stopped\":{},\"last_seq\":{},\"last_acked_seq\":{},\"order_acked_through\":{},\"payload_done_through\":{},\"dr_applied_through\":{},\"lag_ops\":{},\"lag_bytes\":{},\"ring_used_bytes\":{},\"ring_bytes\":{},\"dr_link_up\":{},\"degraded\":{},\"aux_connected\":{},\"lease_valid\":{},\"admitted\":{},\"acked\":{},\"acked_degraded\":{},\"backpressure\":{},\"waiting_clients\":{},\"order_round_trip_us\":{{\"count\":{},\"p50\":{},\"p99\":{}}},\"ack_latency_last_second_us\":{}}}",
        primary.config().epoch,
        mode.name(),
        admin::json_string(primary.stopped().map(|s| s.name()).unwrap_or_default()),
        primary.last_seq(),
        node.last_acked,
        primary.order_acked_through(),
        primary.payload_done_through(),
        primary.dr_applied_through(),
        lag_ops,
        lag_bytes,
        primary.ring_used_bytes(),
        primary.config().geometry.ring_bytes,
        primary.is_dr_link_up(),
        primary.is_degraded(),
        node.aux.is_some(),
        crate::now_ns() < primary.lease_until(),
        stats.admitted,
        stats.acked,
        stats.acked_degraded,
        stats.backpressure,
        node.waiting.len(),
        node.order_round_trips.borrow().len(),
        node.order_round_trips.borrow().value_at_quantile(0.5) / 1000,
        node.order_round_trips.borrow().value_at_quantile(0.99) / 1000,
        ack_latency
    )
}
