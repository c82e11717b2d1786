//! Small cached files kept in memory for the phones' HTTP front end (issue 12): a boot storm
//! asks every phone for the same few small files (trust lists, locale files, tones, ring list,
//! dial plan), and opening, reading and closing the cache file for each request on the
//! blocking pool cost more than the TCP send itself. A copy is keyed by the cache key and
//! tagged with the content's sha256; it is served only while the cache index still names that
//! sha256 for the key ([`Cache::hit_if_current`]), so a publish that replaces the file takes
//! effect at the next request and a removed file is no longer served from memory. A copy is
//! made only from a complete cache file whose length matches its index entry, so it is never
//! partial. Memory is bounded: files up to [`MAX_FILE`] bytes, [`BUDGET`] bytes in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::cache::{Cache, CachedFile};

/// Files larger than this are streamed from disk as before (firmware images).
pub const MAX_FILE: u64 = 256 * 1024;
/// All copies together stay under this; beyond it older copies make room.
pub const BUDGET: usize = 16 * 1024 * 1024;

/// One file's bytes as published, with what the request log needs.
#[derive(Clone)]
pub struct HotFile {
    pub sha256: Arc<str>,
    pub body: Bytes,
    /// The upstream it came from (the log's `source`).
    pub source: Arc<str>,
}

/// The copies, bounded by `budget` bytes.
pub struct HotFiles {
    budget: usize,
    max_file: u64,
    state: Mutex<Copies>,
}

#[derive(Default)]
struct Copies {
    files: HashMap<String, (HotFile, u64)>,
    bytes: usize,
    /// Use counter: the least recently used copies make room first.
    next: u64,
}

impl Default for HotFiles {
    fn default() -> HotFiles {
        HotFiles::new(BUDGET, MAX_FILE)
    }
}

impl HotFiles {
    pub fn new(budget: usize, max_file: u64) -> HotFiles {
        HotFiles {
            budget,
            max_file,
            state: Mutex::new(Copies::default()),
        }
    }

    /// Whether a file of `size` bytes is kept in memory once read.
    pub fn wants(&self, size: u64) -> bool {
        size <= self.max_file && size as usize <= self.budget
    }

    /// The copy of `key`, if it is still the cache's current content (counted as a cache hit).
    pub fn get(&self, cache: &Cache, key: &str) -> Option<HotFile> {
        let copy = {
            let mut st = self.lock();
            st.next += 1;
            let now = st.next;
            let (f, used) = st.files.get_mut(key)?;
            *used = now;
            f.clone()
        };
        cache.hit_if_current(key, &copy.sha256).then_some(copy)
    }

    /// Reads a small cache hit whole (on the calling thread: a few page-cache pages cost less
    /// than a trip to the blocking pool) and keeps a copy. `Err` if the file is shorter or
    /// longer than its entry says: it is then not served at all.
    pub fn load(&self, file: CachedFile) -> std::io::Result<HotFile> {
        use std::io::Read;
        let size = file.entry.size;
        let mut buf = Vec::with_capacity(size as usize);
        (&file.file).take(size + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            return Err(std::io::Error::other("cached file does not match its size"));
        }
        let copy = HotFile {
            sha256: Arc::from(file.entry.sha256.as_str()),
            body: Bytes::from(buf),
            source: Arc::from(file.entry.source.as_str()),
        };
        // A copy without a content hash could not be told from a later version: never kept.
        if !copy.sha256.is_empty() && self.wants(size) {
            self.insert(&file.entry.key, copy.clone());
        }
        Ok(copy)
    }

    fn insert(&self, key: &str, copy: HotFile) {
        let mut st = self.lock();
        let st = &mut *st;
        let len = copy.body.len();
        if let Some((old, _)) = st.files.remove(key) {
            st.bytes -= old.body.len();
        }
        while st.bytes + len > self.budget {
            let Some(oldest) = st
                .files
                .iter()
                .min_by_key(|(_, (_, n))| *n)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let (old, _) = st.files.remove(&oldest).expect("just found");
            st.bytes -= old.body.len();
        }
        st.next += 1;
        st.bytes += len;
        st.files.insert(key.to_string(), (copy, st.next));
    }

    /// Bytes held (for tests and the bound).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copies> {
        // Plain data: a panic elsewhere leaves nothing half-done worth refusing service for.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{ClassRules, PublishMeta};
    use crate::name::FileName;

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open(dir.path(), 1 << 30, ClassRules::default()).unwrap();
        (dir, cache)
    }

    fn publish(cache: &Cache, name: &str, body: &[u8]) {
        let mut p = cache.publisher(&FileName::parse(name).unwrap()).unwrap();
        p.write_chunk(body).unwrap();
        p.commit(PublishMeta {
            source: "test".into(),
            validators: Default::default(),
            expected_size: Some(body.len() as u64),
        })
        .unwrap();
    }

    fn load(hot: &HotFiles, cache: &Cache, key: &str) -> HotFile {
        hot.load(cache.open_file(key).unwrap().expect("cached"))
            .unwrap()
    }

    #[test]
    fn a_copy_is_served_until_a_publish_replaces_the_file() {
        let (_dir, cache) = cache();
        let hot = HotFiles::default();
        publish(&cache, "RingList.xml", b"first");
        assert!(
            hot.get(&cache, "ringlist.xml").is_none(),
            "nothing kept yet"
        );
        assert_eq!(&load(&hot, &cache, "ringlist.xml").body[..], b"first");
        let hits = cache.get("ringlist.xml").unwrap().hits;
        assert_eq!(&hot.get(&cache, "ringlist.xml").unwrap().body[..], b"first");
        assert_eq!(cache.get("ringlist.xml").unwrap().hits, hits + 1, "counted");

        publish(&cache, "RingList.xml", b"second");
        assert!(
            hot.get(&cache, "ringlist.xml").is_none(),
            "stale copy served"
        );
        assert_eq!(&load(&hot, &cache, "ringlist.xml").body[..], b"second");
        assert_eq!(
            &hot.get(&cache, "ringlist.xml").unwrap().body[..],
            b"second"
        );

        cache.evict("ringlist.xml").unwrap();
        assert!(
            hot.get(&cache, "ringlist.xml").is_none(),
            "evicted file served"
        );
    }

    #[test]
    fn copies_stay_within_the_budget_and_the_least_recently_used_make_room() {
        let (_dir, cache) = cache();
        let hot = HotFiles::new(3_000, 1_500);
        for name in ["a.xml", "b.xml", "c.xml"] {
            publish(&cache, name, &[b'x'; 1_000]);
            load(&hot, &cache, name);
        }
        assert_eq!(hot.bytes(), 3_000);
        assert!(
            hot.get(&cache, "a.xml").is_some(),
            "a used again: b is now the oldest"
        );
        publish(&cache, "d.xml", &[b'y'; 1_000]);
        load(&hot, &cache, "d.xml");
        assert_eq!(hot.bytes(), 3_000);
        assert!(hot.get(&cache, "b.xml").is_none());
        for kept in ["a.xml", "c.xml", "d.xml"] {
            assert!(hot.get(&cache, kept).is_some(), "{kept}");
        }
        // Too large to keep: served from this read, never held.
        publish(&cache, "big.jar", &[b'z'; 2_000]);
        assert!(!hot.wants(2_000));
        assert_eq!(load(&hot, &cache, "big.jar").body.len(), 2_000);
        assert!(hot.get(&cache, "big.jar").is_none());
        assert_eq!(hot.bytes(), 3_000);
    }

    #[test]
    fn a_file_shorter_than_its_entry_is_not_served() {
        let (dir, cache) = cache();
        let hot = HotFiles::default();
        publish(&cache, "g3-tones.xml", b"complete tones");
        let file = cache.open_file("g3-tones.xml").unwrap().unwrap();
        // Cut behind the cache's back (a disk fault): the open file now ends early.
        let path = dir.path().join("files").join("g3-tones.xml");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4)
            .unwrap();
        assert!(hot.load(file).is_err());
        assert!(hot.get(&cache, "g3-tones.xml").is_none());
    }
}
