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
    let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(sock.into())
}

/// A TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let sock = socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    tokio::net::TcpListener::from_std(sock.into())
}
