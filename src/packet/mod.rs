//! Zero-copy views of IP packets: just what routing and filtering need.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addressing facts of an IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpHeader {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The packet's own idea of its length (total length), never more than the buffer.
    pub len: usize,
    /// Offset of the transport header, when the packet has one this view understands.
    transport_offset: Option<usize>,
    /// IP protocol number (IPv6: the first next-header).
    pub protocol: u8,
}

pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// What a packet carries above IP, as far as flow tracking and policy need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Transport {
    Tcp {
        source_port: u16,
        destination_port: u16,
        /// A SYN without ACK: the first packet of a connection.
        opening: bool,
    },
    Udp {
        source_port: u16,
        destination_port: u16,
    },
    /// ICMP or ICMPv6 echo request (`request`) or reply, with its identifier.
    IcmpEcho { request: bool, identifier: u16 },
    /// Any other ICMP or ICMPv6 message (errors, neighbour discovery, ...).
    IcmpOther,
    /// Another protocol, or a fragment without its transport header.
    Other,
}

impl IpHeader {
    /// The transport layer of `packet` (the same buffer this header was parsed from).
    pub(crate) fn transport(&self, packet: &[u8]) -> Transport {
        let Some(at) = self.transport_offset else {
            return Transport::Other;
        };
        let l4 = &packet[at..self.len];
        let ports = || {
            (l4.len() >= 4).then(|| {
                (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                )
            })
        };
        match self.protocol {
            PROTO_TCP if l4.len() >= 20 => {
                const SYN: u8 = 0x02;
                const ACK: u8 = 0x10;
                ports().map_or(Transport::Other, |(s, d)| Transport::Tcp {
                    source_port: s,
                    destination_port: d,
                    opening: l4[13] & (SYN | ACK) == SYN,
                })
            }
            PROTO_UDP if l4.len() >= 8 => {
                ports().map_or(Transport::Other, |(s, d)| Transport::Udp {
                    source_port: s,
                    destination_port: d,
                })
            }
            PROTO_ICMP | PROTO_ICMPV6 if l4.len() >= 8 => {
                let echo = match (self.protocol, l4[0]) {
                    (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => Some(true),
                    (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => Some(false),
                    _ => None,
                };
                match echo {
                    Some(request) => Transport::IcmpEcho {
                        request,
                        identifier: u16::from_be_bytes([l4[4], l4[5]]),
                    },
                    None => Transport::IcmpOther,
                }
            }
            PROTO_ICMP | PROTO_ICMPV6 => Transport::IcmpOther,
            _ => Transport::Other,
        }
    }

    /// For an ICMP or ICMPv6 error (destination unreachable, packet too big, time
    /// exceeded, parameter problem): the packet it quotes, as far as the error carries
    /// it (addresses, protocol, ports). `None` for anything else.
    pub(crate) fn quoted(&self, packet: &[u8]) -> Option<(IpHeader, Transport)> {
        let at = self.transport_offset?;
        let l4 = &packet[at..self.len];
        let error = match self.protocol {
            PROTO_ICMP => matches!(l4.first(), Some(3 | 11 | 12)),
            PROTO_ICMPV6 => matches!(l4.first(), Some(1..=4)),
            _ => false,
        };
        if !error || l4.len() < 8 {
            return None;
        }
        let inner = &l4[8..];
        let header = parse_header(inner, Length::Truncated)?;
        Some((header, header.quoted_transport(inner)))
    }

    /// Like `transport`, for a quoted packet: at least 8 bytes of its transport header
    /// are present, enough for ports (a TCP segment counts as not opening).
    fn quoted_transport(&self, packet: &[u8]) -> Transport {
        let Some(at) = self.transport_offset else {
            return Transport::Other;
        };
        let l4 = &packet[at..self.len];
        if l4.len() < 4 {
            return Transport::Other;
        }
        let source_port = u16::from_be_bytes([l4[0], l4[1]]);
        let destination_port = u16::from_be_bytes([l4[2], l4[3]]);
        match self.protocol {
            PROTO_TCP => Transport::Tcp {
                source_port,
                destination_port,
                opening: false,
            },
            PROTO_UDP => Transport::Udp {
                source_port,
                destination_port,
            },
            _ => self.transport(packet),
        }
    }
}

/// Whether a header's length field must fit the buffer (a whole packet) or may run past
/// it (a packet quoted, cut short, in an ICMP error).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Length {
    Whole,
    Truncated,
}

/// Parses the header of the IP packet at the start of `packet`; `None` if it is not a
/// well-formed IPv4 or IPv6 packet that fits in the buffer.
pub(crate) fn parse(packet: &[u8]) -> Option<IpHeader> {
    parse_header(packet, Length::Whole)
}

fn parse_header(packet: &[u8], length: Length) -> Option<IpHeader> {
    // A quoted packet's length field counts bytes the error left out.
    let fit = |len: usize| match length {
        Length::Whole => (len <= packet.len()).then_some(len),
        Length::Truncated => Some(len.min(packet.len())),
    };
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 {
                return None;
            }
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header_len < 20 || len < header_len || packet.len() < header_len {
                return None;
            }
            let len = fit(len)?;
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            // Only the first fragment carries the transport header.
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            Some(IpHeader {
                source: Ipv4Addr::from(src).into(),
                destination: Ipv4Addr::from(dst).into(),
                len,
                transport_offset: (fragment_offset == 0).then_some(header_len),
                protocol: packet[9],
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let len = fit(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))?;
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            // Extension headers are not walked: such packets count as `Transport::Other`.
            let protocol = packet[6];
            let known = matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6);
            Some(IpHeader {
                source: Ipv6Addr::from(src).into(),
                destination: Ipv6Addr::from(dst).into(),
                len,
                transport_offset: known.then_some(40),
                protocol,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[9] = protocol;
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn transports() {
        let mut tcp = [0u8; 20];
        tcp[..4].copy_from_slice(&[0x1f, 0x90, 0x00, 0x50]);
        let p = ipv4(PROTO_TCP, &tcp);
        let t = parse(&p).unwrap().transport(&p);
        assert_eq!(
            t,
            Transport::Tcp {
                source_port: 8080,
                destination_port: 80,
                opening: false
            }
        );
        tcp[13] = 0x02;
        let p = ipv4(PROTO_TCP, &tcp);
        assert!(matches!(
            parse(&p).unwrap().transport(&p),
            Transport::Tcp { opening: true, .. }
        ));
        tcp[13] = 0x12;
        let p = ipv4(PROTO_TCP, &tcp);
        assert!(matches!(
            parse(&p).unwrap().transport(&p),
            Transport::Tcp { opening: false, .. }
        ));
        tcp[13] = 0;
        let p = ipv4(PROTO_TCP, &tcp[..10]);
        assert_eq!(
            parse(&p).unwrap().transport(&p),
            Transport::Other,
            "truncated"
        );
        let p = ipv4(PROTO_UDP, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        assert_eq!(
            parse(&p).unwrap().transport(&p),
            Transport::Udp {
                source_port: 53,
                destination_port: 12345
            }
        );
        let p = ipv4(PROTO_ICMP, &[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        assert_eq!(
            parse(&p).unwrap().transport(&p),
            Transport::IcmpEcho {
                request: true,
                identifier: 0x1234
            }
        );
        let p = ipv4(PROTO_ICMP, &[3, 4, 0, 0, 0, 0, 5, 0xdc]);
        assert_eq!(parse(&p).unwrap().transport(&p), Transport::IcmpOther);
        let mut frag = ipv4(PROTO_UDP, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        frag[7] = 10;
        assert_eq!(
            parse(&frag).unwrap().transport(&frag),
            Transport::Other,
            "later fragment"
        );
        let p = ipv4(47, &[0; 8]);
        assert_eq!(parse(&p).unwrap().transport(&p), Transport::Other);
    }

    /// An ICMP error quoting `quoted`, cut to its IP header and 8 more bytes.
    fn icmp_error(icmp_type: u8, quoted: &[u8]) -> Vec<u8> {
        let mut l4 = vec![icmp_type, 4, 0, 0, 0, 0, 5, 0xdc];
        l4.extend_from_slice(&quoted[..28.min(quoted.len())]);
        ipv4(PROTO_ICMP, &l4)
    }

    #[test]
    fn icmp_errors_quote_their_packet() {
        let mut tcp = ipv4(
            PROTO_TCP,
            &[0x1f, 0x90, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02],
        );
        tcp.resize(20 + 20 + 100, 0);
        tcp[2..4].copy_from_slice(&140u16.to_be_bytes());
        tcp[12..16].copy_from_slice(&[10, 0, 0, 1]);
        tcp[16..20].copy_from_slice(&[10, 0, 0, 2]);
        // Destination unreachable (fragmentation needed), quoting 28 of 140 bytes.
        let error = icmp_error(3, &tcp);
        let outer = parse(&error).unwrap();
        assert_eq!(outer.transport(&error), Transport::IcmpOther);
        let (inner, transport) = outer.quoted(&error).expect("quoted packet");
        assert_eq!(inner.source, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(inner.destination, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(inner.protocol, PROTO_TCP);
        assert_eq!(
            transport,
            Transport::Tcp {
                source_port: 8080,
                destination_port: 80,
                opening: false
            }
        );
        // Time exceeded and parameter problem quote too; echo and redirect do not.
        assert!(parse(&icmp_error(11, &tcp))
            .unwrap()
            .quoted(&icmp_error(11, &tcp))
            .is_some());
        assert!(parse(&icmp_error(12, &tcp))
            .unwrap()
            .quoted(&icmp_error(12, &tcp))
            .is_some());
        for not_error in [0, 5, 8] {
            let p = icmp_error(not_error, &tcp);
            assert_eq!(parse(&p).unwrap().quoted(&p), None, "type {not_error}");
        }
        // Too short to hold a quoted IP header.
        let p = ipv4(PROTO_ICMP, &[3, 1, 0, 0, 0, 0, 0, 0, 0x45, 0]);
        assert_eq!(parse(&p).unwrap().quoted(&p), None);
        // A quoted UDP header cut to its ports still gives them.
        let mut udp = ipv4(PROTO_UDP, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        udp[2..4].copy_from_slice(&1000u16.to_be_bytes());
        let p = icmp_error(3, &udp[..24]);
        assert_eq!(
            parse(&p).unwrap().quoted(&p).map(|(_, t)| t),
            Some(Transport::Udp {
                source_port: 53,
                destination_port: 12345
            })
        );
        // A packet that is not an error is not parsed as one by a whole-packet parse.
        assert_eq!(parse(&tcp[..40]), None, "length beyond the buffer");
    }

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
        assert_eq!(h.transport(&v6), Transport::Other);
        assert_eq!(parse(&[0x50; 60]), None);
        assert_eq!(parse(&[]), None);
    }
}
