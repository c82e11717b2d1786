//! Checks that need the whole, deserialized configuration: ranges, URL shapes, addresses that
//! would collide at bind time, and limits that contradict each other. Each problem names the key
//! it blames; the caller turns that into `FILE:LINE:COL`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, UpstreamScheme, UpstreamUrl};
use crate::name::FileName;

/// One semantic problem: the dotted key it blames and what is wrong, phrased as advice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

/// Every problem of `cfg`, in document order of the keys (roughly).
pub fn problems(cfg: &Config, present: &dyn Fn(&str) -> bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key: String, problem: String| out.push(Problem { key, problem });

    // --- tftp ---
    let t = &cfg.tftp;
    if t.listen.is_empty() && cfg.http.listen.is_empty() {
        bad(
            "tftp.listen".into(),
            "empty, and so is http.listen: phones could not reach this server at all".into(),
        );
    }
    for (i, j) in duplicates(&t.listen) {
        bad(
            format!("tftp.listen[{j}]"),
            format!(
                "{} collides with tftp.listen[{i}] ({}): one UDP port can be bound once per address",
                t.listen[j], t.listen[i]
            ),
        );
    }
    // RFC 2348 §2: blksize is 8 to 65464 octets.
    if !(8..=65464).contains(&t.max_blksize) {
        bad(
            "tftp.max_blksize".into(),
            format!(
                "{} is outside 8..=65464 (RFC 2348); 1468 keeps a packet under a 1500-byte MTU",
                t.max_blksize
            ),
        );
    }
    // RFC 7440 §3: windowsize is 1 to 65535 blocks.
    if t.max_windowsize == 0 {
        bad(
            "tftp.max_windowsize".into(),
            "0 is outside 1..=65535 (RFC 7440); 1 turns windowing off".into(),
        );
    }
    // RFC 2349 §2: the timeout option is 1 to 255 seconds.
    if t.timeout < Duration::from_secs(1) || t.timeout > Duration::from_secs(255) {
        bad(
            "tftp.timeout".into(),
            format!(
                "{} is outside 1s..=255s (RFC 2349)",
                super::format_duration(t.timeout)
            ),
        );
    }
    if t.max_timeout < Duration::from_secs(1) || t.max_timeout > Duration::from_secs(255) {
        bad(
            "tftp.max_timeout".into(),
            format!(
                "{} is outside 1s..=255s (RFC 2349); a few seconds bounds how long an unanswered transfer lives",
                super::format_duration(t.max_timeout)
            ),
        );
    }
    if t.retries == 0 {
        bad(
            "tftp.retries".into(),
            "must be at least 1: with 0 a single lost packet ends a transfer".into(),
        );
    }

    let h = &cfg.http;
    for (key, d) in [
        ("http.header_timeout", h.header_timeout),
        ("http.idle_timeout", h.idle_timeout),
        ("http.send_timeout", h.send_timeout),
    ] {
        if d.is_zero() {
            bad(
                key.into(),
                "must be more than 0: without it one client can hold a connection for ever".into(),
            );
        }
    }
    if h.max_connections == 0 {
        bad(
            "http.max_connections".into(),
            "must be at least 1 (`http.listen: []` turns HTTP off)".into(),
        );
    }

    // --- http and admin share TCP ---
    let mut tcp: Vec<(String, SocketAddr)> = cfg
        .http
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("http.listen[{i}]"), *a))
        .collect();
    if let Some(a) = cfg.admin.listen {
        tcp.push(("admin.listen".into(), a));
    }
    let addrs: Vec<SocketAddr> = tcp.iter().map(|(_, a)| *a).collect();
    for (i, j) in duplicates(&addrs) {
        bad(
            tcp[j].0.clone(),
            format!(
                "{} collides with {} ({}): one TCP port can be bound once per address",
                tcp[j].1, tcp[i].0, tcp[i].1
            ),
        );
    }

    // --- phones ---
    let ph = &cfg.phones;
    if ph.quiet_gap.is_zero() {
        bad(
            "phones.quiet_gap".into(),
            "0 would end every boot at once; phones pause seconds between files, 2m is safe".into(),
        );
    }
    if ph.forget_after < ph.quiet_gap {
        bad(
            "phones.forget_after".into(),
            "shorter than phones.quiet_gap: a phone would be forgotten before its boot ends".into(),
        );
    }

    // --- cache ---
    let c = &cfg.cache;
    if c.dir.as_os_str().is_empty() {
        bad(
            "cache.dir".into(),
            "empty: name the directory the cache lives in, e.g. /var/lib/branchtftp".into(),
        );
    }
    if c.max_size == 0 {
        bad(
            "cache.max_size".into(),
            "0 leaves no room to cache anything; write a size such as 20GiB".into(),
        );
    }
    if c.overrides.as_os_str().is_empty() {
        bad(
            "cache.overrides".into(),
            "empty: name a directory (it may be absent or empty), e.g. /etc/branchtftp/overrides"
                .into(),
        );
    } else if c.overrides == c.dir {
        bad(
            "cache.overrides".into(),
            "is the cache directory itself: keep local files apart from the cache, which evicts"
                .into(),
        );
    }

    // --- upstreams ---
    for (i, u) in cfg.upstreams.iter().enumerate() {
        match UpstreamUrl::parse(&u.url) {
            Err(e) => bad(format!("upstreams[{i}].url"), e),
            Ok(parsed) => {
                let earlier = cfg.upstreams[..i]
                    .iter()
                    .position(|o| UpstreamUrl::parse(&o.url).ok().as_ref() == Some(&parsed));
                if let Some(k) = earlier {
                    bad(
                        format!("upstreams[{i}].url"),
                        format!(
                            "{} repeats upstreams[{k}]: each upstream is tried once per miss",
                            u.url
                        ),
                    );
                }
                if parsed.scheme == UpstreamScheme::Http && parsed.port == 6971 {
                    bad(
                        format!("upstreams[{i}].url"),
                        "port 6971 is CUCM's HTTPS port; plain HTTP is served on 6970".into(),
                    );
                }
            }
        }
        if u.timeout.is_zero() {
            bad(
                format!("upstreams[{i}].timeout"),
                "must be more than 0s, e.g. 10s".into(),
            );
        }
        if u.probe_interval < std::time::Duration::from_millis(100) {
            bad(
                format!("upstreams[{i}].probe_interval"),
                "must be at least 100ms, e.g. 5s".into(),
            );
        }
    }

    // --- sync ---
    let s = &cfg.sync;
    let iv = &s.intervals;
    for (name, d) in [
        ("config", iv.config),
        ("defaults", iv.defaults),
        ("locale", iv.locale),
        ("firmware", iv.firmware),
        ("other", iv.other),
    ] {
        if d.is_zero() {
            bad(
                format!("sync.intervals.{name}"),
                "must be more than 0s: the interval between two revalidations".into(),
            );
        }
    }
    for (i, name) in s.prefetch.iter().enumerate() {
        if let Err(e) = FileName::parse(name) {
            bad(format!("sync.prefetch[{i}]"), format!("`{name}`: {e}"));
        }
    }
    for (class, w) in [
        ("config", &s.windows.config),
        ("defaults", &s.windows.defaults),
        ("locale", &s.windows.locale),
        ("firmware", &s.windows.firmware),
        ("other", &s.windows.other),
    ] {
        if let Err((i, problem)) = crate::sync::windows::class_windows(w) {
            let item = format!("sync.windows.{class}[{i}]");
            // A single window written as a plain string has no item of its own.
            let key = if present(&item) {
                item
            } else {
                format!("sync.windows.{class}")
            };
            bad(key, problem);
        }
    }
    for (i, load) in s.loads.iter().enumerate() {
        if let Err(e) = crate::sync::loads::planned_file(load) {
            bad(format!("sync.loads[{i}]"), format!("`{load}`: {e}"));
        }
    }
    if s.max_load_images == 0 {
        bad(
            "sync.max_load_images".into(),
            "must be at least 1: a load lists one image or more".into(),
        );
    }
    if !(1..=100).contains(&s.max_pinned) {
        bad(
            "sync.max_pinned".into(),
            format!(
                "{}% is outside 1%..=100% of cache.max_size; 50% leaves room for everything else",
                s.max_pinned
            ),
        );
    }
    if s.remove_after == 0 {
        bad(
            "sync.remove_after".into(),
            "must be at least 1 pass answered \"not found\" before a cached file is dropped".into(),
        );
    }

    // --- access ---
    let a = &cfg.access;
    if a.allow.is_empty() {
        bad(
            "access.allow".into(),
            "empty: no client could be served; list the phones' subnets, e.g. 10.0.0.0/8".into(),
        );
    }
    if a.max_transfers == 0 {
        bad("access.max_transfers".into(), "must be at least 1".into());
    }
    if a.max_per_client == 0 {
        bad("access.max_per_client".into(), "must be at least 1".into());
    } else if a.max_transfers > 0 && a.max_per_client > a.max_transfers {
        // Blame whichever of the two the file spells out, the per-client one first.
        let key = if present("access.max_per_client") || !present("access.max_transfers") {
            "access.max_per_client"
        } else {
            "access.max_transfers"
        };
        bad(
            key.into(),
            format!(
                "max_per_client ({}) is more than max_transfers ({}): one client could never reach it",
                a.max_per_client, a.max_transfers
            ),
        );
    }
    out
}

/// Pairs `(first, later)` of addresses that cannot both be bound: equal, or the same port and
/// family where one is the wildcard (Linux refuses `0.0.0.0:69` next to `127.0.0.1:69`).
/// `0.0.0.0:69` beside `[::]:69` is fine: the server binds IPv6 sockets as v6-only.
fn duplicates(addrs: &[SocketAddr]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for j in 0..addrs.len() {
        let b = addrs[j];
        if let Some(i) = (0..j).find(|&i| collide(addrs[i], b)) {
            out.push((i, j));
        }
    }
    out
}

fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    // Port 0 asks the kernel for a fresh port each time (tests do this): never a collision.
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
