//! The allow list against a peer who plays with the packets it sends, on two nodes with a
//! simulated clock and no sockets: each test is a regression test of an attack a review
//! found, with a control packet that shows the same path delivers what it should.

use meshguard::node::{Dropped, Ingress, NodeDrop};
use meshguard::policy::DefaultAction;
use meshguard::proto::TRANSPORT_HEADER_LEN;
use meshguard::testbed::fixtures::{ipv4_echo, ipv4_icmp, ipv4_udp, NodePair, A_INNER, B_INNER};

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
