//! The HTTP connection server for the phones' port (6970) and the admin endpoint, in place of
//! `axum::serve`, which sets no limits: a connection cap (beyond it new connections wait in
//! the kernel's backlog), the access check at accept time (before a byte of the request is
//! read), `TCP_NODELAY` (without it every keep-alive request after the first waited ≈ 40 ms on
//! the client's delayed ACK, issue 12), a header-read timeout, an idle keep-alive timeout and a
//! send timeout for clients that stop reading (issue 11).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info};

use super::Gate;

/// The limits of one HTTP server (the `http:` section).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub max_connections: usize,
}

impl From<&crate::config::HttpConfig> for HttpLimits {
    fn from(h: &crate::config::HttpConfig) -> HttpLimits {
        HttpLimits {
            header_timeout: h.header_timeout,
            idle_timeout: h.idle_timeout,
            send_timeout: h.send_timeout,
            max_connections: h.max_connections,
        }
    }
}

const FORBIDDEN: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\nConnection: close\r\n\r\nforbidden\n";

/// Serves `app` on `listener` until `stop` resolves, then lets open connections finish their
/// current request. `gate`: clients outside its allow list get a 403 at accept and nothing
/// of theirs is read (`None` for the admin endpoint, which has its own rule).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    gate: Option<Arc<Gate>>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    debug!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Some(g) = &gate {
            if !g.allows(peer.ip()) {
                crate::metrics::global().request("http", "denied");
                info!(client = %peer, protocol = "http", "refused: client outside access.allow");
                conns.spawn(refuse(stream, permit));
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let (app, stop_rx) = (app.clone(), stop_rx.clone());
        conns.spawn(async move {
            connection(stream, peer, app, limits, stop_rx).await;
            drop(permit);
        });
        // Reap finished connections so the set does not grow with every one ever served.
        while conns.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

async fn refuse(mut stream: TcpStream, _permit: tokio::sync::OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(FORBIDDEN).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let app = app.clone();
            async move {
                use tower_service::Service;
                let mut app = app;
                app.call(req.map(axum::body::Body::new)).await
            }
        });
    let io = TokioIo::new(Watched::new(stream, limits));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(client = %peer, "HTTP connection ended: {e}");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// A connection that fails when nothing moves: no byte read or written for `idle` (a quiet
/// keep-alive connection), or a write blocked for `send` (a client that stopped reading).
///
/// Progress only notes the time; the timer is moved when it fires early, not on every read
/// and write (re-arming a tokio timer per I/O call cost more than the call at 20k requests/s).
struct Watched {
    io: TcpStream,
    idle: Duration,
    send: Duration,
    timer: Pin<Box<Sleep>>,
    /// The last read or write that moved bytes.
    moved: Instant,
    /// Since when writes have been blocked (`None` while they go through).
    blocked_since: Option<Instant>,
}

impl Watched {
    fn new(io: TcpStream, limits: HttpLimits) -> Watched {
        Watched {
            io,
            idle: limits.idle_timeout,
            send: limits.send_timeout,
            timer: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            moved: Instant::now(),
            blocked_since: None,
        }
    }

    fn progress(&mut self) {
        self.blocked_since = None;
        self.moved = Instant::now();
    }

    /// When the limit in force runs out.
    fn deadline(&self) -> Instant {
        match self.blocked_since {
            Some(since) => since + self.send,
            None => self.moved + self.idle,
        }
    }

    /// A write could not proceed: from now on the send timeout runs.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.blocked_since.is_none() {
            self.blocked_since = Some(Instant::now());
            // The send timeout may be shorter than what the timer waits for now.
            let deadline = self.deadline();
            if deadline < self.timer.deadline() {
                self.timer.as_mut().reset(deadline);
            }
        }
        match self.expired(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// `Err` once the current limit has passed (the timer is registered with `cx`).
    fn expired(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let deadline = self.deadline();
            if deadline <= Instant::now() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if self.blocked_since.is_some() {
                        "client stopped reading (http.send_timeout)"
                    } else {
                        "connection idle (http.idle_timeout)"
                    },
                ));
            }
            // Fired early: bytes moved since it was set. Wait for the rest.
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.progress();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.expired(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            r => r,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                self.progress();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.blocked(cx),
            r => r,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                self.progress();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if total > 0 => self.blocked(cx),
            r => r,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
