//! The demo's WAN: a TCP relay in front of the sample central server that adds a one-way delay
//! and a bandwidth cap per direction, and counts the bytes it carries. Each chunk read is given
//! the time it would leave a link of that rate (queued behind the chunks before it) plus the
//! delay, and is written when due by a second task, so the delay costs latency and not
//! throughput, as on a real link. (The test suite's relay, with UDP, outages and drops, lives
//! in `tests/support/wan.rs`.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{tcp, TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One direction of the link: when it is next free, and what crossed it.
#[derive(Default)]
struct Direction {
    free_at: Mutex<Option<Instant>>,
    bytes: AtomicU64,
}

struct Shape {
    one_way: Duration,
    bits_per_sec: u64,
    up: Direction,
    down: Direction,
}

impl Shape {
    /// When `len` bytes entering the link now arrive at the far end.
    fn due(&self, dir: &Direction, len: usize) -> Instant {
        dir.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let serialize = Duration::from_secs_f64(len as f64 * 8.0 / self.bits_per_sec as f64);
        let mut free_at = dir.free_at.lock().unwrap();
        let now = Instant::now();
        let leaves = free_at.map_or(now, |f| f.max(now)) + serialize;
        *free_at = Some(leaves);
        leaves + self.one_way
    }
}

/// A running link: connections to [`addr`](Self::addr) reach the target across it.
pub struct Link {
    addr: SocketAddr,
    shape: Arc<Shape>,
    task: JoinHandle<()>,
}

impl Link {
    pub async fn start(
        target: SocketAddr,
        rtt: Duration,
        bits_per_sec: u64,
    ) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shape = Arc::new(Shape {
            one_way: rtt / 2,
            bits_per_sec: bits_per_sec.max(1),
            up: Direction::default(),
            down: Direction::default(),
        });
        let s = shape.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(s.clone(), client, target));
            }
        });
        Ok(Link { addr, shape, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes carried in both directions since the last [`reset`](Self::reset).
    pub fn bytes(&self) -> u64 {
        self.shape.up.bytes.load(Ordering::Relaxed) + self.shape.down.bytes.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.shape.up.bytes.store(0, Ordering::Relaxed);
        self.shape.down.bytes.store(0, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(shape: Arc<Shape>, client: TcpStream, target: SocketAddr) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    tokio::join!(
        carry(shape.clone(), true, client_rx, server_tx),
        carry(shape, false, server_rx, client_tx),
    );
}

/// Reads chunks from one side and writes each to the other when it is due.
async fn carry(
    shape: Arc<Shape>,
    up: bool,
    mut from: tcp::OwnedReadHalf,
    mut to: tcp::OwnedWriteHalf,
) {
    // Bounded: a full link holds the sender back (TCP flow control), as a router's queue would.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let dir = if up { &shape.up } else { &shape.down };
            if tx
                .send((shape.due(dir, n), buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
