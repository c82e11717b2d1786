//! Disk full: a publish that hits ENOSPC fails cleanly. The old version stays served, nothing
//! partial is indexed, no temp file stays behind, and the next publish that fits succeeds.
//!
//! The disk is a real tiny tmpfs that fills up: the test mounts one, so it runs as root (as the
//! suite does: tests/run.sh installs packages and `admin_auth` makes a network namespace).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use branchtftp::cache::{Cache, ClassRules, PublishMeta};
use branchtftp::name::FileName;
use sha2::{Digest, Sha256};

fn name() -> FileName {
    FileName::parse("kern88xx.14-2-1-0101-15.sgn").unwrap()
}

fn publish(cache: &Cache, bytes: &[u8]) -> Result<(), branchtftp::cache::CacheError> {
    let mut p = cache.publisher(&name())?;
    p.write_chunk(bytes)?;
    p.commit(PublishMeta {
        expected_size: Some(bytes.len() as u64),
        ..PublishMeta::default()
    })?;
    Ok(())
}

fn served(cache: &Cache) -> Vec<u8> {
    let mut f = cache
        .open_file(name().key())
        .unwrap()
        .expect("still cached");
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    assert_eq!(f.entry.sha256, hex::encode(Sha256::digest(&v)));
    v
}

fn scenario(dir: &Path, big: usize) {
    let v1: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7) as u8).collect();
    {
        let (cache, _) = Cache::open(dir, u64::MAX, ClassRules::default()).unwrap();
        publish(&cache, &v1).unwrap();
        let totals = cache.totals();

        let mut p = cache.publisher(&name()).unwrap();
        let chunk = vec![0xabu8; 64 * 1024];
        let mut result = Ok(());
        let mut left = big;
        while left > 0 && result.is_ok() {
            let n = left.min(chunk.len());
            result = p.write_chunk(&chunk[..n]);
            left -= n;
        }
        let err = match result {
            Err(e) => {
                drop(p);
                e
            }
            // Buffered bytes may only fail at commit.
            Ok(()) => p
                .commit(PublishMeta {
                    expected_size: Some(big as u64),
                    ..PublishMeta::default()
                })
                .expect_err("the disk is full"),
        };
        assert!(err.is_disk_full(), "expected ENOSPC, got {err}");
        assert!(
            err.to_string().contains("tmp"),
            "error names the file: {err}"
        );

        assert_eq!(served(&cache), v1, "the old version is still served");
        assert_eq!(cache.totals(), totals, "nothing partial indexed");
        assert!(std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none());

        // Space is back: a publish that fits works.
        let v3 = vec![3u8; 1000];
        publish(&cache, &v3).unwrap();
        assert_eq!(served(&cache), v3);
        publish(&cache, &v1).unwrap();
    }
    let (cache, report) = Cache::open(dir, u64::MAX, ClassRules::default()).unwrap();
    assert_eq!(report.repairs(), 0, "{report:?}");
    assert_eq!(served(&cache), v1);
}

/// Unmounts on drop, even when the test fails.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Tmpfs {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("run mount(8)");
    assert!(
        out.status.success(),
        "cannot mount a {size} tmpfs on {} (the test runs as root): {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Tmpfs(dir.to_path_buf())
}

#[test]
fn full_disk_real_tmpfs_fails_the_publish_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let mount = mount_tmpfs(d.path(), "2m");
    scenario(&mount.0, 8 << 20);
}
