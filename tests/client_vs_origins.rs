//! Our TFTP client (the upstream fetcher's engine) against independently written servers:
//! tftpd-hpa over the whole size matrix with and without options, tftpd-hpa refusing options
//! (the client must fall back to 512-byte lock-step), atftpd with windowsize 16, netascii, and
//! the `branchtftp get` command.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use branchtftp::tftp::client::{ClientError, ClientOptions, Download};
use branchtftp::tftp::server::Mode;
use support::*;

const MB: usize = 1024 * 1024;

const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("one.bin", 1),
    ("block.bin", 512),
    ("two-blocks.bin", 1024),
    ("firmware/1m.sbn", MB),
];

fn opts(blksize: Option<u16>, windowsize: Option<u16>, tsize: bool) -> ClientOptions {
    ClientOptions {
        blksize,
        windowsize,
        tsize,
        timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    }
}

async fn fetch(
    addr: std::net::SocketAddr,
    name: &str,
    o: &ClientOptions,
) -> Result<(Vec<u8>, Download), ClientError> {
    let mut dl = Download::start(addr, name, o).await?;
    let bytes = dl.read_to_end().await?;
    Ok((bytes, dl))
}

#[tokio::test]
async fn our_client_gets_every_size_from_tftpd_hpa_with_each_option_set() {
    let files = TestFiles::with_sizes(SIZES);
    let hpa = TftpdHpa::start(files.path());
    for (label, o) in [
        ("plain RFC 1350", opts(None, None, false)),
        ("tsize", opts(None, None, true)),
        ("blksize 1428 + tsize", opts(Some(1428), None, true)),
        ("blksize 8192 + tsize", opts(Some(8192), None, true)),
        // tftpd-hpa has no windowsize: it answers the other options and we go lock-step.
        (
            "blksize 1428 + windowsize 16",
            opts(Some(1428), Some(16), true),
        ),
    ] {
        for f in files.iter() {
            let (bytes, dl) = fetch(hpa.addr, &f.name, &o)
                .await
                .unwrap_or_else(|e| panic!("{label}: {}: {e}", f.name));
            assert_eq!(
                sha256_bytes(&bytes),
                f.sha256,
                "{label}: {} corrupted",
                f.name
            );
            let n = dl.negotiated();
            if let Some(b) = o.blksize {
                assert_eq!(n.params.blksize, b, "{label}: blksize not negotiated");
            }
            assert_eq!(
                n.params.windowsize, 1,
                "tftpd-hpa does not speak windowsize"
            );
            if o.tsize && f.size > 0 {
                assert_eq!(n.tsize, Some(f.size as u64), "{label}: tsize of {}", f.name);
            }
        }
    }
}

#[tokio::test]
async fn our_client_gets_40_mb_across_rollover_from_tftpd_hpa() {
    let files = TestFiles::with_sizes(&[("rollover.bin", 40 * MB)]);
    let hpa = TftpdHpa::start(files.path());
    let (bytes, dl) = fetch(hpa.addr, "rollover.bin", &opts(None, None, true))
        .await
        .expect("40 MB at blksize 512");
    assert_eq!(dl.negotiated().params.blksize, 512);
    assert_eq!(bytes.len(), 40 * MB);
    assert_eq!(sha256_bytes(&bytes), files.sha256("rollover.bin"));
}

#[tokio::test]
async fn our_client_falls_back_to_lock_step_when_the_server_refuses_options() {
    let files = TestFiles::with_sizes(&[("fw.sbn", 300_000), ("block.bin", 512)]);
    let hpa = TftpdHpa::start_with(
        files.path(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &["-r", "blksize", "-r", "tsize", "-r", "timeout"],
    );
    for f in files.iter() {
        let (bytes, dl) = fetch(hpa.addr, &f.name, &opts(Some(1428), Some(16), true))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let n = dl.negotiated();
        assert!(n.fell_back, "no OACK should mean fallback");
        assert_eq!((n.params.blksize, n.params.windowsize), (512, 1));
        assert_eq!(n.tsize, None);
        assert_eq!(sha256_bytes(&bytes), f.sha256);
    }
}

#[tokio::test]
async fn our_client_uses_windowsize_16_with_atftpd() {
    let files = TestFiles::with_sizes(&[("fw.sbn", 3 * MB), ("block.bin", 1428 * 16)]);
    let Some(atftpd) = Atftpd::start(files.path()) else {
        return;
    };
    for f in files.iter() {
        let (bytes, dl) = fetch(atftpd.addr, &f.name, &opts(Some(1428), Some(16), true))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.name, atftpd.log()));
        let n = dl.negotiated();
        assert_eq!((n.params.blksize, n.params.windowsize), (1428, 16));
        assert_eq!(sha256_bytes(&bytes), f.sha256, "{}", f.name);
    }
}

#[tokio::test]
async fn our_client_reports_not_found_and_gets_netascii_and_ipv6() {
    let mut files = TestFiles::new();
    files.add_bytes("text.txt", b"line one\nline two\r\nbare\rcr\n");
    let hpa = TftpdHpa::start(files.path());
    match Download::start(hpa.addr, "CTLSEP001122AABBCC.tlv", &opts(None, None, true)).await {
        Err(ClientError::NotFound(_)) => {}
        Err(e) => panic!("expected not found, got {e}"),
        Ok(_) => panic!("expected not found, got a download"),
    }
    let ascii = ClientOptions {
        mode: Mode::Netascii,
        ..opts(None, None, false)
    };
    let (bytes, _) = fetch(hpa.addr, "text.txt", &ascii).await.expect("netascii");
    assert_eq!(bytes, files.content("text.txt"), "netascii must round-trip");

    let hpa6 = TftpdHpa::start_on(files.path(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let (bytes, _) = fetch(hpa6.addr, "text.txt", &opts(Some(1428), None, true))
        .await
        .expect("over [::1]");
    assert_eq!(bytes, files.content("text.txt"));
}

#[test]
fn get_command_downloads_from_tftpd_hpa_and_reports_stats() {
    let files = TestFiles::with_sizes(&[("SEP001122AABBCC.cnf.xml", 5000)]);
    let hpa = TftpdHpa::start(files.path());
    let out = files.scratch("got.xml");
    let run = std::process::Command::new(branchtftp_bin())
        .args([
            "get",
            &format!("tftp://{}/SEP001122AABBCC.cnf.xml", hpa.addr),
        ])
        .args(["--blksize", "1428", "-o"])
        .arg(&out)
        .output()
        .expect("run branchtftp get");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(sha256_file(&out), files.sha256("SEP001122AABBCC.cnf.xml"));
    assert!(stderr.contains("5000 bytes in"), "stats missing: {stderr}");
    assert!(
        stderr.contains("blksize 1428"),
        "negotiation missing: {stderr}"
    );

    let missing = std::process::Command::new(branchtftp_bin())
        .args(["get", &format!("tftp://{}/nope.bin", hpa.addr), "-o"])
        .arg(files.scratch("nope"))
        .output()
        .expect("run branchtftp get");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}
