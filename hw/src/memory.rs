//! Protection domains, access rights and registered memory.

use std::fmt;
use std::ops::BitOr;
use std::sync::Arc;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{Errno, Error, Result};

/// A protection domain (`ibv_pd`): the memory regions and queue pairs created in it may be
/// used together, and only together. Deallocated on drop, after every child (each holds an
/// `Arc<ProtectionDomain>`).
pub struct ProtectionDomain {
    raw: *mut sys::ibv_pd,
    context: Arc<Context>,
}

// SAFETY: a PD is an immutable handle once allocated; libibverbs verbs taking it (reg_mr,
// create_qp) are thread-safe. Sharing and sending it is sound.
unsafe impl Send for ProtectionDomain {}
// SAFETY: see `Send`.
unsafe impl Sync for ProtectionDomain {}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("context", &self.context.name())
            .finish()
    }
}

impl ProtectionDomain {
    pub fn new(context: &Arc<Context>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: the context is open (held by the Arc).
        let raw = unsafe { sys::ibv_alloc_pd(context.raw()) };
        if raw.is_null() {
            return Err(Error::AllocPd(Errno::last()));
        }
        Ok(Arc::new(ProtectionDomain {
            raw,
            context: Arc::clone(context),
        }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    pub(crate) fn raw(&self) -> *mut sys::ibv_pd {
        self.raw
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated once, freed once, after every MR and QP (they hold Arcs to us).
        let rc = unsafe { sys::ibv_dealloc_pd(self.raw) };
        debug_assert_eq!(rc, 0, "ibv_dealloc_pd failed");
    }
}

/// Access rights of a memory region or of a queue pair's responder (`enum ibv_access_flags`).
/// Nothing is granted by default: name each right a region needs, no more.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u32);

impl Access {
    /// No access beyond local reads, which every region allows (ibv_reg_mr(3)).
    pub const NONE: Access = Access(0);
    /// The local NIC may write the region: receive buffers and READ destinations need it.
    pub const LOCAL_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// Peers may RDMA WRITE into the region. ibv_reg_mr(3): requires LOCAL_WRITE as well.
    pub const REMOTE_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// Peers may RDMA READ the region.
    pub const REMOTE_READ: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);

    const ALL: u32 = Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0;

    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// Rejects flag sets the verbs refuse: remote write without local write (ibv_reg_mr(3):
    /// "If IBV_ACCESS_REMOTE_WRITE or IBV_ACCESS_REMOTE_ATOMIC is set, then
    /// IBV_ACCESS_LOCAL_WRITE must be set too").
    pub fn check_for_region(self) -> Result<()> {
        if self.contains(Access::REMOTE_WRITE) && !self.contains(Access::LOCAL_WRITE) {
            return Err(Error::InvalidAccess {
                access: self,
                reason: "REMOTE_WRITE requires LOCAL_WRITE (ibv_reg_mr(3))",
            });
        }
        Ok(())
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Access::LOCAL_WRITE) {
            names.push("LOCAL_WRITE");
        }
        if self.contains(Access::REMOTE_WRITE) {
            names.push("REMOTE_WRITE");
        }
        if self.contains(Access::REMOTE_READ) {
            names.push("REMOTE_READ");
        }
        let unknown = self.0 & !Access::ALL;
        let unknown = (unknown != 0).then(|| format!("0x{unknown:x}"));
        if let Some(u) = &unknown {
            names.push(u);
        }
        if names.is_empty() {
            write!(f, "NONE")
        } else {
            write!(f, "{}", names.join("|"))
        }
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Access({self})")
    }
}

/// Memory that can back a registered region: a fixed span that stays where it is.
///
/// # Safety
/// An implementor promises that `as_mut_ptr()` and `len()` return the same span for the
/// whole life of the value, that the span is valid for reads and writes for that long (moving
/// the value must not move the bytes: heap buffers and mappings qualify, arrays inline in the
/// value do not), and that nothing frees or remaps it before the value is dropped. The NIC
/// reads and writes the span behind the compiler's back while the region is registered.
pub unsafe trait RegionBuffer: Send + Sync {
    fn as_mut_ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a boxed slice's heap span neither moves nor changes size while the box lives, and
// the region owns the box, so no one can reallocate it.
unsafe impl RegionBuffer for Box<[u8]> {
    fn as_mut_ptr(&self) -> *mut u8 {
        self.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

// SAFETY: a mapping's span is fixed until it is unmapped on drop; the region owns it.
unsafe impl RegionBuffer for memmap2::MmapMut {
    fn as_mut_ptr(&self) -> *mut u8 {
        self.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

/// A span of memory the caller owns and vouches for, for memory this crate has no owner type
/// for (a slice of a larger buffer, memory from another allocator).
#[derive(Debug)]
pub struct RawMemory {
    ptr: *mut u8,
    len: usize,
}

impl RawMemory {
    /// # Safety
    /// `[ptr, ptr + len)` must be valid for reads and writes, must not be freed, moved or
    /// remapped, and must not be accessed through Rust references while the NIC may access
    /// it, for as long as any `MemoryRegion` built on this value lives.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> RawMemory {
        RawMemory { ptr, len }
    }
}

// SAFETY: the caller of `RawMemory::new` took on exactly the trait's contract.
unsafe impl RegionBuffer for RawMemory {
    fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: RawMemory is only an address and a length; the constructor's contract covers use
// of the memory from any thread (the NIC accesses it independently of threads anyway).
unsafe impl Send for RawMemory {}
// SAFETY: see `Send`.
unsafe impl Sync for RawMemory {}

/// A registered memory region (`ibv_mr`) that owns the memory behind it, deregistered on drop
/// before the memory is released.
pub struct MemoryRegion<B: RegionBuffer> {
    raw: *mut sys::ibv_mr,
    // Field order matters only for clarity: Drop deregisters explicitly before `buffer` drops.
    buffer: B,
    access: Access,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: the MR handle is immutable after registration and ibv_dereg_mr may run on any thread;
// the buffer is Send + Sync by the RegionBuffer bound.
unsafe impl<B: RegionBuffer> Send for MemoryRegion<B> {}
// SAFETY: shared access only reads the handle's keys and copies bytes out with raw pointers;
// writing the memory from Rust takes `&mut self`.
unsafe impl<B: RegionBuffer> Sync for MemoryRegion<B> {}

impl<B: RegionBuffer> fmt::Debug for MemoryRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("0x{:x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .field("access", &self.access)
            .finish()
    }
}

impl<B: RegionBuffer> MemoryRegion<B> {
    /// Registers all of `buffer` with `access` rights.
    pub fn new(pd: &Arc<ProtectionDomain>, buffer: B, access: Access) -> Result<Self> {
        access.check_for_region()?;
        let len = buffer.len();
        assert!(len > 0, "a memory region cannot be empty");
        // SAFETY: the span is valid and fixed for the buffer's life (RegionBuffer contract),
        // and the buffer lives in the region, which deregisters before releasing it. The flags
        // carry no IBV_ACCESS_OPTIONAL_RANGE bit, so plain ibv_reg_mr is the right entry point
        // (the header's ibv_reg_mr macro picks it for such flags).
        let raw = unsafe {
            sys::ibv_reg_mr(
                pd.raw(),
                buffer.as_mut_ptr().cast(),
                len,
                access.bits() as libc::c_int,
            )
        };
        if raw.is_null() {
            return Err(Error::RegMr {
                len,
                access,
                errno: Errno::last(),
            });
        }
        let region = MemoryRegion {
            raw,
            buffer,
            access,
            pd: Arc::clone(pd),
        };
        assert_eq!(region.addr(), region.buffer.as_mut_ptr() as u64);
        assert_eq!(region.len(), len);
        Ok(region)
    }

    /// The region's first byte's virtual address, which is also what peers name in WRITEs and
    /// READs (the region is not zero-based).
    pub fn addr(&self) -> u64 {
        // SAFETY: `raw` is a live registration.
        unsafe { (*self.raw).addr as u64 }
    }

    pub fn len(&self) -> usize {
        // SAFETY: `raw` is a live registration.
        unsafe { (*self.raw).length }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key local work requests quote in their scatter/gather entries.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `raw` is a live registration.
        unsafe { (*self.raw).lkey }
    }

    /// The key peers quote to access the region remotely.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `raw` is a live registration.
        unsafe { (*self.raw).rkey }
    }

    pub fn access(&self) -> Access {
        self.access
    }

    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.buffer.as_mut_ptr()
    }

    /// A scatter/gather entry for `len` bytes at `offset` of this region.
    pub fn sge(&self, offset: usize, len: u32) -> Sge {
        let end = offset.checked_add(len as usize).expect("SGE end overflows");
        assert!(
            end <= self.len(),
            "SGE [{offset}, {end}) outside region of {} bytes",
            self.len()
        );
        Sge {
            addr: self.addr() + offset as u64,
            len,
            lkey: self.lkey(),
        }
    }

    /// What a peer needs to WRITE or READ the region, to send it out of band. Check that the
    /// region grants what the peer will do: [`Access::REMOTE_WRITE`], [`Access::REMOTE_READ`].
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr(),
            len: self.len() as u64,
            rkey: self.rkey(),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the region. The NIC may change the bytes
    /// at any time a work request or a peer with remote access targets them, so the copy can
    /// be torn; the protocol validates what it reads (checksums) rather than trusting it.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        let end = offset.checked_add(dst.len()).expect("read end overflows");
        assert!(end <= self.len(), "read [{offset}, {end}) outside region");
        // SAFETY: in bounds of the owned, registered span; `dst` is a distinct Rust buffer.
        // Raw copies, not references, are used because the device may write concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.as_mut_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
    }

    /// Copies `src` into the region at `offset`. It takes `&mut self` so that two threads
    /// never write the same bytes at once; racing the NIC (a work request or a remote access
    /// to the same bytes) leaves unspecified bytes, which is the protocol's to prevent.
    pub fn write(&mut self, offset: usize, src: &[u8]) {
        let end = offset.checked_add(src.len()).expect("write end overflows");
        assert!(end <= self.len(), "write [{offset}, {end}) outside region");
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_mut_ptr().add(offset), src.len())
        };
    }

    /// Deregisters the region and gives the memory back.
    pub fn into_buffer(self) -> B {
        let this = std::mem::ManuallyDrop::new(self);
        this.deregister();
        // SAFETY: `this` is never used or dropped again; each field is moved out once.
        unsafe {
            drop(std::ptr::read(&this.pd));
            std::ptr::read(&this.buffer)
        }
    }

    fn deregister(&self) {
        // SAFETY: registered once, deregistered once (Drop and into_buffer are exclusive).
        let rc = unsafe { sys::ibv_dereg_mr(self.raw) };
        // ibv_dereg_mr fails only for a region bound to memory windows (none here) or a
        // broken device; continuing would free memory the NIC may still write, so stop.
        assert_eq!(rc, 0, "ibv_dereg_mr failed: {}", Errno(rc));
    }
}

impl<B: RegionBuffer> Drop for MemoryRegion<B> {
    fn drop(&mut self) {
        self.deregister();
    }
}

/// A heap buffer aligned to the page size, zero-filled, for regions: page alignment keeps
/// registrations from pinning bytes of unrelated neighbours.
#[derive(Debug)]
pub struct PageBuffer {
    map: memmap2::MmapMut,
}

impl PageBuffer {
    /// An anonymous private mapping of `len` bytes (rounded up to pages by the kernel).
    pub fn new(len: usize) -> std::io::Result<PageBuffer> {
        assert!(len > 0, "a page buffer cannot be empty");
        Ok(PageBuffer {
            map: memmap2::MmapMut::map_anon(len)?,
        })
    }
}

// SAFETY: delegated to the mapping, which the buffer owns.
unsafe impl RegionBuffer for PageBuffer {
    fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// One scatter/gather entry (`struct ibv_sge`): `len` bytes at `addr` of the region `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// A peer's region, as exchanged out of band: everything a WRITE or READ must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

impl RemoteRegion {
    /// The remote address `offset` bytes in, checked to leave room for `len` bytes.
    pub fn at(&self, offset: u64, len: u32) -> RemoteAddr {
        let end = offset
            .checked_add(u64::from(len))
            .expect("remote end overflows");
        assert!(
            end <= self.len,
            "remote [{offset}, {end}) outside region of {} bytes",
            self.len
        );
        RemoteAddr {
            addr: self.addr + offset,
            rkey: self.rkey,
        }
    }
}

/// One remote address and its key, as a one-sided work request names it. The responder's NIC
/// checks it against the region: a bad one is `WcStatus::RemAccessErr`, nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr {
    pub addr: u64,
    pub rkey: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags_match_verbs_and_display() {
        // Checks the flag values against verbs.h and the printed form used in errors.
        assert_eq!(Access::LOCAL_WRITE.bits(), 1);
        assert_eq!(Access::REMOTE_WRITE.bits(), 2);
        assert_eq!(Access::REMOTE_READ.bits(), 4);
        let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        assert!(rw.contains(Access::REMOTE_WRITE));
        assert!(!rw.contains(Access::REMOTE_READ));
        assert_eq!(rw.to_string(), "LOCAL_WRITE|REMOTE_WRITE");
        assert_eq!(Access::NONE.to_string(), "NONE");
        assert_eq!(Access(0x100 | 4).to_string(), "REMOTE_READ|0x100");
    }

    #[test]
    fn remote_write_without_local_write_is_refused() {
        // ibv_reg_mr(3) refuses REMOTE_WRITE without LOCAL_WRITE; we refuse it first, by name.
        let err = Access::REMOTE_WRITE.check_for_region().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid access flags REMOTE_WRITE: REMOTE_WRITE requires LOCAL_WRITE (ibv_reg_mr(3))"
        );
        assert!((Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .check_for_region()
            .is_ok());
        assert!(Access::REMOTE_READ.check_for_region().is_ok());
        assert!(Access::NONE.check_for_region().is_ok());
    }

    #[test]
    fn remote_region_offsets_are_bounded() {
        // A remote address is computed inside the region; the last byte is reachable.
        let region = RemoteRegion {
            addr: 0x1000,
            len: 64,
            rkey: 7,
        };
        assert_eq!(
            region.at(60, 4),
            RemoteAddr {
                addr: 0x103c,
                rkey: 7
            }
        );
        assert_eq!(region.at(0, 64).addr, 0x1000);
    }

    #[test]
    #[should_panic(expected = "outside region")]
    fn remote_region_overrun_panics() {
        // Naming bytes past the region's end is a programmer error.
        RemoteRegion {
            addr: 0x1000,
            len: 64,
            rkey: 7,
        }
        .at(61, 4);
    }

    #[test]
    fn page_buffer_is_page_aligned() {
        // Region memory starts on a page boundary and is zero-filled.
        let buffer = PageBuffer::new(10_000).unwrap();
        assert_eq!(buffer.as_mut_ptr() as usize % 4096, 0);
        assert!(buffer.len() >= 10_000);
        // SAFETY: freshly mapped, readable, nothing else uses it.
        assert_eq!(unsafe { *buffer.as_mut_ptr() }, 0);
    }
}
