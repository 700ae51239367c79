//! meshguard against WireGuard implementations nobody here wrote, in namespaces:
//! `boringtun-cli` and `wireguard-go`, configured with `wg`. Each side initiates once,
//! over an IPv4 and over an IPv6 underlay; ping and a 20 MB TCP transfer in each
//! direction must pass. The underlay link has an MTU of 1500 and the tunnels 1420, so
//! full-size packets fit only if no message is padded past the tunnel MTU (an IPv6
//! underlay leaves exactly 1452 bytes for the message). Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use meshguard::testbed::{
    genkey, ping, require_root, tcp_transfer, unique_name, IdentitySpec, Link, MeshguardNode,
    Netns, NodeSpec, PeerEntry, WgKind, WgPeer, ALLOW_ALL_POLICY,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;
const WG_PORT: u16 = 51821;
const UNDERLAY_MTU: u32 = 1500;
const TUNNEL_MTU: u16 = 1420;
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

/// The underlay's address family.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Underlay {
    V4,
    V6,
}

impl Underlay {
    /// (meshguard's address, the peer's address, prefix length)
    fn addresses(self) -> (&'static str, &'static str, u8) {
        match self {
            Underlay::V4 => ("198.18.2.1", "198.18.2.2", 24),
            Underlay::V6 => ("fd00:18:2::1", "fd00:18:2::2", 64),
        }
    }
}

fn interop(kind: WgKind, initiator: Initiator, underlay: Underlay) {
    if !require_root() {
        return;
    }
    let (mg_underlay, wg_underlay, prefix) = underlay.addresses();
    let ns_mg = Netns::new("iom").unwrap();
    let ns_wg = Netns::new("iow").unwrap();
    let _link = Link::new(
        &ns_mg,
        &format!("{mg_underlay}/{prefix}"),
        &ns_wg,
        &format!("{wg_underlay}/{prefix}"),
        Some(UNDERLAY_MTU),
    )
    .unwrap();

    let mg = NodeSpec {
        name: "meshguard".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: SocketAddr::new(ip(mg_underlay), 51820),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/interop/sa/meshguard",
            &[&format!("{MG_OVERLAY}/32")],
        )],
    };
    let (wg_private, wg_public) = genkey().unwrap();
    let wg_endpoint = SocketAddr::new(ip(wg_underlay), WG_PORT);
    let peer_file = PeerEntry {
        name: "plain-wireguard".into(),
        endpoint: (initiator == Initiator::Meshguard).then_some(wg_endpoint),
        persistent_keepalive: None,
        identities: vec![(
            "cluster.local/ns/interop/sa/plain".into(),
            wg_public.clone(),
            vec![format!("{WG_OVERLAY}/32")],
        )],
        next_keys: Vec::new(),
    };

    let wg = WgPeer::start(
        kind,
        &ns_wg,
        &unique_name("wg"),
        &wg_private,
        WG_PORT,
        &[&format!("{WG_OVERLAY}/32")],
        Some(u32::from(TUNNEL_MTU)),
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
        "{kind:?} over {underlay:?}: ping {from} -> {to}\nmeshguard:\n{}\npeer:\n{}",
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
                "{kind:?} over {underlay:?}: transfer {client} -> {server}: {e}\n{}",
                daemon.log()
            )
        });
        assert!(report.is_intact(), "{kind:?} over {underlay:?}: {report}");
        eprintln!("{kind:?} over {underlay:?} {client} -> {server}: {report}");
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
    interop(WgKind::BoringtunCli, Initiator::Meshguard, Underlay::V4);
}

#[test]
fn boringtun_cli_initiates_to_meshguard() {
    interop(WgKind::BoringtunCli, Initiator::Peer, Underlay::V4);
}

#[test]
fn meshguard_initiates_to_wireguard_go() {
    interop(WgKind::WireguardGo, Initiator::Meshguard, Underlay::V4);
}

#[test]
fn wireguard_go_initiates_to_meshguard() {
    interop(WgKind::WireguardGo, Initiator::Peer, Underlay::V4);
}

#[test]
fn meshguard_initiates_to_boringtun_cli_over_ipv6() {
    interop(WgKind::BoringtunCli, Initiator::Meshguard, Underlay::V6);
}

#[test]
fn wireguard_go_initiates_to_meshguard_over_ipv6() {
    interop(WgKind::WireguardGo, Initiator::Peer, Underlay::V6);
}
