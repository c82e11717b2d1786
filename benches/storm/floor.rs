//! The floor: the least a TFTP server can spend on a boot storm on this machine, to tell
//! which part of a server's CPU per boot any server pays. One thread, one socket, blocking
//! `recv_from` and `send_to` (two system calls per datagram, no event loop), every file in
//! memory, no retransmission, no timers, no logging, no access checks; it even answers from
//! the listening port instead of a new one (RFC 1350 §4 asks for a new TID), which saves the
//! socket a real server opens per transfer. What is left is what the kernel charges for
//! receiving a datagram, sending one and waking the thread in between: a server that does
//! anything real costs more.
//!
//! Run by benches/storm.rs as a process of its own (its CPU is read from /proc like the
//! others'): the benchmark starts itself again with `STORM_FLOOR_SERVER=ROOT|PORT`.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

/// A transfer in progress: which file, its block size, the last block sent.
struct Transfer {
    file: usize,
    blksize: usize,
    sent: u16,
}

/// Serves every file under `root` (names relative to it) on 127.0.0.1:`port`; never returns.
pub fn serve(root: &Path, port: u16) -> ! {
    let mut names = HashMap::new();
    let mut files: Vec<Vec<u8>> = Vec::new();
    load(root, root, &mut names, &mut files);
    let sock = UdpSocket::bind(("127.0.0.1", port)).expect("bind the floor server");
    let mut transfers: HashMap<SocketAddr, Transfer> = HashMap::new();
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(2048);
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 4 {
            continue;
        }
        out.clear();
        match (buf[1], u16::from_be_bytes([buf[2], buf[3]])) {
            (1, _) => {
                // RRQ: name, mode, then option pairs.
                let mut fields = buf[2..n].split(|&b| b == 0);
                let name = String::from_utf8_lossy(fields.next().unwrap_or_default());
                let _mode = fields.next();
                let mut blksize = 512;
                let mut options = false;
                while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                    if k.eq_ignore_ascii_case(b"blksize") {
                        blksize = String::from_utf8_lossy(v).parse().unwrap_or(512);
                        options = true;
                    } else if k.eq_ignore_ascii_case(b"tsize") {
                        options = true;
                    }
                }
                match names.get(name.as_ref()) {
                    None => out.extend_from_slice(b"\0\x05\0\x01File not found\0"),
                    Some(&file) => {
                        transfers.insert(
                            peer,
                            Transfer {
                                file,
                                blksize,
                                sent: 0,
                            },
                        );
                        if options {
                            out.extend_from_slice(b"\0\x06blksize\0");
                            out.extend_from_slice(blksize.to_string().as_bytes());
                            out.extend_from_slice(b"\0tsize\0");
                            out.extend_from_slice(files[file].len().to_string().as_bytes());
                            out.push(0);
                        } else {
                            next_block(&mut transfers, peer, &files, &mut out);
                        }
                    }
                }
            }
            (4, block) => {
                let current = transfers.get(&peer).map(|t| t.sent);
                if current == Some(block) {
                    next_block(&mut transfers, peer, &files, &mut out);
                }
            }
            _ => {}
        }
        if !out.is_empty() {
            let _ = sock.send_to(&out, peer);
        }
    }
}

/// Puts the transfer's next DATA in `out`, or ends the transfer when its last block was
/// acknowledged.
fn next_block(
    transfers: &mut HashMap<SocketAddr, Transfer>,
    peer: SocketAddr,
    files: &[Vec<u8>],
    out: &mut Vec<u8>,
) {
    let Some(t) = transfers.get_mut(&peer) else {
        return;
    };
    let data = &files[t.file];
    let start = t.sent as usize * t.blksize;
    if start > data.len() {
        transfers.remove(&peer);
        return;
    }
    t.sent += 1;
    out.extend_from_slice(&[0, 3]);
    out.extend_from_slice(&t.sent.to_be_bytes());
    out.extend_from_slice(&data[start..(start + t.blksize).min(data.len())]);
}

fn load(root: &Path, dir: &Path, names: &mut HashMap<String, usize>, files: &mut Vec<Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            load(root, &path, names, files);
        } else if let Ok(data) = std::fs::read(&path) {
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            names.insert(name, files.len());
            files.push(data);
        }
    }
}
