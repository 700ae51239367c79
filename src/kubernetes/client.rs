//! The API side of Kubernetes mode: watches of the pods on this node, of every
//! `MeshNode`, and of Istio's `AuthorizationPolicy`s and `PeerAuthentication`s, each
//! into a store that keeps the last state it read; the first complete sync; and this
//! node's `MeshNode`, published with server-side apply.
//!
//! An API that cannot be reached changes nothing: the watches retry with backoff while
//! the stores keep what they last read, and every failure is logged and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config, Resource};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::compose::ClusterObjects;
use super::crd::{MeshNode, MeshNodeSpec};
use crate::config::KubernetesConfig;

/// The field manager of this node's server-side applies.
pub const FIELD_MANAGER: &str = "meshguard";
const ISTIO_GROUP: &str = "security.istio.io";
const ISTIO_KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];
/// Served Istio API versions, preferred first.
const ISTIO_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Longest wait between two attempts to publish this node's `MeshNode`.
const MAX_PUBLISH_BACKOFF: Duration = Duration::from_secs(30);

/// A client for the API server `settings` name: a kubeconfig file (`kubernetes.kubeconfig`,
/// else `KUBECONFIG`), or the pod's service account when neither is set.
pub async fn connect(settings: &KubernetesConfig) -> Result<Client> {
    let path = settings
        .kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(Into::into));
    let config = match &path {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context(
            "no kubeconfig (kubernetes.kubeconfig or KUBECONFIG) and not running in a pod",
        )?,
    };
    Client::try_from(config).context("making the Kubernetes client")
}

/// The watched state of the cluster, and this node's publisher.
pub struct Cluster {
    pods: Store<Pod>,
    mesh_nodes: Store<MeshNode>,
    istio: Vec<Store<DynamicObject>>,
    changed: Arc<Notify>,
    errors: Arc<AtomicU64>,
    publish: watch::Sender<Option<MeshNodeSpec>>,
    published: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cluster {
    /// Starts the watches and the publisher for Node `node`. Istio's API is looked up
    /// first (v1, else v1beta1); a cluster without it has no policies to watch, and the
    /// node file's default decides.
    pub async fn start(client: Client, node: &str) -> Result<Cluster> {
        let changed = Arc::new(Notify::new());
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();

        let (pods, writer) = reflector::store::<Pod>();
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        tasks.push(spawn_watch(
            watcher(Api::<Pod>::all(client.clone()), on_node),
            writer,
            &changed,
            &errors,
            "pods",
        ));
        let (mesh_nodes, writer) = reflector::store::<MeshNode>();
        tasks.push(spawn_watch(
            watcher(
                Api::<MeshNode>::all(client.clone()),
                watcher::Config::default(),
            ),
            writer,
            &changed,
            &errors,
            "meshnodes",
        ));
        let mut istio = Vec::new();
        for kind in ISTIO_KINDS {
            let Some(resource) = istio_resource(&client, kind, &errors).await? else {
                tracing::warn!(
                    kind,
                    "Istio's {ISTIO_GROUP} API is not served: no {kind}s to watch"
                );
                continue;
            };
            let writer = reflector::store::Writer::new(resource.clone());
            istio.push(writer.as_reader());
            tasks.push(spawn_watch(
                watcher(
                    Api::<DynamicObject>::all_with(client.clone(), &resource),
                    watcher::Config::default(),
                ),
                writer,
                &changed,
                &errors,
                kind,
            ));
        }
        let (publish, wanted) = watch::channel(None);
        let published = Arc::new(AtomicU64::new(0));
        tasks.push(tokio::spawn(publisher(
            client,
            node.to_owned(),
            wanted,
            Arc::clone(&errors),
            Arc::clone(&published),
        )));
        Ok(Cluster {
            pods,
            mesh_nodes,
            istio,
            changed,
            errors,
            publish,
            published,
            tasks,
        })
    }

    /// Returns once every watch has listed its objects once.
    pub async fn wait_synced(&self) {
        let _ = self.pods.wait_until_ready().await;
        let _ = self.mesh_nodes.wait_until_ready().await;
        for store in &self.istio {
            let _ = store.wait_until_ready().await;
        }
    }

    /// Returns when a watch has seen something change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// What the stores hold now.
    pub fn objects(&self) -> ClusterObjects {
        let istio = self
            .istio
            .iter()
            .flat_map(|store| store.state())
            .filter_map(|object| serde_json::to_value(object.as_ref()).ok())
            .collect();
        ClusterObjects {
            pods: self
                .pods
                .state()
                .iter()
                .map(|p| p.as_ref().clone())
                .collect(),
            mesh_nodes: self
                .mesh_nodes
                .state()
                .iter()
                .map(|n| n.as_ref().clone())
                .collect(),
            istio,
        }
    }

    /// Has this node's `MeshNode` say `spec` (applied in the background, again after
    /// failures, the latest spec winning).
    pub fn publish(&self, spec: MeshNodeSpec) {
        self.publish.send_if_modified(|current| {
            let new = current.as_ref() != Some(&spec);
            if new {
                *current = Some(spec);
            }
            new
        });
    }

    /// API requests and watches that failed so far.
    pub fn api_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Successful applies of this node's `MeshNode` so far.
    pub fn publications(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// Runs a watch into its store, waking `changed` on every event; failures are counted
/// and the watch goes on after a backoff.
fn spawn_watch<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    writer: reflector::store::Writer<K>,
    changed: &Arc<Notify>,
    errors: &Arc<AtomicU64>,
    what: &'static str,
) -> JoinHandle<()>
where
    K: Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (changed, errors) = (Arc::clone(changed), Arc::clone(errors));
    tokio::spawn(async move {
        let stream = stream.default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        resource = what,
                        %error,
                        "Kubernetes API watch failed; retrying, the last state read stays in force"
                    );
                }
            }
        }
    })
}

/// The served version of Istio's `kind`; `None` if neither is served. Until the API
/// answers, it is asked again (with backoff): nothing is decided on a failure.
async fn istio_resource(
    client: &Client,
    kind: &str,
    errors: &AtomicU64,
) -> Result<Option<ApiResource>> {
    let mut backoff = Duration::from_millis(500);
    'retry: loop {
        for version in ISTIO_VERSIONS {
            let gvk = GroupVersionKind::gvk(ISTIO_GROUP, version, kind);
            match kube::discovery::pinned_kind(client, &gvk).await {
                Ok((resource, _)) => return Ok(Some(resource)),
                Err(kube::Error::Api(status)) if status.code == 404 => continue,
                Err(error) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, kind, "looking up Istio's API failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_PUBLISH_BACKOFF);
                    continue 'retry;
                }
            }
        }
        return Ok(None);
    }
}

/// Applies the latest wanted spec as Node `node`'s `MeshNode`, owned by the Node (so it
/// goes with it), until the daemon ends.
async fn publisher(
    client: Client,
    node: String,
    mut wanted: watch::Receiver<Option<MeshNodeSpec>>,
    errors: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mesh_nodes: Api<MeshNode> = Api::all(client);
    let mut backoff = Duration::from_millis(500);
    loop {
        let Some(spec) = wanted.borrow_and_update().clone() else {
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        };
        match apply(&nodes, &mesh_nodes, &node, spec).await {
            Ok(()) => {
                published.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(500);
                if wanted.changed().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, node, "publishing this node's MeshNode failed; retrying");
                // A newer spec cuts the wait short.
                let _ = tokio::time::timeout(backoff, wanted.changed()).await;
                backoff = (backoff * 2).min(MAX_PUBLISH_BACKOFF);
            }
        }
    }
}

async fn apply(
    nodes: &Api<Node>,
    mesh_nodes: &Api<MeshNode>,
    node: &str,
    spec: MeshNodeSpec,
) -> Result<(), kube::Error> {
    let owner = nodes.get(node).await?.owner_ref(&());
    let mut object = MeshNode::new(node, spec);
    object.metadata.owner_references = owner.map(|o| vec![o]);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    mesh_nodes
        .patch(node, &params, &Patch::Apply(&object))
        .await?;
    Ok(())
}
