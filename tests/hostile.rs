//! Hostile or broken clients (issue 11): crafted UDP traffic from many loopback addresses
//! against the real server, while a real client (curl) fetches a file; for every attack the
//! phone's download completes, intact, within 1 s.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::*;

const PHONE_FILE: &str = "SEP001122334455.cnf.xml";

struct Site {
    bt: Branchtftp,
    admin: SocketAddr,
    _root: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

/// `serve --root` with `access` settings of the test's own; 127.0.0.0/16 is allowed, so
/// 127.3.x.x is "outside".
fn site(access: &str) -> Site {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join(PHONE_FILE), vec![b'x'; 6000]).unwrap();
    std::fs::write(root.path().join("big.bin"), vec![7u8; 200_000]).unwrap();
    make_world_readable(root.path());
    let cache = tempfile::tempdir().unwrap();
    let admin = localhost(free_tcp_port());
    let yaml = format!(
        "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\naccess:\n  allow: [\"127.0.0.0/16\"]\n{access}",
        cache.path().display()
    );
    let bt = Branchtftp::serve_config(root.path(), &yaml);
    Site {
        bt,
        admin,
        _root: root,
        _cache: cache,
    }
}

/// A phone (curl, from 127.0.0.1) fetches its config: intact, and how long it took.
async fn phone_fetch(site: &Site) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("phone-out");
    let out = out.as_path();
    let t = Instant::now();
    let run = curl_tftp_get(site.bt.addr, PHONE_FILE, out, None).await;
    let took = t.elapsed();
    assert!(
        run.success(),
        "phone fetch failed: {run:?}\n{}",
        site.bt.log()
    );
    assert_eq!(std::fs::read(out).unwrap(), vec![b'x'; 6000]);
    took
}

async fn active_transfers(admin: SocketAddr) -> u64 {
    transfers(admin).await["active"].as_u64().unwrap()
}

/// `/status`'s `transfers` object.
async fn transfers(admin: SocketAddr) -> serde_json::Value {
    let body = reqwest::get(format!("http://{admin}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["transfers"].clone()
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0u8, 1];
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

async fn socket_on(ip: Ipv4Addr) -> tokio::net::UdpSocket {
    tokio::net::UdpSocket::bind((ip, 0)).await.unwrap()
}

/// Every reply that arrives at `sock` within `wait`: (bytes, from).
async fn replies(sock: &tokio::net::UdpSocket, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
    {
        got.push((buf[..n].to_vec(), from));
    }
    got
}

fn check_phone(took: Duration, attack: &str) {
    assert!(
        took < Duration::from_secs(1),
        "{attack}: phone took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_unanswered_requests_neither_keep_phones_out_nor_hold_slots() {
    let site = site("  max_transfers: 40\n");
    // The repro: 16 requests asking `timeout 255` from each of three hosts, never
    // acknowledged, then a burst of 1,000 more from 100 hosts (far past max_transfers and the
    // queue): the sources are "spoofed", nobody will ever answer.
    let mut socks = Vec::new();
    let req = rrq("big.bin", &[("timeout", "255"), ("blksize", "1428")]);
    for host in 5..8 {
        let s = socket_on(Ipv4Addr::new(127, 0, 0, host)).await;
        for _ in 0..16 {
            // A fresh source port per request: each is a new transfer.
            let one = socket_on(Ipv4Addr::new(127, 0, 0, host)).await;
            one.send_to(&req, site.bt.addr).await.unwrap();
            socks.push(one);
        }
        socks.push(s);
    }
    for i in 0..1000u32 {
        let one = socket_on(Ipv4Addr::new(127, 0, 1 + (i / 10) as u8 % 100, 1)).await;
        one.send_to(&req, site.bt.addr).await.unwrap();
        socks.push(one);
    }
    check_phone(phone_fetch(&site).await, "spoofed RRQ burst");
    // The timeout asked (255 s) was answered with the cap, in the OACK.
    let oacks = replies(&socks[0], Duration::from_millis(100)).await;
    if let Some((p, _)) = oacks.iter().find(|(p, _)| p[..2] == [0, 6]) {
        assert!(
            p.windows(9).any(|w| w == b"timeout\x005"),
            "OACK {:?}",
            String::from_utf8_lossy(p)
        );
    }
    // Unanswered transfers live 3 s (first packet and two resends, one second apart).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(active_transfers(site.admin).await, 0, "{}", site.bt.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_floods_and_oversized_requests_cost_little_and_echo_nothing() {
    let site = site("");
    let outside = socket_on(Ipv4Addr::new(127, 3, 0, 1)).await;
    let inside = socket_on(Ipv4Addr::new(127, 0, 0, 9)).await;
    // 100 distinct options in 500 bytes (the old decoder's quadratic case, within the size
    // limit), and 1,400-byte requests full of options.
    let mut flood = rrq("f", &[]);
    for i in 0..100 {
        flood.extend_from_slice(format!("o{i}\0\0").as_bytes());
    }
    flood.truncate(500);
    let mut big = rrq("f", &[]);
    for i in 0..300 {
        big.extend_from_slice(format!("x{i}\0{i}\0").as_bytes());
    }
    big.truncate(1400);
    let attack = async {
        for _ in 0..1000 {
            outside.send_to(&big, site.bt.addr).await.unwrap();
            inside.send_to(&flood, site.bt.addr).await.unwrap();
            inside.send_to(&big, site.bt.addr).await.unwrap();
        }
    };
    let (_, took) = tokio::join!(attack, phone_fetch(&site));
    check_phone(took, "option flood");
    let got = replies(&inside, Duration::from_millis(300)).await;
    assert!(!got.is_empty(), "refusals are answered");
    for (p, _) in &got {
        assert_eq!(p[..2], [0, 5], "only ERRORs");
        // Fixed texts: nothing of the request (option names, numbers) comes back.
        let text = String::from_utf8_lossy(&p[4..]);
        assert!(
            ["bad option\0", "request too long\0"].contains(&text.as_ref()),
            "{text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_short_fixed_texts_never_an_echo() {
    let site = site("");
    let sock = socket_on(Ipv4Addr::new(127, 0, 0, 10)).await;
    let long = "Q".repeat(300);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            {
                let mut p = vec![0, 1];
                p.extend_from_slice(format!("{}\0{}\0", &long[..200], &long[..200]).as_bytes());
                p
            },
            4,
            "unsupported mode",
        ),
        (
            rrq(&format!("../{}", &long[..200]), &[]),
            2,
            "access violation",
        ),
        (rrq("f", &[("blksize", &long[..40])]), 8, "bad option"),
        (rrq("C:/x", &[]), 2, "access violation"),
        (rrq("./C:/x", &[]), 2, "access violation"),
        (
            rrq(&format!("no-such-{}", &long[..200]), &[]),
            1,
            "File not found",
        ),
    ];
    for (req, code, text) in cases {
        sock.send_to(&req, site.bt.addr).await.unwrap();
        let got = replies(&sock, Duration::from_millis(300)).await;
        assert_eq!(got.len(), 1, "{text}");
        let p = &got[0].0;
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), code, "{text}");
        assert_eq!(&p[4..], format!("{text}\0").as_bytes());
        // Short whatever was asked: a long request never draws a long answer.
        assert!(p.len() <= 32, "{text}: {} bytes", p.len());
    }
    // Stray DATA/ACK/ERROR on the request port, and runts: silence, not a reflected ERROR.
    for stray in [
        &[0u8, 4, 0, 1][..],
        &[0, 3, 0, 1, 9, 9],
        &[0, 5, 0, 0, 0],
        &[0, 1],
    ] {
        sock.send_to(stray, site.bt.addr).await.unwrap();
    }
    assert!(replies(&sock, Duration::from_millis(300)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_request_is_absorbed_by_its_transfer() {
    let site = site("");
    let sock = socket_on(Ipv4Addr::new(127, 0, 0, 11)).await;
    let req = rrq("big.bin", &[("blksize", "1428"), ("tsize", "0")]);
    for _ in 0..3 {
        sock.send_to(&req, site.bt.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Before the first retransmission (1 s): one OACK, not three.
    let got = replies(&sock, Duration::from_millis(600)).await;
    let oacks = got.iter().filter(|(p, _)| p[..2] == [0, 6]).count();
    assert_eq!(oacks, 1, "{got:?}");
    assert_eq!(active_transfers(site.admin).await, 1, "one slot used");
}

/// Acknowledges DATA 1 (a proven client, never displaced), then goes silent.
async fn hold_proven(ip: Ipv4Addr, server: SocketAddr) -> tokio::net::UdpSocket {
    let sock = socket_on(ip).await;
    sock.send_to(&rrq("big.bin", &[]), server).await.unwrap();
    let (p, from) = replies_first(&sock).await;
    assert_eq!(p[..2], [0, 3], "DATA 1");
    sock.send_to(&[0, 4, 0, 1], from).await.unwrap();
    sock
}

async fn replies_first(sock: &tokio::net::UdpSocket) -> (Vec<u8>, SocketAddr) {
    reply_within(sock, Duration::from_secs(2)).await
}

async fn reply_within(sock: &tokio::net::UdpSocket, wait: Duration) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    (buf[..n].to_vec(), from)
}

fn error_of(p: &[u8]) -> Option<(u16, String)> {
    (p[..2] == [0, 5]).then(|| {
        (
            u16::from_be_bytes([p[2], p[3]]),
            String::from_utf8_lossy(&p[4..p.len() - 1]).into_owned(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_max_transfers_is_queued_and_served_then_busy_beyond_the_queue() {
    let site = site("  max_transfers: 4\n  max_per_client: 4\n");
    // Eight real clients at once against four slots: four wait in the queue, all complete.
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for i in 0..8 {
        let out = dir.path().join(format!("out{i}"));
        let addr = site.bt.addr;
        runs.push(tokio::spawn(async move {
            // Each from an address of its own (max_per_client counts addresses).
            let args: Vec<String> = [
                "-s",
                "-S",
                "-m",
                "30",
                "--interface",
                &format!("127.0.0.{}", 50 + i),
                "-o",
                out.to_str().unwrap(),
                &tftp_url(addr, "big.bin"),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            let r = run_client("curl", &args, &out).await;
            (
                r.success(),
                std::fs::read(&out).map(|d| d.len()).unwrap_or(0),
            )
        }));
    }
    for r in runs {
        assert_eq!(r.await.unwrap(), (true, 200_000), "{}", site.bt.log());
    }
    // Four slots held by clients that answered, four requests queued: the next is busy at once.
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(hold_proven(Ipv4Addr::new(127, 0, 0, 20 + i), site.bt.addr).await);
    }
    let mut queued = Vec::new();
    for i in 0..4 {
        let s = socket_on(Ipv4Addr::new(127, 0, 0, 30 + i)).await;
        s.send_to(&rrq("big.bin", &[]), site.bt.addr).await.unwrap();
        queued.push(s);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // What an engineer sees: four transfers, four requests waiting, and the count of every
    // request that waited (these four, and the curl burst's that did).
    let now = transfers(site.admin).await;
    assert_eq!(
        (now["active"].as_u64(), now["queued"].as_u64()),
        (Some(4), Some(4))
    );
    let metrics = reqwest::get(format!("http://{}/metrics", site.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let waited = metric_value(&metrics, "branchtftp_admission_queued_total", &[]);
    assert!(waited > 4, "{waited} requests counted as queued");
    let late = socket_on(Ipv4Addr::new(127, 0, 0, 40)).await;
    let t = Instant::now();
    late.send_to(&rrq("big.bin", &[]), site.bt.addr)
        .await
        .unwrap();
    let (p, _) = replies_first(&late).await;
    assert_eq!(error_of(&p), Some((0, "server busy".into())));
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // The queued ones hear "server busy" when no slot frees within the queue's wait (3 s: a
    // phone gives up about 4 s after its first send).
    let t = Instant::now();
    for s in &queued {
        let (p, _) = reply_within(s, Duration::from_secs(5)).await;
        assert_eq!(error_of(&p), Some((0, "server busy".into())));
    }
    assert!(
        t.elapsed() > Duration::from_millis(2500),
        "busy before the queue's wait ran out: {:?}",
        t.elapsed()
    );
    drop(held);
}

/// Acknowledges every block of the transfer whose first DATA was `first` (from `from`), up to
/// its short last block; the bytes received.
async fn ack_through(sock: &tokio::net::UdpSocket, first: Vec<u8>, from: SocketAddr) -> usize {
    let (mut p, mut bytes) = (first, 0);
    loop {
        assert_eq!(p[..2], [0, 3], "DATA, not {p:?}");
        bytes += p.len() - 4;
        sock.send_to(&[0, 4, p[2], p[3]], from).await.unwrap();
        if p.len() - 4 < 512 {
            return bytes;
        }
        p = replies_first(sock).await.0;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_is_started_by_the_loop_whose_transfer_freed_its_slot() {
    // One slot. A phone's transfer holds it while a second phone's request waits in the
    // queue; the first transfer's last ACK frees the slot on its loop, which starts the queued
    // transfer itself (no task, no wake-up of another thread): from the same loop's shared
    // port. Handed to the loops in turn instead, about every other round would come from the
    // other loop's port (the rounds' first transfers land on whichever loop reads them).
    let site = site("  max_transfers: 1\n  max_per_client: 1\n");
    for round in 0..12u8 {
        let a = socket_on(Ipv4Addr::new(127, 0, 2, 1 + round)).await;
        a.send_to(&rrq(PHONE_FILE, &[]), site.bt.addr)
            .await
            .unwrap();
        let (first_a, from_a) = replies_first(&a).await;
        let b = socket_on(Ipv4Addr::new(127, 0, 3, 1 + round)).await;
        b.send_to(&rrq(PHONE_FILE, &[]), site.bt.addr)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(ack_through(&a, first_a, from_a).await, 6000);
        let (first_b, from_b) = replies_first(&b).await;
        assert_eq!(
            from_b,
            from_a,
            "round {round}: the queued transfer came from another loop's port\n{}",
            site.bt.log()
        );
        assert_eq!(ack_through(&b, first_b, from_b).await, 6000);
    }
}
