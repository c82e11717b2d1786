//! Bad days with the default config (upstream `timeout: 10s`, `probe_interval: 5s`), the real
//! binary, real curl, and the WAN simulated by the in-process relay (20 ms RTT):
//!
//! 1. hang penalty: 20 phones boot at once (CTL miss, then their cached config, a locale file
//!    and a firmware image), first with a healthy WAN, then with the WAN hung (the relay accepts
//!    and carries nothing); the difference is what the hang costs a storm. Target ≤ one
//!    upstream timeout (10 s).
//! 2. recovery: with the upstream marked down by that hang, the WAN comes back; the time until
//!    a file never cached before is served to a phone. Target ≤ probe_interval + 2 s (7 s).
//!
//! There is no reference to compare with (tftpd-hpa has no upstream); the figures are printed
//! beside their targets. Run: `cargo bench --bench bad_days` (needs curl; one run, ~30 s).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::*;

const PHONES: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = HttpOrigin::start();
    origin.put_file("SEP0011223344EE.cnf.xml", vec![9u8; 4000]);
    let wan = WanRelay::tcp(origin.addr(), WanLink::with_rtt(Duration::from_millis(20)));
    let files = boot_files(PHONES);
    // No timeout or probe_interval keys: the defaults.
    let branch = Branch::start(
        &format!("upstreams:\n  - url: http://{}\n", wan.addr()),
        &files,
    );
    let (healthy, hung, longest) = rt.block_on(async {
        let (healthy, _) = storm(branch.addr(), &files, PHONES, 0xA0).await;
        wan.cut();
        let (hung, ctl) = storm(branch.addr(), &files, PHONES, 0xB0).await;
        let longest = ctl.iter().map(|&(_, took)| took).max().unwrap_or_default();
        (healthy, hung, longest)
    });
    let recovery = rt.block_on(async {
        wan.restore();
        until_served(
            branch.addr(),
            "SEP0011223344EE.cnf.xml",
            Duration::from_secs(120),
        )
        .await
    });
    let penalty = hung.saturating_sub(healthy);
    println!("bad days, default config (timeout {TIMEOUT:?}, probe_interval {PROBE_INTERVAL:?}), {PHONES} phones");
    println!(
        "  storm, healthy WAN ............ {:>6.2} s",
        healthy.as_secs_f64()
    );
    println!(
        "  storm, hung WAN ............... {:>6.2} s",
        hung.as_secs_f64()
    );
    println!(
        "  hang penalty .................. {:>6.2} s   target <= {:.0} s (one upstream timeout): {}",
        penalty.as_secs_f64(),
        TIMEOUT.as_secs_f64(),
        if penalty <= TIMEOUT { "met" } else { "MISSED" }
    );
    println!(
        "  longest miss wait, hung WAN ... {:>6.2} s   target <= {:.0} s (one upstream timeout): {}",
        longest.as_secs_f64(),
        TIMEOUT.as_secs_f64(),
        if longest <= TIMEOUT { "met" } else { "MISSED" }
    );
    let target = PROBE_INTERVAL + Duration::from_secs(2);
    println!(
        "  recovery to first served miss . {:>6.2} s   target <= {:.0} s (probe_interval + 2 s): {}",
        recovery.as_secs_f64(),
        target.as_secs_f64(),
        if recovery <= target { "met" } else { "MISSED" }
    );
}
