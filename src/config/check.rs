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
    let _ = writeln!(out, "# branchtftp effective configuration: {source}");
    let _ = write!(out, "{}", cfg.effective_yaml());
    0
}
