//! The sans-IO node: ties the identity tables to the protocol tunnels.
//!
//! Egress: the source address picks the local identity (whose key seals), the
//! destination picks the peer identity (longest prefix over allowed IPs). Ingress: the
//! session proves the peer identity; its source must be inside that identity's allowed
//! IPs and its destination must belong to the session's local identity.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::NodeConfig;
use crate::identity::{PrefixTable, Principal, PublicKey};
use crate::packet;
use crate::proto::{self, Device, DeviceConfig, Event, Received, Sealed, TunnelId};

pub use crate::proto::{SEAL_TAILROOM, TRANSPORT_HEADER_LEN};

pub struct LocalIdentity {
    pub principal: Principal,
    pub public_key: PublicKey,
    pub addresses: Vec<IpNet>,
}

pub struct PeerIdentity {
    pub principal: Principal,
    /// The name of the peer node (its file) this identity lives on.
    pub node: String,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
}

/// Why the node dropped a packet, beyond the protocol's own reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteDrop {
    /// Not a parseable IPv4/IPv6 packet.
    NotIp,
    /// Egress: no local identity owns the source address.
    NoLocalIdentity,
    /// Egress: no peer identity's allowed IPs contain the destination.
    NoPeer,
    /// Ingress: the source is outside the sending identity's allowed IPs.
    SpoofedSource,
    /// Ingress: the destination does not belong to the session's local identity.
    WrongDestination,
}

#[derive(Debug, Default, Clone)]
pub struct RouteStats {
    pub not_ip: u64,
    pub no_local_identity: u64,
    pub no_peer: u64,
    pub spoofed_source: u64,
    pub wrong_destination: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl RouteStats {
    fn count(&mut self, drop: RouteDrop) {
        *match drop {
            RouteDrop::NotIp => &mut self.not_ip,
            RouteDrop::NoLocalIdentity => &mut self.no_local_identity,
            RouteDrop::NoPeer => &mut self.no_peer,
            RouteDrop::SpoofedSource => &mut self.spoofed_source,
            RouteDrop::WrongDestination => &mut self.wrong_destination,
        } += 1;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `buf[..len]` is a transport message for `destination`.
    Send {
        destination: SocketAddr,
        len: usize,
    },
    /// Waiting for a handshake; see `poll_transmit`.
    Queued,
    Dropped(Dropped),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingress {
    /// `buf[packet]` is an authenticated IP packet for the TUN device.
    Deliver {
        packet: Range<usize>,
        peer: usize,
        local: usize,
    },
    /// Handshake, cookie or keepalive; see `poll_transmit`.
    Control,
    Dropped(Dropped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Route(RouteDrop),
    Protocol(proto::Drop),
}

pub struct Node {
    device: Device,
    locals: Vec<LocalIdentity>,
    peers: Vec<PeerIdentity>,
    local_by_address: PrefixTable<usize>,
    peer_by_address: PrefixTable<usize>,
    /// Tunnel of (local, peer), at `local * peers.len() + peer`.
    tunnels: Vec<TunnelId>,
    /// (local, peer) of each tunnel, by tunnel index.
    pairs: Vec<(usize, usize)>,
    pub route_stats: RouteStats,
}

impl Node {
    /// Builds the node from a validated configuration: one tunnel per pair of local and
    /// peer identity. `now_unix` is the wall-clock time at `now`.
    pub fn new(
        config: &NodeConfig,
        device_config: DeviceConfig,
        now: Instant,
        now_unix: Duration,
    ) -> Self {
        let mut device = Device::new(device_config, now, now_unix);
        let mut locals = Vec::new();
        let mut local_by_address = PrefixTable::new();
        let mut local_ids = Vec::new();
        for (index, identity) in config.identities.iter().enumerate() {
            local_ids.push(device.add_local(identity.private_key.as_bytes()));
            for address in &identity.addresses {
                local_by_address.insert(*address, index);
            }
            locals.push(LocalIdentity {
                principal: identity.principal.clone(),
                public_key: identity.public_key,
                addresses: identity.addresses.clone(),
            });
        }
        let mut peers = Vec::new();
        let mut peer_by_address = PrefixTable::new();
        let mut peer_settings = Vec::new();
        for peer in &config.peers {
            for identity in &peer.identities {
                for net in &identity.allowed_ips {
                    peer_by_address.insert(*net, peers.len());
                }
                peer_settings.push((peer.endpoint, peer.persistent_keepalive));
                peers.push(PeerIdentity {
                    principal: identity.principal.clone(),
                    node: peer.name.clone(),
                    public_key: identity.public_key,
                    allowed_ips: identity.allowed_ips.clone(),
                });
            }
        }
        let mut tunnels = Vec::with_capacity(locals.len() * peers.len());
        let mut pairs = Vec::with_capacity(locals.len() * peers.len());
        for (local, local_id) in local_ids.iter().enumerate() {
            for (peer, identity) in peers.iter().enumerate() {
                let (endpoint, keepalive) = peer_settings[peer];
                let keepalive = keepalive.map(|s| Duration::from_secs(u64::from(s)));
                tunnels.push(device.add_tunnel(
                    now,
                    *local_id,
                    *identity.public_key.as_bytes(),
                    endpoint,
                    keepalive,
                ));
                pairs.push((local, peer));
            }
        }
        Node {
            device,
            locals,
            peers,
            local_by_address,
            peer_by_address,
            tunnels,
            pairs,
            route_stats: RouteStats::default(),
        }
    }

    pub fn locals(&self) -> &[LocalIdentity] {
        &self.locals
    }

    pub fn peers(&self) -> &[PeerIdentity] {
        &self.peers
    }

    pub fn protocol_stats(&self) -> &proto::Stats {
        &self.device.stats
    }

    fn drop_route(&mut self, drop: RouteDrop) -> Dropped {
        self.route_stats.count(drop);
        tracing::trace!(?drop, "dropped packet");
        Dropped::Route(drop)
    }

    /// Seals the IP packet at `buf[16..16 + len]` for the tunnel its addresses select.
    /// `buf` must hold `SEAL_TAILROOM` more bytes after it.
    pub fn egress(&mut self, now: Instant, buf: &mut [u8], len: usize) -> Egress {
        let Some(header) = packet::parse(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len])
        else {
            return Egress::Dropped(self.drop_route(RouteDrop::NotIp));
        };
        let Some((_, &local)) = self.local_by_address.longest_match(header.source) else {
            return Egress::Dropped(self.drop_route(RouteDrop::NoLocalIdentity));
        };
        let Some((_, &peer)) = self.peer_by_address.longest_match(header.destination) else {
            return Egress::Dropped(self.drop_route(RouteDrop::NoPeer));
        };
        let tunnel = self.tunnels[local * self.peers.len() + peer];
        match self.device.seal(now, tunnel, buf, len) {
            Sealed::Send { destination, len } => {
                self.route_stats.packets_out += 1;
                Egress::Send { destination, len }
            }
            Sealed::Queued => Egress::Queued,
            Sealed::Dropped(drop) => Egress::Dropped(Dropped::Protocol(drop)),
        }
    }

    /// Authenticates and decrypts a datagram in place, then applies cryptokey routing.
    pub fn ingress(&mut self, now: Instant, source: SocketAddr, datagram: &mut [u8]) -> Ingress {
        let (tunnel, plaintext) = match self.device.receive(now, source, datagram) {
            Received::Data { tunnel, plaintext } => (tunnel, plaintext),
            Received::Control => return Ingress::Control,
            Received::Dropped(drop) => return Ingress::Dropped(Dropped::Protocol(drop)),
        };
        let (local, peer) = self.pairs[tunnel.0];
        let Some(header) = packet::parse(&datagram[plaintext.clone()]) else {
            return Ingress::Dropped(self.drop_route(RouteDrop::NotIp));
        };
        let source_owner = self.peer_by_address.longest_match(header.source);
        if source_owner.map(|(_, &p)| p) != Some(peer) {
            return Ingress::Dropped(self.drop_route(RouteDrop::SpoofedSource));
        }
        let destination_owner = self.local_by_address.longest_match(header.destination);
        if destination_owner.map(|(_, &l)| l) != Some(local) {
            return Ingress::Dropped(self.drop_route(RouteDrop::WrongDestination));
        }
        self.route_stats.packets_in += 1;
        Ingress::Deliver {
            packet: plaintext.start..plaintext.start + header.len,
            peer,
            local,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<proto::Transmit> {
        self.device.poll_transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.device.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.device.handle_timeout(now);
    }

    /// Logs what happened since the last call, naming both identities of each tunnel.
    pub fn log_events(&mut self) {
        while let Some(event) = self.device.poll_event() {
            let tunnel = match &event {
                Event::HandshakeCompleted { tunnel, .. }
                | Event::Roamed { tunnel, .. }
                | Event::SessionExpired { tunnel }
                | Event::HandshakeGaveUp { tunnel, .. } => *tunnel,
            };
            let (local, peer) = self.pairs[tunnel.0];
            let local = &self.locals[local].principal;
            let peer_identity = &self.peers[peer];
            let (peer, node) = (&peer_identity.principal, &peer_identity.node);
            match event {
                Event::HandshakeCompleted { we_initiated, .. } => {
                    tracing::info!(%local, %peer, %node, we_initiated, "handshake completed")
                }
                Event::Roamed { from, .. } => {
                    tracing::info!(%local, %peer, %node, endpoint = %from, "peer roamed")
                }
                Event::SessionExpired { .. } => {
                    tracing::debug!(%local, %peer, %node, "session expired")
                }
                Event::HandshakeGaveUp {
                    dropped_packets, ..
                } => tracing::info!(
                    %local, %peer, %node, dropped_packets,
                    "no handshake response for 90 s; dropped queued packets"
                ),
            }
        }
    }

    /// One line of every counter, for logs and tests.
    pub fn counters(&self) -> String {
        let p = &self.device.stats;
        let r = &self.route_stats;
        format!(
            "packets_in={} packets_out={} handshakes_completed={} network_drops={} \
             malformed={} bad_mac1={} handshake_failed={} unknown_peer={} handshake_replay={} \
             handshake_flood={} unknown_index={} forged={} replayed={} expired={} \
             cookie_replies_sent={} no_endpoint={} queue_overflow={} handshake_gave_up={} \
             not_ip={} no_local_identity={} no_peer={} spoofed_source={} wrong_destination={}",
            r.packets_in,
            r.packets_out,
            p.handshakes_completed,
            p.network_drops(),
            p.malformed,
            p.bad_mac1,
            p.handshake_failed,
            p.unknown_peer,
            p.handshake_replay,
            p.handshake_flood,
            p.unknown_index,
            p.forged,
            p.replayed,
            p.expired,
            p.cookie_replies_sent,
            p.no_endpoint,
            p.queue_overflow,
            p.handshake_gave_up,
            r.not_ip,
            r.no_local_identity,
            r.no_peer,
            r.spoofed_source,
            r.wrong_destination,
        )
    }
}
