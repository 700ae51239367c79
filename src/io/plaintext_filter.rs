//! STRICT mTLS in the kernel: an nftables table that drops packets addressed to STRICT
//! identities unless they came out of meshguard's TUN device, that is, through a tunnel.
//! The node's own traffic to those addresses (loopback) is let through too, as Istio
//! lets the kubelet's probes through.
//!
//! The table is driven with the `nft` command in the daemon's network namespace, one
//! atomic transaction per change: packets are never let through half-configured rules.
//! It hooks prerouting at raw priority, before connection tracking, so the filter
//! covers addresses on this host and addresses routed on to pods alike.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// Packets the filter dropped, as an nftables named counter.
const COUNTER: &str = "plaintext_dropped";

#[derive(Debug, thiserror::Error)]
pub(crate) enum FilterError {
    #[error(
        "STRICT mTLS needs nftables to drop plaintext, and the `nft` command cannot be run \
         ({0}); install the nftables package, or set the PeerAuthentication mode to \
         PERMISSIVE"
    )]
    NoNft(std::io::Error),
    #[error("nft refused the plaintext filter of table inet {table}: {reason}")]
    Refused { table: String, reason: String },
}

/// The plaintext filter of one meshguard interface. Removed when dropped.
pub(crate) struct PlaintextFilter {
    table: String,
    device: String,
    installed: bool,
}

impl PlaintextFilter {
    /// The filter for the TUN device `device` (not installed yet).
    pub(crate) fn new(device: &str) -> Self {
        // Interface names are [A-Za-z0-9_.-], all valid in an nft identifier.
        PlaintextFilter {
            table: format!("meshguard_{device}"),
            device: device.to_owned(),
            installed: false,
        }
    }

    /// The nftables table this filter owns (family `inet`).
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Makes the filter drop plaintext to exactly `strict`. With none, the table goes
    /// (also one a killed daemon left behind), and a host without nftables is fine. With
    /// some, a missing or failing `nft` is an error and nothing is changed.
    pub(crate) fn apply(&mut self, strict: &[IpNet]) -> Result<(), FilterError> {
        if strict.is_empty() {
            return match nft(&self.table, &self.removal()) {
                Ok(()) => {
                    self.installed = false;
                    Ok(())
                }
                // Nothing of ours was there to remove, as far as we can tell; a host
                // without nftables needs none.
                Err(e) if !self.installed => {
                    tracing::debug!(error = %e, "no plaintext filter to clear");
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        let script = if self.installed {
            self.set_update(strict)
        } else {
            format!("{}{}", self.removal(), self.definition(strict))
        };
        nft(&self.table, &script)?;
        self.installed = true;
        Ok(())
    }

    /// Packets dropped since the table was installed; `None` if not installed or unread.
    pub(crate) fn dropped(&self) -> Option<u64> {
        if !self.installed {
            return None;
        }
        read_dropped(&self.table)
    }

    /// Deletes the table, if it is there.
    pub(crate) fn remove(&mut self) -> Result<(), FilterError> {
        if self.installed {
            nft(&self.table, &self.removal())?;
            self.installed = false;
        }
        Ok(())
    }

    /// Deletes the table whether or not it exists: declaring it first makes the delete
    /// safe.
    fn removal(&self) -> String {
        format!(
            "table inet {t} {{}}\ndelete table inet {t}\n",
            t = self.table
        )
    }

    fn definition(&self, strict: &[IpNet]) -> String {
        let [v4, v6] = elements(strict).map(|e| {
            if e.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {e} }};")
            }
        });
        format!(
            "table inet {table} {{
  counter {COUNTER} {{}}
  set strict4 {{ type ipv4_addr; flags interval; auto-merge;{v4} }}
  set strict6 {{ type ipv6_addr; flags interval; auto-merge;{v6} }}
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname {{ \"{device}\", \"lo\" }} accept
    ip daddr @strict4 counter name {COUNTER} drop
    ip6 daddr @strict6 counter name {COUNTER} drop
  }}
}}
",
            table = self.table,
            device = self.device,
        )
    }

    /// New set contents in one transaction; the counter and chain stay.
    fn set_update(&self, strict: &[IpNet]) -> String {
        let mut script = String::new();
        for (set, elements) in ["strict4", "strict6"].into_iter().zip(elements(strict)) {
            script.push_str(&format!("flush set inet {} {set}\n", self.table));
            if !elements.is_empty() {
                script.push_str(&format!(
                    "add element inet {} {set} {{ {elements} }}\n",
                    self.table
                ));
            }
        }
        script
    }
}

impl Drop for PlaintextFilter {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::error!(error = %e, table = %self.table, "removing the plaintext filter failed");
        }
    }
}

/// The elements of the IPv4 and of the IPv6 set, comma-separated, overlapping prefixes
/// merged.
fn elements(strict: &[IpNet]) -> [String; 2] {
    let merged = IpNet::aggregate(&strict.to_vec());
    [false, true].map(|v6| {
        merged
            .iter()
            .filter(|net| matches!(net.addr(), IpAddr::V6(_)) == v6)
            .map(|net| net.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Runs an nft script on `table` as one transaction.
fn nft(table: &str, script: &str) -> Result<(), FilterError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FilterError::NoNft)?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child.wait_with_output().map_err(FilterError::NoNft)?;
    if output.status.success() && written.is_ok() {
        return Ok(());
    }
    Err(FilterError::Refused {
        table: table.to_owned(),
        reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// The drop counter of `table`; `None` if the table is not there (or `nft` is not).
pub(crate) fn read_dropped(table: &str) -> Option<u64> {
    let output = Command::new("nft")
        .args(["list", "counter", "inet", table, COUNTER])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn sets_split_by_family_and_merge_overlaps() {
        let [v4, v6] = elements(&nets(&["10.1.0.0/16", "10.1.2.3/32", "fd00::1/128"]));
        assert_eq!((v4.as_str(), v6.as_str()), ("10.1.0.0/16", "fd00::1/128"));
        let [v4, v6] = elements(&nets(&["fd00::/64", "10.0.0.1/32", "10.0.0.2/32"]));
        assert_eq!(
            (v4.as_str(), v6.as_str()),
            ("10.0.0.1/32, 10.0.0.2/32", "fd00::/64")
        );
    }

    #[test]
    fn an_update_replaces_both_sets_and_keeps_the_counter() {
        let filter = PlaintextFilter::new("mg0");
        assert_eq!(
            filter.set_update(&nets(&["10.10.1.2/32"])),
            "flush set inet meshguard_mg0 strict4\n\
             add element inet meshguard_mg0 strict4 { 10.10.1.2/32 }\n\
             flush set inet meshguard_mg0 strict6\n"
        );
    }
}
