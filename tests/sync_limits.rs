//! Limits on the work an upstream can make the sync worker do (issue 11, item 8): a `.loads`
//! listing 100,000 images, firmware that would pin more than its share of the cache, a
//! `ConfigFileCacheList.txt` larger than any cluster's, and a proxy's 200 error page arriving
//! as a new version of a trust list or config.

mod support;
#[path = "sync_common/mod.rs"]
mod sync_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use branchtftp::config::{SyncConfig, UpstreamConfig};
use branchtftp::name::FileName;
use branchtftp::sync::{PassResult, SystemClock};

use support::*;
use sync_common::*;

fn rig(upstream: &str, max_size: u64, tune: impl FnOnce(&mut SyncConfig)) -> SyncRig {
    let mut settings = SyncConfig {
        prefetch: Vec::new(),
        ..SyncConfig::default()
    };
    tune(&mut settings);
    let upstream = UpstreamConfig {
        timeout: Duration::from_secs(5),
        ..UpstreamConfig::new(upstream)
    };
    SyncRig::new(&[upstream], max_size, settings, Arc::new(SystemClock))
}

fn planned_load(origin: &HttpOrigin, load: &str, images: &[(String, usize)]) {
    let mut text = String::from("# load\r\n");
    for (name, size) in images {
        text.push_str(&format!("{name}\r\n"));
        if *size > 0 {
            origin.put_file(name, pseudo_random_bytes(*size as u64, *size));
        }
    }
    let own = format!("{load}.loads");
    origin.put_file(&own, signed_loads(&own, &text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_listing_a_hundred_thousand_images_is_refused_in_linear_time() {
    let origin = HttpOrigin::start();
    let images: Vec<(String, usize)> = (0..100_000)
        .map(|i| (format!("image{i:06}.sbn"), 0))
        .collect();
    planned_load(&origin, "huge.1-0", &images);
    let r = rig(&origin.url(), 1 << 32, |s| {
        s.loads = vec!["huge.1-0".into()]
    });
    let started = Instant::now();
    r.pass().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The listing itself is cached; not one of its images was asked for.
    assert_eq!(origin.gets("huge.1-0.loads"), 1);
    assert_eq!(origin.total_requests(), 2, "list + .loads only");
    let l = &r.syncer.load_readiness()[0];
    assert!(!l.ready && l.images == 0, "{l:?}");

    // Within the limit the same load is staged.
    let origin = HttpOrigin::start();
    planned_load(
        &origin,
        "small.1-0",
        &images[..3]
            .iter()
            .map(|(n, _)| (n.clone(), 100))
            .collect::<Vec<_>>(),
    );
    let r = rig(&origin.url(), 1 << 32, |s| {
        s.loads = vec!["small.1-0".into()];
        s.max_load_images = 3;
    });
    r.pass().await;
    assert!(r.syncer.load_readiness()[0].ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_firmware_stays_within_its_share_of_the_cache() {
    let origin = HttpOrigin::start();
    let images: Vec<(String, usize)> = (0..3)
        .map(|i| (format!("part{i}.2-0.sbn"), 700_000))
        .collect();
    planned_load(&origin, "big.2-0", &images);
    // 4 MB cache, 50%: 2 MB may be pinned; the load is 2.1 MB.
    let r = rig(&origin.url(), 4_000_000, |s| {
        s.loads = vec!["big.2-0".into()];
        s.max_pinned = 50;
    });
    let rep = r.pass().await;
    let pinned: u64 = r
        .cache
        .list()
        .iter()
        .filter(|e| e.pinned)
        .map(|e| e.size)
        .sum();
    assert!(pinned <= 2_000_000, "{pinned} bytes pinned");
    assert!(pinned >= 1_400_000, "{pinned} bytes pinned");
    assert_eq!(rep.result, PassResult::Partial);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("left unpinned") && p.contains("sync.max_pinned")),
        "{:?}",
        rep.problems
    );
    // Nothing more is fetched while pinned firmware fills its share.
    let second = r.pass().await;
    assert_eq!(second.total().fetched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_list_is_parsed_as_it_streams_and_cut_at_its_bound() {
    let origin = HttpOrigin::with_files([("SEP001122AABBCC.cnf.xml", "<device/>")]);
    // 400,000 entries (about 11 MB), twice the 200,000 a pass reads; this branch's phone first.
    let mut list = String::with_capacity(12 << 20);
    list.push_str("SEP001122AABBCC.cnf.xml 9\n");
    for i in 0..400_000u32 {
        list.push_str(&format!("SEP00AA{i:08X}.cnf.xml 4321\n"));
    }
    let total = list.len() as u64;
    origin.put_file("ConfigFileCacheList.txt", list);
    // Streamed in 16 KiB chunks, so what the origin sent is what the pass asked for.
    origin.set_bandwidth(Some(1 << 30));
    let r = rig(&origin.url(), 1 << 32, |_| {});
    r.syncer
        .learn_from_phone(&FileName::parse("SEP001122AABBCC.cnf.xml").unwrap());
    let rep = r.pass().await;
    assert_eq!(rep.result, PassResult::Ok, "{rep:?}");
    // What a restart would remember of the phone's config: the length the list gave.
    r.syncer.save_known();
    let kept = std::fs::read(r.cache.dir().join("sync-known.json")).unwrap();
    let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    let sep = &kept["names"]["sep001122aabbcc.cnf.xml"];
    assert_eq!(sep["listed_size"], 9, "the list was read: {sep}");
    let sent = origin.body_bytes_sent();
    assert!(
        sent < total * 3 / 4,
        "{sent} of {total} bytes of the list were sent: not cut at the bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_error_page_never_replaces_a_trust_list_or_config() {
    let itl = {
        let mut v = vec![0x01, 0x00, 0x02, 0x01, 0x02, 0x02, 0x00, 0x02, 0x01, 0x50];
        v.extend(pseudo_random_bytes(5, 2000));
        v
    };
    let cnf = b"<?xml version=\"1.0\"?>\n<device><loadInformation>SIP45.9-4-2</loadInformation></device>\n".to_vec();
    let origin = HttpOrigin::with_files([
        ("ITLFile.tlv", itl.clone()),
        ("SEP001122AABBCC.cnf.xml", cnf.clone()),
    ]);
    let r = rig(&origin.url(), 1 << 32, |s| s.discover = false);
    for n in ["ITLFile.tlv", "SEP001122AABBCC.cnf.xml"] {
        r.syncer.learn_from_phone(&FileName::parse(n).unwrap());
    }
    assert_eq!(r.pass().await.total().fetched, 2);

    let page = b"<html><head><title>502 Bad Gateway</title></head><body><hr>proxy</body></html>";
    origin.put_file("ITLFile.tlv", &page[..]);
    origin.put_file("SEP001122AABBCC.cnf.xml", &page[..]);
    let rep = r.pass().await;
    assert_eq!(rep.total().failed, 2, "{rep:?}");
    assert!(rep
        .problems
        .iter()
        .all(|p| p.contains("update refused, old version kept")));
    assert_eq!(r.content("ITLFile.tlv"), itl);
    assert_eq!(r.content("SEP001122AABBCC.cnf.xml"), cnf);

    // A real new version goes through.
    let cnf2 = b"<device><loadInformation>SIP45.9-4-3</loadInformation></device>".to_vec();
    origin.put_file("SEP001122AABBCC.cnf.xml", cnf2.clone());
    origin.put_file("ITLFile.tlv", itl.clone());
    let rep = r.pass().await;
    assert_eq!(rep.total().updated, 1, "{rep:?}");
    assert_eq!(r.content("SEP001122AABBCC.cnf.xml"), cnf2);
}
