//! The aux: keeps the primary status table and the primary's heartbeat in a memory region the
//! primary writes with one-sided writes (the patent's "storage sharing"). The aux's CPU does not
//! take part in those writes; it only watches the heartbeat and, on heartbeat loss or on request,
//! fences the primary (revokes its access, records the fence) and hands the frozen table to the
//! DR.
//!
//! Region layout (a memory-mapped file in the runtime, so the table outlives an aux restart):
//! two [`RegionHeader`] copies (128 bytes, aux-owned), then the primary-writable area: the
//! heartbeat (64 bytes) and `table_slots` entries of 32 bytes (see `primary::AUX_ENTRIES_OFFSET`).

use crate::config::{Epoch, Geometry, Nanos};
use crate::dr::OpenError;
use crate::primary::aux_primary_area_bytes;
use crate::wire::{
    DecodeError, Heartbeat, RegionHeader, AUX_TABLE_MAGIC, REGION_FLAG_FENCED, REGION_HEADER_BYTES,
};

/// Offset of the primary-writable area in the aux region.
pub const AUX_PRIMARY_AREA_OFFSET: usize = 2 * REGION_HEADER_BYTES;

/// Bytes of the whole aux region.
pub fn aux_region_bytes(table_slots: u32) -> usize {
    AUX_PRIMARY_AREA_OFFSET + aux_primary_area_bytes(table_slots)
}

/// Heartbeat timeouts a primary that just connected has to write its first heartbeat. Before
/// its first heartbeat lands a primary holds no lease, so it acknowledges nothing, and waiting
/// longer for it risks no write. But it may be slow to get there: it registers the memory of
/// its queue pairs (which pins every page) and connects to the DR. Seen with a one-timeout
/// grace: a primary in a soft-RoCE guest, fenced before its first heartbeat landed, after it
/// had connected to the aux and the DR; every write of the run was then refused.
pub const FIRST_HEARTBEAT_GRACE_TIMEOUTS: u64 = 10;

/// The part of a heartbeat timeout that one gap between two ticks counts for at most. A longer
/// gap means the aux itself did not run (its loop stalled, or its whole machine did, as an
/// emulated guest does under load): it did not watch the heartbeat then, and a primary stalled
/// by the same cause could not have written one; counted in full, one such stall would fence a
/// live primary by itself. (In the soft-RoCE guest the daemons' loops were seen stalling for
/// 200-350 ms, and the primary's alone for up to 4.6 s.) The aux declares the primary dead only
/// after a timeout of silence it watched; the table is still handed over no earlier than a
/// whole timeout after the heartbeat last changed, so the primary's lease has run out whichever
/// way the time is counted.
pub const TICK_GAP_COUNTED_MAX_DIVISOR: u64 = 2;

#[derive(Clone, Copy, Debug)]
pub struct AuxConfig {
    pub geometry: Geometry,
    /// The primary is declared dead when its heartbeat has not advanced for this long.
    pub heartbeat_timeout_ns: Nanos,
}

/// What the runtime must do for the aux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxAction {
    /// Revoke the primary's remote write access to the region (deregister the memory region or
    /// move the queue pair to the error state), so nothing it sends lands any more (I5).
    RevokePrimaryAccess,
    /// Tell the DR that the primary of `epoch` is dead and the table is frozen: fail over.
    NotifyPrimaryLost { epoch: Epoch },
    /// Worth a line in the log: the aux's own ticks were `gap_ns` apart, so that gap counted only
    /// in part towards the primary's silence (see [`TICK_GAP_COUNTED_MAX_DIVISOR`]).
    TicksStalled { gap_ns: Nanos },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceCause {
    HeartbeatLost,
    Requested,
}

#[derive(Debug)]
pub struct Aux<R> {
    config: AuxConfig,
    region: R,
    header: RegionHeader,
    last_heartbeat: Option<Heartbeat>,
    last_change_at: Nanos,
    /// The previous tick, and the silence of the heartbeat watched since it last changed: the
    /// time between ticks, each gap counted up to a part of the timeout.
    last_tick_at: Option<Nanos>,
    watched_silence_ns: Nanos,
    /// A primary connected and its heartbeat has not changed since: it gets
    /// `FIRST_HEARTBEAT_GRACE_TIMEOUTS` instead of one.
    awaiting_first_heartbeat: bool,
    fence_cause: Option<FenceCause>,
    actions: Vec<AuxAction>,
}

impl<R: AsRef<[u8]> + AsMut<[u8]>> Aux<R> {
    /// Opens the region, formatting an all-zero one for `epoch`. A region fenced before a restart
    /// stays fenced. `now` starts the heartbeat grace period.
    pub fn open(
        config: AuxConfig,
        mut region: R,
        epoch: Epoch,
        now: Nanos,
    ) -> Result<Self, OpenError> {
        let needed = aux_region_bytes(config.geometry.table_slots);
        let got = region.as_ref().len();
        if got < needed {
            return Err(OpenError::TooSmall { needed, got });
        }
        let header = if region.as_ref()[..AUX_PRIMARY_AREA_OFFSET]
            .iter()
            .all(|&b| b == 0)
        {
            RegionHeader {
                magic: AUX_TABLE_MAGIC,
                flags: 0,
                epoch,
                generation: 0,
                geometry: config.geometry,
            }
            .write_next(region.as_mut())
        } else {
            let header = RegionHeader::read_newest(region.as_ref(), AUX_TABLE_MAGIC)
                .map_err(OpenError::Header)?;
            if header.geometry.table_slots != config.geometry.table_slots {
                return Err(OpenError::Geometry(DecodeError::GeometryMismatch {
                    field: "table slots",
                    ours: u64::from(config.geometry.table_slots),
                    theirs: u64::from(header.geometry.table_slots),
                }));
            }
            header
        };
        let fence_cause = (header.flags & REGION_FLAG_FENCED != 0).then_some(FenceCause::Requested);
        let mut aux = Aux {
            config,
            region,
            header,
            last_heartbeat: None,
            last_change_at: now,
            last_tick_at: None,
            watched_silence_ns: 0,
            awaiting_first_heartbeat: false,
            fence_cause,
            actions: Vec::new(),
        };
        aux.last_heartbeat = aux.read_heartbeat();
        if aux.fence_cause.is_some() {
            // Access must stay revoked across the restart.
            aux.actions.push(AuxAction::RevokePrimaryAccess);
        }
        Ok(aux)
    }

    pub fn epoch(&self) -> Epoch {
        self.header.epoch
    }
    pub fn fenced(&self) -> Option<FenceCause> {
        self.fence_cause
    }
    pub fn region(&self) -> &R {
        &self.region
    }
    /// The region as the NIC sees it: one-sided writes land here without the aux's logic.
    pub fn nic_region_mut(&mut self) -> &mut R {
        &mut self.region
    }
    pub fn into_region(self) -> R {
        self.region
    }
    /// The primary-writable area (heartbeat + table); the DR reads this on failover.
    pub fn primary_area(&self) -> &[u8] {
        &self.region.as_ref()
            [AUX_PRIMARY_AREA_OFFSET..aux_region_bytes(self.config.geometry.table_slots)]
    }
    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.last_heartbeat
    }

    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, AuxAction> {
        self.actions.drain(..)
    }

    fn read_heartbeat(&self) -> Option<Heartbeat> {
        // A torn heartbeat (checksum mismatch) counts as no change; the next one will be whole.
        Heartbeat::decode(&self.region.as_ref()[AUX_PRIMARY_AREA_OFFSET..])
            .ok()
            .flatten()
    }

    /// A primary connected: its heartbeat is watched from now on, so that a primary started
    /// long after the aux is not declared dead on arrival, and until the heartbeat first changes
    /// with `FIRST_HEARTBEAT_GRACE_TIMEOUTS` of grace rather than one.
    pub fn handle_primary_connected(&mut self, now: Nanos) {
        if self.fence_cause.is_none() {
            self.last_change_at = self.last_change_at.max(now);
            self.watched_silence_ns = 0;
            self.last_tick_at = Some(now);
            self.awaiting_first_heartbeat = true;
        }
    }

    /// Time passes: watch the heartbeat.
    pub fn handle_tick(&mut self, now: Nanos) {
        if self.fence_cause.is_some() {
            return;
        }
        // The first tick after `open` (or after a primary connected) starts the watch; until
        // then the silence since `last_change_at` counts as watched.
        let gap = now.saturating_sub(self.last_tick_at.unwrap_or(self.last_change_at));
        self.last_tick_at = Some(now);
        let heartbeat = self.read_heartbeat();
        if heartbeat != self.last_heartbeat {
            self.last_heartbeat = heartbeat;
            self.last_change_at = now;
            self.watched_silence_ns = 0;
            self.awaiting_first_heartbeat = false;
            return;
        }
        let gap_counted_max = self.config.heartbeat_timeout_ns / TICK_GAP_COUNTED_MAX_DIVISOR;
        if gap > gap_counted_max {
            self.actions.push(AuxAction::TicksStalled { gap_ns: gap });
        }
        self.watched_silence_ns += gap.min(gap_counted_max);
        let timeout = if self.awaiting_first_heartbeat {
            self.config.heartbeat_timeout_ns * FIRST_HEARTBEAT_GRACE_TIMEOUTS
        } else {
            self.config.heartbeat_timeout_ns
        };
        if self.watched_silence_ns >= timeout {
            self.fence(FenceCause::HeartbeatLost);
            self.actions.push(AuxAction::NotifyPrimaryLost {
                epoch: self.header.epoch,
            });
        }
    }

    /// The DR asks to fence the primary (manual failover, or the DR lost the primary). The
    /// primary's access is revoked at once (fencing twice is harmless), so it can no longer renew
    /// its lease. The table may be handed to the DR only once that lease has surely run out:
    /// a whole heartbeat timeout after the aux last saw the heartbeat change. Returns the time
    /// from which the frozen table may be handed over (now or later; ask again then).
    pub fn handle_fence_request(&mut self, now: Nanos) -> Nanos {
        if self.fence_cause.is_none() {
            // The heartbeat may have moved since the last tick: take it into account first.
            let heartbeat = self.read_heartbeat();
            if heartbeat != self.last_heartbeat {
                self.last_heartbeat = heartbeat;
                self.last_change_at = now;
                self.watched_silence_ns = 0;
                self.awaiting_first_heartbeat = false;
            }
            self.fence(FenceCause::Requested);
        }
        self.table_handover_at()
    }

    /// When the primary's lease has surely run out, after a fence.
    pub fn table_handover_at(&self) -> Nanos {
        self.last_change_at + self.config.heartbeat_timeout_ns
    }

    fn fence(&mut self, cause: FenceCause) {
        self.fence_cause = Some(cause);
        let mut header = self.header;
        header.flags |= REGION_FLAG_FENCED;
        self.header = header.write_next(self.region.as_mut());
        self.actions.push(AuxAction::RevokePrimaryAccess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sample_geometry;

    fn aux_with_timeout_of_1000() -> Aux<Vec<u8>> {
        let config = AuxConfig {
            geometry: sample_geometry(),
            heartbeat_timeout_ns: 1_000,
        };
        let region = vec![0u8; aux_region_bytes(config.geometry.table_slots)];
        Aux::open(config, region, 1, 0).expect("a fresh region opens")
    }

    fn write_heartbeat(aux: &mut Aux<Vec<u8>>, counter: u64) {
        Heartbeat { counter, epoch: 1 }
            .encode(&mut aux.nic_region_mut()[AUX_PRIMARY_AREA_OFFSET..]);
    }

    /// Ticks at `from`, `from + step`, ... up to and including `to`.
    fn tick_every(aux: &mut Aux<Vec<u8>>, from: Nanos, to: Nanos, step: Nanos) {
        for now in (from..=to).step_by(step as usize) {
            aux.handle_tick(now);
        }
    }

    #[test]
    fn a_primary_that_never_heartbeats_is_declared_dead_after_the_first_heartbeat_grace() {
        // Checks that an aux opened long before its primary connects does not declare that
        // primary dead on arrival, nor before the first-heartbeat grace has passed, and does
        // when it has.
        let mut aux = aux_with_timeout_of_1000();
        aux.handle_primary_connected(10_000);
        tick_every(&mut aux, 10_100, 19_900, 100);
        assert_eq!(aux.fenced(), None, "within the first-heartbeat grace");
        aux.handle_tick(10_000 + 1_000 * FIRST_HEARTBEAT_GRACE_TIMEOUTS);
        assert_eq!(aux.fenced(), Some(FenceCause::HeartbeatLost));
    }

    #[test]
    fn once_the_heartbeat_moved_one_timeout_without_a_change_is_death() {
        // Checks that the long grace covers only the wait for the first heartbeat: after it,
        // and again after a reconnect followed by a heartbeat, one timeout is the bound.
        let mut aux = aux_with_timeout_of_1000();
        aux.handle_primary_connected(10_000);
        write_heartbeat(&mut aux, 1);
        tick_every(&mut aux, 10_500, 11_400, 100);
        assert_eq!(aux.fenced(), None);
        aux.handle_tick(11_500);
        assert_eq!(aux.fenced(), Some(FenceCause::HeartbeatLost));

        let mut aux = aux_with_timeout_of_1000();
        aux.handle_primary_connected(0);
        write_heartbeat(&mut aux, 1);
        aux.handle_tick(100);
        aux.handle_primary_connected(500);
        write_heartbeat(&mut aux, 2);
        tick_every(&mut aux, 600, 1_500, 100);
        assert_eq!(aux.fenced(), None);
        aux.handle_tick(1_600);
        assert_eq!(aux.fenced(), Some(FenceCause::HeartbeatLost));
    }

    #[test]
    fn a_gap_in_the_aux_own_ticks_counts_only_half_a_timeout_of_silence() {
        // Checks that a stall of the aux itself (its ticks 1,500 apart with a timeout of 1,000)
        // does not fence a primary by itself, that it is reported, that the silence the aux did
        // watch still fences, and that the table is handed over no earlier than a timeout after
        // the heartbeat last changed.
        let mut aux = aux_with_timeout_of_1000();
        aux.handle_primary_connected(0);
        write_heartbeat(&mut aux, 1);
        tick_every(&mut aux, 100, 500, 100);
        assert_eq!(aux.drain_actions().count(), 0);
        aux.handle_tick(2_000);
        assert_eq!(aux.fenced(), None, "400 watched + 500 of the stall");
        assert_eq!(
            aux.drain_actions().collect::<Vec<_>>(),
            [AuxAction::TicksStalled { gap_ns: 1_500 }]
        );
        aux.handle_tick(2_100);
        assert_eq!(aux.fenced(), Some(FenceCause::HeartbeatLost));
        assert_eq!(aux.table_handover_at(), 1_100);

        // A heartbeat after the stall keeps the primary alive, as it would have without one.
        let mut aux = aux_with_timeout_of_1000();
        aux.handle_primary_connected(0);
        write_heartbeat(&mut aux, 1);
        tick_every(&mut aux, 100, 400, 100);
        aux.handle_tick(5_000);
        assert_eq!(aux.fenced(), None, "300 watched + 500 of the stall");
        write_heartbeat(&mut aux, 2);
        tick_every(&mut aux, 5_100, 5_900, 100);
        assert_eq!(aux.fenced(), None);
    }
}
