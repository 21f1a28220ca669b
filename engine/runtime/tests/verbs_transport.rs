//! Hardware tests of the verbs backend of the transport: they need an RDMA device (soft-RoCE is
//! enough) named by the environment variable `ORDINAL_RDMA_DEVICE`, e.g. `rxe0`. Without it
//! each test says loudly on stderr that it is skipped and returns.
//!
//! Every test runs one glommio executor in which two queue pairs of this process are connected
//! to each other through the real endpoint exchange over a loopback TCP connection: A is the
//! client, B the server. B's regions are memory-mapped files registered in a verbs
//! `RegionTable`, as the DR's ring and the aux's table are. The tests check the events each
//! side gets, in order, the bytes in B's memory, and that each queue pair's completion-event
//! thread ends after the pair is gone. They run one at a time.
//!
//! Build with `cargo test -p ordinal-runtime --features verbs --no-run` and run the binary where
//! soft-RoCE exists, with `ulimit -l unlimited` (regions are pinned) and
//! `ORDINAL_RDMA_DEVICE=rxe0`.
#![cfg(feature = "verbs")]

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};
use ordinal_runtime::storage::{open_region, MappedRegion};
use ordinal_runtime::transport::{
    Opcode, PostError, QueuePair, RegionDescriptor, RegionMemory, RegionTable, TransportEvent,
    WorkStatus, ACCESS_REMOTE_READ, ACCESS_REMOTE_WRITE,
};
use ordinal_runtime::verbs::{
    completion_threads_live, Side, VerbsConfig, VerbsDomain, HELPER_WAIT, MESSAGE_BYTES_MAX,
    RECV_BUFFER_BYTES,
};

/// Room for every event a test can leave unread.
const EVENTS_MAX: usize = 4096;
/// How long a test waits for an event that must come before calling the transport broken.
const EVENT_WAIT: Duration = Duration::from_secs(10);

fn device_name() -> Option<String> {
    match std::env::var("ORDINAL_RDMA_DEVICE") {
        Ok(name) if !name.is_empty() => Some(name),
        _ => {
            // Straight to stderr: the test harness's capture would hide eprintln!.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** ordinal-runtime verbs transport test skipped: no RDMA device \
                 (set ORDINAL_RDMA_DEVICE, e.g. rxe0) ***"
            );
            None
        }
    }
}

fn say(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "    {message}");
}

/// Runs `test` on a fresh glommio executor with the device's domain, if there is a device,
/// then checks that every queue pair's completion-event thread ended. Tests run one at a time
/// (the thread count is per process).
fn run<F, Fut>(test: F)
where
    F: FnOnce(Rc<VerbsDomain>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let Some(name) = device_name() else { return };
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A failed earlier test may have left threads that are still ending.
    let deadline = Instant::now() + HELPER_WAIT * 3;
    while completion_threads_live() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("verbs-test")
        .spawn(move || async move {
            let domain = VerbsDomain::open(&name).expect("open the RDMA device");
            test(domain).await;
            // The test's queue pairs are dropped: their pollers deliver their last events and
            // end, and then their helper threads, within HELPER_WAIT.
            let deadline = Instant::now() + HELPER_WAIT * 3;
            while completion_threads_live() > 0 && Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        })
        .expect("start a glommio executor")
        .join()
        .expect("the test's executor panicked");
    assert_eq!(
        completion_threads_live(),
        0,
        "completion-event threads outlived their queue pairs"
    );
}

/// One side of a connected pair.
struct End {
    qp: QueuePair,
    events: LocalReceiver<TransportEvent>,
}

impl End {
    async fn next(&self) -> TransportEvent {
        let wait = async {
            glommio::timer::sleep(EVENT_WAIT).await;
            None
        };
        match futures_lite::future::or(self.events.recv(), wait).await {
            Some(event) => event,
            None => panic!("qp {}: no event within {EVENT_WAIT:?}", self.qp.id()),
        }
    }

    /// The next event, which must be the completion of `wr_id` with `status`; returns its data.
    async fn completion(&self, wr_id: u64, status: WorkStatus) -> Option<Vec<u8>> {
        match self.next().await {
            TransportEvent::Completion {
                wr_id: got,
                status: got_status,
                data,
                qp,
                ..
            } if got == wr_id && got_status == status && qp == self.qp.id() => data,
            other => panic!("expected completion of {wr_id} with {status:?}, got {other:?}"),
        }
    }

    async fn down(&self) -> String {
        match self.next().await {
            TransportEvent::Down { reason, .. } => reason,
            other => panic!("expected Down, got {other:?}"),
        }
    }

    /// Nothing more arrives within a short while.
    async fn idle(&self) {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        if let Some(Some(event)) = futures_lite::future::poll_once(self.events.recv()).await {
            panic!("qp {}: unexpected event {event:?}", self.qp.id());
        }
    }
}

/// Connects A (client) and B (server) through the endpoint exchange over loopback TCP.
async fn connect(
    domain: &Rc<VerbsDomain>,
    a_regions: Rc<RegionTable>,
    b_regions: Rc<RegionTable>,
) -> (End, End) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (a_stream, b_stream) =
        futures_lite::future::zip(TcpStream::connect(addr), listener.accept()).await;
    let (a_tx, a_rx) = local_channel::new_bounded(EVENTS_MAX);
    let (b_tx, b_rx) = local_channel::new_bounded(EVENTS_MAX);
    let started = Instant::now();
    let (a, b) = futures_lite::future::zip(
        QueuePair::start_verbs(
            domain,
            a_stream.unwrap(),
            a_regions,
            Rc::new(a_tx),
            Side::Client,
        ),
        QueuePair::start_verbs(
            domain,
            b_stream.unwrap(),
            b_regions,
            Rc::new(b_tx),
            Side::Server,
        ),
    )
    .await;
    let (a, b) = (a.expect("A connects"), b.expect("B connects"));
    say(format_args!(
        "connected qp {} <-> qp {} in {:?}",
        a.id(),
        b.id(),
        started.elapsed()
    ));
    assert_eq!((a.backend_name(), b.backend_name()), ("verbs", "verbs"));
    (
        End {
            qp: a,
            events: a_rx,
        },
        End {
            qp: b,
            events: b_rx,
        },
    )
}

/// A memory-mapped region file of `len` bytes filled with `fill`, removed when dropped.
struct TempRegion {
    region: Rc<MappedRegion>,
    path: PathBuf,
}

impl TempRegion {
    fn new(name: &str, len: usize, fill: u8) -> TempRegion {
        let path = std::env::temp_dir().join(format!(
            "ordinal-verbs-test-{}-{name}.region",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let region = open_region(&path, len as u64).expect("map a region file");
        region.map.borrow_mut().fill(fill);
        TempRegion { region, path }
    }

    fn memory(&self) -> Rc<dyn RegionMemory> {
        self.region.clone()
    }

    fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.region.map.borrow()[offset..offset + len].to_vec()
    }
}

impl Drop for TempRegion {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// B's verbs table with `region` registered for `access`.
fn table_with(
    domain: &Rc<VerbsDomain>,
    region: &TempRegion,
    access: u32,
) -> (Rc<RegionTable>, RegionDescriptor) {
    let table = RegionTable::new_verbs(domain).expect("a verbs region table");
    let len = region.region.map.borrow().len() as u64;
    let descriptor = table
        .try_register(region.memory(), len, access)
        .expect("register the region");
    (table, descriptor)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn sends_arrive_in_order_as_received_events() {
    // A SENDs a small (inline) message, a 4000-byte one and the largest protocol message; B
    // gets them as Received events in order with the exact bytes, A gets three successful
    // completions in order. B answers once. A SEND larger than B's receive buffers is refused
    // at posting.
    run(|domain| async move {
        let (a, b) = connect(&domain, RegionTable::new(), RegionTable::new()).await;
        let messages = [
            pattern(16, 1),
            pattern(4000, 2),
            pattern(MESSAGE_BYTES_MAX, 3),
        ];
        let started = Instant::now();
        for (i, message) in messages.iter().enumerate() {
            a.qp.post_send(10 + i as u64, message).unwrap();
        }
        for (i, message) in messages.iter().enumerate() {
            match b.next().await {
                TransportEvent::Received { qp, bytes } => {
                    assert_eq!(qp, b.qp.id());
                    assert_eq!(&bytes, message, "message {i}");
                }
                other => panic!("expected Received, got {other:?}"),
            }
        }
        for i in 0..messages.len() {
            a.completion(10 + i as u64, WorkStatus::Success).await;
        }
        say(format_args!(
            "3 SENDs delivered and completed in {:?}",
            started.elapsed()
        ));
        b.qp.post_send(99, b"ack").unwrap();
        match a.next().await {
            TransportEvent::Received { bytes, .. } => assert_eq!(bytes, b"ack"),
            other => panic!("expected Received, got {other:?}"),
        }
        b.completion(99, WorkStatus::Success).await;
        assert_eq!(
            a.qp.post_send(1, &vec![0u8; RECV_BUFFER_BYTES + 1]),
            Err(PostError::TooLarge)
        );
        assert_eq!(a.qp.outstanding(), 0);
        a.idle().await;
        b.idle().await;
    });
}

#[test]
fn writes_land_in_the_peer_region_and_the_immediate_follows_the_data() {
    // A WRITEs 4 KiB into B's mapped region: the completion comes, the bytes are there, and B's
    // role sees nothing. Then a 64 KiB WRITE with immediate: B gets ReceivedImm, and at that
    // moment the data is already in place.
    run(|domain| async move {
        let region = TempRegion::new("write", 1 << 20, 0);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, b) = connect(&domain, RegionTable::new(), table.clone()).await;
        let started = Instant::now();
        a.qp.post_write(1, &pattern(4096, 7), ring.addr + 8192, ring.rkey, None)
            .unwrap();
        a.completion(1, WorkStatus::Success).await;
        say(format_args!(
            "4 KiB WRITE completed in {:?}",
            started.elapsed()
        ));
        assert_eq!(region.bytes(8192, 4096), pattern(4096, 7));
        assert_eq!(region.bytes(8192 + 4096, 64), vec![0; 64]);
        b.idle().await;

        let big = pattern(64 << 10, 9);
        a.qp.post_write(2, &big, ring.addr + 65536, ring.rkey, Some(0x00c0_ffee))
            .unwrap();
        match b.next().await {
            TransportEvent::ReceivedImm { imm, .. } => {
                assert_eq!(imm, 0x00c0_ffee);
                assert_eq!(
                    region.bytes(65536, big.len()),
                    big,
                    "data not there at the imm"
                );
            }
            other => panic!("expected ReceivedImm, got {other:?}"),
        }
        a.completion(2, WorkStatus::Success).await;
        a.idle().await;
        b.idle().await;
        drop(table);
    });
}

#[test]
fn reads_return_the_remote_bytes_in_the_completion() {
    // B exposes a region for reading only; A READs 3000 bytes at offset 1000 and then 1 MiB,
    // and gets the bytes in the completions' data.
    run(|domain| async move {
        let region = TempRegion::new("read", 2 << 20, 0);
        region.region.map.borrow_mut()[..2 << 20].copy_from_slice(&pattern(2 << 20, 5));
        let (table, area) = table_with(&domain, &region, ACCESS_REMOTE_READ);
        let (a, _b) = connect(&domain, RegionTable::new(), table).await;
        let started = Instant::now();
        a.qp.post_read(1, area.addr + 1000, area.rkey, 3000)
            .unwrap();
        let data = a
            .completion(1, WorkStatus::Success)
            .await
            .expect("READ data");
        assert_eq!(data, region.bytes(1000, 3000));
        a.qp.post_read(2, area.addr + (1 << 20), area.rkey, 1 << 20)
            .unwrap();
        let data = a
            .completion(2, WorkStatus::Success)
            .await
            .expect("READ data");
        say(format_args!(
            "READs of 3000 B and 1 MiB in {:?}",
            started.elapsed()
        ));
        assert_eq!(data, region.bytes(1 << 20, 1 << 20));
    });
}

#[test]
fn out_of_range_write_fails_changes_nothing_then_flushes_and_goes_down() {
    // B registers 64 KiB. A posts three WRITEs: inside, straddling the end, inside. The first
    // succeeds, the second is a remote-access error that changes nothing, the third is flushed
    // without landing, then A's pair is down (posts fail) and B's too.
    run(|domain| async move {
        let region = TempRegion::new("range", 64 << 10, 0x5a);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, b) = connect(&domain, RegionTable::new(), table).await;
        let started = Instant::now();
        a.qp.post_write(1, &[1; 64], ring.addr, ring.rkey, None)
            .unwrap();
        a.qp.post_write(2, &[2; 64], ring.addr + ring.len - 32, ring.rkey, None)
            .unwrap();
        a.qp.post_write(3, &[3; 64], ring.addr + 4096, ring.rkey, None)
            .unwrap();
        a.completion(1, WorkStatus::Success).await;
        a.completion(2, WorkStatus::RemoteAccessError).await;
        a.completion(3, WorkStatus::Flushed).await;
        let reason = a.down().await;
        say(format_args!(
            "out-of-range WRITE: error, flush and Down in {:?}: {reason}",
            started.elapsed()
        ));
        assert!(reason.contains("RemAccessErr"), "{reason}");
        assert!(a.qp.is_down());
        assert_eq!(
            a.qp.post_write(4, &[4; 64], ring.addr, ring.rkey, None),
            Err(PostError::Down)
        );
        assert_eq!(region.bytes(0, 64), vec![1; 64]);
        assert_eq!(
            region.bytes(64, (64 << 10) - 64),
            vec![0x5a; (64 << 10) - 64]
        );
        let reason = b.down().await;
        say(format_args!("B: {reason}"));
        a.idle().await;
        b.idle().await;
    });
}

#[test]
fn a_revoked_region_refuses_the_next_write() {
    // A WRITE succeeds; B revokes the region (as the DR fences an old primary); the next
    // WRITE is a remote-access error and changes nothing; A's pair is down.
    run(|domain| async move {
        let region = TempRegion::new("revoke", 64 << 10, 0);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, b) = connect(&domain, RegionTable::new(), table.clone()).await;
        a.qp.post_write(1, &[1; 128], ring.addr, ring.rkey, None)
            .unwrap();
        a.completion(1, WorkStatus::Success).await;
        table.revoke(ring.rkey);
        a.qp.post_write(2, &[2; 128], ring.addr + 128, ring.rkey, None)
            .unwrap();
        a.completion(2, WorkStatus::RemoteAccessError).await;
        let reason = a.down().await;
        say(format_args!("after revoke: {reason}"));
        assert_eq!(region.bytes(128, 128), vec![0; 128]);
        b.down().await;
    });
}

#[test]
fn dropping_the_peer_reports_down_within_the_bound() {
    // B's queue pair is dropped (its process would exit the same way): A learns it through the
    // liveness channel, with its outstanding work flushed, well within a second.
    run(|domain| async move {
        let region = TempRegion::new("drop", 64 << 10, 0);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, b) = connect(&domain, RegionTable::new(), table).await;
        let started = Instant::now();
        let End { qp, events } = b;
        drop(qp);
        let reason = a.down().await;
        let elapsed = started.elapsed();
        say(format_args!(
            "peer dropped: Down after {elapsed:?}: {reason}"
        ));
        assert!(reason.contains("closed the connection"), "{reason}");
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        assert_eq!(
            a.qp.post_write(1, &[1; 8], ring.addr, ring.rkey, None),
            Err(PostError::Down)
        );
        // B reported its own end too.
        match events.recv().await {
            Some(TransportEvent::Down { reason, .. }) => {
                assert!(reason.contains("dropped"), "{reason}")
            }
            other => panic!("expected B's Down, got {other:?}"),
        }
    });
}

#[test]
fn a_silent_peer_surfaces_through_the_retry_timeout() {
    // B's queue pair is reset in the device without closing the liveness channel, as when its
    // machine crashes: A's next WRITE goes unanswered and fails after the RC retries (flushed:
    // it may or may not have landed), then Down, within ordinal-hw's dead-peer bound.
    run(|domain| async move {
        let region = TempRegion::new("silent", 64 << 10, 0);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, b) = connect(&domain, RegionTable::new(), table).await;
        a.qp.post_write(1, &[1; 64], ring.addr, ring.rkey, None)
            .unwrap();
        a.completion(1, WorkStatus::Success).await;
        b.qp.reset_silently_for_tests();
        let started = Instant::now();
        a.qp.post_write(2, &[2; 64], ring.addr + 64, ring.rkey, None)
            .unwrap();
        a.completion(2, WorkStatus::Flushed).await;
        let reason = a.down().await;
        let elapsed = started.elapsed();
        let bound = domain.config().rts.dead_peer_bound();
        say(format_args!(
            "silent peer: Down after {elapsed:?} (bound {bound:?}): {reason}"
        ));
        assert!(reason.contains("RetryExcErr"), "{reason}");
        assert!(elapsed <= bound, "took {elapsed:?}");
        assert_eq!(region.bytes(64, 64), vec![0; 64]);
    });
}

#[test]
fn send_round_trips_complete_promptly() {
    // A SENDs an 80-byte message (an order batch of one record) and B's "role" answers each
    // with 32 bytes as soon as it arrives, one round trip at a time, 1000 times: once with the
    // default 50 µs spin after a completion (the pollers mostly sleep and are woken through
    // the completion channel and the helper thread) and once on a domain that spins 20 ms
    // (the pollers catch every completion by polling). A lost wake-up would stall the test.
    // The round-trip times are printed.
    run(|domain| async move {
        round_trips("default spin", &domain).await;
        let name = domain.device_name().to_string();
        let spinning = VerbsDomain::open_with(
            &name,
            VerbsConfig {
                spin_after_completion: Duration::from_millis(20),
                ..VerbsConfig::default()
            },
        )
        .unwrap();
        round_trips("20 ms spin", &spinning).await;
    });
}

async fn round_trips(what: &str, domain: &Rc<VerbsDomain>) {
    {
        const ROUND_TRIPS: usize = 1000;
        let (a, b) = connect(domain, RegionTable::new(), RegionTable::new()).await;
        let echo = glommio::spawn_local(async move {
            let mut answered = 0usize;
            while let Some(event) = b.events.recv().await {
                match event {
                    TransportEvent::Received { bytes, .. } => {
                        assert_eq!(bytes.len(), 80);
                        b.qp.post_send(answered as u64, &[7; 32]).unwrap();
                        answered += 1;
                    }
                    TransportEvent::Completion { status, .. } => {
                        assert_eq!(status, WorkStatus::Success)
                    }
                    TransportEvent::Down { .. } => break,
                    other => panic!("B: unexpected {other:?}"),
                }
            }
            answered
        });
        let mut round_trips = Vec::with_capacity(ROUND_TRIPS);
        let started = Instant::now();
        for i in 0..ROUND_TRIPS {
            let sent = Instant::now();
            a.qp.post_send(i as u64, &[1; 80]).unwrap();
            let (mut completed, mut answered) = (false, false);
            while !(completed && answered) {
                match a.next().await {
                    TransportEvent::Completion { wr_id, status, .. } => {
                        assert_eq!((wr_id, status), (i as u64, WorkStatus::Success));
                        completed = true;
                    }
                    TransportEvent::Received { bytes, .. } => {
                        assert_eq!(bytes, [7; 32]);
                        answered = true;
                    }
                    other => panic!("A: unexpected {other:?}"),
                }
            }
            round_trips.push(sent.elapsed());
        }
        let total = started.elapsed();
        round_trips.sort();
        let at = |q: f64| round_trips[((ROUND_TRIPS as f64 * q) as usize).min(ROUND_TRIPS - 1)];
        say(format_args!(
            "{ROUND_TRIPS} SEND round trips ({what}) in {total:?}: p50 {:?} p99 {:?} max {:?}",
            at(0.5),
            at(0.99),
            round_trips[ROUND_TRIPS - 1]
        ));
        drop(a);
        assert_eq!(echo.await, ROUND_TRIPS);
    }
}

#[test]
fn a_thousand_pipelined_writes_complete_in_order() {
    // A posts 1000 WRITEs of 4 KiB back to back (each into its own slot of B's 4 MiB region)
    // without waiting; the completions come back in posting order and every slot holds its
    // write.
    run(|domain| async move {
        const WRITES: usize = 1000;
        const SLOT: usize = 4096;
        let region = TempRegion::new("pipeline", WRITES * SLOT, 0);
        let (table, ring) = table_with(&domain, &region, ACCESS_REMOTE_WRITE);
        let (a, _b) = connect(&domain, RegionTable::new(), table).await;
        let started = Instant::now();
        for i in 0..WRITES {
            let offset = (i * SLOT) as u64;
            a.qp.post_write(
                i as u64,
                &pattern(SLOT, i as u8),
                ring.addr + offset,
                ring.rkey,
                None,
            )
            .unwrap();
        }
        let posted = started.elapsed();
        for i in 0..WRITES {
            match a.next().await {
                TransportEvent::Completion {
                    wr_id,
                    opcode: Opcode::Write,
                    status: WorkStatus::Success,
                    ..
                } => assert_eq!(wr_id, i as u64, "completion out of order"),
                other => panic!("write {i}: {other:?}"),
            }
        }
        let elapsed = started.elapsed();
        say(format_args!(
            "{WRITES} x 4 KiB WRITEs: posted in {posted:?}, all completed in {elapsed:?} ({:.0} MB/s)",
            (WRITES * SLOT) as f64 / elapsed.as_secs_f64() / 1e6
        ));
        for i in 0..WRITES {
            assert_eq!(
                region.bytes(i * SLOT, SLOT),
                pattern(SLOT, i as u8),
                "slot {i}"
            );
        }
        assert_eq!(a.qp.outstanding(), 0);
    });
}

#[test]
fn the_exchange_names_a_peer_that_is_not_in_verbs_mode() {
    // A verbs server whose client is a TCP-transport queue pair, or something that sends
    // garbage, fails with an error that says so; a verbs client whose server hangs up fails
    // naming that.
    run(|domain| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();

        let (tcp_tx, _tcp_rx) = local_channel::new_bounded(16);
        let (events, _events_rx) = local_channel::new_bounded(16);
        let (client, server) =
            futures_lite::future::zip(TcpStream::connect(addr), listener.accept()).await;
        let tcp_pair = QueuePair::start(client.unwrap(), RegionTable::new(), Rc::new(tcp_tx));
        tcp_pair.post_send(1, &pattern(64, 1)).unwrap();
        let error = QueuePair::start_verbs(
            &domain,
            server.unwrap(),
            RegionTable::new(),
            Rc::new(events),
            Side::Server,
        )
        .await
        .unwrap_err();
        say(format_args!("TCP peer: {error}"));
        assert!(error.contains("TCP transport"), "{error}");

        let (events, _events_rx) = local_channel::new_bounded(16);
        let (client, server) =
            futures_lite::future::zip(TcpStream::connect(addr), listener.accept()).await;
        let mut client = client.unwrap();
        futures_lite::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let error = QueuePair::start_verbs(
            &domain,
            server.unwrap(),
            RegionTable::new(),
            Rc::new(events),
            Side::Server,
        )
        .await
        .unwrap_err();
        say(format_args!("garbage: {error}"));
        assert!(error.contains("not in verbs mode"), "{error}");
        assert!(error.contains("\"GET \""), "{error}");

        let (events, _events_rx) = local_channel::new_bounded(16);
        let (client, server) =
            futures_lite::future::zip(TcpStream::connect(addr), listener.accept()).await;
        drop(server);
        let error = QueuePair::start_verbs(
            &domain,
            client.unwrap(),
            RegionTable::new(),
            Rc::new(events),
            Side::Client,
        )
        .await
        .unwrap_err();
        say(format_args!("server hung up: {error}"));
        assert!(error.contains("closed the connection"), "{error}");
        tcp_pair.fail("test over");
    });
}
