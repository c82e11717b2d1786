//! One file-system watcher for the whole process. The overrides index ([`crate::overrides`])
//! and the config reloader ([`crate::reload`]) register the paths they care about here, so
//! watching costs one notify thread however many things are watched (issue 12 counts an
//! appliance's threads: each `notify` watcher is a thread of its own).
//!
//! A registration ([`Watch`]) gets the events under its path; dropping it stops them, and the
//! path is unwatched once nobody else watches it. Handlers run on the watcher's thread: they
//! must be quick (mark something stale, send on a channel). Access events (opens, reads) are
//! not passed on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use notify::{RecursiveMode, Watcher};

/// What a registration is called with: an event (or the watcher's error, which every
/// registration hears: it may have missed changes).
pub type Handler = dyn Fn(&notify::Result<notify::Event>) + Send + Sync;

struct Registration {
    path: PathBuf,
    handler: Arc<Handler>,
}

struct Hub {
    /// Never locked by the watcher's own thread (a `watch` call waits on that thread).
    watcher: Mutex<notify::RecommendedWatcher>,
    /// Never held while calling the watcher or a handler.
    registrations: Arc<Mutex<HashMap<u64, Registration>>>,
    /// How many registrations watch each path, and whether it is watched recursively.
    paths: Mutex<HashMap<PathBuf, (usize, RecursiveMode)>>,
    next: AtomicU64,
}

/// Events under `path` go to its handler while this lives.
pub struct Watch {
    id: u64,
    path: PathBuf,
}

static HUB: OnceLock<Result<Hub, String>> = OnceLock::new();

fn hub() -> Result<&'static Hub, String> {
    HUB.get_or_init(|| {
        let registrations: Arc<Mutex<HashMap<u64, Registration>>> = Default::default();
        let regs = registrations.clone();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Opens and reads change nothing anyone here watches for, and every file served
            // from a watched folder makes one (notify's inotify mask always has IN_OPEN):
            // dropped here, once, before any lock or handler.
            if ev.as_ref().is_ok_and(|e| e.kind.is_access()) {
                return;
            }
            let interested: Vec<Arc<Handler>> = {
                let regs = regs.lock().unwrap();
                regs.values()
                    .filter(|r| match &ev {
                        Ok(e) if !e.paths.is_empty() => {
                            e.paths.iter().any(|p| p.starts_with(&r.path))
                        }
                        _ => true,
                    })
                    .map(|r| r.handler.clone())
                    .collect()
            };
            for h in interested {
                h(&ev);
            }
        })
        .map_err(|e| e.to_string())?;
        Ok(Hub {
            watcher: Mutex::new(watcher),
            registrations,
            paths: Default::default(),
            next: AtomicU64::new(0),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Sends the events under `path` (and, `Recursive`, under its subdirectories) to `handler`
/// until the returned [`Watch`] is dropped. Fails as notify does (inotify limits, a missing
/// path); the caller decides what to fall back to.
pub fn watch(
    path: &Path,
    mode: RecursiveMode,
    handler: impl Fn(&notify::Result<notify::Event>) + Send + Sync + 'static,
) -> Result<Watch, String> {
    let hub = hub()?;
    {
        let mut paths = hub.paths.lock().unwrap();
        let mut watcher = hub.watcher.lock().unwrap();
        match paths.get_mut(path) {
            Some((n, m)) => {
                // Widen a flat watch when someone needs the subdirectories too.
                if *m == RecursiveMode::NonRecursive && mode == RecursiveMode::Recursive {
                    let _ = watcher.unwatch(path);
                    watcher.watch(path, mode).map_err(|e| e.to_string())?;
                    *m = mode;
                }
                *n += 1;
            }
            None => {
                watcher.watch(path, mode).map_err(|e| e.to_string())?;
                paths.insert(path.to_path_buf(), (1, mode));
            }
        }
    }
    let id = hub.next.fetch_add(1, Ordering::Relaxed);
    hub.registrations.lock().unwrap().insert(
        id,
        Registration {
            path: path.to_path_buf(),
            handler: Arc::new(handler),
        },
    );
    Ok(Watch {
        id,
        path: path.to_path_buf(),
    })
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Ok(hub) = hub() else { return };
        hub.registrations.lock().unwrap().remove(&self.id);
        let mut paths = hub.paths.lock().unwrap();
        if let Some((n, _)) = paths.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                paths.remove(&self.path);
                let _ = hub.watcher.lock().unwrap().unwatch(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;

    fn counter() -> (
        Arc<AtomicUsize>,
        impl Fn(&notify::Result<notify::Event>) + Send + Sync,
    ) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move |_: &notify::Result<notify::Event>| {
            m.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn eventually(f: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(3);
        while !f() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        f()
    }

    fn notify_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("notify-rs"))
            })
            .count()
    }

    #[test]
    fn two_paths_share_one_thread_and_each_hears_only_its_own() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (seen_a, on_a) = counter();
        let (seen_b, on_b) = counter();
        let wa = watch(a.path(), RecursiveMode::Recursive, on_a).unwrap();
        let wb = watch(b.path(), RecursiveMode::NonRecursive, on_b).unwrap();
        assert_eq!(notify_threads(), 1, "one watcher thread for both");

        std::fs::write(a.path().join("x"), b"1").unwrap();
        assert!(eventually(|| seen_a.load(Ordering::SeqCst) > 0));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen_b.load(Ordering::SeqCst), 0, "b hears nothing of a");

        // Dropped: a hears no more, b still hears its own.
        drop(wa);
        let before = seen_a.load(Ordering::SeqCst);
        std::fs::write(a.path().join("y"), b"2").unwrap();
        std::fs::write(b.path().join("z"), b"3").unwrap();
        assert!(eventually(|| seen_b.load(Ordering::SeqCst) > 0));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen_a.load(Ordering::SeqCst), before);
        drop(wb);
    }

    #[test]
    fn a_path_watched_twice_stays_watched_until_both_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (seen1, on1) = counter();
        let (seen2, on2) = counter();
        let w1 = watch(dir.path(), RecursiveMode::NonRecursive, on1).unwrap();
        let w2 = watch(dir.path(), RecursiveMode::Recursive, on2).unwrap();
        drop(w1);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(dir.path().join("sub/f"), b"1").unwrap();
        assert!(
            eventually(|| seen2.load(Ordering::SeqCst) >= 2),
            "the recursive watch survives the flat one's drop and sees subdirectories"
        );
        assert_eq!(seen1.load(Ordering::SeqCst), 0);
        drop(w2);
    }
}
