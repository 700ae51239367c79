//! Cryptokey routing: which local identity owns a source address, which peer identity's
//! allowed IPs hold a destination, and which tunnel joins each (local, peer) pair.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::counters::NodeDrop;
use crate::config::{NodeConfig, PeerConfig, PeerIdentityConfig};
use crate::identity::{LocalId, PairTable, PeerId, PrefixTable, Principal, PublicKey};
use crate::packet::IpHeader;
use crate::proto::{Device, LocalKeyId, TunnelId};

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

/// How a peer node's tunnels are set up: from its file.
#[derive(Clone, Copy, PartialEq, Eq)]
struct TunnelSettings {
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<Duration>,
}

pub(super) struct Routing {
    locals: Vec<LocalIdentity>,
    /// Each local identity's key in the device.
    local_keys: Vec<LocalKeyId>,
    peers: Vec<PeerIdentity>,
    /// Each peer identity's tunnel settings as configured (roaming may have moved the
    /// endpoint since).
    settings: Vec<TunnelSettings>,
    local_by_address: PrefixTable<LocalId>,
    peer_by_address: PrefixTable<PeerId>,
    /// The last lookups in those tables, one per use: packets of a batch mostly share
    /// their addresses. Renewed whenever the tables change.
    egress_source: LastLookup<LocalId>,
    egress_destination: LastLookup<PeerId>,
    ingress_source: LastLookup<PeerId>,
    ingress_destination: LastLookup<LocalId>,
    tunnels: PairTable<TunnelId>,
    /// The pair each tunnel joins, by tunnel slot.
    pairs: Vec<Option<(LocalId, PeerId)>>,
}

/// What a reconfiguration changed, identity by identity.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdentityChanges {
    pub locals_added: usize,
    pub locals_removed: usize,
    /// Kept, with other addresses or labels.
    pub locals_changed: usize,
    pub peers_added: usize,
    pub peers_removed: usize,
    /// Kept, with another endpoint, keepalive, allowed IPs or node.
    pub peers_changed: usize,
}

/// Where the identities of the old routing went: the new id of each old local and peer
/// identity (`None`: removed).
pub(super) struct Renumbering {
    pub(super) locals: Vec<Option<LocalId>>,
    pub(super) peers: Vec<Option<PeerId>>,
    pub(super) changes: IdentityChanges,
}

impl Renumbering {
    /// The new pair of an old pair, if both identities are still there.
    pub(super) fn pair(&self, (local, peer): (LocalId, PeerId)) -> Option<(LocalId, PeerId)> {
        Some((self.locals[local.index()]?, self.peers[peer.index()]?))
    }
}

impl Default for Routing {
    /// No identities.
    fn default() -> Self {
        Routing {
            locals: Vec::new(),
            local_keys: Vec::new(),
            peers: Vec::new(),
            settings: Vec::new(),
            local_by_address: PrefixTable::new(),
            peer_by_address: PrefixTable::new(),
            egress_source: LastLookup::new(),
            egress_destination: LastLookup::new(),
            ingress_source: LastLookup::new(),
            ingress_destination: LastLookup::new(),
            tunnels: PairTable::new(0, 0, |_, _| unreachable!("no pairs")),
            pairs: Vec::new(),
        }
    }
}

impl Routing {
    /// The identities of `config`, with their keys and a tunnel per pair added to `device`.
    pub(super) fn new(config: &NodeConfig, device: &mut Device, now: Instant) -> Self {
        let mut routing = Routing::default();
        routing.apply(config, device, now);
        routing
    }

    /// Makes the identities those of `config`, like `wg syncconf`: an identity whose
    /// public key and principal stay keeps its device key, and a pair of kept identities
    /// keeps its tunnel (sessions, timers, roamed endpoint); a changed endpoint or
    /// keepalive is set on the tunnels; the tunnels and keys of identities that are gone
    /// are removed from `device` before any new one is added.
    pub(super) fn apply(
        &mut self,
        config: &NodeConfig,
        device: &mut Device,
        now: Instant,
    ) -> Renumbering {
        let old = std::mem::take(self);
        let mut changes = IdentityChanges::default();

        // Which old identity each new one is: the same public key (unique in a valid
        // configuration) and the same principal.
        let old_local_by_key: HashMap<&PublicKey, usize> = old
            .locals
            .iter()
            .enumerate()
            .map(|(i, l)| (&l.public_key, i))
            .collect();
        let mut local_map = vec![None; old.locals.len()];
        let new_locals: Vec<Option<usize>> = config
            .identities
            .iter()
            .enumerate()
            .map(|(index, identity)| {
                let kept = old_local_by_key
                    .get(&identity.public_key)
                    .copied()
                    .filter(|&i| {
                        local_map[i].is_none() && old.locals[i].principal == identity.principal
                    });
                if let Some(i) = kept {
                    local_map[i] = Some(LocalId::new(index));
                }
                kept
            })
            .collect();
        let new_peers: Vec<(&PeerConfig, &PeerIdentityConfig)> = config
            .peers
            .iter()
            .flat_map(|node| node.identities.iter().map(move |identity| (node, identity)))
            .collect();
        let old_peer_by_key: HashMap<&PublicKey, usize> = old
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (&p.public_key, i))
            .collect();
        let mut peer_map = vec![None; old.peers.len()];
        let kept_peers: Vec<Option<usize>> = new_peers
            .iter()
            .enumerate()
            .map(|(index, (_, identity))| {
                let kept = old_peer_by_key
                    .get(&identity.public_key)
                    .copied()
                    .filter(|&i| {
                        peer_map[i].is_none() && old.peers[i].principal == identity.principal
                    });
                if let Some(i) = kept {
                    peer_map[i] = Some(PeerId::new(index));
                }
                kept
            })
            .collect();

        // Everything that goes, goes first: its slots may then be reused.
        for (local, peer, &tunnel) in old.tunnels.iter() {
            if local_map[local.index()].is_none() || peer_map[peer.index()].is_none() {
                device.remove_tunnel(tunnel);
            }
        }
        for (i, kept) in local_map.iter().enumerate() {
            if kept.is_none() {
                device.remove_local(old.local_keys[i]);
                changes.locals_removed += 1;
            }
        }
        changes.peers_removed = peer_map.iter().filter(|p| p.is_none()).count();

        for (index, identity) in config.identities.iter().enumerate() {
            let key = match new_locals[index] {
                Some(i) => {
                    let was = &old.locals[i];
                    if was.addresses != identity.addresses || was.labels != identity.labels {
                        changes.locals_changed += 1;
                    }
                    old.local_keys[i]
                }
                None => {
                    changes.locals_added += 1;
                    device.add_local(identity.private_key.clone())
                }
            };
            for address in &identity.addresses {
                self.local_by_address.insert(*address, LocalId::new(index));
            }
            self.local_keys.push(key);
            self.locals.push(LocalIdentity {
                principal: identity.principal.clone(),
                public_key: identity.public_key,
                addresses: identity.addresses.clone(),
                labels: identity.labels.clone(),
            });
        }
        for (index, (node, identity)) in new_peers.iter().enumerate() {
            for net in &identity.allowed_ips {
                self.peer_by_address.insert(*net, PeerId::new(index));
            }
            let peer = PeerIdentity {
                principal: identity.principal.clone(),
                node: node.name.clone(),
                public_key: identity.public_key,
                allowed_ips: identity.allowed_ips.clone(),
            };
            let settings = TunnelSettings {
                endpoint: node.endpoint,
                persistent_keepalive: node
                    .persistent_keepalive
                    .map(|s| Duration::from_secs(u64::from(s))),
            };
            match kept_peers[index] {
                Some(i) => {
                    let was = &old.peers[i];
                    if old.settings[i] != settings
                        || was.allowed_ips != peer.allowed_ips
                        || was.node != peer.node
                    {
                        changes.peers_changed += 1;
                    }
                }
                None => changes.peers_added += 1,
            }
            self.peers.push(peer);
            self.settings.push(settings);
        }

        let mut pairs = Vec::new();
        let local_keys = &self.local_keys;
        let settings = &self.settings;
        let peers = &self.peers;
        self.tunnels = PairTable::new(self.locals.len(), self.peers.len(), |local, peer| {
            let configured = settings[peer.index()];
            let kept = new_locals[local.index()].zip(kept_peers[peer.index()]);
            let tunnel = match kept {
                Some((old_local, old_peer)) => {
                    let tunnel = *old
                        .tunnels
                        .get(LocalId::new(old_local), PeerId::new(old_peer));
                    let was = old.settings[old_peer];
                    if was.endpoint != configured.endpoint {
                        device.set_endpoint(tunnel, configured.endpoint);
                    }
                    if was.persistent_keepalive != configured.persistent_keepalive {
                        device.set_persistent_keepalive(
                            now,
                            tunnel,
                            configured.persistent_keepalive,
                        );
                    }
                    tunnel
                }
                None => device.add_tunnel(
                    now,
                    local_keys[local.index()],
                    *peers[peer.index()].public_key.as_bytes(),
                    configured.endpoint,
                    configured.persistent_keepalive,
                ),
            };
            if pairs.len() <= tunnel.index() {
                pairs.resize(tunnel.index() + 1, None);
            }
            pairs[tunnel.index()] = Some((local, peer));
            tunnel
        });
        self.pairs = pairs;
        Renumbering {
            locals: local_map,
            peers: peer_map,
            changes,
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
        self.pairs[tunnel.index()].expect("a tunnel of a configured pair")
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
