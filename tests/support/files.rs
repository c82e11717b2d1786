//! Test files with deterministic pseudo-random content and known sha256.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One file written by [`TestFiles`].
#[derive(Clone, Debug)]
pub struct TestFile {
    pub name: String,
    pub path: PathBuf,
    pub size: usize,
    pub sha256: String,
}

/// A temporary directory of files with deterministic content, world-readable (tftpd-hpa and
/// atftpd drop privileges to `nobody`), removed on drop.
pub struct TestFiles {
    dir: tempfile::TempDir,
    files: BTreeMap<String, TestFile>,
}

impl TestFiles {
    /// An empty directory (mode 0755).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("branchtftp-test-")
            .tempdir()
            .expect("create a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        TestFiles {
            dir,
            files: BTreeMap::new(),
        }
    }

    /// A directory holding one file per `(name, size)`.
    pub fn with_sizes(files: &[(&str, usize)]) -> Self {
        let mut t = TestFiles::new();
        for (name, size) in files {
            t.add(name, *size);
        }
        t
    }

    /// Writes `name` (may contain `/`) with `size` bytes of content derived from the name, so the
    /// same name and size always give the same bytes.
    pub fn add(&mut self, name: &str, size: usize) -> &TestFile {
        let content = pseudo_random_bytes(seed_of(name), size);
        self.add_bytes(name, &content)
    }

    /// Writes `name` with the given content.
    pub fn add_bytes(&mut self, name: &str, content: &[u8]) -> &TestFile {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
            let mut p = parent;
            while p.starts_with(self.dir.path()) {
                fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
                match p.parent() {
                    Some(up) => p = up,
                    None => break,
                }
            }
        }
        fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let file = TestFile {
            name: name.to_string(),
            path,
            size: content.len(),
            sha256: sha256_bytes(content),
        };
        self.files.insert(name.to_string(), file);
        &self.files[name]
    }

    /// The directory (serve it as a TFTP root).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file written earlier; panics when unknown.
    pub fn get(&self, name: &str) -> &TestFile {
        self.files
            .get(name)
            .unwrap_or_else(|| panic!("no test file {name:?}"))
    }

    /// The sha256 (lower-case hex) of a file written earlier.
    pub fn sha256(&self, name: &str) -> &str {
        &self.get(name).sha256
    }

    /// The content of a file written earlier (read back from disk).
    pub fn content(&self, name: &str) -> Vec<u8> {
        fs::read(&self.get(name).path).unwrap()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TestFile> {
        self.files.values()
    }

    /// A path inside the directory for downloads; not tracked as a test file.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestFiles {
    fn default() -> Self {
        TestFiles::new()
    }
}

/// A scratch directory for client downloads, removed on drop.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("branchtftp-out-")
        .tempdir()
        .expect("create a temporary directory")
}

fn seed_of(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` bytes from splitmix64 seeded with `seed`: fast, deterministic, incompressible enough.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// sha256 of a byte slice, lower-case hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// sha256 of a file's content, lower-case hex; panics when the file cannot be read.
pub fn sha256_file(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

/// Makes a tree world-readable (directories 0755, files 0644) for servers that drop privileges.
pub fn make_world_readable(root: &Path) {
    let meta = fs::metadata(root).unwrap_or_else(|e| panic!("stat {}: {e}", root.display()));
    if meta.is_dir() {
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        for entry in fs::read_dir(root).unwrap() {
            make_world_readable(&entry.unwrap().path());
        }
    } else {
        let mode = meta.permissions().mode() | 0o444;
        fs::set_permissions(root, fs::Permissions::from_mode(mode)).unwrap();
    }
}
