//! What operators are told about a node, on two nodes with a simulated clock: traffic
//! counted per tunnel as wireguard-go counts it, the userspace API's `get` answer and
//! `set` refusals, the Prometheus text, and the status text.

use std::collections::BTreeMap;
use std::time::Duration;

use meshguard::node::{Ingress, NodeStatus};
use meshguard::ops::uapi::{self, Operation, SetRequest};
use meshguard::ops::{metrics, status_text, DaemonStatus, ReloadCounts};
use meshguard::policy::DefaultAction;
use meshguard::testbed::fixtures::{ipv4_udp, NodePair, A_INNER, B_INNER, UNIX_START};

fn report(node: NodeStatus) -> DaemonStatus {
    DaemonStatus {
        name: "node-a".to_owned(),
        interface: "mg0".to_owned(),
        listen: "198.18.0.1:51820".parse().unwrap(),
        workers: 1,
        realtime: true,
        realtime_share_percent: 50,
        realtime_drops: 0,
        version: "0.0.0-test".to_owned(),
        started_at: UNIX_START.as_secs(),
        uapi_names: uapi::socket_names("mg0", node.identities.len()),
        reloads: ReloadCounts::default(),
        send_errors: BTreeMap::from([("send_too_large".to_owned(), 0)]),
        tun_write_errors: 0,
        plaintext_dropped: None,
        kubernetes: None,
        node,
    }
}

/// A connected pair after A sent B `packets` more packets of 200 bytes and B answered
/// each.
fn exchanged(packets: usize) -> NodePair {
    let mut pair = NodePair::with_defaults(DefaultAction::Allow, DefaultAction::Allow).connect();
    for _ in 0..packets {
        let ingress = pair.a_to_b(ipv4_udp(A_INNER, B_INNER, 200), 200);
        assert!(matches!(ingress, Ingress::Deliver { .. }));
        let ingress = pair.b_to_a(ipv4_udp(B_INNER, A_INNER, 200), 200);
        assert!(matches!(ingress, Ingress::Deliver { .. }));
    }
    pair
}

#[test]
fn both_ends_count_the_same_bytes_and_packets() {
    let pair = exchanged(10);
    let (a, b) = (pair.a.status(), pair.b.status());
    let (a_traffic, b_traffic) = (a.pairs[0].traffic(), b.pairs[0].traffic());
    // One packet went through the handshake (connect), ten more each way after.
    assert_eq!(a_traffic.tx_packets, 11);
    assert_eq!(b_traffic.rx_packets, 11);
    assert_eq!(b_traffic.tx_packets, 10);
    assert_eq!(a_traffic.rx_packets, 10);
    // Every datagram one sent the other received: handshake messages, data, keepalives.
    assert_eq!(a_traffic.tx_bytes, b_traffic.rx_bytes);
    assert_eq!(b_traffic.tx_bytes, a_traffic.rx_bytes);
    // Initiation (148), the first packet (64 bytes: 16 + 64 + 16), then 10 data messages
    // of 16 + 208 + 16 (200 bytes padded to 208).
    assert_eq!(a_traffic.tx_bytes, 148 + 96 + 10 * 240);
    // Response (92) + 10 data messages.
    assert_eq!(b_traffic.tx_bytes, 92 + 10 * 240);
    assert_eq!(a_traffic.last_handshake, Some(UNIX_START));
    assert_eq!(b_traffic.last_handshake, Some(UNIX_START));
    assert!(a.pairs[0].tunnels[0].has_session);
    assert_eq!(a.pairs[0].tunnels[0].endpoint, Some(pair.b_addr));
    // B let one new flow in (A's first packet opened it; the rest belong to it).
    assert_eq!(b.pairs[0].decisions.allowed, 1);
}

#[test]
fn the_get_answer_is_what_wg_reads() {
    let pair = exchanged(3);
    let status = report(pair.a.status());
    let key = &pair.a_config.identities[0].private_key;
    let answer = uapi::get_response(&status, 0, Some(key));
    let traffic = status.node.pairs[0].traffic();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let peer_key = pair.b_config.identities[0].public_key;
    let expected = format!(
        "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
         protocol_version=1\nendpoint=198.18.0.2:51820\nlast_handshake_time_sec={}\n\
         last_handshake_time_nsec=0\ntx_bytes={}\nrx_bytes={}\n\
         persistent_keepalive_interval=0\nallowed_ip=10.2.0.1/32\nallowed_ip=fd00:2::1/128\n\
         errno=0\n\n",
        hex(&key.as_bytes()),
        hex(peer_key.as_bytes()),
        "0".repeat(64),
        UNIX_START.as_secs(),
        traffic.tx_bytes,
        traffic.rx_bytes,
    );
    assert_eq!(answer.as_str(), expected);
    // Without the private key, the same answer without its line.
    let without = uapi::get_response(&status, 0, None);
    assert_eq!(
        without.as_str(),
        expected.split_once('\n').unwrap().1,
        "only the private key left out"
    );
}

#[test]
fn socket_names_fit_wg() {
    assert_eq!(uapi::socket_names("mg0", 1), [Some("mg0".to_owned())]);
    assert_eq!(
        uapi::socket_names("mg0", 2),
        [Some("mg0.1".to_owned()), Some("mg0.2".to_owned())]
    );
    // 15 characters at most: `meshguard-pod.1` fits, `meshguard-pods.1` does not.
    assert_eq!(
        uapi::socket_names("meshguard-pod", 2)[0].as_deref(),
        Some("meshguard-pod.1")
    );
    assert_eq!(uapi::socket_names("meshguard-pods", 2), [None, None]);
}

fn set_errno(lines: &[&str]) -> i32 {
    let mut request = SetRequest::default();
    for line in lines {
        assert!(request.line(line.as_bytes()));
    }
    assert!(!request.line(b""), "a blank line ends the request");
    request.errno()
}

#[test]
fn set_requests_are_refused_and_malformed_ones_said_so() {
    let key = "a".repeat(64);
    assert_eq!(Operation::parse(b"get=1"), Ok(Operation::Get));
    assert_eq!(Operation::parse(b"set=1"), Ok(Operation::Set));
    assert_eq!(Operation::parse(b"GET / HTTP/1.1"), Err(uapi::EPROTO));
    assert_eq!(Operation::parse(b"get=2"), Err(uapi::EPROTO));
    // Well formed: not supported (the configuration lives in files).
    let public = format!("public_key={key}");
    let well_formed = [
        "listen_port=51820",
        "replace_peers=true",
        &public,
        "endpoint=[fd00::1]:51820",
        "allowed_ip=10.0.0.0/8",
        "persistent_keepalive_interval=25",
    ];
    assert_eq!(set_errno(&well_formed), uapi::EOPNOTSUPP);
    // Malformed values, unknown keys, peer keys before any peer: invalid.
    assert_eq!(set_errno(&["private_key=zz"]), uapi::EINVAL);
    assert_eq!(set_errno(&["public_key=abc"]), uapi::EINVAL);
    assert_eq!(set_errno(&["listen_port=70000"]), uapi::EINVAL);
    assert_eq!(set_errno(&["endpoint=198.18.0.2:51820"]), uapi::EINVAL);
    assert_eq!(
        set_errno(&[&public, "allowed_ip=10.0.0.300/8"]),
        uapi::EINVAL
    );
    assert_eq!(set_errno(&["no_such_key=1"]), uapi::EINVAL);
    // Not `key=value` at all, or not text: a protocol error.
    assert_eq!(set_errno(&["garbage"]), uapi::EPROTO);
    let mut request = SetRequest::default();
    assert!(request.line(&[0xff, b'=', 0xfe]));
    assert_eq!(request.errno(), uapi::EPROTO);
    // The first error is the one answered.
    assert_eq!(set_errno(&["garbage", "listen_port=x"]), uapi::EPROTO);
}

/// Every sample line of `text`, as (name with labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("name and value");
            (name.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn metrics_carry_the_counters_with_their_labels() {
    let mut pair = exchanged(4);
    let status = pair.b.status();
    let tracked = status.flows.tracked;
    assert!(tracked > 0);
    let text = metrics::encode(report(status));
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let all = samples(&text);
    let value = |name: &str| {
        all.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
            .1
    };
    let pair_labels = "local=\"cluster.local/ns/bench/sa/server\",peer=\"cluster.local/ns/bench/sa/client\",peer_node=\"node-a\"";
    assert_eq!(
        value(&format!(
            "meshguard_peer_received_packets_total{{{pair_labels}}}"
        )),
        5.0
    );
    assert_eq!(
        value(&format!(
            "meshguard_peer_sent_packets_total{{{pair_labels}}}"
        )),
        4.0
    );
    assert_eq!(
        value(&format!(
            "meshguard_peer_last_handshake_seconds{{{pair_labels}}}"
        )),
        UNIX_START.as_secs() as f64
    );
    assert_eq!(
        value("meshguard_policy_decisions_total{source=\"cluster.local/ns/bench/sa/client\",destination=\"cluster.local/ns/bench/sa/server\",action=\"allow\"}"),
        1.0
    );
    assert_eq!(
        value("meshguard_handshakes_total{result=\"completed\"}"),
        1.0
    );
    assert_eq!(value("meshguard_build_info{version=\"0.0.0-test\"}"), 1.0);
    assert_eq!(value("meshguard_flows"), tracked as f64);
    assert_eq!(value("meshguard_reloads_total{result=\"applied\"}"), 0.0);
    assert_eq!(value("meshguard_tun_write_errors_total"), 0.0);
    assert_eq!(value("meshguard_realtime_drops_total"), 0.0);
    let mut refused = report(pair.b.status());
    refused.tun_write_errors = 3;
    refused.realtime_drops = 7;
    let text = metrics::encode(refused);
    for sample in [
        ("meshguard_tun_write_errors_total".to_owned(), 3.0),
        ("meshguard_realtime_drops_total".to_owned(), 7.0),
    ] {
        assert!(samples(&text).contains(&sample), "{text}");
    }

    // A packet the node drops shows under its reason.
    pair.b.set_policy(&meshguard::policy::PolicySet::default());
    let before = value("meshguard_dropped_total{reason=\"no_peer\"}");
    let mut buf = ipv4_udp(B_INNER, [10, 99, 0, 1], 100);
    let _ = pair.b.egress(pair.now, &mut buf, 100);
    let text = metrics::encode(report(pair.b.status()));
    let after = samples(&text)
        .into_iter()
        .find(|(n, _)| n == "meshguard_dropped_total{reason=\"no_peer\"}")
        .unwrap()
        .1;
    assert_eq!(after, before + 1.0);
}

#[test]
fn the_status_text_names_identities_peers_and_traffic() {
    let pair = exchanged(2);
    let status = report(pair.a.status());
    let text = status_text::render(&status, UNIX_START + Duration::from_secs(75));
    for expected in [
        "node node-a (meshguard 0.0.0-test), up 1 min 15 s",
        "  interface mg0, listening on 198.18.0.1:51820, 1 worker at real-time priority up to \
         50 % of a core each (over it 0 times)",
        "identity cluster.local/ns/bench/sa/client (wg interface mg0)",
        "  peer cluster.local/ns/bench/sa/server on node node-b",
        "    endpoint: 198.18.0.2:51820",
        "    latest handshake: 1 min 15 s ago",
        "(2 / 3 packets)",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    assert!(!text.contains("lost in refused writes"), "{text}");
    let mut lossy = status.clone();
    lossy.tun_write_errors = 40;
    lossy.send_errors.insert("send_no_buffers".to_owned(), 2);
    let text = status_text::render(&lossy, UNIX_START);
    assert!(
        text.contains("lost in refused writes: 2 datagrams (UDP sends), 40 packets (TUN writes)"),
        "{text}"
    );
    // The report goes through JSON to `meshguard status` unchanged.
    let json = serde_json::to_string(&status).unwrap();
    let back: DaemonStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(
        status_text::render(&back, UNIX_START),
        status_text::render(&status, UNIX_START)
    );
}
