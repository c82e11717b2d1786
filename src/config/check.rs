//! `branchtftp check-config [-c FILE]`: parse, validate, print the effective configuration.

use std::io::Write;
use std::path::Path;

use super::{Config, DEFAULT_PATH};

/// Exit status of `check-config` for an invalid or unreadable configuration.
pub const EXIT_INVALID: i32 = 2;

/// Runs `check-config`: prints the effective configuration on stdout and returns 0, or prints
/// every problem as `FILE:LINE:COL: key: problem` on stderr and returns 2.
pub fn check_config(explicit: Option<&Path>) -> i32 {
    check_config_to(
        explicit,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// [`check_config`] writing to the given streams.
pub fn check_config_to(explicit: Option<&Path>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let (cfg, source) = match Config::locate(explicit) {
        None => (
            Config::default(),
            format!("embedded defaults (no -c, $BRANCHTFTP_CONFIG unset, no {DEFAULT_PATH})"),
        ),
        Some(path) => match Config::load(&path) {
            Ok(cfg) => (cfg, path.display().to_string()),
            Err(e) => {
                let n = e.problems().len();
                let _ = writeln!(err, "{e}");
                let _ = writeln!(
                    err,
                    "branchtftp: {}: invalid configuration ({n} problem{})",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                );
                return EXIT_INVALID;
            }
        },
    };
    warn_unresolved_upstreams(&cfg, err);
    let _ = writeln!(out, "# branchtftp effective configuration: {source}");
    let _ = write!(out, "{}", cfg.effective_yaml());
    0
}

/// How long `check-config` waits for DNS per upstream name before moving on.
const RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Warns about upstream names that do not resolve now. Not an error: `serve` resolves names
/// per request, so a branch booting during a DNS outage still serves its cache (and
/// `check-config` runs as the unit's `ExecStartPre`, where failing would stop exactly that).
fn warn_unresolved_upstreams(cfg: &Config, err: &mut dyn Write) {
    for (i, u) in cfg.upstreams.iter().enumerate() {
        let Ok(url) = u.parsed_url() else { continue };
        if url.host.parse::<std::net::IpAddr>().is_ok() {
            continue;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let target = url.authority();
        std::thread::spawn(move || {
            let _ = tx.send(std::net::ToSocketAddrs::to_socket_addrs(&target).map(|_| ()));
        });
        let problem = match rx.recv_timeout(RESOLVE_WAIT) {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no DNS answer within {}s", RESOLVE_WAIT.as_secs()),
        };
        let _ = writeln!(
            err,
            "branchtftp: warning: upstreams[{i}].url: `{}` does not resolve now ({problem}); \
             serve starts anyway and resolves it again per request",
            url.host
        );
    }
}
