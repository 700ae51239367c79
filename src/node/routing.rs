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
    /// Each local identity's keys in the device, the one it initiates with first (a
    /// second one while it rotates).
    local_keys: Vec<Vec<(PublicKey, LocalKeyId)>>,
    peers: Vec<PeerIdentity>,
    /// Each peer identity's public keys, the one to initiate to first (its next key
    /// while it rotates, then its current one).
    peer_keys: Vec<Vec<PublicKey>>,
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
    /// Each pair's tunnels, one per (local key, peer key), the preferred one first.
    tunnels: PairTable<Box<[TunnelId]>>,
    /// The pair each tunnel joins, by tunnel slot.
    pairs: Vec<Option<(LocalId, PeerId)>>,
    /// Every tunnel by its keys.
    by_keys: HashMap<(LocalKeyId, PublicKey), TunnelId>,
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
            peer_keys: Vec::new(),
            settings: Vec::new(),
            local_by_address: PrefixTable::new(),
            peer_by_address: PrefixTable::new(),
            egress_source: LastLookup::new(),
            egress_destination: LastLookup::new(),
            ingress_source: LastLookup::new(),
            ingress_destination: LastLookup::new(),
            tunnels: PairTable::new(0, 0, |_, _| unreachable!("no pairs")),
            pairs: Vec::new(),
            by_keys: HashMap::new(),
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

    /// Makes the identities those of `config`, like `wg syncconf`. A local identity is
    /// the same when its principal is; a peer identity when its node and principal are.
    /// A kept identity keeps its device keys that it still lists, and a tunnel whose local
    /// key and peer key both stay keeps its sessions, timers and roamed endpoint; a changed
    /// endpoint or keepalive is set on a kept peer's tunnels. Tunnels and keys that go are
    /// removed from `device` before any new one is added.
    pub(super) fn apply(
        &mut self,
        config: &NodeConfig,
        device: &mut Device,
        now: Instant,
    ) -> Renumbering {
        let old = std::mem::take(self);
        let mut changes = IdentityChanges::default();

        // Which old identity each new one is.
        let old_locals: HashMap<&Principal, usize> = old
            .locals
            .iter()
            .enumerate()
            .map(|(i, l)| (&l.principal, i))
            .collect();
        let mut local_map = vec![None; old.locals.len()];
        let kept_locals: Vec<Option<usize>> = config
            .identities
            .iter()
            .enumerate()
            .map(|(index, identity)| {
                let kept = old_locals.get(&identity.principal).copied();
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
        let old_peers: HashMap<(&str, &Principal), usize> = old
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.node.as_str(), &p.principal), i))
            .collect();
        let mut peer_map = vec![None; old.peers.len()];
        let kept_peers: Vec<Option<usize>> = new_peers
            .iter()
            .enumerate()
            .map(|(index, (node, identity))| {
                let kept = old_peers
                    .get(&(node.name.as_str(), &identity.principal))
                    .copied();
                if let Some(i) = kept {
                    peer_map[i] = Some(PeerId::new(index));
                }
                kept
            })
            .collect();

        // The keys each identity lists now, in order of preference.
        let local_public_keys: Vec<Vec<PublicKey>> = config
            .identities
            .iter()
            .map(|i| {
                std::iter::once(i.public_key)
                    .chain(i.next_key.as_ref().map(|(_, _, public)| *public))
                    .collect()
            })
            .collect();
        let peer_keys: Vec<Vec<PublicKey>> = new_peers
            .iter()
            .map(|(_, i)| {
                i.next_public_key
                    .into_iter()
                    .chain([i.public_key])
                    .collect()
            })
            .collect();

        // Device keys of kept local identities that stay, by public key.
        let mut kept_keys: HashMap<PublicKey, LocalKeyId> = HashMap::new();
        for (index, kept) in kept_locals.iter().enumerate() {
            if let Some(i) = kept {
                for (public, key) in &old.local_keys[*i] {
                    if local_public_keys[index].contains(public) {
                        kept_keys.insert(*public, *key);
                    }
                }
            }
        }
        // Tunnels that stay: their pair is kept and both their keys stay.
        let mut kept_tunnels: HashMap<(LocalKeyId, PublicKey), TunnelId> = HashMap::new();
        for (&(key, peer_public), &tunnel) in &old.by_keys {
            let Some((old_local, old_peer)) = old.pairs[tunnel.index()] else {
                continue;
            };
            let new_peer = peer_map[old_peer.index()];
            let local_stays =
                local_map[old_local.index()].is_some() && kept_keys.values().any(|k| *k == key);
            let peer_key_stays =
                new_peer.is_some_and(|p| peer_keys[p.index()].contains(&peer_public));
            if local_stays && peer_key_stays {
                kept_tunnels.insert((key, peer_public), tunnel);
            }
        }

        // Everything that goes, goes first: its slots may then be reused.
        for (&keys, &tunnel) in &old.by_keys {
            if !kept_tunnels.contains_key(&keys) {
                device.remove_tunnel(tunnel);
            }
        }
        for (i, keys) in old.local_keys.iter().enumerate() {
            for (public, key) in keys {
                if kept_keys.get(public) != Some(key) {
                    device.remove_local(*key);
                }
            }
            if local_map[i].is_none() {
                changes.locals_removed += 1;
            }
        }
        changes.peers_removed = peer_map.iter().filter(|p| p.is_none()).count();

        for (index, identity) in config.identities.iter().enumerate() {
            let keys: Vec<(PublicKey, LocalKeyId)> = local_public_keys[index]
                .iter()
                .map(|public| {
                    let key = kept_keys.get(public).copied().unwrap_or_else(|| {
                        let private = if *public == identity.public_key {
                            identity.private_key.clone()
                        } else {
                            identity.next_key.as_ref().expect("listed").1.clone()
                        };
                        device.add_local(private)
                    });
                    (*public, key)
                })
                .collect();
            match kept_locals[index] {
                Some(i) => {
                    let was = &old.locals[i];
                    let same_keys = old.local_keys[i]
                        .iter()
                        .map(|(p, _)| *p)
                        .eq(keys.iter().map(|(p, _)| *p));
                    if was.addresses != identity.addresses
                        || was.labels != identity.labels
                        || !same_keys
                    {
                        changes.locals_changed += 1;
                    }
                }
                None => changes.locals_added += 1,
            }
            for address in &identity.addresses {
                self.local_by_address.insert(*address, LocalId::new(index));
            }
            self.local_keys.push(keys);
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
                        || old.peer_keys[i] != peer_keys[index]
                    {
                        changes.peers_changed += 1;
                    }
                }
                None => changes.peers_added += 1,
            }
            self.peers.push(peer);
            self.settings.push(settings);
        }
        self.peer_keys = peer_keys;

        let mut pairs = Vec::new();
        let mut by_keys = HashMap::new();
        let (local_keys, peer_keys, settings) = (&self.local_keys, &self.peer_keys, &self.settings);
        self.tunnels = PairTable::new(self.locals.len(), self.peers.len(), |local, peer| {
            let configured = settings[peer.index()];
            let changed = kept_peers[peer.index()].map(|i| old.settings[i] != configured);
            let mut tunnels = Vec::new();
            for &(_, key) in &local_keys[local.index()] {
                for &peer_public in &peer_keys[peer.index()] {
                    let tunnel = match kept_tunnels.get(&(key, peer_public)) {
                        Some(&tunnel) => {
                            if changed == Some(true) {
                                device.set_endpoint(tunnel, configured.endpoint);
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
                            key,
                            *peer_public.as_bytes(),
                            configured.endpoint,
                            configured.persistent_keepalive,
                        ),
                    };
                    if pairs.len() <= tunnel.index() {
                        pairs.resize(tunnel.index() + 1, None);
                    }
                    pairs[tunnel.index()] = Some((local, peer));
                    by_keys.insert((key, peer_public), tunnel);
                    tunnels.push(tunnel);
                }
            }
            tunnels.into_boxed_slice()
        });
        self.pairs = pairs;
        self.by_keys = by_keys;
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

    /// Every tunnel of a pair with its two keys (local, peer), the preferred one first.
    pub(super) fn pair_tunnels(
        &self,
        local: LocalId,
        peer: PeerId,
    ) -> impl Iterator<Item = (PublicKey, PublicKey, TunnelId)> + '_ {
        self.local_keys[local.index()]
            .iter()
            .flat_map(move |&(local_public, local_key)| {
                self.peer_keys[peer.index()]
                    .iter()
                    .filter_map(move |&peer_public| {
                        let tunnel = *self.by_keys.get(&(local_key, peer_public))?;
                        Some((local_public, peer_public, tunnel))
                    })
            })
    }

    /// A peer identity's keys, the one initiated to first.
    pub(super) fn peer_keys(&self, peer: PeerId) -> &[PublicKey] {
        &self.peer_keys[peer.index()]
    }

    /// A local identity's public keys, the one it initiates with first.
    pub(super) fn local_public_keys(&self, local: LocalId) -> impl Iterator<Item = PublicKey> + '_ {
        self.local_keys[local.index()].iter().map(|&(key, _)| key)
    }

    /// The persistent keepalive configured for a peer identity's node.
    pub(super) fn persistent_keepalive(&self, peer: PeerId) -> Option<Duration> {
        self.settings[peer.index()].persistent_keepalive
    }

    /// The pair a tunnel joins.
    pub(super) fn pair_of(&self, tunnel: TunnelId) -> (LocalId, PeerId) {
        self.pairs[tunnel.index()].expect("a tunnel of a configured pair")
    }

    /// Egress: the source picks the local identity (whose key seals), the destination
    /// the peer identity; one of their tunnels carries the packet: the preferred one if it
    /// has a session, else another that has one (during a key rotation), else the
    /// preferred one, which then shakes hands. The second tunnel returned, if any, is the
    /// preferred one to start a handshake on, so traffic moves to it.
    pub(super) fn egress(
        &mut self,
        header: &IpHeader,
        device: &Device,
    ) -> Result<(LocalId, PeerId, TunnelId, Option<TunnelId>), NodeDrop> {
        let local = self
            .egress_source
            .owner(&self.local_by_address, header.source)
            .ok_or(NodeDrop::NoLocalIdentity)?;
        let peer = self
            .egress_destination
            .owner(&self.peer_by_address, header.destination)
            .ok_or(NodeDrop::NoPeer)?;
        let tunnels = self.tunnels.get(local, peer);
        let preferred = tunnels[0];
        if tunnels.len() == 1 || device.has_session(preferred) {
            return Ok((local, peer, preferred, None));
        }
        Ok(
            match tunnels[1..].iter().find(|t| device.has_session(**t)) {
                Some(&other) => (local, peer, other, Some(preferred)),
                None => (local, peer, preferred, None),
            },
        )
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
