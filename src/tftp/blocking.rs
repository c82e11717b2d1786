//! Drives one read transfer on a thread of its own, the way tftpd-hpa runs a process per
//! transfer: the thread sleeps in poll(2) on the transfer's socket (and, while it waits for
//! content, on an eventfd the read-ahead task signals), so an ACK reaches the state machine with
//! one wake-up and no scheduler in between. Lock-step TFTP is bound by exactly that latency.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::packet::{ErrorCode, Packet};
use super::transfer::{Sender, Status};

/// A counter the read-ahead task bumps after each chunk, so a transfer thread waiting for
/// content wakes up (Linux eventfd).
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd; a full counter just fails.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }

    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; nonblocking, so it never waits.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            );
        }
    }
}

/// Where the thread gets blocks: without waiting, or `Ok(None)` when it must wait for `Wake`.
pub trait BlockSource {
    fn try_next(&mut self) -> io::Result<Option<Bytes>>;
}

fn error_bytes(code: ErrorCode, msg: &str) -> Bytes {
    Packet::error(code, msg).encode()
}

/// Waits until the socket is readable, `wake` fired, or `deadline` passed. Returns whether
/// the socket is readable.
fn wait(sock: &UdpSocket, wake: Option<&Wake>, deadline: Option<Instant>) -> io::Result<bool> {
    let timeout_ms: libc::c_int = match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            // Round up: waking a hair early would only loop once more.
            (left.as_micros().div_ceil(1000)).min(i32::MAX as u128) as libc::c_int
        }
    };
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.map(|w| w.fd.as_raw_fd()).unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = if wake.is_some() { 2 } else { 1 };
    // SAFETY: `fds` is a valid array of `n` pollfd structs for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if let Some(w) = wake {
        if fds[1].revents != 0 {
            w.clear();
        }
    }
    Ok(r > 0 && fds[0].revents != 0)
}

/// Runs the transfer to its end (the socket is switched to blocking mode). Returns the bytes the client
/// acknowledged, when the first DATA went out, and the outcome.
pub fn run(
    sock: UdpSocket,
    peer: SocketAddr,
    mut sender: Sender,
    blocks: &mut dyn BlockSource,
    wake: &Wake,
) -> (u64, Option<Instant>, Result<(), String>) {
    // Clients send ACKs and ERRORs: a few hundred bytes at most. Anything longer is garbage and
    // is answered as such after truncation.
    let mut buf = vec![0u8; 4096];
    let mut first_data: Option<Instant> = None;
    let mut rcv_timeout: Option<Duration> = None;
    if let Err(e) = sock.set_nonblocking(false) {
        return (
            0,
            None,
            Err(format!("cannot make the transfer socket blocking: {e}")),
        );
    }
    let send = |d: &[u8], to: SocketAddr| {
        // A full send buffer drops the datagram; the retransmission timer recovers it.
        if let Err(e) = sock.send_to(d, to) {
            tracing::debug!(client = %peer, "send failed: {e}");
        }
    };
    let result = 'transfer: loop {
        while sender.wants_data() {
            match blocks.try_next() {
                Ok(Some(block)) => sender.push_data(block, Instant::now()),
                Ok(None) => break,
                Err(e) => {
                    // A failed source (a truncated upstream) is an ERROR for the client, never a
                    // short final DATA that would make a truncated file look complete.
                    tracing::warn!(client = %peer, "transfer aborted: {e}");
                    send(&error_bytes(ErrorCode::NotDefined, &e.to_string()), peer);
                    break 'transfer Err(format!("source failed: {e}"));
                }
            }
        }
        while let Some(d) = sender.poll_transmit() {
            if first_data.is_none() && d.starts_with(&[0, 3]) {
                first_data = Some(Instant::now());
            }
            send(&d, peer);
        }
        match sender.status() {
            Status::Active => {}
            Status::Done => break Ok(()),
            Status::PeerError {
                quiet: true,
                code,
                message,
            } => {
                tracing::debug!(client = %peer, "client ended after OACK with ERROR {}: {message}", code.as_u16());
                break Ok(());
            }
            Status::PeerError { code, message, .. } => {
                break Err(format!("client sent ERROR {}: {message}", code.as_u16()))
            }
            Status::TimedOut => break Err("client stopped answering".to_string()),
            Status::Protocol(m) => break Err(m.clone()),
        }
        let deadline = sender.poll_timeout();
        let readable = if sender.wants_data() {
            // Waiting for content too: sleep on both the socket and the read-ahead's eventfd.
            match wait(&sock, Some(wake), deadline) {
                Ok(r) => r,
                Err(e) => break Err(format!("poll failed: {e}")),
            }
        } else {
            // Only the client can move us on: block in recv, bounded by the deadline through
            // SO_RCVTIMEO (re-set only when the remaining time differs from what is set, so
            // lock-step costs one recv and one send per block).
            let left = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(1));
            let left = Duration::from_millis(left.as_micros().div_ceil(1000) as u64);
            if rcv_timeout.is_none_or(|t: Duration| t.abs_diff(left) > Duration::from_millis(1)) {
                if let Err(e) = sock.set_read_timeout(Some(left)) {
                    break Err(format!("cannot set the receive timeout: {e}"));
                }
                rcv_timeout = Some(left);
            }
            true
        };
        if readable {
            match sock.recv_from(&mut buf) {
                Ok((_, from)) if from != peer => {
                    // RFC 1350 §4: a packet from another TID gets ERROR 5; the transfer goes on.
                    send(
                        &error_bytes(ErrorCode::UnknownTid, "unknown transfer ID"),
                        from,
                    );
                }
                Ok((n, _)) => match Packet::decode(&buf[..n]) {
                    Ok(p) => sender.handle(&p, Instant::now()),
                    Err(e) => {
                        send(
                            &error_bytes(ErrorCode::IllegalOperation, &e.to_string()),
                            peer,
                        );
                        break 'transfer Err(format!("malformed packet from client: {e}"));
                    }
                },
                // The receive timeout expired, or a signal: the deadline check below decides.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                // ICMP port unreachable and the like: the client is gone or will retry.
                Err(e) => tracing::debug!(client = %peer, "recv: {e}"),
            }
        }
        if let Some(d) = deadline {
            // Timers wake up to a millisecond early (rounding); do not sleep a whole extra
            // timeout for that.
            let now = Instant::now();
            if now + Duration::from_millis(2) >= d {
                sender.handle_timeout(now.max(d));
            }
        }
    };
    (sender.bytes_acked(), first_data, result)
}
