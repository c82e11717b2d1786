//! The admin endpoint (default 127.0.0.1:9069): `/healthz`, `/status` (JSON), `/metrics`
//! (Prometheus text), `GET /phones`, `POST /sync`, and the running cache (`GET /cache`,
//! `POST /cache/verify`, `DELETE /cache/NAME`; see [`cache`]). State-changing calls follow the
//! loopback-or-token rule of [`auth`]. Also the `branchtftp status` client that reads it.

pub mod auth;
pub mod cache;
pub mod client;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};

use crate::front::Gate;
use crate::upstream::flight::Fetcher;
use crate::upstream::{UpstreamState, UpstreamStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheStatus {
    pub files: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfers {
    pub active: u64,
    /// TFTP requests waiting in admission's queue for a slot (every one of
    /// `access.max_transfers` taken); absent from an older server's answer.
    #[serde(default)]
    pub queued: u64,
}

/// The `/status` document (interface.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_s: u64,
    pub cache: CacheStatus,
    pub upstreams: Vec<UpstreamStatus>,
    /// Absent from an appliance without a sync worker (a plain directory server).
    #[serde(default)]
    pub sync: Option<crate::sync::SyncStatus>,
    pub transfers: Transfers,
    /// Absent from an appliance that keeps no phones view.
    #[serde(default)]
    pub phones: Option<crate::phones::PhonesSummary>,
    /// Firmware loads named by configs or planned in `sync.loads`, with their readiness.
    #[serde(default)]
    pub loads: Vec<crate::sync::LoadReadiness>,
}

#[derive(Clone)]
pub struct AdminState {
    pub started: Instant,
    pub gate: Arc<Gate>,
    pub fetcher: Option<Arc<Fetcher>>,
    pub sync: Option<crate::sync::SyncHandle>,
    pub phones: Option<crate::phones::PhonesView>,
    pub auth: Arc<auth::AdminAuth>,
    /// Set while a `POST /cache/verify` runs.
    pub verifying: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminState {
    pub fn status(&self) -> Status {
        let (cache, upstreams) = match &self.fetcher {
            Some(f) => {
                let (files, bytes) = f.cache().totals();
                let ups = f.chain().upstreams().iter().map(|u| u.status()).collect();
                (
                    CacheStatus {
                        files,
                        bytes,
                        max_bytes: f.cache().max_bytes(),
                    },
                    ups,
                )
            }
            None => (
                CacheStatus {
                    files: 0,
                    bytes: 0,
                    max_bytes: 0,
                },
                Vec::new(),
            ),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            cache,
            upstreams,
            sync: self.sync.as_ref().map(|s| s.status()),
            transfers: Transfers {
                active: self.gate.active() as u64,
                queued: self.gate.queued() as u64,
            },
            phones: self.phones.as_ref().map(|p| p.summary()),
            loads: self
                .sync
                .as_ref()
                .map(|s| s.load_readiness())
                .unwrap_or_default(),
        }
    }
}

pub fn router(state: AdminState) -> axum::Router {
    let changes = axum::Router::new()
        .route("/sync", post(sync))
        .route("/cache/verify", post(cache::verify))
        .route("/cache/{*name}", delete(cache::evict))
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_trusted,
        ));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/phones", get(phones))
        .route("/cache", get(cache::list))
        .merge(changes)
        .with_state(state)
}

async fn phones(State(st): State<AdminState>) -> Response {
    let list = st.phones.as_ref().map(|p| p.report()).unwrap_or_default();
    axum::Json(list).into_response()
}

async fn status(State(st): State<AdminState>) -> Response {
    axum::Json(st.status()).into_response()
}

async fn metrics(State(st): State<AdminState>) -> Response {
    let m = crate::metrics::global();
    if let Some(f) = &st.fetcher {
        let (files, bytes) = f.cache().totals();
        m.cache_files.set(files as i64);
        m.cache_bytes.set(bytes as i64);
        m.cache_max_bytes.set(f.cache().max_bytes() as i64);
    }
    if let Some(s) = &st.sync {
        let loads: Vec<(String, bool)> = s
            .load_readiness()
            .into_iter()
            .map(|l| (l.name, l.ready))
            .collect();
        m.set_loads_ready(&loads);
    }
    // Current at every scrape, not as of the phones task's last tick.
    if let Some(p) = &st.phones {
        m.phones_update(&p.summary(), &[]);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

async fn sync(State(st): State<AdminState>) -> Response {
    match &st.sync {
        Some(s) => {
            s.trigger();
            (StatusCode::ACCEPTED, "sync pass started\n").into_response()
        }
        None => (
            StatusCode::CONFLICT,
            "no sync worker runs in this mode (serve --root without a cache)\n",
        )
            .into_response(),
    }
}

/// The admin endpoint a command asks when given none: `admin.listen`, else the default.
pub fn default_admin(cfg: &crate::config::Config) -> String {
    cfg.admin
        .listen
        .map(|a| a.to_string())
        .unwrap_or_else(|| "127.0.0.1:9069".to_string())
}

/// `branchtftp status`: prints the appliance's state; exit 0 healthy, 1 unreachable, 3 when
/// it runs but no upstream is reachable (phones are served from the cache only).
pub async fn status_command(admin: &str, json: bool) -> i32 {
    let base = admin.trim_end_matches('/');
    let base = if base.starts_with("http://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("branchtftp status: {e}");
            return 1;
        }
    };
    let healthy = matches!(
        client.get(format!("{base}/healthz")).send().await,
        Ok(r) if r.status().is_success()
    );
    let st: Status = match client.get(format!("{base}/status")).send().await {
        Ok(r) if r.status().is_success() => match r
            .bytes()
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("branchtftp status: {base}/status: bad answer: {e}");
                return 1;
            }
        },
        Ok(r) => {
            eprintln!("branchtftp status: {base}/status: HTTP {}", r.status());
            return 1;
        }
        Err(e) => {
            eprintln!(
                "branchtftp status: cannot reach the appliance at {base} ({e}); is `branchtftp serve` running? (admin.listen)"
            );
            return 1;
        }
    };
    if !healthy {
        eprintln!("branchtftp status: {base}/healthz is not ok");
        return 1;
    }
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&st).unwrap())
    } else {
        render_status(&st)
    };
    // `print!` panics on a closed pipe (`branchtftp status | head -1`); a reader that has gone
    // away is not an error worth reporting.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    }
    let none_up =
        !st.upstreams.is_empty() && st.upstreams.iter().all(|u| u.state == UpstreamState::Down);
    if none_up {
        3
    } else {
        0
    }
}

fn ago(now: u64, t: Option<u64>) -> String {
    match t {
        Some(t) if now >= t => format!("{} ago", crate::cache::cli::human_age((now - t) * 1000)),
        Some(t) => format!("in {}", crate::cache::cli::human_age((t - now) * 1000)),
        None => "never".to_string(),
    }
}

pub fn render_status(st: &Status) -> String {
    use std::fmt::Write;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "branchtftp {} up {}",
        st.version,
        crate::cache::cli::human_age(st.uptime_s * 1000)
    );
    let _ = writeln!(
        o,
        "cache      {} files, {} of {}",
        st.cache.files,
        crate::cache::cli::human_size(st.cache.bytes),
        crate::cache::cli::human_size(st.cache.max_bytes)
    );
    let _ = match st.transfers.queued {
        0 => writeln!(o, "transfers  {} active", st.transfers.active),
        q => writeln!(
            o,
            "transfers  {} active, {q} waiting for a slot (access.max_transfers)",
            st.transfers.active
        ),
    };
    if let Some(p) = &st.phones {
        let _ = writeln!(
            o,
            "phones     {} seen, {} booted in the last hour, {} booting, {} upgrading, {} stuck",
            p.seen, p.booted_last_hour, p.booting, p.upgrading, p.stuck
        );
    }
    let _ = writeln!(
        o,
        "sync       last {} ({}), next {}",
        ago(now, st.sync.as_ref().and_then(|s| s.last_pass)),
        st.sync.as_ref().map_or("-", |s| s.last_result.as_str()),
        ago(now, st.sync.as_ref().and_then(|s| s.next_pass))
    );
    let _ = writeln!(
        o,
        "\n{:<40} {:<8} {:<14} {:<14} {:<14} LAST ERROR",
        "UPSTREAM", "STATE", "SINCE", "LAST OK", "NEXT PROBE"
    );
    for u in &st.upstreams {
        let _ = writeln!(
            o,
            "{:<40} {:<8} {:<14} {:<14} {:<14} {}",
            u.url,
            u.state.as_str(),
            ago(now, u.last_transition),
            ago(now, u.last_ok),
            u.next_probe.map_or("-".to_string(), |t| ago(now, Some(t))),
            u.last_error.as_deref().unwrap_or("-")
        );
    }
    if !st.loads.is_empty() {
        o.push('\n');
        o.push_str(&crate::sync::loads::render_table(&st.loads));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(transfers: &str) -> Status {
        serde_json::from_str(&format!(
            r#"{{"version":"0","uptime_s":5,"cache":{{"files":0,"bytes":0,"max_bytes":0}},
                "upstreams":[],"transfers":{transfers}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn status_names_requests_waiting_for_a_slot_only_when_there_are_some() {
        let line = |st: &Status| {
            render_status(st)
                .lines()
                .find(|l| l.starts_with("transfers"))
                .unwrap()
                .to_string()
        };
        // An older server's answer has no `queued`.
        assert_eq!(line(&status(r#"{"active":3}"#)), "transfers  3 active");
        assert_eq!(
            line(&status(r#"{"active":4096,"queued":120}"#)),
            "transfers  4096 active, 120 waiting for a slot (access.max_transfers)"
        );
    }
}
