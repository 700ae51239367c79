//! What the node counts and tells: drop reasons and counters, allow-list decisions per
//! identity pair, and the protocol's events named by both identities.

use std::time::Instant;

use super::routing::Routing;
use crate::identity::PairTable;
use crate::proto::{Device, Event};

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
    /// Ingress: a later fragment that would overwrite the transport header its datagram's
    /// first fragment was judged by.
    FragmentOverlap,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    pub not_ip: u64,
    pub no_local_identity: u64,
    pub no_peer: u64,
    pub spoofed_source: u64,
    pub wrong_destination: u64,
    pub policy_denied: u64,
    pub flow_revoked: u64,
    pub fragment_overlap: u64,
    /// New inbound flows (or untracked packets) the allow list let in.
    pub policy_allowed: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl NodeStats {
    pub(super) fn count(&mut self, drop: NodeDrop) {
        *match drop {
            NodeDrop::NotIp => &mut self.not_ip,
            NodeDrop::NoLocalIdentity => &mut self.no_local_identity,
            NodeDrop::NoPeer => &mut self.no_peer,
            NodeDrop::SpoofedSource => &mut self.spoofed_source,
            NodeDrop::WrongDestination => &mut self.wrong_destination,
            NodeDrop::PolicyDenied => &mut self.policy_denied,
            NodeDrop::FlowRevoked => &mut self.flow_revoked,
            NodeDrop::FragmentOverlap => &mut self.fragment_overlap,
        } += 1;
    }
}

/// Allow-list decisions for one (peer identity, local identity) pair.
#[derive(Debug, Default, Clone)]
pub struct PairDecisions {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// Flows of this pair pushed out of the full flow table.
    pub evictions: u64,
    /// When a denial of this pair was last logged, and how many went unlogged since.
    pub(super) last_deny_log: Option<Instant>,
    pub(super) unlogged_denials: u64,
}

/// One line per identity pair that saw allow-list decisions.
pub(super) fn decision_lines(
    routing: &Routing,
    decisions: &PairTable<PairDecisions>,
) -> Vec<String> {
    decisions
        .iter()
        .filter(|(_, _, d)| d.allowed + d.denied + d.audited + d.evictions > 0)
        .map(|(local, peer, d)| {
            format!(
                "source={} destination={} allowed={} denied={} audited={} flow_evictions={}",
                routing.peer(peer).principal,
                routing.local(local).principal,
                d.allowed,
                d.denied,
                d.audited,
                d.evictions
            )
        })
        .collect()
}

/// Flow-table figures for the counter line.
pub(super) struct FlowCounts {
    pub flows: usize,
    pub evictions: u64,
}

/// One line of every counter, for logs and tests.
pub(super) fn counter_line(device: &Device, node: &NodeStats, flows: FlowCounts) -> String {
    let p = device.stats();
    let r = node;
    format!(
        "packets_in={} packets_out={} handshakes_completed={} network_drops={} \
         malformed={} bad_mac1={} handshake_failed={} unknown_peer={} handshake_replay={} \
         handshake_flood={} rate_limited={} unknown_index={} forged={} replayed={} expired={} \
         cookie_replies_sent={} no_endpoint={} queue_overflow={} handshake_gave_up={} \
         not_ip={} no_local_identity={} no_peer={} spoofed_source={} wrong_destination={} \
         policy_allowed={} policy_denied={} flow_revoked={} fragment_overlap={} flows={} \
         flow_evictions={}",
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
        p.rate_limited,
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
        r.fragment_overlap,
        flows.flows,
        flows.evictions,
    )
}

/// Logs the device's events since the last call, naming both identities of each tunnel.
pub(super) fn log_events(device: &mut Device, routing: &Routing) {
    while let Some(event) = device.poll_event() {
        let (local, peer) = routing.pair_of(event.tunnel());
        let local = &routing.local(local).principal;
        let peer_identity = routing.peer(peer);
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
