//! Proves the test helpers in `tests/support/` do what the other tests rely on: the real
//! peers work, the relay adds delay without costing throughput and caps bandwidth, and the HTTP
//! origin counts, revalidates and fails on demand.

mod support;

#[path = "../benches/support/proc.rs"]
mod bench_proc;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::net::UdpSocket;

const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("one.bin", 1),
    ("block.bin", 512),
    ("three-blocks.bin", 1300),
    ("dir/SEP001122AABBCC.cnf.xml", 3000),
];

#[test]
fn test_files_are_deterministic_and_hashed() {
    let a = TestFiles::with_sizes(&[("x.bin", 100_000), ("sub/y.bin", 7)]);
    let b = TestFiles::with_sizes(&[("x.bin", 100_000)]);
    assert_eq!(a.sha256("x.bin"), b.sha256("x.bin"));
    assert_eq!(sha256_file(&a.get("x.bin").path), a.sha256("x.bin"));
    assert_eq!(a.content("sub/y.bin").len(), 7);
    assert_ne!(a.content("x.bin")[..64], b.content("x.bin")[64..128]);
    // Known value, so a change of generator is noticed (cached hashes elsewhere would go stale).
    assert_eq!(
        sha256_bytes(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[tokio::test]
async fn tftpd_hpa_serves_every_real_client() {
    let files = TestFiles::with_sizes(SIZES);
    let server = TftpdHpa::start(files.path());
    let out = scratch_dir();
    for f in files.iter() {
        let o = |c: &str| out.path().join(format!("{c}-{}", f.name.replace('/', "_")));
        let curl = curl_tftp_get(server.addr, &f.name, &o("curl"), Some(1428)).await;
        if f.size == 0 {
            // curl 7.88 rejects the honest `tsize 0` in an OACK ("invalid tsize -:0:- value in
            // OACK packet", exit 71), whatever the server.
            assert_eq!(curl.code(), Some(CURL_EXIT_TSIZE_ZERO), "{curl}");
        } else {
            curl.assert_intact(&f.sha256);
        }
        tftp_hpa_get(server.addr, &f.name, &o("hpa"), TftpMode::Binary)
            .await
            .assert_intact(&f.sha256);
        atftp_get(
            server.addr,
            &f.name,
            &o("atftp"),
            Some(1024),
            None,
            true,
            Some(2),
        )
        .await
        .assert_intact(&f.sha256);
        busybox_tftp_get(server.addr, &f.name, &o("busybox"), Some(1428))
            .await
            .assert_intact(&f.sha256);
    }
    // How each client reports "file not found" (ERROR 1).
    let missing = out.path().join("missing");
    let hpa = tftp_hpa_get(server.addr, "nope.bin", &missing, TftpMode::Binary).await;
    assert!(hpa.success() && hpa.reported_error(), "{hpa}");
    assert!(hpa.text().contains("Error code 1"), "{hpa}");
    let curl = curl_tftp_get(server.addr, "nope.bin", &missing, None).await;
    assert_eq!(curl.code(), Some(68), "{curl}");
    let atftp = atftp_get(server.addr, "nope.bin", &missing, None, None, false, None).await;
    assert_eq!(atftp.code(), Some(255), "{atftp}");
    let bb = busybox_tftp_get(server.addr, "nope.bin", &missing, None).await;
    assert_eq!(bb.code(), Some(1), "{bb}");
    // tftpd-hpa without -c refuses writes.
    let put = tftp_hpa_put(
        server.addr,
        &files.get("one.bin").path,
        "upload.bin",
        TftpMode::Binary,
    )
    .await;
    assert!(put.reported_error(), "{put}");
}

#[tokio::test]
async fn every_client_works_over_ipv6_loopback() {
    let files = TestFiles::with_sizes(&[("v6.bin", 5000)]);
    let server = TftpdHpa::start_on(files.path(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(server.addr.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let out = scratch_dir();
    let sha = files.sha256("v6.bin");
    let o = |c: &str| out.path().join(c);
    curl_tftp_get(server.addr, "v6.bin", &o("curl"), None)
        .await
        .assert_intact(sha);
    tftp_hpa_get(server.addr, "v6.bin", &o("hpa"), TftpMode::Binary)
        .await
        .assert_intact(sha);
    atftp_get(server.addr, "v6.bin", &o("atftp"), None, None, true, None)
        .await
        .assert_intact(sha);
    busybox_tftp_get(server.addr, "v6.bin", &o("bb"), Some(1024))
        .await
        .assert_intact(sha);
}

#[tokio::test]
async fn atftpd_speaks_windowsize() {
    let files = TestFiles::with_sizes(&[("img.sbn", 300_000)]);
    let Some(server) = Atftpd::start(files.path()) else {
        return;
    };
    let dir = scratch_dir();
    let out = dir.path().join("img");
    let run = atftp_get(
        server.addr,
        "img.sbn",
        &out,
        Some(1428),
        Some(16),
        true,
        Some(2),
    )
    .await;
    assert!(run.success(), "{run}\nserver log: {}", server.log());
    run.assert_intact(files.sha256("img.sbn"));
}

#[tokio::test]
async fn udp_relay_delays_every_lockstep_block_and_keeps_tids() {
    let files = TestFiles::with_sizes(&[("f.bin", 10 * 512)]);
    let server = TftpdHpa::start(files.path());
    let wan = WanRelay::udp(server.addr, WanLink::new(Duration::from_millis(20)));
    let out = scratch_dir();
    let run = tftp_hpa_get(wan.addr(), "f.bin", &out.path().join("f"), TftpMode::Binary).await;
    run.assert_intact(files.sha256("f.bin"));
    // RRQ→DATA 1, then one round trip per further DATA (10 full blocks + the empty last one).
    let round_trips = 11;
    assert!(
        run.elapsed >= wan.link().rtt() * round_trips,
        "{run}: faster than {round_trips} round trips of {:?}",
        wan.link().rtt()
    );
    assert!(run.elapsed < Duration::from_secs(5), "{run}");
    assert!(wan.bytes_down() >= 10 * 516, "{}", wan.bytes_down());
    // RRQ + 11 ACKs, more if a slow moment made tftpd-hpa retransmit (its timeout is 1 s).
    // The client exits right after sending its last ACK, which may still wait in the relay's
    // socket when the client is done: the relay counts a datagram when it reads it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while wan.packets_up() < 12 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(wan.packets_up() >= 12, "{} packets up", wan.packets_up());

    // The relay maps TIDs per client flow: curl with options works through it too.
    let run = curl_tftp_get(wan.addr(), "f.bin", &out.path().join("c"), Some(1024)).await;
    run.assert_intact(files.sha256("f.bin"));
}

async fn udp_echo() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sends `count` datagrams of `size` at once through `relay`; returns when each echo arrived,
/// or `None` for the ones that did not arrive within `wait`.
async fn echo_burst(
    relay: SocketAddr,
    count: usize,
    size: usize,
    wait: Duration,
) -> Vec<Option<Duration>> {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let start = Instant::now();
    for i in 0..count {
        let mut p = vec![0u8; size];
        p[..4].copy_from_slice(&(i as u32).to_be_bytes());
        sock.send_to(&p, relay).await.unwrap();
    }
    let mut arrivals = vec![None; count];
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = 0;
    while received < count {
        let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        else {
            break;
        };
        assert_eq!(n, size);
        let i = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        arrivals[i] = Some(start.elapsed());
        received += 1;
    }
    arrivals
}

#[tokio::test]
async fn udp_relay_delay_costs_latency_not_throughput() {
    let echo = udp_echo().await;
    let wan = WanRelay::udp(echo, WanLink::new(Duration::from_millis(30)));
    let arrivals = echo_burst(wan.addr(), 50, 500, Duration::from_millis(1500)).await;
    let times: Vec<Duration> = arrivals.iter().map(|a| a.expect("echo lost")).collect();
    let last = *times.iter().max().unwrap();
    let first = *times.iter().min().unwrap();
    assert!(
        first >= Duration::from_millis(60),
        "first echo after {first:?}"
    );
    // Serial per-packet sleeping would take 50 × 60 ms = 3 s.
    assert!(
        last < Duration::from_millis(400),
        "last echo after {last:?}"
    );
}

#[tokio::test]
async fn udp_relay_bandwidth_cap_queues_packets() {
    let echo = udp_echo().await;
    // 200 × 1000 bytes at 8 Mbit/s = 200 ms of serialization each way (pipelined).
    let link = WanLink::new(Duration::from_millis(5)).mbit(8);
    let wan = WanRelay::udp(echo, link);
    let arrivals = echo_burst(wan.addr(), 200, 1000, Duration::from_secs(3)).await;
    let last = arrivals
        .iter()
        .map(|a| a.expect("echo lost"))
        .max()
        .unwrap();
    let expected = link.serialization(200_000) + link.rtt();
    assert!(last >= expected.mul_f64(0.95), "{last:?} < {expected:?}");
    assert!(
        last <= expected.mul_f64(1.3) + Duration::from_millis(50),
        "{last:?} vs {expected:?}"
    );
    assert_eq!(wan.bytes_up(), 200_000);
    assert_eq!(wan.bytes_down(), 200_000);

    // With a 50 ms queue limit, most of a 200 ms burst is tail-dropped.
    wan.set_link(link.queue_limit(Duration::from_millis(50)));
    let arrivals = echo_burst(wan.addr(), 200, 1000, Duration::from_secs(1)).await;
    let delivered = arrivals.iter().filter(|a| a.is_some()).count();
    assert!((40..=80).contains(&delivered), "{delivered} delivered");
    assert!(wan.dropped() >= 120);
}

#[tokio::test]
async fn udp_cut_and_blackhole_drop_until_restored() {
    let echo = udp_echo().await;
    let wan = WanRelay::udp(echo, WanLink::new(Duration::from_millis(2)));
    let wait = Duration::from_millis(300);
    assert!(echo_burst(wan.addr(), 3, 10, wait)
        .await
        .iter()
        .all(Option::is_some));
    wan.cut();
    assert!(echo_burst(wan.addr(), 3, 10, wait)
        .await
        .iter()
        .all(Option::is_none));
    wan.restore();
    assert!(echo_burst(wan.addr(), 3, 10, wait)
        .await
        .iter()
        .all(Option::is_some));
    wan.blackhole();
    assert_eq!(wan.state(), WanState::Blackhole);
    assert!(echo_burst(wan.addr(), 3, 10, wait)
        .await
        .iter()
        .all(Option::is_none));
    wan.restore();
    assert!(echo_burst(wan.addr(), 3, 10, wait)
        .await
        .iter()
        .all(Option::is_some));
    assert_eq!(wan.dropped(), 6);
}

#[tokio::test]
async fn tcp_relay_carries_http_intact_at_the_capped_rate() {
    let body = pseudo_random_bytes(7, 1_000_000);
    let origin = HttpOrigin::with_files([("fw.sbn", body.clone())]);
    let link = WanLink::new(Duration::from_millis(10)).mbit(8);
    let wan = WanRelay::tcp(origin.addr(), link);
    let out = scratch_dir();
    let url = format!("http://{}/fw.sbn", wan.addr());
    let run = curl_http_get(&url, &out.path().join("fw"), &[]).await;
    run.assert_intact(&sha256_bytes(&body));
    assert_eq!(run.http_status(), 200);
    // Handshake + request + 1 MB at 8 Mbit/s (1 s).
    let expected = link.serialization(1_000_000) + link.rtt() * 2;
    let ratio = run.elapsed.as_secs_f64() / expected.as_secs_f64();
    assert!((0.7..=1.3).contains(&ratio), "{run}: expected {expected:?}");
    assert!(wan.bytes_down() >= 1_000_000);
    assert!(wan.bytes_up() > 0 && wan.bytes_up() < 1000);

    // An outage stalls TCP: curl times out, then works again after restore.
    wan.cut();
    let run = curl_http(&url, &out.path().join("cut"), &[], &["-m", "1"]).await;
    assert_eq!(run.code(), Some(28), "{run}");
    wan.blackhole(); // UDP only: TCP flows
    wan.set_link(WanLink::new(Duration::from_millis(1)));
    let run = curl_http_get(&url, &out.path().join("bh"), &[]).await;
    run.assert_intact(&sha256_bytes(&body));
    wan.restore();
}

#[tokio::test]
async fn origin_bandwidth_cap_and_latency() {
    let origin = HttpOrigin::with_files([("a.bin", pseudo_random_bytes(1, 500_000))]);
    origin.set_bandwidth(Some(1_000_000));
    let out = scratch_dir();
    let run = curl_http_get(&origin.url_of("a.bin"), &out.path().join("a"), &[]).await;
    run.assert_intact(&sha256_bytes(&origin.file("a.bin").unwrap()));
    let secs = run.elapsed.as_secs_f64();
    assert!((0.35..=0.65).contains(&secs), "{run}: 500 kB at 1 MB/s");
    origin.set_bandwidth(None);
    origin.set_latency(Duration::from_millis(300));
    let run = curl_http_get(&origin.url_of("a.bin"), &out.path().join("b"), &[]).await;
    assert!(run.elapsed >= Duration::from_millis(300), "{run}");
    assert_eq!(origin.body_bytes_sent(), 1_000_000);
}

#[tokio::test]
async fn origin_counts_requests_and_revalidates() {
    let origin = HttpOrigin::with_files([("SEP001122AABBCC.cnf.xml", &b"<device/>"[..])]);
    let name = "SEP001122AABBCC.cnf.xml";
    let out = scratch_dir();
    let o = out.path().join("o");
    let url = origin.url_of(name);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 200);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 200);
    let head = curl_http(&url, &o, &[], &["-I"]).await;
    assert_eq!(head.http_status(), 200);
    let headers = std::fs::read_to_string(&o).unwrap().to_lowercase();
    assert!(headers.contains("content-length: 9"), "{headers}");
    assert_eq!(origin.gets(name), 2);
    assert_eq!(origin.requests_with("HEAD", name), 1);
    assert_eq!(origin.requests(name), 3);
    assert_eq!(origin.body_bytes_sent(), 18);

    // Conditional GETs: If-None-Match, then If-Modified-Since.
    let etag = origin.etag(name).unwrap();
    let inm = format!("If-None-Match: {etag}");
    assert_eq!(curl_http_get(&url, &o, &[&inm]).await.http_status(), 304);
    let ims = format!("If-Modified-Since: {}", origin.last_modified(name).unwrap());
    assert_eq!(curl_http_get(&url, &o, &[&ims]).await.http_status(), 304);
    assert_eq!(origin.not_modified(), 2);
    assert_eq!(origin.body_bytes_sent(), 18);

    // A changed file has a new validator: the old ones get the new content.
    origin.put_file(name, &b"<device>2</device>"[..]);
    assert_ne!(origin.etag(name).unwrap(), etag);
    let run = curl_http_get(&url, &o, &[&inm]).await;
    assert_eq!(run.http_status(), 200);
    assert_eq!(std::fs::read(&o).unwrap(), b"<device>2</device>");
    assert_eq!(curl_http_get(&url, &o, &[&ims]).await.http_status(), 200);

    // 404s: unknown, deleted, or forced.
    assert_eq!(
        curl_http_get(&origin.url_of("CTLSEP1.tlv"), &o, &[])
            .await
            .http_status(),
        404
    );
    origin.set_not_found(name, true);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 404);
    origin.set_not_found(name, false);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 200);
    origin.remove_file(name);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 404);
    assert_eq!(origin.responses_with_status(404), 3);
    assert_eq!(origin.total_requests(), 11);

    // ConfigFileCacheList.txt
    origin.put_file("SEP00AABBCCDDEE.cnf.xml", vec![b'x'; 1234]);
    origin.publish_config_list(&["SEP00AABBCCDDEE.cnf.xml"]);
    let run = curl_http_get(&origin.url_of(CONFIG_FILE_CACHE_LIST), &o, &[]).await;
    assert_eq!(run.http_status(), 200);
    assert_eq!(
        std::fs::read_to_string(&o).unwrap(),
        "SEP00AABBCCDDEE.cnf.xml 1234\n"
    );
}

#[tokio::test]
async fn origin_fails_on_demand() {
    let body = pseudo_random_bytes(3, 100_000);
    let origin = HttpOrigin::with_files([("img.sbn", body.clone())]);
    let url = origin.url_of("img.sbn");
    let out = scratch_dir();
    let o = out.path().join("o");

    origin.set_truncate_after(Some(10_000));
    let run = curl_http_get(&url, &o, &[]).await;
    assert_eq!(run.code(), Some(18), "truncated body: {run}");
    assert_eq!(std::fs::metadata(&o).unwrap().len(), 10_000);
    origin.set_truncate_after(None);

    origin.set_fail(true);
    assert_eq!(curl_http_get(&url, &o, &[]).await.http_status(), 500);
    origin.set_fail(false);

    origin.refuse();
    let run = curl_http_get(&url, &o, &[]).await;
    assert_eq!(run.code(), Some(7), "refused: {run}");
    origin.restore();
    curl_http_get(&url, &o, &[])
        .await
        .assert_intact(&sha256_bytes(&body));
    assert_eq!(origin.responses_with_status(500), 1);
}

#[test]
fn http_dates_round_trip() {
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(
        parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(
        parse_http_date("Tue, 29 Feb 2028 00:00:00 GMT"),
        Some(1_835_395_200)
    );
}

#[test]
fn servers_run_in_sync_tests_and_stop_on_drop() {
    let files = TestFiles::with_sizes(&[("a", 10)]);
    let addr = {
        let server = TftpdHpa::start(files.path());
        assert!(wait_tftp_ready(server.addr, Duration::from_secs(1)));
        server.addr
    };
    assert!(!wait_tftp_ready(addr, Duration::from_millis(300)));
}

/// The storm benchmark's CPU figure for tftpd-hpa: in.tftpd ignores SIGCHLD, so the kernel reaps
/// its per-request children and their CPU never reaches the listener's /proc `cutime` (the
/// benchmark once compared branchtftp with tftpd-hpa's listener alone). The cgroup meter must
/// count a forked transfer's time.
#[tokio::test]
async fn the_benchmarks_cpu_meter_counts_the_transfers_tftpd_hpa_forks() {
    let files = TestFiles::with_sizes(&[("big.bin", 4 << 20)]);
    let hpa = TftpdHpa::start(files.path());
    let group = bench_proc::CpuGroup::join(&[hpa.pid()])
        .expect("a writable cgroup for the CPU meter (the suite runs as root)");
    let by_proc0 = bench_proc::cpu_seconds(&hpa.pid().to_string());
    let out = files.scratch("big.out");
    let run = curl_tftp_get(hpa.addr, "big.bin", &out, None).await;
    run.assert_intact(files.sha256("big.bin"));
    let by_group = group.seconds();
    let by_proc = bench_proc::cpu_seconds(&hpa.pid().to_string()) - by_proc0;
    // 8,192 lock-step blocks: a recvfrom and a sendto each, far over 10 ms on any machine.
    assert!(
        by_group > 0.01,
        "cgroup counted {by_group:.4} s for a 4 MiB transfer (/proc: {by_proc:.4} s)"
    );
}

/// The same meter for a server that forks its workers before it is measured (nginx): they
/// join the cgroup with it, or their CPU goes uncounted.
#[test]
fn the_benchmarks_cpu_meter_counts_workers_forked_before_it_started() {
    let mut server = std::process::Command::new("sh")
        .args([
            "-c",
            "sh -c 'sleep 0.3; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done' & wait",
        ])
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    let started = Instant::now();
    while pids.len() < 2 && started.elapsed() < Duration::from_secs(5) {
        pids = bench_proc::processes(server.id());
    }
    assert_eq!(pids.len(), 2, "the worker was not forked: {pids:?}");
    let group = bench_proc::CpuGroup::join(&pids).expect("a writable cgroup");
    assert!(server.wait().unwrap().success());
    let counted = group.seconds();
    assert!(
        counted > 0.02,
        "the worker's busy loop counted {counted:.4} s"
    );
}
