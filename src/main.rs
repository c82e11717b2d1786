//! The `branchtftp` binary: argument parsing and dispatch only.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "branchtftp",
    version,
    about = "Caching branch TFTP/HTTP appliance for Cisco IP phones"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and manage the cache: ls, verify, import DIR, evict NAME
    Cache(branchtftp::cache::cli::CacheArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let code = match cli.command {
        Command::Cache(args) => match branchtftp::cache::cli::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}
