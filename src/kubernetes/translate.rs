//! Cluster objects into a node's identities, without the API: the pods on this node become
//! local identities (one per service account), the other nodes' `MeshNode`s become peers,
//! and this node's identities with their keys become the `MeshNode` it publishes.
//!
//! Whatever is left out is reported with the reason; nothing malformed widens access: a
//! pod or identity that cannot be read is left out, and traffic to or from its addresses
//! then has no identity and is dropped.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;

use super::crd::{MeshIdentity, MeshNode, MeshNodeSpec};
use crate::config::{PeerConfig, PeerIdentityConfig};
use crate::identity::{Principal, PublicKey};

/// The running pods of one service account on this node: one local identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub principal: Principal,
    /// Each pod IP as a host prefix, sorted.
    pub addresses: Vec<IpNet>,
    /// The labels of its pods, which policy selectors match.
    pub labels: BTreeMap<String, String>,
    /// `namespace/name` of its pods, sorted.
    pub pods: Vec<String>,
}

/// An object left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Pod namespace/name` or `MeshNode name`, with the part concerned.
    pub object: String,
    pub reason: String,
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether `pod` is a running, non-host-network pod on `node`.
fn is_served(pod: &Pod, node: &str) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Running");
    spec.node_name.as_deref() == Some(node) && spec.host_network != Some(true) && running
}

/// The pod's IPs as host prefixes.
fn pod_addresses(pod: &Pod) -> Result<Vec<IpNet>, String> {
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.clone()));
    }
    if ips.is_empty() {
        return Err("no pod IP yet".to_owned());
    }
    ips.iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("pod IP {ip:?} is not an IP address"))
        })
        .collect()
}

/// The local identities of `node`: one per service account with running, non-host-network
/// pods there, named `TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`. The pods of one
/// identity must share their labels (policies select by them): the oldest pod's labels
/// are the identity's, and a pod whose labels differ is left out.
pub fn workloads(node: &str, trust_domain: &str, pods: &[Pod]) -> (Vec<Workload>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut served: Vec<&Pod> = pods.iter().filter(|p| is_served(p, node)).collect();
    // Oldest first (then by name), so the labels that count stay put as pods come and go.
    served.sort_by(|a, b| {
        let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| pod_name(a).cmp(&pod_name(b)))
    });
    let mut by_principal: BTreeMap<String, Workload> = BTreeMap::new();
    for pod in served {
        let name = pod_name(pod);
        let mut skip = |reason: String| {
            skipped.push(Skipped {
                object: format!("Pod {name}"),
                reason,
            })
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let principal: Principal =
            match format!("{trust_domain}/ns/{namespace}/sa/{account}").parse() {
                Ok(principal) => principal,
                Err(e) => {
                    skip(format!("no principal: {e}"));
                    continue;
                }
            };
        let addresses = match pod_addresses(pod) {
            Ok(addresses) => addresses,
            Err(reason) => {
                skip(reason);
                continue;
            }
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let workload = by_principal
            .entry(principal.to_string())
            .or_insert_with(|| Workload {
                principal,
                addresses: Vec::new(),
                labels: labels.clone(),
                pods: Vec::new(),
            });
        if workload.labels != labels {
            skip(format!(
                "its labels differ from those of {}, another pod of {} on this node: \
                 policies select by labels, so its traffic is not served",
                workload.pods[0], workload.principal
            ));
            continue;
        }
        workload.addresses.extend(addresses);
        workload.pods.push(name);
    }
    let workloads = by_principal
        .into_values()
        .map(|mut w| {
            w.addresses.sort();
            w.addresses.dedup();
            w.pods.sort();
            w
        })
        .collect();
    (workloads, skipped)
}

/// What this node publishes: its endpoint, and each identity with its public keys (the
/// current one, then the next while it rotates) and its pods' addresses.
pub fn mesh_node_spec(
    endpoint: SocketAddr,
    identities: &[(Workload, Vec<PublicKey>)],
) -> MeshNodeSpec {
    MeshNodeSpec {
        endpoint: endpoint.to_string(),
        identities: identities
            .iter()
            .map(|(workload, keys)| MeshIdentity {
                principal: workload.principal.to_string(),
                public_keys: keys.iter().map(PublicKey::to_base64).collect(),
                allowed_ips: workload.addresses.iter().map(IpNet::to_string).collect(),
            })
            .collect(),
    }
}

/// The peers of `own_node`: every other node's `MeshNode`, each a peer with one peer
/// identity per published identity. A `MeshNode` without a usable endpoint, or an
/// identity that does not read (principal, keys, addresses), is left out.
pub fn peers(own_node: &str, mesh_nodes: &[MeshNode]) -> (Vec<PeerConfig>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut peers = Vec::new();
    let mut nodes: Vec<&MeshNode> = mesh_nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own_node))
        .collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let endpoint = match node.spec.endpoint.parse::<SocketAddr>() {
            Ok(e) if e.port() != 0 && !e.ip().is_unspecified() => e,
            _ => {
                skipped.push(Skipped {
                    object: format!("MeshNode {name}"),
                    reason: format!(
                        "spec.endpoint {:?} is not ADDRESS:PORT to send to",
                        node.spec.endpoint
                    ),
                });
                continue;
            }
        };
        let mut identities = Vec::new();
        for (index, identity) in node.spec.identities.iter().enumerate() {
            match peer_identity(identity) {
                Ok(identity) => identities.push(identity),
                Err(reason) => skipped.push(Skipped {
                    object: format!("MeshNode {name} spec.identities[{index}]"),
                    reason,
                }),
            }
        }
        if identities.is_empty() {
            continue;
        }
        peers.push(PeerConfig {
            path: PathBuf::from(format!("MeshNode/{name}")),
            name,
            endpoint: Some(endpoint),
            persistent_keepalive: None,
            identities,
        });
    }
    (peers, skipped)
}

fn peer_identity(identity: &MeshIdentity) -> Result<PeerIdentityConfig, String> {
    let principal: Principal = identity
        .principal
        .parse()
        .map_err(|e| format!("principal {:?}: {e}", identity.principal))?;
    let keys = identity
        .public_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| format!("public key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (public_key, next_public_key) = match keys[..] {
        [current] => (current, None),
        [current, next] if current != next => (current, Some(next)),
        _ => {
            return Err(format!(
                "publicKeys has {} entries: one, or two different ones while rotating",
                keys.len()
            ))
        }
    };
    let allowed_ips = identity
        .allowed_ips
        .iter()
        .map(|a| match a.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Ok(net),
            Ok(_) => Err(format!("allowedIPs {a:?} has host bits set")),
            Err(_) => Err(format!("allowedIPs {a:?} is not a CIDR")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if allowed_ips.is_empty() {
        return Err("no allowedIPs".to_owned());
    }
    Ok(PeerIdentityConfig {
        principal,
        public_key,
        next_public_key,
        allowed_ips,
    })
}
