//! The one way bytes come from upstream: one fetch per name however many ask at once ("single
//! flight"), whoever asks — a phone's miss ([`Fetcher::open`]) or the sync worker's download and
//! revalidation ([`Fetcher::fetch`]) — streamed through to every waiting client while it is
//! written into the cache.
//!
//! A flight writes the upstream's bytes into a cache [`Publisher`]'s temp file; each client
//! reads that file at its own offset as far as it has been written, so a phone gets its first
//! block as soon as the WAN delivers it. The file is published only when complete and of the
//! announced size. A failed or truncated fetch publishes nothing and every reader gets an
//! error, never a clean end that would make a truncated file look complete.
//!
//! What the sync worker adds to a flight it starts ([`Ask`]) is policy it passes in: the cached
//! copy to revalidate (a conditional request, and no republish of the same bytes), a check of a
//! replacement before it is published, and a pace for the download that holds only while no
//! phone waits on it.
//!
//! "Not found anywhere" is remembered by the exact name asked ([`super::negative`]): a phone's
//! miss trusts it for `sync.negative_ttl`, and past it while every upstream is unreachable:
//! during a WAN outage a phone asking for its (absent) CTL and ITL files gets the same quick
//! "file not found" it got before, and boots on as it did then.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::negative::NegativeCache;
use super::{ChainAnswer, UpstreamChain};
use crate::cache::{Cache, CacheError, CachedFile, Entry, PublishMeta, Publisher};
use crate::content::{Body, Found, Origin};
use crate::name::FileName;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissError {
    /// Every upstream answered "not found" (now, or within the negative-cache TTL).
    #[error("file not found")]
    NotFound,
    /// Nobody had it and at least one upstream could not be asked.
    #[error("upstream unreachable")]
    Unreachable(String),
    /// The cache could not take the file (disk full, I/O error), or the upstream's bytes were
    /// refused (truncated, too large, failing a replacement's check).
    #[error("cannot store the file: {0}")]
    Failed(String),
}

/// How much sooner than one upstream timeout after the request a phone's miss gives up
/// waiting, so that its answer (the timer's tick, a task's wake-up, the ERROR datagram or 502)
/// reaches the phone within that timeout as the phone counts it, not a millisecond or two
/// past it.
pub const ANSWER_SLACK: Duration = Duration::from_millis(20);

/// What a whole-file fetch ([`Fetcher::fetch`]) ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Published: a new file, or a new version of the cached copy (`replaced`).
    Stored { bytes: u64, replaced: bool },
    /// The cached copy is current: the upstream said so (304, `received` 0) or sent the same
    /// bytes.
    Unchanged { received: u64 },
}

/// A check of a new version before it replaces the cached one (the sync worker's content
/// checks); `Err` keeps the old version.
pub type Vet = Arc<dyn Fn(&mut Publisher) -> Result<(), String> + Send + Sync>;

/// Paces a download (`sync.max_rate`): called with each chunk's size, returns when more may be
/// read.
pub trait Pace: Send + Sync {
    fn pace(&self, bytes: usize) -> BoxFuture<'_, ()>;
}

/// How a fetch is asked for beyond its name: the caller's policy. A phone's miss asks with none.
#[derive(Clone, Default)]
pub struct Ask {
    /// The cached copy being revalidated: its validators go to the upstream it came from, and
    /// the same bytes again are not republished.
    pub cached: Option<Entry>,
    /// Checks a replacement of `cached` before it is published.
    pub vet: Option<Vet>,
    /// Paces the download while no phone waits on it.
    pub pace: Option<Arc<dyn Pace>>,
}

#[derive(Clone)]
enum Answer {
    Streaming {
        size: Option<u64>,
        file: Arc<File>,
        source: String,
    },
    NotModified,
    NotFound,
    Unreachable(String),
    Failed(String),
}

#[derive(Clone, Default)]
struct FlightState {
    answer: Option<Answer>,
    /// Bytes written (and flushed) into the temp file so far.
    written: u64,
    /// Set once: `Ok` when the bytes are complete (published, or the same as the cached copy).
    end: Option<Result<Fetched, String>>,
}

struct Flight {
    state: watch::Sender<FlightState>,
    /// A phone waits on it: no pacing, and the sync worker learns the name when it lands.
    phone: AtomicBool,
}

/// Something to tell when a phone's flight publishes a file (the sync worker learns names this
/// way).
pub type FoundHook = Arc<dyn Fn(&FileName, &str) + Send + Sync>;

pub struct Fetcher {
    cache: Cache,
    chain: RwLock<Arc<UpstreamChain>>,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// "Not found", by the exact name asked (see [`NegativeCache`]).
    negative: Mutex<NegativeCache>,
    negative_ttl: RwLock<Duration>,
    /// The largest file a flight takes into the cache.
    max_file: u64,
    on_found: RwLock<Option<FoundHook>>,
    /// Told each time a flight leaves the map (shutdown waits for the last).
    landed: tokio::sync::Notify,
}

impl Fetcher {
    pub fn new(cache: Cache, chain: UpstreamChain, negative_ttl: Duration) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            max_file: max_file_size(cache.max_bytes()),
            cache,
            chain: RwLock::new(Arc::new(chain)),
            flights: Mutex::new(HashMap::new()),
            negative: Mutex::new(NegativeCache::default()),
            negative_ttl: RwLock::new(negative_ttl),
            on_found: RwLock::new(None),
            landed: tokio::sync::Notify::new(),
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn chain(&self) -> Arc<UpstreamChain> {
        self.chain.read().unwrap().clone()
    }

    /// Applies a reloaded configuration; flights in progress finish with the old chain.
    pub fn reconfigure(&self, chain: UpstreamChain, negative_ttl: Duration) {
        *self.chain.write().unwrap() = Arc::new(chain);
        *self.negative_ttl.write().unwrap() = negative_ttl;
        self.negative.lock().unwrap().clear();
    }

    pub fn set_on_found(&self, hook: FoundHook) {
        *self.on_found.write().unwrap() = Some(hook);
    }

    /// The largest file taken from an upstream (a quarter of `cache.max_size`).
    pub fn max_file(&self) -> u64 {
        self.max_file
    }

    /// Resolves when no flight is under way (at shutdown: the files being fetched land in the
    /// cache, or fail, before the process exits).
    pub async fn flights_landed(&self) {
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if self.flights.lock().unwrap().is_empty() {
                return;
            }
            landed.await;
        }
    }

    /// Whether every upstream answered "not found" for exactly `asked` within `ttl`.
    pub fn not_found_within(&self, asked: &str, ttl: Duration) -> bool {
        self.negative
            .lock()
            .unwrap()
            .fresh(asked, Instant::now(), ttl)
    }

    /// Forgets "not found" answers for every spelling of a cache key (the file now exists).
    pub fn forget_negative(&self, key: &str) {
        self.negative
            .lock()
            .unwrap()
            .forget(|asked| FileName::parse(asked).is_ok_and(|n| n.key() == key));
    }

    /// A phone's request when it can be answered without waiting: the cached copy, or "not
    /// found" when there is no upstream to ask or every upstream said so within the negative
    /// TTL; `None` when the upstreams must be asked ([`open`](Self::open)).
    pub fn open_now(&self, name: &FileName) -> Option<Result<Found, MissError>> {
        match self.open_cached(name) {
            Ok(Some(hit)) => return Some(Ok(Found::cached(hit))),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        let ttl = *self.negative_ttl.read().unwrap();
        if self.chain().is_empty() || self.not_found_within(name.as_str(), ttl) {
            return Some(Err(MissError::NotFound));
        }
        None
    }

    /// A phone's request, asked at `asked`: a cached copy if there is one, else the shared
    /// upstream fetch for this name, streamed as it arrives. The answer comes within one
    /// upstream timeout of `asked` ([`UpstreamChain::miss_budget`]) whatever the upstreams do:
    /// past it the phone hears "unreachable" while the flight goes on (to the next upstream,
    /// into the cache) for its next request.
    pub async fn open(
        self: &Arc<Self>,
        name: &FileName,
        asked: Instant,
    ) -> Result<Found, MissError> {
        // Flights and "not found" go by the exact name asked upstream (a case-sensitive
        // upstream may have one spelling and not another); the cache by the folded key.
        let budget = self.chain().miss_budget();
        // A phone that joined a revalidation finding the copy current reads that copy; if it
        // was evicted meanwhile, the second round fetches it.
        for _ in 0..2 {
            if let Some(answer) = self.open_now(name) {
                return answer;
            }
            let flight = match self.board(name, Ask::default(), true)? {
                Boarded::Cached(hit) => return Ok(Found::cached(*hit)),
                Boarded::Flight(f) => f,
            };
            let answer = match budget {
                Some(b) => {
                    let due = asked + b.saturating_sub(ANSWER_SLACK);
                    tokio::time::timeout_at(due.into(), answer_of(&flight)).await
                }
                None => Ok(answer_of(&flight).await),
            };
            let (answer, rx) = match answer {
                Ok(a) => a?,
                Err(_) => {
                    let why = format!(
                        "no upstream answered within {}",
                        humantime::format_duration(budget.unwrap_or_default())
                    );
                    return Err(self.unreachable(name, why));
                }
            };
            return match answer {
                Answer::Streaming { size, file, source } => Ok(Found {
                    size,
                    origin: Origin::Miss { source },
                    body: Body::Stream(Box::pin(tokio_util::io::StreamReader::new(read_flight(
                        rx, file,
                    )))),
                }),
                Answer::NotModified => continue,
                Answer::NotFound => Err(MissError::NotFound),
                Answer::Unreachable(why) => Err(self.unreachable(name, why)),
                Answer::Failed(m) => Err(MissError::Failed(m)),
            };
        }
        Err(MissError::Failed(
            "the cached copy vanished while it was revalidated".into(),
        ))
    }

    /// What a phone hears when no upstream could answer: "not found" if that was the chain's
    /// last answer for the name (stale if error: a phone is better served by the answer it got
    /// before than by an error it never saw), else "unreachable".
    fn unreachable(&self, name: &FileName, why: String) -> MissError {
        let known_missing = self
            .negative
            .lock()
            .unwrap()
            .known_missing(name.as_str(), Instant::now());
        if known_missing {
            info!(name = %name, "not found when last asked; upstreams unreachable now: {why}");
            MissError::NotFound
        } else {
            MissError::Unreachable(why)
        }
    }

    /// The sync worker's request: the whole file into the cache, through the flight of this
    /// name if one is under way (whoever started it), else a new one that applies `ask`.
    pub async fn fetch(self: &Arc<Self>, name: &FileName, ask: Ask) -> Result<Fetched, MissError> {
        let Ok(Boarded::Flight(flight)) = self.board(name, ask, false) else {
            unreachable!("only a phone's boarding looks at the cache");
        };
        let (answer, mut rx) = answer_of(&flight).await?;
        match answer {
            Answer::Streaming { .. } => {
                let end = rx
                    .wait_for(|s| s.end.is_some())
                    .await
                    .map_err(|_| MissError::Failed("fetch abandoned".into()))?
                    .end
                    .clone();
                end.expect("waited for it").map_err(MissError::Failed)
            }
            Answer::NotModified => Ok(Fetched::Unchanged { received: 0 }),
            Answer::NotFound => Err(MissError::NotFound),
            Answer::Unreachable(why) => Err(MissError::Unreachable(why)),
            Answer::Failed(m) => Err(MissError::Failed(m)),
        }
    }

    /// Joins the flight of `name`, or starts one with `ask`. A phone's boarding looks at the
    /// cache again under the lock: a flight publishes before it leaves the map, so a file that
    /// just landed is not fetched twice.
    fn board(
        self: &Arc<Self>,
        name: &FileName,
        ask: Ask,
        phone: bool,
    ) -> Result<Boarded, MissError> {
        let asked = name.as_str().to_string();
        let mut flights = self.flights.lock().unwrap();
        if let Some(f) = flights.get(&asked) {
            if phone {
                f.phone.store(true, Ordering::Relaxed);
            }
            return Ok(Boarded::Flight(f.clone()));
        }
        if phone {
            if let Some(hit) = self.open_cached(name)? {
                return Ok(Boarded::Cached(Box::new(hit)));
            }
        }
        let (tx, _) = watch::channel(FlightState::default());
        let f = Arc::new(Flight {
            state: tx,
            phone: AtomicBool::new(phone),
        });
        flights.insert(asked, f.clone());
        crate::metrics::global().upstream_fetches.inc();
        tokio::spawn(self.clone().fly(name.clone(), f.clone(), ask));
        Ok(Boarded::Flight(f))
    }

    /// The cached copy of `name`, if there is one. A copy that cannot be read is refetched (a
    /// cache that lost a file it lists should not stop the phone), except when the process is
    /// out of descriptors: then the phone hears "temporarily unavailable" and asks again, rather
    /// than the WAN carrying a file the branch has, into a cache that could not store it either.
    fn open_cached(&self, name: &FileName) -> Result<Option<CachedFile>, MissError> {
        match self.cache.open_file(name.key()) {
            Ok(hit) => Ok(hit),
            Err(CacheError::Io { source, .. }) if crate::net::out_of_descriptors(&source) => {
                crate::net::descriptors_exhausted("cached file", &source);
                Err(MissError::Failed(format!(
                    "cannot open the cached {name}: {source}"
                )))
            }
            Err(e) => {
                warn!(name = %name, "cache read failed, fetching upstream: {e}");
                Ok(None)
            }
        }
    }

    /// One upstream fetch, written into the cache and shared with every reader.
    async fn fly(self: Arc<Self>, name: FileName, flight: Arc<Flight>, ask: Ask) {
        let asked = name.as_str().to_string();
        let chain = self.chain();
        let started = Instant::now();
        let answer = chain.fetch(&asked, ask.cached.as_ref()).await;
        let set_answer = |a: Answer| flight.state.send_modify(|s| s.answer = Some(a));
        match answer {
            ChainAnswer::NotFound => {
                self.negative.lock().unwrap().insert(&asked, Instant::now());
                info!(name = %name, "not found on any upstream");
                set_answer(Answer::NotFound);
            }
            ChainAnswer::Unreachable(why) => {
                warn!(name = %name, "no upstream could be asked: {why}");
                set_answer(Answer::Unreachable(why));
            }
            ChainAnswer::NotModified => {
                if let Some(e) = &ask.cached {
                    self.cache.note_validated(name.key(), e.validators.clone());
                }
                set_answer(Answer::NotModified);
            }
            ChainAnswer::Found { upstream, body } => {
                self.forget_negative(name.key());
                let source = upstream.url.clone();
                let result = self
                    .stream_into_cache(&name, &source, body, &flight, &ask)
                    .await;
                match &result {
                    Ok(Fetched::Stored { bytes, .. }) => {
                        info!(
                            name = %name, source = %source, bytes,
                            duration_ms = started.elapsed().as_millis() as u64,
                            "fetched from upstream and cached"
                        );
                        if flight.phone.load(Ordering::Relaxed) {
                            if let Some(hook) = self.on_found.read().unwrap().clone() {
                                hook(&name, &source);
                            }
                        }
                    }
                    Ok(Fetched::Unchanged { .. }) => {
                        debug!(name = %name, source = %source, "same bytes as the cached copy")
                    }
                    Err(e) => {
                        warn!(name = %name, source = %source, "fetch failed, nothing cached: {e}")
                    }
                }
                if let Err(why) = &result {
                    // Failed before any byte was streamed: the answer itself says so.
                    if flight.state.borrow().answer.is_none() {
                        set_answer(Answer::Failed(why.clone()));
                    }
                }
                flight.state.send_modify(|s| s.end = Some(result));
            }
        }
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&asked).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&asked);
        }
        self.landed.notify_waiters();
    }

    async fn stream_into_cache(
        &self,
        name: &FileName,
        source: &str,
        mut body: super::Body,
        flight: &Flight,
        ask: &Ask,
    ) -> Result<Fetched, String> {
        if let Some(size) = body.size.filter(|&s| s > self.max_file) {
            return Err(too_large(size, self.max_file));
        }
        let mut publisher = self.cache.publisher(name).map_err(|e| e.to_string())?;
        let file = Arc::new(publisher.open_reader().map_err(|e| e.to_string())?);
        flight.state.send_modify(|s| {
            s.answer = Some(Answer::Streaming {
                size: body.size,
                file,
                source: source.to_string(),
            })
        });
        while let Some(chunk) = body.stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if publisher.written() + chunk.len() as u64 > self.max_file {
                // Announced no size (TFTP without tsize) or lied about it.
                return Err(too_large(
                    publisher.written() + chunk.len() as u64,
                    self.max_file,
                ));
            }
            publisher.write_chunk(&chunk).map_err(|e| e.to_string())?;
            // Readers follow the temp file: what they may read must have left the buffer.
            io::Write::flush(&mut publisher).map_err(|e| format!("cache write: {e}"))?;
            let written = publisher.written();
            flight.state.send_modify(|s| s.written = written);
            if let Some(pace) = &ask.pace {
                // A phone waiting on the file is never paced.
                if !flight.phone.load(Ordering::Relaxed) {
                    pace.pace(chunk.len()).await;
                }
            }
        }
        let written = publisher.written();
        if let Some(size) = body.size {
            if size != written {
                return Err(format!(
                    "upstream sent {written} of the {size} bytes it announced"
                ));
            }
        }
        if let Some(old) = &ask.cached {
            if old.size == written && old.sha256 == publisher.sha256() {
                publisher.abort();
                self.cache.note_validated(name.key(), body.validators);
                return Ok(Fetched::Unchanged { received: written });
            }
            if let Some(vet) = &ask.vet {
                vet(&mut publisher).map_err(|why| {
                    warn!(name = %name, upstream = source, "update refused, old version kept: {why}");
                    format!("update refused, old version kept: {why}")
                })?;
            }
        }
        let meta = PublishMeta {
            source: source.to_string(),
            validators: body.validators.clone(),
            expected_size: body.size,
        };
        // fsync and rename block: keep them off the async workers.
        tokio::task::spawn_blocking(move || publisher.commit(meta))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.forget_negative(name.key());
        Ok(Fetched::Stored {
            bytes: written,
            replaced: ask.cached.is_some(),
        })
    }
}

/// A flight joined, or the cached copy that landed meanwhile.
enum Boarded {
    Flight(Arc<Flight>),
    Cached(Box<CachedFile>),
}

/// Waits for a flight's first answer; the receiver follows its bytes and its end.
async fn answer_of(flight: &Flight) -> Result<(Answer, watch::Receiver<FlightState>), MissError> {
    let mut rx = flight.state.subscribe();
    loop {
        let answer = rx.borrow_and_update().answer.clone();
        if let Some(a) = answer {
            return Ok((a, rx));
        }
        if rx.changed().await.is_err() {
            return Err(MissError::Failed("fetch abandoned".into()));
        }
    }
}

/// The largest file an upstream may put in a cache of `max_size` bytes: a quarter of it, so
/// one huge file (a mistake or a hostile upstream) evicts at most a quarter of what phones
/// need, never the whole unpinned cache.
pub fn max_file_size(max_size: u64) -> u64 {
    (max_size / 4).max(1)
}

fn too_large(size: u64, max: u64) -> String {
    format!("file of {size} bytes or more is over the {max}-byte limit (a quarter of cache.max_size); not cached")
}

/// The bytes of a flight for one reader, as far as they have been written; an error if the
/// flight fails, and the end only once the file was published complete.
fn read_flight(
    rx: watch::Receiver<FlightState>,
    file: Arc<File>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    futures::stream::unfold(Some((rx, file, 0u64)), |state| async move {
        let (mut rx, file, offset) = state?;
        loop {
            let (written, end) = {
                let s = rx.borrow_and_update();
                (s.written, s.end.clone())
            };
            if offset < written {
                let want = (written - offset).min(256 * 1024) as usize;
                let mut buf = vec![0u8; want];
                return match file.read_at(&mut buf, offset) {
                    Ok(0) => Some((
                        Err(io::Error::other("cache temp file shorter than written")),
                        None,
                    )),
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some((rx, file, offset + n as u64))))
                    }
                    Err(e) => Some((Err(e), None)),
                };
            }
            match end {
                Some(Ok(_)) => return None,
                Some(Err(e)) => {
                    return Some((
                        Err(io::Error::other(format!("upstream fetch failed: {e}"))),
                        None,
                    ))
                }
                None => {}
            }
            if rx.changed().await.is_err() {
                return Some((Err(io::Error::other("upstream fetch abandoned")), None));
            }
        }
    })
}
