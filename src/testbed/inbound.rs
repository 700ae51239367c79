//! Counts the packets a device hands to a namespace's kernel, before anything else there
//! looks at them (an nftables counter at the start of prerouting, ahead of fragment
//! reassembly): what a daemon delivered, seen from outside the daemon.

use std::io;

use super::Netns;

pub struct InboundCounter<'a> {
    ns: &'a Netns,
    table: String,
}

impl<'a> InboundCounter<'a> {
    /// Starts counting the packets that enter `ns` through `interface`.
    pub fn new(ns: &'a Netns, interface: &str) -> io::Result<InboundCounter<'a>> {
        let table = format!("observe_{interface}");
        let commands = format!(
            "add table inet {table}; add counter inet {table} delivered; \
             add chain inet {table} prerouting \
             {{ type filter hook prerouting priority -500; policy accept; }}; \
             add rule inet {table} prerouting iifname \"{interface}\" counter name delivered"
        );
        ns.exec_ok("nft", [commands.as_str()])?;
        Ok(InboundCounter { ns, table })
    }

    /// Packets counted so far.
    pub fn count(&self) -> io::Result<u64> {
        let out = self
            .ns
            .exec_ok("nft", ["list", "counter", "inet", &self.table, "delivered"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words
            .find(|w| *w == "packets")
            .and_then(|_| words.next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no packet count in {text:?}")))
    }
}

impl Drop for InboundCounter<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .exec("nft", ["delete", "table", "inet", &self.table]);
    }
}
