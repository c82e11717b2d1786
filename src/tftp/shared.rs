//! Small files shared in memory by every transfer that sends them.
//!
//! A boot storm is thousands of phones asking for the same few small files (trust lists,
//! locale files, tones, ring lists). Read with `pread` per block, each block costs a system
//! call and each transfer holds the file's descriptor for its whole life. A file of at most
//! [`SHARED_MAX`] bytes is instead read whole once per version (device, inode, size, mtime,
//! ctime: a cache publish renames a new inode in, an edited override changes its times) and
//! every transfer of that version sends from the same bytes, without a descriptor. The memory
//! is bounded by [`SHARED_BUDGET`], counting files still being sent: when full, versions no
//! transfer uses are dropped, and if that is not enough the file is read block by block as
//! before.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

/// Largest file read whole (a locale jar is 20-50 KB; firmware is far larger and streamed).
pub const SHARED_MAX: u64 = 64 << 10;
/// Bytes of shared files held at most, those being sent included.
pub const SHARED_BUDGET: usize = 8 << 20;

/// One version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The shared small files of one server.
#[derive(Default)]
pub struct SharedFiles {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<Version, Arc<[u8]>>,
    bytes: usize,
}

impl SharedFiles {
    /// The whole content of `file` when it is small and its size is still `size`, from memory
    /// if this version was read before; `None` to read it block by block instead.
    pub fn get(&self, file: &File, size: u64) -> io::Result<Option<Arc<[u8]>>> {
        if size > SHARED_MAX {
            return Ok(None);
        }
        let m = file.metadata()?;
        if m.len() != size {
            return Ok(None);
        }
        let v = Version {
            dev: m.dev(),
            ino: m.ino(),
            size,
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        };
        if let Some(b) = self.inner.lock().unwrap().files.get(&v) {
            return Ok(Some(b.clone()));
        }
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, 0)?;
        let bytes: Arc<[u8]> = buf.into();
        let mut inner = self.inner.lock().unwrap();
        if inner.bytes + bytes.len() > SHARED_BUDGET {
            // Versions nobody sends any more go first (only the map holds them).
            inner.files.retain(|_, b| Arc::strong_count(b) > 1);
            inner.bytes = inner.files.values().map(|b| b.len()).sum();
            if inner.bytes + bytes.len() > SHARED_BUDGET {
                return Ok(None);
            }
        }
        inner.bytes += bytes.len();
        inner.files.insert(v, bytes.clone());
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn one_version_is_read_once_and_an_edit_is_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("RingList.xml");
        std::fs::write(&path, b"rings").unwrap();
        let shared = SharedFiles::default();
        let a = shared.get(&File::open(&path).unwrap(), 5).unwrap().unwrap();
        let b = shared.get(&File::open(&path).unwrap(), 5).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same bytes for the same version");
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"RINGS").unwrap();
        drop(f);
        let c = shared.get(&File::open(&path).unwrap(), 5).unwrap().unwrap();
        assert_eq!(&c[..], b"RINGS");
    }

    #[test]
    fn large_files_and_a_full_budget_fall_back_to_reading_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![1u8; SHARED_MAX as usize + 1]).unwrap();
        let shared = SharedFiles::default();
        let f = File::open(&big).unwrap();
        assert!(shared.get(&f, SHARED_MAX + 1).unwrap().is_none());
        // Fill the budget with files still being sent (held here), then one more.
        let mut held = Vec::new();
        let n = SHARED_BUDGET / SHARED_MAX as usize;
        for i in 0..=n {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, vec![i as u8; SHARED_MAX as usize]).unwrap();
            let got = shared.get(&File::open(&p).unwrap(), SHARED_MAX).unwrap();
            assert_eq!(got.is_some(), i < n, "file {i}");
            held.push(got);
        }
        // Once they are sent, their room is reused.
        held.clear();
        let p = dir.path().join("later");
        std::fs::write(&p, b"later").unwrap();
        assert!(shared.get(&File::open(&p).unwrap(), 5).unwrap().is_some());
    }
}
