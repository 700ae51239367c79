//! Reconfiguring a running node with 1,000 peer identities (`Node::reconfigure`, the
//! work done under the node's lock on every reload).
//!
//! Run with `cargo bench --bench reconfigure`. Numbers are informational; nothing asserts
//! them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use divan::Bencher;
use ipnet::IpNet;
use meshguard::config::{NodeConfig, PeerConfig, PeerIdentityConfig};
use meshguard::identity::PrivateKey;
use meshguard::node::Node;
use meshguard::policy::PolicySet;
use meshguard::testbed::fixtures::{seeded, NodePair, UNIX_START};

const PEERS: usize = 1_000;

fn main() {
    divan::main();
}

/// Node A of the fixtures' pair, with `count` more peer nodes of one identity each.
fn config_with_peers(count: usize) -> NodeConfig {
    let mut config = NodePair::new().a_config;
    for i in 0..count {
        let key = PrivateKey::generate();
        let address: IpNet = format!("10.200.{}.{}/32", i / 250, i % 250 + 1)
            .parse()
            .expect("address");
        let endpoint: SocketAddr = format!("198.19.{}.{}:51820", i / 250, i % 250 + 1)
            .parse()
            .expect("endpoint");
        config.peers.push(PeerConfig {
            path: PathBuf::from(format!("/nonexistent/peers/peer-{i}.toml")),
            name: format!("peer-{i}"),
            endpoint: Some(endpoint),
            persistent_keepalive: None,
            identities: vec![PeerIdentityConfig {
                principal: format!("cluster.local/ns/bench/sa/peer-{i}")
                    .parse()
                    .expect("principal"),
                public_key: key.public_key(),
                next_public_key: None,
                allowed_ips: vec![address],
            }],
        });
    }
    config
}

/// The same configuration again: nothing to change (a policy reload, or a touched file).
#[divan::bench]
fn unchanged_1000_peers(bencher: Bencher) {
    let config = config_with_peers(PEERS);
    let policy = PolicySet::default();
    let now = Instant::now();
    let mut node = Node::new(&config, &policy, seeded(1), now, UNIX_START);
    bencher.bench_local(|| node.reconfigure(now, &config, &policy));
}

/// One peer node joins or leaves a mesh of 1,000, in turn.
#[divan::bench]
fn one_peer_in_or_out_of_1000(bencher: Bencher) {
    let with = config_with_peers(PEERS + 1);
    let mut without = with.clone();
    without.peers.pop();
    let policy = PolicySet::default();
    let now = Instant::now();
    let mut node = Node::new(&with, &policy, seeded(1), now, UNIX_START);
    let mut joined = true;
    bencher.bench_local(|| {
        joined = !joined;
        node.reconfigure(now, if joined { &with } else { &without }, &policy)
    });
}
