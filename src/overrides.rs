//! The overrides directory (`cache.overrides`, or `serve --root`): files an admin drops there
//! win over upstream copies. Lookups ignore ASCII letter case like every phone name, and never
//! leave the directory, even through a symlink.
//!
//! The directory is held as an index (lookup key → relative path) kept current by notify, so
//! a miss costs one hash lookup however many files the folder holds (issue 12: scanning it per
//! request cost 3.8 ms with 5,000 files, twice per booting phone). Changes mark the index
//! stale and the next lookup rebuilds it; without a watcher (inotify limits) it is rebuilt at
//! most once a second.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use tracing::warn;

use crate::name::FileName;

/// Deepest directory level indexed (phones use one level: locale directories).
const MAX_DEPTH: usize = 8;
/// Without a watcher, the index is at most this old.
const UNWATCHED_REFRESH: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Overrides {
    root: PathBuf,
    index: Arc<Index>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("root", &self.root)
            .finish()
    }
}

struct Index {
    /// Lookup key (ASCII-folded relative path) → the relative path as spelled on disk.
    files: RwLock<HashMap<String, String>>,
    /// The root with its symlinks resolved, as of the last rebuild (resolving it per request
    /// cost a system call per path component, twice per booting phone's file).
    real_root: RwLock<Option<PathBuf>>,
    stale: Arc<AtomicBool>,
    /// When the index was built, for the unwatched refresh.
    built: Mutex<Instant>,
    watcher: Option<crate::watch::Watch>,
}

impl Overrides {
    pub fn new(root: impl Into<PathBuf>) -> Overrides {
        let root = root.into();
        let stale = Arc::new(AtomicBool::new(true));
        let watcher = watch(&root, stale.clone());
        Overrides {
            root,
            index: Arc::new(Index {
                files: RwLock::new(HashMap::new()),
                real_root: RwLock::new(None),
                stale,
                built: Mutex::new(Instant::now()),
                watcher,
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Rebuilds the index if a change was seen (or, unwatched, if it is over a second old).
    fn refresh(&self) {
        let ix = &self.index;
        let old = ix.watcher.is_none() && ix.built.lock().unwrap().elapsed() > UNWATCHED_REFRESH;
        // Clear the mark before scanning: a change during the scan marks it again.
        if ix.stale.swap(false, Ordering::AcqRel) || old {
            let mut files = HashMap::new();
            scan(&self.root, "", 0, &mut files);
            *ix.files.write().unwrap() = files;
            *ix.real_root.write().unwrap() = self.root.canonicalize().ok();
            *ix.built.lock().unwrap() = Instant::now();
        }
    }

    /// Finds `name` under the root: the exact spelling first, then ignoring ASCII letter case.
    /// Directories and anything resolving outside the root are not files.
    pub fn resolve(&self, name: &FileName) -> Option<PathBuf> {
        self.refresh();
        let spelled = self.index.files.read().unwrap().get(name.key()).cloned()?;
        let exact = self.root.join(name.as_str());
        let path = if spelled != name.as_str() && exact.is_file() {
            exact
        } else {
            self.root.join(spelled)
        };
        let root = self.index.real_root.read().unwrap().clone()?;
        let real = path.canonicalize().ok()?;
        (real.starts_with(&root) && real.is_file()).then_some(real)
    }

    /// Opens a file for serving, with its size.
    pub fn open(&self, name: &FileName) -> io::Result<Option<(File, u64)>> {
        let Some(path) = self.resolve(name) else {
            return Ok(None);
        };
        let file = File::open(&path).inspect_err(|e| {
            if crate::net::out_of_descriptors(e) {
                crate::net::descriptors_exhausted("override file", e);
            }
        })?;
        let size = file.metadata()?.len();
        Ok(Some((file, size)))
    }
}

fn watch(root: &Path, stale: Arc<AtomicBool>) -> Option<crate::watch::Watch> {
    let marked = move |ev: &notify::Result<notify::Event>| match ev {
        Ok(ev) if ev.kind.is_access() => {}
        _ => stale.store(true, Ordering::Release),
    };
    crate::watch::watch(root, RecursiveMode::Recursive, marked)
        .map_err(|e| {
            warn!(dir = %root.display(), "cannot watch the overrides (re-read every second): {e}")
        })
        .ok()
}

/// Adds every file under `dir` (relative prefix `rel`) to `files`; the first spelling of a key
/// wins (the exact spelling is checked at lookup).
fn scan(dir: &Path, rel: &str, depth: usize, files: &mut HashMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        // Follows symlinks (confinement is checked at lookup, on the resolved path).
        match std::fs::metadata(e.path()) {
            Ok(m) if m.is_dir() && depth < MAX_DEPTH => scan(&e.path(), &path, depth + 1, files),
            Ok(m) if m.is_file() => {
                files.entry(path.to_ascii_lowercase()).or_insert(path);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_insensitive_and_confined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("English_United_States")).unwrap();
        std::fs::write(dir.path().join("English_United_States/mk-sip.jar"), b"jar").unwrap();
        std::fs::write(dir.path().join("RingList.xml"), b"rings").unwrap();
        let o = Overrides::new(dir.path());
        let n = FileName::parse("english_united_states\\MK-SIP.JAR").unwrap();
        assert!(o.resolve(&n).is_some());
        assert!(o
            .resolve(&FileName::parse("RINGLIST.XML").unwrap())
            .is_some());
        assert!(o
            .resolve(&FileName::parse("English_United_States").unwrap())
            .is_none());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
        assert!(o.resolve(&FileName::parse("passwd").unwrap()).is_none());
    }

    #[test]
    fn files_added_and_removed_later_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides::new(dir.path());
        let name = FileName::parse("dialplan.xml").unwrap();
        assert!(o.resolve(&name).is_none());
        std::fs::write(dir.path().join("DialPlan.xml"), b"plan").unwrap();
        let seen = |want: bool| {
            let until = Instant::now() + Duration::from_secs(3);
            while o.resolve(&name).is_some() != want && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            o.resolve(&name).is_some() == want
        };
        assert!(seen(true), "a new file is found");
        std::fs::remove_file(dir.path().join("DialPlan.xml")).unwrap();
        assert!(seen(false), "a removed file is gone");
    }
}
