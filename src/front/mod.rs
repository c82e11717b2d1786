//! Front ends: what a phone's request meets before any content. Access control (`access.allow`),
//! per-client and global transfer limits, then the overrides directory, the cache and, on a
//! miss, the shared upstream fetch.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub mod http;

use futures::future::BoxFuture;
use tracing::info;

use crate::config::AccessConfig;
use crate::overrides::Overrides;
use crate::tftp::server::{Content, OpenError, Origin, ReadRequest, Source, TransferReport};
use crate::upstream::flight::{Fetcher, MissError, Served};

/// Admission control shared by the TFTP and HTTP front ends.
#[derive(Debug)]
pub struct Gate {
    access: Mutex<AccessConfig>,
    active: Mutex<Active>,
}

#[derive(Debug, Default)]
struct Active {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// Why a client was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside `access.allow`.
    Denied,
    /// Over `access.max_per_client` or `access.max_transfers`.
    Busy,
}

/// One admitted transfer; releases its slot when dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
    protocol: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::global().active(self.protocol).dec();
        let mut a = self.gate.active.lock().unwrap();
        a.total -= 1;
        if let Some(n) = a.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                a.per_client.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub fn new(access: AccessConfig) -> Arc<Gate> {
        Arc::new(Gate {
            access: Mutex::new(access),
            active: Mutex::new(Active::default()),
        })
    }

    /// Applies a reloaded access section; transfers in flight keep their slots.
    pub fn update(&self, access: AccessConfig) {
        *self.access.lock().unwrap() = access;
    }

    pub fn active(&self) -> usize {
        self.active.lock().unwrap().total
    }

    /// Admits one transfer of `protocol` (`tftp` or `http`) from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, protocol: &'static str) -> Result<Slot, Refusal> {
        let (max_total, max_client) = {
            let access = self.access.lock().unwrap();
            if !access.allows(ip) {
                return Err(Refusal::Denied);
            }
            (access.max_transfers, access.max_per_client)
        };
        let mut a = self.active.lock().unwrap();
        let mine = a.per_client.get(&ip).copied().unwrap_or(0);
        if a.total >= max_total || mine >= max_client {
            return Err(Refusal::Busy);
        }
        a.total += 1;
        *a.per_client.entry(ip).or_insert(0) += 1;
        crate::metrics::global().active(protocol).inc();
        Ok(Slot {
            gate: self.clone(),
            ip,
            protocol,
        })
    }
}

/// Content found for a request, independent of the protocol that will carry it.
pub struct Found {
    pub size: Option<u64>,
    pub body: FoundBody,
    pub origin: Origin,
}

/// Where a found file's bytes come from.
pub enum FoundBody {
    /// A cache hit: a complete file, kept in use (never evicted) while it is read.
    Cached(Box<crate::cache::CachedFile>),
    /// An override: a local file.
    Local(std::fs::File),
    /// A miss streaming through from an upstream.
    Stream(std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>),
}

impl FoundBody {
    /// An async reader, for the TFTP front end's block-sized reads (tokio's file buffers them).
    pub fn into_reader(self) -> std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> {
        match self {
            FoundBody::Cached(f) => Box::pin((*f).into_async_read()),
            FoundBody::Local(f) => Box::pin(tokio::fs::File::from_std(f)),
            FoundBody::Stream(r) => r,
        }
    }
}

/// Why a request gets no content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    Unreachable(String),
    Failed(String),
}

/// Where content comes from, in order: overrides, cache, upstream chain (single flight).
pub struct Resolver {
    pub overrides: Option<Overrides>,
    pub fetcher: Option<Arc<Fetcher>>,
}

impl Resolver {
    pub async fn find(&self, name: &crate::name::FileName) -> Result<Found, Lookup> {
        if let Some(o) = &self.overrides {
            match o.open(name) {
                Ok(Some((file, size))) => {
                    return Ok(Found {
                        size: Some(size),
                        body: FoundBody::Local(file),
                        origin: Origin::Local,
                    })
                }
                Ok(None) => {}
                Err(e) => return Err(Lookup::Failed(format!("cannot read override: {e}"))),
            }
        }
        let Some(fetcher) = &self.fetcher else {
            return Err(Lookup::NotFound);
        };
        match fetcher.open(name).await {
            Ok(Served::Hit(file)) => {
                let source = file.entry.source.clone();
                Ok(Found {
                    size: Some(file.entry.size),
                    body: FoundBody::Cached(Box::new(file)),
                    origin: Origin::Hit { source },
                })
            }
            Ok(Served::Miss(m)) => Ok(Found {
                size: m.size,
                body: FoundBody::Stream(m.reader),
                origin: Origin::Miss { source: m.source },
            }),
            Err(MissError::NotFound) => Err(Lookup::NotFound),
            Err(MissError::Unreachable(why)) => Err(Lookup::Unreachable(why)),
            Err(MissError::Failed(why)) => Err(Lookup::Failed(why)),
        }
    }
}

/// The TFTP front end's source: admission, then the resolver.
pub struct TftpFront {
    pub gate: Arc<Gate>,
    pub resolver: Arc<Resolver>,
}

/// Wraps a reader so the admission slot lives exactly as long as the transfer's content.
struct Guarded<R> {
    inner: R,
    _slot: Slot,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Source for TftpFront {
    fn open(&self, req: ReadRequest) -> BoxFuture<'_, Result<Content, OpenError>> {
        Box::pin(async move {
            let metrics = crate::metrics::global();
            let slot = match self.gate.admit(req.client.ip(), "tftp") {
                Ok(s) => s,
                Err(Refusal::Denied) => {
                    metrics.request("tftp", "denied");
                    info!(client = %req.client, name = %req.name, "refused: client outside access.allow");
                    return Err(OpenError::Denied("access denied".into()));
                }
                Err(Refusal::Busy) => {
                    metrics.request("tftp", "error");
                    info!(client = %req.client, name = %req.name, "refused: server busy");
                    return Err(OpenError::Busy);
                }
            };
            match self.resolver.find(&req.name).await {
                Ok(found) => {
                    crate::phones::started(req.client.ip(), req.name.as_str(), "tftp", found.size);
                    Ok(Content {
                        size: found.size,
                        reader: Box::pin(Guarded {
                            inner: found.body.into_reader(),
                            _slot: slot,
                        }),
                        origin: found.origin,
                    })
                }
                Err(Lookup::NotFound) => {
                    metrics.request("tftp", "not_found");
                    crate::phones::unanswered(req.client.ip(), req.name.as_str(), "tftp", None);
                    Err(OpenError::NotFound)
                }
                Err(Lookup::Unreachable(_)) => {
                    metrics.request("tftp", "error");
                    crate::phones::unanswered(
                        req.client.ip(),
                        req.name.as_str(),
                        "tftp",
                        Some("upstream unreachable"),
                    );
                    Err(OpenError::Unavailable("upstream unreachable".into()))
                }
                Err(Lookup::Failed(why)) => {
                    metrics.request("tftp", "error");
                    Err(OpenError::Unavailable(why))
                }
            }
        })
    }

    fn finished(&self, r: &TransferReport) {
        let metrics = crate::metrics::global();
        if let Some(origin) = &r.origin {
            crate::phones::finished(
                r.client.ip(),
                &r.name,
                "tftp",
                r.bytes,
                r.outcome.clone().err(),
            );
            metrics.sent("tftp", r.bytes);
            metrics.request(
                "tftp",
                if r.outcome.is_ok() {
                    origin.result()
                } else {
                    "error"
                },
            );
        }
        // Absent (not 0) when no DATA went out, so a log search for slow first blocks is exact.
        let first_data_ms = r.first_data.map(|t| t.as_millis() as u64);
        let (result, source) = match &r.origin {
            Some(o) => (o.result(), o.source().to_string()),
            None => ("none", String::from("-")),
        };
        match &r.outcome {
            Ok(()) => info!(
                client = %r.client, name = %r.name, protocol = "tftp", bytes = r.bytes,
                duration_ms = r.duration.as_millis() as u64, first_data_ms, result,
                source = %source, "transfer complete"
            ),
            Err(e) => info!(
                client = %r.client, name = %r.name, protocol = "tftp", bytes = r.bytes,
                duration_ms = r.duration.as_millis() as u64, first_data_ms, result,
                source = %source, "transfer failed: {e}"
            ),
        }
    }
}
