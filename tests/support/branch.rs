//! A branch with a pre-seeded cache and phones booting against it: what the bad-day tests and
//! `benches/bad_days.rs` drive (storms of boots, misses until served).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use branchtftp::tftp::client::{ClientError, ClientOptions, Download};

use super::*;

/// A branch: `serve` with a cache imported beforehand (as from a USB stick), the given
/// upstreams YAML, the admin endpoint on a free port, and no background sync extras.
pub struct Branch {
    pub bt: Branchtftp,
    pub admin: SocketAddr,
    pub config: PathBuf,
    /// How long `serve` took until it answered TFTP.
    pub started_in: Duration,
    _dir: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Branch {
    pub fn start(upstreams: &str, cached: &TestFiles) -> Branch {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-baddays-")
            .tempdir()
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        let admin = localhost(free_tcp_port());
        let mut yaml = format!(
            "log: info\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"{admin}\"\n\
             access:\n  max_per_client: 256\n{upstreams}",
            dir.path().join("cache").display()
        );
        if !upstreams.contains("sync:") {
            yaml.push_str("sync:\n  prefetch: []\n  discover: false\n  config_list: false\n");
        }
        let config = dir.path().join("branchtftp.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let import = Command::new(branchtftp_bin())
            .args(["cache", "import"])
            .arg(cached.path())
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(import.status.success(), "cache import: {import:?}");
        let t = Instant::now();
        let bt = Branchtftp::serve_config(root.path(), &yaml);
        Branch {
            started_in: t.elapsed(),
            bt,
            admin,
            config,
            _dir: dir,
            _root: root,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.bt.addr
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await
    }
}

/// What a phone got for one name: the bytes, or the TFTP error code, and how long it took.
pub struct PhoneGet {
    pub result: Result<Vec<u8>, u16>,
    pub took: Duration,
}

/// A phone-like lock-step download (tsize asked, RRQ resent every 2 s for 16 s, patient enough
/// for the default 10 s upstream timeout; the server absorbs the resends). A storm's phones are
/// all on 127.0.0.1, so the branch allows 256 transfers per client.
pub async fn phone_get(addr: SocketAddr, name: &str) -> PhoneGet {
    let opts = ClientOptions {
        timeout: Duration::from_secs(2),
        retries: 7,
        ..ClientOptions::default()
    };
    let t = Instant::now();
    let result = match Download::start(addr, name, &opts).await {
        Ok(mut dl) => dl
            .read_to_end()
            .await
            .map_err(|e| panic!("{name}: transfer broke: {e}")),
        Err(ClientError::NotFound(_)) => Err(1),
        Err(ClientError::Server { code, .. }) => Err(code),
        Err(e) => panic!("{name}: no answer: {e}"),
    };
    PhoneGet {
        result,
        took: t.elapsed(),
    }
}

pub fn mac(i: usize, salt: u8) -> String {
    format!("00112233{salt:02X}{i:02X}")
}

/// The cached part of a boot: each phone's config, a locale file and a firmware image.
pub fn boot_files(phones: usize) -> TestFiles {
    let mut f = TestFiles::new();
    for i in 0..phones {
        f.add(&format!("SEP{}.cnf.xml", mac(i, 0)), 4_000);
    }
    f.add("English_United_States/mk-sip.jar", 150_000);
    f.add("apps42.9-4-2ES26.sbn", 300_000);
    f
}

/// One phone's boot: its CTL file (never on any server, so always a miss), then its cached
/// config, locale and image with curl, each checked byte for byte. Returns the CTL answer and
/// how long the phone waited for it.
pub async fn boot(
    addr: SocketAddr,
    files: &TestFiles,
    i: usize,
    ctl_salt: u8,
    out: &Path,
) -> (u16, Duration) {
    let ctl = phone_get(addr, &format!("CTLSEP{}.tlv", mac(i, ctl_salt))).await;
    let code = ctl.result.expect_err("no CTL file anywhere");
    // The phones of a storm hear their CTL answers at the same instant; starting curl forks on
    // this worker thread, so let the other phones read theirs first (their waits would
    // otherwise include up to ~50 ms of this storm's curl starts: bad_days measured 10.05 s
    // at the phone for answers the server sent 10.001 s after each request).
    tokio::task::yield_now().await;
    for name in [
        format!("SEP{}.cnf.xml", mac(i, 0)),
        "English_United_States/mk-sip.jar".to_string(),
        "apps42.9-4-2ES26.sbn".to_string(),
    ] {
        let dest = out.join(format!("{ctl_salt}-{i}-{}", name.replace('/', "_")));
        curl_tftp_get(addr, &name, &dest, Some(1428))
            .await
            .assert_intact(files.sha256(&name));
    }
    (code, ctl.took)
}

/// `phones` boots at once; the time until the last one finished, and each phone's CTL answer
/// and wait.
pub async fn storm(
    addr: SocketAddr,
    files: &TestFiles,
    phones: usize,
    ctl_salt: u8,
) -> (Duration, Vec<(u16, Duration)>) {
    let out = scratch_dir();
    let t = Instant::now();
    let codes =
        futures::future::join_all((0..phones).map(|i| boot(addr, files, i, ctl_salt, out.path())))
            .await;
    (t.elapsed(), codes)
}

/// Asks for `name` until it is served (a miss while the upstream is down gets ERROR 0 at
/// once); the time it took.
pub async fn until_served(addr: SocketAddr, name: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if phone_get(addr, name).await.result.is_ok() {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{name} not served within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
