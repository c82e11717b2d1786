//! The YAML configuration (shared/docs/interface.md): schema, embedded defaults and loading.
//! Unknown keys are errors; durations are humantime strings; sizes accept `20GiB`, `500MB`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
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
            retries: 6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: vec!["0.0.0.0:6970".parse().unwrap()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:9069".parse().unwrap()),
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
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    pub intervals: Intervals,
    pub prefetch: Vec<String>,
    pub discover: bool,
    pub config_list: bool,
    pub configs: ConfigsMode,
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    pub remove_after: u32,
    /// Background sync bandwidth cap in bits per second (`4Mbit/s` in YAML); 0 means none.
    #[serde(with = "rate_serde")]
    pub max_rate: u64,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Intervals {
    #[serde(with = "humantime_serde")]
    pub config: Duration,
    #[serde(with = "humantime_serde")]
    pub defaults: Duration,
    #[serde(with = "humantime_serde")]
    pub locale: Duration,
    #[serde(with = "humantime_serde")]
    pub firmware: Duration,
    #[serde(with = "humantime_serde")]
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
}

impl Config {
    /// Parses a YAML document; `path` only names the source in errors.
    pub fn from_yaml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_string(),
                line,
                column,
                key: String::from("(document)"),
                problem: e.to_string(),
            }
        })?;
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// The lookup order of interface.md: `-c FILE`, `$BRANCHTFTP_CONFIG`, the packaged file if it
    /// exists, else embedded defaults (`None` path).
    pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("BRANCHTFTP_CONFIG") {
            return Some(PathBuf::from(p));
        }
        let default = Path::new(DEFAULT_PATH);
        default.exists().then(|| default.to_path_buf())
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

mod size_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_size(&s).map_err(serde::de::Error::custom),
        }
    }
}

mod rate_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_rate(&s).map_err(serde::de::Error::custom),
        }
    }
}
