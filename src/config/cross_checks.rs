//! Checks across the node file and all its peer files: peer names, public keys used
//! twice, overlapping prefixes, and the MTU that IPv6 needs.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;

use ipnet::IpNet;

use super::{NodeConfig, MIN_MTU_IPV6};
use crate::file_error::{FileError, TomlFile};
use crate::identity::{Principal, PublicKey};

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

    fn err(&self, reason: String) -> FileError {
        FileError::new(
            self.file,
            self.key.clone(),
            format!("line {}: {reason}", self.line),
        )
    }
}

/// Where each value of a validated file came from, kept for cross-file checks.
#[derive(Default)]
pub(super) struct Positions {
    /// Per identity, in file order.
    pub identities: Vec<IdentityPositions>,
}

pub(super) struct IdentityPositions {
    /// Line of `private_key_file` (local) or `public_key` (peer).
    pub key_line: usize,
    /// Line of `next_private_key_file` (local) or `next_public_key` (peer), if there is one.
    pub next_key_line: Option<usize>,
    /// Line of each entry of `addresses` (local) or `allowed_ips` (peer).
    pub prefix_lines: Vec<usize>,
}

/// Checks across the node file and all peer files: peer names, public keys, overlaps.
pub(super) fn check_cross(
    cfg: &NodeConfig,
    local_pos: &Positions,
    peer_pos: &[Positions],
) -> Result<(), FileError> {
    // Peer names.
    let mut names: HashMap<&str, &Path> = HashMap::new();
    for peer in &cfg.peers {
        if let Some(first) = names.insert(&peer.name, &peer.path) {
            return Err(FileError::new(
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
        /// Each public key with the key that names it and its line.
        keys: Vec<(PublicKey, &'static str, usize)>,
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
                keys: [(
                    id.public_key,
                    "private_key_file",
                    local_pos.identities[i].key_line,
                )]
                .into_iter()
                .chain(id.next_key.as_ref().map(|(_, _, public)| {
                    let line = local_pos.identities[i].next_key_line.unwrap_or(0);
                    (*public, "next_private_key_file", line)
                }))
                .collect(),
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
                    keys: [(id.public_key, "public_key", pos.identities[i].key_line)]
                        .into_iter()
                        .chain(id.next_public_key.map(|next| {
                            let line = pos.identities[i].next_key_line.unwrap_or(0);
                            (next, "next_public_key", line)
                        }))
                        .collect(),
                    prefix_name: "allowed_ips",
                    nets: &id.allowed_ips,
                    pos: &pos.identities[i],
                },
            ));
        }
    }

    // Public keys, current and next.
    let mut keys: HashMap<PublicKey, Origin> = HashMap::new();
    for (i, id) in &idents {
        for &(public_key, key_name, line) in &id.keys {
            let origin = Origin {
                file: id.file,
                key: format!("identity[{i}].{key_name}"),
                line,
                principal: id.principal,
            };
            match keys.entry(public_key) {
                Entry::Occupied(first) => {
                    let reason = format!(
                        "public key {public_key} of {} is also used by {}; every identity \
                         needs its own key",
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
    }

    // One identity per principal on this node, and in each peer file: a principal
    // names one identity there, whatever keys it rotates through.
    let mut principals: HashMap<(&Path, &Principal), usize> = HashMap::new();
    for (i, id) in &idents {
        if let Some(first) = principals.insert((id.file, id.principal), *i) {
            return Err(FileError::new(
                id.file,
                format!("identity[{i}].principal"),
                format!(
                    "{} is already identity[{first}] of this file; one identity per principal",
                    id.principal
                ),
            ));
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

pub(super) fn check_mtu_ipv6(
    src: &TomlFile,
    cfg: &NodeConfig,
    mtu_span: Option<Range<usize>>,
) -> Result<(), FileError> {
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
        Some(span) => src.error_at("interface.mtu", span, &reason),
        None => src.error("interface.mtu", reason),
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
}
