//! The TFTP server's front door: listens on every configured address, screens each datagram
//! (opcode, then the source's allow list, then size, and only then parsing), absorbs a resent
//! request for a transfer already in progress, asks the [`Source`] for content (admission and
//! its queue happen there), decides the options ([`accept`]), and only then hands the transfer
//! to the [`Engine`]'s event loops, which answer from a port other than the listener's (a new
//! TID, RFC 1350 §4: a loop's shared transfer port, or a port of its own).
//!
//! Everything said to a client before a transfer starts is a short fixed ERROR
//! ([`ErrorPacket`]); what went wrong, with the client's address, goes to the log.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use thiserror::Error;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::engine::{Engine, Job};
pub use super::packet::Mode;
use super::packet::{DecodeError, ErrorCode, ErrorPacket, Packet, MAX_REQUEST_LEN, OP_RRQ, OP_WRQ};
use super::transfer::{accept, Limits, Sender};
use crate::content::{Found, Origin};
use crate::name::{FileName, NameError};
use crate::net::bind_udp;

/// What a front end learns about a read request before it opens the file.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub name: FileName,
    pub client: SocketAddr,
    pub mode: Mode,
    /// When the request's datagram was read from the listener: a miss's one-timeout bound
    /// runs from here, whatever admission and scheduling cost before the source is asked.
    pub arrived: Instant,
}

/// What a source answers a read request with: the content, and what it holds for the
/// transfer's life.
pub struct Content {
    pub found: Found,
    /// Held for the transfer's life (the admission slot), told how the client behaves.
    pub ticket: Box<dyn Ticket>,
}

/// What a source holds for one transfer (its admission slot), dropped when the transfer ends.
/// The engine tells it when the transfer starts waiting for its client and when the client has
/// proven it is there, so admission can make unproven transfers cheap (issue 11).
pub trait Ticket: Send {
    /// The transfer is running and its client has not acknowledged anything yet; calling
    /// `displace` ends it (a new request needs its slot more than a silent client does).
    fn on_probation(&mut self, _displace: Box<dyn FnOnce() + Send>) {}
    /// The client acknowledged something: it is really there; never displace it.
    fn proven(&mut self) {}
}

impl Ticket for () {}

/// Why a file cannot be served; each maps to one fixed TFTP ERROR (RFC 1350 §5). The source
/// logs the details; none of them reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("file not found")]
    NotFound,
    #[error("access denied")]
    Denied,
    #[error("server busy")]
    Busy,
    #[error("temporarily unavailable")]
    Unavailable,
}

impl OpenError {
    pub fn reply(self) -> ErrorPacket {
        match self {
            OpenError::NotFound => ErrorPacket::new(ErrorCode::FileNotFound, "File not found"),
            OpenError::Denied => ErrorPacket::new(ErrorCode::AccessViolation, "access denied"),
            OpenError::Busy => BUSY,
            OpenError::Unavailable => {
                ErrorPacket::new(ErrorCode::NotDefined, "temporarily unavailable")
            }
        }
    }
}

const BUSY: ErrorPacket = ErrorPacket::new(ErrorCode::NotDefined, "server busy");

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
    pub outcome: Result<(), TransferError>,
}

/// Why a transfer ended without its client holding the whole file. Logged with the client's
/// address; the client saw at most the fixed text of an ERROR.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TransferError {
    /// Answered with an ERROR before any content was opened.
    #[error("{0}")]
    Refused(OpenError),
    /// Still unproven when admission gave its slot to a new request (issue 11).
    #[error("displaced by a new request before answering")]
    Displaced,
    /// The event loop could not open or watch a socket for the transfer.
    #[error("cannot open a transfer socket: {0}")]
    NotStarted(String),
    #[error("malformed packet from client: {0}")]
    Malformed(DecodeError),
    /// The client ended the transfer with an ERROR of this code.
    #[error("client sent ERROR {0}")]
    ClientError(u16),
    /// Timed out before the first acknowledgement: a spoofed or vanished requester.
    #[error("client never answered")]
    NeverAnswered,
    #[error("client stopped answering")]
    StoppedAnswering,
    /// The client broke the protocol; it got this ERROR text.
    #[error("{0}")]
    Protocol(String),
    /// The file could not be read or the upstream's stream failed: the client got an ERROR,
    /// never a short final block.
    #[error("source failed: {0}")]
    Source(String),
}

/// Where the server gets file content: a directory, the cache, the miss path.
pub trait Source: Send + Sync + 'static {
    /// Whether `client` may be served at all. Asked before anything beyond the opcode is
    /// parsed, so a host outside the allow list costs a lookup and nothing more.
    fn allows(&self, _client: IpAddr) -> bool {
        true
    }

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
    /// Cap on a negotiated timeout (RFC 2349 allows 255 s).
    pub max_timeout: Duration,
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
            max_timeout: Duration::from_secs(5),
            retries: 6,
            drain: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    fn limits(&self) -> Limits {
        Limits {
            max_blksize: self.max_blksize,
            max_windowsize: self.max_windowsize,
            timeout: self.timeout,
            max_timeout: self.max_timeout.max(Duration::from_secs(1)),
            retries: self.retries,
        }
    }
}

/// A bound server: sockets are open (ports known) before [`Server::run`] starts serving.
pub struct Server {
    cfg: ServerConfig,
    sockets: Vec<Arc<UdpSocket>>,
}

/// Receive buffer asked for each listener: a boot storm's thousands of RRQs, or a flood of
/// junk beside them, arrive faster than one loaded core screens them, and a phone whose RRQ
/// the kernel drops waits out its own resend timer (curl: seconds). 4 MiB holds about 5,000
/// small datagrams; the kernel caps the request at `net.core.rmem_max`.
const LISTEN_BUFFER: usize = 4 << 20;

/// Event-loop threads: one per core, at most four (more buys nothing for a lock-step
/// protocol whose cost is per datagram, and each loop is a thread the unit must allow).
pub fn loop_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

impl Server {
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        crate::net::raise_fd_limit();
        let mut sockets = Vec::new();
        for addr in &cfg.listen {
            let sock = bind_udp(*addr, LISTEN_BUFFER)
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
        // Each loop shares one transfer port per listener address among its transfers.
        let addrs: Vec<IpAddr> = self.local_addrs().iter().map(|a| a.ip()).collect();
        let engine = Engine::start(loop_threads(), tokio::runtime::Handle::current(), &addrs)?;
        let drain = self.cfg.drain;
        let door = Arc::new(Door {
            limits: self.cfg.limits(),
            source,
            engine,
            in_progress: Mutex::new(HashSet::new()),
            opening: AtomicUsize::new(0),
        });
        let mut listeners = tokio::task::JoinSet::new();
        for sock in &self.sockets {
            let (sock, door) = (sock.clone(), door.clone());
            listeners.spawn(async move {
                // Requests longer than MAX_REQUEST_LEN are refused unread: a larger buffer
                // only tells us that one was longer.
                let mut buf = vec![0u8; MAX_REQUEST_LEN + 1];
                // Transfers answer from a new port on the listener's address (a new TID,
                // RFC 1350 §4).
                let local = sock
                    .local_addr()
                    .map(|a| SocketAddr::new(a.ip(), 0))
                    .unwrap_or_else(|_| "0.0.0.0:0".parse().unwrap());
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, peer)) => door.datagram(&sock, local, peer, &buf[..n]).await,
                        // ICMP errors surface here on some systems; keep listening.
                        Err(e) => debug!("TFTP listener recv error: {e}"),
                    }
                }
            });
        }
        shutdown.await;
        // Stop answering new requests at once: the ports are free for a restarted server
        // while the transfers in flight finish on their transfer ports.
        listeners.abort_all();
        while listeners.join_next().await.is_some() {}
        drop(self.sockets);
        let deadline = Instant::now() + drain;
        let busy = || door.engine.active() + door.opening.load(Ordering::Acquire);
        if busy() > 0 {
            info!(
                "shutting down: waiting up to {drain:?} for {} TFTP transfer(s)",
                busy()
            );
        }
        while busy() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if busy() > 0 {
            warn!("{} TFTP transfer(s) cut short by shutdown", busy());
        }
        door.engine.stop();
        Ok(())
    }
}

/// The shared state of the request path.
struct Door<S> {
    limits: Limits,
    source: Arc<S>,
    engine: Engine,
    /// Requests being served, as (client TID, exact request bytes): a resend of one of these
    /// is absorbed by the transfer already answering it (RFC 1350 leaves duplicates to the
    /// server; answering twice doubles the work in a storm). Bounded by the transfers and
    /// admission's queue, which bound everything that holds an entry.
    in_progress: Mutex<HashSet<(SocketAddr, Bytes)>>,
    /// Requests between the door and the engine (waiting for admission or content).
    opening: AtomicUsize,
}

/// Removes a request from [`Door::in_progress`] when its transfer (or refusal) is over.
struct InProgress<S: Source> {
    door: Arc<Door<S>>,
    key: Option<(SocketAddr, Bytes)>,
}

impl<S: Source> Drop for InProgress<S> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.door.in_progress.lock().unwrap().remove(&k);
        }
    }
}

/// Ends the "opening" count of a request on every path out of [`Door::serve`].
struct Opening<'a>(&'a AtomicUsize);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A held ticket plus the request's in-progress entry: both live exactly as long as the
/// transfer.
struct Held<S: Source> {
    ticket: Box<dyn Ticket>,
    _entry: InProgress<S>,
}

impl<S: Source> Ticket for Held<S> {
    fn on_probation(&mut self, displace: Box<dyn FnOnce() + Send>) {
        self.ticket.on_probation(displace)
    }
    fn proven(&mut self) {
        self.ticket.proven()
    }
}

/// Sends a fixed ERROR from the request port; a failure only means the client asks again.
async fn refuse(sock: &UdpSocket, peer: SocketAddr, e: ErrorPacket) {
    if let Err(err) = sock.send_to(&e.encode(), peer).await {
        debug!(client = %peer, "send failed: {err}");
    }
}

impl<S: Source> Door<S> {
    /// Screens one datagram on a listener, cheapest check first.
    async fn datagram(
        self: &Arc<Self>,
        sock: &Arc<UdpSocket>,
        local: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) {
        let arrived = Instant::now();
        if data.len() < 4 {
            // Not even an opcode and a name: nothing to answer.
            return;
        }
        let op = u16::from_be_bytes([data[0], data[1]]);
        if op != OP_RRQ && op != OP_WRQ {
            // A stray DATA/ACK/ERROR (or garbage) on the request port belongs to no transfer;
            // answering would only reflect traffic at whoever the source claims to be.
            debug!(client = %peer, "ignored opcode {op} on the request port");
            return;
        }
        if !self.source.allows(peer.ip()) {
            crate::metrics::global().request("tftp", "denied");
            info!(client = %peer, "refused: client outside access.allow");
            return refuse(sock, peer, OpenError::Denied.reply()).await;
        }
        if op == OP_WRQ {
            info!(client = %peer, "write request refused: read-only server");
            return refuse(
                sock,
                peer,
                ErrorPacket::new(ErrorCode::AccessViolation, "read-only server"),
            )
            .await;
        }
        if data.len() > MAX_REQUEST_LEN {
            info!(client = %peer, bytes = data.len(), "refused: request longer than 512 bytes");
            return refuse(
                sock,
                peer,
                ErrorPacket::new(ErrorCode::IllegalOperation, "request too long"),
            )
            .await;
        }
        let pkt = match Packet::decode(data) {
            Ok(p) => p,
            Err(e) => {
                info!(client = %peer, "bad TFTP request: {}", e.to_string().escape_debug());
                return refuse(sock, peer, e.reply()).await;
            }
        };
        let Packet::Rrq { filename, mode, .. } = &pkt else {
            return;
        };
        let Some(mode) = Mode::from_wire(mode) else {
            info!(client = %peer, mode = %mode.escape_debug(), "refused: unsupported mode");
            return refuse(
                sock,
                peer,
                ErrorPacket::new(ErrorCode::IllegalOperation, "unsupported mode"),
            )
            .await;
        };
        let name = match FileName::parse(filename) {
            Ok(n) => n,
            Err(e) => {
                info!(client = %peer, name = %filename.escape_debug(), "refused: {e}");
                let reply = match e {
                    NameError::Empty => OpenError::NotFound.reply(),
                    _ => ErrorPacket::new(ErrorCode::AccessViolation, "access violation"),
                };
                return refuse(sock, peer, reply).await;
            }
        };
        let key = (peer, Bytes::copy_from_slice(data));
        if !self.in_progress.lock().unwrap().insert(key.clone()) {
            debug!(client = %peer, name = %name, "resent request absorbed by its transfer");
            crate::metrics::global().request("tftp", "duplicate");
            return;
        }
        let entry = InProgress {
            door: self.clone(),
            key: Some(key),
        };
        self.opening.fetch_add(1, Ordering::AcqRel);
        let (door, sock) = (self.clone(), sock.clone());
        tokio::spawn(async move {
            let _opening = Opening(&door.opening);
            let req = ReadRequest {
                name,
                client: peer,
                mode,
                arrived,
            };
            door.serve(&sock, local, req, pkt, entry).await
        });
    }

    /// Opens the content (admission waits here), decides the options and hands the transfer
    /// to the engine.
    async fn serve(
        &self,
        listener: &UdpSocket,
        local: SocketAddr,
        req: ReadRequest,
        rrq: Packet,
        entry: InProgress<S>,
    ) {
        let started = Instant::now();
        let (peer, mode, name) = (req.client, req.mode, req.name.clone());
        let mut report = TransferReport {
            client: peer,
            name: name.to_string(),
            bytes: 0,
            duration: Duration::ZERO,
            first_data: None,
            origin: None,
            outcome: Ok(()),
        };
        let content = match self.source.open(req).await {
            Ok(c) => c,
            Err(e) => {
                debug!(client = %peer, name = %name, "answered {e}");
                refuse(listener, peer, e.reply()).await;
                report.duration = started.elapsed();
                report.outcome = Err(TransferError::Refused(e));
                self.source.finished(&report);
                return;
            }
        };
        report.origin = Some(content.found.origin.clone());
        let (params, oack) = match accept(&rrq, &self.limits, content.found.size) {
            Ok(a) => a,
            Err(e) => return refuse(listener, peer, e).await,
        };
        let probation = self.limits.probation(&params);
        let sender = Sender::on_probation(params, oack, Some(probation), Instant::now());
        self.engine.start_transfer(Job {
            local,
            peer,
            sender,
            body: content.found.body,
            size: content.found.size,
            mode,
            ticket: Box::new(Held {
                ticket: content.ticket,
                _entry: entry,
            }),
            report,
            started,
            source: self.source.clone(),
        });
    }
}
