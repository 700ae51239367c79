//! Attacks on the allow list through real tunnels: a rogue node (the test, speaking
//! WireGuard from the protocol core) holds two identities the victim daemon knows,
//! `mallory` (the attacker) and `frontend` (a peer the victim talks to), and sends
//! crafted inner packets. An nftables counter in the victim's namespace shows what the
//! daemon handed to its TUN device. Each attack is followed by a control packet of the
//! same shape that the allow list lets in: exactly one packet, the control, must arrive.
//! Needs root and `nft`.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use meshguard::proto::TRANSPORT_HEADER_LEN;
use meshguard::testbed::fixtures::{
    destination_options, fragment_header, ipv4, ipv4_echo, ipv4_icmp, ipv6, tcp, udp,
};
use meshguard::testbed::{
    counter, require_root, wait_until, IdentitySpec, InboundCounter, Lan, MeshguardNode, Netns,
    NodeSpec, PeerEntry, RoguePeer,
};

const VICTIM: [u8; 4] = [10, 60, 1, 1];
const VICTIM_V6: [u8; 16] = [0xfd, 0x60, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MALLORY: [u8; 4] = [10, 60, 2, 1];
const MALLORY_V6: [u8; 16] = [0xfd, 0x60, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const FRONTEND: [u8; 4] = [10, 60, 3, 1];

const UDP: u8 = 17;
const TCP: u8 = 6;
const SYN: u8 = 0x02;

/// Mallory may reach payments on anything but port 9999 and ICMP (the DENY); frontend
/// may open nothing (the ALLOW selects payments, and names only mallory).
const POLICY_OPEN: &str = r#"
[[policy]]
name = "mallory-in"
namespace = "payments"
[[policy.rules]]
[[policy.rules.from]]
principals = ["cluster.local/ns/attack/sa/mallory"]

[[policy]]
name = "no-9999-no-icmp"
namespace = "istio-system"
action = "DENY"
[[policy.rules]]
[[policy.rules.to]]
ports = ["9999/udp", "9999/tcp", "icmp"]
"#;

/// After the reload: mallory may only send UDP to 8080.
const POLICY_NARROW: &str = r#"
[[policy]]
name = "mallory-in"
namespace = "payments"
[[policy.rules]]
[[policy.rules.from]]
principals = ["cluster.local/ns/attack/sa/mallory"]
[[policy.rules.to]]
ports = ["8080/udp"]
"#;

struct Bench {
    rogue: RoguePeer,
    mallory: usize,
    frontend: usize,
}

type Packet = (Vec<u8>, usize);

/// The inner packet of a built buffer.
fn inner((buf, len): &Packet) -> Vec<u8> {
    buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len].to_vec()
}

fn udp4(source: [u8; 4], source_port: u16, destination_port: u16) -> Packet {
    ipv4(
        source,
        VICTIM,
        UDP,
        (0, 0, false),
        &udp(source_port, destination_port, b"meshguard"),
    )
}

fn udp6(extensions: &[(u8, Vec<u8>)], destination_port: u16) -> Packet {
    ipv6(
        MALLORY_V6,
        VICTIM_V6,
        extensions,
        UDP,
        &udp(40000, destination_port, b"meshguard"),
    )
}

/// Sends `attack` then `control` (each on its tunnel) and returns how many packets the
/// victim's device delivered once the control is in.
fn delivered_of(
    bench: &mut Bench,
    inbound: &InboundCounter,
    attack: (usize, Packet),
    control: (usize, Packet),
) -> u64 {
    let before = inbound.count().unwrap();
    bench
        .rogue
        .send(attack.0, attack.1 .0, attack.1 .1)
        .unwrap();
    bench
        .rogue
        .send(control.0, control.1 .0, control.1 .1)
        .unwrap();
    wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
        inbound.count().unwrap() > before
    });
    // Anything still in flight lands within this.
    bench.rogue.receive_for(Duration::from_millis(100)).unwrap();
    inbound.count().unwrap() - before
}

fn mesh() -> (Lan, Netns, Netns, MeshguardNode, Bench) {
    let lan = Lan::new("atkl").unwrap();
    let victim_ns = Netns::new("atkv").unwrap();
    let rogue_ns = Netns::new("atkr").unwrap();
    lan.attach(&victim_ns, "198.18.8.1/24").unwrap();
    lan.attach(&rogue_ns, "198.18.8.2/24").unwrap();
    let victim = NodeSpec {
        name: "victim".into(),
        listen: "198.18.8.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/payments/sa/payment-service",
            &["10.60.1.1/32", "fd60:1::1/128"],
        )],
        policy: POLICY_OPEN.into(),
        offload: true,
        workers: Some(1),
    };
    // Mallory holds a /24 so that a flood can use many source addresses.
    let rogue = NodeSpec {
        name: "rogue".into(),
        listen: "198.18.8.2:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/attack/sa/mallory",
                &["10.60.2.0/24", "fd60:2::/64"],
            ),
            IdentitySpec::new("cluster.local/ns/web/sa/frontend", &["10.60.3.1/32"]),
        ],
        policy: String::new(),
        offload: true,
        workers: None,
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon =
        MeshguardNode::start(binary, &victim_ns, &victim, &[PeerEntry::for_node(&rogue)]).unwrap();
    let victim_key = victim.identities[0].private_key.public_key();
    let mut peer = RoguePeer::bind(&rogue_ns, rogue.listen).unwrap();
    let mallory = peer.add_tunnel(&rogue.identities[0].private_key, &victim_key, victim.listen);
    let frontend = peer.add_tunnel(&rogue.identities[1].private_key, &victim_key, victim.listen);
    peer.handshake(mallory, Duration::from_secs(5)).unwrap();
    peer.handshake(frontend, Duration::from_secs(5)).unwrap();
    let bench = Bench {
        rogue: peer,
        mallory,
        frontend,
    };
    (lan, victim_ns, rogue_ns, daemon, bench)
}

/// The victim opens a UDP flow to `to` from `from_port` (one datagram, through the tunnel).
fn victim_sends_udp(ns: &Netns, from_port: u16, to: SocketAddr) {
    let socket: UdpSocket = ns.udp_bind(SocketAddr::from((VICTIM, from_port))).unwrap();
    socket.send_to(b"from the victim", to).unwrap();
}

/// Waits for the rogue to receive a packet on `tunnel` for which `pick` says yes.
fn rogue_receives(bench: &mut Bench, tunnel: usize, pick: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    for _ in 0..30 {
        let packets = bench.rogue.receive_for(Duration::from_millis(100)).unwrap();
        if let Some((_, p)) = packets.into_iter().find(|(t, p)| *t == tunnel && pick(p)) {
            return p;
        }
    }
    panic!("the rogue did not receive the victim's packet");
}

#[test]
fn crafted_packets_through_a_tunnel_do_not_get_past_the_allow_list() {
    if !require_root() {
        return;
    }
    let (_lan, victim_ns, _rogue_ns, daemon, mut bench) = mesh();
    let inbound = InboundCounter::new(&victim_ns, "mg0").unwrap();
    let (m, f) = (bench.mallory, bench.frontend);

    // 1. IPv6 extension headers do not hide the denied port 9999.
    for (name, extension) in [
        ("destination options", destination_options()),
        ("hop-by-hop options", (0u8, destination_options().1)),
    ] {
        let attack = udp6(std::slice::from_ref(&extension), 9999);
        let control = udp6(&[extension], 8080);
        assert_eq!(
            delivered_of(&mut bench, &inbound, (m, attack), (m, control)),
            1,
            "{name} before UDP to port 9999"
        );
    }

    // 1. IPv6 fragments: the first fragment of a datagram to 9999 and its second
    //    fragment stay out; a fragmented datagram to 8080 comes in whole (2).
    let first = |port: u16, id: u32| {
        ipv6(
            MALLORY_V6,
            VICTIM_V6,
            &[fragment_header(0, true, id)],
            UDP,
            &udp(40000, port, &[0x61; 16]),
        )
    };
    let second = |id: u32| {
        ipv6(
            MALLORY_V6,
            VICTIM_V6,
            &[fragment_header(3, false, id)],
            UDP,
            &[0x62; 16],
        )
    };
    assert_eq!(
        delivered_of(
            &mut bench,
            &inbound,
            (m, first(9999, 7)),
            (m, first(8080, 8))
        ),
        1,
        "first fragments"
    );
    assert_eq!(
        delivered_of(&mut bench, &inbound, (m, second(7)), (m, second(8))),
        1,
        "later fragments follow their first fragment's verdict"
    );

    // 1. IPv4: a first fragment too short to hold the ports fails closed; a fragment
    //    that would overwrite an admitted TCP header is dropped.
    let tiny = ipv4(MALLORY, VICTIM, UDP, (21, 0, true), &[0x9c, 0x40]);
    let whole = udp4(MALLORY, 40000, 8080);
    assert_eq!(
        delivered_of(&mut bench, &inbound, (m, tiny), (m, whole)),
        1,
        "tiny first fragment"
    );
    let syn = tcp(40000, 7000, SYN, &[0x61; 4]);
    let tcp_first = ipv4(MALLORY, VICTIM, TCP, (22, 0, true), &syn);
    let overlap = ipv4(MALLORY, VICTIM, TCP, (22, 1, true), &[0xff; 16]);
    let tcp_rest = ipv4(MALLORY, VICTIM, TCP, (22, 3, false), &[0x62; 8]);
    assert_eq!(
        delivered_of(&mut bench, &inbound, (m, overlap.clone()), (m, tcp_first)),
        1,
        "an overlapping fragment before the first is not let in"
    );
    assert_eq!(
        delivered_of(&mut bench, &inbound, (m, overlap), (m, tcp_rest)),
        1,
        "an overlapping fragment after the first is not let in"
    );

    // 5. The victim has a UDP flow with frontend. Mallory (denied all ICMP) reports
    //    errors about it; frontend's own report is related and gets in.
    victim_sends_udp(&victim_ns, 5000, SocketAddr::from((FRONTEND, 6000)));
    rogue_receives(&mut bench, f, |p| p.len() > 20 && p[9] == UDP);
    let quoted = inner(&ipv4(
        VICTIM,
        FRONTEND,
        UDP,
        (0, 0, false),
        &udp(5000, 6000, &[]),
    ));
    for (name, kind, rest) in [
        ("port unreachable", (3, 3), [0; 4]),
        ("fragmentation needed", (3, 4), [0, 0, 0x02, 0x40]),
    ] {
        let attack = ipv4_icmp(MALLORY, VICTIM, kind, rest, &quoted);
        let control = ipv4_icmp(FRONTEND, VICTIM, kind, rest, &quoted);
        assert_eq!(
            delivered_of(&mut bench, &inbound, (m, attack), (f, control)),
            1,
            "{name} about another peer's flow"
        );
    }

    // 6. The victim pings mallory: mallory's echo *request* with the same identifier
    //    is not a reply, and ICMP from mallory is denied; the reply gets in.
    let _ = victim_ns.exec(
        "ping",
        ["-c", "1", "-W", "1", "-I", "10.60.1.1", "10.60.2.1"],
    );
    let request = rogue_receives(&mut bench, m, |p| p.len() > 24 && p[9] == 1 && p[20] == 8);
    let identifier = u16::from_be_bytes([request[24], request[25]]);
    assert_eq!(
        delivered_of(
            &mut bench,
            &inbound,
            (m, ipv4_echo(MALLORY, VICTIM, true, identifier)),
            (m, ipv4_echo(MALLORY, VICTIM, false, identifier)),
        ),
        1,
        "an echo request with the identifier of the victim's ping"
    );

    // 3 and 4. Mallory opens a UDP flow to 8081, which the reload below revokes.
    let revoked_flow = || udp4(MALLORY, 41000, 8081);
    let before = inbound.count().unwrap();
    bench
        .rogue
        .send(m, revoked_flow().0, revoked_flow().1)
        .unwrap();
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(20),
        || { inbound.count().unwrap() > before }
    ));
    let policy_file = daemon.config_path().with_file_name("policy.toml");
    std::fs::write(&policy_file, POLICY_NARROW).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            daemon.log().contains("configuration reloaded")
        }),
        "{}",
        daemon.log()
    );

    // 3. Mallory fills the flow table (65,536 flows) with allowed flows to 8080 from
    //    many addresses and ports; the victim's flow with frontend must survive, and
    //    mallory's revoked flow is pushed out of the table.
    let before = inbound.count().unwrap();
    let mut sent = 0u32;
    while inbound.count().unwrap() - before < 70_000 {
        assert!(sent < 200_000, "the victim does not take the flood");
        for _ in 0..1000 {
            let host = 1 + (sent / 60_000) as u8;
            let port = 1024 + (sent % 60_000) as u16;
            let (buf, len) = udp4([10, 60, 2, host], port, 8080);
            bench.rogue.send(m, buf, len).unwrap();
            sent += 1;
        }
        bench.rogue.receive_for(Duration::from_millis(10)).unwrap();
    }
    let reply = udp4(FRONTEND, 6000, 5000);
    assert_eq!(
        delivered_of(
            &mut bench,
            &inbound,
            (m, udp4(MALLORY, 41001, 8081)),
            (f, reply)
        ),
        1,
        "frontend's reply to the victim's flow after the flood"
    );

    // 4. The victim's workload answers mallory's revoked flow; mallory's next datagram on
    //    it stays out, while a flow the victim opens itself lets its reply in.
    victim_sends_udp(&victim_ns, 8081, SocketAddr::from((MALLORY, 41000)));
    victim_sends_udp(&victim_ns, 8082, SocketAddr::from((MALLORY, 42000)));
    rogue_receives(&mut bench, m, |p| {
        p.len() > 24 && p[9] == UDP && u16::from_be_bytes([p[20], p[21]]) == 8082
    });
    let fresh_reply = udp4(MALLORY, 42000, 8082);
    assert_eq!(
        delivered_of(&mut bench, &inbound, (m, revoked_flow()), (m, fresh_reply)),
        1,
        "a revoked UDP flow reopened by the victim's reply"
    );
    let log = daemon.stop().unwrap();
    assert!(counter(&log, "flow_evictions").unwrap() > 0, "{log}");
    assert_eq!(counter(&log, "fragment_overlap"), Some(1), "{log}");
}
