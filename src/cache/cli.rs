//! `branchtftp cache ls|verify|import DIR|evict NAME`: the cache from the shell. With no
//! appliance running the commands open the cache directory; while `serve` holds it (its lock),
//! `ls`, `verify` and `evict` ask the appliance's admin endpoint instead (`GET /cache`,
//! `POST /cache/verify`, `DELETE /cache/NAME`), so looking at a branch's cache never means
//! stopping its phones' server. The binary parses [`CacheArgs`] and calls [`run`]; the exit code
//! comes back from here.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{now_millis, Cache, CacheError, ClassRules, VerifyReport};
use crate::admin::cache::CacheListing;
use crate::admin::client::AdminClient;
use crate::config::Config;
use crate::name::FileName;

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Configuration file [default: $BRANCHTFTP_CONFIG, else /etc/branchtftp/branchtftp.yaml
    /// if it exists, else built-in defaults]
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Cache directory, instead of `cache.dir` from the configuration
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Admin endpoint of the appliance that holds the cache, asked while it runs [default:
    /// admin.listen of the configuration]
    #[arg(long, value_name = "URL", global = true)]
    pub admin: Option<String>,
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// List cached files: name, class, size, age, source, hits
    Ls,
    /// Re-hash every file; quarantine corrupt ones; exit 1 if any
    Verify,
    /// Pre-seed the cache from a directory (e.g. firmware from a USB stick)
    Import {
        /// Directory whose files are stored under their relative paths
        dir: PathBuf,
    },
    /// Remove one file from the cache (pinned or not)
    Evict {
        /// File name, any letter case
        name: String,
    },
}

/// Runs a `cache` subcommand; returns the process exit code.
pub fn run(args: &CacheArgs) -> Result<i32> {
    let cfg = match Config::locate(args.config.as_deref()) {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    let dir = args.cache_dir.clone().unwrap_or(cfg.cache.dir.clone());
    let rules = ClassRules::new(cfg.cache.classes.clone());
    let (cache, recovery) = match Cache::open(&dir, cfg.cache.max_size, rules) {
        Err(CacheError::Locked(_)) if !matches!(args.command, CacheCommand::Import { .. }) => {
            return remote(args, &cfg);
        }
        r => r.with_context(|| format!("opening the cache in {}", dir.display()))?,
    };
    if recovery.repairs() > 0 {
        eprintln!(
            "cache: recovery made {} repair(s) (see the log above)",
            recovery.repairs()
        );
    }
    let mut out = std::io::stdout().lock();
    match &args.command {
        CacheCommand::Ls => {
            print_listing(&CacheListing::of(&cache), &mut out)?;
            Ok(0)
        }
        CacheCommand::Verify => {
            let (_, total) = cache.totals();
            let bar = progress_bar(total, "verifying");
            let report = cache.verify(|done| {
                if let Some(b) = &bar {
                    b.set_position(done)
                }
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            print_verify(&report, &mut out)
        }
        CacheCommand::Import { dir: src } => {
            anyhow::ensure!(src.is_dir(), "{}: not a directory", src.display());
            let bar = progress_bar(dir_size(src), "importing");
            let report = cache.import(src, |done| {
                if let Some(b) = &bar {
                    b.set_position(done)
                }
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            for (path, why) in &report.skipped {
                writeln!(out, "skipped {}: {why}", path.display())?;
            }
            let (files, bytes) = cache.totals();
            writeln!(
                out,
                "imported {} files ({}), {} unchanged, {} skipped; cache now {} files, {}",
                report.imported,
                human_size(report.bytes),
                report.unchanged,
                report.skipped.len(),
                files,
                human_size(bytes)
            )?;
            Ok(0)
        }
        CacheCommand::Evict { name } => {
            let name = FileName::parse(name).with_context(|| format!("`{name}`"))?;
            print_evicted(&name, cache.evict(name.key())?, &mut out)
        }
    }
}

fn print_evicted(name: &FileName, evicted: bool, out: &mut impl Write) -> Result<i32> {
    if evicted {
        writeln!(out, "evicted {name}")?;
        Ok(0)
    } else {
        writeln!(out, "{name}: not in the cache")?;
        Ok(1)
    }
}

fn print_verify(report: &VerifyReport, out: &mut impl Write) -> Result<i32> {
    for c in &report.corrupt {
        writeln!(
            out,
            "CORRUPT {}: sha256 {} expected {}; moved to {}",
            c.name,
            c.actual_sha256,
            c.expected_sha256,
            c.quarantined.display()
        )?;
    }
    for m in &report.missing {
        writeln!(out, "MISSING {m}: file gone; entry dropped")?;
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    writeln!(
        out,
        "verified {} files, {} in {:.2}s ({:.0} MB/s): {} corrupt, {} missing",
        report.files,
        human_size(report.bytes),
        secs,
        report.bytes as f64 / secs / 1e6,
        report.corrupt.len(),
        report.missing.len()
    )?;
    Ok(if report.is_clean() { 0 } else { 1 })
}

/// `ls`, `verify` and `evict` through the admin endpoint of the appliance holding the cache.
fn remote(args: &CacheArgs, cfg: &Config) -> Result<i32> {
    let admin = args
        .admin
        .clone()
        .unwrap_or_else(|| crate::admin::default_admin(cfg));
    // Needed only from a management address; on the box itself loopback needs none.
    let token = cfg
        .admin
        .token_file
        .as_deref()
        .and_then(|p| crate::admin::auth::read_token(p).ok());
    // A verify re-reads every file: give it the time a big cache takes.
    let client = AdminClient::new(&admin, token, std::time::Duration::from_secs(3600))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout().lock();
    eprintln!(
        "cache: in use by the running appliance; asking it at {}",
        client.base()
    );
    match &args.command {
        CacheCommand::Ls => {
            let listing: CacheListing = rt.block_on(client.get_json("/cache"))?;
            print_listing(&listing, &mut out)?;
            Ok(0)
        }
        CacheCommand::Verify => {
            let body = rt.block_on(client.call(reqwest::Method::POST, "/cache/verify"))?;
            let report: VerifyReport = serde_json::from_slice(&body)
                .with_context(|| format!("{}/cache/verify: bad answer", client.base()))?;
            print_verify(&report, &mut out)
        }
        CacheCommand::Evict { name } => {
            let name = FileName::parse(name).with_context(|| format!("`{name}`"))?;
            let path = format!("/cache/{}", percent_encode(name.as_str()));
            match rt.block_on(client.call(reqwest::Method::DELETE, &path)) {
                Ok(_) => print_evicted(&name, true, &mut out),
                Err(crate::admin::client::AdminError::Status { status: 404, .. }) => {
                    print_evicted(&name, false, &mut out)
                }
                Err(e) => Err(e.into()),
            }
        }
        CacheCommand::Import { .. } => anyhow::bail!(
            "the cache is in use by the running appliance; stop it to import (import writes \
             the cache directory directly)"
        ),
    }
}

/// Escapes what a URL path cannot carry as is; `/` stays (names have directories).
fn percent_encode(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_listing(listing: &CacheListing, out: &mut impl Write) -> Result<()> {
    let entries = &listing.entries;
    let now = now_millis();
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.class.to_string(),
                human_size(e.size),
                human_age(now.saturating_sub(e.fetched_at)),
                e.source.clone(),
                e.hits.to_string(),
                if e.pinned {
                    "yes".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    let header = ["NAME", "CLASS", "SIZE", "AGE", "SOURCE", "HITS", "PINNED"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            // Numbers right-aligned, text left-aligned.
            if i == 2 || i == 3 || i == 5 {
                s.push_str(&format!("{c:>w$}  ", w = widths[i]));
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(header))?;
    for r in &rows {
        writeln!(out, "{}", line(r.each_ref().map(String::as_str)))?;
    }
    writeln!(
        out,
        "{} files, {} of {}",
        listing.files,
        human_size(listing.bytes),
        human_size(listing.max_bytes)
    )?;
    Ok(())
}

fn progress_bar(total: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    Some(bar)
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for de in rd.flatten() {
            match std::fs::metadata(de.path()) {
                Ok(m) if m.is_dir() => stack.push(de.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `1.5 MiB`, `512 B`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `45s`, `12m`, `3h`, `2d`.
pub fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
