//! The TUN write coalescer on mixes of segments the fuzzer picks, for the `tun_coalesce`
//! fuzz target: the bytes choose flows, sizes, flags, gaps, windows, truncations and
//! flipped bits, so most inputs reach the joining rules rather than the first length
//! check; the bytes it leaves over go in as one raw packet.

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
    let (mut packets, udp) = random_mix(&mut next);
    // What the choices left is a packet of its own, raw, among the others.
    let raw = choices.take_rest();
    if !raw.is_empty() {
        let at = usize::from(raw[0]) % (packets.len() + 1);
        packets.insert(at, raw.to_vec());
    }
    check_mix(&packets, udp)
}
