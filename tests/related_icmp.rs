//! ICMP errors at ingress: an error about a packet of a tracked flow reaches the workload
//! that sent the packet even when the allow list lets no ICMP in; any other ICMP error
//! is judged by the allow list like any ICMP. Two nodes on a simulated clock, no sockets.

use meshguard::node::{Dropped, Egress, Ingress, NodeDrop};
use meshguard::testbed::fixtures::{buffer, ipv4_udp, NodePair, A_INNER, B_INNER};
use std::path::Path;

use meshguard::policy::{parse_toml, DefaultAction};
use meshguard::proto::TRANSPORT_HEADER_LEN;

/// Bytes of the offending packet an ICMPv4 error quotes here: its IP header and 8 more.
const QUOTED: usize = 28;

/// An ICMPv4 error (`icmp_type`, code 3) from `from` to `to` quoting the start of
/// `packet`, laid out for sealing in place.
fn icmp_error(icmp_type: u8, from: [u8; 4], to: [u8; 4], packet: &[u8]) -> (Vec<u8>, usize) {
    let total = 20 + 8 + QUOTED;
    let mut buf = buffer(total);
    let p = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total];
    p[..28].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&from);
    p[16..20].copy_from_slice(&to);
    p[20] = icmp_type;
    p[21] = 3;
    p[28..].copy_from_slice(&packet[..QUOTED]);
    (buf, total)
}

/// Seals `packet` on B and hands the datagram to A: what A makes of it.
fn from_b(pair: &mut NodePair, (mut buf, len): (Vec<u8>, usize)) -> Ingress {
    let Egress::Send { len, .. } = pair.b.egress(pair.now, &mut buf, len) else {
        panic!("B has a session and sends at once");
    };
    pair.a.ingress(pair.now, pair.b_addr, &mut buf[..len])
}

fn denied() -> Ingress {
    Ingress::Dropped(Dropped::Node(NodeDrop::PolicyDenied))
}

#[test]
fn an_error_about_a_tracked_flow_passes_an_allow_list_without_icmp() {
    // A lets nothing in by default; B lets everything in.
    let mut pair = NodePair::with_defaults(DefaultAction::Deny, DefaultAction::Allow).connect();
    // `connect` sent UDP 10.1.0.1:40000 -> 10.2.0.1:5201 from A: A tracks that flow.
    let sent = ipv4_udp(A_INNER, B_INNER, 64);
    let sent = &sent[TRANSPORT_HEADER_LEN..];

    let unreachable = icmp_error(3, B_INNER, A_INNER, sent);
    assert!(
        matches!(from_b(&mut pair, unreachable), Ingress::Deliver { .. }),
        "port unreachable for A's own flow"
    );
    let time_exceeded = icmp_error(11, B_INNER, A_INNER, sent);
    assert!(matches!(
        from_b(&mut pair, time_exceeded),
        Ingress::Deliver { .. }
    ));

    // The same error about a flow A never opened (another destination port) is ICMP
    // like any other: the allow list denies it.
    let mut other_port = sent.to_vec();
    other_port[22..24].copy_from_slice(&5202u16.to_be_bytes());
    assert_eq!(
        from_b(&mut pair, icmp_error(3, B_INNER, A_INNER, &other_port)),
        denied()
    );

    // An error quoting a packet that A's identity did not send (its source is not the
    // error's destination) is not related either, even though the ports match.
    let mut not_ours = sent.to_vec();
    not_ours[12..16].copy_from_slice(&[10, 1, 0, 9]);
    assert_eq!(
        from_b(&mut pair, icmp_error(3, B_INNER, A_INNER, &not_ours)),
        denied()
    );

    // An echo request is no error: denied, as before.
    let (mut echo, len) = icmp_error(8, B_INNER, A_INNER, sent);
    echo[TRANSPORT_HEADER_LEN + 21] = 0;
    assert_eq!(from_b(&mut pair, (echo, len)), denied());
}

#[test]
fn an_error_about_a_revoked_flow_is_dropped() {
    // A opens UDP to B; B's default lets it in and tracks it as allowed.
    let mut pair = NodePair::with_defaults(DefaultAction::Deny, DefaultAction::Allow).connect();
    // B's reply leg of that flow, as B would send it, quoted in an error from A.
    let reply = ipv4_udp(B_INNER, A_INNER, 64);
    let mut reply = reply[TRANSPORT_HEADER_LEN..].to_vec();
    reply[20..22].copy_from_slice(&5201u16.to_be_bytes());
    reply[22..24].copy_from_slice(&40000u16.to_be_bytes());
    let from_a = |pair: &mut NodePair| {
        let (mut buf, len) = icmp_error(3, A_INNER, B_INNER, &reply);
        let Egress::Send { len, .. } = pair.a.egress(pair.now, &mut buf, len) else {
            panic!("A has a session and sends at once");
        };
        pair.b.ingress(pair.now, pair.a_addr, &mut buf[..len])
    };
    assert!(matches!(from_a(&mut pair), Ingress::Deliver { .. }));

    // An allow-nothing policy for B's namespace revokes the flow; the error goes with it.
    let nothing = "[[policy]]\nname = \"nothing\"\nnamespace = \"bench\"\naction = \"ALLOW\"\n";
    let policy = parse_toml(nothing, Path::new("nothing.toml")).unwrap();
    assert_eq!(
        pair.b.set_policy(&policy),
        1,
        "the flow A opened is revoked"
    );
    assert_eq!(
        from_a(&mut pair),
        Ingress::Dropped(Dropped::Node(NodeDrop::FlowRevoked))
    );
}
