//! Simulated phones booting over HTTP (TCP 6970), for the HTTP boot-storm test
//! (tests/http_storm.rs) and benchmark (benches/http_storm.rs). Each phone asks for the same
//! files, in the same order, as the TFTP phones of benches/storm/phones.rs (two missing trust
//! lists answered 404, `ITLFile.tlv`, two locale files, tones, ring list, dial plan, its own
//! `SEP<MAC>.cnf.xml`) over one keep-alive connection from a loopback address of its own, and
//! checks every byte. Like a phone it gives up on a file after 4 tries; a try that gets no
//! answer within 10 s, a broken connection or a 503 is tried again a second later on a new
//! connection.

#![allow(dead_code)] // each user (test, benchmark) reads what it reports

#[path = "../storm/phones.rs"]
pub mod files;

use std::borrow::Cow;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

pub use files::{expected, mac, write_files, Boot, CONFIG_SIZE, MISSING_FILES, SHARED_FILES};

const TRIES: u32 = 4;
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Boots `phones` phones against the HTTP server at `server`, all starting within `spread`;
/// phone `i` connects from 127.1.x.y, its own address, as the TFTP phones do.
pub async fn storm(server: SocketAddr, phones: usize, spread: Duration) -> Vec<Boot> {
    files::stagger(phones, spread, move |i| boot(server, i)).await
}

/// The files phone `i` asks for, in order, with the content expected (`None`: a 404).
pub fn boot_files(i: usize) -> Vec<(String, Option<Cow<'static, [u8]>>)> {
    let mac = mac(i);
    let config = format!("{mac}.cnf.xml");
    MISSING_FILES
        .iter()
        .map(|m| (m.replace("{MAC}", &mac), None))
        .chain(
            SHARED_FILES
                .iter()
                .map(|(n, s)| (n.to_string(), Some(expected(n, *s)))),
        )
        .chain(std::iter::once((
            config.clone(),
            Some(expected(&config, CONFIG_SIZE)),
        )))
        .collect()
}

async fn boot(server: SocketAddr, i: usize) -> Boot {
    let started = Instant::now();
    let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut resent = 0;
    for (name, want) in boot_files(i) {
        let mut tries = 0;
        let answer = loop {
            tries += 1;
            match try_get(&mut conn, ip, server, &name).await {
                Ok((503, _)) | Err(_) if tries < TRIES => {
                    resent += 1;
                    conn = None;
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                r => break r,
            }
        };
        let failure = match (answer, &want) {
            (Ok((404, _)), None) => None,
            (Ok((200, body)), Some(w)) if body[..] == w[..] => None,
            (Ok((200, body)), Some(_)) => Some(format!("{name}: {} bytes, wrong", body.len())),
            (Ok((status, _)), _) => Some(format!("{name}: HTTP {status}")),
            (Err(e), _) => Some(format!("{name}: gave up ({})", e.kind())),
        };
        if let Some(why) = failure {
            return Boot {
                booted: false,
                took: started.elapsed(),
                resent,
                failure: Some(why),
            };
        }
    }
    Boot {
        booted: true,
        took: started.elapsed(),
        resent,
        failure: None,
    }
}

/// One GET on the phone's connection (opened first if there is none); the connection is kept
/// for the next file unless the server closes it.
async fn try_get(
    conn: &mut Option<BufReader<TcpStream>>,
    ip: Ipv4Addr,
    server: SocketAddr,
    name: &str,
) -> io::Result<(u16, Vec<u8>)> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "no answer");
    tokio::time::timeout(ANSWER_WITHIN, async {
        if conn.is_none() {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from((ip, 0)))?;
            let stream = sock.connect(server).await?;
            stream.set_nodelay(true)?;
            *conn = Some(BufReader::new(stream));
        }
        let c = conn.as_mut().expect("just opened");
        let (status, body, close) = get(c, name).await?;
        if close {
            *conn = None;
        }
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err(timed_out()))
}

/// `GET /NAME` on a keep-alive connection: status, body (by Content-Length) and whether the
/// server closes the connection after it.
pub async fn get(conn: &mut BufReader<TcpStream>, name: &str) -> io::Result<(u16, Vec<u8>, bool)> {
    let req = format!("GET /{name} HTTP/1.1\r\nHost: tftp\r\nUser-Agent: storm-phone\r\n\r\n");
    conn.get_mut().write_all(req.as_bytes()).await?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let (mut len, mut close) = (None, false);
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(bad("header line"));
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(v.parse::<usize>().map_err(|_| bad("content-length"))?);
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let len = len.ok_or_else(|| bad("no content-length"))?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok((status, body, close))
}

/// Raises this process's open-file limit to its hard limit (a storm holds one connection per
/// phone on each side); servers started afterwards inherit it. Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}
