//! Start-up recovery: before anything is served, make the index and the files agree again.
//!
//! - stray temp files (publishes cut short) are removed;
//! - intent records left by a publish cut short after its rename are resolved by hashing the
//!   file: it is either the new version (installed) or the old one (kept);
//! - entries whose file is missing, or of the wrong size, are dropped (and such files removed);
//! - files without an entry are hashed and indexed (`source: recovered`);
//! - an index sled will not open is moved aside to `index.sled.corrupt-<ms>` and rebuilt from
//!   the files, without a single download.
//!
//! Every repair is logged.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use tracing::{info, warn};

use super::maintenance::hash_file;
use super::origin;
use super::{
    fsync_dir, now_millis, remove_file_logged, Cache, CacheError, ClassRules, Entry, Inner, Layout,
    State, Validators,
};
use crate::name::FileName;

/// What [`Cache::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Files indexed after recovery.
    pub files: u64,
    pub bytes: u64,
    /// Temp files of interrupted publishes removed.
    pub temp_removed: u64,
    /// Interrupted installs resolved from their intent record.
    pub pending_resolved: u64,
    /// Entries dropped: file missing, wrong size, or unreadable record.
    pub entries_dropped: u64,
    /// Files found without an entry, hashed and indexed.
    pub files_reindexed: u64,
    /// Files removed: wrong size for their entry, or a name that cannot be a cache key.
    pub files_removed: u64,
    /// Where a corrupt index was moved before the rebuild.
    pub index_moved_aside: Option<PathBuf>,
    /// Files evicted because the cache was over quota.
    pub evicted: u64,
    pub elapsed: Duration,
}

impl RecoveryReport {
    /// How many repairs were made (0 after a clean shutdown).
    pub fn repairs(&self) -> u64 {
        self.temp_removed
            + self.pending_resolved
            + self.entries_dropped
            + self.files_reindexed
            + self.files_removed
            + u64::from(self.index_moved_aside.is_some())
    }
}

type Loaded = (
    sled::Db,
    sled::Tree,
    Vec<(String, Option<Entry>)>,
    Vec<(String, Option<Entry>)>,
);

enum IndexFailure {
    /// Damaged beyond what sled can read: move aside and rebuild.
    Corrupt(String),
    /// Anything else (permissions, I/O): refuse to start rather than throw the index away.
    Fatal(sled::Error),
}

fn decode(kv: sled::Result<(sled::IVec, sled::IVec)>) -> sled::Result<(String, Option<Entry>)> {
    let (k, v) = kv?;
    let key = String::from_utf8_lossy(&k).into_owned();
    Ok((key, serde_json::from_slice::<Entry>(&v).ok()))
}

fn try_load(path: &Path) -> Result<Loaded, IndexFailure> {
    let attempt = catch_unwind(AssertUnwindSafe(|| -> sled::Result<Loaded> {
        // No periodic flusher thread of sled's own: every change that must survive a power
        // cut is flushed where it is made (publish, remove, eviction), and the running
        // appliance flushes hit counts with its write-back (`Cache::write_usage_back`).
        let db = sled::Config::new().path(path).flush_every_ms(None).open()?;
        let pending = db.open_tree("pending")?;
        let entries = db.iter().map(decode).collect::<sled::Result<Vec<_>>>()?;
        let intents = pending
            .iter()
            .map(decode)
            .collect::<sled::Result<Vec<_>>>()?;
        Ok((db, pending, entries, intents))
    }));
    match attempt {
        Ok(Ok(loaded)) => Ok(loaded),
        Ok(Err(sled::Error::Io(e)))
            if !matches!(
                e.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Err(IndexFailure::Fatal(sled::Error::Io(e)))
        }
        Ok(Err(e)) => Err(IndexFailure::Corrupt(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "sled panicked".into());
            Err(IndexFailure::Corrupt(msg))
        }
    }
}

/// Takes the cache directory for this process (flock), so two processes never repair or
/// publish into one cache at once.
fn take_lock(layout: &Layout) -> Result<File, CacheError> {
    let path = layout.root.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(CacheError::io(&path))?;
    // SAFETY: flock on a valid fd we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(CacheError::Locked(layout.root.clone()));
        }
        return Err(CacheError::Io { path, source: err });
    }
    Ok(f)
}

fn mkdir(dir: &Path) -> Result<(), CacheError> {
    fs::create_dir_all(dir).map_err(CacheError::io(dir))
}

/// Files under `files/`: key → (size, mtime millis).
type OnDisk = HashMap<String, (u64, u64)>;

/// The files on disk, and how many unusable files were removed.
fn walk_files(layout: &Layout) -> Result<(OnDisk, u64), CacheError> {
    let mut removed = 0;
    let mut out = HashMap::new();
    let mut stack = vec![layout.files.clone()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(CacheError::io(&dir))?;
        for de in rd {
            let de = de.map_err(CacheError::io(&dir))?;
            let path = de.path();
            let ft = de.file_type().map_err(CacheError::io(&path))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&layout.files)
                .expect("under files/")
                .to_str()
                .map(|s| s.to_string());
            let valid_key = rel
                .as_deref()
                .and_then(|r| FileName::parse(r).ok().map(|n| n.key() == r))
                .unwrap_or(false);
            if !ft.is_file() || !valid_key {
                warn!(path = %path.display(), "cache: removing a file that cannot be a cache entry");
                remove_file_logged(&path);
                removed += 1;
                continue;
            }
            let md = de.metadata().map_err(CacheError::io(&path))?;
            let mtime = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            out.insert(rel.expect("valid"), (md.len(), mtime));
        }
    }
    Ok((out, removed))
}

/// The index, or a fresh one if it is damaged (the old one moved aside).
fn load_index(layout: &Layout, report: &mut RecoveryReport) -> Result<Loaded, CacheError> {
    let loaded = match try_load(&layout.index) {
        Ok(loaded) => loaded,
        Err(IndexFailure::Fatal(source)) => {
            return Err(CacheError::Index {
                path: layout.index.clone(),
                source,
            })
        }
        Err(IndexFailure::Corrupt(why)) => {
            let aside = layout
                .root
                .join(format!("index.sled.corrupt-{}", now_millis()));
            warn!(
                index = %layout.index.display(),
                aside = %aside.display(),
                "cache: index will not open ({why}); moving it aside and rebuilding from the files"
            );
            fs::rename(&layout.index, &aside).map_err(CacheError::io(&layout.index))?;
            fsync_dir(&layout.root)?;
            report.index_moved_aside = Some(aside);
            match try_load(&layout.index) {
                Ok(loaded) => loaded,
                Err(IndexFailure::Fatal(source)) => {
                    return Err(CacheError::Index {
                        path: layout.index.clone(),
                        source,
                    })
                }
                Err(IndexFailure::Corrupt(why)) => {
                    return Err(CacheError::Index {
                        path: layout.index.clone(),
                        source: sled::Error::Unsupported(why),
                    })
                }
            }
        }
    };
    Ok(loaded)
}

pub(super) fn open(
    dir: &Path,
    max_bytes: u64,
    rules: ClassRules,
) -> Result<(Cache, RecoveryReport), CacheError> {
    let started = Instant::now();
    let layout = Layout::new(dir);
    for d in [&layout.root, &layout.files, &layout.tmp, &layout.quarantine] {
        mkdir(d)?;
    }
    let lock_file = take_lock(&layout)?;
    let mut report = RecoveryReport::default();

    // 1. The index (or a fresh one if it is damaged) and the files on disk, read in parallel:
    // both are dominated by system calls over every entry.
    let (loaded, walked) = std::thread::scope(|s| {
        let walker = s.spawn(|| walk_files(&layout));
        let loaded = load_index(&layout, &mut report);
        (
            loaded,
            walker.join().expect("walking the cache files panicked"),
        )
    });
    let (db, pending, raw_entries, intents) = loaded?;
    let (mut on_disk, unusable) = walked?;
    report.files_removed += unusable;
    let index_err = |source| CacheError::Index {
        path: layout.index.clone(),
        source,
    };

    // 2. Interrupted publishes.
    let rd = fs::read_dir(&layout.tmp).map_err(CacheError::io(&layout.tmp))?;
    for de in rd {
        let path = de.map_err(CacheError::io(&layout.tmp))?.path();
        info!(tmp = %path.display(), "cache: removing temp file of an interrupted publish");
        let r = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        r.map_err(CacheError::io(&path))?;
        report.temp_removed += 1;
    }

    // 3. Reconcile the index with the files.
    let mut entries: HashMap<String, Entry> = HashMap::with_capacity(raw_entries.len());
    let mut changed: Vec<String> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for (key, e) in raw_entries {
        match e {
            Some(e) if e.key == key => {
                entries.insert(key, e);
            }
            _ => {
                warn!(key, "cache: dropping an unreadable index record");
                report.entries_dropped += 1;
                removed.push(key);
            }
        }
    }
    for (key, intent) in intents {
        report.pending_resolved += 1;
        let Some(intent) = intent else {
            continue;
        };
        let path = layout.file_path(&key);
        let actual = match on_disk.get(&key) {
            Some(_) => Some(hash_file(&path).map_err(CacheError::io(&path))?),
            None => None,
        };
        match actual {
            Some((size, sha)) if size == intent.size && sha == intent.sha256 => {
                info!(name = %intent.name, "cache: completing an install interrupted after its rename");
                entries.insert(key.clone(), intent);
                changed.push(key);
            }
            Some((_, sha)) if entries.get(&key).is_some_and(|old| old.sha256 == sha) => {
                info!(
                    key,
                    "cache: install interrupted before its rename; old version kept"
                );
            }
            Some(_) => {
                // Neither version we know: forget the entry; the file is re-indexed below.
                warn!(
                    key,
                    "cache: file matches neither recorded version; re-indexing it"
                );
                if entries.remove(&key).is_some() {
                    report.entries_dropped += 1;
                    removed.push(key);
                }
            }
            None => info!(key, "cache: install interrupted; nothing was renamed"),
        }
    }
    pending.clear().map_err(index_err)?;

    entries.retain(|key, e| match on_disk.get(key) {
        None => {
            warn!(name = %e.name, "cache: dropping entry whose file is missing");
            report.entries_dropped += 1;
            removed.push(key.clone());
            false
        }
        Some(&(size, _)) if size != e.size => {
            warn!(name = %e.name, want = e.size, found = size, "cache: dropping entry whose file has the wrong size; file removed");
            remove_file_logged(&layout.file_path(key));
            on_disk.remove(key);
            report.entries_dropped += 1;
            report.files_removed += 1;
            removed.push(key.clone());
            false
        }
        Some(_) => {
            on_disk.remove(key);
            true
        }
    });

    // 4. Files without an entry: hash and index them.
    let mut orphans: Vec<(String, (u64, u64))> = on_disk.into_iter().collect();
    orphans.sort();
    for (key, (_, mtime)) in orphans {
        let path = layout.file_path(&key);
        let (size, sha256) = hash_file(&path).map_err(CacheError::io(&path))?;
        if report.index_moved_aside.is_none() {
            info!(key, size, "cache: indexing a file that had no entry");
        }
        let mut e = Entry {
            name: key.clone(),
            key: key.clone(),
            size,
            sha256,
            class: rules.classify(&key),
            source: "recovered".into(),
            validators: Validators::default(),
            fetched_at: mtime,
            validated_at: 0,
            last_used: mtime,
            hits: 0,
            pinned: false,
        };
        // The label is trusted only for the very bytes it was written with.
        if let Some(o) = origin::read(&path).filter(|o| {
            o.sha256 == e.sha256 && FileName::parse(&o.name).is_ok_and(|n| n.key() == key)
        }) {
            e.name = o.name;
            e.source = o.source;
            e.validators = o.validators;
            e.fetched_at = o.fetched_at;
        }
        entries.insert(key.clone(), e);
        changed.push(key);
        report.files_reindexed += 1;
    }
    if report.index_moved_aside.is_some() {
        info!(
            files = report.files_reindexed,
            "cache: index rebuilt from the files on disk"
        );
    }

    // Classes follow the current rules (the operator may have changed `cache.classes`).
    for (key, e) in entries.iter_mut() {
        let class = rules.classify(key);
        if e.class != class {
            e.class = class;
            changed.push(key.clone());
        }
    }

    if !changed.is_empty() || !removed.is_empty() {
        let mut b = sled::Batch::default();
        for k in &removed {
            b.remove(k.as_bytes());
        }
        for k in &changed {
            if let Some(e) = entries.get(k) {
                b.insert(k.as_bytes(), serde_json::to_vec(e).expect("serializes"));
            }
        }
        db.apply_batch(b).map_err(index_err)?;
    }
    db.flush().map_err(index_err)?;

    let bytes = entries.values().map(|e| e.size).sum();
    let inner = Arc::new(Inner {
        layout,
        db,
        pending,
        rules,
        max_bytes,
        state: Mutex::new(State {
            entries,
            bytes,
            ..State::default()
        }),
        index_write: Mutex::new(()),
        tmp_seq: AtomicU64::new(0),
        _lock: lock_file,
    });
    report.evicted = inner.enforce_quota(None)?.len() as u64;
    {
        let st = inner.state();
        report.files = st.entries.len() as u64;
        report.bytes = st.bytes;
    }
    report.elapsed = started.elapsed();
    if report.repairs() > 0 {
        warn!(?report, "cache: recovered");
    } else {
        info!(
            files = report.files,
            bytes = report.bytes,
            "cache: opened clean"
        );
    }
    Ok((Cache { inner }, report))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::cache::PublishMeta;

    fn publish(cache: &Cache, raw: &str, bytes: &[u8]) -> Entry {
        let mut p = cache.publisher(&FileName::parse(raw).unwrap()).unwrap();
        p.write_all(bytes).unwrap();
        p.commit(PublishMeta::default()).unwrap()
    }

    /// Reproduces the state a crash leaves between the intent record and the entry update:
    /// the new entry is only in `pending`; `renamed` says whether the new file got in place.
    fn interrupted_install(dir: &Path, renamed: bool) -> (Entry, Entry) {
        let (cache, _) = Cache::open(dir, u64::MAX, ClassRules::default()).unwrap();
        let old = publish(&cache, "dialplan.xml", b"old plan");
        // Same size as the old bytes: only the hash can tell the versions apart.
        let new_bytes = b"new plan";
        let new = Entry {
            size: new_bytes.len() as u64,
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(new_bytes)),
            ..old.clone()
        };
        let inner = &cache.inner;
        inner
            .pending
            .insert(old.key.as_bytes(), serde_json::to_vec(&new).unwrap())
            .unwrap();
        inner.flush_index().unwrap();
        if renamed {
            std::fs::write(inner.layout.file_path(&old.key), new_bytes).unwrap();
        }
        (old, new)
    }

    #[test]
    fn install_cut_after_its_rename_is_completed() {
        let d = tempfile::tempdir().unwrap();
        let (_, new) = interrupted_install(d.path(), true);
        let (cache, report) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
        assert_eq!(report.pending_resolved, 1);
        assert_eq!(cache.get("dialplan.xml").unwrap().sha256, new.sha256);
        assert!(cache.inner.pending.is_empty());
    }

    #[test]
    fn install_cut_before_its_rename_keeps_the_old_version() {
        let d = tempfile::tempdir().unwrap();
        let (old, _) = interrupted_install(d.path(), false);
        let (cache, report) = Cache::open(d.path(), u64::MAX, ClassRules::default()).unwrap();
        assert_eq!(report.pending_resolved, 1);
        assert_eq!(cache.get("dialplan.xml").unwrap().sha256, old.sha256);
        assert!(cache.inner.pending.is_empty());
    }
}
