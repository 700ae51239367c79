//! The sans-IO node: the protocol device, cryptokey routing and the stateful allow list,
//! put together on the path of each packet.
//!
//! Egress: the source address picks the local identity (whose key seals), the
//! destination picks the peer identity (longest prefix over allowed IPs) — see
//! `routing`. Ingress: the session proves the peer identity; its source must be inside
//! that identity's allowed IPs and its destination must belong to the session's local
//! identity. Then the allow list decides, statefully — see `firewall`.

mod counters;
mod firewall;
mod flows;
mod fragments;
mod routing;
mod status;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::config::NodeConfig;
use crate::identity::{LocalId, PairTable, PeerId};
use crate::packet::{self, Transport};
use crate::policy::{Evaluator, MtlsMode, PolicySet};
use crate::proto::{
    self, Device, DeviceConfig, InitiationJob, InitiationWork, Mac1Screen, Mac1Verdict, OpenError,
    ProtocolDrop, Random, ReceiveStep, Received, SealJob, SealStep, TransportOpen,
    TRANSPORT_HEADER_LEN,
};

use counters::FlowCounts;
pub use counters::{NodeDrop, NodeStats, PairDecisions};
use firewall::{Admitted, Firewall, InboundPacket};
use routing::Routing;
pub use routing::{IdentityChanges, LocalIdentity, PeerIdentity};
pub use status::{
    add_traffic, DecisionCounts, FlowStatus, IdentityStatus, NodeStatus, PairStatus, PeerStatus,
    TunnelStatus,
};

/// What [`Node::reconfigure`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfigured {
    pub identities: IdentityChanges,
    /// Flows peers opened that the allow list now denies.
    pub revoked_flows: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `buf[..len]` is a transport message for `destination`.
    Send {
        destination: SocketAddr,
        len: usize,
    },
    /// Waiting for a handshake; see `poll_transmit`.
    Queued,
    Dropped(Dropped),
}

/// `begin_egress`'s answer: the encryption left to do, or the outcome.
pub enum EgressStep {
    /// Finish with `job.seal(buf)`, which needs no access to the node.
    Seal {
        destination: SocketAddr,
        job: SealJob,
    },
    Done(Egress),
}

/// `begin_ingress`'s answer: a transport message to decrypt, an initiation to work on,
/// or the outcome.
pub enum IngressStep {
    /// Decrypt with `open.open(datagram)` without the node, then call `finish_ingress`.
    Open(TransportOpen),
    /// Run `job.run(datagram)` without the node, then call `finish_initiation`.
    Initiation(InitiationJob),
    Done(Ingress),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingress {
    /// `buf[packet]` is an authenticated IP packet for the TUN device.
    Deliver {
        packet: Range<usize>,
        peer: PeerId,
        local: LocalId,
    },
    /// Handshake, cookie or keepalive; see `poll_transmit`.
    Control,
    Dropped(Dropped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Node(NodeDrop),
    Protocol(ProtocolDrop),
}

pub struct Node {
    device: Device,
    routing: Routing,
    firewall: Firewall,
    stats: NodeStats,
}

impl Node {
    /// Builds the node from a validated configuration: one tunnel per pair of local and
    /// peer identity. `random` feeds the protocol core; `now_unix` is the wall-clock time
    /// at `now`.
    pub fn new(
        config: &NodeConfig,
        policy: &PolicySet,
        random: Random,
        now: Instant,
        now_unix: Duration,
    ) -> Self {
        let device_config = DeviceConfig {
            mtu: config.interface.mtu,
            ..DeviceConfig::default()
        };
        let mut device = Device::new(device_config, random, now, now_unix);
        let routing = Routing::new(config, &mut device, now);
        let firewall = Firewall::new(&routing, policy, &config.policy, now);
        Node {
            device,
            routing,
            firewall,
            stats: NodeStats::default(),
        }
    }

    /// Makes the node's identities and allow list those of `config` and `policy` while it
    /// runs, like `wg syncconf`: identities that stay (by principal; peers by node and
    /// principal) keep their flows, and tunnels whose two keys stay keep their sessions;
    /// changed endpoints and keepalives take effect on the kept tunnels; identities and
    /// keys that are gone lose their tunnels (and flows) at once; new ones get theirs. Settings that need a restart (listen address, device, MTU,
    /// workers) are the caller's to refuse; they are not looked at here.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        config: &NodeConfig,
        policy: &PolicySet,
    ) -> Reconfigured {
        let renumbering = self.routing.apply(config, &mut self.device, now);
        let revoked_flows =
            self.firewall
                .reconfigure(&self.routing, &renumbering, policy, &config.policy);
        Reconfigured {
            identities: renumbering.changes,
            revoked_flows,
        }
    }

    /// Replaces the allow list. Flows the peer opened are re-checked at once: those the
    /// new policy denies stop. Returns how many were revoked.
    pub fn set_policy(&mut self, policy: &PolicySet) -> usize {
        self.firewall.set_policy(&self.routing, policy)
    }

    pub fn policy(&self) -> &Evaluator {
        self.firewall.policy()
    }

    /// The mTLS mode `policy` sets for each local identity, in `locals()` order.
    pub fn mtls_modes(&self, policy: &PolicySet) -> Vec<MtlsMode> {
        let root = self.firewall.root_namespace();
        self.locals()
            .iter()
            .map(|l| policy.mtls_mode(root, l.principal.namespace(), &l.labels))
            .collect()
    }

    /// What the protocol core counted (handshakes, drops).
    pub fn protocol_stats(&self) -> &proto::Stats {
        self.device.stats()
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    pub fn decisions(&self) -> &PairTable<PairDecisions> {
        self.firewall.decisions()
    }

    pub fn locals(&self) -> &[LocalIdentity] {
        self.routing.locals()
    }

    pub fn peers(&self) -> &[PeerIdentity] {
        self.routing.peers()
    }

    fn drop_packet(&mut self, drop: NodeDrop) -> Dropped {
        self.stats.count(drop);
        tracing::trace!(?drop, "dropped packet");
        Dropped::Node(drop)
    }

    /// Seals the IP packet at `buf[16..16 + len]` for the tunnel its addresses select.
    /// `buf` must hold `SEAL_TAILROOM` more bytes after it.
    pub fn egress(&mut self, now: Instant, buf: &mut [u8], len: usize) -> Egress {
        match self.begin_egress(now, buf, len) {
            EgressStep::Seal { destination, job } => Egress::Send {
                destination,
                len: job.seal(buf),
            },
            EgressStep::Done(egress) => egress,
        }
    }

    /// `egress` up to the encryption, which the returned job does without the node: so
    /// that workers sharing the node hold it only for the bookkeeping.
    pub fn begin_egress(&mut self, now: Instant, buf: &mut [u8], len: usize) -> EgressStep {
        let dropped =
            |node: &mut Node, drop| EgressStep::Done(Egress::Dropped(node.drop_packet(drop)));
        let packet = &buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len];
        let Some(header) = packet::parse(packet) else {
            return dropped(self, NodeDrop::NotIp);
        };
        let (local, peer, tunnel, preferred) = match self.routing.egress(&header, &self.device) {
            Ok(route) => route,
            Err(drop) => return dropped(self, drop),
        };
        if let Some(preferred) = preferred {
            // A key rotation: the preferred keys have no session yet.
            self.device.initiate(now, preferred);
        }
        self.firewall
            .track_outbound(now, &header, header.transport(packet), (local, peer));
        match self.device.begin_seal(now, tunnel, buf, len) {
            SealStep::Seal { destination, job } => {
                self.stats.packets_out += 1;
                EgressStep::Seal { destination, job }
            }
            SealStep::Queued => EgressStep::Done(Egress::Queued),
            SealStep::Dropped(drop) => EgressStep::Done(Egress::Dropped(Dropped::Protocol(drop))),
        }
    }

    /// Authenticates and decrypts a datagram in place, then applies cryptokey routing and
    /// the allow list.
    pub fn ingress(&mut self, now: Instant, source: SocketAddr, datagram: &mut [u8]) -> Ingress {
        match self.begin_ingress(now, source, datagram, Mac1Verdict::NotScreened) {
            IngressStep::Open(open) => {
                let opened = open.open(datagram);
                self.finish_ingress(now, source, datagram, open, opened)
            }
            IngressStep::Initiation(job) => {
                let work = job.run(datagram);
                self.finish_initiation(now, source, job, work)
            }
            IngressStep::Done(ingress) => ingress,
        }
    }

    /// The local identities' mac1 keys, to screen initiations without the node.
    pub fn mac1_screen(&self) -> Mac1Screen {
        self.device.mac1_screen()
    }

    /// `ingress` up to the work that needs no node (decrypting transport data, the
    /// Diffie-Hellman work of an initiation), which the returned jobs do. `verdict` is
    /// what a [`Mac1Screen`] said of the datagram, if one looked.
    pub fn begin_ingress(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &mut [u8],
        verdict: Mac1Verdict,
    ) -> IngressStep {
        match self.device.begin_receive(now, source, datagram, verdict) {
            ReceiveStep::Open(open) => IngressStep::Open(open),
            ReceiveStep::Initiation(job) => IngressStep::Initiation(job),
            ReceiveStep::Done(received) => {
                IngressStep::Done(self.admit_received(now, datagram, received))
            }
        }
    }

    /// The rest of `ingress` once an initiation's job ran.
    pub fn finish_initiation(
        &mut self,
        now: Instant,
        source: SocketAddr,
        job: InitiationJob,
        work: InitiationWork,
    ) -> Ingress {
        let received = self.device.finish_initiation(now, source, job, work);
        self.admit_received(now, &[], received)
    }

    /// The rest of `ingress` once `open` was tried on the datagram.
    pub fn finish_ingress(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &[u8],
        open: TransportOpen,
        opened: Result<Range<usize>, OpenError>,
    ) -> Ingress {
        let received = self.device.finish_receive(now, source, open, opened);
        self.admit_received(now, datagram, received)
    }

    /// Cryptokey routing and the allow list for what the device made of a datagram.
    fn admit_received(&mut self, now: Instant, datagram: &[u8], received: Received) -> Ingress {
        let (tunnel, plaintext) = match received {
            Received::Data { tunnel, plaintext } => (tunnel, plaintext),
            Received::Control => return Ingress::Control,
            Received::Dropped(drop) => return Ingress::Dropped(Dropped::Protocol(drop)),
        };
        let Some(header) = packet::parse(&datagram[plaintext.clone()]) else {
            return Ingress::Dropped(self.drop_packet(NodeDrop::NotIp));
        };
        let (local, peer) = match self.routing.ingress(tunnel, &header) {
            Ok(pair) => pair,
            Err(drop) => return Ingress::Dropped(self.drop_packet(drop)),
        };
        let packet = &datagram[plaintext.start..plaintext.start + header.len];
        let transport = header.transport(packet);
        let quoted = match transport {
            Transport::IcmpOther => header.quoted(packet),
            _ => None,
        };
        let inbound = InboundPacket {
            header,
            transport,
            quoted,
        };
        match self
            .firewall
            .admit_inbound(now, &self.routing, local, peer, &inbound)
        {
            Ok(Admitted::Allowed) => self.stats.policy_allowed += 1,
            Ok(Admitted::Tracked) => {}
            Err(drop) => return Ingress::Dropped(self.drop_packet(drop)),
        }
        self.stats.packets_in += 1;
        Ingress::Deliver {
            packet: plaintext.start..plaintext.start + header.len,
            peer,
            local,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<proto::Transmit> {
        self.device.poll_transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.device.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.device.handle_timeout(now);
        self.firewall.sweep(now);
    }

    /// Logs what happened since the last call, naming both identities of each tunnel.
    pub fn log_events(&mut self) {
        counters::log_events(&mut self.device, &self.routing);
    }

    /// One line per identity pair that saw allow-list decisions.
    pub fn decision_counters(&self) -> Vec<String> {
        counters::decision_lines(&self.routing, self.firewall.decisions())
    }

    /// One line of every counter, for logs and tests.
    pub fn counters(&self) -> String {
        let flows = FlowCounts {
            flows: self.firewall.flow_count(),
            evictions: self.firewall.flow_evictions(),
        };
        counters::counter_line(&self.device, &self.stats, flows)
    }
}
