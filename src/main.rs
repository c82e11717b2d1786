//! The `branchtftp` binary: parses arguments and dispatches; the work lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use branchtftp::config::Config;

#[derive(Parser)]
#[command(
    name = "branchtftp",
    version,
    about = "Caching branch TFTP/HTTP server for Cisco IP phones"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance in the foreground (TFTP front end serving the overrides directory).
    Serve {
        /// Config file (default: $BRANCHTFTP_CONFIG, then /etc/branchtftp/branchtftp.yaml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// TFTP listen address, repeatable (overrides tftp.listen), e.g. 0.0.0.0:69 or [::]:69.
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Directory of local files served read-only (overrides cache.overrides).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Inspect and manage the cache: ls, verify, import DIR, evict NAME.
    Cache(branchtftp::cache::cli::CacheArgs),
    /// Parse and validate the configuration; print the effective configuration.
    ///
    /// Exit 0 when valid; 2 when invalid, with every problem on stderr as
    /// FILE:LINE:COL: key: problem.
    CheckConfig {
        /// Config file (default: $BRANCHTFTP_CONFIG, then /etc/branchtftp/branchtftp.yaml, else
        /// the embedded defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the man page (roff) on stdout; packaging gzips it into branchtftp.1.gz.
    #[command(hide = true)]
    Man,
    /// Download one file: tftp://HOST[:PORT]/NAME or http://HOST:PORT/NAME.
    Get {
        url: String,
        /// Output file ("-" or omitted: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long)]
        blksize: Option<u16>,
        #[arg(long)]
        windowsize: Option<u16>,
        /// Retransmit timeout, e.g. 1s or 500ms.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Transfer in netascii mode (TFTP only).
        #[arg(long)]
        netascii: bool,
    },
}

fn load_config(explicit: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match Config::locate(explicit) {
        Some(path) => Ok(Config::load(&path)?),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Cache(args) => {
            branchtftp::logging::init(branchtftp::config::LogLevel::Info);
            return match branchtftp::cache::cli::run(&args) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("branchtftp: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::CheckConfig { config } => {
            let code = branchtftp::config::check_config(config.as_deref());
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
        Command::Man => branchtftp::manpage::render(&Cli::command(), &mut std::io::stdout().lock())
            .context("cannot write the man page"),
        Command::Serve {
            config,
            listen,
            root,
        } => (|| {
            let mut cfg = load_config(config.as_deref())?;
            if !listen.is_empty() {
                cfg.tftp.listen = listen;
            }
            if let Some(root) = root {
                anyhow::ensure!(root.is_dir(), "--root {}: not a directory", root.display());
                cfg.cache.overrides = root;
            }
            branchtftp::logging::init(cfg.log);
            runtime()?.block_on(branchtftp::app::serve(cfg))
        })(),
        Command::Get {
            url,
            output,
            blksize,
            windowsize,
            timeout,
            netascii,
        } => {
            branchtftp::logging::init(branchtftp::config::LogLevel::Warn);
            let opts = branchtftp::get::GetOptions {
                blksize,
                windowsize,
                timeout,
                netascii,
            };
            runtime()
                .and_then(|rt| rt.block_on(branchtftp::get::run(&url, output.as_deref(), &opts)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("branchtftp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
