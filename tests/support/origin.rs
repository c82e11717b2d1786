//! `HttpOrigin`: an in-process HTTP file server standing in for the central CUCM TFTP server's
//! HTTP side (port 6970). It counts what it is asked, and its failure knobs can be turned while
//! a test runs: latency, bandwidth cap, truncated bodies, 500s, 404s, refusing connections.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The file CUCM publishes on 6970 listing its config files, `name length` per line.
pub const CONFIG_FILE_CACHE_LIST: &str = "ConfigFileCacheList.txt";

#[derive(Clone)]
struct OriginFile {
    body: Bytes,
    etag: String,
    /// Whole seconds since the epoch (HTTP dates have no finer resolution).
    last_modified: u64,
}

#[derive(Default)]
struct Knobs {
    latency: Duration,
    /// Bytes per second for all response bodies together.
    bandwidth: Option<u64>,
    truncate_after: Option<u64>,
    not_found: HashSet<String>,
}

#[derive(Default)]
struct Counters {
    by_method_path: HashMap<(String, String), u64>,
    by_status: HashMap<u16, u64>,
}

struct OriginState {
    files: Mutex<HashMap<String, OriginFile>>,
    knobs: Mutex<Knobs>,
    fail: AtomicBool,
    counters: Mutex<Counters>,
    body_bytes: AtomicU64,
    next_etag: AtomicU64,
    /// When the shared bandwidth cap lets the next chunk go.
    pacer: Mutex<Instant>,
    /// Connections accepted in an older epoch are dead (see [`HttpOrigin::refuse`]).
    epoch: AtomicU64,
}

/// An HTTP origin on a free 127.0.0.1 port, on its own runtime; stops on drop.
pub struct HttpOrigin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl HttpOrigin {
    /// An origin with no files.
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("http-origin")
            .enable_all()
            .build()
            .expect("build the origin's runtime");
        let state = Arc::new(OriginState {
            files: Mutex::new(HashMap::new()),
            knobs: Mutex::new(Knobs::default()),
            fail: AtomicBool::new(false),
            counters: Mutex::new(Counters::default()),
            body_bytes: AtomicU64::new(0),
            next_etag: AtomicU64::new(1),
            pacer: Mutex::new(Instant::now()),
            epoch: AtomicU64::new(0),
        });
        let listener = {
            let _guard = rt.enter();
            bind_reusable(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .expect("bind the origin on 127.0.0.1")
        };
        let addr = listener.local_addr().unwrap();
        let origin = HttpOrigin {
            addr,
            state,
            server: Mutex::new(None),
            rt: Some(rt),
        };
        origin.spawn_server(listener);
        origin
    }

    /// An origin serving every file under `dir` (names relative to `dir`, with `/`).
    pub fn serve_dir(dir: &Path) -> Self {
        let origin = HttpOrigin::start();
        origin.load_dir(dir, dir);
        origin
    }

    /// An origin serving the given files.
    pub fn with_files<N: AsRef<str>, B: Into<Bytes>>(
        files: impl IntoIterator<Item = (N, B)>,
    ) -> Self {
        let origin = HttpOrigin::start();
        for (name, body) in files {
            origin.put_file(name.as_ref(), body);
        }
        origin
    }

    fn load_dir(&self, root: &Path, dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                self.load_dir(root, &path);
            } else {
                let name = path.strip_prefix(root).unwrap().to_str().unwrap();
                self.put_file(name, std::fs::read(&path).unwrap());
            }
        }
    }

    fn spawn_server(&self, listener: TcpListener) {
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.state.clone());
        let gate = GateListener {
            inner: listener,
            state: self.state.clone(),
        };
        let rt = self.rt.as_ref().unwrap();
        let task = rt.spawn(async move {
            let _ = axum::serve(gate, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (an upstream URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/name`.
    pub fn url_of(&self, name: &str) -> String {
        format!("http://{}/{}", self.addr, name)
    }

    // --- content -------------------------------------------------------------------------

    /// Adds or replaces a file; a replaced file gets a new ETag and a later Last-Modified.
    pub fn put_file(&self, name: &str, body: impl Into<Bytes>) {
        let name = name.trim_start_matches('/').to_string();
        let tag = self.state.next_etag.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut files = self.state.files.lock().unwrap();
        // A replacement within the same second must still look newer to If-Modified-Since.
        let last_modified = match files.get(&name) {
            Some(old) => now.max(old.last_modified + 1),
            None => now,
        };
        files.insert(
            name,
            OriginFile {
                body: body.into(),
                etag: format!("\"v{tag}\""),
                last_modified,
            },
        );
    }

    /// Deletes a file (then answered 404).
    pub fn remove_file(&self, name: &str) {
        self.state
            .files
            .lock()
            .unwrap()
            .remove(name.trim_start_matches('/'));
    }

    pub fn file(&self, name: &str) -> Option<Bytes> {
        let files = self.state.files.lock().unwrap();
        files
            .get(name.trim_start_matches('/'))
            .map(|f| f.body.clone())
    }

    /// The ETag currently served for `name` (with its quotes).
    pub fn etag(&self, name: &str) -> Option<String> {
        let files = self.state.files.lock().unwrap();
        files
            .get(name.trim_start_matches('/'))
            .map(|f| f.etag.clone())
    }

    /// The Last-Modified currently served for `name`, as an HTTP date.
    pub fn last_modified(&self, name: &str) -> Option<String> {
        let files = self.state.files.lock().unwrap();
        files
            .get(name.trim_start_matches('/'))
            .map(|f| http_date(f.last_modified))
    }

    /// Publishes `ConfigFileCacheList.txt` listing `names` with their current sizes, one
    /// `name length` per line, as CUCM does.
    pub fn publish_config_list(&self, names: &[&str]) {
        let mut text = String::new();
        {
            let files = self.state.files.lock().unwrap();
            for name in names {
                let size = files
                    .get(*name)
                    .unwrap_or_else(|| panic!("config list names {name:?}, which the origin lacks"))
                    .body
                    .len();
                text.push_str(&format!("{name} {size}\n"));
            }
        }
        self.put_file(CONFIG_FILE_CACHE_LIST, text);
    }

    // --- knobs ---------------------------------------------------------------------------

    /// Delay before each response (also 304s, 404s and 500s).
    pub fn set_latency(&self, latency: Duration) {
        self.state.knobs.lock().unwrap().latency = latency;
    }

    /// Caps all response bodies together at `bytes_per_sec` (paced streaming); `None` = no cap.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.state.knobs.lock().unwrap().bandwidth = bytes_per_sec;
    }

    /// Sends only the first `n` body bytes, then closes the connection (Content-Length still
    /// announces the full size); `None` = whole bodies.
    pub fn set_truncate_after(&self, n: Option<u64>) {
        self.state.knobs.lock().unwrap().truncate_after = n;
    }

    /// Answers every request with 500 while set.
    pub fn set_fail(&self, fail: bool) {
        self.state.fail.store(fail, Ordering::SeqCst);
    }

    /// Answers 404 for `name` while set, even if the file exists.
    pub fn set_not_found(&self, name: &str, not_found: bool) {
        let name = name.trim_start_matches('/').to_string();
        let mut knobs = self.state.knobs.lock().unwrap();
        if not_found {
            knobs.not_found.insert(name);
        } else {
            knobs.not_found.remove(&name);
        }
    }

    /// Stops listening (new connections are refused) and kills open connections (kept-alive
    /// ones fail on their next use). Undone by [`HttpOrigin::restore`].
    pub fn refuse(&self) {
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
        // Wait until the listener is really closed, so the next connect is refused.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Listens again on the same port after [`HttpOrigin::refuse`].
    pub fn restore(&self) {
        if self.server.lock().unwrap().is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            let bound = {
                let _guard = self.rt.as_ref().unwrap().enter();
                bind_reusable(self.addr)
            };
            match bound {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("origin cannot listen on {} again: {e}", self.addr),
            }
        };
        self.spawn_server(listener);
    }

    // --- counters ------------------------------------------------------------------------

    /// Requests for `name`, any method.
    pub fn requests(&self, name: &str) -> u64 {
        let name = name.trim_start_matches('/');
        let c = self.state.counters.lock().unwrap();
        c.by_method_path
            .iter()
            .filter(|((_, p), _)| p == name)
            .map(|(_, n)| n)
            .sum()
    }

    /// GET requests for `name` (conditional ones included).
    pub fn gets(&self, name: &str) -> u64 {
        self.requests_with("GET", name)
    }

    pub fn requests_with(&self, method: &str, name: &str) -> u64 {
        let key = (method.to_string(), name.trim_start_matches('/').to_string());
        let c = self.state.counters.lock().unwrap();
        c.by_method_path.get(&key).copied().unwrap_or(0)
    }

    pub fn requests_by_method(&self, method: &str) -> u64 {
        let c = self.state.counters.lock().unwrap();
        c.by_method_path
            .iter()
            .filter(|((m, _), _)| m == method)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn total_requests(&self) -> u64 {
        let c = self.state.counters.lock().unwrap();
        c.by_method_path.values().sum()
    }

    /// Responses with this status.
    pub fn responses_with_status(&self, status: u16) -> u64 {
        let c = self.state.counters.lock().unwrap();
        c.by_status.get(&status).copied().unwrap_or(0)
    }

    /// 304 Not Modified answers (successful revalidations).
    pub fn not_modified(&self) -> u64 {
        self.responses_with_status(304)
    }

    /// Body bytes handed to the connections (truncated bodies count what was sent).
    pub fn body_bytes_sent(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    pub fn reset_counters(&self) {
        *self.state.counters.lock().unwrap() = Counters::default();
        self.state.body_bytes.store(0, Ordering::SeqCst);
    }
}

impl Drop for HttpOrigin {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn bind_reusable(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(state): State<Arc<OriginState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let name = percent_decode(uri.path().trim_start_matches('/'));
    let (latency, not_found) = {
        let mut c = state.counters.lock().unwrap();
        *c.by_method_path
            .entry((method.as_str().to_string(), name.clone()))
            .or_default() += 1;
        let k = state.knobs.lock().unwrap();
        (k.latency, k.not_found.contains(&name))
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = respond(&state, &method, &name, not_found, &headers);
    *state
        .counters
        .lock()
        .unwrap()
        .by_status
        .entry(response.status().as_u16())
        .or_default() += 1;
    response
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}

fn respond(
    state: &Arc<OriginState>,
    method: &Method,
    name: &str,
    not_found: bool,
    headers: &HeaderMap,
) -> Response {
    if state.fail.load(Ordering::SeqCst) {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    if method != Method::GET && method != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let file = match state.files.lock().unwrap().get(name) {
        Some(f) if !not_found => f.clone(),
        _ => return status(StatusCode::NOT_FOUND),
    };
    let last_modified = http_date(file.last_modified);
    // RFC 9110 §13.2.2: If-None-Match wins over If-Modified-Since.
    let fresh = if let Some(inm) = headers.get(header::IF_NONE_MATCH) {
        let inm = inm.to_str().unwrap_or("");
        inm.split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == file.etag)
    } else if let Some(ims) = headers.get(header::IF_MODIFIED_SINCE) {
        ims.to_str()
            .ok()
            .and_then(parse_http_date)
            .is_some_and(|since| file.last_modified <= since)
    } else {
        false
    };
    let mut builder = Response::builder()
        .header(header::ETAG, &file.etag)
        .header(header::LAST_MODIFIED, &last_modified);
    if fresh {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap();
    }
    builder = builder
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_LENGTH,
            HeaderValue::from(file.body.len() as u64),
        );
    if method == Method::HEAD {
        return builder.body(Body::empty()).unwrap();
    }
    let (bandwidth, truncate) = {
        let k = state.knobs.lock().unwrap();
        (k.bandwidth, k.truncate_after)
    };
    if bandwidth.is_none() && truncate.is_none() {
        state
            .body_bytes
            .fetch_add(file.body.len() as u64, Ordering::SeqCst);
        return builder.body(Body::from(file.body)).unwrap();
    }
    builder
        .body(Body::from_stream(paced_body(
            state.clone(),
            file.body,
            bandwidth,
            truncate,
        )))
        .unwrap()
}

/// The body in chunks, paced by the shared bandwidth cap, failing after `truncate` bytes (which
/// makes hyper drop the connection short of Content-Length).
fn paced_body(
    state: Arc<OriginState>,
    body: Bytes,
    bandwidth: Option<u64>,
    truncate: Option<u64>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    let limit = truncate.map_or(body.len(), |t| (t as usize).min(body.len()));
    let chunk = bandwidth.map_or(64 * 1024, |r| (r as usize / 50).clamp(1024, 16 * 1024));
    futures::stream::unfold((0usize, false), move |(offset, done)| {
        let state = state.clone();
        let body = body.clone();
        async move {
            if done {
                return None;
            }
            if offset >= limit {
                if limit < body.len() {
                    // Let hyper flush what was sent before the error drops the connection.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let e = io::Error::new(io::ErrorKind::ConnectionAborted, "truncated by test");
                    return Some((Err(e), (offset, true)));
                }
                return None;
            }
            let end = (offset + chunk).min(limit);
            if let Some(rate) = bandwidth {
                let due = {
                    let mut pacer = state.pacer.lock().unwrap();
                    let start = (*pacer).max(Instant::now());
                    *pacer = start + Duration::from_secs_f64((end - offset) as f64 / rate as f64);
                    *pacer
                };
                tokio::time::sleep_until(due.into()).await;
            }
            state
                .body_bytes
                .fetch_add((end - offset) as u64, Ordering::SeqCst);
            Some((Ok(body.slice(offset..end)), (end, false)))
        }
    })
}

struct GateListener {
    inner: TcpListener,
    state: Arc<OriginState>,
}

impl axum::serve::Listener for GateListener {
    type Io = GateStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let epoch = self.state.epoch.load(Ordering::SeqCst);
                    let gate = GateStream {
                        inner: stream,
                        state: self.state.clone(),
                        epoch,
                    };
                    return (gate, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails its next read or write once the origin has refused (see
/// [`HttpOrigin::refuse`]): a restarted central server does not remember old connections.
struct GateStream {
    inner: TcpStream,
    state: Arc<OriginState>,
    epoch: u64,
}

impl GateStream {
    fn dead(&self) -> bool {
        self.state.epoch.load(Ordering::SeqCst) != self.epoch
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "origin refused by test")
}

impl AsyncRead for GateStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.dead() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GateStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.dead() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dead() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86400) as i64;
    let secs = unix_secs % 86400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses an IMF-fixdate back to seconds since the epoch.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let d: u32 = parts[1].parse().ok()?;
    let m = MONTHS.iter().position(|x| *x == parts[2])? as u32 + 1;
    let y: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    Some(days as u64 * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
