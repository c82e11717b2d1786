//! The YAML configuration (shared/docs/interface.md): schema, embedded defaults and loading.
//! Unknown keys are errors; durations are humantime strings; sizes accept `20GiB`, `500MB`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod check;
mod flags;
mod positions;
mod validate;

pub use check::check_config;
pub use flags::{ConfigSource, FlagsError, ServeFlags, ServeSetup};
use positions::{LineCol, Positions};

/// Where the packaged config lives; used when neither `-c` nor `$BRANCHTFTP_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/branchtftp/branchtftp.yaml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub log: LogLevel,
    pub tftp: TftpConfig,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub sync: SyncConfig,
    pub access: AccessConfig,
    pub phones: PhonesConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TftpConfig {
    pub listen: Vec<SocketAddr>,
    /// Cap on the negotiated blksize (RFC 2348); 1468 keeps a DATA packet under a 1500-byte MTU.
    pub max_blksize: u16,
    /// Cap on the negotiated windowsize (RFC 7440).
    pub max_windowsize: u16,
    /// Retransmit timeout when the client negotiates none.
    #[serde(with = "duration_serde")]
    pub timeout: Duration,
    /// Cap on a negotiated timeout (RFC 2349 lets a client ask up to 255 s); larger requests
    /// are answered with the cap in the OACK.
    #[serde(with = "duration_serde")]
    pub max_timeout: Duration,
    /// Retransmissions of one packet before the transfer is abandoned.
    pub retries: u32,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            listen: vec!["0.0.0.0:69".parse().unwrap(), "[::]:69".parse().unwrap()],
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(5),
            retries: 6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
    /// A request's headers must arrive within this (also the admin endpoint).
    #[serde(with = "duration_serde")]
    pub header_timeout: Duration,
    /// Keep-alive connections idle longer are closed.
    #[serde(with = "duration_serde")]
    pub idle_timeout: Duration,
    /// A client that reads nothing of a response for this long is cut off.
    #[serde(with = "duration_serde")]
    pub send_timeout: Duration,
    /// Open connections, all HTTP listeners together; beyond it new connections wait in the
    /// kernel's backlog.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: vec!["0.0.0.0:6970".parse().unwrap()],
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token that state-changing admin requests from anywhere but
    /// loopback must carry; readable by the service user only.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:9069".parse().unwrap()),
            token_file: None,
        }
    }
}

/// The per-phone boot view (`branchtftp phones`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhonesConfig {
    /// Phones not seen for this long are forgotten.
    #[serde(with = "duration_serde")]
    pub forget_after: Duration,
    /// A phone silent this long has ended its boot; its next trust-list or config request
    /// starts a new one.
    #[serde(with = "duration_serde")]
    pub quiet_gap: Duration,
}

impl Default for PhonesConfig {
    fn default() -> Self {
        PhonesConfig {
            forget_after: Duration::from_secs(30 * 24 * 3600),
            quiet_gap: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes; written in YAML as `20GiB`, `500MB` or a plain number.
    #[serde(with = "size_serde")]
    pub max_size: u64,
    pub overrides: PathBuf,
    /// Rules that class files before the built-in ones (first match wins).
    pub classes: Vec<crate::cache::ClassRule>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/lib/branchtftp"),
            max_size: 20 * 1024 * 1024 * 1024,
            overrides: PathBuf::from("/etc/branchtftp/overrides"),
            classes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://HOST:PORT` or `tftp://HOST[:PORT]`.
    pub url: String,
    /// How long one request may wait for the upstream's first answer; a request that waits
    /// longer marks the upstream down.
    #[serde(default = "default_upstream_timeout", with = "duration_serde")]
    pub timeout: Duration,
    /// While the upstream is down, one probe this often (growing slowly to at most 60s while
    /// probes keep failing); the first success marks it up.
    #[serde(default = "default_probe_interval", with = "duration_serde")]
    pub probe_interval: Duration,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    pub intervals: Intervals,
    pub prefetch: Vec<String>,
    pub discover: bool,
    pub config_list: bool,
    pub configs: ConfigsMode,
    #[serde(with = "duration_serde")]
    pub negative_ttl: Duration,
    pub remove_after: u32,
    /// Background sync bandwidth cap in bits per second (`4Mbit/s` in YAML); 0 means none.
    #[serde(with = "rate_serde")]
    pub max_rate: u64,
    /// Daily local-time windows per class; outside them the class waits (misses never do).
    pub windows: SyncWindows,
    /// Planned loads (`.loads` names, extension optional) staged and pinned before any config
    /// names them.
    pub loads: Vec<String>,
    /// A `.loads` listing more images than this is refused (real loads list about a dozen).
    pub max_load_images: usize,
    /// Pinned firmware may take at most this share of `cache.max_size` (percent, `50%`).
    #[serde(with = "percent_serde")]
    pub max_pinned: u8,
}

/// `sync.windows`: per class, `always` or a list of daily windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncWindows {
    pub config: ClassWindows,
    pub defaults: ClassWindows,
    pub locale: ClassWindows,
    pub firmware: ClassWindows,
    pub other: ClassWindows,
}

/// `always`, one window (`"22:00-06:00"`) or a list of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClassWindows {
    #[default]
    Always,
    Windows(Vec<WindowSpec>),
}

/// One window as written: `"22:00-06:00"` or `{at: "22:00-06:00", max_rate: 0}`. Checked by
/// validation (`sync::windows`), so a bad one is reported at its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    pub at: String,
    /// Bits per second inside this window; `None`: `sync.max_rate`.
    pub max_rate: Option<u64>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            intervals: Intervals::default(),
            prefetch: vec!["XMLDefault.cnf.xml".to_string()],
            discover: true,
            config_list: true,
            configs: ConfigsMode::Seen,
            negative_ttl: Duration::from_secs(30),
            remove_after: 3,
            max_rate: 0,
            windows: SyncWindows::default(),
            loads: Vec::new(),
            max_load_images: 256,
            max_pinned: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Intervals {
    #[serde(with = "duration_serde")]
    pub config: Duration,
    #[serde(with = "duration_serde")]
    pub defaults: Duration,
    #[serde(with = "duration_serde")]
    pub locale: Duration,
    #[serde(with = "duration_serde")]
    pub firmware: Duration,
    #[serde(with = "duration_serde")]
    pub other: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals {
            config: Duration::from_secs(5 * 60),
            defaults: Duration::from_secs(10 * 60),
            locale: Duration::from_secs(24 * 3600),
            firmware: Duration::from_secs(24 * 3600),
            other: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConfigsMode {
    #[default]
    Seen,
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(with = "nets_serde")]
    pub allow: Vec<IpNet>,
    pub max_transfers: usize,
    pub max_per_client: usize,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            allow: [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "127.0.0.0/8",
                "::1/128",
                "fc00::/7",
            ]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
            max_transfers: 4096,
            max_per_client: 16,
        }
    }
}

impl AccessConfig {
    /// Whether a client address may be served; IPv4-mapped IPv6 addresses are checked as IPv4.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log: LogLevel::Info,
            tftp: TftpConfig::default(),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            cache: CacheConfig::default(),
            upstreams: Vec::new(),
            sync: SyncConfig::default(),
            access: AccessConfig::default(),
            phones: PhonesConfig::default(),
        }
    }
}

/// A configuration problem, rendered as `FILE:LINE:COL: key: problem`.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}: {problem}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        problem: String,
    },
    /// Several semantic problems at once, one `Invalid` per line, in document order.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// The individual problems (one for `Io` and `Invalid`).
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().collect(),
            one => vec![one],
        }
    }
}

impl Config {
    /// Parses and validates a YAML document; `path` only names the source in errors. A document
    /// of comments only is the embedded defaults.
    pub fn from_yaml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let positions = Positions::scan(text);
        let invalid =
            |(line, column): LineCol, key: String, problem: String| ConfigError::Invalid {
                path: path.to_string(),
                line,
                column,
                key,
                problem,
            };
        let cfg: Config = if !is_blank_document(text) {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let at = inner
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or_else(|| positions.nearest(&key));
                let key = if key == "." || key.contains('?') {
                    // A syntax error is found before serde walks anything: name the key it is in.
                    positions
                        .path_before(at)
                        .map(str::to_string)
                        .unwrap_or_else(|| "(document)".to_string())
                } else {
                    key
                };
                let (key, problem) = serde_problem(&inner, &key);
                invalid(at, key, problem)
            })?
        } else {
            Config::default()
        };
        let present = |key: &str| positions.get(key).is_some();
        let mut problems: Vec<ConfigError> = validate::problems(&cfg, &present)
            .into_iter()
            .map(|p| invalid(positions.nearest(&p.key), p.key, p.problem))
            .collect();
        problems.sort_by_key(|e| match e {
            ConfigError::Invalid { line, column, .. } => (*line, *column),
            _ => (0, 0),
        });
        match problems.len() {
            0 => Ok(cfg),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }

    /// Reads, parses and validates a file. Pure apart from the read: call it again to reload.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// [`Config::locate`] then [`Config::load`]: the configuration to run with and the file it
    /// came from (`None`: embedded defaults).
    pub fn resolve(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        match Config::locate(explicit) {
            Some(path) => Ok((Config::load(&path)?, Some(path))),
            None => Ok((Config::default(), None)),
        }
    }

    /// The lookup order of interface.md: `-c FILE`, `$BRANCHTFTP_CONFIG`, the packaged file if it
    /// exists, else embedded defaults (`None` path).
    pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("BRANCHTFTP_CONFIG").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let default = Path::new(DEFAULT_PATH);
        default.exists().then(|| default.to_path_buf())
    }

    /// The configuration as YAML with every default filled in, sizes and durations written the
    /// way a person would (`20GiB`, `24h`). Parsing it gives back an equal `Config`.
    pub fn effective_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes")
    }

    /// Keys whose change only takes effect on restart (sockets are bound and the cache opened
    /// once); a reload that changes them should say so.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.tftp.listen != new.tftp.listen {
            keys.push("tftp.listen");
        }
        if self.http.listen != new.http.listen {
            keys.push("http.listen");
        }
        if self.admin.listen != new.admin.listen {
            keys.push("admin.listen");
        }
        if self.cache.dir != new.cache.dir {
            keys.push("cache.dir");
        }
        if self.admin.token_file != new.admin.token_file {
            keys.push("admin.token_file");
        }
        if self.phones != new.phones {
            keys.push("phones");
        }
        keys
    }
}

/// Whether a document holds nothing but comments, blank lines and document markers.
fn is_blank_document(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// serde_norway's message without the position and path it adds (we print both ourselves),
/// with a hint where the bare message leaves a user guessing; and the key, made more precise for
/// a missing field.
fn serde_problem(err: &serde_yaml::Error, key: &str) -> (String, String) {
    let mut msg = err.to_string();
    // "did not find expected key at line 3 column 5, while parsing a block mapping".
    if let Some(i) = msg.find(" at line ") {
        let tail = i + " at line ".len();
        let end = msg[tail..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == ' '))
            .map_or(msg.len(), |e| tail + e);
        msg.replace_range(i..end, "");
    }
    // serde_norway prefixes the path of the mapping it was in: drop it, the key says it better.
    if let Some((head, rest)) = msg.split_once(": ") {
        let ancestor = key == head
            || key.starts_with(&format!("{head}."))
            || key.starts_with(&format!("{head}["));
        if ancestor {
            msg = rest.to_string();
        }
    }
    let mut key = key.to_string();
    if let Some(field) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f.to_string())
    {
        key = format!("{key}.{field}");
        msg = "missing: this setting has no default, write it".to_string();
    }
    for (ty, range) in [
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("usize", "a whole number, 0 or more"),
    ] {
        msg = msg.replace(&format!("expected {ty}"), &format!("expected {range}"));
    }
    if msg.contains("socket address") {
        msg.push_str(" (write IP:PORT, e.g. 0.0.0.0:69 or [::]:69; host names are not allowed)");
    }
    if msg.starts_with("did not find expected key") {
        msg.push_str(" (check the indentation of this line)");
    }
    (key, msg)
}

/// The scheme of an upstream: CUCM's HTTP file service (TCP 6970) or plain TFTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamScheme {
    Http,
    Tftp,
}

/// An upstream URL taken apart: `http://HOST:PORT` or `tftp://HOST[:PORT]` (port 69 by default).
/// The host is lower-cased; an IPv6 host keeps no brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    pub host: String,
    pub port: u16,
}

impl UpstreamUrl {
    /// Parses and checks an upstream URL; the error is advice for the config file.
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
            (UpstreamScheme::Http, r)
        } else if let Some(r) = url.strip_prefix("tftp://") {
            (UpstreamScheme::Tftp, r)
        } else if url.starts_with("https://") {
            return Err(format!(
                "`{url}`: https is not supported; use http://HOST:6970 (CUCM's plain HTTP file service)"
            ));
        } else {
            return Err(format!(
                "`{url}` is not an upstream URL; write http://HOST:PORT or tftp://HOST[:PORT]"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
            return Err(format!(
                "`{url}`: give only scheme, host and port; file names are appended per request"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((ip, after)) = v6.split_once(']') else {
                return Err(format!("`{url}`: unclosed `[` around an IPv6 address"));
            };
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("`{url}`: `{ip}` is not an IPv6 address"));
            }
            match after {
                "" => (ip, None),
                p if p.starts_with(':') => (ip, Some(&p[1..])),
                _ => return Err(format!("`{url}`: expected `:PORT` after `]`")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let is_name = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        if host.is_empty() {
            return Err(format!("`{url}`: no host"));
        }
        if !authority.starts_with('[') && !is_name(host) {
            return Err(format!(
                "`{url}`: `{host}` is not a host name or IP address"
            ));
        }
        let port = match (port, scheme) {
            (Some(p), _) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("`{url}`: `{p}` is not a port (1-65535)")),
            },
            (None, UpstreamScheme::Tftp) => 69,
            (None, UpstreamScheme::Http) => {
                return Err(format!(
                    "`{url}`: write the port; CUCM serves phone files over HTTP on 6970, e.g. http://{host}:6970"
                ))
            }
        };
        Ok(UpstreamUrl {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `host:port`, with brackets around an IPv6 host: what a socket address or URL needs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            UpstreamScheme::Http => "http",
            UpstreamScheme::Tftp => "tftp",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl UpstreamConfig {
    /// An upstream with the default timeout and probe interval.
    pub fn new(url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            timeout: default_upstream_timeout(),
            probe_interval: default_probe_interval(),
        }
    }

    /// The parsed URL; `Config::load` has already refused a URL that does not parse.
    pub fn parsed_url(&self) -> Result<UpstreamUrl, String> {
        UpstreamUrl::parse(&self.url)
    }
}

/// Parses sizes such as `20GiB`, `500MB`, `1024` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 20GiB or 500MB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000u64.pow(4),
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ))
        }
    };
    Ok((num * mult as f64) as u64)
}

/// Parses rates such as `4Mbit/s`, `500kbit/s`, `1MB/s` into bits per second; `0` means none.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate such as 4Mbit/s"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let mult: f64 = match unit {
        "" | "bit" | "bps" => 1.0,
        "kbit" | "Kbit" => 1e3,
        "Mbit" | "mbit" => 1e6,
        "Gbit" | "gbit" => 1e9,
        "B" => 8.0,
        "kB" | "KB" => 8e3,
        "MB" => 8e6,
        "GB" => 8e9,
        other => {
            return Err(format!(
                "unknown rate unit `{other}` (use kbit/s, Mbit/s, Gbit/s, KB/s, MB/s)"
            ))
        }
    };
    Ok((num * mult) as u64)
}

/// Writes a byte count in the largest unit that states it exactly: `20GiB`, `500MB`, `1234B`.
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0".to_string();
    }
    const UNITS: [(u64, &str); 8] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ];
    for (unit, name) in UNITS {
        if n % unit == 0 {
            return format!("{}{name}", n / unit);
        }
    }
    format!("{n}B")
}

/// Writes bits per second in the largest unit that states it exactly: `4Mbit/s`; 0 stays `0`.
pub fn format_rate(bps: u64) -> String {
    if bps == 0 {
        return "0".to_string();
    }
    for (unit, name) in [
        (1_000_000_000, "Gbit/s"),
        (1_000_000, "Mbit/s"),
        (1_000, "kbit/s"),
    ] {
        if bps % unit == 0 {
            return format!("{}{name}", bps / unit);
        }
    }
    format!("{bps}bit/s")
}

/// Writes a duration in the largest single unit that states it exactly (`24h`, `5m`, `500ms`),
/// falling back to humantime's compound form (`1m 30s`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 == 0 {
        for (unit, name) in [(3_600_000, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")] {
            if ms % unit == 0 {
                return format!("{}{name}", ms / unit);
            }
        }
    }
    humantime::format_duration(d).to_string()
}

mod duration_serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 500ms, 10s, 15m or 24h")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format!(
                        "`{v}` is not a duration ({e}); write e.g. 500ms, 10s, 15m or 24h"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "`{v}` has no unit; write e.g. {v}s or {v}ms"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format!("`{v}` is not a duration such as 10s")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `sync.max_pinned`: a share of the cache written `50%` (or a plain number of percent).
mod percent_serde {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u8, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v}%"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        let v = super::unit_number::deserialize(d, "a share such as 50%", |s| {
            s.trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("`{s}` is not a share; write e.g. 50%"))
        })?;
        // Out of range values are reported by validation, at their line.
        Ok(v.min(u8::MAX as u64) as u8)
    }
}

/// `sync.windows.CLASS`: `always`, one window string, or a list of strings and
/// `{at, max_rate}` maps.
mod windows_serde {
    use std::fmt;

    use serde::de::{self, MapAccess, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{ClassWindows, WindowSpec};

    impl Serialize for ClassWindows {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                ClassWindows::Always => s.serialize_str("always"),
                ClassWindows::Windows(list) => {
                    let mut seq = s.serialize_seq(Some(list.len()))?;
                    for w in list {
                        seq.serialize_element(w)?;
                    }
                    seq.end()
                }
            }
        }
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WithRate {
        at: String,
        /// `UNSET` when the map gives none: `sync.max_rate` applies.
        #[serde(default = "unset", with = "super::rate_serde")]
        max_rate: u64,
    }

    const UNSET: u64 = u64::MAX;

    fn unset() -> u64 {
        UNSET
    }

    impl Serialize for WindowSpec {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self.max_rate {
                None => s.serialize_str(&self.at),
                Some(max_rate) => WithRate {
                    at: self.at.clone(),
                    max_rate,
                }
                .serialize(s),
            }
        }
    }

    impl<'de> Deserialize<'de> for WindowSpec {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WindowSpec, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = WindowSpec;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str(
                        "a window such as \"22:00-06:00\" or {at: \"22:00-06:00\", max_rate: 0}",
                    )
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<WindowSpec, E> {
                    Ok(WindowSpec {
                        at: v.to_string(),
                        max_rate: None,
                    })
                }
                fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<WindowSpec, A::Error> {
                    let w = WithRate::deserialize(de::value::MapAccessDeserializer::new(m))?;
                    Ok(WindowSpec {
                        at: w.at,
                        max_rate: (w.max_rate != UNSET).then_some(w.max_rate),
                    })
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for ClassWindows {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ClassWindows, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ClassWindows;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("`always` or a list of daily windows such as [\"22:00-06:00\"]")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<ClassWindows, E> {
                    if v.trim().eq_ignore_ascii_case("always") {
                        Ok(ClassWindows::Always)
                    } else {
                        Ok(ClassWindows::Windows(vec![WindowSpec {
                            at: v.to_string(),
                            max_rate: None,
                        }]))
                    }
                }
                fn visit_seq<A: SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<ClassWindows, A::Error> {
                    let mut list = Vec::new();
                    while let Some(w) = seq.next_element::<WindowSpec>()? {
                        list.push(w);
                    }
                    Ok(ClassWindows::Windows(list))
                }
            }
            d.deserialize_any(V)
        }
    }
}

/// Sizes and rates share one shape: a plain number, or a string with a unit.
mod unit_number {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
        what: &'static str,
        parse: fn(&str) -> Result<u64, String>,
    ) -> Result<u64, D::Error> {
        struct V {
            what: &'static str,
            parse: fn(&str) -> Result<u64, String>,
        }
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(self.what)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                (self.parse)(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V { what, parse })
    }
}

mod size_serde {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_size(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        super::unit_number::deserialize(d, "a size such as 20GiB or 500MB", super::parse_size)
    }
}

mod rate_serde {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        if *v == 0 {
            s.serialize_u64(0)
        } else {
            s.serialize_str(&super::format_rate(*v))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        super::unit_number::deserialize(d, "a rate such as 4Mbit/s, or 0", super::parse_rate)
    }
}

/// `access.allow` entries: a CIDR network, or a bare address meaning that one host.
mod nets_serde {
    use std::fmt;
    use std::net::IpAddr;

    use ipnet::IpNet;
    use serde::de::{self, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    struct Net(IpNet);

    impl<'de> Deserialize<'de> for Net {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Net, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Net;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a network such as 10.0.0.0/8 or an address such as 10.1.2.3")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Net, E> {
                    let v = v.trim();
                    if let Ok(net) = v.parse::<IpNet>() {
                        return Ok(Net(net));
                    }
                    v.parse::<IpAddr>().map(|ip| Net(IpNet::from(ip))).map_err(|_| {
                        E::custom(format!(
                            "`{v}` is not a network such as 10.0.0.0/8 or an address such as 10.1.2.3"
                        ))
                    })
                }
            }
            d.deserialize_str(V)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Ok(Vec::<Net>::deserialize(d)?
            .into_iter()
            .map(|n| n.0)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one error `text` gives, as printed.
    fn error_of(text: &str) -> String {
        match Config::from_yaml(text, "branchtftp.yaml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn embedded_defaults_are_valid_and_match_interface_md() {
        let cfg = Config::from_yaml("# nothing but a comment\n", "x.yaml").unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.tftp.max_blksize, 1468);
        assert_eq!(cfg.cache.max_size, 20 << 30);
        assert_eq!(cfg.sync.intervals.locale, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn interface_md_example_parses() {
        let text = r#"
log: info
tftp:
  listen: ["0.0.0.0:69", "[::]:69"]
  max_blksize: 1468
  max_windowsize: 64
  timeout: 1s
  retries: 6
http:
  listen: ["0.0.0.0:6970"]
admin:
  listen: "127.0.0.1:9069"
cache:
  dir: /var/lib/branchtftp
  max_size: 20GiB
  overrides: /etc/branchtftp/overrides
upstreams:
  - url: http://cucm-tftp.example.com:6970
    timeout: 10s
  - url: tftp://cucm-tftp.example.com:69
  - url: tftp://10.20.0.5
sync:
  intervals:
    config: 5m
    defaults: 10m
    locale: 24h
    firmware: 24h
    other: 1h
  prefetch: [XMLDefault.cnf.xml]
  discover: true
  config_list: true
  configs: seen
  negative_ttl: 30s
  remove_after: 3
  max_rate: 4Mbit/s
access:
  allow: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128", "fc00::/7"]
  max_transfers: 4096
  max_per_client: 16
"#;
        let cfg = Config::from_yaml(text, "x.yaml").unwrap();
        assert_eq!(cfg.upstreams.len(), 3);
        assert_eq!(cfg.sync.max_rate, 4_000_000);
        let tftp = cfg.upstreams[2].parsed_url().unwrap();
        assert_eq!(tftp.authority(), "10.20.0.5:69");
    }

    #[test]
    fn effective_yaml_is_readable_and_parses_back_to_the_same_config() {
        let mut cfg = Config::default();
        cfg.sync.max_rate = 4_000_000;
        cfg.tftp.timeout = Duration::from_millis(1500);
        cfg.upstreams.push(UpstreamConfig::new("http://cucm:6970"));
        let yaml = cfg.effective_yaml();
        for needle in [
            "max_size: 20GiB",
            "locale: 24h",
            "config: 5m",
            "timeout: 1500ms",
            "max_rate: 4Mbit/s",
        ] {
            assert!(yaml.contains(needle), "{needle} missing from\n{yaml}");
        }
        assert_eq!(Config::from_yaml(&yaml, "effective").unwrap(), cfg);
    }

    #[test]
    fn rollout_windows_and_planned_loads_parse_and_round_trip() {
        let cfg = Config::from_yaml(
            "sync:\n  max_rate: 2Mbit/s\n  windows:\n    config: always\n    locale: \"01:00-05:00\"\n    firmware:\n      - {at: \"22:00-06:00\", max_rate: 0}\n      - \"12:00-13:00\"\n  loads: [sip8845_65.14-3-1-0001-13]\n  max_pinned: 40%\n",
            "b.yaml",
        )
        .unwrap();
        let w = &cfg.sync.windows;
        assert_eq!(w.config, ClassWindows::Always);
        assert_eq!(
            w.locale,
            ClassWindows::Windows(vec![WindowSpec {
                at: "01:00-05:00".into(),
                max_rate: None
            }])
        );
        assert_eq!(
            w.firmware,
            ClassWindows::Windows(vec![
                WindowSpec {
                    at: "22:00-06:00".into(),
                    max_rate: Some(0)
                },
                WindowSpec {
                    at: "12:00-13:00".into(),
                    max_rate: None
                }
            ])
        );
        assert_eq!(cfg.sync.loads, ["sip8845_65.14-3-1-0001-13"]);
        assert_eq!(cfg.sync.max_pinned, 40);
        let yaml = cfg.effective_yaml();
        assert!(yaml.contains("max_pinned: 40%"), "{yaml}");
        assert_eq!(Config::from_yaml(&yaml, "effective").unwrap(), cfg);
    }

    #[test]
    fn overlapping_or_malformed_windows_point_at_the_item() {
        assert_eq!(
            error_of("sync:\n  windows:\n    firmware: [\"22:00-06:00\", \"05:00-07:00\"]\n"),
            "branchtftp.yaml:3:31: sync.windows.firmware[1]: `05:00-07:00` overlaps `22:00-06:00` \
             (item 0); merge them into one window"
        );
        assert_eq!(
            error_of("sync:\n  windows:\n    firmware:\n      - at: \"22:00-06:00\"\n        max_rate: 0\n      - at: \"25:00-01:00\"\n"),
            "branchtftp.yaml:6:9: sync.windows.firmware[1]: `25:00-01:00`: `25:00` is not a time of \
             day: write a daily window as HH:MM-HH:MM in local time, e.g. 22:00-06:00"
        );
        assert_eq!(
            error_of("sync:\n  windows:\n    locale: \"night\"\n"),
            "branchtftp.yaml:3:5: sync.windows.locale: `night` is not a window: write a daily window \
             as HH:MM-HH:MM in local time, e.g. 22:00-06:00"
        );
        assert!(
            error_of("sync:\n  windows:\n    firmware: {at: \"22:00-06:00\", rate: 1}\n")
                .starts_with("branchtftp.yaml:3:")
        );
        assert!(error_of("sync:\n  windows:\n    weekly: always\n")
            .contains("sync.windows.weekly: unknown field `weekly`"));
        assert_eq!(
            error_of("sync:\n  loads: [\"../x\"]\n  max_pinned: 150%\n"),
            "branchtftp.yaml:2:11: sync.loads[0]: `../x`: a load is one file name, without a directory\n\
             branchtftp.yaml:3:3: sync.max_pinned: 150% is outside 1%..=100% of cache.max_size; 50% \
             leaves room for everything else"
        );
    }

    #[test]
    fn bare_addresses_in_access_allow_mean_one_host() {
        let cfg = Config::from_yaml("access:\n  allow: [10.1.2.3, \"::1\"]\n", "x").unwrap();
        assert!(cfg.access.allows("10.1.2.3".parse().unwrap()));
        assert!(!cfg.access.allows("10.1.2.4".parse().unwrap()));
    }

    // --- errors found by serde, with serde's position and our key path ---

    #[test]
    fn unknown_key_names_its_full_path() {
        assert_eq!(
            error_of("tftp:\n  max_blksiz: 1468\n"),
            "branchtftp.yaml:2:3: tftp.max_blksiz: unknown field `max_blksiz`, expected one of \
             `listen`, `max_blksize`, `max_windowsize`, `timeout`, `max_timeout`, `retries`"
        );
        assert_eq!(
            error_of("upstreams:\n  - url: http://a:6970\n  - url: tftp://b\n    tmeout: 1s\n"),
            "branchtftp.yaml:4:5: upstreams[1].tmeout: unknown field `tmeout`, expected one of `url`, `timeout`, `probe_interval`"
        );
        assert!(error_of("bogus: 1\n").starts_with("branchtftp.yaml:1:1: bogus: unknown field"));
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        assert_eq!(
            error_of("tftp:\n  max_blksize: big\n"),
            "branchtftp.yaml:2:16: tftp.max_blksize: invalid type: string \"big\", expected a whole \
             number from 0 to 65535"
        );
        assert_eq!(
            error_of("log: verbose\n"),
            "branchtftp.yaml:1:6: log: unknown variant `verbose`, expected one of `error`, `warn`, \
             `info`, `debug`, `trace`"
        );
    }

    #[test]
    fn durations_sizes_and_rates_explain_their_format() {
        assert_eq!(
            error_of("sync:\n  intervals:\n    config: 5\n"),
            "branchtftp.yaml:3:13: sync.intervals.config: `5` has no unit; write e.g. 5s or 5ms"
        );
        assert_eq!(
            error_of("cache:\n  max_size: 20QB\n"),
            "branchtftp.yaml:2:13: cache.max_size: unknown size unit `qb` (use B, KB, KiB, MB, MiB, \
             GB, GiB, TB, TiB)"
        );
        assert!(error_of("sync:\n  max_rate: fast\n")
            .starts_with("branchtftp.yaml:2:13: sync.max_rate: `fast` is not a rate"));
    }

    #[test]
    fn bad_listen_address_asks_for_ip_and_port() {
        assert_eq!(
            error_of("tftp:\n  listen: [\"localhost:69\"]\n"),
            "branchtftp.yaml:2:12: tftp.listen[0]: invalid socket address syntax (write IP:PORT, \
             e.g. 0.0.0.0:69 or [::]:69; host names are not allowed)"
        );
    }

    #[test]
    fn bad_network_in_access_allow_is_placed_at_the_item() {
        assert_eq!(
            error_of("access:\n  allow: [10.0.0.0/8, 10.1.2.3, nope]\n"),
            "branchtftp.yaml:2:33: access.allow[2]: `nope` is not a network such as 10.0.0.0/8 or \
             an address such as 10.1.2.3"
        );
    }

    #[test]
    fn missing_upstream_url_names_the_missing_key() {
        assert_eq!(
            error_of("upstreams:\n  - timeout: 5s\n"),
            "branchtftp.yaml:2:5: upstreams[0].url: missing: this setting has no default, write it"
        );
    }

    #[test]
    fn syntax_error_names_the_key_before_it() {
        assert_eq!(
            error_of("tftp:\n  retries: 3\n timeout: 1s\n"),
            "branchtftp.yaml:3:2: tftp.retries: did not find expected key, while parsing a block \
             mapping (check the indentation of this line)"
        );
    }

    // --- semantic errors, placed by the position scanner ---

    #[test]
    fn max_blksize_outside_rfc_2348_range() {
        assert_eq!(
            error_of("log: info\ntftp:\n  max_blksize: 7\n"),
            "branchtftp.yaml:3:3: tftp.max_blksize: 7 is outside 8..=65464 (RFC 2348); 1468 keeps a \
             packet under a 1500-byte MTU"
        );
        assert!(error_of("tftp:\n  max_blksize: 65465\n")
            .starts_with("branchtftp.yaml:2:3: tftp.max_blksize: 65465 is outside"));
        assert!(Config::from_yaml("tftp:\n  max_blksize: 65464\n", "x").is_ok());
    }

    #[test]
    fn max_windowsize_zero() {
        assert!(error_of("tftp:\n  max_windowsize: 0\n")
            .starts_with("branchtftp.yaml:2:3: tftp.max_windowsize: 0 is outside 1..=65535"));
    }

    #[test]
    fn timeout_outside_rfc_2349_range_and_zero_retries_reported_together() {
        assert_eq!(
            error_of("tftp:\n  retries: 0\n  timeout: 256s\n"),
            "branchtftp.yaml:2:3: tftp.retries: must be at least 1: with 0 a single lost packet ends \
             a transfer\nbranchtftp.yaml:3:3: tftp.timeout: 256s is outside 1s..=255s (RFC 2349)"
        );
        assert!(error_of("tftp:\n  timeout: 500ms\n")
            .starts_with("branchtftp.yaml:2:3: tftp.timeout: 500ms is outside"));
    }

    #[test]
    fn upstream_url_must_be_http_with_port_or_tftp() {
        let doc = |url: &str| format!("upstreams:\n  - url: http://a:6970\n  - url: {url}\n");
        assert_eq!(
            error_of(&doc("ftp://b")),
            "branchtftp.yaml:3:5: upstreams[1].url: `ftp://b` is not an upstream URL; write \
             http://HOST:PORT or tftp://HOST[:PORT]"
        );
        assert_eq!(
            error_of(&doc("http://cucm")),
            "branchtftp.yaml:3:5: upstreams[1].url: `http://cucm`: write the port; CUCM serves \
             phone files over HTTP on 6970, e.g. http://cucm:6970"
        );
        for bad in [
            "tftp://",
            "tftp://a:0",
            "tftp://a:70000",
            "tftp://a/dir",
            "tftp://us er",
            "tftp://[::1",
            "tftp://[zz]:69",
            "https://a:6971",
            "http://user@a:6970",
        ] {
            assert!(
                error_of(&doc(bad)).starts_with("branchtftp.yaml:3:5: upstreams[1].url: "),
                "{bad}"
            );
        }
        for good in [
            "tftp://b",
            "tftp://10.20.0.5:1069",
            "tftp://[fd00::5]",
            "http://r:6970/",
        ] {
            assert!(Config::from_yaml(&doc(good), "x").is_ok(), "{good}");
        }
    }

    #[test]
    fn repeated_upstream_is_an_error() {
        assert_eq!(
            error_of("upstreams:\n  - url: tftp://A\n  - url: tftp://a:69\n"),
            "branchtftp.yaml:3:5: upstreams[1].url: tftp://a:69 repeats upstreams[0]: each \
             upstream is tried once per miss"
        );
    }

    #[test]
    fn zero_interval() {
        assert_eq!(
            error_of("sync:\n  intervals:\n    config: 0s\n"),
            "branchtftp.yaml:3:5: sync.intervals.config: must be more than 0s: the interval between \
             two revalidations"
        );
    }

    #[test]
    fn duplicate_listen_addresses_udp_and_tcp() {
        assert_eq!(
            error_of("tftp:\n  listen: [\"0.0.0.0:69\", \"0.0.0.0:69\"]\n"),
            "branchtftp.yaml:2:26: tftp.listen[1]: 0.0.0.0:69 collides with tftp.listen[0] \
             (0.0.0.0:69): one UDP port can be bound once per address"
        );
        assert_eq!(
            error_of("http:\n  listen: [\"0.0.0.0:9069\"]\nadmin:\n  listen: 127.0.0.1:9069\n"),
            "branchtftp.yaml:4:3: admin.listen: 127.0.0.1:9069 collides with http.listen[0] \
             (0.0.0.0:9069): one TCP port can be bound once per address"
        );
        // IPv4 and IPv6 wildcards side by side are the default, and port 0 is always fresh.
        let ok =
            "tftp:\n  listen: [\"0.0.0.0:69\", \"[::]:69\", \"127.0.0.1:0\", \"127.0.0.1:0\"]\n";
        assert!(Config::from_yaml(ok, "x").is_ok());
    }

    #[test]
    fn per_client_limit_above_total_blames_the_key_written() {
        assert_eq!(
            error_of("access:\n  max_transfers: 8\n"),
            "branchtftp.yaml:2:3: access.max_transfers: max_per_client (16) is more than \
             max_transfers (8): one client could never reach it"
        );
        assert!(
            error_of("access:\n  max_transfers: 8\n  max_per_client: 9\n")
                .starts_with("branchtftp.yaml:3:3: access.max_per_client: ")
        );
    }

    #[test]
    fn cache_dir_empty_and_overrides_inside_cache() {
        assert_eq!(
            error_of("cache:\n  dir: \"\"\n"),
            "branchtftp.yaml:2:3: cache.dir: empty: name the directory the cache lives in, e.g. \
             /var/lib/branchtftp"
        );
        assert!(error_of("cache:\n  dir: /x\n  overrides: /x\n")
            .starts_with("branchtftp.yaml:3:3: cache.overrides: is the cache directory itself"));
        assert!(error_of("cache:\n  max_size: 0\n")
            .starts_with("branchtftp.yaml:2:3: cache.max_size: 0 leaves no room"));
    }

    #[test]
    fn nothing_to_listen_on_and_nobody_allowed() {
        assert!(error_of("tftp:\n  listen: []\nhttp:\n  listen: []\n")
            .starts_with("branchtftp.yaml:2:3: tftp.listen: empty, and so is http.listen"));
        assert!(error_of("access:\n  allow: []\n")
            .starts_with("branchtftp.yaml:2:3: access.allow: empty: no client could be served"));
    }

    #[test]
    fn escaping_prefetch_name() {
        assert_eq!(
            error_of("sync:\n  prefetch: [XMLDefault.cnf.xml, ../etc/passwd]\n"),
            "branchtftp.yaml:2:34: sync.prefetch[1]: `../etc/passwd`: file name escapes the served \
             directory"
        );
    }

    #[test]
    fn load_names_the_file_and_can_be_called_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.yaml");
        std::fs::write(&path, "tftp:\n  retries: 2\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().tftp.retries, 2);
        std::fs::write(&path, "tftp:\n  retries: 0\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:2:3: tftp.retries:", path.display())),
            "{err}"
        );
        std::fs::write(&path, "tftp:\n  retries: 9\n").unwrap();
        let (cfg, from) = Config::resolve(Some(&path)).unwrap();
        assert_eq!((cfg.tftp.retries, from), (9, Some(path.clone())));
        let missing = dir.path().join("absent.yaml");
        assert!(matches!(
            Config::load(&missing),
            Err(ConfigError::Io { .. })
        ));
    }

    #[test]
    fn restart_needed_lists_socket_and_cache_keys() {
        let old = Config::default();
        let mut new = old.clone();
        new.sync.intervals.config = Duration::from_secs(60);
        assert!(old.restart_needed(&new).is_empty());
        new.tftp.listen = vec!["127.0.0.1:1069".parse().unwrap()];
        assert_eq!(old.restart_needed(&new), vec!["tftp.listen"]);
    }

    #[test]
    fn check_config_prints_effective_config_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, "cache:\n  max_size: 500MB\n").unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(check::check_config_to(Some(&good), &mut out, &mut err), 0);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("max_size: 500MB"), "{out}");
        assert!(err.is_empty());

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "tftp:\n  retries: 0\n").unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(check::check_config_to(Some(&bad), &mut out, &mut err), 2);
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.starts_with(&format!("{}:2:3: tftp.retries: ", bad.display())),
            "{err}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn sizes_rates_and_durations_format_exactly() {
        assert_eq!(format_size(20 << 30), "20GiB");
        assert_eq!(format_size(500_000_000), "500MB");
        assert_eq!(format_size(1234), "1234B");
        assert_eq!(parse_size(&format_size(1234)).unwrap(), 1234);
        assert_eq!(format_rate(4_000_000), "4Mbit/s");
        assert_eq!(format_rate(1500), "1500bit/s");
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms 500us");
    }
}
