//! Sync passes driven through the library against test origins: what revalidation costs, when a
//! file leaves the cache (and when it must not), the config list, pins following the configs,
//! TFTP upstreams without validators, and `sync.max_rate` pacing only the background.

mod support;
#[path = "sync_common/mod.rs"]
mod sync_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use branchtftp::config::{ConfigsMode, SyncConfig, UpstreamConfig};
use branchtftp::content::{Body, Found};
use branchtftp::name::FileName;
use branchtftp::sync::{PassResult, Scope, SystemClock};

use support::*;
use sync_common::*;

fn rig(upstreams: &[String], tune: impl FnOnce(&mut SyncConfig)) -> SyncRig {
    let upstreams: Vec<UpstreamConfig> = upstreams
        .iter()
        .map(|u| UpstreamConfig {
            timeout: Duration::from_secs(2),
            probe_interval: Duration::from_millis(300),
            ..UpstreamConfig::new(u)
        })
        .collect();
    let mut settings = SyncConfig {
        prefetch: Vec::new(),
        ..SyncConfig::default()
    };
    tune(&mut settings);
    SyncRig::new(&upstreams, 1 << 32, settings, Arc::new(SystemClock))
}

fn configs(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("SEP0011220{i:05X}.cnf.xml"),
                format!(
                    "<device><id>{i}</id>{}</device>",
                    "x".repeat(2000 + i % 100)
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn revalidating_unchanged_files_is_all_304s_and_no_body_bytes() {
    let files = configs(40);
    let origin = HttpOrigin::with_files(files.clone());
    let r = rig(&[origin.url()], |_| {});
    for (n, _) in &files {
        r.phone_asked(n);
    }
    let first = r.pass().await;
    assert_eq!(first.result, PassResult::Ok, "{first:?}");
    assert_eq!(first.total().fetched, 40);

    origin.reset_counters();
    let second = r.pass().await;
    assert_eq!(second.result, PassResult::Ok);
    assert_eq!(second.total().unchanged, 40);
    assert_eq!(origin.not_modified(), 40, "one 304 per file");
    assert_eq!(origin.responses_with_status(200), 0);
    assert_eq!(origin.body_bytes_sent(), 0);
    assert_eq!(second.wan_bytes, 0);
}

#[tokio::test]
async fn a_file_deleted_upstream_leaves_after_remove_after_passes_unless_pinned() {
    let origin = HttpOrigin::with_files([
        ("SEP001122AABBCC.cnf.xml", "a"),
        ("SEP001122AABBCD.cnf.xml", "b"),
    ]);
    let r = rig(&[origin.url()], |s| s.remove_after = 3);
    r.phone_asked("SEP001122AABBCC.cnf.xml");
    r.phone_asked("SEP001122AABBCD.cnf.xml");
    r.pass().await;
    r.cache.set_pinned("sep001122aabbcd.cnf.xml", true).unwrap();
    origin.remove_file("SEP001122AABBCC.cnf.xml");
    origin.remove_file("SEP001122AABBCD.cnf.xml");
    for pass in 1..=2 {
        r.pass().await;
        assert!(r.cached("SEP001122AABBCC.cnf.xml"), "removed after {pass}");
    }
    let third = r.pass().await;
    assert!(!r.cached("SEP001122AABBCC.cnf.xml"), "kept after 3 passes");
    assert_eq!(third.total().removed, 1);
    assert!(
        r.cached("SEP001122AABBCD.cnf.xml"),
        "a pinned file never leaves"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_deletes_nothing() {
    let origin = HttpOrigin::with_files([("SEP001122AABBCC.cnf.xml", "a")]);
    let alternate = HttpOrigin::start();
    let r = rig(&[origin.url(), alternate.url()], |s| s.remove_after = 2);
    r.phone_asked("SEP001122AABBCC.cnf.xml");
    r.pass().await;
    assert!(r.cached("SEP001122AABBCC.cnf.xml"));

    // The central server is gone; the alternate answers "not found" all along.
    origin.refuse();
    for _ in 0..4 {
        let rep = r.pass().await;
        assert_eq!(rep.result, PassResult::Unreachable);
        assert!(r.cached("SEP001122AABBCC.cnf.xml"));
    }
    // Back, and the central server no longer has the file: the count starts from zero.
    origin.restore();
    origin.remove_file("SEP001122AABBCC.cnf.xml");
    // The probe marks the central server up again within its interval.
    let central = r.fetcher.chain().central().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(2), central.wait_not_down())
        .await
        .expect("the probe sees the central server again");
    r.pass().await;
    assert!(
        r.cached("SEP001122AABBCC.cnf.xml"),
        "one not-found pass is not two"
    );
    r.pass().await;
    assert!(!r.cached("SEP001122AABBCC.cnf.xml"));
}

#[tokio::test]
async fn config_list_keeps_configs_of_phones_seen_here_or_all() {
    let files = configs(6);
    let origin = HttpOrigin::with_files(files.clone());
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    origin.publish_config_list(&names);

    // seen: only the phone that asked (its CTL file was the request) gets its config.
    let seen = rig(&[origin.url()], |s| s.configs = ConfigsMode::Seen);
    let mac = &names[2][..15];
    seen.syncer
        .learn_from_phone(&FileName::parse(&format!("ITL{mac}.tlv")).unwrap());
    seen.pass().await;
    for n in &names {
        assert_eq!(seen.cached(n), *n == names[2], "{n}");
    }

    let all = rig(&[origin.url()], |s| s.configs = ConfigsMode::All);
    all.pass().await;
    assert!(names.iter().all(|n| all.cached(n)));

    // Dropped from the list and from the server: gone after remove_after passes.
    origin.remove_file(names[0]);
    origin.publish_config_list(&names[1..]);
    for _ in 0..3 {
        all.pass().await;
    }
    assert!(!all.cached(names[0]));
    assert!(all.cached(names[1]));
}

#[tokio::test]
async fn firmware_follows_the_configs_pinned_then_unpinned() {
    let origin = HttpOrigin::start();
    publish_firmware(&origin, 10_000);
    let r = rig(&[origin.url()], |s| {
        s.prefetch = vec!["XMLDefault.cnf.xml".into()]
    });
    let rep = r.pass().await;
    assert_eq!(rep.result, PassResult::Ok, "{rep:?}");
    let models = firmware_models();
    let pinned = |name: &str| r.cache.get(&name.to_lowercase()).is_some_and(|e| e.pinned);
    for m in &models {
        assert!(pinned(&format!("{}.loads", m.load)));
        assert!(m.listed.iter().all(|i| pinned(i)), "{}", m.model);
    }

    // The cluster moves the 8865s off this load: its firmware may now be evicted.
    origin.put_file("XMLDefault.cnf.xml", xmldefault(&models[..1]));
    let rep = r.pass().await;
    assert_eq!(rep.unpinned, 1 + models[1].listed.len());
    assert!(models[1].listed.iter().all(|i| !pinned(i) && r.cached(i)));
    assert!(models[0].listed.iter().all(|i| pinned(i)));
    // Firmware is never revalidated: only presence.
    origin.reset_counters();
    r.pass().await;
    for m in &models {
        for s in &m.stored {
            assert_eq!(origin.requests(s), 0, "{s}");
        }
    }
}

#[tokio::test]
async fn tftp_upstream_without_validators_is_compared_by_content() {
    let mut tree = TestFiles::new();
    tree.add_bytes("SEP001122AABBCC.cnf.xml", b"<device>1</device>");
    let server = TftpdHpa::start(tree.path());
    let r = rig(&[format!("tftp://{}", server.addr)], |_| {});
    r.phone_asked("SEP001122AABBCC.cnf.xml");
    assert_eq!(r.pass().await.total().fetched, 1);
    let rep = r.pass().await;
    assert_eq!(rep.total().unchanged, 1, "same bytes: not republished");
    let before = r.cache.get("sep001122aabbcc.cnf.xml").unwrap();

    tree.add_bytes("SEP001122AABBCC.cnf.xml", b"<device>22</device>");
    make_world_readable(tree.path());
    let rep = r.pass().await;
    assert_eq!(rep.total().updated, 1);
    let after = r.cache.get("sep001122aabbcc.cnf.xml").unwrap();
    assert_ne!(before.sha256, after.sha256);
    assert_eq!(after.size, 19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_paces_the_sync_but_never_a_phone_miss() {
    let big = pseudo_random_bytes(7, 1_000_000);
    let origin = HttpOrigin::with_files([
        ("SEP001122AABBCC.cnf.xml", big.clone()),
        ("phone-wants-this.bin", big.clone()),
    ]);
    // 4 Mbit/s: a megabyte takes two seconds in the background.
    let r = rig(&[origin.url()], |s| s.max_rate = 4_000_000);
    r.phone_asked("SEP001122AABBCC.cnf.xml");
    let syncer = r.syncer.clone();
    let started = Instant::now();
    let pass = tokio::spawn(async move { syncer.pass(Scope::Full, &Quiet).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Meanwhile a phone misses on another megabyte: not paced.
    let miss_started = Instant::now();
    let name = FileName::parse("phone-wants-this.bin").unwrap();
    match r.fetcher.open(&name, Instant::now()).await {
        Ok(Found {
            body: Body::Stream(mut reader),
            ..
        }) => {
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut buf)
                .await
                .unwrap();
            assert_eq!(buf.len(), big.len());
        }
        _ => panic!("expected a miss"),
    }
    let miss = miss_started.elapsed();
    let rep = pass.await.unwrap();
    let background = started.elapsed();
    assert_eq!(rep.total().fetched, 1);
    assert!(
        background >= Duration::from_millis(1700),
        "sync not paced: {background:?}"
    );
    assert!(
        miss < Duration::from_millis(800),
        "miss was paced: {miss:?}"
    );
}
