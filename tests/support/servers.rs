//! Real TFTP servers (tftpd-hpa, atftpd) and `branchtftp serve`, as child processes on free
//! loopback ports, killed on drop.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_udp_port, make_world_readable, skip_or_fail};

/// How long a server gets to start answering (generous: the machines are shared and slow).
pub const SERVER_START_LIMIT: Duration = Duration::from_secs(15);

/// Sends a RRQ for a file that does not exist and waits for any reply (normally ERROR 1).
/// True once the server answers; false after `limit`.
pub fn wait_tftp_ready(addr: SocketAddr, limit: Duration) -> bool {
    let bind: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let sock = UdpSocket::bind(bind).expect("bind probe socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut rrq = vec![0u8, 1];
    rrq.extend_from_slice(b"branchtftp-probe-no-such-file\0octet\0");
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        let _ = sock.send_to(&rrq, addr);
        let wait_until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < wait_until {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n >= 2 {
                    return true;
                }
            }
        }
    }
    false
}

/// A child server process, killed and reaped on drop.
struct ServerProcess {
    child: Child,
    log: PathBuf,
    what: String,
}

impl ServerProcess {
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

fn log_file(tag: &str) -> (PathBuf, fs::File) {
    let f = tempfile::Builder::new()
        .prefix(&format!("branchtftp-{tag}-"))
        .suffix(".log")
        .tempfile()
        .expect("create a log file");
    let (file, path) = f.keep().expect("keep log file");
    (path, file)
}

/// Starts `make(port)` on fresh ports until a server answers a probe at `ip:port`.
fn start_tftp_server(
    tag: &str,
    ip: IpAddr,
    make: impl FnMut(u16) -> Command,
) -> (SocketAddr, ServerProcess) {
    start_tftp_server_on(tag, &[ip], make)
}

/// Starts `make(port)` on fresh ports until a server answers a probe at every `ip:port`;
/// returns the address on the first ip.
fn start_tftp_server_on(
    tag: &str,
    ips: &[IpAddr],
    mut make: impl FnMut(u16) -> Command,
) -> (SocketAddr, ServerProcess) {
    let mut last_log = String::new();
    for _attempt in 0..3 {
        let port = free_udp_port();
        let addr = SocketAddr::new(ips[0], port);
        let (log, file) = log_file(tag);
        let mut cmd = make(port);
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}; tests/run.sh installs it"));
        let mut proc = ServerProcess { child, log, what };
        if ips
            .iter()
            .all(|ip| wait_tftp_ready(SocketAddr::new(*ip, port), SERVER_START_LIMIT))
        {
            return (addr, proc);
        }
        let exited = proc.exited();
        last_log = format!("{} (exited: {exited}) log: {}", proc.what, proc.log_text());
    }
    panic!("{tag} did not answer on a loopback port: {last_log}");
}

/// tftpd-hpa 5.2 (`in.tftpd -L`) serving `root` read-only on a free loopback port.
pub struct TftpdHpa {
    pub addr: SocketAddr,
    process: ServerProcess,
}

impl TftpdHpa {
    /// On 127.0.0.1. Makes `root` world-readable first (the server runs as `nobody`).
    pub fn start(root: &Path) -> Self {
        Self::start_on(root, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// On a given loopback address, e.g. `::1`.
    pub fn start_on(root: &Path, ip: IpAddr) -> Self {
        Self::start_with(root, ip, &[])
    }

    /// With extra `in.tftpd` arguments, e.g. `["-r", "blksize"]` to refuse an option.
    pub fn start_with(root: &Path, ip: IpAddr, extra: &[&str]) -> Self {
        make_world_readable(root);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let bin = std::env::var("TFTPD_HPA").unwrap_or_else(|_| "in.tftpd".into());
        let root = root.to_path_buf();
        let (addr, process) = start_tftp_server("tftpd-hpa", ip, |port| {
            let mut c = Command::new(&bin);
            c.arg("-L")
                .arg("-a")
                .arg(SocketAddr::new(ip, port).to_string())
                .arg("-s")
                .arg(&root)
                .args(["-u", "nobody"])
                .args(&extra);
            c
        });
        TftpdHpa { addr, process }
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// The listener's process id (each request is served by a child it forks).
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }
}

/// atftpd 0.8 (unpacked by tests/run.sh, path in `$ATFTPD`): the packaged server that speaks
/// windowsize.
pub struct Atftpd {
    pub addr: SocketAddr,
    process: ServerProcess,
}

impl Atftpd {
    /// `None` (with a SKIPPED message) when `$ATFTPD` is unset or missing; panics instead when
    /// `BRANCHTFTP_REQUIRE_PEERS` is set.
    pub fn start(root: &Path) -> Option<Self> {
        Self::start_on(root, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    pub fn start_on(root: &Path, ip: IpAddr) -> Option<Self> {
        let bin = match std::env::var_os("ATFTPD") {
            Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
            _ => {
                skip_or_fail("atftpd not available ($ATFTPD unset or not a file)");
                return None;
            }
        };
        make_world_readable(root);
        let root = root.to_path_buf();
        let (addr, process) = start_tftp_server("atftpd", ip, |port| {
            let mut c = Command::new(&bin);
            c.args(["--daemon", "--no-fork", "--logfile", "-"])
                .args(["--port", &port.to_string()])
                .args(["--bind-address", &ip.to_string()])
                .args(["--user", "nobody", "--group", "nogroup"])
                .arg(&root);
            c
        });
        Some(Atftpd { addr, process })
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }
}

/// `branchtftp serve` (the binary under test) as a child process on a free loopback port, with
/// its own config file, cache directory and admin port, so tests run side by side. SIGKILLed on
/// drop; [`Branchtftp::stop`] asks it to stop with SIGTERM instead.
pub struct Branchtftp {
    /// The TFTP address on the first listen ip.
    pub addr: SocketAddr,
    /// Every TFTP listen address.
    pub addrs: Vec<SocketAddr>,
    /// Holds the config file and the cache directory.
    pub dir: tempfile::TempDir,
    process: ServerProcess,
}

/// The binary Cargo built for the integration tests.
pub fn branchtftp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_branchtftp"))
}

impl Branchtftp {
    /// `branchtftp serve --root ROOT --listen 127.0.0.1:PORT`.
    pub fn serve(root: &Path) -> Self {
        Self::serve_on(root, &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
    }

    /// One `--listen ip:PORT` per ip, on the same free port (e.g. `127.0.0.1` and `::1`).
    pub fn serve_on(root: &Path, ips: &[IpAddr]) -> Self {
        Self::serve_with(root, ips, None, &[])
    }

    /// `serve` on 127.0.0.1 with the given config file (YAML) and no extra arguments.
    pub fn serve_config(root: &Path, config_yaml: &str) -> Self {
        Self::serve_with(
            root,
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Some(config_yaml),
            &[],
        )
    }

    /// As [`Branchtftp::serve_on`], with a config file of your own (YAML; default: an isolated
    /// one with the cache in a temporary directory, the phone HTTP front end off and the admin
    /// endpoint on a free port) and extra arguments after `serve`.
    pub fn serve_with(
        root: &Path,
        ips: &[IpAddr],
        config_yaml: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-serve-")
            .tempdir()
            .expect("create a temporary directory");
        let config = dir.path().join("branchtftp.yaml");
        let yaml = match config_yaml {
            Some(y) => y.to_string(),
            None => format!(
                "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"127.0.0.1:{}\"\n",
                dir.path().join("cache").display(),
                super::free_tcp_port()
            ),
        };
        fs::write(&config, yaml).unwrap();
        let bin = branchtftp_bin();
        let root = root.to_path_buf();
        let (addr, process) = start_tftp_server_on("branchtftp", ips, |port| {
            let mut c = Command::new(&bin);
            c.arg("serve")
                .arg("-c")
                .arg(&config)
                .arg("--root")
                .arg(&root);
            for ip in ips {
                c.arg("--listen")
                    .arg(SocketAddr::new(*ip, port).to_string());
            }
            c.args(extra).env_remove("BRANCHTFTP_CONFIG");
            c
        });
        let addrs = ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, addr.port()))
            .collect();
        Branchtftp {
            addr,
            addrs,
            dir,
            process,
        }
    }

    /// The server's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit; `None` if it did not exit.
    pub fn stop(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.process.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}
