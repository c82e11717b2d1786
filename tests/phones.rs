//! The per-phone boot view, seen from the phones' side: twenty simulated phones on their own
//! loopback addresses (127.0.0.2 …) boot through the appliance with an HTTP origin upstream, half
//! over HTTP with curl (`--interface`), half over TFTP with a lock-step client bound to the
//! phone's address; one loses power halfway through a firmware image. `branchtftp phones`, the
//! status line and the metrics must tell exactly that story, and still after a restart.

#[path = "admin_support/mod.rs"]
mod admin_support;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use admin_support::*;
use support::*;

const PHONES: usize = 20;
/// The phone that loses power in the middle of its second image.
const CUT_PHONE: usize = 19;

struct Load {
    name: &'static str,
    images: [(&'static str, usize); 2],
}

const LOADS: [Load; 2] = [
    Load {
        name: "sip78xx.14-1-1-0001-1",
        images: [
            ("kern78xx.14-1-1-0001-1.sbn", 300_000),
            ("rootfs78xx.14-1-1-0001-1.sbn", 200_000),
        ],
    },
    Load {
        name: "sip88xx.14-2-1-0101-15",
        images: [
            ("kern88xx.14-2-1-0101-15.sgn", 250_000),
            ("dsp88xx.14-2-1-0101-15.sgn", 160_000),
        ],
    },
];

struct SimPhone {
    mac: String,
    ip: IpAddr,
    load: &'static Load,
    over_http: bool,
}

fn phones() -> Vec<SimPhone> {
    (0..PHONES)
        .map(|i| SimPhone {
            mac: format!("00AABB0000{:02X}", i + 1),
            ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)),
            load: &LOADS[i % 2],
            over_http: i < PHONES / 2,
        })
        .collect()
}

fn origin_for(phones: &[SimPhone]) -> HttpOrigin {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for p in phones {
        files.push((
            format!("SEP{}.cnf.xml", p.mac),
            format!(
                "<device><loadInformation>{}</loadInformation></device>\n",
                p.load.name
            )
            .into_bytes(),
        ));
    }
    for (n, l) in LOADS.iter().enumerate() {
        let mut text = String::from("# images of this load\r\n");
        for (img, size) in l.images {
            text.push_str(&format!("{img}\r\n"));
            files.push((
                img.to_string(),
                pseudo_random_bytes(n as u64 + size as u64, size),
            ));
        }
        files.push((format!("{}.loads", l.name), text.into_bytes()));
    }
    HttpOrigin::with_files(files)
}

/// A phone's lock-step TFTP download (RFC 1350, blksize 1428 and tsize, as 78xx/88xx ask) from
/// its own address. `stop_after`: stop acknowledging once that many bytes arrived, as a phone
/// losing power does. `Ok(content)`, or `Err` with the server's ERROR text or "stopped".
async fn phone_tftp_get(
    ip: IpAddr,
    server: SocketAddr,
    name: &str,
    stop_after: Option<usize>,
) -> Result<Vec<u8>, String> {
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let mut rrq = vec![0u8, 1];
    for field in [name, "octet", "blksize", "1428", "tsize", "0"] {
        rrq.extend_from_slice(field.as_bytes());
        rrq.push(0);
    }
    let mut last_sent = rrq.clone();
    let mut peer = server;
    sock.send_to(&rrq, server).await.unwrap();
    let mut data = Vec::new();
    let mut expected: u16 = 1;
    let mut blksize = 512;
    let mut buf = vec![0u8; 2048];
    let mut silent = 0;
    loop {
        let (n, from) =
            match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
                Ok(r) => r.unwrap(),
                Err(_) => {
                    silent += 1;
                    assert!(silent < 4, "{name}: no answer from {server}");
                    sock.send_to(&last_sent, peer).await.unwrap();
                    continue;
                }
            };
        peer = from;
        let p = &buf[..n];
        match (p[0], p[1]) {
            (0, 5) => return Err(String::from_utf8_lossy(&p[4..n - 1]).into_owned()),
            (0, 6) => {
                let fields: Vec<&[u8]> = p[2..].split(|b| *b == 0).collect();
                for kv in fields.chunks(2) {
                    if kv.len() == 2 && kv[0].eq_ignore_ascii_case(b"blksize") {
                        blksize = std::str::from_utf8(kv[1]).unwrap().parse().unwrap();
                    }
                }
                last_sent = vec![0, 4, 0, 0];
            }
            (0, 3) => {
                let block = u16::from_be_bytes([p[2], p[3]]);
                if block == expected {
                    data.extend_from_slice(&p[4..]);
                    expected = expected.wrapping_add(1);
                    if stop_after.is_some_and(|s| data.len() >= s) {
                        return Err("stopped".into());
                    }
                }
                last_sent = vec![0, 4, p[2], p[3]];
                if block == expected.wrapping_sub(1) && n - 4 < blksize {
                    sock.send_to(&last_sent, peer).await.unwrap();
                    return Ok(data);
                }
            }
            _ => panic!("{name}: unexpected packet {p:?}"),
        }
        sock.send_to(&last_sent, peer).await.unwrap();
    }
}

/// One file, the way the phone fetches it: `Some(content)` or `None` when not found.
async fn fetch(
    b: &AdminBranch,
    p: &SimPhone,
    name: &str,
    stop_after: Option<usize>,
) -> Option<Vec<u8>> {
    if p.over_http {
        let out = b.dir.path().join(format!("dl-{}-{name}", p.mac));
        let run = curl_http(
            &b.http_url(name),
            &out,
            &[],
            &["--interface", &p.ip.to_string()],
        )
        .await;
        match run.http_status() {
            200 => Some(std::fs::read(&out).unwrap()),
            404 => None,
            s => panic!("{} {name}: HTTP {s}: {}", p.mac, run.text()),
        }
    } else {
        match phone_tftp_get(p.ip, b.tftp, name, stop_after).await {
            Ok(d) => Some(d),
            Err(e) if e.to_lowercase().contains("not found") => None,
            Err(e) if e == "stopped" => Some(Vec::new()),
            Err(e) => panic!("{} {name}: {e}", p.mac),
        }
    }
}

/// A boot as the TFTP server sees it (domain.md): trust lists (missing here), the config, then,
/// the load being new, its `.loads` and every image.
async fn boot(b: &AdminBranch, origin: &HttpOrigin, p: &SimPhone, cut: bool) {
    for tl in [
        format!("CTLSEP{}.tlv", p.mac),
        format!("ITLSEP{}.tlv", p.mac),
    ] {
        assert!(
            fetch(b, p, &tl, None).await.is_none(),
            "{tl} should be missing"
        );
    }
    let config = format!("SEP{}.cnf.xml", p.mac);
    assert_eq!(
        fetch(b, p, &config, None).await,
        origin.file(&config).map(|f| f.to_vec())
    );
    let loads = format!("{}.loads", p.load.name);
    assert!(fetch(b, p, &loads, None).await.is_some());
    for (i, (img, size)) in p.load.images.iter().enumerate() {
        let stop = (cut && i == 1).then_some(size / 2);
        let got = fetch(b, p, img, stop).await.expect("image served");
        if stop.is_none() {
            assert_eq!(got, origin.file(img).unwrap().to_vec(), "{img}");
        }
    }
}

fn phones_json(b: &AdminBranch) -> Vec<serde_json::Value> {
    let out = b.command(&["phones", "--admin", &b.admin_url(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_phones_boot_one_stops_halfway_through_its_firmware_and_the_view_survives_a_restart()
{
    let sims = phones();
    let origin = origin_for(&sims);
    let opts = Options {
        upstream: origin.url(),
        extra: "phones:\n  quiet_gap: 2s\n".into(),
        ..Options::default()
    };
    let mut b = AdminBranch::start(&opts);

    // Five phones at a time, like a branch coming back from a power cut in waves.
    for wave in sims.chunks(5) {
        let boots = wave
            .iter()
            .map(|p| boot(&b, &origin, p, sims[CUT_PHONE].mac == p.mac));
        futures::future::join_all(boots).await;
    }

    // Booted phones are ready once their quiet gap (2 s) passes; the cut phone once the server
    // gives up on its silent client (timeout 1 s, 2 retries).
    let settled = |list: &[serde_json::Value]| {
        list.len() == PHONES
            && list.iter().filter(|p| p["state"] == "booted").count() == PHONES - 1
            && list.iter().filter(|p| p["state"] == "stuck").count() == 1
    };
    let mut list = Vec::new();
    let ok = eventually(Duration::from_secs(30), || {
        list = phones_json(&b);
        settled(&list)
    });
    assert!(ok, "phones never settled: {list:#?}\n{}", b.log());

    for (p, row) in sims.iter().zip(&list) {
        assert_eq!(row["mac"], p.mac.as_str());
        assert_eq!(row["address"], p.ip.to_string());
        assert_eq!(row["load"], p.load.name, "{}", p.mac);
        let protocol = if p.over_http { "http" } else { "tftp" };
        assert_eq!(row["protocols"], serde_json::json!([protocol]));
        let firmware = row["firmware"].as_array().unwrap();
        assert_eq!(firmware.len(), 3, "{row:#}");
        if p.mac == sims[CUT_PHONE].mac {
            assert_eq!(row["state"], "stuck");
            assert!(row["last_complete_boot"].is_null());
            let (img, size) = p.load.images[1];
            let cut = firmware.iter().find(|f| f["name"] == img).unwrap();
            let bytes = cut["bytes"].as_u64().unwrap();
            assert_eq!(cut["total"], size);
            assert_eq!(cut["complete"], false);
            // Within a block or two of where the phone stopped acknowledging (lock-step).
            let half = size as u64 / 2;
            assert!(
                (half - 1428..=half + 2 * 1428).contains(&bytes),
                "stopped at {bytes} of {size}"
            );
            let err = row["last_error"].as_str().unwrap();
            assert!(err.starts_with(img) && err.ends_with(" %"), "{err}");
            // Over TFTP (the second half of the phones), the transfer's own account of why.
            assert!(!p.over_http);
            assert!(
                err.starts_with(&format!("{img}: client stopped answering at ")),
                "{err}"
            );
        } else {
            assert_eq!(row["state"], "booted", "{row:#}");
            let secs = row["last_complete_boot"]["seconds"].as_f64().unwrap();
            assert!(secs > 0.0 && secs < 60.0, "{row:#}");
            assert_eq!(row["boots"], 1);
            assert!(firmware.iter().all(|f| f["complete"] == true), "{row:#}");
            // The trust lists were missing: the phone carried on, and we noted it.
            assert_eq!(row["last_error"], format!("not found: ITLSEP{}.tlv", p.mac));
        }
    }

    // The same story in the table, the stuck filter, the status line and the metrics.
    let table = b.command(&["phones", "--admin", &b.admin_url()]);
    let table_text = String::from_utf8_lossy(&table.stdout).into_owned();
    println!("branchtftp phones:\n{table_text}");
    assert_eq!(table_text.lines().count(), PHONES + 2, "{table_text}");
    assert!(table_text.ends_with("20 phones, 1 stuck\n"), "{table_text}");
    let stuck = b.command(&["phones", "--admin", &b.admin_url(), "--stuck"]);
    let stuck_text = String::from_utf8_lossy(&stuck.stdout).into_owned();
    assert_eq!(stuck_text.lines().count(), 3, "{stuck_text}");
    assert!(stuck_text.contains(&sims[CUT_PHONE].mac));
    let status = b.command(&["status", "--admin", &b.admin_url()]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(
            "phones     20 seen, 19 booted in the last hour, 0 booting, 0 upgrading, 1 stuck"
        ),
        "{}",
        text(&status)
    );
    // Gauges are current at every scrape; a boot is counted when the phones task (every second)
    // ends it.
    assert_eq!(b.metric("branchtftp_phones{state=\"seen\"}"), Some(20.0));
    assert_eq!(b.metric("branchtftp_phones{state=\"stuck\"}"), Some(1.0));
    assert_eq!(
        b.metric("branchtftp_phones{state=\"upgrading\"}"),
        Some(0.0)
    );
    let counted = eventually(Duration::from_secs(5), || {
        b.metric("branchtftp_phone_boots_total") == Some(19.0)
            && b.metric("branchtftp_phone_boot_seconds_count") == Some(19.0)
    });
    assert!(counted, "{}", b.admin_get("/metrics").1);

    // A restart keeps the view (the cache's sled database).
    b.restart(&opts);
    let again = phones_json(&b);
    assert_eq!(again, list, "the view changed across a restart");
}
