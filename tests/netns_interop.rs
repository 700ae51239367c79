//! meshguard against WireGuard implementations nobody here wrote, in namespaces:
//! `boringtun-cli` and `wireguard-go`, configured with `wg`. Each side initiates once;
//! ping and a 20 MB TCP transfer must pass. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use meshguard::testbed::{
    genkey, ping, require_root, tcp_transfer, unique_name, IdentitySpec, Link, MeshguardNode,
    Netns, NodeSpec, PeerEntry, WgKind, WgPeer, ALLOW_ALL_POLICY,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;
const MG_UNDERLAY: &str = "198.18.2.1";
const WG_UNDERLAY: &str = "198.18.2.2";
const WG_PORT: u16 = 51821;
const MG_OVERLAY: &str = "10.20.0.1";
const WG_OVERLAY: &str = "10.20.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Which side sends the first handshake initiation. The other side has no endpoint for
/// it, so it cannot initiate.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Initiator {
    Meshguard,
    Peer,
}

fn interop(kind: WgKind, initiator: Initiator) {
    if !require_root() {
        return;
    }
    let ns_mg = Netns::new("iom").unwrap();
    let ns_wg = Netns::new("iow").unwrap();
    let _link = Link::new(
        &ns_mg,
        &format!("{MG_UNDERLAY}/24"),
        &ns_wg,
        &format!("{WG_UNDERLAY}/24"),
        None,
    )
    .unwrap();

    let mg = NodeSpec {
        name: "meshguard".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: SocketAddr::new(ip(MG_UNDERLAY), 51820),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/interop/sa/meshguard",
            &[&format!("{MG_OVERLAY}/32")],
        )],
    };
    let (wg_private, wg_public) = genkey().unwrap();
    let wg_endpoint = SocketAddr::new(ip(WG_UNDERLAY), WG_PORT);
    let peer_file = PeerEntry {
        name: "plain-wireguard".into(),
        endpoint: (initiator == Initiator::Meshguard).then_some(wg_endpoint),
        persistent_keepalive: None,
        identities: vec![(
            "cluster.local/ns/interop/sa/plain".into(),
            wg_public.clone(),
            vec![format!("{WG_OVERLAY}/32")],
        )],
    };

    let wg = WgPeer::start(
        kind,
        &ns_wg,
        &unique_name("wg"),
        &wg_private,
        WG_PORT,
        &[&format!("{WG_OVERLAY}/32")],
        Some(1420),
    )
    .unwrap();
    wg.add_peer(
        &mg.identities[0].public_key(),
        &[&format!("{MG_OVERLAY}/32")],
        (initiator == Initiator::Peer).then_some(mg.listen),
        None,
    )
    .unwrap();
    let daemon = MeshguardNode::start(
        Path::new(env!("CARGO_BIN_EXE_meshguard")),
        &ns_mg,
        &mg,
        &[peer_file],
    )
    .unwrap();

    let (from_ns, to_ns, from, to) = match initiator {
        Initiator::Meshguard => (&ns_mg, &ns_wg, MG_OVERLAY, WG_OVERLAY),
        Initiator::Peer => (&ns_wg, &ns_mg, WG_OVERLAY, MG_OVERLAY),
    };
    assert!(
        ping(from_ns, Some(ip(from)), ip(to), 3),
        "{kind:?}: ping {from} -> {to}\nmeshguard:\n{}\npeer:\n{}",
        daemon.log(),
        wg.process().read_stdout() + &wg.process().read_stderr()
    );
    let we_initiated = initiator == Initiator::Meshguard;
    assert!(
        daemon
            .log()
            .contains(&format!("handshake completed local=cluster.local/ns/interop/sa/meshguard peer=cluster.local/ns/interop/sa/plain node=plain-wireguard we_initiated={we_initiated}")),
        "{}",
        daemon.log()
    );
    for (server_ns, client_ns, server, client) in
        [(to_ns, from_ns, to, from), (from_ns, to_ns, from, to)]
    {
        let report = tcp_transfer(
            server_ns,
            SocketAddr::new(ip(server), 0),
            client_ns,
            Some(ip(client)),
            TRANSFER_BYTES,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{kind:?}: transfer {client} -> {server}: {e}\n{}",
                daemon.log()
            )
        });
        assert!(report.is_intact(), "{kind:?}: {report}");
        eprintln!("{kind:?} {client} -> {server}: {report}");
    }
    assert!(wg
        .latest_handshake(&mg.identities[0].public_key())
        .unwrap()
        .is_some());
    let log = daemon.stop().unwrap();
    assert_eq!(
        meshguard::testbed::counter(&log, "network_drops"),
        Some(0),
        "{log}"
    );
}

#[test]
fn meshguard_initiates_to_boringtun_cli() {
    interop(WgKind::BoringtunCli, Initiator::Meshguard);
}

#[test]
fn boringtun_cli_initiates_to_meshguard() {
    interop(WgKind::BoringtunCli, Initiator::Peer);
}

#[test]
fn meshguard_initiates_to_wireguard_go() {
    interop(WgKind::WireguardGo, Initiator::Meshguard);
}

#[test]
fn wireguard_go_initiates_to_meshguard() {
    interop(WgKind::WireguardGo, Initiator::Peer);
}
