//! `sync.max_rate`: a pacer for the background sync's downloads. The worker reads a body only
//! as fast as the rate allows, so TCP flow control slows the sender and the WAN link keeps room
//! for the misses phones are waiting on (those go through the miss path, which is never paced).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes that may go unpaced after an idle period.
const BURST: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Throttle {
    /// Bits per second; 0 = unlimited.
    bits_per_sec: AtomicU64,
    /// When the bytes let through so far will have drained at the rate.
    drained_at: Mutex<Instant>,
}

impl Throttle {
    pub fn new(bits_per_sec: u64) -> Throttle {
        Throttle {
            bits_per_sec: AtomicU64::new(bits_per_sec),
            drained_at: Mutex::new(Instant::now()),
        }
    }

    pub fn set_rate(&self, bits_per_sec: u64) {
        self.bits_per_sec.store(bits_per_sec, Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.bits_per_sec.load(Ordering::Relaxed)
    }

    /// Accounts for `bytes` just received and waits until the rate allows more.
    pub async fn consume(&self, bytes: usize) {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 * 8.0 / rate as f64);
        let until = {
            let mut d = self.drained_at.lock().unwrap();
            let now = Instant::now();
            let start = (*d).max(now.checked_sub(BURST).unwrap_or(now));
            *d = start + cost;
            *d
        };
        if until > Instant::now() + BURST {
            tokio::time::sleep_until(until - BURST).await;
        }
    }
}

/// The fetcher paces a download the sync worker started with it (while no phone waits on it).
impl crate::upstream::flight::Pace for Throttle {
    fn pace(&self, bytes: usize) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.consume(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paces_to_the_rate() {
        let t = Throttle::new(80_000_000); // 10 MB/s
        let start = Instant::now();
        for _ in 0..40 {
            t.consume(64 * 1024).await; // 2.6 MB: about 0.26 s
        }
        let took = start.elapsed().as_secs_f64();
        assert!(
            (0.18..0.6).contains(&took),
            "took {took}s for 2.6 MB at 10 MB/s"
        );
        let t = Throttle::new(0);
        let start = Instant::now();
        t.consume(1 << 30).await;
        assert!(start.elapsed() < Duration::from_millis(1));
    }
}
