//! Front ends: what a phone's request meets before any content. Admission ([`gate`]: access
//! control, per-client and global transfer limits, the queue), then the overrides directory,
//! the cache and, on a miss, the shared upstream fetch.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

pub mod conn;
pub mod gate;
pub mod hot;
pub mod http;

use futures::future::BoxFuture;
use tracing::info;

pub use gate::{Gate, Refusal, Slot};

use crate::content::{Body, Found, Origin};
use crate::overrides::{Override, Overrides};
use crate::tftp::server::{
    Content, Now, OpenError, Opened, ReadRequest, Source, Ticket, TransferReport,
};
use crate::upstream::flight::Fetcher;

/// Why a request gets no content: the miss path's own error (one type across the boundary;
/// the alias keeps the HTTP handler's name for it).
pub use crate::upstream::flight::MissError as Lookup;

/// Where content comes from, in order: overrides, cache, upstream chain (single flight).
pub struct Resolver {
    pub overrides: Option<Overrides>,
    pub fetcher: Option<Arc<Fetcher>>,
}

impl Resolver {
    pub async fn find(&self, name: &crate::name::FileName) -> Result<Found, Lookup> {
        self.find_since(name, Instant::now()).await
    }

    /// [`find`](Self::find) for a request that arrived at `asked`: a miss is answered within one
    /// upstream timeout of it, admission wait included.
    pub async fn find_since(
        &self,
        name: &crate::name::FileName,
        asked: Instant,
    ) -> Result<Found, Lookup> {
        match (self.find_now(name), &self.fetcher) {
            (Some(answer), _) => answer,
            (None, Some(fetcher)) => fetcher.open(name, asked).await,
            (None, None) => Err(Lookup::NotFound),
        }
    }

    /// [`find`](Self::find) when it needs no upstream: an override, a cached copy, or a name
    /// known to be missing; `None` when the upstreams must be asked.
    pub fn find_now(&self, name: &crate::name::FileName) -> Option<Result<Found, Lookup>> {
        if let Some(o) = &self.overrides {
            let local = |size: u64, body: Body| {
                Some(Ok(Found {
                    size: Some(size),
                    body,
                    origin: Origin::Local,
                }))
            };
            match o.open(name) {
                Ok(Some(Override::Memory(copy))) => {
                    return local(copy.len() as u64, Body::Memory(copy))
                }
                Ok(Some(Override::File(file, size))) => return local(size, Body::Local(file)),
                Ok(None) => {}
                Err(e) => return Some(Err(Lookup::Failed(format!("cannot read override: {e}")))),
            }
        }
        match &self.fetcher {
            Some(fetcher) => fetcher.open_now(name),
            None => Some(Err(Lookup::NotFound)),
        }
    }
}

/// The TFTP front end's source: admission, then the resolver.
pub struct TftpFront {
    pub gate: Arc<Gate>,
    pub resolver: Arc<Resolver>,
}

/// The admission slot travels with the transfer; the engine tells it when the client is on
/// probation and when it has proven itself.
impl Ticket for Slot {
    fn on_probation(&mut self, displace: Box<dyn FnOnce() + Send>) {
        Slot::on_probation(self, displace)
    }

    fn proven(&mut self) {
        Slot::proven(self)
    }
}

impl Source for TftpFront {
    fn allows(&self, client: IpAddr) -> bool {
        self.gate.allows(client)
    }

    fn open(&self, req: ReadRequest) -> BoxFuture<'_, Result<Content, OpenError>> {
        // The moment the datagram was read, not when this future is first polled: the miss's
        // one-timeout bound runs from there.
        let asked = req.arrived;
        Box::pin(async move {
            let slot = match self.gate.admit_queued(req.client.ip(), "tftp").await {
                Ok(s) => s,
                Err(r) => return Err(refused(&req, r)),
            };
            let found = self.resolver.find_since(&req.name, asked).await;
            answer(&req, found, slot)
        })
    }

    /// Content at hand and a slot free now: answered on the event loop. The content is looked
    /// up first, so a missing file is answered without taking a slot; a full house goes to
    /// [`open_queued`](Self::open_queued) and admission's queue.
    fn open_now(&self, req: &ReadRequest) -> Now {
        let Some(found) = self.resolver.find_now(&req.name) else {
            return Now::Wait;
        };
        if let Ok(found) = found {
            return match self.gate.try_admit(req.client.ip(), "tftp") {
                Ok(slot) => Now::Answer(answer(req, Ok(found), slot)),
                Err(Refusal::Busy) => Now::Full,
                Err(r) => Now::Answer(Err(refused(req, r))),
            };
        }
        Now::Answer(answer(req, found, ()))
    }

    /// Waits in admission's queue without a task: the thread that frees a slot (an event
    /// loop) looks the content up again and starts the transfer. The content is not held
    /// while queued (an open file per waiting request would double what a storm costs in
    /// descriptors); in the rare case it is no longer at hand, it is fetched in a task.
    fn open_queued(
        self: Arc<Self>,
        req: ReadRequest,
        runtime: &tokio::runtime::Handle,
        then: Opened,
    ) {
        let runtime = runtime.clone();
        let resolver = self.resolver.clone();
        let ip = req.client.ip();
        self.gate.queue_for(
            ip,
            "tftp",
            Box::new(move |admitted| {
                let slot = match admitted {
                    Ok(slot) => slot,
                    Err(r) => return then(Err(refused(&req, r))),
                };
                match resolver.find_now(&req.name) {
                    Some(found) => then(answer(&req, found, slot)),
                    None => {
                        runtime.spawn(async move {
                            let found = resolver.find_since(&req.name, req.arrived).await;
                            then(answer(&req, found, slot))
                        });
                    }
                }
            }),
        );
    }

    fn finished(&self, r: &TransferReport) {
        let metrics = crate::metrics::global();
        if let Some(origin) = &r.origin {
            crate::phones::finished(
                r.client.ip(),
                &r.name,
                "tftp",
                r.bytes,
                r.outcome.as_ref().err().map(ToString::to_string),
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

/// Counts and logs a refusal by admission.
fn refused(req: &ReadRequest, r: Refusal) -> OpenError {
    let metrics = crate::metrics::global();
    match r {
        Refusal::Denied => {
            metrics.request("tftp", "denied");
            info!(client = %req.client, name = %req.name, "refused: client outside access.allow");
            OpenError::Denied
        }
        Refusal::Busy => {
            metrics.request("tftp", "error");
            info!(client = %req.client, name = %req.name, "refused: server busy");
            OpenError::Busy
        }
    }
}

/// The content for an admitted request (`ticket`: its slot), or what its lookup answered,
/// counted and noted in the phones view.
fn answer(
    req: &ReadRequest,
    found: Result<Found, Lookup>,
    ticket: impl Ticket + 'static,
) -> Result<Content, OpenError> {
    match found {
        Ok(found) => {
            crate::phones::started(req.client.ip(), req.name.as_str(), "tftp", found.size);
            Ok(Content {
                found,
                ticket: Box::new(ticket),
            })
        }
        Err(Lookup::NotFound) => {
            crate::metrics::global().request("tftp", "not_found");
            crate::phones::unanswered(req.client.ip(), req.name.as_str(), "tftp", None);
            Err(OpenError::NotFound)
        }
        // The details stay here, in the log: never on the wire to a phone.
        Err(Lookup::Unreachable(why)) => Err(unavailable(req, "upstream unreachable", &why)),
        Err(Lookup::Failed(why)) => Err(unavailable(req, "upstream failed", &why)),
    }
}

/// A request that found no content because the upstreams failed: counted, noted in the phones
/// view, logged with the details, and answered with a fixed text (the details never reach a phone).
fn unavailable(req: &ReadRequest, reason: &str, why: &str) -> OpenError {
    crate::metrics::global().request("tftp", "error");
    crate::phones::unanswered(req.client.ip(), req.name.as_str(), "tftp", Some(reason));
    info!(client = %req.client, name = %req.name, "unavailable: {why}");
    OpenError::Unavailable
}
