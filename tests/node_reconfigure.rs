//! Reconfiguring a running node (`Node::reconfigure`), on two nodes without sockets: what
//! stays keeps its sessions and flows, what goes is gone at once, what comes works at once.

use std::net::{IpAddr, SocketAddr};

use meshguard::node::{Dropped, Egress, IdentityChanges, Ingress, NodeDrop};
use meshguard::policy::{DefaultAction, PolicySet};
use meshguard::proto::ProtocolDrop;
use meshguard::testbed::fixtures::{ipv4, ipv4_udp, udp, NodePair, A_INNER, B_INNER};

const B_INNER2: [u8; 4] = [10, 2, 0, 2];

fn handshakes(pair: &NodePair) -> (u64, u64) {
    (
        pair.a.protocol_stats().handshakes_completed,
        pair.b.protocol_stats().handshakes_completed,
    )
}

/// Sends a UDP packet from A's identity to `to` and returns what B made of it, without
/// any handshake: A must already have a session.
fn a_sends_now(pair: &mut NodePair, to: [u8; 4]) -> Ingress {
    let mut buf = ipv4_udp(A_INNER, to, 64);
    match pair.a.egress(pair.now, &mut buf, 64) {
        Egress::Send { len, .. } => pair.b.ingress(pair.now, pair.a_addr, &mut buf[..len]),
        other => panic!("A had no session to send on: {other:?}"),
    }
}

fn reconfigure_b(pair: &mut NodePair) -> IdentityChanges {
    let config = pair.b_config.clone();
    pair.b
        .reconfigure(pair.now, &config, &PolicySet::default())
        .identities
}

#[test]
fn an_unchanged_configuration_keeps_every_session() {
    let mut pair = NodePair::connected();
    let before = handshakes(&pair);
    assert_eq!(reconfigure_b(&mut pair), IdentityChanges::default());
    assert!(matches!(
        a_sends_now(&mut pair, B_INNER),
        Ingress::Deliver { .. }
    ));
    assert!(
        pair.b.poll_transmit().is_none(),
        "no handshake, nothing to answer"
    );
    assert_eq!(handshakes(&pair), before);
}

#[test]
fn a_removed_peer_is_gone_at_once_and_comes_back_with_a_new_handshake() {
    let mut pair = NodePair::connected();
    let peer = pair.b_config.peers.remove(0);
    let changes = reconfigure_b(&mut pair);
    assert_eq!(
        changes,
        IdentityChanges {
            peers_removed: 1,
            ..IdentityChanges::default()
        }
    );
    assert_eq!(
        a_sends_now(&mut pair, B_INNER),
        Ingress::Dropped(Dropped::Protocol(ProtocolDrop::UnknownIndex))
    );
    assert!(pair.b.poll_transmit().is_none(), "nothing answered");
    // B has no way to A any more.
    let mut buf = ipv4_udp(B_INNER, A_INNER, 64);
    assert_eq!(
        pair.b.egress(pair.now, &mut buf, 64),
        Egress::Dropped(Dropped::Node(NodeDrop::NoPeer))
    );

    pair.b_config.peers.push(peer);
    let changes = reconfigure_b(&mut pair);
    assert_eq!(changes.peers_added, 1);
    // A's session is unknown to B: B answers A's next initiation and data flows again.
    let before = handshakes(&pair).1;
    pair.now += std::time::Duration::from_secs(6);
    let mut buf = ipv4_udp(B_INNER, A_INNER, 64);
    assert_eq!(pair.b.egress(pair.now, &mut buf, 64), Egress::Queued);
    let delivered = pair.pump();
    assert!(
        matches!(delivered[..], [Ingress::Deliver { .. }]),
        "{delivered:?}"
    );
    assert_eq!(handshakes(&pair).1, before + 1);
}

#[test]
fn a_changed_endpoint_is_used_at_once_and_the_session_kept() {
    let mut pair = NodePair::connected();
    let moved: SocketAddr = "198.18.77.7:51820".parse().unwrap();
    pair.b_config.peers[0].endpoint = Some(moved);
    pair.b_config.peers[0].persistent_keepalive = Some(25);
    assert_eq!(
        reconfigure_b(&mut pair),
        IdentityChanges {
            peers_changed: 1,
            ..IdentityChanges::default()
        }
    );
    let mut buf = ipv4_udp(B_INNER, A_INNER, 64);
    match pair.b.egress(pair.now, &mut buf, 64) {
        Egress::Send { destination, .. } => assert_eq!(destination, moved),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_removed_local_identity_takes_its_tunnels_and_leaves_the_others() {
    let mut pair = NodePair::with_b_identities(
        DefaultAction::Allow,
        DefaultAction::Allow,
        &[B_INNER, B_INNER2],
    )
    .connect();
    // A talks to server-2 too.
    let mut buf = ipv4_udp(A_INNER, B_INNER2, 64);
    assert_eq!(pair.a.egress(pair.now, &mut buf, 64), Egress::Queued);
    assert!(matches!(pair.pump()[..], [Ingress::Deliver { .. }]));
    let before = handshakes(&pair);

    pair.b_config.identities.remove(0);
    assert_eq!(
        reconfigure_b(&mut pair),
        IdentityChanges {
            locals_removed: 1,
            ..IdentityChanges::default()
        }
    );
    assert_eq!(
        a_sends_now(&mut pair, B_INNER),
        Ingress::Dropped(Dropped::Protocol(ProtocolDrop::UnknownIndex))
    );
    assert!(
        matches!(a_sends_now(&mut pair, B_INNER2), Ingress::Deliver { .. }),
        "server-2 keeps its session"
    );
    assert_eq!(handshakes(&pair), before);
}

/// A flow a local workload opened keeps letting replies in after a reconfiguration
/// renumbers its identity (here: the identity before it is removed).
#[test]
fn flows_follow_their_identity_through_a_renumbering() {
    let mut pair = NodePair::with_b_identities(
        DefaultAction::Allow,
        DefaultAction::Deny,
        &[B_INNER, B_INNER2],
    );
    // server-2 opens a UDP flow to A; A's reply is let in by the flow alone.
    let (mut out, len) = ipv4(B_INNER2, A_INNER, 17, (0, 0, false), &udp(5000, 6000, b"x"));
    assert_eq!(pair.b.egress(pair.now, &mut out, len), Egress::Queued);
    assert!(matches!(pair.pump()[..], [Ingress::Deliver { .. }]));
    let reply = || ipv4(A_INNER, B_INNER2, 17, (0, 0, false), &udp(6000, 5000, b"y"));
    let (buf, len) = reply();
    assert!(matches!(pair.a_to_b(buf, len), Ingress::Deliver { .. }));

    pair.b_config.identities.remove(0);
    reconfigure_b(&mut pair);
    let (buf, len) = reply();
    assert!(
        matches!(pair.a_to_b(buf, len), Ingress::Deliver { .. }),
        "the flow moved with server-2"
    );
    // Anything else from A to server-2 is still denied.
    let (buf, len) = ipv4(A_INNER, B_INNER2, 17, (0, 0, false), &udp(6000, 5001, b"z"));
    assert_eq!(
        pair.a_to_b(buf, len),
        Ingress::Dropped(Dropped::Node(NodeDrop::PolicyDenied))
    );
}

/// A full key rotation of B's identity with traffic from A throughout: B answers on a
/// next key, A prefers it and moves its traffic there with one handshake, B switches,
/// A retires the old key. Every packet arrives, and afterwards the old key is refused.
#[test]
fn a_key_rotation_loses_nothing_and_retires_the_old_key() {
    use meshguard::identity::PrivateKey;
    use meshguard::testbed::fixtures::seeded_key;

    let mut pair = NodePair::connected();
    let old_public = pair.b_config.identities[0].public_key;
    let next: PrivateKey = seeded_key(0x2b);
    let next_public = next.public_key();
    let delivered = |pair: &mut NodePair| {
        let buf = ipv4_udp(A_INNER, B_INNER, 64);
        matches!(pair.a_to_b(buf, 64), Ingress::Deliver { .. })
    };
    let reconfigure_a = |pair: &mut NodePair| {
        let config = pair.a_config.clone();
        pair.a
            .reconfigure(pair.now, &config, &PolicySet::default())
            .identities
    };
    let (a0, b0) = handshakes(&pair);

    // 1. B also answers on its next key.
    pair.b_config.identities[0].next_key = Some(("next.key".into(), next.clone(), next_public));
    assert_eq!(reconfigure_b(&mut pair).locals_changed, 1);
    assert!(delivered(&mut pair));
    assert_eq!(handshakes(&pair), (a0, b0), "nothing new yet");

    // 2. A learns the next key and prefers it: the next packet still goes on the old
    // session while A shakes hands on the new keys, and later ones use the new session.
    pair.a_config.peers[0].identities[0].next_public_key = Some(next_public);
    assert_eq!(reconfigure_a(&mut pair).peers_changed, 1);
    assert!(
        delivered(&mut pair),
        "on the old session, with a handshake started"
    );
    assert!(pair.pump().is_empty(), "the handshake completes");
    assert_eq!(handshakes(&pair), (a0 + 1, b0 + 1));
    assert!(delivered(&mut pair));

    // 3. B switches to its next key: the old key and its tunnel go; A's traffic is on the
    // new one already.
    let identity = &mut pair.b_config.identities[0];
    identity.private_key = next.clone();
    identity.public_key = next_public;
    identity.next_key = None;
    reconfigure_b(&mut pair);
    assert!(delivered(&mut pair), "after B's switch");

    // 4. A retires the old key.
    let peer = &mut pair.a_config.peers[0].identities[0];
    peer.public_key = next_public;
    peer.next_public_key = None;
    reconfigure_a(&mut pair);
    assert!(delivered(&mut pair), "after A retired the old key");
    assert_eq!(handshakes(&pair), (a0 + 1, b0 + 1), "one handshake in all");

    // The old key is refused: an initiation to it finds no key of B's.
    let now = pair.now;
    let mut stranger = meshguard::proto::Device::new(
        meshguard::proto::DeviceConfig::default(),
        meshguard::testbed::fixtures::seeded(7),
        now,
        meshguard::testbed::fixtures::UNIX_START,
    );
    let local = stranger.add_local(seeded_key(0xa));
    let tunnel = stranger.add_tunnel(now, local, *old_public.as_bytes(), Some(pair.b_addr), None);
    stranger.initiate(now, tunnel);
    let mut init = stranger.poll_transmit().unwrap().data;
    assert_eq!(
        pair.b.ingress(now, pair.a_addr, &mut init),
        Ingress::Dropped(Dropped::Protocol(ProtocolDrop::BadMac1))
    );
}

/// Random sequences of configurations drawn from a pool of identities and settings,
/// applied one after the other: the changes `reconfigure` reports are those a plain set
/// model of the two configurations predicts, and the node ends up with exactly the
/// identities of the configuration, each pair reachable.
#[test]
fn random_reconfigurations_match_a_model() {
    use std::collections::{BTreeMap, BTreeSet};

    use meshguard::config::{NodeConfig, PeerConfig, PeerIdentityConfig};
    use meshguard::identity::{PrivateKey, PublicKey};
    use meshguard::testbed::fixtures::{seeded_key, NodePair};

    // A tiny deterministic generator: the test is the same on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut draw = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let base = NodePair::new().a_config;
    let local_keys: Vec<PrivateKey> = (0..8).map(|i| seeded_key(100 + i)).collect();
    let peer_keys: Vec<PublicKey> = (0..16).map(|i| seeded_key(200 + i).public_key()).collect();
    let random_config = |draw: &mut dyn FnMut(u64) -> u64| -> NodeConfig {
        let mut config = base.clone();
        config.identities.clear();
        for i in 0..4u64 {
            if draw(3) == 0 {
                continue;
            }
            let mut identity = base.identities[0].clone();
            identity.principal = format!("cluster.local/ns/n/sa/local-{i}").parse().unwrap();
            let key = &local_keys[(i * 2 + draw(2)) as usize];
            identity.private_key = key.clone();
            identity.public_key = key.public_key();
            identity.addresses = vec![format!("10.1.{i}.{}/32", 1 + draw(2)).parse().unwrap()];
            identity.labels = BTreeMap::from([("v".to_owned(), draw(2).to_string())]);
            config.identities.push(identity);
        }
        if config.identities.is_empty() {
            config.identities.push(base.identities[0].clone());
        }
        config.peers.clear();
        for node in 0..3u64 {
            let mut identities = Vec::new();
            for i in 0..2u64 {
                if draw(3) == 0 {
                    continue;
                }
                let k = (node * 4 + i * 2) as usize;
                identities.push(PeerIdentityConfig {
                    principal: format!("cluster.local/ns/p/sa/peer-{i}").parse().unwrap(),
                    public_key: peer_keys[k + draw(2) as usize],
                    next_public_key: None,
                    allowed_ips: vec![format!("10.2.{node}.{}/32", 2 * i + draw(2))
                        .parse()
                        .unwrap()],
                });
            }
            if identities.is_empty() {
                continue;
            }
            config.peers.push(PeerConfig {
                path: format!("/nonexistent/peers/n{node}.toml").into(),
                name: format!("n{node}"),
                endpoint: Some(format!("198.18.9.{}:51820", 1 + draw(3)).parse().unwrap()),
                persistent_keepalive: None,
                identities,
            });
        }
        config
    };

    // The model: identities keyed as reconfigure keys them, with what may change.
    type Local = (Vec<u8>, Vec<u8>, Vec<u8>);
    fn locals(c: &NodeConfig) -> BTreeMap<String, Local> {
        c.identities
            .iter()
            .map(|i| {
                (
                    i.principal.to_string(),
                    (
                        format!("{:?}", i.addresses).into_bytes(),
                        format!("{:?}", i.labels).into_bytes(),
                        i.public_key.as_bytes().to_vec(),
                    ),
                )
            })
            .collect()
    }
    fn peers(c: &NodeConfig) -> BTreeMap<(String, String), String> {
        c.peers
            .iter()
            .flat_map(|p| {
                p.identities.iter().map(move |i| {
                    (
                        (p.name.clone(), i.principal.to_string()),
                        format!("{:?} {:?} {}", p.endpoint, i.allowed_ips, i.public_key),
                    )
                })
            })
            .collect()
    }
    fn diff<K: Ord + Clone, V: PartialEq>(
        old: &BTreeMap<K, V>,
        new: &BTreeMap<K, V>,
    ) -> (usize, usize, usize) {
        let (o, n): (BTreeSet<&K>, BTreeSet<&K>) = (old.keys().collect(), new.keys().collect());
        let changed = o.intersection(&n).filter(|k| old[**k] != new[**k]).count();
        (n.difference(&o).count(), o.difference(&n).count(), changed)
    }

    let now = std::time::Instant::now();
    let mut config = random_config(&mut draw);
    let mut node = meshguard::node::Node::new(
        &config,
        &PolicySet::default(),
        meshguard::testbed::fixtures::seeded(3),
        now,
        meshguard::testbed::fixtures::UNIX_START,
    );
    for round in 0..200 {
        let next = random_config(&mut draw);
        let (la, lr, lc) = diff(&locals(&config), &locals(&next));
        let (pa, pr, pc) = diff(&peers(&config), &peers(&next));
        let done = node
            .reconfigure(now, &next, &PolicySet::default())
            .identities;
        assert_eq!(
            done,
            IdentityChanges {
                locals_added: la,
                locals_removed: lr,
                locals_changed: lc,
                peers_added: pa,
                peers_removed: pr,
                peers_changed: pc,
            },
            "round {round}"
        );
        let principals: Vec<String> = node
            .locals()
            .iter()
            .map(|l| l.principal.to_string())
            .collect();
        assert_eq!(
            principals,
            locals(&next).keys().cloned().collect::<Vec<_>>(),
            "round {round}"
        );
        assert_eq!(node.peers().len(), peers(&next).len(), "round {round}");
        // Every local address reaches every peer address: each pair has a tunnel.
        for local in &next.identities {
            for peer in next.peers.iter().flat_map(|p| &p.identities) {
                let (IpAddr::V4(from), IpAddr::V4(to)) =
                    (local.addresses[0].addr(), peer.allowed_ips[0].addr())
                else {
                    unreachable!("IPv4 only here")
                };
                let mut buf = ipv4_udp(from.octets(), to.octets(), 64);
                let egress = node.egress(now, &mut buf, 64);
                assert!(
                    matches!(egress, Egress::Queued | Egress::Send { .. }),
                    "round {round}: {from} -> {to}: {egress:?}"
                );
            }
        }
        while node.poll_transmit().is_some() {}
        config = next;
    }
}
