//! Socket binding shared by every listener and transfer: IPv6 sockets are v6-only, so
//! `0.0.0.0:69` and `[::]:69` (or `:6970`) coexist, and UDP buffers are sized for windowed
//! transfers (a full window must fit or the kernel drops it, peers.md).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, ty, Some(proto))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A UDP socket bound to `addr` with `buffer` bytes of receive and send buffer (best effort:
/// the kernel caps them at net.core.{r,w}mem_max).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::from_std(bind_udp_std(addr, buffer)?)
}

/// [`bind_udp`] for a socket driven outside tokio (the TFTP engine's loops); non-blocking.
pub fn bind_udp_std(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&addr.into())?;
    Ok(sock.into())
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
