//! The overrides directory (`cache.overrides`, or `serve --root`): files an admin drops there
//! win over upstream copies. Lookups are case-insensitive like every phone name, and never
//! leave the directory, even through a symlink.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::name::FileName;

#[derive(Debug, Clone)]
pub struct Overrides {
    root: PathBuf,
}

impl Overrides {
    pub fn new(root: impl Into<PathBuf>) -> Overrides {
        Overrides { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds `name` under the root: the exact spelling first, then component by component
    /// ignoring letter case. Directories and anything resolving outside the root are not files.
    pub fn resolve(&self, name: &FileName) -> Option<PathBuf> {
        let exact = self.root.join(name.as_str());
        let path = if exact.is_file() {
            exact
        } else {
            let mut dir = self.root.clone();
            for part in name.as_str().split('/') {
                let want = part.to_lowercase();
                let found = std::fs::read_dir(&dir)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .find(|e| e.file_name().to_string_lossy().to_lowercase() == want)?;
                dir = found.path();
            }
            dir
        };
        let root = self.root.canonicalize().ok()?;
        let real = path.canonicalize().ok()?;
        (real.starts_with(&root) && real.is_file()).then_some(real)
    }

    /// Opens a file for serving, with its size.
    pub fn open(&self, name: &FileName) -> io::Result<Option<(File, u64)>> {
        let Some(path) = self.resolve(name) else {
            return Ok(None);
        };
        let file = File::open(&path)?;
        let size = file.metadata()?.len();
        Ok(Some((file, size)))
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
}
