//! `app::Appliance` in-process, as `serve`, `demo` and embedding code start it: the addresses it
//! bound, a miss served to a real client, a reload applied on request, and a shutdown that
//! returns once every task it started (the TFTP server, the HTTP fronts, the sync worker, the
//! flights, the phones view) has ended.

mod support;

use std::time::{Duration, Instant};

use branchtftp::app::{Appliance, Mode};
use branchtftp::config::ConfigSource;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_starts_serves_reloads_and_shuts_down_joining_every_task() {
    let origin = HttpOrigin::with_files([("SEP001122AABBCC.cnf.xml", vec![7u8; 30_000])]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("branchtftp.yaml");
    let yaml = |allow: &str| {
        format!(
            "tftp:\n  listen: [\"127.0.0.1:0\"]\nhttp:\n  listen: [\"127.0.0.1:0\"]\n\
             admin:\n  listen: \"127.0.0.1:0\"\ncache:\n  dir: {}\nupstreams:\n  - url: {}\n\
             access:\n  allow: [\"{allow}\"]\n",
            dir.path().join("cache").display(),
            origin.url()
        )
    };
    std::fs::write(&file, yaml("127.0.0.0/8")).unwrap();
    let source = ConfigSource::file(&file);
    let app = Appliance::start(source.load().unwrap(), Mode::Appliance, Some(source))
        .await
        .unwrap();
    let addrs = app.local_addrs().clone();
    assert!(addrs.tftp[0].port() != 0 && addrs.http[0].port() != 0);
    let admin = addrs.admin.expect("admin bound");
    assert!(admin_get(admin, "/healthz").await.contains("ok"));

    let out = scratch_dir();
    let dest = out.path().join("cnf");
    curl_tftp_get(addrs.tftp[0], "SEP001122AABBCC.cnf.xml", &dest, Some(1428))
        .await
        .assert_intact(&sha256_bytes(&[7u8; 30_000]));

    // A reload asked for directly applies the file at once: now loopback is refused.
    std::fs::write(&file, yaml("10.0.0.0/8")).unwrap();
    assert!(app.reload(), "a valid file is applied");
    let refused = curl_tftp_get(addrs.tftp[0], "SEP001122AABBCC.cnf.xml", &dest, Some(1428)).await;
    assert!(!refused.success(), "the reloaded access list applies");

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), app.shutdown())
        .await
        .expect("shutdown joins its tasks promptly when nothing is in flight")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // Everything it bound is released.
    std::net::UdpSocket::bind(addrs.tftp[0]).expect("TFTP port free after shutdown");
    std::net::TcpListener::bind(admin).expect("admin port free after shutdown");
}

/// Without upstreams a miss is "file not found" at once (a phone moves on past its absent CTL
/// file), never "unavailable": there is no upstream timeout to wait out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstreams_a_miss_is_not_found_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = branchtftp::config::Config::default();
    cfg.tftp.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.http.listen = vec![];
    cfg.admin.listen = None;
    cfg.cache.dir = dir.path().join("cache");
    cfg.upstreams.clear();
    let app = Appliance::start(cfg, Mode::Appliance, None).await.unwrap();
    let addr = app.local_addrs().tftp[0];
    for i in 0..20 {
        let miss = phone_get(addr, &format!("CTLSEP00112233CC{i:02X}.tlv")).await;
        assert_eq!(miss.result.unwrap_err(), 1, "file not found");
        assert!(miss.took < Duration::from_millis(500), "{:?}", miss.took);
    }
    app.shutdown().await.unwrap();
}
