//! A point-in-time view of a node for operators: what `wg show`, the metrics and
//! `meshguard status` report. Made at the reader's request, under the node's lock, from
//! what the data path counts anyway; the data path does nothing for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::counters::NodeStats;
use super::Node;
use crate::identity::{LocalId, PeerId, PublicKey};
use crate::proto::{Stats, Traffic};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Local identities, in configuration order.
    pub identities: Vec<IdentityStatus>,
    /// Peer identities, in configuration order.
    pub peers: Vec<PeerStatus>,
    /// One per (local identity, peer identity).
    pub pairs: Vec<PairStatus>,
    pub protocol: Stats,
    pub node: NodeStats,
    pub flows: FlowStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub principal: String,
    /// The key it initiates with first, then the other one while it rotates.
    pub public_keys: Vec<PublicKey>,
    pub addresses: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub principal: String,
    /// The peer node (its file) the identity lives on.
    pub node: String,
    /// The key initiated to first, then the other one while it rotates.
    pub public_keys: Vec<PublicKey>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<Duration>,
}

/// One (local identity, peer identity) pair: its tunnels and allow-list decisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairStatus {
    /// Index into `identities`.
    pub local: usize,
    /// Index into `peers`.
    pub peer: usize,
    /// One per (local key, peer key), the preferred one first.
    pub tunnels: Vec<TunnelStatus>,
    pub decisions: DecisionCounts,
}

impl PairStatus {
    /// The pair's traffic over all its tunnels; the latest handshake of any.
    pub fn traffic(&self) -> Traffic {
        self.tunnels
            .iter()
            .fold(Traffic::default(), |sum, t| add_traffic(sum, &t.traffic))
    }
}

/// `a` and `b` together: counters added, the later handshake kept.
pub fn add_traffic(a: Traffic, b: &Traffic) -> Traffic {
    Traffic {
        tx_bytes: a.tx_bytes + b.tx_bytes,
        rx_bytes: a.rx_bytes + b.rx_bytes,
        tx_packets: a.tx_packets + b.tx_packets,
        rx_packets: a.rx_packets + b.rx_packets,
        last_handshake: a.last_handshake.max(b.last_handshake),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub local_key: PublicKey,
    pub peer_key: PublicKey,
    /// Where the peer is sent to: configured, or where it last roamed to.
    pub endpoint: Option<SocketAddr>,
    pub has_session: bool,
    pub traffic: Traffic,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DecisionCounts {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// Flows of the pair pushed out of the full flow table.
    pub flow_evictions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowStatus {
    pub tracked: usize,
    pub capacity: usize,
    pub evictions: u64,
}

impl Node {
    /// What the node holds and counted, now.
    pub fn status(&self) -> NodeStatus {
        let routing = &self.routing;
        let identities = (0..routing.locals().len())
            .map(LocalId::new)
            .map(|id| {
                let local = routing.local(id);
                IdentityStatus {
                    principal: local.principal.to_string(),
                    public_keys: routing.local_public_keys(id).collect(),
                    addresses: local.addresses.clone(),
                    labels: local.labels.clone(),
                }
            })
            .collect();
        let peers = (0..routing.peers().len())
            .map(PeerId::new)
            .map(|id| {
                let peer = routing.peer(id);
                PeerStatus {
                    principal: peer.principal.to_string(),
                    node: peer.node.clone(),
                    public_keys: routing.peer_keys(id).to_vec(),
                    allowed_ips: peer.allowed_ips.clone(),
                    persistent_keepalive: routing.persistent_keepalive(id),
                }
            })
            .collect();
        let pairs = self
            .decisions()
            .iter()
            .map(|(local, peer, decisions)| PairStatus {
                local: local.index(),
                peer: peer.index(),
                tunnels: routing
                    .pair_tunnels(local, peer)
                    .map(|(local_key, peer_key, tunnel)| TunnelStatus {
                        local_key,
                        peer_key,
                        endpoint: self.device.endpoint(tunnel),
                        has_session: self.device.has_session(tunnel),
                        traffic: self.device.traffic(tunnel).unwrap_or_default(),
                    })
                    .collect(),
                decisions: DecisionCounts {
                    allowed: decisions.allowed,
                    denied: decisions.denied,
                    audited: decisions.audited,
                    flow_evictions: decisions.evictions,
                },
            })
            .collect();
        NodeStatus {
            identities,
            peers,
            pairs,
            protocol: self.device.stats().clone(),
            node: self.stats.clone(),
            flows: FlowStatus {
                tracked: self.firewall.flow_count(),
                capacity: self.firewall.flow_capacity(),
                evictions: self.firewall.flow_evictions(),
            },
        }
    }
}
