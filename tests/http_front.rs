//! The phones' HTTP front end (port 6970), the admin endpoint and `branchtftp status`, proven
//! against the real binary: `branchtftp serve -c FILE` with every listener on a free loopback
//! port, an in-process [`HttpOrigin`] as the central server, and real clients (curl over HTTP
//! and TFTP, tftp-hpa, atftp).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MB: usize = 1024 * 1024;

/// `branchtftp serve -c FILE` as a child process: TFTP, phones' HTTP and admin each on a free
/// loopback port, the cache and the overrides in a temporary directory. Killed on drop.
struct Appliance {
    tftp: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    /// Holds the config, the cache and the log; removed on drop.
    _dir: tempfile::TempDir,
    /// `cache.overrides`: local files that win over upstream copies.
    overrides: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Appliance {
    /// Starts against `upstream_url` with `access_yaml` (an `access:` section, or "") and waits
    /// until `/healthz` answers.
    fn start(upstream_url: &str, access_yaml: &str) -> Appliance {
        Self::start_with_http(upstream_url, access_yaml, "")
    }

    /// As [`Appliance::start`], with more keys for the `http:` section (indented two spaces).
    fn start_with_http(upstream_url: &str, access_yaml: &str, http_yaml: &str) -> Appliance {
        let mut last = String::new();
        for _attempt in 0..3 {
            match Self::try_start(upstream_url, access_yaml, http_yaml) {
                Ok(a) => return a,
                Err(why) => last = why,
            }
        }
        panic!("branchtftp serve did not become ready: {last}");
    }

    fn try_start(
        upstream_url: &str,
        access_yaml: &str,
        http_yaml: &str,
    ) -> Result<Appliance, String> {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-http-front-")
            .tempdir()
            .unwrap();
        let tftp = localhost(free_udp_port());
        let http = localhost(free_tcp_port());
        let admin = localhost(free_tcp_port());
        let overrides = dir.path().join("overrides");
        std::fs::create_dir(&overrides).unwrap();
        let yaml = format!(
            "log: info\n\
             tftp:\n  listen: [\"{tftp}\"]\n\
             http:\n  listen: [\"{http}\"]\n{http_yaml}\
             admin:\n  listen: \"{admin}\"\n\
             cache:\n  dir: {cache}\n  overrides: {overrides}\n\
             upstreams:\n  - url: {upstream_url}\n    timeout: 2s\n\
             sync:\n  prefetch: []\n  config_list: false\n  discover: false\n\
             {access_yaml}",
            cache = dir.path().join("cache").display(),
            overrides = overrides.display(),
        );
        let config = dir.path().join("branchtftp.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("serve.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
            .arg("serve")
            .arg("-c")
            .arg(&config)
            .env_remove("BRANCHTFTP_CONFIG")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start branchtftp serve");
        let mut app = Appliance {
            tftp,
            http,
            admin,
            _dir: dir,
            overrides,
            log,
            child,
        };
        let deadline = Instant::now() + SERVER_START_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = app.child.try_wait() {
                return Err(format!("exited with {status}: {}", app.log()));
            }
            if let Some((200, body)) = raw_http(app.admin, "GET", "/healthz") {
                assert_eq!(body, b"ok\n");
                return Ok(app);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no /healthz within {SERVER_START_LIMIT:?}: {}",
            app.log()
        ))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.http, path.trim_start_matches('/'))
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    fn metrics(&self) -> Metrics {
        let (status, body) = raw_http(self.admin, "GET", "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        Metrics::parse(&String::from_utf8(body).unwrap())
    }

    /// Polls `/metrics` until `sample` has `value` (counters are bumped when a transfer's last
    /// byte has left, which may be a moment after the client has it); panics after 10 s.
    fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics();
            if m.get(name, labels) == Some(value) || Instant::now() > deadline {
                assert_eq!(
                    m.get(name, labels),
                    Some(value),
                    "{name}{labels:?} in:\n{}\nserver log:\n{}",
                    m.text,
                    self.log()
                );
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self) -> serde_json::Value {
        let (status, body) = raw_http(self.admin, "GET", "/status").expect("GET /status");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("/status is JSON")
    }

    /// Waits until the cache holds `files` files. A client can have every byte of a miss a
    /// moment before the flight has fsynced and published the file; until then a second request
    /// joins the flight (a miss) instead of hitting the cache.
    fn wait_cached(&self, files: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.status();
            if st["cache"]["files"] == files {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cache never held {files} files: {st}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a log line containing every one of `parts`; returns it.
    fn wait_log_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), the raw way: status and
/// the body bytes exactly as they came on the wire (so a HEAD that sends a body is caught).
/// `None` when nothing listens or the answer is not HTTP.
fn raw_http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    let (status, _headers, body) = raw_http_full(addr, method, path)?;
    Some((status, body))
}

fn raw_http_full(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head, raw[split + 4..].to_vec()))
}

/// A header's value from a raw header block (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The samples of an OpenMetrics exposition.
struct Metrics {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().expect("sample value");
            let (name, labels) = match key.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').expect("label k=v");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (key.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of the sample with this name and exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// Like [`Metrics::get`], with a missing sample read as 0 (a family without samples yet).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn requests<'a>(protocol: &'a str, result: &'a str) -> [(&'a str, &'a str); 2] {
    [("protocol", protocol), ("result", result)]
}

/// Skips (or fails under tests/run.sh) when a real client is missing.
fn have(programs: &[&str]) -> bool {
    for p in programs {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {p}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            skip_or_fail(&format!("`{p}` is not installed"));
            return false;
        }
    }
    true
}

/// Content derived from the name, like [`TestFiles`], without a directory.
fn content(name: &str, size: usize) -> Vec<u8> {
    let mut files = TestFiles::new();
    files.add(name, size);
    files.content(name)
}

async fn curl_get(url: &str, out: &Path) -> ClientRun {
    curl_http_get(url, out, &[]).await
}

const ALLOW_LOOPBACK_ONE: &str = "access:\n  allow: [\"127.0.0.1/32\"]\n";

#[tokio::test]
async fn miss_then_hit_head_and_not_found_over_http() {
    if !have(&["curl"]) {
        return;
    }
    let name = "SEP001122AABBCC.cnf.xml";
    let body = content(name, 300_000);
    let sha = sha256_bytes(&body);
    let origin = HttpOrigin::with_files([(name, body.clone())]);
    let app = Appliance::start(&origin.url(), "");
    let out = scratch_dir();

    // Miss: through the origin, intact.
    let miss = curl_get(&app.url(name), &out.path().join("miss")).await;
    assert_eq!(miss.http_status(), 200, "{miss}\n{}", app.log());
    miss.assert_intact(&sha);
    assert_eq!(origin.gets(name), 1);
    app.wait_cached(1);

    // Hit: the same bytes, no new origin GET, also under another spelling (names are
    // case-insensitive, as for TFTP).
    let hit = curl_get(&app.url(name), &out.path().join("hit")).await;
    assert_eq!(hit.http_status(), 200, "{hit}");
    hit.assert_intact(&sha);
    let other_case = curl_get(
        &app.url("sep001122aabbcc.CNF.XML"),
        &out.path().join("case"),
    )
    .await;
    assert_eq!(other_case.http_status(), 200, "{other_case}");
    other_case.assert_intact(&sha);
    assert_eq!(origin.gets(name), 1, "a hit went upstream");
    assert_eq!(origin.total_requests(), 1);

    // HEAD: the right Content-Length and not one byte of body on the wire.
    let (status, head, rest) = raw_http_full(app.http, "HEAD", &format!("/{name}")).unwrap();
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header(&head, "content-length"),
        Some(body.len().to_string().as_str()),
        "{head}"
    );
    assert!(rest.is_empty(), "HEAD sent {} body bytes", rest.len());
    let curl_head = curl_http(
        &app.url(name),
        &out.path().join("head"),
        &[],
        &["-I", "-m", "10"],
    )
    .await;
    assert_eq!(curl_head.http_status(), 200, "{curl_head}");
    let headers = std::fs::read_to_string(out.path().join("head")).unwrap();
    assert!(
        headers
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}", body.len())),
        "{headers}"
    );

    // Not on the origin: 404.
    let missing = curl_get(&app.url("nope.bin"), &out.path().join("nope")).await;
    assert_eq!(missing.http_status(), 404, "{missing}");
    assert_eq!(origin.gets(name), 1);

    // One log line per finished transfer: client, name, protocol, bytes, result, source.
    let miss_line = app.wait_log_line(&["transfer complete", "result=\"miss\""]);
    for part in [
        "client=127.0.0.1:",
        &format!("name={name}"),
        "protocol=\"http\"",
        &format!("bytes={}", body.len()),
        &format!("source={}", origin.url()),
        "duration_ms=",
    ] {
        assert!(miss_line.contains(part), "{part:?} not in {miss_line:?}");
    }
    // Hits are counted, and logged at debug only: a boot storm is thousands of them a second.
    app.wait_metric("branchtftp_requests_total", &requests("http", "hit"), 4.0);
    assert!(
        !app.log().contains("result=\"hit\""),
        "a hit logged at info:\n{}",
        app.log()
    );
}

#[tokio::test]
async fn client_outside_the_allow_list_gets_403() {
    if !have(&["curl"]) {
        return;
    }
    let origin = HttpOrigin::with_files([("f.bin", content("f.bin", 1000))]);
    let app = Appliance::start(&origin.url(), ALLOW_LOOPBACK_ONE);
    let out = scratch_dir();
    let denied = curl_http(
        &app.url("f.bin"),
        &out.path().join("denied"),
        &[],
        &["--interface", "127.0.0.2"],
    )
    .await;
    assert_eq!(denied.http_status(), 403, "{denied}\n{}", app.log());
    assert_eq!(
        origin.total_requests(),
        0,
        "a refused client caused a fetch"
    );
    app.wait_log_line(&["refused", "client=127.0.0.2:", "protocol=\"http\""]);
    // The allowed address gets the file.
    let allowed = curl_get(&app.url("f.bin"), &out.path().join("allowed")).await;
    assert_eq!(allowed.http_status(), 200, "{allowed}");
    app.wait_metric(
        "branchtftp_requests_total",
        &requests("http", "denied"),
        1.0,
    );
}

#[tokio::test]
async fn no_listing_and_no_escape_from_the_cache() {
    if !have(&["curl"]) {
        return;
    }
    let origin = HttpOrigin::with_files([("f.bin", content("f.bin", 1000))]);
    let app = Appliance::start(&origin.url(), "");
    let out = scratch_dir();
    let get = |path: &'static str| {
        let url = format!("http://{}{}", app.http, path);
        let out = out.path().join("o");
        async move { curl_http(&url, &out, &[], &["--path-as-is"]).await }
    };
    // No directory listing.
    let root = get("/").await;
    assert_eq!(root.http_status(), 404, "{root}");
    // Names that leave the served tree, spelled plainly, encoded, or Windows-style.
    for path in [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "/a/..%5c..%5cetc%5cpasswd",
        "/C:/Windows/win.ini",
        "/f.bin%00.xml",
    ] {
        let run = get(path).await;
        assert_eq!(run.http_status(), 403, "{path}: {run}\n{}", app.log());
    }
    assert_eq!(
        origin.total_requests(),
        0,
        "an escaping name reached the origin"
    );
    // Other methods are not served.
    let (status, _) = raw_http(app.http, "POST", "/f.bin").unwrap();
    assert_eq!(status, 405);
}

// Blocking waits below: the spawned client needs a worker of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_past_max_per_client_gets_503() {
    if !have(&["curl"]) {
        return;
    }
    let name = "firmware/slow.sbn";
    let body = content(name, 2 * MB);
    let sha = sha256_bytes(&body);
    let origin = HttpOrigin::with_files([(name, body)]);
    // About 3 s for the whole file: the first transfer is surely still running while the
    // others ask, even on a loaded machine.
    origin.set_bandwidth(Some(700_000));
    let app = Appliance::start(
        &origin.url(),
        "access:\n  allow: [\"127.0.0.0/8\"]\n  max_per_client: 1\n",
    );
    let out = scratch_dir();
    let first = tokio::spawn({
        let url = app.url(name);
        let path = out.path().join("first");
        async move { curl_get(&url, &path).await }
    });
    // Wait until the first transfer holds its slot.
    app.wait_metric("branchtftp_transfers_active", &[("protocol", "http")], 1.0);
    let (status, head, _) = raw_http_full(app.http, "GET", &format!("/{name}")).unwrap();
    assert_eq!(status, 503, "{head}");
    assert!(header(&head, "retry-after").is_some(), "{head}");
    let second = curl_get(&app.url(name), &out.path().join("second")).await;
    assert_eq!(second.http_status(), 503, "{second}");
    // Another client is not limited by the first one's slot.
    let other = curl_http(
        &app.url(name),
        &out.path().join("other"),
        &[],
        &["--interface", "127.0.0.2"],
    )
    .await;
    assert_eq!(other.http_status(), 200, "{other}");
    other.assert_intact(&sha);
    let first = first.await.unwrap();
    assert_eq!(first.http_status(), 200, "{first}");
    first.assert_intact(&sha);
    assert_eq!(origin.gets(name), 1);
    // The slot is free again.
    app.wait_metric("branchtftp_transfers_active", &[("protocol", "http")], 0.0);
    let again = curl_get(&app.url(name), &out.path().join("again")).await;
    assert_eq!(again.http_status(), 200, "{again}");
    again.assert_intact(&sha);
}

#[tokio::test]
async fn overrides_are_served_over_http_without_asking_upstream() {
    if !have(&["curl"]) {
        return;
    }
    let name = "SEPAABBCCDDEEFF.cnf.xml";
    let origin = HttpOrigin::with_files([(name, content(name, 1000))]);
    let app = Appliance::start(&origin.url(), "");
    // Larger than one read, and not a multiple of it.
    let local = content("local", 600_001);
    std::fs::write(app.overrides.join(name), &local).unwrap();
    let out = scratch_dir();
    let run = curl_get(&app.url(name), &out.path().join("o")).await;
    assert_eq!(run.http_status(), 200, "{run}");
    run.assert_intact(&sha256_bytes(&local));
    let (status, head, rest) = raw_http_full(app.http, "HEAD", &format!("/{name}")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(header(&head, "content-length"), Some("600001"), "{head}");
    assert!(rest.is_empty());
    assert_eq!(origin.total_requests(), 0);
    // Counted as sent once complete (logged at debug only, like every hit).
    app.wait_metric(
        "branchtftp_sent_bytes_total",
        &[("protocol", "http")],
        600_001.0,
    );
}

#[tokio::test]
async fn an_override_added_beside_a_cached_copy_in_memory_wins_over_http_and_its_removal_too() {
    if !have(&["curl"]) {
        return;
    }
    let name = "SEP0011AABBCCDD.cnf.xml";
    let upstream = content(name, 1500);
    let origin = HttpOrigin::with_files([(name, upstream.clone())]);
    let app = Appliance::start(&origin.url(), "");
    let out = scratch_dir();
    let dest = out.path().join("o");
    let get = || async {
        let run = curl_get(&app.url(name), &dest).await;
        assert_eq!(run.http_status(), 200, "{run}");
        std::fs::read(&dest).unwrap()
    };
    // Asks until `want` is served, for up to 3 s.
    let app = &app;
    let get = &get;
    let served_within = |want: Vec<u8>, what: &'static str| async move {
        let t = Instant::now();
        while get().await != want {
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{what}\n{}",
                app.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // A miss, then hits: the small cached file is now answered from its copy in memory.
    assert_eq!(get().await, upstream);
    assert_eq!(get().await, upstream);
    let local = content("local", 1200);
    std::fs::write(app.overrides.join(name.to_lowercase()), &local).unwrap();
    served_within(local, "the override is not served").await;
    std::fs::remove_file(app.overrides.join(name.to_lowercase())).unwrap();
    served_within(upstream, "the cached copy is not back").await;
    assert_eq!(origin.gets(name), 1, "the cached copy served throughout");
}

#[tokio::test]
async fn one_miss_for_an_http_and_three_tftp_clients_is_one_upstream_fetch() {
    if !have(&["curl", "tftp", "atftp"]) {
        return;
    }
    let name = "firmware/sip88xx.12-8-1.loads.sbn";
    let size = MB + 777;
    let body = content(name, size);
    let sha = sha256_bytes(&body);
    let origin = HttpOrigin::with_files([(name, body)]);
    // The fetch lasts about 1.5 s, so every client arrives while it is in flight.
    origin.set_bandwidth(Some(size as u64 * 2 / 3));
    let app = Appliance::start(&origin.url(), "");
    let out = scratch_dir();
    let [o_http, o_curl, o_hpa, o_atftp] =
        ["http", "curl-tftp", "tftp-hpa", "atftp"].map(|c| out.path().join(c));
    let url = app.url(name);
    let (http, curl, hpa, atftp) = tokio::join!(
        curl_get(&url, &o_http),
        curl_tftp_get(app.tftp, name, &o_curl, Some(1428)),
        tftp_hpa_get(app.tftp, name, &o_hpa, TftpMode::Binary),
        atftp_get(app.tftp, name, &o_atftp, Some(1428), Some(8), true, Some(2)),
    );
    assert_eq!(http.http_status(), 200, "{http}\n{}", app.log());
    for run in [&http, &curl, &hpa, &atftp] {
        assert!(
            run.success() && !run.reported_error(),
            "{run}\n{}",
            app.log()
        );
        run.assert_intact(&sha);
    }
    assert_eq!(origin.gets(name), 1, "{}", app.log());
    let m = app.wait_metric("branchtftp_requests_total", &requests("tftp", "miss"), 3.0);
    assert_eq!(m.get("branchtftp_upstream_flights_total", &[]), Some(1.0));
    assert_eq!(
        m.count("branchtftp_requests_total", &requests("http", "miss")),
        1.0
    );
    // Every TFTP transfer has its line too.
    let line = app.wait_log_line(&["transfer complete", "protocol=\"tftp\""]);
    assert!(line.contains(&format!("bytes={size}")), "{line}");
    assert!(line.contains("result=\"miss\""), "{line}");
}

#[tokio::test]
async fn metrics_count_known_transfers() {
    if !have(&["curl"]) {
        return;
    }
    let name = "XMLDefault.cnf.xml";
    let size = 123_456usize;
    let origin = HttpOrigin::with_files([(name, content(name, size))]);
    let app = Appliance::start(&origin.url(), ALLOW_LOOPBACK_ONE);
    let out = scratch_dir();
    let up = origin.url();
    let sz = size as f64;

    let before = app.metrics();
    for family in [
        "branchtftp_requests_total",
        "branchtftp_upstream_requests_total",
        "branchtftp_upstream_bytes_total",
        "branchtftp_sync_passes_total",
    ] {
        assert!(
            before
                .text
                .contains(&format!("# TYPE {}", family.trim_end_matches("_total"))),
            "{family} missing:\n{}",
            before.text
        );
    }
    assert_eq!(
        before.get("branchtftp_sent_bytes_total", &[("protocol", "http")]),
        Some(0.0)
    );
    assert_eq!(before.get("branchtftp_cache_files", &[]), Some(0.0));
    assert_eq!(before.get("branchtftp_cache_bytes", &[]), Some(0.0));

    // One miss, one hit, one not found, one refused over HTTP; one hit over TFTP.
    assert_eq!(
        curl_get(&app.url(name), &out.path().join("1"))
            .await
            .http_status(),
        200
    );
    app.wait_cached(1);
    assert_eq!(
        curl_get(&app.url(name), &out.path().join("2"))
            .await
            .http_status(),
        200
    );
    assert_eq!(
        curl_get(&app.url("absent.bin"), &out.path().join("3"))
            .await
            .http_status(),
        404
    );
    let denied = curl_http(
        &app.url(name),
        &out.path().join("4"),
        &[],
        &["--interface", "127.0.0.2"],
    )
    .await;
    assert_eq!(denied.http_status(), 403);
    curl_tftp_get(app.tftp, name, &out.path().join("5"), None)
        .await
        .assert_intact(&sha256_bytes(&content(name, size)));

    app.wait_metric("branchtftp_sent_bytes_total", &[("protocol", "tftp")], sz);
    // The slots go a moment after the byte counts are added.
    for protocol in ["http", "tftp"] {
        app.wait_metric(
            "branchtftp_transfers_active",
            &[("protocol", protocol)],
            0.0,
        );
    }
    let m = app.wait_metric(
        "branchtftp_sent_bytes_total",
        &[("protocol", "http")],
        2.0 * sz,
    );
    let expect = |name: &str, labels: &[(&str, &str)], v: f64| {
        assert_eq!(m.count(name, labels), v, "{name}{labels:?} in:\n{}", m.text);
    };
    expect("branchtftp_requests_total", &requests("http", "miss"), 1.0);
    expect("branchtftp_requests_total", &requests("http", "hit"), 1.0);
    expect(
        "branchtftp_requests_total",
        &requests("http", "not_found"),
        1.0,
    );
    expect(
        "branchtftp_requests_total",
        &requests("http", "denied"),
        1.0,
    );
    expect("branchtftp_requests_total", &requests("http", "error"), 0.0);
    expect("branchtftp_requests_total", &requests("tftp", "hit"), 1.0);
    expect("branchtftp_requests_total", &requests("tftp", "miss"), 0.0);
    expect(
        "branchtftp_upstream_requests_total",
        &[("upstream", &up), ("result", "found")],
        1.0,
    );
    expect(
        "branchtftp_upstream_requests_total",
        &[("upstream", &up), ("result", "not_found")],
        1.0,
    );
    expect("branchtftp_upstream_bytes_total", &[("upstream", &up)], sz);
    expect("branchtftp_cache_files", &[], 1.0);
    expect("branchtftp_cache_bytes", &[], sz);
    expect("branchtftp_transfers_active", &[("protocol", "http")], 0.0);
    expect("branchtftp_transfers_active", &[("protocol", "tftp")], 0.0);
    assert_eq!(origin.gets(name), 1);

    // The exposition is OpenMetrics: it ends with # EOF.
    assert!(m.text.trim_end().ends_with("# EOF"), "{}", m.text);
}

fn run_status(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .arg("status")
        .args(args)
        .env_remove("BRANCHTFTP_CONFIG")
        .output()
        .expect("run branchtftp status")
}

#[tokio::test]
async fn status_shows_an_upstream_going_down() {
    if !have(&["curl"]) {
        return;
    }
    let origin = HttpOrigin::with_files([
        ("a.cnf.xml", content("a.cnf.xml", 5000)),
        ("b.cnf.xml", content("b.cnf.xml", 5000)),
    ]);
    let app = Appliance::start(&origin.url(), "");
    let out = scratch_dir();
    let admin = app.admin_url();

    let st = app.status();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["upstreams"][0]["url"], origin.url());
    assert_eq!(st["transfers"]["active"], 0);
    assert!(st["uptime_s"].is_u64(), "{st}");

    // A miss served: the upstream is up, the cache holds the file.
    let ok = curl_get(&app.url("a.cnf.xml"), &out.path().join("a")).await;
    assert_eq!(ok.http_status(), 200, "{ok}");
    app.wait_cached(1);
    let st = app.status();
    assert_eq!(st["upstreams"][0]["state"], "up", "{st}");
    assert!(st["upstreams"][0]["last_ok"].is_u64(), "{st}");
    assert_eq!(st["cache"]["files"], 1, "{st}");
    assert_eq!(st["cache"]["bytes"], 5000, "{st}");

    let table = run_status(&["--admin", &admin]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(0), "{text}");
    assert!(text.contains(&origin.url()), "{text}");
    assert!(text.contains("up"), "{text}");
    assert!(text.contains("1 files"), "{text}");
    let json = run_status(&["--admin", &admin, "--json"]);
    assert_eq!(json.status.code(), Some(0));
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--json is JSON");
    assert_eq!(parsed["upstreams"][0]["state"], "up");

    // The origin goes away; the next miss cannot be served and the upstream shows down.
    origin.refuse();
    let failed = curl_get(&app.url("b.cnf.xml"), &out.path().join("b")).await;
    assert_eq!(failed.http_status(), 502, "{failed}");
    let st = app.status();
    assert_eq!(st["upstreams"][0]["state"], "down", "{st}");
    let last_error = st["upstreams"][0]["last_error"].as_str().unwrap_or("");
    assert!(!last_error.is_empty(), "{st}");
    // Cached files are still served.
    let hit = curl_get(&app.url("a.cnf.xml"), &out.path().join("a2")).await;
    assert_eq!(hit.http_status(), 200, "{hit}");

    // `branchtftp status` says so: exit 3 when every upstream is down.
    let table = run_status(&["--admin", &admin]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(3), "{text}");
    assert!(text.contains("down"), "{text}");
    let json = run_status(&["--admin", &admin, "--json"]);
    assert_eq!(json.status.code(), Some(3));
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["upstreams"][0]["state"], "down");
}

#[test]
fn status_exits_1_when_nothing_listens() {
    let port = free_tcp_port();
    let out = run_status(&["--admin", &format!("127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    let out = run_status(&["--admin", &format!("127.0.0.1:{port}"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn status_into_a_closed_pipe_does_not_panic() {
    let origin = HttpOrigin::start();
    let app = Appliance::start(&origin.url(), "");
    // `branchtftp status --json | head -0`: the reader is gone before anything is written.
    for args in [&["--json"][..], &[][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
            .arg("status")
            .arg("--admin")
            .arg(app.admin_url())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "status {args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "status {args:?}: {err}");
    }
}

// --- connection limits and timeouts (issues 11 and 12) ---------------------------------------

/// Reads one response (headers and a Content-Length body) from a keep-alive connection.
fn read_response(s: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = header(&head, "content-length")?.parse().ok()?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, body))
}

fn get_on(s: &mut TcpStream, path: &str) -> Option<(u16, Vec<u8>)> {
    // One write, like curl: a request split over segments would wait on Nagle at our end.
    let req = format!("GET {path} HTTP/1.1\r\nHost: phone\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    read_response(s)
}

/// Waits for the server to close `s`: true if it did within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 or the like before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn keep_alive_requests_do_not_wait_on_delayed_acks() {
    let origin = HttpOrigin::start();
    let app = Appliance::start(&origin.url(), "");
    for name in ["a.xml", "b.xml", "c.xml"] {
        std::fs::write(app.overrides.join(name), content(name, 1500)).unwrap();
    }
    let mut s = TcpStream::connect(app.http).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(get_on(&mut s, "/a.xml").unwrap().0, 200);
    // Without TCP_NODELAY each later request on the connection waited ~40 ms for the client's
    // delayed ACK (Nagle's algorithm holding the response's last segment).
    for name in ["/b.xml", "/c.xml"] {
        let t = Instant::now();
        let (status, body) = get_on(&mut s, name).unwrap();
        assert_eq!((status, body.len()), (200, 1500));
        assert!(
            t.elapsed() < Duration::from_millis(25),
            "{name}: {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test]
async fn half_sent_headers_and_idle_connections_are_closed() {
    let origin = HttpOrigin::start();
    let app = Appliance::start_with_http(
        &origin.url(),
        "",
        "  header_timeout: 1s\n  idle_timeout: 2s\n",
    );
    std::fs::write(app.overrides.join("a.xml"), content("a.xml", 100)).unwrap();
    let mut half = TcpStream::connect(app.http).unwrap();
    half.write_all(b"GET /a.xml HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = TcpStream::connect(app.http).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(get_on(&mut idle, "/a.xml").unwrap().0, 200);
    let t = Instant::now();
    assert!(
        closed_within(&mut half, Duration::from_secs(4)),
        "half a header"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)),
        "idle keep-alive"
    );
}

#[tokio::test]
async fn connections_past_max_connections_wait_for_a_free_one() {
    let origin = HttpOrigin::start();
    let app = Appliance::start_with_http(&origin.url(), "", "  max_connections: 2\n");
    std::fs::write(app.overrides.join("a.xml"), content("a.xml", 100)).unwrap();
    let mut first = TcpStream::connect(app.http).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(get_on(&mut first, "/a.xml").unwrap().0, 200);
    let second = TcpStream::connect(app.http).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The third connects (the kernel's backlog) but is not served while two are open.
    let mut third = TcpStream::connect(app.http).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(third, "GET /a.xml HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut byte = [0u8; 1];
    assert!(
        third.read(&mut byte).is_err(),
        "served past max_connections"
    );
    drop(second);
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(read_response(&mut third).unwrap().0, 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_slot() {
    let origin = HttpOrigin::start();
    let app = Appliance::start_with_http(&origin.url(), "", "  send_timeout: 1s\n");
    std::fs::write(app.overrides.join("big.bin"), content("big.bin", 64 * MB)).unwrap();
    let mut s = TcpStream::connect(app.http).unwrap();
    write!(s, "GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Read nothing: the socket buffers fill and the server's writes block.
    let deadline = Instant::now() + Duration::from_secs(6);
    let active = || {
        let (_, body) = raw_http(app.admin, "GET", "/status").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["transfers"]["active"].as_u64().unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(active(), 1);
    while active() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(active(), 0, "slot still held: {}", app.log());
}

/// `POST /sync` from loopback: a full pass now; returns once one more pass has finished.
fn sync_pass_now(app: &Appliance) {
    let passes = |m: &Metrics| -> f64 {
        m.samples
            .iter()
            .filter(|(n, _, _)| n == "branchtftp_sync_passes_total")
            .map(|(_, _, v)| *v)
            .sum()
    };
    let before = passes(&app.metrics());
    let (status, _) = raw_http(app.admin, "POST", "/sync").expect("POST /sync");
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while passes(&app.metrics()) <= before {
        assert!(Instant::now() < deadline, "no sync pass: {}", app.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_publish_during_keep_alive_serving_gives_the_new_bytes_on_the_next_request() {
    // Small hits are answered from a copy in memory (issue 12); a sync pass that replaces the
    // file must end that copy's use at once, on a connection that stays open throughout.
    let name = "g3-tones.xml";
    // Valid XML, the same length: the sync worker refuses a "config" that is not XML.
    let tones =
        |v: u8| format!("<tones version=\"{v}\">{}</tones>\n", "b".repeat(1400)).into_bytes();
    let (v1, v2) = (tones(1), tones(2));
    assert_ne!(v1, v2);
    let origin = HttpOrigin::with_files([(name, v1.clone())]);
    let app = Appliance::start(&origin.url(), "");
    let mut s = TcpStream::connect(app.http).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        get_on(&mut s, &format!("/{name}")),
        Some((200, v1.clone())),
        "miss"
    );
    app.wait_cached(1);
    for _ in 0..3 {
        assert_eq!(
            get_on(&mut s, &format!("/{name}")),
            Some((200, v1.clone())),
            "hit"
        );
    }
    origin.put_file(name, v2.clone());
    sync_pass_now(&app);
    for _ in 0..3 {
        assert_eq!(
            get_on(&mut s, &format!("/{name}")),
            Some((200, v2.clone())),
            "after the publish: {}",
            app.log()
        );
    }
    // An eviction ends the copy's use too: the next request is a miss, fetched again.
    let (status, _) = raw_http(app.admin, "DELETE", &format!("/cache/{name}")).unwrap();
    assert_eq!(status, 200, "{}", app.log());
    origin.put_file(name, v1.clone());
    let fetched = origin.gets(name);
    assert_eq!(
        get_on(&mut s, &format!("/{name}")),
        Some((200, v1)),
        "after the eviction"
    );
    assert_eq!(origin.gets(name), fetched + 1);
}

#[tokio::test]
async fn twenty_cached_files_on_one_keep_alive_connection_take_no_stall_each() {
    // A phone fetches its boot files over one connection: 20 requests must not each wait for
    // a delayed ACK (~40 ms) or a trip through a thread pool.
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let name = format!("English_United_States/file{i}.xml");
            let body = content(&name, if i % 2 == 0 { 1500 } else { 50_000 });
            (name, body)
        })
        .collect();
    let origin = HttpOrigin::with_files(files.iter().map(|(n, b)| (n.as_str(), b.clone())));
    let app = Appliance::start(&origin.url(), "");
    let mut s = TcpStream::connect(app.http).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (name, body) in &files {
        assert_eq!(
            get_on(&mut s, &format!("/{name}")).as_ref(),
            Some(&(200, body.clone()))
        );
    }
    app.wait_cached(files.len() as u64);
    // Twice: the first round reads each file from disk, the second from memory.
    for round in 0..2 {
        let t = Instant::now();
        for (name, body) in &files {
            assert_eq!(
                get_on(&mut s, &format!("/{name}")).as_ref(),
                Some(&(200, body.clone()))
            );
        }
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "round {round}: 20 files in {took:?} (one 40 ms stall each would be 800 ms)"
        );
    }
}
