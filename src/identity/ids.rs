//! Typed positions of identities: a local identity, a peer identity, and a table with one
//! value per (local, peer) pair, so that no caller computes a pair's index by hand.

/// A local identity's position among the node's local identities (file order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalId(u32);

/// A peer identity's position among the node's peer identities (file order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

impl LocalId {
    pub fn new(index: usize) -> Self {
        LocalId(u32::try_from(index).expect("fewer than 2^32 local identities"))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl PeerId {
    pub fn new(index: usize) -> Self {
        PeerId(u32::try_from(index).expect("fewer than 2^32 peer identities"))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One value per (local identity, peer identity) pair, stored densely.
#[derive(Debug, Clone, Default)]
pub struct PairTable<T> {
    peers: usize,
    values: Vec<T>,
}

impl<T> PairTable<T> {
    /// A table for `locals × peers` pairs, each value made by `value`.
    pub fn new(locals: usize, peers: usize, mut value: impl FnMut(LocalId, PeerId) -> T) -> Self {
        let mut values = Vec::with_capacity(locals * peers);
        for local in 0..locals {
            for peer in 0..peers {
                values.push(value(LocalId::new(local), PeerId::new(peer)));
            }
        }
        PairTable { peers, values }
    }

    /// How many peer identities each local identity has a value for.
    pub fn peer_count(&self) -> usize {
        self.peers
    }

    fn slot(&self, local: LocalId, peer: PeerId) -> usize {
        assert!(
            peer.index() < self.peers,
            "peer index {} out of range ({} peers)",
            peer.index(),
            self.peers
        );
        local.index() * self.peers + peer.index()
    }

    #[inline]
    pub fn get(&self, local: LocalId, peer: PeerId) -> &T {
        &self.values[self.slot(local, peer)]
    }

    #[inline]
    pub fn get_mut(&mut self, local: LocalId, peer: PeerId) -> &mut T {
        let slot = self.slot(local, peer);
        &mut self.values[slot]
    }

    /// Every pair with its value, local identities in order, peers in order within each.
    pub fn iter(&self) -> impl Iterator<Item = (LocalId, PeerId, &T)> + '_ {
        let peers = self.peers.max(1);
        self.values.iter().enumerate().map(move |(slot, value)| {
            (LocalId::new(slot / peers), PeerId::new(slot % peers), value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_kept_apart() {
        let mut table = PairTable::new(2, 3, |l, p| (l.index(), p.index()));
        assert_eq!(*table.get(LocalId::new(1), PeerId::new(2)), (1, 2));
        *table.get_mut(LocalId::new(0), PeerId::new(1)) = (9, 9);
        assert_eq!(*table.get(LocalId::new(0), PeerId::new(1)), (9, 9));
        assert_eq!(*table.get(LocalId::new(1), PeerId::new(1)), (1, 1));
        let order: Vec<(usize, usize)> = table
            .iter()
            .map(|(l, p, _)| (l.index(), p.index()))
            .collect();
        assert_eq!(order, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn a_peer_out_of_range_is_not_read_as_another_pair() {
        let table = PairTable::new(2, 3, |_, _| ());
        table.get(LocalId::new(0), PeerId::new(3));
    }
}
