//! The overrides directory (`cache.overrides`, or `serve --root`): files an admin drops there
//! win over upstream copies. Lookups ignore ASCII letter case like every phone name, and never
//! leave the directory, even through a symlink.
//!
//! The directory is held as an index (lookup key → relative path) kept current by notify, so
//! a miss costs one hash lookup however many files the folder holds (issue 12: scanning it per
//! request cost 3.8 ms with 5,000 files, twice per booting phone). Changes mark the index
//! stale and the next lookup rebuilds it; without a watcher (inotify limits) it is rebuilt at
//! most once a second.
//!
//! A small file (at most [`COPY_MAX`]) is read whole when first asked for and served from that
//! copy until the folder changes: a boot storm asks for the same few files thousands of times,
//! and each open, stat and close (and the inotify events an open raises) cost more than
//! sending the file. Any change seen in the folder drops every copy, as it marks the index
//! stale; a copy read while a change was being noticed is not kept (the copies' generation).
//! The copies are bounded by [`COPY_BUDGET`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use notify::RecursiveMode;
use tracing::warn;

use crate::name::FileName;

/// Deepest directory level indexed (phones use one level: locale directories).
const MAX_DEPTH: usize = 8;
/// Without a watcher, the index is at most this old.
const UNWATCHED_REFRESH: Duration = Duration::from_secs(1);
/// Largest file served from a copy in memory (trust lists, configs, locale jars, tones).
pub const COPY_MAX: u64 = 64 << 10;
/// Bytes of copies held at most; each copy counts at least [`COPY_OVERHEAD`].
pub const COPY_BUDGET: usize = 8 << 20;
pub const COPY_OVERHEAD: usize = 256;

/// An override opened for serving.
pub enum Override {
    /// A small file, whole, from the copy shared by every request since the folder last changed.
    Memory(Bytes),
    /// A larger file, open, with its size.
    File(File, u64),
}

/// The small files read whole since the folder last changed, by the name as asked.
#[derive(Default)]
struct Copies {
    /// Raised whenever the folder changed: a copy read under an older generation is not kept.
    generation: u64,
    files: HashMap<String, Bytes>,
    bytes: usize,
}

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
    /// The root, open, for opens confined beneath it; as of the last rebuild.
    root_dir: RwLock<Option<File>>,
    stale: Arc<AtomicBool>,
    /// When the index was built, for the unwatched refresh.
    built: Mutex<Instant>,
    copies: Mutex<Copies>,
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
                root_dir: RwLock::new(None),
                stale,
                built: Mutex::new(Instant::now()),
                copies: Mutex::new(Copies::default()),
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
        // Clear the mark before scanning: a change during the scan marks it again. Read it
        // first: a write on every request would bounce its cache line between the cores.
        if (ix.stale.load(Ordering::Acquire) && ix.stale.swap(false, Ordering::AcqRel)) || old {
            {
                let mut copies = ix.copies.lock().unwrap();
                copies.generation += 1;
                copies.files.clear();
                copies.bytes = 0;
            }
            let mut files = HashMap::new();
            scan(&self.root, "", 0, &mut files);
            *ix.files.write().unwrap() = files;
            *ix.real_root.write().unwrap() = self.root.canonicalize().ok();
            *ix.root_dir.write().unwrap() = File::open(&self.root).ok();
            *ix.built.lock().unwrap() = Instant::now();
        }
    }

    /// Whether the folder holds a file named `name` (in any letter case): a hash lookup in the
    /// index, without touching the disk. [`open`](Self::open) may still refuse it (a link out
    /// of the folder).
    pub fn contains(&self, name: &FileName) -> bool {
        self.refresh();
        self.index.files.read().unwrap().contains_key(name.key())
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

    /// A file for serving: a small one from its copy in memory (read whole and kept when first
    /// asked for), a larger one open (see [`open_file`](Self::open_file)).
    pub fn open(&self, name: &FileName) -> io::Result<Option<Override>> {
        self.refresh();
        let generation = {
            let copies = self.index.copies.lock().unwrap();
            if let Some(copy) = copies.files.get(name.as_str()) {
                return Ok(Some(Override::Memory(copy.clone())));
            }
            copies.generation
        };
        let Some((file, size)) = self.open_file(name)? else {
            return Ok(None);
        };
        if size > COPY_MAX {
            return Ok(Some(Override::File(file, size)));
        }
        let mut buf = vec![0u8; size as usize];
        if file.read_exact_at(&mut buf, 0).is_err() {
            // Shorter than its size now (being rewritten): served from the file, whose reader
            // fails the transfer rather than send a short file as complete.
            return Ok(Some(Override::File(file, size)));
        }
        let copy = Bytes::from(buf);
        let mut copies = self.index.copies.lock().unwrap();
        let cost = copy.len().max(COPY_OVERHEAD);
        if copies.generation == generation && copies.bytes + cost <= COPY_BUDGET {
            copies.bytes += cost;
            copies.files.insert(name.as_str().to_string(), copy.clone());
        }
        Ok(Some(Override::Memory(copy)))
    }

    /// Opens a file for serving, with its size. The kernel confines the open to the root
    /// (`openat2` with `RESOLVE_BENEATH` from the root directory): a symlink may lead anywhere
    /// beneath it, never out, and nothing can swap a checked path for another between a check
    /// and the open. Two system calls and a close per request, where resolving the path first
    /// cost a readlink per component and three stats (issue 12's storm serves every phone from
    /// here). Kernels or filters without `openat2` take the slower [`resolve`](Self::resolve).
    pub fn open_file(&self, name: &FileName) -> io::Result<Option<(File, u64)>> {
        let Some(spelled) = self.index.files.read().unwrap().get(name.key()).cloned() else {
            return Ok(None);
        };
        // The exact spelling wins when two files differ only in letter case.
        let exact = (spelled != name.as_str()).then_some(name.as_str());
        for rel in exact.into_iter().chain([spelled.as_str()]) {
            match self.open_beneath(rel) {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::EPERM | libc::EXDEV)
                    ) =>
                {
                    return self.open_resolved(name)
                }
                Err(e) => {
                    if crate::net::out_of_descriptors(&e) {
                        crate::net::descriptors_exhausted("override file", &e);
                    }
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// `rel` opened beneath the root, if it is a regular file there.
    fn open_beneath(&self, rel: &str) -> io::Result<Option<(File, u64)>> {
        let root = self.index.root_dir.read().unwrap();
        let Some(root) = root.as_ref() else {
            return Ok(None);
        };
        let Ok(path) = std::ffi::CString::new(rel) else {
            return Ok(None);
        };
        // SAFETY: `open_how` is plain old data; all zeroes is a valid value, filled in below.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // Non-blocking: a FIFO dropped in the folder must not hang the open (it is then refused
        // as not a regular file); reads of a regular file ignore the flag.
        how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: a valid directory descriptor, a NUL-terminated path and an `open_how` of the
        // size passed, all alive for the call; the kernel returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Gone since the index was built, or a magic link.
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => Ok(None),
                // Leading out of the root, or an absolute symlink (which `RESOLVE_BENEATH`
                // refuses even when it points inside): the path is resolved and checked.
                Some(libc::EXDEV) => Err(e),
                _ => Err(e),
            };
        }
        // SAFETY: `fd` is a descriptor the kernel just gave us and nothing else owns.
        let file = unsafe { File::from_raw_fd(fd as RawFd) };
        let meta = file.metadata()?;
        Ok(meta.is_file().then_some((file, meta.len())))
    }

    /// [`open`](Self::open) through [`resolve`](Self::resolve), without `openat2`.
    fn open_resolved(&self, name: &FileName) -> io::Result<Option<(File, u64)>> {
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
    let marked = move |_: &notify::Result<notify::Event>| stale.store(true, Ordering::Release);
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

    fn served(o: &Overrides, name: &str) -> Option<Vec<u8>> {
        use std::io::Read;
        let (mut f, size) = match o.open(&FileName::parse(name).unwrap()).unwrap()? {
            Override::Memory(b) => return Some(b.to_vec()),
            Override::File(f, size) => (f, size),
        };
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        assert_eq!(v.len() as u64, size);
        Some(v)
    }

    fn copy(o: &Overrides, name: &str) -> Option<Bytes> {
        match o.open(&FileName::parse(name).unwrap()).unwrap()? {
            Override::Memory(b) => Some(b),
            Override::File(..) => None,
        }
    }

    #[test]
    fn a_small_file_is_served_from_one_copy_until_the_folder_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("RingList.xml"), b"rings").unwrap();
        let big = vec![7u8; COPY_MAX as usize + 1];
        std::fs::write(dir.path().join("big.sbn"), &big).unwrap();
        let o = Overrides::new(dir.path());
        let a = copy(&o, "RingList.xml").unwrap();
        let b = copy(&o, "RingList.xml").unwrap();
        assert_eq!(&a[..], b"rings");
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the second request reads the same copy"
        );
        assert!(
            copy(&o, "big.sbn").is_none(),
            "a large file is opened, not copied"
        );
        assert_eq!(served(&o, "big.sbn").unwrap(), big);

        // Rewritten in place (same inode, same size): the change is seen and the copy dropped.
        std::fs::write(dir.path().join("RingList.xml"), b"RINGS").unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        while served(&o, "RingList.xml").unwrap() != b"RINGS" && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(served(&o, "RingList.xml").unwrap(), b"RINGS");
        std::fs::remove_file(dir.path().join("RingList.xml")).unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        while served(&o, "RingList.xml").is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            served(&o, "RingList.xml").is_none(),
            "a removed file's copy is gone"
        );
    }

    #[test]
    fn opens_stay_beneath_the_root_whatever_the_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ov");
        std::fs::create_dir_all(root.join("English_United_States")).unwrap();
        std::fs::write(root.join("English_United_States/mk-sip.jar"), b"jar").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, root.join(name));
        link(
            Path::new("English_United_States/mk-sip.jar"),
            "relative.jar",
        )
        .unwrap();
        link(
            &root.join("English_United_States/mk-sip.jar"),
            "absolute.jar",
        )
        .unwrap();
        link(Path::new("../secret"), "dotdot").unwrap();
        link(&dir.path().join("secret"), "outside").unwrap();
        link(Path::new("/proc/self/root/etc/passwd"), "magic").unwrap();
        // A FIFO must be refused, not opened: opening it for reading would wait for a writer.
        let fifo = std::ffi::CString::new(root.join("fifo.xml").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let o = Overrides::new(&root);

        assert_eq!(
            served(&o, "english_united_states/MK-SIP.JAR").unwrap(),
            b"jar"
        );
        assert_eq!(served(&o, "relative.jar").unwrap(), b"jar");
        assert_eq!(
            served(&o, "absolute.jar").unwrap(),
            b"jar",
            "inside, absolutely"
        );
        for escape in [
            "dotdot",
            "outside",
            "magic",
            "fifo.xml",
            "English_United_States",
        ] {
            assert!(served(&o, escape).is_none(), "{escape} served");
        }
    }

    #[test]
    fn the_exact_spelling_wins_over_another_case() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("RingList.xml"), b"mixed").unwrap();
        std::fs::write(dir.path().join("ringlist.xml"), b"lower").unwrap();
        let o = Overrides::new(dir.path());
        assert_eq!(served(&o, "ringlist.xml").unwrap(), b"lower");
        assert_eq!(served(&o, "RingList.xml").unwrap(), b"mixed");
        assert!(served(&o, "RINGLIST.XML").is_some());
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
