//! The IP packet parser on any bytes, whole and as the packet an ICMPv4 and an ICMPv6
//! error quote (IPv4 options, IPv6 extension headers, fragments, truncation): no panic,
//! and lengths stay within the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::testbed::packet_probe::probe_packet;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = probe_packet(data) {
        panic!("{broken}");
    }
});
