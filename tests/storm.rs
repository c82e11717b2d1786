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
