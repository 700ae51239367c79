//! The data path end to end, sans IO: encapsulate on one side, decapsulate on the other.
//!
//! `node_egress_ingress_among_prefixes` does the same with 10 or 10,000 allowed-IP
//! prefixes of other peers in both nodes' routing tables (100 peers of /32s and /24s),
//! to show what the longest-prefix lookups cost as tables grow.
//!
//! Also the allow-list decision for a new inbound flow (`policy_decision`): the example
//! policy compiled for node-a's two identities and 1,000 peer identities. A tracked flow
//! skips the decision; its cost is part of `node_egress_ingress`.
//!
//! Run with `cargo bench --bench datapath`. Numbers are informational; nothing asserts them.

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshguard::config::{PeerConfig, PeerIdentityConfig};
use meshguard::identity::PrivateKey;

use meshguard::identity::{LocalId, PeerId, Principal};
use meshguard::node::{Egress, Ingress};
use meshguard::policy::{
    parse_toml, DefaultAction, Evaluator, PolicySet, Protocol, Request, Target,
};
use meshguard::proto::{Received, Sealed};

use meshguard::testbed::fixtures::{buffer, ipv4_udp, DevicePair, NodePair, A_INNER, B_INNER};

fn main() {
    divan::main();
}

/// `Device::seal` on A, then `Device::receive` on B, of one `size`-byte plaintext. Opening
/// in place restores the plaintext, so one buffer serves every iteration.
#[divan::bench(args = [64, 1420])]
fn device_seal_receive(bencher: Bencher, size: usize) {
    let mut pair = DevicePair::connected();
    let mut buf = buffer(size);
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
    egress_ingress(bencher, NodePair::connected());
}

/// A's egress and B's ingress of one 1420-byte IPv4/UDP packet, per iteration.
fn egress_ingress(bencher: Bencher, mut pair: NodePair) {
    const SIZE: usize = 1420;
    let mut buf = ipv4_udp(A_INNER, B_INNER, SIZE);
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

/// `node_egress_ingress` with `prefixes` allowed-IP prefixes of 100 other peers in both
/// nodes' tables: two thirds /32s in 10.128.0.0/10, one third /24s in 10.192.0.0/10.
#[divan::bench(args = [10, 10_000])]
fn node_egress_ingress_among_prefixes(bencher: Bencher, prefixes: usize) {
    let mut pair = NodePair::connected();
    let extra = other_peers(prefixes);
    let policy = PolicySet::default();
    let now = pair.now;
    let (mut a_config, mut b_config) = (pair.a_config.clone(), pair.b_config.clone());
    a_config.peers.extend(extra.iter().cloned());
    b_config.peers.extend(extra);
    pair.a.reconfigure(now, &a_config, &policy);
    pair.b.reconfigure(now, &b_config, &policy);
    egress_ingress(bencher, pair);
}

/// 100 peer nodes of one identity each, holding `prefixes` allowed IPs between them.
fn other_peers(prefixes: usize) -> Vec<PeerConfig> {
    let nets: Vec<IpNet> = (0..prefixes)
        .map(|k| {
            let text = if k % 3 == 2 {
                let n = k / 3;
                format!("10.{}.{}.0/24", 192 + n / 256, n % 256)
            } else {
                format!("10.{}.{}.{}/32", 128 + k / 65_536, k / 256 % 256, k % 256)
            };
            text.parse().expect("prefix")
        })
        .collect();
    let per_peer = prefixes.div_ceil(100);
    nets.chunks(per_peer)
        .enumerate()
        .map(|(i, chunk)| PeerConfig {
            path: PathBuf::from(format!("/nonexistent/peers/other-{i}.toml")),
            name: format!("other-{i}"),
            endpoint: Some(SocketAddr::from(([198, 19, 0, i as u8 + 1], 51820))),
            persistent_keepalive: None,
            identities: vec![PeerIdentityConfig {
                principal: format!("cluster.local/ns/bench/sa/other-{i}")
                    .parse()
                    .expect("principal"),
                public_key: PrivateKey::generate().public_key(),
                next_public_key: None,
                allowed_ips: chunk.to_vec(),
            }],
        })
        .collect()
}

/// One allow-list decision (a new inbound flow) with `config/policy-example.toml`.
#[divan::bench(args = [true, false])]
fn policy_decision(bencher: Bencher, allowed: bool) {
    let text = include_str!("../config/policy-example.toml");
    let set = parse_toml(text, Path::new("policy-example.toml")).expect("example parses");
    let locals: Vec<(Principal, BTreeMap<String, String>)> = [
        (
            "cluster.local/ns/payments/sa/payment-service",
            "payment-service",
        ),
        ("cluster.local/ns/payments/sa/ledger", "ledger"),
    ]
    .iter()
    .map(|(p, app)| {
        let labels = BTreeMap::from([("app".to_owned(), (*app).to_owned())]);
        (p.parse().expect("principal"), labels)
    })
    .collect();
    let targets: Vec<Target> = locals
        .iter()
        .map(|(principal, labels)| Target { principal, labels })
        .collect();
    let mut peers: Vec<Principal> = (0..999)
        .map(|i| {
            format!("cluster.local/ns/ns-{}/sa/service-{i}", i % 50)
                .parse()
                .expect("principal")
        })
        .collect();
    peers.push(
        "cluster.local/ns/web/sa/frontend"
            .parse()
            .expect("principal"),
    );
    let peer_refs: Vec<&Principal> = peers.iter().collect();
    let evaluator = Evaluator::new(
        &set,
        DefaultAction::Deny,
        "istio-system",
        &targets,
        &peer_refs,
    );
    let frontend = PeerId::new(peers.len() - 1);
    let payment_service = LocalId::new(0);
    let request = Request {
        source_ip: Some("10.10.2.1".parse().expect("address")),
        destination_ip: Some("10.10.1.1".parse().expect("address")),
        protocol: Protocol::Tcp,
        port: Some(if allowed { 8080 } else { 9999 }),
    };
    assert_eq!(
        evaluator
            .evaluate(payment_service, frontend, &request)
            .allowed,
        allowed
    );
    bencher.bench_local(|| {
        evaluator.evaluate(
            black_box(payment_service),
            black_box(frontend),
            black_box(&request),
        )
    });
}
