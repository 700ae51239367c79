//! Workload identities ("principals").
//!
//! A principal names a Kubernetes service account in a trust domain. Two spellings are
//! accepted and mean the same value:
//!
//! - Istio form: `<trust-domain>/ns/<namespace>/sa/<service-account>`
//! - SPIFFE form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//!
//! [`Principal`] always prints the Istio form; [`Principal::to_spiffe`] gives the other.

use std::fmt;
use std::str::FromStr;

/// Maximum length of a Kubernetes namespace or service account name (DNS subdomain).
pub(super) const MAX_K8S_NAME_LEN: usize = 253;

const SPIFFE_SCHEME: &str = "spiffe://";
const EXPECTED_FORM: &str = "<trust-domain>/ns/<namespace>/sa/<service-account>";

/// A parsed workload identity: trust domain, namespace and service account.
///
/// Ordering is by trust domain, then namespace, then service account.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Principal {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Which part of a principal an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    TrustDomain,
    Namespace,
    ServiceAccount,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::TrustDomain => "trust domain",
            Segment::Namespace => "namespace",
            Segment::ServiceAccount => "service account",
        })
    }
}

/// Why a string is not a valid principal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("empty principal; expected {EXPECTED_FORM}")]
    Empty,
    #[error("expected {EXPECTED_FORM} (or spiffe://{EXPECTED_FORM}), got {input:?}")]
    Shape { input: String },
    #[error("expected \"{expected}\" {after}, got {found:?}; expected {EXPECTED_FORM}")]
    Keyword {
        expected: &'static str,
        after: &'static str,
        found: String,
    },
    #[error("empty {0}")]
    EmptySegment(Segment),
    #[error("invalid character '{}' in {segment}{}", .ch.escape_debug(), allowed_chars(*.segment))]
    InvalidChar { segment: Segment, ch: char },
    #[error(
        "trust domain {found:?} has upper-case letters; SPIFFE trust domains are lowercase: \
         write {lowercase:?}"
    )]
    UpperCaseTrustDomain { found: String, lowercase: String },
    #[error("{segment} is {len} characters long; the maximum is {max}")]
    TooLong {
        segment: Segment,
        len: usize,
        max: usize,
    },
}

fn allowed_chars(segment: Segment) -> &'static str {
    match segment {
        Segment::TrustDomain => " (allowed: a-z 0-9 . _ -)",
        Segment::Namespace | Segment::ServiceAccount => " (allowed: a-z 0-9 . -)",
    }
}

impl Principal {
    /// Builds a principal from its parts, validating each one.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, PrincipalError> {
        validate_trust_domain(trust_domain)?;
        validate_k8s_name(namespace, Segment::Namespace)?;
        validate_k8s_name(service_account, Segment::ServiceAccount)?;
        Ok(Principal {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The SPIFFE ID form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn to_spiffe(&self) -> String {
        format!("{SPIFFE_SCHEME}{self}")
    }
}

fn validate_trust_domain(s: &str) -> Result<(), PrincipalError> {
    if s.is_empty() {
        return Err(PrincipalError::EmptySegment(Segment::TrustDomain));
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(PrincipalError::InvalidChar {
            segment: Segment::TrustDomain,
            ch,
        });
    }
    // SPIFFE trust domains are lowercase (as go-spiffe enforces); a mixed-case one would
    // silently never match policies written in lowercase.
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(PrincipalError::UpperCaseTrustDomain {
            found: s.to_owned(),
            lowercase: s.to_ascii_lowercase(),
        });
    }
    Ok(())
}

fn validate_k8s_name(s: &str, segment: Segment) -> Result<(), PrincipalError> {
    if s.is_empty() {
        return Err(PrincipalError::EmptySegment(segment));
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-')))
    {
        return Err(PrincipalError::InvalidChar { segment, ch });
    }
    if s.len() > MAX_K8S_NAME_LEN {
        return Err(PrincipalError::TooLong {
            segment,
            len: s.len(),
            max: MAX_K8S_NAME_LEN,
        });
    }
    Ok(())
}

impl FromStr for Principal {
    type Err = PrincipalError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(PrincipalError::Empty);
        }
        // The URI scheme is case-insensitive; the rest is not.
        let rest = match input.get(..SPIFFE_SCHEME.len()) {
            Some(scheme) if scheme.eq_ignore_ascii_case(SPIFFE_SCHEME) => {
                &input[SPIFFE_SCHEME.len()..]
            }
            _ => input,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, ns_kw, namespace, sa_kw, service_account] = parts[..] else {
            return Err(PrincipalError::Shape {
                input: input.to_owned(),
            });
        };
        if ns_kw != "ns" {
            return Err(PrincipalError::Keyword {
                expected: "ns",
                after: "after the trust domain",
                found: ns_kw.to_owned(),
            });
        }
        if sa_kw != "sa" {
            return Err(PrincipalError::Keyword {
                expected: "sa",
                after: "after the namespace",
                found: sa_kw.to_owned(),
            });
        }
        Principal::new(trust_domain, namespace, service_account)
    }
}

impl TryFrom<&str> for Principal {
    type Error = PrincipalError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Prints the Istio form `<trust-domain>/ns/<namespace>/sa/<service-account>`.
impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl<'de> serde::Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Serializes as the Istio form string.
impl serde::Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<Principal>().unwrap_err().to_string()
    }

    #[test]
    fn istio_and_spiffe_forms_are_equal() {
        let a: Principal = "cluster.local/ns/payments/sa/payment-service"
            .parse()
            .unwrap();
        let b: Principal = "spiffe://cluster.local/ns/payments/sa/payment-service"
            .parse()
            .unwrap();
        let c: Principal = "SPIFFE://cluster.local/ns/payments/sa/payment-service"
            .parse()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.trust_domain(), "cluster.local");
        assert_eq!(a.namespace(), "payments");
        assert_eq!(a.service_account(), "payment-service");
        assert_eq!(
            a.to_string(),
            "cluster.local/ns/payments/sa/payment-service"
        );
        assert_eq!(
            b.to_spiffe(),
            "spiffe://cluster.local/ns/payments/sa/payment-service"
        );
        assert_eq!(b.to_string().parse::<Principal>().unwrap(), b);
        assert_eq!(
            Principal::new("cluster.local", "payments", "payment-service").unwrap(),
            a
        );
    }

    #[test]
    fn trust_domain_allows_underscore_but_no_upper_case() {
        let p: Principal = "my_domain-1.example/ns/a.b-c/sa/x0".parse().unwrap();
        assert_eq!(p.trust_domain(), "my_domain-1.example");
        // SPIFFE trust domains are lowercase: a mixed-case one would never match a policy
        // written in lowercase, so it is refused with the spelling to use.
        assert_eq!(
            err("Cluster.Local/ns/a/sa/b"),
            "trust domain \"Cluster.Local\" has upper-case letters; SPIFFE trust domains \
             are lowercase: write \"cluster.local\""
        );
        assert!(err("spiffe://CLUSTER.local/ns/a/sa/b").contains("\"cluster.local\""));
    }

    #[test]
    fn ordering_is_by_parts() {
        let a: Principal = "a/ns/x/sa/z".parse().unwrap();
        let b: Principal = "a/ns/y/sa/a".parse().unwrap();
        let c: Principal = "b/ns/a/sa/a".parse().unwrap();
        assert!(a < b && b < c);
    }

    #[test]
    fn missing_parts_are_rejected() {
        assert_eq!(
            err(""),
            "empty principal; expected <trust-domain>/ns/<namespace>/sa/<service-account>"
        );
        for s in [
            "cluster.local",
            "cluster.local/ns/payments",
            "cluster.local/ns/payments/sa",
            "spiffe://cluster.local/ns/payments/sa",
            "cluster.local/ns/payments/sa/x/extra",
            "spiffe://",
        ] {
            let e = err(s);
            assert!(
                e.starts_with("expected <trust-domain>/ns/<namespace>/sa/<service-account>"),
                "{s}: {e}"
            );
            assert!(e.contains(&format!("{s:?}")), "{s}: {e}");
        }
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert_eq!(err("/ns/payments/sa/x"), "empty trust domain");
        assert_eq!(err("spiffe:///ns/payments/sa/x"), "empty trust domain");
        assert_eq!(err("cluster.local/ns//sa/x"), "empty namespace");
        assert_eq!(
            err("cluster.local/ns/payments/sa/"),
            "empty service account"
        );
    }

    #[test]
    fn bad_characters_are_rejected() {
        assert_eq!(
            err("cluster.local/ns/Payments/sa/x"),
            "invalid character 'P' in namespace (allowed: a-z 0-9 . -)"
        );
        assert_eq!(
            err("cluster.local/ns/payments/sa/payment_service"),
            "invalid character '_' in service account (allowed: a-z 0-9 . -)"
        );
        assert_eq!(
            err("cluster local/ns/payments/sa/x"),
            "invalid character ' ' in trust domain (allowed: a-z 0-9 . _ -)"
        );
        assert_eq!(
            err("cluster.local/ns/pay\nments/sa/x"),
            "invalid character '\\n' in namespace (allowed: a-z 0-9 . -)"
        );
        // "http://" is not a scheme we know: the colon lands in the trust domain.
        assert_eq!(
            err("http://cluster.local/ns/a/sa/b")
                .split(" (")
                .next()
                .unwrap(),
            "expected <trust-domain>/ns/<namespace>/sa/<service-account>"
        );
        assert_eq!(
            err("http:cluster.local/ns/a/sa/b"),
            "invalid character ':' in trust domain (allowed: a-z 0-9 . _ -)"
        );
    }

    #[test]
    fn wrong_keywords_are_rejected() {
        assert_eq!(
            err("cluster.local/namespace/payments/sa/x"),
            "expected \"ns\" after the trust domain, got \"namespace\"; \
             expected <trust-domain>/ns/<namespace>/sa/<service-account>"
        );
        assert_eq!(
            err("cluster.local/ns/payments/serviceaccount/x"),
            "expected \"sa\" after the namespace, got \"serviceaccount\"; \
             expected <trust-domain>/ns/<namespace>/sa/<service-account>"
        );
        assert!(err("cluster.local/NS/payments/sa/x").contains("got \"NS\""));
    }

    #[test]
    fn long_names_are_rejected() {
        let ok = "a".repeat(253);
        assert!(format!("td/ns/{ok}/sa/x").parse::<Principal>().is_ok());
        let long = "a".repeat(254);
        assert_eq!(
            err(&format!("td/ns/x/sa/{long}")),
            "service account is 254 characters long; the maximum is 253"
        );
    }

    #[test]
    fn serde_round_trip() {
        #[derive(serde::Deserialize)]
        struct T {
            p: Principal,
        }
        let t: T = toml::from_str("p = \"spiffe://td/ns/a/sa/b\"").unwrap();
        assert_eq!(t.p.to_string(), "td/ns/a/sa/b");
        let e = toml::from_str::<T>("p = \"td/ns/a\"").err().unwrap();
        assert!(e.message().starts_with("expected <trust-domain>"), "{e}");
    }
}
