//! The `branchtftp` binary: argument parsing and dispatch only (see `lib.rs` for the map).

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::CheckConfig { config } => branchtftp::config::check_config(config.as_deref()),
        Command::Man => {
            match branchtftp::manpage::render(&Cli::command(), &mut std::io::stdout().lock()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("branchtftp man: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
