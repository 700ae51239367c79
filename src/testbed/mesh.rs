//! meshguard daemons in namespaces: writes a node file, key files and peer files into a
//! temporary directory and runs `meshguard up` on them.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::wg::find_program;
use super::{wait_until, ChildGuard, Netns, TempDir};
use crate::identity::PrivateKey;

/// One workload identity of a node under test.
#[derive(Clone)]
pub struct IdentitySpec {
    pub principal: String,
    pub addresses: Vec<String>,
    pub private_key: PrivateKey,
    /// A key it also answers on, while rotating to it (`next_private_key_file`).
    pub next_private_key: Option<PrivateKey>,
    pub labels: Vec<(String, String)>,
}

impl IdentitySpec {
    /// An identity with a freshly generated key.
    pub fn new(principal: &str, addresses: &[&str]) -> Self {
        IdentitySpec {
            principal: principal.to_owned(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            private_key: PrivateKey::generate(),
            next_private_key: None,
            labels: Vec::new(),
        }
    }

    /// Adds a label (for policy selectors).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn public_key(&self) -> String {
        self.private_key.public_key().to_base64()
    }
}

/// An allow list that lets every authenticated peer identity reach every local one.
pub const ALLOW_ALL_POLICY: &str = r#"
[[policy]]
name = "allow-all"
namespace = "istio-system"
action = "ALLOW"

[[policy.rules]]
"#;

/// A meshguard node: its underlay address, its identities and its allow list.
#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub identities: Vec<IdentitySpec>,
    /// The policy file: meshguard's TOML form, or Istio YAML when it has an `apiVersion`.
    /// The node's default is deny.
    pub policy: String,
    /// `interface.offload`: TUN segmentation offloads when the kernel has them.
    pub offload: bool,
    /// `interface.workers`; `None` leaves the choice to the daemon.
    pub workers: Option<usize>,
}

/// How a node sees one remote node: a peer file.
#[derive(Clone)]
pub struct PeerEntry {
    pub name: String,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// (principal, public key in base64, allowed IPs)
    pub identities: Vec<(String, String, Vec<String>)>,
    /// (principal, next public key in base64) for identities rotating their key.
    pub next_keys: Vec<(String, String)>,
}

impl PeerEntry {
    /// The peer file for another meshguard node, listing all its identities.
    pub fn for_node(node: &NodeSpec) -> Self {
        PeerEntry {
            name: node.name.clone(),
            endpoint: Some(node.listen),
            persistent_keepalive: None,
            identities: node
                .identities
                .iter()
                .map(|i| (i.principal.clone(), i.public_key(), i.addresses.clone()))
                .collect(),
            next_keys: node
                .identities
                .iter()
                .filter_map(|i| {
                    let next = i.next_private_key.as_ref()?;
                    Some((i.principal.clone(), next.public_key().to_base64()))
                })
                .collect(),
        }
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Writes `contents` to `path` in one step (a temporary file renamed over it), so a
/// daemon watching the file never reads it half-written; `mode` is the new file's.
fn write_whole(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&partial)?;
    io::Write::write_all(&mut file, contents.as_bytes())?;
    std::fs::rename(&partial, path)
}

/// Writes the node file (interface `mg0`, every identity address on it, default deny),
/// its keys, its policy file (`policy.toml`, or `policy.yaml` for Istio YAML) and its
/// peer files into `dir`; returns the node file's path.
pub fn write_config(dir: &Path, node: &NodeSpec, peers: &[PeerEntry]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("keys"))?;
    std::fs::create_dir_all(dir.join("peers"))?;
    let path = write_node_file(dir, node)?;
    for peer in peers {
        write_peer_file(dir, peer)?;
    }
    Ok(path)
}

/// The node file, its keys and its policy file in `dir` (whose `keys` directory exists).
fn write_node_file(dir: &Path, node: &NodeSpec) -> io::Result<PathBuf> {
    let all_addresses: Vec<String> = node
        .identities
        .iter()
        .flat_map(|i| i.addresses.iter().cloned())
        .collect();
    let mut text = String::new();
    writeln!(text, "name = {:?}", node.name).unwrap();
    writeln!(text, "listen = \"{}\"", node.listen).unwrap();
    writeln!(text, "peers_dir = \"peers\"\n").unwrap();
    writeln!(text, "[interface]\nname = \"mg0\"\nmtu = 1420").unwrap();
    writeln!(text, "offload = {}", node.offload).unwrap();
    if let Some(workers) = node.workers {
        writeln!(text, "workers = {workers}").unwrap();
    }
    writeln!(text, "addresses = {}\n", toml_list(&all_addresses)).unwrap();
    let policy_file = if node.policy.contains("apiVersion:") {
        "policy.yaml"
    } else {
        "policy.toml"
    };
    writeln!(
        text,
        "[policy]\nfiles = [\"{policy_file}\"]\ndefault = \"deny\"\n"
    )
    .unwrap();
    // The sockets in the node's own directory: every test daemon's device is `mg0`.
    writeln!(
        text,
        "[admin]\nlisten = \"127.0.0.1:{ADMIN_PORT}\"\nsocket_dir = \"{RUN_DIR}\"\n\n\
         [uapi]\ndirectory = \"{RUN_DIR}/wireguard\"\n"
    )
    .unwrap();
    write_whole(&dir.join(policy_file), &node.policy, 0o644)?;
    for (index, identity) in node.identities.iter().enumerate() {
        let key_file = format!("keys/identity-{index}.key");
        write_whole(
            &dir.join(&key_file),
            &format!("{}\n", identity.private_key.to_base64()),
            0o600,
        )?;
        writeln!(text, "[[identity]]\nprincipal = {:?}", identity.principal).unwrap();
        writeln!(text, "private_key_file = {key_file:?}").unwrap();
        if let Some(next) = &identity.next_private_key {
            let next_file = format!("keys/identity-{index}.next.key");
            write_whole(
                &dir.join(&next_file),
                &format!("{}\n", next.to_base64()),
                0o600,
            )?;
            writeln!(text, "next_private_key_file = {next_file:?}").unwrap();
        }
        writeln!(text, "addresses = {}", toml_list(&identity.addresses)).unwrap();
        let labels: Vec<String> = identity
            .labels
            .iter()
            .map(|(k, v)| format!("{k:?} = {v:?}"))
            .collect();
        writeln!(text, "labels = {{ {} }}\n", labels.join(", ")).unwrap();
    }
    let path = dir.join("node.toml");
    write_whole(&path, &text, 0o644)?;
    Ok(path)
}

/// One peer file in `dir/peers`, named after the peer.
fn write_peer_file(dir: &Path, peer: &PeerEntry) -> io::Result<()> {
    let mut text = format!("name = {:?}\n", peer.name);
    if let Some(endpoint) = peer.endpoint {
        writeln!(text, "endpoint = \"{endpoint}\"").unwrap();
    }
    if let Some(seconds) = peer.persistent_keepalive {
        writeln!(text, "persistent_keepalive = {seconds}").unwrap();
    }
    for (principal, public_key, allowed_ips) in &peer.identities {
        writeln!(text, "\n[[identity]]\nprincipal = {principal:?}").unwrap();
        writeln!(text, "public_key = {public_key:?}").unwrap();
        if let Some((_, next)) = peer.next_keys.iter().find(|(p, _)| p == principal) {
            writeln!(text, "next_public_key = {next:?}").unwrap();
        }
        writeln!(text, "allowed_ips = {}", toml_list(allowed_ips)).unwrap();
    }
    let path = dir.join("peers").join(format!("{}.toml", peer.name));
    write_whole(&path, &text, 0o644)
}

/// A node in Kubernetes mode: its node file names the API server instead of identities,
/// peers and policy files.
#[derive(Clone)]
pub struct KubeNodeSpec {
    /// The Node's name.
    pub name: String,
    pub listen: SocketAddr,
    /// Addresses put on the device: the pods' addresses, in these tests' namespaces.
    pub addresses: Vec<String>,
    /// `policy.default`: what applies when no ALLOW policy selects an identity.
    pub default: &'static str,
    /// `kubernetes.key_lifetime` and `kubernetes.key_overlap`, if not the defaults.
    pub key_rotation: Option<(&'static str, &'static str)>,
}

/// The node file of `node` in `dir`, with a kubeconfig for `kubeconfig`'s text.
fn write_kube_node_file(dir: &Path, node: &KubeNodeSpec, kubeconfig: &str) -> io::Result<PathBuf> {
    write_whole(&dir.join("kubeconfig"), kubeconfig, 0o600)?;
    let mut text = String::new();
    writeln!(text, "name = {:?}", node.name).unwrap();
    writeln!(text, "listen = \"{}\"\n", node.listen).unwrap();
    writeln!(text, "[interface]\nname = \"mg0\"\nmtu = 1420").unwrap();
    writeln!(text, "addresses = {}\n", toml_list(&node.addresses)).unwrap();
    writeln!(text, "[policy]\ndefault = {:?}\n", node.default).unwrap();
    writeln!(
        text,
        "[admin]\nlisten = \"127.0.0.1:{ADMIN_PORT}\"\nsocket_dir = \"{RUN_DIR}\"\n\n\
         [uapi]\ndirectory = \"{RUN_DIR}/wireguard\"\n"
    )
    .unwrap();
    writeln!(
        text,
        "[kubernetes]\nnode_name = {:?}\nkubeconfig = \"kubeconfig\"\nstate_dir = \"state\"",
        node.name
    )
    .unwrap();
    if let Some((lifetime, overlap)) = node.key_rotation {
        writeln!(
            text,
            "key_lifetime = {lifetime:?}\nkey_overlap = {overlap:?}"
        )
        .unwrap();
    }
    let path = dir.join("node.toml");
    write_whole(&path, &text, 0o644)?;
    Ok(path)
}

/// Where a test daemon's admin listener is, on its namespace's loopback.
const ADMIN_PORT: u16 = 9586;
/// A test daemon's control socket and userspace API sockets go under this directory of
/// its configuration directory.
const RUN_DIR: &str = "run";
/// Where `wg` looks for userspace API sockets; nowhere else.
const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// A running `meshguard up` in a namespace, with its configuration directory.
pub struct MeshguardNode {
    // Field order: the process stops before its directory goes.
    process: ChildGuard,
    config: PathBuf,
    _dir: TempDir,
}

/// A line that the daemon logs once it serves traffic.
const READY_LINE: &str = "meshguard is up";

impl MeshguardNode {
    /// Writes the configuration and starts `binary up` in `ns`; returns once the daemon
    /// says it is up, or an error with its output if it exits or stays silent for 10 s.
    pub fn start(
        binary: &Path,
        ns: &Netns,
        node: &NodeSpec,
        peers: &[PeerEntry],
    ) -> io::Result<MeshguardNode> {
        Self::start_with_env(binary, ns, node, peers, &[])
    }

    /// `start`, with more variables in the daemon's environment.
    pub fn start_with_env(
        binary: &Path,
        ns: &Netns,
        node: &NodeSpec,
        peers: &[PeerEntry],
        env: &[(&str, &str)],
    ) -> io::Result<MeshguardNode> {
        let dir = TempDir::new("node")?;
        let config = write_config(dir.path(), node, peers)?;
        let process = launch(binary, ns, &config, env)?;
        Ok(MeshguardNode {
            process,
            config,
            _dir: dir,
        })
    }

    /// Starts `binary up` in Kubernetes mode for `node`, with the API server
    /// `kubeconfig` names; returns once the daemon is up (after its first complete sync).
    pub fn start_kubernetes(
        binary: &Path,
        ns: &Netns,
        node: &KubeNodeSpec,
        kubeconfig: &str,
    ) -> io::Result<MeshguardNode> {
        let daemon = Self::spawn_kubernetes(binary, ns, node, kubeconfig)?;
        wait_up(ns, &daemon.config, &daemon.process)?;
        Ok(daemon)
    }

    /// `start_kubernetes` without waiting for the daemon to come up.
    pub fn spawn_kubernetes(
        binary: &Path,
        ns: &Netns,
        node: &KubeNodeSpec,
        kubeconfig: &str,
    ) -> io::Result<MeshguardNode> {
        let dir = TempDir::new("kubenode")?;
        let config = write_kube_node_file(dir.path(), node, kubeconfig)?;
        let process = spawn(binary, ns, &config, &[])?;
        Ok(MeshguardNode {
            process,
            config,
            _dir: dir,
        })
    }

    /// Kills the daemon (SIGKILL: it leaves its sockets behind) and starts it again on
    /// the same files.
    pub fn kill_and_restart(&mut self, binary: &Path, ns: &Netns) -> io::Result<()> {
        self.process.signal(nix::sys::signal::Signal::SIGKILL)?;
        self.process.wait_timeout(Duration::from_secs(5))?;
        self.process = launch(binary, ns, &self.config, &[])?;
        Ok(())
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    fn dir(&self) -> &Path {
        self.config
            .parent()
            .expect("the node file is in a directory")
    }

    /// The directory of its userspace API sockets (`uapi.directory`).
    pub fn uapi_dir(&self) -> PathBuf {
        self.dir().join(RUN_DIR).join("wireguard")
    }

    /// The control socket `meshguard status` reads.
    pub fn control_socket(&self) -> PathBuf {
        self.dir().join(RUN_DIR).join("mg0.sock")
    }

    /// The daemon's report, as `binary status --json` reads it from the control socket.
    pub fn status(&self, binary: &Path) -> io::Result<crate::ops::DaemonStatus> {
        let out = Command::new(binary)
            .args(["status", "--json", "--socket"])
            .arg(self.control_socket())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "meshguard status: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(io::Error::other)
    }

    /// Runs `wg ARGS` against this daemon's userspace API sockets: in a mount namespace
    /// of its own where they are what `/var/run/wireguard` holds, since `wg` looks
    /// nowhere else.
    pub fn wg<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let wg = find_program("wg").ok_or_else(|| io::Error::other("`wg` not found"))?;
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mkdir -p {WG_SOCKET_DIR} && mount --bind \"$0\" {WG_SOCKET_DIR} && exec \"$@\""
            ))
            .arg(self.uapi_dir())
            .arg(wg)
            .args(args);
        command.output()
    }

    /// `GET path` from its admin listener, from inside `ns`: (status code, body).
    pub fn admin_get(&self, ns: &Netns, path: &str) -> io::Result<(u16, String)> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        ns.run(move || -> io::Result<(u16, String)> {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", ADMIN_PORT))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) = response
                .split_once("\r\n\r\n")
                .ok_or_else(|| io::Error::other(format!("not HTTP: {response:?}")))?;
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
            Ok((code, body.to_owned()))
        })?
    }

    /// Rewrites the running daemon's node file, keys, policy file and peer files for
    /// `node` and `peers` (peer files of other peers are removed), each file in one step.
    /// The daemon notices and reloads.
    pub fn rewrite(&self, node: &NodeSpec, peers: &[PeerEntry]) -> io::Result<()> {
        let dir = self
            .config
            .parent()
            .expect("the node file is in a directory");
        write_node_file(dir, node)?;
        let wanted: Vec<String> = peers.iter().map(|p| format!("{}.toml", p.name)).collect();
        for entry in std::fs::read_dir(dir.join("peers"))? {
            let entry = entry?;
            if !wanted.contains(&entry.file_name().to_string_lossy().into_owned()) {
                std::fs::remove_file(entry.path())?;
            }
        }
        for peer in peers {
            write_peer_file(dir, peer)?;
        }
        Ok(())
    }

    /// How many reloads the daemon has logged as applied so far.
    pub fn reloads(&self) -> usize {
        self.log().matches("configuration reloaded").count()
    }

    pub fn process(&self) -> &ChildGuard {
        &self.process
    }

    pub fn log(&self) -> String {
        self.process.read_stderr()
    }

    /// Stops the daemon (SIGTERM) and returns its log, which ends with its counters.
    pub fn stop(&self) -> io::Result<String> {
        self.process.terminate_and_wait(Duration::from_secs(5))?;
        Ok(self.process.read_stderr())
    }
}

/// Starts `binary up --config config` in `ns` and waits until it says it is up.
fn launch(
    binary: &Path,
    ns: &Netns,
    config: &Path,
    env: &[(&str, &str)],
) -> io::Result<ChildGuard> {
    let process = spawn(binary, ns, config, env)?;
    wait_up(ns, config, &process)?;
    Ok(process)
}

/// Starts `binary up --config config` in `ns`.
fn spawn(binary: &Path, ns: &Netns, config: &Path, env: &[(&str, &str)]) -> io::Result<ChildGuard> {
    let mut command = Command::new(binary);
    command.arg("up").arg("--config").arg(config);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    command.envs(env.iter().copied());
    ns.spawn(&command)
}

/// Waits until the daemon says it is up; an error with its output if it exits or stays
/// silent for 10 s.
fn wait_up(ns: &Netns, config: &Path, process: &ChildGuard) -> io::Result<()> {
    let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        !process.is_running() || process.read_stderr().contains(READY_LINE)
    });
    if !ready || !process.is_running() {
        return Err(io::Error::other(format!(
            "meshguard ({}) did not come up in {}:\n{}",
            config.display(),
            ns.name(),
            process.read_stderr()
        )));
    }
    Ok(())
}

/// The value of counter `name` in the last counters line of a daemon log.
pub fn counter(log: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("counters="))?;
    let key = format!(" {name}=");
    let line = line.replace("counters=", " ");
    let start = line.find(&key)? + key.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_reads_the_last_counters_line() {
        let log =
            "x counters=packets_in=1 forged=2\ny\nz counters=packets_in=5 forged=7 replayed=0\n";
        assert_eq!(counter(log, "packets_in"), Some(5));
        assert_eq!(counter(log, "forged"), Some(7));
        assert_eq!(counter(log, "replayed"), Some(0));
        assert_eq!(counter(log, "missing"), None);
    }

    #[test]
    fn written_config_loads() {
        let dir = TempDir::new("cfgtest").unwrap();
        let a = NodeSpec {
            name: "node-a".into(),
            listen: "198.18.0.1:51820".parse().unwrap(),
            identities: vec![
                IdentitySpec::new("cluster.local/ns/a/sa/one", &["10.1.0.1/32"]),
                IdentitySpec::new("cluster.local/ns/a/sa/two", &["10.1.0.2/32"]),
            ],
            policy: ALLOW_ALL_POLICY.into(),
            offload: true,
            workers: Some(2),
        };
        let b = NodeSpec {
            name: "node-b".into(),
            listen: "198.18.0.2:51820".parse().unwrap(),
            identities: vec![IdentitySpec::new(
                "cluster.local/ns/b/sa/one",
                &["10.2.0.1/32"],
            )],
            policy: ALLOW_ALL_POLICY.into(),
            offload: true,
            workers: Some(2),
        };
        let path = write_config(dir.path(), &a, &[PeerEntry::for_node(&b)]).unwrap();
        let config = crate::config::load(&path).unwrap();
        assert_eq!(config.identities.len(), 2);
        assert_eq!(config.interface.workers, Some(2));
        let policy = crate::policy::load_files(&config.policy.files).unwrap();
        assert_eq!(policy.policies.len(), 1);
        assert_eq!(
            config.peers[0].identities[0].public_key.to_base64(),
            b.identities[0].public_key()
        );
    }
}
