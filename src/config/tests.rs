//! Tests for loading and validation: one per kind of error, plus a full valid config.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::file_error::FileError;
use crate::identity::{PrivateKey, PublicKey};

/// A temporary directory with a valid two-identity node, two peer files and key files.
/// Removed on drop.
struct Fixture {
    dir: PathBuf,
    node: String,
    peer_b: String,
    peer_c: String,
    a1: PublicKey,
    b1: PublicKey,
    c1: PublicKey,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshguard-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::create_dir_all(dir.join("peers")).unwrap();
        let mut fx = Fixture {
            dir,
            node: String::new(),
            peer_b: String::new(),
            peer_c: String::new(),
            a1: PublicKey([0; 32]),
            b1: PublicKey([0; 32]),
            c1: PublicKey([0; 32]),
        };
        fx.a1 = fx.key_file("keys/a1.key");
        fx.key_file("keys/a2.key");
        fx.b1 = PrivateKey::generate().public_key();
        let b2 = PrivateKey::generate().public_key();
        fx.c1 = PrivateKey::generate().public_key();
        fx.node = r#"name = "node-a"
listen = "198.18.0.1:51820"
peers_dir = "peers"

[interface]
name = "mgt0"
addresses = ["10.10.1.1/32", "10.10.1.2/32"]

[[identity]]
principal = "cluster.local/ns/payments/sa/payment-service"
private_key_file = "keys/a1.key"
addresses = ["10.10.1.1/32"]
labels = { app = "payments", tier = "backend" }

[[identity]]
principal = "spiffe://cluster.local/ns/payments/sa/ledger"
private_key_file = "keys/a2.key"
addresses = ["10.10.1.2/32", "10.10.9.0/24"]
"#
        .to_owned();
        fx.peer_b = format!(
            r#"name = "node-b"
endpoint = "198.18.0.2:51820"
persistent_keepalive = 25

[[identity]]
principal = "cluster.local/ns/web/sa/frontend"
public_key = "{}"
allowed_ips = ["10.10.2.1/32"]

[[identity]]
principal = "cluster.local/ns/web/sa/checkout"
public_key = "{b2}"
allowed_ips = ["10.10.2.2/32", "fd00:2::/64"]
"#,
            fx.b1
        );
        fx.peer_c = format!(
            r#"name = "node-c"

# Same service account as a local identity: fine, it is another node.
[[identity]]
principal = "cluster.local/ns/payments/sa/payment-service"
public_key = "{}"
allowed_ips = ["10.10.3.0/24"]
"#,
            fx.c1
        );
        fx.write("node.toml", &fx.node.clone());
        fx.write("peers/b.toml", &fx.peer_b.clone());
        fx.write("peers/c.toml", &fx.peer_c.clone());
        fx
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Writes a new private key file with mode 0600; returns its public key.
    fn key_file(&self, rel: &str) -> PublicKey {
        let key = PrivateKey::generate();
        let p = self.write(rel, &format!("{}\n", key.to_base64()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        key.public_key()
    }

    fn load(&self) -> Result<NodeConfig, FileError> {
        load(&self.path("node.toml"))
    }

    /// Rewrites the node file with `from` replaced by `to` (which must occur), then loads.
    fn node_with(&self, from: &str, to: &str) -> FileError {
        assert!(self.node.contains(from), "fixture has no {from:?}");
        self.write("node.toml", &self.node.replacen(from, to, 1));
        self.load().expect_err("config should be rejected")
    }

    /// The node file with `from` replaced by `to`, which must load.
    fn node_loads_with(&self, from: &str, to: &str) -> NodeConfig {
        assert!(self.node.contains(from), "fixture has no {from:?}");
        self.write("node.toml", &self.node.replacen(from, to, 1));
        self.load().unwrap()
    }

    fn peer_b_with(&self, from: &str, to: &str) -> FileError {
        assert!(self.peer_b.contains(from), "fixture has no {from:?}");
        self.write("peers/b.toml", &self.peer_b.replacen(from, to, 1));
        self.load().expect_err("config should be rejected")
    }

    fn peer_c_with(&self, from: &str, to: &str) -> FileError {
        assert!(self.peer_c.contains(from), "fixture has no {from:?}");
        self.write("peers/c.toml", &self.peer_c.replacen(from, to, 1));
        self.load().expect_err("config should be rejected")
    }
}

/// Asserts that the error is about `file` and `key`, that its reason contains each of
/// `reason_parts`, and that the displayed message carries all three.
#[track_caller]
fn check(e: &FileError, file: &Path, key: &str, reason_parts: &[&str]) {
    let msg = e.to_string();
    assert_eq!(e.file, file, "{msg}");
    assert_eq!(e.key, key, "{msg}");
    for part in reason_parts {
        assert!(e.reason.contains(part), "reason lacks {part:?}: {msg}");
    }
    let prefix = if key.is_empty() {
        format!("{}: ", file.display())
    } else {
        format!("{}: {key}: ", file.display())
    };
    assert!(msg.starts_with(&prefix), "{msg}");
    assert!(msg.ends_with(&e.reason), "{msg}");
}

#[test]
fn valid_config_loads_fully() {
    let fx = Fixture::new();
    // Files that are not peer files are ignored.
    fx.write("peers/README", "not a peer");
    fx.write("peers/.hidden.toml", "garbage");
    fx.write("peers/b.toml~", "garbage");
    std::fs::create_dir(fx.path("peers/dir.toml")).unwrap();

    let cfg = fx.load().unwrap();
    assert_eq!(cfg.path, fx.path("node.toml"));
    assert_eq!(cfg.name, "node-a");
    assert_eq!(cfg.listen, "198.18.0.1:51820".parse().unwrap());
    assert_eq!(cfg.peers_dir, Some(fx.path("peers")));
    assert_eq!(cfg.interface.name, "mgt0");
    assert_eq!(cfg.interface.mtu, DEFAULT_MTU);
    assert_eq!(cfg.interface.workers, None);
    assert_eq!(cfg.interface.queue_length, 4000);
    assert_eq!(cfg.interface.scheduling, Scheduling::Realtime);
    assert_eq!(cfg.interface.realtime_share_percent, 50);
    assert!(cfg.interface.offload && cfg.interface.udp_coalescing);
    assert_eq!(
        cfg.interface.addresses,
        vec![
            "10.10.1.1/32".parse::<IpNet>().unwrap(),
            "10.10.1.2/32".parse().unwrap()
        ]
    );

    assert_eq!(cfg.identities.len(), 2);
    let a1 = &cfg.identities[0];
    assert_eq!(
        a1.principal.to_string(),
        "cluster.local/ns/payments/sa/payment-service"
    );
    assert_eq!(a1.private_key_file, fx.path("keys/a1.key"));
    assert_eq!(a1.public_key, fx.a1);
    assert_eq!(a1.private_key.public_key(), fx.a1);
    assert_eq!(a1.addresses, vec!["10.10.1.1/32".parse::<IpNet>().unwrap()]);
    assert_eq!(a1.labels.get("app").map(String::as_str), Some("payments"));
    assert_eq!(a1.labels.len(), 2);
    let a2 = &cfg.identities[1];
    assert_eq!(
        a2.principal.to_string(),
        "cluster.local/ns/payments/sa/ledger"
    );
    assert_eq!(a2.addresses.len(), 2);
    assert!(a2.labels.is_empty());

    assert_eq!(cfg.peers.len(), 2);
    let b = &cfg.peers[0];
    assert_eq!(b.path, fx.path("peers/b.toml"));
    assert_eq!(b.name, "node-b");
    assert_eq!(b.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
    assert_eq!(b.persistent_keepalive, Some(25));
    assert_eq!(b.identities.len(), 2);
    assert_eq!(b.identities[0].public_key, fx.b1);
    assert_eq!(
        b.identities[1].principal.to_string(),
        "cluster.local/ns/web/sa/checkout"
    );
    assert_eq!(
        b.identities[1].allowed_ips,
        vec![
            "10.10.2.2/32".parse::<IpNet>().unwrap(),
            "fd00:2::/64".parse().unwrap()
        ]
    );
    let c = &cfg.peers[1];
    assert_eq!(c.name, "node-c");
    assert_eq!(c.endpoint, None);
    assert_eq!(c.persistent_keepalive, None);
    assert_eq!(c.identities[0].principal, a1.principal);
    assert_eq!(c.identities[0].public_key, fx.c1);

    // The summary shows public keys, never private ones.
    let s = summary(&cfg);
    for part in [
        "node node-a",
        "198.18.0.1:51820",
        "mgt0 mtu 1420",
        "cluster.local/ns/payments/sa/ledger",
        "app=payments",
        "node-b  endpoint 198.18.0.2:51820  keepalive 25s",
        "node-c  endpoint none",
        "fd00:2::/64",
    ] {
        assert!(s.contains(part), "summary lacks {part:?}:\n{s}");
    }
    assert!(s.contains(&fx.a1.to_string()));
    assert!(s.contains(&fx.b1.to_string()));
    for id in &cfg.identities {
        assert!(!s.contains(&id.private_key.to_base64()));
        assert!(!format!("{cfg:?}").contains(&id.private_key.to_base64()));
    }
    assert_eq!(fx.load().unwrap(), cfg);
}

#[test]
fn absolute_paths_and_empty_peers_dir() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.path("empty")).unwrap();
    let abs_key = fx.path("keys/a1.key");
    let node = fx
        .node
        .replace("peers_dir = \"peers\"", "peers_dir = \"empty\"")
        .replace(
            "\"keys/a1.key\"",
            &format!("{:?}", abs_key.display().to_string()),
        )
        .replace("[interface]", "[interface]\nmtu = 9000");
    fx.write("node.toml", &node);
    let cfg = fx.load().unwrap();
    assert!(cfg.peers.is_empty());
    assert_eq!(cfg.identities[0].private_key_file, abs_key);
    assert_eq!(cfg.interface.mtu, 9000);
    assert!(summary(&cfg).contains("peers: 0"));
}

#[test]
fn missing_node_file() {
    let fx = Fixture::new();
    let p = fx.path("nope.toml");
    let e = load(&p).unwrap_err();
    check(&e, &p, "", &["cannot read file", "No such file"]);
}

#[test]
fn toml_syntax_error() {
    let fx = Fixture::new();
    let e = fx.node_with(
        "listen = \"198.18.0.1:51820\"",
        "listen = \"198.18.0.1:51820",
    );
    check(&e, &fx.path("node.toml"), "line 2, column 27", &[]);
    assert!(!e.reason.is_empty());
}

#[test]
fn toml_type_error() {
    let fx = Fixture::new();
    let e = fx.node_with("[interface]", "[interface]\nmtu = \"big\"");
    check(
        &e,
        &fx.path("node.toml"),
        "line 6, column 7",
        &["invalid type"],
    );
}

#[test]
fn missing_required_key() {
    let fx = Fixture::new();
    let e = fx.node_with("listen = \"198.18.0.1:51820\"\n", "");
    check(
        &e,
        &fx.path("node.toml"),
        "line 1, column 1",
        &["missing field `listen`"],
    );
}

#[test]
fn unknown_fields() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    let e = fx.node_with("peers_dir", "colour = \"red\"\npeers_dir");
    check(&e, &node, "line 3, column 1", &["unknown field `colour`"]);
    let e = fx.node_with("[interface]", "[interface]\nmttu = 1400");
    check(&e, &node, "line 6, column 1", &["unknown field `mttu`"]);
    let e = fx.node_with("labels", "label = {}\nlabels");
    check(&e, &node, "line 13, column 1", &["unknown field `label`"]);
    fx.write("node.toml", &fx.node);
    let e = fx.peer_b_with("allowed_ips", "allowed_ip = []\nallowed_ips");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "line 8, column 1",
        &["unknown field `allowed_ip`"],
    );
}

#[test]
fn malformed_principal() {
    let fx = Fixture::new();
    let e = fx.node_with("ns/payments/sa/ledger", "namespace/payments/sa/ledger");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].principal",
        &[
            "invalid principal",
            "expected \"ns\"",
            "\"namespace\"",
            "line 16: ",
        ],
    );
    let e = fx.node_with("ns/payments/sa/ledger", "ns//sa/ledger");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].principal",
        &["empty namespace"],
    );
    fx.write("node.toml", &fx.node);
    let e = fx.peer_b_with("sa/frontend", "sa/Frontend");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[0].principal",
        &["invalid character 'F' in service account"],
    );
}

#[test]
fn malformed_public_key() {
    let fx = Fixture::new();
    let e = fx.peer_b_with(&fx.b1.to_string(), "abc");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[0].public_key",
        &[
            "invalid public key",
            "expected 44 base64 characters",
            "line 7: ",
        ],
    );
}

#[test]
fn malformed_cidrs() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    let e = fx.node_with("\"10.10.9.0/24\"", "\"10.10.9.1/24\"");
    check(
        &e,
        &node,
        "identity[1].addresses[1]",
        &["10.10.9.1/24 has host bits set; did you mean 10.10.9.0/24?"],
    );
    let e = fx.node_with("\"10.10.9.0/24\"", "\"10.10.9.0/33\"");
    check(
        &e,
        &node,
        "identity[1].addresses[1]",
        &["invalid CIDR \"10.10.9.0/33\""],
    );
    let e = fx.node_with("\"10.10.9.0/24\"", "\"10.10.9.9\"");
    check(
        &e,
        &node,
        "identity[1].addresses[1]",
        &["missing prefix length; did you mean 10.10.9.9/32?"],
    );
    let e = fx.node_with(
        "addresses = [\"10.10.1.1/32\", \"10.10.1.2/32\"]",
        "addresses = [\"x\"]",
    );
    check(&e, &node, "interface.addresses[0]", &["invalid CIDR \"x\""]);
    fx.write("node.toml", &fx.node);
    let e = fx.peer_b_with("fd00:2::/64", "fd00:2::1/64");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[1].allowed_ips[1]",
        &["did you mean fd00:2::/64?"],
    );
}

#[test]
fn interface_addresses_may_have_host_bits_but_no_duplicates() {
    let fx = Fixture::new();
    fx.write(
        "node.toml",
        &fx.node
            .replace("\"10.10.1.2/32\"]\n\n[[", "\"10.10.1.2/24\"]\n\n[["),
    );
    let cfg = fx.load().unwrap();
    assert_eq!(cfg.interface.addresses[1].to_string(), "10.10.1.2/24");
    let e = fx.node_with(
        "\"10.10.1.1/32\", \"10.10.1.2/32\"",
        "\"10.10.1.1/32\", \"10.10.1.1/32\"",
    );
    check(
        &e,
        &fx.path("node.toml"),
        "interface.addresses[1]",
        &["duplicate 10.10.1.1/32"],
    );
}

#[test]
fn malformed_socket_addresses() {
    let fx = Fixture::new();
    let e = fx.node_with("198.18.0.1:51820", "198.18.0.1");
    check(
        &e,
        &fx.path("node.toml"),
        "listen",
        &["invalid socket address \"198.18.0.1\"", "line 2: "],
    );
    fx.write("node.toml", &fx.node);
    let e = fx.peer_b_with("198.18.0.2:51820", "node-b.example:51820");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "endpoint",
        &["invalid socket address"],
    );
    let e = fx.peer_b_with("198.18.0.2:51820", "198.18.0.2:0");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "endpoint",
        &["198.18.0.2:0 cannot be sent to"],
    );
    // IPv6 endpoints are fine.
    fx.write(
        "peers/b.toml",
        &fx.peer_b.replace("198.18.0.2:51820", "[fd00::2]:51820"),
    );
    assert_eq!(
        fx.load().unwrap().peers[0].endpoint,
        Some("[fd00::2]:51820".parse().unwrap())
    );
}

#[test]
fn missing_private_key_file() {
    let fx = Fixture::new();
    let e = fx.node_with("keys/a2.key", "keys/nope.key");
    let missing = fx.path("keys/nope.key");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].private_key_file",
        &[&missing.display().to_string(), "No such file", "line 17: "],
    );
}

#[test]
fn group_readable_private_key_file() {
    let fx = Fixture::new();
    let key = fx.path("keys/a2.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = fx.load().unwrap_err();
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].private_key_file",
        &[
            "readable by group or others (mode 0644)",
            &format!("chmod 600 {}", key.display()),
        ],
    );
}

#[test]
fn malformed_private_key_file() {
    let fx = Fixture::new();
    let key = fx.path("keys/a2.key");
    std::fs::write(&key, "hello\n").unwrap();
    let e = fx.load().unwrap_err();
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].private_key_file",
        &[&key.display().to_string(), "expected 44 base64 characters"],
    );
    assert!(!e.to_string().contains("hello"));
}

#[test]
fn no_identities() {
    let fx = Fixture::new();
    let cut = fx.node.find("[[identity]]").unwrap();
    fx.write("node.toml", &fx.node[..cut]);
    let e = fx.load().unwrap_err();
    check(&e, &fx.path("node.toml"), "identity", &["no identities"]);

    fx.write("node.toml", &fx.node);
    let cut = fx.peer_c.find("# Same").unwrap();
    fx.write("peers/c.toml", &fx.peer_c[..cut]);
    let e = fx.load().unwrap_err();
    check(&e, &fx.path("peers/c.toml"), "identity", &["no identities"]);
}

#[test]
fn duplicate_local_principals() {
    let fx = Fixture::new();
    let e = fx.node_with(
        "spiffe://cluster.local/ns/payments/sa/ledger",
        "cluster.local/ns/payments/sa/payment-service",
    );
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].principal",
        &[
            "duplicate principal cluster.local/ns/payments/sa/payment-service",
            "identity[0]",
        ],
    );
}

#[test]
fn duplicate_principal_within_a_peer_file() {
    let fx = Fixture::new();
    let e = fx.peer_b_with("sa/checkout", "sa/frontend");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[1].principal",
        &[
            "duplicate principal cluster.local/ns/web/sa/frontend",
            "identity[0]",
        ],
    );
}

#[test]
fn duplicate_public_key_between_local_identities() {
    let fx = Fixture::new();
    let e = fx.node_with("keys/a2.key", "keys/a1.key");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].private_key_file",
        &[
            &format!("public key {}", fx.a1),
            "also used by identity[0].private_key_file",
            "payment-service",
        ],
    );
}

#[test]
fn duplicate_public_key_between_peer_identities() {
    let fx = Fixture::new();
    // Across peer files: c reuses b's key.
    let e = fx.peer_c_with(&fx.c1.to_string(), &fx.b1.to_string());
    check(
        &e,
        &fx.path("peers/c.toml"),
        "identity[0].public_key",
        &[
            &format!("public key {}", fx.b1),
            "identity[0].public_key (cluster.local/ns/web/sa/frontend)",
            &fx.path("peers/b.toml").display().to_string(),
        ],
    );
    // Within one peer file.
    fx.write("peers/c.toml", &fx.peer_c);
    let b2 = fx.peer_b.split("public_key = \"").nth(2).unwrap()[..44].to_owned();
    let e = fx.peer_b_with(&b2, &fx.b1.to_string());
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[1].public_key",
        &["also used by identity[0].public_key"],
    );
}

#[test]
fn duplicate_public_key_between_local_and_peer() {
    let fx = Fixture::new();
    let e = fx.peer_c_with(&fx.c1.to_string(), &fx.a1.to_string());
    check(
        &e,
        &fx.path("peers/c.toml"),
        "identity[0].public_key",
        &[
            "also used by identity[0].private_key_file",
            &fx.path("node.toml").display().to_string(),
        ],
    );
}

#[test]
fn duplicate_peer_names() {
    let fx = Fixture::new();
    let e = fx.peer_c_with("node-c", "node-b");
    check(
        &e,
        &fx.path("peers/c.toml"),
        "name",
        &[
            "duplicate peer name \"node-b\"",
            &fx.path("peers/b.toml").display().to_string(),
        ],
    );
}

#[test]
fn overlapping_allowed_ips_in_one_peer_file() {
    let fx = Fixture::new();
    let e = fx.peer_b_with("\"10.10.2.2/32\"", "\"10.10.2.0/24\"");
    check(
        &e,
        &fx.path("peers/b.toml"),
        "identity[1].allowed_ips[0]",
        &[
            "10.10.2.0/24 overlaps 10.10.2.1/32",
            "identity[0].allowed_ips[0] (cluster.local/ns/web/sa/frontend, line 8)",
        ],
    );
}

#[test]
fn overlapping_allowed_ips_across_peer_files() {
    let fx = Fixture::new();
    let e = fx.peer_c_with("10.10.3.0/24", "10.10.2.0/23");
    check(
        &e,
        &fx.path("peers/c.toml"),
        "identity[0].allowed_ips[0]",
        &[
            "10.10.2.0/23 overlaps 10.10.2.1/32",
            "identity[0].allowed_ips[0] (cluster.local/ns/web/sa/frontend)",
            &fx.path("peers/b.toml").display().to_string(),
        ],
    );
}

#[test]
fn overlapping_local_addresses() {
    let fx = Fixture::new();
    let e = fx.node_with("\"10.10.9.0/24\"", "\"10.10.1.0/24\"");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].addresses[1]",
        &[
            "10.10.1.0/24 overlaps 10.10.1.1/32",
            "identity[0].addresses[0] (cluster.local/ns/payments/sa/payment-service, line 12)",
        ],
    );
    // Within one identity too.
    let e = fx.node_with("\"10.10.9.0/24\"", "\"10.10.1.2/31\"");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[1].addresses[1]",
        &["overlaps"],
    );
}

#[test]
fn local_addresses_overlapping_peer_allowed_ips() {
    let fx = Fixture::new();
    let e = fx.peer_c_with("10.10.3.0/24", "10.10.9.128/25");
    check(
        &e,
        &fx.path("peers/c.toml"),
        "identity[0].allowed_ips[0]",
        &[
            "10.10.9.128/25 overlaps 10.10.9.0/24",
            "identity[1].addresses[1] (cluster.local/ns/payments/sa/ledger)",
            &fx.path("node.toml").display().to_string(),
        ],
    );
}

#[test]
fn bad_interface_names() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    let e = fx.node_with("name = \"mgt0\"", "name = \"a-very-long-name0\"");
    check(
        &e,
        &node,
        "interface.name",
        &["17 bytes long", "at most 15", "line 6: "],
    );
    let e = fx.node_with("name = \"mgt0\"", "name = \"mg/0\"");
    check(&e, &node, "interface.name", &["invalid character '/'"]);
    let e = fx.node_with("name = \"mgt0\"", "name = \"mg 0\"");
    check(&e, &node, "interface.name", &["invalid character ' '"]);
    let e = fx.node_with("name = \"mgt0\"", "name = \"\"");
    check(&e, &node, "interface.name", &["must not be empty"]);
}

#[test]
fn mtu_out_of_range() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    for bad in ["575", "9001", "-1", "70000"] {
        let e = fx.node_with("[interface]", &format!("[interface]\nmtu = {bad}"));
        check(
            &e,
            &node,
            "interface.mtu",
            &[&format!("{bad} is out of range 576..=9000")],
        );
    }
}

#[test]
fn workers_in_range() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    for bad in ["0", "65", "-2"] {
        let e = fx.node_with("[interface]", &format!("[interface]\nworkers = {bad}"));
        check(
            &e,
            &node,
            "interface.workers",
            &[&format!("{bad} is out of range 1..=64")],
        );
    }
    let cfg = fx.node_loads_with("[interface]", "[interface]\nworkers = 3");
    assert_eq!(cfg.interface.workers, Some(3));
}

#[test]
fn policy_section_errors() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    let with_policy =
        |section: &str| fx.node_with("[interface]", &format!("{section}\n[interface]"));
    let e = with_policy("[policy]\nroot_namespace = \"Istio_System\"\n");
    check(
        &e,
        &node,
        "policy.root_namespace",
        &["invalid namespace \"Istio_System\""],
    );
    let e = with_policy("[policy]\nfiles = [\"allow.json\"]\n");
    check(&e, &node, "policy.files[0]", &["end in .toml"]);
    // Extensions are told apart in any case, as the policy loader does.
    fx.write("allow.TOML", "");
    fx.write(
        "node.toml",
        &fx.node.replace(
            "[interface]",
            "[policy]\nfiles = [\"allow.TOML\"]\n\n[interface]",
        ),
    );
    assert_eq!(fx.load().unwrap().policy.files, vec![fx.path("allow.TOML")]);
}

#[test]
fn queue_length_in_range() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    for bad in ["15", "65537", "-1"] {
        let e = fx.node_with("[interface]", &format!("[interface]\nqueue_length = {bad}"));
        check(
            &e,
            &node,
            "interface.queue_length",
            &[&format!("{bad} is out of range 16..=65536")],
        );
    }
    let cfg = fx.node_loads_with("[interface]", "[interface]\nqueue_length = 1000");
    assert_eq!(cfg.interface.queue_length, 1000);
}

#[test]
fn scheduling_is_realtime_or_normal() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    for bad in ["\"fifo\"", "\"Realtime\"", "\"\""] {
        let e = fx.node_with("[interface]", &format!("[interface]\nscheduling = {bad}"));
        let reason = format!("unknown scheduling {bad}; expected \"realtime\" or \"normal\"");
        check(&e, &node, "interface.scheduling", &[&reason]);
    }
    let cfg = fx.node_loads_with("[interface]", "[interface]\nscheduling = \"normal\"");
    assert_eq!(cfg.interface.scheduling, Scheduling::Normal);
}

#[test]
fn realtime_share_is_a_percentage_of_a_core() {
    let fx = Fixture::new();
    let node = fx.path("node.toml");
    for bad in ["0", "101", "-5"] {
        let e = fx.node_with(
            "[interface]",
            &format!("[interface]\nrealtime_share_percent = {bad}"),
        );
        check(
            &e,
            &node,
            "interface.realtime_share_percent",
            &[&format!(
                "{bad} is out of range 1..=100 (percent of one core)"
            )],
        );
    }
    let cfg = fx.node_loads_with("[interface]", "[interface]\nrealtime_share_percent = 100");
    assert_eq!(cfg.interface.realtime_share_percent, 100);
}

#[test]
fn udp_coalescing_can_be_turned_off_alone() {
    let fx = Fixture::new();
    let cfg = fx.node_loads_with("[interface]", "[interface]\nudp_coalescing = false");
    assert!(cfg.interface.offload && !cfg.interface.udp_coalescing);
    let e = fx.node_with("[interface]", "[interface]\nudp_coalescing = \"no\"");
    assert!(e.to_string().contains("invalid type"), "{e}");
}

#[test]
fn mtu_too_small_for_ipv6() {
    let fx = Fixture::new();
    let e = fx.node_with("[interface]", "[interface]\nmtu = 1200");
    check(
        &e,
        &fx.path("node.toml"),
        "interface.mtu",
        &["1200 is below 1280", "identity[1].allowed_ips[1]", "b.toml"],
    );
    // Without IPv6 anywhere, 1200 is fine.
    fx.write("peers/b.toml", &fx.peer_b.replace(", \"fd00:2::/64\"", ""));
    assert_eq!(fx.load().unwrap().interface.mtu, 1200);
}

#[test]
fn empty_addresses_and_allowed_ips() {
    let fx = Fixture::new();
    let e = fx.node_with("addresses = [\"10.10.1.1/32\"]\n", "addresses = []\n");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[0].addresses",
        &["at least one address"],
    );
    let e = fx.node_with("addresses = [\"10.10.1.1/32\"]\n", "");
    check(
        &e,
        &fx.path("node.toml"),
        "identity[0].addresses",
        &["at least one address"],
    );
    fx.write("node.toml", &fx.node);
    let e = fx.peer_c_with("allowed_ips = [\"10.10.3.0/24\"]", "allowed_ips = []");
    check(
        &e,
        &fx.path("peers/c.toml"),
        "identity[0].allowed_ips",
        &["at least one allowed IP"],
    );
}

#[test]
fn missing_peers_dir() {
    let fx = Fixture::new();
    let e = fx.node_with("peers_dir = \"peers\"", "peers_dir = \"nope\"");
    check(
        &e,
        &fx.path("node.toml"),
        "peers_dir",
        &[
            &format!("cannot read peers directory {}", fx.path("nope").display()),
            "No such file",
        ],
    );
}

#[test]
fn keepalive_out_of_range() {
    let fx = Fixture::new();
    for bad in ["0", "65536", "-5"] {
        let e = fx.peer_b_with(
            "persistent_keepalive = 25",
            &format!("persistent_keepalive = {bad}"),
        );
        check(
            &e,
            &fx.path("peers/b.toml"),
            "persistent_keepalive",
            &[&format!("{bad} is out of range 1..=65535"), "line 3: "],
        );
    }
}

#[test]
fn empty_names() {
    let fx = Fixture::new();
    let e = fx.node_with("name = \"node-a\"", "name = \"\"");
    check(&e, &fx.path("node.toml"), "name", &["must not be empty"]);
    fx.write("node.toml", &fx.node);
    let e = fx.peer_b_with("name = \"node-b\"", "name = \" \"");
    check(&e, &fx.path("peers/b.toml"), "name", &["must not be empty"]);
}

#[test]
fn load_peer_file_alone() {
    let fx = Fixture::new();
    let peer = load_peer_file(&fx.path("peers/b.toml")).unwrap();
    assert_eq!(peer.name, "node-b");
    assert_eq!(peer.identities.len(), 2);
}

/// The example files shipped in the repository's `config/` directory.
#[test]
fn example_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    if !dir.join("node-a.toml").exists() {
        eprintln!("no example configs in {}; skipped", dir.display());
        return;
    }
    // Git does not keep file modes: work on a copy whose keys are made private.
    let fx = Fixture::new();
    let copy = fx.path("example");
    copy_dir(&dir, &copy);
    for entry in std::fs::read_dir(copy.join("keys")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let dir = copy;
    let a = load(&dir.join("node-a.toml")).unwrap_or_else(|e| panic!("{e}"));
    let b = load(&dir.join("node-b.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.identities.len(), 2);
    assert_eq!(b.identities.len(), 2);
    assert_eq!(a.peers.len(), 1);
    assert_eq!(b.peers.len(), 1);
    // Each side's peer file carries the other side's public keys and addresses.
    for (local, remote) in [(&a, &b), (&b, &a)] {
        let peer = &remote.peers[0];
        assert_eq!(peer.name, local.name);
        assert_eq!(peer.endpoint, Some(local.listen));
        assert_eq!(peer.identities.len(), local.identities.len());
        for (p, l) in peer.identities.iter().zip(&local.identities) {
            assert_eq!(p.principal, l.principal);
            assert_eq!(p.public_key, l.public_key);
            assert_eq!(p.allowed_ips, l.addresses);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn admin_and_uapi_sections() {
    let fx = Fixture::new();
    // Left out: no HTTP listener, sockets in their default directories.
    let ops = fx.load().unwrap().operations;
    assert_eq!(ops, OperationsConfig::default());
    assert_eq!(ops.admin_listen, None);
    assert_eq!(ops.uapi_dir, Some(PathBuf::from(DEFAULT_UAPI_DIR)));
    assert_eq!(
        ops.control_socket("mg0"),
        PathBuf::from("/run/meshguard/mg0.sock")
    );
    let sections = "[admin]\nlisten = \"127.0.0.1:9586\"\nsocket_dir = \"run\"\n\n\
                    [uapi]\ndirectory = \"run/wg\"\nprivate_key = false\n\n[interface]";
    fx.write("node.toml", &fx.node.replacen("[interface]", sections, 1));
    let ops = fx.load().unwrap().operations;
    assert_eq!(ops.admin_listen, Some("127.0.0.1:9586".parse().unwrap()));
    assert_eq!(ops.control_dir, fx.path("run"));
    assert_eq!(ops.uapi_dir, Some(fx.path("run/wg")));
    assert!(!ops.uapi_private_key);
    let off = "[uapi]\nenabled = false\n\n[interface]";
    fx.write("node.toml", &fx.node.replacen("[interface]", off, 1));
    assert_eq!(fx.load().unwrap().operations.uapi_dir, None);

    let e = fx.node_with(
        "[interface]",
        "[admin]\nlisten = \"localhost:9586\"\n\n[interface]",
    );
    check(
        &e,
        &fx.path("node.toml"),
        "admin.listen",
        &["invalid socket address \"localhost:9586\""],
    );
    let e = fx.node_with("[interface]", "[uapi]\nsocket = \"x\"\n\n[interface]");
    check(
        &e,
        &fx.path("node.toml"),
        "line 6, column 1",
        &["unknown field `socket`"],
    );
    let e = fx.node_with("[interface]", "[admin]\nsocket_dir = \"\"\n\n[interface]");
    check(
        &e,
        &fx.path("node.toml"),
        "admin.socket_dir",
        &["must not be empty"],
    );
}

#[test]
fn kubernetes_mode_takes_identities_peers_and_policies_from_the_cluster() {
    let fx = Fixture::new();
    let node = "name = \"node-a\"\nlisten = \"0.0.0.0:51820\"\n\n[interface]\nname = \"mg0\"\n\n\
                [kubernetes]\nnode_name = \"worker-1\"\nkubeconfig = \"kube.yaml\"\n\
                state_dir = \"state\"\ntrust_domain = \"prod.example.org\"\n\
                endpoint = \"198.18.0.1:51820\"\n";
    fx.write("k.toml", node);
    let cfg = load(&fx.path("k.toml")).unwrap();
    let k = cfg.kubernetes.unwrap();
    assert_eq!(k.node_name.as_deref(), Some("worker-1"));
    assert_eq!(k.kubeconfig, Some(fx.path("kube.yaml")));
    assert_eq!(k.state_dir, fx.path("state"));
    assert_eq!(k.trust_domain, "prod.example.org");
    assert_eq!(k.endpoint, Some("198.18.0.1:51820".parse().unwrap()));
    assert_eq!(cfg.peers_dir, None);
    // The node file may not name what the cluster provides.
    let with = |extra: &str| {
        fx.write("k.toml", &format!("{extra}{node}"));
        load(&fx.path("k.toml")).unwrap_err()
    };
    let e = with("peers_dir = \"peers\"\n");
    check(
        &e,
        &fx.path("k.toml"),
        "peers_dir",
        &["come from the other nodes' MeshNodes"],
    );
    fx.write(
        "k.toml",
        &format!("{node}\n[[identity]]\nprincipal = \"cluster.local/ns/a/sa/b\"\nprivate_key_file = \"keys/a1.key\"\naddresses = [\"10.1.0.1/32\"]\n"),
    );
    let e = load(&fx.path("k.toml")).unwrap_err();
    check(&e, &fx.path("k.toml"), "identity", &["come from the pods"]);
    fx.write(
        "k.toml",
        &node.replace(
            "[interface]",
            "[policy]\nfiles = [\"p.yaml\"]\n\n[interface]",
        ),
    );
    let e = load(&fx.path("k.toml")).unwrap_err();
    check(
        &e,
        &fx.path("k.toml"),
        "policy.files",
        &["come from the cluster"],
    );
    fx.write("k.toml", &node.replace("worker-1", "Worker_1"));
    let e = load(&fx.path("k.toml")).unwrap_err();
    check(
        &e,
        &fx.path("k.toml"),
        "kubernetes.node_name",
        &["not a Kubernetes node name"],
    );
    // Without [kubernetes], peers_dir is required.
    fx.write("k.toml", &node[..node.find("[kubernetes]").unwrap()]);
    let e = load(&fx.path("k.toml")).unwrap_err();
    check(&e, &fx.path("k.toml"), "peers_dir", &["missing"]);
}

#[test]
fn kubernetes_key_rotation_is_a_lifetime_and_an_overlap() {
    let fx = Fixture::new();
    let node = |extra: &str| {
        format!(
            "name = \"node-a\"\nlisten = \"198.18.0.1:51820\"\n[interface]\nname = \"mg0\"\n\
             [kubernetes]\nnode_name = \"worker-1\"\n{extra}"
        )
    };
    let rotation = |extra: &str| {
        fx.write("k.toml", &node(extra));
        load(&fx.path("k.toml")).map(|c| c.kubernetes.unwrap().key_rotation)
    };
    assert_eq!(rotation("").unwrap(), KeyRotation::default());
    assert_eq!(
        KeyRotation::default().lifetime,
        Some(Duration::from_secs(30 * 86_400))
    );
    let r = rotation("key_lifetime = \"12h\"\nkey_overlap = \"90s\"\n").unwrap();
    assert_eq!(r.lifetime, Some(Duration::from_secs(12 * 3600)));
    assert_eq!(r.overlap, Duration::from_secs(90));
    assert_eq!(
        rotation("key_lifetime = \"never\"\n").unwrap().lifetime,
        None
    );
    // A lifetime too long to add to a clock reads, and means never in practice.
    let far = rotation("key_lifetime = \"300000000000y\"\n").unwrap();
    assert!(far.lifetime.is_some());
    for (extra, key, words) in [
        (
            "key_lifetime = \"soon\"\n",
            "kubernetes.key_lifetime",
            "not a duration",
        ),
        (
            "key_overlap = \"1s\"\n",
            "kubernetes.key_overlap",
            "at least 2s",
        ),
        (
            "key_lifetime = \"1m\"\nkey_overlap = \"2m\"\n",
            "kubernetes.key_lifetime",
            "longer than the overlap",
        ),
        (
            "key_overlap = \"31d\"\n",
            "kubernetes.key_overlap",
            "longer than the overlap",
        ),
    ] {
        let e = rotation(extra).unwrap_err();
        check(&e, &fx.path("k.toml"), key, &[words]);
    }
}
