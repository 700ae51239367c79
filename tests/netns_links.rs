//! Hostile networks: two meshguard nodes whose datagrams pass a userspace UDP relay
//! (there is no netem here), over an IPv6 underlay with 1500-byte links. What goes on
//! the wire is measured; impaired links (loss, duplicates, reordering) still deliver
//! transfers intact; thousands of recorded datagrams replayed reach the application at
//! most once; a node killed and restarted gets its traffic back within WireGuard's
//! timers; and a soak of mixed traffic with policy reloads and peer restarts fails no
//! transfer and grows no memory (`MESHGUARD_SOAK_SECS`, default 120; `scripts/soak.sh`
//! runs it for 30 minutes). Needs root.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshguard::testbed::{
    counter, ping, ping_stats, require_root, tcp_transfer_patient, wait_until, IdentitySpec,
    Impairment, Link, MeshguardNode, Netns, NodeSpec, PeerEntry, UdpRelay, ALLOW_ALL_POLICY,
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
    /// A's node and peer files, to rewrite.
    spec_a: NodeSpec,
    peers_a: Vec<PeerEntry>,
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
    let daemon_a = MeshguardNode::start(binary(), &ns_a, &a, &[via_relay(&b)]).unwrap();
    let daemon_b = MeshguardNode::start(binary(), &ns_b, &b, &[via_relay(&a)]).unwrap();
    Relayed {
        a: daemon_a,
        b: daemon_b,
        spec_a: a,
        peers_a: vec![via_relay(&b)],
        relay,
        _link: link,
        ns_a,
        ns_b,
    }
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshguard"))
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
        transfer_both_ways(&r, 30_000_000, &format!("{:.0} % loss", loss * 100.0));
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

/// A UDP receiver in a namespace that counts how often each numbered datagram (an
/// 8-byte little-endian number first) arrived.
struct NumberedReceiver {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<BTreeMap<u64, u32>>,
}

impl NumberedReceiver {
    fn start(ns: &Netns, at: SocketAddr) -> NumberedReceiver {
        let socket = ns.udp_bind(at).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = BTreeMap::new();
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    if n >= 8 {
                        let number = u64::from_le_bytes(buf[..8].try_into().unwrap());
                        *seen.entry(number).or_insert(0) += 1;
                    }
                }
            }
            seen
        });
        NumberedReceiver { stop, thread }
    }

    fn finish(self) -> BTreeMap<u64, u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Sends datagrams numbered `numbers` (200 bytes each) from `socket` to `to`, paced.
fn send_numbered(socket: &UdpSocket, to: SocketAddr, numbers: std::ops::Range<u64>) {
    let mut payload = [0u8; 200];
    for number in numbers {
        payload[..8].copy_from_slice(&number.to_le_bytes());
        socket.send_to(&payload, to).unwrap();
        if number % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// An on-path attacker records thousands of transport datagrams and sends them all to
/// the receiving node again, in order, reversed and in order once more: the application
/// behind the tunnel gets each payload at most once, and the tunnel keeps working.
#[test]
fn replayed_datagrams_reach_the_application_at_most_once() {
    if !require_root() {
        return;
    }
    let r = relayed(Impairment::default(), Impairment::default());
    assert!(ping(&r.ns_a, Some(ip(A_OVERLAY)), ip(B_OVERLAY), 2));
    let target = SocketAddr::new(ip(B_OVERLAY), 9000);
    let receiver = NumberedReceiver::start(&r.ns_b, target);
    let sender = r.ns_a.udp_bind(SocketAddr::new(ip(A_OVERLAY), 0)).unwrap();
    r.relay.record_a_to_b(5000);
    send_numbered(&sender, target, 0..4000);
    std::thread::sleep(Duration::from_millis(500));
    let recorded = r.relay.recorded();
    assert!(recorded >= 3000, "recorded {recorded} transport datagrams");
    let mut replayed = 0;
    for reversed in [false, true, false] {
        replayed += r.relay.replay_a_to_b(reversed).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // Fresh datagrams after the replay still pass.
    send_numbered(&sender, target, 4000..4100);
    std::thread::sleep(Duration::from_millis(500));
    let seen = receiver.finish();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let delivered = seen.len();
    eprintln!(
        "replay: {recorded} recorded, {replayed} replayed; {delivered} of 4100 payloads \
         delivered, {} more than once",
        twice.len()
    );
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(
        delivered >= 3900,
        "the datagrams themselves arrived: {delivered}"
    );
    assert!(
        (4000..4100).filter(|n| seen.contains_key(n)).count() >= 95,
        "the tunnel works after the replay"
    );
    let log = r.b.stop().unwrap();
    let refused = counter(&log, "replayed").unwrap() + counter(&log, "expired").unwrap_or(0);
    assert!(
        refused >= replayed as u64,
        "every replayed datagram was refused and counted ({refused} of {replayed}): {log}"
    );
}

/// Pings from A to B with one-second timeouts until one is answered; the time it took.
fn time_to_first_answer(r: &Relayed, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ping(&r.ns_a, Some(ip(A_OVERLAY)), ip(B_OVERLAY), 1) {
            return Some(start.elapsed());
        }
    }
    None
}

/// Either node killed (SIGKILL) and restarted while A pings B: traffic comes back
/// within WireGuard's timers. When B (the responder) restarts, A keeps sending on a
/// session B no longer has until 15 s pass without an answer (keepalive 10 s + rekey
/// timeout 5 s), then shakes hands again; when A (the sender) restarts, its first
/// packet starts a handshake.
#[test]
fn a_restarted_node_gets_its_traffic_back_within_wireguards_timers() {
    if !require_root() {
        return;
    }
    let mut r = relayed(Impairment::default(), Impairment::default());
    assert!(ping(&r.ns_a, Some(ip(A_OVERLAY)), ip(B_OVERLAY), 2));

    r.b.kill_and_restart(binary(), &r.ns_b).unwrap();
    let responder = time_to_first_answer(&r, Duration::from_secs(40));
    r.a.kill_and_restart(binary(), &r.ns_a).unwrap();
    let initiator = time_to_first_answer(&r, Duration::from_secs(40));
    eprintln!(
        "traffic back after a restart of the responder: {responder:.1?}; of the initiator: \
         {initiator:.1?} (from the restarted daemon being up to the first answered ping)"
    );
    let responder = responder.expect("traffic came back after B restarted");
    let initiator = initiator.expect("traffic came back after A restarted");
    // Within WireGuard's timers: A gives up on B's old session after 15 s without an
    // answer (keepalive 10 s + rekey timeout 5 s) and its new handshake is answered; a
    // restarted initiator needs no timer at all.
    assert!(
        responder <= Duration::from_secs(25),
        "after B restarted: {responder:?}"
    );
    assert!(
        initiator <= Duration::from_secs(5),
        "after A restarted: {initiator:?}"
    );
}

/// The flows a daemon tracks now.
fn tracked_flows(daemon: &MeshguardNode) -> usize {
    daemon.status(binary()).unwrap().node.flows.tracked
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A policy that allows everything, with a DENY on a port nothing uses whose name
/// changes, so each rewrite is a real reload.
fn churned_policy(round: usize) -> String {
    format!(
        "{ALLOW_ALL_POLICY}\n[[policy]]\nname = \"deny-discard-{round}\"\n\
         namespace = \"istio-system\"\naction = \"DENY\"\n\n[[policy.rules]]\n\
         [[policy.rules.to]]\nports = [\"9\"]\n"
    )
}

/// Mixed traffic through an impaired relay (1 % loss, duplicates, reordering) for
/// `MESHGUARD_SOAK_SECS` (default 120): TCP transfers both ways checked by SHA-256,
/// pings and numbered UDP, a policy reload on A every third round and a restart of B
/// every fourth. No transfer may fail, and A's resident memory, sampled along the way,
/// may grow by at most 4 MiB after the first third of the run: what grows is the flow
/// table, which keeps a finished TCP connection's flow until it idles out (2 h) and is
/// bounded (65,536 flows); the samples print the flows beside the memory.
#[test]
fn a_soak_of_mixed_traffic_reloads_and_restarts() {
    if !require_root() {
        return;
    }
    let seconds: u64 = std::env::var("MESHGUARD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let impaired = Impairment {
        loss: 0.01,
        duplicate: 0.01,
        reorder: 0.02,
        ..Impairment::default()
    };
    let mut r = relayed(impaired, impaired);
    let pid_a = r.a.process().pid();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let sample_every = Duration::from_secs((seconds / 12).clamp(5, 60));
    let mut next_sample = start;
    // (seconds, resident KiB, flows tracked): the flow table fills until TCP flows idle
    // out (2 h) or it is full (65,536), so it explains growth the samples show.
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let (mut rounds, mut transferred, mut reloads, mut restarts) = (0usize, 0u64, 0, 0);
    let (mut pings_sent, mut pings_answered) = (0u32, 0u32);
    while Instant::now() < deadline {
        rounds += 1;
        // TCP, alternating direction.
        let (server_ns, server, client_ns, client) = if rounds % 2 == 0 {
            (&r.ns_b, B_OVERLAY, &r.ns_a, A_OVERLAY)
        } else {
            (&r.ns_a, A_OVERLAY, &r.ns_b, B_OVERLAY)
        };
        let report = tcp_transfer_patient(
            server_ns,
            SocketAddr::new(ip(server), 0),
            client_ns,
            Some(ip(client)),
            4_000_000,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("round {rounds}: {client} -> {server}: {e}"));
        assert!(report.is_intact(), "round {rounds}: {report}");
        transferred += 4_000_000;
        // Ping and numbered UDP.
        let stats = ping_stats(&r.ns_a, Some(ip(A_OVERLAY)), ip(B_OVERLAY), 5).unwrap();
        pings_sent += stats.transmitted;
        pings_answered += stats.received;
        let target = SocketAddr::new(ip(B_OVERLAY), 9000 + (rounds % 100) as u16);
        let receiver = NumberedReceiver::start(&r.ns_b, target);
        let sender = r.ns_a.udp_bind(SocketAddr::new(ip(A_OVERLAY), 0)).unwrap();
        send_numbered(&sender, target, 0..500);
        std::thread::sleep(Duration::from_millis(200));
        let seen = receiver.finish();
        assert!(
            seen.values().all(|n| *n == 1),
            "round {rounds}: a UDP datagram arrived twice"
        );
        assert!(
            seen.len() >= 450,
            "round {rounds}: {} of 500 UDP",
            seen.len()
        );

        if rounds % 3 == 0 {
            let before = r.a.reloads();
            r.spec_a.policy = churned_policy(rounds);
            r.a.rewrite(&r.spec_a, &r.peers_a).unwrap();
            let reloaded = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                r.a.reloads() > before
            });
            assert!(
                reloaded,
                "round {rounds}: the policy reload applied\n{}",
                r.a.log()
            );
            reloads += 1;
        }
        if rounds % 4 == 0 {
            r.b.kill_and_restart(binary(), &r.ns_b).unwrap();
            // B speaks first, so the pair need not wait for A's timers.
            let back = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
                ping(&r.ns_b, Some(ip(B_OVERLAY)), ip(A_OVERLAY), 1)
            });
            assert!(back, "round {rounds}: B is back after its restart");
            restarts += 1;
        }
        if Instant::now() >= next_sample {
            samples.push((
                start.elapsed().as_secs(),
                rss_kib(pid_a),
                tracked_flows(&r.a),
            ));
            next_sample += sample_every;
        }
    }
    samples.push((
        start.elapsed().as_secs(),
        rss_kib(pid_a),
        tracked_flows(&r.a),
    ));
    eprintln!(
        "soak: {seconds} s, {rounds} rounds, {} MB of TCP intact, ping {pings_answered}/{pings_sent}, \
         {reloads} policy reloads, {restarts} restarts of B; A (s, RSS KiB, flows): {samples:?}",
        transferred / 1_000_000
    );
    assert!(restarts >= 1 && reloads >= 1, "the soak ran its churn");
    // After warm-up (the first third), resident memory stays within 4 MiB of where it
    // was: buffers and tables are sized at start and bounded.
    let warm = samples
        .iter()
        .find(|(at, _, _)| *at >= seconds / 3)
        .copied()
        .unwrap_or(*samples.last().unwrap());
    let peak = samples
        .iter()
        .filter(|(at, _, _)| *at >= warm.0)
        .map(|(_, kib, _)| *kib)
        .max()
        .unwrap();
    assert!(
        peak <= warm.1 + 4096,
        "A's memory grew after warm-up: {samples:?}"
    );
    assert!(r.a.process().is_running(), "{}", r.a.log());
}
