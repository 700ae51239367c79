//! The data path end to end, sans IO: encapsulate on one side, decapsulate on the other.
//!
//! TODO(policy): the per-packet policy decision bench (allow-list lookup for an identity
//! pair and the flow-table fast path at ingress) goes in this file together with the
//! policy module. It is deliberately not written yet.
//!
//! Run with `cargo bench --bench datapath`. Numbers are informational; nothing asserts them.

mod common;

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use meshguard::node::{Egress, Ingress};
use meshguard::proto::{Received, Sealed};

use common::{DevicePair, NodePair, A_INNER, B_INNER};

fn main() {
    divan::main();
}

/// `Device::seal` on A, then `Device::receive` on B, of one `size`-byte plaintext. Opening
/// in place restores the plaintext, so one buffer serves every iteration.
#[divan::bench(args = [64, 1420])]
fn device_seal_receive(bencher: Bencher, size: usize) {
    let mut pair = DevicePair::connected();
    let mut buf = common::buffer(size);
    let now = pair.now;
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        let len = match pair.a.seal(now, pair.ab, black_box(&mut buf), size) {
            Sealed::Send { len, .. } => len,
            other => panic!("not sealed: {other:?}"),
        };
        match pair.b.receive(now, pair.a_addr, &mut buf[..len]) {
            Received::Data { plaintext, .. } => plaintext.len(),
            other => panic!("not delivered: {other:?}"),
        }
    });
}

/// `Node::egress` on A (identity routing, then seal) and `Node::ingress` on B (open, then
/// cryptokey routing) of a 1420-byte IPv4/UDP packet between the two identities.
#[divan::bench]
fn node_egress_ingress(bencher: Bencher) {
    const SIZE: usize = 1420;
    let mut pair = NodePair::connected();
    let mut buf = common::ipv4_udp(A_INNER, B_INNER, SIZE);
    let now = pair.now;
    bencher.counter(BytesCount::new(SIZE)).bench_local(|| {
        let len = match pair.a.egress(now, black_box(&mut buf), SIZE) {
            Egress::Send { len, .. } => len,
            other => panic!("not sent: {other:?}"),
        };
        match pair.b.ingress(now, pair.a_addr, &mut buf[..len]) {
            Ingress::Deliver { packet, .. } => packet.len(),
            other => panic!("not delivered: {other:?}"),
        }
    });
}
