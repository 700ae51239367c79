//! Packets on their way to the TUN device, joined the way the kernel's GRO joins them:
//! consecutive TCP segments of one flow (and UDP datagrams, where the device takes UDP
//! segmentation) become one super packet behind a virtio-net header, written in one
//! system call.
//!
//! Each packet is copied once, from the buffer it was decrypted in to the write it
//! joins; nothing is allocated after construction. A segment joins only where the
//! kernel's own GRO would have joined it: equal headers but for lengths and checksums,
//! the next sequence number (and IPv4 identification), no TCP flag but ACK (a PSH ends
//! the run), and a valid checksum, so that a corrupt segment is never turned into part of
//! a valid super packet.
//! Anything else is written alone, unchanged, for the kernel to judge.

use tun_rs::{checksum, checksum_no_fold, VIRTIO_NET_HDR_LEN};

use super::{PROTO_ICMPV6, PROTO_TCP as TCP, PROTO_UDP as UDP};

/// The largest IP packet (its total length is 16 bits).
const MAX_SUPER_PACKET: usize = 65535;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
/// Segments per super packet: 64 UDP segments in one GSO packet is what every kernel
/// with USO accepts (newer ones take 128).
const MAX_SEGMENTS: usize = 64;

// The virtio-net header (the kernel's `struct virtio_net_hdr`, native byte order).
const VIRTIO_NEEDS_CSUM: u8 = 1;
const VIRTIO_GSO_TCPV4: u8 = 1;
const VIRTIO_GSO_TCPV6: u8 = 4;
const VIRTIO_GSO_UDP_L4: u8 = 5;

/// Writes for the TUN device: up to `capacity` packets or super packets, each behind
/// room for the virtio-net header when the device has one.
pub(crate) struct Coalescer {
    writes: Vec<Vec<u8>>,
    runs: Vec<Run>,
    /// The device reads a virtio-net header in front of each packet (offload on).
    virtio: bool,
    /// The device takes UDP segmentation (USO), so UDP datagrams may be joined too.
    udp: bool,
    /// Joining is on (it is turned off for good if the kernel refuses a super packet).
    joining: bool,
}

/// What a write holds: its first packet's layout and how far the run has come.
#[derive(Clone, Copy)]
struct Run {
    /// The first packet's flow, when it is TCP or UDP behind a plain IP header.
    flow: Option<Flow>,
    /// `None`: a packet written alone.
    joinable: Option<Joinable>,
    segments: usize,
    /// A PSH or a shorter segment ended the run.
    closed: bool,
}

/// A TCP or UDP packet's layout: enough to compare addresses and ports.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Flow {
    protocol: u8,
    ip_header: usize,
}

/// The layout of a TCP segment or UDP datagram that may start or join a run.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Joinable {
    protocol: u8,
    ip_header: usize,
    /// IP and transport headers.
    headers: usize,
    /// Payload bytes of the first segment: every segment but the last has this many.
    segment: usize,
    /// The sequence number the next TCP segment must carry.
    next_sequence: u32,
}

impl Coalescer {
    pub(crate) fn new(capacity: usize, virtio: bool, udp: bool) -> Self {
        Coalescer {
            writes: (0..capacity)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + MAX_SUPER_PACKET))
                .collect(),
            runs: Vec::with_capacity(capacity),
            virtio,
            udp,
            joining: virtio,
        }
    }

    /// Writes every packet alone from now on: for a kernel that refuses super packets
    /// (some kernels answered valid ones with EINVAL).
    pub(crate) fn stop_joining(&mut self) {
        self.joining = false;
    }

    /// No room for a packet that joins no run: write out and clear first.
    pub(crate) fn is_full(&self) -> bool {
        self.runs.len() == self.writes.len()
    }

    /// Adds `packet` (a whole IP packet) to the latest run of its flow, or to a write of
    /// its own. Call only when not `is_full`.
    pub(crate) fn push(&mut self, packet: &[u8]) {
        let flow = if self.joining { flow_of(packet) } else { None };
        let joinable = flow.and_then(|flow| self.joinable(packet, flow));
        if flow.is_none() && self.joining && may_carry_tcp_or_udp(packet) {
            // A packet whose ports cannot be read (IP options, extension headers) may
            // belong to any flow between its addresses: nothing after it joins a run
            // before it.
            self.close_runs_between(packet);
        }
        if let (Some(flow), Some(candidate)) = (flow, joinable) {
            if let Some(index) = self.latest_run_of_flow(packet, flow) {
                if self.join(index, packet, &candidate) {
                    return;
                }
            }
        }
        let index = self.runs.len();
        let write = &mut self.writes[index];
        write.clear();
        if self.virtio {
            write.extend_from_slice(&[0; VIRTIO_NET_HDR_LEN]);
        }
        write.extend_from_slice(packet);
        let closed = joinable.is_none_or(|j| j.protocol == TCP && tcp_flags(packet, &j) != TCP_ACK);
        self.runs.push(Run {
            flow,
            joinable,
            segments: 1,
            closed,
        });
    }

    /// The writes, each run made a valid super packet, with how many packets each
    /// carries (more than one: a super packet of joined segments); then empty again.
    pub(crate) fn finish(&mut self) -> impl Iterator<Item = (&[u8], usize)> {
        for (write, run) in self.writes.iter_mut().zip(&self.runs) {
            if let (Some(joinable), true) = (run.joinable, run.segments > 1) {
                seal_super_packet(write, &joinable);
            }
        }
        self.writes
            .iter()
            .map(Vec::as_slice)
            .zip(self.runs.drain(..).map(|run| run.segments))
    }

    fn close_runs_between(&mut self, packet: &[u8]) {
        let Some(between) = ip_addresses(packet) else {
            return;
        };
        let offset = self.offset();
        for (write, run) in self.writes.iter().zip(self.runs.iter_mut()) {
            if ip_addresses(&write[offset..]) == Some(between) {
                run.closed = true;
            }
        }
    }

    fn offset(&self) -> usize {
        if self.virtio {
            VIRTIO_NET_HDR_LEN
        } else {
            0
        }
    }

    /// A TCP segment (or UDP datagram, with USO) with a payload, not a fragment, with a
    /// valid checksum and, for TCP, ACK set and no flag but PSH beside it.
    fn joinable(&self, packet: &[u8], flow: Flow) -> Option<Joinable> {
        let Flow {
            protocol,
            ip_header,
        } = flow;
        if ip_header == IPV4_HEADER {
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
            // A header the kernel would refuse must not be rewritten into one it accepts.
            if fragment || checksum(&packet[..IPV4_HEADER], 0) != 0xffff {
                return None;
            }
        }
        let transport = &packet[ip_header..];
        let (headers, next_sequence) = match protocol {
            TCP if transport.len() >= 20 => {
                let len = usize::from(transport[12] >> 4) * 4;
                let flags = transport[13];
                if len < 20 || len > transport.len() || flags & !TCP_PSH != TCP_ACK {
                    return None;
                }
                let sequence =
                    u32::from_be_bytes([transport[4], transport[5], transport[6], transport[7]]);
                let payload = transport.len() - len;
                (ip_header + len, sequence.wrapping_add(payload as u32))
            }
            UDP if self.udp && transport.len() >= UDP_HEADER => {
                let len = usize::from(u16::from_be_bytes([transport[4], transport[5]]));
                let unset = transport[6] == 0 && transport[7] == 0;
                if len != transport.len() || unset {
                    return None;
                }
                (ip_header + UDP_HEADER, 0)
            }
            _ => return None,
        };
        let segment = packet.len() - headers;
        if segment == 0 || !transport_checksum_valid(packet, protocol, ip_header) {
            return None;
        }
        Some(Joinable {
            protocol,
            ip_header,
            headers,
            segment,
            next_sequence,
        })
    }

    /// The newest write whose first packet is of the same flow (addresses, protocol,
    /// ports), joinable or not: a segment never joins a run older than that.
    fn latest_run_of_flow(&self, packet: &[u8], flow: Flow) -> Option<usize> {
        let offset = self.offset();
        let at = flow.ip_header;
        self.runs.iter().enumerate().rev().find_map(|(index, run)| {
            let head = &self.writes[index][offset..];
            let same = run.flow == Some(flow)
                && addresses(head, at) == addresses(packet, at)
                && head[at..at + 4] == packet[at..at + 4];
            same.then_some(index)
        })
    }

    /// Appends `packet`'s payload to the run at `index` if it continues it.
    fn join(&mut self, index: usize, packet: &[u8], candidate: &Joinable) -> bool {
        let offset = self.offset();
        let run = self.runs[index];
        let Some(mut joinable) = run.joinable else {
            return false;
        };
        let write = &mut self.writes[index];
        let head = &write[offset..];
        let payload = &packet[candidate.headers..];
        let fits = !run.closed
            && run.segments < MAX_SEGMENTS
            && candidate.headers == joinable.headers
            && payload.len() <= joinable.segment
            && head.len() + payload.len() <= MAX_SUPER_PACKET
            && same_ip_fields(head, packet, joinable.ip_header)
            && next_ipv4_id(head, packet, joinable.ip_header, run.segments)
            && match joinable.protocol {
                TCP => {
                    let sequence = u32::from_be_bytes([
                        packet[joinable.ip_header + 4],
                        packet[joinable.ip_header + 5],
                        packet[joinable.ip_header + 6],
                        packet[joinable.ip_header + 7],
                    ]);
                    sequence == joinable.next_sequence && same_tcp_fields(head, packet, &joinable)
                }
                _ => true,
            };
        if !fits {
            return false;
        }
        write.extend_from_slice(payload);
        let pushed = joinable.protocol == TCP && tcp_flags(packet, candidate) & TCP_PSH != 0;
        if pushed {
            write[offset + joinable.ip_header + 13] |= TCP_PSH;
        }
        joinable.next_sequence = candidate.next_sequence;
        self.runs[index] = Run {
            joinable: Some(joinable),
            flow: run.flow,
            segments: run.segments + 1,
            closed: pushed || payload.len() < joinable.segment,
        };
        true
    }
}

/// The flow layout of a TCP or UDP packet behind an IPv4 header without options or an
/// IPv6 header without extensions, whose lengths agree with the buffer.
fn flow_of(packet: &[u8]) -> Option<Flow> {
    let (protocol, ip_header) = match packet.first()? >> 4 {
        4 if packet.len() >= IPV4_HEADER => {
            let whole = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if packet[0] & 0x0f != 5 || whole != packet.len() {
                return None;
            }
            (packet[9], IPV4_HEADER)
        }
        6 if packet.len() >= IPV6_HEADER => {
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload + IPV6_HEADER != packet.len() {
                return None;
            }
            (packet[6], IPV6_HEADER)
        }
        _ => return None,
    };
    let long_enough = packet.len() >= ip_header + 4;
    ((protocol == TCP || protocol == UDP) && long_enough).then_some(Flow {
        protocol,
        ip_header,
    })
}

/// The source and destination address bytes of any IPv4 or IPv6 packet.
fn ip_addresses(packet: &[u8]) -> Option<&[u8]> {
    match packet.first()? >> 4 {
        4 if packet.len() >= IPV4_HEADER => Some(addresses(packet, IPV4_HEADER)),
        6 if packet.len() >= IPV6_HEADER => Some(addresses(packet, IPV6_HEADER)),
        _ => None,
    }
}

/// Whether an IP packet `flow_of` could not place may still be a TCP segment or UDP
/// datagram: IPv4 (with options, say) naming either, or IPv6 with anything but ICMPv6
/// next (an extension header may hide either). ICMP and the like belong to no flow a
/// run could hold, so they close nothing.
fn may_carry_tcp_or_udp(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9).is_some_and(|&p| p == TCP || p == UDP),
        Some(6) => packet.get(6).is_some_and(|&next| next != PROTO_ICMPV6),
        _ => false,
    }
}

fn tcp_flags(packet: &[u8], joinable: &Joinable) -> u8 {
    packet[joinable.ip_header + 13]
}

fn addresses(packet: &[u8], ip_header: usize) -> &[u8] {
    if ip_header == IPV4_HEADER {
        &packet[12..20]
    } else {
        &packet[8..40]
    }
}

/// The IP fields GRO requires equal: IPv4 type of service, flags, TTL; IPv6 traffic
/// class, flow label and hop limit.
fn same_ip_fields(head: &[u8], packet: &[u8], ip_header: usize) -> bool {
    if ip_header == IPV4_HEADER {
        head[1] == packet[1] && head[6..9] == packet[6..9]
    } else {
        head[..4] == packet[..4] && head[7] == packet[7]
    }
}

/// IPv4 identifications count up through a run, as GRO requires: cutting the super
/// packet again numbers the segments from the first one's.
fn next_ipv4_id(head: &[u8], packet: &[u8], ip_header: usize, segments: usize) -> bool {
    if ip_header != IPV4_HEADER {
        return true;
    }
    let first = u16::from_be_bytes([head[4], head[5]]);
    u16::from_be_bytes([packet[4], packet[5]]) == first.wrapping_add(segments as u16)
}

/// Acknowledgement, header length, flags (but PSH), window, urgent pointer and options
/// equal.
fn same_tcp_fields(head: &[u8], packet: &[u8], joinable: &Joinable) -> bool {
    let (h, p) = (
        &head[joinable.ip_header..joinable.headers],
        &packet[joinable.ip_header..joinable.headers],
    );
    h[8..13] == p[8..13]
        && h[13] & !TCP_PSH == p[13] & !TCP_PSH
        && h[14..16] == p[14..16]
        && h[18..] == p[18..]
}

/// The one's-complement sum of the pseudo header for `length` transport bytes.
fn pseudo_header_sum(packet: &[u8], protocol: u8, ip_header: usize, length: usize) -> u64 {
    let sum = checksum_no_fold(addresses(packet, ip_header), 0);
    let [high, low] = u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes();
    checksum_no_fold(&[0, protocol, high, low], sum)
}

fn transport_checksum_valid(packet: &[u8], protocol: u8, ip_header: usize) -> bool {
    let transport = &packet[ip_header..];
    let pseudo = pseudo_header_sum(packet, protocol, ip_header, transport.len());
    checksum(transport, pseudo) == 0xffff
}

/// Makes the run in `write` one super packet: lengths, the IPv4 header checksum, the
/// pseudo-header sum in the transport checksum for the kernel to complete, and the
/// virtio-net header that tells it how to cut the packet again.
fn seal_super_packet(write: &mut [u8], joinable: &Joinable) {
    let (header, packet) = write.split_at_mut(VIRTIO_NET_HDR_LEN);
    let ip_header = joinable.ip_header;
    let total = packet.len();
    let transport_len = total - ip_header;
    if ip_header == IPV4_HEADER {
        packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        packet[10..12].fill(0);
        let sum = !checksum(&packet[..IPV4_HEADER], 0);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    } else {
        packet[4..6].copy_from_slice(&(transport_len as u16).to_be_bytes());
    }
    let (gso_type, checksum_at) = match (joinable.protocol, ip_header) {
        (UDP, _) => {
            packet[ip_header + 4..ip_header + 6]
                .copy_from_slice(&(transport_len as u16).to_be_bytes());
            (VIRTIO_GSO_UDP_L4, 6)
        }
        (_, IPV4_HEADER) => (VIRTIO_GSO_TCPV4, 16),
        _ => (VIRTIO_GSO_TCPV6, 16),
    };
    let at = ip_header + checksum_at;
    let partial = checksum(
        &[],
        pseudo_header_sum(packet, joinable.protocol, ip_header, transport_len),
    );
    packet[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    header[0] = VIRTIO_NEEDS_CSUM;
    header[1] = gso_type;
    header[2..4].copy_from_slice(&(joinable.headers as u16).to_ne_bytes());
    header[4..6].copy_from_slice(&(joinable.segment as u16).to_ne_bytes());
    header[6..8].copy_from_slice(&(ip_header as u16).to_ne_bytes());
    header[8..10].copy_from_slice(&(checksum_at as u16).to_ne_bytes());
}

/// The kernel's side of the coalescer, for tests and the fuzz target: well-formed
/// segments to feed it, and the segmentation that cuts its super packets up again.
#[cfg(any(test, feature = "testing"))]
pub(crate) mod model {
    use std::collections::BTreeMap;

    use super::*;

    const A4: [u8; 4] = [10, 0, 0, 1];
    const B4: [u8; 4] = [10, 0, 0, 2];
    const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A TCP segment (or UDP datagram when `protocol` is UDP) from port 1000 to 2000,
    /// with correct lengths and checksums; `v6` picks the IP version, `id` the IPv4
    /// identification.
    pub(crate) fn packet(
        v6: bool,
        protocol: u8,
        id: u16,
        sequence: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let transport_header = if protocol == TCP { 20 } else { UDP_HEADER };
        let mut transport = vec![0; transport_header];
        transport[0..2].copy_from_slice(&1000u16.to_be_bytes());
        transport[2..4].copy_from_slice(&2000u16.to_be_bytes());
        if protocol == TCP {
            transport[4..8].copy_from_slice(&sequence.to_be_bytes());
            transport[8..12].copy_from_slice(&77u32.to_be_bytes());
            transport[12] = 5 << 4;
            transport[13] = flags;
            transport[14..16].copy_from_slice(&512u16.to_be_bytes());
        } else {
            let len = (UDP_HEADER + payload.len()) as u16;
            transport[4..6].copy_from_slice(&len.to_be_bytes());
        }
        transport.extend_from_slice(payload);
        let mut ip = if v6 {
            let mut ip = vec![0x60, 0, 0, 0, 0, 0, protocol, 64];
            ip[4..6].copy_from_slice(&(transport.len() as u16).to_be_bytes());
            ip.extend_from_slice(&A6);
            ip.extend_from_slice(&B6);
            ip
        } else {
            let total = (IPV4_HEADER + transport.len()) as u16;
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip.extend_from_slice(&A4);
            ip.extend_from_slice(&B4);
            let sum = !checksum(&ip, 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            ip
        };
        let ip_header = ip.len();
        ip.extend_from_slice(&transport);
        let at = ip_header + if protocol == TCP { 16 } else { 6 };
        let sum = !checksum(
            &ip[ip_header..],
            pseudo_header_sum(&ip, protocol, ip_header, transport.len()),
        );
        ip[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        ip
    }

    /// The virtio-net header's lengths: header, segment, checksum start and offset.
    pub(crate) fn virtio(write: &[u8]) -> [u16; 4] {
        let field = |at: usize| u16::from_ne_bytes([write[at], write[at + 1]]);
        [field(2), field(4), field(6), field(8)]
    }

    /// Cuts a super packet the way the kernel does and checks each part is a valid
    /// packet: what the TUN device would hand on.
    pub(crate) fn cut(write: &[u8]) -> Vec<Vec<u8>> {
        let [headers, segment, csum_start, csum_offset] = virtio(write).map(usize::from);
        let (flags, gso_type, packet) = (write[0], write[1], &write[VIRTIO_NET_HDR_LEN..]);
        if gso_type == 0 {
            assert_eq!(flags, 0);
            return vec![packet.to_vec()];
        }
        assert_eq!(flags, VIRTIO_NEEDS_CSUM);
        let protocol = if gso_type == VIRTIO_GSO_UDP_L4 {
            UDP
        } else {
            TCP
        };
        let mut parts = Vec::new();
        for (index, payload) in packet[headers..].chunks(segment).enumerate() {
            let mut part = packet[..headers].to_vec();
            part.extend_from_slice(payload);
            let total = part.len();
            let transport = total - csum_start;
            if csum_start == IPV4_HEADER {
                part[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                let id = u16::from_be_bytes([part[4], part[5]]).wrapping_add(index as u16);
                part[4..6].copy_from_slice(&id.to_be_bytes());
                part[10..12].fill(0);
                let sum = !checksum(&part[..IPV4_HEADER], 0);
                part[10..12].copy_from_slice(&sum.to_be_bytes());
            } else {
                part[4..6].copy_from_slice(&(transport as u16).to_be_bytes());
            }
            if protocol == TCP {
                let at = csum_start + 4;
                let first = u32::from_be_bytes(part[at..at + 4].try_into().unwrap());
                let sequence = first.wrapping_add((index * segment) as u32);
                part[at..at + 4].copy_from_slice(&sequence.to_be_bytes());
                let last = (index + 1) * segment >= packet.len() - headers;
                if !last {
                    part[csum_start + 13] &= !TCP_PSH;
                }
            } else {
                part[csum_start + 4..csum_start + 6]
                    .copy_from_slice(&(transport as u16).to_be_bytes());
            }
            let at = csum_start + csum_offset;
            part[at..at + 2].fill(0);
            let sum = !checksum(
                &part[csum_start..],
                pseudo_header_sum(&part, protocol, csum_start, transport),
            );
            part[at..at + 2].copy_from_slice(&sum.to_be_bytes());
            parts.push(part);
        }
        parts
    }

    /// The flow a test packet belongs to (addresses and ports), or `None` for the rest.
    fn flow_key(packet: &[u8]) -> Option<Vec<u8>> {
        let flow = flow_of(packet)?;
        let at = flow.ip_header;
        Some([addresses(packet, at), &packet[at..at + 4], &[flow.protocol]].concat())
    }

    /// Changes field `which` (IP type of service or traffic class, TTL or hop limit,
    /// DF or flow label; TCP acknowledgement, window, urgent pointer) and makes the
    /// checksums valid again.
    pub(crate) fn retouch(p: &mut [u8], v6: bool, which: usize) {
        let at = if v6 { IPV6_HEADER } else { IPV4_HEADER };
        let protocol = p[if v6 { 6 } else { 9 }];
        let field = match (which % 8, v6) {
            (0, _) => 1,
            (1, false) => 8,
            (1, true) => 7,
            (2, false) => 6,
            (2, true) => 3,
            (3, _) if protocol == TCP => at + 8,
            (4, _) if protocol == TCP => at + 14,
            (5, _) if protocol == TCP => at + 18,
            _ => at + 1,
        };
        p[field] ^= 0x40;
        if !v6 {
            p[10..12].fill(0);
            let sum = !checksum(&p[..IPV4_HEADER], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let checksum_at = at + if protocol == TCP { 16 } else { 6 };
        p[checksum_at..checksum_at + 2].fill(0);
        let len = p.len() - at;
        let sum = !checksum(&p[at..], pseudo_header_sum(p, protocol, at, len));
        p[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// Up to 40 segments and datagrams of three flows (two IPv4, one IPv6), mostly in
    /// sequence, some with a gap, another window or flags GRO leaves alone, some cut
    /// short or with a bit flipped; and whether the device takes UDP segmentation.
    /// `next(bound)` chooses a number below `bound`.
    pub(crate) fn random_mix(next: &mut dyn FnMut(u64) -> u64) -> (Vec<Vec<u8>>, bool) {
        let mut sequences = [1u32, 50_000, 90_000];
        let mut ids = [0u16, 500, 900];
        let mut packets = Vec::new();
        for _ in 0..next(40) {
            let flow = next(3) as usize % 3;
            let v6 = flow == 2;
            let size = [1000, 1000, 1000, 400, 1][next(5) as usize % 5];
            let flags =
                [TCP_ACK, TCP_ACK, TCP_ACK, TCP_ACK | TCP_PSH, 0x02, 0x11][next(6) as usize % 6];
            let id = ids[flow];
            let mut p = if next(8) == 0 {
                packet(v6, UDP, id, 0, 0, &vec![7; size])
            } else {
                packet(v6, TCP, id, sequences[flow], flags, &vec![flow as u8; size])
            };
            if next(4) != 0 {
                sequences[flow] = sequences[flow].wrapping_add(size as u32);
            }
            if next(10) != 0 {
                ids[flow] = ids[flow].wrapping_add(1);
            }
            if next(6) == 0 {
                // Another value in a field GRO compares, checksums still valid: a
                // segment that must not join.
                retouch(&mut p, v6, next(8) as usize);
            }
            match next(20) {
                0 => p.truncate(next(p.len() as u64) as usize),
                1 | 2 => {
                    let at = next(p.len() as u64) as usize % p.len();
                    p[at] ^= 1 << (next(8) % 8);
                }
                _ => {}
            }
            packets.push(p);
        }
        (packets, next(2) == 0)
    }

    /// Feeds `packets` through a coalescer and cuts its writes up again: each flow's
    /// packets must come back exactly, in order, and no write may pass 64 KiB.
    pub(crate) fn check_mix(packets: &[Vec<u8>], udp: bool) -> Result<(), String> {
        let mut coalescer = Coalescer::new(16, true, udp);
        let mut back = Vec::new();
        let flush = |coalescer: &mut Coalescer, back: &mut Vec<Vec<u8>>| -> Result<(), String> {
            for (write, _) in coalescer.finish() {
                if write.len() > VIRTIO_NET_HDR_LEN + MAX_SUPER_PACKET {
                    return Err(format!("a write of {} bytes", write.len()));
                }
                back.extend(cut(write));
            }
            Ok(())
        };
        for p in packets {
            if coalescer.is_full() {
                flush(&mut coalescer, &mut back)?;
            }
            coalescer.push(p);
        }
        flush(&mut coalescer, &mut back)?;
        let per_flow = |list: &[Vec<u8>]| {
            let mut flows = BTreeMap::<_, Vec<Vec<u8>>>::new();
            for p in list {
                flows.entry(flow_key(p)).or_default().push(p.clone());
            }
            flows
        };
        if per_flow(&back) != per_flow(packets) {
            return Err(format!(
                "{} packets in, {} back, not the same per flow",
                packets.len(),
                back.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::model::{cut, packet, virtio};
    use super::*;

    /// An IPv4 TCP segment; its identification counts in hundreds of sequence numbers,
    /// which numbers the tests' 100-byte segments one after the other.
    fn tcp(sequence: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        packet(
            false,
            TCP,
            (sequence / 100) as u16,
            sequence,
            flags,
            payload,
        )
    }

    fn writes(coalescer: &mut Coalescer, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in packets {
            coalescer.push(p);
        }
        coalescer.finish().map(|(w, _)| w.to_vec()).collect()
    }

    #[test]
    fn consecutive_tcp_segments_become_one_super_packet_that_cuts_back_into_them() {
        for v6 in [false, true] {
            let segments: Vec<Vec<u8>> = (0..5u32)
                .map(|i| {
                    packet(
                        v6,
                        TCP,
                        7 + i as u16,
                        100 + i * 1000,
                        TCP_ACK,
                        &[i as u8; 1000],
                    )
                })
                .chain([packet(v6, TCP, 12, 5100, TCP_ACK | TCP_PSH, &[9; 300])])
                .collect();
            let mut coalescer = Coalescer::new(8, true, false);
            let out = writes(&mut coalescer, &segments);
            assert_eq!(out.len(), 1, "v6 {v6}");
            let ip_header = if v6 { IPV6_HEADER } else { IPV4_HEADER };
            assert_eq!(
                out[0][1],
                if v6 {
                    VIRTIO_GSO_TCPV6
                } else {
                    VIRTIO_GSO_TCPV4
                }
            );
            assert_eq!(
                virtio(&out[0]),
                [(ip_header + 20) as u16, 1000, ip_header as u16, 16]
            );
            assert_eq!(cut(&out[0]), segments, "v6 {v6}");
        }
    }

    #[test]
    fn a_packet_written_alone_is_unchanged_behind_an_empty_header() {
        let single = tcp(1, TCP_ACK, &[1; 100]);
        let out = writes(
            &mut Coalescer::new(4, true, false),
            std::slice::from_ref(&single),
        );
        assert_eq!(out, vec![[&[0; VIRTIO_NET_HDR_LEN][..], &single].concat()]);
        // Without offload there is no header, and nothing joins.
        let pair = [tcp(1, TCP_ACK, &[1; 100]), tcp(101, TCP_ACK, &[2; 100])];
        assert_eq!(
            writes(&mut Coalescer::new(4, false, false), &pair),
            pair.to_vec()
        );
    }

    #[test]
    fn what_gro_would_not_join_is_written_alone_in_order() {
        let cases: [(&str, Vec<Vec<u8>>); 6] = [
            (
                "a gap in the sequence",
                vec![tcp(1, TCP_ACK, &[1; 100]), tcp(201, TCP_ACK, &[2; 100])],
            ),
            (
                "a longer segment",
                vec![tcp(1, TCP_ACK, &[1; 100]), tcp(101, TCP_ACK, &[2; 200])],
            ),
            (
                "after a shorter one",
                vec![
                    tcp(1, TCP_ACK, &[1; 100]),
                    tcp(101, TCP_ACK, &[2; 50]),
                    tcp(151, TCP_ACK, &[3; 50]),
                ],
            ),
            (
                "after a push",
                vec![
                    tcp(1, TCP_ACK | TCP_PSH, &[1; 100]),
                    tcp(101, TCP_ACK, &[2; 100]),
                ],
            ),
            (
                "a FIN",
                vec![
                    tcp(1, TCP_ACK, &[1; 100]),
                    tcp(101, TCP_ACK | 0x01, &[2; 100]),
                ],
            ),
            (
                "no payload",
                vec![tcp(1, TCP_ACK, &[]), tcp(1, TCP_ACK, &[])],
            ),
        ];
        for (what, packets) in cases {
            let out = writes(&mut Coalescer::new(8, true, false), &packets);
            let expected: Vec<usize> = match what {
                "after a shorter one" => vec![2, 1],
                _ => vec![1; packets.len()],
            };
            assert_eq!(
                out.iter().map(|w| cut(w).len()).collect::<Vec<_>>(),
                expected,
                "{what}"
            );
            let back: Vec<Vec<u8>> = out.iter().flat_map(|w| cut(w)).collect();
            assert_eq!(back, packets, "{what}");
        }
    }

    #[test]
    fn a_segment_with_a_bad_checksum_is_never_joined() {
        let mut bad = tcp(101, TCP_ACK, &[2; 100]);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let packets = [
            tcp(1, TCP_ACK, &[1; 100]),
            bad.clone(),
            tcp(201, TCP_ACK, &[3; 100]),
        ];
        let out = writes(&mut Coalescer::new(8, true, false), &packets);
        assert_eq!(out.len(), 3);
        assert_eq!(
            &out[1][VIRTIO_NET_HDR_LEN..],
            &bad[..],
            "written as it came"
        );
        // The segment after it does not join the run before it either.
        assert_eq!(out[2][1], 0);
    }

    #[test]
    fn interleaved_flows_each_join_their_own_run() {
        let other = |sequence: u32, payload: &[u8]| {
            let mut p = tcp(sequence, TCP_ACK, payload);
            // Another source port, checksum adjusted by rebuilding.
            p[IPV4_HEADER..IPV4_HEADER + 2].copy_from_slice(&1001u16.to_be_bytes());
            p[IPV4_HEADER + 16..IPV4_HEADER + 18].fill(0);
            let len = p.len() - IPV4_HEADER;
            let sum = !checksum(
                &p[IPV4_HEADER..],
                pseudo_header_sum(&p, TCP, IPV4_HEADER, len),
            );
            p[IPV4_HEADER + 16..IPV4_HEADER + 18].copy_from_slice(&sum.to_be_bytes());
            p
        };
        let packets = [
            tcp(1, TCP_ACK, &[1; 100]),
            other(500, &[5; 100]),
            tcp(101, TCP_ACK, &[2; 100]),
            other(600, &[6; 100]),
        ];
        let out = writes(&mut Coalescer::new(8, true, false), &packets);
        assert_eq!(out.len(), 2);
        assert_eq!(cut(&out[0]), [packets[0].clone(), packets[2].clone()]);
        assert_eq!(cut(&out[1]), [packets[1].clone(), packets[3].clone()]);
    }

    #[test]
    fn udp_joins_only_where_the_device_takes_udp_segmentation() {
        for v6 in [false, true] {
            let datagrams: Vec<Vec<u8>> = (0..4u8)
                .map(|i| packet(v6, UDP, u16::from(i), 0, 0, &[i; 1200]))
                .chain([packet(v6, UDP, 4, 0, 0, &[7; 10])])
                .collect();
            let out = writes(&mut Coalescer::new(8, true, true), &datagrams);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0][1], VIRTIO_GSO_UDP_L4);
            assert_eq!(cut(&out[0]), datagrams);
            let out = writes(&mut Coalescer::new(8, true, false), &datagrams);
            assert_eq!(out.len(), datagrams.len());
        }
    }

    #[test]
    fn a_super_packet_stays_within_64_kib() {
        let segments: Vec<Vec<u8>> = (0..60u32)
            .map(|i| packet(false, TCP, i as u16, i * 1400, TCP_ACK, &[i as u8; 1400]))
            .collect();
        let out = writes(&mut Coalescer::new(8, true, false), &segments);
        // 46 segments of 1,400 bytes fill the first write to 64,440 bytes.
        assert_eq!(
            out.iter().map(|w| cut(w).len()).collect::<Vec<_>>(),
            [46, 14]
        );
        assert!(out
            .iter()
            .all(|w| w.len() - VIRTIO_NET_HDR_LEN <= MAX_SUPER_PACKET));
        assert_eq!(
            out.iter().flat_map(|w| cut(w)).collect::<Vec<_>>(),
            segments
        );
    }

    #[test]
    fn garbage_is_written_alone_without_a_panic() {
        let mut coalescer = Coalescer::new(4, true, true);
        for len in 0..80 {
            let mut p = tcp(1, TCP_ACK, &[1; 40]);
            p.truncate(len.min(p.len()));
            coalescer.push(&p);
            if coalescer.is_full() {
                assert!(coalescer
                    .finish()
                    .all(|(w, packets)| w[1] == 0 && packets == 1));
            }
        }
    }

    #[test]
    fn nothing_joins_across_a_packet_whose_ports_cannot_be_read() {
        // The same addresses, with an IPv4 option: its flow is unknown, so the segment
        // after it must not join the run before it (it would overtake it).
        let mut with_option = tcp(101, TCP_ACK, &[]);
        with_option.splice(IPV4_HEADER..IPV4_HEADER, [1, 1, 1, 0]);
        with_option[0] = 0x46;
        let total = with_option.len() as u16;
        with_option[2..4].copy_from_slice(&total.to_be_bytes());
        let packets = [
            tcp(1, TCP_ACK, &[1; 100]),
            with_option,
            tcp(101, TCP_ACK, &[2; 100]),
        ];
        let out = writes(&mut Coalescer::new(8, true, false), &packets);
        assert_eq!(out.len(), 3);
        let back: Vec<Vec<u8>> = out.iter().flat_map(|w| cut(w)).collect();
        assert_eq!(back, packets);
    }

    #[test]
    fn an_icmp_packet_between_segments_leaves_their_run_open() {
        // An echo request between the same addresses: it belongs to no TCP flow.
        let mut icmp = tcp(0, TCP_ACK, &[]);
        icmp.truncate(IPV4_HEADER + 8);
        icmp[9] = 1;
        icmp[2..4].copy_from_slice(&((IPV4_HEADER + 8) as u16).to_be_bytes());
        let packets = [
            tcp(1, TCP_ACK, &[1; 100]),
            icmp,
            tcp(101, TCP_ACK, &[2; 100]),
        ];
        let out = writes(&mut Coalescer::new(8, true, false), &packets);
        assert_eq!(out.iter().map(|w| cut(w).len()).collect::<Vec<_>>(), [2, 1]);
    }

    #[test]
    fn after_stop_joining_every_packet_is_written_alone() {
        let packets: Vec<Vec<u8>> = (0..4u32)
            .map(|i| tcp(1 + i * 100, TCP_ACK, &[1; 100]))
            .collect();
        let mut coalescer = Coalescer::new(8, true, false);
        assert_eq!(writes(&mut coalescer, &packets).len(), 1);
        coalescer.stop_joining();
        let out = writes(&mut coalescer, &packets);
        assert_eq!(out.len(), 4);
        assert!(out
            .iter()
            .all(|w| w[..VIRTIO_NET_HDR_LEN] == [0; VIRTIO_NET_HDR_LEN]));
    }

    #[test]
    fn random_mixes_cut_back_into_exactly_the_packets_in_each_flows_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound.max(1)
        };
        for round in 0..2000 {
            let (packets, udp) = model::random_mix(&mut next);
            if let Err(broken) = model::check_mix(&packets, udp) {
                panic!("round {round}: {broken}");
            }
        }
    }
}
