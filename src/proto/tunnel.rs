//! The state of one tunnel: one local identity talking to one peer identity.
//!
//! Holds up to three sessions (WireGuard's current, previous and next keypairs), the
//! handshake in progress, packets waiting for a session, the peer's endpoint and the
//! WireGuard timers. The device drives it; nothing here reads a clock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use snow::HandshakeState;

use super::constants::*;
use super::cookie::{Mac16, MacKeys};
use super::handshake::TIMESTAMP_LEN;
use super::session::Session;

/// An initiation we sent and whose response we wait for.
pub struct Initiating {
    /// `None` once a response was tried and failed; the retry timer sends a new one.
    pub noise: Option<HandshakeState>,
    pub local_index: u32,
    /// mac1 of the initiation: the associated data of a cookie reply to it.
    pub mac1: Mac16,
    pub retry_at: Instant,
}

pub struct Tunnel {
    pub local: usize,
    pub peer_public: [u8; 32],
    /// Keys derived from the peer's public key: mac1 on what we send it, cookie replies.
    pub peer_keys: MacKeys,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<Duration>,

    pub initiating: Option<Initiating>,
    /// When the current series of handshake attempts began (REKEY_ATTEMPT_TIME).
    pub attempts_since: Option<Instant>,
    pub last_initiation_sent: Option<Instant>,
    /// Cookie from the peer's last cookie reply, and when it arrived.
    pub cookie: Option<(Mac16, Instant)>,

    /// Newest initiation timestamp accepted from the peer, and when.
    pub last_timestamp: Option<[u8; TIMESTAMP_LEN]>,
    pub last_initiation_received: Option<Instant>,

    pub current: Option<Session>,
    pub previous: Option<Session>,
    /// Responder-side session, promoted once the initiator uses it.
    pub next: Option<Session>,

    pub queue: VecDeque<Vec<u8>>,

    /// Send a keepalive then, unless something else is sent first.
    pub keepalive_at: Option<Instant>,
    /// Start a handshake then, unless something authenticated arrives first.
    pub new_handshake_at: Option<Instant>,
    pub persistent_keepalive_at: Option<Instant>,
}

impl Tunnel {
    pub fn new(
        local: usize,
        peer_public: [u8; 32],
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<Duration>,
        now: Instant,
    ) -> Self {
        Tunnel {
            local,
            peer_public,
            peer_keys: MacKeys::for_public_key(&peer_public),
            endpoint,
            persistent_keepalive,
            initiating: None,
            attempts_since: None,
            last_initiation_sent: None,
            cookie: None,
            last_timestamp: None,
            last_initiation_received: None,
            current: None,
            previous: None,
            next: None,
            queue: VecDeque::new(),
            keepalive_at: None,
            new_handshake_at: None,
            // A persistent keepalive starts the tunnel at once, as WireGuard does.
            persistent_keepalive_at: persistent_keepalive.map(|_| now),
        }
    }

    /// The session to send with, if one is usable.
    pub fn sending_session(&mut self, now: Instant) -> Option<&mut Session> {
        self.current.as_mut().filter(|s| s.can_send(now))
    }

    /// The session whose local index is `index`.
    pub fn session_by_index(&mut self, index: u32) -> Option<&mut Session> {
        [&mut self.current, &mut self.previous, &mut self.next]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
    }

    /// Whether sessions are due a rekey after sending: the initiator's session is old or
    /// has sent very many messages.
    pub fn wants_rekey_after_send(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|s| {
            s.messages_sent() >= REKEY_AFTER_MESSAGES
                || (s.we_initiated && s.age(now) >= REKEY_AFTER_TIME)
        })
    }

    /// Whether to rekey after receiving on a session we initiated that nears rejection.
    pub fn wants_rekey_after_receive(&self, now: Instant) -> bool {
        self.current
            .as_ref()
            .is_some_and(|s| s.we_initiated && s.age(now) >= REKEY_ON_RECEIVE_AFTER)
    }

    /// A fresh cookie from the peer, usable as the mac2 key.
    pub fn fresh_cookie(&self, now: Instant) -> Option<&Mac16> {
        self.cookie
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_REFRESH_TIME)
            .map(|(c, _)| c)
    }

    /// Timers that follow any authenticated packet we send.
    pub fn on_authenticated_send(&mut self, now: Instant) {
        self.keepalive_at = None;
        self.arm_persistent_keepalive(now);
    }

    /// Timers that follow a data (non-keepalive) packet we send.
    pub fn on_data_sent(&mut self, now: Instant) {
        if self.new_handshake_at.is_none() {
            self.new_handshake_at = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    /// Timers that follow any authenticated packet we receive.
    pub fn on_authenticated_receive(&mut self, now: Instant) {
        self.new_handshake_at = None;
        self.arm_persistent_keepalive(now);
    }

    /// Timers that follow a data packet we receive: answer within KEEPALIVE_TIMEOUT.
    pub fn on_data_received(&mut self, now: Instant) {
        if self.keepalive_at.is_none() {
            self.keepalive_at = Some(now + KEEPALIVE_TIMEOUT);
        }
    }

    fn arm_persistent_keepalive(&mut self, now: Instant) {
        if let Some(interval) = self.persistent_keepalive {
            self.persistent_keepalive_at = Some(now + interval);
        }
    }

    /// The earliest instant at which this tunnel has timer work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let session_expiry = [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
            .map(|s| s.created + REJECT_AFTER_TIME);
        [
            self.initiating.as_ref().map(|i| i.retry_at),
            self.keepalive_at,
            self.new_handshake_at,
            self.persistent_keepalive_at,
        ]
        .into_iter()
        .flatten()
        .chain(session_expiry)
        .min()
    }

    /// Queues a packet (laid out for sealing in place) until a session exists. Returns
    /// whether an older packet had to be dropped to make room.
    pub fn enqueue(&mut self, packet: Vec<u8>) -> bool {
        let overflow = self.queue.len() >= MAX_QUEUED_PACKETS;
        if overflow {
            self.queue.pop_front();
        }
        self.queue.push_back(packet);
        overflow
    }
}
