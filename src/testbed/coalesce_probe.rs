//! The TUN write coalescer on mixes of segments the fuzzer picks, for the `tun_coalesce`
//! fuzz target: the bytes choose flows, sizes, flags, gaps, windows, truncations and
//! flipped bits, so most inputs reach the joining rules rather than the first length
//! check.

use arbitrary::Unstructured;

use crate::packet::coalesce::model::{check_mix, random_mix};

/// Builds a mix from `bytes`, coalesces it and cuts the writes up again as the kernel
/// would; an error names what did not come back (a panic would fail too).
pub fn probe_coalescing(bytes: &[u8]) -> Result<(), String> {
    let mut choices = Unstructured::new(bytes);
    let mut next = |bound: u64| {
        choices
            .int_in_range(0..=bound.saturating_sub(1))
            .unwrap_or(0)
    };
    let (packets, udp) = random_mix(&mut next);
    check_mix(&packets, udp)
}
