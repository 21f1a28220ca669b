//! Space allocation in the staging ring, done by the primary for both ends.
//!
//! The DR's staging ring and the primary's mirror of it have the same size and the same layout:
//! the payload of an op sits at the same ring position on both, so the primary's copy is the
//! source of the one-sided write and stays there until the DR has applied the op. Space is taken
//! at the head and given back at the tail, strictly in operation order (FIFO), which is the only
//! order the DR frees it in. A payload is never split across the end of the ring: when it does
//! not fit before the end, the remainder is skipped and charged to that op, so freeing "through
//! this op" frees the skipped bytes too.

use crate::config::round_up;

/// Byte ring allocator. `head` and `tail` count bytes since the start and never wrap; positions
/// are taken modulo the ring size. The head's position is kept alongside the head, so that an
/// allocation (once per write) costs no 64-bit division: the ring size need not be a power of
/// two.
#[derive(Clone, Debug)]
pub struct RingAllocator {
    ring_bytes: u64,
    align_bytes: u64,
    head: u64,
    /// `head % ring_bytes`.
    head_position: u64,
    tail: u64,
}

/// Space given to one payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSpan {
    /// Position in the ring where the payload starts.
    pub ring_offset: u64,
    /// Value of the head after this allocation; releasing through it frees this span and
    /// everything allocated before it.
    pub alloc_end: u64,
}

impl RingAllocator {
    pub fn new(ring_bytes: u64, align_bytes: u64) -> Self {
        assert!(align_bytes.is_power_of_two());
        assert!(ring_bytes > 0 && ring_bytes % align_bytes == 0);
        RingAllocator {
            ring_bytes,
            align_bytes,
            head: 0,
            head_position: 0,
            tail: 0,
        }
    }

    /// Takes `len` bytes, or returns `None` if the ring has no room until more is released.
    pub fn allocate(&mut self, len: u64) -> Option<RingSpan> {
        assert!(len > 0 && len <= self.ring_bytes);
        let len = round_up(len, self.align_bytes);
        let position = self.head_position;
        debug_assert_eq!(position, self.head % self.ring_bytes);
        let (start, start_position) = if position + len > self.ring_bytes {
            (self.head + (self.ring_bytes - position), 0)
        } else {
            (self.head, position)
        };
        let end = start + len;
        if end - self.tail > self.ring_bytes {
            return None;
        }
        self.head = end;
        self.head_position = start_position + len;
        if self.head_position == self.ring_bytes {
            self.head_position = 0;
        }
        let span = RingSpan {
            ring_offset: start_position,
            alloc_end: end,
        };
        debug_assert_eq!(span.ring_offset, start % self.ring_bytes);
        debug_assert!(span.ring_offset + len <= self.ring_bytes);
        Some(span)
    }

    /// Gives back everything allocated up to `alloc_end` (an earlier [`RingSpan::alloc_end`]).
    pub fn release_through(&mut self, alloc_end: u64) {
        assert!(alloc_end >= self.tail, "ring released out of order");
        assert!(
            alloc_end <= self.head,
            "ring released beyond what was allocated"
        );
        self.tail = alloc_end;
    }

    pub fn used_bytes(&self) -> u64 {
        self.head - self.tail
    }

    pub fn ring_bytes(&self) -> u64 {
        self.ring_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_fifo_and_never_straddle_the_end() {
        let mut ring = RingAllocator::new(4096, 512);
        let a = ring.allocate(1024).unwrap();
        let b = ring.allocate(2048).unwrap();
        assert_eq!((a.ring_offset, b.ring_offset), (0, 1024));
        // 1024 bytes remain at the end but a 1536-byte payload does not fit there, and the start
        // is still in use: refused.
        assert_eq!(ring.allocate(1536), None);
        ring.release_through(a.alloc_end);
        // Now the tail end is skipped and the payload goes to position 0.
        let c = ring.allocate(1024).unwrap();
        assert_eq!(c.ring_offset, 3072);
        ring.release_through(b.alloc_end);
        let d = ring.allocate(1536).unwrap();
        assert_eq!(d.ring_offset, 0);
        assert_eq!(ring.used_bytes(), 1024 + 1536);
    }

    #[test]
    fn the_whole_ring_can_be_used_and_then_nothing_more() {
        let mut ring = RingAllocator::new(2048, 512);
        let spans: Vec<_> = (0..4).map(|_| ring.allocate(300).unwrap()).collect();
        assert_eq!(ring.allocate(1), None);
        ring.release_through(spans[3].alloc_end);
        assert_eq!(ring.used_bytes(), 0);
        assert!(ring.allocate(2048).is_some());
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn releasing_backwards_is_a_programming_error() {
        let mut ring = RingAllocator::new(2048, 512);
        let a = ring.allocate(512).unwrap();
        let b = ring.allocate(512).unwrap();
        ring.release_through(b.alloc_end);
        ring.release_through(a.alloc_end);
    }
}
