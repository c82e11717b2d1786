//! The admin endpoint's rule for state-changing calls, with a real non-loopback peer: the test
//! creates a network namespace joined to this one by a veth pair, the admin endpoint listens on
//! the host side, and curl runs inside the namespace, so the appliance sees a peer address outside
//! 127.0.0.0/8 and ::1, exactly as a management station's request would look. Reading
//! (`/metrics`) stays open; `POST /sync` and the cache calls need the token from
//! `admin.token_file`; loopback needs none.

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

/// A management station of the test's own: a network namespace joined to this one by a veth
/// pair, so a request from it reaches the admin endpoint from a non-loopback address (`FAR`)
/// without touching any real interface. Deleting the namespace removes the pair.
struct Station {
    netns: String,
}

const NEAR_SIDE: Ipv4Addr = Ipv4Addr::new(10, 213, 77, 1);
const FAR: Ipv4Addr = Ipv4Addr::new(10, 213, 77, 2);

impl Station {
    fn start() -> Station {
        let id = std::process::id();
        let st = Station {
            netns: format!("btadmin{id}"),
        };
        let (host, peer) = (format!("bth{id}"), format!("btp{id}"));
        let ns = st.netns.as_str();
        for args in [
            vec!["netns", "add", ns],
            vec!["link", "add", &host, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", ns],
            vec!["addr", "add", "10.213.77.1/30", "dev", &host],
            vec!["link", "set", &host, "up"],
            vec!["-n", ns, "addr", "add", "10.213.77.2/30", "dev", &peer],
            vec!["-n", ns, "link", "set", &peer, "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
        ] {
            let out = Command::new("ip").args(&args).output().expect("run ip(8)");
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        }
        st
    }

    /// `curl` run inside the namespace, so its source address is `FAR`.
    fn curl(&self, args: &[&str]) -> (u16, String) {
        curl_via(&["ip", "netns", "exec", &self.netns], args)
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
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
    // The station first: the admin endpoint listens on its side of the pair, nowhere else.
    let station = Station::start();
    let opts = Options {
        upstream: origin.url(),
        admin_ip: Some(IpAddr::V4(NEAR_SIDE)),
        token_file: Some(token_file(secrets.path(), 0o600)),
        ..Options::default()
    };
    let b = AdminBranch::start(&opts);
    let far = format!("http://{NEAR_SIDE}:{}", b.admin.port());
    // From this machine's own loopback address to the same endpoint.
    let near = ["--interface", "127.0.0.1"];
    let bearer = format!("Authorization: Bearer {TOKEN}");

    assert_eq!(
        station
            .curl(&["-s", "-X", "POST", &format!("{far}/sync")])
            .0,
        403
    );
    assert_eq!(
        station
            .curl(&[
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
        station
            .curl(&["-s", "-X", "DELETE", &format!("{far}/cache/kern.sbn")])
            .0,
        403
    );
    assert_eq!(
        station
            .curl(&["-s", "-X", "POST", &format!("{far}/cache/verify")])
            .0,
        403
    );
    assert_eq!(
        station
            .curl(&["-s", "-X", "POST", "-H", &bearer, &format!("{far}/sync")])
            .0,
        202
    );
    assert_eq!(
        station
            .curl(&[
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
        station
            .curl(&[
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
    let (code, body) = station.curl(&["-s", &format!("{far}/metrics")]);
    assert_eq!(code, 200);
    assert!(body.contains("branchtftp_cache_files"));
    // Loopback needs no token.
    let sync = format!("{far}/sync");
    assert_eq!(curl(&[near[0], near[1], "-s", "-X", "POST", &sync]).0, 202);

    let log = b.log();
    assert!(
        log.contains("refused a state-changing request") && log.contains(&FAR.to_string()),
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
