//! `MeshNode` (`meshguard.io/v1alpha1`, cluster-scoped): what one node's daemon publishes
//! about itself, named after its Node and owned by it. Every other node's daemon reads
//! it and makes its identities peer identities.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The spec of a `MeshNode`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "meshguard.io",
    version = "v1alpha1",
    kind = "MeshNode",
    shortname = "mn",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// `ADDRESS:PORT` of the node's WireGuard UDP socket, as other nodes reach it.
    pub endpoint: String,
    /// The workload identities hosted on the node.
    #[serde(default)]
    pub identities: Vec<MeshIdentity>,
}

/// One workload identity (a service account) on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshIdentity {
    /// `TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    pub principal: String,
    /// Base64 X25519 public keys: the current one, then the next one while it rotates.
    #[schemars(length(min = 1, max = 2))]
    pub public_keys: Vec<String>,
    /// The addresses of the identity's pods on the node (`/32`, `/128`).
    #[serde(rename = "allowedIPs")]
    pub allowed_ips: Vec<String>,
}
