//! Where the running configuration comes from: the file `serve` found (`-c`, `BRANCHTFTP_CONFIG`
//! or the default path) and `serve`'s command-line flags laid over it, now and at every reload,
//! so a flag always wins over the file. Also whether `serve` runs as a plain read-only TFTP
//! server of one directory (`serve --root DIR` with nothing else: no file, no upstream, no cache
//! directory) rather than the appliance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::{Config, ConfigError, UpstreamConfig};

/// The config file and the flags laid over it, which a reload applies again.
#[derive(Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overlay: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl ConfigSource {
    /// A file with nothing laid over it.
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            path: path.into(),
            overlay: Arc::new(|_| {}),
        }
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut cfg = Config::load(&self.path)?;
        (self.overlay)(&mut cfg);
        Ok(cfg)
    }
}

/// `serve`'s flags (`-c`, `--listen`, `--upstream`, `--cache-dir`, `--root`).
#[derive(Debug, Clone, Default)]
pub struct ServeFlags {
    pub config: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub upstream: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    pub root: Option<PathBuf>,
}

/// What `serve` runs with.
pub struct ServeSetup {
    /// The file (or the embedded defaults) with the flags laid over it.
    pub config: Config,
    /// `serve --root DIR` alone: a plain read-only TFTP server of DIR, no cache.
    pub plain: bool,
    /// The file to watch and reload; `None` on the embedded defaults.
    pub source: Option<ConfigSource>,
}

#[derive(Debug, Error)]
pub enum FlagsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--root {0}: not a directory")]
    RootNotADirectory(PathBuf),
}

impl ServeFlags {
    /// Finds and reads the config file once, and lays the flags over it.
    pub fn setup(self) -> Result<ServeSetup, FlagsError> {
        if let Some(root) = &self.root {
            if !root.is_dir() {
                return Err(FlagsError::RootNotADirectory(root.clone()));
            }
        }
        let located = Config::locate(self.config.as_deref());
        let mut config = match &located {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let plain = self.root.is_some()
            && located.is_none()
            && self.upstream.is_empty()
            && self.cache_dir.is_none();
        let overlay = move |cfg: &mut Config| self.lay_over(cfg);
        overlay(&mut config);
        Ok(ServeSetup {
            config,
            plain,
            source: located.map(|path| ConfigSource {
                path,
                overlay: Arc::new(overlay),
            }),
        })
    }

    fn lay_over(&self, cfg: &mut Config) {
        if !self.listen.is_empty() {
            cfg.tftp.listen = self.listen.clone();
        }
        if !self.upstream.is_empty() {
            cfg.upstreams = self.upstream.iter().map(UpstreamConfig::new).collect();
        }
        if let Some(dir) = &self.cache_dir {
            cfg.cache.dir = dir.clone();
        }
        if let Some(root) = &self.root {
            cfg.cache.overrides = root.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_alone_is_a_plain_directory_server_and_flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let flags = ServeFlags {
            config: None,
            root: Some(dir.path().to_path_buf()),
            ..ServeFlags::default()
        };
        // No BRANCHTFTP_CONFIG in the test environment is assumed only for `config: None`
        // resolving to the default path, which does not exist on a build machine.
        if std::env::var_os("BRANCHTFTP_CONFIG").is_some()
            || std::path::Path::new(super::super::DEFAULT_PATH).exists()
        {
            return;
        }
        let s = flags.setup().unwrap();
        assert!(s.plain);
        assert_eq!(s.config.cache.overrides, dir.path());

        let file = dir.path().join("branchtftp.yaml");
        std::fs::write(&file, "upstreams:\n  - url: http://central.example:6970\n").unwrap();
        let s = ServeFlags {
            config: Some(file),
            upstream: vec!["tftp://alt.example".into()],
            ..ServeFlags::default()
        }
        .setup()
        .unwrap();
        assert!(!s.plain);
        assert_eq!(s.config.upstreams[0].url, "tftp://alt.example");
        let again = s.source.unwrap().load().unwrap();
        assert_eq!(
            again.upstreams[0].url, "tftp://alt.example",
            "a reload lays the flags over again"
        );
    }

    #[test]
    fn root_that_is_not_a_directory_is_refused() {
        let e = ServeFlags {
            root: Some("/nonexistent/branchtftp-root".into()),
            ..ServeFlags::default()
        }
        .setup()
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "--root /nonexistent/branchtftp-root: not a directory"
        );
    }
}
