//! A live mesh: three daemons whose files change while they run. A and B start knowing
//! only each other, with a TCP stream from A to B and a ping running throughout. C's peer
//! files are added, C moves to another underlay address, C is removed from A, a local
//! identity comes and goes on A, and broken changes are refused: every step takes effect
//! within seconds, A↔B never shakes hands again, and the stream arrives byte for byte.
//! Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use meshguard::testbed::{
    counter, ping, ping_stats, require_root, wait_until, IdentitySpec, Lan, MeshguardNode, Netns,
    NodeSpec, PacedStream, PeerEntry, PingStats, ALLOW_ALL_POLICY,
};

const A: &str = "10.42.1.1";
const A2: &str = "10.42.1.2";
const B: &str = "10.42.2.1";
const C: &str = "10.42.3.1";
const C_EXTRA: &str = "10.42.3.128/32";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, listen: &str, identities: Vec<IdentitySpec>) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        listen: listen.parse().unwrap(),
        identities,
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
    }
}

fn identity(principal: &str, address: &str) -> IdentitySpec {
    IdentitySpec::new(principal, &[&format!("{address}/32")])
}

/// Handshakes a daemon logged between its identity `local` and the peer identity `peer`
/// (service account names).
fn handshakes(daemon: &MeshguardNode, local: &str, peer: &str) -> usize {
    let (local, peer) = (format!("local={local} "), format!("peer={peer} "));
    daemon
        .log()
        .lines()
        .filter(|l| l.contains("handshake completed") && l.contains(&local) && l.contains(&peer))
        .count()
}

/// Waits until `daemon` logged one more `what` than `before`.
fn wait_for(daemon: &MeshguardNode, what: &str, before: usize) {
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            daemon.log().matches(what).count() > before
        }),
        "no {what:?} in\n{}",
        daemon.log()
    );
}

/// Rewrites a daemon's files and waits for it to apply them.
fn apply(daemon: &MeshguardNode, spec: &NodeSpec, peers: &[PeerEntry]) {
    let before = daemon.reloads();
    daemon.rewrite(spec, peers).unwrap();
    wait_for(daemon, "configuration reloaded", before);
}

fn has_route(ns: &Netns, net: &str) -> bool {
    let out = ns.exec_ok("ip", ["route", "show", net]).unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[test]
fn peers_and_identities_change_while_traffic_runs() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("rldl").unwrap();
    let (ns_a, ns_b, ns_c) = (
        Netns::new("rlda").unwrap(),
        Netns::new("rldb").unwrap(),
        Netns::new("rldc").unwrap(),
    );
    lan.attach(&ns_a, "198.18.11.1/24").unwrap();
    lan.attach(&ns_b, "198.18.11.2/24").unwrap();
    let c_if = lan.attach(&ns_c, "198.18.11.3/24").unwrap();

    let mut spec_a = node(
        "node-a",
        "198.18.11.1:51820",
        vec![identity("cluster.local/ns/payments/sa/a-one", A)],
    );
    let spec_b = node(
        "node-b",
        "198.18.11.2:51820",
        vec![identity("cluster.local/ns/web/sa/b-one", B)],
    );
    // C listens on every address: it moves to another one later.
    let spec_c = node(
        "node-c",
        "0.0.0.0:51820",
        vec![identity("cluster.local/ns/web/sa/c-one", C)],
    );
    let peer_c = |endpoint: &str, extra: bool| {
        let mut entry = PeerEntry {
            endpoint: Some(endpoint.parse().unwrap()),
            ..PeerEntry::for_node(&spec_c)
        };
        if extra {
            entry.identities[0].2.push(C_EXTRA.to_owned());
        }
        entry
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a =
        MeshguardNode::start(binary, &ns_a, &spec_a, &[PeerEntry::for_node(&spec_b)]).unwrap();
    let daemon_b =
        MeshguardNode::start(binary, &ns_b, &spec_b, &[PeerEntry::for_node(&spec_a)]).unwrap();
    let peers_of_c = [PeerEntry::for_node(&spec_a), PeerEntry::for_node(&spec_b)];
    let daemon_c = MeshguardNode::start(binary, &ns_c, &spec_c, &peers_of_c).unwrap();

    let stream = PacedStream::start(&ns_a, ip(A), &ns_b, SocketAddr::new(ip(B), 7000)).unwrap();
    let ping_thread = {
        // A ping from A to B every 0.2 s for the whole test: a reload must lose none.
        let ns = &ns_a;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || ping_stats(ns, Some(ip(A)), ip(B), 150));
            run_steps(
                &ns_a,
                &ns_b,
                &ns_c,
                &c_if,
                &daemon_a,
                &daemon_b,
                &daemon_c,
                &mut spec_a,
                &spec_b,
                &peer_c,
            );
            handle.join().unwrap()
        })
    };
    let (sent, received) = stream.finish().unwrap();
    assert_eq!(sent, received, "the stream arrived whole");
    let PingStats {
        transmitted,
        received: answered,
    } = ping_thread.unwrap();
    eprintln!(
        "A->B during the reloads: {received} bytes of TCP intact; ping {answered}/{transmitted}"
    );
    assert_eq!(answered, transmitted, "no ping lost to a reload");
    let log_a = daemon_a.stop().unwrap();
    assert!(counter(&log_a, "reloads_applied").unwrap() >= 5, "{log_a}");
    assert!(counter(&log_a, "reloads_rejected").unwrap() >= 3, "{log_a}");
    assert_eq!(counter(&log_a, "peers_removed"), Some(1), "{log_a}");
    daemon_b.stop().unwrap();
}

#[allow(clippy::too_many_arguments)]
fn run_steps(
    ns_a: &Netns,
    ns_b: &Netns,
    ns_c: &Netns,
    c_if: &str,
    daemon_a: &MeshguardNode,
    daemon_b: &MeshguardNode,
    daemon_c: &MeshguardNode,
    spec_a: &mut NodeSpec,
    spec_b: &NodeSpec,
    peer_c: &dyn Fn(&str, bool) -> PeerEntry,
) {
    let peer_b = PeerEntry::for_node(spec_b);
    assert!(ping(ns_a, Some(ip(A)), ip(B), 2));
    let ab_handshakes = (
        handshakes(
            daemon_a,
            "cluster.local/ns/payments/sa/a-one",
            "cluster.local/ns/web/sa/b-one",
        ),
        handshakes(
            daemon_b,
            "cluster.local/ns/web/sa/b-one",
            "cluster.local/ns/payments/sa/a-one",
        ),
    );

    // C joins: its peer files appear on A and B.
    let started = Instant::now();
    apply(
        daemon_a,
        spec_a,
        &[peer_b.clone(), peer_c("198.18.11.3:51820", false)],
    );
    apply(
        daemon_b,
        spec_b,
        &[
            PeerEntry::for_node(spec_a),
            peer_c("198.18.11.3:51820", false),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            ping(ns_a, Some(ip(A)), ip(C), 1)
        }),
        "A reaches C"
    );
    eprintln!(
        "from writing C's peer files to A's first answered ping to C: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(ping(ns_b, Some(ip(B)), ip(C), 2), "B reaches C");

    // C moves to another underlay address; A and B are told, and A routes one more
    // prefix to C.
    // Deleting the old (primary) address must leave the new one in place.
    for scope in ["all", c_if] {
        let key = format!("/proc/sys/net/ipv4/conf/{scope}/promote_secondaries");
        ns_c.exec_ok("sh", ["-c", &format!("echo 1 > {key}")])
            .unwrap();
    }
    ns_c.ip(["addr", "add", "198.18.11.13/24", "dev", c_if])
        .unwrap();
    apply(
        daemon_a,
        spec_a,
        &[peer_b.clone(), peer_c("198.18.11.13:51820", true)],
    );
    apply(
        daemon_b,
        spec_b,
        &[
            PeerEntry::for_node(spec_a),
            peer_c("198.18.11.13:51820", false),
        ],
    );
    assert!(has_route(ns_a, C_EXTRA), "the new allowed IP is routed");
    ns_c.ip(["addr", "del", "198.18.11.3/24", "dev", c_if])
        .unwrap();
    let ok = ping(ns_a, Some(ip(A)), ip(C), 3);
    assert!(ok, "A follows C to its new address");
    assert!(
        ping(ns_b, Some(ip(B)), ip(C), 3),
        "B follows C to its new address"
    );

    // C is removed from A: gone at once, in both directions.
    apply(daemon_a, spec_a, std::slice::from_ref(&peer_b));
    assert!(!ping(ns_a, Some(ip(A)), ip(C), 2), "A no longer reaches C");
    assert!(!ping(ns_c, Some(ip(C)), ip(A), 2), "C no longer reaches A");
    assert!(
        !has_route(ns_a, C) && !has_route(ns_a, C_EXTRA),
        "C's routes are gone"
    );
    let _ = daemon_c;

    // A local identity comes to A (a pod scheduled), then goes.
    spec_a
        .identities
        .push(identity("cluster.local/ns/payments/sa/a-two", A2));
    apply(daemon_a, spec_a, std::slice::from_ref(&peer_b));
    apply(daemon_b, spec_b, &[PeerEntry::for_node(spec_a)]);
    assert!(
        ping(ns_b, Some(ip(B)), ip(A2), 3),
        "B reaches the new identity"
    );
    let gone = spec_a.identities.pop().unwrap();
    apply(daemon_a, spec_a, std::slice::from_ref(&peer_b));
    assert!(!ping(ns_b, Some(ip(B)), ip(A2), 2), "the identity is gone");
    drop(gone);
    apply(daemon_b, spec_b, &[PeerEntry::for_node(spec_a)]);

    // Broken changes are refused, each naming file, key and reason; nothing changes.
    let node_file = daemon_a.config_path().to_owned();
    let good = std::fs::read_to_string(&node_file).unwrap();
    let refusals = || daemon_a.log().matches("reload refused").count();
    let before = refusals();
    std::fs::write(&node_file, format!("{good}\nname = \n")).unwrap();
    wait_for(daemon_a, "reload refused", before);
    assert!(
        daemon_a.log().contains("node.toml: line"),
        "{}",
        daemon_a.log()
    );
    let before = refusals();
    std::fs::write(&node_file, good.replace("mtu = 1420", "mtu = 100")).unwrap();
    wait_for(daemon_a, "reload refused", before);
    assert!(
        daemon_a.log().contains("node.toml: interface.mtu"),
        "{}",
        daemon_a.log()
    );

    let before = refusals();
    let mut overlapping = peer_b.clone();
    overlapping.identities[0].2.push(format!("{A}/32"));
    std::fs::write(&node_file, &good).unwrap();
    daemon_a.rewrite(spec_a, &[overlapping]).unwrap();
    wait_for(daemon_a, "reload refused", before);
    assert!(daemon_a.log().contains("overlaps"), "{}", daemon_a.log());

    let before = refusals();
    let mut twice = peer_b.clone();
    let first = twice.identities[0].clone();
    twice.identities.push((
        "cluster.local/ns/web/sa/b-copy".to_owned(),
        first.1.clone(),
        vec!["10.42.2.200/32".to_owned()],
    ));
    daemon_a.rewrite(spec_a, &[twice]).unwrap();
    wait_for(daemon_a, "reload refused", before);

    let before = refusals();
    daemon_a
        .rewrite(spec_a, std::slice::from_ref(&peer_b))
        .unwrap();
    let key = node_file.parent().unwrap().join("keys/identity-0.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    daemon_a
        .process()
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    wait_for(daemon_a, "reload refused", before);
    assert!(
        daemon_a.log().contains("readable by group or others"),
        "{}",
        daemon_a.log()
    );

    // A setting the running daemon cannot change is reported, and the rest applies.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut moved = spec_a.clone();
    moved.listen = "198.18.11.1:51999".parse().unwrap();
    apply(daemon_a, &moved, std::slice::from_ref(&peer_b));
    assert!(
        daemon_a.log().contains("restart required") && daemon_a.log().contains("key=\"listen\""),
        "{}",
        daemon_a.log()
    );

    assert!(ping(ns_a, Some(ip(A)), ip(B), 2), "A↔B as before");
    assert_eq!(
        (
            handshakes(
                daemon_a,
                "cluster.local/ns/payments/sa/a-one",
                "cluster.local/ns/web/sa/b-one"
            ),
            handshakes(
                daemon_b,
                "cluster.local/ns/web/sa/b-one",
                "cluster.local/ns/payments/sa/a-one"
            )
        ),
        ab_handshakes,
        "A and B never shook hands again"
    );
}

/// A full rotation of B's key with a TCP stream and a ping from A to B running
/// throughout, following the README's procedure: B answers on a next key, A prefers it,
/// B switches, A retires the old key. Nothing is lost, and the old key is refused after.
#[test]
fn a_key_rotation_under_traffic_loses_nothing() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("rotl").unwrap();
    let (ns_a, ns_b) = (Netns::new("rota").unwrap(), Netns::new("rotb").unwrap());
    lan.attach(&ns_a, "198.18.12.1/24").unwrap();
    lan.attach(&ns_b, "198.18.12.2/24").unwrap();
    let spec_a = node(
        "node-a",
        "198.18.12.1:51820",
        vec![identity("cluster.local/ns/payments/sa/a-one", A)],
    );
    let mut spec_b = node(
        "node-b",
        "198.18.12.2:51820",
        vec![identity("cluster.local/ns/web/sa/b-one", B)],
    );
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a =
        MeshguardNode::start(binary, &ns_a, &spec_a, &[PeerEntry::for_node(&spec_b)]).unwrap();
    let daemon_b =
        MeshguardNode::start(binary, &ns_b, &spec_b, &[PeerEntry::for_node(&spec_a)]).unwrap();
    let old_b = spec_b.identities[0].clone();
    let stream = PacedStream::start(&ns_a, ip(A), &ns_b, SocketAddr::new(ip(B), 7000)).unwrap();
    let pings = std::thread::scope(|scope| {
        let pinger = scope.spawn(|| ping_stats(&ns_a, Some(ip(A)), ip(B), 60));
        std::thread::sleep(Duration::from_secs(1));
        // 1. B also answers on its next key.
        spec_b.identities[0].next_private_key = Some(meshguard::identity::PrivateKey::generate());
        apply(&daemon_b, &spec_b, &[PeerEntry::for_node(&spec_a)]);
        std::thread::sleep(Duration::from_secs(1));
        // 2. A learns the next key and moves its traffic to it.
        apply(&daemon_a, &spec_a, &[PeerEntry::for_node(&spec_b)]);
        std::thread::sleep(Duration::from_secs(2));
        // 3. B switches to the next key; the old one goes.
        let next = spec_b.identities[0].next_private_key.take().unwrap();
        spec_b.identities[0].private_key = next;
        apply(&daemon_b, &spec_b, &[PeerEntry::for_node(&spec_a)]);
        std::thread::sleep(Duration::from_secs(1));
        // 4. A retires the old key.
        apply(&daemon_a, &spec_a, &[PeerEntry::for_node(&spec_b)]);
        pinger.join().unwrap().unwrap()
    });
    let (sent, received) = stream.finish().unwrap();
    eprintln!(
        "through a key rotation: {received} bytes of TCP intact; ping {}/{}",
        pings.received, pings.transmitted
    );
    assert_eq!(sent, received, "the stream arrived whole");
    assert_eq!(pings.received, pings.transmitted, "no ping lost");
    assert_eq!(
        handshakes(
            &daemon_a,
            "cluster.local/ns/payments/sa/a-one",
            "cluster.local/ns/web/sa/b-one"
        ),
        2,
        "one handshake at start, one to move to the new key"
    );

    // A node that still knows only the old key gets nothing from B.
    let spec_stale = NodeSpec {
        name: "node-a".into(),
        ..spec_a.clone()
    };
    let stale_peer = PeerEntry::for_node(&NodeSpec {
        identities: vec![old_b],
        ..spec_b.clone()
    });
    apply(&daemon_a, &spec_stale, &[stale_peer]);
    assert!(
        !ping(&ns_a, Some(ip(A)), ip(B), 3),
        "the old key is refused"
    );
    let log_b = daemon_b.stop().unwrap();
    assert!(counter(&log_b, "bad_mac1").unwrap() > 0, "{log_b}");
}
