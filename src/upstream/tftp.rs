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
    let (rtx, retries) = retransmit_plan(timeout);
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
        validators: Validators {
            upstream_size: size,
            ..Validators::default()
        },
        stream,
    }))
}

/// The retransmit timer and retries for an upstream `timeout`: the timeout bounds how long a
/// silent server costs us (attempts × timer = timeout), with a timer of at most 1 s and at least
/// two attempts so one lost datagram does not mark the upstream down.
fn retransmit_plan(timeout: Duration) -> (Duration, u32) {
    let timeout = timeout.max(Duration::from_millis(200));
    let attempts = timeout.as_millis().div_ceil(1000).max(2) as u32;
    (timeout / attempts, attempts - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmits_fill_the_timeout_exactly() {
        let ms = Duration::from_millis;
        for (timeout, rtx, retries) in [
            (ms(10_000), ms(1000), 9),
            (ms(2000), ms(1000), 1),
            (ms(1500), ms(750), 1),
            (ms(500), ms(250), 1),
            (ms(2500), ms(833), 2),
        ] {
            let (r, n) = retransmit_plan(timeout);
            assert_eq!(n, retries, "{timeout:?}");
            assert!(r.abs_diff(rtx) < ms(1), "{timeout:?}: {r:?}");
            assert!(r * (n + 1) <= timeout, "{timeout:?}");
        }
    }
}
