//! Kubernetes mode end to end, in namespaces: two daemons against a small list/watch/apply
//! API server written for the tests (`testbed::KubeApiServer`, a test server, not a
//! conformance claim), each with a real kubeconfig file. Pods created through the API
//! become identities, the daemons publish their MeshNodes and pick up each other's, ping
//! and a TCP transfer pass between the pods' addresses, an AuthorizationPolicy created
//! through the API closes a port within seconds, a deleted pod's identity goes, an
//! outage of the API changes nothing, and a 410 Gone makes the daemons list again.
//! Needs root.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use meshguard::kubernetes::API_ACCESS;
use meshguard::testbed::{
    ping, ping_stats, rbac_of, require_root, tcp_connect, tcp_transfer, wait_until, Collection,
    KubeApiServer, KubeNodeSpec, Lan, MeshguardNode, Netns, PacedStream,
};

const A_POD: &str = "10.50.1.1";
const A_POD2: &str = "10.50.1.2";
const B_POD: &str = "10.50.2.1";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshguard"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn pod(namespace: &str, name: &str, node: &str, account: &str, address: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": account}},
        "spec": {"nodeName": node, "serviceAccountName": account,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]}
    })
}

fn deny_port(port: u16) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("deny-{port}"), "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [port.to_string()]}}]}]}
    })
}

fn status_of(daemon: &MeshguardNode) -> meshguard::ops::DaemonStatus {
    daemon.status(binary()).unwrap()
}

fn principals(daemon: &MeshguardNode) -> Vec<String> {
    status_of(daemon)
        .node
        .identities
        .into_iter()
        .map(|i| i.principal)
        .collect()
}

/// A test API server and two nodes' namespaces on one LAN (198.18.NET.0/24; the server
/// at .100, node-a at .1, node-b at .2), the server holding Nodes node-a and node-b, the
/// pod web-1 on node-a and db-1 on node-b. Fields drop in order: the server first.
struct Setup {
    api: KubeApiServer,
    ns_a: Netns,
    ns_b: Netns,
    _ns_api: Netns,
    _lan: Lan,
    net: u8,
}

fn setup(tag: &str, net: u8, istio: &'static str) -> Setup {
    let lan = Lan::new(&format!("{tag}l")).unwrap();
    let ns_api = Netns::new(&format!("{tag}api")).unwrap();
    let (ns_a, ns_b) = (
        Netns::new(&format!("{tag}a")).unwrap(),
        Netns::new(&format!("{tag}b")).unwrap(),
    );
    lan.attach(&ns_api, &format!("198.18.{net}.100/24"))
        .unwrap();
    lan.attach(&ns_a, &format!("198.18.{net}.1/24")).unwrap();
    lan.attach(&ns_b, &format!("198.18.{net}.2/24")).unwrap();
    let address = format!("198.18.{net}.100:6443").parse().unwrap();
    let api = KubeApiServer::start_with_istio(&ns_api, address, istio).unwrap();
    api.put(Collection::Nodes, node("node-a"));
    api.put(Collection::Nodes, node("node-b"));
    api.put(
        Collection::Pods,
        pod("shop", "web-1", "node-a", "web", A_POD),
    );
    api.put(Collection::Pods, pod("shop", "db-1", "node-b", "db", B_POD));
    Setup {
        api,
        ns_a,
        ns_b,
        _ns_api: ns_api,
        _lan: lan,
        net,
    }
}

impl Setup {
    /// node-a (`a`) or node-b, with the pod addresses `addresses` on its device.
    fn spec(&self, a: bool, addresses: &[&str]) -> KubeNodeSpec {
        let (name, host) = if a { ("node-a", 1) } else { ("node-b", 2) };
        KubeNodeSpec {
            name: name.into(),
            listen: format!("198.18.{}.{host}:51820", self.net).parse().unwrap(),
            addresses: addresses.iter().map(|a| format!("{a}/32")).collect(),
            default: "allow",
            key_rotation: None,
        }
    }

    fn start(&self, a: bool, addresses: &[&str]) -> MeshguardNode {
        let ns = if a { &self.ns_a } else { &self.ns_b };
        let spec = self.spec(a, addresses);
        MeshguardNode::start_kubernetes(binary(), ns, &spec, &self.api.kubeconfig()).unwrap()
    }

    /// Whether a TCP connection from A's web pod to B's db pod on `port` is accepted.
    fn open(&self, port: u16) -> bool {
        tcp_connect(
            &self.ns_a,
            Some(ip(A_POD)),
            SocketAddr::new(ip(B_POD), port),
            Duration::from_secs(2),
        )
        .is_ok()
    }

    /// Listeners on B's db pod at `ports`.
    fn listen(&self, ports: &[u16]) -> Vec<std::net::TcpListener> {
        ports
            .iter()
            .map(|p| {
                self.ns_b
                    .tcp_listen(SocketAddr::new(ip(B_POD), *p))
                    .unwrap()
            })
            .collect()
    }
}

#[test]
fn pods_meshnodes_and_policies_from_the_api_drive_the_mesh() {
    if !require_root() {
        return;
    }
    let setup = setup("k8", 31, "v1");
    let Setup {
        api, ns_a, ns_b, ..
    } = &setup;
    let a = setup.start(true, &[A_POD, A_POD2]);
    let b = setup.start(false, &[B_POD]);
    assert_eq!(principals(&a), ["cluster.local/ns/shop/sa/web"]);

    // Each publishes its MeshNode (owned by its Node) and picks up the other's.
    let published = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        api.get(Collection::MeshNodes, "node-a").is_some()
            && api.get(Collection::MeshNodes, "node-b").is_some()
    });
    assert!(published, "{}", a.log());
    let mesh_node = api.get(Collection::MeshNodes, "node-a").unwrap();
    assert_eq!(mesh_node["spec"]["endpoint"], "198.18.31.1:51820");
    assert_eq!(
        mesh_node["spec"]["identities"][0]["allowedIPs"],
        json!([format!("{A_POD}/32")])
    );
    let owner = &mesh_node["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Node");
    assert_eq!(
        owner["uid"],
        api.get(Collection::Nodes, "node-a").unwrap()["metadata"]["uid"]
    );
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r
            .starts_with("PATCH /apis/meshguard.io/v1alpha1/meshnodes/node-a?")
            && r.contains("fieldManager=meshguard")
            && r.contains("force=true")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:#?}"
    );

    let reached = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        ping(ns_a, Some(ip(A_POD)), ip(B_POD), 1)
    });
    assert!(reached, "A:\n{}\nB:\n{}", a.log(), b.log());
    let report = tcp_transfer(
        ns_b,
        SocketAddr::new(ip(B_POD), 0),
        ns_a,
        Some(ip(A_POD)),
        5_000_000,
    )
    .unwrap();
    assert!(report.is_intact(), "{report}");

    // A DENY created through the API closes port 7000 on B's pods; 7001 stays open.
    let _listeners = setup.listen(&[7000, 7001]);
    let open = |port: u16| setup.open(port);
    assert!(open(7000));
    api.put(Collection::AuthorizationPolicies, deny_port(7000));
    let closed = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        !open(7000)
    });
    assert!(closed, "B:\n{}", b.log());
    assert!(open(7001));

    // A second pod on A: a new identity, which B can reach once A's MeshNode says so.
    api.put(
        Collection::Pods,
        pod("shop", "api-1", "node-a", "api", A_POD2),
    );
    let appeared = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        ping(ns_b, Some(ip(B_POD)), ip(A_POD2), 1)
    });
    assert!(appeared, "A:\n{}\nB:\n{}", a.log(), b.log());
    assert_eq!(
        principals(&a),
        [
            "cluster.local/ns/shop/sa/api",
            "cluster.local/ns/shop/sa/web"
        ]
    );
    // Deleting it takes the identity away again.
    assert!(api.delete(Collection::Pods, "shop/api-1"));
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        principals(&a) == ["cluster.local/ns/shop/sa/web"]
    });
    assert!(gone, "{}", a.log());
    let unreachable = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        !ping(ns_b, Some(ip(B_POD)), ip(A_POD2), 1)
    });
    assert!(unreachable);

    // The API goes away: traffic and policy stay as they were.
    api.set_down(true);
    std::thread::sleep(Duration::from_secs(3));
    assert!(ping(ns_a, Some(ip(A_POD)), ip(B_POD), 3));
    assert!(!open(7000), "the DENY stays in force");
    assert!(open(7001));
    let errors = status_of(&a).kubernetes.unwrap().api_errors;
    assert!(
        errors > 0,
        "A:\n{}\nrequests: {:#?}",
        a.log(),
        api.requests()
    );
    api.set_down(false);

    // History expires (410 Gone): the daemons list again and go on following changes.
    api.expire_history();
    api.delete(Collection::AuthorizationPolicies, "shop/deny-7000");
    let reopened = wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        open(7000)
    });
    assert!(reopened, "B:\n{}", b.log());
    let lists = api
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/security.istio.io/v1/authorizationpolicies?")
                && !r.contains("watch=true")
        })
        .count();
    assert!(
        lists >= 3,
        "each daemon listed again after the 410: {lists}"
    );

    // Every request the daemons made is one the ClusterRole grants.
    for request in api.requests() {
        let (method, target) = request.split_once(' ').unwrap();
        let Some((group, resource, verb)) = rbac_of(method, target) else {
            continue;
        };
        let granted = API_ACCESS
            .iter()
            .any(|(g, r, verbs)| *g == group && *r == resource && verbs.contains(&verb));
        assert!(granted, "{request} needs {verb} on {group}/{resource}");
    }

    let log = b.stop().unwrap();
    assert!(log.contains("configuration reloaded"), "{log}");
    drop(a);
}

#[test]
fn nothing_is_made_before_the_first_sync_and_v1beta1_policies_apply() {
    if !require_root() {
        return;
    }
    // An older Istio: only security.istio.io/v1beta1.
    let setup = setup("k9", 32, "v1beta1");
    let Setup { api, ns_a, .. } = &setup;
    let mut deny = deny_port(7000);
    deny["apiVersion"] = json!("security.istio.io/v1beta1");
    api.put(Collection::AuthorizationPolicies, deny);

    // With the API unreachable, the daemon waits: no device, nothing sent.
    api.set_down(true);
    let a = MeshguardNode::spawn_kubernetes(
        binary(),
        ns_a,
        &setup.spec(true, &[A_POD]),
        &api.kubeconfig(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.process().is_running(), "{}", a.log());
    assert!(
        a.log().contains("waiting for the first complete sync"),
        "{}",
        a.log()
    );
    assert!(!a.log().contains("meshguard is up"), "{}", a.log());
    assert!(
        ns_a.ip(["link", "show", "mg0"]).is_err(),
        "no device before the first sync"
    );
    api.set_down(false);
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        a.log().contains("meshguard is up")
    });
    assert!(up, "{}", a.log());

    let _b = setup.start(false, &[B_POD]);
    let reached = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        ping(ns_a, Some(ip(A_POD)), ip(B_POD), 1)
    });
    assert!(reached, "{}", a.log());
    let _listeners = setup.listen(&[7000, 7001]);
    assert!(!setup.open(7000), "the v1beta1 DENY applies");
    assert!(setup.open(7001));
}

/// node-b rotates its service account's key every 6 s (3 s of overlap) while node-a
/// pings and streams TCP to it: each next key is published beside the key, node-a moves
/// to it, node-b switches, and nothing is lost.
#[test]
fn keys_rotate_with_overlap_under_traffic() {
    if !require_root() {
        return;
    }
    let setup = setup("kr", 33, "v1");
    let Setup {
        api, ns_a, ns_b, ..
    } = &setup;
    let a = setup.start(true, &[A_POD]);
    let mut spec_b = setup.spec(false, &[B_POD]);
    spec_b.key_rotation = Some(("6s", "3s"));
    let b = MeshguardNode::start_kubernetes(binary(), ns_b, &spec_b, &api.kubeconfig()).unwrap();
    let reached = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        ping(ns_a, Some(ip(A_POD)), ip(B_POD), 1)
    });
    assert!(reached, "{}", a.log());

    let published_keys = || -> Vec<String> {
        api.get(Collection::MeshNodes, "node-b")
            .and_then(|n| {
                serde_json::from_value(n["spec"]["identities"][0]["publicKeys"].clone()).ok()
            })
            .unwrap_or_default()
    };
    let first = published_keys();
    assert_eq!(first.len(), 1, "{first:?}");
    let stream =
        PacedStream::start(ns_a, ip(A_POD), ns_b, SocketAddr::new(ip(B_POD), 7000)).unwrap();
    // What node-b publishes, every 100 ms while the ping runs (16 s).
    let (pings, seen) = std::thread::scope(|scope| {
        let pinger = scope.spawn(|| ping_stats(ns_a, Some(ip(A_POD)), ip(B_POD), 80));
        let mut seen: Vec<Vec<String>> = vec![first.clone()];
        while !pinger.is_finished() {
            let keys = published_keys();
            if seen.last() != Some(&keys) {
                seen.push(keys);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (pinger.join().unwrap().unwrap(), seen)
    });
    let (sent, received) = stream.finish().unwrap();
    eprintln!(
        "rotations under traffic: {received} bytes of TCP intact; ping {}/{}; published keys: {seen:?}",
        pings.received, pings.transmitted
    );
    assert_eq!(sent, received, "the stream arrived whole");
    assert_eq!(pings.received, pings.transmitted, "no ping lost");
    // Each rotation: [key] -> [key, next] -> [next].
    let overlaps: Vec<_> = seen.iter().filter(|keys| keys.len() == 2).collect();
    assert!(overlaps.len() >= 2, "at least two rotations: {seen:?}");
    for window in seen.windows(2) {
        let (before, after) = (&window[0], &window[1]);
        let step_ok = match (before.len(), after.len()) {
            (1, 2) => after[0] == before[0],
            (2, 1) => after[0] == before[1],
            _ => false,
        };
        assert!(step_ok, "a rotation step from {before:?} to {after:?}");
    }
    let last = seen.last().unwrap();
    assert!(
        !last.contains(&first[0]),
        "the first key is retired: {seen:?}"
    );
    let status = status_of(&b);
    assert!(
        status.kubernetes.as_ref().unwrap().key_rotation_steps >= 4,
        "{:?}",
        status.kubernetes
    );
    // The key on disk is the one published, private.
    let key_file = b.config_path().with_file_name("state").join("shop_db.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(a);
}
