//! Wiring and lifecycle of the appliance: binds the front ends, runs until SIGTERM/SIGINT, then
//! lets transfers in flight finish (bounded) and exits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::config::Config;
use crate::front::{Gate, TftpFront};
use crate::overrides::Overrides;
use crate::tftp::server::{Server, ServerConfig};

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
        retries: cfg.tftp.retries,
        drain: Duration::from_secs(10),
    }
}

/// Runs the appliance in the foreground until a stop signal.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let gate = Gate::new(cfg.access.clone());
    let overrides = cfg
        .cache
        .overrides
        .is_dir()
        .then(|| Overrides::new(&cfg.cache.overrides));
    let server = Server::bind(server_config(&cfg)).context("cannot start the TFTP front end")?;
    for addr in server.local_addrs() {
        info!("TFTP listening on {addr}");
    }
    if let Some(o) = &overrides {
        info!("serving overrides from {}", o.root().display());
    }
    let front = Arc::new(TftpFront { gate, overrides });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    server.run(front, shutdown_signal()).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("stopped");
    Ok(())
}
