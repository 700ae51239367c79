//! Prometheus metrics, encoded from a [`DaemonStatus`] taken at scrape time: the data
//! path keeps its plain counters under the node's lock and pays nothing for metrics.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::report::DaemonStatus;

/// The metrics of `status` in the OpenMetrics text format (what Prometheus asks for).
pub fn encode(status: DaemonStatus) -> String {
    let mut registry = Registry::with_prefix("meshguard");
    registry.register_collector(Box::new(StatusCollector(status)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// The metrics of `status` in Prometheus' older text format (0.0.4), for scrapers that
/// do not ask for OpenMetrics (and `promtool check metrics`).
pub fn encode_prometheus_text(status: DaemonStatus) -> String {
    openmetrics_to_prometheus_text(&encode(status))
}

/// OpenMetrics text as Prometheus text 0.0.4: the two differ, for what is encoded here,
/// only in that a counter family is named without `_total` in OpenMetrics and with it in
/// Prometheus text, and in OpenMetrics' closing `# EOF`.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line says whether the family is a counter.
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let renamed = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {renamed}{text}\n"));
            }
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct StatusCollector(DaemonStatus);

/// One metric family with its samples.
struct Family<'a, 'b> {
    encoder: &'a mut DescriptorEncoder<'b>,
}

impl Family<'_, '_> {
    fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, i64)>,
    ) -> fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        metric.encode(
            self.encoder
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) -> fmt::Result {
        let metric = ConstGauge::new(value);
        metric.encode(
            self.encoder
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let status = &self.0;
        let node = &status.node;
        let mut f = Family {
            encoder: &mut encoder,
        };
        f.gauges(
            "build_info",
            "The running meshguard's version (always 1).",
            [([("version", status.version.as_str())], 1)],
        )?;
        f.gauge(
            "start_time_seconds",
            "When the daemon came up, in seconds since the Unix epoch.",
            saturating_i64(status.started_at),
        )?;
        f.gauge(
            "identities",
            "Local identities configured.",
            node.identities.len() as i64,
        )?;
        f.gauge(
            "peer_identities",
            "Peer identities configured.",
            node.peers.len() as i64,
        )?;

        // Per (local identity, peer identity): the sum over the pair's tunnels.
        let pairs: Vec<_> = node
            .pairs
            .iter()
            .map(|pair| {
                let labels = [
                    ("local", node.identities[pair.local].principal.clone()),
                    ("peer", node.peers[pair.peer].principal.clone()),
                    ("peer_node", node.peers[pair.peer].node.clone()),
                ];
                (labels, pair.traffic(), &pair.decisions)
            })
            .collect();
        f.counters(
            "peer_received_bytes",
            "WireGuard messages received from the peer identity (authenticated), UDP payload bytes.",
            pairs.iter().map(|(l, t, _)| (l.clone(), t.rx_bytes)),
        )?;
        f.counters(
            "peer_sent_bytes",
            "WireGuard messages sent to the peer identity, UDP payload bytes.",
            pairs.iter().map(|(l, t, _)| (l.clone(), t.tx_bytes)),
        )?;
        f.counters(
            "peer_received_packets",
            "Tunnelled packets received from the peer identity (keepalives not counted).",
            pairs.iter().map(|(l, t, _)| (l.clone(), t.rx_packets)),
        )?;
        f.counters(
            "peer_sent_packets",
            "Tunnelled packets sent to the peer identity (keepalives not counted).",
            pairs.iter().map(|(l, t, _)| (l.clone(), t.tx_packets)),
        )?;
        f.gauges(
            "peer_last_handshake_seconds",
            "When the pair's last handshake completed, in seconds since the Unix epoch (absent: never).",
            pairs.iter().filter_map(|(l, t, _)| {
                t.last_handshake
                    .map(|at| (l.clone(), saturating_i64(at.as_secs())))
            }),
        )?;

        // Allow-list decisions: source is the peer identity, destination the local one.
        let decisions = |pick: fn(&crate::node::DecisionCounts) -> u64, action: &'static str| {
            pairs.iter().map(move |(l, _, d)| {
                (
                    [
                        ("source", l[1].1.clone()),
                        ("destination", l[0].1.clone()),
                        ("action", action.to_string()),
                    ],
                    pick(d),
                )
            })
        };
        f.counters(
            "policy_decisions",
            "New inbound flows judged by the allow list, by source and destination principal and action.",
            decisions(|d| d.allowed, "allow")
                .chain(decisions(|d| d.denied, "deny"))
                .chain(decisions(|d| d.audited, "audit")),
        )?;
        f.counters(
            "flow_evictions_by_pair",
            "Flows pushed out of the full flow table, by source and destination principal.",
            pairs.iter().map(|(l, _, d)| {
                (
                    [("source", l[1].1.clone()), ("destination", l[0].1.clone())],
                    d.flow_evictions,
                )
            }),
        )?;
        f.gauge(
            "flows",
            "Flows in the flow table.",
            node.flows.tracked as i64,
        )?;
        f.gauge(
            "flow_capacity",
            "Flows the flow table holds at most.",
            node.flows.capacity as i64,
        )?;
        f.counter(
            "flow_evictions",
            "Flows pushed out of the full flow table.",
            node.flows.evictions,
        )?;

        let p = &node.protocol;
        f.counters(
            "handshakes",
            "Handshake messages by result: completed, or why they were refused.",
            [
                ("completed", p.handshakes_completed),
                ("failed", p.handshake_failed),
                ("unknown_peer", p.unknown_peer),
                ("replayed", p.handshake_replay),
                ("too_frequent", p.handshake_flood),
                ("rate_limited", p.rate_limited),
                ("bad_mac1", p.bad_mac1),
            ]
            .map(|(result, n)| ([("result", result)], n)),
        )?;
        f.counter(
            "cookie_replies_sent",
            "Cookie replies sent to handshake messages under load.",
            p.cookie_replies_sent,
        )?;
        let n = &node.node;
        f.counters(
            "dropped",
            "Datagrams and packets dropped, by reason.",
            [
                ("malformed", p.malformed),
                ("bad_mac1", p.bad_mac1),
                ("handshake_failed", p.handshake_failed),
                ("unknown_peer", p.unknown_peer),
                ("handshake_replay", p.handshake_replay),
                ("handshake_flood", p.handshake_flood),
                ("rate_limited", p.rate_limited),
                ("unknown_index", p.unknown_index),
                ("forged", p.forged),
                ("replayed", p.replayed),
                ("expired", p.expired),
                ("no_endpoint", p.no_endpoint),
                ("queue_overflow", p.queue_overflow),
                ("handshake_gave_up", p.handshake_gave_up),
                ("not_ip", n.not_ip),
                ("no_local_identity", n.no_local_identity),
                ("no_peer", n.no_peer),
                ("spoofed_source", n.spoofed_source),
                ("wrong_destination", n.wrong_destination),
                ("policy_denied", n.policy_denied),
                ("flow_revoked", n.flow_revoked),
                ("fragment_overlap", n.fragment_overlap),
            ]
            .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        f.counters(
            "packets",
            "Packets through the tunnels, by direction.",
            [("in", n.packets_in), ("out", n.packets_out)].map(|(d, n)| ([("direction", d)], n)),
        )?;
        f.counters(
            "send_errors",
            "Datagrams whose UDP send failed, by kind.",
            status
                .send_errors
                .iter()
                .map(|(kind, &n)| ([("kind", kind.as_str())], n)),
        )?;
        f.counter(
            "realtime_drops",
            "Times a daemon thread used more than interface.realtime_share_percent of a core \
             and dropped to normal priority.",
            status.realtime_drops,
        )?;
        f.counter(
            "tun_write_errors",
            "Packets lost in writes to the TUN device that the kernel refused.",
            status.tun_write_errors,
        )?;
        if let Some(dropped) = status.plaintext_dropped {
            f.counter(
                "plaintext_dropped",
                "Plaintext packets to STRICT identities dropped by the nftables filter.",
                dropped,
            )?;
        }
        if let Some(k) = &status.kubernetes {
            f.counter(
                "kubernetes_api_errors",
                "Kubernetes API requests and watches that failed (each retried with backoff).",
                k.api_errors,
            )?;
            f.counter(
                "kubernetes_meshnode_publications",
                "Successful server-side applies of this node's MeshNode.",
                k.publications,
            )?;
            f.counter(
                "kubernetes_key_rotation_steps",
                "Service-account key rotation steps: a next key made and published, or made the key.",
                k.key_rotation_steps,
            )?;
        }
        let r = &status.reloads;
        f.counters(
            "reloads",
            "Configuration reloads, by result.",
            [("applied", r.applied), ("rejected", r.rejected)]
                .map(|(result, n)| ([("result", result)], n)),
        )?;
        f.counters(
            "reload_changes",
            "What applied reloads changed, by kind of identity and change.",
            [
                ("identity", "added", r.identities_added),
                ("identity", "changed", r.identities_changed),
                ("identity", "removed", r.identities_removed),
                ("peer", "added", r.peers_added),
                ("peer", "changed", r.peers_changed),
                ("peer", "removed", r.peers_removed),
            ]
            .map(|(kind, change, n)| ([("kind", kind), ("change", change)], n)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_prometheus_text() {
        let openmetrics = "# HELP meshguard_flows Flows.\n# TYPE meshguard_flows gauge\n\
                           meshguard_flows 3\n# HELP meshguard_dropped Drops.\n\
                           # TYPE meshguard_dropped counter\n\
                           meshguard_dropped_total{reason=\"x\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(openmetrics),
            "# HELP meshguard_flows Flows.\n# TYPE meshguard_flows gauge\nmeshguard_flows 3\n\
             # HELP meshguard_dropped_total Drops.\n# TYPE meshguard_dropped_total counter\n\
             meshguard_dropped_total{reason=\"x\"} 1\n"
        );
    }
}
