//! Each content file carries where it came from in an extended attribute
//! (`user.branchtftp.origin`: name as spelled, sha256, source, validators, fetch time), so an
//! index rebuilt from the files keeps the client spelling and can still revalidate with
//! If-None-Match instead of downloading again. Best effort: on a filesystem without user xattrs
//! the rebuild falls back to key, `recovered` and no validators.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::debug;

use super::Validators;

const ATTR: &[u8] = b"user.branchtftp.origin\0";
const MAX_LEN: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Origin {
    pub name: String,
    pub sha256: String,
    pub source: String,
    pub validators: Validators,
    pub fetched_at: u64,
}

pub(super) fn write(file: &File, origin: &Origin) {
    let json = serde_json::to_vec(origin).expect("origin serializes");
    if json.len() > MAX_LEN {
        return;
    }
    // SAFETY: valid fd, NUL-terminated name, buffer pointer and length from one Vec.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            ATTR.as_ptr().cast(),
            json.as_ptr().cast(),
            json.len(),
            0,
        )
    };
    if rc != 0 {
        debug!(
            "cache: could not label the file with its origin: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub(super) fn read(path: &Path) -> Option<Origin> {
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = vec![0u8; MAX_LEN];
    // SAFETY: NUL-terminated strings; buf is MAX_LEN bytes long.
    let n = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            ATTR.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    serde_json::from_slice(&buf[..n as usize]).ok()
}
