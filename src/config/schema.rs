//! The TOML schema as written in the files, before validation.
//!
//! Values that need checking (principals, keys, addresses, ranges) are read as strings or
//! wide integers with their position in the file, so that validation can say exactly
//! which key is wrong and on which line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub peers_dir: Option<Spanned<String>>,
    pub interface: RawInterface,
    #[serde(default)]
    pub identity: Vec<RawLocalIdentity>,
    pub policy: Option<RawPolicy>,
    pub admin: Option<RawAdmin>,
    pub uapi: Option<RawUapi>,
    pub kubernetes: Option<RawKubernetes>,
}

/// `[kubernetes]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    pub node_name: Option<Spanned<String>>,
    pub kubeconfig: Option<Spanned<String>>,
    pub trust_domain: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub endpoint: Option<Spanned<String>>,
    pub key_lifetime: Option<Spanned<String>>,
    pub key_overlap: Option<Spanned<String>>,
}

/// `[admin]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub socket_dir: Option<Spanned<String>>,
}

/// `[uapi]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUapi {
    pub enabled: Option<bool>,
    pub directory: Option<Spanned<String>>,
    pub private_key: Option<bool>,
}

/// `[policy]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub files: Vec<Spanned<String>>,
    pub default: Option<Spanned<String>>,
    pub root_namespace: Option<Spanned<String>>,
}

/// `[interface]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInterface {
    pub name: Spanned<String>,
    pub mtu: Option<Spanned<i64>>,
    pub offload: Option<bool>,
    pub udp_coalescing: Option<bool>,
    pub workers: Option<Spanned<i64>>,
    pub queue_length: Option<Spanned<i64>>,
    pub scheduling: Option<Spanned<String>>,
    pub realtime_share_percent: Option<Spanned<i64>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
}

/// `[[identity]]` of a node file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLocalIdentity {
    pub principal: Spanned<String>,
    pub private_key_file: Spanned<String>,
    pub next_private_key_file: Option<Spanned<String>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A peer file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeer {
    pub name: Spanned<String>,
    pub endpoint: Option<Spanned<String>>,
    pub persistent_keepalive: Option<Spanned<i64>>,
    #[serde(default)]
    pub identity: Vec<RawPeerIdentity>,
}

/// `[[identity]]` of a peer file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeerIdentity {
    pub principal: Spanned<String>,
    pub public_key: Spanned<String>,
    pub next_public_key: Option<Spanned<String>>,
    #[serde(default)]
    pub allowed_ips: Vec<Spanned<String>>,
}
