//! The IP packet parser on arbitrary bytes, for the `quoted_packet` fuzz target: as a
//! packet of its own, and as the packet an ICMPv4 and an ICMPv6 error quote (wrapped in
//! well-formed outer headers, so every input reaches the quoted-packet parser).

use crate::packet::{parse, IpHeader};

/// Parses `bytes` whole and quoted in both ICMP errors; an error names an invariant
/// that broke (a panic would too).
pub fn probe_packet(bytes: &[u8]) -> Result<(), String> {
    check(bytes)?;
    check(&icmpv4_error(bytes))?;
    check(&icmpv6_error(bytes))
}

fn check(packet: &[u8]) -> Result<(), String> {
    let Some(header) = parse(packet) else {
        return Ok(());
    };
    if header.len > packet.len() {
        return Err(format!(
            "length {} past the {} bytes",
            header.len,
            packet.len()
        ));
    }
    if header.source.is_ipv4() != header.destination.is_ipv4() {
        return Err(format!("mixed families: {header:?}"));
    }
    let _ = header.transport(packet);
    if let Some((quoted, _)) = header.quoted(packet) {
        check_quoted(&header, &quoted)?;
    }
    Ok(())
}

fn check_quoted(outer: &IpHeader, quoted: &IpHeader) -> Result<(), String> {
    if quoted.source.is_ipv4() != quoted.destination.is_ipv4() {
        return Err(format!("quoted packet of mixed families: {quoted:?}"));
    }
    if quoted.len > outer.len {
        return Err(format!(
            "quoted length {} past the error's {}",
            quoted.len, outer.len
        ));
    }
    Ok(())
}

/// `inner` quoted in an ICMPv4 "port unreachable" from 192.0.2.1 to 192.0.2.2.
fn icmpv4_error(inner: &[u8]) -> Vec<u8> {
    let inner = &inner[..inner.len().min(65_535 - 28)];
    let total = (20 + 8 + inner.len()) as u16;
    let mut packet = vec![
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
    ];
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(inner);
    packet
}

/// `inner` quoted in an ICMPv6 "port unreachable" from 2001:db8::1 to 2001:db8::2.
fn icmpv6_error(inner: &[u8]) -> Vec<u8> {
    let inner = &inner[..inner.len().min(65_535 - 8)];
    let payload = (8 + inner.len()) as u16;
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&payload.to_be_bytes());
    packet.extend_from_slice(&[58, 64]);
    for last in [1u8, 2] {
        packet.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        packet.extend_from_slice(&[0; 11]);
        packet.push(last);
    }
    packet.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(inner);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wrappers make errors the parser reads as errors, quoting what they carry.
    #[test]
    fn the_wrapped_errors_quote_their_packet() {
        let mut udp = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        udp.extend_from_slice(&[0x30, 0x39, 0x23, 0x28, 0, 8, 0, 0]);
        for error in [icmpv4_error(&udp), icmpv6_error(&udp)] {
            let header = parse(&error).expect("the error parses");
            let (quoted, transport) = header.quoted(&error).expect("an error quotes");
            assert_eq!(
                quoted.destination,
                "10.0.0.2".parse::<std::net::IpAddr>().unwrap()
            );
            assert_eq!(
                transport,
                crate::packet::Transport::Udp {
                    source_port: 12345,
                    destination_port: 9000
                }
            );
        }
        assert!(probe_packet(&udp).is_ok());
    }
}
