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
//! Supported: fixed newstyle handshake; options `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO` and
//! `NBD_OPT_INFO` (answering `NBD_INFO_EXPORT`, `NBD_INFO_NAME` when asked, and
//! `NBD_INFO_BLOCK_SIZE` always), `NBD_OPT_LIST`, `NBD_OPT_ABORT` and `NBD_OPT_STRUCTURED_REPLY`;
//! commands `NBD_CMD_READ`, `NBD_CMD_WRITE`, `NBD_CMD_FLUSH`, `NBD_CMD_TRIM`,
//! `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_DISC`; command flags `NBD_CMD_FLAG_FUA`,
//! `NBD_CMD_FLAG_NO_HOLE` and (with structured replies) `NBD_CMD_FLAG_DF`; simple replies, or
//! structured replies once negotiated; `NBD_FLAG_CAN_MULTI_CONN` when the runtime vouches for it;
//! one export per session, one session per connection.
//!
//! What this crate is not: the server part opens no socket, spawns no thread and reads no clock.
//! It has no TLS (`NBD_OPT_STARTTLS` is unsupported), no metadata contexts and so no
//! `NBD_CMD_BLOCK_STATUS` (`NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_LIST_META_CONTEXT` are answered
//! `NBD_REP_ERR_UNSUP`), no `NBD_CMD_CACHE`, no fast zeroing (`NBD_CMD_FLAG_FAST_ZERO` is refused),
//! no extended headers, no `NBD_INFO_DESCRIPTION`, and no oldstyle or non-fixed newstyle
//! handshake. A READ is always answered in one piece, never with holes.

#![forbid(unsafe_code)]

mod client;
mod server;
pub mod wire;

#[cfg(test)]
mod tests;

pub use client::{Client, ClientError, ClientReceiver, ClientSender, ConnectOptions, Reply};
pub use server::{ConfigError, Event, ProtocolError, ReplyError, ServerConfig, ServerSession};
pub use wire::NbdError;
