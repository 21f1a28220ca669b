//! The ordinal replication protocol as plain state machines that do no I/O.
//!
//! ordinal replicates a block volume from a **primary** to a remote **DR** server, with an
//! **aux** server next to the primary: the *order* of writes travels synchronously (tiny order
//! records, batched), the *data* asynchronously (one-sided writes into the DR's staging ring), and
//! the primary's status table sits in the aux's memory so that after a primary failure the DR can
//! tell which in-flight payloads it can still use ([`dr::Dr::failover`]).
//!
//! Each role takes inputs through `handle_*` methods (client write, message received,
//! completion, timer tick with the current time) and emits actions to execute (local write, post
//! SEND, post one-sided WRITE, write aux entries, ack a client, apply to the DR volume, promote),
//! taken with `drain_actions`. Time is an argument, never read from a clock. The same code runs
//! under the simulator (`ordinal-sim`) and under the real runtime. A runtime may hand over
//! several inputs before taking the actions (a poll's worth): the primary then does the work
//! they made possible once, when the actions are taken.
//!
//! What this crate is not: it opens no file or socket, spawns nothing and depends on no runtime;
//! memory regions (the DR log, the aux table, the staging ring) are handed in as byte slices.

pub mod aux;
pub mod checksum;
pub mod config;
pub mod dr;
pub mod primary;
pub mod ring;
pub mod wire;

pub use config::{Epoch, Geometry, LinkLossPolicy, Mode, Mutation, Mutations, Nanos, Seq};
