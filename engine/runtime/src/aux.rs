//! The aux daemon: holds the primary's status table in a memory-mapped region that the primary
//! writes with one-sided WRITEs and the DR reads with one-sided READs, watches the primary's
//! heartbeat, fences the primary (revokes its access) when the heartbeat stops or the DR asks,
//! and tells the DR when the primary is lost.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use ordinal_proto::aux::{aux_region_bytes, Aux, AuxAction, AuxConfig, AUX_PRIMARY_AREA_OFFSET};
use ordinal_proto::primary::aux_primary_area_bytes;
use ordinal_proto::{Epoch, Geometry};

use crate::admin::{self, Input};
use crate::control::{Grant, NodeInfo, Purpose, Refusal, Role};
use crate::link::{Transport, TransportChoice};
use crate::storage::map_file;
use crate::transport::{
    QueuePair, RegionMemory, RegionTable, StableSpan, TransportEvent, ACCESS_REMOTE_READ,
    ACCESS_REMOTE_WRITE,
};

/// Notices on the DR's watch queue pair (SEND, 16 bytes): magic, kind, epoch, wait.
pub const NOTICE_BYTES: usize = 16;
const NOTICE_MAGIC: [u8; 4] = *b"ORDA";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Aux to DR: the primary of `epoch` stopped heartbeating and is fenced.
    PrimaryLost { epoch: Epoch },
    /// DR to aux: fence the primary and hand over the table.
    FenceRequest,
    /// Aux to DR: the primary is fenced and its lease has run out; the table may be read.
    TableFrozen { epoch: Epoch },
}

impl Notice {
    pub fn encode(&self) -> [u8; NOTICE_BYTES] {
        let mut out = [0u8; NOTICE_BYTES];
        out[0..4].copy_from_slice(&NOTICE_MAGIC);
        let (kind, epoch) = match *self {
            Notice::PrimaryLost { epoch } => (1, epoch),
            Notice::FenceRequest => (2, 0),
            Notice::TableFrozen { epoch } => (3, epoch),
        };
        out[4] = kind;
        out[8..12].copy_from_slice(&epoch.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Notice, String> {
        if bytes.len() != NOTICE_BYTES || bytes[0..4] != NOTICE_MAGIC {
            return Err(format!("not an aux notice ({} bytes)", bytes.len()));
        }
        let epoch = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        match bytes[4] {
            1 => Ok(Notice::PrimaryLost { epoch }),
            2 => Ok(Notice::FenceRequest),
            3 => Ok(Notice::TableFrozen { epoch }),
            other => Err(format!("unknown aux notice kind {other}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuxOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub psk: Vec<u8>,
    pub geometry: Geometry,
    pub epoch: Epoch,
    /// The primary is declared dead when its heartbeat has not advanced for this long.
    pub heartbeat_timeout: Duration,
    pub transport: TransportChoice,
}

/// The aux role and its region, shared with the transport (which places the primary's writes).
struct AuxMemory(RefCell<Aux<memmap2::MmapMut>>, AreaSpan);

/// Where the primary-writable area of the aux's mapping is: taken once, when the role is
/// created, because a registration may happen while the role is borrowed (inside a handshake's
/// decision).
#[derive(Clone, Copy)]
struct AreaSpan {
    ptr: *mut u8,
    len: usize,
}

impl AuxMemory {
    fn new(mut aux: Aux<memmap2::MmapMut>) -> AuxMemory {
        let area = &mut aux.nic_region_mut()[AUX_PRIMARY_AREA_OFFSET..];
        let span = AreaSpan {
            ptr: area.as_mut_ptr(),
            len: area.len(),
        };
        // Moving `aux` moves the `MmapMut` handle, not the mapping: the pointer stays valid.
        AuxMemory(RefCell::new(aux), span)
    }
}

impl RegionMemory for AuxMemory {
    fn with_bytes(&self, f: &mut dyn FnMut(&mut [u8])) {
        f(&mut self.0.borrow_mut().nic_region_mut()[AUX_PRIMARY_AREA_OFFSET..]);
    }

    fn stable_span(&self) -> Option<StableSpan> {
        let AreaSpan { ptr, len } = self.1;
        // SAFETY: the area lies in the aux's mapping, which `Aux` owns for as long as this value
        // lives and never replaces; the aux reads the area back only through checksummed
        // decoding (the heartbeat here, the entries at the DR), which is what the device
        // writing concurrently requires.
        (len > 0).then(|| unsafe { StableSpan::new(ptr, len) })
    }
}

struct AuxNode {
    aux: Rc<AuxMemory>,
    /// The primary's grants, revoked at fencing.
    /// The primary's grants (table, key, and the queue pair that carries its writes, which
    /// must stay alive while the primary uses it), revoked at fencing; entries whose queue pair
    /// went down are dropped at the next connection.
    primary_grants: Vec<(Rc<RegionTable>, u32, QueuePair)>,
    watchers: Vec<QueuePair>,
    primary_connections: u64,
    /// A notice not yet delivered because no DR was connected.
    pending_notice: Option<Notice>,
}

pub async fn run_aux(options: AuxOptions) -> Result<(), String> {
    options
        .geometry
        .validate()
        .map_err(|error| format!("invalid geometry: {error}"))?;
    std::fs::create_dir_all(&options.state_dir)
        .map_err(|error| format!("cannot create {}: {error}", options.state_dir.display()))?;
    let transport = Transport::open(
        &options.transport,
        &options.geometry,
        ordinal_proto::primary::PAYLOAD_WRITES_INFLIGHT_DEFAULT,
    )?;
    let path = options.state_dir.join("aux-table.region");
    // The aux role owns its mapping (the transport reaches it through the role).
    let map = map_file(&path, aux_region_bytes(options.geometry.table_slots) as u64)?;
    let config = AuxConfig {
        geometry: options.geometry,
        heartbeat_timeout_ns: options.heartbeat_timeout.as_nanos() as u64,
    };
    let aux = Aux::open(config, map, options.epoch, crate::now_ns())
        .map_err(|error| format!("aux table {}: {error:?}", path.display()))?;
    let node = Rc::new(RefCell::new(AuxNode {
        aux: Rc::new(AuxMemory::new(aux)),
        primary_grants: Vec::new(),
        watchers: Vec::new(),
        primary_connections: 0,
        pending_notice: None,
    }));

    let listener = crate::listen_exclusive(options.listen)
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    let local = listener.local_addr().map_err(|error| error.to_string())?;
    let (inputs, senders) = admin::inputs::<()>("aux", Duration::from_millis(5));
    let geometry = options.geometry;
    let area_bytes = aux_primary_area_bytes(geometry.table_slots) as u64;
    let decide_node = node.clone();
    let decide: admin::Decide = Rc::new(move |hello, table| {
        let node = decide_node.borrow();
        let aux = node.aux.0.borrow();
        // The aux holds only the status table: of the geometry, only its slot count matters.
        if let Some(theirs) = hello.info.geometry {
            if theirs.table_slots != geometry.table_slots {
                return Err(format!(
                    "status table slots differ: {} here, {} on the peer",
                    geometry.table_slots, theirs.table_slots
                )
                .into());
            }
        }
        let memory: Rc<dyn RegionMemory> = node.aux.clone();
        let descriptor = match (hello.role, hello.purpose) {
            (Role::Primary, Purpose::AuxTable) => {
                if let Some(cause) = aux.fenced() {
                    return Err(Refusal {
                        why: format!("the primary of epoch {} is fenced ({cause:?})", aux.epoch()),
                        fenced_at: Some(aux.epoch()),
                    });
                }
                if hello.info.epoch != aux.epoch() {
                    return Err(format!(
                        "the aux serves epoch {}, the primary speaks epoch {}",
                        aux.epoch(),
                        hello.info.epoch
                    )
                    .into());
                }
                table.try_register(memory, area_bytes, ACCESS_REMOTE_WRITE)?
            }
            (Role::Dr, Purpose::AuxWatch) => {
                table.try_register(memory, area_bytes, ACCESS_REMOTE_READ)?
            }
            (role, purpose) => {
                return Err(format!(
                    "the aux does not serve {} connections for {purpose:?}",
                    role.name()
                )
                .into())
            }
        };
        Ok(Grant {
            info: NodeInfo {
                geometry: None,
                epoch: aux.epoch(),
            },
            descriptors: vec![descriptor],
        })
    });
    glommio::spawn_local(admin::accept_loop(
        listener,
        senders.accept_context(Role::Aux, &options.psk, decide, &transport),
    ))
    .detach();
    admin::announce(Role::Aux, "listening on", local);

    loop {
        let input = inputs.next().await;
        let now = crate::now_ns();
        match input {
            Input::Accepted(accepted) => {
                let mut node = node.borrow_mut();
                let qp = match accepted.qp.start() {
                    Ok(qp) => qp,
                    Err(error) => {
                        crate::log!("aux: cannot start a queue pair: {error}");
                        continue;
                    }
                };
                match accepted.hello.purpose {
                    Purpose::AuxTable => {
                        let rkey = accepted.regions.descriptors()[0].rkey;
                        node.primary_grants.retain(|(_, _, qp)| !qp.is_down());
                        node.primary_grants.push((accepted.regions, rkey, qp));
                        node.primary_connections += 1;
                        node.aux.0.borrow_mut().handle_primary_connected(now);
                        crate::log!("aux: primary connected");
                    }
                    _ => {
                        if let Some(notice) = node.pending_notice.take() {
                            let _ = qp.post_send(0, &notice.encode());
                        }
                        node.watchers.retain(|watcher| !watcher.is_down());
                        node.watchers.push(qp);
                        crate::log!("aux: DR connected");
                    }
                }
            }
            Input::Transport(TransportEvent::Received { qp, bytes }) => {
                match Notice::decode(&bytes) {
                    Ok(Notice::FenceRequest) => {
                        let (handover_at, epoch, watcher) = {
                            let node = node.borrow();
                            let mut aux = node.aux.0.borrow_mut();
                            let handover_at = aux.handle_fence_request(now);
                            let watcher = node.watchers.iter().find(|w| w.id() == qp).cloned();
                            (handover_at, aux.epoch(), watcher)
                        };
                        crate::log!("aux: the DR asked to fence the primary of epoch {epoch}");
                        if let Some(watcher) = watcher {
                            glommio::spawn_local(async move {
                                // The table is handed over only once the primary's lease has surely
                                // run out, so it cannot change or be acted on any more.
                                let wait = handover_at.saturating_sub(crate::now_ns());
                                glommio::timer::sleep(Duration::from_nanos(wait)).await;
                                let _ =
                                    watcher.post_send(0, &Notice::TableFrozen { epoch }.encode());
                            })
                            .detach();
                        }
                    }
                    Ok(other) => {
                        crate::log!("aux: ignoring unexpected notice {other:?} from the DR")
                    }
                    Err(error) => crate::log!("aux: ignoring a bad message from the DR: {error}"),
                }
            }
            Input::Transport(TransportEvent::Down { qp, reason }) => {
                crate::log!("aux: connection {qp} closed: {reason}");
                node.borrow_mut()
                    .watchers
                    .retain(|watcher| watcher.id() != qp);
            }
            Input::Transport(_) => {}
            Input::Admin(request) => {
                let answer = match request.request.as_str() {
                    "status" => status_json(&node.borrow()),
                    other => format!(
                        "{{\"error\":{}}}",
                        admin::json_string(&format!("unknown request {other}"))
                    ),
                };
                let _ = request.answer.send(answer).await;
            }
            Input::Tick => {
                // The heartbeat is watched once a primary has connected to this aux process;
                // before that there is nothing to declare dead (and an operator's fence request
                // still works).
                let node = node.borrow();
                if node.primary_connections > 0 {
                    node.aux.0.borrow_mut().handle_tick(now);
                }
            }
            Input::Local(()) => {}
        }
        execute_actions(&mut node.borrow_mut());
    }
}

fn execute_actions(node: &mut AuxNode) {
    let actions: Vec<AuxAction> = node.aux.0.borrow_mut().drain_actions().collect();
    for action in actions {
        match action {
            AuxAction::RevokePrimaryAccess => {
                for (table, rkey, _) in &node.primary_grants {
                    table.revoke(*rkey);
                }
                crate::log!("aux: the primary's access to the status table is revoked");
            }
            AuxAction::TicksStalled { gap_ns } => crate::log!(
                "aux: this process did not run for {} ms (its ticks were that far apart); the primary's silence then counts only in part",
                gap_ns / 1_000_000
            ),
            AuxAction::NotifyPrimaryLost { epoch } => {
                crate::log!("aux: the primary of epoch {epoch} stopped heartbeating; it is fenced");
                let notice = Notice::PrimaryLost { epoch };
                node.watchers.retain(|watcher| !watcher.is_down());
                if node.watchers.is_empty() {
                    node.pending_notice = Some(notice);
                }
                for watcher in &node.watchers {
                    let _ = watcher.post_send(0, &notice.encode());
                }
            }
        }
    }
}

fn status_json(node: &AuxNode) -> String {
    let aux = node.aux.0.borrow();
    let heartbeat = aux.last_heartbeat().map(|h| h.counter).unwrap_or(0);
    format!(
        "{{\"role\":\"aux\",\"epoch\":{},\"fenced\":{},\"heartbeat\":{},\"primary_connections\":{},\"dr_connected\":{}}}",
        aux.epoch(),
        aux.fenced().is_some(),
        heartbeat,
        node.primary_connections,
        node.watchers.iter().any(|w| !w.is_down())
    )
}
