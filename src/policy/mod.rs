//! Allow lists at tunnel ingress: the policy model, the TOML and Istio YAML loaders,
//! compilation into per-identity-pair tables, and evaluation.
//!
//! # Semantics
//!
//! Istio's `AuthorizationPolicy`, L4 subset. For a packet from a peer identity to a local
//! identity:
//!
//! 1. if any DENY policy matches: deny;
//! 2. else, if no ALLOW policy *selects* the local identity (by scope and selector,
//!    whatever its rules): the configured default (`allow` or `deny`);
//! 3. else, if any ALLOW policy matches: allow;
//! 4. else deny.
//!
//! AUDIT policies never change the decision; [`Decision::audited_by`] lists those that
//! matched.
//!
//! **Scope.** A policy in the root namespace (configurable, usually `istio-system`) applies
//! to every local identity; a policy in namespace N applies to local identities whose
//! principal is in namespace N. A selector (`matchLabels`) narrows that to identities
//! carrying every listed label with the listed value.
//!
//! **Rules** are OR'ed. In a rule, `from` and `to` are AND'ed; `from` is a list of sources
//! (OR'ed; absent = any source), `to` a list of destinations (OR'ed; absent = any
//! destination). In a source or destination, fields are AND'ed, the values of a field are
//! OR'ed, and a `not` field must match none of its values. A policy without rules matches
//! nothing (an ALLOW policy without rules still selects its identities, so it allows
//! nothing and the default does not apply: Istio's "allow-nothing"); one empty rule
//! (`rules: [{}]`) matches everything.
//!
//! **Fields.** Source: principals / notPrincipals (the peer principal in Istio form
//! `td/ns/<ns>/sa/<sa>`; values may be written in SPIFFE form, `spiffe://` is removed),
//! namespaces / notNamespaces (the peer principal's namespace), ipBlocks / notIpBlocks
//! (CIDRs or single addresses, against the packet's source address). Principal and
//! namespace values are patterns: exact, `prefix*`, `*suffix`, or `*`. Destination: ports /
//! notPorts, with a protocol in the TOML form (`"8080/tcp"`, `"53/udp"`,
//! `"9000-9100/tcp"`, `"8080"` = tcp or udp, `"tcp"`, `"udp"`, `"icmp"`, `"any"`). ICMP
//! has no port: a port condition never matches ICMP, and `"icmp"` matches only ICMP
//! (and ICMPv6). In Istio YAML a port is a number and means tcp or udp.
//!
//! Lists that are present but empty (`principals = []`) are rejected rather than read as
//! "no condition", and so are empty sources and destinations: omit the field instead.
//!
//! # Files
//!
//! [`load_files`] reads `.toml` files in meshguard's form ([`parse_toml`]) and
//! `.yaml`/`.yml` files of Istio documents ([`parse_istio_yaml`]). Two policies with the
//! same `namespace/name` are an error. The TOML form:
//!
//! ```toml
//! [[policy]]
//! name = "frontend-to-payments"
//! namespace = "payments"
//! action = "ALLOW"                          # ALLOW (default) | DENY | AUDIT, any case
//! selector = { app = "payment-service" }    # optional matchLabels
//!
//! [[policy.rules]]                          # no rules at all: matches nothing
//! [[policy.rules.from]]                     # no `from`: any source
//! principals = ["cluster.local/ns/web/sa/frontend"]
//! not_ip_blocks = ["10.0.0.0/8"]
//! [[policy.rules.to]]                       # no `to`: any destination
//! ports = ["8080/tcp", "icmp"]
//! ```
//!
//! Keys: `principals`, `not_principals`, `namespaces`, `not_namespaces`, `ip_blocks`,
//! `not_ip_blocks`, `ports`, `not_ports`. An empty `[[policy.rules]]` is the match-all
//! rule. Unknown keys are errors.
//!
//! # Istio YAML
//!
//! Documents of kind `AuthorizationPolicy` and `PeerAuthentication`, apiVersion
//! `security.istio.io/v1` or `v1beta1`; any other kind is an error. Unknown fields are
//! errors (object metadata written by the API server, and `status`, are accepted and
//! ignored). `metadata.name` and `metadata.namespace` are required (there is no current
//! namespace to fall back on). `targetRef`/`targetRefs`, action `CUSTOM`, `provider`,
//! `serviceAccounts`/`notServiceAccounts` (use principals) are rejected. What Istio's
//! validation rejects is rejected too: YAML numbers or booleans where Istio's schema
//! wants strings, a DENY policy without rules, ports that are not single numbers from 0
//! to 65535, malformed `when` conditions (see `build::build_condition`), and principal
//! values with the `spiffe://` scheme, which never match in Istio (Istio puts the scheme
//! in front of every value itself).
//!
//! ## `when` conditions
//!
//! The attributes Istio checks for TCP as well as HTTP are enforced ([`Condition`]):
//! `source.ip` (like `ipBlocks`), `source.namespace` (like `namespaces`),
//! `source.principal` (like `principals`), `destination.ip` (the packet's destination
//! address) and `destination.port` (like `ports`), each with `values` and `notValues`.
//! Conditions are AND'ed with each other and with `from` and `to`.
//!
//! ## L7-only fields
//!
//! meshguard sees packets, not HTTP requests, so it cannot check `to.operation.hosts`,
//! `notHosts`, `methods`, `notMethods`, `paths`, `notPaths`,
//! `from.source.requestPrincipals`, `notRequestPrincipals`, `remoteIpBlocks`,
//! `notRemoteIpBlocks`, or `when` conditions on other attributes (request headers and
//! claims, `remote.ip`, `connection.sni`, `source.serviceAccount`, …). They never widen
//! access:
//!
//! - in an **ALLOW** rule, any of them makes the whole rule match nothing (the rest of the
//!   policy still applies, and the policy still selects its identities);
//! - in a **DENY** or **AUDIT** rule, they are dropped and the rule is applied with its
//!   remaining L4 fields, so it denies (or audits) more, never less. This is also what
//!   Istio's sidecar does for plain TCP traffic. A source or operation left with no L4
//!   field matches any source or destination.
//!
//! Each such adjustment is recorded in [`PolicySet::warnings`] for the daemon to log.
//!
//! ## PeerAuthentication
//!
//! Sets the mTLS mode of local identities; it never changes an allow list. `STRICT` means
//! no plaintext: the daemon drops packets to the identity's addresses that did not come
//! out of its TUN device (see `io::plaintext_filter`). `PERMISSIVE`, `DISABLE` (meshguard
//! still encrypts between nodes) and no mode at all let plaintext in. Which policy
//! applies is Istio's precedence ([`PolicySet::mtls_mode`]): one with a selector in the
//! identity's namespace, else the namespace-wide one, else the mesh-wide one (root
//! namespace, no selector), an `UNSET` mode deferring to the next; a selector in the root
//! namespace covers only that namespace's identities. Of several at one level the first
//! loaded wins (Istio: the oldest), with a warning. `portLevelMtls` is rejected.
//!
//! The TOML form:
//!
//! ```toml
//! [[peer_authentication]]
//! name = "default"
//! namespace = "payments"
//! selector = { app = "payment-service" }    # optional matchLabels
//! mode = "STRICT"                           # UNSET | PERMISSIVE | STRICT | DISABLE
//! ```

mod build;
mod eval;
mod istio;
mod model;
mod toml_file;
mod values;

#[cfg(test)]
mod istio_tests;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use eval::{Decision, Evaluator, Reason, Request, Target};
pub use istio::parse_istio_yaml;
pub use model::{
    Action, Condition, DefaultAction, Destination, MtlsMode, Pattern, PeerAuthentication, Policy,
    PolicySet, PortMatch, Protocol, Rule, Source, Values,
};
pub use toml_file::parse_toml;
pub(crate) use values::validate_namespace;

use crate::file_error::{read_to_string, FileError};

/// The default root namespace (Istio's).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The two forms a policy file can take, told apart by its extension (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.toml`: meshguard's form.
    Toml,
    /// `.yaml` or `.yml`: Istio `AuthorizationPolicy` / `PeerAuthentication`.
    IstioYaml,
}

impl FileKind {
    /// The form of `path`, or why it has none.
    pub fn of(path: &Path) -> Result<FileKind, &'static str> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("toml") => Ok(FileKind::Toml),
            Some("yaml" | "yml") => Ok(FileKind::IstioYaml),
            _ => Err(
                "unknown policy file type: policy files end in .toml (meshguard form) \
                      or .yaml/.yml (Istio)",
            ),
        }
    }
}

/// Adds the Istio documents of `text` to `set`, as a policy file of that text would;
/// `origin` names where they came from in errors (a file, or a cluster object).
pub fn add_istio_yaml(set: &mut PolicySet, text: &str, origin: &Path) -> Result<(), FileError> {
    istio::read_istio_yaml(text, origin, set)
}

/// Loads and merges policy files: `.toml` files in meshguard's form, `.yaml`/`.yml` files
/// of Istio documents. Two policies with the same `namespace/name` are an error, in one
/// file or across files.
pub fn load_files(paths: &[PathBuf]) -> Result<PolicySet, FileError> {
    let mut set = PolicySet::default();
    for path in paths {
        let kind = FileKind::of(path).map_err(|reason| FileError::whole_file(path, reason))?;
        let text = read_to_string(path)?;
        match kind {
            FileKind::Toml => toml_file::read_toml(&text, path, &mut set)?,
            FileKind::IstioYaml => istio::read_istio_yaml(&text, path, &mut set)?,
        }
    }
    Ok(set)
}
