//! Shared helpers for ordinal's whole-system tests (the tests themselves are the `[[test]]`
//! targets beside this file).

use ordinal_proto::Mutations;
use ordinal_sim::soak;

/// Runs `count` seeds from `first` with `mutations` on both cores and returns the first failing
/// seed with its violations, if any.
pub fn first_failure(first: u64, count: u64, mutations: Mutations) -> Option<(u64, Vec<String>)> {
    let summary = soak(first, count, 2, mutations, &|_| {});
    summary.failure.map(|(seed, verdict)| {
        (
            seed,
            verdict.violations.iter().map(ToString::to_string).collect(),
        )
    })
}
