//! The TFTP server: listens on every configured address, answers each read request from its own
//! task and its own ephemeral socket (a new TID, RFC 1350 §4), and drives a
//! [`transfer::Sender`](super::transfer::Sender) with the bytes a [`Source`] hands it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use thiserror::Error;
use tokio::io::AsyncRead;

use crate::name::FileName;

/// Transfer mode requested by the client (RFC 1350 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// What a front end learns about a read request before it opens the file.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub name: FileName,
    pub client: SocketAddr,
    pub mode: Mode,
}

/// Bytes to send. `size` is known for cached files and for misses whose upstream announced it
/// (tsize is offered only when it is known); `reader` may yield slowly (stream-through from an
/// upstream) and must fail with an error rather than end early if its source was truncated.
pub struct Content {
    pub size: Option<u64>,
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
}

/// Why a file cannot be served; each maps to one TFTP ERROR (RFC 1350 §5).
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("file not found")]
    NotFound,
    #[error("access violation: {0}")]
    Denied(String),
    #[error("server busy")]
    Busy,
    #[error("{0}")]
    Unavailable(String),
}

/// How a transfer ended, handed back to the source for logging and metrics.
#[derive(Debug, Clone)]
pub struct TransferReport {
    pub client: SocketAddr,
    pub name: String,
    pub bytes: u64,
    pub duration: Duration,
    pub outcome: Result<(), String>,
}

/// Where the server gets file content: a directory, the cache, the miss path.
pub trait Source: Send + Sync + 'static {
    fn open(&self, req: ReadRequest) -> BoxFuture<'_, Result<Content, OpenError>>;

    /// Called once per finished (or failed) transfer.
    fn finished(&self, _report: &TransferReport) {}
}
