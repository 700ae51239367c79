//! `meshguard status`: a running daemon's report, for people.

use std::fmt::Write as _;
use std::time::Duration;

use super::report::DaemonStatus;
use crate::node::{NodeStatus, PairStatus};

/// The report as text; `now` (since the Unix epoch) dates the handshakes.
pub fn render(status: &DaemonStatus, now: Duration) -> String {
    let mut out = String::new();
    let node = &status.node;
    let up = now.as_secs().saturating_sub(status.started_at);
    let _ = writeln!(
        out,
        "node {} (meshguard {}), up {}",
        status.name,
        status.version,
        span(Duration::from_secs(up))
    );
    let priority = if status.realtime {
        format!(
            "real-time priority up to {} % of a core each (over it {} time{})",
            status.realtime_share_percent,
            status.realtime_drops,
            plural(status.realtime_drops)
        )
    } else {
        "normal priority".to_owned()
    };
    let _ = writeln!(
        out,
        "  interface {}, listening on {}, {} worker{} at {priority}",
        status.interface,
        status.listen,
        status.workers,
        plural(status.workers as u64),
    );
    let _ = writeln!(
        out,
        "  flows: {} of {} tracked, {} evicted",
        node.flows.tracked, node.flows.capacity, node.flows.evictions
    );
    let _ = writeln!(
        out,
        "  reloads: {} applied, {} rejected",
        status.reloads.applied, status.reloads.rejected
    );
    let p = &node.protocol;
    let _ = writeln!(
        out,
        "  handshakes: {} completed; datagrams dropped: {} (bad mac1 {}, unknown index {}, \
         replayed {}, forged {}, rate limited {})",
        p.handshakes_completed,
        p.network_drops(),
        p.bad_mac1,
        p.unknown_index,
        p.replayed,
        p.forged,
        p.rate_limited
    );
    let n = &node.node;
    let _ = writeln!(
        out,
        "  packets: {} in, {} out; dropped: {} by the allow list, {} spoofed source, \
         {} without a peer",
        n.packets_in, n.packets_out, n.policy_denied, n.spoofed_source, n.no_peer
    );
    if let Some(k) = &status.kubernetes {
        let _ = writeln!(
            out,
            "  kubernetes: node {}, {} MeshNode publications, {} API errors, {} key rotation steps",
            k.node, k.publications, k.api_errors, k.key_rotation_steps
        );
    }
    let send_errors: u64 = status.send_errors.values().sum();
    if send_errors > 0 || status.tun_write_errors > 0 {
        let _ = writeln!(
            out,
            "  lost in refused writes: {send_errors} datagrams (UDP sends), {} packets (TUN writes)",
            status.tun_write_errors
        );
    }
    if let Some(dropped) = status.plaintext_dropped {
        let _ = writeln!(out, "  plaintext to STRICT identities dropped: {dropped}");
    }
    for (index, identity) in node.identities.iter().enumerate() {
        let socket = match status.uapi_names.get(index) {
            Some(Some(name)) => format!("wg interface {name}"),
            _ => "no wg interface (name too long)".to_string(),
        };
        let _ = writeln!(out, "\nidentity {} ({socket})", identity.principal);
        let keys: Vec<String> = identity
            .public_keys
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(out, "  public key: {}", keys.join(", next: "));
        if !identity.addresses.is_empty() {
            let _ = writeln!(out, "  addresses: {}", join(&identity.addresses));
        }
        for pair in node.pairs.iter().filter(|p| p.local == index) {
            peer_section(&mut out, node, pair, now);
        }
    }
    out
}

fn peer_section(out: &mut String, node: &NodeStatus, pair: &PairStatus, now: Duration) {
    let peer = &node.peers[pair.peer];
    let _ = writeln!(out, "  peer {} on node {}", peer.principal, peer.node);
    let endpoint = pair
        .tunnels
        .iter()
        .find_map(|t| t.endpoint)
        .map_or("(none)".to_string(), |e| e.to_string());
    let _ = writeln!(out, "    endpoint: {endpoint}");
    let _ = writeln!(out, "    allowed ips: {}", join(&peer.allowed_ips));
    let traffic = pair.traffic();
    let handshake = match traffic.last_handshake {
        Some(at) => format!("{} ago", span(now.saturating_sub(at))),
        None => "never".to_string(),
    };
    let _ = writeln!(out, "    latest handshake: {handshake}");
    let _ = writeln!(
        out,
        "    transfer: {} received, {} sent ({} / {} packets)",
        bytes(traffic.rx_bytes),
        bytes(traffic.tx_bytes),
        traffic.rx_packets,
        traffic.tx_packets
    );
    let d = &pair.decisions;
    let _ = writeln!(
        out,
        "    allow list: {} allowed, {} denied, {} audited, {} flows evicted",
        d.allowed, d.denied, d.audited, d.flow_evictions
    );
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".to_string();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `1 h 2 min 3 s`, largest units first, zeros left out.
fn span(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let parts: Vec<String> = [(days, "d"), (hours, "h"), (minutes, "min")]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, unit)| format!("{n} {unit}"))
        .chain(std::iter::once(format!("{seconds} s")))
        .collect();
    parts.join(" ")
}

/// Bytes in binary units, as `wg show` prints them.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_sizes_read_like_wg_show() {
        assert_eq!(span(Duration::from_secs(0)), "0 s");
        assert_eq!(span(Duration::from_secs(3723)), "1 h 2 min 3 s");
        assert_eq!(span(Duration::from_secs(86_400 + 5)), "1 d 5 s");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.00 GiB");
    }
}
