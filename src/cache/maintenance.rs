//! Operator maintenance: `verify` re-hashes every file and quarantines the corrupt ones;
//! `import` pre-seeds the cache from a directory (firmware from a USB stick).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{fsync_dir, lock, now_millis, Cache, CacheError, PublishMeta};
use crate::name::FileName;

const CHUNK: usize = 1 << 20;

/// Size and lower-case hex sha256 of a file.
pub(crate) fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    hash_reader(File::open(path)?, |_| {})
}

fn hash_reader(mut r: impl Read, mut on_chunk: impl FnMut(u64)) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
        on_chunk(n as u64);
    }
    Ok((total, hex::encode(h.finalize())))
}

/// A file whose content no longer matches its recorded hash (or size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CorruptFile {
    pub name: String,
    pub expected_sha256: String,
    pub actual_sha256: String,
    /// Where the file was moved.
    pub quarantined: PathBuf,
}

/// What `verify` found (also the JSON of the admin endpoint's `POST /cache/verify`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub files: u64,
    pub bytes: u64,
    pub corrupt: Vec<CorruptFile>,
    /// Entries whose file had disappeared (dropped).
    pub missing: Vec<String>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// What `import` did.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Files stored (new or changed).
    pub imported: u64,
    /// Files already cached with the same content.
    pub unchanged: u64,
    pub bytes: u64,
    /// Files not imported, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Cache {
    /// Re-hashes every file (on all cores). Corrupt files are moved to `dir/quarantine/` and
    /// their entries dropped, so the next request refetches them. `progress` receives the
    /// running total of bytes hashed.
    pub fn verify(&self, progress: impl Fn(u64) + Sync) -> Result<VerifyReport, CacheError> {
        let started = Instant::now();
        let work: Vec<(String, String)> = {
            let st = self.inner.state();
            let mut v: Vec<_> = st
                .entries
                .values()
                .map(|e| (e.key.clone(), e.sha256.clone()))
                .collect();
            v.sort();
            v
        };
        let next = AtomicUsize::new(0);
        let done_bytes = AtomicU64::new(0);
        let report = Mutex::new(VerifyReport::default());
        let first_err: Mutex<Option<CacheError>> = Mutex::new(None);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, _)) = work.get(i) else { break };
                    if let Err(e) = self.verify_one(key, &done_bytes, &progress, &report) {
                        lock(&first_err).get_or_insert(e);
                        break;
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let mut report = report.into_inner().unwrap_or_else(|e| e.into_inner());
        report.elapsed = started.elapsed();
        report.corrupt.sort_by(|a, b| a.name.cmp(&b.name));
        report.missing.sort();
        Ok(report)
    }

    fn verify_one(
        &self,
        key: &str,
        done_bytes: &AtomicU64,
        progress: &(impl Fn(u64) + Sync),
        report: &Mutex<VerifyReport>,
    ) -> Result<(), CacheError> {
        let inner = &self.inner;
        // Entry and file taken together, as open_file does, so a concurrent publish cannot pair
        // the new file with the old hash.
        let (entry, file) = {
            let st = inner.state();
            let Some(e) = st.entries.get(key) else {
                return Ok(()); // evicted meanwhile
            };
            let path = inner.layout.file_path(key);
            match File::open(&path) {
                Ok(f) => (e.clone(), f),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    let name = e.name.clone();
                    drop(st);
                    warn!(%name, "cache verify: file missing; entry dropped");
                    if inner.remove_entry(key, false)? {
                        lock(report).missing.push(key.to_string());
                    }
                    return Ok(());
                }
                Err(err) => return Err(CacheError::Io { path, source: err }),
            }
        };
        let mut since = 0u64;
        let path = inner.layout.file_path(key);
        let (size, sha) = hash_reader(file, |n| {
            since += n;
            if since >= 8 * CHUNK as u64 {
                progress(done_bytes.fetch_add(since, Ordering::Relaxed) + since);
                since = 0;
            }
        })
        .map_err(CacheError::io(&path))?;
        progress(done_bytes.fetch_add(since, Ordering::Relaxed) + since);
        {
            let mut r = lock(report);
            r.files += 1;
            r.bytes += size;
        }
        if size == entry.size && sha == entry.sha256 {
            return Ok(());
        }
        if let Some(q) = self.quarantine(&entry.key, &entry.sha256)? {
            warn!(
                name = %entry.name,
                expected = %entry.sha256,
                actual = %sha,
                quarantined = %q.display(),
                "cache verify: corrupt file quarantined"
            );
            lock(report).corrupt.push(CorruptFile {
                name: entry.name,
                expected_sha256: entry.sha256,
                actual_sha256: sha,
                quarantined: q,
            });
        }
        Ok(())
    }

    /// Moves a file to `quarantine/` and drops its entry, unless it was replaced meanwhile.
    fn quarantine(&self, key: &str, expected_sha: &str) -> Result<Option<PathBuf>, CacheError> {
        let inner = &self.inner;
        let _w = lock(&inner.index_write);
        let target =
            inner
                .layout
                .quarantine
                .join(format!("{}.{}", key.replace('/', "%2F"), now_millis()));
        {
            let mut st = inner.state();
            if st.entries.get(key).map(|e| e.sha256.as_str()) != Some(expected_sha) {
                return Ok(None);
            }
            let path = inner.layout.file_path(key);
            std::fs::rename(&path, &target).map_err(CacheError::io(&path))?;
            let e = st.entries.remove(key).expect("checked");
            st.bytes -= e.size;
            st.dirty.remove(key);
        }
        fsync_dir(&inner.layout.quarantine)?;
        inner.db.remove(key.as_bytes()).map_err(inner.index_err())?;
        inner.flush_index()?;
        Ok(Some(target))
    }

    /// Pre-seeds the cache from a directory tree: each file is published under its path
    /// relative to `src` (`English_United_States/mk-sip.jar`). `progress` receives the running
    /// total of bytes copied.
    pub fn import(&self, src: &Path, progress: impl Fn(u64)) -> Result<ImportReport, CacheError> {
        let mut report = ImportReport::default();
        let mut files = Vec::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for de in std::fs::read_dir(&dir).map_err(CacheError::io(&dir))? {
                let path = de.map_err(CacheError::io(&dir))?.path();
                let md = std::fs::metadata(&path).map_err(CacheError::io(&path))?;
                if md.is_dir() {
                    stack.push(path);
                } else if md.is_file() {
                    files.push(path);
                }
            }
        }
        files.sort();
        let source = format!(
            "import:{}",
            std::fs::canonicalize(src)
                .unwrap_or_else(|_| src.to_path_buf())
                .display()
        );
        let mut copied = 0u64;
        for path in files {
            let rel = path.strip_prefix(src).expect("under src");
            let Some(name) = rel.to_str().and_then(|r| FileName::parse(r).ok()) else {
                report
                    .skipped
                    .push((path.clone(), "not a valid phone file name".into()));
                continue;
            };
            let before = self.get(name.key()).map(|e| e.sha256);
            let mut p = self.publisher(&name)?;
            let mut f = File::open(&path).map_err(CacheError::io(&path))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f.read(&mut buf).map_err(CacheError::io(&path))?;
                if n == 0 {
                    break;
                }
                p.write_chunk(&buf[..n])?;
                copied += n as u64;
                progress(copied);
            }
            let entry = p.commit(PublishMeta {
                source: source.clone(),
                ..PublishMeta::default()
            })?;
            if before.as_deref() == Some(entry.sha256.as_str()) {
                report.unchanged += 1;
            } else {
                info!(name = %entry.name, size = entry.size, "cache: imported");
                report.imported += 1;
                report.bytes += entry.size;
            }
        }
        Ok(report)
    }
}
