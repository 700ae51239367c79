//! Setup shared by the benches: two protocol devices or two nodes that know each other,
//! driven on a simulated clock (nothing here touches a socket or sleeps).
//!
//! Each bench binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshguard::config::{
    InterfaceConfig, LocalIdentityConfig, NodeConfig, PeerConfig, PeerIdentityConfig, PolicyConfig,
};
use meshguard::identity::{Principal, PrivateKey};
use meshguard::node::{Egress, Ingress, Node};
use meshguard::policy::{DefaultAction, PolicySet};
use meshguard::proto::{
    Device, DeviceConfig, Received, TunnelId, SEAL_TAILROOM, TRANSPORT_HEADER_LEN,
};

/// UDP endpoints of the two sides. Sans-IO: nothing is ever sent to them.
pub const A_ENDPOINT: &str = "198.18.0.1:51820";
pub const B_ENDPOINT: &str = "198.18.0.2:51820";
/// Wall-clock time at the start of the simulated clock (handshake timestamps).
pub const UNIX_START: Duration = Duration::from_secs(1_800_000_000);

/// A buffer laid out for sealing in place: headroom, `len` bytes of plaintext, tailroom.
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

/// Two devices with one identity each and a tunnel to each other.
pub struct DevicePair {
    pub now: Instant,
    pub a: Device,
    pub b: Device,
    pub ab: TunnelId,
    pub ba: TunnelId,
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
}

impl DevicePair {
    pub fn new() -> Self {
        let now = Instant::now();
        let a_key = PrivateKey::generate();
        let b_key = PrivateKey::generate();
        let a_addr: SocketAddr = A_ENDPOINT.parse().expect("address");
        let b_addr: SocketAddr = B_ENDPOINT.parse().expect("address");
        let mut a = Device::new(DeviceConfig::default(), now, UNIX_START);
        let mut b = Device::new(DeviceConfig::default(), now, UNIX_START);
        let la = a.add_local(a_key.as_bytes());
        let lb = b.add_local(b_key.as_bytes());
        let ab = a.add_tunnel(now, la, *b_key.public_key().as_bytes(), Some(b_addr), None);
        let ba = b.add_tunnel(now, lb, *a_key.public_key().as_bytes(), Some(a_addr), None);
        DevicePair {
            now,
            a,
            b,
            ab,
            ba,
            a_addr,
            b_addr,
        }
    }

    /// A pair whose handshake is complete and confirmed on both sides.
    pub fn connected() -> Self {
        let mut pair = Self::new();
        pair.a.initiate(pair.now, pair.ab);
        pair.pump();
        assert!(pair.a.has_session(pair.ab) && pair.b.has_session(pair.ba));
        pair
    }

    /// Delivers queued datagrams both ways until neither side has anything to send.
    pub fn pump(&mut self) {
        loop {
            let mut idle = true;
            while let Some(mut t) = self.a.poll_transmit() {
                idle = false;
                if let Received::Dropped(drop) = self.b.receive(self.now, self.a_addr, &mut t.data)
                {
                    panic!("b dropped a datagram from a: {drop:?}");
                }
            }
            while let Some(mut t) = self.b.poll_transmit() {
                idle = false;
                if let Received::Dropped(drop) = self.a.receive(self.now, self.b_addr, &mut t.data)
                {
                    panic!("a dropped a datagram from b: {drop:?}");
                }
            }
            if idle {
                return;
            }
        }
    }
}

/// Inner (tunnelled) address of the identity on node A, and on node B.
pub const A_INNER: [u8; 4] = [10, 1, 0, 1];
pub const B_INNER: [u8; 4] = [10, 2, 0, 1];

/// An IPv4/UDP packet of `total_len` bytes from `source` to `destination`, laid out for
/// sealing in place (headroom and tailroom around it).
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
    let checksum = ipv4_header_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp_len = ip_len - 20;
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&5201u16.to_be_bytes());
    packet[24..26].copy_from_slice(&udp_len.to_be_bytes());
    // UDP checksum 0: none, which IPv4 allows.
    packet[26..28].copy_from_slice(&[0, 0]);
    buf
}

fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A node configuration with one local identity and one peer node carrying one identity.
fn node_config(
    name: &str,
    listen: SocketAddr,
    (principal, key, address): (&Principal, &PrivateKey, IpNet),
    (peer_name, peer_endpoint, peer): (&str, SocketAddr, PeerIdentityConfig),
    default: DefaultAction,
) -> NodeConfig {
    let dir = PathBuf::from("/nonexistent/meshguard-bench").join(name);
    NodeConfig {
        path: dir.join("node.toml"),
        name: name.to_owned(),
        listen,
        interface: InterfaceConfig {
            name: "mgbench0".to_owned(),
            mtu: 1420,
            addresses: vec![address],
            offload: false,
            workers: None,
            queue_length: 4000,
        },
        peers_dir: dir.join("peers"),
        // No policies: the default decides every new inbound flow.
        policy: PolicyConfig {
            default,
            ..PolicyConfig::default()
        },
        identities: vec![LocalIdentityConfig {
            principal: principal.clone(),
            private_key_file: dir.join("identity.key"),
            private_key: key.clone(),
            public_key: key.public_key(),
            addresses: vec![address],
            labels: BTreeMap::new(),
        }],
        peers: vec![PeerConfig {
            path: dir.join("peers").join(format!("{peer_name}.toml")),
            name: peer_name.to_owned(),
            endpoint: Some(peer_endpoint),
            persistent_keepalive: None,
            identities: vec![peer],
        }],
    }
}

/// Two nodes, each hosting one identity and knowing the other's.
pub struct NodePair {
    pub now: Instant,
    pub a: Node,
    pub b: Node,
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
}

impl NodePair {
    /// Nodes whose allow lists have no policies and allow every flow: the benches
    /// measure the data path, not the allow list.
    pub fn new() -> Self {
        Self::with_defaults(DefaultAction::Allow, DefaultAction::Allow)
    }

    /// Nodes without policies whose defaults are `a_default` and `b_default`.
    pub fn with_defaults(a_default: DefaultAction, b_default: DefaultAction) -> Self {
        let now = Instant::now();
        let a_addr: SocketAddr = A_ENDPOINT.parse().expect("address");
        let b_addr: SocketAddr = B_ENDPOINT.parse().expect("address");
        let a_key = PrivateKey::generate();
        let b_key = PrivateKey::generate();
        let a_principal: Principal = "cluster.local/ns/bench/sa/client".parse().expect("valid");
        let b_principal: Principal = "cluster.local/ns/bench/sa/server".parse().expect("valid");
        let a_net = IpNet::new(Ipv4Addr::from(A_INNER).into(), 32).expect("prefix");
        let b_net = IpNet::new(Ipv4Addr::from(B_INNER).into(), 32).expect("prefix");
        let a_config = node_config(
            "node-a",
            a_addr,
            (&a_principal, &a_key, a_net),
            (
                "node-b",
                b_addr,
                PeerIdentityConfig {
                    principal: b_principal.clone(),
                    public_key: b_key.public_key(),
                    allowed_ips: vec![b_net],
                },
            ),
            a_default,
        );
        let b_config = node_config(
            "node-b",
            b_addr,
            (&b_principal, &b_key, b_net),
            (
                "node-a",
                a_addr,
                PeerIdentityConfig {
                    principal: a_principal,
                    public_key: a_key.public_key(),
                    allowed_ips: vec![a_net],
                },
            ),
            b_default,
        );
        NodePair {
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
        let mut first = ipv4_udp(A_INNER, B_INNER, 64);
        assert_eq!(pair.a.egress(pair.now, &mut first, 64), Egress::Queued);
        let delivered = pair.pump();
        assert_eq!(delivered, 1, "the queued packet went through");
        pair
    }

    /// Delivers queued datagrams both ways until neither side has anything to send;
    /// returns how many IP packets were delivered.
    pub fn pump(&mut self) -> usize {
        let mut delivered = 0;
        loop {
            let mut idle = true;
            while let Some(mut t) = self.a.poll_transmit() {
                idle = false;
                match self.b.ingress(self.now, self.a_addr, &mut t.data) {
                    Ingress::Deliver { .. } => delivered += 1,
                    Ingress::Control => {}
                    Ingress::Dropped(drop) => panic!("b dropped a datagram from a: {drop:?}"),
                }
            }
            while let Some(mut t) = self.b.poll_transmit() {
                idle = false;
                match self.a.ingress(self.now, self.b_addr, &mut t.data) {
                    Ingress::Deliver { .. } => delivered += 1,
                    Ingress::Control => {}
                    Ingress::Dropped(drop) => panic!("a dropped a datagram from b: {drop:?}"),
                }
            }
            if idle {
                return delivered;
            }
        }
    }
}
