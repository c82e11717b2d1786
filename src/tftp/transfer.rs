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
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::packet::{self, ErrorCode, Options, Packet, DEFAULT_BLKSIZE};

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
    outgoing: VecDeque<Bytes>,
    bytes_acked: u64,
}

impl Sender {
    /// `oack`: the options accepted for this client, or `None` for a plain RFC 1350 transfer.
    pub fn new(params: Params, oack: Option<Options>, now: Instant) -> Sender {
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
        };
        if let Some(o) = &s.oack {
            s.outgoing.push_back(o.clone());
            s.deadline = Some(now + params.timeout);
        }
        s
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

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.outgoing.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called, if at all.
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
        if let Some(o) = &self.oack {
            self.outgoing.push_back(o.clone());
        } else {
            // Resend the whole outstanding window from the last acknowledged block + 1.
            self.next_send = self.acked + 1;
            self.pump_inner();
        }
        self.deadline = Some(now + self.params.timeout);
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
                self.outgoing
                    .push_back(Packet::error(ErrorCode::IllegalOperation, msg.clone()).encode());
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
            self.deadline = Some(now + self.params.timeout);
        }
    }

    fn pump_inner(&mut self) -> bool {
        let window_end = self.acked + self.params.windowsize as u64;
        let buffered_end = self.acked + self.buffer.len() as u64;
        let mut sent = false;
        while self.next_send <= window_end && self.next_send <= buffered_end {
            let idx = (self.next_send - self.acked - 1) as usize;
            let data = &self.buffer[idx];
            let mut out = BytesMut::with_capacity(4 + data.len());
            packet::encode_data(&mut out, wire(self.next_send), data);
            self.outgoing.push_back(out.freeze());
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
}
