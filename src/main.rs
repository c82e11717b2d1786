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
    /// Run the appliance in the foreground: TFTP and HTTP front ends, admin endpoint, sync
    /// worker. SIGTERM/SIGINT finish transfers in flight and exit; SIGHUP reloads the config.
    Serve {
        /// Config file (default: $BRANCHTFTP_CONFIG, then /etc/branchtftp/branchtftp.yaml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// TFTP listen address, repeatable (overrides tftp.listen), e.g. 0.0.0.0:69 or [::]:69.
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Upstream server, repeatable, tried in order (replaces `upstreams`):
        /// http://HOST:PORT or tftp://HOST[:PORT].
        #[arg(long = "upstream", value_name = "URL")]
        upstream: Vec<String>,
        /// Cache directory (overrides cache.dir).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Overrides directory: local files that win over upstream copies (overrides
        /// cache.overrides). Alone, makes a plain read-only TFTP server of DIR.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Parse and validate the configuration; print the effective configuration.
    ///
    /// Exit 0 when valid; 2 when invalid, with every problem on stderr as
    /// FILE:LINE:COL: key: problem.
    CheckConfig {
        /// Configuration file (default: $BRANCHTFTP_CONFIG, else /etc/branchtftp/branchtftp.yaml
        /// if it exists, else the embedded defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the man page (roff) on stdout; used by packaging.
    #[command(hide = true)]
    Man,
    /// See what branchtftp does: a sample central server behind a simulated slow WAN, the
    /// appliance, and phones booting direct, through a cold cache and through a warm cache.
    Demo {
        /// Simulated phones booting at once.
        #[arg(long, default_value_t = 6)]
        phones: usize,
        /// WAN round-trip time.
        #[arg(long, default_value = "80ms", value_parser = humantime::parse_duration)]
        rtt: Duration,
        /// WAN bandwidth per direction, e.g. 10Mbit/s.
        #[arg(long, default_value = "10Mbit/s", value_parser = branchtftp::config::parse_rate)]
        rate: u64,
    },
    /// Show a running appliance's state (asks its admin endpoint).
    ///
    /// Exit 0 healthy, 1 unreachable or unhealthy, 3 running but no upstream reachable.
    Status {
        /// Admin endpoint (default: admin.listen of the config, else 127.0.0.1:9069).
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Print the raw JSON of /status.
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// The phones this box has seen: MAC, address, load, last boot and its duration, firmware
    /// progress, last error (asks the running appliance's admin endpoint).
    ///
    /// Exit 0, or 1 when the appliance cannot be asked.
    Phones {
        /// Admin endpoint (default: admin.listen of the config, else 127.0.0.1:9069).
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Print the JSON of GET /phones.
        #[arg(long)]
        json: bool,
        /// Only phones whose last boot did not finish or whose firmware download stopped.
        #[arg(long)]
        stuck: bool,
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Inspect and manage the cache: ls, verify, import DIR, evict NAME.
    Cache(branchtftp::cache::cli::CacheArgs),
    /// One full sync pass now (pre-seed a new box), with progress, then a summary table.
    ///
    /// Exit 0 when the central server answered, 1 when it was unreachable, 2 on a setup problem.
    Sync(branchtftp::sync::cli::SyncArgs),
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
        Command::CheckConfig { config } => {
            return ExitCode::from(branchtftp::config::check_config(config.as_deref()) as u8)
        }
        Command::Status {
            admin,
            json,
            config,
        } => {
            let admin = match admin {
                Some(a) => a,
                None => match load_config(config.as_deref()) {
                    Ok(cfg) => cfg
                        .admin
                        .listen
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "127.0.0.1:9069".to_string()),
                    Err(e) => {
                        eprintln!("branchtftp: {e:#}");
                        return ExitCode::from(2);
                    }
                },
            };
            return match runtime() {
                Ok(rt) => ExitCode::from(
                    rt.block_on(branchtftp::admin::status_command(&admin, json)) as u8,
                ),
                Err(e) => {
                    eprintln!("branchtftp: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Phones {
            admin,
            json,
            stuck,
            config,
        } => {
            let admin = match admin {
                Some(a) => a,
                None => match load_config(config.as_deref()) {
                    Ok(cfg) => branchtftp::admin::default_admin(&cfg),
                    Err(e) => {
                        eprintln!("branchtftp: {e:#}");
                        return ExitCode::from(2);
                    }
                },
            };
            return match runtime() {
                Ok(rt) => ExitCode::from(
                    rt.block_on(branchtftp::phones::cli::run(&admin, json, stuck)) as u8,
                ),
                Err(e) => {
                    eprintln!("branchtftp: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Demo { phones, rtt, rate } => {
            branchtftp::logging::init(branchtftp::config::LogLevel::Warn);
            let opts = branchtftp::demo::DemoOptions { phones, rtt, rate };
            runtime().and_then(|rt| rt.block_on(branchtftp::demo::run(opts)))
        }
        Command::Man => {
            return match branchtftp::manpage::render(&Cli::command(), &mut std::io::stdout().lock())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("branchtftp man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Sync(args) => {
            branchtftp::logging::init(branchtftp::config::LogLevel::Warn);
            return match runtime().and_then(|rt| rt.block_on(branchtftp::sync::cli::run(&args))) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("branchtftp: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Serve {
            config,
            listen,
            upstream,
            cache_dir,
            root,
        } => (|| {
            let flags = branchtftp::config::ServeFlags {
                config,
                listen,
                upstream,
                cache_dir,
                root,
            };
            let setup = flags.setup()?;
            branchtftp::logging::init(setup.config.log);
            let mode = if setup.plain {
                branchtftp::app::Mode::PlainDirectory
            } else {
                branchtftp::app::Mode::Appliance
            };
            runtime()?.block_on(branchtftp::app::serve(setup.config, mode, setup.source))
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
