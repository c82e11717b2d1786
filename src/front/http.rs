//! The phones' HTTP front end (TCP 6970, as CUCM offers): `GET`/`HEAD /<name>` answered from
//! the overrides, the cache, or the same single-flight miss path as TFTP. Names are handled
//! exactly as for TFTP; there are no directory listings. Small files (boot storms are made of
//! them) are answered whole from memory ([`super::hot`]) in one write; larger ones stream from
//! disk through the blocking pool, misses from the upstream as they arrive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tracing::info;

use super::hot::HotFiles;
use super::{Gate, Lookup, Refusal, Resolver};
use crate::content::{self, Found};
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
    let served = Served {
        front,
        hot: Arc::new(HotFiles::default()),
    };
    axum::Router::new().fallback(serve_file).with_state(served)
}

/// The handler's state: the front end and its in-memory copies of small cached files.
#[derive(Clone)]
struct Served {
    front: HttpFront,
    hot: Arc<HotFiles>,
}

fn plain(status: StatusCode, msg: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg).into_response()
}

async fn serve_file(
    State(served): State<Served>,
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
    let slot = match served.front.gate.admit(client.ip(), "http") {
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
    let content = match find(&served, &name).await {
        Ok(c) => c,
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
    let size = content.size();
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type(name.as_str()));
    if let Some(size) = size {
        resp = resp.header(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    let (result, source) = content.origin();
    if head {
        metrics.request("http", result);
        return resp.body(Body::empty()).unwrap();
    }
    // The slot and the log line follow the body's life. A failing source ends the body with an
    // error, which aborts the connection: a client never takes a truncated body for a whole one.
    crate::phones::started(client.ip(), name.as_str(), "http", size);
    let delivery = Delivery {
        client,
        name: name.to_string(),
        size,
        result,
        source,
        started: Instant::now(),
        sent: 0,
        failed: false,
        _slot: slot,
    };
    let body = match content {
        // One buffer: hyper writes the headers and the whole body in one `writev`.
        Content::Memory { body, .. } => Body::new(MemoryBody {
            data: Some(body),
            delivery,
        }),
        Content::Streamed(found) => {
            let stream = match found.body {
                content::Body::Cached(f) => {
                    let f = *f;
                    let size = f.entry.size;
                    disk_stream(f.file, f.guard, size)
                }
                // An override's size is always known (read from its metadata when opened).
                content::Body::Local(f) => disk_stream(f, (), found.size.unwrap_or_default()),
                content::Body::Memory(b) => futures::stream::once(async { Ok(b) }).boxed(),
                content::Body::Stream(r) => {
                    tokio_util::io::ReaderStream::with_capacity(r, CHUNK).boxed()
                }
            };
            Body::from_stream(LoggedBody {
                inner: stream,
                delivery,
            })
        }
    };
    resp.body(body).unwrap()
}

/// What a request is answered with.
enum Content {
    /// A small file, whole in memory (a copy kept by [`HotFiles`], or a small override).
    Memory {
        body: bytes::Bytes,
        source: Arc<str>,
    },
    /// Anything else streams from disk or from the upstream.
    Streamed(Found),
}

impl Content {
    fn size(&self) -> Option<u64> {
        match self {
            Content::Memory { body, .. } => Some(body.len() as u64),
            Content::Streamed(f) => f.size,
        }
    }

    /// The `result` label and the log's `source`.
    fn origin(&self) -> (&'static str, Arc<str>) {
        match self {
            Content::Memory { source, .. } => ("hit", source.clone()),
            Content::Streamed(f) => (f.origin.result(), Arc::from(f.origin.source())),
        }
    }
}

/// Finds `name`: an override wins; then a current in-memory copy of a small cached file; then
/// the resolver (cache, upstream chain). A small cache hit or override is read whole here, on
/// this thread, and a cache hit's copy kept for the next request.
async fn find(served: &Served, name: &FileName) -> Result<Content, Lookup> {
    let resolver = &served.front.resolver;
    let overridden = resolver
        .overrides
        .as_ref()
        .is_some_and(|o| o.contains(name));
    if !overridden {
        if let Some(fetcher) = &resolver.fetcher {
            if let Some(copy) = served.hot.get(fetcher.cache(), name.key()) {
                return Ok(Content::Memory {
                    body: copy.body,
                    source: copy.source,
                });
            }
        }
    }
    let Found { size, body, origin } = resolver.find(name).await?;
    let small = size.is_some_and(|n| served.hot.wants(n));
    let unreadable = |e: std::io::Error| Lookup::Failed(format!("cannot read {name}: {e}"));
    match body {
        content::Body::Cached(file) if small => {
            let copy = served.hot.load(*file).map_err(unreadable)?;
            Ok(Content::Memory {
                body: copy.body,
                source: copy.source,
            })
        }
        content::Body::Memory(body) => Ok(Content::Memory {
            body,
            source: Arc::from(origin.source()),
        }),
        content::Body::Local(file) if small => {
            use std::io::Read;
            let want = size.unwrap_or_default();
            let mut buf = Vec::with_capacity(want as usize);
            (&file)
                .take(want)
                .read_to_end(&mut buf)
                .map_err(unreadable)?;
            if buf.len() as u64 != want {
                return Err(unreadable(std::io::Error::other(
                    "file shorter than its size",
                )));
            }
            Ok(Content::Memory {
                body: buf.into(),
                source: Arc::from(origin.source()),
            })
        }
        body => Ok(Content::Streamed(Found { size, body, origin })),
    }
}

/// The log line of one [`Delivery`], at a level of the caller's choosing.
macro_rules! delivered {
    ($d:ident, $level:ident, $msg:literal) => {
        tracing::$level!(client = %$d.client, name = %$d.name, protocol = "http",
            bytes = $d.sent, duration_ms = $d.started.elapsed().as_millis() as u64,
            result = $d.result, source = %$d.source, $msg)
    };
}

/// One response's accounting: bytes, the metrics, the phones view and the log line, settled
/// when the body is dropped (finished, failed or abandoned by the client).
struct Delivery {
    client: SocketAddr,
    name: String,
    size: Option<u64>,
    result: &'static str,
    source: Arc<str>,
    started: Instant,
    sent: u64,
    failed: bool,
    _slot: super::Slot,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let metrics = crate::metrics::global();
        metrics.sent("http", self.sent);
        let complete = !self.failed && self.size.is_none_or(|s| s == self.sent);
        let error = (!complete).then(|| "connection closed before the end".to_string());
        crate::phones::finished(self.client.ip(), &self.name, "http", self.sent, error);
        metrics.request("http", if complete { self.result } else { "error" });
        // A storm is thousands of hits a second: a line each would flood the journal and cost
        // more than serving them (issue 12). Misses and failures stay at info.
        match (complete, self.result) {
            (true, "hit") => delivered!(self, debug, "transfer complete"),
            (true, _) => delivered!(self, info, "transfer complete"),
            (false, _) => delivered!(self, info, "transfer failed or cut short"),
        }
    }
}

/// A streamed response body (a large file from disk, or a miss from the upstream).
struct LoggedBody {
    inner: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    delivery: Delivery,
}

impl futures::Stream for LoggedBody {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let r = self.inner.poll_next_unpin(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(b))) => self.delivery.sent += b.len() as u64,
            std::task::Poll::Ready(Some(Err(_))) => self.delivery.failed = true,
            _ => {}
        }
        r
    }
}

/// A response body already in memory: one frame of known length.
struct MemoryBody {
    data: Option<bytes::Bytes>,
    delivery: Delivery,
}

impl hyper::body::Body for MemoryBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let data = self.data.take();
        if let Some(d) = &data {
            // Handed to the connection, which writes it before the next request or fails it.
            self.delivery.sent += d.len() as u64;
        }
        std::task::Poll::Ready(data.map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

fn content_type(name: &str) -> &'static str {
    // Compared without allocating: this runs for every request.
    let ends = |suffix: &str| {
        name.len() >= suffix.len()
            && name.as_bytes()[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    if ends(".xml") {
        "text/xml"
    } else if ends(".txt") || ends(".loads") {
        "text/plain"
    } else if ends(".png") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_ignores_letter_case_and_short_names() {
        assert_eq!(content_type("SEP001122AABBCC.cnf.XML"), "text/xml");
        assert_eq!(content_type("sip88xx.14-2-1.LOADS"), "text/plain");
        assert_eq!(content_type("Desktops/320x212x12/a.png"), "image/png");
        assert_eq!(content_type("xml"), "application/octet-stream");
        assert_eq!(content_type(""), "application/octet-stream");
    }
}
