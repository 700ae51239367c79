//! Allow lists in the data path: three meshguard nodes on one LAN, several identities,
//! Istio semantics at ingress, stateful replies, and reloads. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use meshguard::testbed::{
    counter, ping, require_root, tcp_connect, tcp_transfer, udp_roundtrip, wait_until,
    IdentitySpec, Lan, MeshguardNode, Netns, NodeSpec, PeerEntry, UdpEcho, ALLOW_ALL_POLICY,
};

const PAYMENT_SERVICE: &str = "10.40.1.1";
const LEDGER: &str = "10.40.1.2";
const FRONTEND: &str = "10.40.2.1";
const CHECKOUT: &str = "10.40.2.2";
const OLD_APP: &str = "10.40.3.1";

/// node-a's allow list: frontend may reach payment-service on 8080/tcp, 9090/udp and
/// ICMP; checkout may reach ledger on anything; the legacy namespace is denied everywhere,
/// even where an ALLOW names it.
const POLICY_A: &str = r#"
[[policy]]
name = "frontend-to-payment-service"
namespace = "payments"
selector = { app = "payment-service" }
[[policy.rules]]
[[policy.rules.from]]
principals = ["cluster.local/ns/web/sa/frontend"]
[[policy.rules.to]]
ports = ["8080/tcp", "9090/udp", "icmp"]

[[policy]]
name = "legacy-by-mistake"
namespace = "payments"
selector = { app = "payment-service" }
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["legacy"]

[[policy]]
name = "checkout-to-ledger"
namespace = "payments"
selector = { app = "ledger" }
[[policy.rules]]
[[policy.rules.from]]
principals = ["spiffe://cluster.local/ns/web/sa/checkout"]

[[policy]]
name = "deny-legacy"
namespace = "istio-system"
action = "DENY"
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["legacy"]
"#;

/// The same without the frontend rule: revokes frontend's flows.
const POLICY_A_REVOKED: &str = r#"
[[policy]]
name = "checkout-to-ledger"
namespace = "payments"
selector = { app = "ledger" }
[[policy.rules]]
[[policy.rules.from]]
principals = ["cluster.local/ns/web/sa/checkout"]
"#;

/// node-b's allow list: payments may open TCP 7000 to frontend; nothing else gets in.
const POLICY_B: &str = r#"
[[policy]]
name = "payments-to-frontend"
namespace = "web"
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["payments"]
[[policy.rules.to]]
ports = ["7000/tcp"]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(address), port)
}

const QUICK: Duration = Duration::from_millis(1500);

/// Whether a TCP handshake from `from` to `to` completes (a listener must be there).
fn connects(ns: &Netns, from: &str, to: SocketAddr) -> bool {
    tcp_connect(ns, Some(ip(from)), to, QUICK).is_ok()
}

/// Whether a UDP datagram from `from` to an echo server at `to` comes back.
fn udp_answered(ns: &Netns, from: &str, to: SocketAddr) -> bool {
    udp_roundtrip(ns, Some(ip(from)), to, b"hello", QUICK)
        .unwrap()
        .is_some()
}

struct Mesh {
    ns: [Netns; 3],
    daemons: Vec<MeshguardNode>,
    _lan: Lan,
}

fn mesh() -> Mesh {
    let lan = Lan::new("pol").unwrap();
    let ns = [
        Netns::new("pola").unwrap(),
        Netns::new("polb").unwrap(),
        Netns::new("polc").unwrap(),
    ];
    for (i, n) in ns.iter().enumerate() {
        lan.attach(n, &format!("198.18.5.{}/24", i + 1)).unwrap();
    }
    let a = NodeSpec {
        name: "node-a".into(),
        policy: POLICY_A.into(),
        offload: true,
        workers: None,
        listen: "198.18.5.1:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/payment-service",
                &[&format!("{PAYMENT_SERVICE}/32")],
            )
            .label("app", "payment-service"),
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/ledger",
                &[&format!("{LEDGER}/32")],
            )
            .label("app", "ledger"),
        ],
    };
    let b = NodeSpec {
        name: "node-b".into(),
        policy: POLICY_B.into(),
        offload: true,
        workers: None,
        listen: "198.18.5.2:51820".parse().unwrap(),
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
    };
    let c = NodeSpec {
        name: "node-c".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: "198.18.5.3:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/legacy/sa/old-app",
            &[&format!("{OLD_APP}/32")],
        )],
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let peers = |me: &NodeSpec, all: [&NodeSpec; 3]| -> Vec<PeerEntry> {
        all.iter()
            .filter(|n| n.name != me.name)
            .map(|n| PeerEntry::for_node(n))
            .collect()
    };
    let daemons = [&a, &b, &c]
        .iter()
        .zip(&ns)
        .map(|(spec, n)| MeshguardNode::start(binary, n, spec, &peers(spec, [&a, &b, &c])).unwrap())
        .collect();
    Mesh {
        ns,
        daemons,
        _lan: lan,
    }
}

#[test]
fn allowed_flows_pass_denied_flows_do_not_and_replies_come_back() {
    if !require_root() {
        return;
    }
    let m = mesh();
    let [a, b, c] = &m.ns;
    let log = |i: usize| m.daemons[i].log();

    // Servers on node-a.
    let _tcp_8080 = a.tcp_listen(at(PAYMENT_SERVICE, 8080)).unwrap();
    let _tcp_9999 = a.tcp_listen(at(PAYMENT_SERVICE, 9999)).unwrap();
    let _ledger_8080 = a.tcp_listen(at(LEDGER, 8080)).unwrap();
    let _ledger_5555 = a.tcp_listen(at(LEDGER, 5555)).unwrap();
    let _echo_9090 = UdpEcho::start(a, at(PAYMENT_SERVICE, 9090)).unwrap();
    let _echo_9091 = UdpEcho::start(a, at(PAYMENT_SERVICE, 9091)).unwrap();

    // Allowed: TCP, UDP and ICMP from frontend to payment-service.
    assert!(
        connects(b, FRONTEND, at(PAYMENT_SERVICE, 8080)),
        "{}",
        log(0)
    );
    assert!(
        udp_answered(b, FRONTEND, at(PAYMENT_SERVICE, 9090)),
        "{}",
        log(0)
    );
    assert!(
        ping(b, Some(ip(FRONTEND)), ip(PAYMENT_SERVICE), 2),
        "{}",
        log(0)
    );
    // Allowed: checkout to ledger on any port.
    assert!(connects(b, CHECKOUT, at(LEDGER, 5555)), "{}", log(0));
    assert!(ping(b, Some(ip(CHECKOUT)), ip(LEDGER), 2));

    // Denied: other ports, other identities, and legacy even where an ALLOW names it.
    assert!(!connects(b, FRONTEND, at(PAYMENT_SERVICE, 9999)));
    assert!(!udp_answered(b, FRONTEND, at(PAYMENT_SERVICE, 9091)));
    assert!(!connects(b, FRONTEND, at(LEDGER, 8080)));
    assert!(!ping(b, Some(ip(CHECKOUT)), ip(PAYMENT_SERVICE), 2));
    assert!(!connects(c, OLD_APP, at(PAYMENT_SERVICE, 8080)));
    assert!(!ping(c, Some(ip(OLD_APP)), ip(LEDGER), 2));

    // Replies: payment-service opens TCP 7000 to frontend (node-b allows that); node-a
    // lets the replies in although its policy allows nothing from frontend on that port.
    let report = tcp_transfer(
        b,
        at(FRONTEND, 7000),
        a,
        Some(ip(PAYMENT_SERVICE)),
        2_000_000,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", log(0), log(1)));
    assert!(report.is_intact(), "{report}");
    // The other way the same port is unsolicited: frontend cannot open it to payment-service.
    let _tcp_7000 = a.tcp_listen(at(PAYMENT_SERVICE, 7000)).unwrap();
    assert!(!connects(b, FRONTEND, at(PAYMENT_SERVICE, 7000)));
    // Nor may payment-service reach checkout, which node-b's policy does not open.
    let _checkout_7001 = b.tcp_listen(at(CHECKOUT, 7001)).unwrap();
    assert!(!connects(a, PAYMENT_SERVICE, at(CHECKOUT, 7001)));

    let log_a = m.daemons[0].stop().unwrap();
    assert!(counter(&log_a, "policy_denied").unwrap() > 0, "{log_a}");
    assert!(counter(&log_a, "policy_allowed").unwrap() > 0, "{log_a}");
    assert!(log_a.contains("denied inbound flow"), "{log_a}");
    assert!(
        log_a.contains("DENY policy istio-system/deny-legacy"),
        "the deny log names the policy: {log_a}"
    );
    assert!(log_a.contains(
        "decisions=source=cluster.local/ns/web/sa/frontend destination=cluster.local/ns/payments/sa/payment-service"
    ), "{log_a}");
}

fn policy_file(daemon: &MeshguardNode) -> std::path::PathBuf {
    daemon.config_path().with_file_name("policy.toml")
}

fn reload(daemon: &MeshguardNode, policy: &str, expect: &str) {
    let before = daemon.log().matches(expect).count();
    std::fs::write(policy_file(daemon), policy).unwrap();
    daemon
        .process()
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            daemon.log().matches(expect).count() > before
        }),
        "no {expect:?} in\n{}",
        daemon.log()
    );
}

/// Sends `message` on the connection and says whether the server side received it.
fn delivered(client: &mut TcpStream, server: &mut TcpStream, message: &[u8]) -> bool {
    client.write_all(message).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = vec![0u8; message.len()];
    server.read_exact(&mut buf).is_ok() && buf == message
}

#[test]
fn reload_revokes_open_flows_and_a_broken_file_changes_nothing() {
    if !require_root() {
        return;
    }
    let m = mesh();
    let [a, b, _] = &m.ns;
    let daemon_a = &m.daemons[0];
    let listener = a.tcp_listen(at(PAYMENT_SERVICE, 8080)).unwrap();
    let mut client = tcp_connect(b, Some(ip(FRONTEND)), at(PAYMENT_SERVICE, 8080), QUICK)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon_a.log()));
    let (mut server, _) = listener.accept().unwrap();
    assert!(delivered(&mut client, &mut server, b"before any reload"));

    // A broken policy file at reload: rejected, the old policy stays, traffic as before.
    reload(daemon_a, "[[policy]]\nname = ", "reload refused");
    assert!(delivered(
        &mut client,
        &mut server,
        b"after a broken reload"
    ));
    assert!(ping(b, Some(ip(FRONTEND)), ip(PAYMENT_SERVICE), 2));

    // A reload that revokes frontend's access stops the open connection at once.
    reload(daemon_a, POLICY_A_REVOKED, "configuration reloaded");
    // The TCP connection and the ping's echo flow.
    let revoked = daemon_a
        .log()
        .rsplit("revoked_flows=")
        .next()
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u32>().ok());
    assert!(revoked >= Some(1), "{}", daemon_a.log());
    assert!(!delivered(&mut client, &mut server, b"after revocation"));
    assert!(!ping(b, Some(ip(FRONTEND)), ip(PAYMENT_SERVICE), 2));
    // The file watcher picks up a change without a signal, too: restore the policy.
    let before = daemon_a.log().matches("configuration changed").count();
    std::fs::write(policy_file(daemon_a), POLICY_A).unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || { daemon_a.log().matches("configuration changed").count() > before }
    ));
    assert!(ping(b, Some(ip(FRONTEND)), ip(PAYMENT_SERVICE), 2));
    let log = daemon_a.stop().unwrap();
    assert!(counter(&log, "flow_revoked").unwrap() > 0, "{log}");
}
