//! The miss path: one upstream fetch per name however many clients ask at once ("single
//! flight"), streamed through to every waiting client while it is written into the cache.
//!
//! A flight writes the upstream's bytes into a cache [`Publisher`](crate::cache::Publisher)'s
//! temp file; each client reads that file at its own offset as far as it has been written, so
//! a phone gets its first block as soon as the WAN delivers it. The file is published only when
//! complete and of the announced size. A failed or truncated fetch publishes nothing and every
//! reader gets an error, never a clean end that would make a truncated file look complete.
//!
//! "Not found anywhere" is remembered for `sync.negative_ttl` by the exact name asked
//! ([`super::negative`]), and past it while every upstream is unreachable: during a WAN outage a phone asking for its (absent) CTL and ITL files
//! gets the same quick "file not found" it got before, and boots on as it did then.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncRead;
use tokio::sync::watch;
use tracing::{info, warn};

use super::negative::NegativeCache;
use super::{ChainAnswer, UpstreamChain};
use crate::cache::{Cache, CachedFile, PublishMeta};
use crate::name::FileName;

/// What a client gets for a name.
pub enum Served {
    /// From the cache.
    Hit(CachedFile),
    /// Streaming through from an upstream.
    Miss(MissStream),
}

/// A miss being streamed through from an upstream.
pub struct MissStream {
    /// The size the upstream announced, if it did.
    pub size: Option<u64>,
    /// The upstream URL the bytes come from.
    pub source: String,
    /// Fails with an error if the upstream transfer fails; ends only when complete.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissError {
    /// Every upstream answered "not found" (now, or within the negative-cache TTL).
    #[error("file not found")]
    NotFound,
    /// Nobody had it and at least one upstream could not be asked.
    #[error("upstream unreachable")]
    Unreachable(String),
    /// The cache could not take the file (disk full, I/O error).
    #[error("cannot store the file: {0}")]
    Failed(String),
}

#[derive(Clone)]
enum Answer {
    Streaming {
        size: Option<u64>,
        file: Arc<File>,
        source: String,
    },
    NotFound,
    Unreachable(String),
    Failed(String),
}

#[derive(Clone, Default)]
struct FlightState {
    answer: Option<Answer>,
    /// Bytes written (and flushed) into the temp file so far.
    written: u64,
    /// Set once: `Ok` when the file was published complete.
    end: Option<Result<(), String>>,
}

struct Flight {
    state: watch::Sender<FlightState>,
}

/// Something to tell when a flight publishes a file (the sync worker learns names this way).
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

    /// Forgets "not found" answers for every spelling of a cache key (a sync learned that the
    /// file now exists).
    pub fn forget_negative(&self, key: &str) {
        self.negative
            .lock()
            .unwrap()
            .forget(|asked| FileName::parse(asked).is_ok_and(|n| n.key() == key));
    }

    /// A cached copy if there is one, else the shared upstream fetch for this name.
    pub async fn open(self: &Arc<Self>, name: &FileName) -> Result<Served, MissError> {
        if let Some(hit) = self.open_cached(name)? {
            return Ok(Served::Hit(hit));
        }
        // Flights and "not found" go by the exact name asked upstream (a case-sensitive
        // upstream may have one spelling and not another); the cache by the folded key.
        let key = name.as_str().to_string();
        if self.negative.lock().unwrap().fresh(&key, Instant::now()) {
            return Err(MissError::NotFound);
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    // A flight publishes before it leaves the map: look again under the lock so
                    // a file that just landed is not fetched twice.
                    if let Some(hit) = self.open_cached(name)? {
                        return Ok(Served::Hit(hit));
                    }
                    let (tx, _) = watch::channel(FlightState::default());
                    let f = Arc::new(Flight { state: tx });
                    flights.insert(key.clone(), f.clone());
                    crate::metrics::global().upstream_fetches.inc();
                    tokio::spawn(self.clone().fly(name.clone(), f.clone()));
                    f
                }
            }
        };
        let mut rx = flight.state.subscribe();
        let answer = loop {
            if let Some(a) = rx.borrow_and_update().answer.clone() {
                break a;
            }
            if rx.changed().await.is_err() {
                return Err(MissError::Failed("fetch abandoned".into()));
            }
        };
        match answer {
            Answer::Streaming { size, file, source } => Ok(Served::Miss(MissStream {
                size,
                source,
                reader: Box::pin(tokio_util::io::StreamReader::new(read_flight(rx, file))),
            })),
            Answer::NotFound => Err(MissError::NotFound),
            Answer::Unreachable(m) => Err(MissError::Unreachable(m)),
            Answer::Failed(m) => Err(MissError::Failed(m)),
        }
    }

    fn remember_not_found(&self, asked: &str) {
        let ttl = *self.negative_ttl.read().unwrap();
        self.negative
            .lock()
            .unwrap()
            .insert(asked, Instant::now(), ttl);
    }

    fn open_cached(&self, name: &FileName) -> Result<Option<CachedFile>, MissError> {
        match self.cache.open_file(name.key()) {
            Ok(hit) => Ok(hit),
            Err(e) => {
                // A cache that cannot open a file it lists should not stop the phone: refetch.
                warn!(name = %name, "cache read failed, fetching upstream: {e}");
                Ok(None)
            }
        }
    }

    /// One upstream fetch, written into the cache and shared with every reader.
    async fn fly(self: Arc<Self>, name: FileName, flight: Arc<Flight>) {
        let key = name.as_str().to_string();
        let chain = self.chain();
        let started = Instant::now();
        let answer = chain.fetch(name.as_str()).await;
        let set_answer = |a: Answer| flight.state.send_modify(|s| s.answer = Some(a));
        match answer {
            ChainAnswer::NotFound => {
                self.remember_not_found(&key);
                info!(name = %name, "not found on any upstream");
                set_answer(Answer::NotFound);
            }
            ChainAnswer::Unreachable(why) => {
                let known_missing = self
                    .negative
                    .lock()
                    .unwrap()
                    .known_missing(&key, Instant::now());
                if known_missing {
                    // Stale if error, for a miss: the last answer the chain gave was "not
                    // found"; a phone is better served by that than by an error it never saw.
                    info!(name = %name, "not found when last asked; upstreams unreachable now: {why}");
                    set_answer(Answer::NotFound);
                } else {
                    warn!(name = %name, "miss not served: {why}");
                    set_answer(Answer::Unreachable(why));
                }
            }
            ChainAnswer::Found { upstream, body } => {
                self.forget_negative(name.key());
                let source = upstream.url.clone();
                let result = self
                    .stream_into_cache(&name, &source, body, &flight, &set_answer)
                    .await;
                match &result {
                    Ok(size) => {
                        info!(
                            name = %name, source = %source, bytes = size,
                            duration_ms = started.elapsed().as_millis() as u64,
                            "fetched from upstream and cached"
                        );
                        if let Some(hook) = self.on_found.read().unwrap().clone() {
                            hook(&name, &source);
                        }
                    }
                    Err(e) => {
                        warn!(name = %name, source = %source, "fetch failed, nothing cached: {e}")
                    }
                }
                flight
                    .state
                    .send_modify(|s| s.end = Some(result.map(|_| ())));
            }
        }
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
    }

    async fn stream_into_cache(
        &self,
        name: &FileName,
        source: &str,
        mut body: super::Body,
        flight: &Flight,
        set_answer: &impl Fn(Answer),
    ) -> Result<u64, String> {
        if let Some(size) = body.size.filter(|&s| s > self.max_file) {
            let why = too_large(size, self.max_file);
            set_answer(Answer::Failed(why.clone()));
            return Err(why);
        }
        let mut publisher = match self.cache.publisher(name) {
            Ok(p) => p,
            Err(e) => {
                set_answer(Answer::Failed(e.to_string()));
                return Err(e.to_string());
            }
        };
        let file = match publisher.open_reader() {
            Ok(f) => Arc::new(f),
            Err(e) => {
                set_answer(Answer::Failed(e.to_string()));
                return Err(e.to_string());
            }
        };
        set_answer(Answer::Streaming {
            size: body.size,
            file,
            source: source.to_string(),
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
        }
        let written = publisher.written();
        if let Some(size) = body.size {
            if size != written {
                return Err(format!(
                    "upstream sent {written} of the {size} bytes it announced"
                ));
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
        Ok(written)
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
                Some(Ok(())) => return None,
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
