//! Atomic publish: bytes go to a temp file in `dir/tmp/` (same filesystem), hashed as they are
//! written; `commit` fsyncs, records an intent in the index, renames into `dir/files/<key>`,
//! fsyncs the directory, then writes the entry and flushes sled. Nothing partial is ever indexed:
//! a failed write, a short upstream or a dropped publisher just removes the temp file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::{
    fsync_dir, lock, now_millis, remove_file_logged, CacheError, Entry, Inner, Validators,
};
use crate::name::FileName;

/// What the fetcher knows about the bytes it published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishMeta {
    /// The upstream URL (or `import:<dir>`).
    pub source: String,
    pub validators: Validators,
    /// The size the upstream announced (Content-Length, tsize); a mismatch refuses the commit.
    pub expected_size: Option<u64>,
}

/// A file being written into the cache. Implements [`Write`]; async code feeds it with
/// [`Publisher::write_chunk`] (local disk writes are short; run it in `spawn_blocking` if in
/// doubt).
pub struct Publisher {
    inner: Arc<Inner>,
    name: FileName,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    hasher: Sha256,
    written: u64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("name", &self.name.as_str())
            .field("tmp", &self.tmp)
            .field("written", &self.written)
            .finish()
    }
}

impl Publisher {
    pub(super) fn new(inner: Arc<Inner>, name: FileName) -> Result<Publisher, CacheError> {
        let seq = inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = inner
            .layout
            .tmp
            .join(format!("{}-{seq}.part", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(CacheError::io(&tmp))?;
        Ok(Publisher {
            inner,
            name,
            tmp,
            file: Some(BufWriter::with_capacity(128 * 1024, file)),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    pub fn name(&self) -> &FileName {
        &self.name
    }

    /// A read-only handle on the temp file, for streaming the bytes to clients while they are
    /// still arriving (call `flush` first). It stays valid after commit or abort: same inode.
    pub fn open_reader(&self) -> Result<File, CacheError> {
        File::open(&self.tmp).map_err(CacheError::io(&self.tmp))
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The sha256 of the bytes accepted so far, as the entry would record it (to tell a new
    /// version from the one cached without publishing it).
    pub fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Writes a whole chunk (for async callers that hold chunks, not a `Write` adapter).
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), CacheError> {
        self.write_all(chunk).map_err(CacheError::io(&self.tmp))
    }

    /// Makes the file visible under its name, replacing any previous version atomically.
    pub fn commit(mut self, meta: PublishMeta) -> Result<Entry, CacheError> {
        let file = self.file.take().expect("not yet committed");
        let file = file
            .into_inner()
            .map_err(|e| CacheError::io(&self.tmp)(e.into_error()))?;
        if let Some(expected) = meta.expected_size {
            if expected != self.written {
                return Err(CacheError::SizeMismatch {
                    name: self.name.to_string(),
                    expected,
                    got: self.written,
                });
            }
        }
        let sha = hex::encode(std::mem::take(&mut self.hasher).finalize());
        super::origin::write(
            &file,
            &super::origin::Origin {
                name: self.name.as_str().to_string(),
                sha256: sha.clone(),
                source: meta.source.clone(),
                validators: meta.validators.clone(),
                fetched_at: now_millis(),
            },
        );
        file.sync_all().map_err(CacheError::io(&self.tmp))?;
        drop(file);
        self.inner
            .install(&self.name, &self.tmp, self.written, sha, meta)
    }

    /// Gives up: the temp file is removed (as on drop).
    pub fn abort(self) {}
}

impl Write for Publisher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("publisher already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // After a successful commit the temp name no longer exists; otherwise nothing partial
        // may stay behind.
        self.file.take();
        if self.tmp.exists() {
            debug!(name = %self.name, tmp = %self.tmp.display(), "cache: publish abandoned");
            remove_file_logged(&self.tmp);
        }
    }
}

/// Creates the parent directories of `path` under `root`, fsyncing each new directory's parent.
fn create_parents(root: &Path, path: &Path) -> Result<(), CacheError> {
    let parent = path.parent().expect("file has a parent");
    if parent.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = parent;
    while !p.is_dir() && p != root {
        missing.push(p.to_path_buf());
        p = p.parent().expect("under root");
    }
    for dir in missing.iter().rev() {
        std::fs::create_dir(dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(CacheError::io(dir))?;
        fsync_dir(dir.parent().expect("under root"))?;
    }
    Ok(())
}

impl Inner {
    pub(super) fn install(
        &self,
        name: &FileName,
        tmp: &Path,
        size: u64,
        sha256: String,
        meta: PublishMeta,
    ) -> Result<Entry, CacheError> {
        let key = name.key();
        let final_path = self.layout.file_path(key);
        let w = lock(&self.index_write);
        let now = now_millis();
        let old = self.state().entries.get(key).cloned();
        let mut entry = Entry {
            name: name.as_str().to_string(),
            key: key.to_string(),
            size,
            sha256,
            class: self.rules.classify(key),
            source: meta.source,
            validators: meta.validators,
            fetched_at: now,
            validated_at: now,
            last_used: now,
            hits: 0,
            pinned: false,
        };
        if let Some(old) = &old {
            entry.hits = old.hits;
            entry.pinned = old.pinned;
            entry.last_used = old.last_used.max(now);
            if old.sha256 == entry.sha256 && old.size == entry.size && final_path.is_file() {
                // Same bytes: keep the file in place, refresh what we learnt about it.
                if entry.validators.is_empty() {
                    entry.validators = old.validators.clone();
                    entry.source = old.source.clone();
                }
                entry.name = old.name.clone();
                remove_file_logged(tmp);
                {
                    let mut st = self.state();
                    st.entries.insert(key.to_string(), entry.clone());
                    st.dirty.remove(key);
                }
                self.put_entry(&entry)?;
                self.flush_index()?;
                debug!(name = %name, "cache: republished with identical content");
                return Ok(entry);
            }
        }
        create_parents(&self.layout.files, &final_path)?;

        // Intent first: if we die after the rename, recovery hashes the file and knows which
        // version it is.
        let json = serde_json::to_vec(&entry).expect("entry serializes");
        self.pending
            .insert(key.as_bytes(), json.clone())
            .map_err(self.index_err())?;
        self.flush_index()?;

        {
            let mut st = self.state();
            if let Err(e) = std::fs::rename(tmp, &final_path) {
                drop(st);
                let _ = self.pending.remove(key.as_bytes());
                return Err(CacheError::Io {
                    path: final_path,
                    source: e,
                });
            }
            let old_size = st.entries.get(key).map(|e| e.size).unwrap_or(0);
            st.bytes = st.bytes - old_size + size;
            st.entries.insert(key.to_string(), entry.clone());
            st.dirty.remove(key);
        }
        fsync_dir(final_path.parent().expect("has parent"))?;
        self.db
            .insert(key.as_bytes(), json)
            .map_err(self.index_err())?;
        self.pending
            .remove(key.as_bytes())
            .map_err(self.index_err())?;
        self.flush_index()?;
        drop(w);
        debug!(name = %name, size, "cache: published");
        if let Err(e) = self.enforce_quota(Some(key)) {
            warn!("cache: quota enforcement failed: {e}");
        }
        Ok(entry)
    }
}
