//! Kubernetes mode's pieces without a cluster: the committed CRD is what the code
//! generates; the manifests render with kustomize and validate strictly against a current
//! Kubernetes; the example MeshNode validates against the CRD's schema; the ClusterRole
//! grants exactly what the daemon declares it uses; cluster objects (realistic YAML of
//! Pods and MeshNodes) become the identities and peers the rules say; the key store.
//!
//! There is no Kubernetes API server here: nothing in this file talks to one.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use meshguard::config::KeyRotation;
use meshguard::identity::Principal;
use meshguard::kubernetes::crd::MeshNode;
use meshguard::kubernetes::keys::{KeyStore, Rotation, RotationStep as Step};
use meshguard::kubernetes::translate::{mesh_node_spec, peers, workloads};
use meshguard::kubernetes::{crd_yaml, API_ACCESS};
use meshguard::testbed::{find_program, TempDir};

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes")
}

fn yaml_documents<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| T::deserialize(doc).unwrap())
        .collect()
}

/// A program the manifest checks need: found, or a failure when CI asked for everything.
fn required(program: &str) -> Option<PathBuf> {
    let found = find_program(program);
    if found.is_none() {
        if std::env::var_os("MESHGUARD_REQUIRE_ROOT").is_some_and(|v| v != "0") {
            panic!("{program} not found (.ci/run installs it)");
        }
        eprintln!("skipping: {program} not found");
    }
    found
}

#[test]
fn the_committed_crd_is_what_the_code_generates() {
    let committed = std::fs::read_to_string(manifests().join("crd-meshnode.yaml")).unwrap();
    let committed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&committed).unwrap();
    let generated: serde_yaml_ng::Value = serde_yaml_ng::from_str(&crd_yaml()).unwrap();
    assert_eq!(
        committed, generated,
        "config/kubernetes/crd-meshnode.yaml is stale: regenerate it with `meshguard crd`"
    );
}

#[test]
fn manifests_render_and_validate_strictly() {
    let (Some(kubectl), Some(validate)) = (required("kubectl"), required("kubernetes-validate"))
    else {
        return;
    };
    let rendered = Command::new(kubectl)
        .arg("kustomize")
        .arg(manifests())
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let dir = TempDir::new("manifests").unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered.stdout).unwrap();
    let kinds: Vec<String> =
        yaml_documents::<serde_yaml_ng::Value>(std::str::from_utf8(&rendered.stdout).unwrap())
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_owned())
            .collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
    let out = Command::new(validate)
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
    assert_eq!(passed, kinds.len(), "every resource passes:\n{text}");
    assert!(
        !text.contains("WARN") && !text.contains("ERROR"),
        "no warning:\n{text}"
    );
}

#[test]
fn the_example_meshnode_fits_the_crd_schema() {
    let Some(python) = required("python3") else {
        return;
    };
    // jsonschema comes with kubernetes-validate.
    let check = r#"
import json, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
jsonschema.validate(yaml.safe_load(open(sys.argv[2])), schema)
bad = yaml.safe_load(open(sys.argv[2]))
bad["spec"]["identities"][0]["publicKeys"] = []
try:
    jsonschema.validate(bad, schema)
    sys.exit("an identity without keys passed")
except jsonschema.ValidationError:
    pass
"#;
    let out = Command::new(python)
        .args(["-c", check])
        .arg(manifests().join("crd-meshnode.yaml"))
        .arg(manifests().join("example-meshnode.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And the daemon reads it as one peer with one identity.
    let example = std::fs::read_to_string(manifests().join("example-meshnode.yaml")).unwrap();
    let node: MeshNode = serde_yaml_ng::from_str(&example).unwrap();
    let (peers, skipped) = peers("node-a", &[node]);
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].identities[0].allowed_ips.len(), 2);
}

#[test]
fn the_daemonsets_node_file_loads() {
    let config = meshguard::config::load(&manifests().join("node.toml")).unwrap();
    let k = config.kubernetes.expect("Kubernetes mode");
    assert_eq!(k.node_name, None, "from NODE_NAME");
    assert_eq!(k.endpoint, None, "from NODE_IP");
    assert_eq!(k.trust_domain, "cluster.local");
    assert!(config.identities.is_empty() && config.peers.is_empty());
}

#[test]
fn the_cluster_role_grants_exactly_what_the_daemon_uses() {
    let rbac = std::fs::read_to_string(manifests().join("rbac.yaml")).unwrap();
    let role = yaml_documents::<serde_yaml_ng::Value>(&rbac)
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for group in rule["apiGroups"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                for verb in rule["verbs"].as_sequence().unwrap() {
                    granted.insert((
                        group.as_str().unwrap().to_owned(),
                        resource.as_str().unwrap().to_owned(),
                        verb.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    let used: BTreeSet<_> = API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |v| (group.to_string(), resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, used);
}

const NODE: &str = "node-a";

/// Pods as `kubectl get pods -o yaml` shows them (trimmed to what matters).
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: payments, uid: u1, creationTimestamp: "2026-12-01T10:00:00Z",
           labels: {app: api, version: v1}}
spec: {nodeName: node-a, serviceAccountName: api, containers: [{name: c, image: api}]}
status: {phase: Running, podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: "fd00:244:1::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: payments, uid: u2, creationTimestamp: "2026-12-01T11:00:00Z",
           labels: {app: api, version: v1}}
spec: {nodeName: node-a, serviceAccountName: api, containers: [{name: c, image: api}]}
status: {phase: Running, podIP: 10.244.1.6, podIPs: [{ip: 10.244.1.6}]}
---
# Same service account, other labels: left out (policies select by labels).
apiVersion: v1
kind: Pod
metadata: {name: api-canary, namespace: payments, uid: u3, creationTimestamp: "2026-12-01T12:00:00Z",
           labels: {app: api, version: v2}}
spec: {nodeName: node-a, serviceAccountName: api, containers: [{name: c, image: api}]}
status: {phase: Running, podIP: 10.244.1.7, podIPs: [{ip: 10.244.1.7}]}
---
# No service account named: "default".
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: jobs, uid: u4, creationTimestamp: "2026-12-01T09:00:00Z"}
spec: {nodeName: node-a, containers: [{name: c, image: batch}]}
status: {phase: Running, podIP: 10.244.1.8, podIPs: [{ip: 10.244.1.8}]}
---
# Host network: not served.
apiVersion: v1
kind: Pod
metadata: {name: kube-proxy-x, namespace: kube-system, uid: u5}
spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: kube-proxy, containers: [{name: c, image: p}]}
status: {phase: Running, podIP: 198.18.0.1, podIPs: [{ip: 198.18.0.1}]}
---
# Not running yet, and finished: not served.
apiVersion: v1
kind: Pod
metadata: {name: web-pending, namespace: web, uid: u6}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: w}]}
status: {phase: Pending, podIP: 10.244.1.9, podIPs: [{ip: 10.244.1.9}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-done, namespace: web, uid: u7}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: w}]}
status: {phase: Succeeded}
---
# Another node's pod (the field selector would not send it; it is left out anyway).
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: web, uid: u8}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, image: w}]}
status: {phase: Running, podIP: 10.244.2.5, podIPs: [{ip: 10.244.2.5}]}
---
# Running without an IP: left out, said why.
apiVersion: v1
kind: Pod
metadata: {name: odd, namespace: web, uid: u9}
spec: {nodeName: node-a, serviceAccountName: odd, containers: [{name: c, image: w}]}
status: {phase: Running}
"#;

#[test]
fn pods_on_this_node_become_one_identity_per_service_account() {
    let pods: Vec<Pod> = yaml_documents(PODS);
    assert_eq!(pods.len(), 9);
    let (found, skipped) = workloads(NODE, "cluster.local", &pods);
    let principals: Vec<String> = found.iter().map(|w| w.principal.to_string()).collect();
    assert_eq!(
        principals,
        [
            "cluster.local/ns/jobs/sa/default",
            "cluster.local/ns/payments/sa/api"
        ]
    );
    let api = &found[1];
    let addresses: Vec<String> = api.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(
        addresses,
        ["10.244.1.5/32", "10.244.1.6/32", "fd00:244:1::5/128"]
    );
    assert_eq!(api.pods, ["payments/api-1", "payments/api-2"]);
    assert_eq!(
        api.labels,
        BTreeMap::from([
            ("app".to_owned(), "api".to_owned()),
            ("version".to_owned(), "v1".to_owned())
        ])
    );
    let mut skipped: Vec<(String, String)> =
        skipped.into_iter().map(|s| (s.object, s.reason)).collect();
    skipped.sort();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "Pod payments/api-canary");
    assert!(skipped[0]
        .1
        .contains("labels differ from those of payments/api-1"));
    assert_eq!(
        skipped[1],
        ("Pod web/odd".to_owned(), "no pod IP yet".to_owned())
    );

    // The canary's labels win only once the older pods are gone; a pod leaving takes its
    // address with it.
    let later: Vec<Pod> = pods
        .iter()
        .filter(|p| p.metadata.name.as_deref() != Some("api-1"))
        .cloned()
        .collect();
    let (found, _) = workloads(NODE, "cluster.local", &later);
    assert_eq!(found[1].pods, ["payments/api-2"]);
    // Another trust domain names other principals.
    let (found, _) = workloads(NODE, "prod.example.org", &pods);
    assert_eq!(
        found[1].principal.to_string(),
        "prod.example.org/ns/payments/sa/api"
    );
}

const MESH_NODES: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshNode
metadata: {name: node-a}
spec:
  endpoint: 198.18.0.1:51820
  identities:
    - {principal: cluster.local/ns/payments/sa/api, publicKeys: [AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=], allowedIPs: [10.244.1.5/32]}
---
apiVersion: meshguard.io/v1alpha1
kind: MeshNode
metadata: {name: node-c}
spec:
  endpoint: "[fd00:18::3]:51820"
  identities:
    - principal: cluster.local/ns/web/sa/frontend
      publicKeys: [7vEzIG1DI3PzFiCTTZ2bjzjjc96lXaVKn4e3Nb1/rjQ=, Fr0JVQJYfgGJ0MRJgRxmbS5pkuX8sfmbmB6aEWoj6yM=]
      allowedIPs: [10.244.3.4/32, "fd00:244:3::4/128"]
    - {principal: cluster.local/ns/web/sa/bad-key, publicKeys: [not-a-key], allowedIPs: [10.244.3.5/32]}
    - {principal: cluster.local/ns/web/sa/host-bits, publicKeys: [uqdGfTo4o0tKJvq6P/oUeWDCZGcxyTBCRL8qrNGwCEY=], allowedIPs: [10.244.3.6/24]}
---
apiVersion: meshguard.io/v1alpha1
kind: MeshNode
metadata: {name: node-b}
spec:
  endpoint: 198.18.0.2:51820
  identities:
    - {principal: cluster.local/ns/db/sa/postgres, publicKeys: [mF2+P0lsyx+6/bu4ihOC4Prt8tXD7VqmQyqXPc4pZkU=], allowedIPs: [10.244.2.10/32]}
---
apiVersion: meshguard.io/v1alpha1
kind: MeshNode
metadata: {name: node-d}
spec:
  endpoint: 0.0.0.0:51820
  identities:
    - {principal: cluster.local/ns/web/sa/lost, publicKeys: [1R8qF0y6n2YkS6Jm3VvB4n2vI0bQyqfL2VJmZ4rZq1U=], allowedIPs: [10.244.4.4/32]}
"#;

#[test]
fn other_nodes_meshnodes_become_peers() {
    let nodes: Vec<MeshNode> = yaml_documents(MESH_NODES);
    let (found, skipped) = peers(NODE, &nodes);
    let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["node-b", "node-c"], "own node and node-d left out");
    let c = &found[1];
    assert_eq!(c.endpoint, Some("[fd00:18::3]:51820".parse().unwrap()));
    assert_eq!(c.identities.len(), 1, "two identities that do not read");
    let frontend = &c.identities[0];
    assert_eq!(
        frontend.public_key.to_base64(),
        "7vEzIG1DI3PzFiCTTZ2bjzjjc96lXaVKn4e3Nb1/rjQ="
    );
    assert_eq!(
        frontend.next_public_key.map(|k| k.to_base64()).as_deref(),
        Some("Fr0JVQJYfgGJ0MRJgRxmbS5pkuX8sfmbmB6aEWoj6yM="),
        "a second key is the one it rotates to"
    );
    let objects: Vec<&str> = skipped.iter().map(|s| s.object.as_str()).collect();
    assert_eq!(
        objects,
        [
            "MeshNode node-c spec.identities[1]",
            "MeshNode node-c spec.identities[2]",
            "MeshNode node-d"
        ]
    );
    assert!(skipped[1].reason.contains("host bits"), "{:?}", skipped[1]);
    assert!(
        skipped[2].reason.contains("0.0.0.0:51820"),
        "{:?}",
        skipped[2]
    );
}

#[test]
fn what_a_node_publishes_is_what_the_others_read() {
    let pods: Vec<Pod> = yaml_documents(PODS);
    let (found, _) = workloads(NODE, "cluster.local", &pods);
    let dir = TempDir::new("keys").unwrap();
    let store = KeyStore::open(&dir.path().join("state")).unwrap();
    let identities: Vec<_> = found
        .iter()
        .map(|w| {
            (
                w.clone(),
                vec![store.key(&w.principal).unwrap().public_key()],
            )
        })
        .collect();
    let spec = mesh_node_spec("198.18.0.1:51820".parse().unwrap(), &identities);
    let published = MeshNode::new(NODE, spec);
    // Through JSON, as the API server stores it.
    let published: MeshNode =
        serde_json::from_str(&serde_json::to_string(&published).unwrap()).unwrap();
    let (read, skipped) = peers("node-b", &[published]);
    assert!(skipped.is_empty());
    assert_eq!(read[0].identities.len(), 2);
    assert_eq!(read[0].identities[1].principal, found[1].principal);
    assert_eq!(read[0].identities[1].allowed_ips, found[1].addresses);
    assert_eq!(read[0].identities[1].public_key, identities[1].1[0]);
}

#[test]
fn keys_are_made_once_private_and_kept() {
    let dir = TempDir::new("keys").unwrap();
    let state = dir.path().join("state");
    let store = KeyStore::open(&state).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    let api: Principal = "cluster.local/ns/payments/sa/api".parse().unwrap();
    let first = store.key(&api).unwrap();
    let path = store.path(&api);
    assert_eq!(path, state.join("payments_api.key"));
    assert_eq!(mode(&path), 0o600);
    // Kept: a restarted daemon (a new store on the same directory) has the same key.
    let again = KeyStore::open(&state).unwrap().key(&api).unwrap();
    assert_eq!(first.public_key(), again.public_key());
    let other: Principal = "cluster.local/ns/payments/sa/worker".parse().unwrap();
    assert_ne!(store.key(&other).unwrap().public_key(), first.public_key());
    // A directory others may enter is refused.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = KeyStore::open(&state).err().unwrap();
    assert!(err.to_string().contains("must be 0700"), "{err}");
}

#[test]
fn a_key_rotates_with_overlap_and_a_restart_goes_on_where_it_was() {
    let dir = TempDir::new("rotate").unwrap();
    let state = dir.path().join("state");
    let store = KeyStore::open(&state).unwrap();
    let api: Principal = "cluster.local/ns/payments/sa/api".parse().unwrap();
    let rotation = KeyRotation {
        lifetime: Some(Duration::from_secs(3600)),
        overlap: Duration::from_secs(300),
    };
    let waiting = |due| Rotation { step: None, due };
    let start = SystemTime::now();
    // A new key, made at `start`: the rotation is due when it is an hour old.
    let hour = Duration::from_secs(3600);
    assert_eq!(
        store.rotate(&api, &rotation, start, false).unwrap(),
        waiting(Some(start + hour))
    );
    let first = store.keys(&api).unwrap();
    assert!(first.next.is_none());
    let first = first.current.public_key();

    // An hour later: a next key beside the key, 0600, both kept by a new store.
    let later = start + hour;
    assert_eq!(
        store.rotate(&api, &rotation, later, false).unwrap(),
        Rotation {
            step: Some(Step::Started),
            due: None
        }
    );
    let next_path = store.next_path(&api);
    assert_eq!(next_path, state.join("payments_api.key.next"));
    let mode = std::fs::metadata(&next_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let restarted = KeyStore::open(&state).unwrap();
    let both = restarted.keys(&api).unwrap();
    assert_eq!(both.current.public_key(), first);
    let next = both.next.expect("the next key").public_key();
    assert_ne!(next, first);
    // Until this node's MeshNode is seen listing the next key, nothing is due, however
    // long it takes (an API that is down gives the peers no time to move).
    let much_later = later + Duration::from_secs(86_400);
    assert_eq!(
        restarted
            .rotate(&api, &rotation, much_later, false)
            .unwrap(),
        waiting(None)
    );
    // Seen published: the switch is due the overlap after that, across a restart.
    assert_eq!(
        restarted.rotate(&api, &rotation, much_later, true).unwrap(),
        waiting(Some(much_later + Duration::from_secs(300)))
    );
    let again = KeyStore::open(&state).unwrap();
    assert_eq!(
        again
            .rotate(&api, &rotation, much_later + Duration::from_secs(299), true)
            .unwrap(),
        waiting(Some(much_later + Duration::from_secs(300)))
    );

    // After the overlap the next key is the key, the old key is gone, and the new key's
    // lifetime counts from when it was made.
    let after = much_later + Duration::from_secs(300);
    assert_eq!(
        again.rotate(&api, &rotation, after, true).unwrap(),
        Rotation {
            step: Some(Step::Finished),
            due: Some(later + hour)
        }
    );
    assert!(!next_path.exists());
    let rotated = store.keys(&api).unwrap();
    assert_eq!(rotated.current.public_key(), next);
    assert!(rotated.next.is_none());
    let before_due = later + hour - Duration::from_secs(1);
    assert_eq!(
        store.rotate(&api, &rotation, before_due, false).unwrap(),
        waiting(Some(later + hour))
    );

    // A next key that does not read is replaced, not fatal.
    std::fs::write(&next_path, "not a key\n").unwrap();
    std::fs::set_permissions(&next_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let replaced = store.rotate(&api, &rotation, after, true).unwrap();
    assert_eq!(replaced.step, Some(Step::Started));
    assert!(store.keys(&api).unwrap().next.is_some());

    // "never", or a lifetime too long to add to the clock: no rotation is ever due.
    let other: Principal = "cluster.local/ns/payments/sa/worker".parse().unwrap();
    for lifetime in [None, Some(Duration::MAX)] {
        let rotation = KeyRotation {
            lifetime,
            ..rotation
        };
        assert_eq!(
            store.rotate(&other, &rotation, start, false).unwrap(),
            waiting(None)
        );
    }
}

#[test]
fn a_rotating_key_is_published_and_answered_beside_the_key() {
    use meshguard::kubernetes::compose::{compose, ClusterObjects};
    let dir = TempDir::new("compose-rotate").unwrap();
    let base = kube_base(dir.path());
    let keys = KeyStore::open(&dir.path().join("state")).unwrap();
    let mut objects = ClusterObjects {
        pods: yaml_documents(PODS),
        ..ClusterObjects::default()
    };
    let this = this_node(KeyRotation {
        lifetime: Some(Duration::from_secs(3600)),
        overlap: Duration::from_secs(60),
    });
    let now = SystemTime::now();
    let first = compose(&base, &this, &objects, &keys, now).unwrap();
    let accounts = first.config.identities.len();
    assert!(accounts >= 2);
    assert!(first.rotations.is_empty());
    assert!(first.config.identities.iter().all(|i| i.next_key.is_none()));
    assert!(first
        .mesh_node
        .identities
        .iter()
        .all(|i| i.public_keys.len() == 1));
    assert_eq!(first.next_rotation, Some(now + Duration::from_secs(3600)));
    let due = now + Duration::from_secs(3600);

    // At the lifetime: every account's next key is published after its key, and the
    // identity answers on both.
    let rotating = compose(&base, &this, &objects, &keys, due).unwrap();
    assert_eq!(rotating.rotations.len(), accounts);
    assert!(rotating.rotations.iter().all(|(_, s)| *s == Step::Started));
    for (identity, published) in rotating
        .config
        .identities
        .iter()
        .zip(&rotating.mesh_node.identities)
    {
        let (_, _, next) = identity.next_key.as_ref().expect("a next key");
        assert_eq!(
            published.public_keys,
            [identity.public_key.to_base64(), next.to_base64()]
        );
    }
    // Not yet seen in this node's MeshNode: however late, nothing switches.
    let late = due + Duration::from_secs(3600);
    let unseen = compose(&base, &this, &objects, &keys, late).unwrap();
    assert!(unseen.rotations.is_empty());
    assert_eq!(unseen.next_rotation, None);
    // The API gives back this node's MeshNode with both keys: the switch is due a
    // minute later, and then only the new key is published.
    objects.mesh_nodes = vec![serde_json::from_value(serde_json::json!({
        "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": "node-a"},
        "spec": rotating.mesh_node,
    }))
    .unwrap()];
    let seen = compose(&base, &this, &objects, &keys, late).unwrap();
    assert!(seen.rotations.is_empty());
    assert_eq!(seen.next_rotation, Some(late + Duration::from_secs(60)));
    let switched = compose(
        &base,
        &this,
        &objects,
        &keys,
        late + Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(switched.rotations.len(), accounts);
    assert!(switched.rotations.iter().all(|(_, s)| *s == Step::Finished));
    for (before, after) in rotating
        .config
        .identities
        .iter()
        .zip(&switched.config.identities)
    {
        assert_eq!(after.public_key, before.next_key.as_ref().unwrap().2);
        assert!(after.next_key.is_none());
    }
    assert!(switched
        .mesh_node
        .identities
        .iter()
        .all(|i| i.public_keys.len() == 1));
}

fn this_node(key_rotation: KeyRotation) -> meshguard::kubernetes::compose::ThisNode {
    meshguard::kubernetes::compose::ThisNode {
        name: "node-a".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        endpoint: "198.18.0.1:51820".parse().unwrap(),
        key_rotation,
    }
}

/// A node file in Kubernetes mode, loaded as the daemon loads it.
fn kube_base(dir: &Path) -> meshguard::config::NodeConfig {
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        "name = \"node-a\"\nlisten = \"198.18.0.1:51820\"\n[interface]\nname = \"mg0\"\n\
         [kubernetes]\nnode_name = \"node-a\"\nstate_dir = \"state\"\n",
    )
    .unwrap();
    meshguard::config::load(&path).unwrap()
}

fn mesh_node(name: &str, endpoint: &str, identities: serde_json::Value) -> MeshNode {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name},
        "spec": {"endpoint": endpoint, "identities": identities}
    }))
    .unwrap()
}

#[test]
fn composing_settles_conflicts_and_compiles_policies() {
    use meshguard::kubernetes::compose::{compose, ClusterObjects};
    let dir = TempDir::new("compose").unwrap();
    let base = kube_base(dir.path());
    let keys = KeyStore::open(&dir.path().join("state")).unwrap();
    let pods: Vec<Pod> = yaml_documents(PODS);
    let key = |n: u8| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [n; 32]);
    let objects = ClusterObjects {
        pods,
        mesh_nodes: vec![
            // node-b still lists 10.244.1.5, now a pod of this node (a reused IP), and
            // 10.244.9.9, which node-c claims too.
            mesh_node(
                "node-b",
                "198.18.0.2:51820",
                serde_json::json!([
                    {"principal": "cluster.local/ns/db/sa/pg", "publicKeys": [key(1)],
                     "allowedIPs": ["10.244.2.10/32", "10.244.1.5/32", "10.244.9.9/32"]},
                    {"principal": "cluster.local/ns/db/sa/twin", "publicKeys": [key(3)],
                     "allowedIPs": ["10.244.2.11/32"]}
                ]),
            ),
            mesh_node(
                "node-c",
                "198.18.0.3:51820",
                serde_json::json!([
                    {"principal": "cluster.local/ns/web/sa/front", "publicKeys": [key(2)],
                     "allowedIPs": ["10.244.3.4/32", "10.244.9.9/32"]},
                    {"principal": "cluster.local/ns/web/sa/copy", "publicKeys": [key(3)],
                     "allowedIPs": ["10.244.3.5/32"]}
                ]),
            ),
        ],
        istio: vec![serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-22", "namespace": "payments", "uid": "x",
                         "resourceVersion": "7", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}
        })],
    };
    let this = this_node(KeyRotation::default());
    let now = SystemTime::now();
    let composed = compose(&base, &this, &objects, &keys, now).unwrap();
    let config = &composed.config;
    assert_eq!(config.identities.len(), 2);
    let allowed = |node: &str, principal: &str| -> Vec<String> {
        config
            .peers
            .iter()
            .find(|p| p.name == node)
            .and_then(|p| {
                p.identities
                    .iter()
                    .find(|i| i.principal.to_string() == principal)
            })
            .map(|i| i.allowed_ips.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        allowed("node-b", "cluster.local/ns/db/sa/pg"),
        ["10.244.2.10/32"]
    );
    assert_eq!(
        allowed("node-c", "cluster.local/ns/web/sa/front"),
        ["10.244.3.4/32"]
    );
    // One key on two nodes: neither identity is trusted with it.
    assert!(allowed("node-b", "cluster.local/ns/db/sa/twin").is_empty());
    assert!(allowed("node-c", "cluster.local/ns/web/sa/copy").is_empty());
    let reasons: Vec<&str> = composed.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("10.244.1.5/32 is claimed")),
        "{reasons:?}"
    );
    assert_eq!(composed.policy.policies.len(), 1);
    // What this node publishes: its two identities with their keys.
    assert_eq!(composed.mesh_node.identities.len(), 2);
    assert_eq!(
        composed.mesh_node.identities[1].public_keys,
        [config.identities[1].public_key.to_base64()]
    );

    // A policy object that does not read fails the composition: the allow list in
    // force stays (a DENY never drops out silently).
    let mut broken = objects.clone();
    broken.istio[0]["spec"]["action"] = serde_json::json!("DENYY");
    let error = compose(&base, &this, &broken, &keys, now).err().unwrap();
    assert!(
        error
            .to_string()
            .contains("AuthorizationPolicy/payments/deny-22"),
        "{error}"
    );
}
