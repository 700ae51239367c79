//! The Kubernetes client at the level of API requests, with kube's `tower_test` mock
//! pattern: the daemon's `Cluster` runs on a `kube::Client` whose every request lands in
//! this test, which checks it and answers it by hand. Checked: the exact requests (the
//! pod watch's field selector, watches with bookmarks from the list's resource version,
//! the server-side apply and its field manager and owner), a stream of ADDED, MODIFIED,
//! DELETED and BOOKMARK events, a 410 Gone and the relist, an outage during which the
//! state stays as it was, and that every (resource, verb) used is one the ClusterRole
//! grants.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use meshguard::kubernetes::client::Cluster;
use meshguard::kubernetes::crd::{MeshIdentity, MeshNodeSpec};
use meshguard::kubernetes::API_ACCESS;
use meshguard::testbed::rbac_of;

const NODE: &str = "node-a";
const NODE_UID: &str = "7d1c3f52-0a57-4c2e-9a57-6c1e3a1b2c3d";
const WAIT: Duration = Duration::from_secs(10);

type MockHandle = Handle<Request<kube::client::Body>, Response<Full<Bytes>>>;

/// One request the client made, read whole, with the means to answer it.
struct Call {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Vec<u8>,
    respond: SendResponse<Response<Full<Bytes>>>,
}

impl Call {
    fn target(&self) -> String {
        let query: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}?{}", self.path, query.join("&"))
    }

    fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    fn reply(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a response");
        self.respond.send_response(response);
    }

    fn ok(self, body: &Value) {
        self.reply(StatusCode::OK, body);
    }

    /// Answers a watch with `events` (one JSON object per line); the response then ends,
    /// as a server's watch does at its timeout.
    fn events(self, events: &[Value]) {
        let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(lines)))
            .expect("a response");
        self.respond.send_response(response);
    }

    /// What the API server says while it cannot serve.
    fn unavailable(self) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "etcdserver: request timed out", "reason": "ServiceUnavailable",
            "code": 503});
        self.reply(StatusCode::SERVICE_UNAVAILABLE, &status);
    }
}

/// The other end of the mock client: takes the requests in the order the test asks for
/// them (the client's watches run concurrently, so others wait in `pending`) and keeps a
/// log of every one.
struct ApiServerVerifier {
    handle: MockHandle,
    pending: Vec<Call>,
    log: Vec<(Method, String)>,
}

impl ApiServerVerifier {
    fn new() -> (kube::Client, ApiServerVerifier) {
        let (service, handle) = mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
        let client = kube::Client::new(service, "default");
        let verifier = ApiServerVerifier {
            handle,
            pending: Vec::new(),
            log: Vec::new(),
        };
        (client, verifier)
    }

    /// The next request that `wanted` accepts (`what` names it in a failure).
    async fn next(&mut self, what: &str, wanted: impl Fn(&Call) -> bool) -> Call {
        if let Some(at) = self.pending.iter().position(&wanted) {
            return self.pending.remove(at);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let received = tokio::time::timeout_at(deadline, self.handle.next_request()).await;
            let Ok(Some((request, respond))) = received else {
                let pending: Vec<String> = self.pending.iter().map(Call::target).collect();
                panic!("no request for {what}; waiting unanswered: {pending:?}");
            };
            let (parts, body) = request.into_parts();
            let body = body.collect().await.expect("a request body").to_bytes();
            let query = parts
                .uri
                .query()
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default();
            let call = Call {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query,
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: body.to_vec(),
                respond,
            };
            self.log.push((call.method.clone(), call.target()));
            if wanted(&call) {
                return call;
            }
            self.pending.push(call);
        }
    }

    async fn list(&mut self, collection: &str) -> Call {
        let call = self
            .next(&format!("a list of {collection}"), |c| {
                c.method == Method::GET && c.path == collection && !c.is_watch()
            })
            .await;
        assert_eq!(call.query.get("limit").map(String::as_str), Some("500"));
        call
    }

    async fn watch(&mut self, collection: &str) -> Call {
        let call = self
            .next(&format!("a watch of {collection}"), |c| {
                c.method == Method::GET && c.path == collection && c.is_watch()
            })
            .await;
        assert_eq!(
            call.query.get("allowWatchBookmarks").map(String::as_str),
            Some("true"),
            "{}",
            call.target()
        );
        call
    }

    /// Serves Cluster::start's discovery and the first list of every collection
    /// (`lists`: collection path → items, all at resource version `version`), and
    /// returns the first watches, checked to start where the lists ended.
    async fn first_sync(
        &mut self,
        lists: &[(&str, Vec<Value>)],
        version: &str,
    ) -> BTreeMap<String, Call> {
        for _ in 0..2 {
            self.next("Istio's discovery", |c| {
                c.path == "/apis/security.istio.io/v1"
            })
            .await
            .ok(&istio_discovery());
        }
        for (collection, items) in lists {
            let kind = kind_of(collection);
            self.list(collection)
                .await
                .ok(&list(&format!("{kind}List"), items, version));
        }
        let mut watches = BTreeMap::new();
        for (collection, _) in lists {
            let watch = self.watch(collection).await;
            assert_eq!(
                watch.query.get("resourceVersion").map(String::as_str),
                Some(version),
                "{}",
                watch.target()
            );
            watches.insert(collection.to_string(), watch);
        }
        watches
    }
}

const PODS: &str = "/api/v1/pods";
const MESH_NODES: &str = "/apis/meshguard.io/v1alpha1/meshnodes";
const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";

fn kind_of(collection: &str) -> &'static str {
    match collection {
        PODS => "Pod",
        MESH_NODES => "MeshNode",
        POLICIES => "AuthorizationPolicy",
        PEER_AUTHENTICATIONS => "PeerAuthentication",
        other => panic!("no collection {other}"),
    }
}

fn istio_discovery() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "security.istio.io/v1",
        "resources": [
            {"name": "authorizationpolicies", "singularName": "authorizationpolicy",
             "namespaced": true, "kind": "AuthorizationPolicy",
             "verbs": ["get", "list", "watch"]},
            {"name": "peerauthentications", "singularName": "peerauthentication",
             "namespaced": true, "kind": "PeerAuthentication",
             "verbs": ["get", "list", "watch"]}]})
}

fn list(kind: &str, items: &[Value], version: &str) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": version},
        "items": items})
}

fn pod(name: &str, account: &str, ip: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "payments", "uid": format!("uid-{name}"),
                     "resourceVersion": version, "labels": {"app": account}},
        "spec": {"nodeName": NODE, "serviceAccountName": account,
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn mesh_node(name: &str, endpoint: &str, version: &str) -> Value {
    json!({"apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": version},
        "spec": {"endpoint": endpoint, "identities": [{
            "principal": "cluster.local/ns/payments/sa/ledger",
            "publicKeys": ["HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="],
            "allowedIPs": ["10.50.2.1/32"]}]}})
}

fn deny_policy(version: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-7000", "namespace": "payments", "uid": "uid-deny",
                     "resourceVersion": version},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["7000"]}}]}]}})
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(kind: &str, version: &str) -> Value {
    let api_version = if kind == "MeshNode" {
        "meshguard.io/v1alpha1"
    } else {
        "v1"
    };
    event(
        "BOOKMARK",
        json!({"apiVersion": api_version, "kind": kind,
               "metadata": {"resourceVersion": version}}),
    )
}

/// The names of the `MeshNode`s (with their endpoints) and pods the cluster's stores hold.
fn held(cluster: &Cluster) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let objects = cluster.objects();
    let nodes = objects
        .mesh_nodes
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.spec.endpoint.clone(),
            )
        })
        .collect();
    let pods = objects
        .pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    (nodes, pods)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a `Cluster` for `NODE` on the mock and serves its first sync.
async fn started(
    lists: &[(&str, Vec<Value>)],
    version: &str,
) -> (Cluster, ApiServerVerifier, BTreeMap<String, Call>) {
    let (client, mut api) = ApiServerVerifier::new();
    let start = tokio::spawn(async move { Cluster::start(client, NODE).await });
    let watches = api.first_sync(lists, version).await;
    let cluster = tokio::time::timeout(WAIT, start)
        .await
        .expect("Cluster::start returns")
        .expect("no panic")
        .expect("started");
    tokio::time::timeout(WAIT, cluster.wait_synced())
        .await
        .expect("synced after every first list");
    (cluster, api, watches)
}

fn all_lists(
    pods: Vec<Value>,
    mesh_nodes: Vec<Value>,
    policies: Vec<Value>,
) -> Vec<(&'static str, Vec<Value>)> {
    vec![
        (PODS, pods),
        (MESH_NODES, mesh_nodes),
        (POLICIES, policies),
        (PEER_AUTHENTICATIONS, vec![]),
    ]
}

fn spec(endpoint: &str) -> MeshNodeSpec {
    MeshNodeSpec {
        endpoint: endpoint.to_owned(),
        identities: vec![MeshIdentity {
            principal: "cluster.local/ns/payments/sa/checkout".to_owned(),
            public_keys: vec!["xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".to_owned()],
            allowed_ips: vec!["10.50.1.1/32".to_owned()],
        }],
    }
}

#[tokio::test]
async fn requests_carry_the_selector_bookmarks_and_apply_parameters_and_the_role_grants_them() {
    let lists = all_lists(
        vec![pod("checkout-1", "checkout", "10.50.1.1", "90")],
        vec![mesh_node("node-b", "198.18.0.2:51820", "95")],
        vec![],
    );
    let (cluster, mut api, watches) = started(&lists, "100").await;

    // Only this node's pods, watched with the same selector as listed.
    assert_eq!(
        watches[PODS].query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=node-a")
    );
    let pod_list = api
        .log
        .iter()
        .find(|(m, t)| m == Method::GET && t.starts_with(PODS) && !t.contains("watch=true"))
        .expect("the pods were listed");
    assert!(
        pod_list.1.contains("fieldSelector=spec.nodeName=node-a"),
        "{pod_list:?}"
    );
    let (nodes, pods) = held(&cluster);
    assert_eq!(nodes["node-b"], "198.18.0.2:51820");
    assert_eq!(pods, BTreeSet::from(["checkout-1".to_owned()]));

    // Publishing: the Node is read for its uid, then the MeshNode is applied server-side
    // with field manager "meshguard", forced, owned by the Node.
    cluster.publish(spec("198.18.0.1:51820"));
    api.next("the Node", |c| {
        c.method == Method::GET && c.path == format!("/api/v1/nodes/{NODE}")
    })
    .await
    .ok(&json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "uid": NODE_UID, "resourceVersion": "7"}}));
    let apply = api
        .next("the MeshNode's apply", |c| c.method == Method::PATCH)
        .await;
    assert_eq!(apply.path, format!("{MESH_NODES}/{NODE}"));
    assert_eq!(
        apply.query.get("fieldManager").map(String::as_str),
        Some("meshguard")
    );
    assert_eq!(apply.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body: Value = serde_json::from_slice(&apply.body).expect("the apply body is JSON");
    assert_eq!(body["apiVersion"], "meshguard.io/v1alpha1");
    assert_eq!(body["kind"], "MeshNode");
    assert_eq!(body["metadata"]["name"], NODE);
    assert_eq!(
        body["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE_UID}])
    );
    assert_eq!(
        body["spec"],
        serde_json::to_value(spec("198.18.0.1:51820")).unwrap()
    );
    let mut applied = body.clone();
    applied["metadata"]["resourceVersion"] = json!("101");
    apply.ok(&applied);
    eventually("the publication is counted", || cluster.publications() == 1).await;

    // A changed spec is applied again.
    cluster.publish(spec("198.18.0.1:51821"));
    api.next("the Node", |c| {
        c.method == Method::GET && c.path.starts_with("/api/v1/nodes/")
    })
    .await
    .ok(&json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "uid": NODE_UID}}));
    let apply = api
        .next("the second apply", |c| c.method == Method::PATCH)
        .await;
    let body: Value = serde_json::from_slice(&apply.body).unwrap();
    assert_eq!(body["spec"]["endpoint"], "198.18.0.1:51821");
    apply.ok(&body);
    eventually("the second publication", || cluster.publications() == 2).await;

    // Every request is one the ClusterRole grants; what it grants beyond them is the
    // issue's list (single gets, and create, which a server-side apply that makes the
    // object may be checked for).
    let mut used = BTreeSet::new();
    for (method, target) in &api.log {
        if let Some(access) = rbac_of(method.as_str(), target) {
            used.insert(access);
        }
    }
    let granted: BTreeSet<(&str, &str, &str)> = API_ACCESS
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (*g, *r, *v)))
        .collect();
    let beyond: BTreeSet<_> = used.difference(&granted).collect();
    assert!(beyond.is_empty(), "used but not granted: {beyond:?}");
    let unused: BTreeSet<_> = granted.difference(&used).copied().collect();
    assert_eq!(
        unused,
        BTreeSet::from([
            ("", "pods", "get"),
            ("meshguard.io", "meshnodes", "get"),
            ("meshguard.io", "meshnodes", "create"),
            ("security.istio.io", "authorizationpolicies", "get"),
            ("security.istio.io", "peerauthentications", "get"),
        ])
    );
    drop(watches);
}

#[tokio::test]
async fn watch_events_reach_the_stores_and_bookmarks_move_the_resource_version() {
    let lists = all_lists(vec![], vec![], vec![]);
    let (cluster, mut api, mut watches) = started(&lists, "100").await;
    assert_eq!(held(&cluster), (BTreeMap::new(), BTreeSet::new()));

    watches.remove(MESH_NODES).unwrap().events(&[
        event("ADDED", mesh_node("node-b", "198.18.0.2:51820", "101")),
        event("ADDED", mesh_node("node-c", "198.18.0.3:51820", "102")),
        event("MODIFIED", mesh_node("node-b", "198.18.0.22:51820", "103")),
        event("DELETED", mesh_node("node-c", "198.18.0.3:51820", "104")),
        bookmark("MeshNode", "150"),
    ]);
    watches.remove(PODS).unwrap().events(&[
        event("ADDED", pod("checkout-1", "checkout", "10.50.1.1", "105")),
        event("ADDED", pod("checkout-2", "checkout", "10.50.1.2", "106")),
        event("DELETED", pod("checkout-1", "checkout", "10.50.1.1", "107")),
    ]);
    eventually("the events are in the stores", || {
        let (nodes, pods) = held(&cluster);
        nodes == BTreeMap::from([("node-b".to_owned(), "198.18.0.22:51820".to_owned())])
            && pods == BTreeSet::from(["checkout-2".to_owned()])
    })
    .await;

    // The watches end (as at a server's timeout) and start again where they were: after
    // the bookmark for the MeshNodes, after the last event for the pods. No relist.
    let rewatch = api.watch(MESH_NODES).await;
    assert_eq!(
        rewatch.query.get("resourceVersion").map(String::as_str),
        Some("150")
    );
    let rewatch_pods = api.watch(PODS).await;
    assert_eq!(
        rewatch_pods
            .query
            .get("resourceVersion")
            .map(String::as_str),
        Some("107")
    );
    assert_eq!(
        rewatch_pods.query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=node-a")
    );
    let lists = api
        .log
        .iter()
        .filter(|(_, t)| !t.contains("watch=true") && t.contains("limit="))
        .count();
    assert_eq!(lists, 4, "one list per collection: {:?}", api.log);

    // A policy created through the API reaches the policy store.
    watches
        .remove(POLICIES)
        .unwrap()
        .events(&[event("ADDED", deny_policy("160"))]);
    eventually("the policy is in the store", || {
        cluster.objects().istio.len() == 1
    })
    .await;
    assert_eq!(cluster.objects().istio[0]["metadata"]["name"], "deny-7000");
    assert_eq!(cluster.api_errors(), 0);
    drop((rewatch, rewatch_pods));
}

#[tokio::test]
async fn a_410_gone_makes_the_watch_list_again() {
    let lists = all_lists(
        vec![],
        vec![
            mesh_node("node-b", "198.18.0.2:51820", "90"),
            mesh_node("node-c", "198.18.0.3:51820", "91"),
        ],
        vec![],
    );
    let (cluster, mut api, mut watches) = started(&lists, "100").await;
    assert_eq!(held(&cluster).0.len(), 2);

    // The history the watch would resume from is gone.
    watches.remove(MESH_NODES).unwrap().events(&[event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "too old resource version: 100 (250)", "reason": "Expired",
               "code": 410}),
    )]);
    // node-c went while the history was lost: only the relist can say so.
    let relist = api.list(MESH_NODES).await;
    assert!(
        !relist.query.contains_key("resourceVersion")
            || relist.query.get("resourceVersion").map(String::as_str) == Some("0"),
        "the relist starts afresh: {}",
        relist.target()
    );
    relist.ok(&list(
        "MeshNodeList",
        &[mesh_node("node-b", "198.18.0.2:51820", "90")],
        "250",
    ));
    eventually("the relist replaced the store", || {
        held(&cluster).0.len() == 1
    })
    .await;
    assert!(held(&cluster).0.contains_key("node-b"));
    assert!(cluster.api_errors() >= 1, "the 410 was counted");

    let watch = api.watch(MESH_NODES).await;
    assert_eq!(
        watch.query.get("resourceVersion").map(String::as_str),
        Some("250")
    );
    drop((watch, watches));
}

#[tokio::test]
async fn an_api_outage_leaves_the_state_as_it_was() {
    let lists = all_lists(
        vec![pod("checkout-1", "checkout", "10.50.1.1", "90")],
        vec![mesh_node("node-b", "198.18.0.2:51820", "91")],
        vec![deny_policy("92")],
    );
    let (cluster, mut api, watches) = started(&lists, "100").await;
    let before = cluster.objects();
    let snapshot = |objects: &meshguard::kubernetes::compose::ClusterObjects| {
        (
            serde_json::to_value(&objects.pods).unwrap(),
            serde_json::to_value(&objects.mesh_nodes).unwrap(),
            objects.istio.clone(),
        )
    };

    // The connections drop, and every request after is refused (503) for a while; a
    // publication in the meantime fails too.
    for (_, watch) in watches {
        watch.respond.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
    }
    cluster.publish(spec("198.18.0.1:51820"));
    let mut refused = 0;
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < outage_end {
        let Ok(call) = tokio::time::timeout_at(outage_end, api.next("any", |_| true)).await else {
            break;
        };
        call.unavailable();
        refused += 1;
        assert_eq!(snapshot(&cluster.objects()), snapshot(&before));
    }
    assert!(refused >= 4, "the client kept trying: {refused} requests");
    assert_eq!(snapshot(&cluster.objects()), snapshot(&before));
    assert!(
        cluster.api_errors() >= 4,
        "errors counted: {}",
        cluster.api_errors()
    );
    assert_eq!(cluster.publications(), 0);

    // The API answers again: the watches resume (or relist) and the publication lands.
    let mut published = false;
    let mut mesh_node_watch = None;
    while !(published && mesh_node_watch.is_some()) {
        // Other watches wait unanswered, as they would on a quiet cluster.
        let call = api
            .next("a request after the outage", |c| {
                !c.is_watch() || c.path == MESH_NODES
            })
            .await;
        let path = call.path.clone();
        match (call.method.clone(), path.as_str()) {
            (Method::GET, p) if p.starts_with("/api/v1/nodes/") => call.ok(&json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE, "uid": NODE_UID}})),
            (Method::PATCH, _) => {
                let body: Value = serde_json::from_slice(&call.body).unwrap();
                call.ok(&body);
                published = true;
            }
            (Method::GET, "/apis/security.istio.io/v1") => call.ok(&istio_discovery()),
            (Method::GET, _) if call.is_watch() => mesh_node_watch = Some(call),
            (Method::GET, path) => {
                let items: Vec<Value> = match path {
                    PODS => before
                        .pods
                        .iter()
                        .map(|p| serde_json::to_value(p).unwrap())
                        .collect(),
                    MESH_NODES => vec![mesh_node("node-b", "198.18.0.2:51820", "91")],
                    POLICIES => vec![deny_policy("92")],
                    _ => vec![],
                };
                call.ok(&list(&format!("{}List", kind_of(path)), &items, "100"));
            }
            (method, path) => panic!("unexpected {method} {path}"),
        }
    }
    eventually("published after the outage", || cluster.publications() == 1).await;
    assert_eq!(snapshot(&cluster.objects()), snapshot(&before));

    // And changes flow again.
    mesh_node_watch.unwrap().events(&[event(
        "MODIFIED",
        mesh_node("node-b", "198.18.0.9:51820", "120"),
    )]);
    eventually("a change after the outage arrives", || {
        held(&cluster).0.get("node-b").map(String::as_str) == Some("198.18.0.9:51820")
    })
    .await;
}
