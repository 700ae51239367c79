//! `meshguard policy check`: explain the allow-list decision for one flow, from the
//! configuration alone (no running daemon).

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::NodeConfig;
use crate::identity::{LocalId, PeerId, Principal, PrincipalError};
use crate::policy::{Evaluator, PolicySet, Protocol, Request, Target};

#[derive(Debug, thiserror::Error)]
pub(super) enum CheckError {
    #[error("--from {0:?}: {1}")]
    From(String, PrincipalError),
    #[error("--to {0:?}: no local identity has this principal or address")]
    To(String),
}

/// The decision for a flow from `from` (any principal) to the local identity named or
/// addressed by `to`, with the policy and rule behind it.
pub(super) fn explain(
    config: &NodeConfig,
    policy: &PolicySet,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: Option<u16>,
    source_ip: Option<IpAddr>,
) -> Result<String, CheckError> {
    let source: Principal = from
        .parse()
        .map_err(|e| CheckError::From(from.to_owned(), e))?;
    let locals = &config.identities;
    // `--to ADDRESS` also gives the destination address (`when: destination.ip`).
    let destination_ip = to.parse::<IpAddr>().ok();
    let local = match (to.parse::<Principal>(), destination_ip) {
        (Ok(principal), _) => locals.iter().position(|l| l.principal == principal),
        (Err(_), Some(address)) => locals
            .iter()
            .position(|l| l.addresses.iter().any(|net| net.contains(&address))),
        (Err(_), None) => None,
    }
    .ok_or_else(|| CheckError::To(to.to_owned()))?;
    // Compiled as the daemon compiles it: for these local identities and peers.
    let targets: Vec<Target> = locals
        .iter()
        .map(|l| Target {
            principal: &l.principal,
            labels: &l.labels,
        })
        .collect();
    let peers: Vec<(&Principal, &str)> = config
        .peers
        .iter()
        .flat_map(|node| {
            node.identities
                .iter()
                .map(|identity| (&identity.principal, node.name.as_str()))
        })
        .collect();
    let peer_principals: Vec<&Principal> = peers.iter().map(|(p, _)| *p).collect();
    let evaluator = Evaluator::new(
        policy,
        config.policy.default,
        &config.policy.root_namespace,
        &targets,
        &peer_principals,
    );
    let request = Request {
        source_ip,
        destination_ip,
        protocol,
        port,
    };
    let peer = peers.iter().position(|(p, _)| **p == source);
    let decision = match peer {
        Some(peer) => evaluator.evaluate(LocalId::new(local), PeerId::new(peer), &request),
        None => evaluator.evaluate_principal(LocalId::new(local), &source, &request),
    };

    let mut out = String::new();
    let verdict = if decision.allowed { "allow" } else { "deny" };
    let _ = writeln!(out, "decision: {verdict}");
    let _ = writeln!(out, "because:  {}", decision.explain());
    let origin = match peer {
        Some(peer) => format!("peer identity on node {}", peers[peer].1),
        None => "not a configured peer: no tunnel can carry its packets today".to_owned(),
    };
    let _ = writeln!(out, "from:     {source} ({origin})");
    let _ = writeln!(
        out,
        "to:       {} (local identity)",
        locals[local].principal
    );
    let port = port.map_or_else(String::new, |p| format!(" port {p}"));
    let address =
        |ip: Option<IpAddr>| ip.map_or_else(|| "(none given)".to_owned(), |ip| ip.to_string());
    let _ = write!(
        out,
        "request:  {protocol}{port}, source address {}, destination address {}",
        address(source_ip),
        address(destination_ip)
    );
    Ok(out)
}
