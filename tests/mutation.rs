//! Proof that the checker can fail: each test switches on one deliberate protocol bug and
//! expects the simulator to catch it within a bounded number of seeds, naming the invariant the
//! bug breaks.

use ordinal_proto::{Mutation, Mutations};
use ordinal_tests::first_failure;

/// Seeds each mutation gets; every one is caught well within this (see each test's comment).
const SEEDS_MAX: u64 = 5_000;

fn expect_caught(mutation: Mutation, invariant_names: &[&str]) {
    let found = first_failure(0, SEEDS_MAX, Mutations::NONE.with(mutation));
    let Some((seed, violations)) = found else {
        panic!("{mutation:?} went unnoticed for {SEEDS_MAX} seeds");
    };
    eprintln!("{mutation:?} caught at seed {seed}: {}", violations[0]);
    assert!(
        violations
            .iter()
            .any(|v| invariant_names.iter().any(|name| v.starts_with(name))),
        "{mutation:?} caught at seed {seed}, but not as {invariant_names:?}: {violations:#?}"
    );
}

/// Applying past a gap at failover leaves a volume that is no prefix of the primary's history.
#[test]
fn mutation_apply_past_gap_breaks_prefix() {
    expect_caught(Mutation::ApplyPastGap, &["I1 prefix"]);
}

/// Without checksums, a DR restarting over a torn ring slot applies the torn bytes.
#[test]
fn mutation_skip_checksum_breaks_integrity() {
    expect_caught(Mutation::SkipChecksum, &["I3 integrity", "I1 prefix"]);
}

/// Acknowledging when the batch is sent rather than acked breaks synchronous order.
#[test]
fn mutation_ack_before_order_ack_breaks_sync_order() {
    expect_caught(Mutation::AckBeforeOrderAck, &["I6 sync order"]);
}

/// Reusing ring space before the DR applied its payload overwrites pending data.
#[test]
fn mutation_reuse_ring_early_breaks_integrity_or_completeness() {
    expect_caught(
        Mutation::ReuseRingEarly,
        &["I3 integrity", "I2 completeness", "protocol"],
    );
}

/// A DR that keeps serving the old epoch after promotion lets the old primary acknowledge.
#[test]
fn mutation_accept_stale_epoch_breaks_fencing() {
    expect_caught(Mutation::AcceptStaleEpoch, &["I5 fencing"]);
}

/// Marking "replicated" on post rather than on completion makes the aux vouch for data that
/// never arrived.
#[test]
fn mutation_mark_replicated_on_post_breaks_completeness() {
    expect_caught(Mutation::MarkReplicatedOnPost, &["I2 completeness"]);
}

/// A primary that degrades whatever its policy acknowledges, under `block`, writes the DR has
/// no order for; only its own word spares them I6, and the checker does not take it there.
#[test]
fn mutation_degrade_whatever_the_policy_breaks_sync_order() {
    expect_caught(Mutation::DegradeWhateverThePolicy, &["I6 sync order"]);
}

/// The control: with no mutation, the same seeds hold.
#[test]
fn mutation_none_is_not_caught() {
    assert_eq!(first_failure(0, SEEDS_MAX, Mutations::NONE), None);
}
