//! Two meshguard nodes whose datagrams pass a userspace UDP relay (there is no netem
//! here), over an IPv6 underlay with 1500-byte links: what goes on the wire is measured,
//! and impaired links (loss, duplicates, reordering) still deliver transfers intact.
//! Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use meshguard::testbed::{
    counter, require_root, tcp_transfer_patient, IdentitySpec, Impairment, Link, MeshguardNode,
    Netns, NodeSpec, PeerEntry, UdpRelay, ALLOW_ALL_POLICY,
};

const A_UNDERLAY: &str = "fd00:18:7::1";
const B_UNDERLAY: &str = "fd00:18:7::2";
const A_OVERLAY: &str = "10.70.0.1";
const B_OVERLAY: &str = "10.70.0.2";
/// The nodes' files say 1420: the longest message is 1420 + 32 bytes.
const TUNNEL_MTU: usize = 1420;
const MESSAGE_OVERHEAD: usize = 32;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, underlay: &str, overlay: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: SocketAddr::new(ip(underlay), 51820),
        identities: vec![IdentitySpec::new(
            &format!("cluster.local/ns/links/sa/{name}"),
            &[&format!("{overlay}/32")],
        )],
    }
}

/// Two nodes whose every datagram passes a relay with these impairments.
struct Relayed {
    a: MeshguardNode,
    b: MeshguardNode,
    relay: UdpRelay,
    // Dropped last: the daemons and the relay go before their namespaces.
    _link: Link,
    ns_a: Netns,
    ns_b: Netns,
}

fn relayed(a_to_b: Impairment, b_to_a: Impairment) -> Relayed {
    let ns_a = Netns::new("lka").unwrap();
    let ns_b = Netns::new("lkb").unwrap();
    let link = Link::new(
        &ns_a,
        &format!("{A_UNDERLAY}/64"),
        &ns_b,
        &format!("{B_UNDERLAY}/64"),
        Some(1500),
    )
    .unwrap();
    let (a, b) = (
        node("node-a", A_UNDERLAY, A_OVERLAY),
        node("node-b", B_UNDERLAY, B_OVERLAY),
    );
    let relay = UdpRelay::start(
        &ns_a,
        SocketAddr::new(ip(A_UNDERLAY), 51900),
        a.listen,
        b.listen,
        a_to_b,
        b_to_a,
        7,
    )
    .unwrap();
    let via_relay = |node: &NodeSpec| PeerEntry {
        endpoint: Some(relay.address()),
        ..PeerEntry::for_node(node)
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a = MeshguardNode::start(binary, &ns_a, &a, &[via_relay(&b)]).unwrap();
    let daemon_b = MeshguardNode::start(binary, &ns_b, &b, &[via_relay(&a)]).unwrap();
    Relayed {
        a: daemon_a,
        b: daemon_b,
        relay,
        _link: link,
        ns_a,
        ns_b,
    }
}

/// `bytes` over TCP from A to B, then from B to A; both must arrive intact. Over a lossy
/// link TCP may go quiet for tens of seconds (its retransmission timer backs off), so
/// a transfer waits up to two minutes for progress.
fn transfer_both_ways(r: &Relayed, bytes: usize, what: &str) {
    for (server_ns, server, client_ns, client) in [
        (&r.ns_b, B_OVERLAY, &r.ns_a, A_OVERLAY),
        (&r.ns_a, A_OVERLAY, &r.ns_b, B_OVERLAY),
    ] {
        let report = tcp_transfer_patient(
            server_ns,
            SocketAddr::new(ip(server), 0),
            client_ns,
            Some(ip(client)),
            bytes,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{what}: {client} -> {server}: {e}\nnode-a:\n{}\nnode-b:\n{}",
                r.a.log(),
                r.b.log()
            )
        });
        assert!(report.is_intact(), "{what}: {report}");
        eprintln!(
            "{what}: {client} -> {server}: {report}; relay a->b {:?} b->a {:?}",
            r.relay.a_to_b(),
            r.relay.b_to_a()
        );
    }
}

/// Full-size packets leave as messages of at most MTU + 32 bytes, so an IPv6 underlay
/// with 1500-byte links carries them (a message padded past the MTU would be 1504 bytes
/// on the wire and refused by the kernel).
#[test]
fn the_longest_message_on_the_wire_fits_an_ipv6_underlay() {
    if !require_root() {
        return;
    }
    let r = relayed(Impairment::default(), Impairment::default());
    transfer_both_ways(&r, 20_000_000, "IPv6 underlay");
    for (direction, stats) in [("a->b", r.relay.a_to_b()), ("b->a", r.relay.b_to_a())] {
        let longest = stats.longest();
        assert!(
            longest <= TUNNEL_MTU + MESSAGE_OVERHEAD,
            "{direction}: a {longest}-byte message"
        );
        assert!(
            longest > TUNNEL_MTU,
            "{direction}: full-size packets went through ({longest} bytes)"
        );
    }
    for log in [r.a.stop().unwrap(), r.b.stop().unwrap()] {
        assert_eq!(counter(&log, "send_too_large"), Some(0), "{log}");
        assert_eq!(counter(&log, "network_drops"), Some(0), "{log}");
    }
}

/// Transfers over links that lose, duplicate and reorder datagrams arrive intact:
/// WireGuard leaves recovery to the inner TCP, and the replay window must let reordered
/// datagrams in and keep duplicates out.
#[test]
fn transfers_survive_lossy_reordering_links() {
    if !require_root() {
        return;
    }
    for loss in [0.05, 0.20] {
        let impaired = Impairment {
            loss,
            duplicate: 0.02,
            reorder: 0.05,
            ..Impairment::default()
        };
        let r = relayed(impaired, impaired);
        transfer_both_ways(&r, 5_000_000, &format!("{:.0} % loss", loss * 100.0));
        let (sent, dropped) = (r.relay.a_to_b().received(), r.relay.a_to_b().dropped());
        assert!(
            dropped > 0 && r.relay.a_to_b().duplicated() > 0,
            "{sent} {dropped}"
        );
        let log = r.b.stop().unwrap();
        assert!(
            counter(&log, "replayed").unwrap() > 0,
            "duplicates were refused: {log}"
        );
    }
}
