//! Simulated phones booting over TFTP, for the boot-storm test (tests/storm.rs) and benchmark
//! (benches/storm.rs). Each phone asks, one after the other, for the files a Cisco phone asks
//! at boot: two trust lists that do not exist (answered "not found"), `ITLFile.tlv`, its own
//! `SEP<MAC>.cnf.xml`, two locale files, tones, ring list and dial plan. Half ask
//! `blksize 1428 tsize 0`, half no options. Like a phone, it resends a request after 1 s and
//! gives up on a file after 4 sends; a lost block is recovered by resending its ACK.

#![allow(dead_code)] // each user (test, benchmark) reads what it reports

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// The files every phone asks for that exist, with their sizes; plus `SEP<MAC>.cnf.xml`.
pub const SHARED_FILES: &[(&str, usize)] = &[
    ("ITLFile.tlv", 5_000),
    ("English_United_States/mk-sip.jar", 40_000),
    ("English_United_States/be-sip.jar", 20_000),
    ("g3-tones.xml", 1_500),
    ("RingList.xml", 600),
    ("dialplan.xml", 900),
];
pub const MISSING_FILES: &[&str] = &["CTLSEP{MAC}.tlv", "ITLSEP{MAC}.tlv"];
pub const CONFIG_SIZE: usize = 3_000;

pub fn mac(i: usize) -> String {
    format!("SEP0011{i:06X}")
}

/// Deterministic content, so a phone can check every byte without reading the file.
pub fn content(name: &str, size: usize) -> Vec<u8> {
    let seed = name
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..size)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// What `name` (of `size` bytes) must hold, as a phone checks it: [`content`], computed once
/// per process for the shared files. The generator shares the two cores with the server, and
/// building 70 KB byte by byte for every phone was CPU the server's figures paid for.
pub fn expected(name: &str, size: usize) -> std::borrow::Cow<'static, [u8]> {
    static SHARED: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| SHARED_FILES.iter().map(|(n, s)| content(n, *s)).collect());
    match SHARED_FILES
        .iter()
        .position(|(n, s)| *n == name && *s == size)
    {
        Some(k) => std::borrow::Cow::Borrowed(&shared[k]),
        None => std::borrow::Cow::Owned(content(name, size)),
    }
}

/// The storm sizes to run: `STORM_PHONES` (comma-separated), else 500, 1,000, 2,000 and 5,000.
pub fn storm_sizes() -> Vec<usize> {
    std::env::var("STORM_PHONES")
        .unwrap_or_else(|_| "500,1000,2000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Writes the shared files and one config per phone under `root`.
pub fn write_files(root: &Path, phones: usize) {
    std::fs::create_dir_all(root.join("English_United_States")).unwrap();
    for (name, size) in SHARED_FILES {
        std::fs::write(root.join(name), content(name, *size)).unwrap();
    }
    for i in 0..phones {
        let name = format!("{}.cnf.xml", mac(i));
        std::fs::write(root.join(&name), content(&name, CONFIG_SIZE)).unwrap();
    }
}

/// What one phone's boot came to.
#[derive(Debug, Clone)]
pub struct Boot {
    pub booted: bool,
    pub took: Duration,
    /// Requests sent again after a second without an answer.
    pub resent: u32,
    pub failure: Option<String>,
}

/// Boots `phones` phones against `server`, all starting within `spread`; phone `i` binds a
/// source address of 127.0.0.0/8 of its own group of 250 so per-client limits see many hosts.
pub async fn storm(server: SocketAddr, phones: usize, spread: Duration) -> Vec<Boot> {
    stagger(phones, spread, move |i| boot(server, i)).await
}

/// Starts `boot(i)` for `phones` phones spread evenly over `spread`; their boots in order.
pub async fn stagger<F, Fut>(phones: usize, spread: Duration, boot: F) -> Vec<Boot>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Boot> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(phones);
    for i in 0..phones {
        let delay = spread.mul_f64(i as f64 / phones.max(1) as f64);
        let booting = boot(i);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            booting.await
        }));
    }
    let mut boots = Vec::with_capacity(phones);
    for t in tasks {
        boots.push(t.await.unwrap());
    }
    boots
}

/// A storm's boots in figures.
pub struct Summary {
    pub booted: usize,
    pub gave_up: usize,
    /// Boot times of the phones that booted, seconds.
    pub p50: f64,
    pub p99: f64,
    /// Requests sent again (TFTP) or tries repeated (HTTP).
    pub resent: u32,
    /// Why phones gave up, most common first (e.g. "ERROR 0", "gave up").
    pub failures: Vec<(String, usize)>,
}

impl Summary {
    /// The cells every storm table starts with, after phones and server: booted, gave up,
    /// p50 and p99 s, wall s, resent, server CPU ms per boot.
    pub fn cells(&self, wall: f64, cpu_ms_per_boot: f64) -> String {
        format!(
            "{} | {} | {:.3} | {:.3} | {wall:.2} | {} | {cpu_ms_per_boot:.2}",
            self.booted, self.gave_up, self.p50, self.p99, self.resent
        )
    }

    pub fn of(boots: &[Boot]) -> Summary {
        let mut times: Vec<f64> = boots
            .iter()
            .filter(|b| b.booted)
            .map(|b| b.took.as_secs_f64())
            .collect();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let mut failures = std::collections::BTreeMap::new();
        for f in boots.iter().filter_map(|b| b.failure.as_deref()) {
            // "NAME: Reason": keep the reason only.
            let why = f.split_once(": ").map_or(f, |(_, w)| w);
            *failures.entry(why.to_string()).or_insert(0) += 1;
        }
        let mut failures: Vec<_> = failures.into_iter().collect();
        failures.sort_by_key(|f| std::cmp::Reverse(f.1));
        Summary {
            booted: times.len(),
            gave_up: boots.len() - times.len(),
            p50: pct(0.5),
            p99: pct(0.99),
            resent: boots.iter().map(|b| b.resent).sum(),
            failures,
        }
    }
}

async fn boot(server: SocketAddr, i: usize) -> Boot {
    let started = Instant::now();
    let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
    let sock = match UdpSocket::bind((ip, 0)).await {
        Ok(s) => s,
        Err(e) => return failed(started, 0, format!("bind {ip}: {e}")),
    };
    let options = i % 2 == 0;
    let mut resent = 0;
    let mac = mac(i);
    for missing in MISSING_FILES {
        let name = missing.replace("{MAC}", &mac);
        match fetch(&sock, server, &name, options, &mut resent).await {
            Err(Fetch::NotFound) => {}
            Ok(_) => return failed(started, resent, format!("{name}: expected not found")),
            Err(e) => return failed(started, resent, format!("{name}: {e:?}")),
        }
    }
    let config = format!("{mac}.cnf.xml");
    let wanted = SHARED_FILES
        .iter()
        .map(|(n, s)| (n.to_string(), *s))
        .chain(std::iter::once((config, CONFIG_SIZE)));
    for (name, size) in wanted {
        match fetch(&sock, server, &name, options, &mut resent).await {
            Ok(data) if data[..] == expected(&name, size)[..] => {}
            Ok(data) => {
                return failed(
                    started,
                    resent,
                    format!("{name}: {} bytes, wrong", data.len()),
                )
            }
            Err(e) => return failed(started, resent, format!("{name}: {e:?}")),
        }
    }
    Boot {
        booted: true,
        took: started.elapsed(),
        resent,
        failure: None,
    }
}

fn failed(started: Instant, resent: u32, why: String) -> Boot {
    Boot {
        booted: false,
        took: started.elapsed(),
        resent,
        failure: Some(why),
    }
}

#[derive(Debug)]
enum Fetch {
    NotFound,
    Error(u16),
    GaveUp,
    Io,
}

/// Datagrams the phones received twice (a server's retransmission), over all storms.
static DUPLICATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many datagrams the phones have received twice so far, over all storms.
pub fn duplicates() -> u64 {
    DUPLICATES.load(std::sync::atomic::Ordering::Relaxed)
}

const RESEND: Duration = Duration::from_secs(1);
const SENDS: u32 = 4;

/// One lock-step download (RFC 1350, with blksize/tsize options when `options`).
async fn fetch(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    options: bool,
    resent: &mut u32,
) -> Result<Vec<u8>, Fetch> {
    let mut rrq = vec![0u8, 1];
    rrq.extend_from_slice(name.as_bytes());
    rrq.extend_from_slice(b"\0octet\0");
    if options {
        rrq.extend_from_slice(b"blksize\x001428\0tsize\x000\0");
    }
    let mut last: Vec<u8> = rrq;
    let mut peer: Option<SocketAddr> = None;
    let mut blksize = 512usize;
    let mut expected: u16 = 1;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut sends = 0;
    loop {
        if sends == SENDS {
            return Err(Fetch::GaveUp);
        }
        sock.send_to(&last, peer.unwrap_or(server))
            .await
            .map_err(|_| Fetch::Io)?;
        sends += 1;
        if sends > 1 {
            *resent += 1;
        }
        let mut deadline = tokio::time::Instant::now() + RESEND;
        // Wait for progress; every step forward is acknowledged at once and restarts the count.
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        {
            if n < 4 || peer.is_some_and(|p| p != from) || from.ip() != server.ip() {
                continue;
            }
            let op = u16::from_be_bytes([buf[0], buf[1]]);
            let arg = u16::from_be_bytes([buf[2], buf[3]]);
            match op {
                5 if arg == 1 => return Err(Fetch::NotFound),
                5 => return Err(Fetch::Error(arg)),
                6 if peer.is_none() => {
                    if options {
                        blksize = 1428;
                    }
                    last = vec![0, 4, 0, 0];
                }
                3 if arg == expected => {
                    data.extend_from_slice(&buf[4..n]);
                    last = vec![0, 4, buf[2], buf[3]];
                    expected = expected.wrapping_add(1);
                }
                // A duplicate of something we have: our ACK was lost; the timer resends it.
                _ => {
                    DUPLICATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            }
            peer = Some(from);
            sock.send_to(&last, from).await.map_err(|_| Fetch::Io)?;
            if op == 3 && n - 4 < blksize {
                return Ok(data);
            }
            sends = 1;
            deadline = tokio::time::Instant::now() + RESEND;
        }
    }
}
