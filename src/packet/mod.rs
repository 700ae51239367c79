//! Zero-copy views of IP packets: just what routing and filtering need.
//!
//! IPv6 extension headers are walked by hand (a bounded loop over the five kinds the
//! kernel processes), in the same pass that reads the fragment fields; a parsing crate
//! would add a second walk for those fields and no safety.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) mod coalesce;

/// The addressing facts of an IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpHeader {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The packet's own idea of its length (total length), never more than the buffer.
    pub len: usize,
    /// Offset of the transport header, when the packet has one this view can reach: not
    /// in a later fragment, and not behind an extension chain that could not be walked.
    transport_offset: Option<usize>,
    /// The protocol of the payload, after any IPv6 extension headers. `None` when the
    /// chain of extension headers could not be walked to its end (too long, cut short):
    /// then nothing is known of what the packet carries.
    pub protocol: Option<u8>,
    /// Set when the packet is one fragment of a larger datagram.
    pub fragment: Option<Fragment>,
}

/// Where a fragment sits in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fragment {
    /// The datagram's identification (16 bits in IPv4, 32 in IPv6).
    pub id: u32,
    /// Byte offset of this fragment's data in the datagram; 0 for the first fragment.
    pub offset: usize,
    /// More fragments follow.
    pub more: bool,
}

/// At most this many IPv6 extension headers are walked; a longer chain leaves the
/// payload's protocol unknown.
const MAX_EXTENSION_HEADERS: usize = 8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

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
            Some(PROTO_TCP) if l4.len() >= 20 => {
                const SYN: u8 = 0x02;
                const ACK: u8 = 0x10;
                ports().map_or(Transport::Other, |(s, d)| Transport::Tcp {
                    source_port: s,
                    destination_port: d,
                    opening: l4[13] & (SYN | ACK) == SYN,
                })
            }
            Some(PROTO_UDP) if l4.len() >= 8 => {
                ports().map_or(Transport::Other, |(s, d)| Transport::Udp {
                    source_port: s,
                    destination_port: d,
                })
            }
            Some(protocol @ (PROTO_ICMP | PROTO_ICMPV6)) if l4.len() >= 8 => {
                let echo = match (protocol, l4[0]) {
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
            Some(PROTO_ICMP | PROTO_ICMPV6) => Transport::IcmpOther,
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
            Some(PROTO_ICMP) => matches!(l4.first(), Some(3 | 11 | 12)),
            Some(PROTO_ICMPV6) => matches!(l4.first(), Some(1..=4)),
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
            Some(PROTO_TCP) => Transport::Tcp {
                source_port,
                destination_port,
                opening: false,
            },
            Some(PROTO_UDP) => Transport::Udp {
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
            let flags_and_offset = u16::from_be_bytes([packet[6], packet[7]]);
            let offset = usize::from(flags_and_offset & 0x1fff) * 8;
            let more = flags_and_offset & 0x2000 != 0;
            let fragment = (more || offset != 0).then(|| Fragment {
                id: u32::from(u16::from_be_bytes([packet[4], packet[5]])),
                offset,
                more,
            });
            // Only the first fragment carries the transport header.
            Some(IpHeader {
                source: Ipv4Addr::from(src).into(),
                destination: Ipv4Addr::from(dst).into(),
                len,
                transport_offset: (offset == 0).then_some(header_len),
                protocol: Some(packet[9]),
                fragment,
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let len = fit(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))?;
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            let end = len.min(packet.len());
            let payload = ipv6_payload(&packet[..end], packet[6]);
            Some(IpHeader {
                source: Ipv6Addr::from(src).into(),
                destination: Ipv6Addr::from(dst).into(),
                len,
                transport_offset: payload.offset,
                protocol: payload.protocol,
                fragment: payload.fragment,
            })
        }
        _ => None,
    }
}

/// Where an IPv6 packet's payload starts and what it is, past its extension headers.
struct Ipv6Payload {
    protocol: Option<u8>,
    offset: Option<usize>,
    fragment: Option<Fragment>,
}

/// Walks the extension headers of the IPv6 packet `packet` (cut to its length), whose
/// fixed header names `first` as the next header.
fn ipv6_payload(packet: &[u8], first: u8) -> Ipv6Payload {
    let mut next = first;
    let mut at = 40;
    let mut fragment = None;
    let unknown = |fragment| Ipv6Payload {
        protocol: None,
        offset: None,
        fragment,
    };
    for _ in 0..=MAX_EXTENSION_HEADERS {
        let Some(header) = packet.get(at..at + 8) else {
            // A payload (or a header) shorter than 8 bytes: fine for the protocols that
            // follow, a cut-off chain for an extension header.
            return match next {
                IPV6_HOP_BY_HOP
                | IPV6_ROUTING
                | IPV6_FRAGMENT
                | IPV6_AUTHENTICATION
                | IPV6_DESTINATION_OPTIONS => unknown(fragment),
                protocol => Ipv6Payload {
                    protocol: Some(protocol),
                    offset: Some(at),
                    fragment,
                },
            };
        };
        let header_len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                (usize::from(header[1]) + 1) * 8
            }
            IPV6_AUTHENTICATION => (usize::from(header[1]) + 2) * 4,
            IPV6_FRAGMENT => {
                let offset_and_more = u16::from_be_bytes([header[2], header[3]]);
                let this = Fragment {
                    id: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
                    offset: usize::from(offset_and_more >> 3) * 8,
                    more: offset_and_more & 1 != 0,
                };
                // An "atomic fragment" (offset 0, no more) is a whole datagram.
                if this.offset != 0 || this.more {
                    fragment = Some(this);
                }
                if this.offset != 0 {
                    // A later fragment: the rest of the chain is in the first one.
                    return Ipv6Payload {
                        protocol: Some(header[0]),
                        offset: None,
                        fragment,
                    };
                }
                8
            }
            protocol => {
                return Ipv6Payload {
                    protocol: Some(protocol),
                    offset: Some(at),
                    fragment,
                }
            }
        };
        if at + header_len > packet.len() {
            return unknown(fragment);
        }
        next = header[0];
        at += header_len;
    }
    unknown(fragment)
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
        assert_eq!(inner.protocol, Some(PROTO_TCP));
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

#[cfg(test)]
mod extension_tests {
    use super::*;

    /// An IPv6 packet whose fixed header names `first`, then `rest` (extension headers
    /// and payload).
    fn ipv6(first: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
        p[6] = first;
        p.extend_from_slice(rest);
        p
    }

    const UDP_HEADER: [u8; 8] = [0x9c, 0x40, 0x27, 0x0f, 0, 8, 0, 0];

    #[test]
    fn extension_headers_are_walked_to_the_transport_header() {
        // Hop-by-hop (8 bytes), then Destination Options (16 bytes), then UDP.
        let mut rest = vec![IPV6_DESTINATION_OPTIONS, 0, 1, 4, 0, 0, 0, 0];
        rest.extend_from_slice(&[PROTO_UDP, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        rest.extend_from_slice(&UDP_HEADER);
        let p = ipv6(IPV6_HOP_BY_HOP, &rest);
        let h = parse(&p).unwrap();
        assert_eq!(h.protocol, Some(PROTO_UDP));
        assert_eq!(h.fragment, None);
        assert_eq!(
            h.transport(&p),
            Transport::Udp {
                source_port: 40000,
                destination_port: 9999
            }
        );
        // An Authentication header counts its length in 4-byte units (plus 2).
        let mut rest = vec![PROTO_UDP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&UDP_HEADER);
        let p = ipv6(IPV6_AUTHENTICATION, &rest);
        assert!(matches!(
            parse(&p).unwrap().transport(&p),
            Transport::Udp { .. }
        ));
    }

    #[test]
    fn a_chain_that_cannot_be_walked_leaves_the_protocol_unknown() {
        // Nine Destination Options headers: one more than the walk follows.
        let mut rest = Vec::new();
        for _ in 0..8 {
            rest.extend_from_slice(&[IPV6_DESTINATION_OPTIONS, 0, 1, 4, 0, 0, 0, 0]);
        }
        rest.extend_from_slice(&[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        rest.extend_from_slice(&UDP_HEADER);
        let p = ipv6(IPV6_DESTINATION_OPTIONS, &rest);
        let h = parse(&p).unwrap();
        assert_eq!((h.protocol, h.transport(&p)), (None, Transport::Other));
        // A header whose length runs past the packet.
        let p = ipv6(IPV6_DESTINATION_OPTIONS, &[PROTO_UDP, 5, 1, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&p).unwrap().protocol, None);
        // An extension header cut short.
        let p = ipv6(IPV6_ROUTING, &[PROTO_UDP, 0, 0]);
        assert_eq!(parse(&p).unwrap().protocol, None);
    }

    #[test]
    fn fragments_say_where_they_sit() {
        // A first fragment: offset 0, more, id 9; its UDP header follows.
        let mut rest = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 9];
        rest.extend_from_slice(&UDP_HEADER);
        let p = ipv6(IPV6_FRAGMENT, &rest);
        let h = parse(&p).unwrap();
        let first = Fragment {
            id: 9,
            offset: 0,
            more: true,
        };
        assert_eq!(h.fragment, Some(first));
        assert!(matches!(h.transport(&p), Transport::Udp { .. }));
        // A later fragment: offset 1000 (125 units); no transport header.
        let p = ipv6(
            IPV6_FRAGMENT,
            &[PROTO_UDP, 0, 0x03, 0xe8, 0, 0, 0, 9, 1, 2, 3, 4],
        );
        let h = parse(&p).unwrap();
        assert_eq!(h.protocol, Some(PROTO_UDP));
        assert_eq!(h.fragment.map(|f| (f.offset, f.more)), Some((1000, false)));
        assert_eq!(h.transport(&p), Transport::Other);
        // An atomic fragment (offset 0, no more) is a whole datagram.
        let mut rest = vec![PROTO_UDP, 0, 0, 0, 0, 0, 0, 9];
        rest.extend_from_slice(&UDP_HEADER);
        let p = ipv6(IPV6_FRAGMENT, &rest);
        assert_eq!(parse(&p).unwrap().fragment, None);
        // IPv4: more fragments, and a later fragment at offset 1480.
        let mut v4 = vec![0x45, 0, 0, 28, 0, 7, 0x20, 0, 64, PROTO_UDP, 0, 0];
        v4.extend_from_slice(&[0; 8]);
        v4.extend_from_slice(&UDP_HEADER);
        let h = parse(&v4).unwrap();
        assert_eq!(
            h.fragment,
            Some(Fragment {
                id: 7,
                offset: 0,
                more: true
            })
        );
        v4[6..8].copy_from_slice(&185u16.to_be_bytes());
        let h = parse(&v4).unwrap();
        assert_eq!(h.fragment.map(|f| (f.offset, f.more)), Some((1480, false)));
        assert_eq!(h.transport(&v4), Transport::Other);
    }
}
