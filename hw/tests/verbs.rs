//! Hardware tests: they need a real RDMA device (soft-RoCE is enough) named by the
//! environment variable `ORDINAL_RDMA_DEVICE`, e.g. `rxe0`. Without it each test says so on
//! stderr and returns.
//!
//! Every test connects two RC queue pairs of one process to each other over port 1 (a
//! loopback pair: A sends, B is the peer) and checks what the device did: completions,
//! statuses, and the bytes in both sides' registered memory.
//!
//! On a machine without RDMA, build the binary with `cargo test -p ordinal-hw --no-run` and
//! run it where soft-RoCE exists (a guest with `rdma link add rxe0 type rxe netdev eth0`)
//! with `ORDINAL_RDMA_DEVICE=rxe0`; the guest needs libibverbs1 and ibverbs-providers.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ordinal_hw::{
    Access, CompletionChannel, CompletionQueue, Context, Error, GidSelector, LinkLayer,
    MemoryRegion, PageBuffer, PortState, ProtectionDomain, QpCaps, QpState, QueuePair, RawMemory,
    RecvWr, RtrParams, RtsParams, SendOp, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};

const PORT: u8 = 1;
/// How long a test waits for a completion that must come before it calls the device broken.
const COMPLETION_WAIT: Duration = Duration::from_secs(10);

/// The device to test on, or `None` after saying loudly that the test is skipped. Written
/// with `io::stderr()` directly so that the test harness's capture does not hide it.
fn device_name() -> Option<String> {
    match std::env::var("ORDINAL_RDMA_DEVICE") {
        Ok(name) if !name.is_empty() => Some(name),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "\n*** ordinal-hw hardware test skipped: no RDMA device \
                 (set ORDINAL_RDMA_DEVICE, e.g. rxe0) ***"
            );
            None
        }
    }
}

fn say(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "    {message}");
}

/// One side of a loopback pair: a QP with its own send and receive CQs, each with a channel.
struct Side {
    qp: QueuePair,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
}

struct Fixture {
    context: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    gid_index: u8,
    gid: ordinal_hw::Gid,
    lid: u16,
    mtu: ordinal_hw::Mtu,
}

impl Fixture {
    fn open() -> Option<Fixture> {
        let name = device_name()?;
        let context = Context::open(&name).expect("open the RDMA device");
        let port = context.query_port(PORT).expect("query port");
        assert_eq!(
            port.state,
            PortState::Active,
            "{name} port {PORT} not active"
        );
        let selector = match port.link_layer {
            LinkLayer::Ethernet => GidSelector::RoceV2Ipv4,
            _ => GidSelector::Index(0),
        };
        let (gid_index, gid) = context.select_gid(PORT, selector).expect("select GID");
        let pd = ProtectionDomain::new(&context).expect("allocate PD");
        Some(Fixture {
            context,
            pd,
            gid_index,
            gid,
            lid: port.lid,
            mtu: port.active_mtu,
        })
    }

    fn side(&self, caps: QpCaps) -> Side {
        let cq = |entries| {
            let channel = CompletionChannel::new(&self.context).expect("create channel");
            CompletionQueue::new(&self.context, entries, Some(&channel)).expect("create CQ")
        };
        let send_cq = cq(caps.max_send_wr);
        let recv_cq = cq(caps.max_recv_wr);
        let qp = QueuePair::new(&self.pd, &send_cq, &recv_cq, caps).expect("create QP");
        Side {
            qp,
            send_cq,
            recv_cq,
        }
    }

    /// Two sides connected to each other with `rts` timers, both granting remote WRITE and
    /// READ on their responders.
    fn pair(&self, rts: RtsParams) -> (Side, Side) {
        let mut a = self.side(QpCaps::default());
        let mut b = self.side(QpCaps::default());
        let access = Access::REMOTE_WRITE | Access::REMOTE_READ;
        a.qp.to_init(PORT, access).expect("A to INIT");
        b.qp.to_init(PORT, access).expect("B to INIT");
        let a_end = a.qp.endpoint(self.gid, self.lid);
        let b_end = b.qp.endpoint(self.gid, self.lid);
        a.qp.to_rtr(&RtrParams::new(b_end, self.mtu, self.gid_index))
            .expect("A to RTR");
        b.qp.to_rtr(&RtrParams::new(a_end, self.mtu, self.gid_index))
            .expect("B to RTR");
        a.qp.to_rts(&rts).expect("A to RTS");
        b.qp.to_rts(&rts).expect("B to RTS");
        (a, b)
    }

    fn region(&self, len: usize, access: Access, fill: u8) -> MemoryRegion<PageBuffer> {
        let mut region = MemoryRegion::new(&self.pd, PageBuffer::new(len).unwrap(), access)
            .expect("register region");
        region.write(0, &vec![fill; region.len()]);
        region
    }
}

/// Collects exactly `n` completions from `cq`, sleeping on its channel between polls, and
/// checks that no more arrive right after. Uses the arm-then-poll order of
/// ibv_get_cq_event(3), so a completion that lands just before arming is not missed.
fn completions(cq: &CompletionQueue, n: usize) -> Vec<WorkCompletion> {
    let deadline = Instant::now() + COMPLETION_WAIT;
    let mut got = Vec::new();
    let mut buffer = [WorkCompletion::default(); 16];
    loop {
        let k = cq.poll(&mut buffer).expect("poll CQ");
        got.extend_from_slice(&buffer[..k]);
        if got.len() >= n {
            break;
        }
        if k > 0 {
            continue;
        }
        cq.arm().expect("arm CQ");
        let k = cq.poll(&mut buffer).expect("poll CQ");
        got.extend_from_slice(&buffer[..k]);
        if got.len() >= n {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            cq.wait_event(Some(remaining)).expect("wait for CQ event"),
            "timed out with {} of {n} completions: {got:?}",
            got.len()
        );
    }
    assert_eq!(got.len(), n, "more completions than expected: {got:?}");
    // Nothing further is pending.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        cq.poll(&mut buffer).unwrap(),
        0,
        "an extra completion arrived"
    );
    got
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn bytes(
    region: &MemoryRegion<impl ordinal_hw::RegionBuffer>,
    offset: usize,
    len: usize,
) -> Vec<u8> {
    let mut out = vec![0; len];
    region.read(offset, &mut out);
    out
}

#[test]
fn device_port_and_gid_are_reported() {
    // Opens the device and checks what ordinal relies on: an active port, its MTU, and a
    // RoCE v2 IPv4 GID on an Ethernet link layer.
    let Some(name) = device_name() else { return };
    let devices = ordinal_hw::Device::list().unwrap();
    say(format_args!("devices: {devices:?}"));
    assert!(devices.iter().any(|d| d.name == name));
    let context = Context::open(&name).unwrap();
    let port = context.query_port(PORT).unwrap();
    say(format_args!("{name} port {PORT}: {port:?}"));
    say(format_args!("attributes: {:?}", context.attributes()));
    assert_eq!(port.state, PortState::Active);
    if port.link_layer == LinkLayer::Ethernet {
        let entry = context.roce_v2_ipv4_gid(PORT).unwrap();
        say(format_args!("RoCE v2 IPv4 GID: {entry:?}"));
        assert!(entry.gid.is_ipv4_mapped());
    }
    let err = Context::open("ordinal-missing0").unwrap_err();
    say(format_args!("missing device: {err}"));
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn transitions_are_checked_and_failures_name_the_transition() {
    // Walks a QP through RESET->INIT->RTR->RTS, checking the device's state after each
    // step; an out-of-order transition is refused without calling the verb, and a transition
    // the device rejects names itself and its errno and leaves the state unchanged.
    let Some(fx) = Fixture::open() else { return };
    let mut side = fx.side(QpCaps::default());
    let peer = fx.side(QpCaps::default());
    say(format_args!(
        "requested {} granted {}",
        side.qp.requested_caps(),
        side.qp.caps()
    ));
    assert_eq!(side.qp.state().unwrap(), QpState::Reset);
    let remote = peer.qp.endpoint(fx.gid, fx.lid);
    let err = side
        .qp
        .to_rtr(&RtrParams::new(remote, fx.mtu, fx.gid_index))
        .unwrap_err();
    assert!(
        matches!(err, Error::BadTransition { .. }),
        "expected a refused transition: {err}"
    );
    say(format_args!("{err}"));

    side.qp.to_init(PORT, Access::REMOTE_WRITE).unwrap();
    assert_eq!(side.qp.state().unwrap(), QpState::Init);
    // GID index 250 does not exist: the device refuses the address vector.
    let err = side
        .qp
        .to_rtr(&RtrParams::new(remote, fx.mtu, 250))
        .unwrap_err();
    say(format_args!("{err}"));
    match &err {
        Error::ModifyQp { transition, errno } => {
            assert_eq!(transition.to_string(), "INIT->RTR");
            assert!(errno.0 > 0);
        }
        other => panic!("expected ModifyQp, got {other}"),
    }
    assert!(err
        .to_string()
        .starts_with("ibv_modify_qp INIT->RTR failed: "));
    assert_eq!(
        side.qp.state().unwrap(),
        QpState::Init,
        "failed modify changed state"
    );

    side.qp
        .to_rtr(&RtrParams::new(remote, fx.mtu, fx.gid_index))
        .unwrap();
    assert_eq!(side.qp.state().unwrap(), QpState::Rtr);
    side.qp.to_rts(&RtsParams::default()).unwrap();
    assert_eq!(side.qp.state().unwrap(), QpState::Rts);
    side.qp.to_error().unwrap();
    assert_eq!(side.qp.state().unwrap(), QpState::Error);
}

#[test]
fn send_and_send_with_imm_are_received_with_completions() {
    // B posts two receives; A SENDs 100 bytes, then SEND_WITH_IMM 200 bytes. Both sides get
    // completions (waited for through the completion channels) and B's buffers hold A's
    // bytes, with the immediate delivered in host order.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, mut b) = fx.pair(RtsParams::default());
    let mut a_mem = fx.region(8192, Access::NONE, 0);
    let b_mem = fx.region(8192, Access::LOCAL_WRITE, 0);
    a_mem.write(0, &pattern(100, 1));
    a_mem.write(4096, &pattern(200, 2));
    // The channel fds are non-blocking, so a reactor can wait on them; with nothing queued,
    // taking an event returns at once.
    for cq in [&a.send_cq, &b.recv_cq] {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&**cq.channel().unwrap());
        // SAFETY: F_GETFL on a descriptor the channel owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert!(flags & libc::O_NONBLOCK != 0, "channel fd {fd} blocks");
        assert!(!cq.try_get_event().unwrap());
    }
    let started = Instant::now();
    // SAFETY: both regions outlive the completions polled below.
    unsafe {
        b.qp.post_recv(&[
            RecvWr {
                wr_id: 10,
                sges: &[b_mem.sge(0, 4096)],
            },
            RecvWr {
                wr_id: 11,
                sges: &[b_mem.sge(4096, 4096)],
            },
        ])
        .unwrap();
        a.qp.post_send(&[
            SendWr::new(1, SendOp::Send, &[a_mem.sge(0, 100)]).signaled(),
            SendWr::new(2, SendOp::SendWithImm(0xdead_beef), &[a_mem.sge(4096, 200)]).signaled(),
        ])
        .unwrap();
    }
    let sent = completions(&a.send_cq, 2);
    let received = completions(&b.recv_cq, 2);
    say(format_args!(
        "send+recv completions in {:?}",
        started.elapsed()
    ));
    assert!(
        sent.iter().all(|wc| wc.status == WcStatus::Success),
        "{sent:?}"
    );
    assert_eq!(
        sent.iter()
            .map(|wc| (wc.wr_id, wc.opcode))
            .collect::<Vec<_>>(),
        vec![(1, Some(WcOpcode::Send)), (2, Some(WcOpcode::Send))]
    );
    assert_eq!(received[0].wr_id, 10);
    assert_eq!(received[0].status, WcStatus::Success);
    assert_eq!(received[0].opcode, Some(WcOpcode::Recv));
    assert_eq!(received[0].byte_len, 100);
    assert_eq!(received[0].imm_data, None);
    assert_eq!(received[0].qp_num, b.qp.qp_num());
    assert_eq!(received[1].wr_id, 11);
    assert_eq!(received[1].byte_len, 200);
    assert_eq!(received[1].imm_data, Some(0xdead_beef));
    assert_eq!(bytes(&b_mem, 0, 100), pattern(100, 1));
    assert_eq!(bytes(&b_mem, 4096, 200), pattern(200, 2));
    assert_eq!(
        bytes(&b_mem, 200, 8),
        vec![0; 8],
        "bytes past the message changed"
    );
}

#[test]
fn inline_send_buffer_is_free_when_post_returns() {
    // An inline SEND's payload is copied into the work request: A sends from an unregistered
    // stack buffer (its lkey is not checked) and overwrites it right after posting; B
    // receives the original bytes.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, mut b) = fx.pair(RtsParams::default());
    let inline_max = a.qp.caps().max_inline_data;
    say(format_args!("granted max_inline_data {inline_max}"));
    assert!(inline_max >= 64);
    let b_mem = fx.region(4096, Access::LOCAL_WRITE, 0);
    let mut message = [0u8; 64];
    message.copy_from_slice(&pattern(64, 9));
    let sge = Sge {
        addr: message.as_ptr() as u64,
        len: 64,
        lkey: 0,
    };
    // SAFETY: B's region outlives its completion; the inline buffer may be reused on return.
    unsafe {
        b.qp.post_recv(&[RecvWr {
            wr_id: 7,
            sges: &[b_mem.sge(0, 4096)],
        }])
        .unwrap();
        a.qp.post_send(&[SendWr::new(3, SendOp::Send, &[sge]).signaled().inline()])
            .unwrap();
    }
    message.fill(0xee);
    std::hint::black_box(&message);
    let sent = completions(&a.send_cq, 1);
    let received = completions(&b.recv_cq, 1);
    assert_eq!(sent[0].status, WcStatus::Success);
    assert_eq!(
        (received[0].status, received[0].byte_len),
        (WcStatus::Success, 64)
    );
    assert_eq!(bytes(&b_mem, 0, 64), pattern(64, 9));
}

#[test]
fn write_and_write_with_imm_place_data_and_deliver_the_immediate() {
    // A WRITEs 4 KiB into B's region (B's CPU posts nothing), then WRITE_WITH_IMMs 512 bytes
    // elsewhere, which consumes a receive at B (posted with no SGE) whose completion carries
    // the immediate and the length, after the data is in place.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, mut b) = fx.pair(RtsParams::default());
    let mut a_mem = fx.region(16384, Access::NONE, 0);
    let b_mem = fx.region(16384, Access::LOCAL_WRITE | Access::REMOTE_WRITE, 0);
    a_mem.write(0, &pattern(4096, 3));
    a_mem.write(4096, &pattern(512, 4));
    let remote = b_mem.remote();
    let started = Instant::now();
    // SAFETY: both regions outlive the completions polled below.
    unsafe {
        a.qp.post_send(&[SendWr::new(
            20,
            SendOp::RdmaWrite(remote.at(0, 4096)),
            &[a_mem.sge(0, 4096)],
        )
        .signaled()])
            .unwrap();
    }
    let wrote = completions(&a.send_cq, 1);
    assert_eq!(wrote[0].status, WcStatus::Success);
    assert_eq!(wrote[0].opcode, Some(WcOpcode::RdmaWrite));
    assert_eq!(bytes(&b_mem, 0, 4096), pattern(4096, 3));
    assert_eq!(
        b.recv_cq.poll(&mut [WorkCompletion::default(); 4]).unwrap(),
        0
    );

    // SAFETY: as above; the receive names no memory.
    unsafe {
        b.qp.post_recv(&[RecvWr {
            wr_id: 30,
            sges: &[],
        }])
        .unwrap();
        a.qp.post_send(&[SendWr::new(
            21,
            SendOp::RdmaWriteWithImm(remote.at(8192, 512), 0x00c0_ffee),
            &[a_mem.sge(4096, 512)],
        )
        .signaled()])
            .unwrap();
    }
    let received = completions(&b.recv_cq, 1);
    say(format_args!(
        "WRITE + WRITE_WITH_IMM in {:?}",
        started.elapsed()
    ));
    assert_eq!(received[0].status, WcStatus::Success);
    assert_eq!(received[0].opcode, Some(WcOpcode::RecvRdmaWithImm));
    assert_eq!(received[0].imm_data, Some(0x00c0_ffee));
    assert_eq!(received[0].byte_len, 512);
    assert_eq!(bytes(&b_mem, 8192, 512), pattern(512, 4));
    assert_eq!(completions(&a.send_cq, 1)[0].status, WcStatus::Success);
    assert_eq!(bytes(&b_mem, 8192 + 512, 64), vec![0; 64]);
}

#[test]
fn read_fetches_remote_bytes() {
    // A READs 3000 bytes at offset 1000 of B's region (REMOTE_READ only) into its own
    // region (LOCAL_WRITE).
    let Some(fx) = Fixture::open() else { return };
    let (mut a, _b) = fx.pair(RtsParams::default());
    let a_mem = fx.region(4096, Access::LOCAL_WRITE, 0);
    let mut b_mem = fx.region(8192, Access::REMOTE_READ, 0);
    b_mem.write(1000, &pattern(3000, 5));
    // SAFETY: both regions outlive the completion polled below.
    unsafe {
        a.qp.post_send(&[SendWr::new(
            40,
            SendOp::RdmaRead(b_mem.remote().at(1000, 3000)),
            &[a_mem.sge(0, 3000)],
        )
        .signaled()])
            .unwrap();
    }
    let read = completions(&a.send_cq, 1);
    assert_eq!(read[0].status, WcStatus::Success);
    assert_eq!(read[0].opcode, Some(WcOpcode::RdmaRead));
    assert_eq!(read[0].byte_len, 3000);
    assert_eq!(bytes(&a_mem, 0, 3000), pattern(3000, 5));
    assert_eq!(bytes(&a_mem, 3000, 96), vec![0; 96]);
}

#[test]
fn doorbell_batch_with_selective_signaling() {
    // One post of 64 WRITEs, only the last signaled, gives exactly one completion (the last
    // one's) and all 64 writes in place. Then one post of 8 receives and one post of 8
    // signaled SENDs complete in posting order on both sides.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, mut b) = fx.pair(RtsParams::default());
    let mut a_mem = fx.region(65536, Access::NONE, 0);
    let b_mem = fx.region(65536, Access::LOCAL_WRITE | Access::REMOTE_WRITE, 0);
    const WRITES: usize = 64;
    const SLOT: usize = 1024;
    for i in 0..WRITES {
        a_mem.write(i * SLOT, &pattern(SLOT, i as u8));
    }
    let sges: Vec<[Sge; 1]> = (0..WRITES)
        .map(|i| [a_mem.sge(i * SLOT, SLOT as u32)])
        .collect();
    let remote = b_mem.remote();
    let batch: Vec<SendWr<'_>> = (0..WRITES)
        .map(|i| {
            let wr = SendWr::new(
                100 + i as u64,
                SendOp::RdmaWrite(remote.at((i * SLOT) as u64, SLOT as u32)),
                &sges[i],
            );
            if i == WRITES - 1 {
                wr.signaled()
            } else {
                wr
            }
        })
        .collect();
    let started = Instant::now();
    // SAFETY: both regions outlive the completion polled below, which retires all 64.
    unsafe { a.qp.post_send(&batch).unwrap() };
    let done = completions(&a.send_cq, 1);
    say(format_args!(
        "{WRITES} x {SLOT} B writes, one doorbell, in {:?}",
        started.elapsed()
    ));
    assert_eq!(done[0].wr_id, 100 + WRITES as u64 - 1);
    assert_eq!(done[0].status, WcStatus::Success);
    for i in 0..WRITES {
        assert_eq!(
            bytes(&b_mem, i * SLOT, SLOT),
            pattern(SLOT, i as u8),
            "write {i}"
        );
    }

    let recv_sges: Vec<[Sge; 1]> = (0..8).map(|i| [b_mem.sge(i * 64, 64)]).collect();
    let receives: Vec<RecvWr<'_>> = (0..8)
        .map(|i| RecvWr {
            wr_id: 200 + i as u64,
            sges: &recv_sges[i],
        })
        .collect();
    let send_sges: Vec<[Sge; 1]> = (0..8).map(|i| [a_mem.sge(i * SLOT, 16)]).collect();
    let sends: Vec<SendWr<'_>> = (0..8)
        .map(|i| {
            SendWr::new(300 + i as u64, SendOp::SendWithImm(i as u32), &send_sges[i]).signaled()
        })
        .collect();
    // SAFETY: as above.
    unsafe {
        b.qp.post_recv(&receives).unwrap();
        a.qp.post_send(&sends).unwrap();
    }
    let sent = completions(&a.send_cq, 8);
    let received = completions(&b.recv_cq, 8);
    for i in 0..8 {
        assert_eq!(sent[i].wr_id, 300 + i as u64);
        assert_eq!(sent[i].status, WcStatus::Success);
        assert_eq!(received[i].wr_id, 200 + i as u64);
        assert_eq!(received[i].imm_data, Some(i as u32));
        assert_eq!(received[i].byte_len, 16);
        assert_eq!(bytes(&b_mem, i * 64, 16), pattern(16, i as u8));
    }
}

#[test]
fn write_outside_the_remote_region_fails_and_changes_nothing() {
    // B registers only the first 4 KiB of an 8 KiB buffer. A WRITE of 16 bytes straddling
    // the region's end fails with a remote access error, and not one byte of B's buffer —
    // inside or outside the region — changes. A's QP is left in the error state.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, _b) = fx.pair(RtsParams::default());
    let a_mem = fx.region(4096, Access::NONE, 0x11);
    let backing = PageBuffer::new(8192).unwrap();
    let backing_ptr = ordinal_hw::RegionBuffer::as_mut_ptr(&backing);
    // SAFETY: the first 4 KiB of `backing`, which outlives the region (declared after it,
    // dropped before it) and is only read through raw copies below.
    let b_mem = MemoryRegion::new(
        &fx.pd,
        unsafe { RawMemory::new(backing_ptr, 4096) },
        Access::LOCAL_WRITE | Access::REMOTE_WRITE,
    )
    .unwrap();
    // SAFETY: `backing` is 8192 bytes and no work request targets it yet.
    unsafe { std::ptr::write_bytes(backing_ptr, 0x5a, 8192) };
    let remote = b_mem.remote();
    let outside = ordinal_hw::RemoteAddr {
        addr: remote.addr + remote.len - 8,
        rkey: remote.rkey,
    };
    // SAFETY: A's region outlives the completion polled below.
    unsafe {
        a.qp.post_send(&[
            SendWr::new(50, SendOp::RdmaWrite(outside), &[a_mem.sge(0, 16)]).signaled(),
        ])
        .unwrap();
    }
    let failed = completions(&a.send_cq, 1);
    say(format_args!("straddling WRITE: {}", failed[0].status));
    assert_eq!(failed[0].wr_id, 50);
    assert_eq!(failed[0].status, WcStatus::RemAccessErr);
    let mut after = vec![0u8; 8192];
    // SAFETY: in bounds of `backing`; the failed request is complete.
    unsafe { std::ptr::copy_nonoverlapping(backing_ptr, after.as_mut_ptr(), 8192) };
    assert!(after.iter().all(|&b| b == 0x5a), "B's memory changed");
    assert_eq!(a.qp.state().unwrap(), QpState::Error);
    drop(b_mem);
    drop(backing);
}

#[test]
fn error_state_flushes_later_requests_without_executing_them() {
    // After one WRITE lands, A is forced to ERR. Two WRITEs posted afterwards (the first
    // unsignaled) both complete with a flush error, in order, and neither changes B's memory.
    let Some(fx) = Fixture::open() else { return };
    let (mut a, _b) = fx.pair(RtsParams::default());
    let mut a_mem = fx.region(4096, Access::NONE, 0x77);
    let b_mem = fx.region(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE, 0);
    let remote = b_mem.remote();
    // SAFETY: both regions outlive the completions polled below.
    unsafe {
        a.qp.post_send(&[SendWr::new(
            60,
            SendOp::RdmaWrite(remote.at(0, 64)),
            &[a_mem.sge(0, 64)],
        )
        .signaled()])
            .unwrap();
    }
    assert_eq!(completions(&a.send_cq, 1)[0].status, WcStatus::Success);
    assert_eq!(bytes(&b_mem, 0, 64), vec![0x77; 64]);

    a.qp.to_error().unwrap();
    assert_eq!(a.qp.state().unwrap(), QpState::Error);
    a_mem.write(0, &[0x99; 4096]);
    // SAFETY: as above.
    unsafe {
        a.qp.post_send(&[
            SendWr::new(
                61,
                SendOp::RdmaWrite(remote.at(1024, 64)),
                &[a_mem.sge(0, 64)],
            ),
            SendWr::new(
                62,
                SendOp::RdmaWrite(remote.at(2048, 64)),
                &[a_mem.sge(0, 64)],
            )
            .signaled(),
        ])
        .unwrap();
    }
    let flushed = completions(&a.send_cq, 2);
    say(format_args!("after to_error: {flushed:?}"));
    assert_eq!(
        flushed
            .iter()
            .map(|wc| (wc.wr_id, wc.status))
            .collect::<Vec<_>>(),
        vec![(61, WcStatus::WrFlushErr), (62, WcStatus::WrFlushErr)]
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(bytes(&b_mem, 0, 64), vec![0x77; 64]);
    assert_eq!(
        bytes(&b_mem, 64, 4096 - 64),
        vec![0; 4096 - 64],
        "a flushed write landed"
    );
}

#[test]
fn send_without_a_receive_fails_after_bounded_rnr_retries() {
    // B posts no receive. A's SEND is refused with RNR NAKs carrying B's min_rnr_timer
    // (default 40.96 ms); after the default 6 retries it fails with RnrRetryExcErr, within
    // four times the nominal 7 × 40.96 ms, and B's memory is untouched.
    let Some(fx) = Fixture::open() else { return };
    let rts = RtsParams::default();
    let (mut a, b) = fx.pair(rts);
    let a_mem = fx.region(4096, Access::NONE, 0x31);
    let started = Instant::now();
    // SAFETY: A's region outlives the completion polled below.
    unsafe {
        a.qp.post_send(&[SendWr::new(80, SendOp::Send, &[a_mem.sge(0, 32)]).signaled()])
            .unwrap();
    }
    let failed = completions(&a.send_cq, 1);
    let elapsed = started.elapsed();
    let nominal = rts.rnr_stall_nominal(ordinal_hw::qp::DEFAULT_MIN_RNR_TIMER);
    say(format_args!(
        "no receive posted: {} after {elapsed:?} (nominal {nominal:?})",
        failed[0].status
    ));
    assert_eq!(failed[0].status, WcStatus::RnrRetryExcErr);
    assert!(elapsed <= nominal * 4, "RNR stall took {elapsed:?}");
    assert_eq!(
        b.recv_cq.poll(&mut [WorkCompletion::default(); 4]).unwrap(),
        0
    );
}

#[test]
fn dead_peer_with_default_timers_surfaces_within_the_default_bound() {
    // The defaults' promise: 7 × 67.1 ms = 470 ms nominal, 1.88 s bound.
    dead_peer_case("defaults, peer QP destroyed", RtsParams::default(), |b| {
        drop(b);
        None
    });
}

/// Connects a pair with `rts` timers, lets one WRITE succeed, removes B with `kill_peer`, and
/// measures how long A's next WRITE takes to fail. It must fail with RetryExcErr within the
/// bound `RtsParams::dead_peer_bound` promises, and the waiting is done on the channel.
fn dead_peer_case(what: &str, rts: RtsParams, kill_peer: impl FnOnce(Side) -> Option<Side>) {
    let Some(fx) = Fixture::open() else { return };
    let (mut a, b) = fx.pair(rts);
    let a_mem = fx.region(4096, Access::NONE, 0x42);
    let b_mem = fx.region(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE, 0);
    let remote = b_mem.remote();
    // SAFETY: both regions outlive the completions polled below.
    unsafe {
        a.qp.post_send(&[SendWr::new(
            70,
            SendOp::RdmaWrite(remote.at(0, 64)),
            &[a_mem.sge(0, 64)],
        )
        .signaled()])
            .unwrap();
    }
    assert_eq!(completions(&a.send_cq, 1)[0].status, WcStatus::Success);

    let _kept = kill_peer(b);
    let started = Instant::now();
    // SAFETY: as above.
    unsafe {
        a.qp.post_send(&[SendWr::new(
            71,
            SendOp::RdmaWrite(remote.at(64, 64)),
            &[a_mem.sge(0, 64)],
        )
        .signaled()])
            .unwrap();
    }
    let failed = completions(&a.send_cq, 1);
    let elapsed = started.elapsed();
    say(format_args!(
        "dead peer ({what}): {} after {elapsed:?} (nominal {:?}, bound {:?})",
        failed[0].status,
        rts.dead_peer_nominal(),
        rts.dead_peer_bound()
    ));
    assert_eq!(failed[0].wr_id, 71);
    assert_eq!(failed[0].status, WcStatus::RetryExcErr);
    assert!(
        elapsed <= rts.dead_peer_bound(),
        "dead peer took {elapsed:?}, bound {:?}",
        rts.dead_peer_bound()
    );
    assert_eq!(a.qp.state().unwrap(), QpState::Error);
    assert_eq!(bytes(&b_mem, 64, 64), vec![0; 64]);
}

#[test]
fn dead_peer_destroyed_surfaces_within_the_bound() {
    // The peer QP is destroyed: its QP number no longer exists, so A's packets are dropped.
    dead_peer_case("peer QP destroyed", short_timers(), |b| {
        drop(b);
        None
    });
}

#[test]
fn dead_peer_reset_surfaces_within_the_bound() {
    // The peer QP is moved to RESET: it exists but answers nothing.
    dead_peer_case("peer QP reset", short_timers(), |mut b| {
        b.qp.to_reset().unwrap();
        assert_eq!(b.qp.state().unwrap(), QpState::Reset);
        Some(b)
    });
}

/// 4.096 µs × 2^12 = 16.8 ms per timeout, 3 retries: 67 ms nominal, 268 ms promised.
fn short_timers() -> RtsParams {
    RtsParams {
        timeout: 12,
        retry_cnt: 3,
        ..RtsParams::default()
    }
}
