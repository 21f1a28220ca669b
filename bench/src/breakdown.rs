//! Where the time of a write at one write in flight goes: the primary's timeline of each write
//! (see `ordinal_runtime::timeline`) joined to the client's own start and end, and the mean of
//! each step over bands of writes ranked by their acknowledgement latency, so that the median
//! writes and the slowest ones can be told apart.

use std::time::Instant;

use ordinal_proto::Seq;
use ordinal_runtime::timeline::WriteTimeline;

/// The steps, in the order of the columns of [`Band::step_means_us`].
pub const STEPS: [&str; 7] = [
    "to primary",  // client call -> the primary's loop has the write
    "to post",     // -> the order batch's SEND is posted (admission, batching)
    "order post",  // the post itself (over TCP on loopback: the kernel's whole send path)
    "order RT",    // post returned -> the DR's answer handled
    "local write", // the primary's loop had the write -> its own volume write completed
    "ack step",    // the later of the two above -> the client told
    "to client",   // -> the client's call returned
];

/// A band of writes ranked by acknowledgement latency (`from`..`to` are fractions, 0.0-1.0).
#[derive(Clone, Debug)]
pub struct Band {
    pub label: &'static str,
    pub writes: usize,
    pub write_ack_mean_us: f64,
    pub step_means_us: [f64; STEPS.len()],
    /// Share of the band's writes whose local write completed after the DR's answer.
    pub local_write_last: f64,
}

/// One write as the client saw it: its seq (from the acknowledgement), when it called and when
/// the call returned.
pub type ClientSample = (Seq, Instant, Instant);

const BANDS: [(&str, f64, f64); 3] = [
    ("p40-p60", 0.40, 0.60),
    ("p98-p99", 0.98, 0.99),
    ("slowest 1%", 0.99, 1.0),
];

/// The bands of `samples` whose timeline is whole; writes without one (not recorded, or a step
/// missing) are left out.
pub fn bands(samples: &[ClientSample], timelines: &[WriteTimeline]) -> Vec<Band> {
    let by_seq: std::collections::HashMap<Seq, &WriteTimeline> = timelines
        .iter()
        .map(|timeline| (timeline.seq, timeline))
        .collect();
    let us = |later: Instant, earlier: Instant| {
        later.saturating_duration_since(earlier).as_secs_f64() * 1e6
    };
    let mut rows: Vec<(f64, [f64; STEPS.len()], bool)> = samples
        .iter()
        .filter_map(|&(seq, called, returned)| {
            let timeline = by_seq.get(&seq)?;
            let posting = timeline.order_posting?;
            let posted = timeline.order_posted?;
            let held = timeline.order_held?;
            let written = timeline.local_written?;
            let acked = timeline.acked?;
            let arrived = timeline.arrived;
            let steps = [
                us(arrived, called),
                us(posting, arrived),
                us(posted, posting),
                us(held, posted),
                us(written, arrived),
                us(acked, held.max(written)),
                us(returned, acked),
            ];
            Some((us(returned, called), steps, written > held))
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = rows.len();
    BANDS
        .iter()
        .filter_map(|&(label, from, to)| {
            let band = &rows[(n as f64 * from) as usize..(n as f64 * to) as usize];
            if band.is_empty() {
                return None;
            }
            let count = band.len() as f64;
            let mut step_means_us = [0.0; STEPS.len()];
            for (_, steps, _) in band {
                for (mean, step) in step_means_us.iter_mut().zip(steps) {
                    *mean += step / count;
                }
            }
            Some(Band {
                label,
                writes: band.len(),
                write_ack_mean_us: band.iter().map(|row| row.0).sum::<f64>() / count,
                step_means_us,
                local_write_last: band.iter().filter(|row| row.2).count() as f64 / count,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A write called at `base + start`; every step takes the given microseconds, the order's
    /// round trip `order_us` and the local write `local_us`.
    fn write(
        seq: Seq,
        base: Instant,
        order_us: u64,
        local_us: u64,
    ) -> (ClientSample, WriteTimeline) {
        let at = |us: u64| base + Duration::from_micros(us);
        let arrived = at(1);
        let posting = at(2);
        let posted = at(5);
        let held = posted + Duration::from_micros(order_us);
        let written = arrived + Duration::from_micros(local_us);
        let acked = held.max(written) + Duration::from_micros(1);
        let returned = acked + Duration::from_micros(2);
        let timeline = WriteTimeline {
            seq,
            arrived,
            order_posting: Some(posting),
            order_posted: Some(posted),
            order_held: Some(held),
            local_written: Some(written),
            acked: Some(acked),
        };
        ((seq, base, returned), timeline)
    }

    #[test]
    fn the_slowest_band_shows_the_step_that_made_its_writes_slow() {
        let base = Instant::now();
        let (mut samples, mut timelines) = (Vec::new(), Vec::new());
        // 99 writes whose order answer comes last (40 us), one whose local write takes 500 us.
        for seq in 1..=100 {
            let local_us = if seq == 37 { 500 } else { 10 };
            let (sample, timeline) = write(seq, base, 40, local_us);
            samples.push(sample);
            timelines.push(timeline);
        }
        // A write without a timeline is left out.
        samples.push((101, base, base + Duration::from_micros(9_000)));
        let bands = bands(&samples, &timelines);
        assert_eq!(bands.len(), 3);
        let (median, slowest) = (&bands[0], &bands[2]);
        assert_eq!(median.label, "p40-p60");
        assert_eq!(median.writes, 20);
        assert_eq!(median.local_write_last, 0.0);
        assert!((median.write_ack_mean_us - 48.0).abs() < 1e-6, "{median:?}");
        let expected = [1.0, 1.0, 3.0, 40.0, 10.0, 1.0, 2.0];
        for (got, want) in median.step_means_us.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{median:?}");
        }
        assert_eq!(slowest.writes, 1);
        assert_eq!(slowest.local_write_last, 1.0);
        assert!(
            (slowest.step_means_us[4] - 500.0).abs() < 1e-6,
            "{slowest:?}"
        );
        assert!(
            (slowest.write_ack_mean_us - 504.0).abs() < 1e-6,
            "{slowest:?}"
        );
    }

    #[test]
    fn no_whole_timeline_gives_no_band() {
        let base = Instant::now();
        let (sample, mut timeline) = write(1, base, 40, 10);
        timeline.local_written = None;
        assert!(bands(&[sample], &[timeline]).is_empty());
    }
}
