//! Boot storm (issue 12): N simulated phones over TFTP (benches/storm/phones.rs), all starting
//! within one second, against `branchtftp serve --root` and tftpd-hpa on the same files with
//! the same generator, interleaved per N. Prints per N and server: phones booted, p50/p99 boot
//! time, wall time, server CPU seconds per boot, peak RSS and threads, and the ratios.
//!
//!   cargo bench --bench storm                 # N = 500, 1000, 2000, 5000
//!   STORM_PHONES=500,3000 cargo bench --bench storm
//!
//! A third server runs beside them: the floor (benches/storm/floor.rs), a TFTP server that
//! does nothing but the system calls, whose CPU per boot is what any server pays on this
//! machine for the same datagrams. `STORM_FLOOR=0` leaves it out.
//!
//! Goodput (boots per second) is the median of `STORM_GOODPUT_RUNS` (default 5) storms of
//! branchtftp per N, interleaved over N: the first is the table's, the rest run after it.
//!
//! Needs in.tftpd (tftpd-hpa). Not a CI test (tests/storm.rs runs 500 phones in CI).

#[path = "storm/floor.rs"]
mod floor;
#[path = "storm/phones.rs"]
mod phones;
#[path = "support/proc.rs"]
mod proc;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

struct Server {
    child: Child,
    addr: SocketAddr,
    /// branchtftp's admin endpoint, for its counters after a run.
    admin: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn branchtftp(root: &Path, cache: &Path) -> Server {
    let port = proc::free_udp_port();
    let admin: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = cache.join("bt.yaml");
    // `STORM_MAX_TRANSFERS`: another `access.max_transfers` (default: the server's own).
    let max_transfers = std::env::var("STORM_MAX_TRANSFERS")
        .map(|m| format!("  max_transfers: {m}\n"))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "log: warn\ntftp:\n  listen: [\"127.0.0.1:{port}\"]\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\ncache:\n  dir: {}\n  overrides: {}\naccess:\n  allow: [\"127.0.0.0/8\"]\n{max_transfers}",
            cache.join("c").display(),
            root.display()
        ),
    )
    .unwrap();
    let child = proc::spawn_branchtftp(&cfg);
    ready(Server {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        admin: Some(admin),
    })
}

fn tftpd_hpa(root: &Path) -> Server {
    let (child, port) = proc::spawn_tftpd_hpa(root);
    ready(Server {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        admin: None,
    })
}

/// The floor server, this benchmark started again as a process of its own.
fn floor_server(root: &Path) -> Server {
    let port = proc::free_udp_port();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("STORM_FLOOR_SERVER", format!("{}|{port}", root.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the floor server");
    ready(Server {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        admin: None,
    })
}

/// branchtftp's own account of a run, from `/metrics`: requests told "busy", transfers of
/// silent clients displaced, resent requests absorbed, refusals for want of descriptors.
fn server_counters(admin: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut text = String::new();
    if let Ok(mut c) = std::net::TcpStream::connect(admin) {
        let _ = c.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
        let _ = c.read_to_string(&mut text);
    }
    let sample = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    format!(
        "queued {}, busy {}, displaced {}, resends absorbed {}, out of descriptors {}",
        sample("branchtftp_admission_queued_total"),
        sample("branchtftp_refused_total{reason=\"busy\"}"),
        sample("branchtftp_requests_total{protocol=\"tftp\",result=\"displaced\"}"),
        sample("branchtftp_requests_total{protocol=\"tftp\",result=\"duplicate\"}"),
        sample("branchtftp_refused_total{reason=\"descriptors\"}"),
    )
}

/// Waits until the server answers a request (ERROR 1 for a missing name).
fn ready(s: Server) -> Server {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 600];
    for _ in 0..100 {
        let _ = sock.send_to(b"\0\x01storm-probe\0octet\0", s.addr);
        if sock.recv_from(&mut buf).is_ok() {
            return s;
        }
    }
    panic!("server on {} did not answer", s.addr);
}

/// One storm of `n` phones against `server`: how they booted and what the server spent.
fn run(rt: &tokio::runtime::Runtime, server: &Server, n: usize) -> (phones::Summary, proc::Cost) {
    let (boots, cost) = proc::measure(server.child.id(), || {
        rt.block_on(phones::storm(server.addr, n, Duration::from_secs(1)))
    });
    (phones::Summary::of(&boots), cost)
}

fn main() {
    if let Ok(at) = std::env::var("STORM_FLOOR_SERVER") {
        let (root, port) = at.rsplit_once('|').expect("ROOT|PORT");
        floor::serve(Path::new(root), port.parse().expect("a port"));
    }
    let with_floor = std::env::var("STORM_FLOOR").map_or(true, |v| v != "0");
    let ns = phones::storm_sizes();
    let max = *ns.iter().max().unwrap_or(&500);
    let root = tempfile::tempdir().unwrap();
    phones::write_files(root.path(), max);
    let cache = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("| phones | server | booted | gave up | p50 s | p99 s | wall s | resent | CPU ms/boot | generator CPU ms/boot | peak RSS MB | threads |");
    println!(
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut goodput = Vec::new();
    let mut targets: Vec<(String, bool)> = Vec::new();
    for &n in &ns {
        // A fresh server per N, so peak RSS is this N's.
        let mut rows = Vec::new();
        let servers: [(&str, &dyn Fn() -> Server); 3] = [
            ("branchtftp", &|| branchtftp(root.path(), cache.path())),
            ("tftpd-hpa", &|| tftpd_hpa(root.path())),
            ("floor", &|| floor_server(root.path())),
        ];
        for (name, start) in servers.iter().take(if with_floor { 3 } else { 2 }) {
            let server = start();
            let dup0 = phones::duplicates();
            let r = run(&rt, &server, n);
            let twice = phones::duplicates() - dup0;
            eprintln!("{n} phones, {name}: DATA received twice (server retransmissions) {twice}");
            let (boots, cost) = (&r.0, &r.1);
            println!(
                "| {n} | {name} | {} | {:.2} | {:.1} | {} |",
                boots.cells(cost.wall, cost.cpu_ms_per(boots.booted)),
                cost.generator_ms_per(boots.booted),
                cost.rss_mb,
                if *name != "branchtftp" {
                    "-".to_string()
                } else {
                    cost.threads.to_string()
                }
            );
            if !boots.failures.is_empty() {
                eprintln!("{n} phones, {name}: gave up because {:?}", boots.failures);
            }
            if let Some(admin) = server.admin {
                eprintln!("{n} phones, {name}: {}", server_counters(admin));
                eprintln!("{n} phones, {name}: threads at peak: {}", cost.thread_names);
            }
            rows.push(r);
            drop(server);
            std::thread::sleep(Duration::from_secs(1));
        }
        let ((bt, bt_cost), (hpa, hpa_cost)) = (&rows[0], &rows[1]);
        goodput.push((n, bt.booted as f64 / bt_cost.wall));
        let cpu_ratio = bt_cost.cpu_ms_per(bt.booted) / hpa_cost.cpu_ms_per(hpa.booted);
        println!(
            "|  | ratio branchtftp/tftpd-hpa | | | | | {:.2} | | {cpu_ratio:.2} | | | |",
            bt_cost.wall / hpa_cost.wall,
        );
        if let Some((floor, floor_cost)) = rows.get(2) {
            let floor_ratio = floor_cost.cpu_ms_per(floor.booted) / hpa_cost.cpu_ms_per(hpa.booted);
            println!(
                "|  | ratio floor/tftpd-hpa | | | | | {:.2} | | {floor_ratio:.2} | | | |",
                floor_cost.wall / hpa_cost.wall,
            );
        }
        targets.push((format!("{n} phones: all boot"), bt.gave_up == 0));
        targets.push((
            format!("{n} phones: server CPU per boot ≤ 0.5× tftpd-hpa's ({cpu_ratio:.2})"),
            cpu_ratio <= 0.5,
        ));
        if n == max {
            targets.push((
                format!("{n} phones: peak RSS ≤ 64 MB ({:.1})", bt_cost.rss_mb),
                bt_cost.rss_mb <= 64.0,
            ));
            targets.push((
                format!("{n} phones: threads ≤ 16 ({})", bt_cost.threads),
                bt_cost.threads <= 16,
            ));
        }
    }
    // Goodput is the one target that compares runs of branchtftp with each other, minutes
    // apart, and this machine's speed drifts by tens of percent within minutes: more rounds of
    // branchtftp alone, interleaved over N, and the median per N.
    let rounds: usize = std::env::var("STORM_GOODPUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut samples: Vec<Vec<f64>> = goodput.iter().map(|(_, g)| vec![*g]).collect();
    for _ in 1..rounds {
        for (k, &n) in ns.iter().enumerate() {
            let server = branchtftp(root.path(), cache.path());
            let (boots, cost) = run(&rt, &server, n);
            samples[k].push(boots.booted as f64 / cost.wall);
            drop(server);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    println!();
    for ((n, g), runs) in goodput.iter_mut().zip(&samples) {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        *g = sorted[sorted.len() / 2];
        let each: Vec<String> = runs.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "branchtftp goodput at {n}: {g:.0} boots/s (median of {}: {})",
            runs.len(),
            each.join(", ")
        );
    }
    let best_smaller = goodput
        .iter()
        .filter(|(n, _)| *n < max)
        .map(|(_, g)| *g)
        .fold(0.0, f64::max);
    if let (Some((_, at_max)), true) = (goodput.last(), best_smaller > 0.0) {
        let share = at_max / best_smaller;
        targets.push((
            format!(
                "goodput at {max} ≥ 90 % of the best at a smaller N ({:.0} %)",
                share * 100.0
            ),
            share >= 0.9,
        ));
    }
    println!();
    for (what, met) in &targets {
        println!("{}  {what}", if *met { "met   " } else { "MISSED" });
    }
}
