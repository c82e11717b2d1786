//! The transfer engine: a few event-loop threads (one per core, at most four) read the
//! listeners and drive every transfer's datagrams and timers. A transfer is a small state (its port, its
//! [`Sender`](super::transfer::Sender), its [`Feed`]) in one loop's table, not a thread or a
//! task, so a boot storm of thousands of transfers costs memory per transfer, not threads.
//!
//! Why our own loops rather than tokio tasks: lock-step TFTP is bound by the latency from an
//! ACK's arrival to the next DATA's departure. A loop thread sleeping in epoll wakes on the
//! ACK, reads it, feeds the state machine, reads the next block with `pread` and sends it, all
//! without a scheduler or a channel in between: the same single wake-up that made the earlier
//! thread-per-transfer driver beat tftpd-hpa (benches/tftp_engine.sh), without its thread per
//! transfer (issue 12).
//!
//! Requests: every loop watches every listener with `EPOLLEXCLUSIVE` (the kernel wakes one
//! loop per request, not all), reads what is waiting with `recvmmsg`, and asks the request
//! path ([`Front`], the server's door) about each: a fixed ERROR to send from the listener, a
//! transfer to start on this loop, or nothing (the door handed the request to the runtime to
//! wait for admission's queue or an upstream; it comes back through
//! [`Engine::start_transfer`]).
//!
//! Ports (RFC 1350 §4 TIDs): each loop has one shared transfer port per listener address, its
//! own ephemeral port (never 69), and a transfer's datagrams are told apart there by the
//! client's address and port. A turn reads every datagram waiting on a shared port with one
//! `recvmmsg` and sends what the turn produced with one `sendmmsg` at its end
//! ([`datagrams`](super::datagrams)): in a storm, many phones' ACKs and DATA blocks per
//! system call instead of two or three system calls per block, and no socket to open, bind,
//! watch and close per transfer. A lone lock-step transfer still gets its next block in the
//! turn its ACK arrived. A client address and port that already has a transfer on this loop's
//! shared port (a phone asking again while its previous transfer lingers) gets a port of its
//! own for the new one, as every transfer had before.
//!
//! What sharing a port changes for an attacker who is not on the path: to end or steer a
//! phone's transfer (a spoofed ERROR or ACK) or to slip a DATA block into its download, they
//! must now guess the phone's address and port only, since the server's port of a transfer
//! is the same for every transfer of a loop and any client can learn it. With a port per
//! transfer they also had to guess the server's (about 15 bits more). TFTP has no
//! authentication either way: an attacker on the path or on the phones' VLAN sees both ports,
//! and phones protect their configuration with signed files (ITL/CTL), not with port numbers.
//! A datagram from an address and port without a transfer on the port is answered ERROR 5 and
//! touches no transfer, as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::debug;

use super::datagrams::{send_one, Inbox, Outbox, BATCH};
use super::feed::{read_ahead, Feed};
use super::packet::{ErrorCode, ErrorPacket, Mode, Packet};
use super::server::{Source, Ticket, TransferError, TransferReport};
use super::shared::SharedFiles;
use super::transfer::{foreign_tid, unknown_tid, Datagram, Sender, Status};
use crate::content::Body;
use crate::net::{bind_udp_std, descriptors_exhausted, out_of_descriptors};

const WAKE: Token = Token(usize::MAX);
/// Shared port `k` of a loop is watched as `Token(SHARED - k)`, listener `k` as
/// `Token(LISTEN - k)`; transfers' own sockets use their table index, which never comes near.
const SHARED: usize = usize::MAX - 1;
const LISTEN: usize = usize::MAX - (1 << 16);

/// Buffers asked for a shared port: a storm's ACKs from thousands of phones arrive together,
/// and a turn's DATA blocks leave together (the kernel caps this at net.core.{r,w}mem_max).
const SHARED_BUFFER: usize = 4 << 20;

/// A transfer ready to run: options decided, content open.
pub(crate) struct Job {
    /// The listener's address with port 0: the transfer's port is a new one on the same
    /// address (a new TID, RFC 1350 §4), shared or its own.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub sender: Sender,
    pub body: Body,
    pub size: Option<u64>,
    pub mode: Mode,
    /// The admission slot and anything else held for the transfer's life.
    pub ticket: Box<dyn Ticket>,
    /// Filled in (bytes, duration, outcome) when the transfer ends, then handed to `source`.
    pub report: TransferReport,
    pub started: Instant,
    pub source: Arc<dyn Source>,
}

/// What the request path decided about one datagram read from a listener.
pub(crate) enum Step {
    /// Nothing to send (ignored, absorbed, or handed to the runtime to wait for content).
    Nothing,
    /// A fixed ERROR, sent from the listener.
    Reply(Bytes),
    /// Content is open and the options decided: the transfer starts on this loop.
    Start(Box<Job>),
}

/// The request path as the loops see it: the server's screening, duplicate suppression,
/// admission and content lookup ([`Door`](super::server)), asked for each request a loop
/// reads from a listener. What cannot be answered at once (a queued admission, an upstream
/// miss) goes to the runtime and comes back through [`Engine::start_transfer`].
pub(crate) trait Front: Send + Sync {
    fn request(
        self: Arc<Self>,
        listener: usize,
        peer: SocketAddr,
        data: &[u8],
        arrived: Instant,
    ) -> Step;
}

enum Cmd {
    Start(Box<Job>),
    /// Stop reading the listeners and let their sockets go (shutdown: the port is free for a
    /// restarted server while transfers finish); answered when done.
    CloseListeners(mpsc::Sender<()>),
    /// A stream feeding transfer `(index, generation)` has a new chunk.
    Data(usize, u64),
    /// End transfer `(index, generation)` now: displaced while still unproven.
    Cancel(usize, u64),
    Stop,
}

thread_local! {
    /// On a loop's thread: its engine (the address of its [`EngineInner`]) and its index.
    static ON_LOOP: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

/// A way to reach one loop from any thread.
#[derive(Clone)]
struct Mailbox {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<Waker>,
    /// Set by the loop just before it sleeps in `poll`: only then does a command need the
    /// waker (a system call and a turn of its own); a busy loop reads its mail before sleeping.
    asleep: Arc<AtomicBool>,
}

impl Mailbox {
    fn send(&self, cmd: Cmd) {
        // SeqCst pairs with the loop's store-then-read in `Loop::run`: either this sees the
        // loop asleep and wakes it, or the loop's read after its store sees the command.
        if self.tx.send(cmd).is_ok() && self.asleep.swap(false, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }
}

/// The running loops; clones reach the same loops.
#[derive(Clone)]
pub(crate) struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    loops: Vec<Mailbox>,
    next: AtomicUsize,
    active: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts `threads` loops, each with a shared transfer port on every address of
    /// `shared_on` (transfers for other addresses get ports of their own), each reading
    /// requests from every socket of `listeners` (the kernel wakes one loop per request:
    /// `EPOLLEXCLUSIVE`) and asking `front` what to do with them; `front` is built with the
    /// engine it hands waiting requests back to. Streams are read on `runtime`.
    pub fn start(
        threads: usize,
        runtime: tokio::runtime::Handle,
        shared_on: &[IpAddr],
        listeners: &[Arc<std::net::UdpSocket>],
        front: impl FnOnce(Engine) -> Arc<dyn Front>,
    ) -> io::Result<Engine> {
        let active = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(SharedFiles::default());
        let mut loops = Vec::new();
        let mut mailboxes = Vec::new();
        for _ in 0..threads.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let ports = shared_on
                .iter()
                .enumerate()
                .map(|(k, ip)| SharedPort::open(*ip, &poll, Token(SHARED - k)))
                .collect::<io::Result<Vec<_>>>()?;
            let listeners = listeners
                .iter()
                .enumerate()
                .map(|(k, sock)| Listener::watch(sock.clone(), &poll, Token(LISTEN - k)))
                .collect::<io::Result<Vec<_>>>()?;
            let (tx, rx) = mpsc::channel();
            let mailbox = Mailbox {
                tx,
                waker,
                asleep: Arc::new(AtomicBool::new(false)),
            };
            mailboxes.push(mailbox.clone());
            loops.push((poll, rx, mailbox, ports, listeners));
        }
        let engine = Engine {
            inner: Arc::new(EngineInner {
                loops: mailboxes,
                next: AtomicUsize::new(0),
                active: active.clone(),
            }),
        };
        let front = front(engine.clone());
        for (i, (poll, rx, mailbox, ports, listeners)) in loops.into_iter().enumerate() {
            let mut l = Loop {
                shared: shared.clone(),
                poll,
                rx,
                held: None,
                mailbox,
                runtime: runtime.clone(),
                active: active.clone(),
                front: front.clone(),
                listeners,
                ports,
                table: Vec::new(),
                free: Vec::new(),
                timers: BinaryHeap::new(),
                read_ahead_due: Vec::new(),
                generation: 0,
                spare_inbox: None,
            };
            let on = (Arc::as_ptr(&engine.inner) as usize, i);
            std::thread::Builder::new()
                .name(format!("tftp-loop-{i}"))
                .spawn(move || {
                    ON_LOOP.with(|c| c.set(Some(on)));
                    l.run()
                })?;
        }
        Ok(engine)
    }

    /// Transfers running or handed over and not yet finished.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Hands a transfer to a loop: the one calling, when a loop calls (admission hands a freed
    /// slot to a queued request on the loop whose transfer freed it: the loop is awake and
    /// reads its mail before it sleeps, so nobody is woken); else the next (round robin).
    pub fn start_transfer(&self, job: Job) {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        let loops = &self.inner.loops;
        let id = Arc::as_ptr(&self.inner) as usize;
        let i = ON_LOOP
            .with(|on| on.get())
            .filter(|(engine, _)| *engine == id)
            .map(|(_, i)| i)
            .unwrap_or_else(|| self.inner.next.fetch_add(1, Ordering::Relaxed) % loops.len());
        loops[i].send(Cmd::Start(Box::new(job)));
    }

    /// Stops every loop reading the listeners; returns once none holds a listener's socket
    /// (or after `wait`).
    pub fn close_listeners(&self, wait: Duration) {
        let (tx, rx) = mpsc::channel();
        for mailbox in &self.inner.loops {
            mailbox.send(Cmd::CloseListeners(tx.clone()));
        }
        let deadline = Instant::now() + wait;
        for _ in &self.inner.loops {
            if rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                return;
            }
        }
    }

    /// Stops the loops; transfers still running end where they are (their slots are freed).
    pub fn stop(&self) {
        for mailbox in &self.inner.loops {
            mailbox.send(Cmd::Stop);
        }
    }
}

/// A listener as one loop watches it: shared by every loop, each woken for its own requests.
struct Listener {
    sock: Arc<std::net::UdpSocket>,
    /// What this loop turn answers from the listener (fixed ERRORs).
    outbox: Outbox,
}

impl Listener {
    fn watch(sock: Arc<std::net::UdpSocket>, poll: &Poll, token: Token) -> io::Result<Listener> {
        // mio has no EPOLLEXCLUSIVE: registered on the loop's epoll directly, level-triggered,
        // so one loop is woken per datagram rather than all of them (a thundering herd of
        // system calls that find nothing); mio reads the token back from the event's data.
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: token.0 as u64,
        };
        // SAFETY: both descriptors are open and owned by live values; `ev` is a valid event.
        let r = unsafe {
            libc::epoll_ctl(
                poll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                &mut ev,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener {
            sock,
            outbox: Outbox::default(),
        })
    }

    fn unwatch(&self, poll: &Poll) {
        // SAFETY: as in `watch`; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                poll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.sock.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
    }
}

/// Sends `datagram` to `peer` through `port`: at once from an own socket, at the end of the
/// turn from a shared port. A full send buffer drops it; the retransmission timer recovers it.
fn transmit(ports: &mut [SharedPort], port: &Port, peer: SocketAddr, datagram: Datagram) {
    match port {
        Port::Shared(k) => ports[*k].outbox.push_datagram(datagram, peer),
        Port::Own(sock) => {
            if let Err(e) = send_one(sock.as_raw_fd(), &datagram, &peer.into()) {
                debug!(client = %peer, "send failed: {e}");
            }
        }
    }
}

/// One loop's shared transfer port on one listener address.
struct SharedPort {
    sock: UdpSocket,
    /// The address it was opened on (the listener's, port 0).
    ip: IpAddr,
    /// The transfers on this port, by their client's address and port.
    peers: HashMap<SocketAddr, usize>,
    /// What this loop turn sends from this port.
    outbox: Outbox,
}

impl SharedPort {
    fn open(ip: IpAddr, poll: &Poll, token: Token) -> io::Result<SharedPort> {
        let mut sock = UdpSocket::from_std(bind_udp_std(SocketAddr::new(ip, 0), SHARED_BUFFER)?);
        poll.registry()
            .register(&mut sock, token, Interest::READABLE)?;
        Ok(SharedPort {
            sock,
            ip,
            peers: HashMap::new(),
            outbox: Outbox::default(),
        })
    }
}

/// Where a transfer's datagrams go in and out.
enum Port {
    /// Shared port `k` of the loop.
    Shared(usize),
    /// A socket of its own (its client already had a transfer on the shared port).
    Own(UdpSocket),
}

struct Transfer {
    generation: u64,
    port: Port,
    peer: SocketAddr,
    sender: Sender,
    feed: Feed,
    ticket: Box<dyn Ticket>,
    report: TransferReport,
    started: Instant,
    source: Arc<dyn Source>,
    first_data: Option<Instant>,
    /// The deadline a timer entry is queued for (at most one live entry per transfer).
    timer: Option<Instant>,
    told_proven: bool,
    /// Aborts the stream's reader task when the transfer ends.
    reader: Option<tokio::task::AbortHandle>,
}

struct Loop {
    /// Small files read whole, shared by the transfers of every loop.
    shared: Arc<SharedFiles>,
    poll: Poll,
    rx: mpsc::Receiver<Cmd>,
    /// A command read by [`Loop::has_mail`] and not yet handled.
    held: Option<Cmd>,
    mailbox: Mailbox,
    runtime: tokio::runtime::Handle,
    active: Arc<AtomicUsize>,
    /// The request path, asked about every request read from `listeners`.
    front: Arc<dyn Front>,
    listeners: Vec<Listener>,
    ports: Vec<SharedPort>,
    table: Vec<Option<Transfer>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Transfers (index, generation) whose next block is read once the turn's datagrams left.
    read_ahead_due: Vec<(usize, u64)>,
    generation: u64,
    /// A second batch of receive buffers, for reading a shared port while a listener's batch
    /// is being handled ([`Loop::port_for`]); made when first needed.
    spare_inbox: Option<Inbox>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        // Clients send ACKs and ERRORs: a few hundred bytes at most; longer is garbage anyway.
        let mut buf = vec![0u8; 2048];
        let mut inbox = Inbox::default();
        loop {
            let mut timeout = self
                .next_timer()
                .map(|t| t.saturating_duration_since(Instant::now()));
            self.mailbox.asleep.store(true, Ordering::SeqCst);
            // Mail sent before the store above did not wake us: read it now, and do not sleep
            // before what it started is sent.
            if self.has_mail() {
                self.mailbox.asleep.store(false, Ordering::SeqCst);
                if !self.take_mail() {
                    return;
                }
                self.end_turn();
                timeout = Some(Duration::ZERO);
            }
            let polled = self.poll.poll(&mut events, timeout);
            self.mailbox.asleep.store(false, Ordering::SeqCst);
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("TFTP event loop: poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                let token = ev.token().0;
                if ev.token() == WAKE {
                    if !self.take_mail() {
                        return;
                    }
                } else if let Some(k) = SHARED.checked_sub(token).filter(|&k| k < self.ports.len())
                {
                    self.shared_readable(k, &mut inbox);
                } else if let Some(k) = LISTEN
                    .checked_sub(token)
                    .filter(|&k| k < self.listeners.len())
                {
                    self.requests(k, &mut inbox);
                } else {
                    self.readable(token, &mut buf);
                }
            }
            self.fire_timers();
            self.end_turn();
        }
    }

    /// Everything this turn produced leaves now, before the loop sleeps again; then the next
    /// blocks are read ahead (a failed read queues an ERROR, sent at once too).
    fn end_turn(&mut self) {
        self.flush();
        self.read_ahead();
        self.flush();
    }

    /// Reads ahead the next block of every transfer that sent one this turn.
    fn read_ahead(&mut self) {
        while let Some((i, generation)) = self.read_ahead_due.pop() {
            let Some(Some(t)) = self.table.get_mut(i) else {
                continue;
            };
            if t.generation != generation {
                continue;
            }
            if let Err(e) = t.feed.prefetch() {
                self.source_failed(i, e);
            }
        }
    }

    /// Whether a command is waiting (it is kept for [`take_mail`](Self::take_mail)).
    fn has_mail(&mut self) -> bool {
        if self.held.is_none() {
            self.held = self.rx.try_recv().ok();
        }
        self.held.is_some()
    }

    /// Handles every queued command; `false` on `Stop`.
    fn take_mail(&mut self) -> bool {
        while let Some(cmd) = self.held.take().or_else(|| self.rx.try_recv().ok()) {
            match cmd {
                Cmd::Start(job) => self.insert(*job),
                Cmd::Data(i, g) if self.is_live(i, g) => self.drive(i),
                Cmd::Cancel(i, g) if self.is_live(i, g) => {
                    self.finish(i, Err(TransferError::Displaced))
                }
                Cmd::Data(..) | Cmd::Cancel(..) => {}
                Cmd::CloseListeners(done) => {
                    for l in self.listeners.drain(..) {
                        l.unwatch(&self.poll);
                    }
                    let _ = done.send(());
                }
                Cmd::Stop => return false,
            }
        }
        true
    }

    fn is_live(&self, i: usize, generation: u64) -> bool {
        matches!(self.table.get(i), Some(Some(t)) if t.generation == generation)
    }

    fn insert(&mut self, job: Job) {
        let i = self.free.pop().unwrap_or_else(|| {
            self.table.push(None);
            self.table.len() - 1
        });
        self.generation += 1;
        let generation = self.generation;
        let port = match self.port_for(i, &job) {
            Ok(p) => p,
            Err(e) => return self.refuse_start(i, job, e),
        };
        let blksize = job.sender.params().blksize;
        let window = job.sender.params().windowsize as usize;
        let mut reader = None;
        let feed = match job.body {
            // A cache hit's in-use mark lives as long as the transfer: no eviction under it.
            Body::Cached(f) => {
                let f = *f;
                let size = job.size.unwrap_or(u64::MAX);
                Feed::file(
                    f.file,
                    size,
                    Box::new(f.guard),
                    job.mode,
                    blksize,
                    &self.shared,
                )
            }
            Body::Memory(data) => Feed::memory(data, job.mode, blksize),
            Body::Local(file) => {
                let size = job.size.unwrap_or(u64::MAX);
                Feed::file(file, size, Box::new(()), job.mode, blksize, &self.shared)
            }
            Body::Stream(r) => {
                // Read ahead about two windows, in chunks of 8-64 KiB: enough to never starve
                // the sender, small enough that thousands of transfers stay within a few MB.
                let chunk = (blksize as usize * window * 2).clamp(8 << 10, 64 << 10);
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let mailbox = self.mailbox.clone();
                let wake = move || mailbox.send(Cmd::Data(i, generation));
                reader = Some(
                    self.runtime
                        .spawn(read_ahead(r, chunk, tx, wake))
                        .abort_handle(),
                );
                Feed::stream(rx, job.mode, blksize)
            }
        };
        let mailbox = self.mailbox.clone();
        let mut ticket = job.ticket;
        ticket.on_probation(Box::new(move || mailbox.send(Cmd::Cancel(i, generation))));
        self.table[i] = Some(Transfer {
            generation,
            port,
            peer: job.peer,
            sender: job.sender,
            feed,
            ticket,
            report: job.report,
            started: job.started,
            source: job.source,
            first_data: None,
            timer: None,
            told_proven: false,
            reader,
        });
        self.drive(i);
    }

    /// The port for transfer `i`: the loop's shared port on the job's address, unless its
    /// client already has a transfer there (two transfers cannot share one pair of TIDs); then
    /// a socket of its own, as every transfer had before shared ports.
    fn port_for(&mut self, i: usize, job: &Job) -> io::Result<Port> {
        let ip = job.local.ip();
        if let Some(k) = self.ports.iter().position(|p| p.ip == ip) {
            if self.ports[k].peers.contains_key(&job.peer) {
                // A phone asks for its next file from the same port as soon as it has sent the
                // last ACK of the previous one: that ACK is most likely waiting on the shared
                // port, unread. Reading it ends the previous transfer and frees the pair of
                // TIDs, which saves this one a socket of its own.
                let mut inbox = self.spare_inbox.take().unwrap_or_default();
                self.shared_readable(k, &mut inbox);
                self.spare_inbox = Some(inbox);
            }
            if let std::collections::hash_map::Entry::Vacant(v) =
                self.ports[k].peers.entry(job.peer)
            {
                v.insert(i);
                return Ok(Port::Shared(k));
            }
        }
        let params = job.sender.params();
        let buffer = (params.blksize as usize + 4) * params.windowsize as usize * 2;
        // Below 64 KiB the kernel's default buffers (208 KiB on Linux) already hold it.
        let buffer = if buffer <= 64 * 1024 { 0 } else { buffer };
        let mut sock = UdpSocket::from_std(bind_udp_std(job.local, buffer)?);
        self.poll
            .registry()
            .register(&mut sock, Token(i), Interest::READABLE)?;
        Ok(Port::Own(sock))
    }

    /// A transfer that could not get a port: the client hears a fixed ERROR 0 from the shared
    /// port when there is one (rather than nothing: it would resend into the same failure for
    /// seconds), the slot is freed and the failure counted; running out of descriptors is
    /// logged once per burst.
    fn refuse_start(&mut self, i: usize, job: Job, e: io::Error) {
        if out_of_descriptors(&e) {
            descriptors_exhausted("TFTP transfer socket", &e);
        } else {
            tracing::warn!(client = %job.peer, "cannot open a transfer socket: {e}");
            crate::metrics::global().refused("start_failed");
        }
        if let Some(p) = self.ports.iter_mut().find(|p| p.ip == job.local.ip()) {
            let reply = super::server::OpenError::Unavailable.reply().encode();
            p.outbox.push(reply, job.peer);
        }
        self.free.push(i);
        self.active.fetch_sub(1, Ordering::AcqRel);
        let mut report = job.report;
        report.outcome = Err(TransferError::NotStarted(e.to_string()));
        drop(job.ticket);
        job.source.finished(&report);
    }

    /// A transfer's own socket is readable.
    fn readable(&mut self, i: usize, buf: &mut [u8]) {
        // Readiness is edge-triggered: read until the socket is empty. Each packet is answered
        // before the next read, so the read that finds the socket empty is off the ACK -> DATA
        // path (lock-step latency is the benchmark against tftpd-hpa).
        loop {
            let Some(Some(t)) = self.table.get_mut(i) else {
                return;
            };
            let Port::Own(sock) = &t.port else {
                return;
            };
            let (n, from) = match sock.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP port unreachable and the like: the client is gone or will retry.
                Err(e) => {
                    debug!(client = %t.peer, "recv: {e}");
                    continue;
                }
            };
            if let Some(e) = foreign_tid(t.peer, from) {
                let _ = sock.send_to(&e, from);
                continue;
            }
            self.datagram(i, &buf[..n]);
        }
    }

    /// Shared port `k` is readable: every datagram waiting is read, a batch per system call,
    /// and handed to the transfer of its sender.
    fn shared_readable(&mut self, k: usize, inbox: &mut Inbox) {
        loop {
            let fd = self.ports[k].sock.as_raw_fd();
            let n = match inbox.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("recv on a shared transfer port: {e}");
                    continue;
                }
            };
            for j in 0..n {
                let (data, from) = inbox.get(j);
                let Some(from) = from else { continue };
                match self.ports[k].peers.get(&from) {
                    Some(&i) => self.datagram(i, data),
                    // RFC 1350 §4: a datagram from an unknown TID is answered ERROR 5 and
                    // disturbs no transfer.
                    None => self.ports[k].outbox.push(unknown_tid(), from),
                }
            }
            // The batch's answers leave together, at once: a lone lock-step transfer's next
            // block goes out now, not after the rest of the turn.
            self.flush_port(k);
            self.read_ahead();
            // A short batch: the socket was empty when the call returned (a datagram arriving
            // since raises readiness again).
            if n < BATCH {
                return;
            }
        }
    }

    /// Listener `k` is readable: every request waiting is read, a batch per system call, and
    /// screened, answered or started here; transfers started here run on this loop.
    fn requests(&mut self, k: usize, inbox: &mut Inbox) {
        loop {
            let Some(l) = self.listeners.get(k) else {
                return;
            };
            let n = match inbox.recv(l.sock.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors surface here on some systems; keep listening.
                Err(e) => {
                    debug!("TFTP listener recv error: {e}");
                    continue;
                }
            };
            let arrived = Instant::now();
            for j in 0..n {
                let (data, from) = inbox.get(j);
                let Some(from) = from else { continue };
                match self.front.clone().request(k, from, data, arrived) {
                    Step::Nothing => {}
                    Step::Reply(e) => self.listeners[k].outbox.push(e, from),
                    Step::Start(job) => {
                        self.active.fetch_add(1, Ordering::AcqRel);
                        self.insert(*job);
                    }
                }
            }
            let l = &mut self.listeners[k];
            if l.outbox.len() > 0 {
                let (dropped, e) = l.outbox.flush(l.sock.as_raw_fd());
                if let Some(e) = e {
                    debug!("{dropped} answer(s) not sent from a listener: {e}");
                }
            }
            self.flush();
            self.read_ahead();
            if n < BATCH {
                return;
            }
        }
    }

    /// A datagram from transfer `i`'s client.
    fn datagram(&mut self, i: usize, data: &[u8]) {
        let Some(Some(t)) = self.table.get_mut(i) else {
            return;
        };
        match Packet::decode(data) {
            Ok(p) => t.sender.handle(&p, Instant::now()),
            Err(e) => {
                self.send(i, e.reply().encode());
                return self.finish(i, Err(TransferError::Malformed(e)));
            }
        }
        self.drive(i);
    }

    /// Sends one datagram to transfer `i`'s client (see [`transmit`]).
    fn send(&mut self, i: usize, datagram: Bytes) {
        if let Some(Some(t)) = self.table.get(i) {
            transmit(&mut self.ports, &t.port, t.peer, Datagram::whole(datagram));
        }
    }

    /// Sends what this turn queued on every shared port.
    fn flush(&mut self) {
        for k in 0..self.ports.len() {
            self.flush_port(k);
        }
    }

    fn flush_port(&mut self, k: usize) {
        let p = &mut self.ports[k];
        if p.outbox.len() == 0 {
            return;
        }
        let (dropped, e) = p.outbox.flush(p.sock.as_raw_fd());
        if let Some(e) = e {
            debug!("{dropped} datagram(s) not sent from a shared transfer port: {e}");
        }
    }

    /// Moves transfer `i` on as far as it can go now: blocks in, datagrams out, end or timer.
    fn drive(&mut self, i: usize) {
        let Some(Some(t)) = self.table.get_mut(i) else {
            return;
        };
        let now = Instant::now();
        while t.sender.wants_data() {
            match t.feed.try_next() {
                Ok(Some(block)) => t.sender.push_data(block, now),
                Ok(None) => break,
                Err(e) => return self.source_failed(i, e),
            }
        }
        while let Some(d) = t.sender.poll_datagram() {
            if t.first_data.is_none() && d.is_data() {
                t.first_data = Some(now);
            }
            transmit(&mut self.ports, &t.port, t.peer, d);
        }
        if !t.told_proven && t.sender.is_proven() {
            t.told_proven = true;
            t.ticket.proven();
        }
        let outcome = match t.sender.status() {
            Status::Active => None,
            Status::Done => Some(Ok(())),
            Status::PeerError {
                quiet: true,
                code,
                message,
            } => {
                debug!(client = %t.peer, "client ended after OACK with ERROR {}: {}", code.as_u16(), message.escape_debug());
                Some(Ok(()))
            }
            Status::PeerError { code, .. } => Some(Err(TransferError::ClientError(code.as_u16()))),
            Status::TimedOut if !t.sender.is_proven() => Some(Err(TransferError::NeverAnswered)),
            Status::TimedOut => Some(Err(TransferError::StoppedAnswering)),
            Status::Protocol(m) => Some(Err(TransferError::Protocol(m.clone()))),
        };
        if let Some(outcome) = outcome {
            self.finish(i, outcome);
            return;
        }
        // The next block is read once this turn's datagrams have left, while the client is busy
        // acknowledging this one, so the ACK finds it ready and is answered without a read
        // (tftpd-hpa reads ahead the same way).
        self.read_ahead_due.push((i, t.generation));
        if let Some(d) = t.sender.poll_timeout() {
            if t.timer.is_none_or(|queued| d < queued) {
                t.timer = Some(d);
                self.timers.push(Reverse((d, i, t.generation)));
            }
        }
    }

    /// A failed source (a truncated upstream, an unreadable file) is an ERROR for the client,
    /// never a short final DATA that would make a truncated file look complete.
    fn source_failed(&mut self, i: usize, e: io::Error) {
        let e2 = ErrorPacket::new(ErrorCode::NotDefined, "transfer failed").encode();
        self.send(i, e2);
        self.finish(i, Err(TransferError::Source(e.to_string())));
    }

    /// The earliest deadline queued for a live transfer. Entries of transfers that ended (or
    /// that a newer entry replaced) are dropped here rather than woken up for: a heap cannot
    /// remove them when the transfer ends, and a boot storm leaves one per finished file, each
    /// a wasted wake-up of the loop a second later. Live entries are left to `fire_timers`.
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, i, generation))) = self.timers.peek() {
            match self.table.get(i) {
                Some(Some(t)) if t.generation == generation && t.timer == Some(at) => {
                    return Some(at)
                }
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, i, generation))) = self.timers.peek() {
            // Timers wake up to a millisecond early (rounding); do not sleep again for that.
            if at > now + Duration::from_millis(1) {
                break;
            }
            self.timers.pop();
            let Some(Some(t)) = self.table.get_mut(i) else {
                continue;
            };
            if t.generation != generation || t.timer != Some(at) {
                continue;
            }
            t.timer = None;
            match t.sender.poll_timeout() {
                Some(d) if d <= now + Duration::from_millis(1) => {
                    t.sender.handle_timeout(now.max(d));
                }
                // The deadline moved later since this entry was queued (an ACK came in).
                Some(d) => {
                    t.timer = Some(d);
                    self.timers.push(Reverse((d, i, generation)));
                    continue;
                }
                None => {}
            }
            self.drive(i);
        }
    }

    fn finish(&mut self, i: usize, outcome: Result<(), TransferError>) {
        let Some(mut t) = self.table.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.free.push(i);
        // No deregister of an own socket: closing it (below, with `t`) takes it out of the
        // epoll set, one system call less per transfer.
        if let Port::Shared(k) = t.port {
            self.ports[k].peers.remove(&t.peer);
        }
        if let Some(r) = t.reader.take() {
            r.abort();
        }
        let mut report = t.report;
        report.bytes = t.sender.bytes_acked();
        report.duration = t.started.elapsed();
        report.first_data = t.first_data.map(|f| f.saturating_duration_since(t.started));
        report.outcome = outcome;
        // Release the slot before reporting: the next queued request may start at once.
        drop(t.ticket);
        drop(t.feed);
        t.source.finished(&report);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}
