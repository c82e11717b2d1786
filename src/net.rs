//! Socket binding shared by every listener and transfer: IPv6 sockets are v6-only, so
//! `0.0.0.0:69` and `[::]:69` (or `:6970`) coexist, and UDP buffers are sized for windowed
//! transfers (a full window must fit or the kernel drops it, peers.md).

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // Non-blocking from creation: one system call less per TFTP transfer.
    let sock = Socket::new(domain, ty.nonblocking(), Some(proto))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}

/// A UDP socket bound to `addr` with `buffer` bytes of receive and send buffer (best effort:
/// the kernel caps them at net.core.{r,w}mem_max).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::from_std(bind_udp_std(addr, buffer)?)
}

/// [`bind_udp`] for a socket driven outside tokio (the TFTP engine's loops); non-blocking.
/// A `buffer` of 0 keeps the kernel's default buffers (a lock-step transfer needs no more,
/// and a boot storm opens thousands of these sockets: two system calls saved on each).
pub fn bind_udp_std(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
    if buffer > 0 {
        let _ = sock.set_recv_buffer_size(buffer);
        let _ = sock.set_send_buffer_size(buffer);
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The receive buffer the kernel granted `sock`, when it is less than the `asked` bytes (the
/// kernel caps a request at `net.core.rmem_max`); `None` when it got what it asked. Linux
/// reports twice what it grants, the rest being its own bookkeeping.
pub fn recv_buffer_shortfall(sock: &std::net::UdpSocket, asked: usize) -> Option<usize> {
    let granted = socket2::SockRef::from(sock).recv_buffer_size().ok()? / 2;
    (granted < asked).then_some(granted)
}

/// Raises the soft limit on open descriptors to the hard limit (the unit's `LimitNOFILE`):
/// every transfer holds a socket and usually a file, so the default soft limit of 1024 would
/// refuse a storm long before `access.max_transfers`.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from a valid, owned rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether `e` says the process (EMFILE) or the system (ENFILE) is out of file descriptors.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A storm at the limit fails every request the same way: one log line per this much time.
const EXHAUSTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// When the last "out of descriptors" line was logged, and refusals since then.
static EXHAUSTION: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

/// Counts a request refused because a descriptor could not be had (`what` needed one) and
/// logs the first of each burst with how many were refused since the previous line; the
/// client only ever hears a fixed text.
pub fn descriptors_exhausted(what: &str, e: &io::Error) {
    crate::metrics::global().refused("descriptors");
    let mut last = EXHAUSTION.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    match &mut *last {
        Some((at, quiet)) if now.duration_since(*at) < EXHAUSTION_LOG_EVERY => *quiet += 1,
        _ => {
            let quiet = last.map_or(0, |(_, q)| q);
            *last = Some((now, 0));
            drop(last);
            tracing::warn!(
                "out of file descriptors ({what}: {e}); requests refused until some free \
                 ({quiet} more since the last report); raise LimitNOFILE or lower \
                 access.max_transfers"
            );
        }
    }
}

/// A TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let sock = socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    // A boot storm opens thousands of connections within a second: a short backlog drops
    // SYNs, and each dropped one costs its phone a 1 s retransmit (issue 12). The kernel caps
    // this at net.core.somaxconn.
    sock.listen(4096)?;
    tokio::net::TcpListener::from_std(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_buffer_asked_beyond_rmem_max_is_reported_short_and_one_within_it_is_not() {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let asked = max + (1 << 20);
        let sock = bind_udp_std(local, asked).unwrap();
        assert_eq!(recv_buffer_shortfall(&sock, asked), Some(max));
        let asked = (64 << 10).min(max);
        let sock = bind_udp_std(local, asked).unwrap();
        assert_eq!(recv_buffer_shortfall(&sock, asked), None);
    }
}
