//! `branchtftp demo` is the first thing a newcomer runs: it must finish, exit 0, and print a
//! table where the warm branch cache beats the direct WAN boot and moves no WAN bytes.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_boots_phones_direct_cold_and_warm_and_prints_the_table() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .arg("demo")
        .output()
        .expect("run branchtftp demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "demo took {:?}",
        started.elapsed()
    );
    let row = |label: &str| -> (f64, String) {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no `{label}` row in:\n{stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let secs: f64 = cells[2].trim_end_matches(" s").parse().unwrap();
        (secs, cells[3].to_string())
    };
    let (direct, direct_wan) = row("direct to central");
    let (cold, _) = row("through branchtftp, cold cache");
    let (warm, warm_wan) = row("through branchtftp, warm cache");
    assert!(
        cold < direct,
        "cold {cold} s not faster than direct {direct} s"
    );
    assert!(warm * 5.0 < direct, "warm {warm} s vs direct {direct} s");
    assert_eq!(warm_wan, "0 B", "a warm boot must not touch the WAN");
    assert!(direct_wan.ends_with("MiB"), "direct WAN bytes {direct_wan}");
    assert!(stdout.contains("matched the central server's sha256"));
}
