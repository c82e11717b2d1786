//! Shared helpers for the integration tests: real TFTP peers, an in-process HTTP origin, a WAN
//! relay that adds delay and caps bandwidth, test files with known hashes, and wrappers around
//! the real TFTP clients.
//!
//! Everything binds loopback addresses only and stops what it started when dropped. The in-process
//! helpers ([`HttpOrigin`], [`WanRelay`]) each run on a runtime of their own, so they keep working
//! whatever the test does with its own runtime (blocking calls included), in sync and async tests.
//!
//! Use from a test file with `mod support;` and `use support::*;`.
#![allow(dead_code, unused_imports)]

mod admin;
mod branch;
mod clients;
mod files;
mod origin;
mod servers;

pub use admin::*;
pub use branch::*;
mod wan;
pub use clients::*;
pub use files::*;
pub use origin::*;
pub use servers::*;
pub use wan::*;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

/// A UDP port that was free on 127.0.0.1 a moment ago (the kernel picked it; another process may
/// still take it before you bind, so servers started on it retry with a fresh port).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral UDP port on 127.0.0.1")
        .port()
}

/// A TCP port that was free on 127.0.0.1 a moment ago (see [`free_udp_port`]).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral TCP port on 127.0.0.1")
        .port()
}

/// `127.0.0.1:port`.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether a real peer that is missing should fail the test instead of skipping it. `tests/run.sh`
/// (and so CI) sets `BRANCHTFTP_REQUIRE_PEERS=1`: there, a skipped interop test is a failure.
pub fn peers_required() -> bool {
    std::env::var_os("BRANCHTFTP_REQUIRE_PEERS").is_some_and(|v| v != "0")
}

/// Reports a test skipped for lack of a peer, or panics when peers are required.
pub fn skip_or_fail(why: &str) {
    if peers_required() {
        panic!("{why} (BRANCHTFTP_REQUIRE_PEERS is set; run tests/run.sh to install the peers)");
    }
    eprintln!("SKIPPED: {why}; run tests/run.sh to install the real peers");
}
