//! branchtftp: a caching branch TFTP/HTTP appliance for Cisco IP phones.
//!
//! A phone's request enters at a front end, is answered from the local cache and, only on a
//! miss, goes out through the ordered upstream chain; the bytes flow back into the cache and to
//! every waiting client at once. The sync worker is one more user of the same cache and chain.
//!
//! Map of the modules:
//!
//! | module | what lives there |
//! | --- | --- |
//! | [`tftp::packet`] | encode/decode of RRQ, WRQ, DATA, ACK, ERROR, OACK and their options |
//! | [`tftp::netascii`] | streaming netascii translation (RFC 764 line endings) |
//! | [`tftp::transfer`] | pure sender/receiver state machines (packets and `now` in, packets and deadlines out) and the protocol decisions: `accept` (options within our caps, the curl `tsize 0` quirk), probation of unproven clients, the TID rule |
//! | [`tftp::server`] | the request path: screening (opcode, allow list, size, then parsing), duplicate absorption, content from a [`tftp::Source`] (at once when it is at hand, else in a task that waits for admission's queue or an upstream), then the transfer started on the engine |
//! | `tftp::engine` | the driver: a few event-loop threads (one per core, at most 4) read the listeners (one loop woken per request) and run every transfer's datagrams and timers; a transfer is a small state, not a thread or a task; each loop's transfers share one port per listener address (RFC 1350 TIDs told apart by the client's address and port), read and written in batches with `recvmmsg`/`sendmmsg` (`tftp::datagrams`); files are read with `pread`, 8 KiB ahead (see its module doc for why not tokio tasks) |
//! | [`tftp::client`] | tokio driver for downloads, yielding bytes as they arrive |
//! | [`net`] | binding UDP and TCP sockets (v6-only IPv6, buffer sizes) for every listener |
//! | [`name`] | phone file names: normalization, case folding, rejection of escapes |
//! | [`content`] | what a request is answered with ([`content::Found`]: size, body, origin), one type from the miss path through the resolver to the TFTP engine and the HTTP handler |
//! | [`front`] | request → overrides/cache/miss; [`front::gate`] is admission (allow list, per-client and global limits, the queue, cheap slots for unproven TFTP clients); [`front::http`] is the phones' HTTP on 6970 ([`front::hot`]: its small cached files kept in memory); [`front::conn`] the HTTP connection server (limits, timeouts, `TCP_NODELAY`) |
//! | [`overrides`] | the local overrides directory that wins over upstream copies, indexed and kept current by notify; small files served from a copy in memory until the folder changes |
//! | [`cache`] | the local store: sled index + plain files, atomic publish, recovery, quota, verify, import |
//! | [`upstream`] | the ordered upstream chain (HTTP, TFTP), each upstream's health (circuit breaker, background probe), name resolution per request, the one "not found" memory; [`upstream::flight`] is the one way bytes come from upstream: a single flight per name for a phone's miss and the sync worker alike |
//! | [`admin`] | `/healthz`, `/status`, `/metrics`, `/phones`, `POST /sync`, the running cache, the token rule; the `status` command |
//! | [`phones`] | the per-phone boot view: observations from the front ends, boots, firmware progress, `branchtftp phones` |
//! | [`metrics`] | the Prometheus registry every part counts into |
//! | [`config`] | the YAML configuration: schema, defaults, validation with positions, `check-config`, `serve`'s flags laid over the file |
//! | [`sync`] | the sync worker's policy: known names, what to revalidate when, discovery (`.cnf.xml` → `.loads` → images), pace and windows, `sync --once`; it fetches through [`upstream::flight`] |
//! | [`watch`] | the process's one notify watcher, shared by the overrides index and the config reloader |
//! | [`reload`] | live reload of the config file (notify + SIGHUP) into the running appliance |
//! | [`app`] | [`app::Appliance`]: wiring and lifecycle (start, reload, shutdown joining every task under one stop signal); `serve` runs it in the foreground |
//! | [`demo`] | `branchtftp demo`: two appliances (a sample central server, the branch) across a small simulated TCP link, phones booting direct/cold/warm |
//! | [`get`] | the `get` command: a TFTP/HTTP download with stats |
//! | [`logging`] | journald or stderr, level from the config or `RUST_LOG` |
//! | [`manpage`] | the `branchtftp(1)` man page, generated from the CLI definition |

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod content;
pub mod demo;
pub mod front;
pub mod get;
pub mod logging;
pub mod manpage;
pub mod metrics;
pub mod name;
pub mod net;
pub mod overrides;
pub mod phones;
pub mod reload;
pub mod sync;
pub mod tftp;
pub mod upstream;
pub mod watch;
