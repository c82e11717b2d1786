//! TFTP upstreams: our own client asking blksize 1428 and windowsize 16 (bandwidth-bound over a
//! WAN instead of latency-bound), falling back to lock-step when the server ignores options.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;

use super::{Answer, Body, FetchError, Validators};
use crate::tftp::client::{ClientError, ClientOptions, Download};

pub(super) async fn fetch(
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Answer, FetchError> {
    // The configured timeout bounds how long a silent server costs us: a retransmit timer of at
    // most 1 s, retried until the budget is spent.
    let rtx = timeout.min(Duration::from_secs(1)).max(Duration::from_millis(100));
    let retries = ((timeout.as_millis() / rtx.as_millis()) as u32).saturating_sub(1).max(1);
    let opts = ClientOptions {
        blksize: Some(1428),
        windowsize: Some(16),
        timeout: rtx,
        send_timeout: false,
        tsize: true,
        retries,
        ..ClientOptions::default()
    };
    let dl = match Download::start(addr, name, &opts).await {
        Ok(dl) => dl,
        Err(ClientError::NotFound(_)) => return Ok(Answer::NotFound),
        Err(e @ ClientError::Timeout(_)) | Err(e @ ClientError::Io(_)) => {
            return Err(FetchError::Unreachable(e.to_string()))
        }
        Err(e) => return Err(FetchError::Failed(e.to_string())),
    };
    let size = dl.size();
    let stream = dl
        .into_stream()
        .map(|r| r.map_err(|e| FetchError::Truncated(e.to_string())))
        .boxed();
    Ok(Answer::Found(Body {
        size,
        validators: Validators::default(),
        stream,
    }))
}
