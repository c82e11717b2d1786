//! The miss path across a simulated WAN (50 ms RTT, 20 Mbit/s), for a 30 MB firmware image:
//!
//! 1. the WAN's own transfer time for the file (curl over HTTP, straight through the link);
//! 2. a cold miss through branchtftp (the phone is curl over TFTP, blksize 1428, on the LAN
//!    side; branchtftp fetches over HTTP through the link and streams the file through);
//! 3. the same phone fetching directly from the central server (tftpd-hpa) by lock-step TFTP
//!    across the same link: a prefix is measured and extrapolated linearly (each block costs
//!    one round trip, so time is linear in size);
//! 4. a warm hit from the branch cache.
//!
//! Targets (issue 4): (2) ≤ 1.2 × (1) and (4) ≥ 50 × faster than (3).
//!
//! Run: `cargo bench --bench wan_miss` (needs curl and tftpd-hpa; `tests/run.sh` installs them).
//! `WAN_MISS_RUNS` (default 3) sets the runs per measurement; (1) and (2) are interleaved.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::*;

const SIZE: usize = 30_000_000;
/// The lock-step prefix actually transferred for (3).
const PREFIX: usize = 512 * 1024;
const BLKSIZE: u16 = 1428;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let runs: usize = std::env::var("WAN_MISS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let link = WanLink::with_rtt(Duration::from_millis(50)).mbit(20);
    let image = bytes::Bytes::from(pseudo_random_bytes(0x5eed, SIZE));
    let sha = sha256_bytes(&image);

    // The central server: HTTP (6970) for the branch and for (1), TFTP for the direct phone.
    let origin = HttpOrigin::start();
    for i in 0..runs {
        origin.put_file(&format!("wan-{i}.sbn"), image.clone());
        origin.put_file(&format!("cold-{i}.sbn"), image.clone());
    }
    let http_wan = WanRelay::tcp(origin.addr(), link);
    let mut central_files = TestFiles::new();
    central_files.add_bytes("prefix.sbn", &image[..PREFIX]);
    let central_tftp = TftpdHpa::start(central_files.path());
    let tftp_wan = WanRelay::udp(central_tftp.addr, link);

    // The branch.
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let yaml = format!(
        "log: warn\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: \"127.0.0.1:{}\"\n\
         upstreams:\n  - url: http://{}\n    timeout: 10s\n\
         sync:\n  prefetch: []\n  discover: false\n  config_list: false\n",
        dir.path().join("cache").display(),
        free_tcp_port(),
        http_wan.addr()
    );
    let branch = Branchtftp::serve_config(root.path(), &yaml);
    let out = scratch_dir();
    let dest = out.path().join("out.bin");

    eprintln!(
        "wan_miss: {} MB image, link {:?} RTT, 20 Mbit/s, {runs} run(s) each",
        SIZE / 1_000_000,
        link.rtt()
    );
    let (mut wan, mut cold) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let wan_run = || {
            let run = rt.block_on(curl_http_get(
                &format!("http://{}/wan-{i}.sbn", http_wan.addr()),
                &dest,
                &[],
            ));
            assert_eq!(run.output_sha256().as_deref(), Some(sha.as_str()), "{run}");
            run.elapsed.as_secs_f64()
        };
        let cold_run = || {
            let run = rt.block_on(curl_tftp_get(
                branch.addr,
                &format!("cold-{i}.sbn"),
                &dest,
                Some(BLKSIZE),
            ));
            run.assert_intact(&sha);
            run.elapsed.as_secs_f64()
        };
        // Alternate which goes first, so drift in the machine's load hits both alike.
        if i % 2 == 0 {
            wan.push(wan_run());
            cold.push(cold_run());
        } else {
            cold.push(cold_run());
            wan.push(wan_run());
        }
        eprintln!(
            "  run {}: WAN {:.2} s, cold miss {:.2} s",
            i + 1,
            wan[i],
            cold[i]
        );
    }
    assert_eq!(
        origin.gets("cold-0.sbn"),
        1,
        "one upstream fetch per cold miss"
    );

    // (3) Direct, lock-step across the WAN: a prefix, extrapolated.
    let prefix_dest = out.path().join("prefix.bin");
    let direct = rt.block_on(curl_tftp_get(
        tftp_wan.addr(),
        "prefix.sbn",
        &prefix_dest,
        Some(BLKSIZE),
    ));
    direct.assert_intact(central_files.sha256("prefix.sbn"));
    let direct_prefix = direct.elapsed.as_secs_f64();
    let direct_full = direct_prefix * SIZE as f64 / PREFIX as f64;
    eprintln!("  direct lock-step: {PREFIX} bytes in {direct_prefix:.2} s");

    // (4) Warm hits.
    let mut warm = Vec::new();
    for _ in 0..runs.max(3) {
        let run = rt.block_on(curl_tftp_get(
            branch.addr,
            "cold-0.sbn",
            &dest,
            Some(BLKSIZE),
        ));
        run.assert_intact(&sha);
        warm.push(run.elapsed.as_secs_f64());
    }

    let (wan, cold, warm) = (median(wan), median(cold), median(warm));
    let cold_ratio = cold / wan;
    let warm_speedup = direct_full / warm;
    println!();
    println!(
        "30 MB firmware image ({SIZE} bytes), WAN 50 ms RTT / 20 Mbit/s (WanRelay), phone = curl \
         TFTP blksize {BLKSIZE}; medians of {runs} run(s)"
    );
    println!("| # | measurement | seconds | ratio | target |");
    println!("| --- | --- | ---: | ---: | --- |");
    println!("| 1 | WAN transfer time (curl HTTP straight through the link) | {wan:.2} | 1.00 | |");
    println!(
        "| 2 | cold miss through branchtftp (stream-through) | {cold:.2} | {cold_ratio:.2} × (1) | ≤ 1.20 × (1): {} |",
        if cold_ratio <= 1.2 { "met" } else { "MISSED" }
    );
    println!(
        "| 3 | direct lock-step TFTP from central (tftpd-hpa) across the WAN, blksize {BLKSIZE}: \
         {} KiB measured in {direct_prefix:.2} s, extrapolated linearly to {SIZE} bytes | {direct_full:.0} | {:.1} × (1) | |",
        PREFIX / 1024,
        direct_full / wan
    );
    println!(
        "| 4 | warm hit from the branch cache | {warm:.2} | (3) / (4) = {warm_speedup:.0} × faster | ≥ 50 × faster than (3): {} |",
        if warm_speedup >= 50.0 { "met" } else { "MISSED" }
    );
    drop(branch);
}
