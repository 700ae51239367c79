//! Kubernetes mode (feature `kubernetes`): where a node's identities, peers, keys and
//! policies come from when the cluster is the source instead of files. `crd` is the
//! `MeshNode` resource each node publishes, `keys` the node's service-account keys,
//! `translate` and `compose` turn cluster objects into a node configuration, and `client`
//! watches the API and publishes this node's `MeshNode`.

pub mod client;
pub mod compose;
pub mod crd;
pub mod keys;
pub mod translate;

use kube::CustomResourceExt;

/// Every (API group, resource, verbs) the daemon's Kubernetes client is to use; the
/// ClusterRole in `config/kubernetes/rbac.yaml` grants exactly these (a test checks).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["get", "list", "watch"]),
    ("", "nodes", &["get"]),
    (
        "meshguard.io",
        "meshnodes",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "security.istio.io",
        "authorizationpolicies",
        &["get", "list", "watch"],
    ),
    (
        "security.istio.io",
        "peerauthentications",
        &["get", "list", "watch"],
    ),
];

/// The `MeshNode` CustomResourceDefinition as YAML, as `meshguard crd` prints it.
pub fn crd_yaml() -> String {
    let crd = crd::MeshNode::crd();
    serde_yaml_ng::to_string(&crd).expect("a CRD serializes")
}
