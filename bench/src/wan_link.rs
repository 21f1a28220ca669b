//! An emulated long-distance link between two network namespaces, at packet level and at the
//! host's own speed: `wan-link` (the binary in `src/bin/`) carries IPv4 packets between two TUN
//! devices, one in each namespace, through a [`LinkModel`] per direction.
//!
//! Why not netem: this machine's kernel has no `sch_netem` (nor `prio`), while the soft-RoCE
//! guests that have it run under TCG, where a megabyte costs the emulated CPU more than a 10 ms
//! link does (see `tools/guest/wan.sh`). A TUN device hands whole IP packets to a process, so the
//! link can be modelled in user space with the real TCP stacks of both namespaces on either side:
//! their congestion control, retransmissions and socket buffers are the kernel's, as on a WAN.
//!
//! The model is what a WAN router's egress looks like (the guests' `netem` + `tbf` + `prio`):
//! packets wait in a bounded queue, leave it one at a time at the link's rate, with strict
//! priority for DSCP EF (expedited forwarding, RFC 3246; ordinal marks its order connection so),
//! and arrive after the one-way delay. A packet that finds the queue full is dropped, as a router
//! drops it; TCP sends it again.

use std::collections::VecDeque;

/// DSCP of expedited forwarding (RFC 3246), the code point ordinal's order connection carries.
pub const DSCP_EXPEDITED_FORWARDING: u8 = 46;

/// Nanoseconds on the emulator's monotonic clock.
pub type Nanos = u64;

/// Which queue a packet waits in: expedited traffic leaves before any bulk packet queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Expedited,
    Bulk,
}

/// The class of an IP packet: expedited for an IPv4 header marked DSCP EF, bulk otherwise (IPv6,
/// or anything too short to be IPv4, is carried as bulk: the link only orders, it never judges).
pub fn classify(packet: &[u8], honour_dscp: bool) -> Class {
    const IPV4_HEADER_BYTES_MIN: usize = 20;
    if !honour_dscp || packet.len() < IPV4_HEADER_BYTES_MIN || packet[0] >> 4 != 4 {
        return Class::Bulk;
    }
    // The second byte of an IPv4 header is the DS field: DSCP in its high six bits, ECN below.
    if packet[1] >> 2 == DSCP_EXPEDITED_FORWARDING {
        Class::Expedited
    } else {
        Class::Bulk
    }
}

/// One direction of the link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Propagation delay, added to every packet once it has left the queue.
    pub one_way_delay_ns: Nanos,
    /// The bottleneck's rate: a packet of `n` bytes occupies the link for `n * 8 / rate` seconds.
    pub rate_bits_per_s: u64,
    /// Bytes the egress queue holds (both classes together); a packet beyond is dropped.
    pub queue_bytes_max: usize,
    /// Strict priority for DSCP EF; false gives one FIFO for everything.
    pub honour_dscp: bool,
}

/// What the model did with an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    Queued,
    DroppedQueueFull,
}

/// Counters of one direction, printed when the emulator ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    pub expedited_packets: u64,
    pub dropped_packets: u64,
}

#[derive(Debug)]
struct Queued {
    arrived_at: Nanos,
    packet: Vec<u8>,
}

/// One direction of an emulated link: packets in (`offer`), time in (`advance`), packets out
/// (`take_delivered`). No I/O and no clock of its own, so tests drive it with exact times.
#[derive(Debug)]
pub struct LinkModel {
    config: LinkConfig,
    /// Index 0: expedited, 1: bulk.
    queues: [VecDeque<Queued>; 2],
    queued_bytes: usize,
    /// When the packet now being sent has left the link (the link is idle from then on).
    link_free_at: Nanos,
    /// Packets on the wire, in order of arrival at the far end: they leave the queue in
    /// sequence and all take the same delay, so their arrival times never decrease.
    on_the_wire: VecDeque<(Nanos, Vec<u8>)>,
    counters: LinkCounters,
}

impl LinkModel {
    pub fn new(config: LinkConfig) -> LinkModel {
        assert!(config.rate_bits_per_s > 0, "a link needs a rate");
        assert!(config.queue_bytes_max > 0, "a link needs a queue");
        LinkModel {
            config,
            queues: [VecDeque::new(), VecDeque::new()],
            queued_bytes: 0,
            link_free_at: 0,
            on_the_wire: VecDeque::new(),
            counters: LinkCounters::default(),
        }
    }

    /// A packet handed to the link at `now`.
    pub fn offer(&mut self, now: Nanos, packet: Vec<u8>) -> Offered {
        assert!(!packet.is_empty(), "an empty packet");
        if self.queued_bytes + packet.len() > self.config.queue_bytes_max {
            self.counters.dropped_packets += 1;
            return Offered::DroppedQueueFull;
        }
        let class = classify(&packet, self.config.honour_dscp);
        self.queued_bytes += packet.len();
        let queue = match class {
            Class::Expedited => 0,
            Class::Bulk => 1,
        };
        self.queues[queue].push_back(Queued {
            arrived_at: now,
            packet,
        });
        Offered::Queued
    }

    /// Moves onto the wire every packet whose turn on the link has come by `now`.
    pub fn advance(&mut self, now: Nanos) {
        while self.link_free_at <= now {
            // Strict priority: a bulk packet leaves only when no expedited one waits.
            let Some(next) = self.queues[0]
                .pop_front()
                .or_else(|| self.queues[1].pop_front())
            else {
                break;
            };
            self.queued_bytes -= next.packet.len();
            // An idle link starts a packet when it arrived, not when the emulator looked.
            let start = self.link_free_at.max(next.arrived_at);
            let left_at = start + self.transmission_ns(next.packet.len());
            self.link_free_at = left_at;
            let arrives_at = left_at + self.config.one_way_delay_ns;
            debug_assert!(self
                .on_the_wire
                .back()
                .is_none_or(|(last, _)| *last <= arrives_at));
            if classify(&next.packet, self.config.honour_dscp) == Class::Expedited {
                self.counters.expedited_packets += 1;
            }
            self.on_the_wire.push_back((arrives_at, next.packet));
        }
    }

    /// The packets that have reached the far end by `now`, in order.
    pub fn take_delivered(&mut self, now: Nanos) -> impl Iterator<Item = Vec<u8>> + '_ {
        std::iter::from_fn(move || {
            if self.on_the_wire.front()?.0 > now {
                return None;
            }
            let (_, packet) = self.on_the_wire.pop_front()?;
            self.counters.delivered_packets += 1;
            self.counters.delivered_bytes += packet.len() as u64;
            Some(packet)
        })
    }

    /// When something next happens on this direction (a packet reaches the far end, or the link
    /// frees up for a queued one); `None` when the link is idle and empty.
    pub fn next_event_at(&self) -> Option<Nanos> {
        let arrival = self.on_the_wire.front().map(|(at, _)| *at);
        let departure = (self.queued_bytes > 0).then_some(self.link_free_at);
        match (arrival, departure) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        }
    }

    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    fn transmission_ns(&self, bytes: usize) -> Nanos {
        // u128: a 64 KiB packet on a 1 bit/s link would overflow u64 nanoseconds times eight.
        (bytes as u128 * 8 * 1_000_000_000 / self.config.rate_bits_per_s as u128) as Nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    /// An IPv4 header's first bytes with the given DSCP, padded to `len`.
    fn packet(dscp: u8, len: usize, tag: u8) -> Vec<u8> {
        let mut bytes = vec![tag; len];
        bytes[0] = 0x45;
        bytes[1] = dscp << 2;
        bytes
    }

    fn link(honour_dscp: bool) -> LinkModel {
        LinkModel::new(LinkConfig {
            one_way_delay_ns: 5 * MS,
            // 8 Mbit/s: a 1,000-byte packet occupies the link for exactly 1 ms.
            rate_bits_per_s: 8_000_000,
            queue_bytes_max: 10_000,
            honour_dscp,
        })
    }

    fn delivered_at(link: &mut LinkModel, now: Nanos) -> Vec<u8> {
        link.advance(now);
        link.take_delivered(now).map(|p| p[2]).collect()
    }

    #[test]
    fn a_packet_arrives_after_its_transmission_and_the_delay() {
        // One 1,000-byte packet offered at 10 ms leaves the link at 11 ms and arrives at 16 ms.
        let mut link = link(true);
        assert_eq!(link.offer(10 * MS, packet(0, 1000, 1)), Offered::Queued);
        assert_eq!(delivered_at(&mut link, 10 * MS), Vec::<u8>::new());
        assert_eq!(link.next_event_at(), Some(16 * MS));
        assert_eq!(delivered_at(&mut link, 16 * MS - 1), Vec::<u8>::new());
        assert_eq!(delivered_at(&mut link, 16 * MS), vec![1]);
        assert_eq!(link.next_event_at(), None);
        assert_eq!(link.counters().delivered_bytes, 1000);
    }

    #[test]
    fn packets_share_the_rate_and_an_idle_link_starts_when_a_packet_arrived() {
        // Three packets offered together leave at 1, 2 and 3 ms: the rate is shared. Looking only
        // at 2.5 ms must not delay the first one's start past its arrival at 0.
        let mut link = link(true);
        for tag in 1..=3 {
            link.offer(0, packet(0, 1000, tag));
        }
        assert_eq!(delivered_at(&mut link, 2 * MS + MS / 2), Vec::<u8>::new());
        assert_eq!(delivered_at(&mut link, 7 * MS), vec![1, 2]);
        assert_eq!(delivered_at(&mut link, 8 * MS), vec![3]);
    }

    #[test]
    fn expedited_packets_overtake_queued_bulk_but_not_the_one_on_the_link() {
        // Bulk 1-3 queued at 0; an EF packet offered at 0.5 ms waits only for bulk 1, which is
        // already being sent, and then goes first. Without DSCP it waits behind all three.
        let mut honoured = link(true);
        let mut fifo = link(false);
        for model in [&mut honoured, &mut fifo] {
            for tag in 1..=3 {
                model.offer(0, packet(0, 1000, tag));
            }
            model.advance(0);
            model.offer(MS / 2, packet(DSCP_EXPEDITED_FORWARDING, 1000, 9));
        }
        assert_eq!(delivered_at(&mut honoured, 20 * MS), vec![1, 9, 2, 3]);
        assert_eq!(delivered_at(&mut fifo, 20 * MS), vec![1, 2, 3, 9]);
        assert_eq!(honoured.counters().expedited_packets, 1);
        assert_eq!(fifo.counters().expedited_packets, 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_growing() {
        // 10,000 bytes of queue: ten packets of 1,000 fit, the eleventh is dropped; once the
        // link has sent one there is room again.
        let mut link = link(true);
        for tag in 0..10 {
            assert_eq!(link.offer(0, packet(0, 1000, tag)), Offered::Queued);
        }
        assert_eq!(
            link.offer(0, packet(0, 1000, 10)),
            Offered::DroppedQueueFull
        );
        assert_eq!(link.counters().dropped_packets, 1);
        link.advance(MS);
        assert_eq!(link.offer(MS, packet(0, 1000, 11)), Offered::Queued);
    }

    #[test]
    fn anything_but_a_marked_ipv4_header_is_bulk() {
        assert_eq!(classify(&packet(46, 20, 0), true), Class::Expedited);
        assert_eq!(classify(&packet(46, 20, 0), false), Class::Bulk);
        assert_eq!(classify(&packet(0, 20, 0), true), Class::Bulk);
        assert_eq!(classify(&packet(46, 19, 0), true), Class::Bulk);
        let mut ipv6 = packet(46, 40, 0);
        ipv6[0] = 0x60;
        assert_eq!(classify(&ipv6, true), Class::Bulk);
    }
}
