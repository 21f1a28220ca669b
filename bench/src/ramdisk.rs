//! A RAM-backed filesystem for benchmark volumes: ext4 on a zram device, made for the run and
//! removed after it.
//!
//! Why not files on tmpfs: tmpfs takes no non-blocking writes, so io_uring hands every direct
//! write to one of its worker threads, which must be woken, scheduled on the writer's CPU and
//! switched back from. On this 2-CPU machine that made the loopback benchmark's local write
//! about 45 us at the median and over 100 us in its slowest 2% (the write-ack breakdown shows
//! it): a cost of tmpfs, not of the engine, and one no deployed volume has.
//!
//! Why ext4 on zram rather than the zram device itself: measured with fio (4 KiB random
//! direct writes, io_uring, one in flight), the bare device gives clat p50 33 us and p99 57 us
//! with its writes handed to io_uring's workers, as tmpfs's are (zram does not take
//! `REQ_NOWAIT`). A file of ext4 on it, whose blocks are allocated, is written in the
//! submitting thread itself: clat p50 0.09 us, p99 0.15 us. That is how a volume on a fast
//! local device behaves, without a disk's own latency.
//!
//! The zram interface (the kernel's `Documentation/admin-guide/blockdev/zram.rst`): reading
//! `/sys/class/zram-control/hot_add` makes a device and answers its number; writing a size to
//! `/sys/block/zramN/disksize` sizes it; writing 1 to `reset` frees its memory, and writing N
//! to `hot_remove` removes it. Memory is taken only for the pages written, and a page of one
//! repeated byte (what the benchmarks write) is stored as that byte. Its logical block size is
//! the page size (4096 here), so direct I/O must be aligned to 4096 bytes. Needs root, zram in
//! the kernel and `mkfs.ext4` (e2fsprogs).

use std::ffi::CString;
use std::path::{Path, PathBuf};

const CONTROL: &str = "/sys/class/zram-control";

/// The alignment of direct I/O on a [`RamFilesystem`]: the zram device's logical block size.
pub const RAM_DISK_SECTOR_BYTES: u32 = 4096;

/// A zram device of this run; dropping it frees its memory and removes it.
#[derive(Debug)]
struct RamDisk {
    number: u32,
    path: PathBuf,
}

impl RamDisk {
    fn create(bytes: u64) -> Result<RamDisk, String> {
        let hot_add = Path::new(CONTROL).join("hot_add");
        let answer = std::fs::read_to_string(&hot_add).map_err(|error| {
            format!("cannot make a zram device ({}: {error})", hot_add.display())
        })?;
        let number: u32 = answer
            .trim()
            .parse()
            .map_err(|_| format!("{} answered {answer:?}", hot_add.display()))?;
        let disk = RamDisk {
            number,
            path: PathBuf::from(format!("/dev/zram{number}")),
        };
        let disksize = disk.sysfs("disksize");
        std::fs::write(&disksize, bytes.to_string())
            .map_err(|error| format!("cannot size {}: {error}", disksize.display()))?;
        // devtmpfs makes the node as the device appears; give it a moment all the same.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !disk.path.exists() {
            if std::time::Instant::now() > deadline {
                return Err(format!("{} did not appear", disk.path.display()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(disk)
    }

    fn sysfs(&self, attribute: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{attribute}", self.number))
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        let reset = std::fs::write(self.sysfs("reset"), "1");
        let removed = std::fs::write(
            Path::new(CONTROL).join("hot_remove"),
            self.number.to_string(),
        );
        if let Err(error) = reset.and(removed) {
            eprintln!("cannot remove {}: {error}", self.path.display());
        }
    }
}

/// ext4 on a zram device, mounted for the run; dropping it unmounts it and removes the device.
#[derive(Debug)]
pub struct RamFilesystem {
    mount_point: PathBuf,
    disk: RamDisk,
}

impl RamFilesystem {
    /// Makes a filesystem of `bytes` mounted on a fresh directory under `parent`, or says why
    /// it cannot (no zram in this kernel, not root, no `mkfs.ext4`). First removes those that
    /// processes which have ended left under `parent` (see [`remove_abandoned`]).
    pub fn create(bytes: u64, parent: &Path) -> Result<RamFilesystem, String> {
        Self::create_for(std::process::id(), bytes, parent)
    }

    /// [`RamFilesystem::create`], named as made by process `pid`.
    fn create_for(pid: u32, bytes: u64, parent: &Path) -> Result<RamFilesystem, String> {
        remove_abandoned(parent);
        let disk = RamDisk::create(bytes)?;
        let mkfs = std::process::Command::new("mkfs.ext4")
            // No lazy initialisation: it would go on writing in the background meanwhile.
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&disk.path)
            .output()
            .map_err(|error| format!("cannot run mkfs.ext4: {error}"))?;
        if !mkfs.status.success() {
            return Err(format!(
                "mkfs.ext4 {} failed: {}",
                disk.path.display(),
                String::from_utf8_lossy(&mkfs.stderr).trim()
            ));
        }
        let mount_point = parent.join(format!("{MOUNT_PREFIX}{pid}-zram{}", disk.number));
        std::fs::create_dir_all(&mount_point)
            .map_err(|error| format!("cannot create {}: {error}", mount_point.display()))?;
        let c_path = |path: &Path| CString::new(path.as_os_str().as_encoded_bytes()).ok();
        let (source, target) = (c_path(&disk.path), c_path(&mount_point));
        let (Some(source), Some(target)) = (source, target) else {
            return Err(format!(
                "{} is not a path mount(2) takes",
                mount_point.display()
            ));
        };
        // SAFETY: every pointer is a NUL-terminated string that outlives the call, and ext4
        // takes no mount data (null).
        let mounted = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                c"ext4".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if mounted != 0 {
            let error = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&mount_point);
            return Err(format!(
                "cannot mount {} on {}: {error}",
                disk.path.display(),
                mount_point.display()
            ));
        }
        Ok(RamFilesystem { mount_point, disk })
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    pub fn device(&self) -> &Path {
        &self.disk.path
    }
}

impl Drop for RamFilesystem {
    fn drop(&mut self) {
        // The benchmark's system has stopped by now, but glommio closes a file through its
        // executor's ring, and an executor that has ended closes nothing: the primary's volume
        // (opened in this process) is still open. Nothing can use such a descriptor any more.
        close_descriptors_under(&self.mount_point);
        let target = CString::new(self.mount_point.as_os_str().as_encoded_bytes())
            .expect("made from a path without NUL");
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            let error = std::io::Error::last_os_error();
            eprintln!("cannot unmount {}: {error}", self.mount_point.display());
            return; // The device stays too: removing it under a mount would fail anyway.
        }
        let _ = std::fs::remove_dir(&self.mount_point);
        // The disk is dropped next, which removes it.
    }
}

/// A [`RamFilesystem`] under `parent` holding the primary's and the DR's volume files
/// ([`crate::loopback::make_volume`]), for a system whose writes are all of `write_sizes`; or
/// why there cannot be one (the volumes then go elsewhere).
pub fn volumes_on_ram(
    parent: &Path,
    write_sizes: &[usize],
) -> Result<(RamFilesystem, (PathBuf, PathBuf)), String> {
    let sector = RAM_DISK_SECTOR_BYTES as usize;
    if let Some(size) = write_sizes.iter().find(|size| !size.is_multiple_of(sector)) {
        return Err(format!(
            "{size}-byte writes are not a multiple of a RAM filesystem's {sector}-byte blocks"
        ));
    }
    // Two volumes and ext4's own metadata and journal.
    let bytes = 2 * crate::loopback::VOLUME_BYTES + (128 << 20);
    let filesystem = RamFilesystem::create(bytes, parent)?;
    let volumes = (
        filesystem.path().join("primary.vol"),
        filesystem.path().join("dr.vol"),
    );
    crate::loopback::make_volume(&volumes.0)?;
    crate::loopback::make_volume(&volumes.1)?;
    Ok((filesystem, volumes))
}

/// Mount points are named `ordinal-ramfs-<pid>-zram<n>`: the process that made the filesystem,
/// and its device.
const MOUNT_PREFIX: &str = "ordinal-ramfs-";

/// Unmounts and removes the RAM filesystems under `parent` whose process has ended: a
/// benchmark that was killed (Ctrl-C, SIGKILL) could not remove its own, and each would keep
/// its device and its memory until the next boot. A process that is alive, or a pid reused
/// since, keeps its filesystem. Failures are said and left alone.
fn remove_abandoned(parent: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(device), Some(mount_point)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mount_point = Path::new(mount_point);
        if mount_point.parent() != Some(parent) {
            continue;
        }
        let Some((pid, number)) = mount_point
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix(MOUNT_PREFIX))
            .and_then(|rest| rest.split_once("-zram"))
            .and_then(|(pid, number)| {
                Some((pid.parse::<i32>().ok()?, number.parse::<u32>().ok()?))
            })
        else {
            continue;
        };
        if device != format!("/dev/zram{number}") || process_alive(pid) {
            continue;
        }
        eprintln!(
            "removing {} (ext4 on {device}), left by process {pid}, which has ended",
            mount_point.display()
        );
        // Dropping it unmounts it and removes its device, as at the end of a run.
        drop(RamFilesystem {
            mount_point: mount_point.to_path_buf(),
            disk: RamDisk {
                number,
                path: PathBuf::from(device),
            },
        });
    }
}

/// Whether a process `pid` exists (`kill(pid, 0)`: EPERM means it does, owned by another user).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Closes this process's descriptors of files under `dir`.
fn close_descriptors_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let under = std::fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(dir));
        let fd = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok());
        if let (true, Some(fd)) = (under, fd) {
            // SAFETY: the descriptor is this process's, of a file under `dir`, which the
            // caller says nothing uses any more; closing it frees no memory of ours.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_left_by_an_ended_process_is_removed_and_a_live_ones_kept() {
        // Needs root, zram and mkfs.ext4 (CI has all three); elsewhere it says why and checks
        // nothing.
        let parent = std::env::temp_dir().join(format!("ordinal-abandoned-{}", std::process::id()));
        std::fs::create_dir_all(&parent).unwrap();
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        let ended_pid = ended.id();
        ended.wait().unwrap();
        let abandoned = match RamFilesystem::create_for(ended_pid, 16 << 20, &parent) {
            Ok(filesystem) => filesystem,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let abandoned_point = abandoned.path().to_path_buf();
        // As a killed process leaves it: mounted, its device there.
        std::mem::forget(abandoned);
        let live = RamFilesystem::create(16 << 20, &parent).unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mounted = |point: &Path| mounts.contains(&format!(" {} ext4 ", point.display()));
        assert!(!mounted(&abandoned_point), "{mounts}");
        assert!(!abandoned_point.exists());
        assert!(mounted(live.path()), "{mounts}");
        // A second one while the first is alive leaves the first alone.
        let second = RamFilesystem::create(16 << 20, &parent).unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(mounts.contains(&format!(" {} ext4 ", live.path().display())));
        drop((live, second));
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn a_ram_filesystem_takes_direct_writes_and_goes_away_when_dropped() {
        // Needs root, zram and mkfs.ext4 (CI has all three); elsewhere it says why and checks
        // nothing.
        let filesystem = match RamFilesystem::create(64 << 20, &std::env::temp_dir()) {
            Ok(filesystem) => filesystem,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let (mount_point, device) = (
            filesystem.path().to_path_buf(),
            filesystem.device().to_path_buf(),
        );
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let line = format!("{} {} ext4 ", device.display(), mount_point.display());
        assert!(mounts.contains(&line), "{mounts}");
        let block_size =
            std::fs::read_to_string(filesystem.disk.sysfs("queue/logical_block_size")).unwrap();
        assert_eq!(block_size.trim(), RAM_DISK_SECTOR_BYTES.to_string());
        // A file left open, as the primary's volume is, does not stop the unmount.
        let open = std::fs::File::create(mount_point.join("volume")).unwrap();
        std::mem::forget(open);
        drop(filesystem);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&line), "{mounts}");
        assert!(!mount_point.exists());
        assert!(!device.exists(), "{} is still there", device.display());
    }
}
