//! The TFTP server's front door: listens on every configured address, screens each datagram
//! (opcode, then the source's allow list, then size, and only then parsing), absorbs a resent
//! request for a transfer already in progress, asks the [`Source`] for content (admission and
//! its queue happen there), decides the options ([`accept`]), and only then starts the
//! transfer on the [`Engine`]'s event loops, which answer from a port other than the
//! listener's (a new TID, RFC 1350 §4: a loop's shared transfer port, or a port of its own).
//!
//! The listeners are read by the event loops themselves: a request whose content is at hand
//! (an override, a cache hit, a name known to be missing) and whose client is admitted at
//! once is answered or started in the loop that read it, without a task, a channel or a
//! wake-up in between (a boot storm is thousands of these). A request that waits for a slot
//! in admission's queue is started by the loop whose transfer frees one, again without a task
//! ([`Source::open_queued`]); only a request that waits for an upstream becomes a task on the
//! runtime, which hands the transfer to a loop when its content is there.
//!
//! Everything said to a client before a transfer starts is a short fixed ERROR
//! ([`ErrorPacket`]); what went wrong, with the client's address, goes to the log.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use thiserror::Error;
use tracing::{debug, info, warn};

use super::engine::{Engine, Front, Job, Step};
pub use super::packet::Mode;
use super::packet::{DecodeError, ErrorCode, ErrorPacket, Packet, MAX_REQUEST_LEN, OP_RRQ, OP_WRQ};
use super::transfer::{accept, Limits, Sender};
use crate::content::{Found, Origin};
use crate::name::{FileName, NameError};
use crate::net::{bind_udp_std, recv_buffer_shortfall};

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

/// What [`Source::open_now`] could do for a request without waiting.
pub enum Now {
    /// Answered: the content, or why not.
    Answer(Result<Content, OpenError>),
    /// The content is at hand but every slot is taken: [`Source::open_queued`] waits for one
    /// without a task.
    Full,
    /// The content must be fetched: [`Source::open`], in a task.
    Wait,
}

/// What a request that waited for admission is handed: its content, or why not.
pub type Opened = Box<dyn FnOnce(Result<Content, OpenError>) + Send>;

/// Where the server gets file content: a directory, the cache, the miss path.
pub trait Source: Send + Sync + 'static {
    /// Whether `client` may be served at all. Asked before anything beyond the opcode is
    /// parsed, so a host outside the allow list costs a lookup and nothing more.
    fn allows(&self, _client: IpAddr) -> bool {
        true
    }

    fn open(&self, req: ReadRequest) -> BoxFuture<'_, Result<Content, OpenError>>;

    /// [`open`](Self::open) when it can answer without waiting (content at hand, client
    /// admitted at once): asked first, on the event loop that read the request.
    fn open_now(&self, _req: &ReadRequest) -> Now {
        Now::Wait
    }

    /// A request [`open_now`](Self::open_now) found [`Now::Full`]: calls `then` with its
    /// content once it is admitted (or its refusal), from whichever thread that happens on.
    /// The default waits in a task on `runtime` running [`open`](Self::open).
    fn open_queued(
        self: Arc<Self>,
        req: ReadRequest,
        runtime: &tokio::runtime::Handle,
        then: Opened,
    ) {
        runtime.spawn(async move { then(self.open(req).await) });
    }

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

/// Stops the engine's loops however [`Server::run`] ends (returned or dropped).
struct StopOnDrop(Engine);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
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
            let sock = bind_udp_std(*addr, LISTEN_BUFFER)
                .map_err(|e| io::Error::new(e.kind(), format!("TFTP listen {addr}: {e}")))?;
            if let Some(granted) = recv_buffer_shortfall(&sock, LISTEN_BUFFER) {
                warn!(
                    "TFTP listen {addr}: receive buffer {} KiB, not the {} KiB asked \
                     (net.core.rmem_max caps it): in a boot storm, requests beyond it are \
                     dropped and each of those phones waits to resend; the package's \
                     /usr/lib/sysctl.d/60-branchtftp.conf raises the cap",
                    granted >> 10,
                    LISTEN_BUFFER >> 10
                );
            }
            sock.set_nonblocking(true)?;
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
        let locals = self.local_addrs();
        let addrs: Vec<IpAddr> = locals.iter().map(|a| a.ip()).collect();
        let drain = self.cfg.drain;
        let limits = self.cfg.limits();
        let runtime = tokio::runtime::Handle::current();
        let mut door = None;
        let engine = Engine::start(
            loop_threads(),
            runtime.clone(),
            &addrs,
            &self.sockets,
            |engine| {
                let d = Arc::new(Door {
                    limits,
                    source,
                    engine,
                    runtime,
                    // Transfers answer from a new port on the listener's address (a new TID,
                    // RFC 1350 §4).
                    locals: locals.iter().map(|a| SocketAddr::new(a.ip(), 0)).collect(),
                    listeners: RwLock::new(self.sockets.clone()),
                    in_progress: Mutex::new(HashSet::new()),
                    opening: AtomicUsize::new(0),
                });
                door = Some(d.clone());
                d
            },
        )?;
        let _stop = StopOnDrop(engine.clone());
        let door = door.expect("built by Engine::start");
        shutdown.await;
        // Stop answering new requests at once: the ports are free for a restarted server
        // while the transfers in flight finish on their transfer ports.
        let closing = engine.clone();
        let _ =
            tokio::task::spawn_blocking(move || closing.close_listeners(Duration::from_secs(2)))
                .await;
        door.listeners.write().unwrap().clear();
        drop(self.sockets);
        let deadline = Instant::now() + drain;
        let busy = || engine.active() + door.opening.load(Ordering::Acquire);
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
        Ok(())
    }
}

/// The shared state of the request path.
struct Door<S> {
    limits: Limits,
    source: Arc<S>,
    engine: Engine,
    /// Where requests that must wait run.
    runtime: tokio::runtime::Handle,
    /// Listener `k`'s address with port 0: its transfers' ports are new ones on that address.
    locals: Vec<SocketAddr>,
    /// The listeners, for answers given after a wait on the runtime (emptied at shutdown).
    listeners: RwLock<Vec<Arc<UdpSocket>>>,
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

/// Sends a fixed ERROR from the request port; a failure (a full buffer) only means the client
/// asks again.
fn refuse(sock: &UdpSocket, peer: SocketAddr, e: ErrorPacket) {
    if let Err(err) = sock.send_to(&e.encode(), peer) {
        debug!(client = %peer, "send failed: {err}");
    }
}

/// A fixed ERROR for the listener to send.
fn reply(e: ErrorPacket) -> Step {
    Step::Reply(e.encode())
}

impl<S: Source> Front for Door<S> {
    /// Screens one datagram read from listener `listener`, cheapest check first; starts its
    /// transfer at once when the source can answer without waiting, else hands it to the
    /// runtime.
    fn request(
        self: Arc<Self>,
        listener: usize,
        peer: SocketAddr,
        data: &[u8],
        arrived: Instant,
    ) -> Step {
        if data.len() < 4 {
            // Not even an opcode and a name: nothing to answer.
            return Step::Nothing;
        }
        let op = u16::from_be_bytes([data[0], data[1]]);
        if op != OP_RRQ && op != OP_WRQ {
            // A stray DATA/ACK/ERROR (or garbage) on the request port belongs to no transfer;
            // answering would only reflect traffic at whoever the source claims to be.
            debug!(client = %peer, "ignored opcode {op} on the request port");
            return Step::Nothing;
        }
        if !self.source.allows(peer.ip()) {
            crate::metrics::global().request("tftp", "denied");
            info!(client = %peer, "refused: client outside access.allow");
            return reply(OpenError::Denied.reply());
        }
        if op == OP_WRQ {
            info!(client = %peer, "write request refused: read-only server");
            return reply(ErrorPacket::new(
                ErrorCode::AccessViolation,
                "read-only server",
            ));
        }
        if data.len() > MAX_REQUEST_LEN {
            info!(client = %peer, bytes = data.len(), "refused: request longer than 512 bytes");
            return reply(ErrorPacket::new(
                ErrorCode::IllegalOperation,
                "request too long",
            ));
        }
        let pkt = match Packet::decode(data) {
            Ok(p) => p,
            Err(e) => {
                info!(client = %peer, "bad TFTP request: {}", e.to_string().escape_debug());
                return reply(e.reply());
            }
        };
        let Packet::Rrq { filename, mode, .. } = &pkt else {
            return Step::Nothing;
        };
        let Some(mode) = Mode::from_wire(mode) else {
            info!(client = %peer, mode = %mode.escape_debug(), "refused: unsupported mode");
            return reply(ErrorPacket::new(
                ErrorCode::IllegalOperation,
                "unsupported mode",
            ));
        };
        let name = match FileName::parse(filename) {
            Ok(n) => n,
            Err(e) => {
                info!(client = %peer, name = %filename.escape_debug(), "refused: {e}");
                return reply(match e {
                    NameError::Empty => OpenError::NotFound.reply(),
                    _ => ErrorPacket::new(ErrorCode::AccessViolation, "access violation"),
                });
            }
        };
        let key = (peer, Bytes::copy_from_slice(data));
        if !self.in_progress.lock().unwrap().insert(key.clone()) {
            debug!(client = %peer, name = %name, "resent request absorbed by its transfer");
            crate::metrics::global().request("tftp", "duplicate");
            return Step::Nothing;
        }
        let entry = InProgress {
            door: self.clone(),
            key: Some(key),
        };
        let req = ReadRequest {
            name,
            client: peer,
            mode,
            arrived,
        };
        let local = self.locals[listener];
        let queued = match self.source.open_now(&req) {
            Now::Answer(opened) => {
                return match self.start(local, &req, arrived, opened, &pkt, entry) {
                    Ok(job) => Step::Start(Box::new(job)),
                    Err(e) => reply(e),
                };
            }
            Now::Full => true,
            Now::Wait => false,
        };
        self.opening.fetch_add(1, Ordering::AcqRel);
        let door = self.clone();
        let then: Opened = {
            let req = req.clone();
            Box::new(move |opened| door.opened(listener, req, opened, pkt, entry))
        };
        if queued {
            // Admission calls back from the thread that frees a slot: a loop, which starts
            // the transfer itself ([`Engine::start_transfer`]).
            self.source.clone().open_queued(req, &self.runtime, then);
        } else {
            let source = self.source.clone();
            self.runtime
                .spawn(async move { then(source.open(req).await) });
        }
        Step::Nothing
    }
}

impl<S: Source> Door<S> {
    /// A request that waited (for admission or content) has its answer: its transfer goes to
    /// a loop, or its refusal leaves from the listener that read it.
    fn opened(
        self: Arc<Self>,
        listener: usize,
        req: ReadRequest,
        opened: Result<Content, OpenError>,
        rrq: Packet,
        entry: InProgress<S>,
    ) {
        let _opening = Opening(&self.opening);
        let local = self.locals[listener];
        match self.start(local, &req, req.arrived, opened, &rrq, entry) {
            Ok(job) => self.engine.start_transfer(job),
            Err(e) => {
                let sock = self.listeners.read().unwrap().get(listener).cloned();
                if let Some(sock) = sock {
                    refuse(&sock, req.client, e);
                }
            }
        }
    }

    /// The transfer for an opened request, options decided; or the ERROR that refuses it (a
    /// refusal by the source is reported to it).
    fn start(
        &self,
        local: SocketAddr,
        req: &ReadRequest,
        started: Instant,
        opened: Result<Content, OpenError>,
        rrq: &Packet,
        entry: InProgress<S>,
    ) -> Result<Job, ErrorPacket> {
        let mut report = TransferReport {
            client: req.client,
            name: req.name.to_string(),
            bytes: 0,
            duration: Duration::ZERO,
            first_data: None,
            origin: None,
            outcome: Ok(()),
        };
        let content = match opened {
            Ok(c) => c,
            Err(e) => {
                debug!(client = %req.client, name = %req.name, "answered {e}");
                report.duration = started.elapsed();
                report.outcome = Err(TransferError::Refused(e));
                self.source.finished(&report);
                return Err(e.reply());
            }
        };
        report.origin = Some(content.found.origin.clone());
        let (params, oack) = accept(rrq, &self.limits, content.found.size)?;
        let probation = self.limits.probation(&params);
        let sender = Sender::on_probation(params, oack, Some(probation), Instant::now());
        Ok(Job {
            local,
            peer: req.client,
            sender,
            body: content.found.body,
            size: content.found.size,
            mode: req.mode,
            ticket: Box::new(Held {
                ticket: content.ticket,
                _entry: entry,
            }),
            report,
            started,
            source: self.source.clone(),
        })
    }
}
