//! STRICT mTLS in the data path: plaintext sent straight over the underlay to a STRICT
//! identity's address is dropped by the node's kernel, the same traffic through a tunnel
//! passes, PERMISSIVE identities take both, a reload moves the line, and the filter is
//! gone once the daemon exits. Needs root and the `nft` command.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshguard::testbed::{
    counter, find_program, require_root, tcp_connect, udp_roundtrip, wait_until, write_config,
    IdentitySpec, Lan, MeshguardNode, Netns, NodeSpec, PeerEntry, TempDir, UdpEcho,
};

const PAYMENT: &str = "10.50.1.1";
const PAYMENT_V6: &str = "fd50:1::1";
const LEDGER: &str = "10.50.1.2";
const FRONTEND: &str = "10.50.2.1";
const FRONTEND_V6: &str = "fd50:2::1";

/// Everything allowed, so only the mTLS mode decides; payments is STRICT except ledger,
/// whose workload-level PERMISSIVE wins.
const POLICY_A: &str = r#"
[[policy]]
name = "allow-all"
namespace = "istio-system"
[[policy.rules]]

[[peer_authentication]]
name = "default"
namespace = "payments"
mode = "STRICT"

[[peer_authentication]]
name = "ledger"
namespace = "payments"
selector = { app = "ledger" }
mode = "PERMISSIVE"
"#;

const ALLOW_ALL: &str = r#"
[[policy]]
name = "allow-all"
namespace = "istio-system"
[[policy.rules]]
"#;

const QUICK: Duration = Duration::from_millis(1500);

fn at(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(address.parse().unwrap(), port)
}

fn ip(address: &str) -> IpAddr {
    address.parse().unwrap()
}

/// Whether a datagram from `ns` (from `from`, if given) to the echo server at `to`
/// comes back.
fn answered(ns: &Netns, from: Option<&str>, to: SocketAddr) -> bool {
    udp_roundtrip(ns, from.map(ip), to, b"hello", QUICK)
        .unwrap()
        .is_some()
}

fn meshguard_tables(ns: &Netns) -> String {
    let out = ns.exec_ok("nft", ["list", "tables"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("meshguard"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn strict_identities_take_tunnelled_traffic_only() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("strl").unwrap();
    let a = Netns::new("stra").unwrap();
    let b = Netns::new("strb").unwrap();
    // A neighbour on the same underlay that runs no meshguard.
    let n = Netns::new("strn").unwrap();
    for (i, ns) in [&a, &b, &n].into_iter().enumerate() {
        let ifname = lan.attach(ns, &format!("198.18.7.{}/24", i + 1)).unwrap();
        let v6 = format!("fd18:7::{}/64", i + 1);
        ns.ip(["-6", "addr", "add", &v6, "dev", &ifname, "nodad"])
            .unwrap();
    }
    // The neighbour routes the pod addresses to node-a, as a router on the path could.
    n.ip(["route", "add", "10.50.1.0/24", "via", "198.18.7.1"])
        .unwrap();
    n.ip(["-6", "route", "add", "fd50:1::/64", "via", "fd18:7::1"])
        .unwrap();

    let node_a = NodeSpec {
        name: "node-a".into(),
        listen: "198.18.7.1:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/payment-service",
                &[&format!("{PAYMENT}/32"), &format!("{PAYMENT_V6}/128")],
            )
            .label("app", "payment-service"),
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/ledger",
                &[&format!("{LEDGER}/32")],
            )
            .label("app", "ledger"),
        ],
        policy: POLICY_A.into(),
        offload: true,
        workers: None,
    };
    let node_b = NodeSpec {
        name: "node-b".into(),
        listen: "198.18.7.2:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/web/sa/frontend",
            &[&format!("{FRONTEND}/32"), &format!("{FRONTEND_V6}/128")],
        )],
        policy: ALLOW_ALL.into(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a =
        MeshguardNode::start(binary, &a, &node_a, &[PeerEntry::for_node(&node_b)]).unwrap();
    let daemon_b =
        MeshguardNode::start(binary, &b, &node_b, &[PeerEntry::for_node(&node_a)]).unwrap();

    let _payment = UdpEcho::start(&a, at(PAYMENT, 9000)).unwrap();
    let _payment_v6 = UdpEcho::start(&a, at(PAYMENT_V6, 9000)).unwrap();
    let _ledger = UdpEcho::start(&a, at(LEDGER, 9000)).unwrap();
    let _listener = a.tcp_listen(at(PAYMENT, 8080)).unwrap();

    // Through the tunnel, STRICT and PERMISSIVE identities both answer.
    assert!(
        answered(&b, Some(FRONTEND), at(PAYMENT, 9000)),
        "tunnel to STRICT"
    );
    assert!(answered(&b, Some(FRONTEND_V6), at(PAYMENT_V6, 9000)));
    assert!(
        answered(&b, Some(FRONTEND), at(LEDGER, 9000)),
        "tunnel to PERMISSIVE"
    );
    assert!(tcp_connect(&b, Some(ip(FRONTEND)), at(PAYMENT, 8080), QUICK).is_ok());

    // Plaintext from the neighbour: the PERMISSIVE identity answers (the path is open),
    // the STRICT one gets nothing, over IPv4 and IPv6, UDP and TCP.
    assert!(
        answered(&n, None, at(LEDGER, 9000)),
        "plaintext to PERMISSIVE"
    );
    assert!(
        !answered(&n, None, at(PAYMENT, 9000)),
        "plaintext to STRICT"
    );
    assert!(
        !answered(&n, None, at(PAYMENT_V6, 9000)),
        "IPv6 plaintext to STRICT"
    );
    assert!(tcp_connect(&n, None, at(PAYMENT, 8080), QUICK).is_err());
    // The node itself reaches its own STRICT address (loopback), as kubelet probes do.
    assert!(
        answered(&a, None, at(PAYMENT, 9000)),
        "from the node itself"
    );
    assert!(
        meshguard_tables(&a).contains("table inet meshguard_mg0"),
        "node-a installed its filter"
    );
    assert_eq!(meshguard_tables(&b), "", "node-b has no STRICT identity");

    // A reload that drops the ledger exception makes ledger STRICT too; the filter's
    // sets change in place.
    let policy_file = daemon_a.config_path().with_file_name("policy.toml");
    let strict_only = POLICY_A
        .split("\n[[peer_authentication]]\nname = \"ledger\"")
        .next();
    std::fs::write(&policy_file, strict_only.unwrap()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            daemon_a.log().matches("configuration reloaded").count() == 1
        }),
        "{}",
        daemon_a.log()
    );
    assert!(
        !answered(&n, None, at(LEDGER, 9000)),
        "ledger is STRICT now"
    );
    assert!(
        answered(&b, Some(FRONTEND), at(LEDGER, 9000)),
        "tunnel still"
    );

    let log_a = daemon_a.stop().unwrap();
    daemon_b.stop().unwrap();
    let dropped = counter(&log_a, "plaintext_dropped").expect("counted");
    // 1 UDP + 1 IPv6 UDP + the TCP SYN and its retries + 1 UDP to ledger.
    assert!(dropped >= 4, "plaintext_dropped={dropped}\n{log_a}");
    assert!(log_a.contains("mtls=Strict"), "{log_a}");
    assert_eq!(meshguard_tables(&a), "", "the filter is gone after exit");
    // With the daemon gone the address is gone too: nothing left to protect.
}

/// STRICT with no `nft` to enforce it: the daemon refuses to start and says why, rather
/// than run without the filter.
#[test]
fn strict_without_nftables_does_not_start() {
    if !require_root() {
        return;
    }
    let a = Netns::new("strx").unwrap();
    a.ip(["link", "set", "lo", "up"]).unwrap();
    let node_a = NodeSpec {
        name: "node-a".into(),
        listen: "127.0.0.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/payments/sa/payment-service",
            &[&format!("{PAYMENT}/32")],
        )],
        policy: POLICY_A.into(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let dir = TempDir::new("strict-no-nft").unwrap();
    let config = write_config(dir.path(), &node_a, &[]).unwrap();
    // A PATH with `ip` (the namespace runs through it) and no `nft`.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(find_program("ip").expect("ip"), bin.join("ip")).unwrap();
    let mut command = Command::new(binary);
    command
        .args(["up", "--config", config.to_str().unwrap()])
        .env("PATH", &bin);
    let daemon = a.spawn(&command).unwrap();
    let status = daemon.wait_timeout(Duration::from_secs(10)).unwrap();
    let stderr = daemon.read_stderr();
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(
        stderr.contains("STRICT mTLS needs nftables") && stderr.contains("`nft`"),
        "{stderr}"
    );
    assert!(!stderr.contains("meshguard is up"), "{stderr}");
}
