//! A boot storm in CI (issue 12): 500 simulated phones, all starting within one second, boot
//! intact from `branchtftp serve --root` (the generator is benches/storm/phones.rs, shared with
//! the benchmark that runs 5,000).

mod support;

#[path = "../benches/storm/phones.rs"]
mod phones;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_phones_booting_at_once_all_boot_intact() {
    let root = tempfile::tempdir().unwrap();
    phones::write_files(root.path(), 500);
    make_world_readable(root.path());
    let cache = tempfile::tempdir().unwrap();
    let yaml = format!(
        "log: warn\ncache:\n  dir: {}\nhttp:\n  listen: []\nadmin:\n  listen: null\n",
        cache.path().display()
    );
    let bt = Branchtftp::serve_config(root.path(), &yaml);
    let started = Instant::now();
    let boots = phones::storm(bt.addr, 500, Duration::from_secs(1)).await;
    let wall = started.elapsed();
    let failed: Vec<_> = boots.iter().filter(|b| !b.booted).collect();
    assert!(
        failed.is_empty(),
        "{} of 500 phones failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    // Generous for a shared 2-core CI machine; on an idle one this takes 2-3 s.
    assert!(wall < Duration::from_secs(30), "wall {wall:?}");
}

/// Voluntary context switches of each TFTP event-loop thread of process `pid`.
fn loop_wakeups(pid: u32) -> Vec<(String, u64)> {
    let mut loops = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !name.starts_with("tftp-loop") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        loops.push((name.trim().to_string(), switches));
    }
    loops.sort();
    loops
}

/// A finished transfer leaves its retransmission deadline queued (a heap does not remove
/// entries); a loop that woke up for each of them would wake once per file a second after a
/// storm. An idle engine sleeps until there is something to do.
#[tokio::test]
async fn an_idle_engine_does_not_wake_for_transfers_that_already_ended() {
    let files = TestFiles::with_sizes(&[("SEP001122334455.cnf.xml", 1500)]);
    let bt = Branchtftp::serve(files.path());
    for opts in [&[][..], &[("blksize", "1428"), ("tsize", "0")][..]] {
        for _ in 0..4 {
            let run = raw_tftp_get(bt.addr, b"SEP001122334455.cnf.xml", "octet", opts).await;
            assert!(
                matches!(run.outcome, RawOutcome::Data(ref d) if d.len() == 1500),
                "{:?}",
                run.outcome
            );
        }
    }
    // The transfers' deadlines are 1 s after their last DATA; watch past them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = loop_wakeups(bt.pid());
    assert!(
        !before.is_empty(),
        "no tftp-loop threads in /proc/{}",
        bt.pid()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = loop_wakeups(bt.pid());
    assert_eq!(before, after, "event loops woke up while idle");
}
