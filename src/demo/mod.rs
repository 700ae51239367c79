//! `meshguard demo`: a two-node mesh in network namespaces on this machine, built from
//! an embedded default, with traffic between identities, allowed and denied flows.
//!
//! Everything it creates (namespaces, veth, TUN devices, daemons, key files) is removed
//! when it ends, also on error.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::testbed::{
    counter, is_root, ping, tcp_connect, tcp_transfer, IdentitySpec, Link, MeshguardNode, Netns,
    NodeSpec, PeerEntry,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn step(text: &str) {
    println!("\n== {text}");
}

/// The embedded default: node-a runs the payments identities with the example allow
/// list, node-b the web ones with an allow-nothing list (replies only).
fn nodes() -> (NodeSpec, NodeSpec) {
    let a = NodeSpec {
        name: "node-a".into(),
        policy: include_str!("../../config/policy-example.toml").into(),
        offload: true,
        workers: None,
        listen: "198.18.0.1:51820".parse().expect("literal"),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/payment-service",
                &["10.10.1.1/32"],
            )
            .label("app", "payment-service"),
            IdentitySpec::new("cluster.local/ns/payments/sa/ledger", &["10.10.1.2/32"])
                .label("app", "ledger"),
        ],
    };
    let b = NodeSpec {
        name: "node-b".into(),
        policy: include_str!("../../config/policy-b.toml").into(),
        offload: true,
        workers: None,
        listen: "198.18.0.2:51820".parse().expect("literal"),
        identities: vec![
            IdentitySpec::new("cluster.local/ns/web/sa/frontend", &["10.10.2.1/32"]),
            IdentitySpec::new("cluster.local/ns/web/sa/checkout", &["10.10.2.2/32"]),
        ],
    };
    (a, b)
}

fn shown(ok: bool, expected: bool) -> &'static str {
    match (ok, expected) {
        (true, true) => "passes (allowed)",
        (false, false) => "dropped (denied)",
        (true, false) => "PASSES, BUT SHOULD BE DENIED",
        (false, true) => "DROPPED, BUT SHOULD BE ALLOWED",
    }
}

/// Runs the demo with the daemon binary `binary` (normally this executable).
pub(crate) fn run(binary: &Path) -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and TUN devices: run it as root");
    }
    let (a, b) = nodes();
    step(
        "creating namespaces node-a and node-b, joined by a veth pair (198.18.0.1 <-> 198.18.0.2)",
    );
    let ns_a = Netns::new("demoa").context("creating a namespace")?;
    let ns_b = Netns::new("demob").context("creating a namespace")?;
    let _link = Link::new(&ns_a, "198.18.0.1/24", &ns_b, "198.18.0.2/24", None)
        .context("creating the veth pair")?;

    step("starting one meshguard daemon per node");
    let daemon_a = MeshguardNode::start(binary, &ns_a, &a, &[PeerEntry::for_node(&b)])?;
    let daemon_b = MeshguardNode::start(binary, &ns_b, &b, &[PeerEntry::for_node(&a)])?;
    for (node, daemon) in [(&a, &daemon_a), (&b, &daemon_b)] {
        println!(
            "{} ({}), config {}",
            node.name,
            node.listen,
            daemon.config_path().display()
        );
        for identity in &node.identities {
            println!(
                "  identity {:<46} {} key {}",
                identity.principal,
                identity.addresses.join(","),
                identity.public_key()
            );
        }
    }
    println!(
        "node-a's allow list (config/policy-example.toml): frontend -> payment-service on \
         8080/tcp and icmp;\n  checkout -> ledger on anything; namespace legacy denied; \
         default deny.\nnode-b's allow list (config/policy-b.toml): nothing may open a flow \
         into web; replies come back."
    );

    step("ping from each web identity (node-b) to each payments identity (node-a)");
    let mut wrong = Vec::new();
    for (from, to, expected) in [
        ("frontend", "payment-service", true),
        ("frontend", "ledger", false),
        ("checkout", "payment-service", false),
        ("checkout", "ledger", true),
    ] {
        let src = address_of(&b, from);
        let dst = address_of(&a, to);
        let ok = ping(&ns_b, Some(src), dst, 2);
        println!(
            "  web/{from:<9} -> payments/{to:<16} {}",
            shown(ok, expected)
        );
        if ok != expected {
            wrong.push(format!("ping {from} -> {to}"));
        }
    }

    step("20 MB over TCP from web/frontend to payments/payment-service port 8080");
    let report = tcp_transfer(
        &ns_a,
        SocketAddr::new(ip("10.10.1.1"), 8080),
        &ns_b,
        Some(ip("10.10.2.1")),
        TRANSFER_BYTES,
    )?;
    println!("  {report}");
    println!("  (node-b allows nothing in, yet the replies pass: frontend opened the flow)");
    if !report.is_intact() {
        bail!("the transfer arrived damaged");
    }

    step("TCP from web/frontend to payments/payment-service port 9999 (not in the allow list)");
    let _listener = ns_a.tcp_listen(SocketAddr::new(ip("10.10.1.1"), 9999))?;
    let connected = tcp_connect(
        &ns_b,
        Some(ip("10.10.2.1")),
        SocketAddr::new(ip("10.10.1.1"), 9999),
        Duration::from_millis(1500),
    )
    .is_ok();
    println!("  connect: {}", shown(connected, false));
    if connected {
        wrong.push("TCP 9999".to_owned());
    }

    step("why: meshguard policy check --from cluster.local/ns/web/sa/frontend --to 10.10.1.1 --port 9999/tcp");
    let check = std::process::Command::new(binary)
        .args(["policy", "check", "--config"])
        .arg(daemon_a.config_path())
        .args([
            "--from",
            "cluster.local/ns/web/sa/frontend",
            "--to",
            "10.10.1.1",
            "--port",
            "9999/tcp",
        ])
        .output()
        .context("running meshguard policy check")?;
    for line in String::from_utf8_lossy(&check.stdout).lines() {
        println!("  {line}");
    }

    step("refused: a packet from an address no identity owns never leaves node-a");
    ns_a.ip(["address", "add", "10.10.1.99/32", "dev", "mg0"])?;
    let reached = ping(&ns_a, Some(ip("10.10.1.99")), ip("10.10.2.1"), 2);
    println!(
        "  10.10.1.99 -> 10.10.2.1: {}",
        if reached {
            "REPLY (unexpected)"
        } else {
            "dropped, nothing sent"
        }
    );
    if reached {
        wrong.push("unowned source".to_owned());
    }

    step("stopping the daemons; their counters");
    let log_a = daemon_a.stop()?;
    let log_b = daemon_b.stop()?;
    for (name, log) in [("node-a", &log_a), ("node-b", &log_b)] {
        let get = |key: &str| counter(log, key).unwrap_or(0);
        println!(
            "  {name}: packets out {}, in {}, handshakes {}, new flows allowed {}, \
             packets denied by policy {}, dropped for no local identity {}, \
             garbage from the network {}",
            get("packets_out"),
            get("packets_in"),
            get("handshakes_completed"),
            get("policy_allowed"),
            get("policy_denied"),
            get("no_local_identity"),
            get("network_drops"),
        );
    }
    for line in log_a
        .lines()
        .filter(|l| l.contains("denied inbound flow"))
        .take(3)
    {
        println!(
            "  node-a log: {}",
            line.split_once("INFO ").map_or(line, |(_, l)| l)
        );
    }
    step("done; namespaces, devices and daemons are removed");
    if !wrong.is_empty() {
        bail!("unexpected outcomes: {}", wrong.join(", "));
    }
    Ok(())
}

fn address_of(node: &NodeSpec, service_account: &str) -> IpAddr {
    let identity = node
        .identities
        .iter()
        .find(|i| i.principal.ends_with(&format!("/sa/{service_account}")))
        .expect("demo identity exists");
    ip(identity.addresses[0]
        .split('/')
        .next()
        .expect("split yields one item"))
}
