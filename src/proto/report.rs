//! What the device reports: why it dropped something, its counters, and events an
//! operator may want to hear about.

use std::net::SocketAddr;
use std::time::Duration;

use super::TunnelId;

/// Why a datagram or packet was dropped. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolDrop {
    /// Not a WireGuard message at all (type, length or reserved bytes).
    Malformed,
    /// A handshake message whose mac1 is not for any of our keys.
    BadMac1,
    /// An initiation that did not decrypt, or a response that did not.
    HandshakeFailed,
    /// An initiation from a static key we have no tunnel for.
    UnknownPeer,
    /// An initiation whose timestamp is not newer than the last accepted one.
    HandshakeReplay,
    /// An initiation within MIN_INITIATION_INTERVAL of the previous one.
    HandshakeFlood,
    /// Under load, a handshake message from an address that sent too many lately.
    RateLimited,
    /// A message for a receiver index we do not hold.
    UnknownIndex,
    /// A transport message that failed authentication.
    Forged,
    /// A transport counter already seen or too far behind.
    Replayed,
    /// A transport message for a session past REJECT_AFTER_TIME.
    Expired,
    /// A packet for a tunnel whose peer endpoint is unknown.
    NoEndpoint,
    /// A queued packet pushed out by newer ones while waiting for a handshake.
    QueueOverflow,
    /// Queued packets discarded when handshake attempts gave up.
    HandshakeGaveUp,
}

/// Counters of everything the device dropped or did; read by telemetry.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub malformed: u64,
    pub bad_mac1: u64,
    pub handshake_failed: u64,
    pub unknown_peer: u64,
    pub handshake_replay: u64,
    pub handshake_flood: u64,
    pub rate_limited: u64,
    pub unknown_index: u64,
    pub forged: u64,
    pub replayed: u64,
    pub expired: u64,
    pub no_endpoint: u64,
    pub queue_overflow: u64,
    pub handshake_gave_up: u64,
    pub cookie_replies_sent: u64,
    pub handshakes_completed: u64,
}

impl Stats {
    pub(super) fn count(&mut self, drop: ProtocolDrop) {
        let counter = match drop {
            ProtocolDrop::Malformed => &mut self.malformed,
            ProtocolDrop::BadMac1 => &mut self.bad_mac1,
            ProtocolDrop::HandshakeFailed => &mut self.handshake_failed,
            ProtocolDrop::UnknownPeer => &mut self.unknown_peer,
            ProtocolDrop::HandshakeReplay => &mut self.handshake_replay,
            ProtocolDrop::HandshakeFlood => &mut self.handshake_flood,
            ProtocolDrop::RateLimited => &mut self.rate_limited,
            ProtocolDrop::UnknownIndex => &mut self.unknown_index,
            ProtocolDrop::Forged => &mut self.forged,
            ProtocolDrop::Replayed => &mut self.replayed,
            ProtocolDrop::Expired => &mut self.expired,
            ProtocolDrop::NoEndpoint => &mut self.no_endpoint,
            ProtocolDrop::QueueOverflow => &mut self.queue_overflow,
            ProtocolDrop::HandshakeGaveUp => &mut self.handshake_gave_up,
        };
        *counter += 1;
    }

    /// Datagrams dropped from the network, all reasons together.
    pub fn network_drops(&self) -> u64 {
        self.malformed
            + self.bad_mac1
            + self.handshake_failed
            + self.unknown_peer
            + self.handshake_replay
            + self.handshake_flood
            + self.rate_limited
            + self.unknown_index
            + self.forged
            + self.replayed
            + self.expired
    }
}

/// What one tunnel carried, counted as wireguard-go counts it for `wg show`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// WireGuard messages sent to the peer and received from it (authenticated ones
    /// only), as UDP payload bytes, handshake messages and keepalives included.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Transport messages that carried a packet (keepalives not counted).
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Wall-clock time (since the Unix epoch) of the tunnel's last completed handshake.
    pub last_handshake: Option<Duration>,
}

/// Something that happened that an operator may want to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    HandshakeCompleted {
        tunnel: TunnelId,
        we_initiated: bool,
    },
    /// An authenticated packet came from a new address, which is now the peer's endpoint.
    Roamed {
        tunnel: TunnelId,
        new_endpoint: SocketAddr,
    },
    SessionExpired {
        tunnel: TunnelId,
    },
    HandshakeGaveUp {
        tunnel: TunnelId,
        dropped_packets: usize,
    },
}

impl Event {
    pub fn tunnel(&self) -> TunnelId {
        match self {
            Event::HandshakeCompleted { tunnel, .. }
            | Event::Roamed { tunnel, .. }
            | Event::SessionExpired { tunnel }
            | Event::HandshakeGaveUp { tunnel, .. } => *tunnel,
        }
    }
}
