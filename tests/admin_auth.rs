//! The admin endpoint's rule for state-changing calls, with a real non-loopback peer: the admin
//! endpoint listens on all addresses and curl connects to this machine's own global address
//! (e.g. eth0's), so the appliance sees a peer address outside 127.0.0.0/8 and ::1, exactly as a
//! management station's request would look. Reading (`/metrics`) stays open; `POST /sync` and
//! the cache calls need the token from `admin.token_file`; loopback needs none.

#[path = "admin_support/mod.rs"]
mod admin_support;
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use admin_support::*;
use support::*;

const TOKEN: &str = "9f2c61e0b6a84d1f8e3b7a5c4d2e1f00";

/// An IPv4 address of this machine outside loopback (`ip -4 addr show scope global`).
fn global_ipv4() -> Ipv4Addr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("run ip(8)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "this test needs a non-loopback IPv4 address on the machine (ip -4 addr): {text}"
            )
        })
}

fn token_file(dir: &std::path::Path, mode: u32) -> std::path::PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn state_changes_from_a_non_loopback_peer_need_the_admin_token() {
    let origin = HttpOrigin::start();
    let secrets = tempfile::tempdir().unwrap();
    let opts = Options {
        upstream: origin.url(),
        admin_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        token_file: Some(token_file(secrets.path(), 0o600)),
        ..Options::default()
    };
    let b = AdminBranch::start(&opts);
    let far = format!("http://{}:{}", global_ipv4(), b.admin.port());
    let near = format!("http://127.0.0.1:{}", b.admin.port());
    let bearer = format!("Authorization: Bearer {TOKEN}");

    assert_eq!(curl(&["-s", "-X", "POST", &format!("{far}/sync")]).0, 403);
    assert_eq!(
        curl(&[
            "-s",
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer wrong",
            &format!("{far}/sync")
        ])
        .0,
        403
    );
    assert_eq!(
        curl(&["-s", "-X", "DELETE", &format!("{far}/cache/kern.sbn")]).0,
        403
    );
    assert_eq!(
        curl(&["-s", "-X", "POST", &format!("{far}/cache/verify")]).0,
        403
    );
    assert_eq!(
        curl(&["-s", "-X", "POST", "-H", &bearer, &format!("{far}/sync")]).0,
        202
    );
    assert_eq!(
        curl(&[
            "-s",
            "-X",
            "POST",
            "-H",
            &bearer,
            &format!("{far}/cache/verify")
        ])
        .0,
        200
    );
    assert_eq!(
        curl(&[
            "-s",
            "-X",
            "DELETE",
            "-H",
            &bearer,
            &format!("{far}/cache/kern.sbn")
        ])
        .0,
        404,
        "with the token the call goes through (and finds nothing to evict)"
    );
    // Reading stays open: a fleet's Prometheus scrapes from afar without the token.
    let (code, body) = curl(&["-s", &format!("{far}/metrics")]);
    assert_eq!(code, 200);
    assert!(body.contains("branchtftp_cache_files"));
    // Loopback needs no token.
    assert_eq!(curl(&["-s", "-X", "POST", &format!("{near}/sync")]).0, 202);

    let log = b.log();
    assert!(
        log.contains("refused a state-changing request")
            && log.contains(&global_ipv4().to_string()),
        "refusals are logged with the peer address:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the token never reaches the log");
}

#[test]
fn a_token_file_other_users_can_read_stops_the_start() {
    let origin = HttpOrigin::start();
    let secrets = tempfile::tempdir().unwrap();
    let path = token_file(secrets.path(), 0o644);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("branchtftp.yaml");
    std::fs::write(
        &config,
        format!(
            "tftp:\n  listen: [\"127.0.0.1:{}\"]\nhttp:\n  listen: []\n\
             admin:\n  listen: \"127.0.0.1:{}\"\n  token_file: {}\n\
             cache:\n  dir: {}\nupstreams:\n  - url: {}\n",
            free_udp_port(),
            free_tcp_port(),
            path.display(),
            dir.path().join("cache").display(),
            origin.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(branchtftp_bin())
        .args(["serve", "-c"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with a world-readable token file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("mode 0644")
            && err.contains("chmod 600")
            && err.contains(&path.display().to_string()),
        "{err}"
    );
}
