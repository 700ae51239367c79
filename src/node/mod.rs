//! The sans-IO node: ties the identity tables to the protocol tunnels.
//!
//! Egress: the source address picks the local identity (whose key seals), the
//! destination picks the peer identity (longest prefix over allowed IPs). Ingress: the
//! session proves the peer identity; its source must be inside that identity's allowed
//! IPs and its destination must belong to the session's local identity. Then the allow
//! list decides, statefully: replies to flows a local workload opened pass, allowed flows
//! are remembered, everything else is evaluated against the compiled policy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::{NodeConfig, PolicyConfig};
use crate::identity::{PrefixTable, Principal, PublicKey};
use crate::packet::{self, IpHeader, Transport};
use crate::policy::flows::{self, Direction, FlowState, FlowTable, Opened};
use crate::policy::{Evaluator, PolicySet, Protocol, Request, Target};
use crate::proto::{
    self, Device, DeviceConfig, Event, OpenError, Random, ReceiveStep, Received, SealJob, SealStep,
    TransportOpen, TunnelId,
};

/// How often idle flows are swept out of the flow table.
const FLOW_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// At most one "denied" log line per identity pair this often; the rest are counted.
const DENY_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub use crate::proto::{SEAL_TAILROOM, TRANSPORT_HEADER_LEN};

pub struct LocalIdentity {
    pub principal: Principal,
    pub public_key: PublicKey,
    pub addresses: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
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
pub enum NodeDrop {
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
    /// Ingress: the allow list denies it.
    PolicyDenied,
    /// Ingress: a flow that a policy reload revoked.
    FlowRevoked,
}

#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    pub not_ip: u64,
    pub no_local_identity: u64,
    pub no_peer: u64,
    pub spoofed_source: u64,
    pub wrong_destination: u64,
    pub policy_denied: u64,
    pub flow_revoked: u64,
    /// New inbound flows (or untracked packets) the allow list let in.
    pub policy_allowed: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl NodeStats {
    fn count(&mut self, drop: NodeDrop) {
        *match drop {
            NodeDrop::NotIp => &mut self.not_ip,
            NodeDrop::NoLocalIdentity => &mut self.no_local_identity,
            NodeDrop::NoPeer => &mut self.no_peer,
            NodeDrop::SpoofedSource => &mut self.spoofed_source,
            NodeDrop::WrongDestination => &mut self.wrong_destination,
            NodeDrop::PolicyDenied => &mut self.policy_denied,
            NodeDrop::FlowRevoked => &mut self.flow_revoked,
        } += 1;
    }
}

/// Allow-list decisions for one (peer identity, local identity) pair.
#[derive(Debug, Default, Clone)]
pub struct PairDecisions {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    last_deny_log: Option<Instant>,
    unlogged_denials: u64,
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

/// `begin_egress`'s answer: the encryption left to do, or the outcome.
pub enum EgressStep {
    /// Finish with `job.seal(buf)`, which needs no access to the node.
    Seal {
        destination: SocketAddr,
        job: SealJob,
    },
    Done(Egress),
}

/// `begin_ingress`'s answer: a transport message to decrypt, or the outcome.
pub enum IngressStep {
    /// Decrypt with `open.open(datagram)` without the node, then call `finish_ingress`.
    Open(TransportOpen),
    Done(Ingress),
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
    Node(NodeDrop),
    Protocol(proto::ProtocolDrop),
}

pub struct Node {
    device: Device,
    locals: Vec<LocalIdentity>,
    peers: Vec<PeerIdentity>,
    local_by_address: PrefixTable<usize>,
    peer_by_address: PrefixTable<usize>,
    /// The last lookups in those tables, one per use: packets of a batch mostly share
    /// their addresses, and the tables do not change while the node runs.
    egress_source: LastLookup,
    egress_destination: LastLookup,
    ingress_source: LastLookup,
    ingress_destination: LastLookup,
    /// Tunnel of (local, peer), at `local * peers.len() + peer`.
    tunnels: Vec<TunnelId>,
    /// (local, peer) of each tunnel, by tunnel index.
    pairs: Vec<(usize, usize)>,
    policy_config: PolicyConfig,
    policy: Evaluator,
    flows: FlowTable,
    last_flow_sweep: Instant,
    /// Decisions per pair, at `local * peers.len() + peer`.
    decisions: Vec<PairDecisions>,
    pub stats: NodeStats,
}

/// One remembered prefix-table lookup: the address and the value its longest match gave.
#[derive(Default)]
struct LastLookup {
    address: Option<IpAddr>,
    owner: Option<usize>,
}

impl LastLookup {
    fn owner(&mut self, table: &PrefixTable<usize>, address: IpAddr) -> Option<usize> {
        if self.address != Some(address) {
            self.address = Some(address);
            self.owner = table.longest_match(address).map(|(_, &owner)| owner);
        }
        self.owner
    }
}

fn protocol_of(header: &IpHeader, transport: Transport) -> (Protocol, Option<u16>) {
    match transport {
        Transport::Tcp {
            destination_port, ..
        } => (Protocol::Tcp, Some(destination_port)),
        Transport::Udp {
            destination_port, ..
        } => (Protocol::Udp, Some(destination_port)),
        Transport::IcmpEcho { .. } | Transport::IcmpOther => (Protocol::Icmp, None),
        Transport::Other => match header.protocol {
            packet::PROTO_TCP => (Protocol::Tcp, None),
            packet::PROTO_UDP => (Protocol::Udp, None),
            packet::PROTO_ICMP | packet::PROTO_ICMPV6 => (Protocol::Icmp, None),
            other => (Protocol::Other(other), None),
        },
    }
}

impl Node {
    /// Builds the node from a validated configuration: one tunnel per pair of local and
    /// peer identity. `now_unix` is the wall-clock time at `now`.
    pub fn new(
        config: &NodeConfig,
        policy: &PolicySet,
        device_config: DeviceConfig,
        random: Random,
        now: Instant,
        now_unix: Duration,
    ) -> Self {
        let mut device = Device::new(device_config, random, now, now_unix);
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
                labels: identity.labels.clone(),
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
        let evaluator = compile(&locals, &peers, policy, &config.policy);
        let decisions = vec![PairDecisions::default(); locals.len() * peers.len()];
        Node {
            device,
            locals,
            peers,
            local_by_address,
            peer_by_address,
            egress_source: LastLookup::default(),
            egress_destination: LastLookup::default(),
            ingress_source: LastLookup::default(),
            ingress_destination: LastLookup::default(),
            tunnels,
            pairs,
            policy_config: config.policy.clone(),
            policy: evaluator,
            flows: FlowTable::new(flows::DEFAULT_CAPACITY),
            last_flow_sweep: now,
            decisions,
            stats: NodeStats::default(),
        }
    }

    /// Replaces the allow list. Flows the peer opened are re-checked at once: those the
    /// new policy denies stop. Returns how many were revoked.
    pub fn set_policy(&mut self, policy: &PolicySet) -> usize {
        self.policy = compile(&self.locals, &self.peers, policy, &self.policy_config);
        let evaluator = &self.policy;
        self.flows.recheck(|opened| {
            evaluator
                .evaluate(opened.local, opened.peer, &opened.request)
                .allowed
        })
    }

    pub fn policy(&self) -> &Evaluator {
        &self.policy
    }

    pub fn decisions(&self, local: usize, peer: usize) -> &PairDecisions {
        &self.decisions[local * self.peers.len() + peer]
    }

    pub fn locals(&self) -> &[LocalIdentity] {
        &self.locals
    }

    pub fn peers(&self) -> &[PeerIdentity] {
        &self.peers
    }

    fn drop_packet(&mut self, drop: NodeDrop) -> Dropped {
        self.stats.count(drop);
        tracing::trace!(?drop, "dropped packet");
        Dropped::Node(drop)
    }

    /// Seals the IP packet at `buf[16..16 + len]` for the tunnel its addresses select.
    /// `buf` must hold `SEAL_TAILROOM` more bytes after it.
    pub fn egress(&mut self, now: Instant, buf: &mut [u8], len: usize) -> Egress {
        match self.begin_egress(now, buf, len) {
            EgressStep::Seal { destination, job } => Egress::Send {
                destination,
                len: job.seal(buf),
            },
            EgressStep::Done(egress) => egress,
        }
    }

    /// `egress` up to the encryption, which the returned job does without the node: so
    /// that workers sharing the node hold it only for the bookkeeping.
    pub fn begin_egress(&mut self, now: Instant, buf: &mut [u8], len: usize) -> EgressStep {
        let done = EgressStep::Done;
        let Some(header) = packet::parse(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len])
        else {
            return done(Egress::Dropped(self.drop_packet(NodeDrop::NotIp)));
        };
        let Some(local) = self
            .egress_source
            .owner(&self.local_by_address, header.source)
        else {
            return done(Egress::Dropped(self.drop_packet(NodeDrop::NoLocalIdentity)));
        };
        let Some(peer) = self
            .egress_destination
            .owner(&self.peer_by_address, header.destination)
        else {
            return done(Egress::Dropped(self.drop_packet(NodeDrop::NoPeer)));
        };
        let packet = &buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len];
        self.track_outbound(now, &header, header.transport(packet));
        let tunnel = self.tunnels[local * self.peers.len() + peer];
        match self.device.begin_seal(now, tunnel, buf, len) {
            SealStep::Seal { destination, job } => {
                self.stats.packets_out += 1;
                EgressStep::Seal { destination, job }
            }
            SealStep::Queued => done(Egress::Queued),
            SealStep::Dropped(drop) => done(Egress::Dropped(Dropped::Protocol(drop))),
        }
    }

    /// Authenticates and decrypts a datagram in place, then applies cryptokey routing and
    /// the allow list.
    pub fn ingress(&mut self, now: Instant, source: SocketAddr, datagram: &mut [u8]) -> Ingress {
        match self.begin_ingress(now, source, datagram) {
            IngressStep::Open(open) => {
                let opened = open.open(datagram);
                self.finish_ingress(now, source, datagram, open, opened)
            }
            IngressStep::Done(ingress) => ingress,
        }
    }

    /// `ingress` up to the decryption of transport data, which the returned job does
    /// without the node. Handshake messages are processed completely.
    pub fn begin_ingress(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &mut [u8],
    ) -> IngressStep {
        match self.device.begin_receive(now, source, datagram) {
            ReceiveStep::Open(open) => IngressStep::Open(open),
            ReceiveStep::Done(received) => {
                IngressStep::Done(self.admit_received(now, datagram, received))
            }
        }
    }

    /// The rest of `ingress` once `open` was tried on the datagram.
    pub fn finish_ingress(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &[u8],
        open: TransportOpen,
        opened: Result<Range<usize>, OpenError>,
    ) -> Ingress {
        let received = self.device.finish_receive(now, source, open, opened);
        self.admit_received(now, datagram, received)
    }

    /// Cryptokey routing and the allow list for what the device made of a datagram.
    fn admit_received(&mut self, now: Instant, datagram: &[u8], received: Received) -> Ingress {
        let (tunnel, plaintext) = match received {
            Received::Data { tunnel, plaintext } => (tunnel, plaintext),
            Received::Control => return Ingress::Control,
            Received::Dropped(drop) => return Ingress::Dropped(Dropped::Protocol(drop)),
        };
        let (local, peer) = self.pairs[tunnel.index()];
        let Some(header) = packet::parse(&datagram[plaintext.clone()]) else {
            return Ingress::Dropped(self.drop_packet(NodeDrop::NotIp));
        };
        let source_owner = self
            .ingress_source
            .owner(&self.peer_by_address, header.source);
        if source_owner != Some(peer) {
            return Ingress::Dropped(self.drop_packet(NodeDrop::SpoofedSource));
        }
        let destination_owner = self
            .ingress_destination
            .owner(&self.local_by_address, header.destination);
        if destination_owner != Some(local) {
            return Ingress::Dropped(self.drop_packet(NodeDrop::WrongDestination));
        }
        let packet = &datagram[plaintext.start..plaintext.start + header.len];
        let transport = header.transport(packet);
        let quoted = match transport {
            Transport::IcmpOther => header.quoted(packet),
            _ => None,
        };
        if let Err(drop) = self.admit_inbound(now, local, peer, &header, transport, quoted) {
            return Ingress::Dropped(self.drop_packet(drop));
        }
        self.stats.packets_in += 1;
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
        if now.saturating_duration_since(self.last_flow_sweep) >= FLOW_SWEEP_INTERVAL {
            self.flows.expire(now);
            self.last_flow_sweep = now;
        }
    }

    /// A local workload sends: remember the flow so the peer's replies come back in. A
    /// flow already known (opened by the peer, or revoked) keeps its state.
    fn track_outbound(&mut self, now: Instant, header: &IpHeader, transport: Transport) {
        // An echo reply answers the peer's request; it opens nothing.
        if matches!(transport, Transport::IcmpEcho { request: false, .. }) {
            return;
        }
        // Only a SYN opens a TCP flow: a mid-stream packet of a connection the table no
        // longer holds (idled out, evicted) must not open a way in for the peer.
        let may_open = !matches!(transport, Transport::Tcp { opening: false, .. });
        if let Some((key, idle)) = flows::key(header, transport, Direction::Outbound) {
            if self.flows.touch(&key, now).is_none() && may_open {
                self.flows.insert(key, FlowState::OpenedLocally, idle, now);
            }
        }
    }

    /// The stateful allow list at ingress: tracked flows pass (or stay revoked), ICMP
    /// errors about a packet of a tracked flow go with that flow, anything else is
    /// evaluated and, when allowed, tracked.
    fn admit_inbound(
        &mut self,
        now: Instant,
        local: usize,
        peer: usize,
        header: &IpHeader,
        transport: Transport,
        quoted: Option<(IpHeader, Transport)>,
    ) -> Result<(), NodeDrop> {
        let flow = flows::key(header, transport, Direction::Inbound);
        if let Some((key, _)) = &flow {
            match self.flows.touch(key, now) {
                Some(FlowState::OpenedLocally | FlowState::Allowed(_)) => return Ok(()),
                Some(FlowState::Revoked(_)) => return Err(NodeDrop::FlowRevoked),
                None => {}
            }
        }
        // An error about a packet this identity sent ("fragmentation needed", "port
        // unreachable") belongs to that packet's flow, as conntrack's RELATED does. It
        // does not keep the flow alive.
        let related = quoted
            .filter(|(inner, _)| inner.source == header.destination)
            .and_then(|(inner, inner_transport)| {
                flows::key(&inner, inner_transport, Direction::Outbound)
            });
        if let Some((key, _)) = related {
            match self.flows.peek(&key, now) {
                Some(FlowState::OpenedLocally | FlowState::Allowed(_)) => return Ok(()),
                Some(FlowState::Revoked(_)) => return Err(NodeDrop::FlowRevoked),
                None => {}
            }
        }
        let (protocol, port) = protocol_of(header, transport);
        let request = Request {
            source_ip: Some(header.source),
            protocol,
            port,
        };
        let decision = self.policy.evaluate(local, peer, &request);
        let pair = local * self.peers.len() + peer;
        let counts = &mut self.decisions[pair];
        if !decision.audited_by.is_empty() {
            counts.audited += 1;
            tracing::debug!(
                source = %self.peers[peer].principal,
                destination = %self.locals[local].principal,
                %protocol,
                port,
                decision = %decision.explain(),
                "audited flow"
            );
        }
        if decision.allowed {
            counts.allowed += 1;
            self.stats.policy_allowed += 1;
            if let Some((key, idle)) = flow {
                let opened = Opened {
                    local,
                    peer,
                    request,
                };
                self.flows
                    .insert(key, FlowState::Allowed(opened), idle, now);
            }
            return Ok(());
        }
        counts.denied += 1;
        let due = counts
            .last_deny_log
            .is_none_or(|at| now.saturating_duration_since(at) >= DENY_LOG_INTERVAL);
        if due {
            let unlogged = counts.unlogged_denials;
            counts.last_deny_log = Some(now);
            counts.unlogged_denials = 0;
            tracing::info!(
                source = %self.peers[peer].principal,
                destination = %self.locals[local].principal,
                source_ip = %header.source,
                %protocol,
                port,
                decision = %decision.explain(),
                similar_denials_not_logged = unlogged,
                "denied inbound flow"
            );
        } else {
            counts.unlogged_denials += 1;
        }
        Err(NodeDrop::PolicyDenied)
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
            let (local, peer) = self.pairs[tunnel.index()];
            let local = &self.locals[local].principal;
            let peer_identity = &self.peers[peer];
            let (peer, node) = (&peer_identity.principal, &peer_identity.node);
            match event {
                Event::HandshakeCompleted { we_initiated, .. } => {
                    tracing::info!(%local, %peer, %node, we_initiated, "handshake completed")
                }
                Event::Roamed { new_endpoint, .. } => {
                    tracing::info!(%local, %peer, %node, endpoint = %new_endpoint, "peer roamed")
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

    /// One line per identity pair that saw allow-list decisions.
    pub fn decision_counters(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (local, identity) in self.locals.iter().enumerate() {
            for (peer, peer_identity) in self.peers.iter().enumerate() {
                let d = self.decisions(local, peer);
                if d.allowed + d.denied + d.audited > 0 {
                    lines.push(format!(
                        "source={} destination={} allowed={} denied={} audited={}",
                        peer_identity.principal, identity.principal, d.allowed, d.denied, d.audited
                    ));
                }
            }
        }
        lines
    }

    /// One line of every counter, for logs and tests.
    pub fn counters(&self) -> String {
        let p = self.device.stats();
        let r = &self.stats;
        format!(
            "packets_in={} packets_out={} handshakes_completed={} network_drops={} \
             malformed={} bad_mac1={} handshake_failed={} unknown_peer={} handshake_replay={} \
             handshake_flood={} unknown_index={} forged={} replayed={} expired={} \
             cookie_replies_sent={} no_endpoint={} queue_overflow={} handshake_gave_up={} \
             not_ip={} no_local_identity={} no_peer={} spoofed_source={} wrong_destination={} \
             policy_allowed={} policy_denied={} flow_revoked={} flows={} flow_evictions={}",
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
            r.policy_allowed,
            r.policy_denied,
            r.flow_revoked,
            self.flows.len(),
            self.flows.evictions,
        )
    }
}

/// Compiles the allow list for these identities.
fn compile(
    locals: &[LocalIdentity],
    peers: &[PeerIdentity],
    policy: &PolicySet,
    config: &PolicyConfig,
) -> Evaluator {
    let targets: Vec<Target> = locals
        .iter()
        .map(|l| Target {
            principal: &l.principal,
            labels: &l.labels,
        })
        .collect();
    let peer_principals: Vec<&Principal> = peers.iter().map(|p| &p.principal).collect();
    Evaluator::new(
        policy,
        config.default,
        &config.root_namespace,
        &targets,
        &peer_principals,
    )
}
