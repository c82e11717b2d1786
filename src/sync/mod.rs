//! The sync worker: keeps the config, defaults, locale and firmware files of the cache fresh, and
//! fetches what phones will need before they ask.
//!
//! It knows a set of names (`sync.prefetch`; every name a phone asked for that an upstream had,
//! learned through [`Fetcher::set_on_found`]; the configs `ConfigFileCacheList.txt` lists) and
//! revalidates each class on its own schedule (`sync.intervals`, ±10% jitter so a hundred
//! branches do not hit the central server in the same second). After each pass it follows the
//! current configs to their firmware and locale files ([`parse`]). It is just another user of
//! the cache and the upstream chain: it fetches through the same single flights as a phone's
//! miss ([`crate::upstream::flight`]) and keeps only policy (what, when, how fast): its
//! downloads are paced by `sync.max_rate` while no phone waits on them.
//!
//! [`SyncWorker::start`] runs it in the appliance under the appliance's stop signal and returns
//! a [`SyncHandle`] (status, `POST /sync`, reloads; the admin page reads its [`SyncStatus`]) and
//! the task to join; [`cli`] is `branchtftp sync --once`.

pub mod cli;
pub mod content;
mod known;
pub mod loads;
pub mod parse;
mod pass;
mod throttle;
pub mod windows;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use known::Reason;
pub use loads::LoadReadiness;
pub use pass::{
    class_index, interval_of, LogProgress, Outcome, PassReport, PassResult, Progress, Scope, Tally,
    CLASSES,
};
pub use windows::{SystemClock, WallClock};

use crate::cache::FileClass;
use crate::config::SyncConfig;
use crate::name::FileName;
use crate::upstream::flight::Fetcher;
use known::KnownNames;
use parse::ConfigRefs;
use throttle::Throttle;

/// What a pass works with; shared by the background worker and `sync --once`.
pub struct Syncer {
    fetcher: Arc<Fetcher>,
    settings: RwLock<SyncConfig>,
    known: Mutex<KnownNames>,
    throttle: Arc<Throttle>,
    /// Parsed configs by content hash, so an unchanged config is not parsed every pass.
    memo: Mutex<HashMap<String, Arc<ConfigRefs>>>,
    /// The local wall clock `sync.windows` are read on.
    clock: Arc<dyn WallClock>,
    /// Firmware files (key, sha256) whose content was re-hashed to their recorded sha256.
    verified: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Syncer {
    /// A syncer over the fetcher's cache and chain; loads the known names kept in the cache
    /// directory.
    pub fn new(fetcher: Arc<Fetcher>, settings: SyncConfig) -> Arc<Syncer> {
        Syncer::with_clock(fetcher, settings, Arc::new(SystemClock))
    }

    /// [`Syncer::new`] reading `sync.windows` on `clock` instead of the box's local time.
    pub fn with_clock(
        fetcher: Arc<Fetcher>,
        settings: SyncConfig,
        clock: Arc<dyn WallClock>,
    ) -> Arc<Syncer> {
        let known = KnownNames::load(fetcher.cache().dir());
        Arc::new(Syncer {
            clock,
            verified: Mutex::new(Default::default()),
            throttle: Arc::new(Throttle::new(settings.max_rate)),
            settings: RwLock::new(settings),
            fetcher,
            known: Mutex::new(known),
            memo: Mutex::new(HashMap::new()),
        })
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// Applies a reloaded `sync` section (intervals, prefetch, rate, …).
    pub fn reconfigure(&self, settings: SyncConfig) {
        let now = self.clock.now();
        self.throttle
            .set_rate(windows::Schedule::of(&settings).rate(&now, settings.max_rate));
        *self.settings.write().unwrap() = settings;
    }

    pub fn settings(&self) -> SyncConfig {
        self.settings.read().unwrap().clone()
    }

    /// A phone asked for `name` and an upstream had it. `true` if discovery should look at it
    /// soon (a config: its firmware is what the phone asks for next).
    pub fn learn_from_phone(&self, name: &FileName) -> bool {
        self.known.lock().unwrap().learn(name, Reason::Phone);
        let base = name.key().rsplit('/').next().unwrap_or("");
        base.contains(".cnf.xml")
    }

    /// Number of names kept fresh.
    pub fn known_count(&self) -> usize {
        self.known.lock().unwrap().names.len()
    }

    /// Writes the known names to the cache directory if they changed.
    pub fn save_known(&self) {
        self.known.lock().unwrap().save();
    }
}

/// What `/status` shows of the sync worker (the admin page serialises it as is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    /// Unix seconds when the last pass ended.
    pub last_pass: Option<u64>,
    /// Unix seconds when the next scheduled pass is due.
    pub next_pass: Option<u64>,
    /// `ok`, `partial`, `unreachable`, `no-upstreams`; `never` before the first pass.
    pub last_result: String,
    /// Whether a pass is running now.
    #[serde(default)]
    pub running: bool,
    /// Names kept fresh.
    #[serde(default)]
    pub known_names: usize,
}

#[derive(Debug, Default)]
struct StatusState {
    last_pass: Option<u64>,
    next_pass: Option<u64>,
    last_result: Option<PassResult>,
    running: bool,
}

struct WorkerState {
    status: Mutex<StatusState>,
    wake: Notify,
    full_requested: AtomicBool,
    discover_requested: AtomicBool,
    rescheduled: AtomicBool,
}

/// The running worker, for the admin endpoint and reloads. Cheap to clone.
#[derive(Clone)]
pub struct SyncHandle {
    syncer: Arc<Syncer>,
    state: Arc<WorkerState>,
}

impl SyncHandle {
    pub fn status(&self) -> SyncStatus {
        let s = self.state.status.lock().unwrap();
        SyncStatus {
            last_pass: s.last_pass,
            next_pass: s.next_pass,
            last_result: s
                .last_result
                .map_or("never", PassResult::as_str)
                .to_string(),
            running: s.running,
            known_names: self.syncer.known_count(),
        }
    }

    /// Starts a full pass now (`POST /sync`); one already running finishes first.
    pub fn trigger(&self) {
        self.state.full_requested.store(true, Ordering::SeqCst);
        self.state.wake.notify_one();
    }

    /// Readiness of the firmware loads the branch knows (`/status`, `/metrics`).
    pub fn load_readiness(&self) -> Vec<LoadReadiness> {
        self.syncer.load_readiness()
    }

    /// Applies a reloaded `sync` section; schedules follow the new intervals at once.
    pub fn reconfigure(&self, settings: SyncConfig) {
        self.syncer.reconfigure(settings);
        self.state.rescheduled.store(true, Ordering::SeqCst);
        self.state.wake.notify_one();
    }
}

/// Starts the background worker.
pub struct SyncWorker;

impl SyncWorker {
    /// Starts the worker on the current tokio runtime: a full pass now, then each class on its
    /// interval, until `stop` turns true (the known names are saved then). Registers with the
    /// fetcher to learn the names phones fetch. The task ends after `stop`.
    pub fn start(
        fetcher: Arc<Fetcher>,
        settings: SyncConfig,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> (SyncHandle, tokio::task::JoinHandle<()>) {
        let syncer = Syncer::new(fetcher.clone(), settings);
        let state = Arc::new(WorkerState {
            status: Mutex::new(StatusState::default()),
            wake: Notify::new(),
            full_requested: AtomicBool::new(false),
            discover_requested: AtomicBool::new(false),
            rescheduled: AtomicBool::new(false),
        });
        {
            let syncer = Arc::downgrade(&syncer);
            let state = Arc::downgrade(&state);
            fetcher.set_on_found(Arc::new(move |name, _source| {
                let (Some(syncer), Some(state)) = (syncer.upgrade(), state.upgrade()) else {
                    return;
                };
                if syncer.learn_from_phone(name) {
                    state.discover_requested.store(true, Ordering::SeqCst);
                }
                // Wake the loop either way so the new name is saved soon.
                state.wake.notify_one();
            }));
        }
        let handle = SyncHandle { syncer, state };
        let worker = handle.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = run(worker.clone()) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
            worker.syncer.save_known();
        });
        (handle, task)
    }
}

/// An interval with ±10% random jitter.
pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.9..=1.1))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn run(h: SyncHandle) {
    let now = Instant::now();
    let mut last_run: [Instant; 5] = [now; 5];
    let mut due: [Instant; 5] = [now; 5];
    // Classes whose window was closed when they fell due: they stay due until it opens.
    let mut held = [false; 5];
    let mut first = true;
    loop {
        if h.state.rescheduled.swap(false, Ordering::SeqCst) {
            let s = h.syncer.settings();
            for (i, c) in CLASSES.iter().enumerate() {
                due[i] = last_run[i] + jittered(interval_of(&s, *c));
            }
        }
        let now = Instant::now();
        let full =
            std::mem::take(&mut first) | h.state.full_requested.swap(false, Ordering::SeqCst);
        let classes: Vec<FileClass> = CLASSES
            .iter()
            .enumerate()
            .filter(|(i, _)| full || due[*i] <= now)
            .map(|(_, c)| *c)
            .collect();
        if !classes.is_empty() && defer_while_central_down(&h).await {
            // Whatever was due is still due: ask again now the central server answers.
            h.state.full_requested.fetch_or(full, Ordering::SeqCst);
            continue;
        }
        let discover = h.state.discover_requested.swap(false, Ordering::SeqCst);
        if !classes.is_empty() {
            let scope = if full {
                Scope::Full
            } else {
                Scope::Classes(classes.clone())
            };
            h.state.status.lock().unwrap().running = true;
            let report = h.syncer.pass(scope, &LogProgress).await;
            log_report(&report, &classes);
            let s = h.syncer.settings();
            let ended = Instant::now();
            for c in &classes {
                let i = class_index(*c);
                held[i] = report.held.contains(c);
                if held[i] {
                    continue;
                }
                last_run[i] = ended;
                due[i] = ended + jittered(interval_of(&s, *c));
            }
            let mut st = h.state.status.lock().unwrap();
            st.running = false;
            st.last_pass = Some(unix_secs(SystemTime::now()));
            st.last_result = Some(report.result);
            crate::metrics::global().sync_pass(report.result.as_str());
        } else if discover {
            let report = h.syncer.pass(Scope::DiscoverOnly, &LogProgress).await;
            if report.total().fetched > 0 {
                info!(
                    fetched = report.total().fetched,
                    bytes = report.total().bytes,
                    "sync: prefetched what a new config names"
                );
            }
        }
        h.syncer.save_known();
        let edge = Instant::now()
            + h.syncer
                .next_window_change()
                .unwrap_or(Duration::from_secs(60));
        let next = (0..5)
            .map(|i| if held[i] { due[i].max(edge) } else { due[i] })
            .min()
            .expect("five classes");
        {
            let wait = next.saturating_duration_since(Instant::now());
            h.state.status.lock().unwrap().next_pass = Some(unix_secs(SystemTime::now() + wait));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = h.state.wake.notified() => {}
        }
    }
}

/// A pass while the central server is down would only cost a timeout or a skip per name: wait
/// until its probe sees it again (or the worker is woken: `POST /sync`, a reload), then let the
/// loop look again. `true` if it waited.
async fn defer_while_central_down(h: &SyncHandle) -> bool {
    let Some(central) = h.syncer.fetcher().chain().central().cloned() else {
        return false;
    };
    if !central.is_down() {
        return false;
    }
    info!(upstream = %central.url, "sync: central server down; the pass waits until it answers again");
    h.state.status.lock().unwrap().next_pass = None;
    tokio::select! {
        _ = central.wait_not_down() => info!(upstream = %central.url, "sync: central server answers again; pass starts"),
        _ = h.state.wake.notified() => {}
    }
    true
}

fn log_report(r: &PassReport, classes: &[FileClass]) {
    let t = r.total();
    let classes: Vec<&str> = classes.iter().map(|c| c.as_str()).collect();
    let msg = format!(
        "sync pass {}: {} checked, {} unchanged, {} updated, {} fetched, {} not found, {} removed, {} failed; {} bytes from upstreams in {} requests, {} ms",
        r.result.as_str(),
        t.checked,
        t.unchanged,
        t.updated,
        t.fetched,
        t.not_found,
        t.removed,
        t.failed,
        r.wan_bytes,
        r.requests,
        r.duration.as_millis()
    );
    match r.result {
        // A routine pass that changed nothing is not worth a journal line every few minutes.
        PassResult::Ok if t.updated + t.fetched + t.removed == 0 => {
            tracing::debug!(classes = ?classes, "{msg}")
        }
        PassResult::Ok => info!(classes = ?classes, "{msg}"),
        PassResult::NoUpstreams => info!("sync: no upstream configured; nothing to sync"),
        _ => {
            warn!(classes = ?classes, "{msg}");
            for p in r.problems.iter().take(5) {
                warn!("sync: {p}");
            }
        }
    }
}
