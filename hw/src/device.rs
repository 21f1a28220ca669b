//! Devices, the opened device context, ports and GIDs.

use std::ffi::CStr;
use std::fmt;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rdma_sys as sys;

use crate::error::{Errno, Error, Result};

/// What `ibv_get_device_list` tells about one RDMA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The kernel's name for the device, such as `rxe0` or `mlx5_0`.
    pub name: String,
    /// The node GUID, in host byte order (0 for rxe devices that derive none).
    pub guid: u64,
}

/// The list of RDMA devices, freed on drop (`ibv_free_device_list`).
struct DeviceList {
    list: *mut *mut sys::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList> {
        let mut len: libc::c_int = 0;
        // SAFETY: `len` is a valid out-pointer; the returned array is owned by `DeviceList`.
        let list = unsafe { sys::ibv_get_device_list(&mut len) };
        if list.is_null() {
            let errno = Errno::last();
            // ibv_get_device_list(3): ENOSYS means "no kernel support for RDMA": that is no
            // device, which the caller reports with the name it wanted.
            if errno.0 == libc::ENOSYS {
                return Ok(DeviceList {
                    list: std::ptr::null_mut(),
                    len: 0,
                });
            }
            return Err(Error::DeviceList(errno));
        }
        assert!(len >= 0, "ibv_get_device_list returned a negative count");
        Ok(DeviceList {
            list,
            len: len as usize,
        })
    }

    fn devices(&self) -> impl Iterator<Item = *mut sys::ibv_device> + '_ {
        // SAFETY: the array holds `len` valid device pointers while the list lives.
        (0..self.len).map(move |i| unsafe { *self.list.add(i) })
    }

    fn info(device: *mut sys::ibv_device) -> DeviceInfo {
        // SAFETY: `device` comes from a live device list; the name is a NUL-terminated string
        // inside the device structure.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(device)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above; the GUID is returned in network byte order (__be64).
        let guid = u64::from_be(unsafe { sys::ibv_get_device_guid(device) });
        DeviceInfo { name, guid }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if !self.list.is_null() {
            // SAFETY: the list came from ibv_get_device_list and is freed once. Contexts opened
            // from it stay valid (ibv_get_device_list(3): open what you need before freeing).
            unsafe { sys::ibv_free_device_list(self.list) };
        }
    }
}

/// Enumerates RDMA devices.
#[derive(Debug)]
pub struct Device;

impl Device {
    /// The RDMA devices present. A host whose kernel has no RDMA support has none: that is an
    /// empty list, not an error.
    pub fn list() -> Result<Vec<DeviceInfo>> {
        let list = DeviceList::get()?;
        Ok(list.devices().map(DeviceList::info).collect())
    }
}

/// Capabilities of a device that this crate uses to check or clamp requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceAttributes {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_mr_size: u64,
    /// Incoming RDMA READs one QP can serve at once (bounds `max_dest_rd_atomic`).
    pub max_qp_rd_atom: u8,
    /// Outgoing RDMA READs one QP can have in flight (bounds `max_rd_atomic`).
    pub max_qp_init_rd_atom: u8,
    pub phys_port_cnt: u8,
}

/// An opened RDMA device (`ibv_context`), closed on drop after every child is gone: protection
/// domains, channels and completion queues hold an `Arc<Context>`.
pub struct Context {
    raw: *mut sys::ibv_context,
    name: String,
    attributes: DeviceAttributes,
}

// SAFETY: libibverbs contexts may be used from any thread: rdma-core's verbs are thread-safe
// (providers take their own locks around shared state), and `Context` exposes no interior
// mutability of its own. It is therefore sound to move it to and share it between threads.
unsafe impl Send for Context {}
// SAFETY: see `Send`.
unsafe impl Sync for Context {}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("attributes", &self.attributes)
            .finish()
    }
}

impl Context {
    /// Opens the device called `name`. When it does not exist the error names it and lists the
    /// devices that do.
    pub fn open(name: &str) -> Result<Arc<Context>> {
        let list = DeviceList::get()?;
        let device = list
            .devices()
            .find(|&device| DeviceList::info(device).name == name)
            .ok_or_else(|| Error::DeviceNotFound {
                name: name.to_string(),
                available: list.devices().map(|d| DeviceList::info(d).name).collect(),
            })?;
        // SAFETY: `device` is from the live list; the context outlives the list, as allowed.
        let raw = unsafe { sys::ibv_open_device(device) };
        if raw.is_null() {
            return Err(Error::OpenDevice {
                name: name.to_string(),
                errno: Errno::last(),
            });
        }
        drop(list);
        let mut context = Context {
            raw,
            name: name.to_string(),
            attributes: DeviceAttributes {
                max_qp_wr: 0,
                max_sge: 0,
                max_cqe: 0,
                max_mr_size: 0,
                max_qp_rd_atom: 0,
                max_qp_init_rd_atom: 0,
                phys_port_cnt: 0,
            },
        };
        context.attributes = context.query_device()?;
        Ok(Arc::new(context))
    }

    fn query_device(&self) -> Result<DeviceAttributes> {
        let mut attr = MaybeUninit::<sys::ibv_device_attr>::zeroed();
        // SAFETY: `raw` is an open context and `attr` a writable ibv_device_attr.
        let rc = unsafe { sys::ibv_query_device(self.raw, attr.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::QueryDevice {
                name: self.name.clone(),
                errno: Errno(rc),
            });
        }
        // SAFETY: ibv_query_device filled the structure (and it was zeroed before).
        let attr = unsafe { attr.assume_init() };
        let clamp_u8 = |v: libc::c_int| v.clamp(0, i32::from(u8::MAX)) as u8;
        Ok(DeviceAttributes {
            max_qp_wr: attr.max_qp_wr.max(0) as u32,
            max_sge: attr.max_sge.max(0) as u32,
            max_cqe: attr.max_cqe.max(0) as u32,
            max_mr_size: attr.max_mr_size,
            max_qp_rd_atom: clamp_u8(attr.max_qp_rd_atom),
            max_qp_init_rd_atom: clamp_u8(attr.max_qp_init_rd_atom),
            phys_port_cnt: attr.phys_port_cnt,
        })
    }

    /// The device's name, such as `rxe0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device capabilities queried when it was opened.
    pub fn attributes(&self) -> DeviceAttributes {
        self.attributes
    }

    pub(crate) fn raw(&self) -> *mut sys::ibv_context {
        self.raw
    }

    /// Queries port `port` (ports count from 1).
    pub fn query_port(&self, port: u8) -> Result<PortInfo> {
        let mut attr = MaybeUninit::<sys::ibv_port_attr>::zeroed();
        // SAFETY: `raw` is open; `attr` is writable. rdma-sys's ___ibv_query_port is the
        // header's inline ibv_query_port (it passes the structure size to the provider).
        let rc = unsafe { sys::___ibv_query_port(self.raw, port, attr.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::QueryPort {
                name: self.name.clone(),
                port,
                errno: Errno(rc),
            });
        }
        // SAFETY: filled by the provider (and zeroed before).
        let attr = unsafe { attr.assume_init() };
        Ok(PortInfo {
            state: PortState::from_raw(attr.state),
            active_mtu: Mtu::from_raw(attr.active_mtu),
            max_mtu: Mtu::from_raw(attr.max_mtu),
            link_layer: LinkLayer::from_raw(attr.link_layer),
            lid: attr.lid,
            gid_table_len: attr.gid_tbl_len.max(0) as u32,
        })
    }

    /// The GID at `index` of `port`'s GID table.
    pub fn query_gid(&self, port: u8, index: u8) -> Result<Gid> {
        let mut gid = MaybeUninit::<sys::ibv_gid>::zeroed();
        // SAFETY: `raw` is open; `gid` is a writable 16-byte union.
        let rc = unsafe {
            sys::ibv_query_gid(self.raw, port, libc::c_int::from(index), gid.as_mut_ptr())
        };
        if rc != 0 {
            // ibv_query_gid(3): "returns 0 on success, and -1 on error" (errno set).
            return Err(Error::QueryGid {
                name: self.name.clone(),
                port,
                index: u32::from(index),
                errno: Errno::last(),
            });
        }
        // SAFETY: filled; every bit pattern of the union's `raw` member is valid.
        Ok(Gid(unsafe { gid.assume_init().raw }))
    }

    /// The GID table entry at `index` with its type (IB, RoCE v1, RoCE v2).
    pub fn query_gid_entry(&self, port: u8, index: u32) -> Result<GidEntry> {
        let mut entry = MaybeUninit::<sys::ibv_gid_entry>::zeroed();
        // SAFETY: `raw` is open; `entry` is writable and its size is passed, as the header's
        // inline ibv_query_gid_ex does.
        let rc = unsafe {
            ffi::_ibv_query_gid_ex(
                self.raw,
                u32::from(port),
                index,
                entry.as_mut_ptr(),
                0,
                std::mem::size_of::<sys::ibv_gid_entry>(),
            )
        };
        if rc != 0 {
            // ibv_query_gid_ex(3) returns the errno value; ENODATA marks an empty entry.
            return Err(Error::QueryGid {
                name: self.name.clone(),
                port,
                index,
                errno: Errno(rc),
            });
        }
        // SAFETY: filled by libibverbs (and zeroed before).
        let entry = unsafe { entry.assume_init() };
        Ok(GidEntry {
            index: entry.gid_index,
            // SAFETY: every bit pattern of the union's `raw` member is valid.
            gid: Gid(unsafe { entry.gid.raw }),
            kind: GidType::from_raw(entry.gid_type),
        })
    }

    /// Picks the GID that RoCE v2 over IPv4 uses: the first entry of `port`'s table whose type
    /// is RoCE v2 and whose value is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). RoCE v2
    /// packets are UDP/IP, so the GID is the IP address the peer routes to; the kernel adds
    /// such an entry for each IPv4 address of the netdev under the RDMA device.
    pub fn roce_v2_ipv4_gid(&self, port: u8) -> Result<GidEntry> {
        let scanned = self.query_port(port)?.gid_table_len;
        for index in 0..scanned {
            // Empty entries fail with ENODATA (or EINVAL on older kernels): skip them.
            let Ok(entry) = self.query_gid_entry(port, index) else {
                continue;
            };
            if entry.kind == GidType::RoceV2 && entry.gid.is_ipv4_mapped() {
                return Ok(entry);
            }
        }
        Err(Error::NoRoceV2Gid {
            name: self.name.clone(),
            port,
            scanned,
        })
    }

    /// Resolves a [`GidSelector`] to a GID index and its value.
    pub fn select_gid(&self, port: u8, selector: GidSelector) -> Result<(u8, Gid)> {
        match selector {
            GidSelector::Index(index) => Ok((index, self.query_gid(port, index)?)),
            GidSelector::RoceV2Ipv4 => {
                let entry = self.roce_v2_ipv4_gid(port)?;
                // ibv_ah_attr.grh.sgid_index is 8 bits: a larger index cannot be used.
                let index = u8::try_from(entry.index).map_err(|_| Error::NoRoceV2Gid {
                    name: self.name.clone(),
                    port,
                    scanned: entry.index,
                })?;
                Ok((index, entry.gid))
            }
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened once, closed once; every child holds an Arc<Context>, so none is left.
        let rc = unsafe { sys::ibv_close_device(self.raw) };
        debug_assert_eq!(rc, 0, "ibv_close_device failed");
    }
}

/// How a QP picks its source GID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GidSelector {
    /// Scan for the RoCE v2 IPv4-mapped entry ([`Context::roce_v2_ipv4_gid`]).
    RoceV2Ipv4,
    /// Use this index as is (InfiniBand fabrics, or an index configured by an operator).
    Index(u8),
}

/// A 128-bit global identifier, in the wire's (network) byte order.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// True for `::ffff:a.b.c.d`, the form RoCE v2 gives an IPv4 address.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10].iter().all(|&b| b == 0) && self.0[10] == 0xff && self.0[11] == 0xff
    }

    /// True for the all-zero GID (an unused table entry).
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }

    /// The GID as an IPv6 address (RoCE GIDs are IP addresses).
    pub fn to_ipv6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::from(self.0)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_ipv6().to_ipv4_mapped() {
            Some(v4) if self.is_ipv4_mapped() => write!(f, "::ffff:{v4}"),
            _ => write!(f, "{}", self.to_ipv6()),
        }
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// The type of a GID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GidType {
    Ib,
    RoceV1,
    RoceV2,
    Other(u32),
}

impl GidType {
    fn from_raw(raw: u32) -> GidType {
        match raw {
            sys::IBV_GID_TYPE_IB => GidType::Ib,
            sys::IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
            sys::IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
            other => GidType::Other(other),
        }
    }
}

/// One GID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: Gid,
    pub kind: GidType,
}

/// What `ibv_query_port` tells about a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub state: PortState,
    /// The MTU in use on the link; an RC QP's path MTU must not exceed it. For RoCE it follows
    /// the netdev's MTU (Ethernet 1500 gives 1024).
    pub active_mtu: Mtu,
    pub max_mtu: Mtu,
    pub link_layer: LinkLayer,
    /// The local identifier; 0 on RoCE, where addressing is by GID.
    pub lid: u16,
    pub gid_table_len: u32,
}

/// Logical port state (`enum ibv_port_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Nop,
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Unknown(u32),
}

impl PortState {
    fn from_raw(raw: u32) -> PortState {
        use sys::ibv_port_state as s;
        match raw {
            s::IBV_PORT_NOP => PortState::Nop,
            s::IBV_PORT_DOWN => PortState::Down,
            s::IBV_PORT_INIT => PortState::Init,
            s::IBV_PORT_ARMED => PortState::Armed,
            s::IBV_PORT_ACTIVE => PortState::Active,
            s::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

/// The link layer under a port. The constants are an anonymous enum in verbs.h
/// (`IBV_LINK_LAYER_UNSPECIFIED, _INFINIBAND, _ETHERNET`), so bindgen does not emit them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    Unspecified,
    InfiniBand,
    /// RoCE (including soft-RoCE, rxe).
    Ethernet,
    Other(u8),
}

impl LinkLayer {
    fn from_raw(raw: u8) -> LinkLayer {
        match raw {
            0 => LinkLayer::Unspecified,
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            other => LinkLayer::Other(other),
        }
    }
}

/// A path MTU (`enum ibv_mtu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mtu {
    Mtu256,
    Mtu512,
    Mtu1024,
    Mtu2048,
    Mtu4096,
}

impl Mtu {
    /// Converts the verbs value; an out-of-range value (which no device reports) is taken as
    /// the smallest MTU, which every RC path supports.
    pub fn from_raw(raw: u32) -> Mtu {
        use sys::ibv_mtu as m;
        match raw {
            m::IBV_MTU_512 => Mtu::Mtu512,
            m::IBV_MTU_1024 => Mtu::Mtu1024,
            m::IBV_MTU_2048 => Mtu::Mtu2048,
            m::IBV_MTU_4096 => Mtu::Mtu4096,
            _ => Mtu::Mtu256,
        }
    }

    pub fn to_raw(self) -> u32 {
        use sys::ibv_mtu as m;
        match self {
            Mtu::Mtu256 => m::IBV_MTU_256,
            Mtu::Mtu512 => m::IBV_MTU_512,
            Mtu::Mtu1024 => m::IBV_MTU_1024,
            Mtu::Mtu2048 => m::IBV_MTU_2048,
            Mtu::Mtu4096 => m::IBV_MTU_4096,
        }
    }

    pub fn bytes(self) -> u32 {
        256 << (self.to_raw() - 1)
    }
}

mod ffi {
    use rdma_sys as sys;

    // The header's ibv_query_gid_ex is a static inline around this exported function
    // (libibverbs 1.11 and later, rdma-core 32+); rdma-sys's bindgen allowlist does not match
    // the leading underscore, so it is declared here with the header's signature.
    #[link(name = "ibverbs")]
    extern "C" {
        pub fn _ibv_query_gid_ex(
            context: *mut sys::ibv_context,
            port_num: u32,
            gid_index: u32,
            entry: *mut sys::ibv_gid_entry,
            flags: u32,
            entry_size: usize,
        ) -> libc::c_int;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_round_trips_and_sizes() {
        // Checks the MTU enum against verbs.h's numbering and the byte sizes it stands for.
        for mtu in [
            Mtu::Mtu256,
            Mtu::Mtu512,
            Mtu::Mtu1024,
            Mtu::Mtu2048,
            Mtu::Mtu4096,
        ] {
            assert_eq!(Mtu::from_raw(mtu.to_raw()), mtu);
        }
        assert_eq!(Mtu::Mtu256.bytes(), 256);
        assert_eq!(Mtu::Mtu1024.bytes(), 1024);
        assert_eq!(Mtu::Mtu4096.bytes(), 4096);
        assert_eq!(Mtu::Mtu1024.to_raw(), 3);
    }

    #[test]
    fn gid_ipv4_mapped_detection_and_display() {
        // A RoCE v2 IPv4 GID is ::ffff:a.b.c.d; a link-local fe80:: GID is not.
        let mut v4 = [0u8; 16];
        v4[10] = 0xff;
        v4[11] = 0xff;
        v4[12..].copy_from_slice(&[10, 77, 0, 1]);
        let gid = Gid(v4);
        assert!(gid.is_ipv4_mapped());
        assert_eq!(gid.to_string(), "::ffff:10.77.0.1");
        let mut link_local = [0u8; 16];
        link_local[0] = 0xfe;
        link_local[1] = 0x80;
        link_local[15] = 1;
        assert!(!Gid(link_local).is_ipv4_mapped());
        assert_eq!(Gid(link_local).to_string(), "fe80::1");
        assert!(Gid::default().is_zero());
        assert!(!Gid::default().is_ipv4_mapped());
    }

    #[test]
    fn missing_device_error_names_it_and_what_exists() {
        // On a machine without RDMA (the usual build host) the list is empty and opening a
        // device fails with a message naming the device; where RDMA exists, a made-up name
        // fails the same way and the message lists the real devices.
        let devices = Device::list().expect("listing devices never fails for lack of RDMA");
        let err = Context::open("ordinal-no-such-device").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("`ordinal-no-such-device` not found"),
            "{message}"
        );
        match &err {
            Error::DeviceNotFound { available, .. } => {
                let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
                assert_eq!(available, &names);
                if names.is_empty() {
                    assert!(message.contains("devices present: none"), "{message}");
                }
            }
            other => panic!("expected DeviceNotFound, got {other:?}"),
        }
    }
}
