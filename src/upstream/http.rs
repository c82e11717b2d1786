//! HTTP upstreams (CUCM's TFTP service on port 6970, or another branchtftp): reqwest with
//! rustls, connect and read timeouts, streamed bodies, conditional GET.

use futures::StreamExt;
use reqwest::header::{
    CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use reqwest::StatusCode;

use super::{Answer, Body, FetchError, Validators};

fn describe(e: &reqwest::Error) -> String {
    // reqwest's Display hides the cause ("error sending request"); walk the chain.
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

pub(super) async fn fetch(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    known: Option<&Validators>,
) -> Result<Answer, FetchError> {
    let url = format!("{base}/{}", encode_path(name));
    let mut req = client.get(&url);
    if let Some(v) = known {
        if let Some(etag) = &v.etag {
            req = req.header(IF_NONE_MATCH, etag);
        }
        if let Some(lm) = &v.last_modified {
            req = req.header(IF_MODIFIED_SINCE, lm);
        }
    }
    let resp = req
        .send()
        .await
        .map_err(|e| FetchError::Unreachable(describe(&e)))?;
    match resp.status() {
        StatusCode::NOT_FOUND | StatusCode::GONE => return Ok(Answer::NotFound),
        StatusCode::NOT_MODIFIED => return Ok(Answer::NotModified),
        s if s.is_success() => {}
        s => return Err(FetchError::Failed(format!("HTTP {s}"))),
    }
    let header = |h| {
        resp.headers()
            .get(h)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let validators = Validators {
        etag: header(ETAG),
        last_modified: header(LAST_MODIFIED),
    };
    let size = header(CONTENT_LENGTH).and_then(|v| v.parse().ok());
    let mut got = 0u64;
    let stream = resp
        .bytes_stream()
        .map(move |r| match r {
            Ok(b) => {
                got += b.len() as u64;
                Ok(b)
            }
            Err(e) => Err(FetchError::Truncated(format!(
                "body broke off after {got} bytes: {}",
                describe(&e)
            ))),
        })
        .boxed();
    Ok(Answer::Found(Body {
        size,
        validators,
        stream,
    }))
}

/// Percent-encodes what a URL path cannot carry; `/` separates locale directories.
fn encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
