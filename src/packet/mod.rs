//! Zero-copy views of IP packets: just what routing and filtering need.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addressing facts of an IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The packet's own idea of its length (total length), never more than the buffer.
    pub len: usize,
}

/// Parses the header of the IP packet at the start of `packet`; `None` if it is not a
/// well-formed IPv4 or IPv6 packet that fits in the buffer.
pub fn parse(packet: &[u8]) -> Option<IpHeader> {
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 {
                return None;
            }
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header_len < 20 || len < header_len || len > packet.len() {
                return None;
            }
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(IpHeader {
                source: Ipv4Addr::from(src).into(),
                destination: Ipv4Addr::from(dst).into(),
                len,
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let len = 40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if len > packet.len() {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(IpHeader {
                source: Ipv6Addr::from(src).into(),
                destination: Ipv6Addr::from(dst).into(),
                len,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_ipv6_headers() {
        let mut v4 = [0u8; 28];
        v4[0] = 0x45;
        v4[3] = 24;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let h = parse(&v4).unwrap();
        assert_eq!(h.source, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.destination, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(h.len, 24, "padding after the packet is not part of it");
        v4[3] = 40;
        assert_eq!(parse(&v4), None, "length beyond the buffer");

        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        v6[23] = 1;
        v6[39] = 2;
        let h = parse(&v6).unwrap();
        assert_eq!(h.source, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(h.destination, "::2".parse::<IpAddr>().unwrap());
        assert_eq!(h.len, 48);
        assert_eq!(parse(&v6[..39]), None);
        assert_eq!(parse(&[0x50; 60]), None);
        assert_eq!(parse(&[]), None);
    }
}
