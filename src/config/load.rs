//! Loading a node file and its peer files: reads each file, validates it field by field
//! (`fields`), then checks the files against each other (`cross_checks`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::cross_checks::{check_cross, check_mtu_ipv6, IdentityPositions, Positions};
use super::fields::{
    check_interface, check_kubernetes, check_local_identity, check_name, check_operations,
    check_peer_identity, check_policy, int_in, parse_socket_addr, resolve_path,
};
use super::schema::{RawNode, RawPeer};
use super::{NodeConfig, PeerConfig};
use crate::file_error::{read_to_string, FileError, TomlFile};
use crate::identity::Principal;

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
pub fn load(path: &Path) -> Result<NodeConfig, FileError> {
    let text = read_to_string(path)?;
    let src = TomlFile::new(path, &text);
    let raw: RawNode = src.parse()?;
    let base = path.parent().unwrap_or(Path::new(""));

    let name = check_name(&src, "name", &raw.name)?;
    let listen = parse_socket_addr(&src, "listen", &raw.listen, false)?;
    let (interface, mtu_span) = check_interface(&src, &raw.interface)?;
    let kubernetes = match &raw.kubernetes {
        Some(k) => Some(check_kubernetes(&src, base, k, &raw)?),
        None => None,
    };
    let peers_dir = match (&raw.peers_dir, &kubernetes) {
        (Some(dir), _) => Some(resolve_path(&src, base, "peers_dir", dir)?),
        (None, Some(_)) => None,
        (None, None) => {
            return Err(src.error(
                "peers_dir",
                "missing: name the directory of the peer files (or add [kubernetes])",
            ))
        }
    };

    if raw.identity.is_empty() && kubernetes.is_none() {
        return Err(src.error(
            "identity",
            "no identities: add at least one [[identity]] with principal, private_key_file \
             and addresses",
        ));
    }
    let mut identities = Vec::with_capacity(raw.identity.len());
    let mut positions = Positions::default();
    let mut seen = PrincipalsSeen::new("");
    for (i, rid) in raw.identity.iter().enumerate() {
        let (id, pos) = check_local_identity(&src, base, i, rid)?;
        seen.check(&src, i, &id.principal, rid.principal.span())?;
        identities.push(id);
        positions.identities.push(pos);
    }

    let policy = check_policy(&src, base, raw.policy.as_ref())?;
    let operations = check_operations(&src, base, raw.admin.as_ref(), raw.uapi.as_ref())?;
    let peer_files = match &peers_dir {
        Some(dir) => list_peer_files(&src, dir)?,
        None => Vec::new(),
    };
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
        operations,
        kubernetes,
    };
    check_cross(&cfg, &positions, &peer_positions)?;
    check_mtu_ipv6(&src, &cfg, mtu_span)?;
    Ok(cfg)
}

/// Checks across `cfg`'s identities (public keys used twice, one identity per principal,
/// overlapping prefixes) for a configuration made from something other than files, as
/// Kubernetes mode makes it; errors name the identity's source as the file.
pub fn check_generated(cfg: &NodeConfig) -> Result<(), FileError> {
    let positions = |identities: Vec<(bool, usize)>| Positions {
        identities: identities
            .into_iter()
            .map(|(next, prefixes)| IdentityPositions {
                key_line: 0,
                next_key_line: next.then_some(0),
                prefix_lines: vec![0; prefixes],
            })
            .collect(),
    };
    let local = positions(
        cfg.identities
            .iter()
            .map(|i| (i.next_key.is_some(), i.addresses.len()))
            .collect(),
    );
    let peers: Vec<Positions> = cfg
        .peers
        .iter()
        .map(|p| {
            positions(
                p.identities
                    .iter()
                    .map(|i| (i.next_public_key.is_some(), i.allowed_ips.len()))
                    .collect(),
            )
        })
        .collect();
    check_cross(cfg, &local, &peers)
}

/// Reads and validates one peer file on its own (no checks against other files).
pub fn load_peer_file(path: &Path) -> Result<PeerConfig, FileError> {
    load_peer(path).map(|(peer, _)| peer)
}

fn load_peer(path: &Path) -> Result<(PeerConfig, Positions), FileError> {
    let text = read_to_string(path)?;
    let src = TomlFile::new(path, &text);
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
        return Err(src.error(
            "identity",
            "no identities: add at least one [[identity]] with principal, public_key and \
             allowed_ips",
        ));
    }
    let mut identities = Vec::with_capacity(raw.identity.len());
    let mut positions = Positions::default();
    let mut seen = PrincipalsSeen::new(" in this peer file");
    for (i, rid) in raw.identity.iter().enumerate() {
        let (id, pos) = check_peer_identity(&src, i, rid)?;
        seen.check(&src, i, &id.principal, rid.principal.span())?;
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

fn list_peer_files(src: &TomlFile, dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let dir_err = |e: std::io::Error| {
        src.error(
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
            Err(e) => return Err(FileError::new(&path, "", format!("cannot read file: {e}"))),
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The principals of one file's `[[identity]]` tables so far: each may appear once.
struct PrincipalsSeen {
    first: HashMap<Principal, usize>,
    /// Where "once" holds, for the message: "" (the node file) or " in this peer file".
    scope: &'static str,
}

impl PrincipalsSeen {
    fn new(scope: &'static str) -> Self {
        PrincipalsSeen {
            first: HashMap::new(),
            scope,
        }
    }

    /// Records `identity[i]`'s principal, written at `span`; refuses one seen before.
    fn check(
        &mut self,
        src: &TomlFile,
        i: usize,
        principal: &Principal,
        span: Range<usize>,
    ) -> Result<(), FileError> {
        match self.first.insert(principal.clone(), i) {
            None => Ok(()),
            Some(first) => Err(src.error_at(
                format!("identity[{i}].principal"),
                span,
                format!(
                    "duplicate principal {principal}{}: already used by identity[{first}]",
                    self.scope
                ),
            )),
        }
    }
}
