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
#[path = "support/proc.rs"]
mod proc;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

/// A config for `serve` with the cache in `state`, HTTP on `port`, no admin endpoint.
fn branchtftp_config(state: &Path, port: u16) -> std::path::PathBuf {
    let cfg = state.join(format!("bt-{port}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "log: warn\ntftp:\n  listen: [\"127.0.0.1:{}\"]\nhttp:\n  listen: [\"127.0.0.1:{port}\"]\nadmin:\n  listen: null\ncache:\n  dir: {}\n  overrides: {}\naccess:\n  allow: [\"127.0.0.0/8\"]\n",
            proc::free_udp_port(),
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
    let cfg = branchtftp_config(state, proc::free_tcp_port());
    proc::import_into_cache(root, &cfg);
}

fn branchtftp(state: &Path) -> Server {
    let port = proc::free_tcp_port();
    let child = proc::spawn_branchtftp(&branchtftp_config(state, port));
    ready(Server {
        name: "branchtftp",
        child,
        addr: ([127, 0, 0, 1], port).into(),
    })
}

fn nginx(root: &Path, state: &Path) -> Server {
    let port = proc::free_tcp_port();
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

/// One storm of `n` phones against `server`: how they booted and what the server spent.
fn run(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    n: usize,
) -> (phones::files::Summary, proc::Cost) {
    let (boots, cost) = proc::measure(server.child.id(), || {
        rt.block_on(phones::storm(server.addr, n, Duration::from_secs(1)))
    });
    (phones::files::Summary::of(&boots), cost)
}

fn main() {
    let nofile = phones::raise_nofile_limit();
    let ns = phones::files::storm_sizes();
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
            let (boots, cost) = (&r.0, &r.1);
            println!(
                "| {n} | {name} | {} | {:.1} | {} |",
                boots.cells(cost.wall, cost.cpu_ms_per(boots.booted)),
                cost.rss_mb,
                cost.threads,
            );
            if !boots.failures.is_empty() {
                eprintln!("{n} phones, {name}: gave up because {:?}", boots.failures);
            }
            rows.push((name, r));
            drop(server);
            std::thread::sleep(Duration::from_secs(1));
        }
        rows.sort_by_key(|(name, _)| *name != "branchtftp");
        let ((bt, bt_cost), (ng, ng_cost)) = (&rows[0].1, &rows[1].1);
        println!(
            "|  | ratio branchtftp/nginx | | | {:.2} | {:.2} | {:.2} | | {:.2} | {:.2} | |",
            bt.p50 / ng.p50,
            bt.p99 / ng.p99,
            bt_cost.wall / ng_cost.wall,
            bt_cost.cpu_ms_per(bt.booted) / ng_cost.cpu_ms_per(ng.booted),
            bt_cost.rss_mb / ng_cost.rss_mb,
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
