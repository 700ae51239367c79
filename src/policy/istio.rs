//! Istio `AuthorizationPolicy` and `PeerAuthentication` YAML (the L4 subset; see the
//! module docs of [`crate::policy`] for what happens to the rest).

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::model::{
    build_destination, build_source, parse_port_istio, validate_name, validate_namespace,
    validate_selector, Action, Fail, Item, List, Policy, PolicyError, PolicySet, Rule, SourceLists,
    SourceNames, StrictWorkload,
};

const SOURCE_NAMES: SourceNames = [
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
];

const API_GROUP: &str = "security.istio.io";
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Just enough of a document to know what it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
}

/// Kubernetes object metadata. Fields written by the API server are accepted (so that
/// `kubectl get -o yaml` output loads) and ignored.
#[allow(dead_code)] // the ignored fields are only there to be accepted
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<IgnoredAny>,
    annotations: Option<IgnoredAny>,
    uid: Option<IgnoredAny>,
    resource_version: Option<IgnoredAny>,
    generation: Option<IgnoredAny>,
    creation_timestamp: Option<IgnoredAny>,
    deletion_timestamp: Option<IgnoredAny>,
    deletion_grace_period_seconds: Option<IgnoredAny>,
    managed_fields: Option<IgnoredAny>,
    finalizers: Option<IgnoredAny>,
    owner_references: Option<IgnoredAny>,
    generate_name: Option<IgnoredAny>,
    self_link: Option<IgnoredAny>,
}

#[allow(dead_code)] // apiVersion and kind were checked in the first pass; status is ignored
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object<S> {
    api_version: String,
    kind: String,
    metadata: Option<Metadata>,
    spec: Option<S>,
    status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuthzSpec {
    selector: Option<Selector>,
    target_ref: Option<IgnoredAny>,
    target_refs: Option<IgnoredAny>,
    action: Option<String>,
    provider: Option<IgnoredAny>,
    rules: Option<Vec<YRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YRule {
    from: Option<Vec<YFrom>>,
    to: Option<Vec<YTo>>,
    when: Option<Vec<YCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YFrom {
    source: Option<YSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YTo {
    operation: Option<YOperation>,
}

type StrList = Option<Vec<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YSource {
    principals: StrList,
    not_principals: StrList,
    namespaces: StrList,
    not_namespaces: StrList,
    ip_blocks: StrList,
    not_ip_blocks: StrList,
    // L7-only:
    request_principals: StrList,
    not_request_principals: StrList,
    remote_ip_blocks: StrList,
    not_remote_ip_blocks: StrList,
    // Rejected:
    service_accounts: StrList,
    not_service_accounts: StrList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YOperation {
    ports: StrList,
    not_ports: StrList,
    // L7-only:
    hosts: StrList,
    not_hosts: StrList,
    methods: StrList,
    not_methods: StrList,
    paths: StrList,
    not_paths: StrList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YCondition {
    #[allow(dead_code)]
    key: Option<String>,
    #[allow(dead_code)]
    values: StrList,
    #[allow(dead_code)]
    not_values: StrList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerAuthnSpec {
    selector: Option<Selector>,
    mtls: Option<Mtls>,
    port_level_mtls: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    mode: Option<String>,
}

/// Turns a YAML error into a `PolicyError`: the key is `document N: <path>` (or the
/// position when the error has no path), the reason ends with the position.
fn yaml_error(file: &Path, doc: usize, e: &serde_yaml_ng::Error) -> PolicyError {
    let mut msg = e.to_string();
    let loc = e.location();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(pos) = msg.find(&suffix) {
            msg.replace_range(pos..pos + suffix.len(), "");
        }
    }
    // serde_yaml_ng writes "path.to[0].field: message" when it knows the path.
    let (path, reason) = match msg.split_once(": ") {
        Some((p, r))
            if !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_')) =>
        {
            (Some(p.to_owned()), r.to_owned())
        }
        _ => (None, msg.clone()),
    };
    let position = loc.map(|l| format!("line {}, column {}", l.line(), l.column()));
    match (path, position) {
        (Some(p), Some(pos)) => PolicyError::new(
            file,
            format!("document {doc}: {p}"),
            format!("{reason} ({pos})"),
        ),
        (Some(p), None) => PolicyError::new(file, format!("document {doc}: {p}"), reason),
        (None, Some(pos)) => PolicyError::new(file, format!("document {doc}: {pos}"), reason),
        (None, None) => PolicyError::new(file, format!("document {doc}"), reason),
    }
}

/// Parses a YAML file of Istio `AuthorizationPolicy` and `PeerAuthentication` documents
/// (`---` separated; empty documents are skipped). Documents are numbered from 1 in
/// errors and origins. `root_namespace` decides which `PeerAuthentication` is mesh-wide.
pub fn parse_istio_yaml(
    text: &str,
    origin: &Path,
    root_namespace: &str,
) -> Result<PolicySet, PolicyError> {
    // First pass: what each document is. The typed pass below needs the kind first, and
    // deserializing from the text again (not from a parsed value) keeps line numbers.
    let mut kinds = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        // After a syntax error the iterator repeats it forever: stop at the first error.
        let header = Option::<Header>::deserialize(doc).map_err(|e| {
            let mut err = yaml_error(origin, n, &e);
            if err.reason.starts_with("invalid type") {
                err.reason = format!(
                    "expected a Kubernetes object (a mapping with apiVersion, kind, metadata \
                     and spec): {}",
                    err.reason
                );
            }
            err
        })?;
        let Some(header) = header else {
            kinds.push(None);
            continue;
        };
        kinds.push(Some(check_kind(origin, n, &header)?));
    }

    let mut set = PolicySet::default();
    let docs = serde_yaml_ng::Deserializer::from_str(text);
    for (i, (doc, kind)) in docs.zip(kinds).enumerate() {
        let n = i + 1;
        match kind {
            None => {}
            Some(Kind::AuthorizationPolicy) => {
                let obj =
                    Object::<AuthzSpec>::deserialize(doc).map_err(|e| yaml_error(origin, n, &e))?;
                let prefix = format!("document {n}: ");
                let policy = authorization_policy(obj, origin, n, &mut set.warnings)
                    .map_err(|(k, r)| PolicyError::new(origin, format!("{prefix}{k}"), r))?;
                super::push_policy(&mut set, policy, origin, &format!("document {n}"))?;
            }
            Some(Kind::PeerAuthentication) => {
                let obj = Object::<PeerAuthnSpec>::deserialize(doc)
                    .map_err(|e| yaml_error(origin, n, &e))?;
                let prefix = format!("document {n}: ");
                peer_authentication(obj, origin, n, root_namespace, &mut set)
                    .map_err(|(k, r)| PolicyError::new(origin, format!("{prefix}{k}"), r))?;
            }
        }
    }
    Ok(set)
}

fn check_kind(file: &Path, n: usize, h: &Header) -> Result<Kind, PolicyError> {
    let Some(api) = h.api_version.as_deref() else {
        return Err(PolicyError::new(
            file,
            format!("document {n}: apiVersion"),
            "missing; expected security.istio.io/v1 or security.istio.io/v1beta1",
        ));
    };
    let Some(kind) = h.kind.as_deref() else {
        return Err(PolicyError::new(
            file,
            format!("document {n}: kind"),
            "missing; expected AuthorizationPolicy or PeerAuthentication",
        ));
    };
    let k = match kind {
        "AuthorizationPolicy" => Kind::AuthorizationPolicy,
        "PeerAuthentication" => Kind::PeerAuthentication,
        _ => {
            return Err(PolicyError::new(
                file,
                format!("document {n}: kind"),
                format!(
                    "unsupported kind {kind:?} ({api}); expected AuthorizationPolicy or \
                     PeerAuthentication ({API_GROUP}/v1 or v1beta1)"
                ),
            ))
        }
    };
    if !API_VERSIONS.contains(&api) {
        return Err(PolicyError::new(
            file,
            format!("document {n}: apiVersion"),
            format!(
                "unsupported apiVersion {api:?} for {kind}; expected security.istio.io/v1 \
                 or security.istio.io/v1beta1"
            ),
        ));
    }
    Ok(k)
}

/// Checks metadata; returns (name, namespace).
fn metadata(m: Option<Metadata>) -> Result<(String, String), Fail> {
    let Some(m) = m else {
        return Err((
            "metadata".to_owned(),
            "missing; metadata.name and metadata.namespace are required".to_owned(),
        ));
    };
    let Some(name) = m.name else {
        return Err((
            "metadata.name".to_owned(),
            "metadata.name is required".to_owned(),
        ));
    };
    validate_name(&name).map_err(|r| ("metadata.name".to_owned(), r))?;
    let Some(namespace) = m.namespace else {
        return Err((
            "metadata.namespace".to_owned(),
            "metadata.namespace is required (meshguard has no current namespace to \
             default to)"
                .to_owned(),
        ));
    };
    validate_namespace(&namespace).map_err(|r| ("metadata.namespace".to_owned(), r))?;
    Ok((name, namespace))
}

fn selector(s: Option<Selector>, key: &str) -> Result<BTreeMap<String, String>, Fail> {
    let labels = s.and_then(|s| s.match_labels).unwrap_or_default();
    validate_selector(&labels, &format!("{key}.matchLabels"))?;
    Ok(labels)
}

fn list(v: &StrList) -> Option<List<'_>> {
    v.as_ref().map(|l| {
        (
            None,
            l.iter()
                .map(|s| Item {
                    text: s,
                    line: None,
                })
                .collect(),
        )
    })
}

fn authorization_policy(
    obj: Object<AuthzSpec>,
    file: &Path,
    n: usize,
    warnings: &mut Vec<String>,
) -> Result<Policy, Fail> {
    let (name, namespace) = metadata(obj.metadata)?;
    let spec = obj.spec.unwrap_or(AuthzSpec {
        selector: None,
        target_ref: None,
        target_refs: None,
        action: None,
        provider: None,
        rules: None,
    });
    for (field, present) in [
        ("targetRef", spec.target_ref.is_some()),
        ("targetRefs", spec.target_refs.is_some()),
    ] {
        if present {
            return Err((
                format!("spec.{field}"),
                format!(
                    "{field} is not supported: meshguard applies policies to workload \
                     identities by namespace and spec.selector.matchLabels"
                ),
            ));
        }
    }
    let action = match &spec.action {
        None => Action::Allow,
        Some(a) => Action::parse(a).map_err(|r| ("spec.action".to_owned(), r))?,
    };
    if spec.provider.is_some() {
        return Err((
            "spec.provider".to_owned(),
            "provider belongs to action CUSTOM (external authorization), which meshguard \
             does not support"
                .to_owned(),
        ));
    }
    let selector = selector(spec.selector, "spec.selector")?;
    let warn = |warnings: &mut Vec<String>, key: &str, msg: String| {
        warnings.push(format!("{}: document {n}: {key}: {msg}", file.display()));
    };
    let mut rules = Vec::new();
    if let Some(raw_rules) = spec.rules {
        for (r, rr) in raw_rules.into_iter().enumerate() {
            let key = format!("spec.rules[{r}]");
            let (rule, l7) = rule(rr, &key)?;
            let rule = if l7.is_empty() {
                rule
            } else if action == Action::Allow {
                warn(
                    warnings,
                    &key,
                    format!(
                        "ALLOW rule uses fields meshguard cannot check at L3/L4 ({}); \
                         the rule matches nothing",
                        l7.join(", ")
                    ),
                );
                Rule {
                    matches_nothing: true,
                    ..rule
                }
            } else {
                warn(
                    warnings,
                    &key,
                    format!(
                        "{action} rule uses fields meshguard cannot check at L3/L4 ({}); \
                         they are ignored, so the rule applies to all traffic its other \
                         fields match",
                        l7.join(", ")
                    ),
                );
                rule
            };
            rules.push(rule);
        }
    }
    if rules.is_empty() && action != Action::Allow {
        warn(
            warnings,
            "spec.rules",
            format!(
                "{action} policy {namespace}/{name} has no rules and never matches; add \
                 `rules: [{{}}]` to match all traffic"
            ),
        );
    }
    Ok(Policy {
        name,
        namespace,
        selector,
        action,
        rules,
        origin: format!("{}: document {n}", file.display()),
    })
}

/// Builds one rule from its L4 fields; returns it with the keys of the L7-only fields it
/// used (the caller decides what they mean for the rule's action).
fn rule(rr: YRule, key: &str) -> Result<(Rule, Vec<String>), Fail> {
    let mut rule = Rule::default();
    let mut l7 = Vec::new();
    if let Some(from) = &rr.from {
        if from.is_empty() {
            return Err((
                format!("{key}.from"),
                "empty list; omit `from` to match any source".to_owned(),
            ));
        }
        for (f, yf) in from.iter().enumerate() {
            let fkey = format!("{key}.from[{f}]");
            let Some(src) = &yf.source else {
                return Err((
                    format!("{fkey}.source"),
                    "missing; each `from` entry needs a source".to_owned(),
                ));
            };
            let skey = format!("{fkey}.source");
            for (field, v) in [
                ("serviceAccounts", &src.service_accounts),
                ("notServiceAccounts", &src.not_service_accounts),
            ] {
                if v.is_some() {
                    return Err((
                        format!("{skey}.{field}"),
                        format!(
                            "{field} is not supported; write principals such as \
                             cluster.local/ns/<namespace>/sa/<service-account>"
                        ),
                    ));
                }
            }
            let mut has_l7 = false;
            for (field, v) in [
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ] {
                if let Some(values) = v {
                    check_no_empty(values, &format!("{skey}.{field}"))?;
                    l7.push(format!("from[{f}].source.{field}"));
                    has_l7 = true;
                }
            }
            let lists = SourceLists {
                principals: list(&src.principals),
                not_principals: list(&src.not_principals),
                namespaces: list(&src.namespaces),
                not_namespaces: list(&src.not_namespaces),
                ip_blocks: list(&src.ip_blocks),
                not_ip_blocks: list(&src.not_ip_blocks),
            };
            if lists.is_empty() && !has_l7 {
                return Err((
                    skey,
                    "empty source; set at least one field, or omit `from` to match any \
                     source"
                        .to_owned(),
                ));
            }
            // A source left with no L4 field after dropping L7 ones matches any source.
            rule.from.push(build_source(lists, &skey, &SOURCE_NAMES)?);
        }
    }
    if let Some(to) = &rr.to {
        if to.is_empty() {
            return Err((
                format!("{key}.to"),
                "empty list; omit `to` to match any destination".to_owned(),
            ));
        }
        for (t, yt) in to.iter().enumerate() {
            let tkey = format!("{key}.to[{t}]");
            let Some(op) = &yt.operation else {
                return Err((
                    format!("{tkey}.operation"),
                    "missing; each `to` entry needs an operation".to_owned(),
                ));
            };
            let okey = format!("{tkey}.operation");
            let mut has_l7 = false;
            for (field, v) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ] {
                if let Some(values) = v {
                    check_no_empty(values, &format!("{okey}.{field}"))?;
                    l7.push(format!("to[{t}].operation.{field}"));
                    has_l7 = true;
                }
            }
            if op.ports.is_none() && op.not_ports.is_none() && !has_l7 {
                return Err((
                    okey,
                    "empty operation; set at least one field, or omit `to` to match any \
                     destination"
                        .to_owned(),
                ));
            }
            rule.to.push(build_destination(
                list(&op.ports),
                list(&op.not_ports),
                &okey,
                ["ports", "notPorts"],
                parse_port_istio,
            )?);
        }
    }
    if let Some(when) = &rr.when {
        if when.is_empty() {
            return Err((
                format!("{key}.when"),
                "empty list; omit `when` to put no condition on the rule".to_owned(),
            ));
        }
        for w in 0..when.len() {
            l7.push(format!("when[{w}]"));
        }
    }
    Ok((rule, l7))
}

/// L7-only lists are not interpreted, but empty ones are still mistakes.
fn check_no_empty(values: &[String], key: &str) -> Result<(), Fail> {
    if values.is_empty() {
        return Err((
            key.to_owned(),
            "empty list; omit the field to put no condition on it".to_owned(),
        ));
    }
    if let Some(i) = values.iter().position(String::is_empty) {
        return Err((format!("{key}[{i}]"), "empty value".to_owned()));
    }
    Ok(())
}

fn peer_authentication(
    obj: Object<PeerAuthnSpec>,
    file: &Path,
    n: usize,
    root_namespace: &str,
    set: &mut PolicySet,
) -> Result<(), Fail> {
    let (_name, namespace) = metadata(obj.metadata)?;
    let Some(spec) = obj.spec else {
        return Ok(());
    };
    if spec.port_level_mtls.is_some() {
        return Err((
            "spec.portLevelMtls".to_owned(),
            "portLevelMtls is not supported: meshguard encrypts every port of every \
             protocol the same way"
                .to_owned(),
        ));
    }
    let selector = selector(spec.selector, "spec.selector")?;
    let mode = spec.mtls.and_then(|m| m.mode);
    let strict = match mode.as_deref() {
        None | Some("UNSET") | Some("PERMISSIVE") => false,
        Some("STRICT") => true,
        Some("DISABLE") => {
            return Err((
                "spec.mtls.mode".to_owned(),
                "meshguard never sends plaintext; mtls mode DISABLE is not supported".to_owned(),
            ))
        }
        Some(other) => {
            return Err((
                "spec.mtls.mode".to_owned(),
                format!("unknown mode {other:?}; expected UNSET, PERMISSIVE or STRICT"),
            ))
        }
    };
    if !strict {
        return Ok(());
    }
    if !selector.is_empty() {
        set.strict_workloads.push(StrictWorkload {
            namespace,
            selector,
            origin: format!("{}: document {n}", file.display()),
        });
    } else if namespace == root_namespace {
        set.mesh_strict = true;
    } else {
        set.strict_namespaces.insert(namespace);
    }
    Ok(())
}
