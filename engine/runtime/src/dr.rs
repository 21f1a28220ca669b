//! The DR daemon: receives order batches (SEND) and payloads (one-sided WRITEs with immediate
//! into its staging ring), applies them to its volume in op order, and fails over: fence, fetch
//! the frozen status table from the aux (one-sided READ), recover, promote, report.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use crate::Sender;
use memmap2::MmapMut;
use ordinal_proto::dr::{dr_log_bytes, Dr, DrAction, DrConfig, DrRole};
use ordinal_proto::primary::aux_primary_area_bytes;
use ordinal_proto::{Epoch, Geometry, Seq};

use crate::admin::{self, Input};
use crate::aux::Notice;
use crate::control::{geometry_mismatch, Grant, NodeInfo, Purpose, Refusal, Role};
use crate::link::{PreparedQp, Transport, TransportChoice};
use crate::storage::{map_file, open_region, MappedRegion, OrderedWrites, Volume, WriteJob};
use crate::transport::{
    Opcode, QueuePair, RegionDescriptor, RegionMemory, RegionTable, TransportEvent, WorkStatus,
    ACCESS_REMOTE_WRITE,
};

#[derive(Clone, Debug)]
pub struct DrOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub volume: PathBuf,
    pub psk: Vec<u8>,
    pub geometry: Geometry,
    pub epoch: Epoch,
    pub aux: Option<SocketAddr>,
    /// Fail over by itself when the aux reports the primary lost (the patent's behaviour).
    pub auto_failover: bool,
    pub applies_inflight_max: usize,
    pub transport: TransportChoice,
    /// Once promoted, serve the volume over NBD here (read-write), so clients of the failed
    /// primary reconnect to the DR and carry on. Nothing is served before promotion: the
    /// replica changes under a reader, and a client must not write it.
    pub nbd_listen: Option<SocketAddr>,
    /// Each apply starts this long after the protocol scheduled it (zero: at once). With at
    /// most `applies_inflight_max` applies in flight, a delay keeps verified payloads waiting in
    /// the staging ring, so that a failover has to apply them from there: this exercises the
    /// patent's recovery path (`applied_from_ring` in the loss report) with real processes.
    pub apply_delay: Duration,
    /// Make the order log durable (msync, which writes the dirty pages back and waits for the
    /// device) before sending anything that acknowledges order records. Without it a record is
    /// acknowledged once it is in the log's mapping, so in the page cache: it survives the DR
    /// process being killed but not a power loss of the DR machine (DRBD's protocol B for the
    /// order record); with it, protocol C.
    pub durable_order_log: bool,
}

/// Local events of the DR loop.
#[derive(Debug)]
pub enum DrEvent {
    ApplyDone {
        seq: Seq,
        result: Result<(), String>,
    },
    AuxConnected {
        qp: PreparedQp,
        table: RegionDescriptor,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failover {
    Idle,
    /// Fenced; applies started before are finishing.
    WaitApplies,
    /// Asked the aux to fence the primary and freeze the table.
    WaitFence,
    /// Reading the frozen table.
    WaitRead,
    /// Applying the usable prefix.
    Recovering,
    Done,
}

struct DrNode {
    dr: Dr<MmapMut>,
    ring: Rc<MappedRegion>,
    volume: Rc<Volume>,
    writes: OrderedWrites,
    /// Applies in emission order, and those finished out of order.
    applies: VecDeque<Seq>,
    applies_done: BTreeSet<Seq>,
    order_qp: Option<QueuePair>,
    data_qp: Option<QueuePair>,
    ring_grants: Vec<(Rc<RegionTable>, u32)>,
    aux: Option<(QueuePair, RegionDescriptor)>,
    aux_connecting: bool,
    failover: Failover,
    without_aux: bool,
    failover_waiters: Vec<Sender<String>>,
    report_json: Option<String>,
    geometry: Geometry,
    /// `DrOptions::apply_delay`, for applies of the normal stream (a failover's are not held).
    apply_delay: Duration,
    /// `DrOptions::durable_order_log`.
    durable_order_log: bool,
    /// How many times the order log was made durable before an acknowledgement went out.
    order_log_syncs: u64,
}

pub async fn run_dr(options: DrOptions) -> Result<(), String> {
    let geometry = options.geometry;
    geometry
        .validate()
        .map_err(|error| format!("invalid geometry: {error}"))?;
    std::fs::create_dir_all(&options.state_dir)
        .map_err(|error| format!("cannot create {}: {error}", options.state_dir.display()))?;
    let transport = Transport::open(
        &options.transport,
        &options.geometry,
        ordinal_proto::primary::PAYLOAD_WRITES_INFLIGHT_DEFAULT,
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
    let ring = open_region(
        &options.state_dir.join("dr-ring.region"),
        geometry.ring_bytes,
    )?;
    let log_path = options.state_dir.join("dr-order-log.region");
    // The DR role owns its log's mapping; `Dr::open` validates every slot read back.
    let log = map_file(&log_path, dr_log_bytes(geometry.table_slots) as u64)?;
    let mut config = DrConfig::new(geometry);
    config.applies_inflight_max = options.applies_inflight_max as u64;
    let dr = Dr::open(config, log, options.epoch, &ring.map.borrow())
        .map_err(|error| format!("DR order log {}: {error:?}", log_path.display()))?;
    crate::log!(
        "dr: opened at epoch {} as {:?}: held through {}, applied through {}",
        dr.epoch(),
        dr.role(),
        dr.held_through(),
        dr.applied_through()
    );
    let node = Rc::new(RefCell::new(DrNode {
        dr,
        ring,
        volume,
        writes: OrderedWrites::new(options.applies_inflight_max),
        applies: VecDeque::new(),
        applies_done: BTreeSet::new(),
        order_qp: None,
        data_qp: None,
        ring_grants: Vec::new(),
        aux: None,
        aux_connecting: false,
        failover: Failover::Idle,
        without_aux: false,
        failover_waiters: Vec::new(),
        report_json: None,
        geometry,
        apply_delay: options.apply_delay,
        durable_order_log: options.durable_order_log,
        order_log_syncs: 0,
    }));
    let serve_promoted = |volume: &Rc<Volume>| {
        if let Some(listen) = options.nbd_listen {
            let export = crate::nbd::Export::Promoted {
                volume: volume.clone(),
                geometry,
            };
            glommio::spawn_local(async move {
                // The DR stays promoted either way; the operator can fix the address and
                // restart it (a restarted promoted DR serves at once).
                if let Err(error) = crate::nbd::serve(listen, export).await {
                    crate::log!("dr: {error}");
                }
            })
            .detach();
        }
    };
    if node.borrow().dr.role() == DrRole::Promoted {
        node.borrow_mut().failover = Failover::Done;
        let report = std::fs::read_to_string(options.state_dir.join("loss-report.json")).ok();
        node.borrow_mut().report_json = report;
        serve_promoted(&node.borrow().volume);
    }

    let listener = crate::listen_exclusive(options.listen)
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    let local = listener.local_addr().map_err(|error| error.to_string())?;
    let (inputs, senders) = admin::inputs::<DrEvent>("dr", Duration::from_millis(5));
    let decide_node = node.clone();
    let decide: admin::Decide = Rc::new(move |hello, table| {
        let node = decide_node.borrow();
        let theirs = hello.info.geometry.ok_or("the primary sent no geometry")?;
        if let Some(why) = geometry_mismatch(&geometry, &theirs) {
            return Err(why.into());
        }
        if node.dr.role() != DrRole::Replica {
            return Err(Refusal {
                why: format!(
                    "the DR has failed over (it is {:?} at epoch {})",
                    node.dr.role(),
                    node.dr.epoch()
                ),
                fenced_at: Some(node.dr.epoch()),
            });
        }
        if hello.info.epoch != node.dr.epoch() {
            return Err(format!(
                "the DR is at epoch {}, the primary at epoch {}",
                node.dr.epoch(),
                hello.info.epoch
            )
            .into());
        }
        let descriptors = match (hello.role, hello.purpose) {
            (Role::Primary, Purpose::OrderQp) => Vec::new(),
            (Role::Primary, Purpose::DataQp) => {
                let memory: Rc<dyn RegionMemory> = node.ring.clone();
                vec![table.try_register(memory, geometry.ring_bytes, ACCESS_REMOTE_WRITE)?]
            }
            (role, purpose) => {
                return Err(format!(
                    "the DR does not serve {} connections for {purpose:?}",
                    role.name()
                )
                .into())
            }
        };
        Ok(Grant {
            info: NodeInfo {
                geometry: Some(geometry),
                epoch: node.dr.epoch(),
            },
            descriptors,
        })
    });
    glommio::spawn_local(admin::accept_loop(
        listener,
        senders.accept_context(Role::Dr, &options.psk, decide, &transport),
    ))
    .detach();
    admin::announce(Role::Dr, "listening on", local);
    let connect_aux = |node: &mut DrNode| {
        if let (Some(addr), false) = (options.aux, node.aux_connecting) {
            node.aux_connecting = true;
            let info = NodeInfo {
                geometry: Some(geometry),
                epoch: node.dr.epoch(),
            };
            glommio::spawn_local(connect_to_aux(
                (transport.clone(), senders.transport.clone()),
                addr,
                options.psk.clone(),
                info,
                senders.local.clone(),
            ))
            .detach();
        }
    };
    connect_aux(&mut node.borrow_mut());
    let report_path = options.state_dir.join("loss-report.json");

    loop {
        let input = inputs.next().await;
        let mut guard = node.borrow_mut();
        let node = &mut *guard;
        match input {
            Input::Accepted(accepted) => {
                let qp = match accepted.qp.start() {
                    Ok(qp) => qp,
                    Err(error) => {
                        crate::log!("dr: cannot start a queue pair: {error}");
                        continue;
                    }
                };
                if accepted.hello.purpose == Purpose::DataQp {
                    if let Some(old) = node.data_qp.replace(qp) {
                        old.fail("replaced by a new connection from the primary");
                    }
                    let rkey = accepted.regions.descriptors()[0].rkey;
                    node.ring_grants.push((accepted.regions, rkey));
                } else {
                    if let Some(old) = node.order_qp.replace(qp) {
                        old.fail("replaced by a new connection from the primary");
                    }
                    crate::log!("dr: primary connected");
                    node.dr.handle_peer_connected();
                }
            }
            Input::Transport(event) => handle_transport(node, event, options.auto_failover),
            Input::Local(DrEvent::ApplyDone { seq, result }) => {
                if let Err(error) = result {
                    // The volume is in an unknown state: stop rather than apply past a hole.
                    return Err(format!("DR volume write failed, stopping: {error}"));
                }
                let mut startable = Vec::new();
                node.writes.finished(seq, &mut startable);
                start_applies(node, startable, &senders.local);
                node.applies_done.insert(seq);
                let mut through = None;
                while let Some(&front) = node.applies.front() {
                    if !node.applies_done.remove(&front) {
                        break;
                    }
                    node.applies.pop_front();
                    through = Some(front);
                }
                if let Some(through) = through {
                    node.dr.handle_apply_done(through);
                }
            }
            Input::Local(DrEvent::AuxConnected { qp, table }) => {
                node.aux_connecting = false;
                match qp.start() {
                    Ok(qp) => {
                        crate::log!("dr: connected to the aux ({})", transport.name());
                        node.aux = Some((qp, table));
                    }
                    Err(error) => crate::log!("dr: cannot start the aux queue pair: {error}"),
                }
            }
            Input::Admin(request) => match request.request.as_str() {
                "status" => {
                    let _ = request.answer.try_send(status_json(node));
                }
                "failover" | "failover without-aux" => {
                    node.without_aux |= request.request.ends_with("without-aux");
                    if let (Failover::Done, Some(report)) = (node.failover, &node.report_json) {
                        let _ = request.answer.try_send(report.clone());
                    } else {
                        node.failover_waiters.push(request.answer);
                        start_failover(node, "requested by the operator");
                    }
                }
                other => {
                    let _ = request.answer.try_send(format!(
                        "{{\"error\":{}}}",
                        admin::json_string(&format!("unknown request {other}"))
                    ));
                }
            },
            Input::Tick => {}
        }
        if node.aux.as_ref().is_some_and(|(qp, _)| qp.is_down()) {
            node.aux = None;
            if matches!(node.failover, Failover::WaitFence | Failover::WaitRead) {
                node.failover = Failover::WaitApplies;
            }
        }
        if node.aux.is_none() {
            connect_aux(node);
        }
        advance_failover(node);
        execute_actions(node, &senders.local, &report_path, &serve_promoted)?;
    }
}

async fn connect_to_aux(
    (transport, events): (Transport, Sender<TransportEvent>),
    addr: SocketAddr,
    psk: Vec<u8>,
    info: NodeInfo,
    local: Sender<DrEvent>,
) {
    let (qp, table) = admin::connect_granted(
        (transport, events),
        addr,
        &psk,
        (Role::Dr, Purpose::AuxWatch, info),
        ("dr: aux", "status table"),
        Duration::from_millis(100),
    )
    .await;
    let _ = local.send(DrEvent::AuxConnected { qp, table }).await;
}

fn handle_transport(node: &mut DrNode, event: TransportEvent, auto_failover: bool) {
    let is = |qp: &Option<QueuePair>, id: u32| qp.as_ref().is_some_and(|q| q.id() == id);
    match event {
        TransportEvent::Received { qp, bytes } if is(&node.order_qp, qp) => {
            let ring = node.ring.map.borrow();
            if let Err(error) = node.dr.handle_order_batch(&bytes, &ring) {
                crate::log!("dr: refused an order batch: {error}");
            }
        }
        TransportEvent::ReceivedImm { qp, imm } if is(&node.data_qp, qp) => {
            let ring = node.ring.map.borrow();
            if let Err(error) = node.dr.handle_payload_landed(imm, &ring) {
                crate::log!("dr: ignored a payload notice: {error}");
            }
        }
        TransportEvent::Received { qp, bytes }
            if node.aux.as_ref().is_some_and(|(q, _)| q.id() == qp) =>
        {
            match Notice::decode(&bytes) {
                Ok(Notice::PrimaryLost { epoch }) => {
                    crate::log!("dr: the aux reports the primary of epoch {epoch} lost");
                    if auto_failover {
                        start_failover(node, "the aux lost the primary's heartbeat");
                    }
                }
                Ok(Notice::TableFrozen { .. }) if node.failover == Failover::WaitFence => {
                    let (qp, table) = node.aux.as_ref().expect("checked above");
                    let len = aux_primary_area_bytes(node.geometry.table_slots) as u32;
                    if qp.post_read(1, table.addr, table.rkey, len).is_ok() {
                        node.failover = Failover::WaitRead;
                    }
                }
                Ok(other) => crate::log!("dr: ignoring aux notice {other:?}"),
                Err(error) => crate::log!("dr: bad message from the aux: {error}"),
            }
        }
        TransportEvent::Completion {
            qp,
            opcode: Opcode::Read,
            status,
            data,
            ..
        } if node.aux.as_ref().is_some_and(|(q, _)| q.id() == qp)
            && node.failover == Failover::WaitRead =>
        {
            match (status, data) {
                (WorkStatus::Success, Some(area)) => finish_failover(node, Some(&area)),
                (status, _) => {
                    crate::log!("dr: reading the aux table failed ({status:?}); retrying");
                    node.failover = Failover::WaitApplies;
                }
            }
        }
        TransportEvent::Down { qp, reason } => {
            if is(&node.order_qp, qp) || is(&node.data_qp, qp) {
                crate::log!("dr: primary connection lost: {reason}");
                if let Some(other) = node.order_qp.take() {
                    other.fail("the primary's other connection failed");
                }
                if let Some(other) = node.data_qp.take() {
                    other.fail("the primary's other connection failed");
                }
            } else if node.aux.as_ref().is_some_and(|(q, _)| q.id() == qp) {
                crate::log!("dr: aux connection lost: {reason}");
            }
        }
        _ => {}
    }
}

fn start_failover(node: &mut DrNode, why: &str) {
    if node.failover != Failover::Idle {
        return;
    }
    crate::log!("dr: failing over ({why})");
    node.dr.begin_failover();
    node.failover = Failover::WaitApplies;
}

fn advance_failover(node: &mut DrNode) {
    if node.failover != Failover::WaitApplies || node.dr.applies_inflight() || !node.writes.idle() {
        return;
    }
    if let Some((qp, _)) = &node.aux {
        if qp.post_send(0, &Notice::FenceRequest.encode()).is_ok() {
            node.failover = Failover::WaitFence;
        }
    } else if node.without_aux {
        crate::log!(
            "dr: failing over without the aux: ops in flight cannot be recovered or listed"
        );
        finish_failover(node, None);
    }
}

fn finish_failover(node: &mut DrNode, aux_area: Option<&[u8]>) {
    let report = {
        let ring = node.ring.map.borrow();
        node.dr.failover(aux_area, &ring)
    };
    crate::log!(
        "dr: recovered through op {}: {} applied from the ring ({} of them vouched for by the aux table alone), {} lost",
        report.cut,
        report.applied_landed + report.applied_from_ring,
        report.applied_from_ring,
        report.lost.len()
    );
    node.report_json = Some(report.to_json());
    node.failover = Failover::Recovering;
}

fn start_applies(node: &mut DrNode, jobs: Vec<WriteJob>, local: &Sender<DrEvent>) {
    let ring = node.ring.map.borrow();
    let delay = if node.failover == Failover::Idle {
        node.apply_delay
    } else {
        Duration::ZERO
    };
    for (seq, volume_offset, len, ring_offset) in jobs {
        // The bytes are copied out of the ring now: the protocol keeps a slot unchanged until
        // its apply is done, and a delayed apply holds its own copy anyway.
        let span = &ring[ring_offset as usize..ring_offset as usize + len as usize];
        node.volume
            .spawn_write_after(delay, volume_offset, span, local, move |result| {
                DrEvent::ApplyDone { seq, result }
            });
    }
}

fn execute_actions(
    node: &mut DrNode,
    local: &Sender<DrEvent>,
    report_path: &std::path::Path,
    on_promoted: &dyn Fn(&Rc<Volume>),
) -> Result<(), String> {
    let actions: Vec<DrAction> = node.dr.drain_actions().collect();
    let mut log_is_durable = !node.durable_order_log;
    for action in actions {
        match action {
            DrAction::Send(message) => {
                // Every message the DR sends may acknowledge order records (answers, credits,
                // hello), so the log is made durable once per pass, before the first of them.
                // msync blocks this executor until the device has the pages, so the DR's other
                // work (placing payloads, applies) waits meanwhile: the price of the option.
                if !log_is_durable {
                    node.dr.log().flush().map_err(|error| {
                        format!(
                            "cannot make the order log durable ({error}); stopping rather than \
                             acknowledge records a power loss could take"
                        )
                    })?;
                    node.order_log_syncs += 1;
                    log_is_durable = true;
                }
                if let Some(qp) = &node.order_qp {
                    let _ = qp.post_send(0, message.as_bytes());
                }
            }
            DrAction::Apply {
                seq,
                volume_offset,
                ring_offset,
                len,
            } => {
                node.applies.push_back(seq);
                if let Some(job) = node.writes.submit((seq, volume_offset, len, ring_offset)) {
                    start_applies(node, vec![job], local);
                }
            }
            DrAction::RevokeRingAccess => {
                for (table, rkey) in &node.ring_grants {
                    table.revoke(*rkey);
                }
                for qp in [node.order_qp.take(), node.data_qp.take()]
                    .into_iter()
                    .flatten()
                {
                    qp.fail("the DR is failing over");
                }
            }
            DrAction::Promoted { epoch } => {
                // The log's header now names the new epoch and refuses the old one; with a
                // durable log, that outlives a power loss before this node serves as primary.
                if node.durable_order_log {
                    node.dr.log().flush().map_err(|error| {
                        format!("cannot make the promotion durable in the order log ({error})")
                    })?;
                    node.order_log_syncs += 1;
                }
                let report = node.report_json.clone().unwrap_or_default();
                std::fs::write(report_path, &report).map_err(|error| {
                    format!(
                        "cannot write the loss report {}: {error}",
                        report_path.display()
                    )
                })?;
                crate::log!(
                    "dr: promoted: this node is the primary of epoch {epoch}; loss report in {}",
                    report_path.display()
                );
                node.failover = Failover::Done;
                on_promoted(&node.volume);
                for waiter in node.failover_waiters.drain(..) {
                    let _ = waiter.try_send(report.clone());
                }
            }
        }
    }
    Ok(())
}

fn status_json(node: &DrNode) -> String {
    let stats = node.dr.stats();
    format!(
        "{{\"role\":\"dr\",\"state\":\"{:?}\",\"epoch\":{},\"held_through\":{},\"landed_through\":{},\"applied_through\":{},\"batches_received\":{},\"payloads_landed\":{},\"applied\":{},\"refused\":{},\"checksum_mismatches\":{},\"primary_connected\":{},\"aux_connected\":{},\"failover\":\"{:?}\",\"durable_order_log\":{},\"order_log_syncs\":{}}}",
        node.dr.role(),
        node.dr.epoch(),
        node.dr.held_through(),
        node.dr.landed_through(),
        node.dr.applied_through(),
        stats.batches_received,
        stats.payloads_landed,
        stats.applied,
        stats.refused,
        stats.checksum_mismatches,
        node.order_qp.as_ref().is_some_and(|q| !q.is_down()),
        node.aux.as_ref().is_some_and(|(q, _)| !q.is_down()),
        node.failover,
        node.durable_order_log,
        node.order_log_syncs
    )
}
