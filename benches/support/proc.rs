//! What the benchmarks read about a server process while it works, shared by the storm,
//! HTTP storm and hostile-client benchmarks (each includes it with `#[path]`): free loopback
//! ports to give a server, CPU seconds (from a cgroup of its own, so that forked children
//! count), and peak threads and peak RSS from /proc.

#![allow(dead_code)] // each benchmark reads what it reports

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pid` and its children alive now (nginx's workers; tftpd-hpa forks one per request later).
pub fn processes(pid: u32) -> Vec<u32> {
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

/// utime + stime + the reaped children's, in seconds (`self` for this process).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-17 of stat(5); `after` starts at field 3.
    let ticks = f.get(11..15).map(|s| s.iter().sum()).unwrap_or(0.0);
    ticks / 100.0
}

/// A numeric field of /proc/PID/status ("Threads:", "VmHWM:" in KiB).
pub fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The threads of `pid` by name, with counts ("tokio-rt-worker ×4, sled-io- ×7, …").
pub fn thread_names(pid: u32) -> String {
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

/// What a server process cost while `work` ran.
pub struct Cost {
    pub wall: f64,
    /// Server CPU seconds (all its processes).
    pub cpu: f64,
    /// This process's CPU seconds: the generator shares the cores with the server.
    pub generator_cpu: f64,
    /// Peak threads over all its processes, sampled every 50 ms, and their names at the peak.
    pub threads: u64,
    pub thread_names: String,
    pub rss_mb: f64,
}

/// Runs `work`, measuring the server `pid` (and its children) meanwhile.
pub fn measure<T>(pid: u32, work: impl FnOnce() -> T) -> (T, Cost) {
    let pids = processes(pid);
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| cpu_seconds(&p.to_string()))
            .sum::<f64>()
    };
    // tftpd-hpa ignores SIGCHLD, so the kernel reaps its per-request children and their CPU
    // time never reaches its `cutime`: /proc shows only the listener's forks, not the
    // transfers. A cgroup counts every process forked after `pid` joined it.
    let group = CpuGroup::join(&pids);
    let cpu = |pids: &[u32]| match &group {
        Some(g) => g.seconds(),
        None => cpu(pids),
    };
    if group.is_none() {
        eprintln!(
            "warning: no writable cgroup (run as root): server CPU from /proc, which misses \
             the time of children a server reaps by ignoring SIGCHLD (tftpd-hpa's transfers)"
        );
    }
    let cpu0 = cpu(&pids);
    let sampling = Arc::new(AtomicBool::new(true));
    let (s2, p2) = (sampling.clone(), pids.clone());
    let sampler = std::thread::spawn(move || {
        let (mut threads, mut names) = (0, String::new());
        while s2.load(Ordering::Relaxed) {
            let now: u64 = p2.iter().map(|p| status_field(*p, "Threads:")).sum();
            if now > threads {
                (threads, names) = (now, thread_names(pid));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (threads, names)
    });
    let gen0 = cpu_seconds("self");
    let t = Instant::now();
    let out = work();
    let wall = t.elapsed().as_secs_f64();
    let generator_cpu = cpu_seconds("self") - gen0;
    sampling.store(false, Ordering::Relaxed);
    let (threads, thread_names) = sampler.join().unwrap();
    let cost = Cost {
        wall,
        cpu: cpu(&pids) - cpu0,
        generator_cpu,
        threads,
        thread_names,
        rss_mb: pids
            .iter()
            .map(|p| status_field(*p, "VmHWM:") as f64)
            .sum::<f64>()
            / 1024.0,
    };
    (out, cost)
}

impl Cost {
    /// Server CPU milliseconds per phone booted.
    pub fn cpu_ms_per(&self, booted: usize) -> f64 {
        self.cpu * 1000.0 / booted.max(1) as f64
    }

    /// The generator's CPU milliseconds per phone booted.
    pub fn generator_ms_per(&self, booted: usize) -> f64 {
        self.generator_cpu * 1000.0 / booted.max(1) as f64
    }
}

/// The branchtftp binary to measure: this build's, or `BENCH_BRANCHTFTP` (another build's,
/// to compare two versions of the server with the same generator, one run after the other).
pub fn branchtftp_binary() -> std::ffi::OsString {
    std::env::var_os("BENCH_BRANCHTFTP").unwrap_or_else(|| env!("CARGO_BIN_EXE_branchtftp").into())
}

/// `branchtftp serve -c CONFIG`, quiet, ignoring the caller's BRANCHTFTP_CONFIG.
pub fn spawn_branchtftp(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(branchtftp_binary())
        .args(["serve", "-c"])
        .arg(config)
        .env_remove("BRANCHTFTP_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start branchtftp")
}

/// tftpd-hpa serving `root` on a free loopback port, in the foreground; the child and port.
pub fn spawn_tftpd_hpa(root: &std::path::Path) -> (std::process::Child, u16) {
    let port = free_udp_port();
    let child = std::process::Command::new("in.tftpd")
        .args(["-L", "-a", &format!("127.0.0.1:{port}"), "-s"])
        .arg(root)
        .args(["-u", "nobody"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start in.tftpd (apt-get install tftpd-hpa)");
    (child, port)
}

/// `branchtftp cache import FILES -c CONFIG`: every file a cache hit, as on a seeded box.
pub fn import_into_cache(files: &std::path::Path, config: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(["cache", "import"])
        .arg(files)
        .arg("-c")
        .arg(config)
        .env_remove("BRANCHTFTP_CONFIG")
        .output()
        .expect("run branchtftp cache import");
    assert!(out.status.success(), "cache import: {out:?}");
}

/// A cgroup of a server's processes and whatever they fork, for CPU time the kernel charges to
/// every task in it, exited ones included. Cgroup v2 (`cpu.stat`), else v1 `cpuacct`; `None`
/// when neither can be written (not root). The processes go back to the root group on drop.
pub struct CpuGroup {
    dir: std::path::PathBuf,
    /// The hierarchy's root group, where the processes go back (a bench server starts there).
    parent: std::path::PathBuf,
    v2: bool,
}

impl CpuGroup {
    /// Moves `pids` (a server and the children it has already forked: nginx's workers) into a
    /// new group; what they fork later is born in it.
    pub fn join(pids: &[u32]) -> Option<CpuGroup> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let mut candidates = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                [_, at, "cgroup2", ..] => candidates.push((std::path::PathBuf::from(at), true)),
                [_, at, "cgroup", opts, ..] if opts.split(',').any(|o| o == "cpuacct") => {
                    candidates.push((std::path::PathBuf::from(at), false))
                }
                _ => {}
            }
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        for (root, v2) in candidates {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = root.join(format!("branchtftp-bench-{}-{n}", std::process::id()));
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let g = CpuGroup {
                dir,
                parent: root,
                v2,
            };
            let joined = pids
                .iter()
                .all(|p| std::fs::write(g.dir.join("cgroup.procs"), p.to_string()).is_ok());
            if joined && g.usage().is_some() {
                return Some(g);
            }
            // Dropping `g` removes the directory again.
        }
        None
    }

    fn usage(&self) -> Option<f64> {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
            let usec: f64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(usec / 1e6)
        } else {
            let ns: f64 = std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(ns / 1e9)
        }
    }

    /// CPU seconds of every process in the group since it was made.
    pub fn seconds(&self) -> f64 {
        self.usage().unwrap_or(0.0)
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.split_whitespace() {
            let _ = std::fs::write(self.parent.join("cgroup.procs"), p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
