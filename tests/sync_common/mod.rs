//! Helpers shared by the sync tests: the appliance as a child process (`branchtftp serve` with a
//! config file the test can rewrite), and a realistic firmware fixture (`XMLDefault.cnf.xml`
//! naming loads per model, `.loads` files with a binary signed header, images).
#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use branchtftp::name::FileName;

use crate::support::*;

/// `branchtftp serve -c FILE` on a free loopback port, killed on drop.
pub struct Appliance {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    log: PathBuf,
    child: Child,
}

/// What a test sets in the config; the rest is fixed to loopback, free ports and temp dirs.
#[derive(Clone)]
pub struct Setup {
    pub upstreams: Vec<String>,
    /// YAML lines under `sync:` (indented by the helper).
    pub sync: Vec<String>,
    pub allow: Vec<String>,
}

impl Setup {
    pub fn new(upstream: &str) -> Setup {
        Setup {
            upstreams: vec![upstream.to_string()],
            sync: Vec::new(),
            allow: vec!["127.0.0.0/8".into()],
        }
    }

    pub fn sync(mut self, line: &str) -> Setup {
        self.sync.push(line.to_string());
        self
    }
}

/// The config file text for a setup.
pub fn config_yaml(dir: &Path, tftp: SocketAddr, admin_port: u16, s: &Setup) -> String {
    let mut y = String::new();
    y.push_str("log: debug\n");
    y.push_str(&format!("tftp:\n  listen: [\"{tftp}\"]\n  timeout: 1s\n"));
    y.push_str("http:\n  listen: []\n");
    y.push_str(&format!("admin:\n  listen: \"127.0.0.1:{admin_port}\"\n"));
    y.push_str(&format!(
        "cache:\n  dir: {}\n  overrides: {}\n",
        dir.join("cache").display(),
        dir.join("overrides").display()
    ));
    y.push_str("upstreams:\n");
    for u in &s.upstreams {
        y.push_str(&format!("  - url: {u}\n    timeout: 2s\n"));
    }
    y.push_str("sync:\n");
    for l in &s.sync {
        y.push_str(&format!("  {l}\n"));
    }
    y.push_str("access:\n  allow: [");
    y.push_str(
        &s.allow
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    y.push_str("]\n");
    y
}

impl Appliance {
    /// Starts the appliance; retries on fresh ports if another process took one meanwhile.
    pub fn start(setup: &Setup) -> Appliance {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-sync-")
            .tempdir()
            .unwrap();
        fs::create_dir_all(dir.path().join("overrides")).unwrap();
        let config = dir.path().join("branchtftp.yaml");
        let log = dir.path().join("serve.log");
        let mut last_log = String::new();
        for _ in 0..3 {
            let addr = localhost(free_udp_port());
            write_atomically(
                &config,
                &config_yaml(dir.path(), addr, free_tcp_port(), setup),
            );
            let logf = fs::File::create(&log).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
                .args(["serve", "-c"])
                .arg(&config)
                .env_remove("RUST_LOG")
                .env_remove("JOURNAL_STREAM")
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("start branchtftp serve");
            if wait_tftp_ready(addr, Duration::from_secs(15)) {
                return Appliance {
                    addr,
                    dir,
                    config,
                    log,
                    child,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("the appliance did not start: {last_log}");
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Rewrites the config file in place (as an editor saving it would), keeping the ports.
    pub fn rewrite_config(&self, edit: impl FnOnce(String) -> String) {
        let text = fs::read_to_string(&self.config).unwrap();
        write_atomically(&self.config, &edit(text));
    }

    /// Sends SIGHUP (reload the config).
    pub fn hangup(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn overrides(&self) -> PathBuf {
        self.dir.path().join("overrides")
    }

    /// Whether the cache holds `name` (the cache keeps files under their case-folded names).
    pub fn cached(&self, name: &str) -> bool {
        self.dir
            .path()
            .join("cache/files")
            .join(name.to_lowercase())
            .is_file()
    }

    pub fn cached_content(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(
            self.dir
                .path()
                .join("cache/files")
                .join(name.to_lowercase()),
        )
        .ok()
    }

    /// Downloads `name` with curl over TFTP; the content, or `None` on any error.
    pub async fn get(&self, name: &str) -> Option<Vec<u8>> {
        let out = self.dir.path().join(format!(
            "dl-{}-{}",
            std::process::id(),
            name.replace('/', "_")
        ));
        let _ = fs::remove_file(&out);
        let run = curl_tftp_get(self.addr, name, &out, Some(1428)).await;
        let data = if run.success() {
            fs::read(&out).ok()
        } else {
            None
        };
        let _ = fs::remove_file(&out);
        data
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a file by temp file and rename, as editors and config management do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-edit");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Polls `check` every 50 ms until it is true or `limit` passes; the time it took.
pub async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- a realistic firmware fixture -----------------------------------------------------------

/// A `.loads` file as the real ones are built: a binary signed header of TLV records (tag 0x02
/// the header length, 0x0C a 256-byte signature, 0x0E the file's own name NUL-terminated), 0x0D
/// padding, then CRLF text.
pub fn signed_loads(own_name: &str, text: &str) -> Vec<u8> {
    let sig = pseudo_random_bytes(0x5151, 256);
    let mut name = own_name.as_bytes().to_vec();
    name.push(0);
    let mut h = vec![0x01, 0x00, 0x02, 0x01, 0x00];
    let len_at = h.len();
    h.extend([0x02, 0x00, 0x02, 0x00, 0x00]);
    h.extend([0x0c, 0x01, 0x00]);
    h.extend(&sig);
    h.extend([0x0e, 0x00, name.len() as u8]);
    h.extend(&name);
    h.extend([0x0d; 9]);
    let total = h.len() as u16;
    h[len_at + 3..len_at + 5].copy_from_slice(&total.to_be_bytes());
    h.extend(text.as_bytes());
    h
}

/// One phone model's firmware at the origin.
pub struct Model {
    pub model: &'static str,
    pub load: &'static str,
    /// Image names as the `.loads` file lists them.
    pub listed: Vec<&'static str>,
    /// The same images as the origin stores them (letter case may differ).
    pub stored: Vec<&'static str>,
}

/// Two models (a 7945 on SCCP and an 8865 on SIP) plus a model whose load the central server
/// does not have (XMLDefault lists every model the cluster knows).
pub fn firmware_models() -> Vec<Model> {
    vec![
        Model {
            model: "Cisco IP Phone 7945",
            load: "SCCP45.9-4-2SR4-3S",
            listed: vec![
                "apps45.9-4-2ES26.sbn",
                "CNU45.9-4-2ES26.SBN",
                "cvm45sccp.9-4-2ES26.sbn",
                "dsp45.9-4-2ES26.sbn",
                "jar45sccp.9-4-2ES26.sbn",
            ],
            stored: vec![
                "apps45.9-4-2ES26.sbn",
                "cnu45.9-4-2es26.sbn",
                "cvm45sccp.9-4-2ES26.sbn",
                "dsp45.9-4-2ES26.sbn",
                "jar45sccp.9-4-2ES26.sbn",
            ],
        },
        Model {
            model: "Cisco IP Phone 8865",
            load: "sip88xx.14-2-1-0101-15",
            listed: vec![
                "sip88xx.14-2-1-0101-15.zz.sgn",
                "kern88xx.14-2-1-0101-15.sgn",
                "rootfs88xx.14-2-1-0101-15.bin1.sgn",
            ],
            stored: vec![
                "sip88xx.14-2-1-0101-15.zz.sgn",
                "kern88xx.14-2-1-0101-15.sgn",
                "rootfs88xx.14-2-1-0101-15.bin1.sgn",
            ],
        },
    ]
}

pub fn xmldefault(models: &[Model]) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<Default>\r\n<callManagerGroup><members><member priority=\"0\"><callManager><name>CUCM1</name></callManager></member></members></callManagerGroup>\r\n",
    );
    for (i, m) in models.iter().enumerate() {
        x.push_str(&format!(
            "<loadInformation{} model=\"{}\">{}</loadInformation{}>\r\n",
            430 + i,
            m.model,
            m.load,
            430 + i
        ));
    }
    x.push_str("<loadInformation30018 model=\"IP Phone 7961\">SCCP41.9-4-2SR4-3S</loadInformation30018>\r\n");
    x.push_str(
        "<userLocale><name>English_United_States</name><langCode>en_US</langCode></userLocale>\r\n",
    );
    x.push_str("<networkLocale>United_States</networkLocale>\r\n</Default>\r\n");
    x
}

/// The `.loads` text: comments, trailing spaces, and for the SIP load the `name size md5`
/// variant.
pub fn loads_text(m: &Model, image_sizes: &[usize]) -> String {
    let mut t = String::from("# Cisco load file\r\n# generated\r\n\r\n");
    for (i, name) in m.listed.iter().enumerate() {
        if m.load.starts_with("sip88") {
            t.push_str(&format!(
                "{name} {} 0123456789abcdef0123456789abcdef\r\n",
                image_sizes[i]
            ));
        } else {
            t.push_str(&format!("{name}   \r\n"));
        }
    }
    t
}

/// Puts the firmware fixture on an origin; returns (name as stored, content) of every file a
/// phone of each model downloads to boot (XMLDefault, `.loads`, images).
pub fn publish_firmware(origin: &HttpOrigin, image_size: usize) -> Vec<(String, Vec<u8>)> {
    let models = firmware_models();
    let mut files = Vec::new();
    let xml = xmldefault(&models);
    origin.put_file("XMLDefault.cnf.xml", xml.clone());
    files.push(("XMLDefault.cnf.xml".to_string(), xml.into_bytes()));
    for (mi, m) in models.iter().enumerate() {
        let sizes: Vec<usize> = (0..m.stored.len())
            .map(|i| image_size + i * 1000 + mi)
            .collect();
        let loads_name = format!("{}.loads", m.load);
        let loads = signed_loads(&loads_name, &loads_text(m, &sizes));
        origin.put_file(&loads_name, loads.clone());
        files.push((loads_name.clone(), loads));
        for (i, stored) in m.stored.iter().enumerate() {
            let body = pseudo_random_bytes(i as u64 * 31 + mi as u64, sizes[i]);
            origin.put_file(stored, body.clone());
            files.push((stored.to_string(), body));
        }
    }
    files
}

/// A sync pass's progress, unreported.
pub struct Quiet;
impl branchtftp::sync::Progress for Quiet {}

/// The library-level sync rig: a cache in a temporary directory, the fetcher over the given
/// upstream chain (negative TTL 30 s) and a syncer reading `sync.windows` on `clock`.
pub struct SyncRig {
    _dir: tempfile::TempDir,
    pub cache: branchtftp::cache::Cache,
    pub fetcher: std::sync::Arc<branchtftp::upstream::flight::Fetcher>,
    pub syncer: std::sync::Arc<branchtftp::sync::Syncer>,
}

impl SyncRig {
    pub fn new(
        upstreams: &[branchtftp::config::UpstreamConfig],
        max_size: u64,
        settings: branchtftp::config::SyncConfig,
        clock: std::sync::Arc<dyn branchtftp::sync::WallClock>,
    ) -> SyncRig {
        use branchtftp::cache::{Cache, ClassRules};
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open(dir.path(), max_size, ClassRules::default()).unwrap();
        let chain = branchtftp::upstream::UpstreamChain::new(upstreams).unwrap();
        let fetcher = branchtftp::upstream::flight::Fetcher::new(
            cache.clone(),
            chain,
            Duration::from_secs(30),
        );
        let syncer = branchtftp::sync::Syncer::with_clock(fetcher.clone(), settings, clock);
        SyncRig {
            _dir: dir,
            cache,
            fetcher,
            syncer,
        }
    }

    /// One full pass.
    pub async fn pass(&self) -> branchtftp::sync::PassReport {
        self.syncer
            .pass(branchtftp::sync::Scope::Full, &Quiet)
            .await
    }

    /// A phone asked for `name`: the syncer learns it.
    pub fn phone_asked(&self, name: &str) {
        self.syncer
            .learn_from_phone(&FileName::parse(name).unwrap());
    }

    pub fn entry(&self, name: &str) -> Option<branchtftp::cache::Entry> {
        self.cache.get(FileName::parse(name).unwrap().key())
    }

    pub fn cached(&self, name: &str) -> bool {
        self.cache.get(&name.to_lowercase()).is_some()
    }

    /// The cached bytes of `name` (which must be cached).
    pub fn content(&self, name: &str) -> Vec<u8> {
        self.cache
            .read_quiet(FileName::parse(name).unwrap().key())
            .unwrap()
            .unwrap()
            .1
    }
}
