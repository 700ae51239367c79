//! Two meshguard nodes in namespaces, each with two identities, over real TUN devices and
//! UDP: every identity pair reaches the other, traffic is intact, and the identity
//! rules hold on the wire. Needs root; skips otherwise (fails under MESHGUARD_REQUIRE_ROOT).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use meshguard::identity::PrivateKey;
use meshguard::proto::{Device, DeviceConfig, Received, Sealed, SEAL_TAILROOM};
use meshguard::testbed::{
    counter, ping, require_root, tcp_transfer, IdentitySpec, Link, MeshguardNode, Netns, NodeSpec,
    PeerEntry, ALLOW_ALL_POLICY,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshguard"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node_a() -> NodeSpec {
    NodeSpec {
        name: "node-a".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        // node-a spreads its data path over three workers (TUN queues, sockets); node-b
        // has one.
        workers: Some(3),
        listen: "198.18.1.1:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/payments/sa/payment-service",
                &["10.10.1.1/32", "fd00:10:1::1/128"],
            ),
            IdentitySpec::new("cluster.local/ns/payments/sa/ledger", &["10.10.1.2/32"]),
        ],
    }
}

fn node_b() -> NodeSpec {
    NodeSpec {
        name: "node-b".into(),
        policy: ALLOW_ALL_POLICY.into(),
        // node-b runs without TUN offload: both data paths, talking to each other.
        offload: false,
        workers: Some(1),
        listen: "198.18.1.2:51820".parse().unwrap(),
        identities: vec![
            IdentitySpec::new(
                "cluster.local/ns/web/sa/frontend",
                &["10.10.2.1/32", "fd00:10:2::1/128"],
            ),
            IdentitySpec::new("cluster.local/ns/web/sa/checkout", &["10.10.2.2/32"]),
        ],
    }
}

#[test]
fn every_identity_pair_pings_and_transfers_intact() {
    if !require_root() {
        return;
    }
    let ns_a = Netns::new("mga").unwrap();
    let ns_b = Netns::new("mgb").unwrap();
    let _link = Link::new(&ns_a, "198.18.1.1/24", &ns_b, "198.18.1.2/24", None).unwrap();
    let (a, b) = (node_a(), node_b());
    let daemon_a = MeshguardNode::start(binary(), &ns_a, &a, &[PeerEntry::for_node(&b)]).unwrap();
    let daemon_b = MeshguardNode::start(binary(), &ns_b, &b, &[PeerEntry::for_node(&a)]).unwrap();

    assert!(
        daemon_a.log().contains("TUN offload on"),
        "{}",
        daemon_a.log()
    );
    assert!(
        daemon_b.log().contains("TUN offload off"),
        "{}",
        daemon_b.log()
    );
    assert!(daemon_a.log().contains("workers=3"), "{}", daemon_a.log());
    assert!(daemon_b.log().contains("workers=1"), "{}", daemon_b.log());
    for (from_ns, to_ns, from, to) in [
        (&ns_a, &ns_b, "10.10.1.1", "10.10.2.1"),
        (&ns_a, &ns_b, "10.10.1.2", "10.10.2.2"),
        (&ns_b, &ns_a, "10.10.2.1", "10.10.1.2"),
        (&ns_b, &ns_a, "10.10.2.2", "10.10.1.1"),
        // IPv6 inside the tunnel: node-a joins the TCP segments into IPv6 super packets.
        (&ns_a, &ns_b, "fd00:10:1::1", "fd00:10:2::1"),
        (&ns_b, &ns_a, "fd00:10:2::1", "fd00:10:1::1"),
    ] {
        assert!(
            ping(from_ns, Some(ip(from)), ip(to), 3),
            "ping {from} -> {to}\nA:\n{}\nB:\n{}",
            daemon_a.log(),
            daemon_b.log()
        );
        let server = SocketAddr::new(ip(to), 0);
        let report = tcp_transfer(to_ns, server, from_ns, Some(ip(from)), TRANSFER_BYTES)
            .unwrap_or_else(|e| panic!("transfer {from} -> {to}: {e}\nA:\n{}", daemon_a.log()));
        assert!(report.is_intact(), "{report}");
        assert_eq!(
            report.client_addr.ip(),
            ip(from),
            "the source address survived"
        );
        eprintln!("{from} -> {to}: {report}");
    }

    // An address on the device that no identity owns: nothing leaves for it.
    ns_a.ip(["address", "add", "10.10.1.99/32", "dev", "mg0"])
        .unwrap();
    // Let the transfers' last segments (FIN, ACK) drain, so that the count is quiet.
    let mut sent_before = counters_now(&daemon_a, "packets_out");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = counters_now(&daemon_a, "packets_out");
        if now == sent_before {
            break;
        }
        sent_before = now;
    }
    let unowned_before = counters_now(&daemon_a, "no_local_identity");
    assert!(!ping(&ns_a, Some(ip("10.10.1.99")), ip("10.10.2.1"), 2));
    assert_eq!(
        counters_now(&daemon_a, "packets_out"),
        sent_before,
        "nothing sent"
    );
    assert_eq!(
        counters_now(&daemon_b, "spoofed_source"),
        0,
        "nothing from the unowned address reached node-b"
    );
    assert!(counters_now(&daemon_a, "no_local_identity") >= unowned_before + 2);
    daemon_a.stop().unwrap();
    let log_b = daemon_b.stop().unwrap();
    assert_eq!(counter(&log_b, "network_drops"), Some(0), "{log_b}");
}

/// Asks the daemon for its counters (SIGUSR1) and returns one of them.
fn counters_now(daemon: &MeshguardNode, name: &str) -> u64 {
    let lines = |log: &str| log.matches("counters=").count();
    let before = lines(&daemon.log());
    daemon
        .process()
        .signal(nix::sys::signal::Signal::SIGUSR1)
        .unwrap();
    assert!(meshguard::testbed::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || lines(&daemon.log()) > before
    ));
    counter(&daemon.log(), name).unwrap()
}

/// A minimal IPv4/UDP packet with a valid header checksum (UDP checksum 0: none).
fn udp_packet(src: &str, dst: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum: u32 = (0..20)
        .step_by(2)
        .map(|i| u32::from(u16::from_be_bytes([p[i], p[i + 1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dst_port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// A hand-driven peer identity in the test process: it holds node B's frontend key and
/// crafts whatever inner packets it likes, as a compromised peer node could.
struct RoguePeer {
    device: Device,
    tunnel: meshguard::proto::TunnelId,
    socket: UdpSocket,
    target: SocketAddr,
}

impl RoguePeer {
    fn sync(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while !self.device.has_session(self.tunnel) && Instant::now() < deadline {
            while let Some(t) = self.device.poll_transmit() {
                self.socket.send_to(&t.data, t.destination).unwrap();
            }
            if let Ok((n, from)) = self.socket.recv_from(&mut buf) {
                let r = self.device.receive(Instant::now(), from, &mut buf[..n]);
                assert!(!matches!(r, Received::Dropped(_)), "{r:?}");
            }
        }
        while let Some(t) = self.device.poll_transmit() {
            self.socket.send_to(&t.data, t.destination).unwrap();
        }
        assert!(
            self.device.has_session(self.tunnel),
            "rogue handshake failed"
        );
    }

    fn send(&mut self, packet: &[u8]) {
        let mut buf = vec![0u8; 16 + packet.len() + SEAL_TAILROOM];
        buf[16..16 + packet.len()].copy_from_slice(packet);
        match self
            .device
            .seal(Instant::now(), self.tunnel, &mut buf, packet.len())
        {
            Sealed::Send { destination, len } => {
                assert_eq!(destination, self.target);
                self.socket.send_to(&buf[..len], destination).unwrap();
            }
            other => panic!("rogue cannot send: {other:?}"),
        }
    }
}

#[test]
fn a_peer_cannot_spoof_sources_or_reach_another_identitys_address() {
    if !require_root() {
        return;
    }
    let ns_a = Netns::new("spa").unwrap();
    let ns_b = Netns::new("spb").unwrap();
    let _link = Link::new(&ns_a, "198.18.1.1/24", &ns_b, "198.18.1.2/24", None).unwrap();
    let (a, b) = (node_a(), node_b());
    let daemon_a = MeshguardNode::start(binary(), &ns_a, &a, &[PeerEntry::for_node(&b)]).unwrap();

    // Listeners on both of A's identity addresses.
    let listen = |addr: &str| {
        let s = ns_a.udp_bind(SocketAddr::new(ip(addr), 7000)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    };
    let payment_service = listen("10.10.1.1");
    let ledger = listen("10.10.1.2");

    // The rogue holds B's frontend key and talks only to A's payment-service identity.
    let frontend = PrivateKey::from_base64(&b.identities[0].private_key.to_base64()).unwrap();
    let socket = ns_b.udp_bind(b.listen).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let now = Instant::now();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut device = Device::new(
        DeviceConfig::default(),
        meshguard::proto::os_random(),
        now,
        unix,
    );
    let local = device.add_local(frontend.clone());
    let payment_key = a.identities[0].private_key.public_key();
    let tunnel = device.add_tunnel(now, local, *payment_key.as_bytes(), Some(a.listen), None);
    device.initiate(now, tunnel);
    let mut rogue = RoguePeer {
        device,
        tunnel,
        socket,
        target: a.listen,
    };
    rogue.sync();

    let mut buf = [0u8; 256];
    // The honest packet arrives: the session and the checks work.
    rogue.send(&udp_packet("10.10.2.1", "10.10.1.1", 7000, b"honest"));
    let (n, from) = payment_service
        .recv_from(&mut buf)
        .expect("honest packet arrives");
    assert_eq!((&buf[..n], from.ip()), (&b"honest"[..], ip("10.10.2.1")));

    // Source of another peer identity (checkout) inside the frontend's session: dropped.
    rogue.send(&udp_packet(
        "10.10.2.2",
        "10.10.1.1",
        7000,
        b"spoofed source",
    ));
    assert!(
        payment_service.recv_from(&mut buf).is_err(),
        "spoofed source delivered"
    );
    // Destination of another local identity (ledger) through payment-service's session.
    rogue.send(&udp_packet(
        "10.10.2.1",
        "10.10.1.2",
        7000,
        b"wrong identity",
    ));
    assert!(
        ledger.recv_from(&mut buf).is_err(),
        "crossed into another identity"
    );

    let log = daemon_a.stop().unwrap();
    assert_eq!(counter(&log, "spoofed_source"), Some(1), "{log}");
    assert_eq!(counter(&log, "wrong_destination"), Some(1), "{log}");
}
