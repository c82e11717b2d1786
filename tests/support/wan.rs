//! `WanRelay`: an in-process model of the WAN between a branch and the central site, used by
//! the integration tests and the benchmarks (`tc netem` is not available on the machines this
//! runs on; `branchtftp demo` has a small TCP link of its own). It forwards
//! UDP (TFTP, TID changes included) and TCP (HTTP) to targets, adding one-way delay and a shared
//! bandwidth cap per direction, and can be cut (outage) or blackholed (UDP silently dropped).
//!
//! Each packet (or TCP chunk) is timestamped as it enters the link: it starts serializing when the
//! link is free, occupies it for `len / rate`, and is delivered `one_way_delay` after that. Packets
//! are released when due, never by sleeping per packet in series, so delay costs latency and not
//! throughput, and packets queue behind each other as on a real link.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

/// The link the relay models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WanLink {
    /// Added in each direction: RTT = 2 × this.
    pub one_way_delay: Duration,
    /// Per direction; `None` = unlimited.
    pub bits_per_sec: Option<u64>,
    /// UDP packets that would wait longer than this for the link are dropped (a router's tail
    /// drop); `None` = never. TCP is never dropped (it is flow-controlled instead).
    pub queue_limit: Option<Duration>,
}

impl WanLink {
    pub fn new(one_way_delay: Duration) -> Self {
        WanLink {
            one_way_delay,
            bits_per_sec: None,
            queue_limit: None,
        }
    }

    /// A link with this round-trip time (half of it each way).
    pub fn with_rtt(rtt: Duration) -> Self {
        WanLink::new(rtt / 2)
    }

    /// Caps each direction at `mbit` megabits per second.
    pub fn mbit(self, mbit: u64) -> Self {
        self.bits_per_sec(mbit * 1_000_000)
    }

    pub fn bits_per_sec(mut self, bps: u64) -> Self {
        self.bits_per_sec = Some(bps);
        self
    }

    pub fn queue_limit(mut self, limit: Duration) -> Self {
        self.queue_limit = Some(limit);
        self
    }

    pub fn rtt(&self) -> Duration {
        self.one_way_delay * 2
    }

    /// Time the link is busy sending `bytes` (serialization only, no delay).
    pub fn serialization(&self, bytes: u64) -> Duration {
        match self.bits_per_sec {
            Some(bps) => Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64),
            None => Duration::ZERO,
        }
    }
}

/// What the WAN does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WanState {
    /// Forwards everything.
    Up,
    /// Outage: UDP is dropped; TCP stalls (connections stay open, bytes wait, and flow again
    /// after [`WanRelay::restore`], as TCP retransmission would make them).
    Cut,
    /// UDP silently dropped; TCP unaffected (a firewall eating TFTP).
    Blackhole,
}

#[derive(Default)]
struct DirectionStats {
    bytes: AtomicU64,
    packets: AtomicU64,
    dropped: AtomicU64,
}

struct Direction {
    busy_until: Mutex<Instant>,
    stats: DirectionStats,
}

impl Direction {
    fn new() -> Self {
        Direction {
            busy_until: Mutex::new(Instant::now()),
            stats: DirectionStats::default(),
        }
    }
}

struct WanShared {
    link: Mutex<WanLink>,
    /// Client (branch) → target (central).
    up: Direction,
    /// Target → client.
    down: Direction,
    state: watch::Sender<WanState>,
}

/// A datagram waiting for its delivery time.
struct Datagram {
    due: Instant,
    socket: Arc<UdpSocket>,
    dest: SocketAddr,
    payload: Bytes,
}

impl WanShared {
    fn dir(&self, up: bool) -> &Direction {
        if up {
            &self.up
        } else {
            &self.down
        }
    }

    fn udp_passes(&self) -> bool {
        *self.state.borrow() == WanState::Up
    }

    /// Puts a datagram on the link (or drops it) and queues it for delivery when due. The link's
    /// lock is held while queueing so each delivery queue stays in due order.
    fn send_udp(
        &self,
        up: bool,
        socket: &Arc<UdpSocket>,
        dest: SocketAddr,
        payload: Bytes,
        queue: &mpsc::UnboundedSender<Datagram>,
    ) {
        let dir = self.dir(up);
        if !self.udp_passes() {
            dir.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let link = *self.link.lock().unwrap();
        let mut busy = dir.busy_until.lock().unwrap();
        let now = Instant::now();
        let start = (*busy).max(now);
        if link.queue_limit.is_some_and(|limit| start - now > limit) {
            dir.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *busy = start + link.serialization(payload.len() as u64);
        dir.stats
            .bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        dir.stats.packets.fetch_add(1, Ordering::Relaxed);
        let _ = queue.send(Datagram {
            due: *busy + link.one_way_delay,
            socket: socket.clone(),
            dest,
            payload,
        });
    }

    /// Reserves the link for a TCP chunk; returns when it arrives at the far end.
    fn schedule_tcp(&self, up: bool, len: usize) -> Instant {
        let dir = self.dir(up);
        let link = *self.link.lock().unwrap();
        let mut busy = dir.busy_until.lock().unwrap();
        let start = (*busy).max(Instant::now());
        *busy = start + link.serialization(len as u64);
        dir.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        if len > 0 {
            dir.stats.packets.fetch_add(1, Ordering::Relaxed);
        }
        *busy + link.one_way_delay
    }
}

/// A simulated WAN on its own runtime. Add forwards with [`WanRelay::forward_udp`] and
/// [`WanRelay::forward_tcp`]; they share the link (delay, bandwidth, state). Stops on drop.
pub struct WanRelay {
    shared: Arc<WanShared>,
    forwards: Mutex<Vec<SocketAddr>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl WanRelay {
    /// A WAN with no forwards yet.
    pub fn new(link: WanLink) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wan-relay")
            .enable_all()
            .build()
            .expect("build the relay's runtime");
        let (state, _) = watch::channel(WanState::Up);
        WanRelay {
            shared: Arc::new(WanShared {
                link: Mutex::new(link),
                up: Direction::new(),
                down: Direction::new(),
                state,
            }),
            forwards: Mutex::new(Vec::new()),
            rt: Some(rt),
        }
    }

    /// A WAN forwarding UDP (TFTP) to `target`; clients use [`WanRelay::addr`].
    pub fn udp(target: SocketAddr, link: WanLink) -> Self {
        let relay = WanRelay::new(link);
        relay.forward_udp(target);
        relay
    }

    /// A WAN forwarding TCP (HTTP) to `target`; clients use [`WanRelay::addr`].
    pub fn tcp(target: SocketAddr, link: WanLink) -> Self {
        let relay = WanRelay::new(link);
        relay.forward_tcp(target);
        relay
    }

    /// The address of the first forward.
    pub fn addr(&self) -> SocketAddr {
        *self
            .forwards
            .lock()
            .unwrap()
            .first()
            .expect("the relay has no forward yet")
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Forwards UDP sent to the returned loopback address to `target`. The target may answer
    /// from a new port (a TFTP TID): each (client, target port) pair gets its own relay socket,
    /// so the client sees a consistent new TID as well.
    pub fn forward_udp(&self, target: SocketAddr) -> SocketAddr {
        let local_ip = loopback_like(target.ip());
        let front = {
            let _guard = self.rt().enter();
            Arc::new(
                branchtftp::net::bind_udp(SocketAddr::new(local_ip, 0), RELAY_BUFFER)
                    .expect("bind relay UDP socket"),
            )
        };
        let addr = front.local_addr().unwrap();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let fwd = Arc::new(UdpForward {
            shared: self.shared.clone(),
            front,
            target,
            local_ip,
            clients: Mutex::new(HashMap::new()),
            sides: Mutex::new(HashMap::new()),
            up_tx,
            down_tx,
        });
        let rt = self.rt();
        rt.spawn(deliver_datagrams(self.shared.clone(), up_rx));
        rt.spawn(deliver_datagrams(self.shared.clone(), down_rx));
        rt.spawn(fwd.front_loop());
        self.forwards.lock().unwrap().push(addr);
        addr
    }

    /// Forwards TCP connections made to the returned loopback address to `target`.
    pub fn forward_tcp(&self, target: SocketAddr) -> SocketAddr {
        let local_ip = loopback_like(target.ip());
        let listener = {
            let _guard = self.rt().enter();
            let socket = match local_ip {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            }
            .unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket.bind(SocketAddr::new(local_ip, 0)).unwrap();
            socket.listen(1024).expect("listen on relay TCP socket")
        };
        let addr = listener.local_addr().unwrap();
        let shared = self.shared.clone();
        self.rt().spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(relay_tcp(shared.clone(), client, target));
            }
        });
        self.forwards.lock().unwrap().push(addr);
        addr
    }

    /// WAN outage: everything dropped (UDP) or stalled (TCP) until [`WanRelay::restore`].
    pub fn cut(&self) {
        self.shared.state.send_replace(WanState::Cut);
    }

    /// UDP silently dropped until [`WanRelay::restore`]; TCP unaffected.
    pub fn blackhole(&self) {
        self.shared.state.send_replace(WanState::Blackhole);
    }

    /// Back to forwarding everything.
    pub fn restore(&self) {
        self.shared.state.send_replace(WanState::Up);
    }

    pub fn state(&self) -> WanState {
        *self.shared.state.borrow()
    }

    pub fn link(&self) -> WanLink {
        *self.shared.link.lock().unwrap()
    }

    /// Changes delay/bandwidth for traffic entering the link from now on.
    pub fn set_link(&self, link: WanLink) {
        *self.shared.link.lock().unwrap() = link;
    }

    /// Payload bytes carried client → target (UDP payloads, TCP stream bytes).
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.stats.bytes.load(Ordering::Relaxed)
    }

    /// Payload bytes carried target → client.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.stats.bytes.load(Ordering::Relaxed)
    }

    /// Datagrams (or TCP chunks) carried client → target.
    pub fn packets_up(&self) -> u64 {
        self.shared.up.stats.packets.load(Ordering::Relaxed)
    }

    pub fn packets_down(&self) -> u64 {
        self.shared.down.stats.packets.load(Ordering::Relaxed)
    }

    /// UDP datagrams dropped (cut, blackhole, queue limit), both directions.
    pub fn dropped(&self) -> u64 {
        self.shared.up.stats.dropped.load(Ordering::Relaxed)
            + self.shared.down.stats.dropped.load(Ordering::Relaxed)
    }

    pub fn reset_counters(&self) {
        for d in [&self.shared.up, &self.shared.down] {
            d.stats.bytes.store(0, Ordering::Relaxed);
            d.stats.packets.store(0, Ordering::Relaxed);
            d.stats.dropped.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for WanRelay {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Large socket buffers so bursts (windowsize × blksize) are not dropped by the kernel in the
/// relay itself; the model decides what is lost, not the relay's buffers.
const RELAY_BUFFER: usize = 4 << 20;

async fn deliver_datagrams(shared: Arc<WanShared>, mut queue: mpsc::UnboundedReceiver<Datagram>) {
    while let Some(d) = queue.recv().await {
        tokio::time::sleep_until(d.due.into()).await;
        // A packet in flight when the link went down is lost with it.
        if shared.udp_passes() {
            let _ = d.socket.send_to(&d.payload, d.dest).await;
        }
    }
}

struct UdpForward {
    shared: Arc<WanShared>,
    /// Where clients send requests; also carries replies from the target's own port.
    front: Arc<UdpSocket>,
    target: SocketAddr,
    local_ip: IpAddr,
    /// Per client: the socket the target sees the client as.
    clients: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    /// Per (client, target port): the socket the client sees that target TID as.
    sides: Mutex<HashMap<(SocketAddr, u16), Arc<UdpSocket>>>,
    up_tx: mpsc::UnboundedSender<Datagram>,
    down_tx: mpsc::UnboundedSender<Datagram>,
}

async fn bind_udp(ip: IpAddr) -> io::Result<Arc<UdpSocket>> {
    branchtftp::net::bind_udp(SocketAddr::new(ip, 0), RELAY_BUFFER).map(Arc::new)
}

impl UdpForward {
    async fn front_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, client)) = self.front.recv_from(&mut buf).await else {
                continue;
            };
            let upstream = self.clone().client_socket(client).await;
            let payload = Bytes::copy_from_slice(&buf[..n]);
            self.shared
                .send_udp(true, &upstream, self.target, payload, &self.up_tx);
        }
    }

    /// The socket standing for `client` towards the target (created on first use).
    async fn client_socket(self: Arc<Self>, client: SocketAddr) -> Arc<UdpSocket> {
        if let Some(s) = self.clients.lock().unwrap().get(&client) {
            return s.clone();
        }
        let socket = bind_udp(self.local_ip).await.expect("bind relay socket");
        self.clients.lock().unwrap().insert(client, socket.clone());
        tokio::spawn(self.clone().upstream_loop(client, socket.clone()));
        socket
    }

    /// Replies from the target to `client`, from whichever port (TID) the target chose.
    async fn upstream_loop(self: Arc<Self>, client: SocketAddr, upstream: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = upstream.recv_from(&mut buf).await else {
                continue;
            };
            if from.ip() != self.target.ip() {
                continue;
            }
            let side = if from.port() == self.target.port() {
                self.front.clone()
            } else {
                self.clone()
                    .side_socket(client, from.port(), &upstream)
                    .await
            };
            let payload = Bytes::copy_from_slice(&buf[..n]);
            self.shared
                .send_udp(false, &side, client, payload, &self.down_tx);
        }
    }

    async fn side_socket(
        self: Arc<Self>,
        client: SocketAddr,
        target_port: u16,
        upstream: &Arc<UdpSocket>,
    ) -> Arc<UdpSocket> {
        if let Some(s) = self.sides.lock().unwrap().get(&(client, target_port)) {
            return s.clone();
        }
        let socket = bind_udp(self.local_ip).await.expect("bind relay socket");
        self.sides
            .lock()
            .unwrap()
            .insert((client, target_port), socket.clone());
        let dest = SocketAddr::new(self.target.ip(), target_port);
        tokio::spawn(
            self.clone()
                .side_loop(client, socket.clone(), upstream.clone(), dest),
        );
        socket
    }

    /// The client's packets to a target TID, sent on from the client's upstream socket.
    async fn side_loop(
        self: Arc<Self>,
        client: SocketAddr,
        side: Arc<UdpSocket>,
        upstream: Arc<UdpSocket>,
        dest: SocketAddr,
    ) {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = side.recv_from(&mut buf).await else {
                continue;
            };
            if from != client {
                continue;
            }
            let payload = Bytes::copy_from_slice(&buf[..n]);
            self.shared
                .send_udp(true, &upstream, dest, payload, &self.up_tx);
        }
    }
}

async fn relay_tcp(shared: Arc<WanShared>, client: TcpStream, target: SocketAddr) {
    // A connection opened during an outage waits for the WAN before it reaches the target.
    let mut state = shared.state.subscribe();
    let _ = state.wait_for(|s| *s != WanState::Cut).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return; // the client sees its connection closed, as after a refused connect
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = tokio::spawn(pump(shared.clone(), true, client_r, server_w));
    let down = tokio::spawn(pump(shared, false, server_r, client_w));
    let _ = tokio::join!(up, down);
}

/// One direction of a TCP connection across the link.
async fn pump(
    shared: Arc<WanShared>,
    up: bool,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    // (due, None) is the end of the stream.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Bytes>)>(64);
    let reader_shared = shared.clone();
    let reader = async move {
        let mut state = reader_shared.state.subscribe();
        let mut buf = vec![0u8; 8192];
        loop {
            let _ = state.wait_for(|s| *s != WanState::Cut).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let due = reader_shared.schedule_tcp(up, n);
            let chunk = (n > 0).then(|| Bytes::copy_from_slice(&buf[..n]));
            if tx.send((due, chunk)).await.is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        let mut state = shared.state.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            let _ = state.wait_for(|s| *s != WanState::Cut).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    break;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
