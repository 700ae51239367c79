//! Any IP packet sent through a real session from node B to node A, whose allow list
//! denies UDP port 9999: the node's packet parser (IPv4 and IPv6, extension headers,
//! fragments, ICMP quotes), routing checks and the stateful allow list all see it. The
//! addresses are set to B's and A's so that it gets that far. Nothing may panic, and a
//! UDP datagram to port 9999 must never be delivered.
//!
//! The pair is made once per 10,000 inputs (a handshake costs more than many packets).
#![no_main]

use std::cell::RefCell;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshguard::node::{Egress, Ingress};
use meshguard::policy::parse_toml;
use meshguard::proto::{SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
use meshguard::testbed::fixtures::{
    NodePair, A_INNER, A_INNER6, B_INNER, B_INNER6, DENY_UDP_9999_POLICY,
};

thread_local! {
    static PAIR: RefCell<(u32, Option<NodePair>)> = const { RefCell::new((0, None)) };
}

fn fresh_pair() -> NodePair {
    let mut pair = NodePair::connected();
    pair.a
        .set_policy(&parse_toml(DENY_UDP_9999_POLICY, Path::new("deny.toml")).expect("policy"));
    pair
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 1400 {
        return;
    }
    PAIR.with(|cell| {
        let (uses, pair) = &mut *cell.borrow_mut();
        *uses += 1;
        if pair.is_none() || *uses % 10_000 == 0 {
            *pair = Some(fresh_pair());
        }
        send(pair.as_mut().expect("made above"), data);
    });
});

fn send(pair: &mut NodePair, data: &[u8]) {
    let mut packet = data.to_vec();
    match packet[0] >> 4 {
        4 if packet.len() >= 20 => {
            packet[12..16].copy_from_slice(&B_INNER);
            packet[16..20].copy_from_slice(&A_INNER);
        }
        6 if packet.len() >= 40 => {
            packet[8..24].copy_from_slice(&B_INNER6);
            packet[24..40].copy_from_slice(&A_INNER6);
        }
        _ => {}
    }
    let len = packet.len();
    let mut buf = vec![0u8; TRANSPORT_HEADER_LEN + len + SEAL_TAILROOM];
    buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len].copy_from_slice(&packet);
    let Egress::Send { len, .. } = pair.b.egress(pair.now, &mut buf, len) else {
        return;
    };
    if let Ingress::Deliver { packet: range, .. } =
        pair.a.ingress(pair.now, pair.b_addr, &mut buf[..len])
    {
        let delivered = &buf[range];
        assert!(
            !is_udp_to_9999(delivered),
            "a datagram to the denied port was delivered"
        );
    }
}

/// Whether `packet` is an unfragmented IPv4 UDP datagram, or an IPv6 one without
/// extension headers, to port 9999.
fn is_udp_to_9999(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 28 => {
            let header = usize::from(packet[0] & 0x0f) * 4;
            let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
            packet[9] == 17
                && first_fragment
                && packet.len() >= header + 4
                && u16::from_be_bytes([packet[header + 2], packet[header + 3]]) == 9999
        }
        Some(6) if packet.len() >= 48 => {
            packet[6] == 17 && u16::from_be_bytes([packet[42], packet[43]]) == 9999
        }
        _ => false,
    }
}
