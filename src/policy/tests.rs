//! Evaluator table tests, TOML form tests, and the example files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use super::*;
use crate::identity::{LocalId, PeerId, Principal};

pub(super) fn principal(s: &str) -> Principal {
    s.parse().unwrap()
}

pub(super) fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// `"tcp 8080 10.0.0.1"`, `"icmp 10.0.0.1"`, `"udp 53"`, `"other 47 10.0.0.1"`: protocol,
/// then an optional port (protocol number for `other`), then an optional source address,
/// then optionally `to` and the destination address.
pub(super) fn req(s: &str) -> Request {
    let mut it = s.split_whitespace();
    let proto = it.next().unwrap();
    let mut port = None;
    let mut source_ip = None;
    let mut destination_ip = None;
    let mut protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        "other" => Protocol::Other(0),
        "unknown" => Protocol::Unknown,
        _ => panic!("bad protocol {proto}"),
    };
    while let Some(t) = it.next() {
        if t == "to" {
            destination_ip = Some(it.next().unwrap().parse::<IpAddr>().unwrap());
        } else if t.contains('.') || t.contains(':') {
            source_ip = Some(t.parse::<IpAddr>().unwrap());
        } else if let Protocol::Other(_) = protocol {
            protocol = Protocol::Other(t.parse().unwrap());
        } else {
            port = Some(t.parse().unwrap());
        }
    }
    Request {
        source_ip,
        destination_ip,
        protocol,
        port,
    }
}

/// Parses policy text: Istio YAML if it has an apiVersion, TOML otherwise.
pub(super) fn parse(text: &str) -> PolicySet {
    if text.contains("apiVersion") {
        parse_istio_yaml(text, Path::new("t.yaml")).unwrap()
    } else {
        parse_toml(text, Path::new("t.toml")).unwrap()
    }
}

/// Evaluates one request for one (local, peer) pair, through both the compiled table
/// and the slow path, which must agree.
pub(super) fn decide(
    set: &PolicySet,
    default: DefaultAction,
    local: &str,
    local_labels: &str,
    peer: &str,
    request: &Request,
) -> Decision {
    let lp = principal(local);
    let ll = labels(local_labels);
    let pp = principal(peer);
    // Extra identities around the one under test, to exercise the pair indexing.
    let other_local = principal("cluster.local/ns/zz/sa/other");
    let other_labels = BTreeMap::new();
    let other_peer = principal("cluster.local/ns/zz/sa/other-peer");
    let locals = [
        Target {
            principal: &other_local,
            labels: &other_labels,
        },
        Target {
            principal: &lp,
            labels: &ll,
        },
    ];
    let ev = Evaluator::new(
        set,
        default,
        DEFAULT_ROOT_NAMESPACE,
        &locals,
        &[&other_peer, &pp, &other_peer],
    );
    let fast = ev.evaluate(LocalId::new(1), PeerId::new(1), request);
    let slow = ev.evaluate_principal(LocalId::new(1), &pp, request);
    assert_eq!(fast, slow, "compiled and slow paths disagree");
    fast
}

const FRONTEND: &str = "cluster.local/ns/web/sa/frontend";
const CHECKOUT: &str = "cluster.local/ns/web/sa/checkout";
const LEGACY: &str = "cluster.local/ns/legacy/sa/old";
const PAYMENT: &str = "cluster.local/ns/payments/sa/payment-service";
const LEDGER: &str = "cluster.local/ns/payments/sa/ledger";

/// ALLOW policy `payments/p` with one rule whose one source sets `field = values`.
fn from(field: &str, values: &str) -> String {
    format!(
        "[[policy]]\nname = \"p\"\nnamespace = \"payments\"\n[[policy.rules]]\n\
         [[policy.rules.from]]\n{field} = {values}\n"
    )
}

/// ALLOW policy `payments/p` with one rule whose one destination sets `field = values`.
fn to(field: &str, values: &str) -> String {
    format!(
        "[[policy]]\nname = \"p\"\nnamespace = \"payments\"\n[[policy.rules]]\n\
         [[policy.rules.to]]\n{field} = {values}\n"
    )
}

const ALLOWED: &str = "allow: ALLOW policy payments/p rule 0 matched";
const NO_MATCH: &str = "deny: ALLOW policies select this identity but none of their rules matched";
const DEFAULT_ALLOW: &str = "allow: no ALLOW policy selects this identity; default allow";
const DEFAULT_DENY: &str = "deny: no ALLOW policy selects this identity; default deny";

/// One table row: policy text, the pair and the request, and the expected explanation
/// (which also fixes allowed, reason, policy, rule and audits).
struct Row {
    case: &'static str,
    policy: String,
    default: DefaultAction,
    local: &'static str,
    labels: &'static str,
    peer: &'static str,
    request: &'static str,
    expect: &'static str,
}

/// A row for local identity payment-service (app=payment-service), default deny.
fn row(
    case: &'static str,
    policy: impl Into<String>,
    peer: &'static str,
    request: &'static str,
    expect: &'static str,
) -> Row {
    Row {
        case,
        policy: policy.into(),
        default: DefaultAction::Deny,
        local: PAYMENT,
        labels: "app=payment-service",
        peer,
        request,
        expect,
    }
}

impl Row {
    fn default_allow(mut self) -> Row {
        self.default = DefaultAction::Allow;
        self
    }

    fn local(mut self, local: &'static str, labels: &'static str) -> Row {
        self.local = local;
        self.labels = labels;
        self
    }
}

fn run(rows: Vec<Row>) {
    let mut failures = Vec::new();
    for r in &rows {
        let set = parse(&r.policy);
        let d = decide(&set, r.default, r.local, r.labels, r.peer, &req(r.request));
        let got = d.explain();
        if got != r.expect {
            failures.push(format!(
                "{}: expected {:?}\n   got {:?}",
                r.case, r.expect, got
            ));
        }
        assert_eq!(d.allowed, r.expect.starts_with("allow"), "{}", r.case);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[rustfmt::skip]
#[test]
fn principal_and_namespace_patterns() {
    let frontend = format!("[{FRONTEND:?}]");
    let both = format!("[{FRONTEND:?}, {CHECKOUT:?}]");
    run(vec![
        row("exact principal", from("principals", &frontend), FRONTEND, "tcp 80", ALLOWED),
        row("exact principal, other peer", from("principals", &frontend), CHECKOUT, "tcp 80", NO_MATCH),
        row("spiffe exact", from("principals", r#"["spiffe://cluster.local/ns/web/sa/frontend"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("SPIFFE scheme, any case", from("principals", r#"["SPIFFE://cluster.local/ns/web/sa/frontend"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("prefix principal", from("principals", r#"["cluster.local/ns/web/*"]"#), CHECKOUT, "tcp 80", ALLOWED),
        row("prefix principal, no", from("principals", r#"["cluster.local/ns/web/*"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("spiffe prefix principal", from("principals", r#"["spiffe://cluster.local/ns/web/*"]"#), CHECKOUT, "tcp 80", ALLOWED),
        row("suffix principal", from("principals", r#"["*/sa/frontend"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("suffix principal, no", from("principals", r#"["*/sa/frontend"]"#), CHECKOUT, "tcp 80", NO_MATCH),
        row("any principal", from("principals", r#"["*"]"#), LEGACY, "tcp 80", ALLOWED),
        row("principals OR'ed", from("principals", &both), CHECKOUT, "tcp 80", ALLOWED),
        row("not_principals excludes", from("not_principals", &frontend), FRONTEND, "tcp 80", NO_MATCH),
        row("not_principals lets others", from("not_principals", &frontend), CHECKOUT, "tcp 80", ALLOWED),
        row("not_principals spiffe", from("not_principals", r#"["spiffe://cluster.local/ns/web/sa/frontend"]"#), FRONTEND, "tcp 80", NO_MATCH),
        row("not_principals prefix", from("not_principals", r#"["cluster.local/ns/web/*"]"#), CHECKOUT, "tcp 80", NO_MATCH),
        row("not_principals suffix", from("not_principals", r#"["*/sa/old"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("not_principals any", from("not_principals", r#"["*"]"#), CHECKOUT, "tcp 80", NO_MATCH),
        row("exact namespace", from("namespaces", r#"["web"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("exact namespace, no", from("namespaces", r#"["web"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("prefix namespace", from("namespaces", r#"["we*"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("prefix namespace, no", from("namespaces", r#"["wet*"]"#), FRONTEND, "tcp 80", NO_MATCH),
        row("suffix namespace", from("namespaces", r#"["*acy"]"#), LEGACY, "tcp 80", ALLOWED),
        row("suffix namespace, no", from("namespaces", r#"["*acy"]"#), FRONTEND, "tcp 80", NO_MATCH),
        row("any namespace", from("namespaces", r#"["*"]"#), LEGACY, "tcp 80", ALLOWED),
        row("namespaces OR'ed", from("namespaces", r#"["a", "legacy"]"#), LEGACY, "tcp 80", ALLOWED),
        row("not_namespaces excludes", from("not_namespaces", r#"["legacy"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("not_namespaces lets others", from("not_namespaces", r#"["legacy"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("not_namespaces prefix", from("not_namespaces", r#"["leg*"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("not_namespaces any", from("not_namespaces", r#"["*"]"#), LEGACY, "tcp 80", NO_MATCH),
        // The trust domain is part of the principal, not of the namespace.
        row("other trust domain", from("principals", &frontend), "other.td/ns/web/sa/frontend", "tcp 80", NO_MATCH),
        row("namespace ignores trust domain", from("namespaces", r#"["web"]"#), "other.td/ns/web/sa/frontend", "tcp 80", ALLOWED),
        row("default allow is moot once selected", from("namespaces", r#"["web"]"#), LEGACY, "tcp 80", NO_MATCH).default_allow(),
    ]);
}

#[rustfmt::skip]
#[test]
fn source_fields_and_lists() {
    let and_fields = from("principals", &format!("[{FRONTEND:?}]")) + "ip_blocks = [\"10.10.2.0/24\"]\n";
    let or_sources = from("principals", &format!("[{FRONTEND:?}]"))
        + "[[policy.rules.from]]\nnamespaces = [\"legacy\"]\nip_blocks = [\"192.0.2.1\"]\n";
    let deny_ip = "[[policy]]\nname = \"d\"\nnamespace = \"payments\"\naction = \"DENY\"\n\
                   [[policy.rules]]\n[[policy.rules.from]]\nip_blocks = [\"10.0.0.0/8\"]\n";
    run(vec![
        row("fields AND'ed: both", and_fields.clone(), FRONTEND, "tcp 80 10.10.2.1", ALLOWED),
        row("fields AND'ed: ip fails", and_fields.clone(), FRONTEND, "tcp 80 10.10.3.1", NO_MATCH),
        row("fields AND'ed: principal fails", and_fields, CHECKOUT, "tcp 80 10.10.2.1", NO_MATCH),
        row("sources OR'ed: first", or_sources.clone(), FRONTEND, "tcp 80 10.0.0.1", ALLOWED),
        row("sources OR'ed: second", or_sources.clone(), LEGACY, "tcp 80 192.0.2.1", ALLOWED),
        row("sources OR'ed: second, wrong ip", or_sources, LEGACY, "tcp 80 192.0.2.2", NO_MATCH),
        row("ip_blocks cidr", from("ip_blocks", r#"["10.10.0.0/16"]"#), LEGACY, "tcp 80 10.10.9.9", ALLOWED),
        row("ip_blocks cidr, outside", from("ip_blocks", r#"["10.10.0.0/16"]"#), LEGACY, "tcp 80 10.11.0.1", NO_MATCH),
        row("ip_blocks host bits ignored", from("ip_blocks", r#"["10.10.0.7/16"]"#), LEGACY, "tcp 80 10.10.9.9", ALLOWED),
        row("ip_blocks single ip", from("ip_blocks", r#"["10.10.2.1"]"#), LEGACY, "tcp 80 10.10.2.1", ALLOWED),
        row("ip_blocks single ip, other", from("ip_blocks", r#"["10.10.2.1"]"#), LEGACY, "tcp 80 10.10.2.2", NO_MATCH),
        row("ip_blocks v6", from("ip_blocks", r#"["fd00:1::/32"]"#), LEGACY, "tcp 80 fd00:1::5", ALLOWED),
        row("ip_blocks v6 single ip", from("ip_blocks", r#"["fd00::1"]"#), LEGACY, "tcp 80 fd00::1", ALLOWED),
        row("ip_blocks v6 does not cover v4", from("ip_blocks", r#"["::/0"]"#), LEGACY, "tcp 80 10.0.0.1", NO_MATCH),
        row("ip_blocks v4-mapped v6 source", from("ip_blocks", r#"["10.0.0.0/8"]"#), LEGACY, "tcp 80 ::ffff:10.0.0.1", ALLOWED),
        row("ip_blocks OR'ed", from("ip_blocks", r#"["10.1.0.0/16", "10.2.0.0/16"]"#), LEGACY, "tcp 80 10.2.0.1", ALLOWED),
        row("not_ip_blocks excludes", from("not_ip_blocks", r#"["10.0.0.0/8"]"#), LEGACY, "tcp 80 10.1.2.3", NO_MATCH),
        row("not_ip_blocks lets others", from("not_ip_blocks", r#"["10.0.0.0/8"]"#), LEGACY, "tcp 80 192.0.2.1", ALLOWED),
        row("not_ip_blocks single ip", from("not_ip_blocks", r#"["192.0.2.1"]"#), LEGACY, "tcp 80 192.0.2.1", NO_MATCH),
        row("unknown ip: ALLOW ip_blocks fails closed", from("ip_blocks", r#"["0.0.0.0/0"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("unknown ip: ALLOW not_ip_blocks fails closed", from("not_ip_blocks", r#"["10.0.0.0/8"]"#), LEGACY, "tcp 80", NO_MATCH),
        row("unknown ip: DENY ip_blocks applies", deny_ip, LEGACY, "tcp 80", "deny: DENY policy payments/d rule 0 matched").default_allow(),
    ]);
}

#[rustfmt::skip]
#[test]
fn ports_and_protocols() {
    let range_not = to("ports", r#"["8000-8999/tcp"]"#) + "not_ports = [\"8443/tcp\"]\n";
    let two_dests = to("ports", r#"["80/tcp"]"#) + "[[policy.rules.to]]\nports = [\"icmp\"]\n";
    let from_and_to = from("principals", &format!("[{FRONTEND:?}]")) + "[[policy.rules.to]]\nports = [\"8080/tcp\"]\n";
    let deny_22 = "[[policy]]\nname = \"d\"\nnamespace = \"payments\"\naction = \"DENY\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"22/tcp\"]\n".to_owned() + &to("ports", r#"["any"]"#);
    let denied_22 = "deny: DENY policy payments/d rule 0 matched";
    run(vec![
        // A packet whose port is unknown (a later fragment): fail closed both ways.
        row("unknown port, ALLOW ports", to("ports", r#"["8080/tcp"]"#), FRONTEND, "tcp", NO_MATCH),
        row("unknown port, ALLOW not_ports", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "tcp", NO_MATCH),
        row("known port, ALLOW not_ports", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "tcp 80", ALLOWED),
        row("unknown port, DENY ports", deny_22.clone(), FRONTEND, "tcp", denied_22),
        row("known port, DENY ports", deny_22.clone(), FRONTEND, "tcp 80", ALLOWED),
        row("unknown port, DENY other protocol", deny_22.clone(), FRONTEND, "udp", ALLOWED),
        // A packet whose protocol is unknown (an IPv6 extension chain that could not be
        // walked): every port condition could be meant.
        row("unknown protocol, DENY ports", deny_22, FRONTEND, "unknown", denied_22),
        row("unknown protocol, ALLOW ports", to("ports", r#"["8080/tcp"]"#), FRONTEND, "unknown", NO_MATCH),
        row("unknown protocol, ALLOW icmp", to("ports", r#"["icmp"]"#), FRONTEND, "unknown", NO_MATCH),
        row("unknown protocol, ALLOW not_ports", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "unknown", NO_MATCH),
        row("unknown protocol, ALLOW any", to("ports", r#"["any"]"#), FRONTEND, "unknown", ALLOWED),
        row("tcp port", to("ports", r#"["8080/tcp"]"#), FRONTEND, "tcp 8080", ALLOWED),
        row("tcp port, udp packet", to("ports", r#"["8080/tcp"]"#), FRONTEND, "udp 8080", NO_MATCH),
        row("tcp port, other port", to("ports", r#"["8080/tcp"]"#), FRONTEND, "tcp 8081", NO_MATCH),
        row("tcp port, icmp", to("ports", r#"["8080/tcp"]"#), FRONTEND, "icmp", NO_MATCH),
        row("protocol in any case", to("ports", r#"["8080/TCP"]"#), FRONTEND, "tcp 8080", ALLOWED),
        row("udp port", to("ports", r#"["53/udp"]"#), FRONTEND, "udp 53", ALLOWED),
        row("udp port, tcp packet", to("ports", r#"["53/udp"]"#), FRONTEND, "tcp 53", NO_MATCH),
        row("bare port: tcp", to("ports", r#"["8080"]"#), FRONTEND, "tcp 8080", ALLOWED),
        row("bare port: udp", to("ports", r#"["8080"]"#), FRONTEND, "udp 8080", ALLOWED),
        row("bare port: icmp", to("ports", r#"["8080"]"#), FRONTEND, "icmp", NO_MATCH),
        row("bare port: other protocol", to("ports", r#"["8080"]"#), FRONTEND, "other 132", NO_MATCH),
        row("range low edge", to("ports", r#"["9000-9100/tcp"]"#), FRONTEND, "tcp 9000", ALLOWED),
        row("range high edge", to("ports", r#"["9000-9100/tcp"]"#), FRONTEND, "tcp 9100", ALLOWED),
        row("range above", to("ports", r#"["9000-9100/tcp"]"#), FRONTEND, "tcp 9101", NO_MATCH),
        row("range below", to("ports", r#"["9000-9100/tcp"]"#), FRONTEND, "tcp 8999", NO_MATCH),
        row("range, udp packet", to("ports", r#"["9000-9100/tcp"]"#), FRONTEND, "udp 9050", NO_MATCH),
        row("bare range: udp", to("ports", r#"["9000-9100"]"#), FRONTEND, "udp 9050", ALLOWED),
        row("icmp", to("ports", r#"["icmp"]"#), FRONTEND, "icmp", ALLOWED),
        row("icmp, tcp packet", to("ports", r#"["icmp"]"#), FRONTEND, "tcp 80", NO_MATCH),
        row("all tcp", to("ports", r#"["tcp"]"#), FRONTEND, "tcp 1", ALLOWED),
        row("all tcp, udp packet", to("ports", r#"["tcp"]"#), FRONTEND, "udp 1", NO_MATCH),
        row("all udp", to("ports", r#"["udp"]"#), FRONTEND, "udp 65535", ALLOWED),
        row("any: tcp", to("ports", r#"["any"]"#), FRONTEND, "tcp 1", ALLOWED),
        row("any: icmp", to("ports", r#"["any"]"#), FRONTEND, "icmp", ALLOWED),
        row("any: other protocol", to("ports", r#"["any"]"#), FRONTEND, "other 47", ALLOWED),
        row("ports OR'ed", to("ports", r#"["8080/tcp", "icmp"]"#), FRONTEND, "icmp", ALLOWED),
        row("not_ports excludes", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "tcp 22", NO_MATCH),
        row("not_ports lets others", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "tcp 23", ALLOWED),
        row("not_ports lets icmp", to("not_ports", r#"["22/tcp"]"#), FRONTEND, "icmp", ALLOWED),
        row("not_ports icmp", to("not_ports", r#"["icmp"]"#), FRONTEND, "icmp", NO_MATCH),
        row("not_ports range", to("not_ports", r#"["1-1023"]"#), FRONTEND, "udp 53", NO_MATCH),
        row("not_ports any", to("not_ports", r#"["any"]"#), FRONTEND, "udp 53", NO_MATCH),
        row("ports AND not_ports", range_not.clone(), FRONTEND, "tcp 8443", NO_MATCH),
        row("ports AND not_ports, other port", range_not, FRONTEND, "tcp 8444", ALLOWED),
        row("destinations OR'ed", two_dests, FRONTEND, "icmp", ALLOWED),
        row("from AND to: to fails", from_and_to.clone(), FRONTEND, "tcp 8081", NO_MATCH),
        row("from AND to: from fails", from_and_to.clone(), CHECKOUT, "tcp 8080", NO_MATCH),
        row("from AND to: both", from_and_to, FRONTEND, "tcp 8080", ALLOWED),
    ]);
}

const DENY_LEGACY_ROOT: &str = r#"
[[policy]]
name = "deny-legacy"
namespace = "istio-system"
action = "DENY"
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["legacy"]
"#;

const ALLOW_ALL_PAYMENTS: &str = r#"
[[policy]]
name = "allow-all"
namespace = "payments"
[[policy.rules]]
"#;

const ALLOW_NOTHING: &str = r#"
[[policy]]
name = "allow-nothing"
namespace = "payments"
"#;

const SELECT_PAYMENT: &str = r#"
[[policy]]
name = "p"
namespace = "payments"
selector = { app = "payment-service", tier = "back" }
[[policy.rules]]
"#;

const AUDIT_WEB: &str = r#"
[[policy]]
name = "audit-web"
namespace = "istio-system"
action = "audit"
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["web"]
[[policy.rules]]
[[policy.rules.from]]
principals = ["*"]
"#;

const TWO_RULES: &str = r#"
[[policy]]
name = "p"
namespace = "payments"
[[policy.rules]]
[[policy.rules.from]]
namespaces = ["nothing-here"]
[[policy.rules]]
[[policy.rules.to]]
ports = ["8080/tcp"]
"#;

const IN_WEB: &str = r#"
[[policy]]
name = "web-only"
namespace = "web"
[[policy.rules]]
"#;

const ROOT_SELECTS_LEDGER: &str = r#"
[[policy]]
name = "r"
namespace = "istio-system"
selector = { app = "ledger" }
"#;

#[rustfmt::skip]
#[test]
fn actions_scope_selectors_defaults() {
    let deny_and_allow = format!("{DENY_LEGACY_ROOT}{ALLOW_ALL_PAYMENTS}");
    let deny_legacy = "deny: DENY policy istio-system/deny-legacy rule 0 matched";
    let allow_all = "allow: ALLOW policy payments/allow-all rule 0 matched";
    run(vec![
        row("deny beats allow", deny_and_allow.clone(), LEGACY, "tcp 80", deny_legacy),
        row("allow when no deny matches", deny_and_allow, FRONTEND, "tcp 80", allow_all),
        row("deny beats default allow", DENY_LEGACY_ROOT, LEGACY, "tcp 80", deny_legacy).default_allow(),
        row("DENY does not select: default allow", DENY_LEGACY_ROOT, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("DENY does not select: default deny", DENY_LEGACY_ROOT, FRONTEND, "tcp 80", DEFAULT_DENY),
        row("no policies: default allow", "", FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("no policies: default deny", "", FRONTEND, "tcp 80", DEFAULT_DENY),
        row("rules [{}] matches everything", ALLOW_ALL_PAYMENTS, LEGACY, "icmp", allow_all),
        row("rules [{}], other protocol", ALLOW_ALL_PAYMENTS, LEGACY, "other 47", allow_all),
        row("no rules: selects, allows nothing", ALLOW_NOTHING, FRONTEND, "tcp 80", NO_MATCH).default_allow(),
        row("no rules, other namespace", ALLOW_NOTHING, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow().local(FRONTEND, ""),
        row("policy of another namespace", IN_WEB, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("policy of own namespace", IN_WEB, FRONTEND, "tcp 80", "allow: ALLOW policy web/web-only rule 0 matched").local(CHECKOUT, ""),
        row("root namespace applies everywhere", DENY_LEGACY_ROOT, LEGACY, "tcp 80", deny_legacy).default_allow().local(CHECKOUT, ""),
        row("root policy with selector: match", ROOT_SELECTS_LEDGER, FRONTEND, "tcp 80", NO_MATCH).default_allow().local(LEDGER, "app=ledger"),
        row("root policy with selector: no match", ROOT_SELECTS_LEDGER, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("selector matches (extra labels fine)", SELECT_PAYMENT, FRONTEND, "tcp 80", ALLOWED).local(PAYMENT, "app=payment-service,tier=back,x=1"),
        row("selector value mismatch", SELECT_PAYMENT, FRONTEND, "tcp 80", DEFAULT_DENY).local(PAYMENT, "app=payment-service,tier=front"),
        row("selector label missing", SELECT_PAYMENT, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("selector, no labels at all", SELECT_PAYMENT, FRONTEND, "tcp 80", DEFAULT_DENY).local(LEDGER, ""),
        row("second rule reported", TWO_RULES, FRONTEND, "tcp 8080", "allow: ALLOW policy payments/p rule 1 matched"),
        row("AUDIT does not select", AUDIT_WEB, FRONTEND, "tcp 80", "allow: no ALLOW policy selects this identity; default allow; audited by istio-system/audit-web").default_allow(),
        row("AUDIT keeps default deny", AUDIT_WEB, FRONTEND, "tcp 80", "deny: no ALLOW policy selects this identity; default deny; audited by istio-system/audit-web"),
        row("AUDIT listed once, allow kept", format!("{AUDIT_WEB}{ALLOW_ALL_PAYMENTS}"), FRONTEND, "tcp 80", "allow: ALLOW policy payments/allow-all rule 0 matched; audited by istio-system/audit-web"),
        row("AUDIT with DENY", format!("{AUDIT_WEB}{DENY_LEGACY_ROOT}"), LEGACY, "tcp 80", "deny: DENY policy istio-system/deny-legacy rule 0 matched; audited by istio-system/audit-web"),
        row("AUDIT not matching", AUDIT_WEB.replace("[\"*\"]", "[\"x/ns/y/sa/z\"]"), LEGACY, "tcp 80", DEFAULT_DENY),
    ]);
}

const STRICT_PAYMENTS: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: payments}
spec:
  mtls: {mode: STRICT}
";

const ALLOW_ALL_YAML: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: payments}
spec:
  rules: [{}]
";

const DENY_FRONTEND_YAML: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-frontend, namespace: payments}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/web/sa/frontend"]}}]
"#;

/// A PeerAuthentication in `ns` with the given mode and optional selector line, named
/// after its mode and level so that several fit in one namespace.
fn peer_authn(ns: &str, mode: &str, selector: &str) -> String {
    let level = if selector.is_empty() {
        "ns"
    } else {
        "workload"
    };
    let name = format!("{}-{level}", mode.to_lowercase());
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  {selector}\n  mtls: {{mode: {mode}}}\n---\n"
    )
}

/// The mTLS mode `text` sets for the identity `local` with `local_labels`.
fn mode_of(text: &str, local: &str, local_labels: &str) -> MtlsMode {
    parse(text).mtls_mode(
        DEFAULT_ROOT_NAMESPACE,
        principal(local).namespace(),
        &labels(local_labels),
    )
}

#[rustfmt::skip]
#[test]
fn mtls_mode_follows_istio_precedence() {
    use MtlsMode::*;
    let sel = "selector: {matchLabels: {app: payment-service}}";
    let pa = peer_authn;
    let pay = "app=payment-service";
    let cases: Vec<(&str, String, &str, &str, MtlsMode)> = vec![
        ("no PeerAuthentication", String::new(), PAYMENT, pay, Permissive),
        ("namespace STRICT", pa("payments", "STRICT", ""), PAYMENT, pay, Strict),
        ("namespace STRICT, other namespace", pa("payments", "STRICT", ""), FRONTEND, "", Permissive),
        ("mesh STRICT", pa("istio-system", "STRICT", ""), FRONTEND, "", Strict),
        ("workload STRICT", pa("payments", "STRICT", sel), PAYMENT, pay, Strict),
        ("workload STRICT, other workload", pa("payments", "STRICT", sel), LEDGER, "app=ledger", Permissive),
        ("workload selector in root covers root only", pa("istio-system", "STRICT", sel), PAYMENT, pay, Permissive),
        ("namespace PERMISSIVE overrides mesh STRICT", pa("istio-system", "STRICT", "") + &pa("payments", "PERMISSIVE", ""), PAYMENT, pay, Permissive),
        ("namespace UNSET inherits mesh STRICT", pa("istio-system", "STRICT", "") + &pa("payments", "UNSET", ""), PAYMENT, pay, Strict),
        ("namespace STRICT overrides mesh PERMISSIVE", pa("istio-system", "PERMISSIVE", "") + &pa("payments", "STRICT", ""), PAYMENT, pay, Strict),
        ("workload PERMISSIVE overrides namespace STRICT", pa("payments", "STRICT", "") + &pa("payments", "PERMISSIVE", sel), PAYMENT, pay, Permissive),
        ("namespace STRICT for the workload not selected", pa("payments", "STRICT", "") + &pa("payments", "PERMISSIVE", sel), LEDGER, "app=ledger", Strict),
        ("workload STRICT overrides namespace PERMISSIVE", pa("payments", "PERMISSIVE", "") + &pa("payments", "STRICT", sel), PAYMENT, pay, Strict),
        ("workload UNSET inherits namespace STRICT", pa("payments", "STRICT", "") + &pa("payments", "UNSET", sel), PAYMENT, pay, Strict),
        ("all UNSET is PERMISSIVE", pa("istio-system", "UNSET", "") + &pa("payments", "UNSET", ""), PAYMENT, pay, Permissive),
        ("DISABLE", pa("payments", "DISABLE", ""), PAYMENT, pay, Disable),
        ("first namespace-wide wins", pa("payments", "STRICT", "") + &pa("payments", "PERMISSIVE", ""), PAYMENT, pay, Strict),
    ];
    for (case, text, local, local_labels, expected) in cases {
        assert_eq!(mode_of(&text, local, local_labels), expected, "{case}");
    }
    let twice = parse(&(pa("payments", "STRICT", "") + &pa("payments", "PERMISSIVE", "")));
    assert_eq!(twice.warnings.len(), 1, "{:?}", twice.warnings);
    assert!(twice.warnings[0].contains("the first one loaded (t.yaml: document 1) applies"), "{:?}", twice.warnings);
    let disable = parse(&pa("payments", "DISABLE", ""));
    assert!(disable.warnings[0].contains("as PERMISSIVE does"), "{:?}", disable.warnings);
}

/// STRICT is about plaintext, not about the allow list: decisions are the same with it.
#[rustfmt::skip]
#[test]
fn strict_mode_leaves_the_allow_list_alone() {
    run(vec![
        row("STRICT keeps default allow", STRICT_PAYMENTS, FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("STRICT keeps default deny", STRICT_PAYMENTS, FRONTEND, "tcp 80", DEFAULT_DENY),
        row("mesh STRICT keeps default allow", peer_authn("istio-system", "STRICT", ""), FRONTEND, "tcp 80", DEFAULT_ALLOW).default_allow(),
        row("STRICT leaves ALLOW policies alone", format!("{STRICT_PAYMENTS}---{ALLOW_ALL_YAML}"), FRONTEND, "tcp 80", "allow: ALLOW policy payments/allow-all rule 0 matched"),
        row("STRICT leaves DENY policies alone", format!("{STRICT_PAYMENTS}---{DENY_FRONTEND_YAML}"), FRONTEND, "tcp 80", "deny: DENY policy payments/no-frontend rule 0 matched").default_allow(),
    ]);
}

#[test]
fn peer_authentication_in_toml() {
    let text = r#"
[[peer_authentication]]
name = "default"
namespace = "payments"
mode = "STRICT"

[[peer_authentication]]
name = "ledger"
namespace = "payments"
selector = { app = "ledger" }
mode = "PERMISSIVE"
"#;
    assert_eq!(mode_of(text, PAYMENT, ""), MtlsMode::Strict);
    assert_eq!(mode_of(text, LEDGER, "app=ledger"), MtlsMode::Permissive);
    let set = parse(text);
    assert_eq!(
        set.peer_authentications[1].origin,
        "t.toml: peer_authentication[1]"
    );

    let bad = |text: &str| parse_toml(text, Path::new("bad.toml")).unwrap_err();
    let e = bad("[[peer_authentication]]\nname = \"d\"\nnamespace = \"payments\"\n");
    assert_eq!(e.key, "peer_authentication[0].mode");
    assert!(e.reason.ends_with("missing; it is required"), "{e}");
    let e =
        bad("[[peer_authentication]]\nname = \"d\"\nnamespace = \"payments\"\nmode = \"strict\"\n");
    assert_eq!(e.key, "peer_authentication[0].mode");
    assert!(
        e.reason
            .contains("expected UNSET, PERMISSIVE, STRICT or DISABLE"),
        "{e}"
    );
    let e = bad("[[peer_authentication]]\nname = \"d\"\nnamespace = \"payments\"\nmode = \"STRICT\"\nports = 1\n");
    assert!(e.reason.contains("unknown field `ports`"), "{e}");
    let twice =
        "[[peer_authentication]]\nname = \"d\"\nnamespace = \"payments\"\nmode = \"STRICT\"\n";
    let e = bad(&format!("{twice}{twice}"));
    assert_eq!(e.key, "peer_authentication[1]");
    assert!(
        e.reason.contains("duplicate PeerAuthentication payments/d"),
        "{e}"
    );
}

#[test]
fn decision_fields() {
    let set = parse(&format!("{AUDIT_WEB}{TWO_RULES}"));
    let d = decide(
        &set,
        DefaultAction::Deny,
        PAYMENT,
        "",
        FRONTEND,
        &req("tcp 8080 10.0.0.1"),
    );
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::Allowed);
    assert_eq!(d.policy.as_deref(), Some("payments/p"));
    assert_eq!(d.rule, Some(1));
    assert_eq!(d.audited_by.len(), 1);
    assert_eq!(&*d.audited_by[0], "istio-system/audit-web");
    let d = decide(
        &set,
        DefaultAction::Deny,
        PAYMENT,
        "",
        FRONTEND,
        &req("tcp 9 10.0.0.1"),
    );
    assert_eq!(
        (d.allowed, d.reason, d.policy, d.rule),
        (false, Reason::NoAllowMatched, None, None)
    );
}

#[test]
fn evaluator_indexes_pairs() {
    // Three locals, three peers; each local allows exactly one peer.
    let text = "
[[policy]]
name = \"a\"
namespace = \"ns-a\"
[[policy.rules]]
[[policy.rules.from]]
principals = [\"td/ns/peer/sa/p0\"]

[[policy]]
name = \"b\"
namespace = \"ns-b\"
[[policy.rules]]
[[policy.rules.from]]
principals = [\"td/ns/peer/sa/p1\"]

[[policy]]
name = \"c\"
namespace = \"ns-c\"
[[policy.rules]]
[[policy.rules.from]]
principals = [\"td/ns/peer/sa/p2\"]
";
    let set = parse(text);
    let locals: Vec<Principal> = ["td/ns/ns-a/sa/x", "td/ns/ns-b/sa/x", "td/ns/ns-c/sa/x"]
        .iter()
        .map(|s| principal(s))
        .collect();
    let peers: Vec<Principal> = (0..3)
        .map(|i| principal(&format!("td/ns/peer/sa/p{i}")))
        .collect();
    let no_labels = BTreeMap::new();
    let targets: Vec<Target> = locals
        .iter()
        .map(|p| Target {
            principal: p,
            labels: &no_labels,
        })
        .collect();
    let peer_refs: Vec<&Principal> = peers.iter().collect();
    let ev = Evaluator::new(
        &set,
        DefaultAction::Allow,
        "istio-system",
        &targets,
        &peer_refs,
    );
    assert_eq!((ev.local_count(), ev.peer_count()), (3, 3));
    for l in 0..3 {
        assert!(ev.selected_by_allow(LocalId::new(l)));
        for (p, peer) in peers.iter().enumerate() {
            let d = ev.evaluate(LocalId::new(l), PeerId::new(p), &req("tcp 80"));
            assert_eq!(d.allowed, l == p, "local {l} peer {p}: {}", d.explain());
            assert_eq!(
                d,
                ev.evaluate_principal(LocalId::new(l), peer, &req("tcp 80"))
            );
        }
    }
    // A principal that is no configured peer, through the slow path.
    let stranger = principal("td/ns/peer/sa/p9");
    assert_eq!(
        ev.evaluate_principal(LocalId::new(0), &stranger, &req("tcp 80"))
            .reason,
        Reason::NoAllowMatched
    );
}

#[test]
#[should_panic(expected = "peer index 2 out of range")]
fn evaluate_rejects_bad_peer_index() {
    let p = principal(PAYMENT);
    let l = BTreeMap::new();
    let ev = Evaluator::new(
        &PolicySet::default(),
        DefaultAction::Deny,
        "istio-system",
        &[Target {
            principal: &p,
            labels: &l,
        }],
        &[&p, &p],
    );
    ev.evaluate(LocalId::new(0), PeerId::new(2), &req("tcp 80"));
}

#[test]
fn toml_model() {
    let set = parse_toml(
        r#"
[[policy]]
name = "frontend-to-payments"
namespace = "payments"
action = "allow"
selector = { app = "payment-service" }

[[policy.rules]]
[[policy.rules.from]]
principals = ["spiffe://cluster.local/ns/web/sa/frontend", "cluster.local/ns/web/*"]
namespaces = ["web"]
not_ip_blocks = ["10.0.0.0/8", "fd00::1"]
[[policy.rules.to]]
ports = ["8080/tcp", "icmp", "9000-9100", "any", "udp"]
"#,
        Path::new("p.toml"),
    )
    .unwrap();
    assert!(set.warnings.is_empty());
    assert_eq!(set.policies.len(), 1);
    let p = &set.policies[0];
    assert_eq!(p.id(), "payments/frontend-to-payments");
    assert_eq!(p.origin, "p.toml: policy[0]");
    assert_eq!(p.action, Action::Allow);
    assert_eq!(p.selector, labels("app=payment-service"));
    let s = &p.rules[0].from[0];
    assert_eq!(
        s.principals,
        vec![
            Pattern::Exact(FRONTEND.to_owned()),
            Pattern::Prefix("cluster.local/ns/web/".to_owned())
        ]
    );
    assert_eq!(s.namespaces, vec![Pattern::Exact("web".to_owned())]);
    assert_eq!(
        s.not_ip_blocks,
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::1/128".parse().unwrap()
        ]
    );
    let ports: Vec<String> = p.rules[0].to[0]
        .ports
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(ports, ["8080/tcp", "icmp", "9000-9100", "any", "udp"]);
    assert!(!p.rules[0].matches_nothing);

    // Empty file; DENY without rules warns.
    assert_eq!(
        parse_toml("", Path::new("e.toml")).unwrap(),
        PolicySet::default()
    );
    let set = parse_toml(
        "[[policy]]\nname = \"d\"\nnamespace = \"x\"\naction = \"DENY\"\n",
        Path::new("w.toml"),
    )
    .unwrap();
    assert_eq!(set.warnings.len(), 1);
    assert!(
        set.warnings[0]
            .starts_with("w.toml: policy[0]: DENY policy x/d has no rules and never matches"),
        "{}",
        set.warnings[0]
    );
}

/// (case, TOML text, expected key, expected reason fragment)
const TOML_ERRORS: &[(&str, &str, &str, &str)] = &[
    ("syntax", "[[policy]\n", "line 1, column 9", "invalid table header"),
    ("unknown top-level key", "polcy = 1\n", "line 1, column 1", "unknown field `polcy`"),
    (
        "unknown policy key",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\nsource = []\n",
        "line 4, column 1",
        "unknown field `source`",
    ),
    (
        "unknown source key (camelCase)",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nnotPrincipals = [\"x\"]\n",
        "line 6, column 1",
        "unknown field `notPrincipals`",
    ),
    ("missing name", "[[policy]]\nnamespace = \"b\"\n", "policy[0].name", "missing; it is required"),
    ("missing namespace", "[[policy]]\nname = \"a\"\n", "policy[0].namespace", "missing"),
    ("bad name", "[[policy]]\nname = \"A b\"\nnamespace = \"b\"\n", "policy[0].name", "line 2: invalid character 'A'"),
    ("bad namespace", "[[policy]]\nname = \"a\"\nnamespace = \"Pay\"\n", "policy[0].namespace", "invalid namespace \"Pay\""),
    ("bad action", "[[policy]]\nname = \"a\"\nnamespace = \"b\"\naction = \"PERMIT\"\n", "policy[0].action", "line 4: unknown action \"PERMIT\""),
    ("custom action", "[[policy]]\nname = \"a\"\nnamespace = \"b\"\naction = \"CUSTOM\"\n", "policy[0].action", "CUSTOM"),
    (
        "malformed principal",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nprincipals = [\"cluster.local/ns/web/sa/frontend\", \"cluster.local/ns/web\"]\n",
        "policy[0].rules[0].from[0].principals[1]",
        "line 6: invalid principal \"cluster.local/ns/web\"",
    ),
    (
        "star in the middle",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nprincipals = [\"cluster.local/*/web\"]\n",
        "policy[0].rules[0].from[0].principals[0]",
        "'*' may appear once",
    ),
    (
        "upper-case trust domain",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nprincipals = [\"Cluster.Local/ns/web/sa/frontend\"]\n",
        "policy[0].rules[0].from[0].principals[0]",
        "write \"cluster.local\"",
    ),
    (
        "upper-case trust domain in a pattern",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nnot_principals = [\"Cluster.local/*\"]\n",
        "policy[0].rules[0].from[0].not_principals[0]",
        "invalid character 'C'",
    ),
    (
        "bad namespace pattern",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nnot_namespaces = [\"We*\"]\n",
        "policy[0].rules[0].from[0].not_namespaces[0]",
        "invalid character 'W'",
    ),
    (
        "malformed cidr",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nip_blocks = [\"10.0.0.0/33\"]\n",
        "policy[0].rules[0].from[0].ip_blocks[0]",
        "invalid CIDR \"10.0.0.0/33\"",
    ),
    (
        "malformed ip",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nnot_ip_blocks = [\"10.0.0\"]\n",
        "policy[0].rules[0].from[0].not_ip_blocks[0]",
        "invalid IP address \"10.0.0\"",
    ),
    (
        "empty value",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nnamespaces = [\"\"]\n",
        "policy[0].rules[0].from[0].namespaces[0]",
        "empty value",
    ),
    (
        "empty list",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\nprincipals = []\n",
        "policy[0].rules[0].from[0].principals",
        "line 6: empty list",
    ),
    (
        "empty source",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.from]]\n",
        "policy[0].rules[0].from[0]",
        "empty source",
    ),
    (
        "empty from",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\nfrom = []\n",
        "policy[0].rules[0].from",
        "omit `from`",
    ),
    (
        "empty destination",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\n",
        "policy[0].rules[0].to[0]",
        "empty destination",
    ),
    (
        "port out of range",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"65536/tcp\"]\n",
        "policy[0].rules[0].to[0].ports[0]",
        "port numbers are 1 to 65535",
    ),
    (
        "port zero",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"0\"]\n",
        "policy[0].rules[0].to[0].ports[0]",
        "port numbers are 1 to 65535",
    ),
    (
        "reversed range",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nnot_ports = [\"9100-9000/tcp\"]\n",
        "policy[0].rules[0].to[0].not_ports[0]",
        "9100 is greater than 9000",
    ),
    (
        "icmp with port",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"8/icmp\"]\n",
        "policy[0].rules[0].to[0].ports[0]",
        "ICMP has no ports",
    ),
    (
        "unknown protocol",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"80/sctp\"]\n",
        "policy[0].rules[0].to[0].ports[0]",
        "must be tcp or udp",
    ),
    (
        "garbage port",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"http\"]\n",
        "policy[0].rules[0].to[0].ports[0]",
        "invalid port \"http\"",
    ),
    (
        "wrong type",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [8080]\n",
        "line 6, column 10",
        "invalid type: integer",
    ),
    (
        "duplicate policy",
        "[[policy]]\nname = \"a\"\nnamespace = \"b\"\n[[policy]]\nname = \"a\"\nnamespace = \"b\"\n",
        "policy[1]",
        "duplicate policy b/a; also defined at bad.toml: policy[0]",
    ),
];

#[test]
fn toml_errors_name_file_key_and_reason() {
    for (case, text, key, reason) in TOML_ERRORS {
        let e = parse_toml(text, Path::new("bad.toml")).unwrap_err();
        assert_eq!(e.file, Path::new("bad.toml"), "{case}");
        assert_eq!(e.key, *key, "{case}: {e}");
        assert!(e.reason.contains(reason), "{case}: {e}");
        assert!(!e.reason.is_empty(), "{case}");
        assert_eq!(e.to_string(), format!("bad.toml: {}: {}", e.key, e.reason));
    }
}

#[test]
fn load_files_merges_and_checks() {
    let dir = std::env::temp_dir().join(format!("meshguard-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.toml");
    let b = dir.join("b.yaml");
    let c = dir.join("c.yml");
    let d = dir.join("d.json");
    std::fs::write(&a, ALLOW_NOTHING).unwrap();
    std::fs::write(&b, STRICT_PAYMENTS).unwrap();
    std::fs::write(
        &c,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: payments}\n",
    )
    .unwrap();
    std::fs::write(&d, "{}").unwrap();

    let set = load_files(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.peer_authentications.len(), 1);

    let e = load_files(&[a.clone(), c.clone()]).unwrap_err();
    assert_eq!(e.file, c);
    assert_eq!(e.key, "document 1");
    assert!(
        e.reason
            .contains("duplicate policy payments/allow-nothing; also defined at")
            && e.reason.contains("a.toml: policy[0]"),
        "{e}"
    );

    let e = load_files(std::slice::from_ref(&d)).unwrap_err();
    assert_eq!((e.file.clone(), e.key.as_str()), (d.clone(), ""));
    assert!(e.reason.contains("unknown policy file type"), "{e}");
    assert_eq!(e.to_string(), format!("{}: {}", d.display(), e.reason));

    let missing = dir.join("missing.toml");
    let e = load_files(std::slice::from_ref(&missing)).unwrap_err();
    assert_eq!(e.file, missing);
    assert!(e.reason.starts_with("cannot read file"), "{e}");

    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// The example files.

const EXAMPLE_TOML: &str = include_str!("../../config/policy-example.toml");
const EXAMPLE_YAML: &str = include_str!("../../config/istio-example.yaml");

/// The two-node demo: node-a's identities receive from node-b's and from a legacy peer.
/// The Istio form cannot say "icmp" or "tcp only": its port "8080" is tcp or udp.
fn check_example(set: &PolicySet, istio_form: bool) {
    let icmp_allowed = !istio_form;
    let udp_8080_allowed = istio_form;
    let payment = principal(PAYMENT);
    let ledger = principal(LEDGER);
    let payment_labels = labels("app=payment-service");
    let ledger_labels = labels("app=ledger");
    let locals = [
        Target {
            principal: &payment,
            labels: &payment_labels,
        },
        Target {
            principal: &ledger,
            labels: &ledger_labels,
        },
    ];
    let frontend = principal(FRONTEND);
    let checkout = principal(CHECKOUT);
    let legacy = principal(LEGACY);
    let peers = [&frontend, &checkout, &legacy];
    for default in [DefaultAction::Deny, DefaultAction::Allow] {
        let ev = Evaluator::new(set, default, DEFAULT_ROOT_NAMESPACE, &locals, &peers);
        let cases = [
            // (local, peer, request, allowed)
            (0, 0, "tcp 8080 10.10.2.1", true),
            (0, 0, "icmp 10.10.2.1", icmp_allowed),
            (0, 0, "udp 8080 10.10.2.1", udp_8080_allowed),
            (0, 0, "tcp 22 10.10.2.1", false),
            (0, 1, "tcp 8080 10.10.2.2", false),
            (1, 1, "tcp 5432 10.10.2.2", true),
            (1, 1, "udp 53 10.10.2.2", true),
            (1, 1, "icmp 10.10.2.2", true),
            (1, 0, "tcp 5432 10.10.2.1", false),
            (0, 2, "tcp 8080", false),
            (1, 2, "tcp 5432", false),
        ];
        for (l, p, r, allowed) in cases {
            let d = ev.evaluate(LocalId::new(l), PeerId::new(p), &req(r));
            assert_eq!(
                d.allowed,
                allowed,
                "default {default}: {} -> {} {r}: {}",
                peers[p],
                locals[l].principal,
                d.explain()
            );
        }
        let d = ev.evaluate(LocalId::new(0), PeerId::new(2), &req("tcp 8080"));
        assert_eq!(d.reason, Reason::Denied);
        assert_eq!(d.policy.as_deref(), Some("istio-system/deny-legacy"));
    }
}

#[test]
fn example_toml_loads_and_matches_intent() {
    let set = parse_toml(EXAMPLE_TOML, Path::new("config/policy-example.toml")).unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert_eq!(set.policies.len(), 4);
    check_example(&set, false);
}

#[test]
fn example_yaml_loads_and_matches_intent() {
    let set = parse_istio_yaml(EXAMPLE_YAML, Path::new("config/istio-example.yaml")).unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert_eq!(set.policies.len(), 4);
    let payment_labels = labels("app=payment-service");
    let mode = set.mtls_mode(DEFAULT_ROOT_NAMESPACE, "payments", &payment_labels);
    assert_eq!(mode, MtlsMode::Strict);
    check_example(&set, true);
}

#[test]
fn example_files_load_through_load_files() {
    // This file is <repo>/src/policy/tests.rs, also when compiled from another crate.
    let this_file = Path::new(env!("CARGO_MANIFEST_DIR")).join(Path::new(file!()));
    let config = this_file.ancestors().nth(3).unwrap().join("config");
    let paths = [
        config.join("policy-example.toml"),
        config.join("istio-example.yaml"),
    ];
    // Both define the same policies: loading them together must fail on the duplicate.
    let e = load_files(&paths).unwrap_err();
    assert!(e.reason.starts_with("duplicate policy"), "{e}");
    assert!(load_files(&paths[..1]).is_ok());
    assert!(load_files(&paths[1..]).is_ok());
}
