//! A small Kubernetes API server for tests: list, watch, get and server-side apply of the
//! few resources meshguard uses, over plain HTTP, inside a namespace. It is a test
//! server, not a conformance claim: one resource version counter for everything, every
//! event kept for replay, no auth, no validation beyond what the tests need.
//!
//! Served: pods (with `fieldSelector=spec.nodeName=...`), nodes (get), meshnodes
//! (list, watch, get, apply), Istio's authorizationpolicies and peerauthentications in
//! `security.istio.io/v1` (list, watch, and the discovery document). Tests add and delete
//! objects, cut the server off (connections closed unanswered, open watches end), and read the log
//! of requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Netns;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A collection of objects: its URL path and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Collection {
    Pods,
    Nodes,
    MeshNodes,
    AuthorizationPolicies,
    PeerAuthentications,
}

impl Collection {
    const ALL: [Collection; 5] = [
        Collection::Pods,
        Collection::Nodes,
        Collection::MeshNodes,
        Collection::AuthorizationPolicies,
        Collection::PeerAuthentications,
    ];

    fn path(self, istio: &str) -> String {
        match self {
            Collection::Pods => "/api/v1/pods".to_owned(),
            Collection::Nodes => "/api/v1/nodes".to_owned(),
            Collection::MeshNodes => "/apis/meshguard.io/v1alpha1/meshnodes".to_owned(),
            Collection::AuthorizationPolicies => {
                format!("/apis/security.istio.io/{istio}/authorizationpolicies")
            }
            Collection::PeerAuthentications => {
                format!("/apis/security.istio.io/{istio}/peerauthentications")
            }
        }
    }

    /// The apiVersion and kind of the collection's objects.
    fn type_of(self, istio: &str) -> (String, &'static str) {
        match self {
            Collection::Pods => ("v1".to_owned(), "Pod"),
            Collection::Nodes => ("v1".to_owned(), "Node"),
            Collection::MeshNodes => ("meshguard.io/v1alpha1".to_owned(), "MeshNode"),
            Collection::AuthorizationPolicies => {
                (format!("security.istio.io/{istio}"), "AuthorizationPolicy")
            }
            Collection::PeerAuthentications => {
                (format!("security.istio.io/{istio}"), "PeerAuthentication")
            }
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Collection::Pods => "PodList",
            Collection::Nodes => "NodeList",
            Collection::MeshNodes => "MeshNodeList",
            Collection::AuthorizationPolicies => "AuthorizationPolicyList",
            Collection::PeerAuthentications => "PeerAuthenticationList",
        }
    }

    /// The collection and the object name (if any) of a request path; namespaced paths
    /// (`/api/v1/namespaces/NS/pods/NAME`) are not served, the cluster-wide ones are.
    fn of_path<'p>(path: &'p str, istio: &str) -> Option<(Collection, Option<&'p str>)> {
        Collection::ALL.iter().find_map(|c| {
            let prefix = c.path(istio);
            let rest = path.strip_prefix(prefix.as_str())?;
            match rest {
                "" => Some((*c, None)),
                _ => rest
                    .strip_prefix('/')
                    .filter(|n| !n.contains('/'))
                    .map(|n| (*c, Some(n))),
            }
        })
    }
}

/// One event, kept for watches that start later.
struct Event {
    version: u64,
    collection: Collection,
    kind: &'static str,
    object: Value,
}

struct Watch {
    collection: Collection,
    node: Option<String>,
    sender: mpsc::UnboundedSender<Bytes>,
}

struct State {
    version: u64,
    /// Per collection: `namespace/name` (or `name`) → object.
    objects: BTreeMap<Collection, BTreeMap<String, Value>>,
    events: Vec<Event>,
    watches: Vec<Watch>,
    down: bool,
    /// Watches asking for a version at or below this are told it expired (410).
    expired_below: u64,
    /// The version of `security.istio.io` served: "v1" or "v1beta1".
    istio: &'static str,
    requests: Vec<String>,
}

fn key_of(object: &Value) -> String {
    let metadata = &object["metadata"];
    match metadata["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", metadata["name"].as_str().unwrap_or("")),
        None => metadata["name"].as_str().unwrap_or("").to_owned(),
    }
}

fn on_node(object: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|n| object["spec"]["nodeName"].as_str() == Some(n))
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

impl State {
    /// Stores `object` (or removes it, for `DELETED`) with a new resource version and tells
    /// the watches.
    fn record(&mut self, collection: Collection, kind: &'static str, mut object: Value) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let key = key_of(&object);
        let objects = self.objects.entry(collection).or_default();
        if kind == "DELETED" {
            objects.remove(&key);
        } else {
            if object["metadata"]["uid"].is_null() {
                object["metadata"]["uid"] = json!(format!("uid-{}", self.version));
            }
            objects.insert(key, object.clone());
        }
        let line = watch_line(kind, &object);
        self.watches.retain(|w| {
            w.collection != collection
                || !on_node(&object, w.node.as_deref())
                || w.sender.send(line.clone()).is_ok()
        });
        self.events.push(Event {
            version: self.version,
            collection,
            kind,
            object: object.clone(),
        });
        object
    }
}

/// The server; stopped when dropped.
pub struct KubeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApiServer {
    /// Serves on `addr` inside `ns`, with Istio's API at `security.istio.io/v1`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> io::Result<KubeApiServer> {
        Self::start_with_istio(ns, addr, "v1")
    }

    /// Serves on `addr` inside `ns`, with Istio's API at `security.istio.io/VERSION`
    /// only ("v1" or "v1beta1", as older Istio releases serve).
    pub fn start_with_istio(
        ns: &Netns,
        addr: SocketAddr,
        istio: &'static str,
    ) -> io::Result<KubeApiServer> {
        let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            version: 0,
            objects: BTreeMap::new(),
            events: Vec::new(),
            watches: Vec::new(),
            down: false,
            expired_below: 0,
            istio,
            requests: Vec::new(),
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let accept = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                continue;
                            };
                            let state = Arc::clone(&served);
                            tokio::spawn(async move {
                                let service = service_fn(move |r| handle(r, Arc::clone(&state)));
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(KubeApiServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server (plain http, a token nobody checks).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: \
             http://{}\nusers:\n- name: test\n  user:\n    token: test\ncontexts:\n- name: test\n  \
             context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
            self.addr
        )
    }

    /// Adds or replaces an object (`ADDED` or `MODIFIED` to the watches).
    pub fn put(&self, collection: Collection, object: Value) -> Value {
        let mut state = self.state.lock().expect("state");
        let exists = state
            .objects
            .get(&collection)
            .is_some_and(|o| o.contains_key(&key_of(&object)));
        state.record(
            collection,
            if exists { "MODIFIED" } else { "ADDED" },
            object,
        )
    }

    /// Deletes an object by `namespace/name` (or `name`); false if there was none.
    pub fn delete(&self, collection: Collection, key: &str) -> bool {
        let mut state = self.state.lock().expect("state");
        let Some(object) = state
            .objects
            .get(&collection)
            .and_then(|o| o.get(key))
            .cloned()
        else {
            return false;
        };
        state.record(collection, "DELETED", object);
        true
    }

    pub fn get(&self, collection: Collection, key: &str) -> Option<Value> {
        let state = self.state.lock().expect("state");
        state.objects.get(&collection)?.get(key).cloned()
    }

    /// Cuts the server off (`true`: every request's connection is closed without an
    /// answer, as by a server that went away, and open watches end) or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut state = self.state.lock().expect("state");
        state.down = down;
        if down {
            state.watches.clear();
        }
    }

    /// From now on, a watch from any version up to the current one is told its version
    /// expired (410 Gone), as after a compaction: the client has to list again.
    pub fn expire_history(&self) {
        let mut state = self.state.lock().expect("state");
        state.expired_below = state.version;
        state.watches.clear();
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("state").requests.clone()
    }
}

/// The RBAC (API group, resource, verb) a request (`method`, `path?query`) needs; `None`
/// for API discovery, which every authenticated user may read. Panics on a request
/// outside the resources meshguard uses.
pub fn rbac_of(method: &str, target: &str) -> Option<(&'static str, &'static str, &'static str)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest): (&str, &[&str]) = match segments[..] {
        ["api", "v1", ref rest @ ..] => ("", rest),
        ["apis", "meshguard.io", _, ref rest @ ..] => ("meshguard.io", rest),
        ["apis", "security.istio.io", _, ref rest @ ..] => ("security.istio.io", rest),
        _ => panic!("unexpected request {method} {target}"),
    };
    if rest.is_empty() {
        return None;
    }
    let resource = match rest[0] {
        "pods" => "pods",
        "nodes" => "nodes",
        "meshnodes" => "meshnodes",
        "authorizationpolicies" => "authorizationpolicies",
        "peerauthentications" => "peerauthentications",
        other => panic!("unexpected resource {other}"),
    };
    let group: &'static str = match group {
        "" => "",
        "meshguard.io" => "meshguard.io",
        _ => "security.istio.io",
    };
    let verb = match (method, rest.len(), query.contains("watch=true")) {
        ("GET", 1, true) => "watch",
        ("GET", 1, false) => "list",
        ("GET", 2, _) => "get",
        ("PATCH", 2, _) => "patch",
        _ => panic!("unexpected request {method} {target}"),
    };
    Some((group, resource, verb))
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.state.lock().expect("state").watches.clear();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).expect("json"))).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.to_owned(), v.replace("%3D", "=").replace("%2F", "/")))
        })
        .collect()
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Body>, io::Error> {
    let (parts, body) = request.into_parts();
    let line = format!(
        "{} {}",
        parts.method,
        parts.uri.path_and_query().map_or("", |p| p.as_str())
    );
    let istio = {
        let mut s = state.lock().expect("state");
        s.requests.push(line);
        if s.down {
            return Err(io::Error::other("the test server is down"));
        }
        s.istio
    };
    let path = parts.uri.path();
    if path == format!("/apis/security.istio.io/{istio}") {
        let resource = |name: &str, singular: &str, kind: &str| {
            json!({"name": name, "singularName": singular, "namespaced": true, "kind": kind,
                   "verbs": ["get", "list", "watch"]})
        };
        return Ok(full(
            StatusCode::OK,
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": format!("security.istio.io/{istio}"), "resources": [
                resource("authorizationpolicies", "authorizationpolicy", "AuthorizationPolicy"),
                resource("peerauthentications", "peerauthentication", "PeerAuthentication"),
            ]}),
        ));
    }
    let Some((collection, name)) = Collection::of_path(path, istio) else {
        return Ok(status(StatusCode::NOT_FOUND, "NotFound", "not served"));
    };
    let query = query(&parts.uri);
    let node = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_owned);
    match (parts.method.clone(), name) {
        (Method::GET, Some(name)) => {
            let s = state.lock().expect("state");
            Ok(match s.objects.get(&collection).and_then(|o| o.get(name)) {
                Some(object) => full(StatusCode::OK, object.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            })
        }
        (Method::PATCH, Some(name)) if collection == Collection::MeshNodes => {
            let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
                return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "no body"));
            };
            let Ok(mut object) = serde_json::from_slice::<Value>(&bytes) else {
                return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON"));
            };
            if object["metadata"]["name"].as_str() != Some(name) {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "name differs",
                ));
            }
            let mut s = state.lock().expect("state");
            let previous = s
                .objects
                .get(&collection)
                .and_then(|o| o.get(name))
                .cloned();
            if let Some(uid) = previous.as_ref().map(|p| p["metadata"]["uid"].clone()) {
                object["metadata"]["uid"] = uid;
            }
            let kind = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let stored = s.record(collection, kind, object);
            Ok(full(StatusCode::OK, stored))
        }
        (Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => {
            Ok(watch(&state, collection, node, &query))
        }
        (Method::GET, None) => {
            let s = state.lock().expect("state");
            let items: Vec<Value> = s
                .objects
                .get(&collection)
                .map(|o| {
                    o.values()
                        .filter(|v| on_node(v, node.as_deref()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            Ok(full(
                StatusCode::OK,
                json!({"kind": collection.list_kind(), "apiVersion": "v1",
                       "metadata": {"resourceVersion": s.version.max(1).to_string()},
                       "items": items}),
            ))
        }
        _ => Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served",
        )),
    }
}

/// A watch from the asked version: the events since then, then what comes, until the
/// server goes down.
fn watch(
    state: &Arc<Mutex<State>>,
    collection: Collection,
    node: Option<String>,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut s = state.lock().expect("state");
    if from < s.expired_below {
        let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {from} ({})", s.version)});
        let _ = sender.send(watch_line("ERROR", &gone));
    } else {
        for event in s.events.iter().filter(|e| {
            e.version > from && e.collection == collection && on_node(&e.object, node.as_deref())
        }) {
            let _ = sender.send(watch_line(event.kind, &event.object));
        }
        // A bookmark: where the watch is now, as a real server sends them now and then.
        let (api_version, kind) = collection.type_of(s.istio);
        let bookmark = json!({"apiVersion": api_version, "kind": kind,
                              "metadata": {"resourceVersion": s.version.max(1).to_string()}});
        let _ = sender.send(watch_line("BOOKMARK", &bookmark));
        s.watches.push(Watch {
            collection,
            node,
            sender,
        });
    }
    drop(s);
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    response
}
