//! `meshguard policy check`: explain the decision for one flow, from the configuration
//! alone (no running daemon).

use std::fmt::Write as _;
use std::net::IpAddr;

use std::time::{Duration, Instant};

use super::{PolicySet, Protocol, Request};
use crate::config::NodeConfig;
use crate::identity::Principal;
use crate::node::Node;
use crate::proto::DeviceConfig;

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
    // The same compiled allow list the daemon would run, by building the sans-IO node.
    let node = Node::new(
        config,
        policy,
        DeviceConfig::default(),
        Instant::now(),
        Duration::ZERO,
    );
    let local = match to.parse::<Principal>() {
        Ok(principal) => node.locals().iter().position(|l| l.principal == principal),
        Err(_) => to.parse::<IpAddr>().ok().and_then(|address| {
            node.locals()
                .iter()
                .position(|l| l.addresses.iter().any(|net| net.contains(&address)))
        }),
    }
    .ok_or_else(|| CheckError::To(to.to_owned()))?;
    let request = Request {
        source_ip,
        protocol,
        port,
    };
    let peer = node.peers().iter().position(|p| p.principal == source);
    let decision = match peer {
        Some(peer) => node.policy().evaluate(local, peer, &request),
        None => node.policy().evaluate_principal(local, &source, &request),
    };

    let mut out = String::new();
    let verdict = if decision.allowed { "allow" } else { "deny" };
    let _ = writeln!(out, "decision: {verdict}");
    let _ = writeln!(out, "because:  {}", decision.explain());
    let origin = match peer {
        Some(peer) => format!("peer identity on node {}", node.peers()[peer].node),
        None => "not a configured peer: no tunnel can carry its packets today".to_owned(),
    };
    let _ = writeln!(out, "from:     {source} ({origin})");
    let _ = writeln!(
        out,
        "to:       {} (local identity)",
        node.locals()[local].principal
    );
    let port = port.map_or_else(String::new, |p| format!(" port {p}"));
    let source_ip = source_ip.map_or_else(|| "(none given)".to_owned(), |ip| ip.to_string());
    let _ = write!(
        out,
        "request:  {protocol}{port}, source address {source_ip}"
    );
    Ok(out)
}
