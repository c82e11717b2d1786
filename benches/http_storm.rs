//! HTTP boot storm (issue 12): N simulated phones over HTTP (benches/http_storm/phones.rs: the
//! boot sequence of benches/storm/phones.rs, one keep-alive connection per phone), all starting
//! within one second, against `branchtftp serve` (every file pre-seeded in the cache with
//! `branchtftp cache import`, so all hits; product defaults otherwise: `http.max_connections`
//! 4096, `access.max_transfers` 4096, one tokio worker per core) and nginx (2 workers,
//! sendfile, access log off) on the same files with the same generator. Per N a fresh server
//! of each, in alternating order. Prints per N and server: phones booted, p50/p99 boot time,
//! wall time, tries repeated, server CPU ms per boot, peak RSS and threads, and the ratios.
//!
//!   cargo bench --bench http_storm                 # N = 500, 1000, 2000, 5000
//!   STORM_PHONES=500,3000 cargo bench --bench http_storm
//!
//! Needs nginx (Debian: `apt-get install -y nginx-light`). The generator runs on the same two
//! cores as the servers: compare the ratios. Not a CI test (tests/http_storm.rs runs 400).

#[path = "http_storm/phones.rs"]
mod phones;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master stops its workers only when it is asked to.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn branchtftp_bin() -> &'static str {
    env!("CARGO_BIN_EXE_branchtftp")
}

/// A config for `serve` with the cache in `state`, HTTP on `port`, no admin endpoint.
fn branchtftp_config(state: &Path, port: u16) -> std::path::PathBuf {
    let cfg = state.join(format!("bt-{port}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "log: warn\ntftp:\n  listen: [\"127.0.0.1:{}\"]\nhttp:\n  listen: [\"127.0.0.1:{port}\"]\nadmin:\n  listen: null\ncache:\n  dir: {}\n  overrides: {}\naccess:\n  allow: [\"127.0.0.0/8\"]\n",
            free_udp_port(),
            state.join("cache").display(),
            state.join("overrides").display(),
        ),
    )
    .unwrap();
    cfg
}

/// Imports `root` into the cache under `state` once, as `branchtftp cache import` would on a
/// new box.
fn seed_cache(root: &Path, state: &Path) {
    std::fs::create_dir_all(state.join("overrides")).unwrap();
    let cfg = branchtftp_config(state, free_tcp_port());
    let out = Command::new(branchtftp_bin())
        .args(["cache", "import"])
        .arg(root)
        .arg("-c")
        .arg(&cfg)
        .env_remove("BRANCHTFTP_CONFIG")
        .output()
        .expect("run branchtftp cache import");
    assert!(out.status.success(), "cache import: {out:?}");
}

fn branchtftp(state: &Path) -> Server {
    let port = free_tcp_port();
    let child = Command::new(branchtftp_bin())
        .args(["serve", "-c"])
        .arg(branchtftp_config(state, port))
        .env_remove("BRANCHTFTP_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start branchtftp");
    ready(Server {
        name: "branchtftp",
        child,
        addr: ([127, 0, 0, 1], port).into(),
    })
}

fn nginx(root: &Path, state: &Path) -> Server {
    let port = free_tcp_port();
    let dir = state.join(format!("nginx-{port}"));
    std::fs::create_dir_all(dir.join("temp")).unwrap();
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 2;\nworker_rlimit_nofile 65536;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000;\n\
             default_type application/octet-stream;\n  client_body_temp_path {d}/temp/body;\n\
             proxy_temp_path {d}/temp/proxy;\n  fastcgi_temp_path {d}/temp/fastcgi;\n\
             uwsgi_temp_path {d}/temp/uwsgi;\n  scgi_temp_path {d}/temp/scgi;\n\
             server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {};\n  }}\n}}\n",
            root.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (apt-get install nginx-light)");
    ready(Server {
        name: "nginx",
        child,
        addr: ([127, 0, 0, 1], port).into(),
    })
}

/// Waits until the server answers a GET (a 404 for a missing name is an answer).
fn ready(s: Server) -> Server {
    use std::io::{Read, Write};
    for _ in 0..100 {
        if let Ok(mut c) = TcpStream::connect(s.addr) {
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let _ =
                c.write_all(b"GET /storm-probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = [0u8; 12];
            if c.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1") {
                return s;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} on {} did not answer", s.name, s.addr);
}

/// The server and its children (nginx's workers).
fn processes(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    all.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    all
}

/// utime + stime of one process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-15 of stat(5); `after` starts at field 3.
    let ticks: f64 = f.get(11..13).map(|s| s.iter().sum()).unwrap_or(0.0);
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

fn sum_over(pids: &[u32], f: impl Fn(u32) -> f64) -> f64 {
    pids.iter().map(|p| f(*p)).sum()
}

struct Row {
    booted: usize,
    gave_up: usize,
    p50: f64,
    p99: f64,
    wall: f64,
    resent: u32,
    cpu_per_boot_ms: f64,
    rss_mb: f64,
    threads: u64,
    failures: Vec<(String, usize)>,
}

fn run(rt: &tokio::runtime::Runtime, server: &Server, n: usize) -> Row {
    let pids = processes(server.child.id());
    let cpu0 = sum_over(&pids, cpu_seconds);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (s2, p2) = (sampling.clone(), pids.clone());
    let sampler = std::thread::spawn(move || {
        let mut threads = 0;
        while s2.load(std::sync::atomic::Ordering::Relaxed) {
            threads = threads.max(sum_over(&p2, |p| status_field(p, "Threads:") as f64) as u64);
            std::thread::sleep(Duration::from_millis(50));
        }
        threads
    });
    let t = Instant::now();
    let boots = rt.block_on(phones::storm(server.addr, n, Duration::from_secs(1)));
    let wall = t.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let threads = sampler.join().unwrap();
    let cpu = sum_over(&pids, cpu_seconds) - cpu0;
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
    let mut failures = std::collections::BTreeMap::new();
    for b in &boots {
        if let Some(f) = &b.failure {
            let why = f.split_once(": ").map_or(f.as_str(), |(_, w)| w);
            *failures.entry(why.to_string()).or_insert(0) += 1;
        }
    }
    let mut failures: Vec<_> = failures.into_iter().collect();
    failures.sort_by_key(|f| std::cmp::Reverse(f.1));
    let booted = times.len();
    Row {
        booted,
        gave_up: n - booted,
        p50: pct(0.5),
        p99: pct(0.99),
        wall,
        resent: boots.iter().map(|b| b.resent).sum(),
        cpu_per_boot_ms: cpu * 1000.0 / booted.max(1) as f64,
        rss_mb: sum_over(&pids, |p| status_field(p, "VmHWM:") as f64) / 1024.0,
        threads,
        failures,
    }
}

fn main() {
    let nofile = phones::raise_nofile_limit();
    let ns: Vec<usize> = std::env::var("STORM_PHONES")
        .unwrap_or_else(|_| "500,1000,2000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let max = *ns.iter().max().unwrap_or(&500);
    let root = tempfile::tempdir().unwrap();
    phones::write_files(root.path(), max);
    // nginx workers may run as `nobody`: let them read the files.
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(root.path())
        .status();
    let state = tempfile::Builder::new()
        .prefix("branchtftp-http-storm-")
        .tempdir()
        .unwrap();
    let _ = Command::new("chmod").arg("755").arg(state.path()).status();
    seed_cache(root.path(), state.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("HTTP boot storm, one keep-alive connection per phone; open-file limit {nofile}");
    println!("| phones | server | booted | gave up | p50 s | p99 s | wall s | tries repeated | CPU ms/boot | peak RSS MB | threads |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (round, &n) in ns.iter().enumerate() {
        let mut rows = Vec::new();
        let order: [&str; 2] = if round % 2 == 0 {
            ["branchtftp", "nginx"]
        } else {
            ["nginx", "branchtftp"]
        };
        for name in order {
            // A fresh server per N, so peak RSS is this N's.
            let server = match name {
                "branchtftp" => branchtftp(state.path()),
                _ => nginx(root.path(), state.path()),
            };
            let r = run(&rt, &server, n);
            println!(
                "| {n} | {name} | {} | {} | {:.3} | {:.3} | {:.2} | {} | {:.2} | {:.1} | {} |",
                r.booted,
                r.gave_up,
                r.p50,
                r.p99,
                r.wall,
                r.resent,
                r.cpu_per_boot_ms,
                r.rss_mb,
                r.threads,
            );
            if !r.failures.is_empty() {
                eprintln!("{n} phones, {name}: gave up because {:?}", r.failures);
            }
            rows.push((name, r));
            drop(server);
            std::thread::sleep(Duration::from_secs(1));
        }
        rows.sort_by_key(|(name, _)| *name != "branchtftp");
        let (bt, ng) = (&rows[0].1, &rows[1].1);
        println!(
            "|  | ratio branchtftp/nginx | | | {:.2} | {:.2} | {:.2} | | {:.2} | {:.2} | |",
            bt.p50 / ng.p50,
            bt.p99 / ng.p99,
            bt.wall / ng.wall,
            bt.cpu_per_boot_ms / ng.cpu_per_boot_ms,
            bt.rss_mb / ng.rss_mb,
        );
    }
    println!();
    println!(
        "load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
