//! Benchmark harnesses for ordinal. Each benchmark prints its figures (hdrhistogram percentiles
//! at 3 significant digits, and ratios against a baseline measured in the same run); none of
//! them is a timed test.

pub mod breakdown;
pub mod core_loop;
pub mod loopback;
pub mod output;
pub mod perftest;
pub mod ramdisk;
pub mod sweep;
pub mod wan_link;
