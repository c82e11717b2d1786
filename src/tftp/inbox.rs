//! Reading a transfer socket's datagrams, up to [`BATCH`] per `recvmmsg` call.
//!
//! Readiness is edge-triggered, so a socket must be read until it is empty. A `recv` loop
//! learns that from a last call failing with EAGAIN: on every ACK of a lock-step transfer, one
//! system call in four or five per block, on the path of every block in a boot storm. A
//! `recvmmsg` that returns fewer datagrams than it had room for says the socket is empty
//! without that call.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams read per call: a lock-step client has one ACK in flight, a windowed one a few.
pub const BATCH: usize = 4;
/// Room per datagram: clients send ACKs and ERRORs, a few hundred bytes at most; a longer one
/// is cut and then fails to decode like any garbage.
const ROOM: usize = 2048;

/// Buffers for one batch, reused for every read of a loop.
pub struct Inbox {
    bufs: Box<[[u8; ROOM]; BATCH]>,
    addrs: [libc::sockaddr_storage; BATCH],
    lens: [usize; BATCH],
    names: [libc::socklen_t; BATCH],
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox {
            bufs: Box::new([[0; ROOM]; BATCH]),
            // SAFETY: all zeros is a valid sockaddr_storage.
            addrs: unsafe { mem::zeroed() },
            lens: [0; BATCH],
            names: [0; BATCH],
        }
    }

    /// Reads what `fd` holds, up to [`BATCH`] datagrams: their count, fewer than [`BATCH`] when
    /// the socket is now empty; `WouldBlock` when it was empty already.
    pub fn fill(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: all zeros is a valid iovec and mmsghdr; every pointer set below points into
        // `self`, which outlives the call, with the lengths of the buffers it points to.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (k, (iov, msg)) in iovs.iter_mut().zip(msgs.iter_mut()).enumerate() {
            iov.iov_base = self.bufs[k].as_mut_ptr().cast();
            iov.iov_len = ROOM;
            msg.msg_hdr.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds BATCH initialised headers (see above).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (k, msg) in msgs.iter().enumerate().take(n) {
            self.lens[k] = (msg.msg_len as usize).min(ROOM);
            self.names[k] = msg.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Datagram `k` of the last [`fill`](Self::fill) and its source (`None` for an address
    /// family a UDP/IP socket never reports).
    pub fn get(&self, k: usize) -> (&[u8], Option<SocketAddr>) {
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: sockaddr_storage is a sockaddr type of this platform; `names[k]` is the
        // length the kernel wrote into it.
        let from = unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = self.addrs[k];
            SockAddr::new(storage, self.names[k])
        };
        (&self.bufs[k][..self.lens[k]], from.as_socket())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_reads_what_is_there_and_says_when_the_socket_is_empty() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut inbox = Inbox::new();
        let empty = inbox.fill(rx.as_raw_fd()).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        for k in 0..BATCH + 1 {
            tx.send_to(&[0, 4, 0, k as u8], rx.local_addr().unwrap())
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            inbox.fill(rx.as_raw_fd()).unwrap(),
            BATCH,
            "full: read again"
        );
        assert_eq!(inbox.get(2), (&[0u8, 4, 0, 2][..], tx.local_addr().ok()));
        assert_eq!(inbox.fill(rx.as_raw_fd()).unwrap(), 1, "fewer: now empty");
        assert_eq!(inbox.get(0).0, &[0, 4, 0, BATCH as u8]);
    }
}
