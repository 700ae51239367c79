//! A handshake flood against a daemon while a legitimate transfer runs: initiations with
//! a valid mac1 (and mac2 once cookies come back) from many fresh keys and 32 source
//! addresses, at several thousand a second. The transfer must arrive intact, a fresh
//! handshake must complete, and the daemon must shed the flood (cookie replies, the
//! per-address rate limit). The throughputs with and without the flood and the time the
//! fresh handshake took are printed (`-- --nocapture`), never asserted. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use meshguard::testbed::{
    counter, ping, require_root, tcp_transfer, HandshakeFlood, IdentitySpec, Lan, MeshguardNode,
    Netns, NodeSpec, PeerEntry, RoguePeer, TransferReport, ALLOW_ALL_POLICY,
};

const VICTIM: &str = "10.70.1.1";
const SENDER: &str = "10.70.2.1";
const FLOOD_RATE: u32 = 4000;
const SOURCES: u8 = 32;
const TRANSFER_BYTES: usize = 200 << 20;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn gbits(report: &TransferReport) -> f64 {
    report.bits_per_second() / 1e9
}

#[test]
fn a_handshake_flood_does_not_stop_legitimate_traffic() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("fldl").unwrap();
    let victim_ns = Netns::new("fldv").unwrap();
    let sender_ns = Netns::new("flds").unwrap();
    let flood_ns = Netns::new("fldf").unwrap();
    let newcomer_ns = Netns::new("fldn").unwrap();
    lan.attach(&victim_ns, "198.18.9.1/24").unwrap();
    lan.attach(&sender_ns, "198.18.9.2/24").unwrap();
    lan.attach(&newcomer_ns, "198.18.9.3/24").unwrap();
    let flood_if = lan.attach(&flood_ns, "198.18.9.100/24").unwrap();
    let mut flood_sources = vec![ip("198.18.9.100")];
    for i in 1..SOURCES {
        let address = format!("198.18.9.{}", 100 + i);
        flood_ns
            .ip(["addr", "add", &format!("{address}/24"), "dev", &flood_if])
            .unwrap();
        flood_sources.push(ip(&address));
    }

    let victim = NodeSpec {
        name: "victim".into(),
        listen: "198.18.9.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/payments/sa/payment-service",
            &[&format!("{VICTIM}/32")],
        )],
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    };
    let sender = NodeSpec {
        name: "sender".into(),
        listen: "198.18.9.2:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/web/sa/frontend",
            &[&format!("{SENDER}/32")],
        )],
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    };
    // A peer the victim knows that first shakes hands during the flood.
    let newcomer = NodeSpec {
        name: "newcomer".into(),
        listen: "198.18.9.3:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/web/sa/checkout",
            &["10.70.3.1/32"],
        )],
        policy: String::new(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let victim_peers = [PeerEntry::for_node(&sender), PeerEntry::for_node(&newcomer)];
    let victim_daemon = MeshguardNode::start(binary, &victim_ns, &victim, &victim_peers).unwrap();
    let sender_daemon =
        MeshguardNode::start(binary, &sender_ns, &sender, &[PeerEntry::for_node(&victim)]).unwrap();
    assert!(ping(&sender_ns, Some(ip(SENDER)), ip(VICTIM), 3));

    let to_victim = SocketAddr::new(ip(VICTIM), 5201);
    let transfer = || {
        tcp_transfer(
            &victim_ns,
            to_victim,
            &sender_ns,
            Some(ip(SENDER)),
            TRANSFER_BYTES,
        )
        .unwrap()
    };
    let quiet = transfer();
    assert!(quiet.is_intact());

    let victim_key = victim.identities[0].private_key.public_key();
    let flood = HandshakeFlood::start(
        &flood_ns,
        &flood_sources,
        victim.listen,
        &victim_key,
        FLOOD_RATE,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let flooded = transfer();
    assert!(
        flooded.is_intact(),
        "the transfer under the flood arrived intact"
    );

    let mut late = RoguePeer::bind(&newcomer_ns, newcomer.listen).unwrap();
    let tunnel = late.add_tunnel(
        &newcomer.identities[0].private_key,
        &victim_key,
        victim.listen,
    );
    let started = Instant::now();
    late.handshake(tunnel, Duration::from_secs(30))
        .expect("a fresh handshake completes during the flood");
    let fresh_handshake = started.elapsed();
    let stats = flood.stop();

    let log = victim_daemon.stop().unwrap();
    sender_daemon.stop().unwrap();
    let count = |name: &str| counter(&log, name).unwrap_or_else(|| panic!("{name}\n{log}"));
    let flood_rate = stats.initiations_sent as f64 / stats.elapsed.as_secs_f64();
    println!(
        "handshake flood: {flood_rate:.0} initiations/s from {SOURCES} addresses for {:.1} s \
         ({} sent, {} replies); legitimate TCP {:.2} Gbit/s without the flood, {:.2} Gbit/s \
         during it ({:.0} %); fresh handshake during the flood: {:.2} s; victim: \
         cookie_replies_sent={} rate_limited={} unknown_peer={} bad_mac1={}",
        stats.elapsed.as_secs_f64(),
        stats.initiations_sent,
        stats.replies,
        gbits(&quiet),
        gbits(&flooded),
        100.0 * gbits(&flooded) / gbits(&quiet),
        fresh_handshake.as_secs_f64(),
        count("cookie_replies_sent"),
        count("rate_limited"),
        count("unknown_peer"),
        count("bad_mac1"),
    );
    // The victim was under load and shed the flood: cookie replies went out, and
    // initiations with a cookie beyond each address's rate were dropped before any
    // Diffie-Hellman work. None of the flood's keys got a session.
    assert!(stats.initiations_sent > 1000, "{stats:?}");
    assert!(count("cookie_replies_sent") > 0, "{log}");
    assert!(count("rate_limited") > 0, "{log}");
    assert_eq!(count("bad_mac1"), 0, "{log}");
}

/// 1,000 peer identities (one peer node, one key each) shake hands with a daemon all at
/// once, from one socket, as initiators do (retries, cookie replies and mac2 under
/// load): every one completes. How long it took, and how many cookie replies the daemon
/// sent, are printed (`-- --nocapture`), never asserted.
#[test]
fn a_thousand_peer_identities_shake_hands_at_once() {
    if !require_root() {
        return;
    }
    const CROWD: usize = 1000;
    let lan = Lan::new("crwl").unwrap();
    let daemon_ns = Netns::new("crwd").unwrap();
    let crowd_ns = Netns::new("crwc").unwrap();
    lan.attach(&daemon_ns, "198.18.14.1/24").unwrap();
    lan.attach(&crowd_ns, "198.18.14.2/24").unwrap();
    let daemon = NodeSpec {
        name: "daemon".into(),
        listen: "198.18.14.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/crowd/sa/server",
            &["10.71.0.1/32"],
        )],
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    };
    let crowd = NodeSpec {
        name: "crowd".into(),
        listen: "198.18.14.2:51820".parse().unwrap(),
        identities: (0..CROWD)
            .map(|i| {
                IdentitySpec::new(
                    &format!("cluster.local/ns/crowd/sa/client-{i}"),
                    &[&format!("10.72.{}.{}/32", i / 250, i % 250 + 1)],
                )
            })
            .collect(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let node =
        MeshguardNode::start(binary, &daemon_ns, &daemon, &[PeerEntry::for_node(&crowd)]).unwrap();
    let mut rogue = RoguePeer::bind(&crowd_ns, crowd.listen).unwrap();
    let server_key = daemon.identities[0].private_key.public_key();
    for identity in &crowd.identities {
        rogue.add_tunnel(&identity.private_key, &server_key, daemon.listen);
    }
    let started = Instant::now();
    let done = rogue.handshake_all(Duration::from_secs(60)).unwrap();
    let took = started.elapsed();
    let log = node.stop().unwrap();
    eprintln!(
        "{done} of {CROWD} peer identities shook hands in {took:.2?} (all initiating at \
         once); daemon: {} handshakes completed, {} cookie replies sent, {} rate limited",
        counter(&log, "handshakes_completed").unwrap_or(0),
        counter(&log, "cookie_replies_sent").unwrap_or(0),
        counter(&log, "rate_limited").unwrap_or(0)
    );
    assert_eq!(done, CROWD, "every peer identity got a session:\n{log}");
}
