//! Istio YAML: documents modelled on the AuthorizationPolicy and PeerAuthentication
//! examples of Istio's documentation, the decisions those describe, L7-only fields, and
//! every error case.

use std::path::Path;

use super::tests::{decide, req};
use super::*;

fn load(text: &str) -> PolicySet {
    parse_istio_yaml(text, Path::new("istio.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(text: &str) -> crate::file_error::FileError {
    match parse_istio_yaml(text, Path::new("bad.yaml")) {
        Ok(set) => panic!("expected an error, got {set:?}"),
        Err(e) => e,
    }
}

const SLEEP: &str = "cluster.local/ns/foo/sa/sleep";
const SLEEP_BAR: &str = "cluster.local/ns/bar/sa/sleep";
const HTTPBIN: &str = "cluster.local/ns/foo/sa/httpbin";
const HTTPBIN_LABELS: &str = "app=httpbin,version=v1";

/// Shorthand: the decision for `peer` -> httpbin in namespace foo.
fn httpbin(set: &PolicySet, default: DefaultAction, peer: &str, request: &str) -> Decision {
    decide(set, default, HTTPBIN, HTTPBIN_LABELS, peer, &req(request))
}

#[test]
fn allow_nothing() {
    // An ALLOW policy that matches nothing: it selects every workload of the namespace, so
    // nothing is allowed, whatever the default.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec:
  {}
",
    );
    assert_eq!(set.policies[0].rules, vec![]);
    assert_eq!(set.policies[0].action, Action::Allow);
    for default in [DefaultAction::Allow, DefaultAction::Deny] {
        let d = httpbin(&set, default, SLEEP, "tcp 8000 10.0.0.1");
        assert_eq!(d.reason, Reason::NoAllowMatched, "{}", d.explain());
    }
    // Another namespace is not affected.
    let d = decide(
        &set,
        DefaultAction::Allow,
        SLEEP_BAR,
        "",
        SLEEP,
        &req("tcp 8000"),
    );
    assert_eq!(d.reason, Reason::DefaultAllow);
}

#[test]
fn deny_all() {
    // A DENY policy with one empty rule denies everything, even next to an allow-all.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec:
  action: DENY
  # the rules field has an empty rule: it matches every request
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  action: ALLOW
  rules:
  - {}
",
    );
    for r in ["tcp 8000", "udp 53", "icmp"] {
        let d = httpbin(&set, DefaultAction::Allow, SLEEP, r);
        assert_eq!(
            d.explain(),
            "deny: DENY policy foo/deny-all rule 0 matched",
            "{r}"
        );
    }
}

#[test]
fn allow_service_account_principals_on_ports() {
    // Only the sleep service account of namespace foo may reach httpbin, on port 8000.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/foo/sa/sleep\", \"cluster.local/ns/foo/sa/curl\"]
    to:
    - operation:
        ports: [\"8000\"]
",
    );
    let cases = [
        (SLEEP, "tcp 8000", true),
        (SLEEP, "udp 8000", true),
        (SLEEP, "tcp 8001", false),
        (SLEEP, "icmp", false),
        ("cluster.local/ns/foo/sa/curl", "tcp 8000", true),
        (SLEEP_BAR, "tcp 8000", false),
    ];
    for (peer, r, allowed) in cases {
        let d = httpbin(&set, DefaultAction::Allow, peer, r);
        assert_eq!(d.allowed, allowed, "{peer} {r}: {}", d.explain());
    }
    // A workload without version=v1 is not selected: the default applies.
    let d = decide(
        &set,
        DefaultAction::Allow,
        HTTPBIN,
        "app=httpbin",
        SLEEP_BAR,
        &req("tcp 8000"),
    );
    assert_eq!(d.reason, Reason::DefaultAllow);
}

#[test]
fn deny_other_namespaces() {
    // Deny requests from every namespace except foo, mesh-wide from the root namespace,
    // while an ALLOW policy lets everyone else in.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-other-namespaces
  namespace: istio-system
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: [\"foo\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  rules:
  - {}
",
    );
    let d = httpbin(&set, DefaultAction::Allow, SLEEP_BAR, "tcp 8000");
    assert_eq!(
        d.explain(),
        "deny: DENY policy istio-system/deny-other-namespaces rule 0 matched"
    );
    let d = httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 8000");
    assert_eq!(
        d.explain(),
        "allow: ALLOW policy foo/allow-all rule 0 matched"
    );
}

#[test]
fn tcp_ports_with_ip_blocks() {
    // A TCP service: allow ports 9000 and 9001 from the pod network, except one address.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tcp-policy
  namespace: foo
spec:
  selector:
    matchLabels:
      app: tcp-echo
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: [\"10.10.0.0/16\", \"192.0.2.7\"]
        notIpBlocks: [\"10.10.9.9\"]
    to:
    - operation:
        ports: [\"9000\", \"9001\"]
",
    );
    let tcp_echo = "cluster.local/ns/foo/sa/tcp-echo";
    let cases = [
        ("tcp 9000 10.10.1.1", true),
        ("tcp 9001 192.0.2.7", true),
        ("tcp 9002 10.10.1.1", false),
        ("tcp 9000 10.10.9.9", false),
        ("tcp 9000 10.11.1.1", false),
        ("tcp 9000", false),
    ];
    for (r, allowed) in cases {
        let d = decide(
            &set,
            DefaultAction::Allow,
            tcp_echo,
            "app=tcp-echo",
            SLEEP,
            &req(r),
        );
        assert_eq!(d.allowed, allowed, "{r}: {}", d.explain());
    }
}

#[test]
fn l7_allow_rules_never_widen_access() {
    // HTTP-only ALLOW rule: GET on /info* from sleep. meshguard cannot see methods or
    // paths, so the rule matches nothing; the second, L4 rule still works.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin-get
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/foo/sa/sleep\"]
    to:
    - operation:
        methods: [\"GET\"]
        paths: [\"/info*\"]
        ports: [\"8000\"]
  - from:
    - source:
        requestPrincipals: [\"*\"]
  - when:
    - key: request.headers[version]
      values: [\"v1\"]
  - from:
    - source:
        principals: [\"cluster.local/ns/foo/sa/admin\"]
",
    );
    let p = &set.policies[0];
    assert_eq!(
        p.rules
            .iter()
            .map(|r| r.matches_nothing)
            .collect::<Vec<_>>(),
        [true, true, true, false]
    );
    // The request the L7 rule talks about is not allowed by it.
    for default in [DefaultAction::Allow, DefaultAction::Deny] {
        let d = httpbin(&set, default, SLEEP, "tcp 8000 10.1.2.3");
        assert_eq!(d.reason, Reason::NoAllowMatched, "{}", d.explain());
    }
    let d = httpbin(
        &set,
        DefaultAction::Deny,
        "cluster.local/ns/foo/sa/admin",
        "tcp 1",
    );
    assert_eq!(
        d.explain(),
        "allow: ALLOW policy foo/httpbin-get rule 3 matched"
    );
    assert_eq!(set.warnings.len(), 3, "{:#?}", set.warnings);
    assert_eq!(
        set.warnings[0],
        "istio.yaml: document 1: spec.rules[0]: ALLOW rule uses fields meshguard cannot \
         check at L3/L4 (to[0].operation.methods, to[0].operation.paths); the rule matches \
         nothing"
    );
    assert!(
        set.warnings[1].contains("spec.rules[1]")
            && set.warnings[1].contains("from[0].source.requestPrincipals")
    );
    assert!(set.warnings[2].contains("spec.rules[2]") && set.warnings[2].contains("when[0]"));
}

#[test]
fn l7_deny_and_audit_rules_apply_more_widely() {
    // DENY POST from other namespaces: methods are dropped, so everything from other
    // namespaces is denied. AUDIT on a path: audits every request.
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-post
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: [\"foo\"]
    to:
    - operation:
        methods: [\"POST\"]
  - from:
    - source:
        notRequestPrincipals: [\"*\"]
    when:
    - key: request.auth.claims[iss]
      values: [\"https://accounts.example.com\"]
    to:
    - operation:
        ports: [\"9999\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-headers
  namespace: foo
spec:
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: [\"/headers\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  rules: [{}]
",
    );
    assert_eq!(set.warnings.len(), 3, "{:#?}", set.warnings);
    assert!(set.warnings[0].starts_with(
        "istio.yaml: document 1: spec.rules[0]: DENY rule uses fields meshguard cannot check \
         at L3/L4 (to[0].operation.methods); they are ignored"
    ));
    assert!(set.warnings[2].starts_with("istio.yaml: document 2: spec.rules[0]: AUDIT rule"));
    // Any request from bar is denied by rule 0 (not only POST).
    let d = httpbin(&set, DefaultAction::Allow, SLEEP_BAR, "udp 53");
    assert_eq!(
        d.explain(),
        "deny: DENY policy foo/deny-post rule 0 matched; audited by foo/audit-headers"
    );
    // From foo: rule 1 (source reduced to "any") denies port 9999 only.
    let d = httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 9999");
    assert_eq!(
        d.explain(),
        "deny: DENY policy foo/deny-post rule 1 matched; audited by foo/audit-headers"
    );
    let d = httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 8000");
    assert_eq!(
        d.explain(),
        "allow: ALLOW policy foo/allow-all rule 0 matched; audited by foo/audit-headers"
    );
}

#[test]
fn peer_authentications_load_as_written() {
    let set = load(
        "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: bar}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: bar}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: c, namespace: bar}
spec: {mtls: {mode: UNSET}}
",
    );
    let loaded: Vec<_> = set
        .peer_authentications
        .iter()
        .map(|p| {
            (
                p.namespace.as_str(),
                p.name.as_str(),
                p.selector.len(),
                p.mode,
            )
        })
        .collect();
    assert_eq!(
        loaded,
        [
            ("foo", "default", 0, MtlsMode::Strict),
            ("foo", "httpbin", 1, MtlsMode::Permissive),
            ("bar", "a", 0, MtlsMode::Unset),
            ("bar", "b", 0, MtlsMode::Unset),
            ("bar", "c", 0, MtlsMode::Unset),
        ]
    );
    assert_eq!(set.peer_authentications[1].origin, "istio.yaml: document 2");
    assert!(set.policies.is_empty());
    // STRICT does not touch the allow list: the default still applies.
    let d = httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 8000");
    assert_eq!(d.reason, Reason::DefaultAllow);
}

#[test]
fn documents_metadata_and_numbering() {
    // Leading separator, comment-only and empty documents, kubectl-style metadata and
    // status, v1beta1: all accepted; documents are numbered as written, from 1.
    let text = "---
# just a comment
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: exported
  namespace: foo
  labels: {team: a}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}
  uid: 0b0c1f36-4c6c-4c5e-9a53-6f7a3a8f2a11
  resourceVersion: \"12345\"
  generation: 2
  creationTimestamp: \"2024-01-01T00:00:00Z\"
  managedFields: [{manager: kubectl}]
spec:
  action: AUDIT
status: {}
---
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: second, namespace: foo}
...
";
    let set = load(text);
    assert_eq!(set.policies.len(), 2);
    assert_eq!(set.policies[0].origin, "istio.yaml: document 2");
    assert_eq!(set.policies[1].origin, "istio.yaml: document 4");
    // An AUDIT without rules never matches: warned about.
    assert_eq!(
        set.warnings,
        [
            "istio.yaml: document 2: spec.rules: AUDIT policy foo/exported has no rules and \
             never matches; add `rules: [{}]` to match all traffic"
        ]
    );
    assert_eq!(load("").policies.len(), 0);
    assert_eq!(load("# nothing\n").policies.len(), 0);
}

const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";
const META: &str = "metadata: {name: p, namespace: foo}\n";

fn ap(spec: &str) -> String {
    format!("{AP}{META}spec:\n{spec}")
}

fn pa(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n{META}spec:\n{spec}")
}

#[test]
fn errors_name_file_key_and_reason() {
    // (case, text, expected key, expected reason fragment)
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "unknown source field",
            ap("  rules:\n  - from:\n    - source:\n        principal: [\"x\"]\n"),
            "document 1: spec.rules[0].from[0].source",
            "unknown field `principal`, expected one of",
        ),
        (
            "unknown spec field",
            ap("  actions: DENY\n"),
            "document 1: spec",
            "unknown field `actions`",
        ),
        (
            "unknown top-level field",
            format!("{AP}{META}specs: {{}}\n"),
            "document 1: line 4, column 1",
            "unknown field `specs`",
        ),
        (
            "unknown metadata field",
            format!("{AP}metadata: {{name: p, namespace: foo, nmespace: x}}\n"),
            "document 1: metadata",
            "unknown field `nmespace`",
        ),
        (
            "unknown operation field (L7 typo)",
            ap("  rules:\n  - to:\n    - operation:\n        method: [GET]\n"),
            "document 1: spec.rules[0].to[0].operation",
            "unknown field `method`",
        ),
        (
            "CUSTOM action",
            ap("  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n"),
            "document 1: spec.action",
            "action CUSTOM (external authorization) is not supported",
        ),
        (
            "provider without CUSTOM",
            ap("  provider: {name: ext-authz}\n"),
            "document 1: spec.provider",
            "provider belongs to action CUSTOM",
        ),
        (
            "unknown action",
            ap("  action: REJECT\n"),
            "document 1: spec.action",
            "unknown action \"REJECT\"",
        ),
        (
            "missing namespace",
            format!("{AP}metadata: {{name: p}}\nspec: {{}}\n"),
            "document 1: metadata.namespace",
            "metadata.namespace is required",
        ),
        (
            "missing name",
            format!("{AP}metadata: {{namespace: foo}}\n"),
            "document 1: metadata.name",
            "metadata.name is required",
        ),
        (
            "missing metadata",
            format!("{AP}spec: {{}}\n"),
            "document 1: metadata",
            "metadata.name and metadata.namespace are required",
        ),
        (
            "wrong kind",
            format!("---\n{AP}{META}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n{META}"),
            "document 2: kind",
            "unsupported kind \"VirtualService\" (networking.istio.io/v1)",
        ),
        (
            "RequestAuthentication",
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: p, namespace: foo}\n".to_owned(),
            "document 1: kind",
            "expected AuthorizationPolicy or PeerAuthentication",
        ),
        (
            "wrong apiVersion",
            "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\n".to_owned(),
            "document 1: apiVersion",
            "unsupported apiVersion \"security.istio.io/v1alpha1\"",
        ),
        (
            "missing kind",
            "apiVersion: security.istio.io/v1\n".to_owned(),
            "document 1: kind",
            "missing",
        ),
        (
            "not an object",
            "- a\n- b\n".to_owned(),
            "document 1: line 1, column 1",
            "expected a Kubernetes object",
        ),
        (
            "syntax error",
            format!("{AP}{META}---\n{AP}metadata: {{name: [}}\n"),
            "document 2: line 7, column 19",
            "did not find expected node content",
        ),
        (
            "malformed principal",
            ap("  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/foo/sa/sleep\", \"cluster.local/foo/sleep\"]\n"),
            "document 1: spec.rules[0].from[0].source.principals[1]",
            "invalid principal \"cluster.local/foo/sleep\"",
        ),
        (
            "malformed notPrincipal",
            ap("  rules:\n  - from:\n    - source:\n        notPrincipals: [\"spiffe://\"]\n"),
            "document 1: spec.rules[0].from[0].source.notPrincipals[0]",
            "nothing after spiffe://",
        ),
        (
            "malformed CIDR",
            ap("  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\", \"10.0.0.256/32\"]\n"),
            "document 1: spec.rules[0].from[0].source.ipBlocks[1]",
            "invalid CIDR \"10.0.0.256/32\"",
        ),
        (
            "malformed notIpBlock",
            ap("  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"localhost\"]\n"),
            "document 1: spec.rules[0].from[0].source.notIpBlocks[0]",
            "invalid IP address \"localhost\"",
        ),
        (
            "malformed port",
            ap("  rules:\n  - to:\n    - operation:\n        ports: [\"8080/tcp\"]\n"),
            "document 1: spec.rules[0].to[0].operation.ports[0]",
            "Istio ports are single numbers from 0 to 65535",
        ),
        (
            "port out of range",
            ap("  rules:\n  - to:\n    - operation:\n        notPorts: [\"70000\"]\n"),
            "document 1: spec.rules[0].to[0].operation.notPorts[0]",
            "Istio ports are single numbers from 0 to 65535",
        ),
        (
            "bad namespace value",
            ap("  rules:\n  - from:\n    - source:\n        namespaces: [\"Foo\"]\n"),
            "document 1: spec.rules[0].from[0].source.namespaces[0]",
            "invalid namespace \"Foo\"",
        ),
        (
            "targetRef",
            ap("  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\n"),
            "document 1: spec.targetRef",
            "targetRef is not supported",
        ),
        (
            "targetRefs",
            ap("  targetRefs:\n  - {kind: Service, group: \"\", name: httpbin}\n"),
            "document 1: spec.targetRefs",
            "targetRefs is not supported",
        ),
        (
            "serviceAccounts",
            ap("  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"foo/sleep\"]\n"),
            "document 1: spec.rules[0].from[0].source.serviceAccounts",
            "write principals",
        ),
        (
            "empty from",
            ap("  rules:\n  - from: []\n"),
            "document 1: spec.rules[0].from",
            "omit `from`",
        ),
        (
            "missing source",
            ap("  rules:\n  - from:\n    - {}\n"),
            "document 1: spec.rules[0].from[0].source",
            "needs a source",
        ),
        (
            "empty source",
            ap("  rules:\n  - from:\n    - source: {}\n"),
            "document 1: spec.rules[0].from[0].source",
            "empty source",
        ),
        (
            "empty operation",
            ap("  rules:\n  - to:\n    - operation: {}\n"),
            "document 1: spec.rules[0].to[0].operation",
            "empty operation",
        ),
        (
            "empty list",
            ap("  rules:\n  - from:\n    - source:\n        principals: []\n"),
            "document 1: spec.rules[0].from[0].source.principals",
            "empty list",
        ),
        (
            "empty L7 value",
            ap("  rules:\n  - to:\n    - operation:\n        methods: [\"\"]\n"),
            "document 1: spec.rules[0].to[0].operation.methods[0]",
            "empty value",
        ),
        (
            "empty when",
            ap("  rules:\n  - when: []\n"),
            "document 1: spec.rules[0].when",
            "omit `when`",
        ),
        (
            "unknown mode",
            pa("  mtls:\n    mode: strict\n"),
            "document 1: spec.mtls.mode",
            "unknown mode \"strict\"",
        ),
        (
            "portLevelMtls",
            pa("  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n"),
            "document 1: spec.portLevelMtls",
            "portLevelMtls is not supported",
        ),
        (
            "unknown PeerAuthentication field",
            pa("  mtls: {mode: STRICT, strict: true}\n"),
            "document 1: spec.mtls",
            "unknown field `strict`",
        ),
        (
            "duplicate policy",
            format!("{AP}{META}---\n{AP}{META}"),
            "document 2",
            "duplicate policy foo/p; also defined at bad.yaml: document 1",
        ),
        (
            "bad policy name",
            format!("{AP}metadata: {{name: My_Policy, namespace: foo}}\n"),
            "document 1: metadata.name",
            "invalid character 'M'",
        ),
        (
            "wrong value type",
            ap("  rules:\n  - from:\n    - source:\n        principals: {a: b}\n"),
            "document 1: spec.rules[0].from[0].source.principals",
            "invalid type: map, expected a sequence",
        ),
        (
            "unquoted port",
            ap("  rules:\n  - to:\n    - operation:\n        ports: [8080]\n"),
            "document 1: spec.rules[0].to[0].operation.ports[0]",
            "invalid type: integer `8080`, expected a string (Istio's schema types this field as a string: quote numbers, as in \"8080\")",
        ),
        (
            "unquoted label value",
            ap("  selector: {matchLabels: {version: 2}}\n"),
            "document 1: spec.selector.matchLabels.version",
            "invalid type: integer `2`, expected a string",
        ),
        (
            "port range",
            ap("  rules:\n  - to:\n    - operation:\n        ports: [\"80-90\"]\n"),
            "document 1: spec.rules[0].to[0].operation.ports[0]",
            "Istio ports are single numbers from 0 to 65535",
        ),
        (
            "port just out of range",
            ap("  rules:\n  - to:\n    - operation:\n        notPorts: [\"65536\"]\n"),
            "document 1: spec.rules[0].to[0].operation.notPorts[0]",
            "Istio ports are single numbers from 0 to 65535",
        ),
        (
            "SPIFFE principal",
            ap("  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/x/sa/y\"]\n"),
            "document 1: spec.rules[0].from[0].source.principals[0]",
            "never matches in Istio, which puts spiffe:// in front of every principal value itself; write \"cluster.local/ns/x/sa/y\"",
        ),
        (
            "SPIFFE notPrincipal",
            ap("  rules:\n  - from:\n    - source:\n        notPrincipals: [\"SPIFFE://cluster.local/*\"]\n"),
            "document 1: spec.rules[0].from[0].source.notPrincipals[0]",
            "write \"cluster.local/*\"",
        ),
        (
            "SPIFFE source.principal",
            ap("  rules:\n  - when:\n    - key: source.principal\n      notValues: [\"spiffe://cluster.local/ns/x/sa/y\"]\n"),
            "document 1: spec.rules[0].when[0].notValues[0]",
            "never matches in Istio",
        ),
        (
            "when without key",
            ap("  rules:\n  - when:\n    - values: [\"a\"]\n"),
            "document 1: spec.rules[0].when[0].key",
            "missing; `key` must name an attribute",
        ),
        (
            "when without values",
            ap("  rules:\n  - when:\n    - key: source.ip\n"),
            "document 1: spec.rules[0].when[0]",
            "at least one of `values` or `notValues` must be set for key source.ip",
        ),
        (
            "when with an unknown attribute",
            ap("  rules:\n  - when:\n    - key: source.port\n      values: [\"1\"]\n"),
            "document 1: spec.rules[0].when[0].key",
            "unknown attribute \"source.port\"",
        ),
        (
            "when on destination.namespace",
            ap("  rules:\n  - when:\n    - key: destination.namespace\n      values: [\"a\"]\n"),
            "document 1: spec.rules[0].when[0].key",
            "replaced by the metadata.namespace",
        ),
        (
            "when on destination.labels",
            ap("  rules:\n  - when:\n    - key: destination.labels[app]\n      values: [\"a\"]\n"),
            "document 1: spec.rules[0].when[0].key",
            "replaced by the workload selector",
        ),
        (
            "when on a header without a name",
            ap("  rules:\n  - when:\n    - key: request.headers\n      values: [\"a\"]\n"),
            "document 1: spec.rules[0].when[0].key",
            "should have format a[b]",
        ),
        (
            "when source.ip not an address",
            ap("  rules:\n  - when:\n    - key: source.ip\n      values: [\"10.0.0.300\"]\n"),
            "document 1: spec.rules[0].when[0].values[0]",
            "invalid IP address",
        ),
        (
            "when remote.ip not an address",
            ap("  rules:\n  - when:\n    - key: remote.ip\n      notValues: [\"x\"]\n"),
            "document 1: spec.rules[0].when[0].notValues[0]",
            "invalid IP address",
        ),
        (
            "when destination.port not a port",
            ap("  rules:\n  - when:\n    - key: destination.port\n      values: [\"http\"]\n"),
            "document 1: spec.rules[0].when[0].values[0]",
            "Istio ports are single numbers",
        ),
        (
            "when with an empty value",
            ap("  rules:\n  - when:\n    - key: connection.sni\n      values: [\"\"]\n"),
            "document 1: spec.rules[0].when[0].values[0]",
            "empty value",
        ),
        (
            "DENY without rules",
            ap("  action: DENY\n"),
            "document 1: spec.rules",
            "a DENY policy without rules never matches, and Istio's validation rejects it",
        ),
    ];
    for (case, text, key, reason) in &cases {
        let e = load_err(text);
        assert_eq!(e.file, Path::new("bad.yaml"), "{case}");
        assert_eq!(e.key, *key, "{case}: {e}");
        assert!(e.reason.contains(reason), "{case}: {e}");
        assert_eq!(
            e.to_string(),
            format!("bad.yaml: {key}: {}", e.reason),
            "{case}"
        );
    }
}

#[test]
fn yaml_errors_carry_line_numbers() {
    let e = load_err(&ap(
        "  rules:\n  - from:\n    - source:\n        principal: [\"x\"]\n",
    ));
    assert!(e.reason.ends_with("(line 8, column 9)"), "{e}");
}

#[test]
fn hostile_yaml_is_an_error_not_a_panic() {
    let deep = "[".repeat(100_000);
    let aliases = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c]\n";
    for text in [
        deep.as_str(),
        aliases,
        ">\n@",
        "{-",
        "[!,",
        "a: ''|\n 0",
        "\u{0}",
        "kind: [",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: &m {name: a, namespace: b}\nspec: *m\n",
    ] {
        assert!(
            parse_istio_yaml(text, Path::new("x.yaml")).is_err(),
            "{text:?}"
        );
    }
}

#[test]
fn deny_without_rules_is_refused_as_istio_refuses_it() {
    for rules in ["", "  rules: []\n"] {
        let text = format!("{AP}{META}spec:\n  action: DENY\n{rules}");
        let e = parse_istio_yaml(&text, Path::new("istio.yaml")).unwrap_err();
        assert_eq!(e.key, "document 1: spec.rules", "{e}");
        assert!(
            e.reason.contains("add `rules: [{}]` to deny all traffic"),
            "{e}"
        );
    }
    // An empty ALLOW is the allow-nothing idiom: no warning.
    assert!(load(&format!("{AP}{META}spec:\n  rules: []\n"))
        .warnings
        .is_empty());
}

#[test]
fn evaluator_and_decision_are_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Evaluator>();
    send_sync::<Decision>();
    send_sync::<PolicySet>();
}

/// An AuthorizationPolicy for httpbin's namespace with `spec` under `apiVersion`.
fn policy_in_foo(api_version: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/{api_version}\nkind: AuthorizationPolicy\n\
         metadata: {{name: p, namespace: foo}}\nspec:\n{spec}"
    )
}

/// The five attributes Istio checks for TCP too, in ALLOW, DENY and AUDIT rules, with
/// `values` and `notValues`, alone, together and with `from`/`to` (Istio's conditions
/// page; ztunnel's authorization compiles the same five as L4 matches).
#[rustfmt::skip]
#[test]
fn l4_when_conditions_match_like_the_fields_they_mirror() {
    let when = |conditions: &str| format!("  rules:\n  - when:\n{conditions}");
    let deny = |conditions: &str| format!("  action: DENY\n  rules:\n  - when:\n{conditions}");
    let cases: Vec<(&str, String, DefaultAction, &str, &str, bool)> = vec![
        ("source.namespace", when("    - key: source.namespace\n      values: [\"foo\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80", true),
        ("source.namespace, other", when("    - key: source.namespace\n      values: [\"foo\"]\n"), DefaultAction::Allow, SLEEP_BAR, "tcp 80", false),
        ("source.namespace prefix", when("    - key: source.namespace\n      values: [\"ba*\"]\n"), DefaultAction::Deny, SLEEP_BAR, "tcp 80", true),
        ("source.namespace notValues", when("    - key: source.namespace\n      notValues: [\"bar\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80", true),
        ("source.namespace notValues, excluded", when("    - key: source.namespace\n      notValues: [\"bar\"]\n"), DefaultAction::Allow, SLEEP_BAR, "tcp 80", false),
        ("source.principal", when(&format!("    - key: source.principal\n      values: [\"{SLEEP}\"]\n")), DefaultAction::Deny, SLEEP, "udp 53", true),
        ("source.principal, other", when(&format!("    - key: source.principal\n      values: [\"{SLEEP}\"]\n")), DefaultAction::Allow, SLEEP_BAR, "udp 53", false),
        ("source.principal suffix", when("    - key: source.principal\n      values: [\"*/sa/sleep\"]\n"), DefaultAction::Deny, SLEEP_BAR, "tcp 1", true),
        ("source.ip", when("    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n      notValues: [\"10.1.0.0/16\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80 10.2.3.4", true),
        ("source.ip notValues", when("    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n      notValues: [\"10.1.0.0/16\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80 10.1.2.3", false),
        ("source.ip outside", when("    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80 192.0.2.1", false),
        ("source.ip unknown: ALLOW does not match", when("    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", false),
        ("source.ip address, IPv6", when("    - key: source.ip\n      values: [\"fd00::1\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80 fd00::1", true),
        ("destination.ip", when("    - key: destination.ip\n      values: [\"10.40.1.1\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80 10.0.0.9 to 10.40.1.1", true),
        ("destination.ip, other address", when("    - key: destination.ip\n      values: [\"10.40.1.1\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80 10.0.0.9 to 10.40.1.2", false),
        ("destination.ip notValues", when("    - key: destination.ip\n      notValues: [\"10.40.1.0/24\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80 10.0.0.9 to 10.40.1.2", false),
        ("destination.port", when("    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Deny, SLEEP, "tcp 8080", true),
        ("destination.port, udp too", when("    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Deny, SLEEP, "udp 8080", true),
        ("destination.port, other port", when("    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Allow, SLEEP, "tcp 9090", false),
        ("destination.port, no port in ICMP", when("    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Allow, SLEEP, "icmp", false),
        ("destination.port notValues", when("    - key: destination.port\n      notValues: [\"22\"]\n"), DefaultAction::Deny, SLEEP, "tcp 80", true),
        ("destination.port notValues, excluded", when("    - key: destination.port\n      notValues: [\"22\"]\n"), DefaultAction::Allow, SLEEP, "tcp 22", false),
        ("conditions are AND'ed", when("    - key: source.namespace\n      values: [\"foo\"]\n    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Deny, SLEEP, "tcp 8080", true),
        ("conditions are AND'ed, one fails", when("    - key: source.namespace\n      values: [\"foo\"]\n    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Allow, SLEEP, "tcp 9", false),
        ("conditions are AND'ed, the other fails", when("    - key: source.namespace\n      values: [\"foo\"]\n    - key: destination.port\n      values: [\"8080\"]\n"), DefaultAction::Allow, SLEEP_BAR, "tcp 8080", false),
        ("with from", format!("  rules:\n  - from:\n    - source:\n        principals: [\"{SLEEP}\"]\n    when:\n    - key: destination.port\n      values: [\"8000\"]\n"), DefaultAction::Deny, SLEEP, "tcp 8000", true),
        ("with from, port fails", format!("  rules:\n  - from:\n    - source:\n        principals: [\"{SLEEP}\"]\n    when:\n    - key: destination.port\n      values: [\"8000\"]\n"), DefaultAction::Allow, SLEEP, "tcp 8001", false),
        ("DENY on destination.port denies that port", deny("    - key: destination.port\n      values: [\"22\"]\n"), DefaultAction::Allow, SLEEP, "tcp 22", false),
        ("DENY on destination.port leaves other ports", deny("    - key: destination.port\n      values: [\"22\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", true),
        ("DENY on notValues", deny("    - key: destination.port\n      notValues: [\"443\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", false),
        ("DENY on notValues, excluded port", deny("    - key: destination.port\n      notValues: [\"443\"]\n"), DefaultAction::Allow, SLEEP, "tcp 443", true),
        ("DENY on source.ip, unknown address: fails closed", deny("    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", false),
        ("DENY on source.principal", deny(&format!("    - key: source.principal\n      values: [\"{SLEEP_BAR}\"]\n")), DefaultAction::Allow, SLEEP_BAR, "tcp 80", false),
        ("DENY on source.principal, other peer", deny(&format!("    - key: source.principal\n      values: [\"{SLEEP_BAR}\"]\n")), DefaultAction::Allow, SLEEP, "tcp 80", true),
        ("DENY: an HTTP condition is dropped, the L4 one kept", deny("    - key: request.headers[x-user]\n      values: [\"a\"]\n    - key: destination.port\n      values: [\"22\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", true),
        ("DENY: an HTTP condition is dropped, port 22 denied", deny("    - key: request.headers[x-user]\n      values: [\"a\"]\n    - key: destination.port\n      values: [\"22\"]\n"), DefaultAction::Allow, SLEEP, "tcp 22", false),
        ("ALLOW with an HTTP condition matches nothing", when("    - key: request.headers[x-user]\n      values: [\"a\"]\n    - key: destination.port\n      values: [\"80\"]\n"), DefaultAction::Allow, SLEEP, "tcp 80", false),
    ];
    for api_version in ["v1", "v1beta1"] {
        for (case, spec, default, peer, request, allowed) in &cases {
            let set = load(&policy_in_foo(api_version, spec));
            let d = httpbin(&set, *default, peer, request);
            assert_eq!(d.allowed, *allowed, "{api_version}: {case}: {}", d.explain());
        }
    }
    // AUDIT rules with a condition audit only what it matches.
    let set = load(&policy_in_foo("v1", "  action: AUDIT\n  rules:\n  - when:\n    - key: destination.port\n      values: [\"8080\"]\n"));
    assert_eq!(httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 8080").audited_by.len(), 1);
    assert!(httpbin(&set, DefaultAction::Allow, SLEEP, "tcp 80").audited_by.is_empty());
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
}
