//! The phones' HTTP front end (TCP 6970, as CUCM offers): `GET`/`HEAD /<name>` answered from
//! the overrides, the cache, or the same single-flight miss path as TFTP. Names are handled
//! exactly as for TFTP; there are no directory listings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tracing::info;

use super::{FoundBody, Gate, Lookup, Refusal, Resolver};
use crate::name::FileName;

#[derive(Clone)]
pub struct HttpFront {
    pub gate: Arc<Gate>,
    pub resolver: Arc<Resolver>,
}

/// Reads are this large: few blocking-pool round trips per file.
const CHUNK: usize = 256 * 1024;

/// A file on disk (a cache hit or an override) as a body stream of `size` bytes: each piece is
/// read on the blocking pool straight into the buffer that is sent. (Through `tokio::fs::File`
/// every byte was copied twice in user space: into tokio's buffer, then into the body's.)
/// `keep` lives as long as the stream (the cache's in-use mark). A file shorter than `size`
/// ends the stream with an error, so the client never takes a short body for a whole one.
fn disk_stream<K: Send + 'static>(
    file: std::fs::File,
    keep: K,
    size: u64,
) -> futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(Some((file, keep, size)), |state| async move {
        let (file, keep, remaining) = state?;
        if remaining == 0 {
            return None;
        }
        let want = remaining.min(CHUNK as u64);
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            // `read_to_end` fills the spare capacity without zeroing it first.
            let mut buf = Vec::with_capacity(want as usize);
            let r = (&file).take(want).read_to_end(&mut buf).map(|_| buf);
            (file, r)
        })
        .await;
        match read {
            Ok((file, Ok(buf))) if !buf.is_empty() => {
                let left = remaining - buf.len() as u64;
                Some((Ok(bytes::Bytes::from(buf)), Some((file, keep, left))))
            }
            Ok((_, Ok(_))) => Some((
                Err(std::io::Error::other("file shorter than its size")),
                None,
            )),
            Ok((_, Err(e))) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    })
    .boxed()
}

pub fn router(front: HttpFront) -> axum::Router {
    axum::Router::new().fallback(serve_file).with_state(front)
}

fn plain(status: StatusCode, msg: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg).into_response()
}

async fn serve_file(
    State(front): State<HttpFront>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let metrics = crate::metrics::global();
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "method not allowed\n",
        )
            .into_response();
    }
    let raw = req.uri().path();
    let decoded = percent_decode(raw);
    let name = match decoded.as_deref().map(FileName::parse) {
        Some(Ok(n)) => n,
        Some(Err(crate::name::NameError::Empty)) => {
            // `/` and friends: no directory listings.
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        _ => {
            metrics.request("http", "denied");
            info!(client = %client, name = %raw, protocol = "http", "refused: bad file name");
            return plain(StatusCode::FORBIDDEN, "forbidden\n");
        }
    };
    let slot = match front.gate.admit(client.ip(), "http") {
        Ok(s) => s,
        Err(Refusal::Denied) => {
            metrics.request("http", "denied");
            info!(client = %client, name = %name, protocol = "http", "refused: client outside access.allow");
            return plain(StatusCode::FORBIDDEN, "forbidden\n");
        }
        Err(Refusal::Busy) => {
            metrics.request("http", "error");
            info!(client = %client, name = %name, protocol = "http", "refused: server busy");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "server busy\n",
            )
                .into_response();
        }
    };
    let found = match front.resolver.find(&name).await {
        Ok(f) => f,
        Err(Lookup::NotFound) => {
            metrics.request("http", "not_found");
            crate::phones::unanswered(client.ip(), name.as_str(), "http", None);
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        Err(Lookup::Unreachable(_)) => {
            metrics.request("http", "error");
            crate::phones::unanswered(
                client.ip(),
                name.as_str(),
                "http",
                Some("upstream unreachable"),
            );
            return plain(StatusCode::BAD_GATEWAY, "upstream unreachable\n");
        }
        Err(Lookup::Failed(why)) => {
            metrics.request("http", "error");
            info!(client = %client, name = %name, protocol = "http", "cannot serve: {why}");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot serve the file\n");
        }
    };
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type(name.as_str()));
    if let Some(size) = found.size {
        resp = resp.header(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    let result = found.origin.result();
    let source = found.origin.source().to_string();
    if head {
        metrics.request("http", result);
        return resp.body(Body::empty()).unwrap();
    }
    // The body streams straight from the cache file or the flight; the slot and the log line
    // follow the body's life. A failing source ends the body with an error, which aborts the
    // connection: a client never takes a truncated body for a whole one.
    let started = Instant::now();
    crate::phones::started(client.ip(), name.as_str(), "http", found.size);
    let stream = match found.body {
        FoundBody::Cached(f) => {
            let f = *f;
            let size = f.entry.size;
            disk_stream(f.file, f.guard, size)
        }
        // An override's size is always known (read from its metadata when opened).
        FoundBody::Local(f) => disk_stream(f, (), found.size.unwrap_or_default()),
        FoundBody::Stream(r) => tokio_util::io::ReaderStream::with_capacity(r, CHUNK).boxed(),
    };
    let body = LoggedBody {
        inner: stream,
        client,
        name: name.to_string(),
        size: found.size,
        result,
        source,
        started,
        sent: 0,
        failed: false,
        _slot: slot,
    };
    resp.body(Body::from_stream(body)).unwrap()
}

/// The response body: counts bytes, and logs and counts the transfer when dropped (finished,
/// failed or abandoned by the client).
struct LoggedBody {
    inner: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    client: SocketAddr,
    name: String,
    size: Option<u64>,
    result: &'static str,
    source: String,
    started: Instant,
    sent: u64,
    failed: bool,
    _slot: super::Slot,
}

impl futures::Stream for LoggedBody {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let r = self.inner.poll_next_unpin(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(b))) => self.sent += b.len() as u64,
            std::task::Poll::Ready(Some(Err(_))) => self.failed = true,
            _ => {}
        }
        r
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let metrics = crate::metrics::global();
        metrics.sent("http", self.sent);
        let complete = !self.failed && self.size.is_none_or(|s| s == self.sent);
        let error = (!complete).then(|| "connection closed before the end".to_string());
        crate::phones::finished(self.client.ip(), &self.name, "http", self.sent, error);
        metrics.request("http", if complete { self.result } else { "error" });
        let duration_ms = self.started.elapsed().as_millis() as u64;
        if complete {
            info!(client = %self.client, name = %self.name, protocol = "http", bytes = self.sent,
                duration_ms, result = self.result, source = %self.source, "transfer complete");
        } else {
            info!(client = %self.client, name = %self.name, protocol = "http", bytes = self.sent,
                duration_ms, result = self.result, source = %self.source, "transfer failed or cut short");
        }
    }
}

fn content_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".xml") {
        "text/xml"
    } else if lower.ends_with(".txt") || lower.ends_with(".loads") {
        "text/plain"
    } else if lower.ends_with(".png") {
        "image/png"
    } else {
        "application/octet-stream"
    }
}

/// Decodes `%XX` escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
