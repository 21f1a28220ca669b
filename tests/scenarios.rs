//! Scenarios that read like sentences, one per row of the patent's tables 1-4 and per failure
//! the engine must survive. Each drives a quiet simulated world by hand (fixed latencies, no
//! random faults), then checks the failover report and, through the checker, I1-I6.

use ordinal_proto::dr::LossReason;
use ordinal_proto::primary::{PrimaryStop, AUX_GROUPS_INFLIGHT_MAX};
use ordinal_proto::wire::PrimaryStatus;
use ordinal_proto::{LinkLossPolicy, Mode, Seq};
use ordinal_sim::{Params, Path, World};

const MS: u64 = 1_000_000;

/// A quiet world with whole (never torn) writes, so the scenarios are exact.
fn world(mode: Mode) -> World {
    let mut params = Params::scripted(mode);
    params.partial_at_break = false;
    World::new(params)
}

/// The bytes of op number `n`: distinct per op, so a wrong apply cannot go unnoticed.
fn pattern(n: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| n.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn write(world: &mut World, n: u8) {
    world.client_write(u64::from(n) * 4096, pattern(n, 1024));
}

fn acked(world: &World, seq: Seq) -> bool {
    world.truth()[seq as usize - 1].acked_at.is_some()
}

fn aux_status(world: &World, seq: Seq) -> Option<PrimaryStatus> {
    world.aux_table_entry(seq).map(|entry| entry.status)
}

fn assert_invariants_hold(world: &World) {
    let verdict = world.check();
    assert!(verdict.holds(), "{:#?}", verdict.violations);
}

/// Table 1, rows 0001-0002 ("replicated") and 0003 ("queued"): crash the primary after ops 1
/// and 2 are replicated while op 3's payload is still queued; fail over; expect prefix 2 and op
/// 3, which was acknowledged, reported lost by seq and byte range.
#[test]
fn table1_replicated_ops_survive_and_a_queued_op_is_reported_lost() {
    let mut world = world(Mode::OrderSync);
    write(&mut world, 1);
    write(&mut world, 2);
    world.run_for(10 * MS);
    world.hold(Path::PayloadToDr);
    write(&mut world, 3);
    world.run_for(10 * MS);
    assert_eq!(aux_status(&world, 1), Some(PrimaryStatus::Replicated));
    assert_eq!(aux_status(&world, 2), Some(PrimaryStatus::Replicated));
    assert_eq!(aux_status(&world, 3), Some(PrimaryStatus::Queued));
    assert!(
        acked(&world, 3),
        "order-sync acknowledges once the DR holds the order"
    );

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 2);
    assert_eq!(report.lost.len(), 1);
    assert_eq!(
        (
            report.lost[0].seq,
            report.lost[0].volume_offset,
            report.lost[0].len
        ),
        (3, 3 * 4096, 1024)
    );
    assert_eq!(report.lost[0].reason, LossReason::PayloadNotReplicated);
    assert_invariants_hold(&world);
}

/// Table 2 (the order of 0001-0003 synced on primary, aux and DR): every acknowledged op's
/// order is held by the DR and named on the aux before the client hears back, even when no
/// payload has moved; after a crash all three are reported with their ranges (I4, I6).
#[test]
fn table2_order_is_synchronised_before_the_ack_even_without_data() {
    let mut world = world(Mode::OrderSync);
    world.hold(Path::PayloadToDr);
    for n in 1..=3 {
        write(&mut world, n);
    }
    world.run_for(10 * MS);
    assert_eq!(world.dr().expect("DR up").held_through(), 3);
    for seq in 1..=3 {
        assert!(acked(&world, seq));
        assert_eq!(aux_status(&world, seq), Some(PrimaryStatus::Queued));
    }

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 0);
    let lost: Vec<(Seq, u64)> = report
        .lost
        .iter()
        .map(|l| (l.seq, l.volume_offset))
        .collect();
    assert_eq!(lost, vec![(1, 4096), (2, 8192), (3, 12288)]);
    assert_invariants_hold(&world);
}

/// Table 3 (b002/b003 reusable, b001 not): with a four-slot table, a slot is reused only once
/// its op's order is synced and its data replicated (and applied). While op 1's payload is held
/// back, a fifth write waits; once the payload moves, the fifth write takes op 1's slot.
#[test]
fn table3_a_slot_is_reused_only_after_its_data_is_replicated() {
    let mut params = Params::scripted(Mode::OrderSync);
    params.geometry.table_slots = 4;
    params.partial_at_break = false;
    let mut world = World::new(params);
    world.hold(Path::PayloadToDr);
    for n in 1..=5 {
        write(&mut world, n);
    }
    world.run_for(10 * MS);
    let primary = world.primary().expect("primary up");
    assert_eq!(
        primary.last_seq(),
        4,
        "the fifth write must wait for a free slot"
    );
    assert!(primary.stats().backpressure > 0);

    world.release(Path::PayloadToDr);
    world.run_for(20 * MS);
    assert_eq!(world.primary().expect("primary up").last_seq(), 5);
    assert_eq!(
        world.aux_table_entry(5).map(|e| e.seq),
        Some(5),
        "op 5 now holds op 1's slot"
    );
    assert_eq!(world.aux_table_entry(1), None);

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 5);
    assert!(report.lost.is_empty());
    assert_invariants_hold(&world);
}

/// Table 4 (DR status: 0001-0002 replicated, 0003 not) combined with the aux saying 0003 is
/// replicated: op 3's payload landed and the primary recorded it, but the DR's CPU had not yet
/// seen the completion. Op 3 is a target operation: failover applies it from the ring, and
/// nothing is lost (claims 18-20).
#[test]
fn table4_a_target_op_is_recovered_from_the_ring() {
    let mut world = world(Mode::OrderSync);
    write(&mut world, 1);
    write(&mut world, 2);
    world.run_for(10 * MS);
    world.hold(Path::DrNotify);
    write(&mut world, 3);
    world.run_for(10 * MS);
    assert_eq!(
        world.dr().expect("DR up").landed_through(),
        2,
        "the DR has not seen op 3 land"
    );
    assert_eq!(aux_status(&world, 3), Some(PrimaryStatus::Replicated));

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 3);
    assert_eq!(report.applied_from_ring, 1);
    assert!(report.lost.is_empty());
    assert_eq!(
        &world.dr_volume()[3 * 4096..3 * 4096 + 1024],
        &pattern(3, 1024)[..]
    );
    assert_invariants_hold(&world);
}

/// The patent's non-target case: primary status "queued" and DR status "not replicated". Op 3's
/// bytes did reach the ring, but the primary never saw the write complete, so the aux does not
/// vouch for it and the DR does not apply it: it is reported lost.
#[test]
fn a_queued_op_is_not_a_target_even_if_its_bytes_arrived() {
    let mut world = world(Mode::OrderSync);
    write(&mut world, 1);
    world.run_for(10 * MS);
    world.hold(Path::DrNotify);
    world.hold(Path::PayloadCompletion);
    write(&mut world, 2);
    world.run_for(10 * MS);
    assert_eq!(aux_status(&world, 2), Some(PrimaryStatus::Queued));

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 1);
    assert_eq!(
        report
            .lost
            .iter()
            .map(|l| (l.seq, l.reason))
            .collect::<Vec<_>>(),
        vec![(2, LossReason::PayloadNotReplicated)]
    );
    assert_invariants_hold(&world);
}

/// Async mode: the DR never saw op 2's order, yet the write was acknowledged (its entry was on
/// the aux). The loss report names it from the aux table, with its range (I4 through the aux).
#[test]
fn async_mode_reports_an_acked_op_the_dr_never_heard_of() {
    let mut world = world(Mode::Async);
    write(&mut world, 1);
    world.run_for(10 * MS);
    world.hold(Path::OrderToDr);
    world.hold(Path::PayloadToDr);
    write(&mut world, 2);
    world.run_for(5 * MS);
    assert!(acked(&world, 2));
    assert_eq!(world.dr().expect("DR up").held_through(), 1);

    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 1);
    assert_eq!(
        report
            .lost
            .iter()
            .map(|l| (l.seq, l.volume_offset, l.reason))
            .collect::<Vec<_>>(),
        vec![(2, 2 * 4096, LossReason::OrderNotAtDr)]
    );
    assert_invariants_hold(&world);
}

/// With `--on-link-loss degrade --degrade-after-ms 20`, a DR that stops answering while its
/// link is still up (a silent WAN, not yet declared down) holds a write 20 ms at most: then the
/// primary acknowledges it once the aux names it, as degraded. The primary dies before the DR
/// hears of it; the failover reports it lost, by seq and byte range. Under `block` the same
/// write waits.
#[test]
fn with_degrade_after_a_silent_dr_holds_a_write_no_longer_than_that_and_it_is_reported() {
    for policy in [LinkLossPolicy::Degrade, LinkLossPolicy::Block] {
        let mut params = Params::scripted(Mode::OrderSync);
        params.partial_at_break = false;
        params.link_loss_policy = policy;
        params.degrade_after_ns = (policy == LinkLossPolicy::Degrade).then_some(20 * MS);
        let mut world = World::new(params);
        write(&mut world, 1);
        world.run_for(10 * MS);
        assert!(acked(&world, 1));
        world.hold(Path::OrderToDr);
        world.hold(Path::PayloadToDr);
        write(&mut world, 2);
        world.run_for(15 * MS);
        assert!(!acked(&world, 2), "{policy:?}: the DR may still answer");
        world.run_for(10 * MS);
        let primary = world.primary().expect("running");
        assert!(primary.is_dr_link_up(), "the link was never declared down");
        if policy == LinkLossPolicy::Block {
            assert!(!acked(&world, 2), "block waits for the DR");
            continue;
        }
        assert!(acked(&world, 2), "20 ms without an answer");
        assert!(world.truth()[1].acked_degraded);
        assert_eq!(primary.stats().acked_degraded, 1);

        world.crash_primary();
        let report = world.fail_over();
        assert_eq!(report.cut, 1);
        assert_eq!(
            report
                .lost
                .iter()
                .map(|l| (l.seq, l.volume_offset, l.reason))
                .collect::<Vec<_>>(),
            vec![(2, 2 * 4096, LossReason::OrderNotAtDr)]
        );
        assert_invariants_hold(&world);
    }
}

/// Status-table writes are pipelined: while earlier groups of entries are unanswered, each new
/// op's "queued" entry still goes to the aux (async mode acknowledges on it), up to
/// `AUX_GROUPS_INFLIGHT_MAX` groups; an entry a group in flight holds is not rewritten (op 2
/// becomes "replicated" on the aux only after its "queued" write is answered).
#[test]
fn status_entries_go_out_while_earlier_ones_are_unanswered_up_to_the_limit() {
    let mut world = world(Mode::Async);
    write(&mut world, 1);
    world.run_for(10 * MS);
    assert!(acked(&world, 1));
    world.hold(Path::AuxCompletion);
    let last = 2 + AUX_GROUPS_INFLIGHT_MAX as u8;
    assert!(
        AUX_GROUPS_INFLIGHT_MAX >= 2,
        "with one group there is no pipelining to check"
    );
    for n in 2..=last {
        write(&mut world, n);
        world.run_for(MS / 10);
    }
    for n in 2..last {
        assert_eq!(
            aux_status(&world, u64::from(n)),
            Some(PrimaryStatus::Queued),
            "op {n}'s entry is on the aux though no earlier group was answered"
        );
        assert!(!acked(&world, u64::from(n)), "its own write is unanswered");
    }
    assert_eq!(
        aux_status(&world, u64::from(last)),
        None,
        "no more than {AUX_GROUPS_INFLIGHT_MAX} groups in flight"
    );
    world.release(Path::AuxCompletion);
    world.run_for(10 * MS);
    for n in 2..=last {
        assert!(acked(&world, u64::from(n)));
        assert_eq!(
            aux_status(&world, u64::from(n)),
            Some(PrimaryStatus::Replicated)
        );
    }
    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, u64::from(last));
    assert!(report.lost.is_empty(), "{report:?}");
    assert_invariants_hold(&world);
}

/// Sync mode holds the acknowledgement until the payload is at the DR.
#[test]
fn sync_mode_acknowledges_only_once_the_payload_is_at_the_dr() {
    let mut world = world(Mode::Sync);
    world.hold(Path::PayloadToDr);
    write(&mut world, 1);
    world.run_for(10 * MS);
    assert!(!acked(&world, 1), "payload still held back");
    world.release(Path::PayloadToDr);
    world.run_for(10 * MS);
    assert!(acked(&world, 1));
    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 1);
    assert_invariants_hold(&world);
}

/// A primary that is alive but cut off from the aux is fenced: the aux revokes its access, the
/// DR promotes, and when the old primary reaches the DR again it is refused and acknowledges
/// nothing more (I5).
#[test]
fn a_cut_off_primary_is_fenced_and_acknowledges_nothing_after_promotion() {
    let mut world = world(Mode::OrderSync);
    write(&mut world, 1);
    world.run_for(10 * MS);
    world.cut_primary_off(false);
    write(&mut world, 2);
    let report = world.fail_over();
    world.run_for(100 * MS);
    let stop = world.primary().expect("still running").stopped();
    assert!(
        matches!(
            stop,
            Some(PrimaryStop::FencedByAux | PrimaryStop::FencedByDr { .. })
        ),
        "{stop:?}"
    );
    assert!(report.cut >= 1);
    assert_invariants_hold(&world);
}

/// The DR crashes while payloads are in flight and comes back from its log and ring: ops it had
/// verified are recovered, torn slots are not trusted, the primary re-sends what is missing,
/// and replication carries on to a complete prefix.
#[test]
fn a_dr_crash_and_restart_loses_nothing() {
    let mut params = Params::scripted(Mode::OrderSync);
    params.partial_at_break = true;
    let mut world = World::new(params);
    for n in 1..=4 {
        write(&mut world, n);
    }
    world.run_for(150_000);
    world.crash_dr();
    world.run_for(5 * MS);
    world.restart_dr();
    world.run_for(30 * MS);
    for n in 5..=6 {
        write(&mut world, n);
    }
    world.run_for(30 * MS);
    assert_eq!(world.dr().expect("DR up").applied_through(), 6);
    world.crash_primary();
    let report = world.fail_over();
    assert_eq!(report.cut, 6);
    assert!(report.lost.is_empty());
    assert_invariants_hold(&world);
}

/// A DR restarted from an empty state directory has forgotten order records it acknowledged.
/// The primary must not take its word and replicate on from there: it stops, names the
/// mismatch with both sides' figures, and acknowledges nothing more.
#[test]
fn a_dr_that_forgot_what_it_acknowledged_stops_the_primary_with_both_sides_figures() {
    let mut world = world(Mode::OrderSync);
    for n in 1..=4 {
        write(&mut world, n);
    }
    world.run_for(30 * MS);
    assert!((1..=4).all(|seq| acked(&world, seq)));
    world.crash_dr();
    world.run_for(5 * MS);
    world.restart_dr_from_empty_state();
    world.run_for(30 * MS);
    let stopped = world.primary().expect("primary up").stopped();
    assert_eq!(
        stopped,
        Some(PrimaryStop::DrStateMismatch {
            dr_held_through: 0,
            dr_applied_through: 0,
            sent_through: 4,
            acked_through: 4,
            applied_through: 4,
        })
    );
    let why = stopped.expect("stopped").to_string();
    assert!(why.contains("holds order records through seq 0"), "{why}");
    assert!(why.contains("saw the DR hold through 4"), "{why}");
    // A write after the stop is refused (never admitted) or at least never acknowledged.
    write(&mut world, 5);
    world.run_for(30 * MS);
    assert!(
        world.truth().get(4).is_none_or(|op| op.acked_at.is_none()),
        "a write acknowledged after the mismatch"
    );
}

/// The lease: a primary cut off from the aux (but still reaching the DR) keeps acknowledging
/// only while its last confirmed heartbeat is recent. Once the lease has run out it holds every
/// acknowledgement, although the DR still acks its order records, so nothing it acknowledges
/// can come after the DR's promotion (I5). The held write is not lost (its data reached the
/// DR, which applies it); it is simply never acknowledged, which a client must allow for.
#[test]
fn a_primary_without_a_lease_acknowledges_nothing() {
    let mut world = world(Mode::OrderSync);
    write(&mut world, 1);
    world.run_for(5 * MS);
    assert!(acked(&world, 1));
    world.cut_primary_off(false);
    world.run_for(12 * MS); // Longer than the lease (half the 20 ms heartbeat timeout).
    write(&mut world, 2);
    world.run_for(5 * MS);
    assert_eq!(
        world.dr().expect("DR up").held_through(),
        2,
        "the DR holds op 2's order"
    );
    assert!(!acked(&world, 2), "acknowledged without a lease");

    let report = world.fail_over();
    world.run_for(100 * MS);
    assert!(!acked(&world, 2));
    assert_eq!(
        report.cut, 2,
        "op 2's payload reached the DR: it is applied, though never acknowledged"
    );
    assert_invariants_hold(&world);
}

/// The bug behind seed 3013, as a sentence: with a four-slot log, ops 1-4 applied and ops 5-8
/// held but not yet applied (their slots hold no "applied" mark at all), the DR crashes and
/// restarts. It must still know it applied 1-4, then find 5-8 in its ring and apply them.
#[test]
fn a_dr_restarting_over_a_whole_lap_of_unapplied_records_keeps_its_prefix() {
    let mut params = Params::scripted(Mode::OrderSync);
    params.geometry.table_slots = 4;
    params.partial_at_break = false;
    let mut world = World::new(params);
    for n in 1..=4 {
        write(&mut world, n);
    }
    world.run_for(20 * MS);
    assert_eq!(world.dr().expect("DR up").applied_through(), 4);
    world.hold(Path::DrNotify);
    for n in 5..=8 {
        write(&mut world, n);
    }
    world.run_for(20 * MS);
    let dr = world.dr().expect("DR up");
    assert_eq!(
        (dr.held_through(), dr.applied_through()),
        (8, 4),
        "5-8 held, not applied"
    );

    world.crash_dr();
    world.restart_dr();
    let dr = world.dr().expect("DR restarted");
    assert!(dr.applied_through() >= 4, "the DR forgot it applied 1-4");
    world.run_for(30 * MS);
    assert_eq!(world.dr().expect("DR up").applied_through(), 8);
    world.crash_primary();
    assert_eq!(world.fail_over().cut, 8);
    assert_invariants_hold(&world);
}

/// The bug behind seed 3376, as a sentence: payloads landed but the DR had not yet seen them
/// when it crashed. After its restart it applies them from its ring at once, without waiting
/// for any message from the primary (which holds their ring space until then).
#[test]
fn a_restarted_dr_applies_what_landed_before_its_crash_without_being_asked() {
    let mut world = world(Mode::OrderSync);
    world.hold(Path::DrNotify);
    for n in 1..=3 {
        write(&mut world, n);
    }
    world.run_for(10 * MS);
    assert_eq!(world.dr().expect("DR up").applied_through(), 0);
    world.crash_dr();
    world.hold(Path::OrderToDr);
    world.hold(Path::PayloadToDr);
    world.restart_dr();
    world.run_for(10 * MS);
    assert_eq!(world.dr().expect("DR up").applied_through(), 3);
}

/// A runtime that hands the primary a poll's worth of inputs (completions, acks, client writes)
/// before taking its actions does the primary's work once per poll. That must change nothing
/// that a client or a failover sees: with every event of each 3 ms handled before the primary
/// acts, more writes than the table and the ring hold are admitted as room frees (admission
/// runs the deferred pass when a limit is hit), all are acknowledged, and a failover loses
/// nothing.
#[test]
fn inputs_handled_a_poll_at_a_time_change_nothing_a_client_sees() {
    for poll_window_ns in [0, 3 * MS] {
        let mut params = Params::scripted(Mode::OrderSync);
        params.partial_at_break = false;
        params.primary_poll_window_ns = poll_window_ns;
        let mut world = World::new(params);
        for n in 1..=40u8 {
            world.client_write(u64::from(n % 15) * 4096, pattern(n, 1024));
        }
        world.run_for(500 * MS);
        for seq in 1..=40 {
            assert!(
                acked(&world, seq),
                "op {seq} (poll window {poll_window_ns} ns)"
            );
        }
        let stats = world.primary().expect("primary up").stats();
        assert!(stats.backpressure > 0, "the table and ring limits were hit");
        world.crash_primary();
        let report = world.fail_over();
        assert_eq!(report.cut, 40);
        assert!(report.lost.is_empty());
        assert_invariants_hold(&world);
    }
}
