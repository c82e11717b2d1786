//! The cache's everyday contract: atomic publish, readers never disturbed, LRU quota with pins
//! and in-use files, metadata that survives a restart.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use branchtftp::cache::{
    Cache, CacheError, ClassRule, ClassRules, FileClass, PublishMeta, Validators,
};
use branchtftp::config::Config;
use branchtftp::name::FileName;
use sha2::{Digest, Sha256};

fn open(dir: &Path, max: u64) -> Cache {
    Cache::open(dir, max, ClassRules::default()).unwrap().0
}

fn name(raw: &str) -> FileName {
    FileName::parse(raw).unwrap()
}

fn publish(cache: &Cache, raw: &str, bytes: &[u8]) -> branchtftp::cache::Entry {
    let mut p = cache.publisher(&name(raw)).unwrap();
    p.write_all(bytes).unwrap();
    p.commit(PublishMeta {
        source: "http://central:6970".into(),
        validators: Validators::default(),
        expected_size: Some(bytes.len() as u64),
    })
    .unwrap()
}

fn read(cache: &Cache, raw: &str) -> Option<Vec<u8>> {
    let mut f = cache.open_file(name(raw).key()).unwrap()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    Some(v)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn tmp_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
}

#[test]
fn published_file_is_served_byte_exact_under_any_letter_case() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    let body = b"<device><loadInformation>sip88xx.14-2-1-0101-15</loadInformation></device>";
    let e = publish(&cache, "SEP001122AABBCC.cnf.xml", body);
    assert_eq!(e.name, "SEP001122AABBCC.cnf.xml");
    assert_eq!(e.key, "sep001122aabbcc.cnf.xml");
    assert_eq!(e.sha256, sha(body));
    assert_eq!(e.class, FileClass::Config);
    assert_eq!(read(&cache, "/sep001122aabbcc.CNF.XML").unwrap(), body);
    let again = cache.open_file(e.key.as_str()).unwrap().unwrap();
    assert_eq!(again.entry.hits, 2);
    assert_eq!(cache.totals(), (1, body.len() as u64));
    assert!(cache.open_file("ctlsep001122aabbcc.tlv").unwrap().is_none());
}

#[test]
fn locale_paths_become_subdirectories() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    let e = publish(&cache, "English_United_States/mk-sip.jar", &[7u8; 5000]);
    assert_eq!(e.class, FileClass::Locale);
    assert!(d
        .path()
        .join("files/english_united_states/mk-sip.jar")
        .is_file());
    assert_eq!(
        read(&cache, "english_united_states\\MK-SIP.jar")
            .unwrap()
            .len(),
        5000
    );
}

#[test]
fn abandoned_or_short_publishes_leave_nothing_indexed() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    publish(&cache, "dialplan.xml", b"old dial plan");

    // Dropped mid-write (the upstream connection died).
    let mut p = cache.publisher(&name("dialplan.xml")).unwrap();
    p.write_all(b"new dial pl").unwrap();
    drop(p);
    // Explicit abort.
    let mut p = cache.publisher(&name("new.xml")).unwrap();
    p.write_all(b"x").unwrap();
    p.abort();
    // The upstream announced more than arrived.
    let mut p = cache.publisher(&name("dialplan.xml")).unwrap();
    p.write_all(b"new dial pl").unwrap();
    let err = p
        .commit(PublishMeta {
            expected_size: Some(20),
            ..PublishMeta::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::SizeMismatch {
                expected: 20,
                got: 11,
                ..
            }
        ),
        "{err}"
    );

    assert_eq!(read(&cache, "dialplan.xml").unwrap(), b"old dial plan");
    assert!(cache.get("new.xml").is_none());
    assert_eq!(cache.totals(), (1, 13));
    assert!(tmp_is_empty(d.path()));
}

#[test]
fn reader_keeps_the_version_it_opened_across_a_replace() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    let v1 = vec![1u8; 300_000];
    let v2 = vec![2u8; 100_000];
    publish(&cache, "SEP001122AABBCC.cnf.xml", &v1);
    let mut reader = cache.open_file("sep001122aabbcc.cnf.xml").unwrap().unwrap();
    let mut first = vec![0u8; 1000];
    reader.read_exact(&mut first).unwrap();
    publish(&cache, "SEP001122AABBCC.cnf.xml", &v2);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    assert_eq!(
        first, v1,
        "a phone mid-transfer must get the whole old file"
    );
    assert_eq!(reader.entry.sha256, sha(&v1));
    assert_eq!(read(&cache, "SEP001122AABBCC.cnf.xml").unwrap(), v2);
}

#[test]
fn readers_during_publishes_see_whole_old_or_whole_new() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    let a = vec![b'a'; 120_000];
    let b = vec![b'b'; 70_001];
    publish(&cache, "XMLDefault.cnf.xml", &a);
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (cache, stop, a, b) = (cache.clone(), stop.clone(), a.clone(), b.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut f = cache.open_file("xmldefault.cnf.xml").unwrap().unwrap();
                let mut got = Vec::new();
                f.read_to_end(&mut got).unwrap();
                assert!(got == a || got == b, "torn read of {} bytes", got.len());
                assert_eq!(got.len() as u64, f.entry.size);
                assert_eq!(sha(&got), f.entry.sha256, "entry and file disagree");
                n += 1;
            }
            n
        }));
    }
    for i in 0..60 {
        publish(
            &cache,
            "XMLDefault.cnf.xml",
            if i % 2 == 0 { &b } else { &a },
        );
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u32 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
}

#[test]
fn quota_evicts_least_recently_used_but_never_pinned_or_in_use() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1000);
    let pause = || std::thread::sleep(std::time::Duration::from_millis(3));
    for n in ["a", "b", "c", "d", "e"] {
        publish(&cache, n, &[0u8; 200]);
        pause();
    }
    assert_eq!(cache.totals(), (5, 1000));
    // Oldest first: a b c d e. Touch a, pin b, hold c open.
    drop(cache.open_file("a").unwrap().unwrap());
    pause();
    cache.set_pinned("b", true).unwrap();
    let held = cache.open_file("c").unwrap().unwrap();
    pause();
    // Now LRU order among candidates: d e a (b pinned, c in use).
    let present = |c: &Cache| -> String {
        c.list()
            .iter()
            .map(|e| e.key.as_str())
            .collect::<Vec<_>>()
            .join("")
    };
    publish(&cache, "f", &[0u8; 200]);
    assert_eq!(present(&cache), "abcef");
    pause();
    publish(&cache, "g", &[0u8; 200]);
    assert_eq!(present(&cache), "abcfg");
    pause();
    publish(&cache, "h", &[0u8; 200]);
    assert_eq!(
        present(&cache),
        "bcfgh",
        "a was used before f, g, h were published"
    );
    pause();
    publish(&cache, "i", &[0u8; 200]);
    assert_eq!(present(&cache), "bcghi", "c is still in use, so f goes");
    drop(held);
    pause();
    publish(&cache, "j", &[0u8; 200]);
    assert_eq!(
        present(&cache),
        "bghij",
        "once closed, c is the least recently used"
    );
    assert!(
        !d.path().join("files/a").exists(),
        "evicted files leave the disk"
    );
    assert_eq!(cache.totals(), (5, 1000));
}

#[test]
fn explicit_evict_and_remove_if_unpinned() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    publish(&cache, "ringlist.xml", b"rings");
    cache.set_pinned("ringlist.xml", true).unwrap();
    assert!(!cache.remove_if_unpinned("ringlist.xml").unwrap());
    assert!(cache.get("ringlist.xml").is_some());
    let reader = cache.open_file("ringlist.xml").unwrap().unwrap();
    assert!(cache.evict("ringlist.xml").unwrap());
    assert!(!cache.evict("ringlist.xml").unwrap());
    assert!(cache.get("ringlist.xml").is_none());
    assert!(!d.path().join("files/ringlist.xml").exists());
    let mut r = reader;
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "rings", "a reader finishes its copy after an evict");
    assert!(matches!(
        cache.set_pinned("ringlist.xml", true),
        Err(CacheError::NotCached(_))
    ));
}

#[test]
fn hits_pins_and_validators_survive_a_restart() {
    let d = tempfile::tempdir().unwrap();
    {
        let cache = open(d.path(), u64::MAX);
        publish(&cache, "SEP001122AABBCC.cnf.xml", b"cfg");
        for _ in 0..3 {
            cache.open_file("sep001122aabbcc.cnf.xml").unwrap().unwrap();
        }
        cache.set_pinned("sep001122aabbcc.cnf.xml", true).unwrap();
        cache
            .mark_validated(
                "sep001122aabbcc.cnf.xml",
                Validators {
                    etag: Some("\"abc\"".into()),
                    last_modified: None,
                    upstream_size: Some(3),
                },
            )
            .unwrap();
    }
    let (cache, report) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
    assert_eq!(report.repairs(), 0, "{report:?}");
    let e = cache.get("sep001122aabbcc.cnf.xml").unwrap();
    assert_eq!(e.hits, 3);
    assert!(e.pinned);
    assert_eq!(e.validators.etag.as_deref(), Some("\"abc\""));
    assert_eq!(e.source, "http://central:6970");
    assert!(e.validated_at >= e.fetched_at);
}

#[test]
fn republishing_identical_bytes_keeps_hits_and_pin() {
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    publish(&cache, "softkeys.xml", b"keys");
    cache.open_file("softkeys.xml").unwrap();
    cache.set_pinned("softkeys.xml", true).unwrap();
    let e = publish(&cache, "SoftKeys.xml", b"keys");
    assert_eq!(e.hits, 1);
    assert!(e.pinned);
    assert_eq!(e.name, "softkeys.xml");
    assert_eq!(cache.totals(), (1, 4));
    assert!(tmp_is_empty(d.path()));
}

#[test]
fn a_second_owner_of_the_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let _first = open(d.path(), u64::MAX);
    let err = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap_err();
    assert!(matches!(err, CacheError::Locked(_)), "{err}");
    assert!(err.to_string().contains("in use by another branchtftp"));
}

#[test]
fn class_rules_from_yaml_override_the_defaults() {
    let cfg = Config::from_yaml(
        "cache:\n  classes:\n    - pattern: '*.foo'\n      class: firmware\n    - pattern: 'dialplan.xml'\n      class: config\n",
        "test.yaml",
    )
    .unwrap();
    assert_eq!(
        cfg.cache.classes[0],
        ClassRule {
            pattern: "*.foo".into(),
            class: FileClass::Firmware
        }
    );
    assert!(Config::from_yaml(
        "cache:\n  classes:\n    - pattern: '*.foo'\n      class: bogus\n",
        "t.yaml"
    )
    .is_err());
    let d = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(d.path(), u64::MAX, ClassRules::new(cfg.cache.classes)).unwrap();
    assert_eq!(publish(&cache, "x.FOO", b"1").class, FileClass::Firmware);
    assert_eq!(
        publish(&cache, "dialplan.xml", b"1").class,
        FileClass::Config
    );
    assert_eq!(
        publish(&cache, "g3-tones.xml", b"1").class,
        FileClass::Defaults
    );
}

#[test]
fn a_cached_file_stays_in_use_while_it_is_read() {
    use std::io::Read;
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), u64::MAX);
    publish(&cache, "kern.sbn", &[9u8; 70_000]);
    let mut f = cache.open_file("kern.sbn").unwrap().unwrap();
    let size = f.entry.size;
    assert!(cache.in_use("kern.sbn"));
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    assert_eq!(buf.len() as u64, size);
    drop(f);
    assert!(!cache.in_use("kern.sbn"));
}
