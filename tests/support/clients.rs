//! The real TFTP (and HTTP) clients, run as child processes with a hard time limit.
//!
//! Each wrapper returns a [`ClientRun`] instead of judging the outcome: some clients exit 0 on
//! failure (tftp-hpa on "file not found"), so the test decides from exit status, output and file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::sha256_file;

/// A client run is killed after this long, whatever its own timeouts say.
pub const CLIENT_HARD_LIMIT: Duration = Duration::from_secs(180);

/// What a real client did.
#[derive(Debug)]
pub struct ClientRun {
    /// The command line, for assertion messages.
    pub command: String,
    /// `None` when the hard limit killed it.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Where the client was told to write the file.
    pub output: PathBuf,
    pub elapsed: Duration,
}

impl ClientRun {
    /// Exit code 0 (not proof of success for tftp-hpa: check [`ClientRun::reported_error`]).
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// stdout and stderr together (clients disagree on where errors go).
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Whether the client printed a TFTP error (tftp-hpa: "Error code N: ...").
    pub fn reported_error(&self) -> bool {
        let t = self.text().to_lowercase();
        t.contains("error code") || t.contains("server error") || t.contains("error received")
    }

    /// The sha256 of the downloaded file, `None` if it was not written.
    pub fn output_sha256(&self) -> Option<String> {
        self.output.is_file().then(|| sha256_file(&self.output))
    }

    /// Panics unless the client exited 0, reported no error and wrote a file with this sha256.
    pub fn assert_intact(&self, sha256: &str) {
        assert!(
            self.success() && !self.reported_error(),
            "client failed: {self}"
        );
        assert_eq!(
            self.output_sha256().as_deref(),
            Some(sha256),
            "content differs: {self}"
        );
    }
}

impl fmt::Display for ClientRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => format!("killed after {CLIENT_HARD_LIMIT:?}"),
        };
        write!(
            f,
            "`{}` -> {status} in {:?}; stdout: {:?}; stderr: {:?}",
            self.command,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs a client to completion (or the hard limit) with stdin closed.
pub async fn run_client(program: &str, args: &[String], output: &Path) -> ClientRun {
    let command = format!("{program} {}", args.join(" "));
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` ({e}); tests/run.sh installs the real clients")
        });
    let (status, stdout, stderr) =
        match tokio::time::timeout(CLIENT_HARD_LIMIT, child.wait_with_output()).await {
            Ok(Ok(out)) => (
                Some(out.status),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Ok(Err(e)) => panic!("waiting for `{command}`: {e}"),
            Err(_) => (None, String::new(), String::new()),
        };
    ClientRun {
        command,
        status,
        stdout,
        stderr,
        output: output.to_path_buf(),
        elapsed: started.elapsed(),
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// `tftp://127.0.0.1:69/name` or `tftp://[::1]:69/name`.
pub fn tftp_url(addr: SocketAddr, name: &str) -> String {
    format!("tftp://{addr}/{name}")
}

/// curl 7.88's exit code for a 0-byte file: it rejects the `tsize 0` a server honestly answers
/// in its OACK ("invalid tsize -:0:- value in OACK packet"), from tftpd-hpa too.
pub const CURL_EXIT_TSIZE_ZERO: i32 = 71;

/// curl 7.88 over TFTP. It always asks `tsize 0`; `--path-as-is` keeps `..` in the name (curl
/// would otherwise normalize it away); `-m 60` because curl can hang when a server dies.
pub async fn curl_tftp_get(
    addr: SocketAddr,
    name: &str,
    out: &Path,
    blksize: Option<u16>,
) -> ClientRun {
    let mut args = vec![s("-s"), s("-S"), s("--path-as-is"), s("-m"), s("60")];
    if let Some(b) = blksize {
        args.extend([s("--tftp-blksize"), s(b)]);
    }
    args.extend([s("-o"), path_arg(out), tftp_url(addr, name)]);
    run_client("curl", &args, out).await
}

/// Transfer mode for tftp-hpa.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TftpMode {
    Binary,
    Ascii,
}

impl TftpMode {
    fn arg(self) -> &'static str {
        match self {
            TftpMode::Binary => "binary",
            TftpMode::Ascii => "ascii",
        }
    }
}

/// tftp-hpa: plain RFC 1350, no options. Exits 0 even on "file not found": check
/// [`ClientRun::reported_error`] and the content.
pub async fn tftp_hpa_get(addr: SocketAddr, name: &str, out: &Path, mode: TftpMode) -> ClientRun {
    let args = vec![
        addr.ip().to_string(),
        s(addr.port()),
        s("-m"),
        s(mode.arg()),
        s("-c"),
        s("get"),
        s(name),
        path_arg(out),
    ];
    run_client("tftp", &args, out).await
}

/// tftp-hpa `put` (a WRQ). Exits 0 even when the server refuses: check
/// [`ClientRun::reported_error`] / [`ClientRun::text`].
pub async fn tftp_hpa_put(
    addr: SocketAddr,
    local: &Path,
    remote_name: &str,
    mode: TftpMode,
) -> ClientRun {
    let args = vec![
        addr.ip().to_string(),
        s(addr.port()),
        s("-m"),
        s(mode.arg()),
        s("-c"),
        s("put"),
        path_arg(local),
        s(remote_name),
    ];
    run_client("tftp", &args, local).await
}

/// atftp 0.8, the only client here that speaks windowsize. Exits 255 on error (leaving an empty
/// file). `timeout` is the RFC 2349 option in seconds.
pub async fn atftp_get(
    addr: SocketAddr,
    name: &str,
    out: &Path,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    tsize: bool,
    timeout: Option<u8>,
) -> ClientRun {
    let mut args = vec![s("-g"), s("-r"), s(name), s("-l"), path_arg(out)];
    if let Some(b) = blksize {
        args.extend([s("--option"), format!("blksize {b}")]);
    }
    if tsize {
        args.extend([s("--option"), s("tsize")]);
    }
    if let Some(t) = timeout {
        args.extend([s("--option"), format!("timeout {t}")]);
    }
    if let Some(w) = windowsize {
        args.extend([s("--option"), format!("windowsize {w}")]);
    }
    args.extend([addr.ip().to_string(), s(addr.port())]);
    run_client("atftp", &args, out).await
}

/// busybox 1.35 `tftp -g`. Always asks `tsize 0`; `-b` asks blksize. Exits 1 on error.
pub async fn busybox_tftp_get(
    addr: SocketAddr,
    name: &str,
    out: &Path,
    blksize: Option<u16>,
) -> ClientRun {
    let mut args = vec![s("tftp"), s("-g"), s("-r"), s(name), s("-l"), path_arg(out)];
    if let Some(b) = blksize {
        args.extend([s("-b"), s(b)]);
    }
    args.extend([addr.ip().to_string(), s(addr.port())]);
    run_client("busybox", &args, out).await
}

/// curl over HTTP (`-s -m 60`, extra headers such as `If-None-Match: "x"`). stdout holds the HTTP
/// status code (`-w %{http_code}`): see [`ClientRun::http_status`]. Exit 18 = body shorter than
/// Content-Length, 7 = connection refused, 28 = timed out.
pub async fn curl_http_get(url: &str, out: &Path, headers: &[&str]) -> ClientRun {
    curl_http(url, out, headers, &[]).await
}

/// curl over HTTP with extra curl arguments (e.g. `-I` for HEAD, `-m 5`).
pub async fn curl_http(url: &str, out: &Path, headers: &[&str], extra: &[&str]) -> ClientRun {
    let mut args = vec![s("-s"), s("-S"), s("-w"), s("%{http_code}")];
    if !extra.contains(&"-m") {
        args.extend([s("-m"), s("60")]);
    }
    args.extend(extra.iter().map(s));
    for h in headers {
        args.extend([s("-H"), s(h)]);
    }
    args.extend([s("-o"), path_arg(out), s(url)]);
    run_client("curl", &args, out).await
}

impl ClientRun {
    /// The HTTP status curl printed (`curl_http*` only); 0 when there was no response.
    pub fn http_status(&self) -> u16 {
        self.stdout.trim().parse().unwrap_or(0)
    }
}
