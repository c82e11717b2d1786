//! The appliance as the admin-side tests need it: `branchtftp serve -c FILE` with TFTP, phone
//! HTTP and the admin endpoint on free ports, an HTTP origin upstream, a cache that survives a
//! restart, and the `branchtftp` commands run against it.
#![allow(dead_code)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A running `branchtftp serve`, killed on drop.
pub struct AdminBranch {
    pub tftp: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
}

/// What a test sets; the rest is loopback, free ports and a temporary directory.
#[derive(Clone, Default)]
pub struct Options {
    /// Upstream URL (an [`HttpOrigin`]).
    pub upstream: String,
    /// The admin endpoint's IP (default 127.0.0.1).
    pub admin_ip: Option<IpAddr>,
    /// Extra YAML appended to the config (whole top-level sections).
    pub extra: String,
    /// `admin.token_file`.
    pub token_file: Option<PathBuf>,
}

fn config_yaml(
    dir: &Path,
    tftp: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    o: &Options,
) -> String {
    let mut y = format!(
        "log: info\n\
         tftp:\n  listen: [\"{tftp}\"]\n  timeout: 1s\n  retries: 2\n\
         http:\n  listen: [\"{http}\"]\n\
         admin:\n  listen: \"{admin}\"\n",
    );
    if let Some(t) = &o.token_file {
        y.push_str(&format!("  token_file: {}\n", t.display()));
    }
    y.push_str(&format!(
        "cache:\n  dir: {}\n  overrides: {}\n\
         upstreams:\n  - url: {}\n    timeout: 2s\n\
         sync:\n  prefetch: []\n  config_list: false\n  discover: false\n\
         access:\n  allow: [\"127.0.0.0/8\"]\n",
        dir.join("cache").display(),
        dir.join("overrides").display(),
        o.upstream
    ));
    y.push_str(&o.extra);
    y
}

impl AdminBranch {
    pub fn start(o: &Options) -> AdminBranch {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-admin-")
            .tempdir()
            .unwrap();
        fs::create_dir_all(dir.path().join("overrides")).unwrap();
        let config = dir.path().join("branchtftp.yaml");
        let mut b = AdminBranch {
            tftp: localhost(0),
            http: localhost(0),
            admin: localhost(0),
            dir,
            config,
            child: None,
        };
        b.launch(o, true);
        b
    }

    /// Starts (again): with `fresh_ports`, picks new ports and rewrites the config.
    fn launch(&mut self, o: &Options, fresh_ports: bool) {
        let mut last = String::new();
        for attempt in 0..3 {
            if fresh_ports || attempt > 0 {
                self.tftp = localhost(free_udp_port());
                self.http = localhost(free_tcp_port());
                let ip = o.admin_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
                self.admin = SocketAddr::new(ip, free_tcp_port());
                fs::write(
                    &self.config,
                    config_yaml(self.dir.path(), self.tftp, self.http, self.admin, o),
                )
                .unwrap();
            }
            let log = fs::File::create(self.log_path()).unwrap();
            let child = Command::new(branchtftp_bin())
                .arg("serve")
                .arg("-c")
                .arg(&self.config)
                .env_remove("RUST_LOG")
                .env_remove("JOURNAL_STREAM")
                .env_remove("BRANCHTFTP_CONFIG")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start branchtftp serve");
            self.child = Some(child);
            if wait_tftp_ready(self.tftp, Duration::from_secs(15)) && self.admin_ready() {
                return;
            }
            self.kill();
            last = self.log();
        }
        panic!("the appliance did not start: {last}");
    }

    fn admin_ready(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.admin).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM, wait for the exit (it writes its state), start again on the same ports.
    pub fn restart(&mut self, o: &Options) {
        let status = self.stop();
        assert!(
            status.is_some_and(|s| s.success()),
            "stop: {status:?}\n{}",
            self.log()
        );
        self.launch(o, false);
    }

    /// SIGTERM and wait up to 15 s for the exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn http_url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.http)
    }

    /// `branchtftp ARGS` (a client command), with this box's config.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(branchtftp_bin())
            .args(args)
            .env("BRANCHTFTP_CONFIG", &self.config)
            .env_remove("RUST_LOG")
            .output()
            .expect("run branchtftp")
    }

    /// GET a path of the admin endpoint with curl from 127.0.0.1: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        curl(&["-s", &format!("{}{path}", self.admin_url())])
    }

    /// `/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// One sample's value in `/metrics` (`name{labels}` exactly as exported).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics");
        body.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for AdminBranch {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs curl with `-w '\n%{http_code}'`: (status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    curl_via(&[], args)
}

/// `curl` started through `prefix` (e.g. `ip netns exec NS`): the status code and the body.
pub fn curl_via(prefix: &[&str], args: &[&str]) -> (u16, String) {
    let mut argv = prefix.to_vec();
    argv.push("curl");
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    let out = cmd
        .args(["-m", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `check` every 100 ms until true or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
