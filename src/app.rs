//! Wiring and lifecycle of the appliance. [`Appliance::start`] opens the cache, builds the
//! upstream chain, binds the front ends (the TFTP server, the HTTP front, the admin endpoint) and
//! starts the sync worker, the phones view and the config reloader, all under one stop signal;
//! [`Appliance::shutdown`] raises it, lets TFTP transfers, HTTP bodies and upstream flights
//! finish within [`DRAIN`], and joins every task. [`serve`] is the foreground process around it
//! (systemd notification, SIGTERM/SIGINT); `demo` and the in-process tests start it too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::info;

use crate::admin::AdminState;
use crate::cache::{Cache, ClassRules};
use crate::config::{Config, ConfigSource};
use crate::front::http::HttpFront;
use crate::front::{Gate, Resolver, TftpFront};
use crate::net::bind_tcp;
use crate::overrides::Overrides;
use crate::phones::PhonesService;
use crate::reload::Reloader;
use crate::tftp::server::{Server, ServerConfig};
use crate::upstream::flight::Fetcher;
use crate::upstream::UpstreamChain;

/// How long transfers, HTTP bodies and upstream flights in progress may take to finish after
/// the stop signal.
pub const DRAIN: Duration = Duration::from_secs(10);

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
        drain: DRAIN,
    }
}

/// How the appliance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The appliance: overrides, cache and upstream chain.
    Appliance,
    /// `serve --root DIR` alone: a plain read-only TFTP server of DIR, no cache.
    PlainDirectory,
}

/// The addresses the front ends are bound to (a port 0 in the config is resolved here).
#[derive(Debug, Clone, Default)]
pub struct LocalAddrs {
    pub tftp: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// A running appliance: every task it started, and the one stop signal they all watch.
pub struct Appliance {
    addrs: LocalAddrs,
    stop: watch::Sender<bool>,
    tftp: JoinHandle<std::io::Result<()>>,
    http: JoinSet<()>,
    sync: Option<JoinHandle<()>>,
    /// Writes the cache's hit counts back every few seconds.
    usage: Option<JoinHandle<()>>,
    phones: Option<PhonesService>,
    fetcher: Option<Arc<Fetcher>>,
    reloader: Reloader,
}

impl Appliance {
    /// Starts everything on the current runtime. `source` is the config file to watch and
    /// reload (with the command-line flags laid over it); `None` for embedded defaults.
    pub async fn start(
        cfg: Config,
        mode: Mode,
        source: Option<ConfigSource>,
    ) -> anyhow::Result<Appliance> {
        let gate = Gate::new(cfg.access.clone());
        let overrides = cfg
            .cache
            .overrides
            .is_dir()
            .then(|| Overrides::new(&cfg.cache.overrides));
        if let Some(o) = &overrides {
            info!("serving overrides from {}", o.root().display());
        }
        let fetcher = match mode {
            Mode::PlainDirectory => None,
            Mode::Appliance => Some(open_fetcher(&cfg).await?),
        };
        let server =
            Server::bind(server_config(&cfg)).context("cannot start the TFTP front end")?;
        let (stop, stop_rx) = watch::channel(false);
        let (sync, sync_task) = match &fetcher {
            Some(f) => {
                let (h, t) =
                    crate::sync::SyncWorker::start(f.clone(), cfg.sync.clone(), stop_rx.clone());
                (Some(h), Some(t))
            }
            None => (None, None),
        };
        let usage = fetcher
            .as_ref()
            .map(|f| tokio::spawn(f.cache().clone().write_usage_back(stopped(stop_rx.clone()))));
        let targets = crate::reload::Targets {
            gate: gate.clone(),
            fetcher: fetcher.clone(),
            sync: sync.clone(),
        };
        let reloader = crate::reload::watch(source, cfg.clone(), targets);
        let resolver = Arc::new(Resolver {
            overrides,
            fetcher: fetcher.clone(),
        });
        let phones = match &fetcher {
            Some(f) => Some(PhonesService::start(
                &cfg.phones,
                f.cache().clone(),
                resolver.overrides.clone(),
                stop_rx.clone(),
            )?),
            None => None,
        };
        let mut addrs = LocalAddrs::default();
        let mut http = JoinSet::new();
        if mode == Mode::Appliance {
            let admin = AdminState {
                started: std::time::Instant::now(),
                gate: gate.clone(),
                fetcher: fetcher.clone(),
                sync,
                phones: phones.as_ref().map(|p| p.view.clone()),
                auth: Arc::new(crate::admin::auth::AdminAuth::from_config(
                    cfg.admin.token_file.as_deref(),
                )?),
                verifying: Default::default(),
            };
            let phones_front = HttpFront {
                gate: gate.clone(),
                resolver: resolver.clone(),
            };
            start_http(&cfg, phones_front, admin, &stop_rx, &mut http, &mut addrs)?;
        }
        // The TFTP server: bound above, run here until the stop signal.
        addrs.tftp = server.local_addrs();
        for addr in &addrs.tftp {
            info!("TFTP listening on {addr}");
        }
        let front = Arc::new(TftpFront { gate, resolver });
        let tftp = tokio::spawn(server.run(front, stopped(stop_rx)));
        Ok(Appliance {
            addrs,
            stop,
            tftp,
            http,
            sync: sync_task,
            usage,
            phones,
            fetcher,
            reloader,
        })
    }

    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// Reads the config file and applies it now, as on SIGHUP. `false` if it was not applied.
    pub fn reload(&self) -> bool {
        self.reloader.reload()
    }

    /// Stops accepting work, lets what is in progress finish within [`DRAIN`], and joins every
    /// task.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        drop(self.reloader);
        let http = async {
            // HTTP bodies in flight get the same bounded wait as TFTP transfers.
            let drained = tokio::time::timeout(DRAIN, async {
                while self.http.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                self.http.shutdown().await;
            }
        };
        let (tftp, ()) = tokio::join!(self.tftp, http);
        for task in [self.sync, self.usage].into_iter().flatten() {
            let _ = task.await;
        }
        if let Some(f) = &self.fetcher {
            let _ = tokio::time::timeout(DRAIN, f.flights_landed()).await;
        }
        if let Some(p) = self.phones {
            p.finish().await;
        }
        tftp??;
        Ok(())
    }
}

/// Runs the appliance in the foreground until a stop signal.
pub async fn serve(cfg: Config, mode: Mode, source: Option<ConfigSource>) -> anyhow::Result<()> {
    let app = Appliance::start(cfg, mode, source).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    shutdown_signal().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    app.shutdown().await?;
    info!("stopped");
    Ok(())
}

/// Opens the cache (repairing what a power cut left) and puts the upstream chain in front of it.
async fn open_fetcher(cfg: &Config) -> anyhow::Result<Arc<Fetcher>> {
    let rules = ClassRules::new(cfg.cache.classes.clone());
    let dir = cfg.cache.dir.clone();
    let max = cfg.cache.max_size;
    let (cache, report) = tokio::task::spawn_blocking(move || Cache::open(&dir, max, rules))
        .await?
        .with_context(|| format!("cannot open the cache in {}", cfg.cache.dir.display()))?;
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
    Ok(Fetcher::new(cache, chain, cfg.sync.negative_ttl))
}

/// Binds the phones' HTTP front and the admin endpoint and serves them until the stop signal.
fn start_http(
    cfg: &Config,
    phones: HttpFront,
    admin: AdminState,
    stop: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
    addrs: &mut LocalAddrs,
) -> anyhow::Result<()> {
    let gate = phones.gate.clone();
    let http = crate::front::http::router(phones);
    for addr in &cfg.http.listen {
        let listener = bind_tcp(*addr).with_context(|| format!("HTTP listen {addr}"))?;
        let local = listener.local_addr()?;
        info!("HTTP listening on {local}");
        addrs.http.push(local);
        tasks.spawn(serve_http(
            listener,
            http.clone(),
            (&cfg.http).into(),
            Some(gate.clone()),
            stop.clone(),
        ));
    }
    if let Some(addr) = cfg.admin.listen {
        let listener = bind_tcp(addr).with_context(|| format!("admin listen {addr}"))?;
        let local = listener.local_addr()?;
        info!("admin endpoint on http://{local}");
        addrs.admin = Some(local);
        let router = crate::admin::router(admin);
        tasks.spawn(serve_http(
            listener,
            router,
            (&cfg.http).into(),
            None,
            stop.clone(),
        ));
    }
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
