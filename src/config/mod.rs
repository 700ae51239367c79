//! Node configuration: the TOML node file, the peer files it points to, loading and
//! validation.
//!
//! [`load`] reads a node file and every `*.toml` file of its peers directory, checks
//! everything (see [`load`] for the list), and returns a fully resolved [`NodeConfig`] or
//! the first [`FileError`](crate::file_error::FileError), which names the file, the key and the reason.

mod cross_checks;
mod fields;
mod load;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::identity::{Principal, PrivateKey, PublicKey};
use crate::policy::{DefaultAction, DEFAULT_ROOT_NAMESPACE};

pub use load::{check_generated, load, load_peer_file};

/// MTU used when `interface.mtu` is not given.
pub const DEFAULT_MTU: u16 = 1420;
/// Smallest accepted `interface.mtu`.
pub const MIN_MTU: u16 = 576;
/// Smallest MTU that can carry IPv6.
pub const MIN_MTU_IPV6: u16 = 1280;
/// Largest accepted `interface.mtu`.
pub const MAX_MTU: u16 = 9000;
/// Longest interface name Linux accepts, in bytes (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// A loaded and validated node file, with its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node file, as given to [`load`].
    pub path: PathBuf,
    pub name: String,
    /// UDP socket address to listen on.
    pub listen: SocketAddr,
    pub interface: InterfaceConfig,
    /// The peers directory, resolved against the node file's directory; `None` in
    /// Kubernetes mode.
    pub peers_dir: Option<PathBuf>,
    /// Local identities, in file order. Never empty in file mode.
    pub identities: Vec<LocalIdentityConfig>,
    /// One entry per peer file, sorted by file name.
    pub peers: Vec<PeerConfig>,
    pub policy: PolicyConfig,
    pub operations: OperationsConfig,
    /// `[kubernetes]`: identities, peers and policies come from the cluster instead of
    /// `[[identity]]`, `peers_dir` and policy files.
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[kubernetes]` of a node file: Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The Node this daemon runs on; `None`: the `NODE_NAME` environment variable says.
    pub node_name: Option<String>,
    /// A kubeconfig file (resolved); `None`: `KUBECONFIG` if set, else the in-cluster
    /// service account.
    pub kubeconfig: Option<PathBuf>,
    /// The trust domain of the principals made from service accounts.
    pub trust_domain: String,
    /// Where the service accounts' keys are kept (made 0700).
    pub state_dir: PathBuf,
    /// The address other nodes send to, published in this node's `MeshNode`; `None`: the
    /// listen address if it is a specific one, else `NODE_IP` (the downward API's
    /// `status.hostIP`) with the listen port.
    pub endpoint: Option<SocketAddr>,
    /// When the service accounts' keys are rotated.
    pub key_rotation: KeyRotation,
}

/// A service account's key is rotated once it is `lifetime` old (`None`: never): the
/// next key is made and published beside it, and `overlap` after this node's
/// `MeshNode` is seen listing it (time for every peer to read it and move its traffic)
/// it becomes the key and the old one is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRotation {
    pub lifetime: Option<std::time::Duration>,
    pub overlap: std::time::Duration,
}

impl Default for KeyRotation {
    fn default() -> Self {
        KeyRotation {
            lifetime: Some(DEFAULT_KEY_LIFETIME),
            overlap: DEFAULT_KEY_OVERLAP,
        }
    }
}

/// `kubernetes.key_lifetime` unless given: 30 days.
pub const DEFAULT_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// `kubernetes.key_overlap` unless given: 5 minutes.
pub const DEFAULT_KEY_OVERLAP: std::time::Duration = std::time::Duration::from_secs(300);

/// `kubernetes.trust_domain` unless given.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// `kubernetes.state_dir` unless given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshguard";

/// `[admin]` and `[uapi]`: how operators look into the running daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationsConfig {
    /// `admin.listen`: the HTTP listener of `/metrics`, `/healthz` and `/ready`;
    /// `None` (the key left out): no listener.
    pub admin_listen: Option<SocketAddr>,
    /// `admin.socket_dir`: where the control socket `meshguard status` reads is made,
    /// as `<interface name>.sock`.
    pub control_dir: PathBuf,
    /// `uapi.directory`: where WireGuard's userspace API sockets are made (one per local
    /// identity); `None` when `uapi.enabled = false`.
    pub uapi_dir: Option<PathBuf>,
    /// `uapi.private_key`: whether `get` answers with the identity's private key, as
    /// wireguard-go does (default true; the sockets are the daemon user's alone).
    pub uapi_private_key: bool,
}

/// Where `wg` looks for userspace API sockets.
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// Where the control socket goes unless `admin.socket_dir` says otherwise.
pub const DEFAULT_CONTROL_DIR: &str = "/run/meshguard";

impl Default for OperationsConfig {
    fn default() -> Self {
        OperationsConfig {
            admin_listen: None,
            control_dir: PathBuf::from(DEFAULT_CONTROL_DIR),
            uapi_dir: Some(PathBuf::from(DEFAULT_UAPI_DIR)),
            uapi_private_key: true,
        }
    }
}

impl OperationsConfig {
    /// The control socket of the daemon of `interface`.
    pub fn control_socket(&self, interface: &str) -> PathBuf {
        self.control_dir.join(format!("{interface}.sock"))
    }
}

/// `[policy]`: where the allow lists come from and what applies when none selects an
/// identity. Without the section: no policy files and default deny (fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// `.toml` (meshguard form) or `.yaml`/`.yml` (Istio), resolved against the node
    /// file's directory, in the order given.
    pub files: Vec<PathBuf>,
    pub default: DefaultAction,
    pub root_namespace: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            files: Vec::new(),
            default: DefaultAction::Deny,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
        }
    }
}

/// `[interface]`: the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// TUN device name: 1 to 15 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// 576..=9000, at least 1280 if any configured prefix is IPv6; default 1420.
    pub mtu: u16,
    /// Addresses to put on the device, as written (host bits allowed: `10.10.1.1/24`).
    pub addresses: Vec<IpNet>,
    /// Use the kernel's TUN segmentation offloads when it has them (default true).
    pub offload: bool,
    /// With offload: join UDP datagrams of a flow into one TUN write (USO), as TCP
    /// segments are (default true). Some kernels dropped such packets when forwarding
    /// them into a VXLAN device.
    pub udp_coalescing: bool,
    /// Data-path workers, each with its own TUN queue and UDP socket; `None`: one per
    /// two available cores, at most `MAX_AUTO_WORKERS`.
    pub workers: Option<usize>,
    /// The TUN device's transmit queue (`txqueuelen`): packets the kernel holds for the
    /// daemon to read before it drops them.
    pub queue_length: u32,
    /// Where the daemon's threads stand in the CPU scheduler (default real-time).
    pub scheduling: Scheduling,
    /// With `Scheduling::Realtime`: the percentage of a core each of the daemon's
    /// threads may use at real-time priority; above it, the thread runs at normal
    /// priority until its use falls again (1 to 100).
    pub realtime_share_percent: u32,
}

/// `interface.scheduling`: whether the daemon's threads take a real-time priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// `realtime`: the lowest real-time priority (SCHED_FIFO 1), so that packets do not
    /// wait behind the workloads' threads for a core, as the kernel's own network path
    /// does not. Needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1; without either the
    /// daemon runs at normal priority and logs a warning.
    Realtime,
    /// `normal`: the threads share the cores with everything else.
    Normal,
}

impl Scheduling {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduling::Realtime => "realtime",
            Scheduling::Normal => "normal",
        }
    }
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Scheduling::Realtime, Scheduling::Normal]
            .into_iter()
            .find(|known| known.as_str() == s)
            .ok_or_else(|| format!("unknown scheduling {s:?}; expected \"realtime\" or \"normal\""))
    }
}

/// Default `interface.realtime_share_percent`: real-time priority for traffic that
/// takes up to half a core per thread; a transfer that would take more competes with
/// the workloads as a normal thread does (the README's benchmark section has the
/// figures).
pub const DEFAULT_REALTIME_SHARE_PERCENT: u32 = 50;

/// Default `interface.queue_length`: the kernel's 500 overflows while the daemon waits
/// for a core (the README's benchmark section has the figures).
pub const DEFAULT_QUEUE_LENGTH: u32 = 4000;
/// Bounds of `interface.queue_length`.
pub const MIN_QUEUE_LENGTH: u32 = 16;
pub const MAX_QUEUE_LENGTH: u32 = 65536;

/// Most workers the daemon starts on its own; more only when asked for.
pub const MAX_AUTO_WORKERS: usize = 4;
/// Most workers a node file may ask for.
pub const MAX_WORKERS: usize = 64;

/// A `[[identity]]` of the node file: a workload identity hosted on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentityConfig {
    pub principal: Principal,
    /// Resolved against the node file's directory.
    pub private_key_file: PathBuf,
    pub private_key: PrivateKey,
    /// Derived from `private_key`.
    pub public_key: PublicKey,
    /// A second key the identity also answers handshakes on, while it rotates to it:
    /// the key file (resolved), the key, its public key.
    pub next_key: Option<(PathBuf, PrivateKey, PublicKey)>,
    /// Addresses on this node carried by this identity. Never empty; no host bits set.
    pub addresses: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
}

/// A peer file: one remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer file.
    pub path: PathBuf,
    pub name: String,
    /// Where to send initiations. Without it we only answer.
    pub endpoint: Option<SocketAddr>,
    /// Seconds, 1..=65535.
    pub persistent_keepalive: Option<u16>,
    /// Never empty.
    pub identities: Vec<PeerIdentityConfig>,
}

/// A `[[identity]]` of a peer file: a workload identity on a remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentityConfig {
    pub principal: Principal,
    pub public_key: PublicKey,
    /// The key the identity rotates to: initiations go to it first, and the current key
    /// keeps working until it is removed.
    pub next_public_key: Option<PublicKey>,
    /// Never empty; no host bits set.
    pub allowed_ips: Vec<IpNet>,
}

fn join_nets(nets: &[IpNet]) -> String {
    if nets.is_empty() {
        return "(none)".to_owned();
    }
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A short human-readable summary, as printed by `meshguard check`. Contains public keys,
/// never private ones.
pub fn summary(cfg: &NodeConfig) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "node {} ({})", cfg.name, cfg.path.display());
    let _ = writeln!(s, "  listen     {}", cfg.listen);
    let _ = writeln!(
        s,
        "  interface  {} mtu {} addresses {}",
        cfg.interface.name,
        cfg.interface.mtu,
        join_nets(&cfg.interface.addresses)
    );
    let _ = writeln!(s, "  local identities: {}", cfg.identities.len());
    for id in &cfg.identities {
        let _ = writeln!(s, "    {}", id.principal);
        let _ = writeln!(s, "      public key   {}", id.public_key);
        if let Some((_, _, next)) = &id.next_key {
            let _ = writeln!(s, "      next key     {next} (also answered on)");
        }
        let _ = writeln!(s, "      addresses    {}", join_nets(&id.addresses));
        if !id.labels.is_empty() {
            let labels: Vec<String> = id.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "      labels       {}", labels.join(", "));
        }
    }
    match &cfg.peers_dir {
        Some(dir) => {
            let _ = writeln!(s, "  peers: {} (from {})", cfg.peers.len(), dir.display());
        }
        None => {
            let _ = writeln!(s, "  peers: from the cluster's MeshNodes (Kubernetes mode)");
        }
    }
    for peer in &cfg.peers {
        let endpoint = match peer.endpoint {
            Some(e) => e.to_string(),
            None => "none (answer only)".to_owned(),
        };
        let _ = write!(s, "    {}  endpoint {endpoint}", peer.name);
        if let Some(k) = peer.persistent_keepalive {
            let _ = write!(s, "  keepalive {k}s");
        }
        let _ = writeln!(s);
        for id in &peer.identities {
            let _ = writeln!(s, "      {}", id.principal);
            let _ = writeln!(s, "        public key   {}", id.public_key);
            if let Some(next) = &id.next_public_key {
                let _ = writeln!(s, "        next key     {next} (preferred)");
            }
            let _ = writeln!(s, "        allowed ips  {}", join_nets(&id.allowed_ips));
        }
    }
    let files: Vec<String> = cfg
        .policy
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    let _ = writeln!(
        s,
        "  policy: default {}, root namespace {}, files {}",
        cfg.policy.default,
        cfg.policy.root_namespace,
        if files.is_empty() {
            "(none)".to_owned()
        } else {
            files.join(", ")
        }
    );
    s
}
