//! Validation of single values and tables of node and peer files: each check names the
//! key and the line of the value it rejects.

use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::cross_checks::IdentityPositions;
use super::schema::{
    RawAdmin, RawInterface, RawKubernetes, RawLocalIdentity, RawNode, RawPeerIdentity, RawPolicy,
    RawUapi,
};
use super::{
    InterfaceConfig, KeyRotation, KubernetesConfig, LocalIdentityConfig, OperationsConfig,
    PeerIdentityConfig, PolicyConfig, Scheduling, DEFAULT_MTU, DEFAULT_QUEUE_LENGTH,
    DEFAULT_REALTIME_SHARE_PERCENT, DEFAULT_STATE_DIR, DEFAULT_TRUST_DOMAIN,
    MAX_INTERFACE_NAME_LEN, MAX_MTU, MAX_QUEUE_LENGTH, MAX_WORKERS, MIN_MTU, MIN_QUEUE_LENGTH,
};
use crate::file_error::{FileError, TomlFile};
use crate::identity::{load_private_key_file, Principal, PublicKey};
use crate::policy;

pub(super) fn check_name(
    src: &TomlFile,
    key: &str,
    v: &Spanned<String>,
) -> Result<String, FileError> {
    let s = v.get_ref();
    if s.trim().is_empty() {
        return Err(src.error_at(key, v.span(), "must not be empty"));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(src.error_at(
            key,
            v.span(),
            format!("invalid character '{}'", c.escape_debug()),
        ));
    }
    Ok(s.clone())
}

pub(super) fn parse_socket_addr(
    src: &TomlFile,
    key: &str,
    v: &Spanned<String>,
    is_endpoint: bool,
) -> Result<SocketAddr, FileError> {
    let s = v.get_ref();
    let addr: SocketAddr = s.parse().map_err(|_| {
        src.error_at(
            key,
            v.span(),
            format!(
                "invalid socket address {s:?}: expected <ip>:<port>, \
                 e.g. 198.18.0.1:51820 or [fd00::1]:51820 (host names are not resolved)"
            ),
        )
    })?;
    if is_endpoint && (addr.port() == 0 || addr.ip().is_unspecified()) {
        return Err(src.error_at(
            key,
            v.span(),
            format!("{addr} cannot be sent to: the endpoint needs a real address and port"),
        ));
    }
    Ok(addr)
}

/// Parses a CIDR. `allow_host_bits` is for interface addresses (`10.10.1.1/24`).
fn parse_cidr(s: &str, allow_host_bits: bool) -> Result<IpNet, String> {
    match s.parse::<IpNet>() {
        Ok(net) => {
            if !allow_host_bits && net.addr() != net.network() {
                Err(format!(
                    "{net} has host bits set; did you mean {}?",
                    net.trunc()
                ))
            } else {
                Ok(net)
            }
        }
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                Err(format!(
                    "invalid CIDR {s:?}: missing prefix length; did you mean {ip}/{len}?"
                ))
            }
            Err(_) => Err(format!(
                "invalid CIDR {s:?}: expected <ip>/<prefix-length>, e.g. 10.10.1.1/32 or \
                 fd00::1/128"
            )),
        },
    }
}

/// Parses a non-empty list of CIDRs at `key` (e.g. `identity[0].addresses`).
pub(super) fn parse_prefix_list(
    src: &TomlFile,
    key: &str,
    list: &[Spanned<String>],
    allow_host_bits: bool,
) -> Result<(Vec<IpNet>, Vec<usize>), FileError> {
    let mut nets = Vec::with_capacity(list.len());
    let mut lines = Vec::with_capacity(list.len());
    for (j, v) in list.iter().enumerate() {
        let net = parse_cidr(v.get_ref(), allow_host_bits)
            .map_err(|reason| src.error_at(format!("{key}[{j}]"), v.span(), &reason))?;
        if let Some(k) = nets.iter().position(|n| *n == net) {
            return Err(src.error_at(
                format!("{key}[{j}]"),
                v.span(),
                format!("duplicate {net}: already listed as {key}[{k}]"),
            ));
        }
        nets.push(net);
        lines.push(src.line(&v.span()));
    }
    Ok((nets, lines))
}

pub(super) fn resolve_path(
    src: &TomlFile,
    base: &Path,
    key: &str,
    v: &Spanned<String>,
) -> Result<PathBuf, FileError> {
    if v.get_ref().is_empty() {
        return Err(src.error_at(key, v.span(), "must not be empty"));
    }
    Ok(base.join(v.get_ref()))
}

/// An integer setting within `range`; out of range, an error naming the range and then
/// `hint`.
pub(super) fn int_in<T>(
    src: &TomlFile,
    key: &str,
    value: &Spanned<i64>,
    range: RangeInclusive<T>,
    hint: &str,
) -> Result<T, FileError>
where
    T: TryFrom<i64> + PartialOrd + std::fmt::Display,
{
    let v = *value.get_ref();
    match T::try_from(v) {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(src.error_at(
            key,
            value.span(),
            format!(
                "{v} is out of range {}..={}{hint}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// `[kubernetes]`: where the cluster is and who this node is in it. Identities, peers
/// and policies then come from the cluster, so the node file must not name them.
pub(super) fn check_kubernetes(
    src: &TomlFile,
    base: &Path,
    k: &RawKubernetes,
    raw: &RawNode,
) -> Result<KubernetesConfig, FileError> {
    if !raw.identity.is_empty() {
        return Err(src.error(
            "identity",
            "in Kubernetes mode the identities come from the pods on the node: remove \
             [[identity]] (or [kubernetes])",
        ));
    }
    if let Some(dir) = &raw.peers_dir {
        return Err(src.error_at(
            "peers_dir",
            dir.span(),
            "in Kubernetes mode the peers come from the other nodes' MeshNodes: remove \
             peers_dir (or [kubernetes])",
        ));
    }
    if let Some(file) = raw.policy.as_ref().and_then(|p| p.files.first()) {
        return Err(src.error_at(
            "policy.files",
            file.span(),
            "in Kubernetes mode the policies come from the cluster's AuthorizationPolicies \
             and PeerAuthentications: remove policy.files",
        ));
    }
    let node_name = match &k.node_name {
        Some(name) => {
            let n = name.get_ref();
            let valid = !n.is_empty()
                && n.len() <= 253
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid {
                return Err(src.error_at(
                    "kubernetes.node_name",
                    name.span(),
                    format!(
                        "{n:?} is not a Kubernetes node name (lowercase letters, digits, '-', '.')"
                    ),
                ));
            }
            Some(n.clone())
        }
        None => None,
    };
    let kubeconfig = match &k.kubeconfig {
        Some(path) => Some(resolve_path(src, base, "kubernetes.kubeconfig", path)?),
        None => None,
    };
    let trust_domain = match &k.trust_domain {
        Some(td) => {
            let probe = format!("{}/ns/x/sa/y", td.get_ref());
            if let Err(e) = probe.parse::<Principal>() {
                return Err(src.error_at("kubernetes.trust_domain", td.span(), e.to_string()));
            }
            td.get_ref().clone()
        }
        None => DEFAULT_TRUST_DOMAIN.to_owned(),
    };
    let state_dir = match &k.state_dir {
        Some(dir) => resolve_path(src, base, "kubernetes.state_dir", dir)?,
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let endpoint = match &k.endpoint {
        Some(e) => Some(parse_socket_addr(src, "kubernetes.endpoint", e, true)?),
        None => None,
    };
    Ok(KubernetesConfig {
        node_name,
        kubeconfig,
        trust_domain,
        state_dir,
        endpoint,
        key_rotation: check_key_rotation(src, k)?,
    })
}

/// `kubernetes.key_lifetime` (a duration such as "30d", or "never") and
/// `kubernetes.key_overlap` (a duration, at least `MIN_KEY_OVERLAP`, shorter than the
/// lifetime).
fn check_key_rotation(src: &TomlFile, k: &RawKubernetes) -> Result<KeyRotation, FileError> {
    const MIN_KEY_OVERLAP: std::time::Duration = std::time::Duration::from_secs(2);
    let duration = |key: &str, text: &Spanned<String>| {
        humantime::parse_duration(text.get_ref()).map_err(|e| {
            src.error_at(
                key,
                text.span(),
                format!(
                    "{:?} is not a duration such as \"30d\" or \"12h\": {e}",
                    text.get_ref()
                ),
            )
        })
    };
    let mut rotation = KeyRotation::default();
    if let Some(text) = &k.key_lifetime {
        rotation.lifetime = match text.get_ref().as_str() {
            "never" => None,
            _ => Some(duration("kubernetes.key_lifetime", text)?),
        };
    }
    if let Some(text) = &k.key_overlap {
        rotation.overlap = duration("kubernetes.key_overlap", text)?;
        if rotation.overlap < MIN_KEY_OVERLAP {
            return Err(src.error_at(
                "kubernetes.key_overlap",
                text.span(),
                "must be at least 2s: the peers need time to read the next key and move to it",
            ));
        }
    }
    if let Some(lifetime) = rotation.lifetime {
        if lifetime <= rotation.overlap {
            let (key, span) = match &k.key_lifetime {
                Some(text) => ("kubernetes.key_lifetime", text.span()),
                None => (
                    "kubernetes.key_overlap",
                    k.key_overlap
                        .as_ref()
                        .expect("only a given overlap can exceed the default")
                        .span(),
                ),
            };
            return Err(src.error_at(
                key,
                span,
                format!(
                    "the key lifetime ({}) must be longer than the overlap ({}), or \"never\"",
                    humantime::format_duration(lifetime),
                    humantime::format_duration(rotation.overlap)
                ),
            ));
        }
    }
    Ok(rotation)
}

/// `[admin]` and `[uapi]`; both may be left out (no metrics listener, sockets in their
/// default directories).
pub(super) fn check_operations(
    src: &TomlFile,
    base: &Path,
    admin: Option<&RawAdmin>,
    uapi: Option<&RawUapi>,
) -> Result<OperationsConfig, FileError> {
    let mut ops = OperationsConfig::default();
    if let Some(admin) = admin {
        if let Some(listen) = &admin.listen {
            ops.admin_listen = Some(parse_socket_addr(src, "admin.listen", listen, false)?);
        }
        if let Some(dir) = &admin.socket_dir {
            ops.control_dir = resolve_path(src, base, "admin.socket_dir", dir)?;
        }
    }
    if let Some(uapi) = uapi {
        if let Some(dir) = &uapi.directory {
            ops.uapi_dir = Some(resolve_path(src, base, "uapi.directory", dir)?);
        }
        if uapi.enabled == Some(false) {
            ops.uapi_dir = None;
        }
        ops.uapi_private_key = uapi.private_key.unwrap_or(true);
    }
    Ok(ops)
}

pub(super) fn check_policy(
    src: &TomlFile,
    base: &Path,
    raw: Option<&RawPolicy>,
) -> Result<PolicyConfig, FileError> {
    let mut policy = PolicyConfig::default();
    let Some(raw) = raw else {
        return Ok(policy);
    };
    for (i, file) in raw.files.iter().enumerate() {
        let key = format!("policy.files[{i}]");
        let path = resolve_path(src, base, &key, file)?;
        if let Err(reason) = policy::FileKind::of(&path) {
            return Err(src.error_at(key, file.span(), reason));
        }
        policy.files.push(path);
    }
    if let Some(default) = &raw.default {
        policy.default = default
            .get_ref()
            .parse()
            .map_err(|reason: String| src.error_at("policy.default", default.span(), &reason))?;
    }
    if let Some(root) = &raw.root_namespace {
        policy::validate_namespace(root.get_ref())
            .map_err(|reason| src.error_at("policy.root_namespace", root.span(), &reason))?;
        policy.root_namespace = root.get_ref().clone();
    }
    Ok(policy)
}

pub(super) fn check_interface(
    src: &TomlFile,
    raw: &RawInterface,
) -> Result<(InterfaceConfig, Option<Range<usize>>), FileError> {
    let name = raw.name.get_ref();
    let bad = |reason: &str| src.error_at("interface.name", raw.name.span(), reason);
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(bad(&format!(
            "{name:?} is {} bytes long; interface names are at most {MAX_INTERFACE_NAME_LEN} \
             bytes",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad(&format!(
            "invalid character '{}' in {name:?} (allowed: A-Z a-z 0-9 _ . -)",
            c.escape_debug()
        )));
    }
    if name == "." || name == ".." {
        return Err(bad(&format!("{name:?} is not a valid interface name")));
    }

    let mtu = match &raw.mtu {
        None => DEFAULT_MTU,
        Some(m) => int_in(src, "interface.mtu", m, MIN_MTU..=MAX_MTU, "")?,
    };
    let (addresses, _) = parse_prefix_list(src, "interface.addresses", &raw.addresses, true)?;
    let workers = match &raw.workers {
        None => None,
        Some(w) => Some(int_in(src, "interface.workers", w, 1..=MAX_WORKERS, "")?),
    };
    let queue_length = match &raw.queue_length {
        None => DEFAULT_QUEUE_LENGTH,
        Some(q) => int_in(
            src,
            "interface.queue_length",
            q,
            MIN_QUEUE_LENGTH..=MAX_QUEUE_LENGTH,
            "",
        )?,
    };
    let scheduling = match &raw.scheduling {
        None => Scheduling::Realtime,
        Some(s) => s
            .get_ref()
            .parse()
            .map_err(|reason: String| src.error_at("interface.scheduling", s.span(), &reason))?,
    };
    let realtime_share_percent = match &raw.realtime_share_percent {
        None => DEFAULT_REALTIME_SHARE_PERCENT,
        Some(p) => int_in(
            src,
            "interface.realtime_share_percent",
            p,
            1..=100,
            " (percent of one core)",
        )?,
    };
    let cfg = InterfaceConfig {
        name: name.clone(),
        mtu,
        addresses,
        offload: raw.offload.unwrap_or(true),
        udp_coalescing: raw.udp_coalescing.unwrap_or(true),
        workers,
        queue_length,
        scheduling,
        realtime_share_percent,
    };
    Ok((cfg, raw.mtu.as_ref().map(|m| m.span())))
}

fn check_principal(src: &TomlFile, key: &str, v: &Spanned<String>) -> Result<Principal, FileError> {
    v.get_ref()
        .parse()
        .map_err(|e: crate::identity::PrincipalError| {
            src.error_at(key, v.span(), format!("invalid principal: {e}"))
        })
}

pub(super) fn check_local_identity(
    src: &TomlFile,
    base: &Path,
    i: usize,
    raw: &RawLocalIdentity,
) -> Result<(LocalIdentityConfig, IdentityPositions), FileError> {
    let principal = check_principal(src, &format!("identity[{i}].principal"), &raw.principal)?;
    let key = format!("identity[{i}].private_key_file");
    let private_key_file = resolve_path(src, base, &key, &raw.private_key_file)?;
    let private_key = load_private_key_file(&private_key_file)
        .map_err(|e| src.error_at(&key, raw.private_key_file.span(), e.to_string()))?;
    let public_key = private_key.public_key();
    let next_key = match &raw.next_private_key_file {
        None => None,
        Some(file) => {
            let key = format!("identity[{i}].next_private_key_file");
            let path = resolve_path(src, base, &key, file)?;
            let private = load_private_key_file(&path)
                .map_err(|e| src.error_at(&key, file.span(), e.to_string()))?;
            let public = private.public_key();
            if public == public_key {
                return Err(src.error_at(
                    &key,
                    file.span(),
                    "the next key is the current key; give the identity a new key to rotate to",
                ));
            }
            Some((path, private, public))
        }
    };
    let addr_key = format!("identity[{i}].addresses");
    if raw.addresses.is_empty() {
        return Err(src.error(
            addr_key,
            format!(
                "{principal} needs at least one address (the pod IPs or CIDRs on this node \
                 that carry it)"
            ),
        ));
    }
    let (addresses, prefix_lines) = parse_prefix_list(src, &addr_key, &raw.addresses, false)?;
    let id = LocalIdentityConfig {
        principal,
        private_key_file,
        private_key,
        public_key,
        next_key,
        addresses,
        labels: raw.labels.clone(),
    };
    let pos = IdentityPositions {
        key_line: src.line(&raw.private_key_file.span()),
        next_key_line: raw
            .next_private_key_file
            .as_ref()
            .map(|f| src.line(&f.span())),
        prefix_lines,
    };
    Ok((id, pos))
}

pub(super) fn check_peer_identity(
    src: &TomlFile,
    i: usize,
    raw: &RawPeerIdentity,
) -> Result<(PeerIdentityConfig, IdentityPositions), FileError> {
    let principal = check_principal(src, &format!("identity[{i}].principal"), &raw.principal)?;
    let public_key = PublicKey::from_base64(raw.public_key.get_ref()).map_err(|e| {
        src.error_at(
            format!("identity[{i}].public_key"),
            raw.public_key.span(),
            format!("invalid public key: {e}"),
        )
    })?;
    let next_public_key = match &raw.next_public_key {
        None => None,
        Some(next) => {
            let key = format!("identity[{i}].next_public_key");
            let parsed = PublicKey::from_base64(next.get_ref())
                .map_err(|e| src.error_at(&key, next.span(), format!("invalid public key: {e}")))?;
            if parsed == public_key {
                return Err(src.error_at(
                    &key,
                    next.span(),
                    "the next key is the current key; list the key the identity rotates to",
                ));
            }
            Some(parsed)
        }
    };
    let ips_key = format!("identity[{i}].allowed_ips");
    if raw.allowed_ips.is_empty() {
        return Err(src.error(
            ips_key,
            format!(
                "{principal} needs at least one allowed IP (the pod IPs or CIDRs of this \
                 identity on that node)"
            ),
        ));
    }
    let (allowed_ips, prefix_lines) = parse_prefix_list(src, &ips_key, &raw.allowed_ips, false)?;
    let id = PeerIdentityConfig {
        principal,
        public_key,
        next_public_key,
        allowed_ips,
    };
    let pos = IdentityPositions {
        key_line: src.line(&raw.public_key.span()),
        next_key_line: raw.next_public_key.as_ref().map(|k| src.line(&k.span())),
        prefix_lines,
    };
    Ok((id, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_messages() {
        assert_eq!(
            parse_cidr("10.0.0.1/24", false).unwrap_err(),
            "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?"
        );
        assert!(parse_cidr("10.0.0.1/24", true).is_ok());
        assert_eq!(
            parse_cidr("10.0.0.1", false).unwrap_err(),
            "invalid CIDR \"10.0.0.1\": missing prefix length; did you mean 10.0.0.1/32?"
        );
        assert!(parse_cidr("fd00::1/129", false)
            .unwrap_err()
            .starts_with("invalid CIDR \"fd00::1/129\": expected <ip>/<prefix-length>"));
    }
}
