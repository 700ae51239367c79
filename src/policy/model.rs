//! The allow-list model that both file forms (meshguard's TOML and Istio YAML) load into.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;

use crate::file_error::FileError;

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Never changes the decision; the decision reports which AUDIT policies matched.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }

    /// `ALLOW`, `DENY` or `AUDIT`, in any letter case. `CUSTOM` gets its own error.
    pub(crate) fn parse(s: &str) -> Result<Action, String> {
        match s.to_ascii_uppercase().as_str() {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "AUDIT" => Ok(Action::Audit),
            "CUSTOM" => Err(
                "action CUSTOM (external authorization) is not supported by \
                             meshguard; use ALLOW, DENY or AUDIT"
                    .to_owned(),
            ),
            _ => Err(format!(
                "unknown action {s:?}; expected ALLOW, DENY or AUDIT"
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision for a local identity that no ALLOW policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    Deny,
}

impl FromStr for DefaultAction {
    type Err = String;

    /// `allow` or `deny`, in any letter case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("allow") {
            Ok(DefaultAction::Allow)
        } else if s.eq_ignore_ascii_case("deny") {
            Ok(DefaultAction::Deny)
        } else {
            Err(format!(
                "unknown default {s:?}; expected \"allow\" or \"deny\""
            ))
        }
    }
}

impl fmt::Display for DefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultAction::Allow => "allow",
            DefaultAction::Deny => "deny",
        })
    }
}

/// The transport protocol of a packet. `Icmp` covers ICMP and ICMPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// Any other IP protocol number: only the `"any"` port condition matches it.
    Other(u8),
    /// A packet whose protocol cannot be known (an IPv6 extension chain too long or cut
    /// short): it matches every port condition of DENY and AUDIT rules and no port
    /// condition of ALLOW rules but `"any"`.
    Unknown,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Other(n) => write!(f, "ip protocol {n}"),
            Protocol::Unknown => f.write_str("unknown protocol"),
        }
    }
}

/// A principal or namespace pattern: exact, `prefix*`, `*suffix`, or `*` (anything).
///
/// Principal patterns hold the Istio form (`td/ns/x/sa/y`): a `spiffe://` prefix in the
/// policy is removed when the pattern is parsed, and exact principals are normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    #[inline]
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// One destination port condition.
///
/// TOML spellings: `"8080/tcp"`, `"53/udp"`, `"9000-9100/tcp"`, `"8080"` (tcp or udp),
/// `"9000-9100"` (tcp or udp), `"tcp"` / `"udp"` (every port of that protocol), `"icmp"`
/// and `"any"` (every protocol and port). Istio's `ports: ["8080"]` is tcp or udp 8080.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// Every protocol, every port (and packets without ports).
    Any,
    /// ICMP and ICMPv6 packets only; they carry no port.
    Icmp,
    /// TCP and/or UDP packets whose destination port is in `first..=last`.
    Ports {
        tcp: bool,
        udp: bool,
        first: u16,
        last: u16,
    },
}

impl PortMatch {
    #[inline]
    pub fn matches(&self, protocol: Protocol, port: Option<u16>) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Icmp => protocol == Protocol::Icmp,
            PortMatch::Ports {
                tcp,
                udp,
                first,
                last,
            } => {
                let proto_ok = match protocol {
                    Protocol::Tcp => tcp,
                    Protocol::Udp => udp,
                    Protocol::Icmp | Protocol::Other(_) | Protocol::Unknown => false,
                };
                proto_ok && port.is_some_and(|p| first <= p && p <= last)
            }
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PortMatch::Any => f.write_str("any"),
            PortMatch::Icmp => f.write_str("icmp"),
            PortMatch::Ports {
                tcp,
                udp,
                first,
                last,
            } => {
                let proto = match (tcp, udp) {
                    (true, false) => "/tcp",
                    (false, true) => "/udp",
                    _ => "",
                };
                if first == 0 && last == u16::MAX && !proto.is_empty() {
                    return f.write_str(&proto[1..]);
                }
                if first == last {
                    write!(f, "{first}{proto}")
                } else {
                    write!(f, "{first}-{last}{proto}")
                }
            }
        }
    }
}

/// One `from` entry. Fields are AND'ed; the values of a field are OR'ed; a `not_*` field
/// must match none of its values. An empty list puts no condition on that field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// Against the peer principal, Istio form.
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    /// Against the peer principal's namespace.
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    /// Against the packet's source address (host bits already cleared).
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

/// One `to` entry: `ports` (any of them) AND not any of `not_ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub ports: Vec<PortMatch>,
    pub not_ports: Vec<PortMatch>,
}

/// Values of one `when` condition: the attribute must match one of `values` (when there
/// are any) and none of `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

/// A `when` condition on one of the attributes Istio checks for TCP as well as HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `source.ip`: the packet's source address.
    SourceIp(Values<IpNet>),
    /// `source.principal`: the peer principal, Istio form.
    SourcePrincipal(Values<Pattern>),
    /// `source.namespace`: the peer principal's namespace.
    SourceNamespace(Values<Pattern>),
    /// `destination.ip`: the packet's destination address (the local identity's).
    DestinationIp(Values<IpNet>),
    /// `destination.port`: like `ports`.
    DestinationPort(Values<PortMatch>),
}

/// One rule: any of `from` (empty = any source) AND any of `to` (empty = any destination)
/// AND every condition of `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
    pub when: Vec<Condition>,
    /// Set for an ALLOW rule that used fields meshguard cannot check at L3/L4 (Istio's
    /// HTTP-only fields and `when`): the rule matches nothing. See the module docs.
    pub matches_nothing: bool,
}

/// One policy, from either file form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// `matchLabels`: every label must be present on the local identity with this value.
    /// Empty selects every identity in scope.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    /// Empty: the policy matches nothing (an ALLOW policy still selects its identities).
    pub rules: Vec<Rule>,
    /// Where it was defined: `"file.toml: policy[2]"` or `"file.yaml: document 3"`.
    pub origin: String,
}

impl Policy {
    /// `namespace/name`, the name decisions report.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The mTLS mode a `PeerAuthentication` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit the mode of the enclosing scope (namespace, then mesh).
    Unset,
    /// Plaintext and tunnelled traffic are both let in (Istio's default).
    Permissive,
    /// Only tunnelled traffic reaches the identity's addresses: plaintext is dropped.
    Strict,
    /// Istio's "plaintext only". meshguard still encrypts between nodes and lets
    /// plaintext in, as with `Permissive`.
    Disable,
}

impl MtlsMode {
    /// Istio's spelling: `UNSET`, `PERMISSIVE`, `STRICT` or `DISABLE`.
    pub fn parse(mode: &str) -> Result<MtlsMode, String> {
        match mode {
            "UNSET" => Ok(MtlsMode::Unset),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            "DISABLE" => Ok(MtlsMode::Disable),
            other => Err(format!(
                "unknown mode {other:?}; expected UNSET, PERMISSIVE, STRICT or DISABLE"
            )),
        }
    }
}

/// A `PeerAuthentication`: the mTLS mode of the local identities of `namespace` (of every
/// namespace, in the root namespace) whose labels match `selector` (empty: all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub mode: MtlsMode,
    pub origin: String,
}

/// Everything loaded from policy files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// In load order; the first of several at one level wins (Istio: the oldest).
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Adjustments made while loading (ignored or neutralised Istio fields, rules that can
    /// never match), each as one line `"{file}: {key}: {message}"` for the daemon to log.
    pub warnings: Vec<String>,
}

impl PolicySet {
    /// Adds a `PeerAuthentication`, refusing a second one with the same `namespace/name`
    /// and warning about a second namespace-wide (or mesh-wide) one; `key` is where the
    /// new one is defined in `file`.
    pub(crate) fn add_peer_authentication(
        &mut self,
        new: PeerAuthentication,
        file: &Path,
        key: &str,
    ) -> Result<(), FileError> {
        let same_name =
            |o: &&PeerAuthentication| o.namespace == new.namespace && o.name == new.name;
        if let Some(other) = self.peer_authentications.iter().find(same_name) {
            return Err(FileError::new(
                file,
                key,
                format!(
                    "duplicate PeerAuthentication {}/{}; also defined at {}",
                    new.namespace, new.name, other.origin
                ),
            ));
        }
        if new.selector.is_empty() {
            let wide =
                |o: &&PeerAuthentication| o.namespace == new.namespace && o.selector.is_empty();
            if let Some(first) = self.peer_authentications.iter().find(wide) {
                self.warnings.push(format!(
                    "{}: {key}: a second PeerAuthentication without selector in namespace \
                     {}; the first one loaded ({}) applies and this one is ignored, as \
                     Istio applies the oldest",
                    file.display(),
                    new.namespace,
                    first.origin
                ));
            }
        }
        if new.mode == MtlsMode::Disable {
            self.warnings.push(format!(
                "{}: {key}: mtls mode DISABLE: meshguard still encrypts between nodes, and \
                 lets plaintext in to {}/{}'s identities as PERMISSIVE does",
                file.display(),
                new.namespace,
                new.name
            ));
        }
        self.peer_authentications.push(new);
        Ok(())
    }

    /// The mTLS mode in force for a local identity of `namespace` with `labels`, as Istio
    /// resolves it: a workload-selecting `PeerAuthentication` in its namespace, else the
    /// namespace-wide one, else the mesh-wide one (root namespace, no selector); `Unset`
    /// defers to the next, and with none set the mode is `Permissive`.
    pub fn mtls_mode(
        &self,
        root_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> MtlsMode {
        let in_namespace = |ns: &str, selecting: bool| {
            self.peer_authentications.iter().find(move |p| {
                p.namespace == ns
                    && p.selector.is_empty() != selecting
                    && selector_matches(&p.selector, labels)
            })
        };
        [
            in_namespace(namespace, true),
            in_namespace(namespace, false),
            in_namespace(root_namespace, false),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.mode)
        .find(|&mode| mode != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
    }

    /// Adds a policy, refusing a second one with the same `namespace/name`; `key` is
    /// where the new one is defined in `file`.
    pub(crate) fn add(&mut self, policy: Policy, file: &Path, key: &str) -> Result<(), FileError> {
        if let Some(other) = self
            .policies
            .iter()
            .find(|o| o.namespace == policy.namespace && o.name == policy.name)
        {
            return Err(FileError::new(
                file,
                key,
                format!(
                    "duplicate policy {}; also defined at {}",
                    policy.id(),
                    other.origin
                ),
            ));
        }
        self.policies.push(policy);
        Ok(())
    }
}

/// Whether every label `selector` asks for is on the identity (an empty selector selects
/// all).
pub(crate) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
