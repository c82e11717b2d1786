//! Start-up recovery: a lost or corrupt index is rebuilt from the files on disk (no upstream is
//! involved: the cache has none), and every inconsistency a crash can leave is repaired.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use branchtftp::cache::{Cache, ClassRules, FileClass, PublishMeta, Validators};
use branchtftp::name::FileName;
use sha2::{Digest, Sha256};

fn open(dir: &Path) -> (Cache, branchtftp::cache::RecoveryReport) {
    Cache::open(dir, u64::MAX, ClassRules::default()).unwrap()
}

fn publish(cache: &Cache, raw: &str, bytes: &[u8]) {
    let mut p = cache.publisher(&FileName::parse(raw).unwrap()).unwrap();
    p.write_all(bytes).unwrap();
    p.commit(PublishMeta {
        source: "http://central:6970".into(),
        validators: Validators {
            etag: Some("\"v1\"".into()),
            ..Validators::default()
        },
        expected_size: None,
    })
    .unwrap();
}

fn read(cache: &Cache, key: &str) -> Vec<u8> {
    let mut f = cache.open_file(key).unwrap().unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// A small branch: config, defaults, firmware and locale files.
fn seed(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("SEP001122AABBCC.cnf.xml", b"<device/>".to_vec()),
        ("XMLDefault.cnf.xml", vec![b'x'; 4000]),
        ("ITLFile.tlv", vec![3u8; 1500]),
        ("sip88xx.14-2-1-0101-15.loads", vec![4u8; 900]),
        (
            "kern88xx.14-2-1-0101-15.sgn",
            (0..200_000u32).map(|i| i as u8).collect(),
        ),
        ("English_United_States/mk-sip.jar", vec![6u8; 30_000]),
        ("Desktops/320x212x12/List.xml", b"<list/>".to_vec()),
    ];
    let (cache, _) = open(dir);
    let mut want = BTreeMap::new();
    for (n, b) in files {
        publish(&cache, n, &b);
        want.insert(FileName::parse(n).unwrap().key().to_string(), b);
    }
    want
}

fn assert_serves(cache: &Cache, want: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(cache.totals().0, want.len() as u64);
    for (key, bytes) in want {
        let e = cache.get(key).unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(e.sha256, hex::encode(Sha256::digest(bytes)), "{key}");
        assert_eq!(&read(cache, key), bytes, "{key}");
    }
}

#[test]
fn deleted_index_is_rebuilt_from_the_files_and_serves_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let want = seed(d.path());
    std::fs::remove_dir_all(d.path().join("index.sled")).unwrap();
    let (cache, report) = open(d.path());
    assert_eq!(report.files_reindexed, want.len() as u64, "{report:?}");
    assert_serves(&cache, &want);
    assert_eq!(
        cache.get("english_united_states/mk-sip.jar").unwrap().class,
        FileClass::Locale
    );
    // The files' origin labels (xattrs) give back spelling and source where supported.
    let itl = cache.get("itlfile.tlv").unwrap();
    if itl.source != "recovered" {
        assert_eq!(itl.name, "ITLFile.tlv");
        assert_eq!(itl.source, "http://central:6970");
        assert_eq!(itl.validators.etag.as_deref(), Some("\"v1\""));
    }
    drop(cache);
    let (_, again) = open(d.path());
    assert_eq!(
        again.repairs(),
        0,
        "the rebuilt index was persisted: {again:?}"
    );
}

#[test]
fn garbage_index_is_moved_aside_and_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let want = seed(d.path());
    // Overwrite every file of the sled directory with garbage of the same length.
    let mut seed_byte = 0x5au8;
    let mut stack = vec![d.path().join("index.sled")];
    while let Some(p) = stack.pop() {
        for de in std::fs::read_dir(&p).unwrap() {
            let path = de.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let len = std::fs::metadata(&path).unwrap().len().max(64) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|i| {
                    seed_byte = seed_byte.wrapping_mul(31).wrapping_add(i as u8 | 1);
                    seed_byte
                })
                .collect();
            std::fs::write(&path, junk).unwrap();
        }
    }
    let (cache, report) = open(d.path());
    let aside = report.index_moved_aside.clone().expect("index moved aside");
    assert!(aside.is_dir(), "{aside:?} kept for inspection");
    assert!(aside
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("index.sled.corrupt-"));
    assert_eq!(report.files_reindexed, want.len() as u64);
    assert_serves(&cache, &want);
}

#[test]
fn crash_leftovers_are_repaired_and_logged_in_the_report() {
    let d = tempfile::tempdir().unwrap();
    let want = seed(d.path());
    let files = d.path().join("files");
    // An interrupted publish.
    std::fs::write(d.path().join("tmp/999-1.part"), b"half a firm").unwrap();
    // A file lost behind the index's back.
    std::fs::remove_file(files.join("itlfile.tlv")).unwrap();
    // A file truncated (wrong size for its entry).
    std::fs::write(files.join("xmldefault.cnf.xml"), b"xx").unwrap();
    // A file with no entry (e.g. renamed in just before a crash).
    std::fs::write(files.join("g3-tones.xml"), b"tones").unwrap();
    // A file that can never be a key (keys are case-folded).
    std::fs::write(files.join("UPPER.xml"), b"?").unwrap();

    let (cache, report) = open(d.path());
    assert_eq!(report.temp_removed, 1, "{report:?}");
    assert_eq!(report.entries_dropped, 2, "{report:?}");
    assert_eq!(report.files_reindexed, 1, "{report:?}");
    assert_eq!(report.files_removed, 2, "{report:?}");
    assert!(cache.get("itlfile.tlv").is_none());
    assert!(cache.get("xmldefault.cnf.xml").is_none());
    assert!(!files.join("xmldefault.cnf.xml").exists());
    assert!(!files.join("UPPER.xml").exists());
    assert_eq!(read(&cache, "g3-tones.xml"), b"tones");
    assert!(std::fs::read_dir(d.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    let mut rest = want.clone();
    rest.remove("itlfile.tlv");
    rest.remove("xmldefault.cnf.xml");
    rest.insert("g3-tones.xml".into(), b"tones".to_vec());
    assert_serves(&cache, &rest);
    drop(cache);
    let (_, again) = open(d.path());
    assert_eq!(again.repairs(), 0, "{again:?}");
}

#[test]
fn over_quota_at_start_evicts_down_to_the_new_limit() {
    let d = tempfile::tempdir().unwrap();
    seed(d.path());
    let (cache, report) = Cache::open(d.path(), 50_000, ClassRules::default()).unwrap();
    assert!(report.evicted > 0);
    assert!(cache.totals().1 <= 50_000);
}
