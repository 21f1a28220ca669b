//! One error type for every verb, each variant naming the verb that failed and the errno.

use std::fmt;

/// A `errno` value with its symbolic name and the C library's description, for messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno`.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name of the common values verbs return (`EINVAL`), or `errno N`.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            libc::ENODATA => "ENODATA",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
            _ => "errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // std's message is "Invalid argument (os error 22)": keep the words, show the number
        // once.
        let message = std::io::Error::from_raw_os_error(self.0).to_string();
        let suffix = format!(" (os error {})", self.0);
        let description = message.strip_suffix(&suffix).unwrap_or(&message);
        match self.name() {
            "errno" => write!(f, "errno {}: {description}", self.0),
            name => write!(f, "{name} ({}): {description}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A QP state transition, named in errors as `RESET->INIT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: crate::QpState,
    pub to: crate::QpState,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.from.name(), self.to.name())
    }
}

/// Everything that can fail in this crate. Programmer errors (a work request list longer than
/// the queue, an SGE outside its region) are assertions, not variants.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ibv_get_device_list failed: {0}")]
    DeviceList(Errno),
    #[error("RDMA device `{name}` not found; devices present: {}", list_or_none(.available))]
    DeviceNotFound {
        name: String,
        available: Vec<String>,
    },
    #[error("ibv_open_device({name}) failed: {errno}")]
    OpenDevice { name: String, errno: Errno },
    #[error("ibv_query_device({name}) failed: {errno}")]
    QueryDevice { name: String, errno: Errno },
    #[error("ibv_query_port({name}, port {port}) failed: {errno}")]
    QueryPort {
        name: String,
        port: u8,
        errno: Errno,
    },
    #[error("ibv_query_gid({name}, port {port}, index {index}) failed: {errno}")]
    QueryGid {
        name: String,
        port: u8,
        index: u32,
        errno: Errno,
    },
    #[error("no RoCE v2 IPv4-mapped GID on {name} port {port} (scanned {scanned} entries); does the netdev have an IPv4 address?")]
    NoRoceV2Gid {
        name: String,
        port: u8,
        scanned: u32,
    },
    #[error("ibv_alloc_pd failed: {0}")]
    AllocPd(Errno),
    #[error("invalid access flags {access}: {reason}")]
    InvalidAccess {
        access: crate::Access,
        reason: &'static str,
    },
    #[error("ibv_reg_mr({len} bytes, {access}) failed: {errno}")]
    RegMr {
        len: usize,
        access: crate::Access,
        errno: Errno,
    },
    #[error("ibv_create_comp_channel failed: {0}")]
    CreateChannel(Errno),
    #[error("completion channel already serves a completion queue (one CQ per channel)")]
    ChannelInUse,
    #[error("fcntl(O_NONBLOCK) on the completion channel fd failed: {0}")]
    ChannelNonBlocking(Errno),
    #[error("ibv_create_cq({entries} entries) failed: {errno}")]
    CreateCq { entries: u32, errno: Errno },
    #[error("ibv_req_notify_cq failed: {0}")]
    ArmCq(Errno),
    #[error("ibv_poll_cq failed: returned {0}")]
    PollCq(i32),
    #[error("ibv_get_cq_event failed: {0}")]
    GetCqEvent(Errno),
    #[error("poll(2) on the completion channel fd failed: {0}")]
    WaitChannel(Errno),
    #[error("ibv_create_qp(RC, {caps}) failed: {errno}")]
    CreateQp { caps: crate::QpCaps, errno: Errno },
    #[error("QP transition {transition} refused: the QP is in {actual}, not {}", .transition.from.name())]
    BadTransition {
        transition: Transition,
        actual: crate::QpState,
    },
    #[error("ibv_modify_qp {transition} failed: {errno}")]
    ModifyQp {
        transition: Transition,
        errno: Errno,
    },
    #[error("ibv_query_qp failed: {0}")]
    QueryQp(Errno),
    #[error("ibv_post_send failed at {}: {errno}", wr_index(.index))]
    PostSend { index: Option<usize>, errno: Errno },
    #[error("ibv_post_recv failed at {}: {errno}", wr_index(.index))]
    PostRecv { index: Option<usize>, errno: Errno },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none (ibv_get_device_list found no device; is an RDMA driver such as rdma_rxe loaded and a link added?)".to_string()
    } else {
        names.join(", ")
    }
}

fn wr_index(index: &Option<usize>) -> String {
    match index {
        Some(index) => format!("work request {index}"),
        // rxe reports a failed doorbell with no bad work request: the list was queued whole.
        None => "the doorbell (no bad work request reported)".to_string(),
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
