//! Phones: which phones this branch has seen, how their last boot went, and which one is stuck in
//! its firmware upgrade (`branchtftp phones`, `GET /phones`, the `branchtftp_phones` metrics).
//!
//! The front ends report what they see (a transfer started, finished, a name not found) through
//! [`started`], [`finished`] and [`unanswered`]: a `try_send` on a bounded channel, never a wait,
//! so a phone's transfer never pays for the bookkeeping; when the channel is full the observation
//! is dropped and counted (`branchtftp_phone_observations_dropped_total`). One background task
//! applies them to the [`PhoneBook`] (pure; see [`book`]), ends quiet boots every second, updates
//! the metrics, and writes the phones that changed to a `phones` tree of the cache's sled
//! database in one batch, so the view survives a restart.

pub mod book;
pub mod cli;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use book::{
    Event, FirmwareFile, Library, Observation, Phone, PhoneBook, PhoneReport, PhoneState,
    PhonesSummary,
};

use crate::cache::{now_millis, Cache, FileClass};
use crate::config::PhonesConfig;
use crate::name::FileName;
use crate::overrides::Overrides;

/// Observations waiting for the background task; beyond this they are dropped and counted.
const CHANNEL: usize = 8192;
/// Phones kept at most (a branch has hundreds; this bounds what made-up MACs can cost).
const MAX_PHONES: usize = 50_000;
/// How often quiet boots are ended, metrics updated and changes written.
const TICK: Duration = Duration::from_secs(1);
/// After applying a batch, observations are gathered this long before the next: in a boot
/// storm they come by the thousand per second, and waking the task (and a blocking thread)
/// for every few of them cost more CPU than the transfers they describe.
const GATHER: Duration = Duration::from_millis(100);

/// The hot-path end of the channel.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Observation>,
}

impl Recorder {
    /// A recorder and the receiving end for the task that applies its observations.
    pub fn channel(capacity: usize) -> (Recorder, mpsc::Receiver<Observation>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Recorder { tx }, rx)
    }

    /// Queues an observation stamped now; drops and counts it when the queue is full.
    pub fn record(&self, client: IpAddr, name: &str, protocol: &'static str, event: Event) {
        let obs = Observation {
            client,
            name: name.to_string(),
            protocol,
            at: now_millis(),
            event,
        };
        if self.tx.try_send(obs).is_err() {
            crate::metrics::global().phone_observations_dropped.inc();
        }
    }
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

fn record(client: IpAddr, name: &str, protocol: &'static str, event: Event) {
    if let Some(r) = RECORDER.get() {
        r.record(client, name, protocol, event);
    }
}

/// A front end found content for `name` and starts sending it (`size` when known).
pub fn started(client: IpAddr, name: &str, protocol: &'static str, size: Option<u64>) {
    record(client, name, protocol, Event::Started { size });
}

/// A started transfer ended after `bytes`; `error` says why it was not complete.
pub fn finished(
    client: IpAddr,
    name: &str,
    protocol: &'static str,
    bytes: u64,
    error: Option<String>,
) {
    record(client, name, protocol, Event::Finished { bytes, error });
}

/// A request got no content: `None` for "not found", else why.
pub fn unanswered(client: IpAddr, name: &str, protocol: &'static str, why: Option<&str>) {
    let event = match why {
        None => Event::NotFound,
        Some(w) => Event::Refused(w.to_string()),
    };
    record(client, name, protocol, event);
}

/// Reads what a phone's config and `.loads` say: the overrides first, then the cache, as served.
struct Served {
    overrides: Option<Overrides>,
    cache: Cache,
}

impl Library for Served {
    fn read(&self, name: &str) -> Option<Vec<u8>> {
        let name = FileName::parse(name).ok()?;
        if let Some(o) = &self.overrides {
            if let Some(path) = o.resolve(&name) {
                return std::fs::read(path).ok();
            }
        }
        self.cache
            .read_quiet(name.key())
            .ok()
            .flatten()
            .map(|(_, d)| d)
    }

    fn is_firmware(&self, name: &str) -> bool {
        FileName::parse(name)
            .is_ok_and(|n| self.cache.rules().classify(n.key()) == FileClass::Firmware)
    }
}

/// The admin endpoint's view of the book.
#[derive(Clone)]
pub struct PhonesView {
    book: Arc<Mutex<PhoneBook>>,
}

impl PhonesView {
    fn book(&self) -> std::sync::MutexGuard<'_, PhoneBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn report(&self) -> Vec<PhoneReport> {
        self.book().report(now_millis())
    }

    pub fn summary(&self) -> PhonesSummary {
        self.book().summary(now_millis())
    }
}

/// The running phone book: its view and the task that keeps it.
pub struct PhonesService {
    pub view: PhonesView,
    task: tokio::task::JoinHandle<()>,
}

impl PhonesService {
    /// Loads the phones kept in the cache's database, installs the process's recorder and
    /// starts the task; it writes its last changes and ends when `stop` turns true.
    pub fn start(
        cfg: &PhonesConfig,
        cache: Cache,
        overrides: Option<Overrides>,
        stop: watch::Receiver<bool>,
    ) -> Result<PhonesService, crate::cache::CacheError> {
        let tree = cache.tree("phones")?;
        let mut book = PhoneBook::new(cfg.quiet_gap, MAX_PHONES);
        for phone in load(&tree) {
            book.restore(phone);
        }
        info!("phones: {} known", book.len());
        let book = Arc::new(Mutex::new(book));
        let (recorder, rx) = Recorder::channel(CHANNEL);
        if RECORDER.set(recorder).is_err() {
            warn!("phones: a recorder was already installed in this process; keeping it");
        }
        let keeper = Keeper {
            book: book.clone(),
            lib: Served { overrides, cache },
            tree,
            forget_after_ms: cfg.forget_after.as_millis() as u64,
        };
        let task = tokio::spawn(keeper.run(rx, stop));
        Ok(PhonesService {
            view: PhonesView { book },
            task,
        })
    }

    /// Waits for the task's last write (after `stop`).
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

/// The phones in the database; entries that do not decode are skipped (and logged).
fn load(tree: &sled::Tree) -> Vec<Phone> {
    tree.iter()
        .filter_map(|kv| match kv {
            Ok((k, v)) => match serde_json::from_slice(&v) {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(mac = %String::from_utf8_lossy(&k), "phones: unreadable record skipped: {e}");
                    None
                }
            },
            Err(e) => {
                warn!("phones: cannot read the database: {e}");
                None
            }
        })
        .collect()
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The background task's state.
struct Keeper {
    book: Arc<Mutex<PhoneBook>>,
    lib: Served,
    tree: sled::Tree,
    forget_after_ms: u64,
}

impl Keeper {
    async fn run(self, mut rx: mpsc::Receiver<Observation>, mut stop: watch::Receiver<bool>) {
        let keeper = Arc::new(self);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(first) = rx.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < CHANNEL {
                        match rx.try_recv() {
                            Ok(o) => batch.push(o),
                            Err(_) => break,
                        }
                    }
                    let k = keeper.clone();
                    // Reading configs and `.loads` is file I/O: off the async threads.
                    let _ = tokio::task::spawn_blocking(move || k.apply(&batch)).await;
                    tokio::select! {
                        _ = tokio::time::sleep(GATHER) => {}
                        _ = stopped(&mut stop) => break,
                    }
                }
                _ = tick.tick() => keeper.clone().save(false).await,
                _ = stopped(&mut stop) => break,
            }
        }
        while let Ok(o) = rx.try_recv() {
            keeper.apply(std::slice::from_ref(&o));
        }
        keeper.save(true).await;
    }

    fn apply(&self, batch: &[Observation]) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.observe_all(batch, &self.lib);
    }

    /// Ends quiet boots, updates the metrics and writes the changes in one batch. sled makes a
    /// batch durable within half a second by itself; `last` (at shutdown) waits for the disk.
    async fn save(self: Arc<Self>, last: bool) {
        let now = now_millis();
        let (changed, gone, boots, summary) = {
            let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
            book.tick(now, self.forget_after_ms);
            let (changed, gone) = book.take_changes();
            (changed, gone, book.take_finished_boots(), book.summary(now))
        };
        crate::metrics::global().phones_update(&summary, &boots);
        if changed.is_empty() && gone.is_empty() && !last {
            return;
        }
        let tree = self.tree.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut b = sled::Batch::default();
            for p in &changed {
                b.insert(
                    p.mac.as_bytes(),
                    serde_json::to_vec(p).expect("a phone serializes"),
                );
            }
            for mac in &gone {
                b.remove(mac.as_bytes());
            }
            tree.apply_batch(b)?;
            if last {
                tree.flush()?;
            }
            Ok::<(), sled::Error>(())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("phones: cannot write to the database: {e}"),
            Err(e) => warn!("phones: writer failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_channel_drops_and_counts_instead_of_waiting() {
        let (rec, mut rx) = Recorder::channel(2);
        let before = crate::metrics::global().phone_observations_dropped.get();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..5 {
            rec.record(ip, "SEP001122AABBCC.cnf.xml", "tftp", Event::NotFound);
        }
        assert!(crate::metrics::global().phone_observations_dropped.get() >= before + 3);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }
}
