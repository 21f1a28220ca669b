//! Geometry, modes and limits shared by the three roles.

use core::fmt;

/// Operation sequence number: the operation order of the method. The first write is seq 1, so
/// "through 0" means "none".
pub type Seq = u64;
/// Replication epoch. The DR takes `epoch + 1` when it is promoted; anything carrying an older
/// epoch is refused from then on (fencing, I5).
pub type Epoch = u32;
/// Simulated or real monotonic time in nanoseconds; time only enters the state machines as an
/// argument (`handle_tick(now)`), never by reading a clock.
pub type Nanos = u64;

/// When a client write is acknowledged (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Local write done and the DR holds the order record (the patent's method; default).
    OrderSync,
    /// Local write done, order held and the payload landed at the DR (DRBD protocol B/C).
    Sync,
    /// Local write done and the op's entry is on the aux (DRBD protocol A, but with an exact
    /// loss report, because the aux knows every acknowledged op).
    Async,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::OrderSync, Mode::Sync, Mode::Async];

    pub fn name(self) -> &'static str {
        match self {
            Mode::OrderSync => "order-sync",
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }

    pub fn parse(text: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|mode| mode.name() == text)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the primary does with client writes while the DR link is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkLossPolicy {
    /// Hold acknowledgements until the DR is back (writes queue up to the lag limits, then block).
    /// Keeps I6 strict: nothing is acknowledged whose order the DR does not hold.
    Block,
    /// Keep serving: acknowledge once the local write is done and the op's entry is on the aux.
    /// The op is then covered by the loss report through the aux table (I4) even though the DR
    /// never saw its order; the DR catches up from the retained ring when the link returns.
    Degrade,
}

impl LinkLossPolicy {
    pub fn name(self) -> &'static str {
        match self {
            LinkLossPolicy::Block => "block",
            LinkLossPolicy::Degrade => "degrade",
        }
    }
}

/// Sizes every role must agree on. The DR refuses a primary whose geometry differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the replicated volume.
    pub volume_bytes: u64,
    /// Offsets and lengths of writes, and ring positions, are multiples of this (direct I/O on the
    /// DR copies ring slots straight to the volume, which needs logical-block alignment).
    pub sector_bytes: u32,
    /// Size of the DR's staging ring (and of the primary's mirror of it, which is the source of the
    /// one-sided writes and keeps every payload until the DR has applied it).
    pub ring_bytes: u64,
    /// Entries in the aux status table and slots in the DR order log: the most operations that can
    /// be between admission on the primary and application on the DR. A power of two.
    pub table_slots: u32,
    /// Largest single write.
    pub payload_bytes_max: u32,
}

/// Why a geometry is unusable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeometryError(pub String);

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid geometry: {}", self.0)
    }
}

impl std::error::Error for GeometryError {}

impl Geometry {
    /// Checks the relations the protocol relies on.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let fail = |why: String| Err(GeometryError(why));
        if !self.sector_bytes.is_power_of_two() || self.sector_bytes < 8 {
            return fail(format!(
                "sector size {} is not a power of two >= 8",
                self.sector_bytes
            ));
        }
        let sector = u64::from(self.sector_bytes);
        if self.volume_bytes == 0 || self.volume_bytes % sector != 0 {
            return fail(format!(
                "volume size {} is not a positive multiple of the sector size",
                self.volume_bytes
            ));
        }
        if self.ring_bytes == 0 || self.ring_bytes % sector != 0 {
            return fail(format!(
                "ring size {} is not a positive multiple of the sector size",
                self.ring_bytes
            ));
        }
        if !self.table_slots.is_power_of_two() || self.table_slots < 2 {
            return fail(format!(
                "table slots {} is not a power of two >= 2",
                self.table_slots
            ));
        }
        // The DR reconstructs a full seq from the 32 immediate-data bits of a payload write by
        // looking inside its window of `table_slots` ops, so the window must be far below 2^31.
        if self.table_slots > 1 << 24 {
            return fail(format!("table slots {} exceeds 2^24", self.table_slots));
        }
        if self.payload_bytes_max == 0 || u64::from(self.payload_bytes_max) % sector != 0 {
            return fail(format!(
                "largest write {} is not a positive multiple of the sector size",
                self.payload_bytes_max
            ));
        }
        // Wrapping can waste up to one write's worth of ring; two writes must always fit.
        if u64::from(self.payload_bytes_max) * 2 > self.ring_bytes {
            return fail(format!(
                "ring of {} bytes cannot hold two writes of the largest size {}",
                self.ring_bytes, self.payload_bytes_max
            ));
        }
        Ok(())
    }

    #[inline]
    pub fn slot_of(&self, seq: Seq) -> usize {
        (seq & u64::from(self.table_slots - 1)) as usize
    }
}

/// Deliberate protocol bugs, switchable only in builds with the `mutations` feature, so that tests
/// can prove the simulator and its checker catch each of them. In other builds `is_on` is a
/// constant `false` and every guarded branch compiles away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations(u32);

/// One deliberate bug. See [`Mutations`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Mutation {
    /// The DR applies a landed op even when an earlier op has not landed (breaks I1).
    ApplyPastGap = 1 << 0,
    /// Payload checksums are not verified before applying (breaks I3).
    SkipChecksum = 1 << 1,
    /// The primary acknowledges order-sync writes before the DR's order ack (breaks I6).
    AckBeforeOrderAck = 1 << 2,
    /// The primary reuses ring space when the payload write completes rather than when the DR has
    /// applied it, so pending data can be overwritten (breaks I2/I3).
    ReuseRingEarly = 1 << 3,
    /// The DR accepts order records from an epoch older than its own (breaks I5).
    AcceptStaleEpoch = 1 << 4,
    /// The primary marks an op "replicated" on the aux when its payload write is posted instead
    /// of when it completes (breaks I2).
    MarkReplicatedOnPost = 1 << 5,
    /// The primary degrades on a lost DR link whatever the link-loss policy, so it acknowledges
    /// writes whose order the DR does not hold under `block` too (breaks I6).
    DegradeWhateverThePolicy = 1 << 6,
}

impl Mutation {
    pub const ALL: [Mutation; 7] = [
        Mutation::ApplyPastGap,
        Mutation::SkipChecksum,
        Mutation::AckBeforeOrderAck,
        Mutation::ReuseRingEarly,
        Mutation::AcceptStaleEpoch,
        Mutation::MarkReplicatedOnPost,
        Mutation::DegradeWhateverThePolicy,
    ];
}

impl Mutations {
    pub const NONE: Mutations = Mutations(0);

    pub fn with(self, mutation: Mutation) -> Mutations {
        Mutations(self.0 | mutation as u32)
    }

    #[inline(always)]
    pub fn is_on(self, mutation: Mutation) -> bool {
        cfg!(feature = "mutations") && self.0 & mutation as u32 != 0
    }
}

/// A valid geometry for unit tests: 1 MiB volume, 64 KiB ring, 64 slots, writes up to 8 KiB.
#[cfg(test)]
pub(crate) fn sample_geometry() -> Geometry {
    Geometry {
        volume_bytes: 1 << 20,
        sector_bytes: 512,
        ring_bytes: 1 << 16,
        table_slots: 64,
        payload_bytes_max: 8192,
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
#[inline]
pub fn round_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Geometry {
        sample_geometry()
    }

    #[test]
    fn geometry_validation_accepts_sane_and_names_each_problem() {
        assert_eq!(good().validate(), Ok(()));
        let bad = [
            Geometry {
                sector_bytes: 500,
                ..good()
            },
            Geometry {
                volume_bytes: 1000,
                ..good()
            },
            Geometry {
                ring_bytes: 0,
                ..good()
            },
            Geometry {
                table_slots: 48,
                ..good()
            },
            Geometry {
                payload_bytes_max: 1 << 16,
                ..good()
            },
            Geometry {
                table_slots: 1 << 25,
                ..good()
            },
        ];
        for geometry in bad {
            let error = geometry.validate().unwrap_err();
            assert!(
                error.to_string().starts_with("invalid geometry: "),
                "{error}"
            );
        }
    }

    #[test]
    fn modes_round_trip_through_their_names() {
        for mode in Mode::ALL {
            assert_eq!(Mode::parse(mode.name()), Some(mode));
        }
        assert_eq!(Mode::parse("fast"), None);
    }
}
