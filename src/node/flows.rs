//! Flow tracking for the stateful ingress firewall.
//!
//! A flow that a local workload opens lets the peer's replies in; a flow that a peer
//! opened and the policy allowed is remembered so its later packets skip evaluation.
//! Flows idle out. The table is bounded and shared fairly: every flow belongs to a
//! (local identity, peer identity) pair, and when it is full the oldest flow of the pair
//! with the most flows, of the peer with the most flows, goes first. A peer that opens
//! flow after flow therefore pushes out its own flows, never those of an identity with
//! fewer. Nothing here reads a clock.
//!
//! UDP flows a peer opened are remembered after they leave the table (for the UDP idle
//! time, revoked ones for an hour; within the table's bound, revoked ones forgotten
//! last): a local workload's reply on such a flow re-creates it as the peer's flow,
//! judged by the current allow list, not as one the workload opened.

use std::collections::{BTreeSet, HashMap, VecDeque};
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
/// How long a revoked UDP flow that left the table is remembered as revoked.
const REVOKED_MEMORY: Duration = Duration::from_secs(60 * 60);

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

/// The pair of identities a flow belongs to.
pub(super) type Owner = (LocalId, PeerId);

struct Flow {
    state: FlowState,
    last_seen: Instant,
    idle: Duration,
    owner: Owner,
    /// Insertion stamp, to tell live entries of the owner's queue from stale ones.
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

/// One pair's flows, oldest first; the queue may hold stale entries.
#[derive(Default)]
struct PairFlows {
    live: usize,
    order: VecDeque<(FlowKey, u64)>,
}

/// One peer identity's flows, by local identity.
#[derive(Default)]
struct PeerFlows {
    live: usize,
    /// (live flows, local identity): the heaviest last.
    by_weight: BTreeSet<(usize, LocalId)>,
    pairs: HashMap<LocalId, PairFlows, RandomState>,
}

/// A UDP flow a peer opened that left the table (evicted or idled out).
struct Departed {
    opened: Opened,
    /// A reload denied it: forgotten last.
    revoked: bool,
    /// When it left the table.
    left: Instant,
    /// To tell live entries of the departure queues from stale ones.
    stamp: u64,
}

pub(super) struct FlowTable {
    flows: HashMap<FlowKey, Flow, RandomState>,
    peers: HashMap<PeerId, PeerFlows, RandomState>,
    /// (live flows, peer identity): the heaviest last.
    peers_by_weight: BTreeSet<(usize, PeerId)>,
    next_stamp: u64,
    capacity: usize,
    pub(super) evictions: u64,
    /// The last flow `touch` found, with the instant it was touched at: the segments of a
    /// batch share one flow and one `now`, so they share one hash lookup. Any change to
    /// the table forgets it.
    recent: Option<(FlowKey, Instant, FlowState)>,
    /// UDP flows peers opened that left the table: for UDP_IDLE, revoked ones for
    /// REVOKED_MEMORY.
    departed: HashMap<FlowKey, Departed, RandomState>,
    /// Departure order, not revoked `[0]` and revoked `[1]`; may hold stale entries.
    departures: [VecDeque<(FlowKey, u64)>; 2],
}

impl FlowTable {
    pub(super) fn new(capacity: usize) -> Self {
        FlowTable {
            flows: HashMap::default(),
            peers: HashMap::default(),
            peers_by_weight: BTreeSet::new(),
            next_stamp: 0,
            capacity: capacity.max(1),
            evictions: 0,
            recent: None,
            departed: HashMap::default(),
            departures: [VecDeque::new(), VecDeque::new()],
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
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
            self.remove(key, now);
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

    /// What a peer opened on this UDP flow, if a peer opened it, whether or not it is in
    /// the table now: a local reply must not turn it into a flow the workload opened.
    pub(super) fn peer_opened(&self, key: &FlowKey) -> Option<Opened> {
        match self.flows.get(key).map(|f| f.state) {
            Some(FlowState::Allowed(opened) | FlowState::Revoked(opened)) => Some(opened),
            _ => self.departed.get(key).map(|d| d.opened),
        }
    }

    /// Adds (or replaces) the flow `key` of `owner`. When the table is full, the oldest
    /// flow of the heaviest user goes; returns the pairs whose flows were evicted.
    pub(super) fn insert(
        &mut self,
        key: FlowKey,
        state: FlowState,
        idle: Duration,
        owner: Owner,
        now: Instant,
    ) -> Vec<Owner> {
        self.recent = None;
        if self.flows.contains_key(&key) {
            self.remove(&key, now);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.flows.insert(
            key,
            Flow {
                state,
                last_seen: now,
                idle,
                owner,
                stamp,
            },
        );
        self.count(owner, 1, Some((key, stamp)));
        self.departed.remove(&key);
        let mut evicted = Vec::new();
        while self.flows.len() > self.capacity {
            match self.evict_heaviest(now) {
                Some(owner) => evicted.push(owner),
                None => break,
            }
        }
        evicted
    }

    /// Adds `delta` to the live count of `owner` (and its peer), and queues `entry`.
    fn count(&mut self, (local, peer): Owner, delta: isize, entry: Option<(FlowKey, u64)>) {
        let peer_flows = self.peers.entry(peer).or_default();
        self.peers_by_weight.remove(&(peer_flows.live, peer));
        let pair = peer_flows.pairs.entry(local).or_default();
        peer_flows.by_weight.remove(&(pair.live, local));
        pair.live = pair.live.saturating_add_signed(delta);
        peer_flows.live = peer_flows.live.saturating_add_signed(delta);
        if let Some(entry) = entry {
            pair.order.push_back(entry);
        }
        if pair.live > 0 {
            peer_flows.by_weight.insert((pair.live, local));
            // Drop stale queue entries once they outnumber the live ones.
            if pair.order.len() > 2 * pair.live + 16 {
                let flows = &self.flows;
                pair.order
                    .retain(|(k, s)| flows.get(k).is_some_and(|f| f.stamp == *s));
            }
        } else {
            peer_flows.pairs.remove(&local);
        }
        if peer_flows.live > 0 {
            self.peers_by_weight.insert((peer_flows.live, peer));
        } else {
            self.peers.remove(&peer);
        }
    }

    /// Removes a flow from the table; a UDP flow a peer opened is remembered.
    fn remove(&mut self, key: &FlowKey, now: Instant) {
        self.recent = None;
        let Some(flow) = self.flows.remove(key) else {
            return;
        };
        self.count(flow.owner, -1, None);
        let (opened, revoked) = match flow.state {
            FlowState::Allowed(opened) => (opened, false),
            FlowState::Revoked(opened) => (opened, true),
            FlowState::OpenedLocally => return,
        };
        if key.protocol == crate::packet::PROTO_UDP {
            self.depart(*key, opened, revoked, now);
        }
    }

    fn depart(&mut self, key: FlowKey, opened: Opened, revoked: bool, left: Instant) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.departed.insert(
            key,
            Departed {
                opened,
                revoked,
                left,
                stamp,
            },
        );
        self.departures[usize::from(revoked)].push_back((key, stamp));
        while self.departed.len() > self.capacity {
            if !self.forget_departed(false) && !self.forget_departed(true) {
                break;
            }
        }
    }

    /// Forgets the earliest departure of the given kind; false if there is none.
    fn forget_departed(&mut self, revoked: bool) -> bool {
        let queue = &mut self.departures[usize::from(revoked)];
        while let Some((key, stamp)) = queue.pop_front() {
            if self.departed.get(&key).is_some_and(|d| d.stamp == stamp) {
                self.departed.remove(&key);
                return true;
            }
        }
        false
    }

    /// Evicts the oldest flow of the heaviest local identity of the heaviest peer.
    fn evict_heaviest(&mut self, now: Instant) -> Option<Owner> {
        let &(_, peer) = self.peers_by_weight.last()?;
        let peer_flows = self.peers.get_mut(&peer)?;
        let &(_, local) = peer_flows.by_weight.last()?;
        let pair = peer_flows.pairs.get_mut(&local)?;
        while let Some((key, stamp)) = pair.order.pop_front() {
            if self.flows.get(&key).is_some_and(|f| f.stamp == stamp) {
                self.remove(&key, now);
                self.evictions += 1;
                return Some((local, peer));
            }
        }
        None
    }

    /// Drops flows idle past their timeout, and forgets peer-opened flows that could not
    /// have lasted this long.
    pub(super) fn expire(&mut self, now: Instant) {
        self.recent = None;
        let idle: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_seen) >= f.idle)
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            self.remove(&key, now);
        }
        self.departed.retain(|_, d| {
            let memory = if d.revoked { REVOKED_MEMORY } else { UDP_IDLE };
            now.saturating_duration_since(d.left) < memory
        });
        let departed = &self.departed;
        for queue in &mut self.departures {
            queue.retain(|(k, s)| departed.get(k).is_some_and(|d| d.stamp == *s));
        }
    }

    /// Gives every flow the pair `renumber` maps its owner to, and drops the flows (and
    /// remembered departures) of pairs it maps to `None`. Eviction order is kept.
    pub(super) fn renumber(&mut self, renumber: impl Fn(Owner) -> Option<Owner>) {
        self.recent = None;
        let mut flows: Vec<(FlowKey, Flow)> = self.flows.drain().collect();
        flows.sort_unstable_by_key(|(_, flow)| flow.stamp);
        self.peers.clear();
        self.peers_by_weight.clear();
        let moved = |opened: Opened, owner: Owner| Opened {
            local: owner.0,
            peer: owner.1,
            ..opened
        };
        for (key, mut flow) in flows {
            let Some(owner) = renumber(flow.owner) else {
                continue;
            };
            flow.owner = owner;
            flow.state = match flow.state {
                FlowState::Allowed(opened) => FlowState::Allowed(moved(opened, owner)),
                FlowState::Revoked(opened) => FlowState::Revoked(moved(opened, owner)),
                FlowState::OpenedLocally => FlowState::OpenedLocally,
            };
            let stamp = flow.stamp;
            self.flows.insert(key, flow);
            self.count(owner, 1, Some((key, stamp)));
        }
        self.departed.retain(|_, departed| {
            let was = (departed.opened.local, departed.opened.peer);
            match renumber(was) {
                Some(owner) => {
                    departed.opened = moved(departed.opened, owner);
                    true
                }
                None => false,
            }
        });
        let departed = &self.departed;
        for queue in &mut self.departures {
            queue.retain(|(k, s)| departed.get(k).is_some_and(|d| d.stamp == *s));
        }
    }

    /// Re-checks every peer-opened flow with `allowed`: denied ones become `Revoked`,
    /// revoked ones that are allowed again become `Allowed`. Remembered peer-opened UDP
    /// flows that left the table are marked the same way. Returns how many flows in the
    /// table are newly revoked.
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
        for (key, departed) in &mut self.departed {
            let now_revoked = !allowed(&departed.opened);
            if now_revoked != departed.revoked {
                departed.revoked = now_revoked;
                departed.stamp = self.next_stamp;
                self.next_stamp += 1;
                self.departures[usize::from(now_revoked)].push_back((*key, departed.stamp));
            }
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
                destination_ip: None,
                protocol,
                port: Some(port),
            },
        }
    }

    /// The pair the flows of most tests belong to.
    fn owner() -> Owner {
        (LocalId::new(0), PeerId::new(0))
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
        t.insert(key_n(0), FlowState::Allowed(opened), TCP_IDLE, owner(), now);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Allowed(opened)));
        // A reload at the same instant revokes it: the next touch says so.
        assert_eq!(t.recheck(|_| false), 1);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Revoked(opened)));
        t.recheck(|_| true);
        assert_eq!(t.touch(&key_n(0), now), Some(FlowState::Allowed(opened)));
        // Evicted by inserts at the same instant: gone.
        t.insert(key_n(1), FlowState::OpenedLocally, TCP_IDLE, owner(), now);
        t.insert(key_n(2), FlowState::OpenedLocally, TCP_IDLE, owner(), now);
        assert_eq!(t.touch(&key_n(0), now), None);
    }

    #[test]
    fn bounded_oldest_first_and_idle_expiry() {
        let now = Instant::now();
        let mut t = FlowTable::new(3);
        for n in 0..3 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        }
        t.insert(key_n(3), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
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
        t.insert(key_n(0), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        t.insert(key_n(1), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        for _ in 0..10 {
            t.insert(key_n(1), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.evictions, 0);
        t.insert(key_n(2), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        assert!(t.touch(&key_n(0), now).is_none(), "key 0 was the oldest");
        let queued: usize = t
            .peers
            .values()
            .flat_map(|p| p.pairs.values())
            .map(|pair| pair.order.len())
            .sum();
        assert!(queued <= 20, "stale entries are compacted: {queued}");
    }

    /// A revoked UDP flow pushed out of the table is remembered as revoked: a local
    /// reply on it can tell it was the peer's, and flushing the table (or inserting at
    /// all) never has to pass over revoked flows.
    #[test]
    fn an_evicted_revoked_flow_is_remembered_as_the_peers() {
        let now = Instant::now();
        let mut t = FlowTable::new(2);
        let opened = opened(PeerId::new(0), None, Protocol::Udp, 1);
        let mut udp = key_n(0);
        udp.protocol = crate::packet::PROTO_UDP;
        t.insert(udp, FlowState::Revoked(opened), UDP_IDLE, owner(), now);
        for n in 1..50 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, owner(), now);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.evictions, 48);
        assert_eq!(t.touch(&udp, now), None, "evicted like any flow");
        assert_eq!(
            t.peer_opened(&udp),
            Some(opened),
            "but remembered as the peer's"
        );
        t.expire(now + UDP_IDLE);
        assert_eq!(
            t.peer_opened(&udp),
            Some(opened),
            "revoked: remembered long"
        );
        t.expire(now + REVOKED_MEMORY);
        assert_eq!(t.peer_opened(&udp), None, "but not for ever");
    }

    /// When the table is full, the heaviest peer loses its own oldest flow; a peer with
    /// fewer flows keeps all of its.
    #[test]
    fn the_heaviest_peer_pays_for_a_full_table() {
        let now = Instant::now();
        let mut t = FlowTable::new(10);
        let light: Owner = (LocalId::new(0), PeerId::new(1));
        let heavy: Owner = (LocalId::new(0), PeerId::new(2));
        for n in 0..3 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, light, now);
        }
        for n in 100..200 {
            let evicted = t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, heavy, now);
            assert!(
                evicted.iter().all(|owner| *owner == heavy),
                "{n}: {evicted:?}"
            );
        }
        assert_eq!(t.len(), 10);
        for n in 0..3 {
            assert!(t.touch(&key_n(n), now).is_some(), "light flow {n} kept");
        }
        assert!(
            t.touch(&key_n(199), now).is_some(),
            "the newest heavy flow is in"
        );
        assert!(
            t.touch(&key_n(100), now).is_none(),
            "the oldest heavy flow went"
        );
        // Within one peer, the local identity with the most flows pays first.
        let mut t = FlowTable::new(4);
        let (a, b) = (
            (LocalId::new(0), PeerId::new(2)),
            (LocalId::new(1), PeerId::new(2)),
        );
        t.insert(key_n(1), FlowState::OpenedLocally, UDP_IDLE, a, now);
        for n in 10..14 {
            t.insert(key_n(n), FlowState::OpenedLocally, UDP_IDLE, b, now);
        }
        assert!(
            t.touch(&key_n(1), now).is_some(),
            "the lighter local identity keeps it"
        );
    }

    #[test]
    fn recheck_revokes_and_restores() {
        let now = Instant::now();
        let mut t = FlowTable::new(10);
        let opened = opened(PeerId::new(1), Some("10.0.0.2"), Protocol::Tcp, 1);
        t.insert(key_n(1), FlowState::Allowed(opened), TCP_IDLE, owner(), now);
        t.insert(key_n(2), FlowState::OpenedLocally, TCP_IDLE, owner(), now);
        assert_eq!(t.recheck(|_| false), 1);
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Revoked(opened)));
        assert_eq!(t.touch(&key_n(2), now), Some(FlowState::OpenedLocally));
        assert_eq!(t.recheck(|_| false), 0, "still revoked, not counted twice");
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Revoked(opened)));
        assert_eq!(t.recheck(|_| true), 0);
        assert_eq!(t.touch(&key_n(1), now), Some(FlowState::Allowed(opened)));
    }
}
