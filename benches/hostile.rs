//! Hostile clients (issue 11): the same attacks against `branchtftp serve` and tftpd-hpa on the
//! same files, side by side, printing for each server
//!
//! 1. **slots held** 10 s after a spoofed burst of 4,096 RRQs (16 from each of 256 loopback
//!    addresses, each from its own port, asking `timeout 255`, never acknowledged): for
//!    branchtftp `branchtftp_transfers_active` from /metrics, for tftpd-hpa its live transfer
//!    processes (it forks one per request). Target: 0.
//! 2. **amplification**: bytes a server sends to one source in answer to one request, divided by
//!    the request's size, over 70 s (tftpd-hpa gives up after about 63 s of retransmissions), for
//!    each kind of request in [`KINDS`]; the worst kind is the figure. Target: <= tftpd-hpa's.
//! 3. **a phone's latency** fetching a cached 1.5 KB config (a lock-step client from its own
//!    address, resending after 1 s like a phone) while idle and under each attack: the median,
//!    and its ratio to idle. Target: <= 2x idle. HTTP attacks apply to branchtftp only (tftpd-hpa
//!    has no HTTP); there the phone fetches the same file over HTTP.
//!
//!   cargo bench --bench hostile
//!
//! Needs in.tftpd (tftpd-hpa). Takes about three minutes. Not a CI test: tests/hostile.rs drives
//! each attack against the real server and asserts that phones are served.

#[path = "support/proc.rs"]
mod proc;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const CONFIG: &str = "SEP001122334455.cnf.xml";
const CONFIG_SIZE: usize = 1_500;
/// A firmware-sized file with a one-letter name: the cheapest request for the most bytes.
const BIG: &str = "b";
const BIG_SIZE: usize = 1 << 20;

struct Server {
    name: &'static str,
    child: Child,
    tftp: SocketAddr,
    /// branchtftp only.
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn content(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// branchtftp with the product's default limits, the files imported into its cache, no
/// upstream (every answer comes from the branch).
fn branchtftp(files: &Path, dir: &Path) -> Server {
    let (tftp, http, admin) = (
        proc::free_udp_port(),
        proc::free_tcp_port(),
        proc::free_tcp_port(),
    );
    let cfg = dir.join("bt.yaml");
    std::fs::write(
        &cfg,
        format!(
            "log: warn\ntftp:\n  listen: [\"127.0.0.1:{tftp}\"]\nhttp:\n  listen: [\"127.0.0.1:{http}\"]\n\
             admin:\n  listen: \"127.0.0.1:{admin}\"\ncache:\n  dir: {}\n  overrides: {}\n\
             access:\n  allow: [\"127.0.0.0/9\"]\n",
            dir.join("cache").display(),
            dir.join("overrides").display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("overrides")).unwrap();
    proc::import_into_cache(files, &cfg);
    let child = proc::spawn_branchtftp(&cfg);
    ready(Server {
        name: "branchtftp",
        child,
        tftp: ([127, 0, 0, 1], tftp).into(),
        http: Some(([127, 0, 0, 1], http).into()),
        admin: Some(([127, 0, 0, 1], admin).into()),
    })
}

fn tftpd_hpa(files: &Path) -> Server {
    let (child, port) = proc::spawn_tftpd_hpa(files);
    ready(Server {
        name: "tftpd-hpa",
        child,
        tftp: ([127, 0, 0, 1], port).into(),
        http: None,
        admin: None,
    })
}

fn ready(s: Server) -> Server {
    for _ in 0..100 {
        if fetch_tftp(s.tftp, Ipv4Addr::new(127, 0, 0, 1)).is_ok() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} on {} does not serve {CONFIG}", s.name, s.tftp);
}

/// One lock-step fetch of [`CONFIG`] from `from`, resending like a phone (after 1 s, 4 sends).
fn fetch_tftp(server: SocketAddr, from: Ipv4Addr) -> Result<Duration, String> {
    let sock = UdpSocket::bind((from, 0)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let rrq = [b"\0\x01", CONFIG.as_bytes(), b"\0octet\0"].concat();
    let t = Instant::now();
    let mut got = 0usize;
    let mut expect = 1u16;
    let mut last: (Vec<u8>, SocketAddr) = (rrq, server);
    let mut buf = [0u8; 1024];
    let mut sends = 0;
    loop {
        sock.send_to(&last.0, last.1).map_err(|e| e.to_string())?;
        sends += 1;
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) if sends < 4 => continue,
            Err(_) => return Err("gave up".into()),
        };
        match (buf[1], u16::from_be_bytes([buf[2], buf[3]])) {
            (3, block) if block == expect => {
                got += n - 4;
                last = (vec![0, 4, buf[2], buf[3]], peer);
                sends = 0;
                expect = expect.wrapping_add(1);
                if n - 4 < 512 {
                    sock.send_to(&last.0, peer).map_err(|e| e.to_string())?;
                    return if got == CONFIG_SIZE {
                        Ok(t.elapsed())
                    } else {
                        Err(format!("got {got} bytes"))
                    };
                }
            }
            (3, _) => {}
            (5, _) => return Err(format!("ERROR {}", buf[3])),
            _ => return Err("unexpected packet".into()),
        }
    }
}

/// One HTTP/1.1 GET of [`CONFIG`] on a new connection.
fn fetch_http(server: SocketAddr) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&server, Duration::from_secs(4)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    write!(
        s,
        "GET /{CONFIG} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| e.to_string())?;
    if body.starts_with(b"HTTP/1.1 200") && body.len() > CONFIG_SIZE {
        Ok(t.elapsed())
    } else {
        Err(String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned())
    }
}

/// Median latency (ms) and failures of a phone fetching again and again for `span`.
fn phone(span: Duration, fetch: impl Fn() -> Result<Duration, String>) -> (f64, usize, usize) {
    let end = Instant::now() + span;
    let (mut ok, mut failed) = (Vec::new(), 0);
    while Instant::now() < end {
        match fetch() {
            Ok(d) => ok.push(d.as_secs_f64() * 1000.0),
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ok.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = ok.get(ok.len() / 2).copied().unwrap_or(f64::NAN);
    (median, ok.len(), failed)
}

/// Makes one request datagram.
type Make = fn() -> Vec<u8>;

/// The requests whose answers are measured for amplification: (label, datagram).
const KINDS: &[(&str, Make)] = &[
    ("RRQ for a 1 MB file, no options", || rrq(BIG, &[])),
    ("RRQ blksize 65464 tsize 0", || {
        rrq(BIG, &[("blksize", "65464"), ("tsize", "0")])
    }),
    ("RRQ timeout 255 for a 1 MB file", || {
        rrq(BIG, &[("timeout", "255")])
    }),
    ("RRQ for a missing name", || rrq("m", &[])),
    ("RRQ with an unknown 13 KB mode", || {
        [b"\0\x01x\0".as_slice(), &vec![b'A'; 13_000], b"\0"].concat()
    }),
    ("RRQ with 8,000 options", option_flood),
    ("WRQ", || [b"\0\x02x\0octet\0".as_slice()].concat()),
    ("ACK to port 69", || vec![0, 4, 0, 1]),
];

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = [b"\0\x01", name.as_bytes(), b"\0octet\0"].concat();
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

fn option_flood() -> Vec<u8> {
    let mut p = rrq(CONFIG, &[]);
    for i in 0..8_000 {
        p.extend_from_slice(format!("o{i}\0{i}\0").as_bytes());
        if p.len() > 65_000 {
            break;
        }
    }
    p
}

/// Sends each kind once from its own socket and counts what comes back for `span`. Returns
/// (label, request bytes, reply bytes) per kind.
fn amplification(server: SocketAddr, span: Duration) -> Vec<(&'static str, usize, usize)> {
    let socks: Vec<(&str, usize, UdpSocket)> = KINDS
        .iter()
        .enumerate()
        .map(|(i, (label, make))| {
            let s = UdpSocket::bind((Ipv4Addr::new(127, 0, 3, 1 + i as u8), 0)).unwrap();
            s.set_nonblocking(true).unwrap();
            let p = make();
            s.send_to(&p, server).unwrap();
            (*label, p.len(), s)
        })
        .collect();
    let mut got = vec![0usize; socks.len()];
    let mut buf = vec![0u8; 70_000];
    let end = Instant::now() + span;
    while Instant::now() < end {
        for (i, (_, _, s)) in socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                got[i] += n;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    socks
        .iter()
        .zip(got)
        .map(|((l, sent, _), g)| (*l, *sent, g))
        .collect()
}

/// Transfers the server holds now.
fn slots_held(s: &Server) -> u64 {
    match s.admin {
        Some(admin) => {
            let mut c = TcpStream::connect(admin).unwrap();
            write!(
                c,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            c.read_to_string(&mut text).unwrap();
            text.lines()
                .filter(|l| l.starts_with("branchtftp_transfers_active"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        }
        // tftpd-hpa forks one process per transfer.
        None => proc::processes(s.child.id()).len() as u64 - 1,
    }
}

/// The spoofed burst: 16 RRQs with `timeout 255` from each of 256 addresses, each from its own
/// port. The sockets stay open and silent (a spoofed source answers nothing, not even ICMP).
fn spoofed_burst(server: SocketAddr) -> Vec<UdpSocket> {
    let p = rrq(CONFIG, &[("timeout", "255")]);
    let mut socks = Vec::with_capacity(4096);
    for a in 0..=255u8 {
        for _ in 0..16 {
            let s = UdpSocket::bind((Ipv4Addr::new(127, 0, 1, a), 0)).unwrap();
            s.send_to(&p, server).unwrap();
            socks.push(s);
        }
    }
    socks
}

/// Sends `packet()` from `from` at `per_second` for `span`, in a thread.
fn flood(
    server: SocketAddr,
    from: Ipv4Addr,
    per_second: u32,
    span: Duration,
    packet: impl Fn(u32) -> Vec<u8> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let s = UdpSocket::bind((from, 0)).unwrap();
        s.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < span {
            let due = (start.elapsed().as_secs_f64() * per_second as f64) as u32;
            while sent < due {
                let _ = s.send_to(&packet(sent), server);
                sent += 1;
            }
            let mut buf = [0u8; 1500];
            while s.recv(&mut buf).is_ok() {}
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// 300 HTTP connections that each send half a request header and then nothing.
fn slowloris(server: SocketAddr) -> Vec<TcpStream> {
    (0..300)
        .filter_map(|_| {
            let mut s = TcpStream::connect(server).ok()?;
            let _ = s.write_all(b"GET /x HTTP/1.1\r\nHost: ");
            Some(s)
        })
        .collect()
}

fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: 65_536,
        rlim_max: 65_536,
    };
    // SAFETY: setrlimit reads the struct we pass; failure only leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

struct Attack {
    label: &'static str,
    http: bool,
    start: fn(&Server) -> Box<dyn FnOnce()>,
}

const SPAN: Duration = Duration::from_secs(5);

fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            label: "spoofed burst (4,096 RRQs, timeout 255)",
            http: false,
            start: |s| {
                let held = spoofed_burst(s.tftp);
                Box::new(move || drop(held))
            },
        },
        Attack {
            label: "option flood (20/s x 64 KB, outside allow)",
            http: false,
            start: |s| {
                let t = flood(s.tftp, Ipv4Addr::new(127, 200, 0, 1), 20, SPAN, |_| {
                    option_flood()
                });
                Box::new(move || t.join().unwrap())
            },
        },
        Attack {
            label: "random-name flood (2,000/s, one client)",
            http: false,
            start: |s| {
                let t = flood(s.tftp, Ipv4Addr::new(127, 0, 4, 1), 2_000, SPAN, |i| {
                    rrq(&format!("n{i:08x}.cnf.xml"), &[])
                });
                Box::new(move || t.join().unwrap())
            },
        },
        Attack {
            label: "HTTP: 300 half-sent headers",
            http: true,
            start: |s| {
                let held = s.http.map(slowloris).unwrap_or_default();
                Box::new(move || drop(held))
            },
        },
    ]
}

fn main() {
    raise_nofile();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join(CONFIG), content(CONFIG_SIZE, 3)).unwrap();
    std::fs::write(files.path().join(BIG), content(BIG_SIZE, 9)).unwrap();
    let phone_addr = Ipv4Addr::new(127, 0, 9, 9);

    // 1. Slots held 10 s after the spoofed burst.
    println!("## Slots held 10 s after a spoofed burst of 4,096 RRQs (target: 0)\n");
    println!("| server | held at once after the burst | held after 10 s |");
    println!("| --- | ---: | ---: |");
    for make in [branchtftp as fn(&Path, &Path) -> Server, |f, _| {
        tftpd_hpa(f)
    }] {
        let dir = tempfile::tempdir().unwrap();
        let s = make(files.path(), dir.path());
        let held = spoofed_burst(s.tftp);
        std::thread::sleep(Duration::from_millis(500));
        let at_once = slots_held(&s);
        std::thread::sleep(Duration::from_millis(9_500));
        println!("| {} | {at_once} | {} |", s.name, slots_held(&s));
        drop(held);
    }

    // 2. Amplification, both servers at once (they are independent).
    println!("\n## Amplification: bytes sent / bytes received, one request, 70 s (target: worst <= tftpd-hpa's worst)\n");
    let dir = tempfile::tempdir().unwrap();
    let servers = [
        branchtftp(files.path(), dir.path()),
        tftpd_hpa(files.path()),
    ];
    let span = Duration::from_secs(70);
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = servers
            .iter()
            .map(|s| sc.spawn(move || amplification(s.tftp, span)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("| request | bytes in | branchtftp out | x | tftpd-hpa out | x |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut worst = [0f64; 2];
    for (i, (label, sent, _)) in results[0].iter().enumerate() {
        let (a, b) = (results[0][i].2, results[1][i].2);
        let (xa, xb) = (a as f64 / *sent as f64, b as f64 / *sent as f64);
        worst = [worst[0].max(xa), worst[1].max(xb)];
        println!("| {label} | {sent} | {a} | {xa:.1} | {b} | {xb:.1} |");
    }
    println!(
        "| **worst** | | | **{:.1}** | | **{:.1}** |\n\nworst amplification branchtftp/tftpd-hpa: {:.2} ({})",
        worst[0],
        worst[1],
        worst[0] / worst[1],
        if worst[0] <= worst[1] { "met" } else { "MISSED" }
    );
    drop(servers);

    // 3. A phone's latency idle and under each attack, a fresh server per attack.
    println!("\n## A phone fetching a cached 1.5 KB config: median ms ({}-s samples; target: <= 2x idle)\n", SPAN.as_secs());
    println!("| attack | branchtftp ms | ok/failed | x idle | tftpd-hpa ms | ok/failed | x idle |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut rows: Vec<Vec<String>> = Vec::new();
    let measure = |s: &Server, http: bool| {
        let (tftp, web) = (s.tftp, s.http);
        if http {
            web.map(|w| phone(SPAN, || fetch_http(w)))
        } else {
            Some(phone(SPAN, || fetch_tftp(tftp, phone_addr)))
        }
    };
    let idle = |label: &str, http: bool, rows: &mut Vec<Vec<String>>| {
        let mut row = vec![label.to_string()];
        let mut base = Vec::new();
        for make in [branchtftp as fn(&Path, &Path) -> Server, |f, _| {
            tftpd_hpa(f)
        }] {
            let dir = tempfile::tempdir().unwrap();
            let s = make(files.path(), dir.path());
            let m = measure(&s, http);
            base.push(m.map(|m| m.0));
            row.extend(cells(m, None));
        }
        rows.push(row);
        base
    };
    let idle_tftp = idle("idle (TFTP)", false, &mut rows);
    let idle_http = idle("idle (HTTP)", true, &mut rows);
    for a in attacks() {
        let mut row = vec![a.label.to_string()];
        let base = if a.http { &idle_http } else { &idle_tftp };
        for (i, make) in [branchtftp as fn(&Path, &Path) -> Server, |f, _| {
            tftpd_hpa(f)
        }]
        .into_iter()
        .enumerate()
        {
            let dir = tempfile::tempdir().unwrap();
            let s = make(files.path(), dir.path());
            if a.http && s.http.is_none() {
                row.extend(["n/a".to_string(), String::new(), String::new()]);
                continue;
            }
            let stop = (a.start)(&s);
            std::thread::sleep(Duration::from_millis(200));
            let m = measure(&s, a.http);
            stop();
            row.extend(cells(m, base[i]));
        }
        rows.push(row);
    }
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

fn cells(m: Option<(f64, usize, usize)>, idle: Option<f64>) -> Vec<String> {
    match m {
        None => vec!["n/a".into(), String::new(), String::new()],
        Some((median, ok, failed)) => vec![
            format!("{median:.2}"),
            format!("{ok}/{failed}"),
            idle.map(|i| {
                let x = median / i;
                format!("{x:.2}{}", if x <= 2.0 { "" } else { " MISSED" })
            })
            .unwrap_or_default(),
        ],
    }
}
