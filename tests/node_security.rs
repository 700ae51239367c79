//! The allow list against a peer who plays with the packets it sends, on two nodes with a
//! simulated clock and no sockets: each test is a regression test of an attack a review
//! found, with a control packet that shows the same path delivers what it should.

use std::path::Path;

use meshguard::node::{Dropped, Ingress, NodeDrop};
use meshguard::policy::{parse_toml, DefaultAction};
use meshguard::proto::TRANSPORT_HEADER_LEN;
use meshguard::testbed::fixtures::{
    destination_options, fragment_header, ipv4, ipv4_echo, ipv4_icmp, ipv4_udp, ipv6, tcp, udp,
    Extension, NodePair, A_INNER, A_INNER6, B_INNER, B_INNER6, DENY_UDP_9999_POLICY,
};

const UDP: u8 = 17;
const TCP: u8 = 6;

/// A's allow list: everything but UDP port 9999 from B (default allow, one DENY rule).
fn deny_9999(pair: &mut NodePair) {
    pair.a
        .set_policy(&parse_toml(DENY_UDP_9999_POLICY, Path::new("deny.toml")).unwrap());
}

/// An IPv6 UDP packet from B to A on `port` behind `extensions`.
fn udp6_to_a(extensions: &[Extension], port: u16) -> (Vec<u8>, usize) {
    ipv6(
        B_INNER6,
        A_INNER6,
        extensions,
        UDP,
        &udp(40000, port, &[7; 64]),
    )
}

/// A second identity on node B, another peer identity as far as A is concerned.
const B2_INNER: [u8; 4] = [10, 2, 0, 2];

fn denied() -> Ingress {
    Ingress::Dropped(Dropped::Node(NodeDrop::PolicyDenied))
}

fn delivered(ingress: &Ingress) -> bool {
    matches!(ingress, Ingress::Deliver { .. })
}

/// While A pings B with identifier X, B's echo *requests* with identifier X are new
/// inbound traffic, not replies: A's deny-all list drops them.
#[test]
fn an_echo_request_is_not_taken_for_the_reply_to_ours() {
    let mut pair = NodePair::with_defaults(DefaultAction::Deny, DefaultAction::Allow);
    let (request, len) = ipv4_echo(A_INNER, B_INNER, true, 0x4242);
    assert!(delivered(&pair.a_to_b(request, len)), "A's ping reaches B");
    let (reply, len) = ipv4_echo(B_INNER, A_INNER, false, 0x4242);
    assert!(
        delivered(&pair.b_to_a(reply, len)),
        "control: B's reply comes back"
    );
    let (request, len) = ipv4_echo(B_INNER, A_INNER, true, 0x4242);
    assert_eq!(
        pair.b_to_a(request, len),
        denied(),
        "B's own ping is new traffic"
    );
}

/// An ICMP error quoting a packet A sent to identity B1 belongs to A's flow with B1; the
/// same error sent by identity B2 (denied all ICMP by A) must not pass as related, or a
/// peer could lower A's path MTU towards other peers or break their flows.
#[test]
fn an_icmp_error_about_another_peers_flow_is_not_related() {
    let mut pair = NodePair::with_b_identities(
        DefaultAction::Deny,
        DefaultAction::Allow,
        &[B_INNER, B2_INNER],
    )
    .connect();
    // `connect` sent UDP A:40000 -> B1:5201: A tracks that flow. The error quotes it.
    let sent = ipv4_udp(A_INNER, B_INNER, 64);
    let quoted = &sent[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + 28];
    let unreachable = |from: [u8; 4]| ipv4_icmp(from, A_INNER, (3, 3), [0; 4], quoted);
    let (error, len) = unreachable(B_INNER);
    assert!(
        delivered(&pair.b_to_a(error, len)),
        "control: B1's error about its own flow"
    );
    let (error, len) = unreachable(B2_INNER);
    assert_eq!(pair.b_to_a(error, len), denied(), "B2 reports on B1's flow");
    // "Fragmentation needed" from B2 about the flow to B1: the same.
    let (error, len) = ipv4_icmp(B2_INNER, A_INNER, (3, 4), [0, 0, 2, 0x40], quoted);
    assert_eq!(pair.b_to_a(error, len), denied());
}

/// Extension headers before UDP must not hide its port: a DENY on the port applies
/// whatever Destination Options or Hop-by-Hop headers come first.
#[test]
fn ipv6_extension_headers_do_not_hide_a_denied_port() {
    let mut pair = NodePair::with_defaults(DefaultAction::Allow, DefaultAction::Allow);
    deny_9999(&mut pair);
    let (plain, len) = udp6_to_a(&[], 9999);
    assert_eq!(pair.b_to_a(plain, len), denied(), "control: plain UDP 9999");
    let (hidden, len) = udp6_to_a(&[destination_options()], 9999);
    assert_eq!(
        pair.b_to_a(hidden, len),
        denied(),
        "behind Destination Options"
    );
    let hop_by_hop = (0, destination_options().1);
    let (hidden, len) = udp6_to_a(&[hop_by_hop, destination_options()], 9999);
    assert_eq!(pair.b_to_a(hidden, len), denied(), "behind two headers");
    let (allowed, len) = udp6_to_a(&[destination_options()], 8080);
    assert!(
        delivered(&pair.b_to_a(allowed, len)),
        "control: another port passes"
    );
}

/// A chain of extension headers too long to walk hides which protocol and port follow:
/// the packet counts as "port unknown" for every protocol, so it matches DENY port
/// conditions (and no ALLOW port condition).
#[test]
fn an_extension_chain_too_long_to_walk_fails_closed() {
    let mut pair = NodePair::with_defaults(DefaultAction::Allow, DefaultAction::Allow);
    deny_9999(&mut pair);
    let chain: Vec<Extension> = (0..12).map(|_| destination_options()).collect();
    let (long, len) = udp6_to_a(&chain, 8080);
    assert_eq!(pair.b_to_a(long, len), denied());
    let (short, len) = udp6_to_a(&chain[..2], 8080);
    assert!(
        delivered(&pair.b_to_a(short, len)),
        "control: a short chain"
    );
}

/// A first IPv4 fragment too small to hold the TCP header (a "tiny fragment") has no
/// port that can be trusted: it matches DENY port conditions.
#[test]
fn a_tiny_first_fragment_fails_closed() {
    let mut pair = NodePair::with_defaults(DefaultAction::Allow, DefaultAction::Allow);
    let policy = "[[policy]]\nname = \"no-22\"\nnamespace = \"bench\"\naction = \"DENY\"\n\
                  [[policy.rules]]\n[[policy.rules.to]]\nports = [\"22/tcp\"]\n";
    pair.a
        .set_policy(&parse_toml(policy, Path::new("deny.toml")).unwrap());
    let header = tcp(40000, 22, 0x02, &[]);
    let (tiny, len) = ipv4(B_INNER, A_INNER, TCP, (5, 0, true), &header[..8]);
    assert_eq!(pair.b_to_a(tiny, len), denied());
    let (whole, len) = ipv4(
        B_INNER,
        A_INNER,
        TCP,
        (6, 0, false),
        &tcp(40000, 80, 0x02, &[]),
    );
    assert!(delivered(&pair.b_to_a(whole, len)), "control: port 80");
}

/// The later fragments of a datagram whose first fragment was let in (here: a reply on a
/// flow A opened) pass; fragments of any other datagram do not, and neither does a later
/// fragment that would overlap the transport header of the first.
#[test]
fn later_fragments_follow_their_admitted_first_fragment() {
    // A lets nothing in by default; `connect` opens UDP A:40000 -> B:5201.
    let mut pair = NodePair::with_defaults(DefaultAction::Deny, DefaultAction::Allow).connect();
    let reply = udp(5201, 40000, &[1; 1000]);
    let (first, len) = ipv4(B_INNER, A_INNER, UDP, (77, 0, true), &reply);
    assert!(
        delivered(&pair.b_to_a(first, len)),
        "first fragment: a reply"
    );
    let (later, len) = ipv4(B_INNER, A_INNER, UDP, (77, 126, false), &[2; 1000]);
    assert!(
        delivered(&pair.b_to_a(later, len)),
        "the rest of that datagram"
    );
    let (stranger, len) = ipv4(B_INNER, A_INNER, UDP, (78, 126, false), &[2; 1000]);
    assert_eq!(
        pair.b_to_a(stranger, len),
        denied(),
        "another datagram's fragment"
    );

    // TCP: a SYN A sent, and a fragmented answer; a fragment at offset 8 would rewrite
    // the flags of the TCP header the first fragment carried.
    let (syn, len) = ipv4(
        A_INNER,
        B_INNER,
        TCP,
        (1, 0, false),
        &tcp(40001, 443, 0x02, &[]),
    );
    assert!(delivered(&pair.a_to_b(syn, len)));
    let answer = tcp(443, 40001, 0x12, &[3; 64]);
    let (first, len) = ipv4(B_INNER, A_INNER, TCP, (90, 0, true), &answer);
    assert!(
        delivered(&pair.b_to_a(first, len)),
        "first fragment of the answer"
    );
    let (overlap, len) = ipv4(B_INNER, A_INNER, TCP, (90, 1, false), &[0xff; 64]);
    assert!(
        !delivered(&pair.b_to_a(overlap, len)),
        "overlaps the TCP header"
    );
    let (later, len) = ipv4(B_INNER, A_INNER, TCP, (90, 11, false), &[4; 64]);
    assert!(
        delivered(&pair.b_to_a(later, len)),
        "a later fragment beyond the header"
    );
}

/// The same for IPv6, whose fragments carry a Fragment header.
#[test]
fn later_ipv6_fragments_follow_their_admitted_first_fragment() {
    let mut pair = NodePair::with_defaults(DefaultAction::Deny, DefaultAction::Allow);
    let (out, len) = ipv6(A_INNER6, B_INNER6, &[], UDP, &udp(40000, 5201, &[0; 16]));
    assert!(
        delivered(&pair.a_to_b(out, len)),
        "A opens a UDP flow over IPv6"
    );
    let reply = udp(5201, 40000, &[1; 1000]);
    let (first, len) = ipv6(
        B_INNER6,
        A_INNER6,
        &[fragment_header(0, true, 9)],
        UDP,
        &reply,
    );
    assert!(
        delivered(&pair.b_to_a(first, len)),
        "first fragment: a reply"
    );
    let (later, len) = ipv6(
        B_INNER6,
        A_INNER6,
        &[fragment_header(126, false, 9)],
        UDP,
        &[2; 900],
    );
    assert!(
        delivered(&pair.b_to_a(later, len)),
        "the rest of that datagram"
    );
    let (stranger, len) = ipv6(
        B_INNER6,
        A_INNER6,
        &[fragment_header(126, false, 10)],
        UDP,
        &[2; 900],
    );
    assert_eq!(
        pair.b_to_a(stranger, len),
        denied(),
        "another datagram's fragment"
    );
}

/// B's first identity may open anything on A; the rest of B may not.
fn allow_server_only(pair: &mut NodePair) {
    let policy = r#"
[[policy]]
name = "server-only"
namespace = "bench"
[[policy.rules]]
[[policy.rules.from]]
principals = ["cluster.local/ns/bench/sa/server"]
"#;
    pair.a
        .set_policy(&parse_toml(policy, Path::new("allow.toml")).unwrap());
}

/// One peer identity opening flow after flow cannot push another identity's flows out
/// of A's flow table: the flood evicts its own flows first, so the reply to a flow A's
/// workload opened towards B2 still comes back.
#[test]
fn a_peer_flooding_the_flow_table_evicts_its_own_flows_first() {
    let mut pair = NodePair::with_b_identities(
        DefaultAction::Deny,
        DefaultAction::Allow,
        &[B_INNER, B2_INNER],
    );
    allow_server_only(&mut pair);
    let (out, len) = ipv4(
        A_INNER,
        B2_INNER,
        UDP,
        (1, 0, false),
        &udp(40000, 5201, &[0; 8]),
    );
    assert!(
        delivered(&pair.a_to_b(out, len)),
        "A's workload talks to B2"
    );
    // B1 opens more flows than the table holds (65,536).
    for n in 0..70_000u32 {
        let (source_port, destination_port) =
            (1024 + (n % 60_000) as u16, 1000 + (n / 60_000) as u16);
        let (flood, len) = ipv4(
            B_INNER,
            A_INNER,
            UDP,
            (2, 0, false),
            &udp(source_port, destination_port, &[]),
        );
        assert!(delivered(&pair.b_to_a(flood, len)), "B1 may open flows");
    }
    let (reply, len) = ipv4(
        B2_INNER,
        A_INNER,
        UDP,
        (3, 0, false),
        &udp(5201, 40000, &[1; 8]),
    );
    assert!(
        delivered(&pair.b_to_a(reply, len)),
        "B2's reply to A's flow still comes back: {}",
        pair.a.counters()
    );
}

/// A UDP flow B opened and a reload revoked stays shut after it leaves the flow table:
/// when A's workload answers on it again, the answer does not reopen it for B.
#[test]
fn a_revoked_udp_flow_is_not_reopened_by_a_local_reply() {
    let mut pair = NodePair::with_defaults(DefaultAction::Allow, DefaultAction::Allow);
    let (query, len) = ipv4(
        B_INNER,
        A_INNER,
        UDP,
        (1, 0, false),
        &udp(5353, 53, &[0; 8]),
    );
    assert!(delivered(&pair.b_to_a(query, len)), "B opens UDP to A:53");
    // A reload lets nothing from B in: the flow is revoked.
    let nothing = "[[policy]]\nname = \"nothing\"\nnamespace = \"bench\"\n";
    let revoked = pair
        .a
        .set_policy(&parse_toml(nothing, Path::new("nothing.toml")).unwrap());
    assert_eq!(revoked, 1);
    // The revoked flow idles out of the table (B stays quiet).
    pair.now += std::time::Duration::from_secs(200);
    pair.a.handle_timeout(pair.now);
    // A's DNS server answers late; B's next query must still be refused.
    let (answer, len) = ipv4(
        A_INNER,
        B_INNER,
        UDP,
        (2, 0, false),
        &udp(53, 5353, &[1; 8]),
    );
    pair.a_to_b(answer, len);
    let (query, len) = ipv4(
        B_INNER,
        A_INNER,
        UDP,
        (3, 0, false),
        &udp(5353, 53, &[0; 8]),
    );
    assert!(
        !delivered(&pair.b_to_a(query, len)),
        "the late answer reopened a revoked flow"
    );
}
