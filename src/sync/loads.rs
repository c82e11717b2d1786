//! Firmware loads: which the branch must hold (named by its configs, or planned in
//! `sync.loads` before any config names them), and how ready each one is. Readiness is what a
//! voice engineer checks before a rollout: every image the `.loads` file lists is cached, and
//! each hashes to the sha256 recorded when it was published (`/status` `loads`,
//! `branchtftp status`, `branchtftp_load_ready{load}`).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::known::Reason;
use super::pass::Ctx;
use super::windows::Plan;
use super::{parse, PassReport, Syncer};
use crate::cache::{Cache, Entry, FileClass};
use crate::config::SyncConfig;
use crate::name::FileName;

/// The `.loads` file of a planned load (`sync.loads` may name it with or without the
/// extension). Refuses names that are not one plain file name.
pub fn planned_file(load: &str) -> Result<FileName, String> {
    let load = load.trim();
    let stem = strip_loads(load);
    if stem.is_empty() {
        return Err("empty; write a load name such as sip8845_65.14-3-1-0001-13".into());
    }
    if stem.contains('/') || stem.contains('\\') {
        return Err("a load is one file name, without a directory".into());
    }
    FileName::parse(&format!("{stem}.loads")).map_err(|e| e.to_string())
}

fn strip_loads(name: &str) -> &str {
    match name.len().checked_sub(".loads".len()) {
        Some(i) if name.is_char_boundary(i) && name[i..].eq_ignore_ascii_case(".loads") => {
            &name[..i]
        }
        _ => name,
    }
}

/// A load the branch should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedLoad {
    /// The load name (`.loads` file name without the extension), as first written.
    pub name: String,
    /// In `sync.loads`.
    pub planned: bool,
    /// Named by a cached config's `<loadInformation>`.
    pub configured: bool,
}

/// The loads named by configs merged with the planned ones (case-insensitively), in that
/// order. Linear in the number of names.
pub fn wanted(configured: &[String], planned: &[String]) -> Vec<WantedLoad> {
    let mut out: Vec<WantedLoad> = Vec::new();
    let mut at: BTreeMap<String, usize> = BTreeMap::new();
    for (name, is_planned) in configured
        .iter()
        .map(|n| (n.as_str(), false))
        .chain(planned.iter().map(|n| (strip_loads(n.trim()), true)))
    {
        let key = name.to_ascii_lowercase();
        match at.get(&key) {
            Some(&i) => {
                let w = &mut out[i];
                w.planned |= is_planned;
                w.configured |= !is_planned;
            }
            None => {
                at.insert(key, out.len());
                out.push(WantedLoad {
                    name: name.to_string(),
                    planned: is_planned,
                    configured: !is_planned,
                });
            }
        }
    }
    out
}

/// The image names a `.loads` file lists, refused whole past `max_images` (a real load lists
/// about a dozen; a listing of thousands is an upstream gone wrong, not firmware to pin).
pub fn listed_images(
    name: &str,
    data: &[u8],
    max_images: usize,
) -> Option<Vec<(String, Option<u64>)>> {
    let listed = parse::loads_entries(data, max_images + 1);
    if listed.len() > max_images {
        warn!(
            name,
            max = max_images,
            "sync: this .loads file lists more images than sync.max_load_images allows; none of them is fetched or pinned"
        );
        return None;
    }
    Some(listed)
}

/// How ready one load is (`/status` `loads`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReadiness {
    /// The load name (`.loads` file name without the extension).
    pub name: String,
    /// Listed in `sync.loads`.
    pub planned: bool,
    /// Named by a cached config.
    #[serde(default)]
    pub configured: bool,
    /// Images the `.loads` file lists (0 while it is not cached).
    pub images: usize,
    pub images_present: usize,
    /// Total bytes of the load, once known (every image cached, or sizes listed).
    pub bytes: Option<u64>,
    pub bytes_present: u64,
    /// Every image (and the `.loads` file) re-hashed to the sha256 recorded at publish.
    #[serde(default)]
    pub verified: bool,
    /// The `.loads` file and every image it lists are cached.
    pub ready: bool,
}

/// The cached files of one load: its `.loads` entry and, per listed image, its entry if
/// cached. `None` when the `.loads` file is not cached (or not readable, or refused).
pub struct LoadFiles {
    pub loads: Entry,
    pub images: Vec<(String, Option<u64>, Option<Entry>)>,
}

impl LoadFiles {
    pub fn read(cache: &Cache, load: &str, max_images: usize) -> Option<LoadFiles> {
        let file = FileName::parse(&format!("{load}.loads")).ok()?;
        let (entry, bytes) = cache.read_quiet(file.key()).ok()??;
        let listed = listed_images(file.as_str(), &bytes, max_images)?;
        let images = listed
            .into_iter()
            .map(|(n, size)| {
                let e = FileName::parse(&n).ok().and_then(|f| cache.get(f.key()));
                (n, size, e)
            })
            .collect();
        Some(LoadFiles {
            loads: entry,
            images,
        })
    }

    /// Cached entries of the load, `.loads` first.
    pub fn present(&self) -> impl Iterator<Item = &Entry> {
        std::iter::once(&self.loads).chain(self.images.iter().filter_map(|(_, _, e)| e.as_ref()))
    }

    /// Readiness; `verified` holds the (key, sha256) pairs whose content was re-hashed.
    pub fn readiness(&self, w: &WantedLoad, verified: &HashSet<(String, String)>) -> LoadReadiness {
        let present: Vec<&Entry> = self
            .images
            .iter()
            .filter_map(|(_, _, e)| e.as_ref())
            .collect();
        let bytes_present: u64 = present.iter().map(|e| e.size).sum();
        let bytes = self
            .images
            .iter()
            .map(|(_, listed, e)| e.as_ref().map(|e| e.size).or(*listed))
            .sum::<Option<u64>>();
        let ready = present.len() == self.images.len();
        LoadReadiness {
            name: w.name.clone(),
            planned: w.planned,
            configured: w.configured,
            images: self.images.len(),
            images_present: present.len(),
            bytes,
            bytes_present,
            verified: ready
                && self
                    .present()
                    .all(|e| verified.contains(&(e.key.clone(), e.sha256.clone()))),
            ready,
        }
    }
}

/// The loads as a table (`branchtftp status`, `branchtftp sync --loads`).
pub fn render_table(loads: &[LoadReadiness]) -> String {
    use crate::cache::cli::human_size;
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<36} {:<11} {:>7} {:>21} {:<8} READY",
        "LOAD", "NAMED BY", "IMAGES", "BYTES", "VERIFIED"
    );
    for l in loads {
        let by = match (l.configured, l.planned) {
            (true, true) => "config+plan",
            (true, false) => "config",
            (false, _) => "plan",
        };
        let total = l.bytes.map_or("?".to_string(), human_size);
        let yes = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(
            o,
            "{:<36} {:<11} {:>7} {:>21} {:<8} {}",
            l.name,
            by,
            // A load whose `.loads` file is not cached yet lists nothing we know of.
            if l.images == 0 && !l.ready {
                "?".to_string()
            } else {
                format!("{}/{}", l.images_present, l.images)
            },
            format!("{}/{}", human_size(l.bytes_present), total),
            yes(l.verified),
            yes(l.ready)
        );
    }
    o
}

/// Readiness of a load whose `.loads` file is not cached (or was refused).
pub fn not_staged(w: &WantedLoad) -> LoadReadiness {
    LoadReadiness {
        name: w.name.clone(),
        planned: w.planned,
        configured: w.configured,
        images: 0,
        images_present: 0,
        bytes: None,
        bytes_present: 0,
        verified: false,
        ready: false,
    }
}

/// Whether a cached file's content still hashes to the sha256 recorded when it was published.
pub fn content_matches(cache: &Cache, e: &Entry) -> bool {
    use sha2::{Digest, Sha256};
    match cache.read_quiet(&e.key) {
        Ok(Some((entry, bytes))) => {
            entry.sha256 == e.sha256 && hex::encode(Sha256::digest(&bytes)) == e.sha256
        }
        _ => false,
    }
}

impl Syncer {
    /// The firmware part of discovery: reads (fetching where `plan` allows) the `.loads` file
    /// of every configured and planned load, unpins firmware nothing names any more (only
    /// from a complete picture), then fetches each load's missing images and pins the load
    /// within `sync.max_pinned`. Configured loads come first: phones run them now.
    pub(super) async fn stage_firmware(
        &self,
        configured: &[String],
        settings: &SyncConfig,
        plan: &Plan,
        ctx: &Ctx<'_>,
        report: &mut PassReport,
    ) {
        let cache = self.fetcher.cache();
        let loads = wanted(configured, &settings.loads);
        let fetch: Vec<String> = loads
            .iter()
            .filter(|w| plan.fetch_load(w.planned))
            .map(|w| format!("{}.loads", w.name))
            .collect();
        let mut complete = true;
        for (name, (outcome, _)) in self.ensure_all(fetch, ctx).await {
            complete &= self.note(&name, FileClass::Firmware, outcome.as_ref(), ctx);
        }
        let mut wanted_keys: BTreeSet<String> = BTreeSet::new();
        let mut staged: Vec<(&WantedLoad, LoadFiles)> = Vec::new();
        for w in &loads {
            let Ok(file) = FileName::parse(&format!("{}.loads", w.name)) else {
                continue;
            };
            match LoadFiles::read(cache, &w.name, settings.max_load_images) {
                Some(files) => {
                    wanted_keys.insert(files.loads.key.clone());
                    for (img, _, _) in &files.images {
                        if let Ok(f) = FileName::parse(img) {
                            wanted_keys.insert(f.key().to_string());
                        }
                    }
                    staged.push((w, files));
                }
                // Cached but refused (too many images): keep the listing, pin none of it.
                None if cache.get(file.key()).is_some() => {
                    wanted_keys.insert(file.key().to_string());
                }
                // Not fetched in this pass (its window is closed): what it lists is unknown.
                None if !plan.fetch_load(w.planned) => complete = false,
                None => {}
            }
        }
        if complete {
            self.unpin_unwanted(&wanted_keys, report);
        }
        let budget = cache.max_bytes() / 100 * settings.max_pinned as u64;
        for (w, files) in &mut staged {
            if plan.fetch_load(w.planned) {
                self.fetch_images(w, files, budget, ctx).await;
            }
            self.pin_load(files, budget, ctx, report);
        }
        {
            let mut known = self.known.lock().unwrap();
            for (_, files) in &staged {
                for e in files.present() {
                    if let Ok(f) = FileName::parse(&e.name) {
                        known.learn(&f, Reason::Discovered);
                    }
                }
            }
        }
        self.verify_staged(&staged).await;
    }

    /// Fetches the images of one load that are not cached, unless pinned firmware already
    /// fills `budget` (they could not be pinned, and unpinned they would be evicted again).
    async fn fetch_images(
        &self,
        w: &WantedLoad,
        files: &mut LoadFiles,
        budget: u64,
        ctx: &Ctx<'_>,
    ) {
        let missing: Vec<String> = files
            .images
            .iter()
            .filter(|(_, _, e)| e.is_none())
            .map(|(n, _, _)| n.clone())
            .collect();
        if missing.is_empty() {
            return;
        }
        let pinned = self.pinned_bytes();
        if pinned >= budget {
            let why = format!(
                "{} images of load {} not fetched: pinned firmware already takes {} bytes, the sync.max_pinned limit ({budget} bytes)",
                missing.len(),
                w.name,
                pinned
            );
            warn!("sync: {why}");
            ctx.problem(why);
            return;
        }
        for (name, (outcome, _)) in self.ensure_all(missing, ctx).await {
            self.note(&name, FileClass::Firmware, outcome.as_ref(), ctx);
        }
        let cache = self.fetcher.cache();
        for (n, _, e) in &mut files.images {
            if e.is_none() {
                *e = FileName::parse(n).ok().and_then(|f| cache.get(f.key()));
            }
        }
    }

    /// Pins a load's cached files while pinned bytes stay within `budget`; says which were
    /// left unpinned when it does not fit.
    fn pin_load(&self, files: &LoadFiles, budget: u64, ctx: &Ctx<'_>, report: &mut PassReport) {
        let cache = self.fetcher.cache();
        let mut pinned = self.pinned_bytes();
        let mut left_out = Vec::new();
        for e in files.present() {
            if cache.get(&e.key).is_none_or(|now| now.pinned) {
                continue;
            }
            if pinned + e.size > budget {
                left_out.push(e.name.clone());
                continue;
            }
            match cache.set_pinned(&e.key, true) {
                Ok(()) => {
                    pinned += e.size;
                    report.pinned += 1;
                }
                Err(err) => warn!(name = %e.name, "sync: cannot pin: {err}"),
            }
        }
        if let Some(first) = left_out.first() {
            let why = format!(
                "{} files of load {} left unpinned (first {first}): pinned firmware would exceed sync.max_pinned ({budget} bytes of cache.max_size)",
                left_out.len(),
                strip_loads(&files.loads.name)
            );
            warn!("sync: {why}");
            ctx.problem(why);
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.fetcher
            .cache()
            .list()
            .iter()
            .filter(|e| e.pinned)
            .map(|e| e.size)
            .sum()
    }

    /// Unpins cached firmware no configured or planned load names, and forgets why it was
    /// known.
    fn unpin_unwanted(&self, wanted: &BTreeSet<String>, report: &mut PassReport) {
        let cache = self.fetcher.cache();
        for e in cache.list() {
            if e.pinned && e.class == FileClass::Firmware && !wanted.contains(&e.key) {
                match cache.set_pinned(&e.key, false) {
                    Ok(()) => {
                        info!(name = %e.name, "sync: no config or sync.loads names this firmware any more; unpinned");
                        report.unpinned += 1;
                    }
                    Err(err) => warn!(name = %e.name, "sync: cannot unpin: {err}"),
                }
            }
        }
        let mut known = self.known.lock().unwrap();
        let stale: Vec<String> = known
            .names
            .iter()
            .filter(|(k, n)| {
                n.reasons.contains(&Reason::Discovered)
                    && self.class_of(k) == FileClass::Firmware
                    && !wanted.contains(*k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            known.drop_reason(&k, Reason::Discovered, false);
        }
    }

    /// Re-hashes the cached files of the staged loads not verified yet (once per content).
    async fn verify_staged(&self, staged: &[(&WantedLoad, LoadFiles)]) {
        let todo: Vec<Entry> = {
            let done = self.verified.lock().unwrap();
            staged
                .iter()
                .flat_map(|(_, f)| f.present())
                .filter(|e| !done.contains(&(e.key.clone(), e.sha256.clone())))
                .cloned()
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let cache = self.fetcher.cache().clone();
        let good = tokio::task::spawn_blocking(move || {
            todo.into_iter()
                .filter(|e| {
                    let ok = content_matches(&cache, e);
                    if !ok {
                        warn!(name = %e.name, "sync: firmware does not hash to the sha256 recorded at publish; run `branchtftp cache verify`");
                    }
                    ok
                })
                .map(|e| (e.key, e.sha256))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.verified.lock().unwrap().extend(good);
    }

    /// Readiness of every load the branch knows: named by cached configs, or planned.
    pub fn load_readiness(&self) -> Vec<LoadReadiness> {
        let settings = self.settings();
        let configured = if settings.discover {
            self.current_refs().loads
        } else {
            Vec::new()
        };
        let cache = self.fetcher.cache();
        let verified = self.verified.lock().unwrap().clone();
        wanted(&configured, &settings.loads)
            .iter()
            .map(
                |w| match LoadFiles::read(cache, &w.name, settings.max_load_images) {
                    Some(files) => files.readiness(w, &verified),
                    None => not_staged(w),
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_names_with_or_without_the_extension() {
        assert_eq!(
            planned_file("sip8845_65.14-3-1-0001-13").unwrap().as_str(),
            "sip8845_65.14-3-1-0001-13.loads"
        );
        assert_eq!(
            planned_file("SIP78xx.14-2-1.LOADS").unwrap().as_str(),
            "SIP78xx.14-2-1.loads"
        );
        assert!(planned_file("../x").is_err());
        assert!(planned_file("dir/x").is_err());
        assert!(planned_file(".loads").is_err());
    }

    #[test]
    fn configured_and_planned_merge_case_insensitively() {
        let w = wanted(
            &["SIP45.9-4-2".into(), "sip88xx.14".into()],
            &["sip45.9-4-2.loads".into(), "new.1".into()],
        );
        assert_eq!(w.len(), 3);
        assert!(w[0].planned && w[0].configured);
        assert!(!w[1].planned && w[1].configured);
        assert!(w[2].planned && !w[2].configured);
        assert_eq!(w[2].name, "new.1");
    }

    #[test]
    fn hundred_thousand_distinct_loads_merge_in_linear_time() {
        let many: Vec<String> = (0..100_000).map(|i| format!("load{i}")).collect();
        let started = std::time::Instant::now();
        assert_eq!(wanted(&many, &many).len(), 100_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
