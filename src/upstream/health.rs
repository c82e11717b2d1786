//! The health of one upstream as a circuit breaker, after Envoy's outlier detection and
//! HAProxy's `fall 1`/`rise 1`: requests go to an upstream that is up (or not yet asked); its
//! first transport failure (timeout, refused, reset, unresolvable) marks it down, and while it
//! is down requests skip it at once and one background probe at a time asks it every probe
//! interval. The first success, a request's or a probe's, marks it up again. "Not found" and
//! other answers are success: the upstream is there.
//!
//! Only transitions change anything: twenty requests that time out together during one hang
//! are one down-marking, not twenty (the backoff of the design this replaces doubled per failed
//! request and reached five minutes within 100 ms of a storm). The probe interval grows by a
//! tenth per failed probe, up to [`MAX_PROBE_INTERVAL`], so a long outage costs the WAN little
//! while a short one is noticed within one configured interval.
//!
//! This is pure bookkeeping: the caller passes the time in and acts on the transitions.

use std::time::{Duration, Instant, SystemTime};

/// The longest the probe interval grows to while probes keep failing.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// How much longer the wait before the next probe gets after each failed probe.
const PROBE_GROWTH: f64 = 1.1;

/// Health as shown on the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamState {
    /// Answered last time it was asked.
    Up,
    /// Failed at the transport level; skipped and probed.
    Down,
    /// Not asked yet since start or reload (requests go to it).
    Unknown,
}

impl UpstreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Up => "up",
            UpstreamState::Down => "down",
            UpstreamState::Unknown => "unknown",
        }
    }
}

/// A change of state the caller logs, counts, and (for `Down`) starts a probe for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    /// `start_probe` is false when a probe is already running.
    Down {
        start_probe: bool,
    },
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    state: UpstreamState,
    probe_interval: Duration,
    /// The wait before the next probe; grows while probes fail.
    interval: Duration,
    next_probe: Option<Instant>,
    /// Whether a probe task runs (at most one per upstream).
    probing: bool,
    pub last_ok: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub last_transition: Option<SystemTime>,
}

impl Breaker {
    pub fn new(probe_interval: Duration) -> Breaker {
        Breaker {
            state: UpstreamState::Unknown,
            probe_interval,
            interval: probe_interval,
            next_probe: None,
            probing: false,
            last_ok: None,
            last_error: None,
            last_transition: None,
        }
    }

    pub fn state(&self) -> UpstreamState {
        self.state
    }

    pub fn is_down(&self) -> bool {
        self.state == UpstreamState::Down
    }

    /// When the next probe is due (only while down).
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe.filter(|_| self.is_down())
    }

    /// The upstream answered (a request or a probe).
    pub fn succeeded(&mut self, wall: SystemTime) -> Option<Transition> {
        self.last_ok = Some(wall);
        let was = self.state;
        self.state = UpstreamState::Up;
        self.interval = self.probe_interval;
        self.next_probe = None;
        (was != UpstreamState::Up).then(|| {
            self.last_transition = Some(wall);
            Transition::Up
        })
    }

    /// A request failed at the transport level. Only the first failure while up is a
    /// transition; later ones (the rest of a storm) change nothing but the last error.
    pub fn failed(&mut self, now: Instant, wall: SystemTime, why: &str) -> Option<Transition> {
        self.last_error = Some((wall, why.to_string()));
        if self.is_down() {
            return None;
        }
        self.state = UpstreamState::Down;
        self.interval = self.probe_interval;
        self.next_probe = Some(now + self.interval);
        self.last_transition = Some(wall);
        let start_probe = !std::mem::replace(&mut self.probing, true);
        Some(Transition::Down { start_probe })
    }

    /// A probe failed: the next one waits a little longer.
    pub fn probe_failed(&mut self, now: Instant, wall: SystemTime, why: &str) {
        self.last_error = Some((wall, why.to_string()));
        self.interval = self.interval.mul_f64(PROBE_GROWTH).min(MAX_PROBE_INTERVAL);
        self.next_probe = Some(now + self.interval);
    }

    /// The probe task asks what to do next: `Some(due)` to probe at `due`, `None` to end
    /// (the upstream is up again). Ending clears the probing flag under the same lock as the
    /// next down-marking reads it, so a new outage always gets a probe.
    pub fn probe_due(&mut self) -> Option<Instant> {
        match self.next_probe() {
            Some(due) => Some(due),
            None => {
                self.probing = false;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_storm_of_concurrent_failures_is_one_transition_and_one_probe() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut b = Breaker::new(s(5));
        assert_eq!(
            b.failed(t0, w, "timed out"),
            Some(Transition::Down { start_probe: true })
        );
        for _ in 0..19 {
            assert_eq!(b.failed(t0, w, "timed out"), None);
        }
        assert!(b.is_down());
        // The probe stays at the configured interval however many requests failed.
        assert_eq!(b.next_probe(), Some(t0 + s(5)));
    }

    #[test]
    fn first_success_marks_up_and_stops_probing() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut b = Breaker::new(s(2));
        assert_eq!(b.state(), UpstreamState::Unknown);
        b.failed(t0, w, "refused");
        assert_eq!(b.probe_due(), Some(t0 + s(2)));
        assert_eq!(b.succeeded(w), Some(Transition::Up));
        assert_eq!(b.succeeded(w), None, "up stays up: no second transition");
        assert_eq!(b.probe_due(), None, "the probe ends once up");
        // The next outage starts a new probe.
        assert_eq!(
            b.failed(t0, w, "refused"),
            Some(Transition::Down { start_probe: true })
        );
    }

    #[test]
    fn a_running_probe_is_not_doubled_by_a_quick_second_outage() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut b = Breaker::new(s(2));
        b.failed(t0, w, "refused");
        b.succeeded(w); // a request got through before the probe task looked again
        assert_eq!(
            b.failed(t0, w, "refused"),
            Some(Transition::Down { start_probe: false }),
            "the probe task still runs and takes the new outage"
        );
        assert!(b.probe_due().is_some());
    }

    #[test]
    fn probe_interval_grows_slowly_only_while_probes_fail_and_stops_at_a_minute() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut b = Breaker::new(s(5));
        b.failed(t0, w, "timed out");
        b.probe_failed(t0, w, "timed out");
        assert_eq!(b.next_probe(), Some(t0 + Duration::from_millis(5500)));
        for _ in 0..100 {
            b.probe_failed(t0, w, "timed out");
        }
        assert_eq!(b.next_probe(), Some(t0 + MAX_PROBE_INTERVAL));
        // Recovery resets the interval for the next outage.
        b.succeeded(w);
        b.failed(t0, w, "timed out");
        assert_eq!(b.next_probe(), Some(t0 + s(5)));
    }
}
