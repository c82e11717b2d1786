//! Every real TFTP client a branch meets downloads from `branchtftp serve` and gets every byte:
//! curl, tftp-hpa, atftp (windowsize included) and busybox, with default options and with the
//! options each one speaks, over sizes that hit the edge cases (empty, one byte, exact block
//! multiples, block-number rollover), plus the refusals and errors a phone relies on.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use support::*;

const MB: usize = 1024 * 1024;

/// Sizes at the edges: nothing, one byte, exactly one and two 512-byte blocks (so the last DATA
/// is empty), and a megabyte.
const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("one.bin", 1),
    ("block.bin", 512),
    ("two-blocks.bin", 1024),
    ("SEP001122AABBCC.cnf.xml", 3000),
    ("firmware/1m.sbn", MB),
];

/// 40 MB in 512-byte blocks is 81 920 blocks: the block number wraps past 65 535 to 0.
const ROLLOVER: (&str, usize) = ("rollover-40m.bin", 40 * MB);

/// Downloads every file with every client configuration and checks each sha256.
async fn every_size_with(clients: &[RealClient]) {
    let files = TestFiles::with_sizes(SIZES);
    let server = Branchtftp::serve(files.path());
    let out = scratch_dir();
    for client in clients {
        for f in files.iter() {
            let dest = out
                .path()
                .join(format!("{}-{}", client.label(), f.name.replace('/', "_")));
            let run = client.get(server.addr, &f.name, &dest).await;
            assert!(
                run.success() && !run.reported_error(),
                "{} getting {} ({} bytes): {run}\nserver log:\n{}",
                client.label(),
                f.name,
                f.size,
                server.log()
            );
            run.assert_intact(&f.sha256);
        }
    }
}

async fn rollover_with(client: RealClient) {
    let files = TestFiles::with_sizes(&[ROLLOVER]);
    let server = Branchtftp::serve(files.path());
    let out = scratch_dir();
    let dest = out.path().join(client.label());
    let run = client.get(server.addr, ROLLOVER.0, &dest).await;
    assert!(run.success(), "{run}\nserver log:\n{}", server.log());
    run.assert_intact(files.sha256(ROLLOVER.0));
    eprintln!(
        "{}: 40 MB at blksize 512 in {:?}",
        client.label(),
        run.elapsed
    );
}

#[tokio::test]
async fn curl_gets_every_size_at_default_1428_and_8192_blksize() {
    every_size_with(&[
        RealClient::Curl { blksize: None },
        RealClient::Curl {
            blksize: Some(1428),
        },
        RealClient::Curl {
            blksize: Some(8192),
        },
    ])
    .await;
}

#[tokio::test]
async fn tftp_hpa_gets_every_size() {
    every_size_with(&[RealClient::TftpHpa]).await;
}

#[tokio::test]
async fn atftp_gets_every_size_with_blksize_tsize_and_windowsize() {
    let atftp = |blksize, windowsize, tsize| RealClient::Atftp {
        blksize,
        windowsize,
        tsize,
    };
    every_size_with(&[
        atftp(None, None, false),
        atftp(None, None, true),
        atftp(Some(1428), None, true),
        atftp(Some(8192), None, true),
        atftp(Some(1428), Some(16), true),
        atftp(None, Some(16), false),
    ])
    .await;
}

#[tokio::test]
async fn busybox_gets_every_size_at_default_1428_and_8192_blksize() {
    every_size_with(&[
        RealClient::Busybox { blksize: None },
        RealClient::Busybox {
            blksize: Some(1428),
        },
        RealClient::Busybox {
            blksize: Some(8192),
        },
    ])
    .await;
}

#[tokio::test]
async fn curl_gets_40_mb_across_block_number_rollover() {
    rollover_with(RealClient::Curl { blksize: Some(512) }).await;
}

#[tokio::test]
async fn tftp_hpa_gets_40_mb_across_block_number_rollover() {
    rollover_with(RealClient::TftpHpa).await;
}

#[tokio::test]
async fn atftp_gets_40_mb_across_block_number_rollover() {
    rollover_with(RealClient::Atftp {
        blksize: None,
        windowsize: None,
        tsize: true,
    })
    .await;
}

#[tokio::test]
async fn atftp_gets_40_mb_across_rollover_with_windowsize_16() {
    rollover_with(RealClient::Atftp {
        blksize: Some(512),
        windowsize: Some(16),
        tsize: true,
    })
    .await;
}

#[tokio::test]
async fn busybox_gets_40_mb_across_block_number_rollover() {
    rollover_with(RealClient::Busybox { blksize: None }).await;
}

/// netascii (RFC 764 line endings): LF goes on the wire as CR LF and CR as CR NUL.
fn netascii_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

#[tokio::test]
async fn netascii_round_trips_through_tftp_hpa_ascii_mode() {
    // Long enough to put line endings across block boundaries, with a bare CR and CR LF.
    let mut text = Vec::new();
    for i in 0..300 {
        text.extend_from_slice(format!("<line n=\"{i}\"/>\n").as_bytes());
        if i % 50 == 0 {
            text.extend_from_slice(b"dos line\r\nbare\rcr\n");
        }
    }
    let mut files = TestFiles::new();
    files.add_bytes("dialplan.xml", &text);
    let server = Branchtftp::serve(files.path());
    let out = scratch_dir();

    // On the wire: the netascii encoding, exactly.
    let raw = raw_tftp_get(server.addr, b"dialplan.xml", "netascii", &[]).await;
    assert_eq!(
        raw.outcome,
        RawOutcome::Data(netascii_encode(&text)),
        "netascii bytes on the wire"
    );

    // tftp-hpa decodes back to local (LF) line endings: the file round-trips.
    let dest = out.path().join("dialplan.xml");
    let run = tftp_hpa_get(server.addr, "dialplan.xml", &dest, TftpMode::Ascii).await;
    assert!(run.success() && !run.reported_error(), "{run}");
    assert_eq!(std::fs::read(&dest).unwrap(), text, "{run}");
}

#[tokio::test]
async fn write_requests_are_refused_with_access_violation() {
    let files = TestFiles::with_sizes(&[("XMLDefault.cnf.xml", 100)]);
    let server = Branchtftp::serve(files.path());
    let upload = TestFiles::with_sizes(&[("evil.cnf.xml", 2000)]);

    let run = tftp_hpa_put(
        server.addr,
        &upload.get("evil.cnf.xml").path,
        "XMLDefault.cnf.xml",
        TftpMode::Binary,
    )
    .await;
    assert!(run.text().contains("Error code 2"), "{run}");
    assert_eq!(
        files.content("XMLDefault.cnf.xml").len(),
        100,
        "file overwritten"
    );

    let mut wrq = vec![0u8, 2];
    wrq.extend_from_slice(b"new.bin\0octet\0");
    let (reply, _) = raw_tftp_exchange(server.addr, &wrq, Duration::from_secs(2))
        .await
        .expect("an answer to a WRQ");
    assert_eq!(tftp_error_of(&reply).map(|e| e.0), Some(2), "{reply:?}");
    assert!(!files.path().join("new.bin").exists());
}

#[tokio::test]
async fn names_escaping_the_root_are_refused_with_access_violation() {
    let files = TestFiles::with_sizes(&[("ok.bin", 10)]);
    let server = Branchtftp::serve(files.path());
    let out = scratch_dir();
    let dest = out.path().join("passwd");

    let run = tftp_hpa_get(server.addr, "../../etc/passwd", &dest, TftpMode::Binary).await;
    assert!(run.text().contains("Error code 2"), "{run}");
    assert!(
        !dest.exists() || std::fs::metadata(&dest).unwrap().len() == 0,
        "{run}"
    );

    for name in [
        &b"../../etc/passwd"[..],
        b"/../etc/passwd",
        b"..\\..\\etc\\passwd",
    ] {
        let raw = raw_tftp_get(server.addr, name, "octet", &[]).await;
        assert!(
            matches!(raw.outcome, RawOutcome::Error { code: 2, .. }),
            "{}: {:?}",
            String::from_utf8_lossy(name),
            raw.outcome
        );
    }

    let run = curl_tftp_get(server.addr, "../../etc/passwd", &dest, None).await;
    assert!(!run.success(), "{run}");
}

#[tokio::test]
async fn a_missing_file_is_answered_file_not_found_within_100_ms() {
    let files = TestFiles::with_sizes(&[("SEP001122AABBCC.cnf.xml", 10)]);
    let server = Branchtftp::serve(files.path());
    // A booting phone's first requests: the CTL and ITL files, usually absent.
    for name in [
        "CTLSEP001122AABBCC.tlv",
        "ITLSEP001122AABBCC.tlv",
        "ITLFile.tlv",
    ] {
        let raw = raw_tftp_get(server.addr, name.as_bytes(), "octet", &[("tsize", "0")]).await;
        assert!(
            matches!(raw.outcome, RawOutcome::Error { code: 1, .. }),
            "{name}: {:?}",
            raw.outcome
        );
        let t = raw.first_reply.unwrap();
        assert!(
            t < Duration::from_millis(100),
            "{name}: ERROR 1 after {t:?}"
        );
    }
    let out = scratch_dir();
    let run = tftp_hpa_get(
        server.addr,
        "CTLSEP001122AABBCC.tlv",
        &out.path().join("ctl"),
        TftpMode::Binary,
    )
    .await;
    assert!(run.text().contains("Error code 1"), "{run}");
}

#[tokio::test]
async fn every_client_transfers_over_ipv6_loopback() {
    let files = TestFiles::with_sizes(&[("v6.sbn", 200_000)]);
    let ips = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let server = Branchtftp::serve_on(files.path(), &ips);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), server.addr.port());
    let out = scratch_dir();
    let sha = files.sha256("v6.sbn");
    for client in [
        RealClient::Curl {
            blksize: Some(1428),
        },
        RealClient::TftpHpa,
        RealClient::Atftp {
            blksize: Some(1428),
            windowsize: Some(16),
            tsize: true,
        },
        RealClient::Busybox {
            blksize: Some(1428),
        },
    ] {
        let run = client
            .get(v6, "v6.sbn", &out.path().join(client.label()))
            .await;
        assert!(run.success(), "{run}\nserver log:\n{}", server.log());
        run.assert_intact(sha);
    }
    // The same server still answers on IPv4.
    curl_tftp_get(server.addr, "v6.sbn", &out.path().join("v4"), None)
        .await
        .assert_intact(sha);
}
