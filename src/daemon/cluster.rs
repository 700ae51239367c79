//! Kubernetes mode in the daemon: the cluster, not the files, says what the node's
//! identities, peers and policies are. The first configuration waits for a complete sync
//! of every watch (the device is not even made before: nothing is sent), later ones
//! follow the cluster's changes through the same difference-applying reload as a changed
//! file. A configuration the cluster's objects do not make is refused like a broken file:
//! what runs stays.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::config::NodeConfig;
use crate::file_error::FileError;
use crate::kubernetes::client::{self, Cluster};
use crate::kubernetes::compose::{compose, ThisNode};
use crate::kubernetes::crd::MeshNodeSpec;
use crate::kubernetes::keys::{KeyStore, RotationStep};
use crate::kubernetes::translate::Skipped;
use crate::ops::KubernetesCounts;
use crate::policy::PolicySet;

/// How long after a change of the cluster's objects it is applied, so that a burst of
/// events (a relist, a rollout) makes one reload.
pub(super) const SETTLE_TIME: Duration = Duration::from_millis(200);
/// How often waiting for the first sync is reported.
const WAITING_REPORT: Duration = Duration::from_secs(10);

/// What this node publishes as its endpoint: `kubernetes.endpoint`, else a specific
/// listen address, else `NODE_IP` with the listen port.
fn published_endpoint(configured: Option<SocketAddr>, listen: SocketAddr) -> Result<SocketAddr> {
    if let Some(endpoint) = configured {
        return Ok(endpoint);
    }
    if !listen.ip().is_unspecified() {
        return Ok(listen);
    }
    let ip = std::env::var("NODE_IP").context(
        "listen is a wildcard address: set kubernetes.endpoint, or NODE_IP (the downward \
         API's status.hostIP), so the other nodes know where to send",
    )?;
    let ip = ip
        .parse()
        .with_context(|| format!("NODE_IP {ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, listen.port()))
}

pub(super) struct ClusterSource {
    cluster: Cluster,
    /// The node file: device, listen address, operators' settings, the policy default.
    base: NodeConfig,
    this: ThisNode,
    keys: KeyStore,
    /// What was left out at the last composition, to log only what is new.
    reported: Vec<Skipped>,
    /// When the next key rotation step is due.
    next_rotation: Option<SystemTime>,
    rotation_steps: u64,
    /// The `MeshNode` of the last composition, published once the node runs it.
    composed: Option<MeshNodeSpec>,
}

impl ClusterSource {
    /// Connects, watches, waits for the first complete sync and composes the first
    /// configuration (waiting for changes while the cluster's objects do not make one).
    pub(super) async fn start(base: NodeConfig) -> Result<(ClusterSource, NodeConfig, PolicySet)> {
        let settings = base
            .kubernetes
            .clone()
            .context("the node file has no [kubernetes]")?;
        let node = settings
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .context("no node name: set kubernetes.node_name or NODE_NAME")?;
        let endpoint = published_endpoint(settings.endpoint, base.listen)?;
        let keys = KeyStore::open(&settings.state_dir).with_context(|| {
            format!("opening the key directory {}", settings.state_dir.display())
        })?;
        let client = client::connect(&settings).await?;
        tracing::info!(
            node,
            "waiting for the first complete sync with the Kubernetes API; nothing is sent before"
        );
        let cluster = Cluster::start(client, &node).await?;
        loop {
            tokio::select! {
                _ = cluster.wait_synced() => break,
                _ = tokio::time::sleep(WAITING_REPORT) => tracing::warn!(
                    node,
                    api_errors = cluster.api_errors(),
                    "still waiting for the first complete sync with the Kubernetes API"
                ),
            }
        }
        let mut source = ClusterSource {
            cluster,
            base,
            this: ThisNode {
                name: node,
                trust_domain: settings.trust_domain,
                endpoint,
                key_rotation: settings.key_rotation,
            },
            keys,
            reported: Vec::new(),
            next_rotation: None,
            rotation_steps: 0,
            composed: None,
        };
        loop {
            match source.compose() {
                Ok((config, policy)) => return Ok((source, config, policy)),
                Err(error) => {
                    tracing::error!(
                        %error,
                        "the cluster's objects do not make a configuration; waiting for a change"
                    );
                    source.changed().await;
                }
            }
        }
    }

    /// The configuration the cluster's objects make now. Once the node runs it,
    /// [`applied`](Self::applied) publishes the `MeshNode` that goes with it: no peer
    /// is told of a key this node does not answer yet.
    pub(super) fn compose(&mut self) -> Result<(NodeConfig, PolicySet), FileError> {
        let composed = compose(
            &self.base,
            &self.this,
            &self.cluster.objects(),
            &self.keys,
            SystemTime::now(),
        );
        let composed = match composed {
            Ok(composed) => composed,
            Err(error) => {
                // Retried on the cluster's next change, not on a rotation timer that
                // has passed.
                self.next_rotation = None;
                return Err(error);
            }
        };
        for (principal, step) in &composed.rotations {
            self.rotation_steps += 1;
            match step {
                RotationStep::Started => tracing::info!(
                    %principal,
                    "key rotation: a next key is made; it is published beside the key"
                ),
                RotationStep::Finished => tracing::info!(
                    %principal,
                    "key rotation: the next key is now the key; the old one is deleted"
                ),
            }
        }
        self.next_rotation = composed.next_rotation;
        for skipped in &composed.skipped {
            if !self.reported.contains(skipped) {
                tracing::warn!(object = %skipped.object, reason = %skipped.reason, "left out");
            }
        }
        self.reported = composed.skipped;
        self.composed = Some(composed.mesh_node);
        Ok((composed.config, composed.policy))
    }

    /// The node runs the last composition: its `MeshNode` is published.
    pub(super) fn applied(&mut self) {
        if let Some(spec) = self.composed.take() {
            self.cluster.publish(spec);
        }
    }

    /// Returns when the cluster's objects changed, or a key rotation step is due.
    /// Cancel-safe: a change seen by a dropped call is still reported to the next.
    pub(super) async fn changed(&self) {
        let rotation_due = async {
            match self.next_rotation {
                Some(due) => {
                    let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cluster.changed() => {}
            _ = rotation_due => {}
        }
    }

    pub(super) fn counts(&self) -> KubernetesCounts {
        KubernetesCounts {
            node: self.this.name.clone(),
            key_rotation_steps: self.rotation_steps,
            api_errors: self.cluster.api_errors(),
            publications: self.cluster.publications(),
        }
    }
}
