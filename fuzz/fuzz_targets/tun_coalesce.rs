//! The TUN write coalescer on mixes of TCP segments and UDP datagrams of three flows,
//! chosen by the input (gaps, flags, windows, truncations, flipped bits): no panic, no
//! write past 64 KiB, and the writes cut up again as the kernel would give back every
//! flow's packets exactly and in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::testbed::coalesce_probe::probe_coalescing;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = probe_coalescing(data) {
        panic!("{broken}");
    }
});
