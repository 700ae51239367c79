//! Garbage on the daemon's UDP port while a transfer runs: random, truncated, oversized
//! and replayed datagrams, and initiations made for other keys. The daemon stays up, the
//! transfer completes intact, nothing is answered, and the drops are counted. Needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshguard::identity::PrivateKey;
use meshguard::proto::REPLAY_WINDOW as WINDOW;
use meshguard::proto::{Device, DeviceConfig};
use meshguard::testbed::{
    counter, require_root, tcp_transfer, IdentitySpec, Link, MeshguardNode, Netns, NodeSpec,
    PeerEntry, ALLOW_ALL_POLICY,
};

const TRANSFER_BYTES: usize = 20 * 1000 * 1000;

/// What the relay saw: a sample of datagrams, and per receiver index the highest
/// transport counter sent towards A.
#[derive(Default)]
struct Relayed {
    /// (sent towards A, datagram)
    datagrams: Vec<(bool, Vec<u8>)>,
    newest_counter_to_a: HashMap<u32, u64>,
}

type Recorded = Arc<Mutex<Relayed>>;

fn receiver_index(d: &[u8]) -> u32 {
    u32::from_le_bytes(d[4..8].try_into().unwrap())
}

fn transport_counter(d: &[u8]) -> u64 {
    u64::from_le_bytes(d[8..16].try_into().unwrap())
}

impl Relayed {
    /// Datagrams that A must refuse: everything it sent itself, handshakes, and transport
    /// messages towards A whose counter is already behind A's replay window. (A recent one
    /// that the network lost on the way would be a legitimate first delivery, which
    /// WireGuard accepts from any address, so those are not replayed.)
    /// Returns (stale transport messages of B's, everything else that is safe to replay).
    fn replayable(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut stale = Vec::new();
        let mut other = Vec::new();
        for (to_a, d) in &self.datagrams {
            if !*to_a || d[0] != 4 {
                other.push(d.clone());
            } else if self
                .newest_counter_to_a
                .get(&receiver_index(d))
                .is_some_and(|&newest| transport_counter(d) + WINDOW + 64 < newest)
            {
                stale.push(d.clone());
            }
        }
        (stale, other)
    }
}

/// Forwards datagrams between A and B through one socket, recording a sample of them for
/// the attacker to replay and truncate.
fn relay(socket: UdpSocket, a: SocketAddr, b: SocketAddr, record: Recorded, stop: Arc<AtomicBool>) {
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let to = if from == a { b } else { a };
        let _ = socket.send_to(&buf[..n], to);
        seen += 1;
        let to_a = to == a;
        let mut r = record.lock().unwrap();
        if to_a && n >= 32 && buf[0] == 4 {
            let newest = r
                .newest_counter_to_a
                .entry(receiver_index(&buf))
                .or_default();
            *newest = (*newest).max(transport_counter(&buf));
        }
        // Handshakes always; transport messages now and then, B's more often.
        let sample = buf[0] != 4 || seen.is_multiple_of(if to_a { 7 } else { 97 });
        if sample && r.datagrams.len() < 4000 {
            r.datagrams.push((to_a, buf[..n].to_vec()));
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A handshake initiation from a key the target does not know (`target_key` is the
/// target's real public key) or addressed to a key that is not the target's at all.
fn foreign_initiation(target: SocketAddr, responder_key: [u8; 32]) -> Vec<u8> {
    let now = Instant::now();
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut device = Device::new(
        DeviceConfig::default(),
        meshguard::proto::os_random(),
        now,
        unix,
    );
    let local = device.add_local(PrivateKey::generate());
    let tunnel = device.add_tunnel(now, local, responder_key, Some(target), None);
    device.initiate(now, tunnel);
    device.poll_transmit().unwrap().data
}

#[derive(Default, Debug)]
struct Sent {
    junk: u64,
    truncated: u64,
    oversized: u64,
    replayed: u64,
    unknown_key: u64,
    wrong_key: u64,
    answers: u64,
}

fn attack(
    socket: UdpSocket,
    target: SocketAddr,
    target_key: [u8; 32],
    record: Recorded,
    stop: Arc<AtomicBool>,
) -> Sent {
    socket.set_nonblocking(true).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut sent = Sent::default();
    let mut answer = [0u8; 65536];
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let ((stale, old), index_at_a) = {
            let r = record.lock().unwrap();
            (r.replayable(), r.newest_counter_to_a.keys().next().copied())
        };
        let mut datagrams = Vec::new();
        // Random bytes, half of them dressed as WireGuard messages.
        let junk_len = rng.below(1500);
        let mut junk = rng.bytes(junk_len);
        if junk.len() >= 4 && rng.next().is_multiple_of(2) {
            junk[0] = 1 + rng.below(4) as u8;
            junk[1..4].fill(0);
        }
        datagrams.push(junk);
        // And an empty datagram, the shortest garbage there is.
        datagrams.push(Vec::new());
        sent.junk += 2;
        if !stale.is_empty() {
            datagrams.push(stale[rng.below(stale.len() as u64)].clone());
            sent.replayed += 1;
        }
        if !old.is_empty() {
            let pick = &old[rng.below(old.len() as u64)];
            datagrams.push(pick.clone());
            sent.replayed += 1;
            let cut = rng.below(pick.len() as u64);
            datagrams.push(pick[..cut].to_vec());
            sent.truncated += 1;
        }
        if round.is_multiple_of(10) {
            // Oversized transport messages, one near the UDP limit.
            let len = if round.is_multiple_of(100) {
                60_000
            } else {
                1500 + rng.below(7500)
            };
            let mut big = rng.bytes(len);
            big[..4].copy_from_slice(&[4, 0, 0, 0]);
            // A receiver index A really holds: the forgery reaches the AEAD check.
            if let Some(index) = index_at_a {
                big[4..8].copy_from_slice(&index.to_le_bytes());
            }
            datagrams.push(big);
            sent.oversized += 1;
        }
        if round.is_multiple_of(20) {
            // Well below the load threshold, so no cookie reply is ever due.
            datagrams.push(foreign_initiation(target, target_key));
            sent.unknown_key += 1;
            datagrams.push(foreign_initiation(
                target,
                rng.bytes(32).try_into().unwrap(),
            ));
            sent.wrong_key += 1;
        }
        for d in &datagrams {
            let _ = socket.send_to(d, target);
        }
        while socket.recv_from(&mut answer).is_ok() {
            sent.answers += 1;
        }
        thread::sleep(Duration::from_millis(2));
    }
    // Anything still on its way back.
    thread::sleep(Duration::from_millis(500));
    while socket.recv_from(&mut answer).is_ok() {
        sent.answers += 1;
    }
    sent
}

#[test]
fn garbage_is_dropped_counted_and_never_answered() {
    if !require_root() {
        return;
    }
    let ns_a = Netns::new("bia").unwrap();
    let ns_b = Netns::new("bib").unwrap();
    let ns_x = Netns::new("bix").unwrap();
    let _link = Link::new(&ns_a, "198.18.3.1/24", &ns_b, "198.18.3.2/24", None).unwrap();
    let _attacker_link = Link::new(&ns_x, "198.18.4.2/24", &ns_a, "198.18.4.1/24", None).unwrap();
    let a = NodeSpec {
        name: "node-a".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: "198.18.3.1:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/a/sa/server",
            &["10.30.1.1/32"],
        )],
    };
    let b = NodeSpec {
        name: "node-b".into(),
        policy: ALLOW_ALL_POLICY.into(),
        offload: true,
        workers: None,
        listen: "198.18.3.2:51820".parse().unwrap(),
        identities: vec![IdentitySpec::new(
            "cluster.local/ns/b/sa/client",
            &["10.30.2.1/32"],
        )],
    };
    let relay_addr: SocketAddr = "198.18.3.2:51999".parse().unwrap();
    // A reaches B only through the relay; B only answers.
    let mut b_as_seen_by_a = PeerEntry::for_node(&b);
    b_as_seen_by_a.endpoint = Some(relay_addr);
    let mut a_as_seen_by_b = PeerEntry::for_node(&a);
    a_as_seen_by_b.endpoint = None;
    let binary = Path::new(env!("CARGO_BIN_EXE_meshguard"));
    let daemon_a = MeshguardNode::start(binary, &ns_a, &a, &[b_as_seen_by_a]).unwrap();
    let daemon_b = MeshguardNode::start(binary, &ns_b, &b, &[a_as_seen_by_b]).unwrap();

    let record: Recorded = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let relay_socket = ns_b.udp_bind(relay_addr).unwrap();
    let relay_thread = {
        let (record, stop) = (record.clone(), stop.clone());
        thread::spawn(move || relay(relay_socket, a.listen, b.listen, record, stop))
    };
    let attacker = ns_x.udp_bind("198.18.4.2:0".parse().unwrap()).unwrap();
    ns_x.ip(["route", "add", "198.18.3.0/24", "via", "198.18.4.1"])
        .unwrap();
    let attack_stop = Arc::new(AtomicBool::new(false));
    let target_key = *a.identities[0].private_key.public_key().as_bytes();
    let attack_thread = {
        let (record, stop) = (record.clone(), attack_stop.clone());
        let target = a.listen;
        thread::spawn(move || attack(attacker, target, target_key, record, stop))
    };

    let b_server = SocketAddr::new("10.30.2.1".parse::<IpAddr>().unwrap(), 0);
    let a_client = Some("10.30.1.1".parse::<IpAddr>().unwrap());
    // Two transfers, so the attacker has recorded traffic to replay during the second:
    // first A to B (A knows where B is), then B to A, so that many of B's transport
    // counters fall behind A's replay window and can be replayed safely.
    let a_server = SocketAddr::new("10.30.1.1".parse::<IpAddr>().unwrap(), 0);
    let b_client = Some("10.30.2.1".parse::<IpAddr>().unwrap());
    let reports = [
        tcp_transfer(&ns_b, b_server, &ns_a, a_client, TRANSFER_BYTES),
        tcp_transfer(&ns_a, a_server, &ns_b, b_client, TRANSFER_BYTES),
    ]
    .map(|r| r.unwrap_or_else(|e| panic!("transfer under attack: {e}\n{}", daemon_a.log())));
    attack_stop.store(true, Ordering::Relaxed);
    let sent = attack_thread.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    relay_thread.join().unwrap();
    eprintln!("attack: {sent:?}");
    for report in &reports {
        assert!(report.is_intact(), "{report}");
    }

    assert!(
        daemon_a.process().is_running(),
        "daemon died:\n{}",
        daemon_a.log()
    );
    assert_eq!(
        sent.answers, 0,
        "the daemon answered an unauthenticated datagram"
    );
    assert!(sent.replayed > 0 && sent.truncated > 0 && sent.oversized > 0);
    assert!(sent.unknown_key > 0 && sent.wrong_key > 0);
    let log = daemon_a.stop().unwrap();
    daemon_b.stop().unwrap();
    let count = |name: &str| counter(&log, name).unwrap_or_else(|| panic!("{name} in\n{log}"));
    for name in ["malformed", "unknown_peer", "bad_mac1", "unknown_index"] {
        assert!(count(name) > 0, "{name} not counted:\n{log}");
    }
    assert!(count("replayed") > 0, "{log}");
    assert!(count("forged") > 0, "{log}");
    // The kernel may drop a datagram when the socket buffer is full, so no equality here.
    assert!(count("unknown_peer") <= sent.unknown_key, "{log}");
    let total = sent.junk
        + sent.truncated
        + sent.oversized
        + sent.replayed
        + sent.unknown_key
        + sent.wrong_key;
    assert!(count("network_drops") <= total);
    assert_eq!(count("cookie_replies_sent"), 0);
}
