//! Handshake messages per source address: a token bucket each, with wireguard-go's and
//! the kernel's numbers (20 a second, bursts of 5). The device asks it only under load,
//! after mac2 proved the address, and before any Diffie-Hellman work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::RandomState;

/// Time one handshake message costs a source.
const MESSAGE_COST: Duration = Duration::from_millis(50);
/// Messages a quiet source may send at once.
const BURST: u32 = 5;
/// Sources tracked at once; a new source finds no room while the table is full of
/// sources seen within the last second.
const MAX_SOURCES: usize = 16_384;
/// Sources quiet for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(1);

/// A source: an IPv4 address, or an IPv6 /64 (one host often holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(u128);

impl Source {
    fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => Source(u128::from(v6) & !u128::from(u64::MAX) | 1 << 127),
        }
    }
}

struct Bucket {
    /// Credit in time: each message costs MESSAGE_COST, earned back as time passes.
    credit: Duration,
    last: Instant,
}

pub(crate) struct RateLimiter {
    buckets: HashMap<Source, Bucket, RandomState>,
    last_sweep: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(hash_state: RandomState) -> Self {
        RateLimiter {
            buckets: HashMap::with_hasher(hash_state),
            last_sweep: None,
        }
    }

    /// Whether a handshake message from `address` may be processed now.
    pub(crate) fn allow(&mut self, now: Instant, address: IpAddr) -> bool {
        let max_credit = MESSAGE_COST * BURST;
        let source = Source::of(address);
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.sweep(now);
            if self.buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            credit: max_credit,
            last: now,
        });
        bucket.credit =
            (bucket.credit + now.saturating_duration_since(bucket.last)).min(max_credit);
        bucket.last = now;
        if bucket.credit < MESSAGE_COST {
            return false;
        }
        bucket.credit -= MESSAGE_COST;
        true
    }

    /// Forgets quiet sources, at most once a second (a full table of busy sources must
    /// not make every message scan it).
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|at| now.saturating_duration_since(at) < FORGET_AFTER)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_a_steady_rate_per_source() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(RandomState::with_seeds(1, 2, 3, 4));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let allowed = (0..20).filter(|_| limiter.allow(now, a)).count();
        assert_eq!(allowed, BURST as usize, "a burst, then nothing");
        assert!(limiter.allow(now, b), "another source has its own bucket");
        assert!(!limiter.allow(now + Duration::from_millis(49), a));
        assert!(
            limiter.allow(now + Duration::from_millis(100), a),
            "earned back"
        );
        // One host's IPv6 /64 is one source.
        let v6a: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let v6b: IpAddr = "fd00:1:2:3::2".parse().unwrap();
        let in_burst = (0..3).filter(|_| limiter.allow(now, v6a)).count()
            + (0..3).filter(|_| limiter.allow(now, v6b)).count();
        assert_eq!(in_burst, BURST as usize);
    }
}
