//! Logging: to the systemd journal when run by systemd (`JOURNAL_STREAM` is set), otherwise to
//! stderr. The level comes from `log:` in the config; `RUST_LOG` overrides it. [`Repeats`]
//! keeps a failure that recurs every few seconds (a full disk) from filling the journal.

use std::time::{Duration, Instant};

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

pub fn init(level: LogLevel) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("branchtftp={},warn", level.as_str())));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = tracing_journald::layer() {
            let _ = registry.with(journal).try_init();
            return;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}

/// A failure met again and again by periodic work: what to log of it. The first failure is
/// logged; while the same error goes on, once per `every` with how often it recurred; a
/// different error at once; and one line when it clears.
#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    /// The error being repeated, when it was last logged, and how often it recurred since.
    failing: Option<(String, Instant, u64)>,
}

impl Repeats {
    pub fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            failing: None,
        }
    }

    /// The work failed with `error` at `now`: the line to log, if any.
    pub fn failed(&mut self, error: String, now: Instant) -> Option<String> {
        match &mut self.failing {
            Some((same, logged, n)) if *same == error => {
                *n += 1;
                if now.saturating_duration_since(*logged) < self.every {
                    return None;
                }
                let line = format!(
                    "{error} (again {n} times in the last {})",
                    humantime::format_duration(Duration::from_secs(
                        now.saturating_duration_since(*logged).as_secs()
                    ))
                );
                (*logged, *n) = (now, 0);
                Some(line)
            }
            _ => {
                self.failing = Some((error.clone(), now, 0));
                Some(error)
            }
        }
    }

    /// The work succeeded: a line saying the failure cleared, if there was one.
    pub fn succeeded(&mut self) -> Option<String> {
        self.failing
            .take()
            .map(|(error, ..)| format!("cleared: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_every_two_seconds_is_logged_once_then_every_ten_minutes_and_when_it_clears() {
        let every = Duration::from_secs(600);
        let mut r = Repeats::new(every);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            r.failed("disk full".into(), at(0)).as_deref(),
            Some("disk full")
        );
        let logged: Vec<String> = (1..=600)
            .filter_map(|i| r.failed("disk full".into(), at(2 * i)))
            .collect();
        assert_eq!(
            logged,
            [
                "disk full (again 300 times in the last 10m)",
                "disk full (again 300 times in the last 10m)"
            ],
            "20 minutes of failures every 2 s: the first line, then one per 10 minutes"
        );
        assert_eq!(
            r.failed("I/O error".into(), at(1201)).as_deref(),
            Some("I/O error"),
            "a different error is logged at once"
        );
        assert_eq!(r.succeeded().as_deref(), Some("cleared: I/O error"));
        assert_eq!(r.succeeded(), None, "nothing to clear twice");
        assert_eq!(
            r.failed("disk full".into(), at(1300)).as_deref(),
            Some("disk full"),
            "after it cleared, a new failure is logged at once"
        );
    }
}
