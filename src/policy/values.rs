//! Parsers of single values that both policy forms share (patterns, names, IP blocks,
//! ports), so that both validate alike. Each returns the reason on failure; callers add
//! the file and the key.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::model::{Pattern, PortMatch};
use crate::identity::Principal;

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

/// A principal value in an Istio document, which Istio compares after putting
/// `spiffe://` in front itself: a value that already has the scheme never matches there,
/// so it is refused rather than read the way the TOML form reads it.
pub(crate) fn parse_istio_principal_pattern(s: &str) -> Result<Pattern, String> {
    if s.len() > SPIFFE_SCHEME.len()
        && s.get(..SPIFFE_SCHEME.len())
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SPIFFE_SCHEME))
    {
        return Err(format!(
            "{s:?} never matches in Istio, which puts spiffe:// in front of every principal \
             value itself; write {:?}",
            &s[SPIFFE_SCHEME.len()..]
        ));
    }
    parse_principal_pattern(s)
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

/// Principals are lowercase throughout (trust domain, namespace, service account), so a
/// pattern with an upper-case letter could never match: it is refused.
fn principal_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')
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
pub(crate) fn validate_selector(selector: &BTreeMap<String, String>) -> Result<(), String> {
    if selector.keys().any(String::is_empty) {
        return Err("empty label name".to_owned());
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
    // Istio's validation: a decimal number from 0 to 65535, no range, no sign.
    let p = s
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse::<u32>().ok())
        .flatten()
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| {
            format!("invalid port {s:?}: Istio ports are single numbers from 0 to 65535")
        })?;
    Ok(PortMatch::Ports {
        tcp: true,
        udp: true,
        first: p,
        last: p,
    })
}
