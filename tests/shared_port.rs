//! The engine's shared transfer ports (issue 12): a loop's transfers answer from one port and
//! are told apart by the client's address and port. Raw clients on loopback check what that
//! must not change: each phone gets its own file intact whatever the other phones' packets do,
//! a datagram from an unknown TID gets ERROR 5 and disturbs nobody, a duplicated ACK is not
//! answered twice (RFC 1123 §4.2.3.1), and a client asking again from a port that already has
//! a transfer gets a port of its own.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use support::*;
use tokio::net::UdpSocket;

fn rrq(name: &str) -> Vec<u8> {
    let mut p = vec![0u8, 1];
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    p
}

async fn socket_on(ip: IpAddr) -> UdpSocket {
    UdpSocket::bind((ip, 0)).await.unwrap()
}

/// The next datagram (and its sender) within 2 s.
async fn next(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("a reply within 2 s")
        .unwrap();
    (buf[..n].to_vec(), from)
}

/// Whatever arrives within `wait`.
async fn quiet(sock: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        got.push(buf[..n].to_vec());
    }
    got
}

fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 3];
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// Files of three blocks (the last short), each with content of its own.
fn three_block_files(names: &[&str]) -> TestFiles {
    let mut files = TestFiles::new();
    for (i, name) in names.iter().enumerate() {
        files.add_bytes(name, &pseudo_random_bytes(i as u64 + 1, 2 * 512 + 100));
    }
    make_world_readable(files.path());
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_on_one_shared_port_with_crossed_and_duplicated_packets_each_get_their_own_file() {
    let files = three_block_files(&["a.cnf.xml", "b.cnf.xml"]);
    let bt = Branchtftp::serve(files.path());
    let a = socket_on(Ipv4Addr::new(127, 0, 0, 21).into()).await;
    let b = socket_on(Ipv4Addr::new(127, 0, 0, 22).into()).await;
    let (want_a, want_b) = (files.content("a.cnf.xml"), files.content("b.cnf.xml"));

    // Two phones on each loop (round robin): at least two transfers share a loop's port.
    let others: Vec<UdpSocket> = futures::future::join_all(
        (0..8).map(|i| socket_on(Ipv4Addr::new(127, 0, 0, 30 + i).into())),
    )
    .await;
    a.send_to(&rrq("a.cnf.xml"), bt.addr).await.unwrap();
    b.send_to(&rrq("b.cnf.xml"), bt.addr).await.unwrap();
    let (da, pa) = next(&a).await;
    let (db, pb) = next(&b).await;
    assert_eq!(da, data(1, &want_a[..512]));
    assert_eq!(db, data(1, &want_b[..512]));
    let mut ports = HashSet::from([pa.port(), pb.port()]);
    for o in &others {
        o.send_to(&rrq("a.cnf.xml"), bt.addr).await.unwrap();
        ports.insert(next(o).await.1.port());
    }
    assert!(
        ports.len() < 10,
        "ten transfers on {} ports: no port is shared",
        ports.len()
    );
    assert!(!ports.contains(&bt.addr.port()), "never the request port");

    // A stranger on each transfer's port: ERROR 5 to it, nothing to the phones.
    let stranger = socket_on(Ipv4Addr::new(127, 0, 0, 23).into()).await;
    for port in [pa, pb] {
        stranger.send_to(&ack(1), port).await.unwrap();
        let (reply, from) = next(&stranger).await;
        assert_eq!(from, port);
        assert_eq!(tftp_error_of(&reply).map(|e| e.0), Some(5));
    }
    // Crossed: B acknowledges a block it has not been sent (A's next one); A acknowledges
    // block 1 twice. B's transfer ignores the ACK out of its window; A gets block 2 once.
    b.send_to(&ack(2), pb).await.unwrap();
    a.send_to(&ack(1), pa).await.unwrap();
    a.send_to(&ack(1), pa).await.unwrap();
    let got_a = quiet(&a, Duration::from_millis(400)).await;
    assert_eq!(
        got_a,
        [data(2, &want_a[512..1024])],
        "one DATA 2 for two ACK 1"
    );
    assert!(
        quiet(&b, Duration::from_millis(100)).await.is_empty(),
        "an ACK out of the window is ignored"
    );
    b.send_to(&ack(1), pb).await.unwrap();
    assert_eq!(next(&b).await, (data(2, &want_b[512..1024]), pb));
    for (sock, port, want) in [(&a, pa, &want_a), (&b, pb, &want_b)] {
        sock.send_to(&ack(2), port).await.unwrap();
        assert_eq!(next(sock).await, (data(3, &want[1024..]), port));
        sock.send_to(&ack(3), port).await.unwrap();
    }
    // Both done: their TIDs are strangers now.
    a.send_to(&ack(3), pa).await.unwrap();
    assert_eq!(tftp_error_of(&next(&a).await.0).map(|e| e.0), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_again_from_a_port_with_a_transfer_gets_a_port_of_its_own() {
    // One transfer left waiting, then more from the same client port than there are loops
    // (at most four): at least one lands on the waiting transfer's loop.
    let names = ["x.bin", "y0.bin", "y1.bin", "y2.bin", "y3.bin"];
    let files = three_block_files(&names);
    let bt = Branchtftp::serve(files.path());
    let sock = socket_on(Ipv4Addr::new(127, 0, 0, 24).into()).await;
    let mut port_of = HashMap::new();
    for name in names {
        sock.send_to(&rrq(name), bt.addr).await.unwrap();
        // Identify the answer by its content: a waiting transfer may resend its block 1.
        while port_of.len() < names.iter().position(|n| *n == name).unwrap() + 1 {
            let (reply, from) = next(&sock).await;
            let file = names
                .iter()
                .find(|n| reply == data(1, &files.content(n)[..512]))
                .unwrap_or_else(|| panic!("unexpected {reply:?}\n{}", bt.log()));
            port_of.entry(*file).or_insert(from);
        }
    }
    let ports: HashSet<_> = port_of.values().collect();
    assert_eq!(
        ports.len(),
        names.len(),
        "one pair of TIDs per transfer: {port_of:?}"
    );
    // Every transfer goes on to the end on its own port, intact.
    for block in 1..=2u16 {
        for name in names {
            sock.send_to(&ack(block), port_of[name]).await.unwrap();
        }
        let mut seen = HashSet::new();
        while seen.len() < names.len() {
            let (reply, from) = next(&sock).await;
            let name = names.iter().find(|n| port_of[*n] == from).unwrap();
            let content = files.content(name);
            let end = ((block as usize + 1) * 512).min(content.len());
            if reply == data(block + 1, &content[block as usize * 512..end]) {
                seen.insert(*name);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_phones_share_a_port_of_their_own_family() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        return skip_or_fail("no IPv6 loopback");
    }
    let files = three_block_files(&["v6.cnf.xml"]);
    let bt = Branchtftp::serve_on(
        files.path(),
        &[Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
    );
    let want = files.content("v6.cnf.xml");
    let v6 = bt.addrs[1];
    let phones: Vec<UdpSocket> =
        futures::future::join_all((0..8).map(|_| socket_on(Ipv6Addr::LOCALHOST.into()))).await;
    let mut ports = Vec::new();
    for p in &phones {
        p.send_to(&rrq("v6.cnf.xml"), v6).await.unwrap();
        let (reply, from) = next(p).await;
        assert_eq!(reply, data(1, &want[..512]));
        assert!(from.is_ipv6() && from.port() != v6.port());
        ports.push(from);
    }
    let distinct: HashSet<_> = ports.iter().collect();
    assert!(
        distinct.len() < phones.len(),
        "eight IPv6 transfers on {distinct:?}"
    );
    for (p, port) in phones.iter().zip(&ports) {
        p.send_to(&ack(1), port).await.unwrap();
        assert_eq!(next(p).await, (data(2, &want[512..1024]), *port));
        p.send_to(&ack(2), port).await.unwrap();
        assert_eq!(next(p).await, (data(3, &want[1024..]), *port));
        p.send_to(&ack(3), port).await.unwrap();
    }
}
