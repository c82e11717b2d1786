//! The upstream chain: the central CUCM TFTP server first, then the alternate file servers, in
//! configured order, as CUCM's "Alternate Cisco File Servers" are asked. "Not found" moves on to
//! the next upstream; the first hit wins.
//!
//! Each upstream carries its health ([`health`]): the first transport failure marks it down,
//! requests then skip it at once, and requests already waiting on it are failed over at once
//! instead of each waiting out its own timeout; a background probe marks it up again. So a miss
//! waits at most one upstream timeout per down-marking, and while every upstream is down it is
//! answered at once. Host names are resolved per request through a short cache ([`resolve`]),
//! so neither start-up nor a DNS change depends on DNS answering at start.

pub mod flight;
pub mod health;
mod http;
pub mod negative;
pub mod resolve;
mod tftp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{UpstreamConfig, UpstreamScheme, UpstreamUrl};
pub use health::UpstreamState;
use health::{Breaker, Transition};
use resolve::Resolver;

use crate::cache::Entry;
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

/// A snapshot of one upstream for `/status` (the admin page serialises it as is).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpstreamStatus {
    pub url: String,
    pub state: UpstreamState,
    /// Unix seconds of the last answer.
    pub last_ok: Option<u64>,
    pub last_error: Option<String>,
    /// Unix seconds of the last change between up and down.
    #[serde(default)]
    pub last_transition: Option<u64>,
    /// Unix seconds when the next probe is due (only while down).
    #[serde(default)]
    pub next_probe: Option<u64>,
}

/// What a probe asks for: a small file every CUCM TFTP server has. Any answer, "not found"
/// included, shows the upstream is there.
pub const PROBE_NAME: &str = "XMLDefault.cnf.xml";

pub struct Upstream {
    pub url: String,
    target: UpstreamUrl,
    timeout: Duration,
    http: reqwest::Client,
    resolver: Arc<Resolver>,
    breaker: Mutex<Breaker>,
    /// The state as a channel: requests waiting on the upstream watch it to fail over the
    /// moment another request marks it down, and the sync worker waits on it to resume.
    state: watch::Sender<UpstreamState>,
}

#[derive(Debug, Error)]
#[error("upstream {url}: {problem}")]
pub struct UpstreamUrlError {
    pub url: String,
    pub problem: String,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Upstream {
    /// Checks the URL only: the host is resolved when a request needs it.
    pub fn new(
        cfg: &UpstreamConfig,
        resolver: Arc<Resolver>,
    ) -> Result<Upstream, UpstreamUrlError> {
        let err = |problem: String| UpstreamUrlError {
            url: cfg.url.clone(),
            problem,
        };
        let target = cfg.parsed_url().map_err(err)?;
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .dns_resolver(Arc::new(resolve::ForReqwest(resolver.clone())))
            .no_proxy()
            .build()
            .map_err(|e| err(e.to_string()))?;
        // Not known to be down: requests go to it.
        crate::metrics::global().upstream_up(&cfg.url, true);
        Ok(Upstream {
            url: cfg.url.clone(),
            target,
            timeout: cfg.timeout,
            http,
            resolver,
            breaker: Mutex::new(Breaker::new(cfg.probe_interval)),
            state: watch::channel(UpstreamState::Unknown).0,
        })
    }

    pub fn is_http(&self) -> bool {
        self.target.scheme == UpstreamScheme::Http
    }

    /// The validators for a conditional request of a cached copy: only to the HTTP upstream it
    /// came from, and only when it gave some. RFC 9110 §13.1.3: If-None-Match makes a server
    /// ignore If-Modified-Since, so with an ETag the date would only cost bytes.
    fn validators_for(&self, cached: &Entry) -> Option<Validators> {
        let v = &cached.validators;
        if !self.is_http() || cached.source != self.url {
            return None;
        }
        match (&v.etag, &v.last_modified) {
            (Some(etag), _) => Some(Validators {
                etag: Some(etag.clone()),
                last_modified: None,
                upstream_size: None,
            }),
            (None, Some(_)) => Some(v.clone()),
            (None, None) => None,
        }
    }

    /// Whether the upstream is marked down (skipped, and probed in the background).
    pub fn is_down(&self) -> bool {
        self.breaker.lock().unwrap().is_down()
    }

    /// Resolves once the upstream is no longer marked down.
    pub async fn wait_not_down(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s != UpstreamState::Down).await;
    }

    pub fn status(&self) -> UpstreamStatus {
        let b = self.breaker.lock().unwrap();
        let now = Instant::now();
        let wall = SystemTime::now();
        UpstreamStatus {
            url: self.url.clone(),
            state: b.state(),
            last_ok: b.last_ok.map(unix_secs),
            last_error: b.last_error.as_ref().map(|(_, e)| e.clone()),
            last_transition: b.last_transition.map(unix_secs),
            next_probe: b
                .next_probe()
                .map(|due| unix_secs(wall + due.saturating_duration_since(now))),
        }
    }

    fn mark_ok(self: &Arc<Self>) {
        let t = self.breaker.lock().unwrap().succeeded(SystemTime::now());
        if let Some(t) = t {
            self.transition(t);
        }
    }

    fn mark_failed(self: &Arc<Self>, why: &str) {
        let t = self
            .breaker
            .lock()
            .unwrap()
            .failed(Instant::now(), SystemTime::now(), why);
        if let Some(t) = t {
            warn!(upstream = %self.url, "upstream down: {why}; skipped and probed until it answers");
            self.transition(t);
        }
    }

    /// Logs, counts and publishes a change between up and down (once per change).
    fn transition(self: &Arc<Self>, t: Transition) {
        let metrics = crate::metrics::global();
        match t {
            Transition::Up => {
                info!(upstream = %self.url, "upstream up");
                metrics.upstream_transition(&self.url, UpstreamState::Up);
                self.state.send_replace(UpstreamState::Up);
            }
            Transition::Down { start_probe } => {
                metrics.upstream_transition(&self.url, UpstreamState::Down);
                self.state.send_replace(UpstreamState::Down);
                if start_probe {
                    tokio::spawn(probe(Arc::downgrade(self)));
                }
            }
        }
    }

    /// Asks this upstream for `name`, conditionally when `known` validators are given (HTTP).
    /// An upstream marked down is not asked; a request waiting when another marks it down
    /// gives up at once. Health is updated from the outcome of the request itself; a body that
    /// breaks off later is reported by its stream.
    pub async fn fetch(
        self: &Arc<Self>,
        name: &str,
        known: Option<&Validators>,
    ) -> Result<Answer, FetchError> {
        let metrics = crate::metrics::global();
        let mut state = self.state.subscribe();
        if self.is_down() {
            metrics.upstream_request(&self.url, "skipped");
            return Err(FetchError::Unreachable("down; probing".into()));
        }
        let result = tokio::select! {
            r = self.request(name, known) => r,
            _ = state.wait_for(|s| *s == UpstreamState::Down) => {
                metrics.upstream_request(&self.url, "failed_over");
                return Err(FetchError::Unreachable("down (found by another request)".into()));
            }
        };
        let label = match &result {
            Ok(Answer::Found(_)) => "found",
            Ok(Answer::NotModified) => "not_modified",
            Ok(Answer::NotFound) => "not_found",
            Err(FetchError::Unreachable(_)) => "unreachable",
            Err(_) => "error",
        };
        metrics.upstream_request(&self.url, label);
        match &result {
            Err(FetchError::Unreachable(why)) => self.mark_failed(why),
            // An answer, even "not found" or an error for this file, is health.
            _ => self.mark_ok(),
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

    /// One request until the upstream's first answer, bounded by its timeout whatever hangs
    /// (DNS, connect, the request).
    async fn request(&self, name: &str, known: Option<&Validators>) -> Result<Answer, FetchError> {
        let attempt = async {
            match self.target.scheme {
                UpstreamScheme::Http => {
                    let base = format!("http://{}", self.target.authority());
                    http::fetch(&self.http, &base, name, known).await
                }
                UpstreamScheme::Tftp => {
                    let addrs = self
                        .resolver
                        .resolve(&self.target.host)
                        .await
                        .map_err(|e| {
                            FetchError::Unreachable(format!(
                                "cannot resolve {}: {e}",
                                self.target.host
                            ))
                        })?;
                    let addr = SocketAddr::new(addrs[0], self.target.port);
                    tftp::fetch(addr, name, self.timeout).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Unreachable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}

async fn read_all(mut body: Body) -> Result<Bytes, FetchError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(c) = body.stream.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(Bytes::from(out))
}

/// The probe of a down upstream: one request for [`PROBE_NAME`] when due, until one answers.
/// Ends when the upstream is up again or no longer configured (a reload dropped it).
async fn probe(up: Weak<Upstream>) {
    loop {
        let due = match up.upgrade() {
            Some(u) => u.breaker.lock().unwrap().probe_due(),
            None => return,
        };
        let Some(due) = due else { return };
        tokio::time::sleep_until(due.into()).await;
        let Some(u) = up.upgrade() else { return };
        if !u.is_down() {
            continue;
        }
        let answered = match u.request(PROBE_NAME, None).await {
            // Read a found file to its end so the server sees a finished transfer.
            Ok(Answer::Found(body)) => tokio::time::timeout(u.timeout, read_all(body))
                .await
                .map_err(|_| FetchError::Unreachable("probe body stalled".into()))
                .and_then(|r| r.map(|_| ())),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match answered {
            Err(FetchError::Unreachable(why)) => {
                debug!(upstream = %u.url, "probe failed: {why}");
                u.breaker
                    .lock()
                    .unwrap()
                    .probe_failed(Instant::now(), SystemTime::now(), &why);
            }
            _ => u.mark_ok(),
        }
    }
}

/// The outcome of asking the whole chain.
pub enum ChainAnswer {
    Found {
        upstream: Arc<Upstream>,
        body: Body,
    },
    /// The upstream the cached copy came from says it is current.
    NotModified,
    /// Every upstream answered "not found".
    NotFound,
    /// Nobody had it and at least one upstream could not be asked.
    Unreachable(String),
}

/// The configured upstreams, in order.
pub struct UpstreamChain {
    upstreams: Vec<Arc<Upstream>>,
}

impl UpstreamChain {
    /// The chain with the system resolver.
    pub fn new(cfgs: &[UpstreamConfig]) -> Result<UpstreamChain, UpstreamUrlError> {
        UpstreamChain::with_resolver(cfgs, Resolver::system())
    }

    /// The chain resolving host names through `resolver` (a test's, to move a name).
    pub fn with_resolver(
        cfgs: &[UpstreamConfig],
        resolver: Arc<Resolver>,
    ) -> Result<UpstreamChain, UpstreamUrlError> {
        let upstreams = cfgs
            .iter()
            .map(|c| Upstream::new(c, resolver.clone()).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(UpstreamChain { upstreams })
    }

    /// The central server: the first upstream.
    pub fn central(&self) -> Option<&Arc<Upstream>> {
        self.upstreams.first()
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The longest a phone's miss waits for the chain's answer: one upstream timeout (the
    /// longest configured), however many upstreams hang one after the other. `None` without
    /// upstreams: the answer ("not found") is immediate.
    pub fn miss_budget(&self) -> Option<Duration> {
        self.upstreams.iter().map(|u| u.timeout).max()
    }

    /// Asks each upstream in order; those marked down are skipped at once. With a `cached`
    /// copy, the HTTP upstream it came from is asked conditionally with its validators.
    pub async fn fetch(&self, name: &str, cached: Option<&Entry>) -> ChainAnswer {
        let mut unreachable: Vec<String> = Vec::new();
        for up in &self.upstreams {
            let known = cached.and_then(|e| up.validators_for(e));
            match up.fetch(name, known.as_ref()).await {
                Ok(Answer::Found(body)) => {
                    return ChainAnswer::Found {
                        upstream: up.clone(),
                        body,
                    }
                }
                Ok(Answer::NotModified) if known.is_some() => return ChainAnswer::NotModified,
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
