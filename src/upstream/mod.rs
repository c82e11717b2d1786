//! The upstream chain: the central CUCM TFTP server first, then the alternate file servers, in
//! configured order, as CUCM's "Alternate Cisco File Servers" are asked. "Not found" moves on to
//! the next upstream; an unreachable one is marked unhealthy for a backoff period, skipped at
//! once while it lasts, and probed again afterwards. The first hit wins.

pub mod flight;
mod http;
mod tftp;

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use thiserror::Error;
use tracing::{info, warn};

use crate::config::UpstreamConfig;

pub use crate::cache::Validators;

/// A body being received: its announced size (Content-Length, OACK tsize) and the bytes.
pub struct Body {
    pub size: Option<u64>,
    pub validators: Validators,
    /// Ends with `Ok` chunks only when the whole file arrived; any failure is an `Err` item.
    pub stream: BoxStream<'static, Result<Bytes, FetchError>>,
}

/// The answer of one upstream.
pub enum Answer {
    Found(Body),
    /// 304: the copy we hold (per the validators sent) is current.
    NotModified,
    NotFound,
}

#[derive(Debug, Clone, Error)]
pub enum FetchError {
    /// Connection refused, timed out, reset: the upstream is marked unhealthy.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The upstream answered but could not deliver this file (HTTP 5xx, TFTP ERROR).
    #[error("{0}")]
    Failed(String),
    /// The body ended before its announced size, or broke off mid-transfer.
    #[error("truncated: {0}")]
    Truncated(String),
}

#[derive(Debug, Clone)]
enum Protocol {
    Http { base: String },
    Tftp { addr: std::net::SocketAddr },
}

/// Health as shown on the status page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamState {
    Up,
    Down,
    Unknown,
}

#[derive(Debug, Default)]
struct Health {
    down_until: Option<Instant>,
    failures: u32,
    last_ok: Option<SystemTime>,
    last_error: Option<(SystemTime, String)>,
}

/// A snapshot of one upstream for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    pub url: String,
    pub state: UpstreamState,
    /// Seconds since the Unix epoch.
    pub last_ok: Option<u64>,
    pub last_error: Option<String>,
}

/// First backoff after a failure; doubles per consecutive failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct Upstream {
    pub url: String,
    protocol: Protocol,
    timeout: Duration,
    http: reqwest::Client,
    health: Mutex<Health>,
}

#[derive(Debug, Error)]
#[error("upstream {url}: {problem}")]
pub struct UpstreamUrlError {
    pub url: String,
    pub problem: String,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, UpstreamUrlError> {
        let err = |problem: &str| UpstreamUrlError {
            url: cfg.url.clone(),
            problem: problem.to_string(),
        };
        let protocol = if let Some(rest) = cfg.url.strip_prefix("http://") {
            let host = rest.trim_end_matches('/');
            if host.is_empty() || host.contains('/') {
                return Err(err("expected http://HOST:PORT"));
            }
            Protocol::Http {
                base: format!("http://{host}"),
            }
        } else if let Some(rest) = cfg.url.strip_prefix("tftp://") {
            let host = rest.trim_end_matches('/');
            let with_port = crate::tftp::client::with_default_port(host);
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
                .map_err(|e| err(&format!("cannot resolve: {e}")))?
                .next()
                .ok_or_else(|| err("host has no address"))?;
            Protocol::Tftp { addr }
        } else {
            return Err(err("expected http://HOST:PORT or tftp://HOST[:PORT]"));
        };
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .no_proxy()
            .build()
            .map_err(|e| err(&e.to_string()))?;
        Ok(Upstream {
            url: cfg.url.clone(),
            protocol,
            timeout: cfg.timeout,
            http,
            health: Mutex::new(Health::default()),
        })
    }

    pub fn is_http(&self) -> bool {
        matches!(self.protocol, Protocol::Http { .. })
    }

    /// Whether the upstream is inside a backoff period after failing.
    pub fn is_down(&self) -> bool {
        let h = self.health.lock().unwrap();
        h.down_until.is_some_and(|t| Instant::now() < t)
    }

    pub fn status(&self) -> UpstreamStatus {
        let h = self.health.lock().unwrap();
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let state = if h.down_until.is_some_and(|t| Instant::now() < t) {
            UpstreamState::Down
        } else if h.last_ok.is_none() && h.last_error.is_none() {
            UpstreamState::Unknown
        } else if h.failures > 0 {
            UpstreamState::Down
        } else {
            UpstreamState::Up
        };
        UpstreamStatus {
            url: self.url.clone(),
            state,
            last_ok: h.last_ok.map(secs),
            last_error: h.last_error.as_ref().map(|(_, e)| e.clone()),
        }
    }

    fn mark_ok(&self) {
        let mut h = self.health.lock().unwrap();
        if h.failures > 0 {
            info!(upstream = %self.url, "upstream is reachable again");
        }
        h.failures = 0;
        h.down_until = None;
        h.last_ok = Some(SystemTime::now());
    }

    fn mark_failed(&self, why: &str) {
        let mut h = self.health.lock().unwrap();
        h.failures += 1;
        let backoff = BASE_BACKOFF
            .saturating_mul(1 << (h.failures - 1).min(5))
            .min(MAX_BACKOFF);
        h.down_until = Some(Instant::now() + backoff);
        h.last_error = Some((SystemTime::now(), why.to_string()));
        warn!(upstream = %self.url, "upstream unreachable ({why}); skipping it for {}s", backoff.as_secs());
    }

    /// Asks this upstream for `name`, conditionally when `known` validators are given (HTTP).
    /// Health is updated from the outcome of the request itself; a body that breaks off later
    /// is reported by its stream.
    pub async fn fetch(
        &self,
        name: &str,
        known: Option<&Validators>,
    ) -> Result<Answer, FetchError> {
        let result = match &self.protocol {
            Protocol::Http { base } => http::fetch(&self.http, base, name, known).await,
            Protocol::Tftp { addr } => tftp::fetch(*addr, name, self.timeout).await,
        };
        let metrics = crate::metrics::global();
        let label = match &result {
            Ok(Answer::Found(_)) => "found",
            Ok(Answer::NotModified) => "not_modified",
            Ok(Answer::NotFound) => "not_found",
            Err(FetchError::Unreachable(_)) => "unreachable",
            Err(_) => "error",
        };
        metrics.upstream_request(&self.url, label);
        match &result {
            Ok(_) => self.mark_ok(),
            Err(FetchError::Unreachable(why)) => self.mark_failed(why),
            Err(_) => {
                // Reachable but failing for this file: not a reason to skip it for others.
                self.mark_ok()
            }
        }
        match result {
            Ok(Answer::Found(mut body)) => {
                use futures::StreamExt;
                let url = self.url.clone();
                body.stream = body
                    .stream
                    .inspect(move |r| {
                        if let Ok(b) = r {
                            metrics.upstream_received(&url, b.len() as u64);
                        }
                    })
                    .boxed();
                Ok(Answer::Found(body))
            }
            other => other,
        }
    }

    /// Fetches a small file whole (the sync worker's lists and configs).
    pub async fn fetch_bytes(&self, name: &str) -> Result<Option<Bytes>, FetchError> {
        use futures::StreamExt;
        match self.fetch(name, None).await? {
            Answer::Found(mut body) => {
                let mut out = Vec::new();
                while let Some(c) = body.stream.next().await {
                    out.extend_from_slice(&c?);
                }
                Ok(Some(Bytes::from(out)))
            }
            Answer::NotModified | Answer::NotFound => Ok(None),
        }
    }
}

/// The outcome of asking the whole chain.
pub enum ChainAnswer {
    Found {
        upstream: std::sync::Arc<Upstream>,
        body: Body,
    },
    /// Every upstream answered "not found".
    NotFound,
    /// Nobody had it and at least one upstream could not be asked.
    Unreachable(String),
}

/// The configured upstreams, in order.
pub struct UpstreamChain {
    upstreams: Vec<std::sync::Arc<Upstream>>,
}

impl UpstreamChain {
    pub fn new(cfgs: &[UpstreamConfig]) -> Result<UpstreamChain, UpstreamUrlError> {
        let upstreams = cfgs
            .iter()
            .map(|c| Upstream::new(c).map(std::sync::Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(UpstreamChain { upstreams })
    }

    pub fn upstreams(&self) -> &[std::sync::Arc<Upstream>] {
        &self.upstreams
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Asks each upstream in order; unhealthy ones are skipped at once.
    pub async fn fetch(&self, name: &str) -> ChainAnswer {
        let mut unreachable: Vec<String> = Vec::new();
        for up in &self.upstreams {
            if up.is_down() {
                crate::metrics::global().upstream_request(&up.url, "skipped");
                unreachable.push(format!("{} (down)", up.url));
                continue;
            }
            match up.fetch(name, None).await {
                Ok(Answer::Found(body)) => {
                    return ChainAnswer::Found {
                        upstream: up.clone(),
                        body,
                    }
                }
                Ok(Answer::NotFound) | Ok(Answer::NotModified) => continue,
                Err(e) => unreachable.push(format!("{}: {e}", up.url)),
            }
        }
        if unreachable.is_empty() {
            ChainAnswer::NotFound
        } else {
            ChainAnswer::Unreachable(unreachable.join("; "))
        }
    }
}
