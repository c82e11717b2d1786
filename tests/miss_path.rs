//! The miss path end to end, with the real binary, real TFTP clients and upstreams behind a
//! simulated WAN: one upstream fetch however many phones ask, stream-through with a fast first
//! block, the upstream chain in order with its health, the negative cache, truncated bodies,
//! admission limits, and a phone boot that survives a WAN outage.
//!
//! Run with the real peers installed (`tests/run.sh` does it), in release mode:
//! `cargo test --release --test miss_path`.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use branchtftp::tftp::client::{ClientError, ClientOptions, Download};
use support::*;

const MB: usize = 1024 * 1024;
const MAC: &str = "001122AABBCC";

// --- helpers ----------------------------------------------------------------------------------

/// `branchtftp serve` with a config of our own: the given upstreams (URL, timeout), a cache and
/// the config file in a directory this struct owns (so `cache ls` works after a stop), the
/// admin endpoint on a free port, no sync extras, and `extra` YAML appended.
struct Branch {
    bt: Option<Branchtftp>,
    addr: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    _dir: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Branch {
    fn start(upstreams: &[(String, &str)], extra: &str) -> Branch {
        Branch::start_with_root(upstreams, extra, None)
    }

    fn start_with_root(
        upstreams: &[(String, &str)],
        extra: &str,
        root_files: Option<&[(&str, usize)]>,
    ) -> Branch {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-miss-")
            .tempdir()
            .unwrap();
        let root = tempfile::Builder::new()
            .prefix("branchtftp-overrides-")
            .tempdir()
            .unwrap();
        for (name, size) in root_files.unwrap_or(&[]) {
            std::fs::write(root.path().join(name), vec![7u8; *size]).unwrap();
        }
        let admin = localhost(free_tcp_port());
        let mut yaml = format!(
            "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\nupstreams:\n",
            dir.path().join("cache").display()
        );
        for (url, timeout) in upstreams {
            yaml.push_str(&format!("  - url: {url}\n    timeout: {timeout}\n"));
        }
        yaml.push_str(extra);
        if !extra.contains("sync:") {
            yaml.push_str("sync:\n  prefetch: []\n  discover: false\n  config_list: false\n");
        }
        let config = dir.path().join("branchtftp.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let bt = Branchtftp::serve_config(root.path(), &yaml);
        Branch {
            addr: bt.addr,
            bt: Some(bt),
            admin,
            config,
            _dir: dir,
            _root: root,
        }
    }

    fn log(&self) -> String {
        self.bt.as_ref().map(|b| b.log()).unwrap_or_default()
    }

    async fn admin_get(&self, path: &str) -> String {
        admin_get(self.admin, path).await
    }

    /// `branchtftp_upstream_requests_total{upstream=URL,result=RESULT}`, 0 when absent.
    async fn upstream_requests(&self, url: &str, result: &str) -> u64 {
        metric_value(
            &self.admin_get("/metrics").await,
            "branchtftp_upstream_requests_total",
            &[("upstream", url), ("result", result)],
        )
    }

    async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").await).unwrap()
    }

    /// Stops serve (SIGTERM) and runs `branchtftp cache ls` on its cache.
    fn stop_and_cache_ls(&mut self) -> String {
        let bt = self.bt.take().unwrap();
        let status = bt
            .stop(Duration::from_secs(20))
            .expect("serve exits on SIGTERM");
        assert!(status.success(), "serve exit status {status}");
        let out = std::process::Command::new(branchtftp_bin())
            .args(["cache", "ls", "-c"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(out.status.success(), "cache ls: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// What a phone saw, measured on the phone's side.
#[derive(Debug)]
struct PhoneRun {
    /// From sending the request to the first DATA block.
    first_data: Option<Duration>,
    /// From sending the request to the first reply (OACK, DATA or ERROR).
    first_reply: Duration,
    elapsed: Duration,
    result: Result<Vec<u8>, String>,
}

impl PhoneRun {
    fn error_code(&self) -> Option<u16> {
        match &self.result {
            Err(e) if e.starts_with("ERROR ") => e[6..].split(':').next()?.parse().ok(),
            _ => None,
        }
    }
}

/// A phone-like TFTP download with our own client (lock-step, `blksize` and tsize asked,
/// retransmitting after `rtx`), timing the first reply and the first DATA block.
async fn phone_get(addr: SocketAddr, name: &str, blksize: Option<u16>, rtx: Duration) -> PhoneRun {
    let opts = ClientOptions {
        blksize,
        windowsize: None,
        timeout: rtx,
        send_timeout: false,
        tsize: true,
        retries: 4,
        ..ClientOptions::default()
    };
    let started = Instant::now();
    let mut dl = match Download::start(addr, name, &opts).await {
        Ok(dl) => dl,
        Err(e) => {
            let elapsed = started.elapsed();
            let result = Err(match e {
                ClientError::NotFound(m) => format!("ERROR 1: {m}"),
                ClientError::Server { code, message } => format!("ERROR {code}: {message}"),
                other => other.to_string(),
            });
            return PhoneRun {
                first_data: None,
                first_reply: elapsed,
                elapsed,
                result,
            };
        }
    };
    let first_reply = started.elapsed();
    let mut first_data = None;
    let mut out = Vec::new();
    let result = loop {
        match dl.next_chunk().await {
            Ok(Some(c)) => {
                first_data.get_or_insert_with(|| started.elapsed());
                out.extend_from_slice(&c);
            }
            Ok(None) => break Ok(std::mem::take(&mut out)),
            Err(ClientError::Server { code, message }) => {
                break Err(format!("ERROR {code}: {message}"))
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    PhoneRun {
        first_data: first_data.or(Some(first_reply).filter(|_| result.is_ok())),
        first_reply,
        elapsed: started.elapsed(),
        result,
    }
}

/// The files of one 7942 SIP phone's boot, in the order domain.md gives, with the firmware its
/// config names: `(name, size)`; size `None` = not on the central server (404).
fn boot_sequence() -> Vec<(String, Option<usize>)> {
    let load = "SIP42.9-4-2SR3-1S";
    let mut v: Vec<(String, Option<usize>)> = vec![
        (format!("CTLSEP{MAC}.tlv"), None),
        (format!("ITLSEP{MAC}.tlv"), None),
        ("ITLFile.tlv".into(), None),
        (format!("SEP{MAC}.cnf.xml"), Some(6_000)),
        ("English_United_States/mk-sip.jar".into(), Some(150_000)),
        ("dialplan.xml".into(), Some(2_000)),
        (format!("{load}.loads"), Some(1_000)),
    ];
    for (img, size) in [
        ("apps42.9-4-2ES26.sbn", 900_000),
        ("cnu42.9-4-2ES26.sbn", 500_000),
        ("cvm42sip.9-4-2ES26.sbn", 1_200_000),
        ("dsp42.9-4-2ES26.sbn", 300_000),
        ("jar42sip.9-4-2ES26.sbn", 700_000),
    ] {
        v.push((img.to_string(), Some(size)));
    }
    v
}

fn origin_with(files: &TestFiles) -> HttpOrigin {
    let origin = HttpOrigin::start();
    for f in files.iter() {
        origin.put_file(&f.name, files.content(&f.name));
    }
    origin
}

// --- one WAN fetch, stream-through --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_phones_one_upstream_fetch() {
    const NAME: &str = "cvm42sip.9-4-2ES26.sbn";
    let mut files = TestFiles::new();
    files.add(NAME, 8 * MB);
    let sha = files.sha256(NAME).to_string();
    let origin = origin_with(&files);
    let wan = WanRelay::tcp(
        origin.addr(),
        WanLink::new(Duration::from_millis(20)).mbit(20),
    );
    let branch = Branch::start(
        &[(format!("http://{}", wan.addr()), "10s")],
        "access:\n  max_per_client: 200\n",
    );
    let out = scratch_dir();
    let started = Instant::now();
    // 100 phones at once: 20 timed by our own client (first DATA measured on the phone side, on
    // a runtime of their own so spawning the others cannot delay them), 40 curl and 40 busybox
    // processes.
    let addr = branch.addr;
    let timed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let phones: Vec<_> = (0..20)
                .map(|_| {
                    tokio::spawn(async move {
                        phone_get(addr, NAME, Some(1428), Duration::from_secs(2)).await
                    })
                })
                .collect();
            let mut runs = Vec::new();
            for p in phones {
                runs.push(p.await.unwrap());
            }
            runs
        })
    });
    let mut real = Vec::new();
    for i in 0..80 {
        let dest = out.path().join(format!("phone-{i}"));
        let client = if i % 2 == 0 {
            RealClient::Curl {
                blksize: Some(1428),
            }
        } else {
            RealClient::Busybox {
                blksize: Some(1428),
            }
        };
        real.push(tokio::spawn(
            async move { client.get(addr, NAME, &dest).await },
        ));
    }
    let mut slowest_first = Duration::ZERO;
    for run in timed.join().unwrap() {
        let data = run
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("timed phone failed: {e}\n{}", branch.log()));
        assert_eq!(sha256_bytes(data), sha, "timed phone got a corrupt copy");
        let first = run.first_data.expect("first DATA time");
        slowest_first = slowest_first.max(first);
        assert!(
            first < Duration::from_secs(1),
            "a phone waited {first:?} for its first DATA: {run:?}"
        );
    }
    for r in real {
        let run = r.await.unwrap();
        if !run.is_intact(&sha) {
            // What the server saw of the phones that did not complete (a rare CI failure,
            // curl exit 72 after 38 s, left nothing else to go on).
            let log = branch.log();
            let unusual: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("transfer complete"))
                .collect();
            eprintln!(
                "server log without completed transfers:\n{}",
                unusual.join("\n")
            );
        }
        run.assert_intact(&sha);
    }
    let total = started.elapsed();
    assert_eq!(
        origin.gets(NAME),
        1,
        "100 phones must cost the WAN exactly one download"
    );
    assert!(
        wan.bytes_down() < (8 * MB + MB) as u64,
        "the WAN carried {} bytes for one 8 MB file",
        wan.bytes_down()
    );
    // Every phone, the real clients included, as the server measured it: request in, first
    // DATA out (the transfer log line's first_data_ms).
    let log = branch.log();
    let server_firsts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("transfer complete") && l.contains(NAME))
        .map(|l| {
            l.split("first_data_ms=")
                .nth(1)
                .and_then(|v| v.split(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no first_data_ms in {l}"))
        })
        .collect();
    assert_eq!(server_firsts.len(), 100, "100 transfers logged:\n{log}");
    let server_slowest = *server_firsts.iter().max().unwrap();
    assert!(
        server_slowest < 1000,
        "the server took {server_slowest} ms to send a phone its first DATA"
    );
    eprintln!(
        "100 phones, 8 MB over 20 ms / 20 Mbit/s: all done in {total:?}; slowest first DATA: \
         {slowest_first:?} (phone side, 20 timed phones), {server_slowest} ms (server side, \
         all 100)"
    );
}

// --- the chain in order, with its health --------------------------------------------------

#[tokio::test]
async fn central_404_falls_through_to_tftpd_hpa_alternate_recorded_as_source() {
    const NAME: &str = "SEP001122AABBCC.cnf.xml";
    let mut alt_files = TestFiles::new();
    alt_files.add(NAME, 7_000);
    let alternate = TftpdHpa::start(alt_files.path());
    let central = HttpOrigin::start(); // has nothing: 404
    let alt_url = format!("tftp://{}", alternate.addr);
    let mut branch = Branch::start(&[(central.url(), "5s"), (alt_url.clone(), "5s")], "");
    // (The start-up probe already asked both for a name nobody has: count from here.)
    let not_found_before = branch.upstream_requests(&central.url(), "not_found").await;
    let run = phone_get(branch.addr, NAME, Some(1428), Duration::from_secs(2)).await;
    let data = run
        .result
        .unwrap_or_else(|e| panic!("{e}\n{}", branch.log()));
    assert_eq!(sha256_bytes(&data), alt_files.sha256(NAME));
    assert_eq!(central.gets(NAME), 1, "central asked first");
    // The source, three ways: metrics, the transfer log line, the cache entry.
    assert_eq!(
        branch.upstream_requests(&central.url(), "not_found").await,
        not_found_before + 1
    );
    assert_eq!(branch.upstream_requests(&alt_url, "found").await, 1);
    let log = branch.log();
    assert!(
        log.lines()
            .any(|l| l.contains("transfer complete") && l.contains(&format!("source={alt_url}"))),
        "no transfer log line names {alt_url}:\n{log}"
    );
    // Served from the cache the second time.
    let again = phone_get(branch.addr, NAME, None, Duration::from_secs(2)).await;
    assert_eq!(sha256_bytes(&again.result.unwrap()), alt_files.sha256(NAME));
    assert_eq!(central.gets(NAME), 1, "a hit does not ask central again");
    let ls = branch.stop_and_cache_ls();
    let line = ls
        .lines()
        .find(|l| l.to_lowercase().contains(&NAME.to_lowercase()))
        .unwrap_or_else(|| panic!("cache ls lacks {NAME}:\n{ls}"));
    assert!(line.contains(&alt_url), "cache ls source: {line}");
}

/// Asks for `n` names one after another through a chain whose central is broken in some way;
/// the first request pays for finding out (bounded by the central's timeout), the others skip
/// the central at once.
///
/// The central is healthy at start (`serve`'s readiness probe asks it too) and `break_it` breaks
/// it just before the first request.
async fn broken_central_is_skipped(
    central_url: String,
    timeout: Duration,
    why: &str,
    break_it: impl FnOnce(),
) {
    let mut alt_files = TestFiles::new();
    for i in 0..3 {
        alt_files.add(&format!("file{i}.xml"), 5_000);
    }
    let alternate = TftpdHpa::start(alt_files.path());
    let alt_url = format!("tftp://{}", alternate.addr);
    let timeout_s = format!("{}ms", timeout.as_millis());
    let branch = Branch::start(&[(central_url.clone(), &timeout_s), (alt_url, "5s")], "");
    break_it();
    // The phone waits patiently (retransmits after 4 s), as a phone would within its own timeout.
    let first = phone_get(branch.addr, "file0.xml", None, Duration::from_secs(4)).await;
    let data = first
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("{why}: {e}\n{}", branch.log()));
    assert_eq!(sha256_bytes(data), alt_files.sha256("file0.xml"));
    assert!(
        first.first_reply < timeout + Duration::from_millis(750),
        "{why}: the central cost {:?}, more than its timeout {timeout:?}",
        first.first_reply
    );
    for i in 1..3 {
        let name = format!("file{i}.xml");
        let run = phone_get(branch.addr, &name, None, Duration::from_secs(4)).await;
        assert_eq!(sha256_bytes(&run.result.unwrap()), alt_files.sha256(&name));
        assert!(
            run.first_reply < Duration::from_millis(300),
            "{why}: request {i} waited {:?} although the central is marked down",
            run.first_reply
        );
    }
    assert_eq!(branch.upstream_requests(&central_url, "skipped").await, 2);
    let status = branch.status().await;
    assert_eq!(status["upstreams"][0]["state"], "down", "{status}");
    eprintln!(
        "{why}: first request answered in {:?}, done in {:?} (central timeout {timeout:?}), then skipped at once",
        first.first_reply,
        first.elapsed
    );
}

#[tokio::test]
async fn refusing_central_is_skipped_within_its_timeout_and_at_once_while_unhealthy() {
    // `refuse` closes the listening port: connections are refused, as by a stopped CUCM.
    let central = HttpOrigin::start();
    broken_central_is_skipped(
        central.url(),
        Duration::from_secs(3),
        "refusing HTTP central",
        || central.refuse(),
    )
    .await;
}

#[tokio::test]
async fn silent_tftp_central_is_skipped_within_its_timeout_and_at_once_while_unhealthy() {
    let files = TestFiles::with_sizes(&[("other.xml", 10)]);
    let central = TftpdHpa::start(files.path());
    let wan = WanRelay::udp(central.addr, WanLink::new(Duration::from_millis(10)));
    broken_central_is_skipped(
        format!("tftp://{}", wan.addr()),
        Duration::from_millis(1500),
        "blackholed TFTP central",
        || wan.blackhole(),
    )
    .await;
    assert!(wan.dropped() > 0, "the central's packets were dropped");
}

#[tokio::test]
async fn silent_http_central_is_skipped_within_its_timeout_and_at_once_while_unhealthy() {
    // A TCP connection that opens (the WAN router answers) but never carries a byte.
    let central = HttpOrigin::start();
    let wan = WanRelay::tcp(central.addr(), WanLink::new(Duration::from_millis(10)));
    broken_central_is_skipped(
        format!("http://{}", wan.addr()),
        Duration::from_secs(2),
        "stalled HTTP central",
        || wan.cut(),
    )
    .await;
}

// --- a boot survives a WAN outage ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_boot_survives_wan_outage() {
    let boot = boot_sequence();
    let mut files = TestFiles::new();
    for (name, size) in &boot {
        if let Some(size) = size {
            files.add(name, *size);
        }
    }
    let origin = origin_with(&files);
    let wan = WanRelay::tcp(
        origin.addr(),
        WanLink::new(Duration::from_millis(20)).mbit(20),
    );
    let upstream = format!("http://{}", wan.addr());
    let branch = Branch::start(
        &[(upstream.clone(), "2s")],
        "sync:\n  prefetch: []\n  discover: false\n  config_list: false\n  negative_ttl: 4s\n",
    );
    let out = scratch_dir();

    // One whole boot in order with real clients (curl, blksize 1428 as 9.x phones ask).
    let boot_once = |label: &'static str| {
        let boot = boot.clone();
        let files = &files;
        let out = out.path().to_path_buf();
        let addr = branch.addr;
        async move {
            let started = Instant::now();
            let mut misses = Vec::new();
            for (name, size) in &boot {
                match size {
                    Some(_) => {
                        let dest = out.join(format!("{label}-{}", name.replace('/', "_")));
                        curl_tftp_get(addr, name, &dest, Some(1428))
                            .await
                            .assert_intact(files.sha256(name));
                    }
                    None => {
                        let run = phone_get(addr, name, None, Duration::from_secs(4)).await;
                        misses.push((name.clone(), run));
                    }
                }
            }
            (started.elapsed(), misses)
        }
    };

    let (warm_up, misses) = boot_once("warm").await;
    for (name, run) in &misses {
        assert_eq!(run.error_code(), Some(1), "{name}: {run:?}");
    }
    // The warm-up's "not found" answers date from its start, and on a loaded machine the
    // warm-up alone can outlast the 4 s TTL. Let them expire, then ask the misses once more
    // with the WAN up, so the cut below starts with a full TTL ahead of it.
    tokio::time::sleep(Duration::from_millis(4200).saturating_sub(warm_up)).await;
    for (name, _) in boot.iter().filter(|(_, size)| size.is_none()) {
        let run = phone_get(branch.addr, name, None, Duration::from_secs(4)).await;
        assert_eq!(run.error_code(), Some(1), "{name}: {run:?}");
    }
    let gets_after_warm_up = origin.total_requests();

    wan.cut();
    // Within the negative TTL: every file from the cache, every CTL/ITL miss ERROR 1 from the
    // negative cache, nothing asked upstream.
    let (cut_boot, misses) = boot_once("cut").await;
    for (name, run) in &misses {
        assert_eq!(run.error_code(), Some(1), "{name}: {run:?}");
        assert!(
            run.first_reply < Duration::from_millis(200),
            "{name}: {run:?}"
        );
    }
    assert_eq!(origin.total_requests(), gets_after_warm_up);

    // Past the TTL, the WAN still down: the first CTL miss finds the central silent (bounded by
    // its 2 s timeout); the phone still gets the answer it got before the outage, "file not
    // found", so it carries on exactly as it did, and the other misses are answered at once.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let (late_boot, misses) = boot_once("late").await;
    for (i, (name, run)) in misses.iter().enumerate() {
        assert_eq!(
            run.error_code(),
            Some(1),
            "{name}: a known-missing file stays 'not found' during an outage: {run:?}\n{}",
            branch.log()
        );
        let limit = if i == 0 {
            Duration::from_millis(2750)
        } else {
            Duration::from_millis(200)
        };
        assert!(run.first_reply < limit, "{name}: {run:?}");
    }
    // A name never seen before: ERROR 0 "temporarily unavailable", at once.
    let unknown = phone_get(
        branch.addr,
        "SEPDEADBEEF0001.cnf.xml",
        None,
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(unknown.error_code(), Some(0), "{unknown:?}");
    assert!(
        unknown.first_reply < Duration::from_millis(200),
        "{unknown:?}"
    );
    eprintln!(
        "boot: warm-up over the WAN {warm_up:?}; WAN cut, within TTL {cut_boot:?}; \
         past TTL {late_boot:?}"
    );
}

// --- failures never become cached files -----------------------------------------------------

#[tokio::test]
async fn truncated_upstream_body_is_an_error_and_never_cached() {
    const NAME: &str = "dsp42.9-4-2ES26.sbn";
    let mut files = TestFiles::new();
    files.add(NAME, 2 * MB);
    let origin = origin_with(&files);
    origin.set_truncate_after(Some(700_000));
    let branch = Branch::start(&[(origin.url(), "5s")], "");
    let run = phone_get(branch.addr, NAME, Some(1428), Duration::from_secs(2)).await;
    assert_eq!(run.error_code(), Some(0), "truncated body: {run:?}");
    let out = scratch_dir();
    // A real client too: curl must fail, never write a short file it calls complete.
    let curl = curl_tftp_get(branch.addr, NAME, &out.path().join("curl"), Some(1428)).await;
    assert!(!curl.success(), "curl accepted a truncated file: {curl}");
    assert_eq!(origin.gets(NAME), 2, "a failed fetch is not remembered");
    let status = branch.status().await;
    assert_eq!(
        status["cache"]["files"], 0,
        "nothing partial cached: {status}"
    );
    origin.set_truncate_after(None);
    let ok = phone_get(branch.addr, NAME, Some(1428), Duration::from_secs(2)).await;
    assert_eq!(sha256_bytes(&ok.result.unwrap()), files.sha256(NAME));
    assert_eq!(origin.gets(NAME), 3);
    assert_eq!(branch.status().await["cache"]["files"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_ctl_misses_within_ttl_cost_one_upstream_request() {
    let origin = HttpOrigin::start();
    let wan = WanRelay::tcp(origin.addr(), WanLink::new(Duration::from_millis(20)));
    let branch = Branch::start(
        &[(format!("http://{}", wan.addr()), "5s")],
        "access:\n  max_per_client: 100\n",
    );
    let name = format!("CTLSEP{MAC}.tlv");
    // 25 at once (they share one flight), then 25 one by one (the negative cache answers).
    let mut tasks = Vec::new();
    for _ in 0..25 {
        let addr = branch.addr;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            phone_get(addr, &name, None, Duration::from_secs(2)).await
        }));
    }
    for t in tasks {
        let run = t.await.unwrap();
        assert_eq!(run.error_code(), Some(1), "{run:?}");
    }
    for _ in 0..25 {
        let run = phone_get(branch.addr, &name, None, Duration::from_secs(2)).await;
        assert_eq!(run.error_code(), Some(1), "{run:?}");
        assert!(run.first_reply < Duration::from_millis(100), "{run:?}");
    }
    assert_eq!(origin.gets(&name), 1);
}

// --- limits -----------------------------------------------------------------------------------

/// Sends a RRQ from `ip`, acknowledges DATA 1 (a client that has proven it is there is never
/// displaced) and then goes silent: the transfer holds its slot while the server retransmits.
/// Returns the socket (keep it alive).
async fn hold_a_transfer(ip: Ipv4Addr, server: SocketAddr, name: &str) -> tokio::net::UdpSocket {
    let sock = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    let mut rrq = vec![0u8, 1];
    rrq.extend_from_slice(name.as_bytes());
    rrq.extend_from_slice(b"\0octet\0");
    sock.send_to(&rrq, server).await.unwrap();
    let mut buf = [0u8; 1024];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    assert_eq!(&buf[..2], &[0, 3], "DATA 1 expected, got {:?}", &buf[..n]);
    sock.send_to(&[0, 4, 0, 1], from).await.unwrap();
    sock
}

async fn rrq_from(
    ip: Ipv4Addr,
    server: SocketAddr,
    name: &str,
) -> (Option<(u16, String)>, Duration) {
    let sock = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    let mut rrq = vec![0u8, 1];
    rrq.extend_from_slice(name.as_bytes());
    rrq.extend_from_slice(b"\0octet\0");
    let started = Instant::now();
    sock.send_to(&rrq, server).await.unwrap();
    let mut buf = [0u8; 1024];
    // A request past max_transfers waits up to 3 s in the admission queue (gate::QUEUE_WAIT).
    let (n, _) = tokio::time::timeout(Duration::from_secs(4), sock.recv_from(&mut buf))
        .await
        .expect("an answer, never silence")
        .unwrap();
    (tftp_error_of(&buf[..n]), started.elapsed())
}

#[tokio::test]
async fn client_past_max_per_client_or_max_transfers_gets_server_busy() {
    let branch = Branch::start_with_root(
        &[],
        "access:\n  max_per_client: 2\n  max_transfers: 3\n",
        Some(&[("big.bin", 200_000)]),
    );
    let a = Ipv4Addr::new(127, 0, 0, 2);
    let _h1 = hold_a_transfer(a, branch.addr, "big.bin").await;
    let _h2 = hold_a_transfer(a, branch.addr, "big.bin").await;
    let (err, took) = rrq_from(a, branch.addr, "big.bin").await;
    assert_eq!(
        err,
        Some((0, "server busy".to_string())),
        "third from one client"
    );
    assert!(took < Duration::from_millis(200), "{took:?}");
    // Another client still gets in, until the total is reached; past it a request waits in
    // the admission queue, and hears "server busy" when no slot frees within the wait.
    let b = Ipv4Addr::new(127, 0, 0, 3);
    let _h3 = hold_a_transfer(b, branch.addr, "big.bin").await;
    let c = Ipv4Addr::new(127, 0, 0, 4);
    let (err, _) = rrq_from(c, branch.addr, "big.bin").await;
    assert_eq!(
        err,
        Some((0, "server busy".to_string())),
        "past max_transfers"
    );
}

// --- stale if error -------------------------------------------------------------------------

#[tokio::test]
async fn every_upstream_unreachable_serves_cache_whatever_its_age_and_fails_misses_fast() {
    let files =
        TestFiles::with_sizes(&[("SEP001122AABBCC.cnf.xml", 5_000), ("g3-tones.xml", 1_500)]);
    let origin = origin_with(&files);
    let alt = HttpOrigin::start();
    let branch = Branch::start(
        &[(origin.url(), "2s"), (alt.url(), "2s")],
        "sync:\n  prefetch: []\n  discover: false\n  config_list: false\n  intervals:\n    config: 1s\n    defaults: 1s\n    other: 1s\n",
    );
    for f in files.iter() {
        let run = phone_get(branch.addr, &f.name, None, Duration::from_secs(2)).await;
        assert_eq!(sha256_bytes(&run.result.unwrap()), f.sha256);
    }
    origin.refuse();
    alt.refuse();
    // Older than every revalidation interval: served anyway.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for f in files.iter() {
        let run = phone_get(branch.addr, &f.name, None, Duration::from_secs(2)).await;
        assert_eq!(
            sha256_bytes(&run.result.unwrap()),
            f.sha256,
            "stale copy served"
        );
    }
    for (i, name) in ["SEP0011223344FF.cnf.xml", "SEP0011223344EE.cnf.xml"]
        .iter()
        .enumerate()
    {
        let run = phone_get(branch.addr, name, None, Duration::from_secs(2)).await;
        assert_eq!(run.error_code(), Some(0), "{run:?}");
        assert!(
            // A fixed text: the upstream's error stays in the log (issue 11).
            matches!(&run.result, Err(e) if e.contains("temporarily unavailable")),
            "{run:?}"
        );
        // Refused connections are known at once; the second is skipped without asking.
        assert!(
            run.first_reply < Duration::from_millis(300),
            "miss {i}: {run:?}"
        );
    }
}

// --- TFTP upstreams with and without windowsize ---------------------------------------------

async fn tftp_upstream_works(upstream: SocketAddr, files: &TestFiles, name: &str) -> (u64, u64) {
    let wan = WanRelay::udp(upstream, WanLink::new(Duration::from_millis(1)));
    let branch = Branch::start(&[(format!("tftp://{}", wan.addr()), "5s")], "");
    let run = phone_get(branch.addr, name, Some(1428), Duration::from_secs(2)).await;
    let data = run
        .result
        .unwrap_or_else(|e| panic!("{e}\n{}", branch.log()));
    assert_eq!(sha256_bytes(&data), files.sha256(name));
    let missing = phone_get(branch.addr, "nope.tlv", None, Duration::from_secs(2)).await;
    assert_eq!(missing.error_code(), Some(1), "{missing:?}");
    (wan.packets_up(), wan.packets_down())
}

#[tokio::test]
async fn tftp_upstream_ignoring_windowsize_tftpd_hpa_works() {
    let files = TestFiles::with_sizes(&[("jar42sip.9-4-2ES26.sbn", 2 * MB)]);
    let hpa = TftpdHpa::start(files.path());
    let (up, down) = tftp_upstream_works(hpa.addr, &files, "jar42sip.9-4-2ES26.sbn").await;
    // Lock-step: one ACK per block.
    let blocks = (2 * MB / 1428) as u64;
    assert!(up >= blocks, "{up} packets up for {blocks} blocks");
    eprintln!("tftpd-hpa upstream: {up} packets up, {down} down");
}

#[tokio::test]
async fn tftp_upstream_with_windowsize_atftpd_works() {
    let files = TestFiles::with_sizes(&[("jar42sip.9-4-2ES26.sbn", 2 * MB)]);
    let Some(atftpd) = Atftpd::start(files.path()) else {
        return;
    };
    let (up, down) = tftp_upstream_works(atftpd.addr, &files, "jar42sip.9-4-2ES26.sbn").await;
    // Windowsize 16: about one ACK per 16 blocks.
    let blocks = (2 * MB / 1428) as u64;
    assert!(
        up < blocks / 4,
        "{up} packets up for {blocks} blocks: no window in use"
    );
    eprintln!("atftpd upstream: {up} packets up, {down} down");
}

// --- limits on what an upstream can make us hold ---------------------------------------------

/// The fetcher in process over a cache of `max_size` bytes and one HTTP origin.
fn fetcher_over(
    origin: &HttpOrigin,
    max_size: u64,
) -> (
    tempfile::TempDir,
    std::sync::Arc<branchtftp::upstream::flight::Fetcher>,
) {
    use branchtftp::cache::{Cache, ClassRules};
    use branchtftp::config::UpstreamConfig;
    use branchtftp::upstream::UpstreamChain;
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(dir.path(), max_size, ClassRules::default()).unwrap();
    let chain = UpstreamChain::new(&[UpstreamConfig::new(origin.url())]).unwrap();
    let fetcher = branchtftp::upstream::flight::Fetcher::new(cache, chain, Duration::from_secs(30));
    (dir, fetcher)
}

/// Reads what a phone would get for `name`: the bytes, or the error.
async fn open_and_read(
    fetcher: &std::sync::Arc<branchtftp::upstream::flight::Fetcher>,
    name: &str,
) -> Result<Vec<u8>, String> {
    use branchtftp::content::Body;
    use tokio::io::AsyncReadExt;
    let name = branchtftp::name::FileName::parse(name).unwrap();
    match fetcher
        .open(&name, std::time::Instant::now())
        .await
        .map_err(|e| e.to_string())?
        .body
    {
        Body::Stream(mut reader) => {
            let mut out = Vec::new();
            reader
                .read_to_end(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            Ok(out)
        }
        Body::Cached(_) | Body::Local(_) | Body::Memory(_) => Err("unexpected hit".into()),
    }
}

#[tokio::test]
async fn an_upstream_file_over_a_quarter_of_the_cache_is_refused_and_never_cached() {
    let origin = HttpOrigin::start();
    origin.put_file("huge.sbn", vec![1u8; 300_000]);
    origin.put_file("fits.sbn", vec![2u8; 200_000]);
    let (_dir, fetcher) = fetcher_over(&origin, 1_000_000);
    assert_eq!(fetcher.max_file(), 250_000);
    let err = open_and_read(&fetcher, "huge.sbn").await.unwrap_err();
    assert!(err.contains("limit"), "{err}");
    assert!(fetcher.cache().get("huge.sbn").is_none(), "never published");
    assert_eq!(
        open_and_read(&fetcher, "fits.sbn").await.unwrap(),
        vec![2u8; 200_000]
    );
    assert!(fetcher.cache().get("fits.sbn").is_some());
}

#[tokio::test]
async fn a_case_variant_not_found_does_not_blank_out_the_real_file() {
    // The origin is case-sensitive, as a Linux TFTP server is: only `kern.sbn` exists.
    let origin = HttpOrigin::start();
    origin.put_file("kern.sbn", vec![3u8; 5_000]);
    let (_dir, fetcher) = fetcher_over(&origin, 1 << 30);
    for variant in ["KERN.sbn", "Kern.SBN"] {
        let err = open_and_read(&fetcher, variant).await.unwrap_err();
        assert_eq!(err, "file not found", "{variant}");
    }
    // Within the negative TTL of the variants, the real spelling is still asked and served.
    assert_eq!(
        open_and_read(&fetcher, "kern.sbn").await.unwrap(),
        vec![3u8; 5_000]
    );
    assert_eq!(origin.gets("kern.sbn"), 1);
}
