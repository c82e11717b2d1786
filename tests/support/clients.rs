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

    /// Whether the client exited 0, reported no error and wrote a file with this sha256.
    pub fn is_intact(&self, sha256: &str) -> bool {
        self.success() && !self.reported_error() && self.output_sha256().as_deref() == Some(sha256)
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

/// A real client with the options it will ask for, so a test can run a matrix of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RealClient {
    /// curl, `--tftp-blksize` when given (always asks tsize).
    Curl { blksize: Option<u16> },
    /// tftp-hpa in binary mode (no options).
    TftpHpa,
    /// atftp with the given options.
    Atftp {
        blksize: Option<u16>,
        windowsize: Option<u16>,
        tsize: bool,
    },
    /// busybox tftp, `-b` when given (always asks tsize).
    Busybox { blksize: Option<u16> },
}

impl RealClient {
    /// Downloads `name` to `out`.
    pub async fn get(self, addr: SocketAddr, name: &str, out: &Path) -> ClientRun {
        match self {
            RealClient::Curl { blksize } => curl_tftp_get(addr, name, out, blksize).await,
            RealClient::TftpHpa => tftp_hpa_get(addr, name, out, TftpMode::Binary).await,
            RealClient::Atftp {
                blksize,
                windowsize,
                tsize,
            } => atftp_get(addr, name, out, blksize, windowsize, tsize, None).await,
            RealClient::Busybox { blksize } => busybox_tftp_get(addr, name, out, blksize).await,
        }
    }

    /// The block size the transfer will use if the server grants what is asked.
    pub fn blksize(self) -> u16 {
        match self {
            RealClient::Curl { blksize }
            | RealClient::Atftp { blksize, .. }
            | RealClient::Busybox { blksize } => blksize.unwrap_or(512),
            RealClient::TftpHpa => 512,
        }
    }

    /// A short label for file names and messages, e.g. `atftp-b1428-w16-t`.
    pub fn label(self) -> String {
        let b = |b: Option<u16>| b.map_or(String::new(), |b| format!("-b{b}"));
        match self {
            RealClient::Curl { blksize } => format!("curl{}", b(blksize)),
            RealClient::TftpHpa => "tftp-hpa".into(),
            RealClient::Atftp {
                blksize,
                windowsize,
                tsize,
            } => format!(
                "atftp{}{}{}",
                b(blksize),
                windowsize.map_or(String::new(), |w| format!("-w{w}")),
                if tsize { "-t" } else { "" }
            ),
            RealClient::Busybox { blksize } => format!("busybox{}", b(blksize)),
        }
    }
}

/// What a server answered to [`raw_tftp_get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawOutcome {
    /// The whole file (as sent on the wire: netascii is not decoded).
    Data(Vec<u8>),
    /// An ERROR packet.
    Error { code: u16, message: String },
    /// Nothing (or nothing more) within the time limit.
    Timeout,
}

/// The result of [`raw_tftp_get`].
#[derive(Clone, Debug)]
pub struct RawRun {
    pub outcome: RawOutcome,
    /// When the first reply (DATA, OACK or ERROR) arrived after the request.
    pub first_reply: Option<Duration>,
    /// The OACK's options, if the server sent one.
    pub oack: Option<Vec<(String, String)>>,
}

fn parse_error(p: &[u8]) -> RawOutcome {
    let code = u16::from_be_bytes([p[2], p[3]]);
    let end = p[4..]
        .iter()
        .position(|b| *b == 0)
        .map_or(p.len(), |i| 4 + i);
    RawOutcome::Error {
        code,
        message: String::from_utf8_lossy(&p[4..end]).into_owned(),
    }
}

/// A minimal lock-step TFTP client on a raw socket, for checks the real clients cannot make:
/// the exact ERROR code, the time to the first reply, the bytes on the wire in netascii mode.
/// `name` is sent as given (any bytes); `options` go into the RRQ (RFC 2347). Waits up to 2 s
/// per packet and does not retransmit.
pub async fn raw_tftp_get(
    addr: SocketAddr,
    name: &[u8],
    mode: &str,
    options: &[(&str, &str)],
) -> RawRun {
    let bind: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.unwrap();
    let mut rrq = vec![0u8, 1];
    rrq.extend_from_slice(name);
    rrq.push(0);
    rrq.extend_from_slice(mode.as_bytes());
    rrq.push(0);
    for (k, v) in options {
        rrq.extend_from_slice(k.as_bytes());
        rrq.push(0);
        rrq.extend_from_slice(v.as_bytes());
        rrq.push(0);
    }
    let started = Instant::now();
    sock.send_to(&rrq, addr).await.unwrap();
    let mut run = RawRun {
        outcome: RawOutcome::Timeout,
        first_reply: None,
        oack: None,
    };
    let mut blksize = 512usize;
    let mut expected: u16 = 1;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 65536 + 4];
    loop {
        let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
        else {
            return run;
        };
        run.first_reply.get_or_insert(started.elapsed());
        let p = &buf[..n];
        if n < 4 {
            continue;
        }
        match u16::from_be_bytes([p[0], p[1]]) {
            5 => {
                run.outcome = parse_error(p);
                return run;
            }
            6 => {
                let fields: Vec<String> = p[2..]
                    .split(|b| *b == 0)
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect();
                let opts: Vec<(String, String)> = fields
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (c[0].to_lowercase(), c[1].clone()))
                    .collect();
                if let Some((_, v)) = opts.iter().find(|(k, _)| k == "blksize") {
                    blksize = v.parse().unwrap_or(512);
                }
                run.oack = Some(opts);
                sock.send_to(&[0, 4, 0, 0], from).await.unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([p[2], p[3]]);
                if block == expected {
                    data.extend_from_slice(&p[4..]);
                    expected = expected.wrapping_add(1);
                }
                let mut ack = vec![0u8, 4];
                ack.extend_from_slice(&block.to_be_bytes());
                sock.send_to(&ack, from).await.unwrap();
                if block == expected.wrapping_sub(1) && p.len() - 4 < blksize {
                    run.outcome = RawOutcome::Data(data);
                    return run;
                }
            }
            _ => {}
        }
    }
}

/// Sends one datagram to a TFTP server and returns the first reply (and who sent it), if any
/// arrives within `wait`. For requests no real client makes (a WRQ built by hand, garbage).
pub async fn raw_tftp_exchange(
    addr: SocketAddr,
    packet: &[u8],
    wait: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.unwrap();
    sock.send_to(packet, addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// The ERROR code and message of a raw reply, if it is an ERROR packet.
pub fn tftp_error_of(packet: &[u8]) -> Option<(u16, String)> {
    if packet.len() >= 4 && packet[..2] == [0, 5] {
        match parse_error(packet) {
            RawOutcome::Error { code, message } => Some((code, message)),
            _ => None,
        }
    } else {
        None
    }
}
