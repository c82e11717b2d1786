//! The cache: phone files kept as plain files under `cache.dir/files/`, indexed in sled by their
//! case-folded name (size, sha256, class, upstream, validators, times, hits, pin).
//!
//! It must never hand a phone a partial or corrupt file and must come back intact after a power
//! cut, so every publish goes temp file → fsync → intent record in the index → rename → fsync of
//! the directory → index entry → sled flush ([`Publisher`]), and [`Cache::open`] repairs whatever
//! a crash left behind before anything is served (`recovery`). A reader that opened a file keeps
//! its inode across a replace or an eviction, so a phone mid-transfer is never disturbed.
//!
//! Lookups are served from an in-memory mirror of the index; hit counts and last-use times are
//! written back to sled lazily (every few seconds and on drop) so the hot path stays a hash
//! lookup plus one `open(2)`.
//!
//! Layout of `cache.dir`:
//! ```text
//! lock            flock'd by the one process that owns the cache
//! index.sled/     the sled index (moved aside to index.sled.corrupt-<ms> if it will not open)
//! files/<key>     content, one plain file per name (locale paths make subdirectories),
//!                 labelled with its origin in an xattr for rebuilds (`origin`)
//! tmp/            publishes in progress; emptied at start
//! quarantine/     files `verify` found corrupt, kept for inspection
//! ```

mod class;
pub mod cli;
mod maintenance;
mod origin;
mod publish;
mod recovery;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

pub use class::{ClassRule, ClassRules, FileClass};
pub use maintenance::{CorruptFile, ImportReport, VerifyReport};
pub use publish::{PublishMeta, Publisher};
pub use recovery::RecoveryReport;

use crate::name::FileName;

/// Everything that can go wrong in the cache; each names the file or directory involved.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cache index {}: {source}", path.display())]
    Index { path: PathBuf, source: sled::Error },
    #[error(
        "cache directory {} is in use by another branchtftp process (stop it, or use its admin endpoint)",
        .0.display()
    )]
    Locked(PathBuf),
    #[error("{name}: expected {expected} bytes but {got} were written; not stored")]
    SizeMismatch {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("{0}: not in the cache")]
    NotCached(String),
}

impl CacheError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io { path, source }
    }

    /// Whether the underlying cause is a full disk (ENOSPC) or quota (EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        match self {
            CacheError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// The cache validators the upstream gave with the file, for conditional revalidation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub upstream_size: Option<u64>,
}

impl Validators {
    fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none() && self.upstream_size.is_none()
    }
}

/// One cached file as the index knows it. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The name as first published (client spelling); `key` when rebuilt from disk.
    pub name: String,
    /// The case-folded lookup key; also the path under `files/`.
    pub key: String,
    pub size: u64,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
    pub class: FileClass,
    /// Where it came from: an upstream URL, `import:<dir>` or `recovered`.
    pub source: String,
    #[serde(default)]
    pub validators: Validators,
    pub fetched_at: u64,
    pub validated_at: u64,
    pub last_used: u64,
    pub hits: u64,
    pub pinned: bool,
}

/// Current time in unix milliseconds.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where things live under `cache.dir`.
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
    files: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    index: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            files: root.join("files"),
            tmp: root.join("tmp"),
            quarantine: root.join("quarantine"),
            index: root.join("index.sled"),
        }
    }

    fn file_path(&self, key: &str) -> PathBuf {
        self.files.join(key)
    }
}

/// The in-memory mirror of the index plus what only lives in memory.
#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    bytes: u64,
    /// Open [`CachedFile`]s per key: never evicted while non-zero.
    in_use: HashMap<String, u32>,
    /// Keys whose memory copy is newer than sled (usage counters, or dropped entries).
    dirty: HashSet<String>,
}

struct Inner {
    layout: Layout,
    db: sled::Db,
    /// Intent records: key → the entry being installed, written before the rename so that
    /// recovery can tell which version a file on disk is.
    pending: sled::Tree,
    rules: ClassRules,
    max_bytes: u64,
    state: Mutex<State>,
    /// Serializes every write to sled so it applies in the same order as to memory.
    index_write: Mutex<()>,
    tmp_seq: AtomicU64,
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn index_err(&self) -> impl Fn(sled::Error) -> CacheError + '_ {
        move |source| CacheError::Index {
            path: self.layout.index.clone(),
            source,
        }
    }

    fn put_entry(&self, e: &Entry) -> Result<(), CacheError> {
        let json = serde_json::to_vec(e).expect("entry serializes");
        self.db
            .insert(e.key.as_bytes(), json)
            .map_err(self.index_err())?;
        Ok(())
    }

    fn flush_index(&self) -> Result<(), CacheError> {
        self.db.flush().map_err(self.index_err())?;
        Ok(())
    }

    /// Writes usage counters (and entries dropped on the hot path) back to sled; `false` if
    /// there was nothing to write.
    fn flush_usage(&self) -> Result<bool, CacheError> {
        let _w = lock(&self.index_write);
        let batch: Vec<(String, Option<Entry>)> = {
            let mut st = self.state();
            if st.dirty.is_empty() {
                return Ok(false);
            }
            let dirty = std::mem::take(&mut st.dirty);
            dirty
                .into_iter()
                .map(|k| {
                    let e = st.entries.get(&k).cloned();
                    (k, e)
                })
                .collect()
        };
        let mut b = sled::Batch::default();
        for (k, e) in batch {
            match e {
                Some(e) => b.insert(k.as_bytes(), serde_json::to_vec(&e).expect("serializes")),
                None => b.remove(k.as_bytes()),
            }
        }
        self.db.apply_batch(b).map_err(self.index_err())?;
        Ok(true)
    }

    /// Evicts least recently used files until the cache fits `max_bytes`, skipping pinned
    /// files, files in use and `keep` (the file just published: someone is waiting for it).
    fn enforce_quota(&self, keep: Option<&str>) -> Result<Vec<String>, CacheError> {
        let _w = lock(&self.index_write);
        let mut victims = Vec::new();
        {
            let mut st = self.state();
            if st.bytes <= self.max_bytes {
                return Ok(victims);
            }
            let mut candidates: Vec<(u64, String)> = st
                .entries
                .values()
                .filter(|e| !e.pinned && Some(e.key.as_str()) != keep)
                .filter(|e| !st.in_use.contains_key(&e.key))
                .map(|e| (e.last_used, e.key.clone()))
                .collect();
            candidates.sort();
            for (_, key) in candidates {
                if st.bytes <= self.max_bytes {
                    break;
                }
                // Unlink under the state lock so no open_file can race with it.
                let e = st.entries.remove(&key).expect("candidate exists");
                st.bytes -= e.size;
                st.dirty.remove(&key);
                remove_file_logged(&self.layout.file_path(&key));
                info!(name = %e.name, size = e.size, last_used = e.last_used, "cache: evicted (quota)");
                victims.push(key);
            }
            if st.bytes > self.max_bytes {
                warn!(
                    bytes = st.bytes,
                    max_bytes = self.max_bytes,
                    "cache: still over quota; the rest is pinned or in use"
                );
            }
        }
        if !victims.is_empty() {
            let mut b = sled::Batch::default();
            for k in &victims {
                b.remove(k.as_bytes());
            }
            self.db.apply_batch(b).map_err(self.index_err())?;
            self.flush_index()?;
        }
        Ok(victims)
    }

    /// Removes one entry and its file, whatever its pin or use (readers keep their inode).
    fn remove_entry(&self, key: &str, only_unpinned: bool) -> Result<bool, CacheError> {
        let _w = lock(&self.index_write);
        {
            let mut st = self.state();
            match st.entries.get(key) {
                None => return Ok(false),
                Some(e) if only_unpinned && e.pinned => return Ok(false),
                Some(_) => {}
            }
            let e = st.entries.remove(key).expect("checked");
            st.bytes -= e.size;
            st.dirty.remove(key);
            remove_file_logged(&self.layout.file_path(key));
            info!(name = %e.name, size = e.size, "cache: removed");
        }
        self.db.remove(key.as_bytes()).map_err(self.index_err())?;
        self.flush_index()?;
        Ok(true)
    }

    fn update_entry(&self, key: &str, f: impl FnOnce(&mut Entry)) -> Result<Entry, CacheError> {
        let _w = lock(&self.index_write);
        let e = {
            let mut st = self.state();
            let e = st
                .entries
                .get_mut(key)
                .ok_or_else(|| CacheError::NotCached(key.to_string()))?;
            f(e);
            let e = e.clone();
            st.dirty.remove(key);
            e
        };
        self.put_entry(&e)?;
        self.flush_index()?;
        Ok(e)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush_usage().and_then(|_| self.flush_index()) {
            warn!("cache: could not write usage counters back: {e}");
        }
    }
}

fn remove_file_logged(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), "cache: could not remove file: {e}");
        }
    }
}

/// fsyncs a directory so a rename or unlink in it survives a power cut.
fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CacheError::io(dir))
}

/// The cache. Cheap to clone; all clones share one index and one directory.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// How often a running appliance writes hit counts and last-use times back to the index
/// ([`Cache::write_usage_back`]).
pub const USAGE_WRITE_BACK: std::time::Duration = std::time::Duration::from_secs(2);

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.inner.layout.root)
            .finish()
    }
}

/// An open cached file. While it lives the file is "in use" and never evicted for quota; its
/// content is the version that was current when it was opened, whatever is published meanwhile.
#[derive(Debug)]
pub struct CachedFile {
    pub entry: Entry,
    pub file: File,
    pub guard: InUse,
}

impl io::Read for CachedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// Marks a key in use until dropped.
pub struct InUse {
    inner: Arc<Inner>,
    key: String,
}

impl std::fmt::Debug for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InUse").field(&self.key).finish()
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(n) = st.in_use.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.in_use.remove(&self.key);
            }
        }
    }
}

impl Cache {
    /// Opens (creating if needed) the cache in `dir`, repairing what a crash left behind; see
    /// [`RecoveryReport`]. Fails with [`CacheError::Locked`] if another process has it open.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        rules: ClassRules,
    ) -> Result<(Cache, RecoveryReport), CacheError> {
        recovery::open(dir, max_bytes, rules)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.layout.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    pub fn rules(&self) -> &ClassRules {
        &self.inner.rules
    }

    /// Index lookup only (no disk access, no usage bump).
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.inner.state().entries.get(key).cloned()
    }

    /// Looks a key up and opens its file: `Ok(None)` on a miss. Counts a hit.
    pub fn open_file(&self, key: &str) -> Result<Option<CachedFile>, CacheError> {
        let inner = &self.inner;
        let mut st = inner.state();
        if !st.entries.contains_key(key) {
            return Ok(None);
        }
        // Opened under the state lock: a publish renames under the same lock, so the entry
        // always describes the inode we get.
        let path = inner.layout.file_path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Someone deleted it behind our back: forget it, the miss path will refetch.
                let e = st.entries.remove(key).expect("checked");
                st.bytes -= e.size;
                st.dirty.insert(key.to_string());
                warn!(name = %e.name, path = %path.display(), "cache: file vanished; entry dropped");
                return Ok(None);
            }
            Err(e) => return Err(CacheError::Io { path, source: e }),
        };
        let entry = {
            let e = st.entries.get_mut(key).expect("checked");
            e.hits += 1;
            e.last_used = now_millis();
            e.clone()
        };
        *st.in_use.entry(key.to_string()).or_insert(0) += 1;
        st.dirty.insert(key.to_string());
        drop(st);
        Ok(Some(CachedFile {
            entry,
            file,
            guard: InUse {
                inner: Arc::clone(inner),
                key: key.to_string(),
            },
        }))
    }

    /// Counts a hit on `key` if its published content is still `sha256` (a front end's copy
    /// in memory is current): `false` once the entry was replaced or removed.
    pub fn hit_if_current(&self, key: &str, sha256: &str) -> bool {
        let mut guard = self.inner.state();
        let st = &mut *guard;
        let Some(e) = st.entries.get_mut(key) else {
            return false;
        };
        if e.sha256 != sha256 {
            return false;
        }
        e.hits += 1;
        e.last_used = now_millis();
        if !st.dirty.contains(key) {
            st.dirty.insert(key.to_string());
        }
        true
    }

    /// Starts publishing `name`: a temp file under `dir/tmp/`. Nothing is visible until
    /// [`Publisher::commit`].
    pub fn publisher(&self, name: &FileName) -> Result<Publisher, CacheError> {
        Publisher::new(Arc::clone(&self.inner), name.clone())
    }

    /// Every entry, sorted by key.
    pub fn list(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.inner.state().entries.values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// (files, bytes) currently indexed.
    pub fn totals(&self) -> (u64, u64) {
        let st = self.inner.state();
        (st.entries.len() as u64, st.bytes)
    }

    /// Whether a key has an open [`CachedFile`].
    pub fn in_use(&self, key: &str) -> bool {
        self.inner.state().in_use.contains_key(key)
    }

    /// Removes a file now (an operator's `cache evict`), pinned or not. A reader that has it
    /// open finishes reading its copy. `Ok(false)` if it was not cached.
    pub fn evict(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.remove_entry(key, false)
    }

    /// Removes a file unless pinned (sync: the file left every upstream). `Ok(true)` if removed.
    pub fn remove_if_unpinned(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.remove_entry(key, true)
    }

    /// Pins or unpins: pinned files are never evicted for quota.
    pub fn set_pinned(&self, key: &str, pinned: bool) -> Result<(), CacheError> {
        self.inner.update_entry(key, |e| e.pinned = pinned)?;
        Ok(())
    }

    /// Records a successful revalidation (the upstream answered 304 / same size).
    pub fn mark_validated(&self, key: &str, v: Validators) -> Result<(), CacheError> {
        self.inner.update_entry(key, |e| {
            e.validated_at = now_millis();
            if !v.is_empty() {
                e.validators = v;
            }
        })?;
        Ok(())
    }

    /// Records a revalidation in memory only; it reaches the index with the usage counters
    /// (every few seconds). For the sync worker's bulk revalidations, where an fsync per file
    /// would dominate a pass: a record lost to a crash only costs one unconditional fetch.
    pub fn note_validated(&self, key: &str, v: Validators) {
        let mut st = self.inner.state();
        if let Some(e) = st.entries.get_mut(key) {
            e.validated_at = now_millis();
            if !v.is_empty() {
                e.validators = v;
            }
            st.dirty.insert(key.to_string());
        }
    }

    /// Reads a cached file whole without counting a hit (the sync worker reading the configs
    /// and `.loads` lists it follows). `Ok(None)` when not cached.
    pub fn read_quiet(&self, key: &str) -> Result<Option<(Entry, Vec<u8>)>, CacheError> {
        let (entry, mut file) = {
            let st = self.inner.state();
            let Some(e) = st.entries.get(key) else {
                return Ok(None);
            };
            // Opened under the state lock, like `open_file`: the entry describes this inode.
            let path = self.inner.layout.file_path(key);
            match File::open(&path) {
                Ok(f) => (e.clone(), f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(CacheError::Io { path, source: e }),
            }
        };
        let mut buf = Vec::with_capacity(entry.size as usize);
        io::Read::read_to_end(&mut file, &mut buf)
            .map_err(CacheError::io(self.inner.layout.file_path(key)))?;
        Ok(Some((entry, buf)))
    }

    /// A tree of its own in the cache's sled database, for state that lives and dies with the
    /// cache (the phones seen: `phones`). One database per directory: sled is opened once.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, CacheError> {
        self.inner
            .db
            .open_tree(name)
            .map_err(self.inner.index_err())
    }

    /// Evicts least recently used files until under quota; returns the evicted keys.
    pub fn enforce_quota(&self) -> Result<Vec<String>, CacheError> {
        self.inner.enforce_quota(None)
    }

    /// Writes usage counters back to the index and flushes it (also done every few seconds
    /// while the appliance runs, and when the last clone is dropped).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.inner.flush_usage()?;
        self.inner.flush_index()
    }

    /// Writes hit counts and last-use times back every [`USAGE_WRITE_BACK`] until `stop`, so a
    /// `kill -9` or power cut loses a few seconds of them, not all since the start. A task of
    /// the running appliance, on the blocking pool, rather than a thread per open cache (a
    /// command that opens the cache briefly writes them when it closes it).
    pub async fn write_usage_back(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(USAGE_WRITE_BACK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A full disk fails this every tick: one journal line, then one per 10 minutes.
        let mut repeats = crate::logging::Repeats::new(std::time::Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let inner = self.inner.clone();
            let written = move || match inner.flush_usage()? {
                true => inner.flush_index(),
                false => Ok(()),
            };
            match tokio::task::spawn_blocking(written).await {
                Ok(Err(e)) => {
                    let e = format!("cache: could not write usage counters back: {e}");
                    if let Some(line) = repeats.failed(e, std::time::Instant::now()) {
                        warn!("{line}");
                    }
                }
                Ok(Ok(())) => {
                    if let Some(line) = repeats.succeeded() {
                        info!("{line}");
                    }
                }
                Err(_) => {}
            }
        }
    }
}
