//! The phone book: each phone's boots, rebuilt from the requests the front ends saw. Pure: the
//! observations carry their time and the files a phone's config and `.loads` name are read
//! through a [`Library`], so a test replays a whole boot storm without a socket or a clock.
//!
//! A phone is known by the MAC in the names only it asks for (`SEP<MAC>.cnf.xml`,
//! `CTLSEP<MAC>.tlv`, …). Its address is remembered, so the files it asks for next under shared
//! names (`ITLFile.tlv`, the `.loads`, images, locale files) are its own. A boot starts with a
//! trust-list or config request after a quiet gap and ends when the phone has been quiet for that
//! gap (a transfer in flight keeps it open): complete if it got a config and every firmware image
//! it started (or its load lists), stuck otherwise.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::sync::parse::{config_refs, device_of, loads_images};

/// Firmware files followed per boot; a phone asking for more is not a phone.
const MAX_FIRMWARE_FILES: usize = 64;
/// Loads whose image lists are remembered (a branch runs a handful).
const MAX_LOADS: usize = 256;
/// A transfer in flight keeps its phone's boot open at most this long (its end may have been
/// dropped on a full channel).
const MAX_IN_FLIGHT_MS: u64 = 3600 * 1000;
/// Longest error text kept.
const MAX_ERROR_CHARS: usize = 200;

/// What a front end saw, stamped with the time (unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub client: IpAddr,
    pub name: String,
    /// `tftp` or `http`.
    pub protocol: &'static str,
    pub at: u64,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Content was found and its transfer starts; `size` when known.
    Started { size: Option<u64> },
    /// A started transfer ended after `bytes`; `error` says why it did not complete.
    Finished { bytes: u64, error: Option<String> },
    /// Nothing to send: not in the overrides, the cache or any upstream.
    NotFound,
    /// Nothing sent for another reason (busy, upstream unreachable).
    Refused(String),
}

/// Where the book reads what a phone's config and `.loads` say.
pub trait Library {
    /// The content of a file as it would be served, if at hand.
    fn read(&self, name: &str) -> Option<Vec<u8>>;
    /// Whether a name is firmware: a `.loads` or an image.
    fn is_firmware(&self, name: &str) -> bool;
}

/// One firmware file of a boot and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareFile {
    pub name: String,
    pub bytes: u64,
    pub total: Option<u64>,
    pub complete: bool,
}

/// A phone's latest boot. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    pub started: u64,
    pub last_activity: u64,
    /// Set when the quiet gap ended it.
    pub ended: Option<u64>,
    /// Whether it completed, decided when it ended.
    #[serde(default)]
    pub complete: bool,
    #[serde(skip)]
    pub in_flight: u32,
    pub config_fetched: bool,
    pub loads_fetched: bool,
    pub firmware: Vec<FirmwareFile>,
}

/// The last boot that completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteBoot {
    /// Unix seconds.
    pub started: u64,
    pub ended: u64,
    pub seconds: f64,
}

/// Everything kept about one phone (and persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phone {
    /// Upper-case hex, as in the file names.
    pub mac: String,
    pub address: IpAddr,
    pub protocols: Vec<String>,
    /// Unix milliseconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The config file it last got (`SEP<MAC>.cnf.xml`, `XMLDefault.cnf.xml`, …).
    pub config: Option<String>,
    /// The load its config names (`<loadInformation>`), or whose `.loads` it asked for.
    pub load: Option<String>,
    /// Whether `config` has been read for its load since the phone last got it.
    #[serde(skip)]
    pub config_read: bool,
    pub last_file: Option<String>,
    pub last_error: Option<String>,
    pub boot: Option<Boot>,
    pub last_complete_boot: Option<CompleteBoot>,
    /// Complete boots seen.
    pub boots: u64,
}

/// Where a phone is, as `branchtftp phones` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhoneState {
    /// Known, but no boot of it seen.
    Seen,
    /// In a boot, not downloading firmware.
    Booting,
    /// In a boot, downloading firmware.
    Upgrading,
    /// Its last boot completed.
    Booted,
    /// Its last boot went quiet without a config or with firmware unfinished.
    Stuck,
}

/// One row of `branchtftp phones` / `GET /phones`. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneReport {
    pub mac: String,
    pub address: IpAddr,
    pub protocols: Vec<String>,
    pub state: PhoneState,
    pub first_seen: u64,
    pub last_seen: u64,
    pub load: Option<String>,
    /// Start of the latest boot.
    pub last_boot: Option<u64>,
    /// Firmware files of the latest boot.
    pub firmware: Vec<FirmwareFile>,
    pub last_file: Option<String>,
    pub last_error: Option<String>,
    pub last_complete_boot: Option<CompleteBoot>,
    pub boots: u64,
}

/// The one-line summary in `branchtftp status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhonesSummary {
    pub seen: u64,
    pub booted_last_hour: u64,
    pub booting: u64,
    pub upgrading: u64,
    pub stuck: u64,
}

/// What a name is to a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TrustList,
    Config,
    Loads,
    Image,
    Other,
}

fn kind_of(name: &str, lib: &dyn Library) -> Kind {
    let lower = name.to_ascii_lowercase();
    let base = lower.rsplit('/').next().unwrap_or(&lower);
    if base.ends_with(".tlv") && (base.starts_with("ctl") || base.starts_with("itl")) {
        Kind::TrustList
    } else if base.contains(".cnf.xml") && (base.starts_with("sep") || base == "xmldefault.cnf.xml")
    {
        Kind::Config
    } else if base.ends_with(".loads") {
        Kind::Loads
    } else if lib.is_firmware(name) {
        Kind::Image
    } else {
        Kind::Other
    }
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_ERROR_CHARS {
        s = s.chars().take(MAX_ERROR_CHARS).collect::<String>() + "…";
    }
    s
}

impl Boot {
    fn new(at: u64) -> Boot {
        Boot {
            started: at,
            last_activity: at,
            ended: None,
            complete: false,
            in_flight: 0,
            config_fetched: false,
            loads_fetched: false,
            firmware: Vec::new(),
        }
    }

    /// Whether it is still going at `now`.
    fn open(&self, now: u64, gap: u64) -> bool {
        let quiet = now.saturating_sub(self.last_activity);
        self.ended.is_none() && (quiet < gap || (self.in_flight > 0 && quiet < MAX_IN_FLIGHT_MS))
    }

    /// Firmware started and not finished, or listed by a `.loads` it got and never fetched.
    fn firmware_outstanding(&self, images: Option<&Vec<String>>) -> bool {
        let done = |img: &str| {
            self.firmware
                .iter()
                .any(|f| f.complete && f.name.eq_ignore_ascii_case(img))
        };
        self.firmware.iter().any(|f| !f.complete)
            || (self.loads_fetched && images.is_some_and(|l| l.iter().any(|i| !done(i))))
    }

    fn upgrading(&self, images: Option<&Vec<String>>) -> bool {
        (self.loads_fetched || !self.firmware.is_empty()) && self.firmware_outstanding(images)
    }
}

/// All phones seen, bounded in number; see the module doc.
pub struct PhoneBook {
    phones: HashMap<String, Phone>,
    by_addr: HashMap<IpAddr, String>,
    /// Load name (lower case) → its images, from its `.loads`.
    load_images: HashMap<String, Vec<String>>,
    quiet_gap_ms: u64,
    capacity: usize,
    dirty: HashSet<String>,
    forgotten: HashSet<String>,
    finished_boots: Vec<f64>,
}

impl PhoneBook {
    /// At most `capacity` phones; the least recently seen goes first.
    pub fn new(quiet_gap: std::time::Duration, capacity: usize) -> PhoneBook {
        PhoneBook {
            phones: HashMap::new(),
            by_addr: HashMap::new(),
            load_images: HashMap::new(),
            quiet_gap_ms: quiet_gap.as_millis() as u64,
            capacity: capacity.max(1),
            dirty: HashSet::new(),
            forgotten: HashSet::new(),
            finished_boots: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.phones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.phones.is_empty()
    }

    /// Puts back a phone read from the database (transfers in flight died with the process).
    pub fn restore(&mut self, mut phone: Phone) {
        if let Some(b) = &mut phone.boot {
            b.in_flight = 0;
        }
        self.by_addr.insert(phone.address, phone.mac.clone());
        self.phones.insert(phone.mac.clone(), phone);
    }

    /// Applies one observation. Requests from an address no phone has announced are not kept.
    pub fn observe(&mut self, obs: &Observation, lib: &dyn Library) {
        self.observe_all(std::slice::from_ref(obs), lib);
    }

    /// Applies a batch of observations, then reads the config of each phone that fetched one
    /// (its load): once per phone and batch, however often the phone fetched it in the batch.
    pub fn observe_all(&mut self, batch: &[Observation], lib: &dyn Library) {
        let mut unread = HashSet::new();
        for obs in batch {
            if let Some(mac) = self.note(obs, lib) {
                unread.insert(mac);
            }
        }
        for mac in unread {
            self.read_config(&mac, lib);
        }
    }

    /// Reads what `mac`'s config names as its load, once per config fetched; a config
    /// published just after its transfer ended (a miss) is read on a later request.
    fn read_config(&mut self, mac: &str, lib: &dyn Library) {
        let Some(phone) = self.phones.get_mut(mac) else {
            return;
        };
        if phone.config_read {
            return;
        }
        if let Some(data) = phone.config.as_deref().and_then(|c| lib.read(c)) {
            phone.config_read = true;
            if let Some(load) = config_refs(&data).loads.into_iter().next() {
                phone.load = Some(load);
            }
        }
    }

    /// [`observe`](Self::observe) but for the config read: the phone it concerns, if its
    /// config is still to be read.
    fn note(&mut self, obs: &Observation, lib: &dyn Library) -> Option<String> {
        let mac = match device_of(&obs.name) {
            Some(dev) => {
                let mac = dev[3..].to_string();
                self.admit(&mac, obs);
                mac
            }
            None => match self.by_addr.get(&obs.client) {
                Some(mac) => mac.clone(),
                None => return None,
            },
        };
        let kind = kind_of(&obs.name, lib);
        let gap = self.quiet_gap_ms;
        let phone = self.phones.get_mut(&mac)?;
        phone.last_seen = phone.last_seen.max(obs.at);
        if !phone.protocols.iter().any(|p| p == obs.protocol) {
            phone.protocols.push(obs.protocol.to_string());
            phone.protocols.sort();
        }
        let open = phone.boot.as_ref().is_some_and(|b| b.open(obs.at, gap));
        if !open && matches!(kind, Kind::TrustList | Kind::Config) {
            if let Some(done) = close_boot(phone, &self.load_images) {
                self.finished_boots.push(done);
            }
            phone.boot = Some(Boot::new(obs.at));
        }
        record(phone, obs, kind, gap, lib, &mut self.load_images);
        let unread = (!phone.config_read).then(|| mac.clone());
        self.dirty.insert(mac);
        unread
    }

    /// Makes sure `mac` is in the book at the observation's address.
    fn admit(&mut self, mac: &str, obs: &Observation) {
        if !self.phones.contains_key(mac) {
            if self.phones.len() >= self.capacity {
                self.evict_least_recent();
            }
            self.phones.insert(
                mac.to_string(),
                Phone {
                    mac: mac.to_string(),
                    address: obs.client,
                    protocols: Vec::new(),
                    first_seen: obs.at,
                    last_seen: obs.at,
                    config: None,
                    load: None,
                    config_read: false,
                    last_file: None,
                    last_error: None,
                    boot: None,
                    last_complete_boot: None,
                    boots: 0,
                },
            );
            self.forgotten.remove(mac);
        }
        let phone = self.phones.get_mut(mac).expect("just inserted");
        if phone.address != obs.client
            && self.by_addr.get(&phone.address).map(String::as_str) == Some(mac)
        {
            self.by_addr.remove(&phone.address);
        }
        phone.address = obs.client;
        self.by_addr.insert(obs.client, mac.to_string());
    }

    fn evict_least_recent(&mut self) {
        if let Some(mac) = self
            .phones
            .values()
            .min_by_key(|p| p.last_seen)
            .map(|p| p.mac.clone())
        {
            self.forget(&mac);
        }
    }

    fn forget(&mut self, mac: &str) {
        if let Some(p) = self.phones.remove(mac) {
            if self.by_addr.get(&p.address).map(String::as_str) == Some(mac) {
                self.by_addr.remove(&p.address);
            }
        }
        self.dirty.remove(mac);
        self.forgotten.insert(mac.to_string());
    }

    /// Ends boots that went quiet and forgets phones not seen for `forget_after_ms`.
    pub fn tick(&mut self, now: u64, forget_after_ms: u64) {
        let gap = self.quiet_gap_ms;
        let mut stale = Vec::new();
        for phone in self.phones.values_mut() {
            if now.saturating_sub(phone.last_seen) > forget_after_ms {
                stale.push(phone.mac.clone());
                continue;
            }
            let quiet = phone
                .boot
                .as_ref()
                .is_some_and(|b| b.ended.is_none() && !b.open(now, gap));
            if quiet {
                if let Some(done) = close_boot(phone, &self.load_images) {
                    self.finished_boots.push(done);
                }
                self.dirty.insert(phone.mac.clone());
            }
        }
        for mac in stale {
            self.forget(&mac);
        }
    }

    /// Phones changed since the last call, and MACs forgotten: what to write to the database.
    pub fn take_changes(&mut self) -> (Vec<Phone>, Vec<String>) {
        let changed = self
            .dirty
            .drain()
            .filter_map(|m| self.phones.get(&m).cloned())
            .collect();
        (changed, self.forgotten.drain().collect())
    }

    /// Durations (seconds) of the boots completed since the last call.
    pub fn take_finished_boots(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.finished_boots)
    }

    fn state(&self, phone: &Phone, now: u64) -> PhoneState {
        let Some(boot) = &phone.boot else {
            return PhoneState::Seen;
        };
        let images = phone
            .load
            .as_ref()
            .and_then(|l| self.load_images.get(&l.to_ascii_lowercase()));
        if boot.open(now, self.quiet_gap_ms) {
            if boot.upgrading(images) {
                PhoneState::Upgrading
            } else {
                PhoneState::Booting
            }
        } else if boot.ended.map_or(
            boot.config_fetched && !boot.firmware_outstanding(images),
            |_| boot.complete,
        ) {
            PhoneState::Booted
        } else {
            PhoneState::Stuck
        }
    }

    /// Every phone at `now`, by MAC.
    pub fn report(&self, now: u64) -> Vec<PhoneReport> {
        let mut out: Vec<PhoneReport> = self
            .phones
            .values()
            .map(|p| PhoneReport {
                mac: p.mac.clone(),
                address: p.address,
                protocols: p.protocols.clone(),
                state: self.state(p, now),
                first_seen: p.first_seen / 1000,
                last_seen: p.last_seen / 1000,
                load: p.load.clone(),
                last_boot: p.boot.as_ref().map(|b| b.started / 1000),
                firmware: p
                    .boot
                    .as_ref()
                    .map(|b| b.firmware.clone())
                    .unwrap_or_default(),
                last_file: p.last_file.clone(),
                last_error: p.last_error.clone(),
                last_complete_boot: p.last_complete_boot.clone(),
                boots: p.boots,
            })
            .collect();
        out.sort_by(|a, b| a.mac.cmp(&b.mac));
        out
    }

    /// Counts for `branchtftp status` and the `branchtftp_phones` gauge.
    pub fn summary(&self, now: u64) -> PhonesSummary {
        let mut s = PhonesSummary {
            seen: self.phones.len() as u64,
            ..PhonesSummary::default()
        };
        let hour_ago = (now / 1000).saturating_sub(3600);
        for p in self.phones.values() {
            match self.state(p, now) {
                PhoneState::Booting => s.booting += 1,
                PhoneState::Upgrading => s.upgrading += 1,
                PhoneState::Stuck => s.stuck += 1,
                PhoneState::Seen | PhoneState::Booted => {}
            }
            if p.last_complete_boot
                .as_ref()
                .is_some_and(|b| b.ended >= hour_ago)
            {
                s.booted_last_hour += 1;
            }
        }
        s
    }
}

/// Ends a phone's open boot; its duration in seconds when it completed.
fn close_boot(phone: &mut Phone, load_images: &HashMap<String, Vec<String>>) -> Option<f64> {
    let images = phone
        .load
        .as_ref()
        .and_then(|l| load_images.get(&l.to_ascii_lowercase()));
    let boot = phone.boot.as_mut().filter(|b| b.ended.is_none())?;
    boot.ended = Some(boot.last_activity);
    boot.complete = boot.config_fetched && !boot.firmware_outstanding(images);
    if !boot.complete {
        return None;
    }
    let seconds = boot.last_activity.saturating_sub(boot.started) as f64 / 1000.0;
    phone.boots += 1;
    phone.last_complete_boot = Some(CompleteBoot {
        started: boot.started / 1000,
        ended: boot.last_activity / 1000,
        seconds,
    });
    Some(seconds)
}

/// Applies one observation to a phone and its open boot.
fn record(
    phone: &mut Phone,
    obs: &Observation,
    kind: Kind,
    gap: u64,
    lib: &dyn Library,
    load_images: &mut HashMap<String, Vec<String>>,
) {
    let mut boot = phone.boot.as_mut().filter(|b| b.open(obs.at, gap));
    if let Some(b) = boot.as_deref_mut() {
        b.last_activity = b.last_activity.max(obs.at);
    }
    match &obs.event {
        Event::Started { size } => {
            let Some(b) = boot else { return };
            b.in_flight += 1;
            if matches!(kind, Kind::Loads | Kind::Image) {
                let known = b
                    .firmware
                    .iter()
                    .position(|f| f.name.eq_ignore_ascii_case(&obs.name));
                match known {
                    Some(i) => {
                        b.firmware[i].total = *size;
                        b.firmware[i].complete = false;
                    }
                    None if b.firmware.len() < MAX_FIRMWARE_FILES => {
                        b.firmware.push(FirmwareFile {
                            name: obs.name.clone(),
                            bytes: 0,
                            total: *size,
                            complete: false,
                        })
                    }
                    None => {}
                }
            }
        }
        Event::Finished { bytes, error } => {
            phone.last_file = Some(obs.name.clone());
            let mut total = None;
            if let Some(b) = boot {
                b.in_flight = b.in_flight.saturating_sub(1);
                if let Some(f) = b
                    .firmware
                    .iter_mut()
                    .find(|f| f.name.eq_ignore_ascii_case(&obs.name))
                {
                    f.bytes = *bytes;
                    f.complete = error.is_none() && f.total.is_none_or(|t| *bytes >= t);
                    total = f.total;
                }
                if error.is_none() {
                    match kind {
                        Kind::Config => {
                            b.config_fetched = true;
                            phone.config = Some(obs.name.clone());
                            phone.config_read = false;
                        }
                        Kind::Loads => {
                            b.loads_fetched = true;
                            learn_load(&mut phone.load, &obs.name, lib, load_images);
                        }
                        _ => {}
                    }
                }
            }
            if let Some(why) = error {
                let at = match total {
                    Some(t) if t > 0 => format!(" at {} %", bytes * 100 / t),
                    _ => format!(" after {bytes} bytes"),
                };
                phone.last_error = Some(truncate(format!("{}: {why}{at}", obs.name)));
            }
        }
        Event::NotFound => {
            phone.last_file = Some(obs.name.clone());
            phone.last_error = Some(truncate(format!("not found: {}", obs.name)));
        }
        Event::Refused(why) => {
            phone.last_file = Some(obs.name.clone());
            phone.last_error = Some(truncate(format!("{}: {why}", obs.name)));
        }
    }
}

/// Remembers the images a `.loads` lists; its name is the load when the config named none.
fn learn_load(
    phone_load: &mut Option<String>,
    loads_name: &str,
    lib: &dyn Library,
    load_images: &mut HashMap<String, Vec<String>>,
) {
    let base = loads_name.rsplit('/').next().unwrap_or(loads_name);
    let load = base[..base.len() - ".loads".len()].to_string();
    let key = load.to_ascii_lowercase();
    if !load_images.contains_key(&key) {
        if let Some(data) = lib.read(loads_name) {
            if load_images.len() >= MAX_LOADS {
                load_images.clear();
            }
            load_images.insert(key, loads_images(&data));
        }
    }
    phone_load.get_or_insert(load);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MAC: &str = "001122AABBCC";

    /// Files by name; firmware by extension.
    #[derive(Default)]
    struct Files(HashMap<String, Vec<u8>>);

    impl Library for Files {
        fn read(&self, name: &str) -> Option<Vec<u8>> {
            self.0.get(&name.to_ascii_lowercase()).cloned()
        }
        fn is_firmware(&self, name: &str) -> bool {
            let n = name.to_ascii_lowercase();
            [".sbn", ".loads", ".bin"].iter().any(|e| n.ends_with(e))
                || (n.ends_with(".sgn") && !n.contains(".cnf.xml"))
        }
    }

    fn library() -> Files {
        let mut f = Files::default();
        f.0.insert(
            format!("sep{}.cnf.xml", MAC.to_lowercase()),
            b"<device><loadInformation>SIP41.9-4-2</loadInformation></device>".to_vec(),
        );
        f.0.insert(
            "sip41.9-4-2.loads".into(),
            b"#header\r\napps41.sbn\r\ncnu41.sbn\r\n".to_vec(),
        );
        f
    }

    struct Phone1<'a> {
        book: &'a mut PhoneBook,
        lib: &'a Files,
        ip: IpAddr,
        now: u64,
    }

    impl Phone1<'_> {
        fn ev(&mut self, name: &str, event: Event) {
            self.book.observe(
                &Observation {
                    client: self.ip,
                    name: name.into(),
                    protocol: "tftp",
                    at: self.now,
                    event,
                },
                self.lib,
            );
        }
        /// A whole transfer of `size` bytes taking 1 s, cut after `sent` when given.
        fn get(&mut self, name: &str, size: u64, sent: Option<u64>) {
            self.ev(name, Event::Started { size: Some(size) });
            self.now += 1000;
            let (bytes, error) = match sent {
                Some(b) => (b, Some("client went away".to_string())),
                None => (size, None),
            };
            self.ev(name, Event::Finished { bytes, error });
        }
        fn missing(&mut self, name: &str) {
            self.ev(name, Event::NotFound);
            self.now += 100;
        }
    }

    fn book() -> PhoneBook {
        PhoneBook::new(Duration::from_secs(60), 100)
    }

    fn boot_with_upgrade(p: &mut Phone1, cut: Option<u64>) {
        p.missing(&format!("CTLSEP{MAC}.tlv"));
        p.missing("ITLFile.tlv");
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        p.get("SIP41.9-4-2.loads", 50, None);
        p.get("apps41.sbn", 1000, None);
        p.get("cnu41.sbn", 1000, cut);
    }

    #[test]
    fn a_phone_that_gets_its_config_and_load_completes_a_boot_after_the_quiet_gap() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 1_000_000,
        };
        boot_with_upgrade(&mut p, None);
        let end = p.now;
        let r = &b.report(end)[0];
        assert_eq!(r.mac, MAC);
        assert_eq!(r.load.as_deref(), Some("SIP41.9-4-2"));
        assert_eq!(r.state, PhoneState::Booting, "still inside the gap");
        assert!(b.take_finished_boots().is_empty());
        b.tick(end + 60_000, u64::MAX);
        let r = &b.report(end + 60_000)[0];
        assert_eq!(r.state, PhoneState::Booted);
        let done = r.last_complete_boot.as_ref().unwrap();
        assert_eq!(done.seconds, (end - 1_000_000) as f64 / 1000.0);
        assert_eq!(b.take_finished_boots(), vec![done.seconds]);
        assert_eq!(r.firmware.len(), 3);
        assert!(r.firmware.iter().all(|f| f.complete));
        assert_eq!(r.last_error.as_deref(), Some("not found: ITLFile.tlv"));
    }

    #[test]
    fn a_firmware_download_cut_halfway_leaves_the_phone_stuck_at_its_offset() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 5_000,
        };
        boot_with_upgrade(&mut p, Some(500));
        let end = p.now;
        assert_eq!(b.summary(end).upgrading, 1);
        b.tick(end + 61_000, u64::MAX);
        let r = &b.report(end + 61_000)[0];
        assert_eq!(r.state, PhoneState::Stuck);
        let cut = r.firmware.iter().find(|f| f.name == "cnu41.sbn").unwrap();
        assert_eq!(
            (cut.bytes, cut.total, cut.complete),
            (500, Some(1000), false)
        );
        assert_eq!(
            r.last_error.as_deref(),
            Some("cnu41.sbn: client went away at 50 %")
        );
        assert!(r.last_complete_boot.is_none());
        assert!(b.take_finished_boots().is_empty());
        assert_eq!(b.summary(end + 61_000).stuck, 1);
    }

    #[test]
    fn a_phone_that_stops_between_images_its_loads_lists_is_stuck() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 5_000,
        };
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        p.get("SIP41.9-4-2.loads", 50, None);
        p.get("apps41.sbn", 1000, None);
        let end = p.now;
        b.tick(end + 60_000, u64::MAX);
        assert_eq!(b.report(end + 60_000)[0].state, PhoneState::Stuck);
    }

    #[test]
    fn a_config_naming_a_new_load_is_read_once_per_fetch_and_once_per_batch() {
        struct Counting(Files, std::cell::Cell<u32>);
        impl Library for Counting {
            fn read(&self, name: &str) -> Option<Vec<u8>> {
                self.1.set(self.1.get() + 1);
                self.0.read(name)
            }
            fn is_firmware(&self, name: &str) -> bool {
                self.0.is_firmware(name)
            }
        }
        let mut lib = Counting(library(), Default::default());
        let mut b = book();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let obs = |name: &str, at, event| Observation {
            client: ip,
            name: name.into(),
            protocol: "http",
            at,
            event,
        };
        let cfg = format!("SEP{MAC}.cnf.xml");
        b.observe(
            &obs(
                &cfg,
                0,
                Event::Finished {
                    bytes: 1,
                    error: None,
                },
            ),
            &lib,
        );
        for i in 1..10 {
            b.observe(&obs("dialplan.xml", i, Event::NotFound), &lib);
        }
        assert_eq!(lib.1.get(), 1);
        lib.0 .0.insert(
            cfg.to_lowercase(),
            b"<loadInformation>SIP41.9-5-1</loadInformation>".to_vec(),
        );
        b.observe(
            &obs(
                &cfg,
                20,
                Event::Finished {
                    bytes: 1,
                    error: None,
                },
            ),
            &lib,
        );
        assert_eq!(b.report(20)[0].load.as_deref(), Some("SIP41.9-5-1"));

        // A burst: the config fetched 1,000 times within one batch is read once, after it.
        lib.0 .0.insert(
            cfg.to_lowercase(),
            b"<loadInformation>SIP41.9-6-1</loadInformation>".to_vec(),
        );
        let reads = lib.1.get();
        let burst: Vec<Observation> = (0..1000)
            .map(|i| {
                obs(
                    &cfg,
                    30 + i,
                    Event::Finished {
                        bytes: 1,
                        error: None,
                    },
                )
            })
            .collect();
        b.observe_all(&burst, &lib);
        assert_eq!(lib.1.get() - reads, 1, "one read for the batch");
        assert_eq!(b.report(1030)[0].load.as_deref(), Some("SIP41.9-6-1"));
    }

    #[test]
    fn a_boot_ended_incomplete_stays_stuck_after_a_restart() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        p.get("SIP41.9-4-2.loads", 50, None);
        p.get("apps41.sbn", 1000, None);
        b.tick(100_000, u64::MAX);
        let mut again = book();
        again.restore(b.take_changes().0.remove(0));
        // The load's image list is not kept; the verdict taken at the end of the boot is.
        assert_eq!(again.report(100_000)[0].state, PhoneState::Stuck);
    }

    #[test]
    fn a_long_transfer_keeps_the_boot_open_past_the_quiet_gap() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        p.get("SIP41.9-4-2.loads", 50, None);
        p.ev("apps41.sbn", Event::Started { size: Some(10) });
        p.book.tick(p.now + 600_000, u64::MAX);
        assert_eq!(
            p.book.report(p.now + 600_000)[0].state,
            PhoneState::Upgrading
        );
        p.now += 600_000;
        p.ev(
            "apps41.sbn",
            Event::Finished {
                bytes: 10,
                error: None,
            },
        );
        p.get("cnu41.sbn", 10, None);
        let end = p.now;
        b.tick(end + 60_000, u64::MAX);
        assert_eq!(b.report(end + 60_000)[0].state, PhoneState::Booted);
    }

    #[test]
    fn shared_names_are_attributed_by_address_and_strangers_are_not_kept() {
        let lib = library();
        let mut b = book();
        let mut stranger = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.9".parse().unwrap(),
            now: 0,
        };
        stranger.get("ITLFile.tlv", 10, None);
        assert!(b.is_empty());
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        p.missing(&format!("CTLSEP{MAC}.tlv"));
        p.get("English_United_States/mk-sip.jar", 10, None);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b.report(0)[0].last_file.as_deref(),
            Some("English_United_States/mk-sip.jar")
        );
    }

    #[test]
    fn a_new_boot_after_the_gap_counts_the_previous_one() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        p.now += 3_600_000;
        p.get(&format!("SEP{MAC}.cnf.xml"), 100, None);
        assert_eq!(b.take_finished_boots(), vec![1.0]);
        let r = &b.report(3_600_000)[0];
        assert_eq!(r.boots, 1);
        assert_eq!(r.last_boot, Some(3_601));
    }

    #[test]
    fn the_book_holds_at_most_its_capacity_and_forgets_the_least_recent() {
        let lib = library();
        let mut b = PhoneBook::new(Duration::from_secs(60), 3);
        for i in 0..10u64 {
            b.observe(
                &Observation {
                    client: IpAddr::from([10, 0, 0, i as u8]),
                    name: format!("SEP0000000000{i:02X}.cnf.xml"),
                    protocol: "http",
                    at: i,
                    event: Event::NotFound,
                },
                &lib,
            );
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.by_addr.len(), 3);
        let macs: Vec<String> = b.report(10).into_iter().map(|r| r.mac).collect();
        assert_eq!(macs, ["000000000007", "000000000008", "000000000009"]);
        let (_, gone) = b.take_changes();
        assert_eq!(gone.len(), 7);
    }

    #[test]
    fn phones_not_seen_for_forget_after_are_forgotten() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        p.missing(&format!("CTLSEP{MAC}.tlv"));
        b.tick(1_000, 1_000);
        assert_eq!(b.len(), 1);
        b.tick(1_200, 1_000);
        assert!(b.is_empty());
        assert_eq!(b.take_changes().1, vec![MAC.to_string()]);
    }

    #[test]
    fn a_phone_restored_from_the_database_keeps_its_boots() {
        let lib = library();
        let mut b = book();
        let mut p = Phone1 {
            book: &mut b,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 0,
        };
        boot_with_upgrade(&mut p, None);
        b.tick(100_000, u64::MAX);
        let (saved, _) = b.take_changes();
        let json = serde_json::to_vec(&saved[0]).unwrap();
        let mut again = book();
        again.restore(serde_json::from_slice(&json).unwrap());
        assert_eq!(again.report(100_000), b.report(100_000));
        // Its address is known again: a shared name is still its own.
        let mut p = Phone1 {
            book: &mut again,
            lib: &lib,
            ip: "10.0.0.7".parse().unwrap(),
            now: 200_000,
        };
        p.missing("ITLFile.tlv");
        assert_eq!(
            again.report(200_000)[0].last_error.as_deref(),
            Some("not found: ITLFile.tlv")
        );
    }

    proptest::proptest! {
        /// Any sequence of observations keeps the book within its bounds and never panics.
        #[test]
        fn any_observations_keep_the_book_bounded(
            events in proptest::collection::vec((0u8..6, 0u8..4, 0u8..5, 0u64..5000, 0u64..3000), 0..200)
        ) {
            let lib = library();
            let mut b = PhoneBook::new(Duration::from_secs(1), 4);
            let names = ["SEP0000000000AA.cnf.xml", "CTLSEP0000000000BB.tlv", "apps41.sbn",
                "SIP41.9-4-2.loads", "ITLFile.tlv", "SEP0000000000CC.cnf.xml.sgn"];
            let mut now = 0;
            for (n, ip, ev, size, step) in events {
                now += step;
                let event = match ev {
                    0 => Event::Started { size: Some(size) },
                    1 => Event::Finished { bytes: size, error: None },
                    2 => Event::Finished { bytes: size / 2, error: Some("timed out".into()) },
                    3 => Event::NotFound,
                    _ => Event::Refused("server busy".into()),
                };
                b.observe(&Observation { client: IpAddr::from([10, 0, 0, ip]), name: names[n as usize].into(),
                    protocol: "tftp", at: now, event }, &lib);
                b.tick(now, 10_000);
                proptest::prop_assert!(b.len() <= 4);
                proptest::prop_assert!(b.by_addr.len() <= b.len());
                let s = b.summary(now);
                proptest::prop_assert!(s.booting + s.upgrading + s.stuck <= s.seen);
            }
        }
    }
}
