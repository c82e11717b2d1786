//! Admission, shared by the TFTP and HTTP front ends: the allow list, a per-client limit (per
//! address: a branch's phones share one /24, so never per prefix) and a global limit on
//! transfers (`access.max_transfers`, the serving count of CUCM's TFTP service).
//!
//! Beyond the global limit, TFTP requests wait in a short FIFO queue and are served as slots
//! free; "server busy" only when the queue is full or the wait runs out. A TFTP slot is cheap
//! until its client proves it is there (acknowledges something): after a grace (at least
//! [`PROOF_GRACE`], longer while answering clients are slow) an unproven transfer may be displaced by a new request, so spoofed requests that will never be
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
    next_waiter: u64,
    /// A task is nudging the queue (one per gate while it is not empty, not one per waiter:
    /// thousands of waiters each waking 8 times a second cost a storm its CPU).
    nudging: bool,
}

struct Waiter {
    id: u64,
    ip: IpAddr,
    protocol: &'static str,
    tx: oneshot::Sender<Slot>,
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
        let handed = {
            let mut st = self.gate.state.lock().unwrap();
            st.release(&self.claim);
            if self.claim.proven.load(Ordering::Acquire) {
                st.last_served = Some(Instant::now());
            }
            self.gate.hand_over(&mut st)
        };
        drop(handed);
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
        counted(self.enqueue(ip, protocol)?.wait().await)
    }

    /// [`Gate::admit_queued`] up to the wait: a slot now, or a place in the queue.
    fn enqueue(self: &Arc<Self>, ip: IpAddr, protocol: &'static str) -> Result<Queued, Refusal> {
        let rx = match self.try_admit(ip, protocol) {
            Err(Refusal::Busy) => {
                let (max_total, max_client) = self.limits();
                let mut st = self.state.lock().unwrap();
                let mine = st.per_client.get(&ip).copied().unwrap_or(0);
                if mine >= max_client {
                    return Err(Refusal::Busy);
                }
                let mut displaced = None;
                if st.queue.len() >= max_total {
                    // A full queue: the oldest silent transfer goes now, grace or not, so a
                    // burst of spoofed requests cannot lock phones out of the queue itself.
                    match st.displace(Instant::now(), Duration::ZERO) {
                        Some(d) => displaced = Some(d),
                        None => return Err(Refusal::Busy),
                    }
                }
                // A slot may have freed since `admit` looked: `hand_over` below gives it out.
                let (tx, rx) = oneshot::channel();
                st.next_waiter += 1;
                let id = st.next_waiter;
                st.queue.push_back(Waiter {
                    id,
                    ip,
                    protocol,
                    tx,
                });
                *st.per_client.entry(ip).or_insert(0) += 1;
                let handed = self.hand_over(&mut st);
                let nudge = !st.queue.is_empty() && !std::mem::replace(&mut st.nudging, true);
                drop(st);
                drop(handed);
                if let Some(d) = displaced {
                    d();
                }
                if nudge {
                    tokio::spawn(self.clone().nudge_while_queued());
                }
                Queued {
                    gate: self.clone(),
                    id,
                    rx,
                    waiting: true,
                }
            }
            Ok(slot) => Queued::granted(self, slot),
            Err(e) => return Err(e),
        };
        Ok(rx)
    }

    /// Gives free slots (and slots of transfers on probation past their grace) to the
    /// queue's head, in order. Returns slots whose waiter had gone, to be dropped by the
    /// caller outside the lock.
    fn hand_over(self: &Arc<Self>, st: &mut State) -> Vec<Slot> {
        let mut gone = Vec::new();
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
            if let Err(slot) = w.tx.send(slot) {
                // Its request was given up; undo here rather than in Drop (we hold the lock).
                slot.claim.released.store(true, Ordering::Release);
                st.release(&slot.claim);
                gone.push(slot);
            }
        }
        for d in displaced {
            d();
        }
        gone
    }

    /// Hands slots of transfers whose grace has run out to queued requests while the queue is
    /// not empty, so a full house of silent clients drains.
    async fn nudge_while_queued(self: Arc<Self>) {
        loop {
            tokio::time::sleep(NUDGE_EVERY).await;
            let handed = {
                let mut st = self.state.lock().unwrap();
                let handed = self.hand_over(&mut st);
                if st.queue.is_empty() {
                    st.nudging = false;
                    drop(st);
                    drop(handed);
                    return;
                }
                handed
            };
            drop(handed);
        }
    }
}

/// Counts a "busy" answer (`branchtftp_refused_total{reason="busy"}`).
fn counted(r: Result<Slot, Refusal>) -> Result<Slot, Refusal> {
    if matches!(r, Err(Refusal::Busy)) {
        crate::metrics::global().refused("busy");
    }
    r
}

/// A request in the admission queue; leaving the queue (given up or timed out) on drop.
struct Queued {
    gate: Arc<Gate>,
    id: u64,
    rx: oneshot::Receiver<Slot>,
    /// Still in the queue (not yet handed a slot).
    waiting: bool,
}

impl Queued {
    /// A request admitted at once: its slot is already in the channel.
    fn granted(gate: &Arc<Gate>, slot: Slot) -> Queued {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(slot);
        Queued {
            gate: gate.clone(),
            id: 0,
            rx,
            waiting: false,
        }
    }

    async fn wait(mut self) -> Result<Slot, Refusal> {
        match tokio::time::timeout(QUEUE_WAIT, &mut self.rx).await {
            Ok(Ok(slot)) => {
                self.waiting = false;
                Ok(slot)
            }
            Ok(Err(_)) | Err(_) => Err(Refusal::Busy),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.waiting {
            return;
        }
        let mut st = self.gate.state.lock().unwrap();
        if let Some(i) = st.queue.iter().position(|w| w.id == self.id) {
            let w = st.queue.remove(i).expect("found");
            st.forget_client(w.ip);
        }
    }
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
    fn the_per_client_limit_counts_addresses() {
        let g = gate(10, 2);
        let _a = g.admit(ip(1), "tftp").unwrap();
        let _b = g.admit(ip(1), "tftp").unwrap();
        assert_eq!(g.admit(ip(1), "tftp").unwrap_err(), Refusal::Busy);
        assert!(g.admit(ip(2), "tftp").is_ok());
    }
}
