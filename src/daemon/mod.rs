//! The running daemon: wires the sans-IO node to the TUN device and the UDP socket.
//!
//! One task owns the node and serves the TUN device, the socket, the node's timer and
//! signals in turn, a batch at a time: a TUN read yields up to a 64 KiB super packet cut
//! into segments (offload), each sealed in place; a socket wake-up drains up to a batch
//! of datagrams, and their plaintexts go to the TUN device in one coalescing write.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::BytesMut;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::NodeConfig;
use crate::io::tun::{GROTable, Tun, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use crate::io::{netconf, udp};
use crate::node::{Egress, Ingress, Node, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
use crate::policy::{self, PolicySet};
use crate::proto::DeviceConfig;

/// Largest IP packet (or super packet) read from the TUN device.
const MAX_PACKET: usize = 65535;
/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65536;

/// Reusable buffers for batches in both directions: nothing is allocated per packet.
struct Buffers {
    /// A raw TUN read: virtio header and super packet.
    tun_read: Vec<u8>,
    /// Segments from the TUN device, each with transport-header room in front and
    /// sealing room behind.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// One datagram from the network, decrypted in place.
    datagram: Vec<u8>,
    /// Plaintexts for the TUN device, each after virtio-header room.
    to_tun: Vec<BytesMut>,
    gro: GROTable,
}

impl Buffers {
    fn new(mtu: u16) -> Self {
        let segment = TRANSPORT_HEADER_LEN + usize::from(mtu).max(1500) + SEAL_TAILROOM;
        Buffers {
            tun_read: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            segments: vec![vec![0; segment]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            datagram: vec![0; MAX_DATAGRAM],
            to_tun: (0..IDEAL_BATCH_SIZE)
                .map(|_| BytesMut::with_capacity(VIRTIO_NET_HDR_LEN + MAX_PACKET))
                .collect(),
            gro: GROTable::default(),
        }
    }
}
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
    let tun = Tun::create(&interface.name, interface.mtu, interface.offload)
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

    let mut buffers = Buffers::new(config.interface.mtu);
    loop {
        let wake = node
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let b = &mut buffers;
        tokio::select! {
            read = tun.recv_batch(&mut b.tun_read, &mut b.segments, &mut b.sizes, TRANSPORT_HEADER_LEN) => {
                let count = read.context("reading from the TUN device")?;
                let now = Instant::now();
                for (segment, &len) in b.segments.iter_mut().zip(&b.sizes).take(count) {
                    if let Egress::Send { destination, len } = node.egress(now, segment, len) {
                        send(&socket, &segment[..len], destination).await;
                    }
                }
            }
            ready = socket.readable() => {
                if let Err(e) = ready {
                    tracing::debug!(error = %e, "UDP socket error");
                }
                let delivered = receive_batch(&socket, &mut node, b);
                if delivered > 0 {
                    if let Err(e) = tun.send_batch(&mut b.gro, &mut b.to_tun[..delivered], VIRTIO_NET_HDR_LEN).await {
                        tracing::debug!(error = %e, "writing to the TUN device failed");
                    }
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

/// Drains up to a batch of datagrams without blocking; each authenticated plaintext is
/// copied behind virtio-header room into `to_tun`. Returns how many are ready.
fn receive_batch(socket: &udp::UdpSocket, node: &mut Node, b: &mut Buffers) -> usize {
    let now = Instant::now();
    let mut delivered = 0;
    for _ in 0..IDEAL_BATCH_SIZE {
        let (len, source) = match socket.try_recv_from(&mut b.datagram) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors from earlier sends surface here; they are not fatal.
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        if let Ingress::Deliver { packet, .. } = node.ingress(now, source, &mut b.datagram[..len]) {
            let out = &mut b.to_tun[delivered];
            out.clear();
            out.extend_from_slice(&[0; VIRTIO_NET_HDR_LEN]);
            out.extend_from_slice(&b.datagram[packet]);
            delivered += 1;
        }
    }
    delivered
}

async fn send(socket: &udp::UdpSocket, datagram: &[u8], destination: SocketAddr) {
    if let Err(e) = socket.send_to(datagram, destination).await {
        tracing::debug!(error = %e, %destination, "UDP send failed");
    }
}
