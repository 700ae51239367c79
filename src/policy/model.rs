//! The allow-list model shared by the TOML and Istio loaders, and the value parsers both
//! use (patterns, IP blocks, ports, names), so that both forms validate alike.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;

use crate::identity::Principal;

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
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Other(n) => write!(f, "ip protocol {n}"),
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
                    Protocol::Icmp | Protocol::Other(_) => false,
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

/// One rule: any of `from` (empty = any source) AND any of `to` (empty = any destination).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
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

/// A workload-level `PeerAuthentication` in STRICT mode: local identities of `namespace`
/// whose labels match `selector` (never empty) get the STRICT default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrictWorkload {
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub origin: String,
}

/// Everything loaded from policy files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// Namespaces with a namespace-wide STRICT `PeerAuthentication`.
    pub strict_namespaces: BTreeSet<String>,
    /// A STRICT `PeerAuthentication` without selector in the root namespace.
    pub mesh_strict: bool,
    /// STRICT `PeerAuthentication`s with a selector.
    pub strict_workloads: Vec<StrictWorkload>,
    /// Adjustments made while loading (ignored or neutralised Istio fields, rules that can
    /// never match), each as one line `"{file}: {key}: {message}"` for the daemon to log.
    pub warnings: Vec<String>,
}

/// A policy file error: which file, which key, and why.
///
/// `key` is the path of the offending value: `policy[1].rules[0].from[0].principals[2]`
/// in TOML (indices count from 0), `document 2: spec.rules[0].to[0].operation.methods`
/// in YAML (documents count from 1, indices from 0). For syntax errors it is the position
/// (`line N, column M`). It is empty only for errors about the whole file, and then
/// `Display` leaves it out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl PolicyError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        PolicyError {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Value parsers. Each returns the reason on failure; callers add file and key.

/// A key and the reason it is wrong, before the file is attached.
pub(crate) type Fail = (String, String);

const SPIFFE_SCHEME: &str = "spiffe://";

/// Splits a pattern into its kind; `*` may appear once, at the start or at the end.
fn split_pattern(s: &str) -> Result<Pattern, String> {
    if s.is_empty() {
        return Err("empty value".to_owned());
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    let stars = s.matches('*').count();
    if stars == 0 {
        return Ok(Pattern::Exact(s.to_owned()));
    }
    if stars == 1 {
        if let Some(rest) = s.strip_prefix('*') {
            return Ok(Pattern::Suffix(rest.to_owned()));
        }
        if let Some(rest) = s.strip_suffix('*') {
            return Ok(Pattern::Prefix(rest.to_owned()));
        }
    }
    Err(format!(
        "invalid pattern {s:?}: '*' may appear once, at the start (*suffix) or at the end \
         (prefix*), or alone (*)"
    ))
}

fn check_pattern_chars(
    s: &str,
    full: &str,
    allowed: fn(char) -> bool,
    what: &str,
) -> Result<(), String> {
    match s.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(format!(
            "invalid character '{}' in {what} pattern {full:?}",
            c.escape_debug()
        )),
        None => Ok(()),
    }
}

/// A principal pattern. `spiffe://` is removed (any letter case); an exact value must be
/// a valid principal and is stored in Istio form.
pub(crate) fn parse_principal_pattern(s: &str) -> Result<Pattern, String> {
    let body = match s.get(..SPIFFE_SCHEME.len()) {
        Some(scheme) if scheme.eq_ignore_ascii_case(SPIFFE_SCHEME) => &s[SPIFFE_SCHEME.len()..],
        _ => s,
    };
    if body.is_empty() && !s.is_empty() {
        return Err(format!("invalid principal {s:?}: nothing after spiffe://"));
    }
    match split_pattern(body)? {
        Pattern::Exact(e) => {
            let p: Principal = e
                .parse()
                .map_err(|err| format!("invalid principal {s:?}: {err}"))?;
            Ok(Pattern::Exact(p.to_string()))
        }
        wildcard => check_wildcard(wildcard, s, principal_char, "principal"),
    }
}

/// A prefix or suffix pattern keeps to `allowed` characters; `*` is always fine.
fn check_wildcard(
    pattern: Pattern,
    full: &str,
    allowed: fn(char) -> bool,
    what: &str,
) -> Result<Pattern, String> {
    if let Pattern::Prefix(v) | Pattern::Suffix(v) = &pattern {
        check_pattern_chars(v, full, allowed, what)?;
    }
    Ok(pattern)
}

fn principal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn k8s_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-')
}

/// A namespace pattern; an exact value must be a valid namespace name.
pub(crate) fn parse_namespace_pattern(s: &str) -> Result<Pattern, String> {
    match split_pattern(s)? {
        Pattern::Exact(e) => {
            validate_namespace(&e)?;
            Ok(Pattern::Exact(e))
        }
        wildcard => check_wildcard(wildcard, s, k8s_name_char, "namespace"),
    }
}

/// A namespace name, with the same rules as the namespace of a principal.
pub(crate) fn validate_namespace(s: &str) -> Result<(), String> {
    Principal::new("td", s, "sa")
        .map(|_| ())
        .map_err(|e| format!("invalid namespace {s:?}: {e}"))
}

/// A policy name: like a Kubernetes object name (a-z 0-9 . -, at most 253 characters).
pub(crate) fn validate_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty name".to_owned());
    }
    if let Some(c) = s.chars().find(|&c| !k8s_name_char(c)) {
        return Err(format!(
            "invalid character '{}' in name {s:?} (allowed: a-z 0-9 . -)",
            c.escape_debug()
        ));
    }
    if s.len() > 253 {
        return Err(format!(
            "name is {} characters long; the maximum is 253",
            s.len()
        ));
    }
    Ok(())
}

/// Label selector keys must be non-empty.
pub(crate) fn validate_selector(
    selector: &BTreeMap<String, String>,
    key: &str,
) -> Result<(), Fail> {
    for k in selector.keys() {
        if k.is_empty() {
            return Err((key.to_owned(), "empty label name".to_owned()));
        }
    }
    Ok(())
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (`10.1.2.3`). Host bits of a
/// CIDR are cleared.
pub(crate) fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    if s.is_empty() {
        return Err("empty value".to_owned());
    }
    if s.contains('/') {
        IpNet::from_str(s)
            .map(|n| n.trunc())
            .map_err(|_| format!("invalid CIDR {s:?}; expected e.g. 10.0.0.0/8 or fd00::/8"))
    } else {
        IpAddr::from_str(s).map(IpNet::from).map_err(|_| {
            format!(
                "invalid IP address {s:?}; expected an address (10.1.2.3) or a CIDR (10.0.0.0/8)"
            )
        })
    }
}

const PORT_FORMS: &str = "expected \"8080/tcp\", \"53/udp\", \"9000-9100/tcp\", \"8080\" \
                          (tcp or udp), \"tcp\", \"udp\", \"icmp\" or \"any\"";

fn parse_port_number(s: &str, full: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port {full:?}; {PORT_FORMS}"));
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(format!(
            "invalid port {full:?}: port numbers are 1 to 65535"
        )),
    }
}

/// Our TOML port form (see [`PortMatch`]).
pub(crate) fn parse_port_toml(s: &str) -> Result<PortMatch, String> {
    if s.is_empty() {
        return Err("empty value".to_owned());
    }
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "any" => return Ok(PortMatch::Any),
        "icmp" => return Ok(PortMatch::Icmp),
        "tcp" | "udp" => {
            return Ok(PortMatch::Ports {
                tcp: lower == "tcp",
                udp: lower == "udp",
                first: 0,
                last: u16::MAX,
            })
        }
        _ => {}
    }
    let (range, tcp, udp) = match lower.split_once('/') {
        None => (lower.as_str(), true, true),
        Some((r, "tcp")) => (r, true, false),
        Some((r, "udp")) => (r, false, true),
        Some((_, "icmp")) => {
            return Err(format!(
                "invalid port {s:?}: ICMP has no ports; write \"icmp\""
            ))
        }
        Some(_) => {
            return Err(format!(
                "invalid port {s:?}: the protocol after '/' must be tcp or udp; {PORT_FORMS}"
            ))
        }
    };
    let (first, last) = match range.split_once('-') {
        None => {
            let p = parse_port_number(range, s)?;
            (p, p)
        }
        Some((a, b)) => {
            let a = parse_port_number(a, s)?;
            let b = parse_port_number(b, s)?;
            if a > b {
                return Err(format!("invalid port range {s:?}: {a} is greater than {b}"));
            }
            (a, b)
        }
    };
    Ok(PortMatch::Ports {
        tcp,
        udp,
        first,
        last,
    })
}

/// Istio's port form: a number, meaning that port over tcp or udp.
pub(crate) fn parse_port_istio(s: &str) -> Result<PortMatch, String> {
    if s.is_empty() {
        return Err("empty value".to_owned());
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid port {s:?}: Istio ports are numbers from 1 to 65535"
        ));
    }
    let p = parse_port_number(s, s)?;
    Ok(PortMatch::Ports {
        tcp: true,
        udp: true,
        first: p,
        last: p,
    })
}

/// One value of a list, with its line when the file format reports one (TOML).
pub(crate) struct Item<'a> {
    pub text: &'a str,
    pub line: Option<usize>,
}

/// A list as written: the line of the list itself (if known) and its values.
pub(crate) type List<'a> = (Option<usize>, Vec<Item<'a>>);

/// Prefixes a reason with `line N: ` when the line is known.
pub(crate) fn at_line(line: Option<usize>, reason: impl fmt::Display) -> String {
    match line {
        Some(l) => format!("line {l}: {reason}"),
        None => reason.to_string(),
    }
}

/// Parses every value of an optional list with `parse`, naming `key[i]` on failure.
/// An absent list is empty; a present but empty list is an error, since "no values"
/// would read as "nobody" while it means "no condition".
pub(crate) fn parse_list<T>(
    list: Option<List<'_>>,
    key: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, Fail> {
    let Some((line, values)) = list else {
        return Ok(Vec::new());
    };
    if values.is_empty() {
        return Err((
            key.to_owned(),
            at_line(line, "empty list; omit the field to put no condition on it"),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            parse(v.text).map_err(|reason| (format!("{key}[{i}]"), at_line(v.line, reason)))
        })
        .collect()
}

/// The six source lists as written, before parsing.
#[derive(Default)]
pub(crate) struct SourceLists<'a> {
    pub principals: Option<List<'a>>,
    pub not_principals: Option<List<'a>>,
    pub namespaces: Option<List<'a>>,
    pub not_namespaces: Option<List<'a>>,
    pub ip_blocks: Option<List<'a>>,
    pub not_ip_blocks: Option<List<'a>>,
}

impl SourceLists<'_> {
    pub fn is_empty(&self) -> bool {
        self.principals.is_none()
            && self.not_principals.is_none()
            && self.namespaces.is_none()
            && self.not_namespaces.is_none()
            && self.ip_blocks.is_none()
            && self.not_ip_blocks.is_none()
    }
}

/// Field names of the six source lists in one file form, in `SourceLists` order.
pub(crate) type SourceNames = [&'static str; 6];

/// Parses the source lists under `key` (e.g. `policy[0].rules[1].from[0]`).
pub(crate) fn build_source(
    lists: SourceLists<'_>,
    key: &str,
    names: &SourceNames,
) -> Result<Source, Fail> {
    let k = |i: usize| format!("{key}.{}", names[i]);
    Ok(Source {
        principals: parse_list(lists.principals, &k(0), parse_principal_pattern)?,
        not_principals: parse_list(lists.not_principals, &k(1), parse_principal_pattern)?,
        namespaces: parse_list(lists.namespaces, &k(2), parse_namespace_pattern)?,
        not_namespaces: parse_list(lists.not_namespaces, &k(3), parse_namespace_pattern)?,
        ip_blocks: parse_list(lists.ip_blocks, &k(4), parse_ip_block)?,
        not_ip_blocks: parse_list(lists.not_ip_blocks, &k(5), parse_ip_block)?,
    })
}

/// Parses `ports` and `not_ports` under `key` with the given port syntax.
pub(crate) fn build_destination(
    ports: Option<List<'_>>,
    not_ports: Option<List<'_>>,
    key: &str,
    names: [&str; 2],
    parse: fn(&str) -> Result<PortMatch, String>,
) -> Result<Destination, Fail> {
    Ok(Destination {
        ports: parse_list(ports, &format!("{key}.{}", names[0]), parse)?,
        not_ports: parse_list(not_ports, &format!("{key}.{}", names[1]), parse)?,
    })
}
