//! `branchtftp sync --once`: one full pass now (to pre-seed a new box before it goes to the
//! branch), with a progress bar on a terminal and plain log lines otherwise, then a summary
//! table. Exit 0 when the central server answered (even if some files failed: the table says
//! which), 1 when the central (first) upstream was unreachable, 2 on a usage or setup problem.
//! The pass keeps to `sync.windows` like the appliance's own.
//!
//! `branchtftp sync --loads`: stages the planned loads (`sync.loads`) now, whatever the
//! windows say (a box being prepared before it ships), with the same progress, then the
//! readiness table. Exit 0 when every planned load is ready, 1 otherwise.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{Outcome, PassReport, PassResult, Progress, Scope, Syncer, CLASSES};
use crate::cache::cli::human_size;
use crate::cache::{Cache, ClassRules, FileClass};
use crate::config::Config;
use crate::upstream::flight::Fetcher;
use crate::upstream::UpstreamChain;

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Run one full pass now and exit (the running appliance syncs by itself; POST /sync on
    /// its admin endpoint starts a pass there).
    #[arg(long, conflicts_with = "loads")]
    pub once: bool,
    /// Stage the planned loads (sync.loads) now, ignoring sync.windows, then show their
    /// readiness.
    #[arg(long)]
    pub loads: bool,
    /// Configuration file [default: $BRANCHTFTP_CONFIG, else /etc/branchtftp/branchtftp.yaml
    /// if it exists, else built-in defaults]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs `sync --once`; returns the exit code.
pub async fn run(args: &SyncArgs) -> Result<i32> {
    if !args.once && !args.loads {
        eprintln!(
            "branchtftp sync: give --once (one full pass) or --loads (stage the planned loads); a \
             running appliance syncs on its own schedule (POST /sync on its admin endpoint starts a pass now)"
        );
        return Ok(2);
    }
    let (cfg, _) = Config::resolve(args.config.as_deref())?;
    if cfg.upstreams.is_empty() {
        eprintln!("branchtftp sync: no upstreams configured: nothing to sync from (set `upstreams` in the config)");
        return Ok(2);
    }
    let chain = UpstreamChain::new(&cfg.upstreams)?;
    let dir = cfg.cache.dir.clone();
    let rules = ClassRules::new(cfg.cache.classes.clone());
    let max = cfg.cache.max_size;
    let (cache, _) = tokio::task::spawn_blocking(move || Cache::open(&dir, max, rules))
        .await?
        .with_context(|| format!("cannot open the cache in {}", cfg.cache.dir.display()))?;
    let fetcher = Fetcher::new(cache.clone(), chain, cfg.sync.negative_ttl);
    let syncer = Syncer::new(fetcher.clone(), cfg.sync.clone());

    let progress = OnceProgress::new();
    let scope = if args.loads {
        Scope::PlannedLoads
    } else {
        Scope::Full
    };
    let report = syncer.pass(scope, &progress).await;
    progress.finish();
    syncer.save_known();
    cache.flush()?;

    let mut out = std::io::stdout().lock();
    if args.loads {
        return planned_loads_summary(&mut out, &syncer, &report, &cfg);
    }
    write_summary(&mut out, &report, &fetcher.chain())?;
    Ok(match report.result {
        PassResult::Unreachable => {
            eprintln!(
                "branchtftp sync: the central server {} was unreachable",
                cfg.upstreams[0].url
            );
            1
        }
        PassResult::NoUpstreams => 2,
        PassResult::Ok | PassResult::Partial => 0,
    })
}

/// `sync --loads`: the readiness of every planned load; exit 0 when all are ready.
fn planned_loads_summary(
    out: &mut impl Write,
    syncer: &Syncer,
    report: &PassReport,
    cfg: &Config,
) -> Result<i32> {
    if cfg.sync.loads.is_empty() {
        writeln!(out, "no planned loads: list them under sync.loads")?;
        return Ok(0);
    }
    let planned: Vec<_> = syncer
        .load_readiness()
        .into_iter()
        .filter(|l| l.planned)
        .collect();
    write!(out, "{}", super::loads::render_table(&planned))?;
    for p in &report.problems {
        writeln!(out, "  {p}")?;
    }
    let ready = planned.iter().filter(|l| l.ready).count();
    writeln!(
        out,
        "{ready} of {} planned loads ready; {} from upstreams",
        planned.len(),
        human_size(report.wan_bytes)
    )?;
    Ok(if ready == planned.len() { 0 } else { 1 })
}

/// A bar on a terminal, one line per file otherwise.
struct OnceProgress {
    bar: Option<ProgressBar>,
    planned: Mutex<u64>,
}

impl OnceProgress {
    fn new() -> OnceProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {wide_msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        });
        OnceProgress {
            bar,
            planned: Mutex::new(0),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for OnceProgress {
    fn planned(&self, n: u64) {
        let mut p = self.planned.lock().unwrap();
        *p += n;
        if let Some(b) = &self.bar {
            b.set_length(*p);
        }
    }

    fn skipped(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    fn item(&self, name: &str, class: FileClass, outcome: &Outcome) {
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_message(name.to_string());
                if let Outcome::Unreachable(why) | Outcome::Failed(why) = outcome {
                    b.println(format!("{name}: {} ({why})", outcome.as_str()));
                }
            }
            None => {
                let detail = match outcome {
                    Outcome::Updated { bytes } | Outcome::Fetched { bytes } => {
                        format!(" ({})", human_size(*bytes))
                    }
                    Outcome::Unreachable(why) | Outcome::Failed(why) => format!(" ({why})"),
                    _ => String::new(),
                };
                eprintln!(
                    "sync: {:<11} {:<8} {name}{detail}",
                    outcome.as_str(),
                    class.as_str()
                );
            }
        }
    }
}

/// The summary table: one row per class, a total, the upstreams and the result.
pub fn write_summary(
    out: &mut impl Write,
    r: &PassReport,
    chain: &UpstreamChain,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>10}",
        "class",
        "checked",
        "unchanged",
        "updated",
        "fetched",
        "not found",
        "removed",
        "failed",
        "bytes"
    )?;
    let row = |out: &mut dyn Write, label: &str, t: &super::Tally| {
        writeln!(
            out,
            "{:<9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>10}",
            label,
            t.checked,
            t.unchanged,
            t.updated,
            t.fetched,
            t.not_found,
            t.removed,
            t.failed,
            human_size(t.bytes)
        )
    };
    for (c, t) in CLASSES.iter().zip(&r.tallies) {
        row(out, c.as_str(), t)?;
    }
    row(out, "total", &r.total())?;
    writeln!(out)?;
    for up in chain.upstreams() {
        let s = up.status();
        let state = match s.state {
            crate::upstream::UpstreamState::Up => "up",
            crate::upstream::UpstreamState::Down => "DOWN",
            crate::upstream::UpstreamState::Unknown => "not asked",
        };
        match &s.last_error {
            Some(e) if s.state != crate::upstream::UpstreamState::Up => {
                writeln!(out, "upstream {:<40} {state}: {e}", s.url)?
            }
            _ => writeln!(out, "upstream {:<40} {state}", s.url)?,
        }
    }
    if !r.held.is_empty() {
        let held: Vec<&str> = r.held.iter().map(|c| c.as_str()).collect();
        writeln!(
            out,
            "outside their sync.windows, not synced: {} (sync --loads stages planned loads now)",
            held.join(", ")
        )?;
    }
    writeln!(
        out,
        "firmware loads named by configs: {}; pinned {} newly, unpinned {}",
        r.loads, r.pinned, r.unpinned
    )?;
    writeln!(
        out,
        "result: {} in {:.1}s; {} requests, {} from upstreams",
        r.result.as_str(),
        r.duration.as_secs_f64(),
        r.requests,
        human_size(r.wan_bytes)
    )?;
    for p in &r.problems {
        writeln!(out, "  {p}")?;
    }
    Ok(())
}
