//! The steady-state data path allocates nothing per packet.
//!
//! This test binary installs a counting global allocator. It counts only on a thread that
//! is inside `allocations_during` (a thread-local flag), and measuring sections take a
//! lock, so tests running in parallel in this binary do not disturb each other's counts.
//! The first allocation inside a measured section records a backtrace, printed on failure,
//! which names the line that allocated.

// A global allocator is `unsafe` by nature; this test tool is the crate's only `unsafe`
// outside src/io, and it never ships in the daemon.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use meshguard::node::{Egress, Ingress};
use meshguard::proto::{Received, Sealed};

// Two connected devices, or two connected nodes, on a simulated clock.
use meshguard::testbed::fixtures::{buffer, ipv4_udp, DevicePair, NodePair, A_INNER, B_INNER};

// ---------------------------------------------------------------------------------------
// Counting allocator

struct CountingAllocator;

/// Allocations (alloc, alloc_zeroed, realloc) made by a measuring thread.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Where the first allocation of the current measured section came from.
static FIRST_ALLOCATION: Mutex<Option<Backtrace>> = Mutex::new(None);
/// Serializes measured sections across the test threads of this binary.
static MEASURING_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    /// Set only on the thread that is inside `allocations_during`.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    // `try_with`: the allocator may run while this thread's locals are being torn down.
    if !MEASURING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    if ALLOCATIONS.fetch_add(1, Ordering::SeqCst) == 0 {
        // Capturing allocates too: stop counting while we do it.
        MEASURING.with(|m| m.set(false));
        let trace = Backtrace::force_capture();
        *FIRST_ALLOCATION
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(trace);
        MEASURING.with(|m| m.set(true));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting has no effect on the
// memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as ours, forwarded; `ptr` came from `System` via us.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded; `ptr` came from `System` via us.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `f` on this thread and returns how many allocations it made, with the backtrace
/// of the first one.
fn allocations_during(f: impl FnOnce()) -> (usize, Option<Backtrace>) {
    let _serial = MEASURING_LOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    FIRST_ALLOCATION
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    ALLOCATIONS.store(0, Ordering::SeqCst);
    MEASURING.with(|m| m.set(true));
    f();
    MEASURING.with(|m| m.set(false));
    let count = ALLOCATIONS.load(Ordering::SeqCst);
    let first = FIRST_ALLOCATION
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    (count, first)
}

fn assert_no_allocations(what: &str, (count, first): (usize, Option<Backtrace>)) {
    if count != 0 {
        let trace = first.map_or_else(|| "(no backtrace)".to_owned(), |t| t.to_string());
        panic!("{what}: {count} allocations in the steady-state loop; the first one:\n{trace}");
    }
}

#[test]
fn the_counter_sees_allocations_on_the_measuring_thread() {
    let (count, first) = allocations_during(|| {
        let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(100));
        drop(v);
    });
    assert_eq!(count, 1);
    assert!(first.is_some());
    let (count, _) = allocations_during(|| {});
    assert_eq!(count, 0);
}

// ---------------------------------------------------------------------------------------
// Round trips

const WARM_UP: usize = 300;
const ROUND_TRIPS: usize = 10_000;
/// Simulated time between round trips.
const TICK: Duration = Duration::from_micros(10);

/// Seals `buf` (plaintext of `len` bytes) on one device and opens it on the other. The
/// plaintext is restored in place, so the buffer can go round again.
fn device_one_way(pair: &mut DevicePair, a_to_b: bool, buf: &mut [u8], len: usize) {
    let (from, to, tunnel, source) = if a_to_b {
        (&mut pair.a, &mut pair.b, pair.ab, pair.a_addr)
    } else {
        (&mut pair.b, &mut pair.a, pair.ba, pair.b_addr)
    };
    let sealed = match from.seal(pair.now, tunnel, buf, len) {
        Sealed::Send { len, .. } => len,
        other => panic!("not sealed: {other:?}"),
    };
    match to.receive(pair.now, source, &mut buf[..sealed]) {
        Received::Data { plaintext, .. } => assert!(plaintext.len() >= len),
        other => panic!("not received: {other:?}"),
    }
}

/// The same through two nodes: egress on one, ingress on the other.
fn node_one_way(pair: &mut NodePair, a_to_b: bool, buf: &mut [u8], len: usize) {
    let (from, to, source) = if a_to_b {
        (&mut pair.a, &mut pair.b, pair.a_addr)
    } else {
        (&mut pair.b, &mut pair.a, pair.b_addr)
    };
    let sealed = match from.egress(pair.now, buf, len) {
        Egress::Send { len, .. } => len,
        other => panic!("not sent: {other:?}"),
    };
    match to.ingress(pair.now, source, &mut buf[..sealed]) {
        Ingress::Deliver { packet, .. } => assert_eq!(packet.len(), len),
        other => panic!("not delivered: {other:?}"),
    }
}

/// One packet each way, then the clock ticks and the daemon asks for its next wake-up.
fn device_round_trip(
    pair: &mut DevicePair,
    to_b: &mut [u8],
    b_len: usize,
    to_a: &mut [u8],
    a_len: usize,
) {
    device_one_way(pair, true, to_b, b_len);
    device_one_way(pair, false, to_a, a_len);
    pair.now += TICK;
    std::hint::black_box((pair.a.poll_timeout(), pair.b.poll_timeout()));
}

fn node_round_trip(
    pair: &mut NodePair,
    to_b: &mut [u8],
    b_len: usize,
    to_a: &mut [u8],
    a_len: usize,
) {
    node_one_way(pair, true, to_b, b_len);
    node_one_way(pair, false, to_a, a_len);
    pair.now += TICK;
    std::hint::black_box((pair.a.poll_timeout(), pair.b.poll_timeout()));
}

#[test]
fn device_seal_and_receive_allocate_nothing_per_packet() {
    let mut pair = DevicePair::connected();
    // A bulk sender and its acknowledgements: a full packet one way, a small one back.
    let (big, small) = (1420, 64);
    let mut to_b = buffer(big);
    let mut to_a = buffer(small);
    for _ in 0..WARM_UP {
        device_round_trip(&mut pair, &mut to_b, big, &mut to_a, small);
    }
    let measured = allocations_during(|| {
        for _ in 0..ROUND_TRIPS {
            device_round_trip(&mut pair, &mut to_b, big, &mut to_a, small);
        }
    });
    assert_no_allocations("Device::seal / Device::receive", measured);
    assert_eq!(
        pair.a.stats().network_drops() + pair.b.stats().network_drops(),
        0
    );
    assert_eq!(pair.a.poll_transmit().map(|t| t.data.len()), None);
    assert_eq!(pair.b.poll_transmit().map(|t| t.data.len()), None);
}

#[test]
fn node_egress_and_ingress_allocate_nothing_per_packet() {
    let mut pair = NodePair::connected();
    let (big, small) = (1420, 64);
    let mut to_b = ipv4_udp(A_INNER, B_INNER, big);
    let mut to_a = ipv4_udp(B_INNER, A_INNER, small);
    for _ in 0..WARM_UP {
        node_round_trip(&mut pair, &mut to_b, big, &mut to_a, small);
    }
    let measured = allocations_during(|| {
        for _ in 0..ROUND_TRIPS {
            node_round_trip(&mut pair, &mut to_b, big, &mut to_a, small);
        }
    });
    assert_no_allocations("Node::egress / Node::ingress", measured);
    let expected = (1 + WARM_UP + ROUND_TRIPS) as u64;
    assert_eq!(pair.b.stats().packets_in, expected);
    assert_eq!(pair.a.stats().packets_in, expected - 1);
    assert_eq!(pair.a.poll_transmit().map(|t| t.data.len()), None);
    assert_eq!(pair.b.poll_transmit().map(|t| t.data.len()), None);
}
