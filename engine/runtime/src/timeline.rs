//! Where a write's time goes inside the primary: the instants of its steps, recorded on
//! request (off by default) for benchmarks that break a write's acknowledgement latency down.
//!
//! Why this exists: the loopback benchmark's order-sync p99 is well above the raw ping-pong's
//! while its order round trip alone is not, and a histogram per step cannot tell which step a
//! slow write spent its time in (the steps of one write overlap: its local write runs while its
//! order record is out). A timeline per write can.

use std::collections::HashMap;
use std::time::Instant;

use ordinal_proto::Seq;

/// The steps of one acknowledged write, as the primary's executor saw them. Steps that did not
/// happen (a write admitted before recording began, say) are `None`.
#[derive(Clone, Copy, Debug)]
pub struct WriteTimeline {
    pub seq: Seq,
    /// The client's write reached the primary's loop (before admission).
    pub arrived: Instant,
    /// The SEND of the order batch holding this write's record was about to be posted...
    pub order_posting: Option<Instant>,
    /// ...and the post returned (over TCP, the bytes were handed to the kernel by then, or
    /// queued for the writer task).
    pub order_posted: Option<Instant>,
    /// The DR's answer that it holds the record was handled.
    pub order_held: Option<Instant>,
    /// The write to the primary's own volume completed.
    pub local_written: Option<Instant>,
    /// The client was told its write is acknowledged.
    pub acked: Option<Instant>,
}

/// Timelines of writes in flight and of acknowledged ones, up to `capacity` in all: once that
/// many are held, new writes are not recorded until [`WriteTimelines::take`] empties it.
#[derive(Debug, Default)]
pub struct WriteTimelines {
    capacity: usize,
    in_flight: HashMap<Seq, WriteTimeline>,
    acked: Vec<WriteTimeline>,
}

impl WriteTimelines {
    /// Records up to `capacity` timelines from now on (0 stops recording and drops what is
    /// held).
    pub fn record(&mut self, capacity: usize) {
        self.capacity = capacity;
        if capacity == 0 {
            self.in_flight.clear();
            self.acked.clear();
        }
    }

    /// The acknowledged writes' timelines, in the order of their acknowledgement; recording
    /// goes on.
    pub fn take(&mut self) -> Vec<WriteTimeline> {
        std::mem::take(&mut self.acked)
    }

    pub fn is_recording(&self) -> bool {
        self.capacity > 0
    }

    pub fn admitted(&mut self, seq: Seq, arrived: Instant) {
        if self.in_flight.len() + self.acked.len() >= self.capacity {
            return;
        }
        self.in_flight.insert(
            seq,
            WriteTimeline {
                seq,
                arrived,
                order_posting: None,
                order_posted: None,
                order_held: None,
                local_written: None,
                acked: None,
            },
        );
    }

    /// The writes `first..=last` went out in one order batch, posted between the two instants.
    pub fn order_posted(&mut self, first: Seq, last: Seq, posting: Instant, posted: Instant) {
        self.each(first, last, |timeline| {
            timeline.order_posting = Some(posting);
            timeline.order_posted = Some(posted);
        });
    }

    /// The DR now holds the records `first..=last`.
    pub fn order_held(&mut self, first: Seq, last: Seq, at: Instant) {
        self.each(first, last, |timeline| {
            timeline.order_held.get_or_insert(at);
        });
    }

    pub fn local_written(&mut self, seq: Seq, at: Instant) {
        self.each(seq, seq, |timeline| timeline.local_written = Some(at));
    }

    pub fn acked(&mut self, seq: Seq, at: Instant) {
        if let Some(mut timeline) = self.in_flight.remove(&seq) {
            timeline.acked = Some(at);
            self.acked.push(timeline);
        }
    }

    /// Applies `step` to the writes `first..=last` being recorded, walking the shorter of the
    /// range and the writes in flight (a batch's range is at most a few hundred ops, but after a
    /// reconnect `order_held` may cover a long range of which none is recorded).
    fn each(&mut self, first: Seq, last: Seq, mut step: impl FnMut(&mut WriteTimeline)) {
        if first > last || self.in_flight.is_empty() {
            return;
        }
        if last - first < self.in_flight.len() as u64 {
            for seq in first..=last {
                if let Some(timeline) = self.in_flight.get_mut(&seq) {
                    step(timeline);
                }
            }
        } else {
            for (_, timeline) in self.in_flight.iter_mut() {
                if (first..=last).contains(&timeline.seq) {
                    step(timeline);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_write_gathers_its_steps_and_is_handed_out_once_acknowledged() {
        let mut timelines = WriteTimelines::default();
        let base = Instant::now();
        let at = |us| base + Duration::from_micros(us);
        timelines.admitted(1, at(0));
        assert!(!timelines.is_recording());
        timelines.record(2);
        timelines.admitted(2, at(1));
        timelines.admitted(3, at(2));
        timelines.admitted(4, at(3)); // over capacity: not recorded
        timelines.order_posted(2, 3, at(4), at(5));
        timelines.local_written(3, at(6));
        timelines.order_held(1, 2, at(7));
        timelines.order_held(2, 3, at(8)); // 2 was held at 7 already
        timelines.acked(2, at(9));
        timelines.acked(4, at(9));
        let taken = timelines.take();
        assert_eq!(taken.len(), 1, "only acknowledged writes are handed out");
        let two = taken[0];
        assert_eq!(two.seq, 2);
        assert_eq!(two.arrived, at(1));
        assert_eq!(
            (two.order_posting, two.order_posted),
            (Some(at(4)), Some(at(5)))
        );
        assert_eq!(two.order_held, Some(at(7)));
        assert_eq!(two.local_written, None);
        assert_eq!(two.acked, Some(at(9)));
        // Taking made room: 3 is still in flight, so one more fits.
        timelines.admitted(5, at(10));
        timelines.admitted(6, at(10));
        timelines.acked(3, at(11));
        timelines.acked(5, at(12));
        timelines.acked(6, at(12));
        let taken = timelines.take();
        let seqs: Vec<Seq> = taken.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, vec![3, 5]);
        assert_eq!(taken[0].local_written, Some(at(6)));
        assert_eq!(taken[0].order_held, Some(at(8)));
        assert!(
            timelines.in_flight.is_empty(),
            "acknowledged writes leave the in-flight set"
        );
        timelines.record(0);
        timelines.admitted(7, at(13));
        timelines.acked(7, at(14));
        assert!(timelines.take().is_empty(), "capacity 0 records nothing");
    }

    #[test]
    fn a_long_held_range_reaches_only_the_recorded_writes() {
        let mut timelines = WriteTimelines::default();
        let now = Instant::now();
        timelines.record(4);
        timelines.admitted(1_000_000, now);
        timelines.order_held(1, u64::MAX - 1, now);
        timelines.acked(1_000_000, now);
        assert_eq!(timelines.take()[0].order_held, Some(now));
    }
}
