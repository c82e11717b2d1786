//! Cache benchmark: `cargo bench --bench cache`.
//!
//! With 100,000 indexed names: lookup + open p99 (target < 50 µs) and start-up, i.e. open with
//! the recovery scan (target < 2 s); then `verify` throughput over 1 GiB (target ≥ 300 MB/s).
//! `BENCH_CACHE_FILES` and `BENCH_VERIFY_MIB` shrink the run.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use branchtftp::cache::{Cache, ClassRules, PublishMeta};
use branchtftp::name::FileName;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Names as a big cluster has them: per-device configs, plus locale files in subdirectories.
fn key(i: usize) -> String {
    if i % 10 == 0 {
        format!("english_united_states/locale-{i:06}.xml")
    } else {
        format!("sep{i:012x}.cnf.xml")
    }
}

/// Lays 100k files straight into `files/` (as a cache whose index was lost would have them):
/// publishing each through fsyncs would take minutes and measure the disk, not the cache.
fn lay_files(dir: &Path, n: usize) {
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("english_united_states")).unwrap();
    for i in 0..n {
        let body = format!(
            "<device><name>{}</name>{}</device>",
            key(i),
            "x".repeat(200)
        );
        std::fs::write(files.join(key(i)), body).unwrap();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n = env_or("BENCH_CACHE_FILES", 100_000);
    let verify_mib = env_or("BENCH_VERIFY_MIB", 1024);
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // --- 100k names -----------------------------------------------------------------------
    let d = tempfile::tempdir().unwrap();
    let t = Instant::now();
    lay_files(d.path(), n);
    eprintln!("laid out {n} files in {:?}", t.elapsed());
    let t = Instant::now();
    let (cache, report) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
    let rebuild = t.elapsed();
    assert_eq!(report.files_reindexed, n as u64);
    drop(cache);
    rows.push((
        format!("rebuild index from {n} files (index lost)"),
        format!("{:.2} s", rebuild.as_secs_f64()),
        "-".into(),
    ));

    let mut startups = Vec::new();
    let mut cache = None;
    for _ in 0..3 {
        drop(cache.take());
        let t = Instant::now();
        let (c, report) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
        startups.push(t.elapsed());
        assert_eq!(report.files, n as u64);
        assert_eq!(report.repairs(), 0);
        cache = Some(c);
    }
    let cache = cache.unwrap();
    startups.sort();
    rows.push((
        format!("start-up: open + recovery scan, {n} entries (median of 3)"),
        format!("{:.3} s", startups[1].as_secs_f64()),
        "< 2 s".into(),
    ));

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let keys: Vec<String> = (0..n).map(key).collect();
    // Warm up, then measure each lookup + open on its own.
    for k in keys.iter().take(10_000) {
        drop(cache.open_file(k).unwrap().unwrap());
    }
    let samples = 200_000;
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let k = &keys[(rng.next() % n as u64) as usize];
        let t = Instant::now();
        let f = cache.open_file(k).unwrap();
        let el = t.elapsed();
        assert!(f.is_some());
        drop(f);
        lat.push(el);
    }
    lat.sort();
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    rows.push((
        "lookup + open of a cached file, p50".into(),
        us(percentile(&lat, 0.50)),
        "-".into(),
    ));
    rows.push((
        "lookup + open of a cached file, p99".into(),
        us(percentile(&lat, 0.99)),
        "< 50 µs".into(),
    ));
    rows.push((
        "lookup + open of a cached file, p99.9".into(),
        us(percentile(&lat, 0.999)),
        "-".into(),
    ));
    let mut miss = Vec::with_capacity(samples);
    for i in 0..samples {
        let k = format!("ctlsep{i:012x}.tlv");
        let t = Instant::now();
        let f = cache.open_file(&k).unwrap();
        miss.push(t.elapsed());
        assert!(f.is_none());
    }
    miss.sort();
    rows.push((
        "lookup of a name not cached (miss), p99".into(),
        us(percentile(&miss, 0.99)),
        "-".into(),
    ));
    drop(cache);
    drop(d);

    // --- verify throughput ----------------------------------------------------------------
    let d = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
    let file_mib = 16;
    let mut chunk = vec![0u8; 1 << 20];
    for f in 0..(verify_mib / file_mib).max(1) {
        let name = FileName::parse(&format!("image{f:03}.sbn")).unwrap();
        let mut p = cache.publisher(&name).unwrap();
        for _ in 0..file_mib {
            for w in chunk.chunks_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            p.write_all(&chunk).unwrap();
        }
        p.commit(PublishMeta::default()).unwrap();
    }
    let (_, bytes) = cache.totals();
    let t = Instant::now();
    let report = cache.verify(|_| {}).unwrap();
    let el = t.elapsed();
    assert!(report.is_clean());
    assert_eq!(report.bytes, bytes);
    rows.push((
        format!(
            "verify: re-hash {} MiB in {} files (page cache warm)",
            bytes >> 20,
            report.files
        ),
        format!("{:.0} MB/s", bytes as f64 / el.as_secs_f64() / 1e6),
        ">= 300 MB/s".into(),
    ));

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap();
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap();
    println!("{:<w0$}  {:>w1$}  target", "measure", "figure");
    for (m, f, target) in rows {
        println!("{m:<w0$}  {f:>w1$}  {target}");
    }
}
