//! The memory of "not found on any upstream", so the CTL/ITL misses of every booting phone cost
//! the WAN once per `sync.negative_ttl`.
//!
//! Keyed by the exact name asked upstream, not the case-folded cache key: upstreams may be
//! case-sensitive, so "not found" for `KERN.sbn` says nothing about `kern.sbn`, and one client
//! asking a variant must not blank out the real file for everyone. (No upstream is assumed to be
//! case-insensitive; a phone asking a variant costs one WAN request per TTL.)
//!
//! It is the one "not found" memory of the appliance: it records when each name was last answered
//! "not found" by every upstream, and each reader applies its own TTL (a phone's miss
//! `sync.negative_ttl`, the sync worker's discovery its own interval).
//!
//! Bounded in count ([`MAX_ENTRIES`]; names are at most a few hundred bytes, so a few MB at
//! most): a client asking thousands of random names cannot grow it without limit. Answers are
//! kept for [`STALE_MAX_AGE`] because they still answer while every upstream is unreachable
//! ("stale if error"); when full, older answers go first, then the oldest half.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an expired "not found" may still answer for an unreachable chain.
pub const STALE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Names remembered at most.
pub const MAX_ENTRIES: usize = 10_000;

/// Name asked → when every upstream last answered "not found" for it.
#[derive(Debug, Default)]
pub struct NegativeCache {
    answered: HashMap<String, Instant>,
}

impl NegativeCache {
    /// Whether `name` was answered "not found" within `ttl` before `now`.
    pub fn fresh(&self, name: &str, now: Instant, ttl: Duration) -> bool {
        self.answered.get(name).is_some_and(|&at| now < at + ttl)
    }

    /// Whether `name` was answered "not found" recently enough to say so again while no
    /// upstream can be asked.
    pub fn known_missing(&self, name: &str, now: Instant) -> bool {
        self.answered
            .get(name)
            .is_some_and(|&at| now < at + STALE_MAX_AGE)
    }

    /// Records that every upstream answered "not found" for `name` at `now`.
    pub fn insert(&mut self, name: &str, now: Instant) {
        if self.answered.len() >= MAX_ENTRIES && !self.answered.contains_key(name) {
            self.make_room(now);
        }
        self.answered.insert(name.to_string(), now);
    }

    /// Forgets every spelling of a name (`same` says which) once the file exists.
    pub fn forget(&mut self, same: impl Fn(&str) -> bool) {
        self.answered.retain(|k, _| !same(k));
    }

    pub fn clear(&mut self) {
        self.answered.clear();
    }

    pub fn len(&self) -> usize {
        self.answered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answered.is_empty()
    }

    /// Drops what can no longer answer, then, if still full, the older half (amortised: one
    /// sort per `MAX_ENTRIES / 2` insertions).
    fn make_room(&mut self, now: Instant) {
        self.answered.retain(|_, &mut at| now < at + STALE_MAX_AGE);
        if self.answered.len() >= MAX_ENTRIES {
            let mut ends: Vec<Instant> = self.answered.values().copied().collect();
            ends.sort_unstable();
            let cut = ends[ends.len() / 2];
            self.answered.retain(|_, &mut at| at > cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_not_found_says_nothing_about_another() {
        let t = Instant::now();
        let mut n = NegativeCache::default();
        let ttl = Duration::from_secs(30);
        n.insert("\u{212A}ern.sbn", t);
        n.insert("KERN.sbn", t);
        assert!(n.fresh("KERN.sbn", t, ttl));
        assert!(!n.fresh("kern.sbn", t, ttl));
        n.forget(|k| k.eq_ignore_ascii_case("kern.sbn"));
        assert!(!n.fresh("KERN.sbn", t, ttl));
        assert!(n.fresh("\u{212A}ern.sbn", t, ttl), "a different name stays");
    }

    #[test]
    fn random_names_never_grow_it_past_its_bound() {
        let t = Instant::now();
        let mut n = NegativeCache::default();
        for i in 0..(MAX_ENTRIES * 3 + 7) {
            n.insert(
                &format!("random-{i}.xml"),
                t + Duration::from_millis(i as u64),
            );
            assert!(n.len() <= MAX_ENTRIES);
        }
        // The newest are kept.
        assert!(n.fresh(
            &format!("random-{}.xml", MAX_ENTRIES * 3 + 6),
            t + Duration::from_secs(31),
            Duration::from_secs(30)
        ));
    }

    #[test]
    fn an_expired_entry_still_answers_for_an_unreachable_chain_for_a_day() {
        let t = Instant::now();
        let mut n = NegativeCache::default();
        n.insert("CTLSEP001122AABBCC.tlv", t);
        let later = t + Duration::from_secs(3600);
        assert!(!n.fresh("CTLSEP001122AABBCC.tlv", later, Duration::from_secs(30)));
        assert!(n.known_missing("CTLSEP001122AABBCC.tlv", later));
        assert!(!n.known_missing(
            "CTLSEP001122AABBCC.tlv",
            t + STALE_MAX_AGE + Duration::from_secs(1)
        ));
    }
}
