//! Compiled policies and their evaluation.
//!
//! [`Evaluator::new`] resolves everything that depends only on who is talking: which
//! policies apply to each local identity (scope and selector), whether an ALLOW policy
//! selects it, its default, and, per (local identity, peer identity) pair, which rules can
//! match at all given the peer's principal and namespace. What is left per packet is the
//! source address (`ipBlocks`) and the destination protocol and port, checked against the
//! few rules of that pair. Nothing is allocated per call unless an AUDIT policy matches.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::model::{
    selector_matches, Action, Condition, DefaultAction, Destination, Pattern, PolicySet, PortMatch,
    Protocol,
};
use crate::identity::{LocalId, PairTable, PeerId, PrefixTable, Principal};

/// A local identity as policies see it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub principal: &'a Principal,
    pub labels: &'a BTreeMap<String, String>,
}

/// What is known about one packet (or flow) at ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// The packet's source address. `None` only in tools that check a decision without
    /// one: then an ALLOW rule with an `ip_blocks`/`not_ip_blocks` condition does not match
    /// and a DENY or AUDIT rule with one does (fail closed).
    pub source_ip: Option<IpAddr>,
    /// The packet's destination address, for `when: destination.ip`; `None` matches
    /// like an unknown source address.
    pub destination_ip: Option<IpAddr>,
    pub protocol: Protocol,
    /// Destination port (TCP, UDP); `None` for ICMP and other protocols.
    pub port: Option<u16>,
}

/// Why a decision came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A DENY policy matched.
    Denied,
    /// An ALLOW policy matched (and no DENY policy did).
    Allowed,
    /// ALLOW policies select the local identity, but none matched.
    NoAllowMatched,
    /// No ALLOW policy selects the local identity; the default is allow.
    DefaultAllow,
    /// No ALLOW policy selects the local identity; the default is deny.
    DefaultDeny,
}

/// The outcome for one request. Cheap to produce: policy names are shared, not copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// `namespace/name` of the DENY or ALLOW policy that decided, if one did.
    pub policy: Option<Arc<str>>,
    /// Index of the matching rule in that policy (counting from 0).
    pub rule: Option<usize>,
    /// `namespace/name` of every AUDIT policy that matched, in policy order.
    pub audited_by: Vec<Arc<str>>,
}

impl Decision {
    /// One readable line, e.g. `deny: DENY policy payments/block-legacy rule 0 matched`.
    pub fn explain(&self) -> String {
        let policy = self.policy.as_deref().unwrap_or("?");
        let rule = self.rule.map_or_else(|| "?".to_owned(), |r| r.to_string());
        let mut s = match self.reason {
            Reason::Denied => format!("deny: DENY policy {policy} rule {rule} matched"),
            Reason::Allowed => format!("allow: ALLOW policy {policy} rule {rule} matched"),
            Reason::NoAllowMatched => {
                "deny: ALLOW policies select this identity but none of their rules matched"
                    .to_owned()
            }
            Reason::DefaultAllow => {
                "allow: no ALLOW policy selects this identity; default allow".to_owned()
            }
            Reason::DefaultDeny => {
                "deny: no ALLOW policy selects this identity; default deny".to_owned()
            }
        };
        if !self.audited_by.is_empty() {
            s.push_str("; audited by ");
            for (i, a) in self.audited_by.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(a);
            }
        }
        s
    }
}

/// A set of address prefixes.
#[derive(Debug)]
struct IpSet(PrefixTable<()>);

impl IpSet {
    fn new(nets: &[ipnet::IpNet]) -> Option<IpSet> {
        if nets.is_empty() {
            None
        } else {
            Some(IpSet(nets.iter().map(|n| (*n, ())).collect()))
        }
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        self.0.longest_match(ip).is_some()
    }
}

/// The address part of one source: in `blocks` (if any) and not in `not_blocks`.
#[derive(Debug)]
struct IpCond {
    blocks: Option<IpSet>,
    not_blocks: Option<IpSet>,
}

impl IpCond {
    /// `None` when neither list has an entry (no condition).
    fn new(blocks: &[ipnet::IpNet], not_blocks: &[ipnet::IpNet]) -> Option<IpCond> {
        let (blocks, not_blocks) = (IpSet::new(blocks), IpSet::new(not_blocks));
        (blocks.is_some() || not_blocks.is_some()).then_some(IpCond { blocks, not_blocks })
    }

    #[inline]
    fn matches(&self, ip: Option<IpAddr>, unknown_matches: bool) -> bool {
        match ip {
            None => unknown_matches,
            Some(ip) => {
                self.blocks.as_ref().is_none_or(|b| b.contains(ip))
                    && !self.not_blocks.as_ref().is_some_and(|b| b.contains(ip))
            }
        }
    }
}

/// One source with its identity part still to resolve per pair.
#[derive(Debug)]
struct CompiledSource {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip: Option<Arc<IpCond>>,
}

impl CompiledSource {
    fn identity_matches(&self, principal: &str, namespace: &str) -> bool {
        fn field(yes: &[Pattern], no: &[Pattern], value: &str) -> bool {
            (yes.is_empty() || yes.iter().any(|p| p.matches(value)))
                && !no.iter().any(|p| p.matches(value))
        }
        field(&self.principals, &self.not_principals, principal)
            && field(&self.namespaces, &self.not_namespaces, namespace)
    }
}

#[derive(Debug)]
struct CompiledDestination {
    ports: Box<[PortMatch]>,
    not_ports: Box<[PortMatch]>,
}

impl CompiledDestination {
    fn new(d: &Destination) -> CompiledDestination {
        CompiledDestination {
            ports: d.ports.clone().into_boxed_slice(),
            not_ports: d.not_ports.clone().into_boxed_slice(),
        }
    }

    /// `unknown_port_matches` decides for a TCP or UDP packet whose port is unknown (a
    /// later fragment, a truncated header), and for a packet whose protocol is unknown
    /// (every port condition could be meant): DENY and AUDIT rules treat it as matching
    /// those port conditions and ALLOW rules as matching none, so what cannot be read
    /// can never slip past `ports` or `not_ports` (fail closed).
    #[inline]
    fn matches(&self, protocol: Protocol, port: Option<u16>, unknown_port_matches: bool) -> bool {
        let unknown_port = port.is_none() && matches!(protocol, Protocol::Tcp | Protocol::Udp);
        let hit = |p: &PortMatch, unknown_counts_as: bool| match (p, protocol) {
            (PortMatch::Any, _) => true,
            (_, Protocol::Unknown) => unknown_counts_as,
            (&PortMatch::Ports { tcp, udp, .. }, _) if unknown_port => {
                unknown_counts_as && if protocol == Protocol::Tcp { tcp } else { udp }
            }
            _ => p.matches(protocol, port),
        };
        (self.ports.is_empty() || self.ports.iter().any(|p| hit(p, unknown_port_matches)))
            && !self.not_ports.iter().any(|p| hit(p, !unknown_port_matches))
    }
}

/// A `when` condition on the peer's identity, resolved per pair.
#[derive(Debug)]
struct IdentityCondition {
    on_namespace: bool,
    values: Vec<Pattern>,
    not_values: Vec<Pattern>,
}

impl IdentityCondition {
    fn matches(&self, principal: &str, namespace: &str) -> bool {
        let value = if self.on_namespace {
            namespace
        } else {
            principal
        };
        (self.values.is_empty() || self.values.iter().any(|p| p.matches(value)))
            && !self.not_values.iter().any(|p| p.matches(value))
    }
}

/// The `when` conditions checked per packet, all of which must hold.
#[derive(Debug, Default)]
struct PacketConditions {
    source_ip: Vec<IpCond>,
    destination_ip: Vec<IpCond>,
    ports: Vec<CompiledDestination>,
}

impl PacketConditions {
    #[inline]
    fn matches(&self, source: Option<IpAddr>, req: &Request, unknown_matches: bool) -> bool {
        let destination = req.destination_ip.map(|ip| ip.to_canonical());
        self.source_ip
            .iter()
            .all(|c| c.matches(source, unknown_matches))
            && self
                .destination_ip
                .iter()
                .all(|c| c.matches(destination, unknown_matches))
            && self
                .ports
                .iter()
                .all(|d| d.matches(req.protocol, req.port, unknown_matches))
    }
}

#[derive(Debug)]
struct CompiledRule {
    index: u32,
    /// Empty: any source.
    from: Vec<CompiledSource>,
    /// Empty: any destination.
    to: Arc<[CompiledDestination]>,
    /// `when` on the peer's principal and namespace.
    identity_when: Vec<IdentityCondition>,
    /// `when` on addresses and ports; `None`: no such condition.
    packet_when: Option<Arc<PacketConditions>>,
}

#[derive(Debug)]
struct CompiledPolicy {
    id: Arc<str>,
    action: Action,
    /// Rules that can match (ALLOW rules neutralised at load time are left out).
    rules: Vec<CompiledRule>,
}

/// What remains of a rule's `from` once the peer is known.
#[derive(Debug)]
enum PairFrom {
    /// Some source matches the peer with no address condition.
    Any,
    /// The sources that match the peer, by their address conditions (OR'ed).
    Ip(Box<[Arc<IpCond>]>),
}

#[derive(Debug)]
struct PairRule {
    policy: u32,
    rule: u32,
    from: PairFrom,
    to: Arc<[CompiledDestination]>,
    when: Option<Arc<PacketConditions>>,
}

impl PairRule {
    #[inline]
    fn matches(&self, ip: Option<IpAddr>, req: &Request, unknown_matches: bool) -> bool {
        let from_ok = match &self.from {
            PairFrom::Any => true,
            PairFrom::Ip(conds) => conds.iter().any(|c| c.matches(ip, unknown_matches)),
        };
        from_ok
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|d| d.matches(req.protocol, req.port, unknown_matches)))
            && self
                .when
                .as_ref()
                .is_none_or(|w| w.matches(ip, req, unknown_matches))
    }
}

/// The rules that can match for one (local, peer) pair, by action, in policy order.
#[derive(Debug, Default)]
struct PairRules {
    deny: Box<[PairRule]>,
    allow: Box<[PairRule]>,
    audit: Box<[PairRule]>,
}

#[derive(Debug)]
struct Local {
    /// Indices of the policies whose scope and selector take in this identity.
    applicable: Vec<u32>,
    selected_by_allow: bool,
    default_allows: bool,
}

/// Policies compiled for a fixed list of local identities and peer identities.
#[derive(Debug)]
pub struct Evaluator {
    policies: Vec<CompiledPolicy>,
    locals: Vec<Local>,
    pairs: PairTable<PairRules>,
}

impl Evaluator {
    /// Compiles `set` for these local identities and peers (their positions in the two
    /// slices are the ids [`Evaluator::evaluate`] takes). `root_namespace` must be the one
    /// the set was loaded with.
    pub fn new(
        set: &PolicySet,
        default: DefaultAction,
        root_namespace: &str,
        locals: &[Target],
        peers: &[&Principal],
    ) -> Evaluator {
        let policies: Vec<CompiledPolicy> = set.policies.iter().map(compile_policy).collect();
        let locals: Vec<Local> = locals
            .iter()
            .map(|t| {
                let ns = t.principal.namespace();
                let applicable: Vec<u32> = set
                    .policies
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| {
                        (p.namespace == root_namespace || p.namespace == ns)
                            && selector_matches(&p.selector, t.labels)
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                let selected_by_allow = applicable
                    .iter()
                    .any(|&i| set.policies[i as usize].action == Action::Allow);
                Local {
                    applicable,
                    selected_by_allow,
                    default_allows: default == DefaultAction::Allow,
                }
            })
            .collect();
        let pairs = PairTable::new(locals.len(), peers.len(), |local, peer| {
            compile_pair(&policies, &locals[local.index()], peers[peer.index()])
        });
        Evaluator {
            policies,
            locals,
            pairs,
        }
    }

    #[cfg(test)]
    pub(crate) fn local_count(&self) -> usize {
        self.locals.len()
    }

    #[cfg(test)]
    pub(crate) fn peer_count(&self) -> usize {
        self.pairs.peer_count()
    }

    /// Whether some ALLOW policy selects the local identity (so the default never applies).
    pub fn selected_by_allow(&self, local: LocalId) -> bool {
        self.locals[local.index()].selected_by_allow
    }

    /// The decision for a packet from peer identity `peer` to local identity `local`.
    /// Only the rules that can match this pair are looked at, and only their address and
    /// port conditions.
    ///
    /// # Panics
    ///
    /// If `local` or `peer` is not one of the identities the evaluator was compiled for.
    #[inline]
    pub fn evaluate(&self, local: LocalId, peer: PeerId, request: &Request) -> Decision {
        let pair = self.pairs.get(local, peer);
        self.decide(&self.locals[local.index()], pair, request)
    }

    /// The decision for any peer principal, configured or not (for `policy check`).
    /// Compiles the pair on the fly: slower than [`Evaluator::evaluate`], same answer.
    ///
    /// # Panics
    ///
    /// If `local` is out of range.
    pub fn evaluate_principal(
        &self,
        local: LocalId,
        peer: &Principal,
        request: &Request,
    ) -> Decision {
        let local = &self.locals[local.index()];
        let pair = compile_pair(&self.policies, local, peer);
        self.decide(local, &pair, request)
    }

    #[inline]
    fn decide(&self, local: &Local, pair: &PairRules, req: &Request) -> Decision {
        let ip = req.source_ip.map(|ip| ip.to_canonical());
        let mut audited_by = Vec::new();
        let mut last = u32::MAX;
        for r in pair.audit.iter() {
            if r.policy != last && r.matches(ip, req, true) {
                audited_by.push(Arc::clone(&self.policies[r.policy as usize].id));
                last = r.policy;
            }
        }
        let decided = |allowed: bool, reason: Reason, r: &PairRule| Decision {
            allowed,
            reason,
            policy: Some(Arc::clone(&self.policies[r.policy as usize].id)),
            rule: Some(r.rule as usize),
            audited_by: Vec::new(),
        };
        let mut d = if let Some(r) = pair.deny.iter().find(|r| r.matches(ip, req, true)) {
            decided(false, Reason::Denied, r)
        } else if !local.selected_by_allow {
            Decision {
                allowed: local.default_allows,
                reason: if local.default_allows {
                    Reason::DefaultAllow
                } else {
                    Reason::DefaultDeny
                },
                policy: None,
                rule: None,
                audited_by: Vec::new(),
            }
        } else if let Some(r) = pair.allow.iter().find(|r| r.matches(ip, req, false)) {
            decided(true, Reason::Allowed, r)
        } else {
            Decision {
                allowed: false,
                reason: Reason::NoAllowMatched,
                policy: None,
                rule: None,
                audited_by: Vec::new(),
            }
        };
        d.audited_by = audited_by;
        d
    }
}

fn compile_policy(p: &super::model::Policy) -> CompiledPolicy {
    let rules = p
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.matches_nothing)
        .map(|(i, r)| CompiledRule {
            index: i as u32,
            from: r
                .from
                .iter()
                .map(|s| {
                    let ip = IpCond::new(&s.ip_blocks, &s.not_ip_blocks).map(Arc::new);
                    CompiledSource {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip,
                    }
                })
                .collect(),
            to: r.to.iter().map(CompiledDestination::new).collect(),
            identity_when: compile_identity_when(&r.when),
            packet_when: compile_packet_when(&r.when),
        })
        .collect();
    CompiledPolicy {
        id: Arc::from(p.id()),
        action: p.action,
        rules,
    }
}

fn compile_identity_when(when: &[Condition]) -> Vec<IdentityCondition> {
    when.iter()
        .filter_map(|c| {
            let (on_namespace, v) = match c {
                Condition::SourcePrincipal(v) => (false, v),
                Condition::SourceNamespace(v) => (true, v),
                _ => return None,
            };
            Some(IdentityCondition {
                on_namespace,
                values: v.values.clone(),
                not_values: v.not_values.clone(),
            })
        })
        .collect()
}

fn compile_packet_when(when: &[Condition]) -> Option<Arc<PacketConditions>> {
    let mut conditions = PacketConditions::default();
    for c in when {
        match c {
            Condition::SourceIp(v) => conditions
                .source_ip
                .extend(IpCond::new(&v.values, &v.not_values)),
            Condition::DestinationIp(v) => conditions
                .destination_ip
                .extend(IpCond::new(&v.values, &v.not_values)),
            Condition::DestinationPort(v) => {
                conditions
                    .ports
                    .push(CompiledDestination::new(&Destination {
                        ports: v.values.clone(),
                        not_ports: v.not_values.clone(),
                    }))
            }
            Condition::SourcePrincipal(_) | Condition::SourceNamespace(_) => {}
        }
    }
    let none = conditions.source_ip.is_empty()
        && conditions.destination_ip.is_empty()
        && conditions.ports.is_empty();
    (!none).then(|| Arc::new(conditions))
}

/// The rules of `local`'s policies that can match `peer`, by action, in policy order.
fn compile_pair(policies: &[CompiledPolicy], local: &Local, peer: &Principal) -> PairRules {
    let principal = peer.to_string();
    let namespace = peer.namespace();
    let (mut deny, mut allow, mut audit) = (Vec::new(), Vec::new(), Vec::new());
    for &pi in &local.applicable {
        let policy = &policies[pi as usize];
        for rule in &policy.rules {
            if !rule
                .identity_when
                .iter()
                .all(|c| c.matches(&principal, namespace))
            {
                continue;
            }
            let from = if rule.from.is_empty() {
                PairFrom::Any
            } else {
                let mut conds = Vec::new();
                let mut any = false;
                for s in rule
                    .from
                    .iter()
                    .filter(|s| s.identity_matches(&principal, namespace))
                {
                    match &s.ip {
                        None => {
                            any = true;
                            break;
                        }
                        Some(c) => conds.push(Arc::clone(c)),
                    }
                }
                if any {
                    PairFrom::Any
                } else if conds.is_empty() {
                    continue; // no source can match this peer
                } else {
                    PairFrom::Ip(conds.into_boxed_slice())
                }
            };
            let pr = PairRule {
                policy: pi,
                rule: rule.index,
                from,
                to: Arc::clone(&rule.to),
                when: rule.packet_when.clone(),
            };
            match policy.action {
                Action::Deny => deny.push(pr),
                Action::Allow => allow.push(pr),
                Action::Audit => audit.push(pr),
            }
        }
    }
    PairRules {
        deny: deny.into_boxed_slice(),
        allow: allow.into_boxed_slice(),
        audit: audit.into_boxed_slice(),
    }
}
