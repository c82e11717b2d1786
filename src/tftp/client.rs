//! The TFTP client: sends a read request with the options asked for, falls back to RFC 1350
//! lock-step when the server ignores them, and yields the file's bytes as they arrive so a
//! caller (the upstream fetcher) can stream them on to phones while they download.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use thiserror::Error;
use tokio::net::UdpSocket;

use super::netascii;
use super::packet::Mode;
use super::packet::{ErrorCode, Options, Packet, DEFAULT_BLKSIZE};
use super::transfer::{Negotiated, Params, Receiver, Status};
use crate::net::bind_udp;

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` with the TFTP port (69) filled in when absent,
/// ready for `ToSocketAddrs`.
pub fn with_default_port(authority: &str) -> String {
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:69")
    }
}

/// What to ask the server for.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    /// Asked as the RFC 2349 timeout option when `send_timeout`; always our retransmit timer.
    pub timeout: Duration,
    pub send_timeout: bool,
    pub tsize: bool,
    pub retries: u32,
    pub mode: Mode,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            blksize: None,
            windowsize: None,
            timeout: Duration::from_secs(1),
            send_timeout: false,
            tsize: true,
            retries: 5,
            mode: Mode::Octet,
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    /// ERROR 1: the server does not have the file.
    #[error("file not found: {0}")]
    NotFound(String),
    #[error("server answered ERROR {code}: {message}")]
    Server { code: u16, message: String },
    #[error("no answer from {0} (timed out)")]
    Timeout(SocketAddr),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A download in progress. Created by [`Download::start`], which returns once the server has
/// answered (so "not found" and the announced size are known before any byte is consumed).
pub struct Download {
    sock: UdpSocket,
    server: SocketAddr,
    peer: Option<SocketAddr>,
    receiver: Receiver,
    mode: Mode,
    decoder: netascii::Decoder,
    buf: Vec<u8>,
    started: Instant,
}

impl Download {
    pub async fn start(
        server: SocketAddr,
        name: &str,
        opts: &ClientOptions,
    ) -> Result<Download, ClientError> {
        let mut options = Options {
            blksize: opts.blksize,
            windowsize: opts.windowsize.filter(|&w| w > 1),
            tsize: opts.tsize.then_some(0),
            timeout: opts
                .send_timeout
                .then(|| opts.timeout.as_secs().clamp(1, 255) as u8),
            unknown: Vec::new(),
        };
        if opts.mode == Mode::Netascii {
            options.tsize = None;
        }
        let request = Packet::Rrq {
            filename: name.to_string(),
            mode: match opts.mode {
                Mode::Octet => "octet".into(),
                Mode::Netascii => "netascii".into(),
            },
            options,
        };
        let params = Params {
            blksize: opts.blksize.unwrap_or(DEFAULT_BLKSIZE),
            windowsize: opts.windowsize.unwrap_or(1).max(1),
            timeout: opts.timeout,
            retries: opts.retries,
        };
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let buffer = (params.blksize as usize + 4) * params.windowsize as usize * 4;
        let sock = bind_udp(local, buffer.max(1 << 20))?;
        let now = Instant::now();
        let mut dl = Download {
            sock,
            server,
            peer: None,
            receiver: Receiver::new(&request, params, now),
            mode: opts.mode,
            decoder: netascii::Decoder::new(),
            buf: vec![0u8; 65536],
            started: now,
        };
        while dl.receiver.negotiated().is_none() {
            dl.step().await?;
        }
        Ok(dl)
    }

    /// Options in force, and whether the server ignored ours.
    pub fn negotiated(&self) -> &Negotiated {
        self.receiver
            .negotiated()
            .expect("start() returns after negotiation")
    }

    /// The size the server announced (RFC 2349 tsize), if any.
    pub fn size(&self) -> Option<u64> {
        self.negotiated().tsize
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.receiver.bytes()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The next chunk of the file, `None` at its complete end. An error means the file is
    /// incomplete: the caller must not treat what it received as the whole file.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            if let Some(d) = self.receiver.poll_data() {
                return Ok(Some(self.translate(d)));
            }
            if self.receiver.is_finished() {
                // Send the final ACK before reporting the end.
                self.flush().await?;
                return match self.receiver.status() {
                    Status::Done => {
                        if self.mode == Mode::Netascii {
                            let mut out = Vec::new();
                            self.decoder.finish(&mut out);
                            if !out.is_empty() {
                                return Ok(Some(Bytes::from(out)));
                            }
                        }
                        Ok(None)
                    }
                    _ => Err(self.error()),
                };
            }
            self.step().await?;
        }
    }

    /// Collects the whole file.
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(self.size().unwrap_or(0).min(1 << 30) as usize);
        while let Some(c) = self.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// The bytes as a stream, for the upstream fetcher.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ClientError>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut dl = state?;
            match dl.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), Some(dl))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    fn translate(&mut self, d: Bytes) -> Bytes {
        match self.mode {
            Mode::Octet => d,
            Mode::Netascii => {
                let mut out = Vec::with_capacity(d.len());
                self.decoder.decode(&d, &mut out);
                Bytes::from(out)
            }
        }
    }

    fn error(&self) -> ClientError {
        match self.receiver.status() {
            Status::PeerError { code, message, .. } => {
                if *code == ErrorCode::FileNotFound {
                    ClientError::NotFound(message.clone())
                } else {
                    ClientError::Server {
                        code: code.as_u16(),
                        message: message.clone(),
                    }
                }
            }
            Status::TimedOut => ClientError::Timeout(self.server),
            Status::Protocol(m) => ClientError::Protocol(m.clone()),
            Status::Active | Status::Done => ClientError::Protocol("transfer not finished".into()),
        }
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        while let Some(p) = self.receiver.poll_transmit() {
            // Until the server answers, requests go to its well-known port.
            let to = self.peer.unwrap_or(self.server);
            self.sock.send_to(&p, to).await?;
        }
        Ok(())
    }

    /// One round: send what is due, then wait for a datagram or the timer.
    async fn step(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        if self.receiver.is_finished() {
            return if self.receiver.negotiated().is_none() {
                Err(self.error())
            } else {
                Ok(())
            };
        }
        let deadline = self.receiver.poll_timeout();
        tokio::select! {
            biased;
            r = self.sock.recv_from(&mut self.buf) => {
                let (n, from) = r?;
                // The server's first answer fixes its TID (from any port of its address).
                if self.peer.is_none() && from.ip() == self.server.ip() {
                    self.peer = Some(from);
                }
                let peer = self.peer.unwrap_or(self.server);
                if let Some(e) = super::transfer::foreign_tid(peer, from) {
                    let _ = self.sock.send_to(&e, from).await;
                    return Ok(());
                }
                match Packet::decode(&self.buf[..n]) {
                    Ok(p) => self.receiver.handle(&p, Instant::now()),
                    Err(e) => return Err(ClientError::Protocol(format!("malformed packet: {e}"))),
                }
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => futures::future::pending().await,
                }
            } => {
                self.receiver.handle_timeout(Instant::now());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::with_default_port;

    #[test]
    fn tftp_port_is_filled_in_only_when_absent() {
        assert_eq!(with_default_port("10.20.0.5"), "10.20.0.5:69");
        assert_eq!(with_default_port("cucm:6969"), "cucm:6969");
        assert_eq!(with_default_port("[::1]"), "[::1]:69");
        assert_eq!(with_default_port("[::1]:6969"), "[::1]:6969");
    }
}
