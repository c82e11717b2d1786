//! Boot storm (issue 12): N simulated phones over TFTP (benches/storm/phones.rs), all starting
//! within one second, against `branchtftp serve --root` and tftpd-hpa on the same files with
//! the same generator, interleaved per N. Prints per N and server: phones booted, p50/p99 boot
//! time, wall time, server CPU seconds per boot, peak RSS and threads, and the ratios.
//!
//!   cargo bench --bench storm                 # N = 500, 1000, 2000, 5000
//!   STORM_PHONES=500,3000 cargo bench --bench storm
//!
//! Needs in.tftpd (tftpd-hpa). Not a CI test (tests/storm.rs runs 500 phones in CI).

#[path = "storm/phones.rs"]
mod phones;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn branchtftp(root: &Path, cache: &Path) -> Server {
    let port = free_port();
    let admin: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = cache.join("bt.yaml");
    std::fs::write(
        &cfg,
        format!(
            "log: warn\ntftp:\n  listen: [\"127.0.0.1:{port}\"]\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\ncache:\n  dir: {}\n  overrides: {}\naccess:\n  allow: [\"127.0.0.0/8\"]\n",
            cache.join("c").display(),
            root.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env_remove("BRANCHTFTP_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start branchtftp");
    ready(Server {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        admin: Some(admin),
    })
}

fn tftpd_hpa(root: &Path) -> Server {
    let port = free_port();
    let child = Command::new("in.tftpd")
        .args(["-L", "-a", &format!("127.0.0.1:{port}"), "-s"])
        .arg(root)
        .args(["-u", "nobody"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start in.tftpd (apt-get install tftpd-hpa)");
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
        "busy {}, displaced {}, resends absorbed {}, out of descriptors {}",
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

/// utime + stime + children's (tftpd-hpa forks per transfer), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    proc_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The generator's own CPU (this process: the phones' runtime), in seconds.
fn generator_cpu_seconds() -> f64 {
    proc_cpu_seconds("/proc/self/stat")
}

fn proc_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-17 of stat(5); `after` starts at field 3.
    let ticks = f.get(11..15).map(|s| s.iter().sum()).unwrap_or(0.0);
    ticks / 100.0
}

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Row {
    booted: usize,
    gave_up: usize,
    p50: f64,
    p99: f64,
    wall: f64,
    cpu_per_boot_ms: f64,
    rss_mb: f64,
    threads: u64,
    resent: u32,
    /// The generator's CPU per phone booted, ms: it shares the two cores with the server.
    generator_ms_per_boot: f64,
    /// The server's threads at their peak, by name.
    thread_names: String,
    /// Why phones gave up, most common first (e.g. "ERROR 0", "gave up").
    failures: Vec<(String, usize)>,
}

fn run(rt: &tokio::runtime::Runtime, server: &Server, n: usize) -> Row {
    let pid = server.child.id();
    let cpu0 = cpu_seconds(pid);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s2 = sampling.clone();
    let sampler = std::thread::spawn(move || {
        let (mut threads, mut names) = (0, String::new());
        while s2.load(std::sync::atomic::Ordering::Relaxed) {
            let now = status_field(pid, "Threads:");
            if now > threads {
                (threads, names) = (now, thread_names(pid));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (threads, names)
    });
    let t = Instant::now();
    let gen0 = generator_cpu_seconds();
    let boots = rt.block_on(phones::storm(server.addr, n, Duration::from_secs(1)));
    let wall = t.elapsed().as_secs_f64();
    let generator = generator_cpu_seconds() - gen0;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (threads, thread_names) = sampler.join().unwrap();
    let cpu = cpu_seconds(pid) - cpu0;
    let mut times: Vec<f64> = boots
        .iter()
        .filter(|b| b.booted)
        .map(|b| b.took.as_secs_f64())
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let booted = times.len();
    let mut failures = std::collections::BTreeMap::new();
    for b in &boots {
        if let Some(f) = &b.failure {
            // "NAME: Reason": keep the reason only.
            let why = f
                .split_once(": ")
                .map_or(f.as_str(), |(_, w)| w)
                .to_string();
            *failures.entry(why).or_insert(0) += 1;
        }
    }
    let mut failures: Vec<_> = failures.into_iter().collect();
    failures.sort_by_key(|f| std::cmp::Reverse(f.1));
    Row {
        failures,
        booted,
        gave_up: n - booted,
        p50: pct(0.5),
        p99: pct(0.99),
        wall,
        cpu_per_boot_ms: cpu * 1000.0 / booted.max(1) as f64,
        rss_mb: status_field(pid, "VmHWM:") as f64 / 1024.0,
        threads,
        resent: boots.iter().map(|b| b.resent).sum(),
        generator_ms_per_boot: generator * 1000.0 / booted.max(1) as f64,
        thread_names,
    }
}

/// The threads of `pid` by name, with counts ("tokio-rt-worker ×4, sled-io-0, …").
fn thread_names(pid: u32) -> String {
    let mut names = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // sled-io-3, tftp-loop-1: one entry per family.
        let family = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string();
        *names.entry(family).or_insert(0) += 1;
    }
    names
        .iter()
        .map(|(n, c)| format!("{n} ×{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let ns: Vec<usize> = std::env::var("STORM_PHONES")
        .unwrap_or_else(|_| "500,1000,2000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
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
        for (name, server) in [
            ("branchtftp", branchtftp(root.path(), cache.path())),
            ("tftpd-hpa", tftpd_hpa(root.path())),
        ] {
            let r = run(&rt, &server, n);
            println!(
                "| {n} | {name} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.1} | {} |",
                r.booted,
                r.gave_up,
                r.p50,
                r.p99,
                r.wall,
                r.resent,
                r.cpu_per_boot_ms,
                r.generator_ms_per_boot,
                r.rss_mb,
                if name == "tftpd-hpa" {
                    "-".to_string()
                } else {
                    r.threads.to_string()
                }
            );
            if !r.failures.is_empty() {
                eprintln!("{n} phones, {name}: gave up because {:?}", r.failures);
            }
            if let Some(admin) = server.admin {
                eprintln!("{n} phones, {name}: {}", server_counters(admin));
                eprintln!("{n} phones, {name}: threads at peak: {}", r.thread_names);
            }
            rows.push(r);
            drop(server);
            std::thread::sleep(Duration::from_secs(1));
        }
        goodput.push((n, rows[0].booted as f64 / rows[0].wall));
        let cpu_ratio = rows[0].cpu_per_boot_ms / rows[1].cpu_per_boot_ms;
        println!(
            "|  | ratio branchtftp/tftpd-hpa | | | | | {:.2} | | {cpu_ratio:.2} | | | |",
            rows[0].wall / rows[1].wall,
        );
        let bt = &rows[0];
        targets.push((format!("{n} phones: all boot"), bt.gave_up == 0));
        targets.push((
            format!("{n} phones: server CPU per boot ≤ 0.5× tftpd-hpa's ({cpu_ratio:.2})"),
            cpu_ratio <= 0.5,
        ));
        if n == max {
            targets.push((
                format!("{n} phones: peak RSS ≤ 64 MB ({:.1})", bt.rss_mb),
                bt.rss_mb <= 64.0,
            ));
            targets.push((
                format!("{n} phones: threads ≤ 16 ({})", bt.threads),
                bt.threads <= 16,
            ));
        }
    }
    println!();
    for (n, g) in &goodput {
        println!("branchtftp goodput at {n}: {g:.0} boots/s");
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
