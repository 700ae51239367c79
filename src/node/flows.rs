//! Flow tracking for the stateful ingress firewall.
//!
//! A flow that a local workload opens lets the peer's replies in; a flow that a peer
//! opened and the policy allowed is remembered so its later packets skip evaluation.
//! The table is bounded (the oldest flow goes first, counted) and flows idle out.
//! Nothing here reads a clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::RandomState;

use crate::identity::{LocalId, PeerId};
use crate::packet::{IpHeader, Transport};
use crate::policy::Request;

pub(super) const TCP_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
pub(super) const UDP_IDLE: Duration = Duration::from_secs(180);
pub(super) const ICMP_IDLE: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_CAPACITY: usize = 65_536;

/// A flow, oriented from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct FlowKey {
    protocol: u8,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
    /// ICMP echo: the peer sent the request. A request and its reply are one flow; a
    /// request from the other side with the same identifier is another.
    peer_asked: bool,
}

/// What the policy was asked about when a peer opened a flow, kept for re-checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Opened {
    pub local: LocalId,
    pub peer: PeerId,
    pub request: Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlowState {
    /// A local workload opened it: the peer's replies pass.
    OpenedLocally,
    /// The peer opened it and the policy allowed it.
    Allowed(Opened),
    /// Allowed once, then denied by a policy reload: stays shut until it idles out or a
    /// later policy allows it again, and local replies cannot reopen it.
    Revoked(Opened),
}

struct Flow {
    state: FlowState,
    last_seen: Instant,
    idle: Duration,
    /// Insertion stamp, to tell live entries of `order` from stale ones.
    stamp: u64,
}

/// Which way a packet crosses the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// From a local workload towards a peer.
    Outbound,
    /// From a peer towards a local workload.
    Inbound,
}

/// The flow key of a packet and how long its flow may idle, or `None` for packets that
/// are not tracked (ICMP other than echo, other protocols, later fragments).
pub(super) fn key(
    header: &IpHeader,
    transport: Transport,
    direction: Direction,
) -> Option<(FlowKey, Duration)> {
    let protocol = header.protocol?;
    let (protocol, source_port, destination_port, idle) = match transport {
        Transport::Tcp {
            source_port,
            destination_port,
            ..
        } => (protocol, source_port, destination_port, TCP_IDLE),
        Transport::Udp {
            source_port,
            destination_port,
        } => (protocol, source_port, destination_port, UDP_IDLE),
        Transport::IcmpEcho { identifier, .. } => (protocol, identifier, identifier, ICMP_IDLE),
        Transport::IcmpOther | Transport::Other => return None,
    };
    let peer_asked = match transport {
        Transport::IcmpEcho { request, .. } => request == (direction == Direction::Inbound),
        _ => false,
    };
    let key = match direction {
        Direction::Outbound => FlowKey {
            protocol,
            local: header.source,
            local_port: source_port,
            remote: header.destination,
            remote_port: destination_port,
            peer_asked,
        },
        Direction::Inbound => FlowKey {
            protocol,
            local: header.destination,
            local_port: destination_port,
            remote: header.source,
            remote_port: source_port,
            peer_asked,
        },
    };
    Some((key, idle))
}

pub(super) struct FlowTable {
    flows: HashMap<FlowKey, Flow, RandomState>,
    /// Insertion order, for evicting the oldest flow; may hold stale entries.
    order: VecDeque<(FlowKey, u64)>,
    next_stamp: u64,
    capacity: usize,
    pub evictions: u64,
    /// The last flow `touch` found, with the instant it was touched at: the segments of a
    /// batch share one flow and one `now`, so they share one hash lookup. Any change to
    /// the table forgets it.
    recent: Option<(FlowKey, Instant, FlowState)>,
}

impl FlowTable {
    pub(super) fn new(capacity: usize) -> Self {
        FlowTable {
            flows: HashMap::default(),
            order: VecDeque::new(),
            next_stamp: 0,
            capacity: capacity.max(1),
            evictions: 0,
            recent: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.flows.len()
    }

    /// The state of a live flow, marking it as seen now.
    pub(super) fn touch(&mut self, key: &FlowKey, now: Instant) -> Option<FlowState> {
        if let Some((recent, at, state)) = self.recent {
            if recent == *key && at == now {
                return Some(state);
            }
        }
        let flow = self.flows.get_mut(key)?;
        if now.saturating_duration_since(flow.last_seen) >= flow.idle {
            self.flows.remove(key);
            return None;
        }
        flow.last_seen = now;
        self.recent = Some((*key, now, flow.state));
        Some(flow.state)
    }

    /// The state of a live flow, without marking it as seen.
    pub(super) fn peek(&self, key: &FlowKey, now: Instant) -> Option<FlowState> {
        self.flows
            .get(key)
            .filter(|flow| now.saturating_duration_since(flow.last_seen) < flow.idle)
            .map(|flow| flow.state)
    }

    pub(super) fn insert(&mut self, key: FlowKey, state: FlowState, idle: Duration, now: Instant) {
        self.recent = None;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let replaced = self.flows.insert(
            key,
            Flow {
                state,
                last_seen: now,
                idle,
                stamp,
            },
        );
        self.order.push_back((key, stamp));
        if replaced.is_none() {
            while self.flows.len() > self.capacity {
                self.evict_oldest();
            }
        }
        if self.order.len() > 2 * self.capacity {
            let flows = &self.flows;
            self.order
                .retain(|(k, s)| flows.get(k).is_some_and(|f| f.stamp == *s));
        }
    }

    /// Evicts the oldest flow, passing over revoked ones: evicting those would let a
    /// local reply reopen what a reload shut, so a peer cannot flush them out by opening
    /// many flows. Only when every flow is revoked does the oldest of them go.
    fn evict_oldest(&mut self) {
        let mut passes = self.order.len();
        while let Some((key, stamp)) = self.order.pop_front() {
            let Some(flow) = self.flows.get_mut(&key).filter(|f| f.stamp == stamp) else {
                continue;
            };
            if matches!(flow.state, FlowState::Revoked(_)) && passes > 0 {
                passes -= 1;
                let stamp = self.next_stamp;
                self.next_stamp += 1;
                flow.stamp = stamp;
                self.order.push_back((key, stamp));
                continue;
            }
            self.flows.remove(&key);
            self.evictions += 1;
            return;
        }
    }

    /// Drops flows idle past their timeout.
    pub(super) fn expire(&mut self, now: Instant) {
        self.recent = None;
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < f.idle);
    }

    /// Re-checks every peer-opened flow with `allowed`: denied ones become `Revoked`,
    /// revoked ones that are allowed again become `Allowed`. Returns how many flows are
    /// newly revoked.
    pub(super) fn recheck(&mut self, mut allowed: impl FnMut(&Opened) -> bool) -> usize {
        self.recent = None;
        let mut revoked = 0;
        for flow in self.flows.values_mut() {
            flow.state = match flow.state {
                FlowState::Allowed(opened) if !allowed(&opened) => {
                    revoked += 1;
                    FlowState::Revoked(opened)
                }
                FlowState::Revoked(opened) if allowed(&opened) => FlowState::Allowed(opened),
                unchanged => unchanged,
            };
        }
        revoked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Protocol;

    /// What a peer opened: a flow to local identity 0 on `port`.
    fn opened(peer: PeerId, source_ip: Option<&str>, protocol: Protocol, port: u16) -> Opened {
        Opened {
            local: LocalId::new(0),
            peer,
            request: Request {
                source_ip: source_ip.map(|ip| ip.parse().unwrap()),
                protocol,
                port: Some(port),
            },
        }
    }

    fn key_n(n: u16) -> FlowKey {
        FlowKey {
            protocol: 6,
            local: "10.0.0.1".parse().unwrap(),
            local_port: n,
            remote: "10.0.0.2".parse().unwrap(),
            remote_port: 80,
            peer_asked: false,
        }
    }

    #[test]
    fn repeated_touches_see_every_change() {
        let now = Instant::now();
        let mut t = FlowTable::new(2);
        let opened = opened(PeerId::new(0), None, Protocol::Tcp, 80);
        t.insert(key_n(0), FlowState::Allowed(opened), TCP_IDLE, now);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Allowed(opened)));
        // A reload at the same instant revokes it: the next touch says so.
        assert_eq!(t.recheck(|_| false), 1);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Revoked(opened)));
        t.recheck(|_| true);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Allowed(opened)));
        // Evicted by inserts at the same instant: gone.
        t.insert(key_n(1), FlowState::OpenedLocally, TCP_IDLE, now);
        t.insert(key_n(2), FlowState::OpenedLocally, TCP_IDLE, now);
        assert_eq!(t.touch(&key_n(0), now), None);
    }

    #[test]
    fn bounded_oldest_first_and_idle_expiry() {
        let now = Instant::now();
        let mut t = FlowTable::new(3);
        for n in 0..3 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, now);
        }
        t.insert(key_n(3), FlowState::OpenedLocally, UDP_IDLE, now);
        assert_eq!(t.len(), 3);
        assert_eq!(t.evictions, 1);
        assert!(t.touch(&key_n(0), now).is_none(), "oldest evicted");
        assert!(t.touch(&key_n(3), now).is_some());
        assert!(t.touch(&key_n(1), now + UDP_IDLE).is_none(), "idled out");
        t.expire(now + UDP_IDLE);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn reinserting_a_key_does_not_evict_others() {
        let now = Instant::now();
        let mut t = FlowTable::new(2);
        t.insert(key_n(0), FlowState::OpenedLocally, UDP_IDLE, now);
        t.insert(key_n(1), FlowState::OpenedLocally, UDP_IDLE, now);
        for _ in 0..10 {
            t.insert(key_n(1), FlowState::OpenedLocally, UDP_IDLE, now);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.evictions, 0);
        t.insert(key_n(2), FlowState::OpenedLocally, UDP_IDLE, now);
        assert!(t.touch(&key_n(0), now).is_none(), "key 0 was the oldest");
        assert!(t.order.len() <= 4, "stale entries are compacted");
    }

    #[test]
    fn eviction_passes_over_revoked_flows() {
        let now = Instant::now();
        let mut t = FlowTable::new(2);
        let opened = opened(PeerId::new(0), None, Protocol::Udp, 1);
        t.insert(key_n(0), FlowState::Revoked(opened), UDP_IDLE, now);
        for n in 1..50 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, now);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.touch(&key_n(0), now),
            Some(FlowState::Revoked(opened)),
            "still shut"
        );
        assert_eq!(t.evictions, 48);
    }

    #[test]
    fn recheck_revokes_and_restores() {
        let now = Instant::now();
        let mut t = FlowTable::new(10);
        let opened = opened(PeerId::new(1), Some("10.0.0.2"), Protocol::Tcp, 1);
        t.insert(key_n(1), FlowState::Allowed(opened), TCP_IDLE, now);
        t.insert(key_n(2), FlowState::OpenedLocally, TCP_IDLE, now);
        assert_eq!(t.recheck(|_| false), 1);
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Revoked(opened)));
        assert_eq!(t.touch(&key_n(2), now), Some(FlowState::OpenedLocally));
        assert_eq!(t.recheck(|_| false), 0, "still revoked, not counted twice");
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Revoked(opened)));
        assert_eq!(t.recheck(|_| true), 0);
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Allowed(opened)));
    }
}
