//! An HTTP boot storm in CI (issue 12): 400 simulated phones, all starting within one second,
//! each over one keep-alive connection to the phones' HTTP port, boot intact from the cache of
//! a real `branchtftp serve` (the generator is benches/http_storm/phones.rs, shared with the
//! benchmark that runs 5,000 against nginx).

mod support;

#[path = "../benches/http_storm/phones.rs"]
mod phones;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const PHONES: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_phones_booting_over_http_at_once_all_boot_intact() {
    phones::raise_nofile_limit();
    let files = tempfile::tempdir().unwrap();
    phones::write_files(files.path(), PHONES);
    let state = tempfile::tempdir().unwrap();
    let http = localhost(free_tcp_port());
    let yaml = format!(
        "log: warn\ncache:\n  dir: {}\nhttp:\n  listen: [\"{http}\"]\nadmin:\n  listen: null\n",
        state.path().join("cache").display()
    );
    let config = state.path().join("import.yaml");
    std::fs::write(&config, &yaml).unwrap();
    // Every file a cache hit, as on a branch box after its first sync.
    let import = Command::new(branchtftp_bin())
        .args(["cache", "import"])
        .arg(files.path())
        .arg("-c")
        .arg(&config)
        .env_remove("BRANCHTFTP_CONFIG")
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    let no_overrides = tempfile::tempdir().unwrap();
    let _bt = Branchtftp::serve_config(no_overrides.path(), &yaml);
    wait_http(http);

    let started = Instant::now();
    let boots = phones::storm(http, PHONES, Duration::from_secs(1)).await;
    let wall = started.elapsed();
    let failed: Vec<_> = boots.iter().filter(|b| !b.booted).collect();
    assert!(
        failed.is_empty(),
        "{} of {PHONES} phones failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let resent: u32 = boots.iter().map(|b| b.resent).sum();
    assert_eq!(resent, 0, "no phone should have to try a file twice");
    // Generous for a shared 2-core CI machine; on an idle one this takes about 1.1 s.
    assert!(wall < Duration::from_secs(20), "wall {wall:?}");
}

fn wait_http(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
