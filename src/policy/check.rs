//! `meshguard policy check`: explain the decision for one flow, from the configuration
//! alone (no running daemon).

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{Evaluator, PolicySet, Protocol, Request, Target};
use crate::config::NodeConfig;
use crate::identity::Principal;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("--from {0:?}: {1}")]
    From(String, String),
    #[error("--to {0:?}: no local identity has this principal or address")]
    To(String),
}

/// The decision for a flow from `from` (any principal) to the local identity named or
/// addressed by `to`, with the policy and rule behind it.
pub fn explain(
    config: &NodeConfig,
    policy: &PolicySet,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: Option<u16>,
    source_ip: Option<IpAddr>,
) -> Result<String, CheckError> {
    let source: Principal = from.parse().map_err(|e: crate::identity::PrincipalError| {
        CheckError::From(from.to_owned(), e.to_string())
    })?;
    let local = match to.parse::<Principal>() {
        Ok(principal) => config
            .identities
            .iter()
            .position(|i| i.principal == principal),
        Err(_) => to.parse::<IpAddr>().ok().and_then(|address| {
            config
                .identities
                .iter()
                .position(|i| i.addresses.iter().any(|net| net.contains(&address)))
        }),
    }
    .ok_or_else(|| CheckError::To(to.to_owned()))?;

    let targets: Vec<Target> = config
        .identities
        .iter()
        .map(|i| Target {
            principal: &i.principal,
            labels: &i.labels,
        })
        .collect();
    let peers: Vec<(&Principal, &str)> = config
        .peers
        .iter()
        .flat_map(|p| {
            p.identities
                .iter()
                .map(move |i| (&i.principal, p.name.as_str()))
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
        protocol,
        port,
    };
    let peer = peers.iter().position(|(p, _)| **p == source);
    let decision = match peer {
        Some(peer) => evaluator.evaluate(local, peer, &request),
        None => evaluator.evaluate_principal(local, &source, &request),
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
        config.identities[local].principal
    );
    let port = port.map_or_else(String::new, |p| format!(" port {p}"));
    let source_ip = source_ip.map_or_else(|| "(none given)".to_owned(), |ip| ip.to_string());
    let _ = write!(
        out,
        "request:  {protocol}{port}, source address {source_ip}"
    );
    Ok(out)
}
