//! The transfer engine: a few event-loop threads (one per core, at most four) drive every
//! transfer's socket and timers. A transfer is a small state (its socket, its
//! [`Sender`](super::transfer::Sender), its [`Feed`]) in one loop's table, not a thread or a
//! task, so a boot storm of thousands of transfers costs memory per transfer, not threads.
//!
//! Why our own loops rather than tokio tasks: lock-step TFTP is bound by the latency from an
//! ACK's arrival to the next DATA's departure. A loop thread sleeping in epoll wakes on the
//! ACK, reads it, feeds the state machine, reads the next block with `pread` and sends it, all
//! without a scheduler or a channel in between: the same single wake-up that made the earlier
//! thread-per-transfer driver beat tftpd-hpa (benches/tftp_engine.sh), without its thread per
//! transfer (issue 12). Each transfer keeps its own ephemeral port (RFC 1350 TID).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::debug;

use super::feed::{read_ahead, Feed};
use super::packet::{ErrorCode, ErrorPacket, Mode, Packet};
use super::server::{Source, Ticket, TransferError, TransferReport};
use super::shared::SharedFiles;
use super::transfer::{foreign_tid, Sender, Status};
use crate::content::Body;

const WAKE: Token = Token(usize::MAX);

/// A transfer ready to run: socket bound, options decided, content open.
pub(crate) struct Job {
    pub sock: std::net::UdpSocket,
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

enum Cmd {
    Start(Box<Job>),
    /// A stream feeding transfer `(index, generation)` has a new chunk.
    Data(usize, u64),
    /// End transfer `(index, generation)` now: displaced while still unproven.
    Cancel(usize, u64),
    Stop,
}

/// A way to reach one loop from any thread.
#[derive(Clone)]
struct Mailbox {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<Waker>,
}

impl Mailbox {
    fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// The running loops.
pub(crate) struct Engine {
    loops: Vec<Mailbox>,
    next: AtomicUsize,
    active: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts `threads` loops; streams are read on `runtime`.
    pub fn start(threads: usize, runtime: tokio::runtime::Handle) -> io::Result<Engine> {
        let active = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(SharedFiles::default());
        let mut loops = Vec::new();
        for i in 0..threads.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (tx, rx) = mpsc::channel();
            let mailbox = Mailbox { tx, waker };
            let mut l = Loop {
                shared: shared.clone(),
                poll,
                rx,
                mailbox: mailbox.clone(),
                runtime: runtime.clone(),
                active: active.clone(),
                table: Vec::new(),
                free: Vec::new(),
                timers: BinaryHeap::new(),
                generation: 0,
            };
            std::thread::Builder::new()
                .name(format!("tftp-loop-{i}"))
                .spawn(move || l.run())?;
            loops.push(mailbox);
        }
        Ok(Engine {
            loops,
            next: AtomicUsize::new(0),
            active,
        })
    }

    /// Transfers running or handed over and not yet finished.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Hands a transfer to the next loop (round robin).
    pub fn start_transfer(&self, job: Job) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        self.loops[i].send(Cmd::Start(Box::new(job)));
    }

    /// Stops the loops; transfers still running end where they are (their slots are freed).
    pub fn stop(&self) {
        for mailbox in &self.loops {
            mailbox.send(Cmd::Stop);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Transfer {
    generation: u64,
    sock: UdpSocket,
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
    mailbox: Mailbox,
    runtime: tokio::runtime::Handle,
    active: Arc<AtomicUsize>,
    table: Vec<Option<Transfer>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    generation: u64,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        // Clients send ACKs and ERRORs: a few hundred bytes at most; longer is garbage anyway.
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = self
                .timers
                .peek()
                .map(|Reverse((t, ..))| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("TFTP event loop: poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    if !self.take_mail() {
                        return;
                    }
                } else {
                    self.readable(ev.token().0, &mut buf);
                }
            }
            self.fire_timers();
        }
    }

    /// Handles every queued command; `false` on `Stop`.
    fn take_mail(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Start(job) => self.insert(*job),
                Cmd::Data(i, g) if self.is_live(i, g) => self.drive(i),
                Cmd::Cancel(i, g) if self.is_live(i, g) => {
                    self.finish(i, Err(TransferError::Displaced))
                }
                Cmd::Data(..) | Cmd::Cancel(..) => {}
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
        let mut sock = UdpSocket::from_std(job.sock);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(i), Interest::READABLE)
        {
            // The client hears a fixed ERROR 0 rather than nothing (it would resend into the
            // same failure for seconds); the slot is freed and the failure counted.
            let reply = super::server::OpenError::Unavailable.reply().encode();
            let _ = sock.send_to(&reply, job.peer);
            crate::metrics::global().refused("start_failed");
            self.free.push(i);
            self.active.fetch_sub(1, Ordering::AcqRel);
            let mut report = job.report;
            report.outcome = Err(TransferError::NotStarted(e.to_string()));
            drop(job.ticket);
            job.source.finished(&report);
            return;
        }
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
            sock,
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

    fn readable(&mut self, i: usize, buf: &mut [u8]) {
        // Readiness is edge-triggered: read until the socket is empty. Each packet is answered
        // before the next read, so the read that finds the socket empty is off the ACK -> DATA
        // path (lock-step latency is the benchmark against tftpd-hpa). Reading with recvmmsg
        // instead (a short batch says the socket is empty, without that last read) measured
        // 5-20 % slower lock-step at blksize 512: the look for a second datagram inside the
        // same call is on the ACK's path, and the storm's CPU per boot did not move.
        loop {
            let Some(Some(t)) = self.table.get_mut(i) else {
                return;
            };
            let (n, from) = match t.sock.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP port unreachable and the like: the client is gone or will retry.
                Err(e) => {
                    debug!(client = %t.peer, "recv: {e}");
                    continue;
                }
            };
            if let Some(e) = foreign_tid(t.peer, from) {
                let _ = t.sock.send_to(&e, from);
                continue;
            }
            match Packet::decode(&buf[..n]) {
                Ok(p) => t.sender.handle(&p, Instant::now()),
                Err(e) => {
                    let _ = t.sock.send_to(&e.reply().encode(), t.peer);
                    return self.finish(i, Err(TransferError::Malformed(e)));
                }
            }
            self.drive(i);
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
        while let Some(d) = t.sender.poll_transmit() {
            if t.first_data.is_none() && d.starts_with(&[0, 3]) {
                t.first_data = Some(now);
            }
            // A full send buffer drops the datagram; the retransmission timer recovers it.
            if let Err(e) = t.sock.send_to(&d, t.peer) {
                debug!(client = %t.peer, "send failed: {e}");
            }
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
        // The next block is read now, while the client is busy acknowledging this one, so the
        // ACK finds it ready and is answered without a read (tftpd-hpa reads ahead the same way).
        if let Err(e) = t.feed.prefetch() {
            return self.source_failed(i, e);
        }
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
        if let Some(Some(t)) = self.table.get(i) {
            let e2 = ErrorPacket::new(ErrorCode::NotDefined, "transfer failed").encode();
            let _ = t.sock.send_to(&e2, t.peer);
        }
        self.finish(i, Err(TransferError::Source(e.to_string())));
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
        // No deregister: closing the socket (below, with `t`) takes it out of the epoll set,
        // one system call less per transfer in a storm of thousands.
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
