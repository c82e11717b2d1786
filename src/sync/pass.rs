//! One sync pass: refresh the known names from `ConfigFileCacheList.txt`, revalidate the names
//! of the classes that are due, then discover what the current configs name (firmware loads and
//! their images, locale files), fetch what is missing and pin the firmware in use.
//!
//! Every download and revalidation goes through the fetcher's single flight for the name
//! ([`Fetcher::fetch`](crate::upstream::flight::Fetcher::fetch)), the same one a phone's miss
//! uses, so a name is downloaded once whoever asked; the pass only passes its policy in (the
//! cached copy to revalidate, the content checks a replacement must pass, `sync.max_rate`). The
//! chain asks the upstream the cached copy came from conditionally with its validators (a 304
//! moves no body); other answers are compared by sha256 and published only when they differ.
//! Firmware names are versioned: once cached they are only checked for presence. A name every
//! upstream answers "not found" for on `sync.remove_after` consecutive checks leaves the cache
//! unless pinned; an unreachable or failing upstream resets that count, so a WAN outage never
//! deletes anything.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tracing::{debug, info, warn};

use super::known::Reason;
use super::parse::{self, ConfigRefs};
use super::Syncer;
use crate::cache::{now_millis, Entry, FileClass};
use crate::config::ConfigsMode;
use crate::name::FileName;
use crate::upstream::flight::{Ask, Fetched, MissError, Vet};
use crate::upstream::{Answer, Body, FetchError, Upstream};

/// Requests in flight at once during revalidation (one connection each to an HTTP upstream).
const CONCURRENCY: usize = 16;
/// Downloads in flight at once for discovered firmware and locale files.
const DOWNLOADS: usize = 4;
/// Locale file names fetched for every locale directory a config names, before any phone asks
/// for them (domain.md: the locale's `mk-sip.jar`, the network locale's tones).
const USER_LOCALE_SEEDS: [&str; 1] = ["mk-sip.jar"];
const NETWORK_LOCALE_SEEDS: [&str; 1] = ["g3-tones.xml"];
/// A name whose cached copy has no validators and whose listed length is unchanged is trusted
/// without a download for up to this many intervals of its class; then its content is compared.
const LIST_TRUST_INTERVALS: u32 = 12;

/// The five classes, in a fixed order (table rows, schedule slots).
pub const CLASSES: [FileClass; 5] = [
    FileClass::Config,
    FileClass::Defaults,
    FileClass::Locale,
    FileClass::Firmware,
    FileClass::Other,
];

pub fn class_index(c: FileClass) -> usize {
    CLASSES.iter().position(|&x| x == c).unwrap_or(4)
}

/// What a pass covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every class, the config list and discovery (start, `POST /sync`, `sync --once`).
    Full,
    /// The classes whose interval elapsed, then discovery.
    Classes(Vec<FileClass>),
    /// Only discovery (a phone just fetched a config through the miss path).
    DiscoverOnly,
    /// Stage the planned loads (`sync.loads`) now, whatever `sync.windows` say
    /// (`branchtftp sync --loads`).
    PlannedLoads,
}

/// What happened to one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still current: 304, same content, listed length unchanged, or firmware present.
    Unchanged,
    /// A new version was published.
    Updated { bytes: u64 },
    /// Was not cached; now is.
    Fetched { bytes: u64 },
    /// Every upstream answered "not found"; `removed` once it left the cache.
    NotFound { removed: bool },
    /// Nobody had it and some upstream could not be asked.
    Unreachable(String),
    /// An upstream or the cache failed for this file.
    Failed(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Updated { .. } => "updated",
            Outcome::Fetched { .. } => "fetched",
            Outcome::NotFound { removed: true } => "removed",
            Outcome::NotFound { removed: false } => "not found",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Receives a pass's progress (the `sync --once` bar, or log lines).
pub trait Progress: Send + Sync {
    /// `n` more names are planned.
    fn planned(&self, _n: u64) {}
    fn item(&self, _name: &str, _class: FileClass, _outcome: &Outcome) {}
    /// A planned name needed nothing (already cached, or already reported in this pass).
    fn skipped(&self) {}
}

/// Progress for background passes: changes at info, the rest at debug.
pub struct LogProgress;

impl Progress for LogProgress {
    fn item(&self, name: &str, class: FileClass, outcome: &Outcome) {
        match outcome {
            Outcome::Unchanged | Outcome::NotFound { removed: false } => {
                debug!(name, class = %class, "sync: {}", outcome.as_str())
            }
            Outcome::Updated { bytes } | Outcome::Fetched { bytes } => {
                info!(name, class = %class, bytes, "sync: {}", outcome.as_str())
            }
            Outcome::NotFound { removed: true } => {
                info!(name, class = %class, "sync: gone from every upstream; removed")
            }
            Outcome::Unreachable(why) | Outcome::Failed(why) => {
                warn!(name, class = %class, "sync: {}: {why}", outcome.as_str())
            }
        }
    }
}

/// Counts per class for the summary table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub checked: u64,
    pub unchanged: u64,
    pub updated: u64,
    pub fetched: u64,
    pub not_found: u64,
    pub removed: u64,
    pub failed: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, o: &Outcome) {
        self.checked += 1;
        match o {
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Updated { bytes } => {
                self.updated += 1;
                self.bytes += bytes
            }
            Outcome::Fetched { bytes } => {
                self.fetched += 1;
                self.bytes += bytes
            }
            Outcome::NotFound { removed } => {
                self.not_found += 1;
                self.removed += *removed as u64
            }
            Outcome::Unreachable(_) | Outcome::Failed(_) => self.failed += 1,
        }
    }
}

/// How a pass ended, as `/status` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PassResult {
    /// Every name was checked.
    Ok,
    /// Some names could not be checked (an alternate upstream down, a file failing).
    Partial,
    /// The central (first) upstream could not be reached.
    Unreachable,
    /// No upstream is configured: nothing to sync from.
    NoUpstreams,
}

impl PassResult {
    pub const ALL: [PassResult; 4] = [
        PassResult::Ok,
        PassResult::Partial,
        PassResult::Unreachable,
        PassResult::NoUpstreams,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PassResult::Ok => "ok",
            PassResult::Partial => "partial",
            PassResult::Unreachable => "unreachable",
            PassResult::NoUpstreams => "no-upstreams",
        }
    }
}

/// The summary of one pass.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PassReport {
    pub result: PassResult,
    /// Unix seconds.
    pub started: u64,
    pub duration: Duration,
    /// Per class, in [`CLASSES`] order.
    pub tallies: [Tally; 5],
    /// Body bytes received from upstreams (304s and "not found" move none).
    pub wan_bytes: u64,
    /// Requests sent to upstreams.
    pub requests: u64,
    /// Firmware loads the current configs name.
    pub loads: usize,
    pub pinned: usize,
    pub unpinned: usize,
    /// Classes in scope that `sync.windows` held back (closed at the start of the pass).
    pub held: Vec<FileClass>,
    /// A few of the problems, for the log and the summary.
    pub problems: Vec<String>,
}

impl PassReport {
    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for x in &self.tallies {
            t.checked += x.checked;
            t.unchanged += x.unchanged;
            t.updated += x.updated;
            t.fetched += x.fetched;
            t.not_found += x.not_found;
            t.removed += x.removed;
            t.failed += x.failed;
            t.bytes += x.bytes;
        }
        t
    }
}

/// State shared by the tasks of one pass.
pub(super) struct Ctx<'a> {
    central: Option<Arc<Upstream>>,
    central_unreachable: AtomicBool,
    wan_bytes: AtomicU64,
    requests: AtomicU64,
    tallies: Mutex<[Tally; 5]>,
    problems: Mutex<Vec<String>>,
    /// Whether `ConfigFileCacheList.txt` was read in this pass (list lengths are current).
    list_read: bool,
    progress: &'a dyn Progress,
}

impl Ctx<'_> {
    pub(super) fn record(&self, name: &str, class: FileClass, outcome: &Outcome) {
        self.tallies.lock().unwrap()[class_index(class)].add(outcome);
        if let Outcome::Unreachable(why) | Outcome::Failed(why) = outcome {
            let mut p = self.problems.lock().unwrap();
            if p.len() < 20 {
                p.push(format!("{name}: {why}"));
            }
        }
        self.progress.item(name, class, outcome);
    }

    /// Notes a problem that is not one file's outcome (a limit reached).
    pub(super) fn problem(&self, why: String) {
        let mut p = self.problems.lock().unwrap();
        if p.len() < 20 {
            p.push(why);
        }
    }

    fn unreachable(&self, up: &Upstream) {
        if self.central.as_ref().is_some_and(|c| c.url == up.url) {
            self.central_unreachable.store(true, Ordering::Relaxed);
        }
    }

    /// A fetch's transport failure marks its upstream down: notes whether that was the central
    /// server (the pass then ends `unreachable`).
    fn note_central(&self) {
        if self.central.as_ref().is_some_and(|c| c.is_down()) {
            self.central_unreachable.store(true, Ordering::Relaxed);
        }
    }
}

impl Syncer {
    /// Runs one pass. Never fails as a whole: problems are counted in the report.
    pub async fn pass(&self, scope: Scope, progress: &dyn Progress) -> PassReport {
        let started = Instant::now();
        let started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let chain = self.fetcher.chain();
        let settings = self.settings.read().unwrap().clone();
        let mut report = PassReport {
            result: PassResult::Ok,
            started: started_unix,
            duration: Duration::ZERO,
            tallies: Default::default(),
            wan_bytes: 0,
            requests: 0,
            loads: 0,
            pinned: 0,
            unpinned: 0,
            held: Vec::new(),
            problems: Vec::new(),
        };
        if chain.is_empty() {
            report.result = PassResult::NoUpstreams;
            return report;
        }
        let classes: Vec<FileClass> = match &scope {
            Scope::Full => CLASSES.to_vec(),
            Scope::Classes(c) => c.clone(),
            Scope::DiscoverOnly | Scope::PlannedLoads => Vec::new(),
        };
        let plan = self.plan_by_windows(&settings, &scope);
        let (classes, held): (Vec<FileClass>, Vec<FileClass>) =
            classes.into_iter().partition(|c| plan.open(*c));
        report.held = held;
        self.sync_prefetch(&settings.prefetch);
        let mut ctx = Ctx {
            central: chain.central().cloned(),
            central_unreachable: AtomicBool::new(false),
            wan_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            tallies: Mutex::new(Default::default()),
            problems: Mutex::new(Vec::new()),
            list_read: false,
            progress,
        };
        if settings.config_list && classes.contains(&FileClass::Config) {
            ctx.list_read = self.read_config_list(&chain, settings.configs, &ctx).await;
        }

        // Revalidate the known names of the classes in scope.
        let items: Vec<(String, String, FileClass)> = {
            let known = self.known.lock().unwrap();
            known
                .names
                .iter()
                .map(|(k, n)| (k.clone(), n.name.clone(), self.class_of(k)))
                .filter(|(_, _, c)| classes.contains(c))
                .collect()
        };
        progress.planned(items.len() as u64);
        futures::stream::iter(items)
            .for_each_concurrent(CONCURRENCY, |(key, name, class)| {
                let ctx = &ctx;
                let settings = &settings;
                async move {
                    let outcome = self.revalidate(&key, &name, class, settings, ctx).await;
                    match outcome {
                        Some(o) => ctx.record(&name, class, &o),
                        None => ctx.progress.skipped(),
                    }
                }
            })
            .await;

        if settings.discover || scope == Scope::PlannedLoads {
            self.discover(&settings, &plan, &ctx, &mut report).await;
        }
        if let Err(e) = self.fetcher.cache().enforce_quota() {
            warn!("sync: quota enforcement failed: {e}");
        }
        self.save_known();

        report.tallies = *ctx.tallies.lock().unwrap();
        report.wan_bytes = ctx.wan_bytes.load(Ordering::Relaxed);
        report.requests = ctx.requests.load(Ordering::Relaxed);
        report.problems = std::mem::take(&mut *ctx.problems.lock().unwrap());
        report.result = if ctx.central_unreachable.load(Ordering::Relaxed) {
            PassResult::Unreachable
        } else if report.total().failed > 0 || !report.problems.is_empty() {
            PassResult::Partial
        } else {
            PassResult::Ok
        };
        report.duration = started.elapsed();
        report
    }

    pub(super) fn class_of(&self, key: &str) -> FileClass {
        match self.fetcher.cache().get(key) {
            Some(e) => e.class,
            None => self.fetcher.cache().rules().classify(key),
        }
    }

    /// Makes the configured prefetch names known (and forgets names dropped from the list).
    fn sync_prefetch(&self, prefetch: &[String]) {
        let wanted: Vec<FileName> = prefetch
            .iter()
            .filter_map(|n| FileName::parse(n).ok())
            .collect();
        let mut known = self.known.lock().unwrap();
        for n in &wanted {
            known.learn(n, Reason::Prefetch);
        }
        let stale: Vec<String> = known
            .names
            .iter()
            .filter(|(k, n)| {
                n.reasons.contains(&Reason::Prefetch) && !wanted.iter().any(|w| w.key() == *k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            known.drop_reason(&k, Reason::Prefetch, self.fetcher.cache().get(&k).is_some());
        }
    }

    /// Reads `ConfigFileCacheList.txt` from the first HTTP upstream that has it and learns the
    /// configs it lists (`configs: seen`: only devices seen at this branch). `true` if read.
    async fn read_config_list(
        &self,
        chain: &crate::upstream::UpstreamChain,
        mode: ConfigsMode,
        ctx: &Ctx<'_>,
    ) -> bool {
        const LIST: &str = "ConfigFileCacheList.txt";
        let mut body = None;
        for up in chain.upstreams().iter().filter(|u| u.is_http()) {
            if up.is_down() {
                ctx.unreachable(up);
                continue;
            }
            ctx.requests.fetch_add(1, Ordering::Relaxed);
            match up.fetch(LIST, None).await {
                Ok(Answer::Found(b)) => match read_list(b, ctx).await {
                    Ok(entries) => {
                        body = Some(entries);
                        break;
                    }
                    Err(e) => debug!(upstream = %up.url, "sync: {LIST}: {e}"),
                },
                Ok(Answer::NotFound | Answer::NotModified) => continue,
                Err(FetchError::Unreachable(_)) => ctx.unreachable(up),
                Err(e) => debug!(upstream = %up.url, "sync: {LIST}: {e}"),
            }
        }
        let Some(entries) = body else {
            return false;
        };
        let mut known = self.known.lock().unwrap();
        let seen = known.seen_devices();
        let mut listed = BTreeSet::new();
        for (name, size) in entries {
            let Ok(fname) = FileName::parse(&name) else {
                continue;
            };
            let keep = match mode {
                ConfigsMode::All => true,
                ConfigsMode::Seen => {
                    parse::device_of(&name).is_some_and(|d| seen.contains(&d))
                        || known.names.contains_key(fname.key())
                }
            };
            if !keep {
                continue;
            }
            known.learn(&fname, Reason::List);
            if let Some(n) = known.get_mut(fname.key()) {
                n.listed_size = size;
            }
            listed.insert(fname.key().to_string());
        }
        // Names the list no longer carries lose that reason; their next check finds them gone.
        let unlisted: Vec<String> = known
            .names
            .iter()
            .filter(|(k, n)| n.reasons.contains(&Reason::List) && !listed.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in unlisted {
            if let Some(n) = known.get_mut(&k) {
                n.listed_size = None;
            }
            known.drop_reason(&k, Reason::List, true);
        }
        debug!(configs = listed.len(), "sync: read {LIST}");
        true
    }

    /// Checks one known name; `None` when there was nothing to do (firmware left to discovery).
    async fn revalidate(
        &self,
        key: &str,
        name: &str,
        class: FileClass,
        settings: &crate::config::SyncConfig,
        ctx: &Ctx<'_>,
    ) -> Option<Outcome> {
        let cache = self.fetcher.cache();
        let entry = cache.get(key);
        if class == FileClass::Firmware {
            // Versioned names never change: presence is all there is to check.
            if entry.is_some() {
                return Some(Outcome::Unchanged);
            }
            let reasons = self.known.lock().unwrap().reasons(key);
            if reasons.contains(&Reason::Prefetch) {
                // Configured explicitly: fetch it again.
            } else {
                // Evicted firmware is fetched again only while a config names it (discovery).
                if !reasons.contains(&Reason::Discovered) {
                    self.known.lock().unwrap().forget(key);
                }
                return None;
            }
        }
        if let Some(e) = &entry {
            if self.trust_listed_size(key, e, class, settings, ctx) {
                cache.note_validated(key, e.validators.clone());
                return Some(Outcome::Unchanged);
            }
        }
        let spelling = entry.as_ref().map_or(name, |e| e.name.as_str());
        let Ok(fname) = FileName::parse(spelling) else {
            return Some(Outcome::Failed("not a valid file name".into()));
        };
        let outcome = match self.fetch(&fname, entry, ctx).await {
            Outcome::NotFound { .. } => Outcome::NotFound {
                removed: self.count_absent(key, settings.remove_after),
            },
            o => o,
        };
        let mut known = self.known.lock().unwrap();
        match &outcome {
            Outcome::NotFound { .. } => {}
            Outcome::Unchanged | Outcome::Updated { .. } | Outcome::Fetched { .. } => {
                if let Some(n) = known.get_mut(key) {
                    n.absent_passes = 0;
                    n.full_check = now_millis();
                }
            }
            // Only consecutive "not found everywhere" answers count towards removal.
            Outcome::Unreachable(_) | Outcome::Failed(_) => {
                if let Some(n) = known.get_mut(key) {
                    n.absent_passes = 0;
                }
            }
        }
        Some(outcome)
    }

    /// Whether `ConfigFileCacheList.txt` vouches for a cached copy that has no validators (a
    /// TFTP upstream, or an HTTP one that gives none): same length, and content compared
    /// recently enough.
    fn trust_listed_size(
        &self,
        key: &str,
        e: &Entry,
        class: FileClass,
        settings: &crate::config::SyncConfig,
        ctx: &Ctx<'_>,
    ) -> bool {
        if !ctx.list_read || e.validators.etag.is_some() || e.validators.last_modified.is_some() {
            return false;
        }
        let known = self.known.lock().unwrap();
        let Some(n) = known.names.get(key) else {
            return false;
        };
        let max_age = interval_of(settings, class).saturating_mul(LIST_TRUST_INTERVALS);
        n.listed_size == Some(e.size)
            && now_millis().saturating_sub(n.full_check) < max_age.as_millis() as u64
    }

    /// Counts a "not found everywhere" check; removes the file at the limit. `true` if removed.
    fn count_absent(&self, key: &str, limit: u32) -> bool {
        let cache = self.fetcher.cache();
        let count = {
            let mut known = self.known.lock().unwrap();
            match known.get_mut(key) {
                Some(n) => {
                    n.absent_passes += 1;
                    n.absent_passes
                }
                None => limit.max(1),
            }
        };
        if count < limit.max(1) {
            return false;
        }
        let removed = match cache.remove_if_unpinned(key) {
            Ok(r) => r,
            Err(e) => {
                warn!(name = key, "sync: cannot remove: {e}");
                false
            }
        };
        let pinned = cache.get(key).is_some_and(|e| e.pinned);
        if pinned {
            info!(
                name = key,
                "sync: gone from every upstream but pinned by a current config; kept"
            );
        } else {
            let mut known = self.known.lock().unwrap();
            if known.reasons(key).contains(&Reason::Prefetch) {
                if let Some(n) = known.get_mut(key) {
                    n.absent_passes = 0;
                }
            } else {
                known.forget(key);
            }
        }
        removed
    }

    /// Fetches `name` through the fetcher's flight for it (a phone's, if one is under way,
    /// so one name is downloaded once whoever asked), with this pass's policy: the cached copy
    /// to revalidate, the content checks a replacement must pass, and `sync.max_rate`.
    async fn fetch(&self, name: &FileName, cached: Option<Entry>, ctx: &Ctx<'_>) -> Outcome {
        ctx.requests.fetch_add(1, Ordering::Relaxed);
        let ask = Ask {
            // A proxy's 200 error page must not replace a good trust list or config.
            vet: cached
                .is_some()
                .then(|| Arc::new(super::content::check_replacement) as Vet),
            cached,
            pace: Some(self.throttle.clone()),
        };
        let result = self.fetcher.fetch(name, ask).await;
        ctx.note_central();
        match result {
            Ok(Fetched::Stored { bytes, replaced }) => {
                ctx.wan_bytes.fetch_add(bytes, Ordering::Relaxed);
                if replaced {
                    Outcome::Updated { bytes }
                } else {
                    Outcome::Fetched { bytes }
                }
            }
            Ok(Fetched::Unchanged { received }) => {
                ctx.wan_bytes.fetch_add(received, Ordering::Relaxed);
                Outcome::Unchanged
            }
            Err(MissError::NotFound) => Outcome::NotFound { removed: false },
            Err(MissError::Unreachable(why)) => Outcome::Unreachable(why),
            Err(MissError::Failed(why)) => Outcome::Failed(why),
        }
    }

    /// Makes sure a name is cached (fetching it if not), trying the listed spelling, then all
    /// lower and all upper case, since lists and servers disagree on case. Returns the outcome
    /// (`None` when already cached) and the key it is cached under.
    /// [`ensure`](Self::ensure) for each name, `DOWNLOADS` at a time, counted in the progress.
    pub(super) async fn ensure_all(
        &self,
        names: Vec<String>,
        ctx: &Ctx<'_>,
    ) -> Vec<(String, (Option<Outcome>, Option<String>))> {
        progress_plan(ctx, names.len());
        futures::stream::iter(names)
            .map(|n| async move {
                let r = self.ensure(&n, ctx).await;
                (n, r)
            })
            .buffer_unordered(DOWNLOADS)
            .collect()
            .await
    }

    async fn ensure(&self, name: &str, ctx: &Ctx<'_>) -> (Option<Outcome>, Option<String>) {
        let Ok(fname) = FileName::parse(name) else {
            return (None, None);
        };
        let key = fname.key().to_string();
        if self.fetcher.cache().get(&key).is_some() {
            return (None, Some(key));
        }
        let mut spellings = vec![name.to_string()];
        for alt in [name.to_ascii_lowercase(), name.to_ascii_uppercase()] {
            if !spellings.contains(&alt) {
                spellings.push(alt);
            }
        }
        let absent_ttl = self.absent_ttl();
        let mut asked = false;
        let mut problems = Vec::new();
        for s in &spellings {
            let Ok(spelling) = FileName::parse(s) else {
                continue;
            };
            if self.fetcher.not_found_within(s, absent_ttl) {
                continue;
            }
            asked = true;
            match self.fetch(&spelling, None, ctx).await {
                Outcome::NotFound { .. } => {}
                Outcome::Unreachable(why) => problems.push(why),
                o => {
                    let ok = matches!(o, Outcome::Fetched { .. });
                    return (Some(o), ok.then_some(key));
                }
            }
        }
        if !asked {
            (None, None)
        } else if problems.is_empty() {
            (Some(Outcome::NotFound { removed: false }), None)
        } else {
            (Some(Outcome::Unreachable(problems.join("; "))), None)
        }
    }

    /// How long discovery trusts "not found" for a name a config points at.
    fn absent_ttl(&self) -> Duration {
        self.settings.read().unwrap().intervals.defaults
    }

    /// Follows the current configs (and `sync.loads`) to their firmware and locale files,
    /// fetches what is missing where `plan` allows, pins the firmware in use and unpins what
    /// no config or plan names any more.
    async fn discover(
        &self,
        settings: &crate::config::SyncConfig,
        plan: &super::windows::Plan,
        ctx: &Ctx<'_>,
        report: &mut PassReport,
    ) {
        let refs = if settings.discover {
            self.current_refs()
        } else {
            ConfigRefs::default()
        };
        report.loads = refs.loads.len();
        self.stage_firmware(&refs.loads, settings, plan, ctx, report)
            .await;

        // Locale files: what phones fetched from one locale directory, and the seeds, for
        // every directory the configs name.
        if !plan.open(FileClass::Locale) || !settings.discover {
            return;
        }
        let locale_names = self.locale_names(&refs);
        let results = self.ensure_all(locale_names, ctx).await;
        for (name, (outcome, key)) in results {
            self.note(&name, FileClass::Locale, outcome.as_ref(), ctx);
            if key.is_some() {
                if let Ok(f) = FileName::parse(&name) {
                    self.known.lock().unwrap().learn(&f, Reason::Discovered);
                }
            }
        }
    }

    /// Records a discovery fetch; `false` if it leaves the picture incomplete.
    pub(super) fn note(
        &self,
        name: &str,
        class: FileClass,
        outcome: Option<&Outcome>,
        ctx: &Ctx<'_>,
    ) -> bool {
        match outcome {
            None => {
                ctx.progress.skipped();
                true
            }
            Some(o) => {
                ctx.record(name, class, o);
                !matches!(o, Outcome::Unreachable(_) | Outcome::Failed(_))
            }
        }
    }

    /// What `XMLDefault.cnf.xml` and every cached phone config name, merged. Parsed once per
    /// content (by sha256).
    pub(super) fn current_refs(&self) -> ConfigRefs {
        let cache = self.fetcher.cache();
        let mut all = ConfigRefs::default();
        let mut seen_shas = Vec::new();
        for e in cache.list() {
            let base = e.key.rsplit('/').next().unwrap_or(&e.key);
            let is_config = (base.starts_with("sep") || base.starts_with("xmldefault"))
                && (base.ends_with(".cnf.xml") || base.contains(".cnf.xml."));
            if !is_config {
                continue;
            }
            let cached = self.memo.lock().unwrap().get(&e.sha256).cloned();
            let refs = match cached {
                Some(r) => r,
                None => {
                    let Ok(Some((entry, bytes))) = cache.read_quiet(&e.key) else {
                        continue;
                    };
                    let r = Arc::new(parse::config_refs(&bytes));
                    self.memo
                        .lock()
                        .unwrap()
                        .insert(entry.sha256.clone(), r.clone());
                    r
                }
            };
            seen_shas.push(e.sha256.clone());
            for (dst, src) in [
                (&mut all.loads, &refs.loads),
                (&mut all.user_locales, &refs.user_locales),
                (&mut all.network_locales, &refs.network_locales),
            ] {
                for v in src {
                    if !dst.iter().any(|x: &String| x.eq_ignore_ascii_case(v)) {
                        dst.push(v.clone());
                    }
                }
            }
        }
        // Forget parses of contents no longer cached.
        let keep: std::collections::HashSet<String> = seen_shas.into_iter().collect();
        self.memo.lock().unwrap().retain(|k, _| keep.contains(k));
        all
    }

    /// Locale files to have for the locale directories the configs name: every file phones
    /// fetched from a directory of the same kind, plus the seeds.
    fn locale_names(&self, refs: &ConfigRefs) -> Vec<String> {
        let known: Vec<String> = self
            .known
            .lock()
            .unwrap()
            .names
            .values()
            .map(|n| n.name.clone())
            .collect();
        let mut out: Vec<String> = Vec::new();
        for (dirs, seeds) in [
            (&refs.user_locales, &USER_LOCALE_SEEDS[..]),
            (&refs.network_locales, &NETWORK_LOCALE_SEEDS[..]),
        ] {
            let mut files: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
            for n in &known {
                if let Some((dir, rest)) = n.split_once('/') {
                    if dirs.iter().any(|d| d.eq_ignore_ascii_case(dir))
                        && !files.iter().any(|f| f.eq_ignore_ascii_case(rest))
                    {
                        files.push(rest.to_string());
                    }
                }
            }
            for d in dirs {
                for f in &files {
                    let name = format!("{d}/{f}");
                    if !out.iter().any(|o| o.eq_ignore_ascii_case(&name)) {
                        out.push(name);
                    }
                }
            }
        }
        out
    }
}

/// Entries of `ConfigFileCacheList.txt` read at most: a cluster's phones times the few config
/// files each has, with room to spare. The rest of a longer list is not read.
const MAX_LIST_ENTRIES: usize = 200_000;
/// Bytes of the list read at most (blank or overlong lines count too).
const MAX_LIST_BYTES: u64 = 32 << 20;

/// Parses `ConfigFileCacheList.txt` as it streams in, within [`MAX_LIST_ENTRIES`] and
/// [`MAX_LIST_BYTES`]: memory stays bounded whatever the upstream sends.
async fn read_list(
    mut body: Body,
    ctx: &Ctx<'_>,
) -> Result<Vec<(String, Option<u64>)>, FetchError> {
    let mut reader = parse::ConfigListReader::new(MAX_LIST_ENTRIES);
    let mut read = 0u64;
    while let Some(chunk) = body.stream.next().await {
        let chunk = chunk?;
        read += chunk.len() as u64;
        ctx.wan_bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        reader.feed(&chunk);
        if reader.full() || read >= MAX_LIST_BYTES {
            warn!(
                entries = MAX_LIST_ENTRIES,
                bytes = MAX_LIST_BYTES,
                "sync: ConfigFileCacheList.txt is longer than this server reads; the rest is ignored"
            );
            break;
        }
    }
    Ok(reader.finish())
}

fn progress_plan(ctx: &Ctx<'_>, n: usize) {
    if n > 0 {
        ctx.progress.planned(n as u64);
    }
}

/// `sync.intervals` for a class.
pub fn interval_of(s: &crate::config::SyncConfig, class: FileClass) -> Duration {
    match class {
        FileClass::Config => s.intervals.config,
        FileClass::Defaults => s.intervals.defaults,
        FileClass::Locale => s.intervals.locale,
        FileClass::Firmware => s.intervals.firmware,
        FileClass::Other => s.intervals.other,
    }
}
