//! Live reload of the configuration file: its directory is watched with notify (editors replace
//! files by rename, which a watch on the file itself would miss), events are debounced, and
//! SIGHUP does the same at once. A valid file applies the upstreams, access lists and sync
//! settings without a restart and without disturbing transfers in flight; an invalid one is
//! logged as `FILE:LINE:COL: key: problem` and the running configuration stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::RecursiveMode;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Config;
pub use crate::config::ConfigSource;
use crate::front::Gate;
use crate::sync::SyncHandle;
use crate::upstream::flight::Fetcher;
use crate::upstream::UpstreamChain;

/// Quiet time after the last change before the file is read (an editor's write, rename and
/// chmod arrive as several events).
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// What a reload updates in the running appliance.
#[derive(Clone)]
pub struct Targets {
    pub gate: Arc<Gate>,
    pub fetcher: Option<Arc<Fetcher>>,
    pub sync: Option<SyncHandle>,
}

/// The reloader; the watch stops when it is dropped.
pub struct Reloader {
    _watcher: Option<crate::watch::Watch>,
    task: tokio::task::JoinHandle<()>,
    /// The file and the running configuration, for a reload asked for directly.
    now: Option<(ConfigSource, Arc<Mutex<Config>>, Targets)>,
}

impl Reloader {
    /// Reads the file and applies it now, as on SIGHUP. `false` if it was not applied (an
    /// invalid file, or no file: the embedded defaults).
    pub fn reload(&self) -> bool {
        match &self.now {
            Some((source, current, targets)) => reload(source, current, targets),
            None => false,
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching the config file (and SIGHUP) on the current runtime. Without a file
/// (embedded defaults) SIGHUP is only logged, instead of its default action of killing us.
pub fn watch(source: Option<ConfigSource>, running: Config, targets: Targets) -> Reloader {
    match source {
        Some(s) => watch_file(s, running, targets),
        None => Reloader {
            _watcher: None,
            now: None,
            task: tokio::spawn(async {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                while hup.recv().await.is_some() {
                    info!("SIGHUP: running on the embedded defaults; no config file to reload");
                }
            }),
        },
    }
}

fn watch_file(source: ConfigSource, running: Config, targets: Targets) -> Reloader {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher = start_watcher(&source.path, tx.clone());
    let current = Arc::new(Mutex::new(running));
    let now = Some((source.clone(), current.clone(), targets.clone()));
    let task = tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { return; }
                    // Debounce: wait until the file has been quiet for a moment.
                    loop {
                        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                            Ok(Some(())) => continue,
                            Ok(None) => return,
                            Err(_) => break,
                        }
                    }
                    info!(path = %source.path.display(), "config file changed; reloading");
                }
                _ = hangup => info!(path = %source.path.display(), "SIGHUP: reloading the configuration"),
            }
            reload(&source, &current, &targets);
        }
    });
    Reloader {
        _watcher: watcher,
        task,
        now,
    }
}

fn start_watcher(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<crate::watch::Watch> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The directory, not the file: editors replace the file by a rename.
    let name = path.file_name()?.to_os_string();
    let changed = move |ev: &notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
            {
                let _ = tx.send(());
            }
        }
    };
    crate::watch::watch(&dir, RecursiveMode::NonRecursive, changed)
        .map_err(|e| {
            warn!(dir = %dir.display(), "cannot watch the config directory (SIGHUP still reloads): {e}")
        })
        .ok()
}

/// Reads the file and applies it, or logs why not. Returns whether it was applied.
pub fn reload(source: &ConfigSource, current: &Mutex<Config>, targets: &Targets) -> bool {
    let new = match source.load() {
        Ok(c) => c,
        Err(e) => {
            for p in e.problems() {
                error!("{p}");
            }
            error!(
                path = %source.path.display(),
                "configuration not reloaded: the running configuration stays"
            );
            return false;
        }
    };
    let mut cur = current.lock().unwrap();
    if *cur == new {
        info!("configuration unchanged");
        return true;
    }
    // Build what can fail first, so a bad file changes nothing.
    let chain = match targets
        .fetcher
        .as_ref()
        .map(|_| UpstreamChain::new(&new.upstreams))
    {
        Some(Err(e)) => {
            error!(
                "{}: {e}; the running configuration stays",
                source.path.display()
            );
            return false;
        }
        Some(Ok(c)) => Some(c),
        None => None,
    };
    for key in cur.restart_needed(&new) {
        warn!(
            "{}: {key} changed; it takes effect on restart",
            source.path.display()
        );
    }
    if let (Some(f), Some(chain)) = (&targets.fetcher, chain) {
        if cur.upstreams != new.upstreams || cur.sync.negative_ttl != new.sync.negative_ttl {
            f.reconfigure(chain, new.sync.negative_ttl);
        }
    }
    targets.gate.update(new.access.clone());
    if let Some(s) = &targets.sync {
        if cur.sync != new.sync || cur.upstreams != new.upstreams {
            s.reconfigure(new.sync.clone());
        }
    }
    info!(path = %source.path.display(), "configuration reloaded");
    *cur = new;
    true
}
