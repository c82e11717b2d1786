//! Admission, shared by the TFTP and HTTP front ends: the allow list, a per-client limit (per
//! address: a branch's phones share one /24, so never per prefix) and a global limit on
//! transfers (`access.max_transfers`, the serving count of CUCM's TFTP service).
//!
//! Beyond the global limit, TFTP requests wait in a short FIFO queue and are served as slots
//! free; "server busy" only when the queue is full or the wait runs out. A queued request is
//! a callback ([`Admitted`]), not a task: the thread that frees a slot (a TFTP event loop)
//! starts the next transfer itself, which in a storm is most of them.
//!
//! A TFTP slot is cheap until its client proves it is there (acknowledges something): after
//! a grace (at least [`PROOF_GRACE`], longer while answering clients are slow) an unproven
//! transfer may be displaced by a new request, so spoofed requests that will never be
//! answered cannot keep phones out. Proven transfers are never displaced.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::AccessConfig;

/// How long a new transfer's client gets to acknowledge its first packet before its slot may
/// go to a new request: far above any LAN round trip, well under a phone's 1 s resend. The
/// least grace: see [`Gate::grace`].
pub const PROOF_GRACE: Duration = Duration::from_millis(500);
/// The most grace, when real clients are slow to answer (a storm loading the phones' LAN or
/// the box): still within a phone's patience, and within an unanswered transfer's life.
const MAX_PROOF_GRACE: Duration = Duration::from_secs(2);
/// Longest wait in the admission queue before "server busy". A phone resends its request each
/// second (resends are absorbed by the queued request) and gives up after its fourth send
/// goes unanswered, about 4 s after the first: a slot given within 3 s still reaches it, and
/// "busy" earlier would fail a phone the storm would have served (issue 12: 130 of 5,000
/// phones were told "busy" after a 1 s wait).
pub const QUEUE_WAIT: Duration = Duration::from_secs(3);
/// How often a non-empty queue looks for transfers on probation past their grace.
const NUDGE_EVERY: Duration = Duration::from_millis(125);

/// Admission control shared by the TFTP and HTTP front ends.
pub struct Gate {
    access: Mutex<AccessConfig>,
    state: Mutex<State>,
    /// Moving average of how long clients that did answer took to answer, in microseconds.
    proof_micros: AtomicU64,
    /// Where the queue's nudging task runs: requests are queued from the TFTP event loops,
    /// which are not runtime threads.
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("active", &self.active())
            .finish()
    }
}

#[derive(Default)]
struct State {
    total: usize,
    /// When a client that had answered last gave its slot back: slots are turning over, so
    /// the queue is being served without displacing anyone.
    last_served: Option<Instant>,
    /// Active and queued requests per client address.
    per_client: HashMap<IpAddr, usize>,
    /// Running transfers whose client has not answered yet, oldest first (proven or released
    /// ones are skipped lazily).
    probation: VecDeque<Arc<Claim>>,
    queue: VecDeque<Waiter>,
    /// A task is nudging the queue (one per gate while it is not empty, not one per waiter:
    /// thousands of waiters each waking 8 times a second cost a storm its CPU).
    nudging: bool,
}

struct Waiter {
    ip: IpAddr,
    protocol: &'static str,
    /// Queued at: the wait ends with "busy" at `since + QUEUE_WAIT`.
    since: Instant,
    then: Admitted,
}

/// What a queued request does once it has its answer: a slot, or "busy" when the queue was
/// full or its wait ran out. It runs on the thread that freed the slot (a TFTP event loop,
/// which starts the transfer itself: no task, no wake-up) or on the task that gave up on it.
pub type Admitted = Box<dyn FnOnce(Result<Slot, Refusal>) + Send>;

/// Answers to queued requests decided under the state lock, given once it is released, so
/// that what an answer does (start a transfer, or free its slot again) never runs under it.
#[must_use]
struct Answers(Vec<Answer>);

/// A queued request and what it is told.
type Answer = (Admitted, Result<Slot, Refusal>);

thread_local! {
    /// Answers due on this thread while it is already answering: an answer that frees a slot
    /// (a refused start) hands it over again, and a chain of those must not grow the stack.
    static ANSWERING: std::cell::RefCell<Option<Vec<Answer>>> =
        const { std::cell::RefCell::new(None) };
}

impl Answers {
    fn give(self) {
        let Answers(mut now) = self;
        if now.is_empty() {
            return;
        }
        let nested = ANSWERING.with(|a| match a.borrow_mut().as_mut() {
            Some(later) => {
                later.append(&mut now);
                true
            }
            None => false,
        });
        if nested {
            return;
        }
        /// Ends this thread's turn at answering, even if an answer panics (a runtime worker
        /// lives on after a task's panic, and must not defer every later answer for ever).
        struct Turn;
        impl Drop for Turn {
            fn drop(&mut self) {
                ANSWERING.with(|a| *a.borrow_mut() = None);
            }
        }
        ANSWERING.with(|a| *a.borrow_mut() = Some(Vec::new()));
        let _turn = Turn;
        while !now.is_empty() {
            for (then, answer) in now.drain(..) {
                if matches!(answer, Err(Refusal::Busy)) {
                    crate::metrics::global().refused("busy");
                }
                then(answer);
            }
            now = ANSWERING.with(|a| {
                a.borrow_mut()
                    .as_mut()
                    .map(std::mem::take)
                    .unwrap_or_default()
            });
        }
    }
}

/// How to end a transfer on probation (its engine's cancel command).
type Displace = Box<dyn FnOnce() + Send>;

/// One admitted transfer's share of the counts.
struct Claim {
    ip: IpAddr,
    protocol: &'static str,
    /// Its counts were given back (by the slot's drop, or by displacement).
    released: AtomicBool,
    proven: AtomicBool,
    /// On probation since, with the way to end the transfer.
    probation: Mutex<Option<(Instant, Displace)>>,
}

/// Why a client was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside `access.allow`.
    Denied,
    /// Over `access.max_per_client`, or over `access.max_transfers` with a full queue.
    Busy,
}

/// One admitted transfer; releases its slot when dropped.
pub struct Slot {
    gate: Arc<Gate>,
    claim: Arc<Claim>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("ip", &self.claim.ip).finish()
    }
}

impl Slot {
    /// The transfer is running and waits for its client's first answer; after
    /// its grace ([`Gate::grace`]) a new request may take the slot, calling `displace` to end it.
    pub fn on_probation(&self, displace: Displace) {
        if self.claim.proven.load(Ordering::Acquire) {
            return;
        }
        *self.claim.probation.lock().unwrap() = Some((Instant::now(), displace));
        self.gate
            .state
            .lock()
            .unwrap()
            .probation
            .push_back(self.claim.clone());
    }

    /// The client answered: this transfer is never displaced.
    pub fn proven(&self) {
        self.claim.proven.store(true, Ordering::Release);
        if let Some((since, _)) = self.claim.probation.lock().unwrap().take() {
            self.gate.note_proof(since.elapsed());
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.claim.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let answers = {
            let mut st = self.gate.state.lock().unwrap();
            st.release(&self.claim);
            if self.claim.proven.load(Ordering::Acquire) {
                st.last_served = Some(Instant::now());
            }
            self.gate.hand_over(&mut st)
        };
        answers.give();
    }
}

impl State {
    fn release(&mut self, claim: &Claim) {
        crate::metrics::global().active(claim.protocol).dec();
        self.total -= 1;
        self.forget_client(claim.ip);
    }

    fn forget_client(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_client.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&ip);
            }
        }
    }

    /// Takes the waiters queued for [`QUEUE_WAIT`] or longer out of the queue, to be told
    /// "busy".
    fn expire(&mut self, now: Instant, answers: &mut Answers) {
        while self
            .queue
            .front()
            .is_some_and(|w| now.saturating_duration_since(w.since) >= QUEUE_WAIT)
        {
            let w = self.queue.pop_front().expect("not empty");
            self.forget_client(w.ip);
            answers.0.push((w.then, Err(Refusal::Busy)));
        }
    }

    /// [`State::displace`] when slots have stopped turning over: no answering client gave one
    /// back within `grace`. In a storm slots free by the hundred each second and a phone slow
    /// to answer is not displaced (issue 12: every phone that failed at 5,000 had been); under
    /// a flood of spoofed requests nobody answers, nothing frees, and silent transfers go.
    fn displace_if_stuck(&mut self, now: Instant, grace: Duration) -> Option<Displace> {
        if self
            .last_served
            .is_some_and(|at| now.saturating_duration_since(at) < grace)
        {
            return None;
        }
        self.displace(now, grace)
    }

    /// Frees the slot of the oldest transfer on probation past its grace, if any; returns
    /// how to end that transfer.
    fn displace(&mut self, now: Instant, grace: Duration) -> Option<Displace> {
        while let Some(claim) = self.probation.front() {
            if claim.released.load(Ordering::Acquire) || claim.proven.load(Ordering::Acquire) {
                self.probation.pop_front();
                continue;
            }
            let mut p = claim.probation.lock().unwrap();
            match &*p {
                Some((since, _)) if now.duration_since(*since) >= grace => {}
                // The oldest is still within its grace, so is everyone behind it.
                Some(_) => return None,
                None => {
                    drop(p);
                    self.probation.pop_front();
                    continue;
                }
            }
            let (_, displace) = p.take()?;
            drop(p);
            let claim = self.probation.pop_front()?;
            if claim.released.swap(true, Ordering::AcqRel) {
                continue;
            }
            self.release(&claim);
            crate::metrics::global().request("tftp", "displaced");
            return Some(displace);
        }
        None
    }
}

impl Gate {
    pub fn new(access: AccessConfig) -> Arc<Gate> {
        Arc::new(Gate {
            access: Mutex::new(access),
            state: Mutex::new(State::default()),
            proof_micros: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// How long a transfer on probation keeps its slot against a new request: four times what
    /// answering clients take now, within [`PROOF_GRACE`]..[`MAX_PROOF_GRACE`]. Spoofed
    /// sources never answer, so they do not stretch it; phones slowed by a storm do, and are
    /// not displaced for being slow (issue 12: displaced phones heard "unknown transfer ID"
    /// from the reused port or nothing at all, and gave up).
    fn grace(&self) -> Duration {
        let typical = Duration::from_micros(self.proof_micros.load(Ordering::Relaxed));
        (typical * 4).clamp(PROOF_GRACE, MAX_PROOF_GRACE)
    }

    /// Folds one client's time to answer into the average (weight 1/8; a lost race between
    /// two updates loses a sample, nothing more).
    fn note_proof(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.proof_micros.load(Ordering::Relaxed);
        let new = old - old / 8 + sample / 8;
        self.proof_micros.store(new, Ordering::Relaxed);
    }

    /// Applies a reloaded access section; transfers in flight keep their slots.
    pub fn update(&self, access: AccessConfig) {
        *self.access.lock().unwrap() = access;
    }

    /// Transfers holding a slot now.
    pub fn active(&self) -> usize {
        self.state.lock().unwrap().total
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }

    /// Whether `ip` is inside `access.allow` (IPv4-mapped IPv6 checked as IPv4).
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.access.lock().unwrap().allows(ip)
    }

    fn limits(&self) -> (usize, usize) {
        let a = self.access.lock().unwrap();
        (a.max_transfers, a.max_per_client)
    }

    fn grant(self: &Arc<Self>, st: &mut State, ip: IpAddr, protocol: &'static str) -> Slot {
        st.total += 1;
        crate::metrics::global().active(protocol).inc();
        Slot {
            gate: self.clone(),
            claim: Arc::new(Claim {
                ip,
                protocol,
                released: AtomicBool::new(false),
                proven: AtomicBool::new(false),
                probation: Mutex::new(None),
            }),
        }
    }

    /// Admits one transfer of `protocol` (`tftp` or `http`) from `ip` now, or says why not.
    /// HTTP uses this: a TCP client has proven its address, and it has its own retry.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, protocol: &'static str) -> Result<Slot, Refusal> {
        counted(self.try_admit(ip, protocol))
    }

    /// [`admit`](Self::admit) without counting "busy": for a caller that queues instead
    /// ([`admit_queued`](Self::admit_queued)) when every slot is taken.
    pub fn try_admit(
        self: &Arc<Self>,
        ip: IpAddr,
        protocol: &'static str,
    ) -> Result<Slot, Refusal> {
        if !self.allows(ip) {
            return Err(Refusal::Denied);
        }
        let (max_total, max_client) = self.limits();
        let (slot, displace) = {
            let mut st = self.state.lock().unwrap();
            if st.per_client.get(&ip).copied().unwrap_or(0) >= max_client {
                return Err(Refusal::Busy);
            }
            let displace = if st.total >= max_total {
                match st.displace_if_stuck(Instant::now(), self.grace()) {
                    Some(d) => Some(d),
                    None => return Err(Refusal::Busy),
                }
            } else {
                None
            };
            *st.per_client.entry(ip).or_insert(0) += 1;
            (self.grant(&mut st, ip, protocol), displace)
        };
        if let Some(d) = displace {
            d();
        }
        Ok(slot)
    }

    /// Admits one transfer, waiting in the queue (at most [`QUEUE_WAIT`], in arrival order)
    /// while every slot is taken. The queue holds as many requests as there are slots.
    pub async fn admit_queued(
        self: &Arc<Self>,
        ip: IpAddr,
        protocol: &'static str,
    ) -> Result<Slot, Refusal> {
        let (tx, rx) = oneshot::channel();
        self.queue_for(
            ip,
            protocol,
            Box::new(move |answer| {
                // Gone (its request was given up): a slot in the answer is dropped, and freed.
                let _ = tx.send(answer);
            }),
        );
        rx.await.unwrap_or(Err(Refusal::Busy))
    }

    /// [`admit_queued`](Self::admit_queued) without a task: `then` is called with the slot
    /// now, or later from the thread that frees one, or with "busy" when the queue is full or
    /// the wait runs out (within [`NUDGE_EVERY`] of [`QUEUE_WAIT`]).
    pub fn queue_for(self: &Arc<Self>, ip: IpAddr, protocol: &'static str, then: Admitted) {
        match self.try_admit(ip, protocol) {
            Err(Refusal::Busy) => self.enqueue(ip, protocol, then).give(),
            answer => then(answer),
        }
    }

    /// Queues `then` behind every slot being taken, unless its client is at its limit or
    /// the queue is full.
    fn enqueue(self: &Arc<Self>, ip: IpAddr, protocol: &'static str, then: Admitted) -> Answers {
        let (max_total, max_client) = self.limits();
        let mut st = self.state.lock().unwrap();
        let mine = st.per_client.get(&ip).copied().unwrap_or(0);
        if mine >= max_client {
            return Answers(vec![(then, Err(Refusal::Busy))]);
        }
        let mut displaced = None;
        if st.queue.len() >= max_total {
            // A full queue: the oldest silent transfer goes now, grace or not, so a burst of
            // spoofed requests cannot lock phones out of the queue itself.
            match st.displace(Instant::now(), Duration::ZERO) {
                Some(d) => displaced = Some(d),
                None => return Answers(vec![(then, Err(Refusal::Busy))]),
            }
        }
        st.queue.push_back(Waiter {
            ip,
            protocol,
            since: Instant::now(),
            then,
        });
        *st.per_client.entry(ip).or_insert(0) += 1;
        crate::metrics::global().queued.inc();
        // A slot may have freed since `try_admit` looked: `hand_over` gives it out.
        let answers = self.hand_over(&mut st);
        let nudge = !st.queue.is_empty() && !std::mem::replace(&mut st.nudging, true);
        drop(st);
        if let Some(d) = displaced {
            d();
        }
        if nudge {
            self.start_nudging();
        }
        answers
    }

    /// Gives free slots (and slots of transfers on probation past their grace) to the
    /// queue's head, in order. The answers are the caller's to give once it has let go of
    /// the lock.
    fn hand_over(self: &Arc<Self>, st: &mut State) -> Answers {
        let mut answers = Answers(Vec::new());
        let (max_total, _) = self.limits();
        let mut displaced = Vec::new();
        while !st.queue.is_empty() {
            if st.total >= max_total {
                match st.displace_if_stuck(Instant::now(), self.grace()) {
                    Some(d) => displaced.push(d),
                    None => break,
                }
            }
            let w = st.queue.pop_front().expect("not empty");
            let slot = self.grant(st, w.ip, w.protocol);
            answers.0.push((w.then, Ok(slot)));
        }
        for d in displaced {
            d();
        }
        answers
    }

    /// Runs [`nudge`](Self::nudge) every [`NUDGE_EVERY`] until the queue is empty: on the
    /// runtime, or on a thread of its own where there is none (a gate made outside one).
    fn start_nudging(self: &Arc<Self>) {
        let gate = self.clone();
        match &self.runtime {
            Some(rt) => {
                rt.spawn(async move {
                    loop {
                        tokio::time::sleep(NUDGE_EVERY).await;
                        if !gate.nudge() {
                            return;
                        }
                    }
                });
            }
            None => {
                std::thread::spawn(move || loop {
                    std::thread::sleep(NUDGE_EVERY);
                    if !gate.nudge() {
                        return;
                    }
                });
            }
        }
    }

    /// Hands slots of transfers whose grace has run out to queued requests, so a full house
    /// of silent clients drains, and tells requests that waited [`QUEUE_WAIT`] "busy".
    /// Whether the queue still holds anyone (else nudging stops).
    fn nudge(self: &Arc<Self>) -> bool {
        let (answers, queued) = {
            let mut st = self.state.lock().unwrap();
            let mut answers = self.hand_over(&mut st);
            st.expire(Instant::now(), &mut answers);
            let queued = !st.queue.is_empty();
            st.nudging = queued;
            (answers, queued)
        };
        answers.give();
        queued
    }
}

/// Counts a "busy" answer (`branchtftp_refused_total{reason="busy"}`).
fn counted(r: Result<Slot, Refusal>) -> Result<Slot, Refusal> {
    if matches!(r, Err(Refusal::Busy)) {
        crate::metrics::global().refused("busy");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_transfers: usize, max_per_client: usize) -> Arc<Gate> {
        Gate::new(AccessConfig {
            max_transfers,
            max_per_client,
            ..AccessConfig::default()
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[tokio::test]
    async fn a_full_house_queues_in_order_and_serves_as_slots_free() {
        let g = gate(1, 4);
        let first = g.admit(ip(1), "tftp").unwrap();
        let g2 = g.clone();
        let waiting = tokio::spawn(async move { g2.admit_queued(ip(2), "tftp").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.queued(), 1);
        drop(first);
        let slot = waiting.await.unwrap().unwrap();
        assert_eq!((g.active(), g.queued()), (1, 0));
        drop(slot);
        assert_eq!(g.active(), 0);
    }

    #[tokio::test]
    async fn busy_only_when_the_queue_is_full_or_the_wait_runs_out() {
        let g = gate(1, 4);
        let _held = g.admit(ip(1), "tftp").unwrap();
        _held.proven();
        let g2 = g.clone();
        let queued = tokio::spawn(async move { g2.admit_queued(ip(2), "tftp").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The queue holds as many as there are slots: one.
        assert_eq!(
            g.admit_queued(ip(3), "tftp").await.unwrap_err(),
            Refusal::Busy
        );
        let t = Instant::now();
        assert_eq!(queued.await.unwrap().unwrap_err(), Refusal::Busy);
        assert!(t.elapsed() < QUEUE_WAIT + Duration::from_millis(200));
        assert_eq!(g.queued(), 0);
        assert_eq!(g.state.lock().unwrap().per_client.get(&ip(2)), None);
    }

    #[tokio::test]
    async fn an_unproven_slot_is_displaced_after_its_grace_a_proven_one_never() {
        let g = gate(2, 4);
        let silent = g.admit(ip(1), "tftp").unwrap();
        let displaced = Arc::new(AtomicBool::new(false));
        let d = displaced.clone();
        silent.on_probation(Box::new(move || d.store(true, Ordering::Release)));
        let answering = g.admit(ip(2), "tftp").unwrap();
        answering.on_probation(Box::new(|| panic!("a proven transfer was displaced")));
        answering.proven();
        // Within the grace nobody is displaced.
        assert_eq!(g.admit(ip(3), "tftp").unwrap_err(), Refusal::Busy);
        tokio::time::sleep(PROOF_GRACE).await;
        let newcomer = g.admit(ip(3), "tftp").unwrap();
        assert!(displaced.load(Ordering::Acquire));
        assert_eq!(g.active(), 2);
        drop(silent); // its transfer ends later: the counts were already given back
        assert_eq!(g.active(), 2);
        drop((newcomer, answering));
        assert_eq!(g.active(), 0);
    }

    #[tokio::test]
    async fn while_answering_clients_keep_finishing_a_slow_one_is_not_displaced() {
        let g = gate(3, 4);
        let slow = g.admit(ip(1), "tftp").unwrap();
        slow.on_probation(Box::new(|| panic!("a slow phone was displaced in a storm")));
        let _long = g.admit(ip(2), "tftp").unwrap();
        _long.proven();
        // A storm: transfers of answering clients end all the time, past the slow one's grace.
        for _ in 0..8 {
            let quick = g.admit(ip(3), "tftp").unwrap();
            quick.proven();
            drop(quick);
            tokio::time::sleep(PROOF_GRACE / 5).await;
        }
        let _third = g.admit(ip(3), "tftp").unwrap();
        // A full house: the newcomer waits (queues) rather than displacing the slow phone.
        assert_eq!(g.admit(ip(4), "tftp").unwrap_err(), Refusal::Busy);
        drop(slow);
    }

    #[tokio::test]
    async fn slow_answering_clients_stretch_the_grace_of_silent_ones() {
        let g = gate(1, 4);
        // A storm: clients that do answer take 400 ms.
        for _ in 0..40 {
            g.note_proof(Duration::from_millis(400));
        }
        assert!(g.grace() > Duration::from_millis(1500), "{:?}", g.grace());
        let slow = g.admit(ip(1), "tftp").unwrap();
        slow.on_probation(Box::new(|| panic!("a slow phone was displaced")));
        tokio::time::sleep(PROOF_GRACE + Duration::from_millis(100)).await;
        assert_eq!(g.admit(ip(2), "tftp").unwrap_err(), Refusal::Busy);
        // Never beyond the cap, however slow.
        for _ in 0..80 {
            g.note_proof(Duration::from_secs(30));
        }
        assert_eq!(g.grace(), MAX_PROOF_GRACE);
        drop(slow);
    }

    #[test]
    fn a_queued_request_is_answered_on_the_thread_that_frees_a_slot_without_a_runtime() {
        let g = gate(1, 4);
        let held = g.admit(ip(1), "tftp").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        g.queue_for(
            ip(2),
            "tftp",
            Box::new(move |answer| {
                let _ = tx.send((answer, std::thread::current().id()));
            }),
        );
        assert_eq!(g.queued(), 1);
        assert!(rx.try_recv().is_err(), "answered before a slot freed");
        let freeing = std::thread::spawn(move || {
            drop(held);
            std::thread::current().id()
        });
        let freed_on = freeing.join().unwrap();
        let (admitted, answered_on) = rx.recv_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(answered_on, freed_on);
        assert_eq!((g.active(), g.queued()), (1, 0));
        drop(admitted.unwrap());
        assert_eq!(g.active(), 0);
    }

    #[test]
    fn a_long_chain_of_answers_that_free_their_slots_at_once_runs_without_recursing() {
        // Every queued request's start fails (bad options, say) and gives its slot straight
        // back: each answer frees a slot for the next. Answered by recursion, 20,000 of them
        // overflow the stack of the thread that freed the first.
        const N: usize = 20_000;
        let g = gate(N, N);
        let held: Vec<Slot> = (0..N).map(|_| g.admit(ip(1), "tftp").unwrap()).collect();
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..N {
            let answered = answered.clone();
            g.queue_for(
                ip(2),
                "tftp",
                Box::new(move |answer| {
                    assert!(answer.is_ok());
                    answered.fetch_add(1, Ordering::Relaxed);
                    drop(answer);
                }),
            );
        }
        assert_eq!(g.queued(), N);
        let mut held = held;
        let held = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                drop(held.pop());
                held
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(answered.load(Ordering::Relaxed), N);
        assert_eq!((g.active(), g.queued()), (N - 1, 0));
        drop(held);
        assert_eq!(g.active(), 0);
    }

    #[test]
    fn the_per_client_limit_counts_addresses() {
        let g = gate(10, 2);
        let _a = g.admit(ip(1), "tftp").unwrap();
        let _b = g.admit(ip(1), "tftp").unwrap();
        assert_eq!(g.admit(ip(1), "tftp").unwrap_err(), Refusal::Busy);
        assert!(g.admit(ip(2), "tftp").is_ok());
    }
}
