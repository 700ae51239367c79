//! Fragments of admitted datagrams. Only a datagram's first fragment carries the ports
//! the allow list judges; once it is let in, the datagram's later fragments may follow
//! for a while, and nothing else that merely looks like them. Bounded in count and time.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::RandomState;

use crate::packet::{Fragment, IpHeader, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// How long a datagram's later fragments may follow its first (Linux's reassembly
/// timeout, `ipfrag_time`, is 30 s as well).
const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Datagrams remembered at once; the oldest is forgotten first.
pub(super) const DEFAULT_CAPACITY: usize = 4096;

/// One datagram: who sent it to whom, and its identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DatagramKey {
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    id: u32,
}

/// What a later fragment is to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LaterFragment {
    /// Part of a datagram whose first fragment was admitted.
    Admitted,
    /// Part of such a datagram, but it would overwrite the transport header the first
    /// fragment carried (ports, TCP flags): the datagram is not what was judged.
    Overlapping,
    /// Part of no datagram the table knows.
    Unknown,
}

pub(super) struct Fragments {
    admitted: HashMap<DatagramKey, Instant, RandomState>,
    /// Admission order, for forgetting the oldest; may hold stale entries.
    order: VecDeque<(DatagramKey, Instant)>,
    capacity: usize,
}

/// The bytes at the start of a datagram's payload that the allow list read from its
/// first fragment; a later fragment must start after them.
fn judged_header_len(protocol: u8) -> usize {
    match protocol {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => 0,
    }
}

fn key(header: &IpHeader, fragment: &Fragment) -> Option<DatagramKey> {
    Some(DatagramKey {
        source: header.source,
        destination: header.destination,
        protocol: header.protocol?,
        id: fragment.id,
    })
}

impl Fragments {
    pub(super) fn new(capacity: usize) -> Self {
        Fragments {
            admitted: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The first fragment of a datagram was let in: its later fragments may follow.
    pub(super) fn first_admitted(&mut self, header: &IpHeader, fragment: &Fragment, now: Instant) {
        let Some(key) = key(header, fragment) else {
            return;
        };
        if self.admitted.insert(key, now).is_none() {
            while self.admitted.len() > self.capacity {
                self.forget_oldest();
            }
        }
        self.order.push_back((key, now));
        if self.order.len() > 2 * self.capacity {
            let admitted = &self.admitted;
            self.order.retain(|(k, at)| admitted.get(k) == Some(at));
        }
    }

    fn forget_oldest(&mut self) {
        while let Some((key, at)) = self.order.pop_front() {
            if self.admitted.get(&key) == Some(&at) {
                self.admitted.remove(&key);
                return;
            }
        }
    }

    /// What a fragment after the first is.
    pub(super) fn later(
        &self,
        header: &IpHeader,
        fragment: &Fragment,
        now: Instant,
    ) -> LaterFragment {
        let Some(key) = key(header, fragment) else {
            return LaterFragment::Unknown;
        };
        match self.admitted.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < FRAGMENT_TIMEOUT => {
                if fragment.offset < judged_header_len(key.protocol) {
                    LaterFragment::Overlapping
                } else {
                    LaterFragment::Admitted
                }
            }
            _ => LaterFragment::Unknown,
        }
    }

    /// Forgets datagrams past the timeout.
    pub(super) fn expire(&mut self, now: Instant) {
        self.admitted
            .retain(|_, at| now.saturating_duration_since(*at) < FRAGMENT_TIMEOUT);
        let admitted = &self.admitted;
        self.order.retain(|(k, at)| admitted.get(k) == Some(at));
    }

    /// Forgets everything: after a policy reload, a datagram admitted under the old
    /// policy may not finish under the new one.
    pub(super) fn clear(&mut self) {
        self.admitted.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: u32, offset: usize) -> (IpHeader, Fragment) {
        let mut packet = [0u8; 28];
        packet[0] = 0x45;
        packet[3] = 28;
        packet[9] = PROTO_UDP;
        packet[4..6].copy_from_slice(&(id as u16).to_be_bytes());
        let units = (offset / 8) as u16 | 0x2000;
        packet[6..8].copy_from_slice(&units.to_be_bytes());
        let header = crate::packet::parse(&packet).expect("valid");
        (header, header.fragment.expect("a fragment"))
    }

    #[test]
    fn bounded_and_timed() {
        let now = Instant::now();
        let mut table = Fragments::new(2);
        for id in 0..3 {
            let (h, f) = header(id, 0);
            table.first_admitted(&h, &f, now);
        }
        let (h, f) = header(0, 1000);
        assert_eq!(
            table.later(&h, &f, now),
            LaterFragment::Unknown,
            "oldest forgotten"
        );
        let (h, f) = header(2, 1000);
        assert_eq!(table.later(&h, &f, now), LaterFragment::Admitted);
        let (h, f) = header(2, 0);
        assert_eq!(table.later(&h, &f, now), LaterFragment::Overlapping);
        let late = now + FRAGMENT_TIMEOUT;
        let (h, f) = header(2, 1000);
        assert_eq!(
            table.later(&h, &f, late),
            LaterFragment::Unknown,
            "timed out"
        );
        table.expire(late);
        assert!(table.admitted.is_empty());
    }
}
