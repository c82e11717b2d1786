//! Running out of file descriptors (issues 11 and 12): every TFTP transfer holds a socket and a
//! file, so a storm at a low `LimitNOFILE` meets EMFILE. The real server, its limit lowered
//! while it runs, must refuse with a fixed ERROR 0 (never the OS error text), count the refusals
//! in `/metrics`, log them once per burst, and serve phones again once descriptors free up.
//! And the shipped unit's limits cover the default configuration.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// What a phone hears when the server has no descriptor to spare.
const UNAVAILABLE: &str = "temporarily unavailable";

fn rrq(name: &str) -> Vec<u8> {
    let mut p = vec![0u8, 1];
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    p
}

/// Open descriptors of `pid`: how many, and the highest number.
fn open_descriptors(pid: u32) -> (usize, usize) {
    let fds: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (fds.len(), fds.iter().copied().max().unwrap_or(0))
}

/// `pid`'s RLIMIT_NOFILE, after setting it to `new` if given (what `prlimit --pid PID` does).
fn descriptor_limit(pid: u32, new: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |l| l as *const libc::rlimit);
    // SAFETY: prlimit on our own child with a valid (or null) new rlimit and a valid place
    // for the old one.
    let r = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Sets `pid`'s soft and hard RLIMIT_NOFILE (what `prlimit --pid PID --nofile=N:N` does).
fn set_descriptor_limit(pid: u32, n: u64) {
    descriptor_limit(
        pid,
        Some(libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        }),
    );
}

/// `branchtftp_refused_total{reason="descriptors"}` as `/metrics` shows it, and the whole page.
async fn refused_for_descriptors(admin: SocketAddr) -> (u64, String) {
    let metrics = admin_get(admin, "/metrics").await;
    let refused = metric_value(
        &metrics,
        "branchtftp_refused_total",
        &[("reason", "descriptors")],
    );
    (refused, metrics)
}

/// A client that keeps a transfer (and so its socket and file) open: it acknowledges one block
/// every 300 ms, far slower than the server sends but always within its timeout, until told to
/// let go; then it ends the transfer with an ERROR, as a client that gives up does.
async fn hold(sock: tokio::net::UdpSocket, mut server: SocketAddr, release: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 2048];
    while !release.load(Ordering::Acquire) {
        let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
        else {
            continue;
        };
        if n >= 4 && buf[..2] == [0, 3] {
            server = from;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = sock.send_to(&[0, 4, buf[2], buf[3]], from).await;
        }
    }
    let _ = sock.send_to(b"\0\x05\0\0gone\0", server).await;
}

/// The first reply to a fresh request for `name` from `ip`, with the socket that asked.
async fn ask(
    server: SocketAddr,
    ip: Ipv4Addr,
    name: &str,
) -> (tokio::net::UdpSocket, Vec<u8>, SocketAddr) {
    let sock = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    sock.send_to(&rrq(name), server).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("an answer, not silence")
        .unwrap();
    (sock, buf[..n].to_vec(), from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_a_fixed_counted_error_and_phones_are_served_once_they_free() {
    let files = TestFiles::with_sizes(&[("big.bin", 400_000), ("SEP001122334455.cnf.xml", 4_000)]);
    make_world_readable(files.path());
    let cache = tempfile::tempdir().unwrap();
    let admin = localhost(free_tcp_port());
    let yaml = format!(
        "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\n",
        cache.path().display()
    );
    let bt = Branchtftp::serve_config(files.path(), &yaml);
    let outs = scratch_dir();
    let phone = |out: &str| {
        let out = outs.path().join(out);
        async move { curl_tftp_get(bt.addr, "SEP001122334455.cnf.xml", &out, None).await }
    };
    let run = phone("warm").await;
    run.assert_intact(files.sha256("SEP001122334455.cnf.xml"));
    assert!(admin_get(admin, "/metrics")
        .await
        .contains("branchtftp_refused_total"));

    // A few descriptors to spare beyond those open now: each held transfer takes one (its
    // file; its port is the loop's shared one) or two (a port of its own). The admin
    // connection above is closed by the server a moment after the reply: count without it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (open, highest) = open_descriptors(bt.pid());
    set_descriptor_limit(bt.pid(), highest as u64 + 1 + 6);
    let spare = highest + 1 + 6 - open;

    let release = Arc::new(AtomicBool::new(false));
    let mut holders = Vec::new();
    let mut refusal = None;
    for i in 0..(spare + 8) {
        let (sock, reply, from) =
            ask(bt.addr, Ipv4Addr::new(127, 0, 0, 60 + i as u8), "big.bin").await;
        if reply[..2] == [0, 3] {
            sock.send_to(&[0, 4, reply[2], reply[3]], from)
                .await
                .unwrap();
            holders.push(tokio::spawn(hold(sock, from, release.clone())));
        } else {
            refusal = Some(reply);
            break;
        }
    }
    let refusal = refusal.unwrap_or_else(|| {
        panic!(
            "{} transfers held and never refused\n{}",
            holders.len(),
            bt.log()
        )
    });
    assert!(
        holders.len() <= spare,
        "{} held with {spare} spare",
        holders.len()
    );
    assert_eq!(
        tftp_error_of(&refusal),
        Some((0, UNAVAILABLE.into())),
        "{}",
        bt.log()
    );
    // The burst goes on: every request is refused the same way, none with an OS error text.
    for i in 0..3 {
        let (_, reply, _) = ask(bt.addr, Ipv4Addr::new(127, 0, 0, 120 + i), "big.bin").await;
        assert_eq!(tftp_error_of(&reply), Some((0, UNAVAILABLE.into())));
    }

    // The holders let go: their descriptors free, and the phone is served again, intact.
    release.store(true, Ordering::Release);
    for h in holders {
        h.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let run = phone("after").await;
        if run.output_sha256().as_deref() == Some(files.sha256("SEP001122334455.cnf.xml")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {run:?}\n{}",
            bt.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (refused, metrics) = refused_for_descriptors(admin).await;
    assert!(refused >= 4, "refused {refused}\n{metrics}");
    let log = bt.log();
    assert_eq!(
        log.matches("out of file descriptors").count(),
        1,
        "one log line for the burst\n{log}"
    );
}

/// `KEY=VALUE` of the shipped systemd unit.
fn unit_value(key: &str) -> u64 {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/branchtftp.service"),
    )
    .unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_units_limits_cover_the_default_configuration() {
    let cfg = branchtftp::config::Config::default();
    // A TFTP transfer holds a socket and a file; an HTTP connection a socket and a file; plus
    // the queue's requests (none hold a descriptor), listeners, the cache index and the log.
    let needed = 2 * cfg.access.max_transfers + 2 * cfg.http.max_connections + 1024;
    let nofile = unit_value("LimitNOFILE");
    assert!(
        nofile as usize >= needed,
        "LimitNOFILE={nofile}, defaults need {needed}"
    );
    // Threads: no thread per transfer; the runtime, its blocking pool, the loops and sled's
    // pool fit many times over.
    assert!(unit_value("TasksMax") >= 256);
}

/// Sets `pid`'s soft RLIMIT_NOFILE only, so it can be raised again up to the hard limit.
fn set_soft_descriptor_limit(pid: u32, n: u64) {
    let mut lim = descriptor_limit(pid, None);
    lim.rlim_cur = n.min(lim.rlim_max);
    descriptor_limit(pid, Some(lim));
}

/// The lowest descriptor number `pid` has free: with RLIMIT_NOFILE there, it can open nothing.
fn lowest_free_descriptor(pid: u32) -> u64 {
    let fds: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !fds.contains(n)).unwrap()
}

/// A cached file the server cannot open for want of a descriptor is "temporarily unavailable"
/// and counted, never a miss: the WAN must not carry a file the branch has (here over the
/// upstream connection reqwest keeps open, which needs no new descriptor) into a cache that
/// could not store it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_file_unopenable_for_descriptors_is_unavailable_not_fetched_again() {
    let name = "SEP001122334455.cnf.xml";
    let origin = HttpOrigin::with_files([(name, vec![5u8; 4_000])]);
    let root = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let admin = localhost(free_tcp_port());
    let yaml = format!(
        "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\n\
         upstreams:\n  - url: {}\nsync:\n  prefetch: []\n  discover: false\n  config_list: false\n",
        cache.path().display(),
        origin.url()
    );
    let bt = Branchtftp::serve_config(root.path(), &yaml);
    let outs = scratch_dir();
    let out = outs.path().join("cnf");
    // A miss: fetched once, cached, and the upstream connection kept alive.
    curl_tftp_get(bt.addr, name, &out, None)
        .await
        .assert_intact(&sha256_bytes(&[5u8; 4_000]));
    assert_eq!(origin.gets(name), 1);

    // Once what the transfer held is closed (a descriptor freed later would leave room).
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_soft_descriptor_limit(bt.pid(), lowest_free_descriptor(bt.pid()));
    for i in 0..3 {
        let (_, reply, _) = ask(bt.addr, Ipv4Addr::new(127, 0, 0, 30 + i), name).await;
        assert_eq!(
            tftp_error_of(&reply),
            Some((0, UNAVAILABLE.into())),
            "{}",
            bt.log()
        );
    }
    assert_eq!(origin.gets(name), 1, "not fetched again\n{}", bt.log());

    set_soft_descriptor_limit(bt.pid(), u64::MAX);
    curl_tftp_get(bt.addr, name, &out, None)
        .await
        .assert_intact(&sha256_bytes(&[5u8; 4_000]));
    let (refused, metrics) = refused_for_descriptors(admin).await;
    assert!(refused >= 3, "refused {refused}\n{metrics}");
    assert_eq!(origin.gets(name), 1);
}
