//! Longest-prefix-match tables over IPv4 and IPv6 prefixes.
//!
//! Used for source address → local identity and destination address → peer identity.

use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A map from IP prefixes to values with longest-prefix-match lookup, for IPv4 and IPv6.
///
/// Prefixes are stored by their network address: inserting `10.0.0.1/24` stores
/// `10.0.0.0/24` (host bits are dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct PrefixTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PrefixTable<T> {
    pub fn new() -> Self {
        PrefixTable {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }

    /// Inserts a prefix; returns the value it replaces, if the same prefix was present.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n, value),
            IpNet::V6(n) => self.v6.insert(n, value),
        }
    }

    /// Removes an exact prefix.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(&n),
            IpNet::V6(n) => self.v6.remove(&n),
        }
    }

    /// The value stored for exactly this prefix.
    pub fn get(&self, net: &IpNet) -> Option<&T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(&n),
            IpNet::V6(n) => self.v6.get(&n),
        }
    }

    /// The most specific prefix containing `addr`, with its value. Does not allocate.
    #[inline]
    pub fn longest_match(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        match addr {
            IpAddr::V4(a) => {
                let host = Ipv4Net::from(a);
                self.v4.get_lpm(&host).map(|(n, v)| (IpNet::V4(n), v))
            }
            IpAddr::V6(a) => {
                let host = Ipv6Net::from(a);
                self.v6.get_lpm(&host).map(|(n, v)| (IpNet::V6(n), v))
            }
        }
    }

    /// All entries: IPv4 first, then IPv6, each in lexicographic prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> + '_ {
        self.v4
            .iter()
            .map(|(n, v)| (IpNet::V4(n), v))
            .chain(self.v6.iter().map(|(n, v)| (IpNet::V6(n), v)))
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
}

impl<T> FromIterator<(IpNet, T)> for PrefixTable<T> {
    fn from_iter<I: IntoIterator<Item = (IpNet, T)>>(iter: I) -> Self {
        let mut table = PrefixTable::new();
        table.extend(iter);
        table
    }
}

impl<T> Extend<(IpNet, T)> for PrefixTable<T> {
    fn extend<I: IntoIterator<Item = (IpNet, T)>>(&mut self, iter: I) {
        for (net, value) in iter {
            self.insert(net, value);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PrefixTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Whether two prefixes share at least one address (for CIDR prefixes: one contains the
/// other). Prefixes of different address families never overlap.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    match (a, b) {
        (IpNet::V4(a), IpNet::V4(b)) => a.contains(&b.network()) || b.contains(&a.network()),
        (IpNet::V6(a), IpNet::V6(b)) => a.contains(&b.network()) || b.contains(&a.network()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_v4_prefixes() {
        let mut t = PrefixTable::new();
        assert!(t.is_empty());
        assert_eq!(t.insert(net("10.0.0.0/8"), "eight"), None);
        assert_eq!(t.insert(net("10.1.0.0/16"), "sixteen"), None);
        assert_eq!(t.insert(net("10.1.2.3/32"), "host"), None);
        assert_eq!(t.insert(net("0.0.0.0/0"), "default"), None);
        assert_eq!(t.len(), 4);

        assert_eq!(
            t.longest_match(ip("10.1.2.3")),
            Some((net("10.1.2.3/32"), &"host"))
        );
        assert_eq!(
            t.longest_match(ip("10.1.2.4")),
            Some((net("10.1.0.0/16"), &"sixteen"))
        );
        assert_eq!(
            t.longest_match(ip("10.2.0.1")),
            Some((net("10.0.0.0/8"), &"eight"))
        );
        assert_eq!(
            t.longest_match(ip("192.0.2.1")),
            Some((net("0.0.0.0/0"), &"default"))
        );
        // No IPv6 entries: an IPv6 address matches nothing, not the IPv4 default route.
        assert_eq!(t.longest_match(ip("::1")), None);

        assert_eq!(t.insert(net("10.1.0.0/16"), "replaced"), Some("sixteen"));
        assert_eq!(t.len(), 4);
        assert_eq!(t.get(&net("10.1.0.0/16")), Some(&"replaced"));
        assert_eq!(t.remove(&net("10.1.2.3/32")), Some("host"));
        assert_eq!(
            t.longest_match(ip("10.1.2.3")),
            Some((net("10.1.0.0/16"), &"replaced"))
        );
    }

    #[test]
    fn nested_v6_prefixes() {
        let mut t = PrefixTable::new();
        t.insert(net("fd00::/8"), 1);
        t.insert(net("fd00:1::/32"), 2);
        t.insert(net("fd00:1::5/128"), 3);
        t.insert(net("10.0.0.0/8"), 4);
        assert_eq!(t.len(), 4);
        assert_eq!(
            t.longest_match(ip("fd00:1::5")),
            Some((net("fd00:1::5/128"), &3))
        );
        assert_eq!(
            t.longest_match(ip("fd00:1::6")),
            Some((net("fd00:1::/32"), &2))
        );
        assert_eq!(t.longest_match(ip("fd12::1")), Some((net("fd00::/8"), &1)));
        assert_eq!(t.longest_match(ip("fe80::1")), None);
        // IPv4-mapped IPv6 addresses are IPv6 addresses: no match against 10/8.
        assert_eq!(t.longest_match(ip("::ffff:10.0.0.1")), None);
        assert_eq!(
            t.longest_match(ip("10.0.0.1")),
            Some((net("10.0.0.0/8"), &4))
        );
    }

    #[test]
    fn host_bits_are_dropped_and_iteration_is_ordered() {
        let mut t = PrefixTable::new();
        t.insert(net("fd00::1/64"), 'c');
        t.insert(net("10.0.0.7/24"), 'b');
        t.insert(net("10.0.0.0/8"), 'a');
        assert_eq!(t.get(&net("10.0.0.0/24")), Some(&'b'));
        let all: Vec<_> = t.iter().collect();
        assert_eq!(
            all,
            vec![
                (net("10.0.0.0/8"), &'a'),
                (net("10.0.0.0/24"), &'b'),
                (net("fd00::/64"), &'c'),
            ]
        );
        let copy: PrefixTable<char> = t.iter().map(|(n, v)| (n, *v)).collect();
        assert_eq!(copy, t);
        assert_eq!(format!("{t:?}").matches("=>").count(), 0);
        assert!(format!("{t:?}").contains("10.0.0.0/24: 'b'"));
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn overlap() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("0.0.0.0/0"), &net("192.0.2.1/32")));
        assert!(!overlaps(&net("10.1.0.0/16"), &net("10.2.0.0/16")));
        assert!(!overlaps(&net("10.1.1.1/32"), &net("10.1.1.2/32")));
        assert!(!overlaps(&net("0.0.0.0/0"), &net("::/0")));
        assert!(overlaps(&net("fd00::/8"), &net("fd00:1::1/128")));
        assert!(!overlaps(&net("fd00::/16"), &net("fd01::/16")));
        // Host bits do not matter.
        assert!(overlaps(&net("10.0.0.9/24"), &net("10.0.0.200/32")));
    }
}
