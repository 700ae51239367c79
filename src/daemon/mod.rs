//! The running daemon: wires the sans-IO node to the TUN device and the UDP socket.
//!
//! One task owns the node and serves the TUN device, the socket, the node's timer and
//! signals in turn. Speed-ups (batches, offloads, several workers) come in later; the
//! node's in-place, buffer-based interface is already shaped for them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::NodeConfig;
use crate::io::{netconf, tun::Tun, udp};
use crate::node::{Egress, Ingress, Node, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
use crate::policy::{self, PolicySet};
use crate::proto::DeviceConfig;

/// Largest IP packet read from the TUN device.
const MAX_PACKET: usize = 65535;
/// How often policy files are checked for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the daemon for `config` and its loaded allow list until SIGINT or SIGTERM.
pub fn run(config: NodeConfig, policy: PolicySet) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, policy))
}

/// What identifies a version of the policy files: (modified time, length) of each.
type PolicyStamp = Vec<Option<(SystemTime, u64)>>;

fn policy_stamp(files: &[PathBuf]) -> PolicyStamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn log_policy(node: &Node, policy: &PolicySet) {
    for warning in &policy.warnings {
        tracing::warn!(%warning, "policy adjusted");
    }
    for (index, local) in node.locals().iter().enumerate() {
        let selected = node.policy().selected_by_allow(index);
        tracing::info!(
            identity = %local.principal,
            selected_by_allow_policy = selected,
            strict = node.policy().is_strict(index),
            "allow list"
        );
    }
}

/// Reloads the policy files; a broken file leaves the running policy in place.
fn reload_policy(node: &mut Node, config: &NodeConfig, why: &str) {
    match policy::load_files(&config.policy.files, &config.policy.root_namespace) {
        Ok(policy) => {
            let revoked = node.set_policy(&policy);
            tracing::info!(
                trigger = why,
                policies = policy.policies.len(),
                revoked_flows = revoked,
                "policy reloaded"
            );
            log_policy(node, &policy);
        }
        Err(e) => tracing::error!(
            trigger = why,
            error = %e,
            "policy reload failed; the previous policy stays in force"
        ),
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Creates the TUN device with its addresses and a route for every peer's allowed IPs.
fn setup_interface(config: &NodeConfig) -> Result<Tun> {
    let interface = &config.interface;
    let tun = Tun::create(&interface.name, interface.mtu)
        .with_context(|| format!("creating TUN device {}", interface.name))?;
    for address in &interface.addresses {
        netconf::add_address(tun.name(), address)?;
    }
    for peer in &config.peers {
        for identity in &peer.identities {
            for net in &identity.allowed_ips {
                netconf::add_route(tun.name(), net)?;
            }
        }
    }
    Ok(tun)
}

async fn serve(config: NodeConfig, policy: PolicySet) -> Result<()> {
    let mut node = Node::new(
        &config,
        &policy,
        DeviceConfig::default(),
        Instant::now(),
        unix_now(),
    );
    log_policy(&node, &policy);
    let mut policy_version = policy_stamp(&config.policy.files);
    let mut policy_poll = tokio::time::interval(POLICY_POLL_INTERVAL);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut report = signal(SignalKind::user_defined1())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let socket = udp::bind(config.listen)
        .await
        .with_context(|| format!("binding UDP {}", config.listen))?;
    // If anything below fails, the device is dropped and the kernel removes it.
    let tun = setup_interface(&config)?;
    tracing::info!(
        node = %config.name,
        listen = %socket.local_addr()?,
        interface = %tun.name(),
        identities = node.locals().len(),
        peer_identities = node.peers().len(),
        "meshguard is up"
    );

    let mut from_tun = vec![0u8; TRANSPORT_HEADER_LEN + MAX_PACKET + SEAL_TAILROOM];
    let mut from_net = vec![0u8; 65536];
    loop {
        let wake = node
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            read = tun.recv(&mut from_tun[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + MAX_PACKET]) => {
                let len = read.context("reading from the TUN device")?;
                if let Egress::Send { destination, len } = node.egress(Instant::now(), &mut from_tun, len) {
                    send(&socket, &from_tun[..len], destination).await;
                }
            }
            received = socket.recv_from(&mut from_net) => {
                match received {
                    Ok((len, source)) => {
                        if let Ingress::Deliver { packet, .. } = node.ingress(Instant::now(), source, &mut from_net[..len]) {
                            if let Err(e) = tun.send(&from_net[packet]).await {
                                tracing::debug!(error = %e, "writing to the TUN device failed");
                            }
                        }
                    }
                    // ICMP errors from earlier sends surface here; they are not fatal.
                    Err(e) => tracing::debug!(error = %e, "UDP receive error"),
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => node.handle_timeout(Instant::now()),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = report.recv() => {
                for line in node.decision_counters() {
                    tracing::info!(decisions = %line, "allow-list decisions");
                }
                tracing::info!(counters = %node.counters(), "counters");
            }
            _ = hangup.recv() => {
                policy_version = policy_stamp(&config.policy.files);
                reload_policy(&mut node, &config, "SIGHUP");
            }
            _ = policy_poll.tick() => {
                let stamp = policy_stamp(&config.policy.files);
                if stamp != policy_version {
                    policy_version = stamp;
                    reload_policy(&mut node, &config, "policy file changed");
                }
            }
        }
        while let Some(transmit) = node.poll_transmit() {
            send(&socket, &transmit.data, transmit.destination).await;
        }
        node.log_events();
    }
    for line in node.decision_counters() {
        tracing::info!(decisions = %line, "allow-list decisions");
    }
    tracing::info!(counters = %node.counters(), "meshguard stopping");
    drop(tun);
    Ok(())
}

async fn send(socket: &udp::UdpSocket, datagram: &[u8], destination: SocketAddr) {
    if let Err(e) = socket.send_to(datagram, destination).await {
        tracing::debug!(error = %e, %destination, "UDP send failed");
    }
}
