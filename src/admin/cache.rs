//! The cache of a running appliance over the admin endpoint: `GET /cache` (listing),
//! `POST /cache/verify` (re-hash, quarantine corrupt files) and `DELETE /cache/NAME` (evict), what
//! `branchtftp cache ls|verify|evict` use while `serve` holds the cache directory.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::AdminState;
use crate::cache::{Cache, Entry};
use crate::name::FileName;

/// The `GET /cache` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheListing {
    pub files: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Sorted by key.
    pub entries: Vec<Entry>,
}

impl CacheListing {
    pub fn of(cache: &Cache) -> CacheListing {
        // Entries first: totals taken after can only be newer, never miss a listed file.
        let entries = cache.list();
        let (files, bytes) = cache.totals();
        CacheListing {
            files,
            bytes,
            max_bytes: cache.max_bytes(),
            entries,
        }
    }
}

fn no_cache() -> Response {
    (
        StatusCode::CONFLICT,
        "no cache in this mode (serve --root without a cache)\n",
    )
        .into_response()
}

pub async fn list(State(st): State<AdminState>) -> Response {
    match &st.fetcher {
        Some(f) => axum::Json(CacheListing::of(f.cache())).into_response(),
        None => no_cache(),
    }
}

/// One verify at a time: each re-reads the whole cache, so a second one waits its turn by
/// being refused.
pub struct VerifyTurn<'a>(&'a AtomicBool);

impl<'a> VerifyTurn<'a> {
    pub fn take(flag: &'a AtomicBool) -> Option<VerifyTurn<'a>> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| VerifyTurn(flag))
    }
}

impl Drop for VerifyTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub async fn verify(State(st): State<AdminState>) -> Response {
    let Some(f) = &st.fetcher else {
        return no_cache();
    };
    let Some(_turn) = VerifyTurn::take(&st.verifying) else {
        return (StatusCode::CONFLICT, "a verify is already running\n").into_response();
    };
    let cache = f.cache().clone();
    match tokio::task::spawn_blocking(move || cache.verify(|_| {})).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

pub async fn evict(State(st): State<AdminState>, Path(name): Path<String>) -> Response {
    let Some(f) = &st.fetcher else {
        return no_cache();
    };
    let Ok(name) = FileName::parse(&name) else {
        return (StatusCode::BAD_REQUEST, "bad file name\n").into_response();
    };
    match f.cache().evict(name.key()) {
        Ok(true) => {
            info!(name = %name, "admin: evicted");
            (StatusCode::OK, format!("evicted {name}\n")).into_response()
        }
        Ok(false) => (StatusCode::NOT_FOUND, format!("{name}: not in the cache\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_verify_is_refused_while_one_runs() {
        let flag = AtomicBool::new(false);
        let first = VerifyTurn::take(&flag).expect("first");
        assert!(VerifyTurn::take(&flag).is_none());
        drop(first);
        assert!(VerifyTurn::take(&flag).is_some());
    }
}
