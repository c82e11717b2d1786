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
//! | [`tftp::transfer`] | pure sender/receiver state machines: packets and `now` in, packets and deadlines out |
//! | [`tftp::server`] | tokio driver: listeners, one task and one ephemeral socket per transfer, serving a [`tftp::Source`] |
//! | [`tftp::client`] | tokio driver for downloads, yielding bytes as they arrive |
//! | [`name`] | phone file names: normalization, case folding, rejection of escapes |
//! | [`cache`] | the local store: sled index + plain files, atomic publish, recovery, quota, verify, import |
//! | [`config`] | the YAML configuration: schema, defaults, validation with positions, `check-config` |
//! | [`sync`] | the sync worker: known names, per-class revalidation, discovery (`.cnf.xml` → `.loads` → images), `sync --once` |
//! | [`reload`] | live reload of the config file (notify + SIGHUP) into the running appliance |
//! | [`manpage`] | the `branchtftp(1)` man page, generated from the CLI definition |

pub mod app;
pub mod cache;
pub mod config;
pub mod front;
pub mod get;
pub mod logging;
pub mod manpage;
pub mod name;
pub mod overrides;
pub mod reload;
pub mod sync;
pub mod tftp;
pub mod upstream;
