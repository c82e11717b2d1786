//! Front ends: what a phone's request meets before any content. Access control (`access.allow`),
//! per-client and global transfer limits, and the mapping of a request onto the overrides
//! directory (and, on a miss, whatever serves content behind it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tracing::info;

use crate::config::AccessConfig;
use crate::overrides::Overrides;
use crate::tftp::server::{Content, OpenError, ReadRequest, Source, TransferReport};

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
}

impl Drop for Slot {
    fn drop(&mut self) {
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

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
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
        Ok(Slot {
            gate: self.clone(),
            ip,
        })
    }
}

/// The TFTP front end's source: admission, then the overrides directory.
pub struct TftpFront {
    pub gate: Arc<Gate>,
    pub overrides: Option<Overrides>,
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
            let slot = match self.gate.admit(req.client.ip()) {
                Ok(s) => s,
                Err(Refusal::Denied) => {
                    info!(client = %req.client, name = %req.name, "refused: client outside access.allow");
                    return Err(OpenError::Denied("access denied".into()));
                }
                Err(Refusal::Busy) => {
                    info!(client = %req.client, name = %req.name, "refused: server busy");
                    return Err(OpenError::Busy);
                }
            };
            if let Some(o) = &self.overrides {
                match o.open(&req.name) {
                    Ok(Some((file, size))) => {
                        return Ok(Content {
                            size: Some(size),
                            reader: Box::pin(Guarded {
                                inner: tokio::fs::File::from_std(file),
                                _slot: slot,
                            }),
                        })
                    }
                    Ok(None) => {}
                    Err(e) => return Err(OpenError::Unavailable(format!("cannot read file: {e}"))),
                }
            }
            Err(OpenError::NotFound)
        })
    }

    fn finished(&self, r: &TransferReport) {
        match &r.outcome {
            Ok(()) => info!(
                client = %r.client, name = %r.name, protocol = "tftp", bytes = r.bytes,
                duration_ms = r.duration.as_millis() as u64, "transfer complete"
            ),
            Err(e) => info!(
                client = %r.client, name = %r.name, protocol = "tftp", bytes = r.bytes,
                duration_ms = r.duration.as_millis() as u64, "transfer failed: {e}"
            ),
        }
    }
}
