//! The transfer state machines, as pure code in the style of quinn-proto: the driver feeds
//! packets, data and `now` in, and takes packets to send and the next deadline out. Nothing
//! here reads a clock or touches a socket, so tests replay loss, duplication, reordering and
//! time in microseconds.
//!
//! Rules implemented here:
//! - RFC 1350 lock-step, generalised by RFC 7440 windowsize: the sender keeps up to
//!   `windowsize` unacknowledged blocks in flight; an ACK of block k resumes at k + 1; on a
//!   timeout it resends from the last acknowledged block + 1.
//! - RFC 1123 §4.2.3.1: a duplicate ACK never triggers a retransmission (no Sorcerer's
//!   Apprentice); only the timer does.
//! - Block numbers are 16 bits on the wire and roll over from 65535 to 0; internally they are
//!   64-bit so files of any size work.
//! - A transfer whose size is a multiple of blksize ends with an empty DATA block.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::packet::{
    self, ErrorCode, ErrorPacket, Mode, Options, Packet, BLKSIZE_MIN, DEFAULT_BLKSIZE,
};

/// Negotiated parameters of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Retransmissions of one packet (or window) before giving up.
    pub retries: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            timeout: Duration::from_secs(1),
            retries: 6,
        }
    }
}

/// What a server lets a client negotiate (the `tftp:` section of the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Our retransmit timeout when the client asks for none.
    pub timeout: Duration,
    /// Cap on a negotiated timeout: RFC 2349 lets a client ask up to 255 s, which would let
    /// one unanswered request hold a transfer for half an hour.
    pub max_timeout: Duration,
    pub retries: u32,
}

/// Retransmissions granted to a client that has not acknowledged anything yet. A spoofed
/// request never will, so its transfer ends after the first packet and this many resends.
pub const PROBATION_RETRIES: u32 = 2;

impl Limits {
    /// The probation of a new transfer: our base timeout (never a longer negotiated one) and
    /// [`PROBATION_RETRIES`], so an unanswered transfer lives at most
    /// `(PROBATION_RETRIES + 1) × timeout` (3 s by default).
    pub fn probation(&self, params: &Params) -> Probation {
        Probation {
            timeout: params.timeout.min(self.timeout),
            retries: PROBATION_RETRIES,
        }
    }
}

/// Decides a read request (RFC 1350 §5, RFC 2347-2349, RFC 7440): the transfer parameters and
/// the options to acknowledge in an OACK (`None` when none is acknowledged), or the ERROR to
/// answer. `size` is the file's size when known; tsize is offered only then.
pub fn accept(
    rrq: &Packet,
    limits: &Limits,
    size: Option<u64>,
) -> Result<(Params, Option<Options>), ErrorPacket> {
    let Packet::Rrq { mode, options, .. } = rrq else {
        return Err(ErrorPacket::new(
            ErrorCode::IllegalOperation,
            "read requests only",
        ));
    };
    let mode = Mode::from_wire(mode).ok_or(ErrorPacket::new(
        ErrorCode::IllegalOperation,
        "unsupported mode",
    ))?;
    let mut params = Params {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: limits.timeout,
        retries: limits.retries,
    };
    let mut oack = Options::default();
    if let Some(b) = options.blksize {
        // RFC 2348: a larger request may be answered with a smaller size.
        let b = b.min(limits.max_blksize).max(BLKSIZE_MIN);
        params.blksize = b;
        oack.blksize = Some(b);
    }
    if let Some(t) = options.timeout {
        // RFC 2349 has the server accept or refuse the value; answering with our cap (a value
        // the client can refuse with ERROR 8) keeps the transfer instead of refusing it.
        let cap = limits.max_timeout.as_secs().clamp(1, 255) as u8;
        let t = t.min(cap);
        params.timeout = Duration::from_secs(t.into());
        oack.timeout = Some(t);
    }
    // RFC 2349: tsize in a RRQ is 0 and asks for the size; only answer it when we know it.
    // In netascii the size on the wire differs from the file's, so it is not offered.
    // curl (7.88) rejects an OACK carrying `tsize 0`, so an empty file goes without it.
    if options.tsize.is_some() && mode == Mode::Octet {
        if let Some(size) = size.filter(|&s| s > 0) {
            oack.tsize = Some(size);
        }
    }
    if let Some(w) = options.windowsize {
        let w = w.min(limits.max_windowsize).max(1);
        params.windowsize = w;
        oack.windowsize = Some(w);
    }
    Ok((params, (!oack.is_empty()).then_some(oack)))
}

/// The one transfer-ID rule (RFC 1350 §4), for both sides: a datagram from anywhere but the
/// peer's address and port belongs to another transfer. It is answered with ERROR 5 (this
/// packet, to its sender) and the transfer goes on undisturbed.
pub fn foreign_tid(peer: SocketAddr, from: SocketAddr) -> Option<Bytes> {
    (from != peer).then(unknown_tid)
}

/// The ERROR 5 answered to a datagram from a TID that has no transfer.
pub fn unknown_tid() -> Bytes {
    ErrorPacket::new(ErrorCode::UnknownTid, "unknown transfer ID").encode()
}

/// The limits of a transfer whose client has not yet acknowledged anything (see
/// [`Limits::probation`]). Once the client answers, the negotiated timeout and retries apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probation {
    pub timeout: Duration,
    pub retries: u32,
}

/// How a transfer ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Active,
    /// Every block delivered and acknowledged.
    Done,
    /// The peer sent an ERROR. `quiet` when it refused our OACK (a tsize probe, RFC 2349).
    PeerError {
        code: ErrorCode,
        message: String,
        quiet: bool,
    },
    /// No answer after the configured retries.
    TimedOut,
    /// The peer broke the protocol; we sent it this ERROR.
    Protocol(String),
}

/// The retransmission deadline, while the transfer is still going.
fn active_deadline(status: &Status, deadline: Option<Instant>) -> Option<Instant> {
    (*status == Status::Active).then_some(deadline).flatten()
}

/// The retransmission timer both sides share: `true` when it fired and the caller must resend;
/// after `retries` firings without progress the transfer ends as [`Status::TimedOut`].
fn timer_fired(
    deadline: &mut Option<Instant>,
    tries: &mut u32,
    retries: u32,
    status: &mut Status,
    now: Instant,
) -> bool {
    match *deadline {
        Some(d) if now >= d && *status == Status::Active => {}
        _ => return false,
    }
    *tries += 1;
    if *tries > retries {
        *status = Status::TimedOut;
        *deadline = None;
        return false;
    }
    true
}

/// Wire block number of an internal block index.
fn wire(n: u64) -> u16 {
    n as u16
}

/// A datagram the [`Sender`] wants sent: a DATA block as its 4-byte header and its payload
/// (a slice of the file's bytes, sent with a second iovec rather than copied behind the
/// header), or any other packet whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    head: [u8; 4],
    /// 4 for DATA, 0 for a whole packet in `body`.
    head_len: usize,
    body: Bytes,
}

impl Datagram {
    pub fn whole(packet: Bytes) -> Datagram {
        Datagram {
            head: [0; 4],
            head_len: 0,
            body: packet,
        }
    }

    pub fn data(block: u16, payload: Bytes) -> Datagram {
        let ([o1, o2], [b1, b2]) = (packet::OP_DATA.to_be_bytes(), block.to_be_bytes());
        Datagram {
            head: [o1, o2, b1, b2],
            head_len: 4,
            body: payload,
        }
    }

    /// The header part (empty for a whole packet).
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// The rest of the datagram, after [`head`](Self::head).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn is_data(&self) -> bool {
        self.head_len == 4
    }

    /// The datagram in one buffer.
    pub fn to_bytes(&self) -> Bytes {
        if self.head_len == 0 {
            return self.body.clone();
        }
        let mut out = BytesMut::with_capacity(self.head_len + self.body.len());
        out.extend_from_slice(self.head());
        out.extend_from_slice(&self.body);
        out.freeze()
    }
}

/// Sends one file: OACK (when options were accepted), then DATA blocks in windows.
#[derive(Debug)]
pub struct Sender {
    params: Params,
    status: Status,
    /// Options to announce; `Some` until the client acknowledges them with ACK 0.
    oack: Option<Bytes>,
    /// Blocks `acked + 1 ..= acked + buffer.len()`, kept until acknowledged.
    buffer: VecDeque<Bytes>,
    acked: u64,
    next_send: u64,
    last_block: Option<u64>,
    tries: u32,
    deadline: Option<Instant>,
    outgoing: VecDeque<Datagram>,
    bytes_acked: u64,
    /// Limits until the client's first acknowledgment, if any.
    probation: Option<Probation>,
    proven: bool,
}

impl Sender {
    /// `oack`: the options accepted for this client, or `None` for a plain RFC 1350 transfer.
    pub fn new(params: Params, oack: Option<Options>, now: Instant) -> Sender {
        Sender::on_probation(params, oack, None, now)
    }

    /// A sender whose client must prove it is there: until its first acknowledgment the
    /// `probation` timeout and retries apply instead of the negotiated ones.
    pub fn on_probation(
        params: Params,
        oack: Option<Options>,
        probation: Option<Probation>,
        now: Instant,
    ) -> Sender {
        let mut s = Sender {
            params,
            status: Status::Active,
            oack: oack.map(|options| Packet::Oack { options }.encode()),
            buffer: VecDeque::with_capacity(params.windowsize as usize),
            acked: 0,
            next_send: 1,
            last_block: None,
            tries: 0,
            deadline: None,
            outgoing: VecDeque::new(),
            bytes_acked: 0,
            probation,
            proven: false,
        };
        if let Some(o) = &s.oack {
            s.outgoing.push_back(Datagram::whole(o.clone()));
            s.deadline = Some(now + s.timeout());
        }
        s
    }

    /// Whether the client has acknowledged anything (the OACK or a DATA block): a spoofed
    /// source never does.
    pub fn is_proven(&self) -> bool {
        self.proven
    }

    /// The retransmit timeout now: the probation's until the client first answers.
    fn timeout(&self) -> Duration {
        match self.probation {
            Some(p) if !self.proven => p.timeout,
            _ => self.params.timeout,
        }
    }

    fn retries(&self) -> u32 {
        match self.probation {
            Some(p) if !self.proven => p.retries,
            _ => self.params.retries,
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn is_finished(&self) -> bool {
        self.status != Status::Active
    }

    /// Payload bytes the client has acknowledged.
    pub fn bytes_acked(&self) -> u64 {
        self.bytes_acked
    }

    /// Whether the sender can take another block of data now (its window has room and the
    /// final block has not been given yet).
    pub fn wants_data(&self) -> bool {
        self.status == Status::Active
            && self.last_block.is_none()
            && self.buffer.len() < self.params.windowsize as usize
    }

    /// Hands over the next block: exactly `blksize` bytes, or fewer for the final one (possibly
    /// empty when the size is a multiple of blksize).
    pub fn push_data(&mut self, block: Bytes, now: Instant) {
        debug_assert!(self.wants_data());
        debug_assert!(block.len() <= self.params.blksize as usize);
        let is_last = block.len() < self.params.blksize as usize;
        self.buffer.push_back(block);
        if is_last {
            self.last_block = Some(self.acked + self.buffer.len() as u64);
        }
        self.pump(now);
    }

    /// The next datagram to send, if any, in one buffer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.poll_datagram().map(|d| d.to_bytes())
    }

    /// The next datagram to send, if any, a DATA block's payload not copied.
    pub fn poll_datagram(&mut self) -> Option<Datagram> {
        self.outgoing.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called, if at all.
    pub fn poll_timeout(&self) -> Option<Instant> {
        active_deadline(&self.status, self.deadline)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let retries = self.retries();
        if !timer_fired(
            &mut self.deadline,
            &mut self.tries,
            retries,
            &mut self.status,
            now,
        ) {
            return;
        }
        if let Some(o) = &self.oack {
            self.outgoing.push_back(Datagram::whole(o.clone()));
        } else {
            // Resend the whole outstanding window from the last acknowledged block + 1.
            self.next_send = self.acked + 1;
            self.pump_inner();
        }
        self.deadline = Some(now + self.timeout());
    }

    /// A datagram from the client's TID.
    pub fn handle(&mut self, pkt: &Packet, now: Instant) {
        if self.status != Status::Active {
            return;
        }
        match pkt {
            Packet::Ack { block } => self.on_ack(*block, now),
            Packet::Error { code, message } => {
                self.status = Status::PeerError {
                    code: *code,
                    message: message.clone(),
                    quiet: self.oack.is_some(),
                };
                self.deadline = None;
            }
            // Anything else on a read transfer is a protocol violation (RFC 1350 §5).
            other => {
                let msg = format!("unexpected {} during a read transfer", kind(other));
                self.outgoing.push_back(Datagram::whole(
                    Packet::error(ErrorCode::IllegalOperation, msg.clone()).encode(),
                ));
                self.status = Status::Protocol(msg);
                self.deadline = None;
            }
        }
    }

    fn on_ack(&mut self, block: u16, now: Instant) {
        if self.oack.is_some() {
            // RFC 2347: the client acknowledges the OACK with ACK 0.
            if block == 0 {
                self.oack = None;
                self.proven = true;
                self.tries = 0;
                self.deadline = None;
                self.pump(now);
            }
            return;
        }
        let outstanding_end = self.next_send.max(self.acked + 1) - 1;
        // Which outstanding block does this wire number name? The window is at most 65535
        // blocks, so the match is unique; stale and duplicate ACKs fall outside and are ignored
        // (RFC 1123 §4.2.3.1: never retransmit on a duplicate ACK).
        let span = outstanding_end.saturating_sub(self.acked);
        let delta = block.wrapping_sub(wire(self.acked)) as u64;
        if delta == 0 || delta > span {
            return;
        }
        let n = self.acked + delta;
        self.proven = true;
        for _ in 0..delta {
            if let Some(b) = self.buffer.pop_front() {
                self.bytes_acked += b.len() as u64;
            }
        }
        self.acked = n;
        self.tries = 0;
        if Some(n) == self.last_block {
            self.status = Status::Done;
            self.deadline = None;
            return;
        }
        // RFC 7440: an ACK inside the window means the client missed what follows; resume there.
        if self.next_send > n + 1 {
            self.next_send = n + 1;
        }
        self.deadline = None;
        self.pump(now);
    }

    /// Sends every buffered block the window allows and arms the timer for them.
    fn pump(&mut self, now: Instant) {
        if self.oack.is_some() || self.status != Status::Active {
            return;
        }
        if self.pump_inner() {
            self.deadline = Some(now + self.timeout());
        }
    }

    fn pump_inner(&mut self) -> bool {
        let window_end = self.acked + self.params.windowsize as u64;
        let buffered_end = self.acked + self.buffer.len() as u64;
        let mut sent = false;
        while self.next_send <= window_end && self.next_send <= buffered_end {
            let idx = (self.next_send - self.acked - 1) as usize;
            let data = self.buffer[idx].clone();
            self.outgoing
                .push_back(Datagram::data(wire(self.next_send), data));
            self.next_send += 1;
            sent = true;
        }
        sent
    }
}

fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::Rrq { .. } => "RRQ",
        Packet::Wrq { .. } => "WRQ",
        Packet::Data { .. } => "DATA",
        Packet::Ack { .. } => "ACK",
        Packet::Error { .. } => "ERROR",
        Packet::Oack { .. } => "OACK",
    }
}

/// What the receiver learned from the server's first answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub params: Params,
    /// The server ignored our options (no OACK): plain RFC 1350 lock-step with 512-byte blocks.
    pub fell_back: bool,
    /// RFC 2349 transfer size, when the server announced it.
    pub tsize: Option<u64>,
}

/// Receives one file: sends the request, accepts an OACK or falls back to RFC 1350 when the
/// server ignores the options, acknowledges windows, and yields payload in order.
#[derive(Debug)]
pub struct Receiver {
    requested: Options,
    params: Params,
    negotiated: Option<Negotiated>,
    status: Status,
    /// Next block expected.
    expected: u64,
    since_ack: u16,
    /// We already answered the current gap or duplicate run; wait for new data or the timer.
    nudged: bool,
    last_sent: Bytes,
    tries: u32,
    deadline: Option<Instant>,
    outgoing: VecDeque<Bytes>,
    delivered: VecDeque<Bytes>,
    bytes: u64,
}

impl Receiver {
    /// `request` is the RRQ to send; `params` gives our timeout and retries and the blksize and
    /// windowsize we asked for (matching the options in the RRQ).
    pub fn new(request: &Packet, params: Params, now: Instant) -> Receiver {
        let requested = match request {
            Packet::Rrq { options, .. } => options.clone(),
            _ => Options::default(),
        };
        let rrq = request.encode();
        Receiver {
            requested,
            params,
            negotiated: None,
            status: Status::Active,
            expected: 1,
            since_ack: 0,
            nudged: false,
            last_sent: rrq.clone(),
            tries: 0,
            deadline: Some(now + params.timeout),
            outgoing: VecDeque::from([rrq]),
            delivered: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn is_finished(&self) -> bool {
        self.status != Status::Active
    }

    /// Known once the server has answered.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Payload bytes received in order so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.outgoing.pop_front()
    }

    /// In-order payload, block by block.
    pub fn poll_data(&mut self) -> Option<Bytes> {
        self.delivered.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        active_deadline(&self.status, self.deadline)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let retries = self.params.retries;
        if !timer_fired(
            &mut self.deadline,
            &mut self.tries,
            retries,
            &mut self.status,
            now,
        ) {
            return;
        }
        // Resend the RRQ, or our last ACK: it tells the sender where to resume (RFC 7440).
        self.outgoing.push_back(self.last_sent.clone());
        self.since_ack = 0;
        self.nudged = false;
        self.deadline = Some(now + self.params.timeout);
    }

    pub fn handle(&mut self, pkt: &Packet, now: Instant) {
        if self.status != Status::Active {
            // Dally: the server did not see our final ACK and resent the last block.
            if let (Status::Done, Packet::Data { block, .. }) = (&self.status, pkt) {
                if *block == wire(self.expected - 1) {
                    self.outgoing.push_back(self.last_sent.clone());
                }
            }
            return;
        }
        match pkt {
            Packet::Oack { options } if self.negotiated.is_none() => self.on_oack(options, now),
            Packet::Data { block, data } => {
                if self.negotiated.is_none() {
                    // No OACK: the server ignored our options (RFC 2347 §4); RFC 1350 defaults.
                    let params = Params {
                        blksize: DEFAULT_BLKSIZE,
                        windowsize: 1,
                        ..self.params
                    };
                    self.params = params;
                    self.negotiated = Some(Negotiated {
                        params,
                        fell_back: !self.requested.is_empty(),
                        tsize: None,
                    });
                }
                self.on_data(*block, data, now);
            }
            Packet::Error { code, message } => {
                self.status = Status::PeerError {
                    code: *code,
                    message: message.clone(),
                    quiet: false,
                };
                self.deadline = None;
            }
            // A second OACK is a duplicate of the first (our ACK 0 was lost): re-acknowledge.
            Packet::Oack { .. } if self.expected == 1 => {
                if !self.nudged {
                    self.outgoing.push_back(self.last_sent.clone());
                    self.nudged = true;
                }
            }
            other => {
                let msg = format!("unexpected {} from the server", kind(other));
                self.fail(ErrorCode::IllegalOperation, msg);
            }
        }
    }

    fn fail(&mut self, code: ErrorCode, msg: String) {
        self.outgoing
            .push_back(Packet::error(code, msg.clone()).encode());
        self.status = Status::Protocol(msg);
        self.deadline = None;
    }

    fn on_oack(&mut self, o: &Options, now: Instant) {
        let r = &self.requested;
        // RFC 2347: the server may not add options nor raise blksize/windowsize above ours.
        let bad = (o.blksize.is_some() && r.blksize.is_none())
            || (o.windowsize.is_some() && r.windowsize.is_none())
            || (o.timeout.is_some() && r.timeout.is_none())
            || (o.tsize.is_some() && r.tsize.is_none())
            || o.blksize.zip(r.blksize).is_some_and(|(a, b)| a > b)
            || o.windowsize.zip(r.windowsize).is_some_and(|(a, b)| a > b);
        if bad {
            self.fail(
                ErrorCode::OptionRefused,
                "OACK carries options that were not requested".into(),
            );
            return;
        }
        let params = Params {
            blksize: o.blksize.unwrap_or(DEFAULT_BLKSIZE),
            windowsize: o.windowsize.unwrap_or(1),
            timeout: o
                .timeout
                .map(|t| Duration::from_secs(t as u64))
                .unwrap_or(self.params.timeout),
            retries: self.params.retries,
        };
        self.params = params;
        self.negotiated = Some(Negotiated {
            params,
            fell_back: false,
            tsize: o.tsize,
        });
        self.send_ack(0, now);
    }

    fn send_ack(&mut self, n: u64, now: Instant) {
        let ack = Packet::Ack { block: wire(n) }.encode();
        self.last_sent = ack.clone();
        self.outgoing.push_back(ack);
        self.since_ack = 0;
        self.tries = 0;
        self.deadline = Some(now + self.params.timeout);
    }

    fn on_data(&mut self, block: u16, data: &Bytes, now: Instant) {
        if data.len() > self.params.blksize as usize {
            self.fail(
                ErrorCode::IllegalOperation,
                format!("DATA block of {} bytes exceeds blksize", data.len()),
            );
            return;
        }
        if block == wire(self.expected) {
            let n = self.expected;
            self.expected += 1;
            self.bytes += data.len() as u64;
            if !data.is_empty() {
                self.delivered.push_back(data.clone());
            }
            self.nudged = false;
            self.since_ack += 1;
            self.tries = 0;
            self.deadline = Some(now + self.params.timeout);
            if data.len() < self.params.blksize as usize {
                self.send_ack(n, now);
                self.status = Status::Done;
                self.deadline = None;
            } else if self.since_ack >= self.params.windowsize {
                self.send_ack(n, now);
            }
            return;
        }
        // Out of order: an old block (our ACK was lost) or a gap (a block was lost). Either way
        // tell the sender once where we stand; the timers handle the rest.
        if !self.nudged {
            self.nudged = true;
            self.send_ack(self.expected - 1, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(blksize: u16, windowsize: u16) -> Params {
        Params {
            blksize,
            windowsize,
            timeout: Duration::from_millis(100),
            retries: 5,
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Feeds the sender from `file` whenever it wants data.
    fn feed(s: &mut Sender, file: &[u8], offset: &mut usize, now: Instant) {
        while s.wants_data() {
            let bs = s.params().blksize as usize;
            let end = (*offset + bs).min(file.len());
            let chunk = Bytes::copy_from_slice(&file[*offset..end]);
            *offset = end;
            s.push_data(chunk, now);
        }
    }

    /// A deterministic network between a sender and a receiver: `drop(dir, index)` decides
    /// whether the index-th packet in a direction is lost; `dup` duplicates every ACK.
    struct Net<F: FnMut(bool, usize) -> bool> {
        drop: F,
        dup_acks: bool,
        reorder_acks: bool,
    }

    /// Runs a whole transfer in virtual time. Returns the receiver's bytes and the count of
    /// DATA packets the sender transmitted.
    fn run<F: FnMut(bool, usize) -> bool>(
        file: &[u8],
        p: Params,
        with_oack: bool,
        mut net: Net<F>,
    ) -> (Vec<u8>, usize, Status, Status) {
        let t0 = Instant::now();
        let mut now = t0;
        let opts = Options {
            blksize: Some(p.blksize),
            windowsize: Some(p.windowsize),
            ..Default::default()
        };
        let rrq = Packet::Rrq {
            filename: "f".into(),
            mode: "octet".into(),
            options: if with_oack {
                opts.clone()
            } else {
                Options::default()
            },
        };
        let mut r = Receiver::new(&rrq, p, now);
        let _ = r.poll_transmit(); // the RRQ: the server side is created directly below
        let mut s = Sender::new(p, with_oack.then_some(opts), now);
        let mut offset = 0;
        let mut out = Vec::new();
        let (mut n_s2r, mut n_r2s, mut data_sent) = (0usize, 0usize, 0usize);
        for _ in 0..2_000_000 {
            feed(&mut s, file, &mut offset, now);
            let mut moved = false;
            while let Some(d) = s.poll_transmit() {
                moved = true;
                data_sent += 1;
                n_s2r += 1;
                if !(net.drop)(true, n_s2r) {
                    r.handle(&Packet::decode(&d).unwrap(), now);
                }
            }
            while let Some(b) = r.poll_data() {
                out.extend_from_slice(&b);
            }
            let mut acks = Vec::new();
            while let Some(a) = r.poll_transmit() {
                moved = true;
                n_r2s += 1;
                if !(net.drop)(false, n_r2s) {
                    acks.push(Packet::decode(&a).unwrap());
                }
            }
            if net.reorder_acks {
                acks.reverse();
            }
            for a in acks {
                s.handle(&a, now);
                if net.dup_acks {
                    s.handle(&a, now);
                }
            }
            if s.is_finished() && r.is_finished() {
                break;
            }
            if !moved {
                let next = [s.poll_timeout(), r.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                match next {
                    Some(t) => {
                        now = t;
                        s.handle_timeout(now);
                        r.handle_timeout(now);
                    }
                    None if s.is_finished() || r.is_finished() => {
                        // Let the last packets flow (e.g. the final ACK), then stop.
                        if s.poll_timeout().is_none() && r.poll_timeout().is_none() {
                            break;
                        }
                    }
                    None => panic!("deadlock: no timer armed and nothing to send"),
                }
            }
        }
        (out, data_sent, s.status().clone(), r.status().clone())
    }

    fn clean() -> Net<impl FnMut(bool, usize) -> bool> {
        Net {
            drop: |_, _| false,
            dup_acks: false,
            reorder_acks: false,
        }
    }

    #[test]
    fn sizes_around_block_boundaries_arrive_intact() {
        for len in [0, 1, 511, 512, 513, 1024, 5000] {
            for (bs, ws) in [(512, 1), (512, 4), (1428, 16)] {
                let file = payload(len);
                let (out, _, s, r) = run(&file, params(bs, ws), true, clean());
                assert_eq!(out, file, "len {len} bs {bs} ws {ws}");
                assert_eq!(s, Status::Done);
                assert_eq!(r, Status::Done);
            }
        }
    }

    #[test]
    fn multiple_of_blksize_ends_with_empty_block() {
        let file = payload(1024);
        let now = Instant::now();
        let mut s = Sender::new(params(512, 1), None, now);
        let mut off = 0;
        let mut sent = Vec::new();
        for block in 1u16..=3 {
            feed(&mut s, &file, &mut off, now);
            let d = s.poll_transmit().unwrap();
            sent.push(d.len() - 4);
            s.handle(&Packet::Ack { block }, now);
        }
        assert_eq!(sent, vec![512, 512, 0]);
        assert_eq!(s.status(), &Status::Done);
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        // 70,000 blocks of 8 bytes: wraps the 16-bit counter.
        let file = payload(8 * 70_000 + 3);
        for ws in [1, 16] {
            let (out, _, s, _) = run(&file, params(8, ws), true, clean());
            assert_eq!(s, Status::Done);
            assert!(
                out == file,
                "rollover corrupted the file at windowsize {ws}"
            );
        }
    }

    #[test]
    fn every_kth_packet_lost_still_completes() {
        let file = payload(200_000);
        for k in [3usize, 7, 13] {
            for ws in [1u16, 8] {
                let net = Net {
                    drop: move |_, i| i % k == 0,
                    dup_acks: false,
                    reorder_acks: false,
                };
                let (out, _, s, r) = run(&file, params(512, ws), true, net);
                assert_eq!((s, r), (Status::Done, Status::Done), "k {k} ws {ws}");
                assert!(out == file, "k {k} ws {ws}");
            }
        }
    }

    #[test]
    fn duplicated_acks_cause_no_retransmission() {
        // Sorcerer's Apprentice (RFC 1123 §4.2.3.1): with every ACK duplicated, the sender
        // must still send each DATA exactly once.
        let file = payload(512 * 50 + 10);
        let net = Net {
            drop: |_, _| false,
            dup_acks: true,
            reorder_acks: false,
        };
        let (out, data_sent, s, _) = run(&file, params(512, 1), false, net);
        assert_eq!(s, Status::Done);
        assert_eq!(out, file);
        assert_eq!(data_sent, 51);
    }

    #[test]
    fn reordered_acks_are_harmless() {
        let file = payload(512 * 200);
        let net = Net {
            drop: |dir, i| !dir && i % 5 == 0,
            dup_acks: true,
            reorder_acks: true,
        };
        let (out, _, s, _) = run(&file, params(512, 8), true, net);
        assert_eq!(s, Status::Done);
        assert!(out == file);
    }

    #[test]
    fn stale_ack_of_an_old_window_is_ignored() {
        let now = Instant::now();
        let file = payload(512 * 40);
        let mut s = Sender::new(params(512, 4), None, now);
        let mut off = 0;
        feed(&mut s, &file, &mut off, now);
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 4);
        s.handle(&Packet::Ack { block: 4 }, now);
        feed(&mut s, &file, &mut off, now);
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 4);
        // An ACK for block 2 of the previous window arrives late: nothing is resent.
        s.handle(&Packet::Ack { block: 2 }, now);
        s.handle(&Packet::Ack { block: 4 }, now);
        assert!(s.poll_transmit().is_none());
        // An ACK inside the current window resumes right after it (RFC 7440).
        s.handle(&Packet::Ack { block: 6 }, now);
        feed(&mut s, &file, &mut off, now);
        let blocks: Vec<u16> = std::iter::from_fn(|| s.poll_transmit())
            .map(|d| u16::from_be_bytes([d[2], d[3]]))
            .collect();
        assert_eq!(blocks, vec![7, 8, 9, 10]);
    }

    #[test]
    fn timeout_resends_from_last_acked_block() {
        let now = Instant::now();
        let file = payload(512 * 40);
        let mut s = Sender::new(params(512, 4), None, now);
        let mut off = 0;
        feed(&mut s, &file, &mut off, now);
        let _: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
        s.handle(&Packet::Ack { block: 4 }, now);
        feed(&mut s, &file, &mut off, now);
        let _: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
        let t = s.poll_timeout().unwrap();
        assert_eq!(t, now + Duration::from_millis(100));
        s.handle_timeout(t);
        let blocks: Vec<u16> = std::iter::from_fn(|| s.poll_transmit())
            .map(|d| u16::from_be_bytes([d[2], d[3]]))
            .collect();
        assert_eq!(blocks, vec![5, 6, 7, 8]);
    }

    #[test]
    fn client_that_never_acks_the_oack_times_out() {
        let now = Instant::now();
        let opts = Options {
            tsize: Some(10),
            ..Default::default()
        };
        let mut s = Sender::new(params(512, 1), Some(opts), now);
        let mut t = now;
        let mut oacks = 0;
        while let Some(deadline) = s.poll_timeout() {
            while s.poll_transmit().is_some() {
                oacks += 1;
            }
            t = deadline;
            s.handle_timeout(t);
        }
        assert_eq!(s.status(), &Status::TimedOut);
        assert_eq!(oacks, 1 + 5, "first OACK plus one per retry");
        assert!(t - now <= Duration::from_millis(600));
    }

    #[test]
    fn error_after_oack_ends_quietly() {
        let now = Instant::now();
        let opts = Options {
            tsize: Some(10),
            ..Default::default()
        };
        let mut s = Sender::new(params(512, 1), Some(opts), now);
        s.poll_transmit();
        s.handle(
            &Packet::error(ErrorCode::OptionRefused, "tsize probe only"),
            now,
        );
        assert!(matches!(s.status(), Status::PeerError { quiet: true, .. }));
        assert!(s.poll_transmit().is_none());
        assert!(s.poll_timeout().is_none());
    }

    #[test]
    fn error_mid_transfer_stops_both_sides() {
        let now = Instant::now();
        let file = payload(5000);
        let mut s = Sender::new(params(512, 1), None, now);
        let mut off = 0;
        feed(&mut s, &file, &mut off, now);
        s.poll_transmit();
        s.handle(&Packet::Ack { block: 1 }, now);
        s.handle(&Packet::error(ErrorCode::DiskFull, "disk full"), now);
        assert!(matches!(
            s.status(),
            Status::PeerError {
                code: ErrorCode::DiskFull,
                quiet: false,
                ..
            }
        ));
        assert!(s.poll_timeout().is_none());

        let rrq = Packet::Rrq {
            filename: "f".into(),
            mode: "octet".into(),
            options: Options::default(),
        };
        let mut r = Receiver::new(&rrq, params(512, 1), now);
        r.poll_transmit();
        r.handle(
            &Packet::Data {
                block: 1,
                data: Bytes::from(vec![1; 512]),
            },
            now,
        );
        r.handle(
            &Packet::error(ErrorCode::NotDefined, "upstream failed"),
            now,
        );
        assert!(matches!(r.status(), Status::PeerError { .. }));
        assert_eq!(r.bytes(), 512);
    }

    #[test]
    fn receiver_falls_back_when_server_ignores_options() {
        let now = Instant::now();
        let rrq = Packet::Rrq {
            filename: "f".into(),
            mode: "octet".into(),
            options: Options {
                blksize: Some(1428),
                windowsize: Some(16),
                ..Default::default()
            },
        };
        let mut r = Receiver::new(&rrq, params(1428, 16), now);
        r.poll_transmit();
        r.handle(
            &Packet::Data {
                block: 1,
                data: Bytes::from(vec![7; 512]),
            },
            now,
        );
        let n = r.negotiated().unwrap();
        assert!(n.fell_back);
        assert_eq!(n.params.blksize, 512);
        assert_eq!(n.params.windowsize, 1);
        // Lock-step: block 1 is acknowledged at once.
        assert_eq!(
            Packet::decode(&r.poll_transmit().unwrap()).unwrap(),
            Packet::Ack { block: 1 }
        );
    }

    #[test]
    fn receiver_refuses_an_oack_it_did_not_ask_for() {
        let now = Instant::now();
        let rrq = Packet::Rrq {
            filename: "f".into(),
            mode: "octet".into(),
            options: Options {
                blksize: Some(512),
                ..Default::default()
            },
        };
        let mut r = Receiver::new(&rrq, params(512, 1), now);
        r.poll_transmit();
        r.handle(
            &Packet::Oack {
                options: Options {
                    blksize: Some(9000),
                    ..Default::default()
                },
            },
            now,
        );
        assert!(matches!(r.status(), Status::Protocol(_)));
        let e = Packet::decode(&r.poll_transmit().unwrap()).unwrap();
        assert!(matches!(
            e,
            Packet::Error {
                code: ErrorCode::OptionRefused,
                ..
            }
        ));
    }

    fn limits() -> Limits {
        Limits {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(5),
            retries: 6,
        }
    }

    fn rrq(mode: &str, options: Options) -> Packet {
        Packet::Rrq {
            filename: "f".into(),
            mode: mode.into(),
            options,
        }
    }

    #[test]
    fn a_plain_request_gets_rfc_1350_defaults_and_no_oack() {
        let (p, oack) = accept(&rrq("octet", Options::default()), &limits(), Some(10)).unwrap();
        assert_eq!(p, Params::default());
        assert_eq!(oack, None);
    }

    #[test]
    fn options_are_answered_within_the_caps() {
        let asked = Options {
            blksize: Some(65464),
            windowsize: Some(1000),
            timeout: Some(255),
            tsize: Some(0),
            unknown: vec![("multicast".into(), "".into())],
        };
        let (p, oack) = accept(&rrq("OCTET", asked), &limits(), Some(4000)).unwrap();
        let oack = oack.unwrap();
        assert_eq!((p.blksize, p.windowsize), (1468, 64));
        // RFC 2349 asks up to 255 s; the cap is what we answer and what we use.
        assert_eq!(oack.timeout, Some(5));
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!(oack.tsize, Some(4000));
        assert!(oack.unknown.is_empty(), "unknown options are ignored");
    }

    #[test]
    fn tsize_of_an_empty_file_is_not_offered_for_curl() {
        let asked = Options {
            tsize: Some(0),
            ..Default::default()
        };
        // curl 7.88 rejects an OACK with `tsize 0`: no OACK at all, a plain transfer.
        let (_, oack) = accept(&rrq("octet", asked.clone()), &limits(), Some(0)).unwrap();
        assert_eq!(oack, None);
        // Unknown size (a miss whose upstream gave none) and netascii: not offered either.
        assert_eq!(
            accept(&rrq("octet", asked.clone()), &limits(), None)
                .unwrap()
                .1,
            None
        );
        assert_eq!(
            accept(&rrq("netascii", asked), &limits(), Some(9))
                .unwrap()
                .1,
            None
        );
    }

    #[test]
    fn unsupported_modes_and_non_read_requests_are_illegal_operations() {
        let e = accept(&rrq("mail", Options::default()), &limits(), Some(1)).unwrap_err();
        assert_eq!(e.code, ErrorCode::IllegalOperation);
        let wrq = Packet::Wrq {
            filename: "f".into(),
            mode: "octet".into(),
            options: Options::default(),
        };
        assert_eq!(
            accept(&wrq, &limits(), None).unwrap_err().code,
            ErrorCode::IllegalOperation
        );
    }

    #[test]
    fn an_unanswered_transfer_ends_after_its_probation() {
        let t0 = Instant::now();
        let asked = Options {
            timeout: Some(255),
            ..Default::default()
        };
        let (p, oack) = accept(&rrq("octet", asked), &limits(), Some(9)).unwrap();
        let probation = limits().probation(&p);
        let mut s = Sender::on_probation(p, oack, Some(probation), t0);
        let mut sent = 0;
        let mut now = t0;
        while let Some(d) = s.poll_timeout() {
            while s.poll_transmit().is_some() {
                sent += 1;
            }
            now = d;
            s.handle_timeout(now);
        }
        assert_eq!(*s.status(), Status::TimedOut);
        assert!(!s.is_proven());
        // The OACK and two resends, one base timeout apart: 3 s, not 7 × 255 s.
        assert_eq!(sent, 1 + PROBATION_RETRIES as usize);
        assert_eq!(now - t0, Duration::from_secs(3));
    }

    #[test]
    fn a_client_that_answers_gets_its_negotiated_timeout_and_retries() {
        let t0 = Instant::now();
        let asked = Options {
            timeout: Some(4),
            ..Default::default()
        };
        let (p, oack) = accept(&rrq("octet", asked), &limits(), Some(9)).unwrap();
        let mut s = Sender::on_probation(p, oack, Some(limits().probation(&p)), t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        s.handle(&Packet::Ack { block: 0 }, t0);
        assert!(s.is_proven());
        s.push_data(Bytes::from_static(b"short"), t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn the_tid_rule_answers_strangers_only() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(foreign_tid(peer, peer).is_none());
        let e = foreign_tid(peer, "127.0.0.1:5001".parse().unwrap()).unwrap();
        assert!(matches!(
            Packet::decode(&e).unwrap(),
            Packet::Error {
                code: ErrorCode::UnknownTid,
                ..
            }
        ));
    }
}
