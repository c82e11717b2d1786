//! Prometheus metrics (interface.md lists the families and labels). One registry per process:
//! every front end, the upstream chain and the sync worker count into [`global()`], and the
//! admin endpoint renders it.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub protocol: &'static str,
    /// hit, miss, not_found, denied, error
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamResultLabels {
    pub upstream: String,
    /// found, not_modified, not_found, unreachable, error, skipped
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub upstream: String,
    /// up, down
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// busy (no slot within the admission queue's wait, or the queue full), descriptors (the
    /// process or system ran out of file descriptors), start_failed (the event loop could not
    /// take the transfer)
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// seen, booting, upgrading, stuck
    pub state: &'static str,
}

/// Boot durations: a warm boot takes seconds, a firmware upgrade over a WAN up to hours.
const BOOT_SECONDS_BUCKETS: [f64; 12] = [
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

pub type ActiveGauge = Gauge<i64, std::sync::atomic::AtomicI64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    /// A firmware load the branch knows (named by its configs or planned): a handful.
    pub load: String,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub sent_bytes: Family<ProtocolLabels, Counter>,
    pub upstream_requests: Family<UpstreamResultLabels, Counter>,
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    pub cache_files: Gauge,
    pub cache_bytes: Gauge,
    pub transfers_active: Family<ProtocolLabels, ActiveGauge>,
    pub sync_passes: Family<ResultLabels, Counter>,
    pub upstream_fetches: Counter<u64, AtomicU64>,
    pub cache_max_bytes: Gauge,
    pub phones: Family<StateLabels, Gauge>,
    pub phone_boots: Counter,
    pub phone_boot_seconds: Histogram,
    pub phone_observations_dropped: Counter,
    /// Requests that waited in admission's queue for a slot.
    pub queued: Counter,
    pub load_ready: Family<LoadLabels, Gauge>,
    pub upstream_up: Family<UpstreamLabels, Gauge>,
    pub upstream_transitions: Family<TransitionLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    active_tftp: ActiveGauge,
    active_http: ActiveGauge,
    registry: Registry,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("branchtftp");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by protocol and result (hit, miss, not_found, denied, error)",
            requests.clone(),
        );
        let sent_bytes = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "sent_bytes",
            "Payload bytes sent to clients",
            sent_bytes.clone(),
        );
        let upstream_requests = Family::<UpstreamResultLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests to upstream servers by result",
            upstream_requests.clone(),
        );
        let upstream_bytes = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_bytes",
            "Body bytes received from upstream servers",
            upstream_bytes.clone(),
        );
        let cache_files = Gauge::default();
        registry.register("cache_files", "Files in the cache", cache_files.clone());
        let cache_bytes = Gauge::default();
        registry.register("cache_bytes", "Bytes in the cache", cache_bytes.clone());
        let transfers_active = Family::<ProtocolLabels, ActiveGauge>::default();
        registry.register(
            "transfers_active",
            "Transfers in progress",
            Family::clone(&transfers_active),
        );
        let sync_passes = Family::<ResultLabels, Counter>::default();
        registry.register("sync_passes", "Sync passes by result", sync_passes.clone());
        let upstream_fetches = Counter::default();
        registry.register(
            "upstream_flights",
            "Shared upstream fetches started by misses (one per name however many clients wait)",
            upstream_fetches.clone(),
        );
        let cache_max_bytes = Gauge::default();
        registry.register(
            "cache_max_bytes",
            "The cache's size limit (cache.max_size)",
            cache_max_bytes.clone(),
        );
        let phones = Family::<StateLabels, Gauge>::default();
        registry.register(
            "phones",
            "Phones known (seen), in a boot (booting), downloading firmware (upgrading), \
             whose last boot did not finish (stuck)",
            phones.clone(),
        );
        let phone_boots = Counter::default();
        registry.register(
            "phone_boots",
            "Phone boots that completed",
            phone_boots.clone(),
        );
        let phone_boot_seconds = Histogram::new(BOOT_SECONDS_BUCKETS);
        registry.register(
            "phone_boot_seconds",
            "Duration of completed phone boots, first request to last file",
            phone_boot_seconds.clone(),
        );
        let queued = Counter::default();
        registry.register(
            "admission_queued",
            "Requests that waited in admission's queue for a free slot (all of access.max_transfers taken); \
             a count rising in every boot storm says the box could be given more",
            queued.clone(),
        );
        let phone_observations_dropped = Counter::default();
        registry.register(
            "phone_observations_dropped",
            "Requests left out of the phones view because its queue was full",
            phone_observations_dropped.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests refused for want of a resource, by reason (busy, descriptors, start_failed)",
            refused.clone(),
        );
        for reason in ["busy", "descriptors", "start_failed"] {
            let _ = refused.get_or_create(&ReasonLabels { reason });
        }
        for state in ["seen", "booting", "upgrading", "stuck"] {
            let _ = phones.get_or_create(&StateLabels { state });
        }
        let load_ready = Family::<LoadLabels, Gauge>::default();
        registry.register(
            "load_ready",
            "1 when every image of a firmware load is cached, 0 while some are missing",
            load_ready.clone(),
        );
        let upstream_up = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_up",
            "1 while an upstream is asked (up, or not asked yet); 0 while it is down and probed",
            upstream_up.clone(),
        );
        let upstream_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "upstream_transitions",
            "Changes of an upstream's health, by the state entered (up, down)",
            upstream_transitions.clone(),
        );
        // Families appear in the exposition once they have a sample; give the fixed ones zero.
        for p in ["tftp", "http"] {
            let _ = transfers_active.get_or_create(&ProtocolLabels { protocol: p });
            let _ = sent_bytes.get_or_create(&ProtocolLabels { protocol: p });
        }
        let active_tftp = transfers_active
            .get_or_create(&ProtocolLabels { protocol: "tftp" })
            .clone();
        let active_http = transfers_active
            .get_or_create(&ProtocolLabels { protocol: "http" })
            .clone();
        Metrics {
            active_tftp,
            active_http,
            requests,
            sent_bytes,
            upstream_requests,
            upstream_bytes,
            cache_files,
            cache_bytes,
            transfers_active,
            sync_passes,
            upstream_fetches,
            cache_max_bytes,
            phones,
            phone_boots,
            phone_boot_seconds,
            phone_observations_dropped,
            queued,
            refused,
            load_ready,
            upstream_up,
            upstream_transitions,
            registry,
        }
    }

    pub fn request(&self, protocol: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { protocol, result })
            .inc();
    }

    /// A request refused for want of `reason` (see [`ReasonLabels`]).
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn sent(&self, protocol: &'static str, bytes: u64) {
        self.sent_bytes
            .get_or_create(&ProtocolLabels { protocol })
            .inc_by(bytes);
    }

    pub fn upstream_request(&self, upstream: &str, result: &'static str) {
        self.upstream_requests
            .get_or_create(&UpstreamResultLabels {
                upstream: upstream.to_string(),
                result,
            })
            .inc();
    }

    pub fn upstream_received(&self, upstream: &str, bytes: u64) {
        self.upstream_bytes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc_by(bytes);
    }

    pub fn upstream_up(&self, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .set(up as i64);
    }

    /// An upstream changed between up and down: the gauge follows, the counter counts.
    pub fn upstream_transition(&self, upstream: &str, to: crate::upstream::UpstreamState) {
        let up = to != crate::upstream::UpstreamState::Down;
        self.upstream_up(upstream, up);
        self.upstream_transitions
            .get_or_create(&TransitionLabels {
                upstream: upstream.to_string(),
                to: to.as_str(),
            })
            .inc();
    }

    pub fn sync_pass(&self, result: &str) {
        self.sync_passes
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// The phones gauges from the book's counts, and the boots completed since the last call.
    pub fn phones_update(&self, s: &crate::phones::PhonesSummary, boots: &[f64]) {
        for (state, n) in [
            ("seen", s.seen),
            ("booting", s.booting),
            ("upgrading", s.upgrading),
            ("stuck", s.stuck),
        ] {
            self.phones
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        for secs in boots {
            self.phone_boots.inc();
            self.phone_boot_seconds.observe(*secs);
        }
    }

    /// The `transfers_active` gauge of a protocol (`tftp` or `http`).
    pub fn active(&self, protocol: &'static str) -> &ActiveGauge {
        match protocol {
            "http" => &self.active_http,
            _ => &self.active_tftp,
        }
    }

    /// The OpenMetrics text exposition.
    /// Sets `branchtftp_load_ready` to exactly these loads (a load no longer known leaves).
    pub fn set_loads_ready(&self, loads: &[(String, bool)]) {
        self.load_ready.clear();
        for (load, ready) in loads {
            self.load_ready
                .get_or_create(&LoadLabels { load: load.clone() })
                .set(*ready as i64);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

pub fn global() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}
