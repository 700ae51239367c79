//! Istio AuthorizationPolicy `when` conditions on L4 attributes, through real tunnels:
//! a DENY on `destination.port` closes only that port, and an ALLOW on `source.ip`
//! lets in only the source addresses it names. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use meshguard::testbed::{
    require_root, tcp_connect, IdentitySpec, Lan, MeshguardNode, Netns, NodeSpec, PeerEntry,
    ALLOW_ALL_POLICY,
};

const PAYMENT: &str = "10.41.1.1";
const FRONTEND: &str = "10.41.2.1";
const CHECKOUT: &str = "10.41.2.2";

/// Port 22 is closed to everyone; payments takes connections from frontend's address
/// only (checkout is the same peer node, with another address).
const POLICY_A: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-ssh, namespace: istio-system}
spec:
  action: DENY
  rules:
  - when:
    - key: destination.port
      values: ["22"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: from-frontend-address, namespace: payments}
spec:
  rules:
  - when:
    - key: source.ip
      values: ["10.41.2.1/32"]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn connects(ns: &Netns, from: &str, port: u16) -> bool {
    let to = SocketAddr::new(ip(PAYMENT), port);
    tcp_connect(ns, Some(ip(from)), to, Duration::from_millis(1500)).is_ok()
}

#[test]
fn l4_when_conditions_decide_in_the_data_path() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("istl").unwrap();
    let a = Netns::new("ista").unwrap();
    let b = Netns::new("istb").unwrap();
    lan.attach(&a, "198.18.10.1/24").unwrap();
    lan.attach(&b, "198.18.10.2/24").unwrap();
    let node_a = NodeSpec {
        name: "node-a".into(),
        listen: "198.18.10.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/payments/sa/payment-service",
            &[&format!("{PAYMENT}/32")],
        )],
        policy: POLICY_A.into(),
        offload: true,
        workers: None,
    };
    let node_b = NodeSpec {
        name: "node-b".into(),
        listen: "198.18.10.2:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/web/sa/frontend",
                &[&format!("{FRONTEND}/32")],
            ),
            IdentitySpec::new(
                "cluster.local/ns/web/sa/checkout",
                &[&format!("{CHECKOUT}/32")],
            ),
        ],
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a =
        MeshguardNode::start(binary, &a, &node_a, &[PeerEntry::for_node(&node_b)]).unwrap();
    let _daemon_b =
        MeshguardNode::start(binary, &b, &node_b, &[PeerEntry::for_node(&node_a)]).unwrap();
    let _web = a.tcp_listen(SocketAddr::new(ip(PAYMENT), 8080)).unwrap();
    let _ssh = a.tcp_listen(SocketAddr::new(ip(PAYMENT), 22)).unwrap();

    assert!(
        connects(&b, FRONTEND, 8080),
        "source.ip names frontend's address"
    );
    assert!(!connects(&b, FRONTEND, 22), "destination.port 22 is denied");
    assert!(
        !connects(&b, CHECKOUT, 8080),
        "checkout's address is not named"
    );
    let log = daemon_a.stop().unwrap();
    assert!(
        !log.contains("cannot check"),
        "no condition was dropped:\n{log}"
    );
}
