//! Cryptokey routing: which local identity owns a source address, which peer identity's
//! allowed IPs hold a destination, and which tunnel joins each (local, peer) pair.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::counters::NodeDrop;
use crate::config::NodeConfig;
use crate::identity::{LocalId, PairTable, PeerId, PrefixTable, Principal, PublicKey};
use crate::packet::IpHeader;
use crate::proto::{Device, TunnelId};

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

/// One remembered prefix-table lookup: the address and the owner its longest match gave.
struct LastLookup<T> {
    address: Option<IpAddr>,
    owner: Option<T>,
}

impl<T: Copy> LastLookup<T> {
    fn new() -> Self {
        LastLookup {
            address: None,
            owner: None,
        }
    }

    fn owner(&mut self, table: &PrefixTable<T>, address: IpAddr) -> Option<T> {
        if self.address != Some(address) {
            self.address = Some(address);
            self.owner = table.longest_match(address).map(|(_, &owner)| owner);
        }
        self.owner
    }
}

pub(super) struct Routing {
    locals: Vec<LocalIdentity>,
    peers: Vec<PeerIdentity>,
    local_by_address: PrefixTable<LocalId>,
    peer_by_address: PrefixTable<PeerId>,
    /// The last lookups in those tables, one per use: packets of a batch mostly share
    /// their addresses, and the tables do not change while the node runs.
    egress_source: LastLookup<LocalId>,
    egress_destination: LastLookup<PeerId>,
    ingress_source: LastLookup<PeerId>,
    ingress_destination: LastLookup<LocalId>,
    tunnels: PairTable<TunnelId>,
    /// The pair each tunnel joins, by tunnel index.
    pairs: Vec<(LocalId, PeerId)>,
}

impl Routing {
    /// The identities of `config`, with their keys and a tunnel per pair added to `device`.
    pub(super) fn new(config: &NodeConfig, device: &mut Device, now: Instant) -> Self {
        let mut locals = Vec::new();
        let mut local_by_address = PrefixTable::new();
        let mut local_keys = Vec::new();
        for (index, identity) in config.identities.iter().enumerate() {
            local_keys.push(device.add_local(identity.private_key.clone()));
            for address in &identity.addresses {
                local_by_address.insert(*address, LocalId::new(index));
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
        for node in &config.peers {
            for identity in &node.identities {
                for net in &identity.allowed_ips {
                    peer_by_address.insert(*net, PeerId::new(peers.len()));
                }
                let keepalive = node
                    .persistent_keepalive
                    .map(|s| Duration::from_secs(u64::from(s)));
                peer_settings.push((node.endpoint, keepalive));
                peers.push(PeerIdentity {
                    principal: identity.principal.clone(),
                    node: node.name.clone(),
                    public_key: identity.public_key,
                    allowed_ips: identity.allowed_ips.clone(),
                });
            }
        }
        let mut pairs = Vec::with_capacity(locals.len() * peers.len());
        let tunnels = PairTable::new(locals.len(), peers.len(), |local, peer| {
            let (endpoint, keepalive) = peer_settings[peer.index()];
            let public = *peers[peer.index()].public_key.as_bytes();
            let tunnel =
                device.add_tunnel(now, local_keys[local.index()], public, endpoint, keepalive);
            debug_assert_eq!(
                tunnel.index(),
                pairs.len(),
                "tunnels are added in pair order"
            );
            pairs.push((local, peer));
            tunnel
        });
        Routing {
            locals,
            peers,
            local_by_address,
            peer_by_address,
            egress_source: LastLookup::new(),
            egress_destination: LastLookup::new(),
            ingress_source: LastLookup::new(),
            ingress_destination: LastLookup::new(),
            tunnels,
            pairs,
        }
    }

    pub(super) fn locals(&self) -> &[LocalIdentity] {
        &self.locals
    }

    pub(super) fn peers(&self) -> &[PeerIdentity] {
        &self.peers
    }

    pub(super) fn local(&self, id: LocalId) -> &LocalIdentity {
        &self.locals[id.index()]
    }

    pub(super) fn peer(&self, id: PeerId) -> &PeerIdentity {
        &self.peers[id.index()]
    }

    /// Whether `address` belongs to `peer`: its longest match among all peer identities'
    /// allowed IPs is one of `peer`'s.
    pub(super) fn peer_owns(&self, peer: PeerId, address: IpAddr) -> bool {
        self.peer_by_address
            .longest_match(address)
            .is_some_and(|(_, &owner)| owner == peer)
    }

    /// The pair a tunnel joins.
    pub(super) fn pair_of(&self, tunnel: TunnelId) -> (LocalId, PeerId) {
        self.pairs[tunnel.index()]
    }

    /// Egress: the source picks the local identity (whose key seals), the destination
    /// the peer identity; their tunnel carries the packet.
    pub(super) fn egress(
        &mut self,
        header: &IpHeader,
    ) -> Result<(LocalId, PeerId, TunnelId), NodeDrop> {
        let local = self
            .egress_source
            .owner(&self.local_by_address, header.source)
            .ok_or(NodeDrop::NoLocalIdentity)?;
        let peer = self
            .egress_destination
            .owner(&self.peer_by_address, header.destination)
            .ok_or(NodeDrop::NoPeer)?;
        Ok((local, peer, *self.tunnels.get(local, peer)))
    }

    /// Ingress: a packet from `tunnel` must come from an address of the tunnel's peer
    /// identity and go to an address of its local identity.
    pub(super) fn ingress(
        &mut self,
        tunnel: TunnelId,
        header: &IpHeader,
    ) -> Result<(LocalId, PeerId), NodeDrop> {
        let (local, peer) = self.pair_of(tunnel);
        let source_owner = self
            .ingress_source
            .owner(&self.peer_by_address, header.source);
        if source_owner != Some(peer) {
            return Err(NodeDrop::SpoofedSource);
        }
        let destination_owner = self
            .ingress_destination
            .owner(&self.local_by_address, header.destination);
        if destination_owner != Some(local) {
            return Err(NodeDrop::WrongDestination);
        }
        Ok((local, peer))
    }
}
