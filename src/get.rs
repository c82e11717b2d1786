//! `branchtftp get`: download one file over TFTP or HTTP and report size, time and rate.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;

use crate::tftp::client::{ClientOptions, Download};
use crate::tftp::server::Mode;

#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    pub timeout: Option<Duration>,
    pub netascii: bool,
}

/// Splits `tftp://HOST[:PORT]/NAME` into a socket address and the file name.
pub fn parse_tftp_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("tftp://")
        .with_context(|| format!("{url}: not a tftp:// URL"))?;
    let (authority, name) = rest
        .split_once('/')
        .with_context(|| format!("{url}: no file name after the host"))?;
    // The upstream URL parser: one grammar for `tftp://HOST[:PORT]` everywhere.
    let target = crate::config::UpstreamUrl::parse(&format!("tftp://{authority}"))
        .map_err(|e| anyhow::anyhow!(e))?;
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{url}: {authority} has no address"))?;
    if name.is_empty() {
        bail!("{url}: empty file name");
    }
    Ok((addr, name.to_string()))
}

pub async fn run(url: &str, output: Option<&Path>, opts: &GetOptions) -> anyhow::Result<()> {
    let to_stdout = output.is_none_or(|p| p == Path::new("-"));
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        let p = output.unwrap();
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ))
    };
    let started = Instant::now();
    let mut total = 0u64;
    let detail;
    if url.starts_with("tftp://") {
        let (addr, name) = parse_tftp_url(url)?;
        let copts = ClientOptions {
            blksize: opts.blksize,
            windowsize: opts.windowsize,
            timeout: opts.timeout.unwrap_or(Duration::from_secs(1)),
            send_timeout: opts.timeout.is_some(),
            tsize: !opts.netascii,
            mode: if opts.netascii {
                Mode::Netascii
            } else {
                Mode::Octet
            },
            ..ClientOptions::default()
        };
        let mut dl = Download::start(addr, &name, &copts)
            .await
            .with_context(|| url.to_string())?;
        let n = dl.negotiated().clone();
        detail = format!(
            "blksize {}, windowsize {}{}",
            n.params.blksize,
            n.params.windowsize,
            if n.fell_back {
                " (server ignored options)"
            } else {
                ""
            }
        );
        while let Some(chunk) = dl.next_chunk().await.with_context(|| url.to_string())? {
            total += chunk.len() as u64;
            out.write_all(&chunk)?;
        }
    } else if url.starts_with("http://") || url.starts_with("https://") {
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(t) = opts.timeout {
            b = b.read_timeout(t);
        }
        let resp = b
            .build()?
            .get(url)
            .send()
            .await
            .with_context(|| url.to_string())?;
        if !resp.status().is_success() {
            bail!("{url}: HTTP {}", resp.status());
        }
        let expected = resp.content_length();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| url.to_string())?;
            total += chunk.len() as u64;
            out.write_all(&chunk)?;
        }
        if let Some(len) = expected {
            if len != total {
                bail!("{url}: body ended after {total} of {len} bytes");
            }
        }
        detail = "http".to_string();
    } else {
        bail!("{url}: use tftp://HOST[:PORT]/NAME or http://HOST:PORT/NAME");
    }
    out.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{total} bytes in {secs:.3} s ({:.1} KB/s; {detail})",
        total as f64 / 1000.0 / secs.max(1e-9)
    );
    Ok(())
}
