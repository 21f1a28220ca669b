//! Volumes and region files.
//!
//! A volume is a file or block device written with direct I/O (glommio's `DmaFile`, O_DIRECT
//! through io_uring): the page cache is not a second copy whose write-back order we would not
//! control. The DR's order log and staging ring and the aux's status table are memory-mapped
//! files (memmap2): the transport places remote writes straight into them, and a process that
//! is killed leaves their contents in the page cache, from where a restart recovers them.

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::DmaFile;
use memmap2::MmapMut;

use crate::transport::{RegionMemory, StableSpan};

/// A memory-mapped region file shared by a role and the transport. The mapping is made once
/// and never replaced (nothing assigns `map`), which is what lets an RDMA device hold it
/// registered: see [`RegionMemory::stable_span`].
#[derive(Debug)]
pub struct MappedRegion {
    pub path: PathBuf,
    pub map: RefCell<MmapMut>,
}

impl RegionMemory for MappedRegion {
    fn with_bytes(&self, f: &mut dyn FnMut(&mut [u8])) {
        f(&mut self.map.borrow_mut());
    }

    fn stable_span(&self) -> Option<StableSpan> {
        let mut map = self.map.borrow_mut();
        let (ptr, len) = (map.as_mut_ptr(), map.len());
        // SAFETY: the mapping lives exactly as long as `self` and is never replaced or remapped
        // (see the struct's doc), so the span stays valid and in place. Its readers (the DR's
        // log and ring code) validate every record they read by checksum, which is what the
        // device writing concurrently requires.
        (len > 0).then(|| unsafe { StableSpan::new(ptr, len) })
    }
}

/// Opens `path` as a region of exactly `len_bytes`, shared with the transport.
pub fn open_region(path: &Path, len_bytes: u64) -> Result<Rc<MappedRegion>, String> {
    Ok(Rc::new(MappedRegion {
        path: path.to_path_buf(),
        map: RefCell::new(map_file(path, len_bytes)?),
    }))
}

/// Maps `path` as exactly `len_bytes`, creating it zero-filled if it is missing, with every
/// block of it allocated (see [`reserve`]). An existing file of another size was made for
/// another geometry and is refused by name.
pub fn map_file(path: &Path, len_bytes: u64) -> Result<MmapMut, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|error| format!("cannot open region file {}: {error}", path.display()))?;
    let existing = file
        .metadata()
        .map_err(|error| format!("cannot stat {}: {error}", path.display()))?
        .len();
    if existing != 0 && existing != len_bytes {
        return Err(format!(
            "region file {} is {existing} bytes but this geometry needs {len_bytes}: it was made with other settings (remove it to start afresh)",
            path.display()
        ));
    }
    if let Err(error) = reserve(&file, path, len_bytes) {
        // A new file goes back to empty, so that a start with more room sees it as new, not as
        // a file of another geometry (a failed reservation may have extended it part of the way).
        if existing == 0 {
            let _ = file.set_len(0);
        }
        return Err(error);
    }
    // SAFETY: the mapping is of a regular file this process opened read-write. Other processes
    // could change it underneath us; ordinal's files live in the node's own state directory and
    // one daemon at a time uses them, and every byte read back is validated (checksums,
    // bounds) as untrusted input anyway.
    unsafe { MmapMut::map_mut(&file) }
        .map_err(|error| format!("cannot map {}: {error}", path.display()))
}

/// Allocates every block of `file`'s first `len_bytes` (`posix_fallocate(3)`), extending it to
/// that size if it is shorter; blocks already there keep their bytes, holes read as zeroes.
///
/// Why: a region file is written through its memory mapping, and a store into a page whose
/// block the filesystem cannot allocate (the disk, or tmpfs's size limit, is full) kills the
/// process with SIGBUS, with no error to report: a DR whose staging ring was a sparse file
/// would die on a payload long after it started. Allocated up front, a region that does not
/// fit is a one-line error at start instead. On filesystems without `fallocate(2)` glibc
/// writes a zero into each block that is not allocated yet, with the same result.
///
/// In [`RESERVE_CHUNK_BYTES`] pieces, each retried when interrupted: tmpfs gives up an
/// allocation with EINTR whenever the caller has a signal pending (and frees what that call
/// had allocated). Seen in an emulated guest, where the DR's 16 MiB ring took long enough at
/// start for it to happen; which signal, we did not find out (on an executor's thread,
/// io_uring's task work also makes `signal_pending` true, `TIF_NOTIFY_SIGNAL`). A piece at a
/// time, an interruption costs only its piece.
fn reserve(file: &std::fs::File, path: &Path, len_bytes: u64) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    let fail = |error: std::io::Error| {
        format!(
            "cannot reserve {} MiB for region file {}: {error} (free space on its filesystem, or choose a smaller ring or table)",
            len_bytes.div_ceil(1 << 20),
            path.display()
        )
    };
    let (mut offset, mut interruptions) = (0u64, 0u64);
    while offset < len_bytes {
        let piece = (len_bytes - offset).min(RESERVE_CHUNK_BYTES);
        let (Ok(at), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(piece))
        else {
            return Err(fail(std::io::Error::from_raw_os_error(libc::EFBIG)));
        };
        let mut interrupted = 0;
        loop {
            // SAFETY: posix_fallocate acts on a descriptor we own and reads no memory of ours.
            // It returns the error number instead of setting errno.
            match unsafe { libc::posix_fallocate(file.as_raw_fd(), at, len) } {
                0 => break,
                libc::EINTR if interrupted < RESERVE_INTERRUPTIONS_MAX => {
                    interrupted += 1;
                    interruptions += 1;
                }
                error => return Err(fail(std::io::Error::from_raw_os_error(error))),
            }
        }
        offset += piece;
    }
    if interruptions > 0 {
        crate::log!(
            "reserving {} was interrupted {interruptions} time(s), each piece retried",
            path.display()
        );
    }
    Ok(())
}

/// How much of a region file one `posix_fallocate` call allocates (see [`reserve`]).
const RESERVE_CHUNK_BYTES: u64 = 1 << 20;

/// Interruptions in a row of one piece's allocation before [`reserve`] gives up: a signal
/// that keeps coming faster than a megabyte can be allocated is not going to stop.
const RESERVE_INTERRUPTIONS_MAX: u32 = 1000;

/// Anonymous memory of `len_bytes` with every page faulted in now (`MAP_POPULATE`), for buffers
/// the data path writes at full speed, such as the primary's staging ring: left to fault in on
/// first use, the ring's first pass would take a page fault per page inside the write path. In
/// an emulated guest, faulting in 64 MiB of fresh memory took 0.4 to 1.4 s (`dd bs=64M`);
/// at start that costs nothing, as the primary has not connected yet.
///
/// Refused with a one-line error if it is more than the memory the kernel reports available
/// (`MemAvailable` in `/proc/meminfo`): faulting it all in would then reclaim the page cache
/// and swap at best, and wake the OOM killer at worst, which may kill another process than
/// this one.
pub fn prefaulted_memory(len_bytes: usize) -> Result<MmapMut, String> {
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        fits_in_available_memory(len_bytes as u64, &meminfo)?;
    }
    memmap2::MmapOptions::new()
        .len(len_bytes)
        .populate()
        .map_anon()
        .map_err(|error| format!("cannot map {len_bytes} bytes of memory: {error}"))
}

/// Whether `len_bytes` of memory fit in the `MemAvailable` of a `/proc/meminfo` text (a text
/// without it says nothing against them).
fn fits_in_available_memory(len_bytes: u64, meminfo: &str) -> Result<(), String> {
    match available_bytes(meminfo) {
        Some(available) if len_bytes > available => Err(format!(
            "the staging ring needs {} MiB of memory but only {} MiB is available (/proc/meminfo): choose a smaller ring",
            len_bytes.div_ceil(1 << 20),
            available >> 20
        )),
        _ => Ok(()),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes (the file gives kB).
fn available_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Size in bytes of a file or block device.
pub fn device_size_bytes(path: &Path) -> Result<u64, String> {
    let mut file = std::fs::File::open(path)
        .map_err(|error| format!("cannot open volume {}: {error}", path.display()))?;
    file.seek(SeekFrom::End(0))
        .map_err(|error| format!("cannot size volume {}: {error}", path.display()))
}

/// Bytes [`fill_hole_at_start`] writes: the largest logical block size there is.
const PROBE_BLOCK_BYTES: usize = 4096;

/// Makes sure the first block of a regular file is allocated, writing zeroes (what a hole reads
/// as, so nothing changes) if it is a hole.
///
/// Why: glommio decides whether a device supports polled I/O (`IORING_SETUP_IOPOLL`) by one
/// direct read at offset 0 of the first file it opens on it. A hole there is answered by the
/// file system without reaching the device, so the probe succeeds even on a device without poll
/// queues (`/sys/block/*/queue/io_poll` = 0), and every later read of real data then fails with
/// `EOPNOTSUPP`. Seen on ext4 over virtio-blk with a sparse volume file; block devices have no
/// holes.
fn fill_hole_at_start(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let fail = |error: std::io::Error| format!("cannot prepare volume {}: {error}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(fail)?;
    let metadata = file.metadata().map_err(fail)?;
    if !metadata.is_file() || metadata.len() < PROBE_BLOCK_BYTES as u64 {
        return Ok(());
    }
    // SAFETY: lseek on a descriptor we own; it reads no memory of ours.
    let data_at = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if data_at == 0 {
        return Ok(());
    }
    file.write_all_at(&[0u8; PROBE_BLOCK_BYTES], 0)
        .map_err(fail)?;
    file.sync_data().map_err(fail)
}

/// A volume written and read with direct I/O.
#[derive(Debug)]
pub struct Volume {
    file: Rc<DmaFile>,
    size_bytes: u64,
}

impl Volume {
    /// Opens an existing volume for direct I/O and checks that `sector_bytes` is a multiple of
    /// the device's direct-I/O alignment (O_DIRECT refuses smaller or misaligned writes).
    pub async fn open(path: &Path, sector_bytes: u32) -> Result<Volume, String> {
        let size_bytes = device_size_bytes(path)?;
        fill_hole_at_start(path)?;
        let file = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(|error| {
                format!(
                    "cannot open volume {} for direct I/O: {error} (the filesystem must take O_DIRECT: tmpfs does from Linux 6.6 on)",
                    path.display()
                )
            })?;
        let alignment = file.alignment();
        if u64::from(sector_bytes) % alignment != 0 {
            return Err(format!(
                "sector size {sector_bytes} is not a multiple of the direct-I/O alignment {alignment} of {}",
                path.display()
            ));
        }
        Ok(Volume {
            file: Rc::new(file),
            size_bytes,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Starts writing `bytes` at `offset` (both sector-aligned: the protocol validated them) and
    /// sends `done(result)` to `events` when the write finished. The bytes are copied once,
    /// straight into an aligned direct-I/O buffer, before this returns, so the caller's staging
    /// memory may be reused at once.
    pub fn spawn_write<E: 'static>(
        self: &Rc<Self>,
        offset: u64,
        bytes: &[u8],
        events: &crate::Sender<E>,
        done: impl FnOnce(Result<(), String>) -> E + 'static,
    ) {
        self.spawn_write_after(std::time::Duration::ZERO, offset, bytes, events, done);
    }

    /// [`Volume::spawn_write`], with the write itself started `delay` later (the bytes are
    /// still copied before this returns).
    pub fn spawn_write_after<E: 'static>(
        self: &Rc<Self>,
        delay: std::time::Duration,
        offset: u64,
        bytes: &[u8],
        events: &crate::Sender<E>,
        done: impl FnOnce(Result<(), String>) -> E + 'static,
    ) {
        let buffer = self.dma_copy(bytes);
        let (volume, events) = (self.clone(), events.clone());
        glommio::spawn_local(async move {
            if !delay.is_zero() {
                glommio::timer::sleep(delay).await;
            }
            let result = volume.write_buffer(buffer, offset).await;
            let _ = events.send(done(result)).await;
        })
        .detach();
    }

    /// Writes `bytes` at `offset` (both sector-aligned) and returns once the write finished.
    pub async fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        self.write_buffer(self.dma_copy(bytes), offset).await
    }

    /// Copies `bytes` into an aligned direct-I/O buffer.
    fn dma_copy(&self, bytes: &[u8]) -> glommio::io::DmaBuffer {
        let mut buffer = self.file.alloc_dma_buffer(bytes.len());
        buffer.as_bytes_mut().copy_from_slice(bytes);
        buffer
    }

    async fn write_buffer(
        &self,
        buffer: glommio::io::DmaBuffer,
        offset: u64,
    ) -> Result<(), String> {
        let len = buffer.len();
        match self.file.write_at(buffer, offset).await {
            Ok(written) if written == len => Ok(()),
            Ok(written) => Err(format!(
                "volume write at {offset} was short: {written} of {len} bytes (disk full?)"
            )),
            Err(error) => Err(format!(
                "volume write of {len} bytes at {offset} failed: {error}"
            )),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let read =
            self.file.read_at(offset, len).await.map_err(|error| {
                format!("volume read of {len} bytes at {offset} failed: {error}")
            })?;
        if read.len() != len {
            return Err(format!(
                "volume read at {offset} was short: {} of {len} bytes",
                read.len()
            ));
        }
        Ok(read.to_vec())
    }

    /// Makes completed writes durable (NBD FLUSH).
    pub async fn flush(&self) -> Result<(), String> {
        self.file
            .fdatasync()
            .await
            .map_err(|error| format!("volume flush failed: {error}"))
    }
}

/// Runs volume writes with a bound on how many are in flight, never two overlapping ones at
/// once: concurrent direct-I/O writes to the same sectors may land in either order, and both
/// the primary (later writes win on the local volume) and the DR (applies in op order) need the
/// later one to land last. A write that overlaps one in flight waits, and so does every write
/// after it, which keeps the order of overlapping writes without tracking dependencies.
#[derive(Debug)]
pub struct OrderedWrites {
    /// (seq, first byte, end byte) of each write in flight.
    inflight: Vec<(u64, u64, u64)>,
    deferred: std::collections::VecDeque<WriteJob>,
    inflight_max: usize,
}

/// A write to start: (seq, volume offset, length, ring offset).
pub type WriteJob = (u64, u64, u32, u64);

impl OrderedWrites {
    pub fn new(inflight_max: usize) -> OrderedWrites {
        assert!(inflight_max >= 1);
        OrderedWrites {
            inflight: Vec::with_capacity(inflight_max),
            deferred: std::collections::VecDeque::new(),
            inflight_max,
        }
    }

    /// Queues a write; returns the jobs that may start now (at most the one given).
    pub fn submit(&mut self, job: WriteJob) -> Option<WriteJob> {
        let (seq, offset, len, _) = job;
        let free = self.deferred.is_empty()
            && self.inflight.len() < self.inflight_max
            && self.overlap_free(offset, len);
        if free {
            self.inflight.push((seq, offset, offset + u64::from(len)));
            Some(job)
        } else {
            self.deferred.push_back(job);
            None
        }
    }

    fn overlap_free(&self, offset: u64, len: u32) -> bool {
        let end = offset + u64::from(len);
        self.inflight
            .iter()
            .all(|&(_, start, stop)| end <= start || offset >= stop)
    }

    /// A write finished; returns the deferred jobs that may start now, in order.
    pub fn finished(&mut self, seq: u64, startable: &mut Vec<WriteJob>) {
        let at = self
            .inflight
            .iter()
            .position(|&(inflight_seq, _, _)| inflight_seq == seq)
            .expect("a finished write was in flight");
        self.inflight.swap_remove(at);
        while let Some(&(next_seq, offset, len, ring_offset)) = self.deferred.front() {
            if self.inflight.len() >= self.inflight_max || !self.overlap_free(offset, len) {
                break;
            }
            self.deferred.pop_front();
            self.inflight
                .push((next_seq, offset, offset + u64::from(len)));
            startable.push((next_seq, offset, len, ring_offset));
        }
    }

    pub fn idle(&self) -> bool {
        self.inflight.is_empty() && self.deferred.is_empty()
    }

    pub fn pending(&self) -> usize {
        self.inflight.len() + self.deferred.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_available_is_read_from_meminfo_and_bounds_the_ring() {
        let meminfo = "MemTotal:       24589248 kB\nMemFree:        22825708 kB\nMemAvailable:   23117020 kB\nBuffers:            4756 kB\n";
        assert_eq!(available_bytes(meminfo), Some(23_117_020 * 1024));
        assert_eq!(available_bytes("MemTotal: 1 kB\n"), None);
        assert_eq!(available_bytes("MemAvailable: lots\n"), None);
        let this_machine = std::fs::read_to_string("/proc/meminfo").unwrap();
        assert!(
            available_bytes(&this_machine).is_some(),
            "Linux reports MemAvailable"
        );
        let error = fits_in_available_memory(23_117_021 * 1024, meminfo).unwrap_err();
        assert!(
            error.contains("needs 22576 MiB") && error.contains("only 22575 MiB"),
            "{error}"
        );
        assert!(fits_in_available_memory(23_117_020 * 1024, meminfo).is_ok());
        assert!(fits_in_available_memory(u64::MAX, "no such line").is_ok());
        assert_eq!(prefaulted_memory(1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn a_region_file_has_its_blocks_allocated_and_keeps_its_bytes() {
        // Checks that a new region file is not sparse (a store through the mapping into a hole
        // on a full filesystem would be a SIGBUS), and that mapping it again, as a restart
        // does, keeps what was written and fills a hole punched meanwhile.
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let dir = std::env::temp_dir().join(format!("ordinal-reserve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ring");
        let len = 1u64 << 20;
        let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
        {
            let mut map = map_file(&path, len).unwrap();
            assert!(
                allocated(&path) >= len,
                "{} of {len} bytes allocated",
                allocated(&path)
            );
            map[4096..4100].copy_from_slice(b"kept");
            map.flush().unwrap();
        }
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: fallocate on a descriptor we own; it reads no memory of ours.
        let punched = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                8192,
                65536,
            )
        };
        assert_eq!(punched, 0, "{}", std::io::Error::last_os_error());
        assert!(allocated(&path) < len);
        let map = map_file(&path, len).unwrap();
        assert!(allocated(&path) >= len);
        assert_eq!(&map[4096..4100], b"kept");
        assert!(map[8192..8192 + 65536].iter().all(|&byte| byte == 0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlapping_writes_wait_and_keep_their_order() {
        // Checks that a write overlapping one in flight, and every later write, waits until the
        // overlap is gone, and that the deferred ones start in submission order.
        let mut writes = OrderedWrites::new(4);
        assert!(writes.submit((1, 0, 4096, 0)).is_some());
        assert!(writes.submit((2, 8192, 4096, 0)).is_some());
        assert!(writes.submit((3, 0, 512, 0)).is_none(), "overlaps 1");
        assert!(
            writes.submit((4, 65536, 512, 0)).is_none(),
            "behind a deferred write"
        );
        let mut startable = Vec::new();
        writes.finished(2, &mut startable);
        assert!(startable.is_empty(), "3 still overlaps 1");
        writes.finished(1, &mut startable);
        assert_eq!(
            startable.iter().map(|job| job.0).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(writes.pending(), 2);
    }
}
