//! The `meshguard` command line: keys, config checks, the daemon, `policy check` and the
//! demo.

mod policy_check;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, NodeConfig};
use crate::identity::PrivateKey;
use crate::policy::{self, MtlsMode, PolicySet, Protocol};
use crate::telemetry::LogFormat;
use crate::{daemon, ops, telemetry};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

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
        /// `text` for people, `json` (one object per line) for log collectors.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show what a running daemon holds and counted: identities, peers, handshakes,
    /// traffic, allow-list decisions (read from the daemon's control socket).
    Status {
        /// The daemon's node file, to find its control socket.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket (default: the only one in /run/meshguard).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The whole report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the MeshNode CustomResourceDefinition (YAML) of Kubernetes mode.
    Crd,
    /// Bring up a two-node demo mesh in network namespaces, send traffic, clean up (root).
    Demo,
    /// Allow-list tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Explain the decision for a flow from a principal to a local identity.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Source principal (Istio or SPIFFE form).
        #[arg(long)]
        from: String,
        /// Destination: a local identity's principal, or an address it owns.
        #[arg(long)]
        to: String,
        /// `PORT/tcp`, `PORT/udp` or `icmp`.
        #[arg(long)]
        port: String,
        /// Source address, for policies with ip_blocks (default: none, which never
        /// matches an ALLOW ip_blocks condition).
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
    },
}

/// Loads the node file, its peers and its policy files: all valid, or an error.
fn load(path: &std::path::Path) -> Result<(NodeConfig, PolicySet)> {
    let config = config::load(path)?;
    let policy = policy::load_files(&config.policy.files)?;
    Ok((config, policy))
}

/// `--port`: `8080/tcp`, `53/udp` or `icmp`.
struct PortArg {
    protocol: Protocol,
    port: Option<u16>,
}

impl std::str::FromStr for PortArg {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(PortArg {
                protocol: Protocol::Icmp,
                port: None,
            });
        }
        let (number, protocol) = s
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("--port {s:?}: expected PORT/tcp, PORT/udp or icmp"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => anyhow::bail!("--port {s:?}: unknown protocol {other:?} (tcp or udp)"),
        };
        let port = number
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow::anyhow!("--port {s:?}: {number:?} is not a port (1-65535)"))?;
        Ok(PortArg {
            protocol,
            port: Some(port),
        })
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Genkey => {
            let key = zeroize::Zeroizing::new(PrivateKey::generate().to_base64());
            emit(&format!("{}\n", key.as_str()))?;
        }
        Command::Pubkey => {
            let mut input = String::new();
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut input)
                .context("reading the private key from stdin")?;
            let key = PrivateKey::from_base64(input.trim())
                .context("stdin does not hold a base64 private key")?;
            emit(&format!("{}\n", key.public_key()))?;
        }
        Command::Check { config } => {
            let (config, policy) = load(&config)?;
            let mut out = config::summary(&config);
            out.push_str(&format!("  policies loaded: {}\n", policy.policies.len()));
            for warning in &policy.warnings {
                out.push_str(&format!("  policy warning: {warning}\n"));
            }
            for identity in &config.identities {
                let namespace = identity.principal.namespace();
                let root = &config.policy.root_namespace;
                if policy.mtls_mode(root, namespace, &identity.labels) == MtlsMode::Strict {
                    out.push_str(&format!(
                        "  mTLS STRICT: {}: plaintext to its addresses is dropped (nftables \
                         table inet meshguard_{}; needs the nft command)\n",
                        identity.principal, config.interface.name
                    ));
                }
            }
            emit(&out)?;
        }
        Command::Up { config, log_format } => {
            telemetry::init(log_format);
            let (config, policy) = load(&config)?;
            daemon::run(config, policy)?;
        }
        Command::Status {
            config,
            socket,
            json,
        } => {
            let socket = match (socket, config) {
                (Some(socket), _) => socket,
                (None, Some(config)) => {
                    let config = config::load(&config)?;
                    config.operations.control_socket(&config.interface.name)
                }
                (None, None) => find_control_socket()?,
            };
            let status = daemon::fetch_status(&socket)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&status)?))?;
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                emit(&ops::status_text::render(&status, now))?;
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Check {
                    config,
                    from,
                    to,
                    port,
                    source_ip,
                },
        } => {
            let (config, policy) = load(&config)?;
            let port = port.parse::<PortArg>()?;
            let answer = policy_check::explain(
                &config,
                &policy,
                &from,
                &to,
                port.protocol,
                port.port,
                source_ip,
            )?;
            emit(&format!("{answer}\n"))?;
        }
        Command::Demo => demo()?,
        Command::Crd => crd()?,
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The control socket of the one daemon running, found in the default directory.
fn find_control_socket() -> Result<PathBuf> {
    let dir = std::path::Path::new(config::DEFAULT_CONTROL_DIR);
    let mut sockets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                .collect()
        })
        .unwrap_or_default();
    sockets.sort();
    match sockets.len() {
        1 => Ok(sockets.remove(0)),
        0 => anyhow::bail!(
            "no meshguard control socket in {}: is the daemon running? (or give --config or \
             --socket)",
            dir.display()
        ),
        _ => anyhow::bail!(
            "several daemons run ({}): say which with --socket or --config",
            sockets
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(feature = "kubernetes")]
fn crd() -> Result<()> {
    emit(&crate::kubernetes::crd_yaml())
}

#[cfg(not(feature = "kubernetes"))]
fn crd() -> Result<()> {
    anyhow::bail!("this meshguard was built without Kubernetes mode: build with `cargo build --features kubernetes`")
}

#[cfg(feature = "demo")]
fn demo() -> Result<()> {
    let binary = std::env::current_exe().context("locating this executable")?;
    crate::demo::run(&binary)
}

/// Release builds leave the demo's namespace tooling out.
#[cfg(not(feature = "demo"))]
fn demo() -> Result<()> {
    anyhow::bail!(
        "this meshguard was built without the demo: run scripts/demo.sh, or build with \
         `cargo build --features demo`"
    )
}

/// Runs the command line; errors are printed with their causes.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
