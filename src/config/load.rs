//! Reading and validating node and peer files.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::schema::{RawInterface, RawLocalIdentity, RawNode, RawPeer, RawPeerIdentity, RawPolicy};
use super::{
    ConfigError, InterfaceConfig, LocalIdentityConfig, NodeConfig, PeerConfig, PeerIdentityConfig,
    PolicyConfig, DEFAULT_MTU, DEFAULT_QUEUE_LENGTH, MAX_INTERFACE_NAME_LEN, MAX_MTU,
    MAX_QUEUE_LENGTH, MAX_WORKERS, MIN_MTU, MIN_MTU_IPV6, MIN_QUEUE_LENGTH,
};
use crate::identity::{load_private_key_file, Principal, PublicKey};
use crate::policy;

/// One file being validated: its path and text, to turn spans into line numbers.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// 1-based line and column of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        super::error::line_col(self.text, offset)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.line_col(span.start).0
    }

    /// An error about `key`, with no position.
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, key, reason)
    }

    /// An error about `key`, whose value is at `span`.
    fn err_at(&self, key: impl Into<String>, span: Range<usize>, reason: &str) -> ConfigError {
        ConfigError::new(
            self.path,
            key,
            format!("line {}: {reason}", self.line(&span)),
        )
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let key = match e.span() {
                Some(span) => {
                    let (line, col) = self.line_col(span.start);
                    format!("line {line}, column {col}")
                }
                None => String::new(),
            };
            self.err(key, e.message().trim_end())
        })
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "", format!("cannot read file: {e}")))
}

/// Where a prefix or a key was configured, for messages that name both sides.
struct Origin<'a> {
    file: &'a Path,
    key: String,
    line: usize,
    principal: &'a Principal,
}

impl Origin<'_> {
    fn describe(&self, from: &Path) -> String {
        if self.file == from {
            format!("{} ({}, line {})", self.key, self.principal, self.line)
        } else {
            format!(
                "{} ({}) in {}, line {}",
                self.key,
                self.principal,
                self.file.display(),
                self.line
            )
        }
    }

    fn err(&self, reason: String) -> ConfigError {
        ConfigError::new(
            self.file,
            self.key.clone(),
            format!("line {}: {reason}", self.line),
        )
    }
}

/// Where each value of a validated file came from, kept for cross-file checks.
#[derive(Default)]
struct Positions {
    /// Per identity, in file order.
    identities: Vec<IdentityPositions>,
}

struct IdentityPositions {
    /// Line of `private_key_file` (local) or `public_key` (peer).
    key_line: usize,
    /// Line of each entry of `addresses` (local) or `allowed_ips` (peer).
    prefix_lines: Vec<usize>,
}

/// Reads and validates a node file and all its peer files.
///
/// Relative paths in the node file (`peers_dir`, `private_key_file`) are resolved against
/// the node file's directory. Peer files are the `*.toml` files of `peers_dir` (names
/// starting with `.` are skipped, as a shell glob would), read in file name order; other
/// files are ignored. A missing peers directory is an error; an empty one is not.
///
/// Checks, each reported with file, key and reason:
/// - TOML syntax, types and unknown keys (every table denies unknown fields);
/// - principals, public keys, socket addresses and CIDRs are well formed; identity
///   addresses and allowed IPs have no host bits set;
/// - private key files exist, are readable, hold one base64 key and are not accessible by
///   group or others;
/// - at least one local identity; each identity has at least one address / allowed IP;
///   each peer file has at least one identity;
/// - no duplicate local principals, no duplicate principal within one peer file, no
///   duplicate peer names;
/// - no public key used twice anywhere (local or peer);
/// - no two prefixes overlap among all local identity addresses and all peer allowed IPs;
/// - interface name is 1..=15 bytes of `[A-Za-z0-9_.-]`; mtu is in 576..=9000, and at
///   least 1280 when any interface address, identity address or allowed IP is IPv6;
///   `persistent_keepalive` is in 1..=65535.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let text = read_file(path)?;
    let src = Source { path, text: &text };
    let raw: RawNode = src.parse()?;
    let base = path.parent().unwrap_or(Path::new(""));

    let name = check_name(&src, "name", &raw.name)?;
    let listen = parse_socket_addr(&src, "listen", &raw.listen, false)?;
    let (interface, mtu_span) = check_interface(&src, &raw.interface)?;
    let peers_dir = resolve_path(&src, base, "peers_dir", &raw.peers_dir)?;

    if raw.identity.is_empty() {
        return Err(src.err(
            "identity",
            "no identities: add at least one [[identity]] with principal, private_key_file \
             and addresses",
        ));
    }
    let mut identities = Vec::with_capacity(raw.identity.len());
    let mut positions = Positions::default();
    let mut principals: HashMap<Principal, usize> = HashMap::new();
    for (i, rid) in raw.identity.iter().enumerate() {
        let (id, pos) = check_local_identity(&src, base, i, rid)?;
        if let Some(first) = principals.insert(id.principal.clone(), i) {
            return Err(src.err_at(
                format!("identity[{i}].principal"),
                rid.principal.span(),
                &format!(
                    "duplicate principal {}: already used by identity[{first}]",
                    id.principal
                ),
            ));
        }
        identities.push(id);
        positions.identities.push(pos);
    }

    let policy = check_policy(&src, base, raw.policy.as_ref())?;
    let peer_files = list_peer_files(&src, &peers_dir)?;
    let mut peers = Vec::with_capacity(peer_files.len());
    let mut peer_positions = Vec::with_capacity(peer_files.len());
    for file in peer_files {
        let (peer, pos) = load_peer(&file)?;
        peers.push(peer);
        peer_positions.push(pos);
    }

    let cfg = NodeConfig {
        path: path.to_path_buf(),
        name,
        listen,
        interface,
        peers_dir,
        identities,
        peers,
        policy,
    };
    check_cross(&cfg, &positions, &peer_positions)?;
    check_mtu_ipv6(&src, &cfg, mtu_span)?;
    Ok(cfg)
}

/// Reads and validates one peer file on its own (no checks against other files).
pub fn load_peer_file(path: &Path) -> Result<PeerConfig, ConfigError> {
    load_peer(path).map(|(peer, _)| peer)
}

fn load_peer(path: &Path) -> Result<(PeerConfig, Positions), ConfigError> {
    let text = read_file(path)?;
    let src = Source { path, text: &text };
    let raw: RawPeer = src.parse()?;

    let name = check_name(&src, "name", &raw.name)?;
    let endpoint = match &raw.endpoint {
        Some(e) => Some(parse_socket_addr(&src, "endpoint", e, true)?),
        None => None,
    };
    let persistent_keepalive = match &raw.persistent_keepalive {
        Some(k) => Some(int_in(
            &src,
            "persistent_keepalive",
            k,
            1..=u16::MAX,
            " (seconds); leave the key out to disable keepalives",
        )?),
        None => None,
    };
    if raw.identity.is_empty() {
        return Err(src.err(
            "identity",
            "no identities: add at least one [[identity]] with principal, public_key and \
             allowed_ips",
        ));
    }
    let mut identities = Vec::with_capacity(raw.identity.len());
    let mut positions = Positions::default();
    let mut principals: HashMap<Principal, usize> = HashMap::new();
    for (i, rid) in raw.identity.iter().enumerate() {
        let (id, pos) = check_peer_identity(&src, i, rid)?;
        if let Some(first) = principals.insert(id.principal.clone(), i) {
            return Err(src.err_at(
                format!("identity[{i}].principal"),
                rid.principal.span(),
                &format!(
                    "duplicate principal {} in this peer file: already used by identity[{first}]",
                    id.principal
                ),
            ));
        }
        identities.push(id);
        positions.identities.push(pos);
    }
    let peer = PeerConfig {
        path: path.to_path_buf(),
        name,
        endpoint,
        persistent_keepalive,
        identities,
    };
    Ok((peer, positions))
}

fn check_name(src: &Source, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if s.trim().is_empty() {
        return Err(src.err_at(key, v.span(), "must not be empty"));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(src.err_at(
            key,
            v.span(),
            &format!("invalid character '{}'", c.escape_debug()),
        ));
    }
    Ok(s.clone())
}

fn parse_socket_addr(
    src: &Source,
    key: &str,
    v: &Spanned<String>,
    is_endpoint: bool,
) -> Result<SocketAddr, ConfigError> {
    let s = v.get_ref();
    let addr: SocketAddr = s.parse().map_err(|_| {
        src.err_at(
            key,
            v.span(),
            &format!(
                "invalid socket address {s:?}: expected <ip>:<port>, \
                 e.g. 198.18.0.1:51820 or [fd00::1]:51820 (host names are not resolved)"
            ),
        )
    })?;
    if is_endpoint && (addr.port() == 0 || addr.ip().is_unspecified()) {
        return Err(src.err_at(
            key,
            v.span(),
            &format!("{addr} cannot be sent to: the endpoint needs a real address and port"),
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
fn parse_prefix_list(
    src: &Source,
    key: &str,
    list: &[Spanned<String>],
    allow_host_bits: bool,
) -> Result<(Vec<IpNet>, Vec<usize>), ConfigError> {
    let mut nets = Vec::with_capacity(list.len());
    let mut lines = Vec::with_capacity(list.len());
    for (j, v) in list.iter().enumerate() {
        let net = parse_cidr(v.get_ref(), allow_host_bits)
            .map_err(|reason| src.err_at(format!("{key}[{j}]"), v.span(), &reason))?;
        if let Some(k) = nets.iter().position(|n| *n == net) {
            return Err(src.err_at(
                format!("{key}[{j}]"),
                v.span(),
                &format!("duplicate {net}: already listed as {key}[{k}]"),
            ));
        }
        nets.push(net);
        lines.push(src.line(&v.span()));
    }
    Ok((nets, lines))
}

fn resolve_path(
    src: &Source,
    base: &Path,
    key: &str,
    v: &Spanned<String>,
) -> Result<PathBuf, ConfigError> {
    if v.get_ref().is_empty() {
        return Err(src.err_at(key, v.span(), "must not be empty"));
    }
    Ok(base.join(v.get_ref()))
}

/// An integer setting within `range`; out of range, an error naming the range and then
/// `hint`.
fn int_in<T>(
    src: &Source,
    key: &str,
    value: &Spanned<i64>,
    range: RangeInclusive<T>,
    hint: &str,
) -> Result<T, ConfigError>
where
    T: TryFrom<i64> + PartialOrd + std::fmt::Display,
{
    let v = *value.get_ref();
    match T::try_from(v) {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(src.err_at(
            key,
            value.span(),
            &format!(
                "{v} is out of range {}..={}{hint}",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn check_policy(
    src: &Source,
    base: &Path,
    raw: Option<&RawPolicy>,
) -> Result<PolicyConfig, ConfigError> {
    let mut policy = PolicyConfig::default();
    let Some(raw) = raw else {
        return Ok(policy);
    };
    for (i, file) in raw.files.iter().enumerate() {
        let key = format!("policy.files[{i}]");
        let path = resolve_path(src, base, &key, file)?;
        if policy::FileKind::of(&path).is_none() {
            return Err(src.err_at(
                key,
                file.span(),
                "policy files end in .toml (meshguard form) or .yaml/.yml (Istio)",
            ));
        }
        policy.files.push(path);
    }
    if let Some(default) = &raw.default {
        policy.default = default
            .get_ref()
            .parse()
            .map_err(|reason: String| src.err_at("policy.default", default.span(), &reason))?;
    }
    if let Some(root) = &raw.root_namespace {
        policy::validate_namespace(root.get_ref())
            .map_err(|reason| src.err_at("policy.root_namespace", root.span(), &reason))?;
        policy.root_namespace = root.get_ref().clone();
    }
    Ok(policy)
}

fn check_interface(
    src: &Source,
    raw: &RawInterface,
) -> Result<(InterfaceConfig, Option<Range<usize>>), ConfigError> {
    let name = raw.name.get_ref();
    let bad = |reason: &str| src.err_at("interface.name", raw.name.span(), reason);
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
    let cfg = InterfaceConfig {
        name: name.clone(),
        mtu,
        addresses,
        offload: raw.offload.unwrap_or(true),
        workers,
        queue_length,
    };
    Ok((cfg, raw.mtu.as_ref().map(|m| m.span())))
}

fn check_principal(src: &Source, key: &str, v: &Spanned<String>) -> Result<Principal, ConfigError> {
    v.get_ref()
        .parse()
        .map_err(|e: crate::identity::PrincipalError| {
            src.err_at(key, v.span(), &format!("invalid principal: {e}"))
        })
}

fn check_local_identity(
    src: &Source,
    base: &Path,
    i: usize,
    raw: &RawLocalIdentity,
) -> Result<(LocalIdentityConfig, IdentityPositions), ConfigError> {
    let principal = check_principal(src, &format!("identity[{i}].principal"), &raw.principal)?;
    let key = format!("identity[{i}].private_key_file");
    let private_key_file = resolve_path(src, base, &key, &raw.private_key_file)?;
    let private_key = load_private_key_file(&private_key_file)
        .map_err(|e| src.err_at(&key, raw.private_key_file.span(), &e.to_string()))?;
    let public_key = private_key.public_key();
    let addr_key = format!("identity[{i}].addresses");
    if raw.addresses.is_empty() {
        return Err(src.err(
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
        addresses,
        labels: raw.labels.clone(),
    };
    let pos = IdentityPositions {
        key_line: src.line(&raw.private_key_file.span()),
        prefix_lines,
    };
    Ok((id, pos))
}

fn check_peer_identity(
    src: &Source,
    i: usize,
    raw: &RawPeerIdentity,
) -> Result<(PeerIdentityConfig, IdentityPositions), ConfigError> {
    let principal = check_principal(src, &format!("identity[{i}].principal"), &raw.principal)?;
    let public_key = PublicKey::from_base64(raw.public_key.get_ref()).map_err(|e| {
        src.err_at(
            format!("identity[{i}].public_key"),
            raw.public_key.span(),
            &format!("invalid public key: {e}"),
        )
    })?;
    let ips_key = format!("identity[{i}].allowed_ips");
    if raw.allowed_ips.is_empty() {
        return Err(src.err(
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
        allowed_ips,
    };
    let pos = IdentityPositions {
        key_line: src.line(&raw.public_key.span()),
        prefix_lines,
    };
    Ok((id, pos))
}

fn list_peer_files(src: &Source, dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir_err = |e: std::io::Error| {
        src.err(
            "peers_dir",
            format!("cannot read peers directory {}: {e}", dir.display()),
        )
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if name_str.starts_with('.') || !name_str.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links: a link to a peer file counts as a peer file.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(_) => {}
            Err(e) => {
                return Err(ConfigError::new(
                    &path,
                    "",
                    format!("cannot read file: {e}"),
                ))
            }
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Checks across the node file and all peer files: peer names, public keys, overlaps.
fn check_cross(
    cfg: &NodeConfig,
    local_pos: &Positions,
    peer_pos: &[Positions],
) -> Result<(), ConfigError> {
    // Peer names.
    let mut names: HashMap<&str, &Path> = HashMap::new();
    for peer in &cfg.peers {
        if let Some(first) = names.insert(&peer.name, &peer.path) {
            return Err(ConfigError::new(
                &peer.path,
                "name",
                format!(
                    "duplicate peer name {:?}: already used by {}",
                    peer.name,
                    first.display()
                ),
            ));
        }
    }

    // Every identity, local ones first, in load order.
    struct Ident<'a> {
        file: &'a Path,
        principal: &'a Principal,
        public_key: PublicKey,
        key_name: &'static str,
        prefix_name: &'static str,
        nets: &'a [IpNet],
        pos: &'a IdentityPositions,
    }
    let mut idents: Vec<(usize, Ident)> = Vec::new();
    for (i, id) in cfg.identities.iter().enumerate() {
        idents.push((
            i,
            Ident {
                file: &cfg.path,
                principal: &id.principal,
                public_key: id.public_key,
                key_name: "private_key_file",
                prefix_name: "addresses",
                nets: &id.addresses,
                pos: &local_pos.identities[i],
            },
        ));
    }
    for (peer, pos) in cfg.peers.iter().zip(peer_pos) {
        for (i, id) in peer.identities.iter().enumerate() {
            idents.push((
                i,
                Ident {
                    file: &peer.path,
                    principal: &id.principal,
                    public_key: id.public_key,
                    key_name: "public_key",
                    prefix_name: "allowed_ips",
                    nets: &id.allowed_ips,
                    pos: &pos.identities[i],
                },
            ));
        }
    }

    // Public keys.
    let mut keys: HashMap<PublicKey, Origin> = HashMap::new();
    for (i, id) in &idents {
        let origin = Origin {
            file: id.file,
            key: format!("identity[{i}].{}", id.key_name),
            line: id.pos.key_line,
            principal: id.principal,
        };
        match keys.entry(id.public_key) {
            Entry::Occupied(first) => {
                let reason = format!(
                    "public key {} of {} is also used by {}; every identity needs its own key",
                    id.public_key,
                    id.principal,
                    first.get().describe(id.file)
                );
                return Err(origin.err(reason));
            }
            Entry::Vacant(v) => {
                v.insert(origin);
            }
        }
    }

    // Overlapping prefixes.
    let mut prefixes: Vec<(IpNet, Origin)> = Vec::new();
    for (i, id) in &idents {
        for (j, net) in id.nets.iter().enumerate() {
            prefixes.push((
                *net,
                Origin {
                    file: id.file,
                    key: format!("identity[{i}].{}[{j}]", id.prefix_name),
                    line: id.pos.prefix_lines[j],
                    principal: id.principal,
                },
            ));
        }
    }
    let nets: Vec<IpNet> = prefixes.iter().map(|(n, _)| *n).collect();
    if let Some((first, second)) = first_overlap(&nets) {
        let (net, origin) = &prefixes[second];
        let (other_net, other) = &prefixes[first];
        return Err(origin.err(format!(
            "{net} overlaps {other_net} at {}; local identity addresses and peer allowed IPs \
             must not overlap, so that every address belongs to exactly one identity",
            other.describe(origin.file)
        )));
    }
    Ok(())
}

/// Among all overlapping pairs of `nets`, the one found first in list order: the pair
/// `(i, j)`, `i < j`, with the smallest `j` (then the smallest `i`). `O(n log n)`.
fn first_overlap(nets: &[IpNet]) -> Option<(usize, usize)> {
    // Two CIDR prefixes overlap exactly when one contains the other. Sorted by network
    // address, then by prefix length, every prefix comes after all prefixes containing
    // it, and those are exactly the prefixes on a stack of still-open enclosing prefixes.
    let mut order: Vec<usize> = (0..nets.len()).collect();
    order.sort_by_key(|&k| {
        let n = nets[k];
        let (family, addr) = match n.network() {
            IpAddr::V4(a) => (4u8, u128::from(u32::from(a))),
            IpAddr::V6(a) => (6u8, u128::from(a)),
        };
        (family, addr, n.prefix_len(), k)
    });
    let mut best: Option<(usize, usize)> = None;
    let mut stack: Vec<usize> = Vec::new();
    for &k in &order {
        let net = nets[k];
        while let Some(&top) = stack.last() {
            if crate::identity::overlaps(&nets[top], &net) {
                break;
            }
            stack.pop();
        }
        // Everything on the stack contains `net`: the best pair for `net` is with the
        // stack entry that comes first in list order.
        if let Some(&min) = stack.iter().min() {
            let pair = (min.min(k), min.max(k));
            let better = match best {
                None => true,
                Some((bi, bj)) => (pair.1, pair.0) < (bj, bi),
            };
            if better {
                best = Some(pair);
            }
        }
        stack.push(k);
    }
    best
}

fn check_mtu_ipv6(
    src: &Source,
    cfg: &NodeConfig,
    mtu_span: Option<Range<usize>>,
) -> Result<(), ConfigError> {
    if cfg.interface.mtu >= MIN_MTU_IPV6 {
        return Ok(());
    }
    let mut v6: Option<String> = cfg
        .interface
        .addresses
        .iter()
        .position(|n| matches!(n, IpNet::V6(_)))
        .map(|j| format!("interface.addresses[{j}]"));
    for (i, id) in cfg.identities.iter().enumerate() {
        if v6.is_some() {
            break;
        }
        if let Some(j) = id.addresses.iter().position(|n| matches!(n, IpNet::V6(_))) {
            v6 = Some(format!("identity[{i}].addresses[{j}]"));
        }
    }
    for peer in &cfg.peers {
        for (i, id) in peer.identities.iter().enumerate() {
            if v6.is_some() {
                break;
            }
            if let Some(j) = id
                .allowed_ips
                .iter()
                .position(|n| matches!(n, IpNet::V6(_)))
            {
                v6 = Some(format!(
                    "identity[{i}].allowed_ips[{j}] in {}",
                    peer.path.display()
                ));
            }
        }
    }
    let Some(what) = v6 else {
        return Ok(());
    };
    let reason = format!(
        "{} is below {MIN_MTU_IPV6}, the minimum for IPv6, and {what} is IPv6",
        cfg.interface.mtu
    );
    Err(match mtu_span {
        Some(span) => src.err_at("interface.mtu", span, &reason),
        None => src.err("interface.mtu", reason),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn first_overlap_finds_the_earliest_pair() {
        assert_eq!(first_overlap(&nets(&[])), None);
        assert_eq!(
            first_overlap(&nets(&["10.0.0.0/24", "10.0.1.0/24", "fd00::/64"])),
            None
        );
        assert_eq!(
            first_overlap(&nets(&["10.0.0.0/8", "10.1.0.0/16"])),
            Some((0, 1))
        );
        assert_eq!(
            first_overlap(&nets(&["10.1.0.0/16", "10.0.0.0/8"])),
            Some((0, 1))
        );
        // 0.0.0.0/0 (index 2) overlaps both, but (0, 1) is complete first.
        assert_eq!(
            first_overlap(&nets(&["10.1.0.0/16", "10.0.0.0/8", "0.0.0.0/0"])),
            Some((0, 1))
        );
        assert_eq!(
            first_overlap(&nets(&[
                "0.0.0.0/0",
                "192.0.2.0/24",
                "10.1.0.0/16",
                "10.0.0.0/8"
            ])),
            Some((0, 1))
        );
        assert_eq!(
            first_overlap(&nets(&[
                "10.0.0.0/24",
                "fd00::/64",
                "10.0.1.0/24",
                "fd00::1/128"
            ])),
            Some((1, 3))
        );
        // Same prefix twice.
        assert_eq!(
            first_overlap(&nets(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.1/32"])),
            Some((0, 2))
        );
        // Brute force on a small mixed set.
        let all = nets(&[
            "10.0.0.0/8",
            "10.1.2.0/24",
            "10.1.0.0/16",
            "192.0.2.0/24",
            "10.2.0.0/16",
            "fd00::/8",
            "10.1.2.3/32",
            "fd00:1::/32",
            "0.0.0.0/0",
        ]);
        for start in 0..all.len() {
            for end in start..=all.len() {
                let s = &all[start..end];
                let mut want = None;
                'outer: for j in 0..s.len() {
                    for i in 0..j {
                        if crate::identity::overlaps(&s[i], &s[j]) {
                            want = Some((i, j));
                            break 'outer;
                        }
                    }
                }
                assert_eq!(first_overlap(s), want, "{s:?}");
            }
        }
    }

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
