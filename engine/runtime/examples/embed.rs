//! Embedding ordinal in an appliance: a whole replicated system in one process (aux and DR on
//! their own executors, standing in for the remote machines), with the appliance's code running
//! on the primary's executor and using the library API: subscribe to notices, write, read back,
//! flush, read the status, then fail over to the DR and see the primary fenced.
//!
//! Run it with `cargo run -p ordinal-runtime --example embed`; `cargo test` runs it too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ordinal_proto::{Geometry, LinkLossPolicy, Mode};
use ordinal_runtime::aux::{run_aux, AuxOptions};
use ordinal_runtime::dr::{run_dr, DrOptions};
use ordinal_runtime::link::TransportChoice;
use ordinal_runtime::primary::{
    run_primary, PrimaryHandle, PrimaryNotice, PrimaryOptions, WriteOutcome,
};
use ordinal_runtime::spawn_executor;

const VOLUME_BYTES: u64 = 64 << 20;
const PSK: &[u8] = b"an appliance's pre-shared key, 32+ bytes";

fn main() {
    match run() {
        Ok(steps) => steps.iter().for_each(|step| println!("{step}")),
        Err(error) => {
            eprintln!("embed: {error}");
            std::process::exit(1);
        }
    }
}

#[test]
fn the_embedding_example_runs() {
    let steps = run().expect("the example runs");
    assert!(
        steps.last().is_some_and(|step| step.contains("refused")),
        "{steps:?}"
    );
}

fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|error| format!("no free loopback port: {error}"))
}

/// A scratch directory on a file system that takes `O_DIRECT` (tmpfs does on Linux ≥ 6.6).
fn scratch_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ordinal-embed-{}", std::process::id()))
}

fn run() -> Result<Vec<String>, String> {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
    for volume in ["primary.vol", "dr.vol"] {
        std::fs::File::create(dir.join(volume))
            .and_then(|file| file.set_len(VOLUME_BYTES))
            .map_err(|error| format!("cannot make {volume}: {error}"))?;
    }
    let geometry = Geometry {
        volume_bytes: VOLUME_BYTES,
        sector_bytes: 4096,
        ring_bytes: 8 << 20,
        table_slots: 1024,
        payload_bytes_max: 1 << 20,
    };
    let (aux, dr) = (free_port()?, free_port()?);
    let aux_options = AuxOptions {
        listen: aux,
        state_dir: dir.join("aux-state"),
        psk: PSK.to_vec(),
        geometry,
        epoch: 1,
        heartbeat_timeout: Duration::from_secs(1),
        transport: TransportChoice::Tcp,
    };
    spawn_executor("embed-aux", None, move || run_aux(aux_options))?;
    let dr_options = DrOptions {
        listen: dr,
        state_dir: dir.join("dr-state"),
        volume: dir.join("dr.vol"),
        psk: PSK.to_vec(),
        geometry,
        epoch: 1,
        aux: Some(aux),
        auto_failover: false,
        applies_inflight_max: 16,
        transport: TransportChoice::Tcp,
        nbd_listen: None,
        apply_delay: std::time::Duration::ZERO,
        durable_order_log: false,
    };
    spawn_executor("embed-dr", None, move || run_dr(dr_options))?;
    let primary_options = PrimaryOptions {
        listen: free_port()?,
        volume: dir.join("primary.vol"),
        psk: PSK.to_vec(),
        geometry,
        mode: Mode::OrderSync,
        link_loss_policy: LinkLossPolicy::Block,
        degrade_after: None,
        epoch: 1,
        dr,
        aux,
        heartbeat_interval: Duration::from_millis(20),
        lease: Duration::from_millis(400),
        local_writes_inflight_max: 64,
        transport: TransportChoice::Tcp,
        tuning: Default::default(),
    };
    // The appliance's code runs on the primary's executor, next to the primary.
    let (done, outcome) = mpsc::channel();
    spawn_executor("embed-primary", None, move || {
        run_primary(primary_options, move |handle| {
            glommio::spawn_local(async move {
                let _ = done.send(appliance(handle, dr).await);
            })
            .detach();
        })
    })?;
    let steps = outcome
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the appliance did not finish within 60 s".to_string())?;
    // The three roles keep running on their threads until the process ends.
    let _ = std::fs::remove_dir_all(&dir);
    steps
}

/// What an appliance does with a primary: everything through the handle.
async fn appliance(primary: PrimaryHandle, dr: SocketAddr) -> Result<Vec<String>, String> {
    let mut steps = Vec::new();
    let notices = primary.subscribe()?;
    let connected = glommio::timer::timeout(Duration::from_secs(20), async {
        while !(primary.status().dr_link_up && primary.status().aux_connected) {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    });
    connected
        .await
        .map_err(|_| "the primary did not reach its DR and aux within 20 s")?;
    steps.push(format!("connected: {:?}", primary.status()));

    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let seq = match primary.write(0, block.clone()).await {
        WriteOutcome::Acked { seq, degraded } => {
            steps.push(format!(
                "write acknowledged as op {seq} (degraded: {degraded})"
            ));
            seq
        }
        WriteOutcome::Failed(why) => return Err(format!("write failed: {why}")),
    };
    if primary.read(0, block.len()).await? != block {
        return Err("read back other bytes than were written".into());
    }
    steps.push("read back what was written".into());
    primary.flush().await?;
    let status = primary.status();
    if status.order_acked_through < seq {
        return Err(format!(
            "flushed, yet the DR holds orders only through {}",
            status.order_acked_through
        ));
    }
    steps.push(format!(
        "flushed: the DR holds orders through {}",
        status.order_acked_through
    ));

    // The operator fails over to the DR (here from a blocking thread, as `ordinal failover`
    // would from another machine); the primary learns it is fenced at its next heartbeat.
    let report = glommio::executor()
        .spawn_blocking(move || {
            ordinal_runtime::admin::request(dr, PSK, "failover", Duration::from_secs(30))
        })
        .await?;
    steps.push(format!("failed over: {report}"));
    let fenced = glommio::timer::timeout(Duration::from_secs(10), async {
        while let Some(notice) = notices.recv().await {
            if let PrimaryNotice::Stopped(stop) = notice {
                return Ok(Some(stop));
            }
        }
        Ok(None)
    });
    let stop = fenced
        .await
        .ok()
        .flatten()
        .ok_or("no Stopped notice within 10 s of the failover")?;
    steps.push(format!("notice: the primary stopped: {stop:?}"));
    match primary.write(4096, block).await {
        WriteOutcome::Failed(why) => {
            steps.push(format!("a write after the failover is refused: {why}"))
        }
        WriteOutcome::Acked { seq, .. } => {
            return Err(format!("a fenced primary acknowledged op {seq}"))
        }
    }
    Ok(steps)
}
