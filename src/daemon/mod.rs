//! The running daemon: wires the sans-IO node to the TUN device and the UDP socket.
//!
//! One task owns the node and serves the TUN device, the socket, the node's timer and
//! signals in turn. Speed-ups (batches, offloads, several workers) come in later; the
//! node's in-place, buffer-based interface is already shaped for them.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::NodeConfig;
use crate::io::{netconf, tun::Tun, udp};
use crate::node::{Egress, Ingress, Node, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
use crate::proto::DeviceConfig;

/// Largest IP packet read from the TUN device.
const MAX_PACKET: usize = 65535;

/// Runs the daemon for `config` until SIGINT or SIGTERM.
pub fn run(config: NodeConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
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

async fn serve(config: NodeConfig) -> Result<()> {
    let mut node = Node::new(&config, DeviceConfig::default(), Instant::now(), unix_now());
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut report = signal(SignalKind::user_defined1())?;
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
            _ = report.recv() => tracing::info!(counters = %node.counters(), "counters"),
        }
        while let Some(transmit) = node.poll_transmit() {
            send(&socket, &transmit.data, transmit.destination).await;
        }
        node.log_events();
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
