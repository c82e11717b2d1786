//! Wiring and lifecycle of the appliance: binds the front ends, runs until SIGTERM/SIGINT, then
//! lets transfers in flight finish (bounded) and exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use anyhow::Context;
use tracing::info;

use crate::admin::AdminState;
use crate::cache::{Cache, ClassRules};
use crate::config::Config;
use crate::front::http::HttpFront;
use crate::front::{Gate, Resolver, TftpFront};
use crate::net::bind_tcp;
use crate::overrides::Overrides;
use crate::tftp::server::{Server, ServerConfig};
use crate::upstream::flight::Fetcher;
use crate::upstream::UpstreamChain;

/// Resolves when the process is asked to stop (SIGTERM or SIGINT).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing transfers in flight"),
        _ = int.recv() => info!("SIGINT: finishing transfers in flight"),
    }
}

pub fn server_config(cfg: &Config) -> ServerConfig {
    ServerConfig {
        listen: cfg.tftp.listen.clone(),
        max_blksize: cfg.tftp.max_blksize,
        max_windowsize: cfg.tftp.max_windowsize,
        timeout: cfg.tftp.timeout,
        max_timeout: cfg.tftp.max_timeout,
        retries: cfg.tftp.retries,
        drain: Duration::from_secs(10),
    }
}

/// How `serve` was asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The appliance: overrides, cache and upstream chain.
    Appliance,
    /// `serve --root DIR` alone: a plain read-only TFTP server of DIR, no cache.
    PlainDirectory,
}

/// Runs the appliance in the foreground until a stop signal. `source` is the config file to
/// watch and reload (with the command-line overrides laid over it); `None` for embedded defaults.
pub async fn serve(
    cfg: Config,
    mode: Mode,
    source: Option<crate::reload::ConfigSource>,
) -> anyhow::Result<()> {
    let gate = Gate::new(cfg.access.clone());
    let overrides = cfg
        .cache
        .overrides
        .is_dir()
        .then(|| Overrides::new(&cfg.cache.overrides));
    let fetcher = match mode {
        Mode::PlainDirectory => None,
        Mode::Appliance => {
            let rules = ClassRules::new(cfg.cache.classes.clone());
            let dir = cfg.cache.dir.clone();
            let max = cfg.cache.max_size;
            let (cache, report) =
                tokio::task::spawn_blocking(move || Cache::open(&dir, max, rules))
                    .await?
                    .with_context(|| {
                        format!("cannot open the cache in {}", cfg.cache.dir.display())
                    })?;
            let (files, bytes) = cache.totals();
            info!(
                "cache {}: {files} files, {bytes} bytes, {} repairs at start",
                cfg.cache.dir.display(),
                report.repairs()
            );
            let chain = UpstreamChain::new(&cfg.upstreams)?;
            for up in chain.upstreams() {
                info!("upstream {}", up.url);
            }
            Some(Fetcher::new(cache, chain, cfg.sync.negative_ttl))
        }
    };
    let server = Server::bind(server_config(&cfg)).context("cannot start the TFTP front end")?;
    for addr in server.local_addrs() {
        info!("TFTP listening on {addr}");
    }
    if let Some(o) = &overrides {
        info!("serving overrides from {}", o.root().display());
    }
    // >>> sync worker and config reload (issue 5)
    let sync = fetcher
        .as_ref()
        .map(|f| crate::sync::SyncWorker::start(f.clone(), cfg.sync.clone()));
    let targets = crate::reload::Targets {
        gate: gate.clone(),
        fetcher: fetcher.clone(),
        sync: sync.clone(),
    };
    let _reloader = crate::reload::watch(source, cfg.clone(), targets);
    // <<< sync worker and config reload
    let resolver = Arc::new(Resolver {
        overrides,
        fetcher: fetcher.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // >>> phones view (issue 14)
    let phones = match &fetcher {
        Some(f) => Some(crate::phones::PhonesService::start(
            &cfg.phones,
            f.cache().clone(),
            resolver.overrides.clone(),
            stop_rx.clone(),
        )?),
        None => None,
    };
    let admin_auth = Arc::new(crate::admin::auth::AdminAuth::from_config(
        cfg.admin.token_file.as_deref(),
    )?);
    // <<< phones view
    let mut servers = tokio::task::JoinSet::new();
    if mode == Mode::Appliance {
        let http = crate::front::http::router(HttpFront {
            gate: gate.clone(),
            resolver: resolver.clone(),
        });
        for addr in &cfg.http.listen {
            let listener = bind_tcp(*addr).with_context(|| format!("HTTP listen {addr}"))?;
            info!("HTTP listening on {}", listener.local_addr()?);
            let limits = (&cfg.http).into();
            let gate = Some(gate.clone());
            servers.spawn(serve_http(
                listener,
                http.clone(),
                limits,
                gate,
                stop_rx.clone(),
            ));
        }
        if let Some(addr) = cfg.admin.listen {
            let admin = crate::admin::router(AdminState {
                started: std::time::Instant::now(),
                gate: gate.clone(),
                fetcher: fetcher.clone(),
                sync: sync
                    .clone()
                    .map(|s| Arc::new(s) as Arc<dyn crate::admin::SyncControl>),
                phones: phones.as_ref().map(|p| p.view.clone()),
                auth: admin_auth.clone(),
                verifying: Default::default(),
            });
            let listener = bind_tcp(addr).with_context(|| format!("admin listen {addr}"))?;
            info!("admin endpoint on http://{}", listener.local_addr()?);
            let limits = (&cfg.http).into();
            servers.spawn(serve_http(listener, admin, limits, None, stop_rx.clone()));
        }
    }
    let front = Arc::new(TftpFront { gate, resolver });
    let tftp = tokio::spawn(server.run(front, stopped(stop_rx.clone())));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    shutdown_signal().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    tftp.await??;
    // HTTP bodies in flight get the same bounded wait as TFTP transfers.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if let Some(p) = phones {
        p.finish().await;
    }
    info!("stopped");
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: crate::front::conn::HttpLimits,
    gate: Option<Arc<Gate>>,
    stop: watch::Receiver<bool>,
) {
    crate::front::conn::serve(listener, app, limits, gate, stopped(stop)).await
}
