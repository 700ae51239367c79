//! The steady-state data path allocates nothing per packet.
//!
//! This test binary installs a counting global allocator. It counts only on a thread that
//! is inside `allocations_during` (a thread-local flag), and measuring sections take a
//! lock, so tests running in parallel in this binary do not disturb each other's counts.
//! The first allocation inside a measured section records a backtrace, printed on failure,
//! which names the line that allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshguard::config::{
    InterfaceConfig, LocalIdentityConfig, NodeConfig, PeerConfig, PeerIdentityConfig, PolicyConfig,
};
use meshguard::identity::{Principal, PrivateKey};
use meshguard::node::{Egress, Ingress, Node};
use meshguard::policy::{DefaultAction, PolicySet};
use meshguard::proto::{
    Device, DeviceConfig, Received, Sealed, TunnelId, SEAL_TAILROOM, TRANSPORT_HEADER_LEN,
};

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
// Setup

const A_ENDPOINT: &str = "198.18.0.1:51820";
const B_ENDPOINT: &str = "198.18.0.2:51820";
const UNIX_START: Duration = Duration::from_secs(1_800_000_000);
const WARM_UP: usize = 300;
const ROUND_TRIPS: usize = 10_000;
/// Simulated time between round trips: 10,000 of them span 0.1 s, so no timer falls due.
const TICK: Duration = Duration::from_micros(10);

/// A buffer laid out for sealing in place: headroom, `len` bytes of plaintext, tailroom.
fn buffer(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; TRANSPORT_HEADER_LEN + len + SEAL_TAILROOM];
    for (i, byte) in buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]
        .iter_mut()
        .enumerate()
    {
        *byte = i as u8;
    }
    buf
}

/// An IPv4/UDP packet of `total_len` bytes, laid out for sealing in place.
fn ipv4_udp(source: Ipv4Addr, destination: Ipv4Addr, total_len: usize) -> Vec<u8> {
    let mut buf = buffer(total_len);
    let packet = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total_len];
    let ip_len = u16::try_from(total_len).expect("fits an IPv4 packet");
    packet[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet[2..4].copy_from_slice(&ip_len.to_be_bytes());
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&destination.octets());
    let mut sum: u32 = packet[..20]
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&5201u16.to_be_bytes());
    packet[24..26].copy_from_slice(&(ip_len - 20).to_be_bytes());
    packet[26..28].copy_from_slice(&[0, 0]);
    buf
}

struct DevicePair {
    now: Instant,
    a: Device,
    b: Device,
    ab: TunnelId,
    ba: TunnelId,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

impl DevicePair {
    fn connected() -> Self {
        let now = Instant::now();
        let a_key = PrivateKey::generate();
        let b_key = PrivateKey::generate();
        let a_addr: SocketAddr = A_ENDPOINT.parse().unwrap();
        let b_addr: SocketAddr = B_ENDPOINT.parse().unwrap();
        let mut a = Device::new(DeviceConfig::default(), now, UNIX_START);
        let mut b = Device::new(DeviceConfig::default(), now, UNIX_START);
        let la = a.add_local(a_key.as_bytes());
        let lb = b.add_local(b_key.as_bytes());
        let ab = a.add_tunnel(now, la, *b_key.public_key().as_bytes(), Some(b_addr), None);
        let ba = b.add_tunnel(now, lb, *a_key.public_key().as_bytes(), Some(a_addr), None);
        let mut pair = DevicePair {
            now,
            a,
            b,
            ab,
            ba,
            a_addr,
            b_addr,
        };
        pair.a.initiate(now, ab);
        loop {
            let mut idle = true;
            while let Some(mut t) = pair.a.poll_transmit() {
                idle = false;
                pair.b.receive(pair.now, pair.a_addr, &mut t.data);
            }
            while let Some(mut t) = pair.b.poll_transmit() {
                idle = false;
                pair.a.receive(pair.now, pair.b_addr, &mut t.data);
            }
            if idle {
                break;
            }
        }
        assert!(pair.a.has_session(ab) && pair.b.has_session(ba));
        pair
    }

    /// Seals `buf` (plaintext of `len` bytes) on one side and opens it on the other. The
    /// plaintext is restored in place, so the buffer can go round again.
    fn one_way(&mut self, a_to_b: bool, buf: &mut [u8], len: usize) {
        let (from, to, tunnel, source) = if a_to_b {
            (&mut self.a, &mut self.b, self.ab, self.a_addr)
        } else {
            (&mut self.b, &mut self.a, self.ba, self.b_addr)
        };
        let sealed = match from.seal(self.now, tunnel, buf, len) {
            Sealed::Send { len, .. } => len,
            other => panic!("not sealed: {other:?}"),
        };
        match to.receive(self.now, source, &mut buf[..sealed]) {
            Received::Data { plaintext, .. } => assert!(plaintext.len() >= len),
            other => panic!("not received: {other:?}"),
        }
    }

    /// One packet each way, then the clock ticks and the daemon asks for its next wake-up.
    fn round_trip(&mut self, to_b: &mut [u8], to_b_len: usize, to_a: &mut [u8], to_a_len: usize) {
        self.one_way(true, to_b, to_b_len);
        self.one_way(false, to_a, to_a_len);
        self.now += TICK;
        std::hint::black_box((self.a.poll_timeout(), self.b.poll_timeout()));
    }
}

#[test]
fn device_seal_and_receive_allocate_nothing_per_packet() {
    let mut pair = DevicePair::connected();
    // A bulk sender and its acknowledgements: a full packet one way, a small one back.
    let (big, small) = (1420, 64);
    let mut to_b = buffer(big);
    let mut to_a = buffer(small);
    for _ in 0..WARM_UP {
        pair.round_trip(&mut to_b, big, &mut to_a, small);
    }
    let measured = allocations_during(|| {
        for _ in 0..ROUND_TRIPS {
            pair.round_trip(&mut to_b, big, &mut to_a, small);
        }
    });
    assert_no_allocations("Device::seal / Device::receive", measured);
    assert_eq!(
        pair.a.stats.network_drops() + pair.b.stats.network_drops(),
        0
    );
    assert_eq!(pair.a.poll_transmit().map(|t| t.data.len()), None);
    assert_eq!(pair.b.poll_transmit().map(|t| t.data.len()), None);
}

// ---------------------------------------------------------------------------------------
// Nodes

fn node_config(
    name: &str,
    listen: SocketAddr,
    (principal, key, address): (&Principal, &PrivateKey, IpNet),
    peer_endpoint: SocketAddr,
    peer: PeerIdentityConfig,
) -> NodeConfig {
    let dir = PathBuf::from("/nonexistent/meshguard-no-alloc").join(name);
    NodeConfig {
        path: dir.join("node.toml"),
        name: name.to_owned(),
        listen,
        interface: InterfaceConfig {
            name: "mgnoalloc0".to_owned(),
            mtu: 1420,
            addresses: vec![address],
            offload: false,
        },
        peers_dir: dir.join("peers"),
        // No policies and default allow: these measure the data path, not the allow list.
        policy: PolicyConfig {
            default: DefaultAction::Allow,
            ..PolicyConfig::default()
        },
        identities: vec![LocalIdentityConfig {
            principal: principal.clone(),
            private_key_file: dir.join("identity.key"),
            private_key: key.clone(),
            public_key: key.public_key(),
            addresses: vec![address],
            labels: Default::default(),
        }],
        peers: vec![PeerConfig {
            path: dir.join("peers/peer.toml"),
            name: "peer".to_owned(),
            endpoint: Some(peer_endpoint),
            persistent_keepalive: None,
            identities: vec![peer],
        }],
    }
}

struct NodePair {
    now: Instant,
    a: Node,
    b: Node,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

const A_INNER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const B_INNER: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

impl NodePair {
    fn connected() -> Self {
        let now = Instant::now();
        let a_addr: SocketAddr = A_ENDPOINT.parse().unwrap();
        let b_addr: SocketAddr = B_ENDPOINT.parse().unwrap();
        let (a_key, b_key) = (PrivateKey::generate(), PrivateKey::generate());
        let a_principal: Principal = "cluster.local/ns/shop/sa/frontend".parse().unwrap();
        let b_principal: Principal = "cluster.local/ns/shop/sa/backend".parse().unwrap();
        let a_net = IpNet::new(A_INNER.into(), 32).unwrap();
        let b_net = IpNet::new(B_INNER.into(), 32).unwrap();
        let a_config = node_config(
            "node-a",
            a_addr,
            (&a_principal, &a_key, a_net),
            b_addr,
            PeerIdentityConfig {
                principal: b_principal.clone(),
                public_key: b_key.public_key(),
                allowed_ips: vec![b_net],
            },
        );
        let b_config = node_config(
            "node-b",
            b_addr,
            (&b_principal, &b_key, b_net),
            a_addr,
            PeerIdentityConfig {
                principal: a_principal,
                public_key: a_key.public_key(),
                allowed_ips: vec![a_net],
            },
        );
        let mut pair = NodePair {
            now,
            a: Node::new(
                &a_config,
                &PolicySet::default(),
                DeviceConfig::default(),
                now,
                UNIX_START,
            ),
            b: Node::new(
                &b_config,
                &PolicySet::default(),
                DeviceConfig::default(),
                now,
                UNIX_START,
            ),
            a_addr,
            b_addr,
        };
        // The first packet waits for the handshake, which the pump completes.
        let mut first = ipv4_udp(A_INNER, B_INNER, 64);
        assert_eq!(pair.a.egress(now, &mut first, 64), Egress::Queued);
        let mut delivered = 0;
        loop {
            let mut idle = true;
            while let Some(mut t) = pair.a.poll_transmit() {
                idle = false;
                if let Ingress::Deliver { .. } = pair.b.ingress(now, a_addr, &mut t.data) {
                    delivered += 1;
                }
            }
            while let Some(mut t) = pair.b.poll_transmit() {
                idle = false;
                if let Ingress::Deliver { .. } = pair.a.ingress(now, b_addr, &mut t.data) {
                    delivered += 1;
                }
            }
            if idle {
                break;
            }
        }
        assert_eq!(delivered, 1, "the queued packet went through the handshake");
        pair
    }

    fn one_way(&mut self, a_to_b: bool, buf: &mut [u8], len: usize) {
        let (from, to, source) = if a_to_b {
            (&mut self.a, &mut self.b, self.a_addr)
        } else {
            (&mut self.b, &mut self.a, self.b_addr)
        };
        let sealed = match from.egress(self.now, buf, len) {
            Egress::Send { len, .. } => len,
            other => panic!("not sent: {other:?}"),
        };
        match to.ingress(self.now, source, &mut buf[..sealed]) {
            Ingress::Deliver { packet, .. } => assert_eq!(packet.len(), len),
            other => panic!("not delivered: {other:?}"),
        }
    }

    fn round_trip(&mut self, to_b: &mut [u8], to_b_len: usize, to_a: &mut [u8], to_a_len: usize) {
        self.one_way(true, to_b, to_b_len);
        self.one_way(false, to_a, to_a_len);
        self.now += TICK;
        std::hint::black_box((self.a.poll_timeout(), self.b.poll_timeout()));
    }
}

#[test]
fn node_egress_and_ingress_allocate_nothing_per_packet() {
    let mut pair = NodePair::connected();
    let (big, small) = (1420, 64);
    let mut to_b = ipv4_udp(A_INNER, B_INNER, big);
    let mut to_a = ipv4_udp(B_INNER, A_INNER, small);
    for _ in 0..WARM_UP {
        pair.round_trip(&mut to_b, big, &mut to_a, small);
    }
    let measured = allocations_during(|| {
        for _ in 0..ROUND_TRIPS {
            pair.round_trip(&mut to_b, big, &mut to_a, small);
        }
    });
    assert_no_allocations("Node::egress / Node::ingress", measured);
    let expected = (1 + WARM_UP + ROUND_TRIPS) as u64;
    assert_eq!(pair.b.stats.packets_in, expected);
    assert_eq!(pair.a.stats.packets_in, expected - 1);
    assert_eq!(pair.a.poll_transmit().map(|t| t.data.len()), None);
    assert_eq!(pair.b.poll_transmit().map(|t| t.data.len()), None);
}
