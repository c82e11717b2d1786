//! The TFTP protocol: wire format, pure transfer state machines, the server (its request port
//! on tokio, its transfers on the event loops of `engine`) and the tokio client. Nothing in
//! here knows about upstreams or how a cache works: a server serves whatever
//! [`crate::content::Found`] a [`Source`] hands it, and a client yields bytes to whoever asked.

pub mod client;
mod datagrams;
mod engine;
mod feed;
pub mod netascii;
pub mod packet;
pub mod server;
mod shared;
pub mod transfer;

pub use server::{Content, Now, OpenError, Opened, ReadRequest, Source, Ticket, TransferError};
