//! Batched datagram I/O for the engine's shared transfer ports (Linux `recvmmsg` and
//! `sendmmsg`). In a boot storm one turn of an event loop finds ACKs from many phones waiting
//! on the same socket and answers them with as many DATA blocks; one system call per datagram
//! (plus the read that finds the socket empty) was most of a boot's server CPU (issue 12).
//! Here a turn reads everything waiting in [`BATCH`]-sized calls and sends what it produced
//! in as few. The unsafe code of the engine is these two calls and the conversion of the
//! kernel's address structures; nothing else in the crate builds a `msghdr`.

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use bytes::Bytes;
use socket2::SockAddr;

use super::transfer::Datagram;

/// Datagrams read or sent per system call at most.
pub const BATCH: usize = 64;

/// Bytes kept of a datagram read. Clients send ACKs (4 bytes) and ERRORs (a short text); a
/// longer datagram is cut here and then refused as malformed, as the per-transfer read was.
const SLOT: usize = 2048;

/// Where a batch of received datagrams lands: allocated once per loop (on the loop's thread;
/// the headers point into it), reused every read.
pub struct Inbox {
    bufs: Box<[[u8; SLOT]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    /// Point into `bufs` and `addrs` (boxed, so they never move).
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Length and sender of each datagram of the last read.
    got: Vec<(usize, Option<SocketAddr>)>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into the inbox's own boxed buffers
// (heap memory that does not move with the inbox and is freed with it), so moving an inbox to
// another thread moves everything they point to with it; nothing is shared.
unsafe impl Send for Inbox {}

impl Default for Inbox {
    fn default() -> Self {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain old data; all zeroes is a
        // valid empty value of each.
        let (addr, iov, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        let mut inbox = Inbox {
            bufs: vec![[0u8; SLOT]; BATCH].into_boxed_slice(),
            addrs: vec![addr; BATCH].into_boxed_slice(),
            iovs: vec![iov; BATCH].into_boxed_slice(),
            hdrs: vec![hdr; BATCH].into_boxed_slice(),
            got: Vec::with_capacity(BATCH),
        };
        for j in 0..BATCH {
            inbox.iovs[j].iov_base = inbox.bufs[j].as_mut_ptr().cast();
            inbox.iovs[j].iov_len = SLOT;
            let h = &mut inbox.hdrs[j].msg_hdr;
            h.msg_name = (&mut inbox.addrs[j] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut inbox.iovs[j];
            h.msg_iovlen = 1;
        }
        inbox
    }
}

impl Inbox {
    /// Reads up to [`BATCH`] datagrams waiting on `fd` (non-blocking) in one call: their count;
    /// fewer than [`BATCH`] means the socket was empty when the call returned. An error (e.g.
    /// `WouldBlock`) when nothing was read.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in self.hdrs.iter_mut() {
            // The kernel wrote the last sender's length here.
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every header points at a buffer, an address and an iovec owned by `self`,
        // alive and not otherwise borrowed for the duration of the call; the kernel writes at
        // most `iov_len` and `msg_namelen` bytes into them.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got.clear();
        for (hdr, addr) in self.hdrs.iter().zip(self.addrs.iter()).take(n as usize) {
            let len = (hdr.msg_len as usize).min(SLOT);
            self.got
                .push((len, socket_addr(addr, hdr.msg_hdr.msg_namelen)));
        }
        Ok(n as usize)
    }

    /// Datagram `j` of the last read and its sender (`None`: an address family we do not
    /// serve, which cannot be a client).
    pub fn get(&self, j: usize) -> (&[u8], Option<SocketAddr>) {
        let (len, from) = self.got[j];
        (&self.bufs[j][..len], from)
    }
}

/// The sender's address the kernel wrote into `addr`.
fn socket_addr(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match addr.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked) into
            // storage that is large and aligned enough for any address.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// Datagrams one loop turn produced for one shared port, sent together at the turn's end.
#[derive(Default)]
pub struct Outbox {
    queue: Vec<(Datagram, SockAddr)>,
}

impl Outbox {
    pub fn push(&mut self, datagram: Bytes, to: SocketAddr) {
        self.push_datagram(Datagram::whole(datagram), to);
    }

    /// Queues a datagram in parts (a DATA block's header and its payload, not copied).
    pub fn push_datagram(&mut self, datagram: Datagram, to: SocketAddr) {
        self.queue.push((datagram, SockAddr::from(to)));
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Sends everything queued from `fd` in calls of up to [`BATCH`], and empties the queue.
    /// A datagram the kernel refuses is dropped, as a lost one would be (the retransmission
    /// timer recovers it); a full send buffer drops the rest of the turn the same way. Returns
    /// the datagrams dropped and the first error seen.
    pub fn flush(&mut self, fd: RawFd) -> (usize, Option<io::Error>) {
        let mut sent = 0;
        let (mut dropped, mut first_error) = (0, None);
        while sent < self.queue.len() {
            match send_batch(fd, &self.queue[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let rest = e.kind() == io::ErrorKind::WouldBlock;
                    let skip = if rest { self.queue.len() - sent } else { 1 };
                    dropped += skip;
                    sent += skip;
                    first_error.get_or_insert(e);
                }
            }
        }
        self.queue.clear();
        (dropped, first_error)
    }
}

/// The iovecs of `datagram`: its header (when it has one), then its body.
fn iovecs(datagram: &Datagram, iov: &mut [MaybeUninit<libc::iovec>; 2]) -> usize {
    let mut n = 0;
    let head = datagram.head();
    if !head.is_empty() {
        iov[0].write(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        n = 1;
    }
    let body = datagram.body();
    iov[n].write(libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    });
    n + 1
}

/// A message header sending `iov[..n]` to `to`.
fn message(to: &SockAddr, iov: &mut [MaybeUninit<libc::iovec>; 2], n: usize) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all zeroes is valid, the fields are set below.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_name = to.as_ptr() as *mut libc::c_void;
    hdr.msg_namelen = to.len();
    hdr.msg_iov = iov.as_mut_ptr().cast();
    hdr.msg_iovlen = n as _;
    hdr
}

/// Sends one datagram with `sendmsg` (a lone lock-step transfer's next block, or a transfer on
/// a port of its own).
pub fn send_one(fd: RawFd, datagram: &Datagram, to: &SockAddr) -> io::Result<()> {
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; 2];
    let n = iovecs(datagram, &mut iov);
    let hdr = message(to, &mut iov, n);
    // SAFETY: the header points at live iovecs, which point into `datagram`, and at `to`.
    if unsafe { libc::sendmsg(fd, &hdr, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `sendmmsg` of the first [`BATCH`] datagrams of `queue` (`sendmsg` for a single one):
/// how many the kernel took.
fn send_batch(fd: RawFd, queue: &[(Datagram, SockAddr)]) -> io::Result<usize> {
    if let [(datagram, to)] = queue {
        return send_one(fd, datagram, to).map(|()| 1);
    }
    let n = queue.len().min(BATCH);
    let mut iovs = [const { [const { MaybeUninit::<libc::iovec>::uninit() }; 2] }; BATCH];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH];
    for (j, (datagram, to)) in queue[..n].iter().enumerate() {
        let parts = iovecs(datagram, &mut iovs[j]);
        hdrs[j].write(libc::mmsghdr {
            msg_hdr: message(to, &mut iovs[j], parts),
            msg_len: 0,
        });
    }
    // SAFETY: the first `n` headers are initialised above and point at iovecs and addresses
    // that live until the call returns.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr().cast(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn socket(addr: &str) -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    #[test]
    fn a_batch_sent_to_several_peers_arrives_whole_and_is_read_in_one_call() {
        let server = socket("127.0.0.1:0");
        let peers: Vec<_> = (0..3).map(|_| socket("127.0.0.1:0")).collect();
        let mut out = Outbox::default();
        for (k, p) in peers.iter().enumerate() {
            out.push(Bytes::from(vec![k as u8; 10 + k]), p.local_addr().unwrap());
        }
        assert_eq!(out.flush(server.as_raw_fd()).0, 0);
        assert_eq!(out.len(), 0);
        for (k, p) in peers.iter().enumerate() {
            let mut buf = [0u8; 64];
            let (n, from) = p.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&vec![k as u8; 10 + k][..], server.local_addr().unwrap())
            );
            p.send_to(&[0, 4, 0, k as u8], server.local_addr().unwrap())
                .unwrap();
        }
        let mut inbox = Inbox::default();
        assert_eq!(inbox.recv(server.as_raw_fd()).unwrap(), 3);
        for (k, p) in peers.iter().enumerate() {
            assert_eq!(
                inbox.get(k),
                (&[0, 4, 0, k as u8][..], Some(p.local_addr().unwrap()))
            );
        }
        let empty = inbox.recv(server.as_raw_fd()).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn data_blocks_leave_as_header_and_payload_in_one_datagram_alone_or_batched() {
        let server = socket("127.0.0.1:0");
        let peer = socket("127.0.0.1:0");
        let to = peer.local_addr().unwrap();
        let payload = Bytes::from_static(b"block bytes");
        for count in [0, 3] {
            let mut out = Outbox::default();
            for k in 0..count {
                out.push_datagram(Datagram::data(300 + k, payload.slice(k as usize..)), to);
            }
            out.push_datagram(Datagram::data(9, Bytes::new()), to);
            assert_eq!(out.flush(server.as_raw_fd()).0, 0);
            let mut buf = [0u8; 64];
            for k in 0..count {
                let (n, _) = peer.recv_from(&mut buf).unwrap();
                let [hi, lo] = (300 + k).to_be_bytes();
                let mut want = vec![0, 3, hi, lo];
                want.extend_from_slice(&payload[k as usize..]);
                assert_eq!(&buf[..n], &want[..], "{count} queued, block {k}");
            }
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &[0, 3, 0, 9],
                "an empty final block is its header"
            );
        }
    }

    #[test]
    fn ipv6_senders_are_read_with_their_address() {
        let Ok(server) = std::net::UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        server.set_nonblocking(true).unwrap();
        let peer = socket("[::1]:0");
        peer.send_to(b"\0\x04\0\x01", server.local_addr().unwrap())
            .unwrap();
        let mut inbox = Inbox::default();
        assert_eq!(inbox.recv(server.as_raw_fd()).unwrap(), 1);
        assert_eq!(inbox.get(0).1, Some(peer.local_addr().unwrap()));
    }

    #[test]
    fn a_datagram_to_an_unreachable_address_is_dropped_and_the_rest_still_go() {
        let server = socket("127.0.0.1:0");
        let peer = socket("127.0.0.1:0");
        let mut out = Outbox::default();
        // An IPv6 destination on an IPv4 socket: the kernel refuses that one datagram.
        out.push(Bytes::from_static(b"lost"), "[::1]:9".parse().unwrap());
        out.push(Bytes::from_static(b"kept"), peer.local_addr().unwrap());
        let (dropped, e) = out.flush(server.as_raw_fd());
        assert_eq!(dropped, 1, "{e:?}");
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
    }
}
