//! The set of names the sync worker keeps fresh, and why it knows each one: configured prefetch,
//! a phone asked for it (and it was found), `ConfigFileCacheList.txt` listed it, or discovery
//! followed a config to it. Kept in `cache.dir/sync-known.json` so a restart remembers which
//! phones this branch serves.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Why a name is known; a name can have several reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// Listed in `sync.prefetch`.
    Prefetch,
    /// A phone asked for it and an upstream had it.
    Phone,
    /// Listed by `ConfigFileCacheList.txt`.
    List,
    /// Named by a current config (firmware, `.loads`) or a locale file.
    Discovered,
}

/// What the worker remembers about one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownName {
    /// The spelling to ask upstreams for.
    pub name: String,
    pub reasons: BTreeSet<Reason>,
    /// Consecutive checks on which every upstream answered "not found".
    #[serde(default)]
    pub absent_passes: u32,
    /// The length `ConfigFileCacheList.txt` gave the last time it was read.
    #[serde(default)]
    pub listed_size: Option<u64>,
    /// Unix ms of the last check that looked at the content itself (not only the list length).
    #[serde(default)]
    pub full_check: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    names: BTreeMap<String, KnownName>,
}

/// The known names, by case-folded key.
#[derive(Debug, Default)]
pub struct KnownNames {
    pub names: BTreeMap<String, KnownName>,
    path: Option<PathBuf>,
    dirty: bool,
}

const FILE: &str = "sync-known.json";

impl KnownNames {
    /// Loads the set kept in `dir` (empty if there is none or it cannot be read).
    pub fn load(dir: &Path) -> KnownNames {
        let path = dir.join(FILE);
        let names = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) => d.names,
                Err(e) => {
                    warn!(path = %path.display(), "sync: known names unreadable, starting afresh: {e}");
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        KnownNames {
            names,
            path: Some(path),
            dirty: false,
        }
    }

    /// Adds a reason for a name (inserting it); `true` if the name is new.
    pub fn learn(&mut self, name: &crate::name::FileName, reason: Reason) -> bool {
        let mut new = false;
        let e = self.names.entry(name.key().to_string()).or_insert_with(|| {
            new = true;
            KnownName {
                name: name.as_str().to_string(),
                reasons: BTreeSet::new(),
                absent_passes: 0,
                listed_size: None,
                full_check: 0,
            }
        });
        if e.reasons.insert(reason) || new {
            self.dirty = true;
        }
        new
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut KnownName> {
        self.dirty = true;
        self.names.get_mut(key)
    }

    /// Why a name is known (empty if it is not).
    pub fn reasons(&self, key: &str) -> BTreeSet<Reason> {
        self.names
            .get(key)
            .map(|n| n.reasons.clone())
            .unwrap_or_default()
    }

    /// Takes one reason away; a name left without reasons is forgotten unless `keep` (a cached
    /// file whose next checks decide whether it leaves).
    pub fn drop_reason(&mut self, key: &str, reason: Reason, keep: bool) {
        let Some(n) = self.names.get_mut(key) else {
            return;
        };
        if n.reasons.remove(&reason) {
            self.dirty = true;
        }
        if n.reasons.is_empty() && !keep {
            self.forget(key);
        }
    }

    pub fn forget(&mut self, key: &str) {
        if self.names.remove(key).is_some() {
            self.dirty = true;
        }
    }

    /// Devices (`SEP<MAC>`) a phone asked for files of: the phones seen at this branch.
    pub fn seen_devices(&self) -> BTreeSet<String> {
        self.names
            .values()
            .filter(|n| n.reasons.contains(&Reason::Phone))
            .filter_map(|n| super::parse::device_of(&n.name))
            .collect()
    }

    /// Writes the set back if it changed (temp file, fsync, rename).
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let Some(path) = self.path.clone() else {
            return;
        };
        let doc = OnDisk {
            version: 1,
            names: self.names.clone(),
        };
        let tmp = path.with_extension("json.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&doc).expect("serializes"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        match result {
            Ok(()) => self.dirty = false,
            Err(e) => warn!(path = %path.display(), "sync: cannot save known names: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::FileName;

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = KnownNames::load(dir.path());
        assert!(k.learn(
            &FileName::parse("SEP001122AABBCC.cnf.xml").unwrap(),
            Reason::Phone
        ));
        assert!(!k.learn(
            &FileName::parse("sep001122aabbcc.CNF.xml").unwrap(),
            Reason::List
        ));
        k.save();
        let k = KnownNames::load(dir.path());
        let n = &k.names["sep001122aabbcc.cnf.xml"];
        assert_eq!(n.name, "SEP001122AABBCC.cnf.xml");
        assert_eq!(n.reasons.len(), 2);
        assert_eq!(
            k.seen_devices().into_iter().collect::<Vec<_>>(),
            ["SEP001122AABBCC"]
        );
    }
}
