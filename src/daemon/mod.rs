//! The running daemon: wires the sans-IO node to the TUN device and the UDP socket.
//!
//! One task owns the node and serves the TUN device, the socket, the node's timer and
//! signals in turn, a batch at a time. A TUN read yields up to a 64 KiB super packet cut
//! into segments (offload); each is sealed in place and runs of equal-sized datagrams for
//! one peer leave in one send (UDP GSO). A socket wake-up drains several receives of many
//! datagrams each (recvmmsg, UDP GRO); their plaintexts reach the TUN device in coalescing
//! writes.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::BytesMut;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::NodeConfig;
use crate::io::netconf;
use crate::io::tun::{GROTable, Tun, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use crate::io::udp::{RecvMeta, Udp};
use crate::node::{Egress, Ingress, Node, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
use crate::policy::{self, PolicySet};
use crate::proto::DeviceConfig;

/// Largest IP packet (or super packet) read from the TUN device.
const MAX_PACKET: usize = 65535;
/// Largest UDP receive (one datagram, or several coalesced by GRO).
const MAX_DATAGRAM: usize = 65536;
/// Receive buffers per receive call (recvmmsg).
const RECEIVE_SLOTS: usize = 8;
/// Receive calls per socket wake-up, so the TUN side gets its turn.
const RECEIVES_PER_WAKE: usize = 4;
/// Room for the segments of one 64 KiB super packet at the smallest MTU (576).
const SEGMENTS_PER_SUPER_PACKET: usize = 65535 / 536 + 1;
/// Bytes of datagrams in one segmented send.
const MAX_GSO_BYTES: usize = 64_000;

/// Reusable buffers for batches in both directions: nothing is allocated per packet.
struct Buffers {
    /// A raw TUN read: virtio header and super packet.
    tun_read: Vec<u8>,
    /// Segments from the TUN device, each with transport-header room in front and
    /// sealing room behind.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Sealed segments for one peer, back to back, for one segmented send.
    gso: Vec<u8>,
    /// Datagrams from the network, decrypted in place.
    received: Vec<Vec<u8>>,
    meta: [RecvMeta; RECEIVE_SLOTS],
    /// Plaintexts for the TUN device, each after virtio-header room.
    to_tun: Vec<BytesMut>,
    gro: GROTable,
}

impl Buffers {
    fn new(mtu: u16) -> Self {
        let segment = TRANSPORT_HEADER_LEN + usize::from(mtu).max(1500) + SEAL_TAILROOM;
        Buffers {
            tun_read: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            segments: vec![vec![0; segment]; SEGMENTS_PER_SUPER_PACKET * 2],
            sizes: vec![0; SEGMENTS_PER_SUPER_PACKET * 2],
            gso: vec![0; MAX_GSO_BYTES],
            received: vec![vec![0; MAX_DATAGRAM]; RECEIVE_SLOTS],
            meta: [RecvMeta::default(); RECEIVE_SLOTS],
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
    let socket = Udp::bind(config.listen)
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
    let mut tun_errors = TunErrors::default();
    loop {
        let wake = node
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let b = &mut buffers;
        tokio::select! {
            read = tun.recv_batch(&mut b.tun_read, &mut b.segments, &mut b.sizes, TRANSPORT_HEADER_LEN) => {
                match read {
                    Ok(first) => {
                        tun_errors.clear();
                        let count = read_more(&tun, b, first);
                        seal_and_send(&socket, &mut node, b, count).await;
                    }
                    // A super packet that cannot be cut up (say, too many segments for a tiny
                    // MSS) is dropped; a device that keeps failing ends the daemon.
                    Err(e) => tun_errors.record(e)?,
                }
            }
            ready = socket.readable() => {
                if let Err(e) = ready {
                    tracing::debug!(error = %e, "UDP socket error");
                }
                receive_and_deliver(&socket, &mut node, &tun, b).await;
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
            send(&socket, &transmit.data, transmit.destination, None).await;
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

/// Failed TUN reads in a row: a few are dropped packets, many mean the device is gone.
#[derive(Default)]
struct TunErrors {
    in_a_row: u32,
    last_logged: Option<Instant>,
}

impl TunErrors {
    const FATAL_IN_A_ROW: u32 = 1000;

    fn clear(&mut self) {
        self.in_a_row = 0;
    }

    fn record(&mut self, error: std::io::Error) -> Result<()> {
        self.in_a_row += 1;
        if self.in_a_row >= Self::FATAL_IN_A_ROW {
            return Err(anyhow::Error::new(error).context(format!(
                "reading from the TUN device failed {} times in a row",
                self.in_a_row
            )));
        }
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.last_logged = Some(now);
            tracing::warn!(error = %error, "reading from the TUN device failed; packet dropped");
        }
        Ok(())
    }
}

/// Datagrams for one peer, back to back in `Buffers::gso`, to leave in one send: all of
/// one size but the last, which may be shorter.
#[derive(Default)]
struct SegmentRun {
    destination: Option<SocketAddr>,
    segment: usize,
    count: usize,
    bytes: usize,
    /// A shorter datagram ended the run.
    closed: bool,
}

impl SegmentRun {
    fn accepts(&self, destination: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.destination == Some(destination)
                && !self.closed
                && self.count < max_segments
                && len <= self.segment
                && self.bytes + len <= MAX_GSO_BYTES)
    }

    fn push(&mut self, destination: SocketAddr, len: usize) {
        if self.count == 0 {
            self.destination = Some(destination);
            self.segment = len;
        }
        self.closed = len < self.segment;
        self.count += 1;
        self.bytes += len;
    }

    async fn flush(&mut self, socket: &Udp, gso: &[u8]) {
        if let Some(destination) = self.destination.filter(|_| self.count > 0) {
            let segment = (self.count > 1).then_some(self.segment);
            send(socket, &gso[..self.bytes], destination, segment).await;
        }
        *self = SegmentRun::default();
    }
}

/// After a read that returned `count` segments, reads whatever else the TUN device has
/// ready, as long as a whole super packet still fits, so that single packets (UDP, ICMP)
/// batch up as well. Returns the total.
fn read_more(tun: &Tun, b: &mut Buffers, mut count: usize) -> usize {
    while b.segments.len() - count >= SEGMENTS_PER_SUPER_PACKET {
        match tun.try_recv_batch(
            &mut b.tun_read,
            &mut b.segments[count..],
            &mut b.sizes[count..],
            TRANSPORT_HEADER_LEN,
        ) {
            Ok(more) => count += more,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "reading from the TUN device failed");
                }
                break;
            }
        }
    }
    count
}

/// Seals the `count` segments read from the TUN device and sends them, runs of
/// equal-sized datagrams for one peer in one call.
async fn seal_and_send(socket: &Udp, node: &mut Node, b: &mut Buffers, count: usize) {
    let now = Instant::now();
    let max_segments = socket.max_segments().max(1);
    let mut run = SegmentRun::default();
    for (segment, &len) in b.segments.iter_mut().zip(&b.sizes).take(count) {
        let Egress::Send { destination, len } = node.egress(now, segment, len) else {
            continue;
        };
        if !run.accepts(destination, len, max_segments) {
            run.flush(socket, &b.gso).await;
        }
        b.gso[run.bytes..run.bytes + len].copy_from_slice(&segment[..len]);
        run.push(destination, len);
    }
    run.flush(socket, &b.gso).await;
}

/// Drains the socket for a while without blocking: each authenticated plaintext is
/// copied behind virtio-header room into `to_tun`, which goes to the TUN device whenever
/// it is full and at the end.
async fn receive_and_deliver(socket: &Udp, node: &mut Node, tun: &Tun, b: &mut Buffers) {
    let mut delivered = 0;
    for _ in 0..RECEIVES_PER_WAKE {
        let mut buffers = b.received.iter_mut();
        let mut slices: [IoSliceMut; RECEIVE_SLOTS] = std::array::from_fn(|_| {
            IoSliceMut::new(buffers.next().expect("one buffer per receive slot"))
        });
        let received = match socket.try_recv(&mut slices, &mut b.meta) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors from earlier sends surface here; they are not fatal.
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        let now = Instant::now();
        for (buffer, meta) in b.received.iter_mut().zip(&b.meta).take(received) {
            if meta.len == 0 {
                // An empty datagram: not a message; the node counts it as malformed.
                node.ingress(now, meta.addr, &mut []);
                continue;
            }
            // Without GRO the stride is the whole datagram.
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            for datagram in buffer[..meta.len].chunks_mut(stride) {
                let Ingress::Deliver { packet, .. } = node.ingress(now, meta.addr, datagram) else {
                    continue;
                };
                if delivered == b.to_tun.len() {
                    write_to_tun(tun, &mut b.gro, &mut b.to_tun[..delivered]).await;
                    delivered = 0;
                }
                let out = &mut b.to_tun[delivered];
                out.clear();
                out.extend_from_slice(&[0; VIRTIO_NET_HDR_LEN]);
                out.extend_from_slice(&datagram[packet]);
                delivered += 1;
            }
        }
    }
    write_to_tun(tun, &mut b.gro, &mut b.to_tun[..delivered]).await;
}

async fn write_to_tun(tun: &Tun, gro: &mut GROTable, packets: &mut [BytesMut]) {
    if packets.is_empty() {
        return;
    }
    if let Err(e) = tun.send_batch(gro, packets, VIRTIO_NET_HDR_LEN).await {
        tracing::debug!(error = %e, "writing to the TUN device failed");
    }
}

async fn send(socket: &Udp, datagrams: &[u8], destination: SocketAddr, segment: Option<usize>) {
    if let Err(e) = socket.send(destination, datagrams, segment).await {
        tracing::debug!(error = %e, %destination, "UDP send failed");
    }
}
