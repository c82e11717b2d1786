//! One sync pass over 5,000 unchanged config files against an HTTP origin that honours
//! conditional GET: how long it takes and how many bytes cross the WAN, as a share of the
//! files' total size. Targets (issue 5): at most 10 s on loopback, at most 5%.
//!
//!   cargo bench --bench sync_pass
//!
//! BENCH_FILES (default 5000) and BENCH_FILE_SIZE (bytes, default 6000: a typical CUCM phone
//! config) change the workload. The WAN bytes are counted by a zero-delay TCP relay between the
//! syncer and the origin, so they include every request and response header, not just bodies.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use branchtftp::cache::{Cache, ClassRules};
use branchtftp::config::{SyncConfig, UpstreamConfig};
use branchtftp::name::FileName;
use branchtftp::sync::{Progress, Scope, Syncer};
use branchtftp::upstream::flight::Fetcher;
use branchtftp::upstream::UpstreamChain;
use support::{pseudo_random_bytes, HttpOrigin, WanLink, WanRelay};

struct Quiet;
impl Progress for Quiet {}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent; keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sync_pass: run with `cargo bench --bench sync_pass`");
        return;
    }
    let files = env_or("BENCH_FILES", 5000);
    let size = env_or("BENCH_FILE_SIZE", 6000);
    let origin = HttpOrigin::start();
    let mut names = Vec::with_capacity(files);
    for i in 0..files {
        let name = format!("SEP00AA{i:08X}.cnf.xml");
        let mut body =
            format!("<device><id>{i}</id><loadInformation>SIP45.9-4-2SR3-1S</loadInformation>")
                .into_bytes();
        body.extend(
            pseudo_random_bytes(i as u64, size.saturating_sub(body.len() + 9))
                .iter()
                .map(|b| b'a' + b % 26),
        );
        body.extend(b"</device>");
        origin.put_file(&name, body);
        names.push(name);
    }
    let total_size: u64 = names
        .iter()
        .map(|n| origin.file(n).unwrap().len() as u64)
        .sum();
    let wan = WanRelay::tcp(origin.addr(), WanLink::new(Duration::ZERO));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(dir.path(), 1 << 34, ClassRules::default()).unwrap();
    let report = rt.block_on(async {
        let chain =
            UpstreamChain::new(&[UpstreamConfig::new(format!("http://{}", wan.addr()))]).unwrap();
        let fetcher = Fetcher::new(cache.clone(), chain, Duration::from_secs(30));
        let syncer = Syncer::new(
            fetcher,
            SyncConfig {
                prefetch: Vec::new(),
                ..SyncConfig::default()
            },
        );
        for n in &names {
            syncer.learn_from_phone(&FileName::parse(n).unwrap());
        }
        let t = Instant::now();
        let first = syncer.pass(Scope::Full, &Quiet).await;
        println!(
            "warm-up pass (cold cache): {} fetched in {:.2} s",
            first.total().fetched,
            t.elapsed().as_secs_f64()
        );
        wan.reset_counters();
        origin.reset_counters();
        syncer.pass(Scope::Full, &Quiet).await
    });
    let wan_bytes = wan.bytes_up() + wan.bytes_down();
    let t = report.total();
    let secs = report.duration.as_secs_f64();
    let share = 100.0 * wan_bytes as f64 / total_size as f64;
    println!(
        "revalidation pass: {files} files ({} MB): {} unchanged, {} updated, {} failed; {} requests, {} 304s at the origin, {} body bytes",
        total_size / 1_000_000,
        t.unchanged,
        t.updated,
        t.failed,
        report.requests,
        origin.not_modified(),
        origin.body_bytes_sent()
    );
    println!(
        "pass time: {secs:.2} s (target <= 10 s)   WAN bytes: {wan_bytes} = {share:.2}% of {total_size} (target <= 5%)"
    );
    let ok = secs <= 10.0 && share <= 5.0 && t.unchanged as usize == files;
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
}
