//! The NBD (Network Block Device) protocol, server side as a state machine that does no I/O.
//!
//! NBD lets an unmodified kernel (`nbd-client`, `qemu-nbd`, libnbd) use a remote byte range as a
//! block device. ordinal exposes the protected volume through it: every WRITE the kernel sends
//! becomes a replicated write, every READ is served from the local volume.
//!
//! [`ServerSession`] is one connection in the style of `quinn-proto`: the runtime feeds it the
//! bytes it received ([`ServerSession::handle_input`]), takes the bytes to send
//! ([`ServerSession::poll_output`]) and the requests to execute ([`ServerSession::poll_event`]),
//! and answers those requests in any order ([`ServerSession::reply_ok`] and friends). The session
//! validates every request itself, so the runtime only ever sees in-range, aligned requests.
//!
//! [`Client`] is a small blocking client over `std::net::TcpStream`, meant for test drivers and
//! demos rather than production use.
//!
//! Supported: fixed newstyle handshake; options `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_ABORT`; commands `NBD_CMD_READ`, `NBD_CMD_WRITE`,
//! `NBD_CMD_FLUSH` and `NBD_CMD_DISC` with simple replies; one export per session.
//!
//! What this crate is not: the server part opens no socket, spawns no thread and reads no clock.
//! It has no TLS, no structured replies, no FUA, TRIM, WRITE_ZEROES or BLOCK_STATUS, and no
//! oldstyle or non-fixed newstyle handshake.

#![forbid(unsafe_code)]

mod client;
mod server;
pub mod wire;

#[cfg(test)]
mod tests;

pub use client::{Client, ClientError, ClientReceiver, ClientSender, Reply};
pub use server::{ConfigError, Event, ProtocolError, ReplyError, ServerConfig, ServerSession};
pub use wire::NbdError;
