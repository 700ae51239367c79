//! Any datagram into a device with an established session: parsed as a WireGuard
//! message and taken through the receive path (handshake messages, cookie replies,
//! transport data). Nothing may panic; the session must still work afterwards.
//!
//! The pair is made once per 10,000 inputs (a handshake costs more than many receives).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use meshguard::proto::Received;
use meshguard::testbed::fixtures::{sealable, DevicePair};

thread_local! {
    static PAIR: RefCell<(u32, Option<DevicePair>)> = const { RefCell::new((0, None)) };
}

fuzz_target!(|data: &[u8]| {
    PAIR.with(|cell| {
        let (uses, pair) = &mut *cell.borrow_mut();
        *uses += 1;
        if pair.is_none() || *uses % 10_000 == 0 {
            *pair = Some(DevicePair::connected());
        }
        receive(pair.as_mut().expect("made above"), data);
    });
});

fn receive(pair: &mut DevicePair, data: &[u8]) {
    let mut datagram = data.to_vec();
    let _ = pair.a.receive(pair.now, pair.b_addr, &mut datagram);
    let _ = pair.a.poll_transmit();
    // The real peer is still heard.
    let mut buf = sealable(b"still here");
    let len = b"still here".len();
    let sealed = pair.b.seal(pair.now, pair.ba, &mut buf, len);
    if let meshguard::proto::Sealed::Send { len, .. } = sealed {
        let received = pair.a.receive(pair.now, pair.b_addr, &mut buf[..len]);
        assert!(matches!(received, Received::Data { .. }), "{received:?}");
    }
}
