//! The TFTP server: listens on every configured address, answers each read request from its own
//! task and its own ephemeral socket (a new TID, RFC 1350 §4), and drives a
//! [`transfer::Sender`](super::transfer::Sender) with the bytes a [`Source`] hands it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::netascii;
use super::packet::{ErrorCode, Options, Packet, BLKSIZE_MIN, DEFAULT_BLKSIZE};
use super::transfer::{Params, Sender};
use crate::name::{FileName, NameError};
use crate::net::bind_udp;

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
    /// Where the bytes come from, for the transfer's log line and metrics.
    pub origin: Origin,
}

/// Where a transfer's bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The overrides directory (or `serve --root`).
    Local,
    /// The cache; `source` is the upstream it was fetched from.
    Hit { source: String },
    /// Streamed through from an upstream on a miss.
    Miss { source: String },
}

impl Origin {
    /// `hit` or `miss`, as in the metrics' `result` label.
    pub fn result(&self) -> &'static str {
        match self {
            Origin::Local | Origin::Hit { .. } => "hit",
            Origin::Miss { .. } => "miss",
        }
    }

    pub fn source(&self) -> &str {
        match self {
            Origin::Local => "local",
            Origin::Hit { source } | Origin::Miss { source } => source,
        }
    }
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
    /// From the request to the first DATA block sent: what a phone waits on a miss while the
    /// upstream answers. `None` when no DATA was sent.
    pub first_data: Option<Duration>,
    /// `None` when the request failed before any content was opened.
    pub origin: Option<Origin>,
    pub outcome: Result<(), String>,
}

/// Where the server gets file content: a directory, the cache, the miss path.
pub trait Source: Send + Sync + 'static {
    fn open(&self, req: ReadRequest) -> BoxFuture<'_, Result<Content, OpenError>>;

    /// Called once per finished (or failed) transfer.
    fn finished(&self, _report: &TransferReport) {}
}

/// Limits and defaults of the server (the `tftp:` section of the config).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub timeout: Duration,
    pub retries: u32,
    /// How long shutdown waits for transfers in flight.
    pub drain: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["127.0.0.1:6969".parse().unwrap()],
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 6,
            drain: Duration::from_secs(10),
        }
    }
}

/// A bound server: sockets are open (ports known) before [`Server::run`] starts serving.
pub struct Server {
    cfg: ServerConfig,
    sockets: Vec<Arc<UdpSocket>>,
}

/// Size of socket buffers for listeners and transfers: a full window of large blocks must fit
/// or the kernel drops packets and recovery costs a timeout (peers.md).
const MIN_SOCKET_BUFFER: usize = 1 << 20;

impl Server {
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let mut sockets = Vec::new();
        for addr in &cfg.listen {
            let sock = bind_udp(*addr, MIN_SOCKET_BUFFER)
                .map_err(|e| io::Error::new(e.kind(), format!("TFTP listen {addr}: {e}")))?;
            sockets.push(Arc::new(sock));
        }
        Ok(Server { cfg, sockets })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` resolves, then waits up to `drain` for transfers in flight.
    pub async fn run<S: Source>(
        self,
        source: Arc<S>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let cfg = Arc::new(self.cfg);
        let (req_tx, mut req_rx) = mpsc::channel::<(Arc<UdpSocket>, SocketAddr, Bytes)>(1024);
        let mut listeners = JoinSet::new();
        for sock in &self.sockets {
            let sock = sock.clone();
            let tx = req_tx.clone();
            listeners.spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, peer)) => {
                            let data = Bytes::copy_from_slice(&buf[..n]);
                            if tx.send((sock.clone(), peer, data)).await.is_err() {
                                return;
                            }
                        }
                        // ICMP errors surface here on some systems; keep listening.
                        Err(e) => debug!("TFTP listener recv error: {e}"),
                    }
                }
            });
        }
        drop(req_tx);
        let mut transfers = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some((sock, peer, data)) = req_rx.recv() => {
                    let cfg = cfg.clone();
                    let source = source.clone();
                    transfers.spawn(async move {
                        handle_request(&cfg, &*source, sock, peer, &data).await;
                    });
                }
                Some(_) = transfers.join_next(), if !transfers.is_empty() => {}
            }
        }
        // Stop answering new requests at once: the ports are free for a restarted server
        // while the transfers in flight finish on their own sockets.
        listeners.abort_all();
        while listeners.join_next().await.is_some() {}
        drop(self.sockets);
        drop(req_rx);
        if !transfers.is_empty() {
            info!(
                "shutting down: waiting up to {:?} for {} TFTP transfer(s)",
                cfg.drain,
                transfers.len()
            );
            let drained = tokio::time::timeout(cfg.drain, async {
                while transfers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!("{} TFTP transfer(s) cut short by shutdown", transfers.len());
                transfers.abort_all();
            }
        }
        Ok(())
    }
}

fn error_bytes(code: ErrorCode, msg: &str) -> Bytes {
    Packet::error(code, msg).encode()
}

async fn handle_request<S: Source + ?Sized>(
    cfg: &ServerConfig,
    source: &S,
    listener: Arc<UdpSocket>,
    peer: SocketAddr,
    data: &[u8],
) {
    let started = Instant::now();
    let pkt = match Packet::decode(data) {
        Ok(p) => p,
        Err(e) => {
            info!(client = %peer, "bad TFTP request: {e}");
            let _ = listener
                .send_to(&error_bytes(e.error_code(), &e.to_string()), peer)
                .await;
            return;
        }
    };
    let (filename, mode, options) = match pkt {
        Packet::Rrq {
            filename,
            mode,
            options,
        } => (filename, mode, options),
        Packet::Wrq { filename, .. } => {
            info!(client = %peer, name = %filename, "write request refused: read-only server");
            let _ = listener
                .send_to(
                    &error_bytes(ErrorCode::AccessViolation, "read-only server"),
                    peer,
                )
                .await;
            return;
        }
        other => {
            // A stray DATA/ACK/ERROR on the well-known port belongs to no transfer.
            debug!(client = %peer, "unexpected {other:?} on the request port");
            if !matches!(other, Packet::Error { .. }) {
                let _ = listener
                    .send_to(
                        &error_bytes(ErrorCode::UnknownTid, "unknown transfer ID"),
                        peer,
                    )
                    .await;
            }
            return;
        }
    };
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        other => {
            let msg = format!("unsupported mode {other:?}");
            info!(client = %peer, name = %filename, "{msg}");
            let _ = listener
                .send_to(&error_bytes(ErrorCode::IllegalOperation, &msg), peer)
                .await;
            return;
        }
    };
    // The transfer gets its own socket: a new TID (RFC 1350 §4), on the listener's address.
    let local = listener
        .local_addr()
        .map(|a| SocketAddr::new(a.ip(), 0))
        .unwrap_or_else(|_| "0.0.0.0:0".parse().unwrap());
    let blksize = options
        .blksize
        .unwrap_or(DEFAULT_BLKSIZE)
        .min(cfg.max_blksize);
    let window = options.windowsize.unwrap_or(1).min(cfg.max_windowsize);
    let buffer = (blksize as usize + 4) * window as usize * 2;
    let sock = match bind_udp(local, buffer.max(256 * 1024)) {
        Ok(s) => s,
        Err(e) => {
            warn!(client = %peer, "cannot open a transfer socket: {e}");
            let _ = listener
                .send_to(&error_bytes(ErrorCode::NotDefined, "server busy"), peer)
                .await;
            return;
        }
    };
    drop(listener);
    let name = match FileName::parse(&filename) {
        Ok(n) => n,
        Err(e) => {
            let code = match e {
                NameError::Empty => ErrorCode::FileNotFound,
                _ => ErrorCode::AccessViolation,
            };
            info!(client = %peer, name = %filename.escape_debug(), "refused: {e}");
            let _ = sock.send_to(&error_bytes(code, &e.to_string()), peer).await;
            return;
        }
    };
    let req = ReadRequest {
        name: name.clone(),
        client: peer,
        mode,
    };
    let content = match source.open(req).await {
        Ok(c) => c,
        Err(e) => {
            let (code, msg) = match &e {
                OpenError::NotFound => (ErrorCode::FileNotFound, "File not found".to_string()),
                OpenError::Denied(why) => (ErrorCode::AccessViolation, why.clone()),
                OpenError::Busy => (ErrorCode::NotDefined, "server busy".to_string()),
                OpenError::Unavailable(why) => (ErrorCode::NotDefined, why.clone()),
            };
            debug!(client = %peer, name = %name, "answered ERROR {}: {msg}", code.as_u16());
            let _ = sock.send_to(&error_bytes(code, &msg), peer).await;
            source.finished(&TransferReport {
                client: peer,
                name: name.to_string(),
                bytes: 0,
                duration: started.elapsed(),
                first_data: None,
                origin: None,
                outcome: Err(e.to_string()),
            });
            return;
        }
    };
    let origin = content.origin.clone();
    let (params, oack) = negotiate(cfg, &options, mode, content.size);
    let outcome = run_transfer(sock, peer, params, oack, content, mode).await;
    let (bytes, first_data, result) = outcome;
    source.finished(&TransferReport {
        client: peer,
        name: name.to_string(),
        bytes,
        duration: started.elapsed(),
        first_data: first_data.map(|t| t.saturating_duration_since(started)),
        origin: Some(origin),
        outcome: result,
    });
}

/// Answers the client's options within our caps (RFC 2347-2349, 7440). Returns the transfer
/// parameters and the OACK options, `None` when no option is acknowledged.
pub fn negotiate(
    cfg: &ServerConfig,
    asked: &Options,
    mode: Mode,
    size: Option<u64>,
) -> (Params, Option<Options>) {
    let mut params = Params {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: cfg.timeout,
        retries: cfg.retries,
    };
    let mut oack = Options::default();
    if let Some(b) = asked.blksize {
        let b = b.min(cfg.max_blksize).max(BLKSIZE_MIN);
        params.blksize = b;
        oack.blksize = Some(b);
    }
    if let Some(t) = asked.timeout {
        params.timeout = Duration::from_secs(t as u64);
        oack.timeout = Some(t);
    }
    // RFC 2349: tsize in a RRQ is 0 and asks for the size; only answer it when we know it.
    // In netascii the size on the wire differs from the file's, so it is not offered.
    // curl (7.88) rejects an OACK carrying `tsize 0`, so an empty file goes without it.
    if asked.tsize.is_some() && mode == Mode::Octet {
        if let Some(size) = size.filter(|&s| s > 0) {
            oack.tsize = Some(size);
        }
    }
    if let Some(w) = asked.windowsize {
        let w = w.min(cfg.max_windowsize).max(1);
        params.windowsize = w;
        oack.windowsize = Some(w);
    }
    let oack = (!oack.is_empty()).then_some(oack);
    (params, oack)
}

/// What the reader task hands the transfer: read-ahead chunks, then an explicit end (a closed
/// channel without `End` means the reader died, which must never look like a complete file).
enum Chunk {
    Data(Bytes),
    End,
    Failed(io::Error),
}

/// Reads `Content` ahead of the sender in large chunks (translated to netascii when asked), so
/// the transfer task is not woken per block.
async fn read_ahead(
    chunk_size: usize,
    mut content: Content,
    mode: Mode,
    tx: mpsc::Sender<Chunk>,
    wake: Arc<super::blocking::Wake>,
) {
    let mut ascii = Vec::new();
    loop {
        // Read straight into the buffer that travels on: an octet chunk is never copied.
        let mut buf = BytesMut::with_capacity(chunk_size);
        match content.reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Chunk::Failed(e)).await;
                wake.notify();
                return;
            }
        }
        let chunk = match mode {
            Mode::Octet => buf.freeze(),
            Mode::Netascii => {
                ascii.clear();
                netascii::encode(&buf, &mut ascii);
                Bytes::copy_from_slice(&ascii)
            }
        };
        if tx.send(Chunk::Data(chunk)).await.is_err() {
            return;
        }
        wake.notify();
    }
    if tx.send(Chunk::End).await.is_ok() {
        wake.notify();
        // A small file is read whole long before its last block is acknowledged. Hold the
        // content until the transfer is over: whatever it carries (the admission slot, the
        // open cache file) belongs to the transfer, not to the read-ahead.
        tx.closed().await;
    }
}

/// Cuts read-ahead chunks into blocks of exactly `blksize` bytes; the final block is shorter,
/// and empty when the size is a multiple of blksize (RFC 1350 §6).
struct Blocks {
    rx: mpsc::Receiver<Chunk>,
    pending: BytesMut,
    blksize: usize,
    ended: bool,
    final_given: bool,
}

impl super::blocking::BlockSource for Blocks {
    fn try_next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if let Some(b) = self.cut() {
                return Ok(Some(b));
            }
            match self.rx.try_recv() {
                Ok(c) => self.take(c)?,
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.take_closed()?;
                }
            }
        }
    }
}

impl Blocks {
    fn cut(&mut self) -> Option<Bytes> {
        if self.pending.len() >= self.blksize {
            return Some(self.pending.split_to(self.blksize).freeze());
        }
        if self.ended && !self.final_given {
            self.final_given = true;
            return Some(self.pending.split().freeze());
        }
        None
    }

    fn take(&mut self, c: Chunk) -> io::Result<()> {
        match c {
            // A chunk that starts a block boundary is cut in place (no copy); only a chunk that
            // must be joined to the previous one's tail is copied.
            Chunk::Data(d) if self.pending.is_empty() => self.pending = BytesMut::from(d),
            Chunk::Data(d) => self.pending.extend_from_slice(&d),
            Chunk::End => self.ended = true,
            Chunk::Failed(e) => return Err(e),
        }
        Ok(())
    }

    fn take_closed(&mut self) -> io::Result<()> {
        if self.ended {
            // Only reached if asked again after the final block: nothing more to give.
            return Err(io::Error::other("read past the end"));
        }
        Err(io::Error::other("content source ended unexpectedly"))
    }
}

/// Runs one transfer: a read-ahead task on the runtime, the protocol on a thread of its own
/// (see [`super::blocking`]). Returns the bytes acknowledged, when the first DATA went out, and
/// the outcome.
async fn run_transfer(
    sock: UdpSocket,
    peer: SocketAddr,
    params: Params,
    oack: Option<Options>,
    content: Content,
    mode: Mode,
) -> (u64, Option<Instant>, Result<(), String>) {
    let wake = match super::blocking::Wake::new() {
        Ok(w) => Arc::new(w),
        Err(e) => return (0, None, Err(format!("cannot create an eventfd: {e}"))),
    };
    let sock = match sock.into_std() {
        Ok(s) => s,
        Err(e) => {
            return (
                0,
                None,
                Err(format!("cannot take the transfer socket: {e}")),
            )
        }
    };
    // Read ahead about two windows, in chunks of 8-64 KiB: enough to never starve the sender,
    // small enough that thousands of lock-step transfers stay within a few MB.
    let chunk_size =
        (params.blksize as usize * params.windowsize as usize * 2).clamp(8 << 10, 64 << 10);
    let (tx, rx) = mpsc::channel(2);
    let reader = tokio::spawn(read_ahead(chunk_size, content, mode, tx, wake.clone()));
    let _abort_reader = AbortOnDrop(reader);
    let mut blocks = Blocks {
        rx,
        pending: BytesMut::new(),
        blksize: params.blksize as usize,
        ended: false,
        final_given: false,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tftp-transfer".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let sender = Sender::new(params, oack, Instant::now());
            let r = super::blocking::run(sock, peer, sender, &mut blocks, &wake);
            let _ = done_tx.send(r);
        });
    if let Err(e) = spawned {
        return (0, None, Err(format!("cannot start a transfer thread: {e}")));
    }
    done_rx
        .await
        .unwrap_or_else(|_| (0, None, Err("transfer thread died".to_string())))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
