//! The `meshguard` command line: keys, config checks, the daemon and the demo.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use meshguard::identity::PrivateKey;

#[derive(Parser)]
#[command(
    version,
    about = "Identity-aware encrypted overlay: WireGuard-compatible tunnels per workload identity"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new base64 private key (as `wg genkey`).
    Genkey,
    /// Read a base64 private key on stdin and print its public key (as `wg pubkey`).
    Pubkey,
    /// Validate a node file and its peer files, and print a summary.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the daemon in the foreground until SIGINT or SIGTERM.
    Up {
        #[arg(long)]
        config: PathBuf,
    },
    /// Bring up a two-node demo mesh in network namespaces, send traffic, clean up (root).
    Demo,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Genkey => println!("{}", PrivateKey::generate().to_base64()),
        Command::Pubkey => {
            let mut input = String::new();
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut input)
                .context("reading the private key from stdin")?;
            let key = PrivateKey::from_base64(input.trim())
                .context("stdin does not hold a base64 private key")?;
            println!("{}", key.public_key());
        }
        Command::Check { config } => {
            let config = meshguard::config::load(&config)?;
            print!("{}", meshguard::config::summary(&config));
        }
        Command::Up { config } => {
            meshguard::telemetry::init();
            let config = meshguard::config::load(&config)?;
            meshguard::daemon::run(config)?;
        }
        Command::Demo => {
            let binary = std::env::current_exe().context("locating this executable")?;
            meshguard::demo::run(&binary)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
