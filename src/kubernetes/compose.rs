//! The whole configuration of a node in Kubernetes mode, from the node file's settings
//! and what the cluster holds at one moment: local identities from the pods on the node
//! (with keys from the key store), peers from the other nodes' `MeshNode`s, the allow
//! list from Istio's objects, and the `MeshNode` this node is to publish.
//!
//! Conflicts between nodes are settled so that no address or key belongs to two
//! identities: an address of this node's pods is this node's (a peer claiming it, as
//! happens for a moment when a pod IP is reused, loses it), an address or key two peers
//! claim is given to neither. A policy object that does not read fails the whole
//! composition, so the allow list in force stays (a DENY never silently drops out).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use super::crd::{MeshNode, MeshNodeSpec};
use super::keys::{AccountKeys, KeyStore, Rotation, RotationStep};
use super::translate::{mesh_node_spec, peers, workloads, Skipped};
use crate::config::{check_generated, KeyRotation, LocalIdentityConfig, NodeConfig};
use crate::file_error::FileError;
use crate::identity::{Principal, PublicKey};
use crate::policy::{add_istio_yaml, PolicySet};

/// What the cluster holds, at one moment.
#[derive(Debug, Default, Clone)]
pub struct ClusterObjects {
    /// The pods on this node (others are ignored).
    pub pods: Vec<Pod>,
    pub mesh_nodes: Vec<MeshNode>,
    /// `AuthorizationPolicy` and `PeerAuthentication` objects as the API gives them.
    pub istio: Vec<Value>,
}

/// A node's configuration made from the cluster.
pub struct Composed {
    pub config: NodeConfig,
    pub policy: PolicySet,
    /// What this node publishes as its `MeshNode`.
    pub mesh_node: MeshNodeSpec,
    /// What was left out, and why.
    pub skipped: Vec<Skipped>,
    /// The key rotations that took a step.
    pub rotations: Vec<(Principal, RotationStep)>,
    /// When the next rotation step is due (`None`: none is).
    pub next_rotation: Option<SystemTime>,
}

/// Who this node is in the cluster.
#[derive(Debug, Clone)]
pub struct ThisNode {
    /// The Node's name.
    pub name: String,
    pub trust_domain: String,
    /// What this node publishes as its endpoint.
    pub endpoint: SocketAddr,
    pub key_rotation: KeyRotation,
}

/// `base` (the node file) with the identities, peers and policies `objects` give `this`
/// node. The service accounts' keys are made, and their rotations taken a step, as due
/// at `now`; an account whose key cannot be read or made is left out (fail closed for
/// it alone).
pub fn compose(
    base: &NodeConfig,
    this: &ThisNode,
    objects: &ClusterObjects,
    keys: &KeyStore,
    now: SystemTime,
) -> Result<Composed, FileError> {
    // What can refuse the whole composition comes before any key is touched.
    let mut policy = PolicySet::default();
    for object in &objects.istio {
        add_istio_object(&mut policy, object)?;
    }
    let (local, mut skipped) = workloads(&this.name, &this.trust_domain, &objects.pods);
    let own = objects
        .mesh_nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(this.name.as_str()));
    let mut identities = Vec::with_capacity(local.len());
    let mut published = Vec::with_capacity(local.len());
    let mut rotations = Vec::new();
    let mut next_rotation: Option<SystemTime> = None;
    for workload in local {
        let principal = &workload.principal;
        let account = match rotated_keys(keys, principal, this, own, now) {
            Ok((account, rotation)) => {
                if let Some(step) = rotation.step {
                    rotations.push((principal.clone(), step));
                }
                next_rotation = match (next_rotation, rotation.due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                account
            }
            Err(error) => {
                skipped.push(Skipped {
                    object: format!("service account {principal}"),
                    reason: format!("its key in the state directory: {error}: left out"),
                });
                continue;
            }
        };
        let public_key = account.current.public_key();
        let next_key = account.next.map(|next| {
            let public = next.public_key();
            (keys.next_path(principal), next, public)
        });
        let mut public_keys = vec![public_key];
        public_keys.extend(next_key.as_ref().map(|(_, _, public)| *public));
        identities.push(LocalIdentityConfig {
            principal: principal.clone(),
            private_key_file: keys.path(principal),
            private_key: account.current,
            public_key,
            next_key,
            addresses: workload.addresses.clone(),
            labels: workload.labels.clone(),
        });
        published.push((workload, public_keys));
    }
    let (mut peer_configs, peer_skips) = peers(&this.name, &objects.mesh_nodes);
    skipped.extend(peer_skips);
    settle_conflicts(&identities, &mut peer_configs, &mut skipped);

    let config = NodeConfig {
        identities,
        peers: peer_configs,
        ..base.clone()
    };
    check_generated(&config)?;
    Ok(Composed {
        config,
        policy,
        mesh_node: mesh_node_spec(this.endpoint, &published),
        skipped,
        rotations,
        next_rotation,
    })
}

/// The keys of `principal`'s account after taking its rotation a step if one is due;
/// `own` is this node's `MeshNode` as the API gives it back, which says whether the
/// next key has been published.
fn rotated_keys(
    keys: &KeyStore,
    principal: &Principal,
    this: &ThisNode,
    own: Option<&MeshNode>,
    now: SystemTime,
) -> std::io::Result<(AccountKeys, Rotation)> {
    // A next key that does not read is replaced by `rotate`.
    let next_published = match keys.next_key(principal).ok().flatten() {
        Some(next) => {
            let (principal, next) = (principal.to_string(), next.public_key().to_base64());
            own.is_some_and(|node| {
                node.spec
                    .identities
                    .iter()
                    .any(|i| i.principal == principal && i.public_keys.contains(&next))
            })
        }
        None => false,
    };
    let rotation = keys.rotate(principal, &this.key_rotation, now, next_published)?;
    Ok((keys.keys(principal)?, rotation))
}

/// Gives every address and key to one identity at most (see the module's docs).
fn settle_conflicts(
    locals: &[LocalIdentityConfig],
    peers: &mut Vec<crate::config::PeerConfig>,
    skipped: &mut Vec<Skipped>,
) {
    let local_nets: HashMap<IpNet, ()> = locals
        .iter()
        .flat_map(|l| l.addresses.iter().map(|n| (*n, ())))
        .collect();
    let local_keys: HashMap<PublicKey, ()> = locals.iter().map(|l| (l.public_key, ())).collect();
    // How many peer identities claim each address and key.
    let mut net_claims: HashMap<IpNet, usize> = HashMap::new();
    let mut key_claims: HashMap<PublicKey, usize> = HashMap::new();
    for identity in peers.iter().flat_map(|p| &p.identities) {
        for net in &identity.allowed_ips {
            *net_claims.entry(*net).or_default() += 1;
        }
        for key in std::iter::once(identity.public_key).chain(identity.next_public_key) {
            *key_claims.entry(key).or_default() += 1;
        }
    }
    for peer in peers.iter_mut() {
        let node = peer.name.clone();
        peer.identities.retain_mut(|identity| {
            let object = format!("MeshNode {node} identity {}", identity.principal);
            let keys_clash = std::iter::once(identity.public_key)
                .chain(identity.next_public_key)
                .any(|k| local_keys.contains_key(&k) || key_claims[&k] > 1);
            if keys_clash {
                skipped.push(Skipped {
                    object,
                    reason: "its public key is another identity's too: left out".to_owned(),
                });
                return false;
            }
            let before = identity.allowed_ips.len();
            identity.allowed_ips.retain(|net| {
                let taken = local_nets.contains_key(net) || net_claims[net] > 1;
                if taken {
                    skipped.push(Skipped {
                        object: object.clone(),
                        reason: format!("{net} is claimed by another identity too: left out"),
                    });
                }
                !taken
            });
            before == 0 || !identity.allowed_ips.is_empty()
        });
        // One identity per principal on a node.
        let mut seen = BTreeMap::new();
        peer.identities.retain(|identity| {
            let first = seen.insert(identity.principal.to_string(), ()).is_none();
            if !first {
                skipped.push(Skipped {
                    object: format!("MeshNode {node} identity {}", identity.principal),
                    reason: "listed twice: the second is left out".to_owned(),
                });
            }
            first
        });
    }
    peers.retain(|p| !p.identities.is_empty());
}

/// Compiles one Istio object as the YAML loader compiles a file's document.
fn add_istio_object(policy: &mut PolicySet, object: &Value) -> Result<(), FileError> {
    let metadata = &object["metadata"];
    let origin = format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or("object"),
        metadata["namespace"].as_str().unwrap_or(""),
        metadata["name"].as_str().unwrap_or("")
    );
    // What the loader reads; the server's bookkeeping (managedFields and the like) is
    // left behind.
    let mut trimmed = serde_json::json!({
        "apiVersion": object["apiVersion"],
        "kind": object["kind"],
        "metadata": {"name": metadata["name"], "namespace": metadata["namespace"]},
    });
    if let Some(spec) = object.get("spec") {
        trimmed["spec"] = spec.clone();
    }
    let text = serde_yaml_ng::to_string(&trimmed)
        .map_err(|e| FileError::whole_file(Path::new(&origin), e.to_string()))?;
    add_istio_yaml(policy, &text, Path::new(&origin))
}
