//! Interface addresses and routes, set with iproute2's `ip` command.
//!
//! tun-rs creates the device and sets its MTU and state; addresses beyond the first and
//! routes are not its job, and `ip` is present wherever a TUN-based daemon runs.

use std::process::Command;

use ipnet::IpNet;

#[derive(Debug, thiserror::Error)]
#[error("`ip {args}` failed: {reason}")]
pub(crate) struct NetconfError {
    args: String,
    reason: String,
}

fn ip(args: &[&str]) -> Result<(), NetconfError> {
    let joined = args.join(" ");
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetconfError {
            args: joined.clone(),
            reason: format!("cannot run ip: {e}"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetconfError {
            args: joined,
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

pub(crate) fn add_address(interface: &str, address: &IpNet) -> Result<(), NetconfError> {
    ip(&["address", "add", &address.to_string(), "dev", interface])
}

/// Routes `net` through `interface`, replacing any route for exactly that prefix.
pub(crate) fn add_route(interface: &str, net: &IpNet) -> Result<(), NetconfError> {
    ip(&["route", "replace", &net.to_string(), "dev", interface])
}

pub(crate) fn remove_address(interface: &str, address: &IpNet) -> Result<(), NetconfError> {
    ip(&["address", "del", &address.to_string(), "dev", interface])
}

pub(crate) fn remove_route(interface: &str, net: &IpNet) -> Result<(), NetconfError> {
    ip(&["route", "del", &net.to_string(), "dev", interface])
}
