//! What a request is answered with, whoever found it and whichever protocol carries it: one
//! type from the miss path ([`crate::upstream::flight::Fetcher::open`]) through the resolver
//! ([`crate::front::Resolver`]) to the TFTP engine and the HTTP handler, so no layer copies it
//! into a look-alike of its own.

use std::pin::Pin;

use tokio::io::AsyncRead;

use crate::cache::CachedFile;

/// Content found for a name.
pub struct Found {
    /// Known for files on disk and for misses whose upstream announced it (TFTP offers tsize
    /// and HTTP sends Content-Length only when it is known).
    pub size: Option<u64>,
    pub body: Body,
    /// Where the bytes come from, for the transfer's log line and metrics.
    pub origin: Origin,
}

/// Where a found file's bytes come from.
pub enum Body {
    /// A cache hit: a complete file, kept in use (never evicted) while it is read.
    Cached(Box<CachedFile>),
    /// An override (or `serve --root`): a local file.
    Local(std::fs::File),
    /// A small override, whole, from the copy shared by every request for it.
    Memory(bytes::Bytes),
    /// A miss streaming through from an upstream. Fails with an error if the upstream transfer
    /// fails; ends only when the file is complete.
    Stream(Pin<Box<dyn AsyncRead + Send>>),
}

/// Where a transfer's bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The overrides directory (or `serve --root`).
    Local,
    /// The cache; `source` is the upstream it was fetched from.
    Hit { source: String },
    /// Streamed through from an upstream on a miss.
    Miss { source: String },
}

impl Origin {
    /// `hit` or `miss`, as in the metrics' `result` label.
    pub fn result(&self) -> &'static str {
        match self {
            Origin::Local | Origin::Hit { .. } => "hit",
            Origin::Miss { .. } => "miss",
        }
    }

    pub fn source(&self) -> &str {
        match self {
            Origin::Local => "local",
            Origin::Hit { source } | Origin::Miss { source } => source,
        }
    }
}

impl Found {
    /// A cache hit.
    pub fn cached(file: CachedFile) -> Found {
        Found {
            size: Some(file.entry.size),
            origin: Origin::Hit {
                source: file.entry.source.clone(),
            },
            body: Body::Cached(Box::new(file)),
        }
    }
}
