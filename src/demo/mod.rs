//! `meshguard demo`: a two-node mesh in network namespaces on this machine, built from
//! an embedded default, with traffic between every identity pair and a refused flow.
//!
//! Everything it creates (namespaces, veth, TUN devices, daemons, key files) is removed
//! when it ends, also on error.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::testbed::{
    counter, is_root, ping, tcp_transfer, IdentitySpec, Link, MeshguardNode, Netns, NodeSpec,
    PeerEntry, ALLOW_ALL_POLICY,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn step(text: &str) {
    println!("\n== {text}");
}

/// The embedded default: node-a runs the payments identities, node-b the web ones.
fn nodes() -> (NodeSpec, NodeSpec) {
    let a = NodeSpec {
        name: "node-a".into(),
        policy: ALLOW_ALL_POLICY.into(),
        listen: "198.18.0.1:51820".parse().expect("literal"),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/payment-service",
                &["10.10.1.1/32"],
            ),
            IdentitySpec::new("cluster.local/ns/payments/sa/ledger", &["10.10.1.2/32"]),
        ],
    };
    let b = NodeSpec {
        name: "node-b".into(),
        policy: ALLOW_ALL_POLICY.into(),
        listen: "198.18.0.2:51820".parse().expect("literal"),
        identities: vec![
            IdentitySpec::new("cluster.local/ns/web/sa/frontend", &["10.10.2.1/32"]),
            IdentitySpec::new("cluster.local/ns/web/sa/checkout", &["10.10.2.2/32"]),
        ],
    };
    (a, b)
}

/// Runs the demo with the daemon binary `binary` (normally this executable).
pub fn run(binary: &Path) -> Result<()> {
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
                "  identity {:<48} {} key {}",
                identity.principal,
                identity.addresses.join(","),
                identity.public_key()
            );
        }
    }

    step("ping between every identity pair (each pair is its own tunnel and key pair)");
    for from in &a.identities {
        for to in &b.identities {
            let (src, dst) = (address(&from.addresses[0]), address(&to.addresses[0]));
            let ok = ping(&ns_a, Some(src), dst, 2);
            println!(
                "  {} -> {}: {}",
                from.principal,
                to.principal,
                if ok { "reply" } else { "NO REPLY" }
            );
            if !ok {
                bail!("ping {src} -> {dst} failed:\n{}", daemon_a.log());
            }
        }
    }

    step("20 MB over TCP from web/frontend (node-b) to payments/payment-service (node-a)");
    let report = tcp_transfer(
        &ns_a,
        SocketAddr::new(ip("10.10.1.1"), 0),
        &ns_b,
        Some(ip("10.10.2.1")),
        TRANSFER_BYTES,
    )?;
    println!("  {report}");
    if !report.is_intact() {
        bail!("the transfer arrived damaged");
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

    step("stopping the daemons; their counters");
    let log_a = daemon_a.stop()?;
    let log_b = daemon_b.stop()?;
    for (name, log) in [("node-a", &log_a), ("node-b", &log_b)] {
        let get = |key: &str| counter(log, key).unwrap_or(0);
        println!(
            "  {name}: packets out {}, in {}, handshakes {}, dropped from the network {}, \
             dropped for no local identity {}",
            get("packets_out"),
            get("packets_in"),
            get("handshakes_completed"),
            get("network_drops"),
            get("no_local_identity"),
        );
    }
    if reached {
        bail!("a packet from an unowned address got through");
    }
    step("done; namespaces, devices and daemons are removed");
    Ok(())
}

fn address(cidr: &str) -> IpAddr {
    ip(cidr.split('/').next().expect("split yields one item"))
}
