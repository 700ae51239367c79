//! Handshakes per second between two devices.
//!
//! Run with `cargo bench --bench handshake`. Numbers are informational; nothing asserts them.

use std::time::Duration;

use divan::counter::ItemsCount;
use divan::Bencher;
use meshguard::proto::{Device, Received};

use meshguard::testbed::fixtures::DevicePair;

fn main() {
    divan::main();
}

/// Delivers the one datagram `from` has queued to `to` and checks it was a control message.
fn deliver_one(
    from: &mut Device,
    to: &mut Device,
    now: std::time::Instant,
    source: std::net::SocketAddr,
) {
    let mut datagram = from.poll_transmit().expect("a datagram to deliver");
    match to.receive(now, source, &mut datagram.data) {
        Received::Control => {}
        other => panic!("expected a handshake message, got {other:?}"),
    }
}

/// One full rekey of an established tunnel per iteration: A's initiation, B's response,
/// A's confirming keepalive (B promotes its new session). The simulated clock moves 6 s
/// each time, past REKEY_TIMEOUT and the initiation rate limit, so every initiation is
/// sent and accepted and the under-load (cookie) path is never taken.
#[divan::bench]
fn initiation_response_keepalive(bencher: Bencher) {
    let mut p = DevicePair::connected();
    while p.a.poll_event().is_some() || p.b.poll_event().is_some() {}
    bencher.counter(ItemsCount::new(1u32)).bench_local(|| {
        p.now += Duration::from_secs(6);
        p.a.initiate(p.now, p.ab);
        deliver_one(&mut p.a, &mut p.b, p.now, p.a_addr);
        deliver_one(&mut p.b, &mut p.a, p.now, p.b_addr);
        deliver_one(&mut p.a, &mut p.b, p.now, p.a_addr);
        // Keep the event queues from growing across iterations.
        while p.a.poll_event().is_some() || p.b.poll_event().is_some() {}
    });
    assert_eq!(
        p.a.stats().handshakes_completed,
        p.b.stats().handshakes_completed,
        "every initiation completed"
    );
}
