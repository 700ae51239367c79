//! Transport crypto alone: one `Session` sealing and opening in place, per plaintext size.
//!
//! Run with `cargo bench --bench crypto`. Numbers are informational; nothing asserts them.

use std::time::Instant;

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use meshguard::proto::Session;
use meshguard::proto::{SEAL_TAILROOM, TRANSPORT_HEADER_LEN};

fn main() {
    divan::main();
}

/// Plaintext sizes: a small packet, a full packet at the default MTU, a jumbo frame and
/// the largest IP packet (a GSO super-packet segment's upper bound).
const SIZES: &[usize] = &[64, 1420, 8192, 65535];
/// No MTU: plaintexts of every size are padded to a multiple of 16.
const MTU: usize = 0;

/// The two ends of one session, with matching keys.
fn session_pair(now: Instant) -> (Session, Session) {
    let initiator_to_responder = [0x11; 32];
    let responder_to_initiator = [0x22; 32];
    let initiator = Session::new(
        now,
        1,
        2,
        true,
        &initiator_to_responder,
        &responder_to_initiator,
    );
    let responder = Session::new(
        now,
        2,
        1,
        false,
        &responder_to_initiator,
        &initiator_to_responder,
    );
    (initiator, responder)
}

fn plaintext_buffer(size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; TRANSPORT_HEADER_LEN + size + SEAL_TAILROOM];
    for (i, byte) in buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + size]
        .iter_mut()
        .enumerate()
    {
        *byte = i as u8;
    }
    buf
}

/// Seals in place, over and over, in one buffer (each pass encrypts the previous output,
/// which costs the same as fresh plaintext).
#[divan::bench(args = SIZES)]
fn seal(bencher: Bencher, size: usize) {
    let (mut sender, _) = session_pair(Instant::now());
    let mut buf = plaintext_buffer(size);
    bencher
        .counter(BytesCount::new(size))
        .bench_local(|| sender.seal(black_box(&mut buf), size, MTU));
}

/// Opens in place. Every message needs a fresh counter, so the inputs are sealed outside
/// the timed region, in order, and each is opened exactly once.
#[divan::bench(args = SIZES)]
fn open(bencher: Bencher, size: usize) {
    let now = Instant::now();
    let (mut sender, mut receiver) = session_pair(now);
    let template = plaintext_buffer(size);
    bencher
        .counter(BytesCount::new(size))
        .with_inputs(|| {
            let mut msg = template.clone();
            let len = sender.seal(&mut msg, size, MTU);
            msg.truncate(len);
            msg
        })
        .bench_local_refs(|msg| receiver.open(now, msg).expect("authentic and fresh"));
}
