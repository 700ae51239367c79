//! Everything a running daemon reports about itself: the node's status and the daemon's
//! own counters. The control socket hands it to `meshguard status` as JSON; the
//! metrics and the userspace API are made from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::node::NodeStatus;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The node's name (its file's `name`).
    pub name: String,
    pub interface: String,
    pub listen: SocketAddr,
    pub workers: usize,
    /// The data-path threads run at real-time priority (`interface.scheduling`).
    #[serde(default)]
    pub realtime: bool,
    /// `interface.realtime_share_percent`: how much of a core each thread may use at
    /// real-time priority.
    #[serde(default)]
    pub realtime_share_percent: u32,
    /// Times a thread used more than that and dropped to normal priority.
    #[serde(default)]
    pub realtime_drops: u64,
    pub version: String,
    /// Seconds since the Unix epoch when the daemon came up.
    pub started_at: u64,
    /// The userspace API socket name of each local identity (`None`: the name would be
    /// longer than `wg` takes), in the order of `node.identities`.
    pub uapi_names: Vec<Option<String>>,
    pub reloads: ReloadCounts,
    /// Failed UDP sends by kind.
    pub send_errors: BTreeMap<String, u64>,
    /// Packets lost in TUN writes the kernel refused.
    #[serde(default)]
    pub tun_write_errors: u64,
    /// Packets the STRICT plaintext filter dropped; `None` without a filter.
    pub plaintext_dropped: Option<u64>,
    /// In Kubernetes mode: the API's side.
    #[serde(default)]
    pub kubernetes: Option<KubernetesCounts>,
    pub node: NodeStatus,
}

/// Kubernetes mode's counters.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct KubernetesCounts {
    /// The Node this daemon serves.
    pub node: String,
    /// API requests and watches that failed.
    pub api_errors: u64,
    /// Successful applies of this node's `MeshNode`.
    pub publications: u64,
    /// Key rotation steps taken (a next key made, a next key made the key).
    #[serde(default)]
    pub key_rotation_steps: u64,
}

/// Reloads applied and refused, and what the applied ones changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ReloadCounts {
    pub applied: u64,
    pub rejected: u64,
    pub identities_added: u64,
    pub identities_changed: u64,
    pub identities_removed: u64,
    pub peers_added: u64,
    pub peers_changed: u64,
    pub peers_removed: u64,
}

impl DaemonStatus {
    /// The local identity whose userspace API socket is `name`.
    pub fn identity_of_uapi_name(&self, name: &str) -> Option<usize> {
        self.uapi_names
            .iter()
            .position(|n| n.as_deref() == Some(name))
    }
}
