//! A slow, plain reference for allow-list decisions, and random cases to hold the
//! compiled evaluator against it (a differential test and a fuzz target drive both).
//!
//! The reference reads the policy model directly, per request, in the order the rules
//! are written: scope and selector, then DENY, then whether any ALLOW policy selects the
//! identity, then ALLOW; AUDIT policies are listed. An attribute that cannot be known
//! (no source address, a TCP or UDP packet without a port, an unknown protocol) makes
//! each condition on it hold for DENY and AUDIT rules and fail for ALLOW rules, so what
//! cannot be read never slips past a rule.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;

use crate::identity::Principal;
use crate::policy::{
    Action, Condition, Decision, DefaultAction, Destination, Pattern, Policy, PolicySet, PortMatch,
    Protocol, Reason, Request, Rule, Source, Target, Values,
};

/// The reference decision for a packet from `peer` to the local identity `local`.
pub fn reference_decision(
    set: &PolicySet,
    default: DefaultAction,
    root_namespace: &str,
    local: &Target,
    peer: &Principal,
    request: &Request,
) -> Decision {
    let applicable: Vec<&Policy> = set
        .policies
        .iter()
        .filter(|p| {
            (p.namespace == root_namespace || p.namespace == local.principal.namespace())
                && p.selector
                    .iter()
                    .all(|(k, v)| local.labels.get(k) == Some(v))
        })
        .collect();
    let first_match = |action: Action| {
        applicable
            .iter()
            .filter(|p| p.action == action)
            .find_map(|p| {
                p.rules
                    .iter()
                    .position(|r| rule_matches(r, action, peer, request))
                    .map(|rule| (Arc::<str>::from(p.id()), rule))
            })
    };
    let audited_by = applicable
        .iter()
        .filter(|p| p.action == Action::Audit)
        .filter(|p| {
            p.rules
                .iter()
                .any(|r| rule_matches(r, Action::Audit, peer, request))
        })
        .map(|p| Arc::<str>::from(p.id()))
        .collect();
    let decided = |allowed, reason, by: Option<(Arc<str>, usize)>| Decision {
        allowed,
        reason,
        policy: by.as_ref().map(|(p, _)| Arc::clone(p)),
        rule: by.map(|(_, r)| r),
        audited_by,
    };
    if let Some(by) = first_match(Action::Deny) {
        return decided(false, Reason::Denied, Some(by));
    }
    if !applicable.iter().any(|p| p.action == Action::Allow) {
        return match default {
            DefaultAction::Allow => decided(true, Reason::DefaultAllow, None),
            DefaultAction::Deny => decided(false, Reason::DefaultDeny, None),
        };
    }
    match first_match(Action::Allow) {
        Some(by) => decided(true, Reason::Allowed, Some(by)),
        None => decided(false, Reason::NoAllowMatched, None),
    }
}

/// `Some(answer)`, or `None` when the attribute the condition reads is unknown.
type Maybe = Option<bool>;

/// Any of `answers` holds: yes if one surely does, unknown if one might, else no.
fn any_of(answers: impl IntoIterator<Item = Maybe>) -> Maybe {
    let mut unknown = false;
    for answer in answers {
        match answer {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    if unknown {
        None
    } else {
        Some(false)
    }
}

/// A list condition: no values is no condition; else one of them must hold.
fn listed(values: Vec<Maybe>) -> Maybe {
    if values.is_empty() {
        Some(true)
    } else {
        any_of(values)
    }
}

/// A `not_` list condition: none of them may hold.
fn not_listed(values: Vec<Maybe>) -> Maybe {
    any_of(values).map(|hit| !hit)
}

fn rule_matches(rule: &Rule, action: Action, peer: &Principal, request: &Request) -> bool {
    if rule.matches_nothing {
        return false;
    }
    // Unknown attributes: DENY and AUDIT conditions hold, ALLOW conditions fail.
    let holds = |answer: Maybe| answer.unwrap_or(action != Action::Allow);
    let principal = peer.to_string();
    let namespace = peer.namespace();
    let source_ip = request.source_ip.map(|ip| ip.to_canonical());
    let destination_ip = request.destination_ip.map(|ip| ip.to_canonical());
    let patterns = |list: &[Pattern], value: &str| -> Vec<Maybe> {
        list.iter()
            .map(|p| Some(pattern_matches(p, value)))
            .collect()
    };
    let nets = |list: &[IpNet], ip: Option<IpAddr>| -> Vec<Maybe> {
        list.iter().map(|n| ip.map(|ip| n.contains(&ip))).collect()
    };
    let ports = |list: &[PortMatch]| -> Vec<Maybe> {
        list.iter()
            .map(|p| port_matches(p, request.protocol, request.port))
            .collect()
    };
    let source = |s: &Source| {
        holds(listed(patterns(&s.principals, &principal)))
            && holds(not_listed(patterns(&s.not_principals, &principal)))
            && holds(listed(patterns(&s.namespaces, namespace)))
            && holds(not_listed(patterns(&s.not_namespaces, namespace)))
            && holds(listed(nets(&s.ip_blocks, source_ip)))
            && holds(not_listed(nets(&s.not_ip_blocks, source_ip)))
    };
    let destination =
        |d: &Destination| holds(listed(ports(&d.ports))) && holds(not_listed(ports(&d.not_ports)));
    fn both<T>(values: &Values<T>, check: impl Fn(&[T]) -> Vec<Maybe>) -> (Maybe, Maybe) {
        (
            listed(check(&values.values)),
            not_listed(check(&values.not_values)),
        )
    }
    let condition = |c: &Condition| {
        let (yes, no) = match c {
            Condition::SourceIp(v) => both(v, |l| nets(l, source_ip)),
            Condition::DestinationIp(v) => both(v, |l| nets(l, destination_ip)),
            Condition::SourcePrincipal(v) => both(v, |l| patterns(l, &principal)),
            Condition::SourceNamespace(v) => both(v, |l| patterns(l, namespace)),
            Condition::DestinationPort(v) => both(v, ports),
        };
        holds(yes) && holds(no)
    };
    (rule.from.is_empty() || rule.from.iter().any(source))
        && (rule.to.is_empty() || rule.to.iter().any(destination))
        && rule.when.iter().all(condition)
}

fn pattern_matches(pattern: &Pattern, value: &str) -> bool {
    match pattern {
        Pattern::Any => true,
        Pattern::Exact(s) => value == s,
        Pattern::Prefix(p) => value.starts_with(p.as_str()),
        Pattern::Suffix(s) => value.ends_with(s.as_str()),
    }
}

fn port_matches(condition: &PortMatch, protocol: Protocol, port: Option<u16>) -> Maybe {
    match (condition, protocol) {
        (PortMatch::Any, _) => Some(true),
        (_, Protocol::Unknown) => None,
        (PortMatch::Icmp, protocol) => Some(protocol == Protocol::Icmp),
        (PortMatch::Ports { tcp: false, .. }, Protocol::Tcp) => Some(false),
        (PortMatch::Ports { udp: false, .. }, Protocol::Udp) => Some(false),
        (PortMatch::Ports { first, last, .. }, Protocol::Tcp | Protocol::Udp) => {
            port.map(|p| (*first..=*last).contains(&p))
        }
        (PortMatch::Ports { .. }, Protocol::Icmp | Protocol::Other(_)) => Some(false),
    }
}

/// One random case: policies, identities, and requests between them.
#[derive(Debug)]
pub struct PolicyCase {
    pub set: PolicySet,
    pub default: DefaultAction,
    pub locals: Vec<(Principal, BTreeMap<String, String>)>,
    pub peers: Vec<Principal>,
    /// (local index, peer index, request).
    pub requests: Vec<(usize, usize, Request)>,
}

/// The root namespace of generated cases.
pub const ROOT_NAMESPACE: &str = "istio-system";
const NAMESPACES: [&str; 4] = [ROOT_NAMESPACE, "payments", "pay", "web"];
const ACCOUNTS: [&str; 3] = ["api", "db", "api-v2"];
const TRUST_DOMAINS: [&str; 2] = ["cluster.local", "example.org"];
const LABEL_KEYS: [&str; 2] = ["app", "tier"];
const LABEL_VALUES: [&str; 2] = ["a", "b"];
/// Ports near which conditions and requests fall, so boundaries are hit.
const PORTS: [u16; 7] = [0, 22, 53, 80, 443, 8080, 65535];

fn principal(u: &mut Unstructured) -> Result<Principal> {
    let text = format!(
        "{}/ns/{}/sa/{}",
        u.choose(&TRUST_DOMAINS)?,
        u.choose(&NAMESPACES[1..])?,
        u.choose(&ACCOUNTS)?
    );
    Ok(text.parse().expect("a generated principal reads"))
}

/// A pattern against values like `values`: anything, one of them, or a cut of one.
fn pattern(u: &mut Unstructured, values: &[String]) -> Result<Pattern> {
    let value = u.choose(values)?.clone();
    let cut = u.int_in_range(0..=value.len())?;
    Ok(match u.int_in_range(0..=3)? {
        0 => Pattern::Any,
        1 => Pattern::Exact(value),
        2 if cut > 0 => Pattern::Prefix(value[..cut].to_owned()),
        3 if cut < value.len() => Pattern::Suffix(value[cut..].to_owned()),
        _ => Pattern::Exact(value),
    })
}

fn patterns(u: &mut Unstructured, values: &[String]) -> Result<Vec<Pattern>> {
    let n = u.int_in_range(0..=2)?;
    (0..n).map(|_| pattern(u, values)).collect()
}

fn ip(u: &mut Unstructured) -> Result<IpAddr> {
    let host = u.int_in_range(0..=5u8)?;
    Ok(match u.int_in_range(0..=2)? {
        0 => IpAddr::V4(Ipv4Addr::new(10, 0, u.int_in_range(0..=1)?, host)),
        1 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(host))),
        // IPv4 as an IPv4-mapped IPv6 address: decided as the IPv4 address.
        _ => IpAddr::V6(Ipv4Addr::new(10, 0, 0, host).to_ipv6_mapped()),
    })
}

fn net(u: &mut Unstructured) -> Result<IpNet> {
    let address = match ip(u)? {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => IpAddr::V4(v6.to_ipv4_mapped().unwrap()),
        other => other,
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    let len = *u.choose(&[max, max - 1, max - 2, max - 8, 0])?;
    Ok(IpNet::new(address, len).expect("a valid length").trunc())
}

fn nets(u: &mut Unstructured) -> Result<Vec<IpNet>> {
    let n = u.int_in_range(0..=2)?;
    (0..n).map(|_| net(u)).collect()
}

fn port_match(u: &mut Unstructured) -> Result<PortMatch> {
    Ok(match u.int_in_range(0..=5)? {
        0 => PortMatch::Any,
        1 => PortMatch::Icmp,
        _ => {
            let (a, b) = (*u.choose(&PORTS)?, *u.choose(&PORTS)?);
            let (tcp, udp) = *u.choose(&[(true, false), (false, true), (true, true)])?;
            PortMatch::Ports {
                tcp,
                udp,
                first: a.min(b),
                last: a.max(b),
            }
        }
    })
}

fn port_matches_list(u: &mut Unstructured) -> Result<Vec<PortMatch>> {
    let n = u.int_in_range(0..=2)?;
    (0..n).map(|_| port_match(u)).collect()
}

fn values<T>(
    u: &mut Unstructured,
    mut one: impl FnMut(&mut Unstructured) -> Result<Vec<T>>,
) -> Result<Values<T>> {
    Ok(Values {
        values: one(u)?,
        not_values: one(u)?,
    })
}

fn rule(u: &mut Unstructured, action: Action, names: &[String], spaces: &[String]) -> Result<Rule> {
    let mut rule = Rule::default();
    for _ in 0..u.int_in_range(0..=2)? {
        rule.from.push(Source {
            principals: patterns(u, names)?,
            not_principals: patterns(u, names)?,
            namespaces: patterns(u, spaces)?,
            not_namespaces: patterns(u, spaces)?,
            ip_blocks: nets(u)?,
            not_ip_blocks: nets(u)?,
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        rule.to.push(Destination {
            ports: port_matches_list(u)?,
            not_ports: port_matches_list(u)?,
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        rule.when.push(match u.int_in_range(0..=4)? {
            0 => Condition::SourceIp(values(u, nets)?),
            1 => Condition::DestinationIp(values(u, nets)?),
            2 => Condition::SourcePrincipal(values(u, |u| patterns(u, names))?),
            3 => Condition::SourceNamespace(values(u, |u| patterns(u, spaces))?),
            _ => Condition::DestinationPort(values(u, port_matches_list)?),
        });
    }
    // Only ALLOW rules are ever neutralised by the loaders.
    rule.matches_nothing = action == Action::Allow && u.ratio(1, 10)?;
    Ok(rule)
}

fn labels(u: &mut Unstructured) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for key in LABEL_KEYS {
        if u.arbitrary()? {
            labels.insert(key.to_owned(), u.choose(&LABEL_VALUES)?.to_string());
        }
    }
    Ok(labels)
}

/// A random case from `u`'s bytes: up to 6 policies over a few namespaces, 3 local and
/// 3 peer identities, and up to 16 requests.
pub fn policy_case(u: &mut Unstructured) -> Result<PolicyCase> {
    let locals = (0..u.int_in_range(1..=3)?)
        .map(|_| Ok((principal(u)?, labels(u)?)))
        .collect::<Result<Vec<_>>>()?;
    let peers = (0..u.int_in_range(1..=3)?)
        .map(|_| principal(u))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = peers.iter().map(ToString::to_string).collect();
    let spaces: Vec<String> = NAMESPACES.iter().map(|s| s.to_string()).collect();
    let mut set = PolicySet::default();
    for i in 0..u.int_in_range(0..=6)? {
        let action = *u.choose(&[Action::Allow, Action::Deny, Action::Audit])?;
        let rules = (0..u.int_in_range(0..=3)?)
            .map(|_| rule(u, action, &names, &spaces))
            .collect::<Result<Vec<_>>>()?;
        set.policies.push(Policy {
            name: format!("p{i}"),
            namespace: u.choose(&NAMESPACES)?.to_string(),
            selector: labels(u)?,
            action,
            rules,
            origin: format!("generated policy {i}"),
        });
    }
    let default = *u.choose(&[DefaultAction::Allow, DefaultAction::Deny])?;
    let mut requests = Vec::new();
    for _ in 0..u.int_in_range(1..=16)? {
        let protocol = *u.choose(&[
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Other(47),
            Protocol::Unknown,
        ])?;
        let port = match protocol {
            Protocol::Tcp | Protocol::Udp if u.ratio(9, 10)? => {
                let near = *u.choose(&PORTS)?;
                Some(
                    near.saturating_add(u.int_in_range(0..=1)?)
                        .saturating_sub(u.int_in_range(0..=1)?),
                )
            }
            _ => None,
        };
        let request = Request {
            source_ip: if u.ratio(9, 10)? { Some(ip(u)?) } else { None },
            destination_ip: if u.ratio(9, 10)? { Some(ip(u)?) } else { None },
            protocol,
            port,
        };
        requests.push((
            u.choose_index(locals.len())?,
            u.choose_index(peers.len())?,
            request,
        ));
    }
    Ok(PolicyCase {
        set,
        default,
        locals,
        peers,
        requests,
    })
}

/// Holds the compiled evaluator against the reference on every request of `case`
/// (through `evaluate` and `evaluate_principal`); the first disagreement, described.
pub fn check_case(case: &PolicyCase) -> std::result::Result<(), String> {
    use crate::identity::{LocalId, PeerId};
    use crate::policy::Evaluator;
    let targets: Vec<Target> = case
        .locals
        .iter()
        .map(|(principal, labels)| Target { principal, labels })
        .collect();
    let peers: Vec<&Principal> = case.peers.iter().collect();
    let evaluator = Evaluator::new(&case.set, case.default, ROOT_NAMESPACE, &targets, &peers);
    for (local, peer, request) in &case.requests {
        let expected = reference_decision(
            &case.set,
            case.default,
            ROOT_NAMESPACE,
            &targets[*local],
            peers[*peer],
            request,
        );
        let compiled = evaluator.evaluate(LocalId::new(*local), PeerId::new(*peer), request);
        let on_the_fly = evaluator.evaluate_principal(LocalId::new(*local), peers[*peer], request);
        if compiled != expected || on_the_fly != expected {
            return Err(format!(
                "local {:?} peer {} request {request:?}\n reference: {expected:?}\n evaluate: \
                 {compiled:?}\n evaluate_principal: {on_the_fly:?}\n policies: {:#?}",
                case.locals[*local], case.peers[*peer], case.set.policies
            ));
        }
    }
    Ok(())
}
