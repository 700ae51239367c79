//! The stateful allow list at tunnel ingress: flows a local workload opens let their
//! replies in, flows the policy allowed are remembered so their later packets skip
//! evaluation, ICMP errors about a tracked flow go with that flow, and everything else is
//! evaluated against the compiled policy. A policy reload re-checks the remembered flows.

use std::time::{Duration, Instant};

use super::counters::{NodeDrop, PairDecisions};
use super::flows::{self, Direction, FlowState, FlowTable, Opened, Owner};
use super::fragments::{self, Fragments, LaterFragment};
use super::routing::{Renumbering, Routing};
use crate::config::PolicyConfig;
use crate::identity::{LocalId, PairTable, PeerId, Principal};
use crate::packet::{self, IpHeader, Transport};
use crate::policy::{Evaluator, PolicySet, Protocol, Request, Target};

/// How often idle flows are swept out of the flow table.
const FLOW_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// At most one "denied" log line per identity pair this often; the rest are counted.
const DENY_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An inbound packet as the allow list sees it.
pub(super) struct InboundPacket {
    pub header: IpHeader,
    pub transport: Transport,
    /// For an ICMP error: the packet it quotes.
    pub quoted: Option<(IpHeader, Transport)>,
}

/// How an inbound packet got in.
pub(super) enum Admitted {
    /// It belongs to a flow the table already holds.
    Tracked,
    /// The allow list was asked and allowed it.
    Allowed,
}

pub(super) struct Firewall {
    settings: PolicyConfig,
    policy: Evaluator,
    flows: FlowTable,
    fragments: Fragments,
    last_sweep: Instant,
    decisions: PairTable<PairDecisions>,
}

fn protocol_of(header: &IpHeader, transport: Transport) -> (Protocol, Option<u16>) {
    match transport {
        Transport::Tcp {
            destination_port, ..
        } => (Protocol::Tcp, Some(destination_port)),
        Transport::Udp {
            destination_port, ..
        } => (Protocol::Udp, Some(destination_port)),
        Transport::IcmpEcho { .. } | Transport::IcmpOther => (Protocol::Icmp, None),
        Transport::Other => match header.protocol {
            Some(packet::PROTO_TCP) => (Protocol::Tcp, None),
            Some(packet::PROTO_UDP) => (Protocol::Udp, None),
            Some(packet::PROTO_ICMP | packet::PROTO_ICMPV6) => (Protocol::Icmp, None),
            Some(other) => (Protocol::Other(other), None),
            None => (Protocol::Unknown, None),
        },
    }
}

/// Compiles the allow list for the identities `routing` holds.
fn compile(routing: &Routing, policy: &PolicySet, settings: &PolicyConfig) -> Evaluator {
    let targets: Vec<Target> = routing
        .locals()
        .iter()
        .map(|l| Target {
            principal: &l.principal,
            labels: &l.labels,
        })
        .collect();
    let peers: Vec<&Principal> = routing.peers().iter().map(|p| &p.principal).collect();
    Evaluator::new(
        policy,
        settings.default,
        &settings.root_namespace,
        &targets,
        &peers,
    )
}

impl Firewall {
    pub(super) fn new(
        routing: &Routing,
        policy: &PolicySet,
        settings: &PolicyConfig,
        now: Instant,
    ) -> Self {
        Firewall {
            policy: compile(routing, policy, settings),
            settings: settings.clone(),
            flows: FlowTable::new(flows::DEFAULT_CAPACITY),
            fragments: Fragments::new(fragments::DEFAULT_CAPACITY),
            last_sweep: now,
            decisions: PairTable::new(routing.locals().len(), routing.peers().len(), |_, _| {
                PairDecisions::default()
            }),
        }
    }

    pub(super) fn policy(&self) -> &Evaluator {
        &self.policy
    }

    pub(super) fn decisions(&self) -> &PairTable<PairDecisions> {
        &self.decisions
    }

    pub(super) fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub(super) fn flow_capacity(&self) -> usize {
        self.flows.capacity()
    }

    pub(super) fn flow_evictions(&self) -> u64 {
        self.flows.evictions
    }

    /// Replaces the allow list. Flows the peer opened are re-checked at once: those the
    /// new policy denies stop. Returns how many were revoked.
    pub(super) fn set_policy(&mut self, routing: &Routing, policy: &PolicySet) -> usize {
        self.policy = compile(routing, policy, &self.settings);
        self.fragments.clear();
        let evaluator = &self.policy;
        self.flows.recheck(|opened| {
            evaluator
                .evaluate(opened.local, opened.peer, &opened.request)
                .allowed
        })
    }

    /// Follows a reconfiguration of the identities (see [`Routing::apply`]): compiles the
    /// allow list for the identities and `settings` now in force, drops the flows and
    /// decision counts of identities that are gone, and re-checks the flows peers opened
    /// (a local identity's labels, and so its policies, may have changed). Returns how
    /// many flows were revoked.
    pub(super) fn reconfigure(
        &mut self,
        routing: &Routing,
        renumbering: &Renumbering,
        policy: &PolicySet,
        settings: &PolicyConfig,
    ) -> usize {
        self.settings = settings.clone();
        let old_decisions = std::mem::replace(
            &mut self.decisions,
            PairTable::new(routing.locals().len(), routing.peers().len(), |_, _| {
                PairDecisions::default()
            }),
        );
        for (local, peer, counts) in old_decisions.iter() {
            if let Some((local, peer)) = renumbering.pair((local, peer)) {
                *self.decisions.get_mut(local, peer) = counts.clone();
            }
        }
        self.flows.renumber(|owner| renumbering.pair(owner));
        self.set_policy(routing, policy)
    }

    pub(super) fn root_namespace(&self) -> &str {
        &self.settings.root_namespace
    }

    /// Drops flows that idled out, every FLOW_SWEEP_INTERVAL.
    pub(super) fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) >= FLOW_SWEEP_INTERVAL {
            self.flows.expire(now);
            self.fragments.expire(now);
            self.last_sweep = now;
        }
    }

    /// A local workload of `owner`'s local identity sends to its peer identity: remember
    /// the flow so the peer's replies come back in. A flow already known (opened by the
    /// peer, or revoked) keeps its state, and a UDP flow the peer opened before stays the
    /// peer's, judged by the allow list in force.
    pub(super) fn track_outbound(
        &mut self,
        now: Instant,
        header: &IpHeader,
        transport: Transport,
        owner: Owner,
    ) {
        // An echo reply answers the peer's request; it opens nothing.
        if matches!(transport, Transport::IcmpEcho { request: false, .. }) {
            return;
        }
        // Only a SYN opens a TCP flow: a mid-stream packet of a connection the table no
        // longer holds (idled out, evicted) must not open a way in for the peer.
        let may_open = !matches!(transport, Transport::Tcp { opening: false, .. });
        let Some((key, idle)) = flows::key(header, transport, Direction::Outbound) else {
            return;
        };
        if self.flows.touch(&key, now).is_some() || !may_open {
            return;
        }
        let state = match self.flows.peer_opened(&key) {
            Some(opened) => {
                let request = &opened.request;
                if self
                    .policy
                    .evaluate(opened.local, opened.peer, request)
                    .allowed
                {
                    FlowState::Allowed(opened)
                } else {
                    FlowState::Revoked(opened)
                }
            }
            None => FlowState::OpenedLocally,
        };
        let evicted = self.flows.insert(key, state, idle, owner, now);
        self.count_evictions(evicted);
    }

    fn count_evictions(&mut self, evicted: Vec<Owner>) {
        for (local, peer) in evicted {
            self.decisions.get_mut(local, peer).evictions += 1;
        }
    }

    /// Whether the packet from `peer` to `local` may in: tracked flows pass (or stay
    /// revoked), ICMP errors about a packet of a tracked flow go with that flow, anything
    /// else is evaluated and, when allowed, tracked.
    pub(super) fn admit_inbound(
        &mut self,
        now: Instant,
        routing: &Routing,
        local: LocalId,
        peer: PeerId,
        packet: &InboundPacket,
    ) -> Result<Admitted, NodeDrop> {
        let header = &packet.header;
        match header.fragment {
            // A later fragment has no ports: it passes as part of a datagram whose first
            // fragment was let in, or is judged like any packet whose port is unknown.
            Some(fragment) if fragment.offset > 0 => {
                match self.fragments.later(header, &fragment, now) {
                    LaterFragment::Admitted => Ok(Admitted::Tracked),
                    LaterFragment::Overlapping => Err(NodeDrop::FragmentOverlap),
                    LaterFragment::Unknown => self.admit(now, routing, local, peer, packet),
                }
            }
            Some(fragment) => {
                let admitted = self.admit(now, routing, local, peer, packet)?;
                self.fragments.first_admitted(header, &fragment, now);
                Ok(admitted)
            }
            None => self.admit(now, routing, local, peer, packet),
        }
    }

    /// Admission of one packet: tracked flows, related ICMP errors, then the allow list.
    fn admit(
        &mut self,
        now: Instant,
        routing: &Routing,
        local: LocalId,
        peer: PeerId,
        packet: &InboundPacket,
    ) -> Result<Admitted, NodeDrop> {
        let InboundPacket {
            header,
            transport,
            quoted,
        } = packet;
        let (header, transport) = (header, *transport);
        let flow = flows::key(header, transport, Direction::Inbound);
        if let Some((key, _)) = &flow {
            match self.flows.touch(key, now) {
                Some(FlowState::OpenedLocally | FlowState::Allowed(_)) => {
                    return Ok(Admitted::Tracked)
                }
                Some(FlowState::Revoked(_)) => return Err(NodeDrop::FlowRevoked),
                None => {}
            }
        }
        // An error about a packet this identity sent to the peer that reports it
        // ("fragmentation needed", "port unreachable") belongs to that packet's flow, as
        // conntrack's RELATED does. It does not keep the flow alive. A peer may not report
        // on packets sent to another peer's addresses.
        let related = quoted
            .as_ref()
            .filter(|(inner, _)| {
                inner.source == header.destination && routing.peer_owns(peer, inner.destination)
            })
            .and_then(|(inner, inner_transport)| {
                flows::key(inner, *inner_transport, Direction::Outbound)
            });
        if let Some((key, _)) = related {
            match self.flows.peek(&key, now) {
                Some(FlowState::OpenedLocally | FlowState::Allowed(_)) => {
                    return Ok(Admitted::Tracked)
                }
                Some(FlowState::Revoked(_)) => return Err(NodeDrop::FlowRevoked),
                None => {}
            }
        }
        let (protocol, port) = protocol_of(header, transport);
        let request = Request {
            source_ip: Some(header.source),
            destination_ip: Some(header.destination),
            protocol,
            port,
        };
        let decision = self.policy.evaluate(local, peer, &request);
        let counts = self.decisions.get_mut(local, peer);
        let (source, destination) = (
            &routing.peer(peer).principal,
            &routing.local(local).principal,
        );
        if !decision.audited_by.is_empty() {
            counts.audited += 1;
            tracing::debug!(
                %source,
                %destination,
                %protocol,
                port,
                decision = %decision.explain(),
                "audited flow"
            );
        }
        if decision.allowed {
            counts.allowed += 1;
            if let Some((key, idle)) = flow {
                let opened = Opened {
                    local,
                    peer,
                    request,
                };
                let state = FlowState::Allowed(opened);
                let evicted = self.flows.insert(key, state, idle, (local, peer), now);
                self.count_evictions(evicted);
            }
            return Ok(Admitted::Allowed);
        }
        counts.denied += 1;
        let due = counts
            .last_deny_log
            .is_none_or(|at| now.saturating_duration_since(at) >= DENY_LOG_INTERVAL);
        if due {
            let unlogged = counts.unlogged_denials;
            counts.last_deny_log = Some(now);
            counts.unlogged_denials = 0;
            tracing::info!(
                %source,
                %destination,
                source_ip = %header.source,
                %protocol,
                port,
                decision = %decision.explain(),
                similar_denials_not_logged = unlogged,
                "denied inbound flow"
            );
        } else {
            counts.unlogged_denials += 1;
        }
        Err(NodeDrop::PolicyDenied)
    }
}
