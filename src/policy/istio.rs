//! Istio `AuthorizationPolicy` and `PeerAuthentication` YAML (the L4 subset; see the
//! module docs of [`crate::policy`] for what happens to the rest).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

use super::build::{
    build_policy, ConditionDraft, DestinationDraft, Entries, Form, KeyError, L7Field, PolicyDraft,
    RuleDraft, SourceDraft, SourceLists, Warning, WrittenList,
};
use super::model::{Action, MtlsMode, PeerAuthentication, Policy, PolicySet};
use super::values::{
    parse_istio_principal_pattern, parse_port_istio, validate_name, validate_namespace,
    validate_selector,
};
use crate::file_error::FileError;

const FORM: Form = Form {
    source_fields: [
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
    ],
    port_fields: ["ports", "notPorts"],
    destination_entry: "operation",
    parse_port: parse_port_istio,
    parse_principal: parse_istio_principal_pattern,
    match_all_rule: "`rules: [{}]`",
};

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
    name: Option<Text>,
    namespace: Option<Text>,
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
    match_labels: Option<BTreeMap<String, Text>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuthzSpec {
    selector: Option<Selector>,
    target_ref: Option<IgnoredAny>,
    target_refs: Option<IgnoredAny>,
    action: Option<String>,
    provider: Option<IgnoredAny>,
    rules: Option<Vec<IstioRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IstioRule {
    from: Option<Vec<IstioFrom>>,
    to: Option<Vec<IstioTo>>,
    when: Option<Vec<IstioCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IstioFrom {
    source: Option<IstioSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IstioTo {
    operation: Option<IstioOperation>,
}

/// A YAML string. Istio's schema types these fields as strings, so a number or a boolean
/// written without quotes is refused, as the API server refuses it.
struct Text(String);

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Quoted;
        impl Visitor<'_> for Quoted {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string (Istio's schema types this field as a string: quote numbers, \
                     as in \"8080\")",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Quoted)
    }
}

type StrList = Option<Vec<Text>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IstioSource {
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
struct IstioOperation {
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
struct IstioCondition {
    key: Option<Text>,
    values: StrList,
    not_values: StrList,
}

#[derive(Deserialize, Default)]
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

/// Turns a YAML error into a `FileError`: the key is `document N: <path>` (or the
/// position when the error has no path), the reason ends with the position.
fn yaml_error(file: &Path, doc: usize, e: &serde_yaml_ng::Error) -> FileError {
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
        (Some(p), Some(pos)) => FileError::new(
            file,
            format!("document {doc}: {p}"),
            format!("{reason} ({pos})"),
        ),
        (Some(p), None) => FileError::new(file, format!("document {doc}: {p}"), reason),
        (None, Some(pos)) => FileError::new(file, format!("document {doc}: {pos}"), reason),
        (None, None) => FileError::new(file, format!("document {doc}"), reason),
    }
}

/// Parses a YAML file of Istio `AuthorizationPolicy` and `PeerAuthentication` documents
/// (`---` separated; empty documents are skipped). Documents are numbered from 1 in
/// errors and origins.
pub fn parse_istio_yaml(text: &str, origin: &Path) -> Result<PolicySet, FileError> {
    let mut set = PolicySet::default();
    read_istio_yaml(text, origin, &mut set)?;
    Ok(set)
}

/// Parses a YAML file of Istio documents into `set`.
pub(crate) fn read_istio_yaml(
    text: &str,
    origin: &Path,
    set: &mut PolicySet,
) -> Result<(), FileError> {
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

    let docs = serde_yaml_ng::Deserializer::from_str(text);
    for (i, (doc, kind)) in docs.zip(kinds).enumerate() {
        let n = i + 1;
        match kind {
            None => {}
            Some(Kind::AuthorizationPolicy) => {
                let obj =
                    Object::<AuthzSpec>::deserialize(doc).map_err(|e| yaml_error(origin, n, &e))?;
                let (policy, warnings) =
                    authorization_policy(obj, origin, n).map_err(|e| in_document(origin, n, e))?;
                for w in warnings {
                    set.warnings.push(format!(
                        "{}: document {n}: {}: {}",
                        origin.display(),
                        w.key,
                        w.message
                    ));
                }
                set.add(policy, origin, &format!("document {n}"))?;
            }
            Some(Kind::PeerAuthentication) => {
                let obj = Object::<PeerAuthnSpec>::deserialize(doc)
                    .map_err(|e| yaml_error(origin, n, &e))?;
                let peer_authentication =
                    peer_authentication(obj, origin, n).map_err(|e| in_document(origin, n, e))?;
                set.add_peer_authentication(peer_authentication, origin, &format!("document {n}"))?;
            }
        }
    }
    Ok(())
}

/// An error at a key of document `n`.
fn in_document(file: &Path, n: usize, e: KeyError) -> FileError {
    FileError::new(file, format!("document {n}: {}", e.key), e.reason)
}

fn check_kind(file: &Path, n: usize, h: &Header) -> Result<Kind, FileError> {
    let Some(api) = h.api_version.as_deref() else {
        return Err(FileError::new(
            file,
            format!("document {n}: apiVersion"),
            "missing; expected security.istio.io/v1 or security.istio.io/v1beta1",
        ));
    };
    let Some(kind) = h.kind.as_deref() else {
        return Err(FileError::new(
            file,
            format!("document {n}: kind"),
            "missing; expected AuthorizationPolicy or PeerAuthentication",
        ));
    };
    let k = match kind {
        "AuthorizationPolicy" => Kind::AuthorizationPolicy,
        "PeerAuthentication" => Kind::PeerAuthentication,
        _ => {
            return Err(FileError::new(
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
        return Err(FileError::new(
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
fn metadata(m: Option<Metadata>) -> Result<(String, String), KeyError> {
    let Some(m) = m else {
        return Err(KeyError::new(
            "metadata",
            "missing; metadata.name and metadata.namespace are required",
        ));
    };
    let Some(Text(name)) = m.name else {
        return Err(KeyError::new("metadata.name", "metadata.name is required"));
    };
    validate_name(&name).map_err(|r| KeyError::new("metadata.name", r))?;
    let Some(Text(namespace)) = m.namespace else {
        return Err(KeyError::new(
            "metadata.namespace",
            "metadata.namespace is required (meshguard has no current namespace to default \
             to)",
        ));
    };
    validate_namespace(&namespace).map_err(|r| KeyError::new("metadata.namespace", r))?;
    Ok((name, namespace))
}

fn authorization_policy(
    obj: Object<AuthzSpec>,
    file: &Path,
    n: usize,
) -> Result<(Policy, Vec<Warning>), KeyError> {
    let (name, namespace) = metadata(obj.metadata)?;
    let spec = obj.spec.unwrap_or_default();
    let draft = draft_policy(name, namespace, &spec, file, n)?;
    build_policy(draft, &FORM)
}

fn selector(s: Option<&Selector>, key: &str) -> Result<BTreeMap<String, String>, KeyError> {
    let labels: BTreeMap<String, String> = s
        .and_then(|s| s.match_labels.as_ref())
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    validate_selector(&labels).map_err(|r| KeyError::new(format!("{key}.matchLabels"), r))?;
    Ok(labels)
}

fn list(v: &StrList) -> Option<WrittenList<'_>> {
    v.as_deref().map(WrittenList::without_lines)
}

/// The L7-only fields among `fields` that are present.
fn l7_fields<'a>(fields: &[(&'static str, &'a StrList)]) -> Vec<L7Field<'a>> {
    fields
        .iter()
        .filter_map(|&(name, values)| {
            Some(L7Field {
                name,
                values: values.as_deref()?.iter().map(AsRef::as_ref).collect(),
            })
        })
        .collect()
}

fn draft_policy<'a>(
    name: String,
    namespace: String,
    spec: &'a AuthzSpec,
    file: &Path,
    n: usize,
) -> Result<PolicyDraft<'a>, KeyError> {
    for (field, present) in [
        ("targetRef", spec.target_ref.is_some()),
        ("targetRefs", spec.target_refs.is_some()),
    ] {
        if present {
            return Err(KeyError::new(
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
        Some(a) => Action::parse(a).map_err(|r| KeyError::new("spec.action", r))?,
    };
    if action == Action::Deny && spec.rules.as_ref().is_none_or(Vec::is_empty) {
        return Err(KeyError::new(
            "spec.rules",
            "a DENY policy without rules never matches, and Istio's validation rejects it; \
             add `rules: [{}]` to deny all traffic",
        ));
    }
    if spec.provider.is_some() {
        return Err(KeyError::new(
            "spec.provider",
            "provider belongs to action CUSTOM (external authorization), which meshguard \
             does not support",
        ));
    }
    let selector = selector(spec.selector.as_ref(), "spec.selector")?;
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        rules.push(draft_rule(rule, format!("spec.rules[{r}]"))?);
    }
    Ok(PolicyDraft {
        name,
        namespace,
        selector,
        action,
        rules,
        rules_key: "spec.rules".to_owned(),
        origin: format!("{}: document {n}", file.display()),
    })
}

fn draft_rule(rule: &IstioRule, key: String) -> Result<RuleDraft<'_>, KeyError> {
    let from = rule
        .from
        .as_deref()
        .map(|entries| {
            let draft = |(f, entry)| draft_source(entry, format!("{key}.from[{f}].source"));
            entries.iter().enumerate().map(draft).collect()
        })
        .transpose()?;
    let to = rule
        .to
        .as_deref()
        .map(|entries| {
            let draft = |(t, entry)| draft_destination(entry, format!("{key}.to[{t}].operation"));
            entries.iter().enumerate().map(draft).collect()
        })
        .transpose()?;
    let when = rule.when.as_ref().map(|conditions| {
        conditions
            .iter()
            .enumerate()
            .map(|(w, condition)| ConditionDraft {
                key: format!("{key}.when[{w}]"),
                attribute: condition.key.as_ref().map(AsRef::as_ref),
                values: list(&condition.values),
                not_values: list(&condition.not_values),
            })
            .collect()
    });
    Ok(RuleDraft {
        key,
        from: from.map(without_lines),
        to: to.map(without_lines),
        when: when.map(without_lines),
    })
}

/// Entries from YAML, which reports no lines.
fn without_lines<T>(entries: Vec<T>) -> Entries<T> {
    Entries {
        line: None,
        entries,
    }
}

fn draft_source(entry: &IstioFrom, key: String) -> Result<SourceDraft<'_>, KeyError> {
    let Some(source) = &entry.source else {
        return Err(KeyError::new(
            key,
            "missing; each `from` entry needs a source",
        ));
    };
    for (field, v) in [
        ("serviceAccounts", &source.service_accounts),
        ("notServiceAccounts", &source.not_service_accounts),
    ] {
        if v.is_some() {
            return Err(KeyError::new(
                format!("{key}.{field}"),
                format!(
                    "{field} is not supported; write principals such as \
                     cluster.local/ns/<namespace>/sa/<service-account>"
                ),
            ));
        }
    }
    Ok(SourceDraft {
        key,
        line: None,
        lists: SourceLists {
            principals: list(&source.principals),
            not_principals: list(&source.not_principals),
            namespaces: list(&source.namespaces),
            not_namespaces: list(&source.not_namespaces),
            ip_blocks: list(&source.ip_blocks),
            not_ip_blocks: list(&source.not_ip_blocks),
        },
        l7: l7_fields(&[
            ("requestPrincipals", &source.request_principals),
            ("notRequestPrincipals", &source.not_request_principals),
            ("remoteIpBlocks", &source.remote_ip_blocks),
            ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
        ]),
    })
}

fn draft_destination(entry: &IstioTo, key: String) -> Result<DestinationDraft<'_>, KeyError> {
    let Some(operation) = &entry.operation else {
        return Err(KeyError::new(
            key,
            "missing; each `to` entry needs an operation",
        ));
    };
    Ok(DestinationDraft {
        key,
        line: None,
        ports: list(&operation.ports),
        not_ports: list(&operation.not_ports),
        l7: l7_fields(&[
            ("hosts", &operation.hosts),
            ("notHosts", &operation.not_hosts),
            ("methods", &operation.methods),
            ("notMethods", &operation.not_methods),
            ("paths", &operation.paths),
            ("notPaths", &operation.not_paths),
        ]),
    })
}

fn peer_authentication(
    obj: Object<PeerAuthnSpec>,
    file: &Path,
    n: usize,
) -> Result<PeerAuthentication, KeyError> {
    let (name, namespace) = metadata(obj.metadata)?;
    let spec = obj.spec.unwrap_or_default();
    if spec.port_level_mtls.is_some() {
        return Err(KeyError::new(
            "spec.portLevelMtls",
            "portLevelMtls is not supported: meshguard applies one mode to every port of \
             an identity's addresses; split the workload or use one mode",
        ));
    }
    let selector = selector(spec.selector.as_ref(), "spec.selector")?;
    let mode = match spec.mtls.and_then(|m| m.mode) {
        None => MtlsMode::Unset,
        Some(mode) => MtlsMode::parse(&mode).map_err(|e| KeyError::new("spec.mtls.mode", e))?,
    };
    Ok(PeerAuthentication {
        name,
        namespace,
        selector,
        mode,
        origin: format!("{}: document {n}", file.display()),
    })
}
