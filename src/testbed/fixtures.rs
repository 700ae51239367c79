//! Sans-IO fixtures for unit tests, `tests/` and `benches/`: two protocol devices or two
//! nodes that know each other, driven on a simulated clock. Nothing here touches a socket
//! or sleeps, and nothing needs root. Keys and the cores' randomness come from fixed
//! seeds, so every run follows the same schedule (retry jitter, indices, keys).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{
    InterfaceConfig, LocalIdentityConfig, NodeConfig, OperationsConfig, PeerConfig,
    PeerIdentityConfig, PolicyConfig,
};
use crate::identity::{Principal, PrivateKey};
use crate::node::{Dropped, Egress, Ingress, Node};
use crate::policy::{DefaultAction, PolicySet};
use crate::proto::{
    Device, DeviceConfig, LocalKeyId, Random, Received, Transmit, TunnelId, SEAL_TAILROOM,
    TRANSPORT_HEADER_LEN,
};

/// UDP endpoints of the two sides. Sans-IO: nothing is ever sent to them.
pub const A_ENDPOINT: &str = "198.18.0.1:51820";
pub const B_ENDPOINT: &str = "198.18.0.2:51820";
/// Wall-clock time at the start of the simulated clock (handshake timestamps).
pub const UNIX_START: Duration = Duration::from_secs(1_800_000_000);

/// Inner (tunnelled) address of the identity on node A, and on node B.
pub const A_INNER: [u8; 4] = [10, 1, 0, 1];
pub const B_INNER: [u8; 4] = [10, 2, 0, 1];
/// The same identities' IPv6 addresses (B's n-th identity has `fd00:2::n`).
pub const A_INNER6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const B_INNER6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Seeds of side A's and side B's randomness.
/// An allow list for A: everything from B but UDP port 9999 (default allow, one DENY
/// rule), in meshguard's TOML form.
pub const DENY_UDP_9999_POLICY: &str = r#"
[[policy]]
name = "no-9999"
namespace = "bench"
action = "DENY"
[[policy.rules]]
[[policy.rules.to]]
ports = ["9999/udp"]
"#;

pub const A_SEED: u64 = 0xa;
pub const B_SEED: u64 = 0xb;

/// A seeded random source for a protocol core.
pub fn seeded(seed: u64) -> Random {
    Box::new(ChaCha8Rng::seed_from_u64(seed))
}

/// A private key drawn from a seeded generator.
pub fn seeded_key(seed: u64) -> PrivateKey {
    let mut bytes = [0u8; 32];
    // Distinct from the core's stream of the same seed.
    ChaCha8Rng::seed_from_u64(seed ^ 0x6b65_7973).fill_bytes(&mut bytes);
    PrivateKey::from_bytes(bytes)
}

/// A buffer laid out for sealing in place: headroom, `len` bytes of plaintext (a counting
/// pattern), tailroom.
pub fn buffer(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; TRANSPORT_HEADER_LEN + len + SEAL_TAILROOM];
    for (i, byte) in buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]
        .iter_mut()
        .enumerate()
    {
        *byte = i as u8;
    }
    buf
}

/// `payload` laid out for sealing in place.
pub fn sealable(payload: &[u8]) -> Vec<u8> {
    let mut buf = buffer(payload.len());
    buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + payload.len()].copy_from_slice(payload);
    buf
}

/// The datagrams of one side's outbox.
fn outbox(device: &mut Device) -> Vec<Transmit> {
    std::iter::from_fn(|| device.poll_transmit()).collect()
}

/// Plaintexts each side received while datagrams were pumped.
#[derive(Debug, Default)]
pub struct Delivered {
    pub to_a: Vec<Vec<u8>>,
    pub to_b: Vec<Vec<u8>>,
}

/// Two devices with one identity each and a tunnel to each other.
pub struct DevicePair {
    pub now: Instant,
    pub a: Device,
    pub b: Device,
    pub ab: TunnelId,
    pub ba: TunnelId,
    pub a_local: LocalKeyId,
    pub b_local: LocalKeyId,
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
    pub a_public: [u8; 32],
    pub b_public: [u8; 32],
}

impl Default for DevicePair {
    fn default() -> Self {
        Self::with_configs(DeviceConfig::default(), DeviceConfig::default())
    }
}

impl DevicePair {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_configs(a_config: DeviceConfig, b_config: DeviceConfig) -> Self {
        let now = Instant::now();
        let a_key = seeded_key(A_SEED);
        let b_key = seeded_key(B_SEED);
        let a_public = *a_key.public_key().as_bytes();
        let b_public = *b_key.public_key().as_bytes();
        let a_addr: SocketAddr = A_ENDPOINT.parse().expect("address");
        let b_addr: SocketAddr = B_ENDPOINT.parse().expect("address");
        let mut a = Device::new(a_config, seeded(A_SEED), now, UNIX_START);
        let mut b = Device::new(b_config, seeded(B_SEED), now, UNIX_START);
        let la = a.add_local(a_key);
        let lb = b.add_local(b_key);
        let ab = a.add_tunnel(now, la, b_public, Some(b_addr), None);
        let ba = b.add_tunnel(now, lb, a_public, Some(a_addr), None);
        DevicePair {
            now,
            a,
            b,
            ab,
            ba,
            a_local: la,
            b_local: lb,
            a_addr,
            b_addr,
            a_public,
            b_public,
        }
    }

    /// A pair whose handshake is complete and confirmed on both sides.
    pub fn connected() -> Self {
        let mut pair = Self::new();
        pair.handshake();
        pair
    }

    /// A starts a handshake; it completes, and A's keepalive confirms B's session.
    pub fn handshake(&mut self) {
        self.a.initiate(self.now, self.ab);
        self.pump();
        assert!(self.a.has_session(self.ab), "A has a session");
        assert!(
            self.b.has_session(self.ba),
            "A's keepalive confirmed B's session"
        );
    }

    /// Moves the clock on and runs both sides' due timers.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        // In debug builds this also checks the cached deadline against every tunnel's.
        let _ = (self.a.poll_timeout(), self.b.poll_timeout());
    }

    /// Delivers queued datagrams both ways until both outboxes are empty.
    pub fn pump(&mut self) -> Delivered {
        self.pump_filtered(|_| false)
    }

    /// Like `pump`, losing the datagrams `lose` picks.
    pub fn pump_filtered(&mut self, lose: impl Fn(&[u8]) -> bool) -> Delivered {
        let mut delivered = Delivered::default();
        loop {
            let from_a = outbox(&mut self.a);
            let from_b = outbox(&mut self.b);
            if from_a.is_empty() && from_b.is_empty() {
                return delivered;
            }
            for mut t in from_a.into_iter().filter(|t| !lose(&t.data)) {
                assert_eq!(t.destination, self.b_addr);
                if let Received::Data { plaintext, .. } =
                    self.b.receive(self.now, self.a_addr, &mut t.data)
                {
                    delivered.to_b.push(t.data[plaintext].to_vec());
                }
            }
            for mut t in from_b.into_iter().filter(|t| !lose(&t.data)) {
                assert_eq!(t.destination, self.a_addr);
                if let Received::Data { plaintext, .. } =
                    self.a.receive(self.now, self.b_addr, &mut t.data)
                {
                    delivered.to_a.push(t.data[plaintext].to_vec());
                }
            }
        }
    }
}

/// An IPv4/UDP packet of `total_len` bytes from `source` to `destination` (ports 40000 →
/// 5201), laid out for sealing in place.
pub fn ipv4_udp(source: [u8; 4], destination: [u8; 4], total_len: usize) -> Vec<u8> {
    assert!((28..=usize::from(u16::MAX)).contains(&total_len));
    let mut buf = buffer(total_len);
    let packet = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total_len];
    let ip_len = u16::try_from(total_len).expect("checked");
    packet[..20].copy_from_slice(&[
        0x45, 0, 0, 0, // version 4, IHL 5, TOS, total length (below)
        0, 0, 0x40, 0, // id, don't fragment, offset 0
        64, 17, 0, 0, // TTL, UDP, checksum (below)
        0, 0, 0, 0, 0, 0, 0, 0, // addresses (below)
    ]);
    packet[2..4].copy_from_slice(&ip_len.to_be_bytes());
    packet[12..16].copy_from_slice(&source);
    packet[16..20].copy_from_slice(&destination);
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp_len = ip_len - 20;
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&5201u16.to_be_bytes());
    packet[24..26].copy_from_slice(&udp_len.to_be_bytes());
    // UDP checksum 0: none, which IPv4 allows.
    packet[26..28].copy_from_slice(&[0, 0]);
    buf
}

/// An IPv4 ICMP message from `source` to `destination`: type, code, the second word of
/// the ICMP header (`rest`: an echo's identifier and sequence number), then `body`. Laid
/// out for sealing in place; returns the buffer and the packet's length.
pub fn ipv4_icmp(
    source: [u8; 4],
    destination: [u8; 4],
    (icmp_type, code): (u8, u8),
    rest: [u8; 4],
    body: &[u8],
) -> (Vec<u8>, usize) {
    let total_len = 20 + 8 + body.len();
    let mut buf = buffer(total_len);
    let packet = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total_len];
    packet[..20].copy_from_slice(&[
        0x45, 0, 0, 0, // version 4, IHL 5, TOS, total length (below)
        0, 0, 0, 0, // id, flags, offset
        64, 1, 0, 0, // TTL, ICMP, checksum (below)
        0, 0, 0, 0, 0, 0, 0, 0, // addresses (below)
    ]);
    let ip_len = u16::try_from(total_len).expect("fits");
    packet[2..4].copy_from_slice(&ip_len.to_be_bytes());
    packet[12..16].copy_from_slice(&source);
    packet[16..20].copy_from_slice(&destination);
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet[20..24].copy_from_slice(&[icmp_type, code, 0, 0]);
    packet[24..28].copy_from_slice(&rest);
    packet[28..].copy_from_slice(body);
    let checksum = internet_checksum(&packet[20..]);
    packet[22..24].copy_from_slice(&checksum.to_be_bytes());
    (buf, total_len)
}

/// An ICMP echo request (or reply) with `identifier`, sequence 1 and 32 bytes of data.
pub fn ipv4_echo(
    source: [u8; 4],
    destination: [u8; 4],
    request: bool,
    identifier: u16,
) -> (Vec<u8>, usize) {
    let icmp_type = if request { 8 } else { 0 };
    let [id_high, id_low] = identifier.to_be_bytes();
    ipv4_icmp(
        source,
        destination,
        (icmp_type, 0),
        [id_high, id_low, 0, 1],
        &[0x61; 32],
    )
}

/// A UDP header (ports, length, checksum 0) and `data`.
pub fn udp(source_port: u16, destination_port: u16, data: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + data.len());
    datagram.extend_from_slice(&source_port.to_be_bytes());
    datagram.extend_from_slice(&destination_port.to_be_bytes());
    let len = u16::try_from(8 + data.len()).expect("fits");
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(data);
    datagram
}

/// A TCP header with `flags` (SYN is 0x02, ACK 0x10) and no options, and `data`.
pub fn tcp(source_port: u16, destination_port: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut segment = vec![0u8; 20];
    segment[..2].copy_from_slice(&source_port.to_be_bytes());
    segment[2..4].copy_from_slice(&destination_port.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = flags;
    segment.extend_from_slice(data);
    segment
}

/// An IPv4 packet (or fragment) carrying `payload` for `protocol`: `fragment` is
/// (identification, offset in 8-byte units, more fragments). Laid out for sealing;
/// returns the buffer and the packet's length.
pub fn ipv4(
    source: [u8; 4],
    destination: [u8; 4],
    protocol: u8,
    fragment: (u16, u16, bool),
    payload: &[u8],
) -> (Vec<u8>, usize) {
    let (id, offset, more) = fragment;
    let total_len = 20 + payload.len();
    let mut buf = buffer(total_len);
    let packet = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total_len];
    packet[..20].fill(0);
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&u16::try_from(total_len).expect("fits").to_be_bytes());
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    let flags_and_offset = (u16::from(more) << 13) | offset;
    packet[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
    packet[8] = 64;
    packet[9] = protocol;
    packet[12..16].copy_from_slice(&source);
    packet[16..20].copy_from_slice(&destination);
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet[20..].copy_from_slice(payload);
    (buf, total_len)
}

/// An IPv6 extension header: its type and its bytes, whose first byte (the next header)
/// [`ipv6`] fills in.
pub type Extension = (u8, Vec<u8>);

/// A Destination Options header holding one PadN option: 8 bytes.
pub fn destination_options() -> Extension {
    (60, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// A Fragment header: offset in 8-byte units, more fragments, identification.
pub fn fragment_header(offset: u16, more: bool, id: u32) -> Extension {
    let mut header = vec![0u8; 8];
    header[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    header[4..8].copy_from_slice(&id.to_be_bytes());
    (44, header)
}

/// An IPv6 packet from `source` to `destination` with `extensions` before `payload` of
/// `protocol`. Laid out for sealing; returns the buffer and the packet's length.
pub fn ipv6(
    source: [u8; 16],
    destination: [u8; 16],
    extensions: &[Extension],
    protocol: u8,
    payload: &[u8],
) -> (Vec<u8>, usize) {
    let mut after_header = Vec::new();
    for (i, (_, bytes)) in extensions.iter().enumerate() {
        let next = extensions.get(i + 1).map_or(protocol, |(kind, _)| *kind);
        after_header.push(next);
        after_header.extend_from_slice(&bytes[1..]);
    }
    after_header.extend_from_slice(payload);
    let total_len = 40 + after_header.len();
    let mut buf = buffer(total_len);
    let packet = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total_len];
    packet[..40].fill(0);
    packet[0] = 0x60;
    let payload_len = u16::try_from(after_header.len()).expect("fits");
    packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
    packet[6] = extensions.first().map_or(protocol, |(kind, _)| *kind);
    packet[7] = 64;
    packet[8..24].copy_from_slice(&source);
    packet[24..40].copy_from_slice(&destination);
    packet[40..].copy_from_slice(&after_header);
    (buf, total_len)
}

/// The Internet checksum of `data` (an even number of bytes).
fn internet_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| [w[0], w.get(1).copied().unwrap_or(0)])
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One node of a pair: its name, endpoint and identities (principal, key, addresses).
struct Side {
    name: &'static str,
    endpoint: SocketAddr,
    identities: Vec<(Principal, PrivateKey, Vec<IpNet>)>,
}

/// A node configuration with `local`'s identities and one peer node carrying `peer`'s.
fn node_config(local: &Side, peer: &Side, default: DefaultAction) -> NodeConfig {
    let dir = PathBuf::from("/nonexistent/meshguard-fixture").join(local.name);
    let identities = local
        .identities
        .iter()
        .enumerate()
        .map(|(i, (principal, key, inner))| LocalIdentityConfig {
            principal: principal.clone(),
            private_key_file: dir.join(format!("identity-{i}.key")),
            private_key: key.clone(),
            public_key: key.public_key(),
            next_key: None,
            addresses: inner.clone(),
            labels: BTreeMap::new(),
        })
        .collect();
    let peer_identities = peer
        .identities
        .iter()
        .map(|(principal, key, inner)| PeerIdentityConfig {
            principal: principal.clone(),
            public_key: key.public_key(),
            next_public_key: None,
            allowed_ips: inner.clone(),
        })
        .collect();
    NodeConfig {
        path: dir.join("node.toml"),
        name: local.name.to_owned(),
        listen: local.endpoint,
        interface: InterfaceConfig {
            name: "mgfixture0".to_owned(),
            mtu: 1420,
            addresses: local
                .identities
                .iter()
                .flat_map(|(_, _, inner)| inner.iter().copied())
                .collect(),
            offload: false,
            udp_coalescing: true,
            workers: None,
            queue_length: 4000,
            scheduling: crate::config::Scheduling::Normal,
            realtime_share_percent: crate::config::DEFAULT_REALTIME_SHARE_PERCENT,
        },
        peers_dir: Some(dir.join("peers")),
        // No policies: the default decides every new inbound flow.
        policy: PolicyConfig {
            default,
            ..PolicyConfig::default()
        },
        identities,
        peers: vec![PeerConfig {
            path: dir.join("peers").join(format!("{}.toml", peer.name)),
            name: peer.name.to_owned(),
            endpoint: Some(peer.endpoint),
            persistent_keepalive: None,
            identities: peer_identities,
        }],
        operations: OperationsConfig::default(),
        kubernetes: None,
    }
}

/// Two nodes, each knowing the other's identities: A hosts one, B one or more.
pub struct NodePair {
    pub now: Instant,
    pub a: Node,
    pub b: Node,
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
    /// The configurations the nodes were built from, to change and reapply.
    pub a_config: NodeConfig,
    pub b_config: NodeConfig,
}

impl Default for NodePair {
    /// Nodes whose allow lists have no policies and allow every flow: for measuring the
    /// data path, not the allow list.
    fn default() -> Self {
        Self::with_defaults(DefaultAction::Allow, DefaultAction::Allow)
    }
}

/// An identity's addresses: `v4`/32, and `v6`/128 with its last byte set to `last`.
fn hosts(v4: [u8; 4], mut v6: [u8; 16], last: u8) -> Vec<IpNet> {
    v6[15] = last;
    vec![
        IpNet::new(Ipv4Addr::from(v4).into(), 32).expect("prefix"),
        IpNet::new(Ipv6Addr::from(v6).into(), 128).expect("prefix"),
    ]
}

impl NodePair {
    pub fn new() -> Self {
        Self::default()
    }

    /// Nodes without policies whose defaults are `a_default` and `b_default`.
    pub fn with_defaults(a_default: DefaultAction, b_default: DefaultAction) -> Self {
        Self::with_b_identities(a_default, b_default, &[B_INNER])
    }

    /// Like `with_defaults`, with B hosting one identity per address of `b_inner`
    /// (`cluster.local/ns/bench/sa/server`, then `server-2`, `server-3`, ...).
    pub fn with_b_identities(
        a_default: DefaultAction,
        b_default: DefaultAction,
        b_inner: &[[u8; 4]],
    ) -> Self {
        let now = Instant::now();
        let principal = |name: &str| -> Principal {
            format!("cluster.local/ns/bench/sa/{name}")
                .parse()
                .expect("valid")
        };
        let a = Side {
            name: "node-a",
            endpoint: A_ENDPOINT.parse().expect("address"),
            identities: vec![(
                principal("client"),
                seeded_key(A_SEED),
                hosts(A_INNER, A_INNER6, 1),
            )],
        };
        let b = Side {
            name: "node-b",
            endpoint: B_ENDPOINT.parse().expect("address"),
            identities: b_inner
                .iter()
                .enumerate()
                .map(|(i, address)| {
                    let name = match i {
                        0 => "server".to_owned(),
                        n => format!("server-{}", n + 1),
                    };
                    (
                        principal(&name),
                        seeded_key(B_SEED + i as u64),
                        hosts(*address, B_INNER6, i as u8 + 1),
                    )
                })
                .collect(),
        };
        let node = |config: &NodeConfig, seed: u64| {
            Node::new(config, &PolicySet::default(), seeded(seed), now, UNIX_START)
        };
        let (a_config, b_config) = (
            node_config(&a, &b, a_default),
            node_config(&b, &a, b_default),
        );
        NodePair {
            now,
            a: node(&a_config, A_SEED),
            b: node(&b_config, B_SEED),
            a_addr: a.endpoint,
            b_addr: b.endpoint,
            a_config,
            b_config,
        }
    }

    /// A pair whose handshake is complete: the first packet from A waits for it and is
    /// delivered to B, which confirms B's session.
    pub fn connected() -> Self {
        Self::new().connect()
    }

    /// Completes the handshake with a first packet from A, which B must let in.
    pub fn connect(self) -> Self {
        let mut pair = self;
        let first = ipv4_udp(A_INNER, B_INNER, 64);
        assert!(
            matches!(pair.a_to_b(first, 64), Ingress::Deliver { .. }),
            "the queued packet went through"
        );
        pair
    }

    /// Sends the IP packet in `buf` (laid out for sealing, `len` bytes) from A; returns
    /// what B made of it, after a handshake if one was needed.
    pub fn a_to_b(&mut self, buf: Vec<u8>, len: usize) -> Ingress {
        self.send(true, buf, len)
    }

    /// Sends the IP packet in `buf` from B; returns what A made of it.
    pub fn b_to_a(&mut self, buf: Vec<u8>, len: usize) -> Ingress {
        self.send(false, buf, len)
    }

    fn send(&mut self, from_a: bool, mut buf: Vec<u8>, len: usize) -> Ingress {
        let (sender, receiver, source) = if from_a {
            (&mut self.a, &mut self.b, self.a_addr)
        } else {
            (&mut self.b, &mut self.a, self.b_addr)
        };
        match sender.egress(self.now, &mut buf, len) {
            Egress::Send { len, .. } => receiver.ingress(self.now, source, &mut buf[..len]),
            Egress::Queued => {
                let mut outcomes = self.pump();
                assert_eq!(outcomes.len(), 1, "one packet waited for the handshake");
                outcomes.remove(0)
            }
            Egress::Dropped(drop) => panic!("the sender dropped the packet: {drop:?}"),
        }
    }

    /// Delivers queued datagrams both ways until neither side has anything to send;
    /// returns what the receiving node made of each IP packet (delivered, or dropped by
    /// routing or the allow list). A datagram the protocol drops fails the test.
    pub fn pump(&mut self) -> Vec<Ingress> {
        let mut packets = Vec::new();
        loop {
            let mut idle = true;
            for from_a in [true, false] {
                let (sender, receiver, source) = if from_a {
                    (&mut self.a, &mut self.b, self.a_addr)
                } else {
                    (&mut self.b, &mut self.a, self.b_addr)
                };
                while let Some(mut t) = sender.poll_transmit() {
                    idle = false;
                    match receiver.ingress(self.now, source, &mut t.data) {
                        Ingress::Control => {}
                        Ingress::Dropped(Dropped::Protocol(drop)) => {
                            panic!("a datagram was dropped (from A: {from_a}): {drop:?}")
                        }
                        packet => packets.push(packet),
                    }
                }
            }
            if idle {
                return packets;
            }
        }
    }
}
