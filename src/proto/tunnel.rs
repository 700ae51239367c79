//! The state of one tunnel: one local identity talking to one peer identity.
//!
//! Holds up to three sessions (WireGuard's current, previous and next keypairs), the
//! handshake in progress, packets waiting for a session, the peer's endpoint and the
//! WireGuard timers, and makes every change to them. The device decides when; the tunnel
//! knows how. Receiver indices belong to the device: whenever the tunnel lets go of a
//! session or a handshake, it hands the index back for the device to free.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use snow::HandshakeState;

use super::constants::*;
use super::cookie::{Mac16, MacKeys};
use super::noise::{EphemeralSeed, TIMESTAMP_LEN};
use super::report::{ProtocolDrop, Traffic};
use super::session::Session;
use super::timers::{Timer, TimerTable};
use super::LocalKeyId;

/// Receiver indices a tunnel let go of; the device frees them.
pub(super) type Released = Vec<u32>;

/// An initiation we sent and whose response we wait for.
struct Initiating {
    /// Out only while a response is being tried; put back if it was not genuine.
    noise: Option<HandshakeState>,
    local_index: u32,
    /// What made the initiation, so that its handshake state can be made again after a
    /// response that was not genuine consumed it.
    seed: EphemeralSeed,
    timestamp: [u8; TIMESTAMP_LEN],
}

/// What an initiation in flight was made from: enough to make its handshake state again.
pub(super) struct InitiationInputs {
    pub(super) local_index: u32,
    pub(super) seed: EphemeralSeed,
    pub(super) timestamp: [u8; TIMESTAMP_LEN],
}

pub(super) struct Tunnel {
    local: LocalKeyId,
    peer_public: [u8; 32],
    /// Keys derived from the peer's public key: mac1 on what we send it, cookie replies.
    peer_keys: MacKeys,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<Duration>,

    initiating: Option<Initiating>,
    /// When the current series of handshake attempts began (REKEY_ATTEMPT_TIME).
    attempts_since: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    /// Cookie from the peer's last cookie reply, and when it arrived.
    cookie: Option<(Mac16, Instant)>,
    /// mac1 of the last handshake message we sent the peer (initiation or response):
    /// the associated data of a cookie reply to it.
    last_mac1: Option<Mac16>,

    /// Newest initiation timestamp accepted from the peer, and when.
    last_timestamp: Option<[u8; TIMESTAMP_LEN]>,
    last_initiation_received: Option<Instant>,

    current: Option<Session>,
    previous: Option<Session>,
    /// Responder-side session, promoted once the initiator uses it.
    next: Option<Session>,

    /// Plaintexts waiting for a session, each laid out for sealing in place.
    queue: VecDeque<Vec<u8>>,
    timers: TimerTable,
    traffic: Traffic,
}

impl Tunnel {
    pub(super) fn new(
        local: LocalKeyId,
        peer_public: [u8; 32],
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<Duration>,
        now: Instant,
    ) -> Self {
        let mut timers = TimerTable::default();
        if persistent_keepalive.is_some() {
            // A persistent keepalive starts the tunnel at once, as WireGuard does.
            timers.set(Timer::PersistentKeepalive, now);
        }
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
            last_mac1: None,
            last_timestamp: None,
            last_initiation_received: None,
            current: None,
            previous: None,
            next: None,
            queue: VecDeque::new(),
            timers,
            traffic: Traffic::default(),
        }
    }

    /// Lets go of everything for the tunnel's removal: returns the receiver indices of its
    /// sessions and of the handshake in flight; the sessions' keys go with `self`.
    pub(super) fn retire(self) -> Released {
        [self.current, self.previous, self.next]
            .into_iter()
            .flatten()
            .map(|s| s.local_index)
            .chain(self.initiating.map(|i| i.local_index))
            .collect()
    }

    /// The endpoint configuration names (roaming may move it again).
    pub(super) fn set_endpoint(&mut self, endpoint: Option<SocketAddr>) {
        self.endpoint = endpoint;
    }

    /// A new persistent keepalive interval, counted from now; `None` stops it.
    pub(super) fn set_persistent_keepalive(&mut self, interval: Option<Duration>, now: Instant) {
        if interval == self.persistent_keepalive {
            return;
        }
        self.persistent_keepalive = interval;
        match interval {
            Some(_) => self.timers.set(Timer::PersistentKeepalive, now),
            None => self.timers.stop(Timer::PersistentKeepalive),
        }
    }

    pub(super) fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Counts a message of `len` bytes sent to the peer; `data` if it carried a packet.
    pub(super) fn count_sent(&mut self, len: usize, data: bool) {
        self.traffic.tx_bytes += len as u64;
        self.traffic.tx_packets += u64::from(data);
    }

    /// Counts an authenticated message of `len` bytes from the peer.
    pub(super) fn count_received(&mut self, len: usize, data: bool) {
        self.traffic.rx_bytes += len as u64;
        self.traffic.rx_packets += u64::from(data);
    }

    pub(super) fn handshake_completed_at(&mut self, wall_clock: Duration) {
        self.traffic.last_handshake = Some(wall_clock);
    }

    pub(super) fn local(&self) -> LocalKeyId {
        self.local
    }

    pub(super) fn peer_public(&self) -> &[u8; 32] {
        &self.peer_public
    }

    pub(super) fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    pub(super) fn has_session(&self) -> bool {
        self.current.is_some()
    }

    /// Roaming: an authenticated, non-replayed packet from `source` makes it the peer's
    /// endpoint. Returns whether a known endpoint changed.
    pub(super) fn update_endpoint(&mut self, source: SocketAddr) -> bool {
        let roamed = self.endpoint.is_some_and(|e| e != source);
        self.endpoint = Some(source);
        roamed
    }

    // --- sessions

    /// The session to send with, if one is usable.
    pub(super) fn sending_session(&mut self, now: Instant) -> Option<&mut Session> {
        self.current.as_mut().filter(|s| s.can_send(now))
    }

    /// The session whose local index is `index`.
    pub(super) fn session_by_index(&mut self, index: u32) -> Option<&mut Session> {
        [&mut self.current, &mut self.previous, &mut self.next]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
    }

    /// Drops sessions past REJECT_AFTER_TIME: their keys can never be used again.
    /// Returns their indices and whether the current session was among them.
    pub(super) fn expire_sessions(&mut self, now: Instant) -> (Released, bool) {
        let mut released = Released::new();
        let mut current_expired = false;
        for (slot, is_current) in [
            (&mut self.current, true),
            (&mut self.previous, false),
            (&mut self.next, false),
        ] {
            if let Some(session) = slot.take_if(|s| s.age(now) >= REJECT_AFTER_TIME) {
                released.push(session.local_index);
                current_expired |= is_current;
            }
        }
        (released, current_expired)
    }

    /// Initiator: the new session is usable at once; the old current stays as previous
    /// for packets still in flight. Ends the handshake attempts.
    pub(super) fn start_initiator_session(&mut self, session: Session, now: Instant) -> Released {
        let old_previous = self.previous.take();
        self.previous = self.current.replace(session);
        self.attempts_since = None;
        self.on_authenticated_receive(now);
        old_previous.map(|s| s.local_index).into_iter().collect()
    }

    /// Responder: the new session waits in `next` until the initiator uses it; the
    /// previous one goes, as in WireGuard.
    pub(super) fn start_responder_session(&mut self, session: Session) -> Released {
        [self.next.replace(session), self.previous.take()]
            .into_iter()
            .flatten()
            .map(|s| s.local_index)
            .collect()
    }

    /// The initiator used the `next` session under `index`: it becomes current. Returns
    /// whether it did, and the index of the session that had to go.
    pub(super) fn confirm_next(&mut self, index: u32) -> (bool, Released) {
        if self.next.as_ref().is_none_or(|s| s.local_index != index) {
            return (false, Released::new());
        }
        let next = self.next.take();
        let old_previous = std::mem::replace(&mut self.previous, self.current.take());
        self.current = next;
        (
            true,
            old_previous.map(|s| s.local_index).into_iter().collect(),
        )
    }

    /// Whether sessions are due a rekey after sending: the initiator's session is old or
    /// has sent very many messages.
    pub(super) fn wants_rekey_after_send(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|s| {
            s.messages_sent() >= REKEY_AFTER_MESSAGES
                || (s.we_initiated && s.age(now) >= REKEY_AFTER_TIME)
        })
    }

    /// Whether to rekey after receiving on a session we initiated that nears rejection.
    pub(super) fn wants_rekey_after_receive(&self, now: Instant) -> bool {
        self.current
            .as_ref()
            .is_some_and(|s| s.we_initiated && s.age(now) >= REKEY_ON_RECEIVE_AFTER)
    }

    // --- handshakes

    /// Whether a new initiation may go out now: none is waiting for its response and
    /// none was sent within REKEY_TIMEOUT.
    pub(super) fn may_initiate(&self, now: Instant) -> bool {
        let recently = self
            .last_initiation_sent
            .is_some_and(|at| now.saturating_duration_since(at) < REKEY_TIMEOUT);
        self.initiating.is_none() && !recently
    }

    /// A new series of handshake attempts starts now.
    pub(super) fn begin_attempts(&mut self, now: Instant) {
        self.attempts_since = Some(now);
    }

    /// Whether handshake attempts have gone on for REKEY_ATTEMPT_TIME.
    pub(super) fn attempts_exhausted(&self, now: Instant) -> bool {
        self.attempts_since
            .is_none_or(|since| now.saturating_duration_since(since) >= REKEY_ATTEMPT_TIME)
    }

    /// Handshake attempts gave up: the waiting packets and the handshake go. Returns the
    /// handshake's index and how many packets were dropped.
    pub(super) fn give_up(&mut self) -> (Released, usize) {
        let dropped = self.queue.len();
        self.queue.clear();
        self.attempts_since = None;
        self.timers.stop(Timer::NewHandshake);
        self.timers.stop(Timer::RetryHandshake);
        let released = self.initiating.take().map(|i| i.local_index);
        (released.into_iter().collect(), dropped)
    }

    /// Writes mac1 (and mac2, when a fresh cookie from the peer is known) into a
    /// handshake message to the peer, and remembers mac1 for a cookie reply to it.
    pub(super) fn write_macs(&mut self, msg: &mut [u8], now: Instant) {
        let cookie = self
            .cookie
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_REFRESH_TIME)
            .map(|(c, _)| c);
        self.last_mac1 = Some(self.peer_keys.write_macs(msg, cookie));
    }

    /// An initiation made from `inputs` went out at `now`: its response is awaited and
    /// the retry timer runs until `retry_at`. Returns the index of the initiation it
    /// replaces.
    pub(super) fn initiation_sent(
        &mut self,
        noise: HandshakeState,
        inputs: InitiationInputs,
        now: Instant,
        retry_at: Instant,
    ) -> Released {
        let replaced = self.initiating.replace(Initiating {
            noise: Some(noise),
            local_index: inputs.local_index,
            seed: inputs.seed,
            timestamp: inputs.timestamp,
        });
        self.last_initiation_sent = Some(now);
        self.timers.set(Timer::RetryHandshake, retry_at);
        self.on_authenticated_send(now);
        replaced.map(|i| i.local_index).into_iter().collect()
    }

    /// Lets go of the initiation in progress, if any; returns its index.
    pub(super) fn abandon_initiation(&mut self) -> Released {
        self.initiating
            .take()
            .map(|i| i.local_index)
            .into_iter()
            .collect()
    }

    /// Whether a response under `index` is one we wait for.
    pub(super) fn awaits_response(&self, index: u32) -> bool {
        self.initiating
            .as_ref()
            .is_some_and(|i| i.local_index == index && i.noise.is_some())
    }

    /// The handshake state for one try at the awaited response. A response that turns
    /// out not to be genuine has consumed it: [`Tunnel::restore_handshake_state`] puts
    /// back a state made again from [`Tunnel::initiation_inputs`].
    pub(super) fn take_handshake_state(&mut self) -> Option<HandshakeState> {
        self.initiating.as_mut()?.noise.take()
    }

    /// What the initiation in flight was made from.
    pub(super) fn initiation_inputs(&self) -> Option<InitiationInputs> {
        self.initiating.as_ref().map(|i| InitiationInputs {
            local_index: i.local_index,
            seed: i.seed.clone(),
            timestamp: i.timestamp,
        })
    }

    pub(super) fn restore_handshake_state(&mut self, noise: HandshakeState) {
        if let Some(initiating) = &mut self.initiating {
            initiating.noise = Some(noise);
        }
    }

    /// The response arrived and completed the handshake: the initiation is over. Returns
    /// its index, which the new session keeps.
    pub(super) fn finish_initiation(&mut self) -> Option<u32> {
        self.timers.stop(Timer::RetryHandshake);
        self.initiating.take().map(|i| i.local_index)
    }

    /// A cookie reply to the last handshake message we sent (an initiation or a
    /// response): keeps the cookie for the next one.
    pub(super) fn accept_cookie_reply(
        &mut self,
        reply: &[u8],
        now: Instant,
    ) -> Result<(), ProtocolDrop> {
        let mac1 = self.last_mac1.ok_or(ProtocolDrop::UnknownIndex)?;
        let cookie = self
            .peer_keys
            .open_cookie_reply(reply, &mac1)
            .ok_or(ProtocolDrop::Forged)?;
        self.cookie = Some((cookie, now));
        Ok(())
    }

    /// Refuses an initiation that replays an old timestamp or comes too soon after the
    /// last one.
    pub(super) fn check_initiation(
        &self,
        timestamp: &[u8; TIMESTAMP_LEN],
        now: Instant,
    ) -> Result<(), ProtocolDrop> {
        if self.last_timestamp.is_some_and(|last| *timestamp <= last) {
            return Err(ProtocolDrop::HandshakeReplay);
        }
        if self
            .last_initiation_received
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_INITIATION_INTERVAL)
        {
            return Err(ProtocolDrop::HandshakeFlood);
        }
        Ok(())
    }

    /// An initiation was answered: later ones must carry a newer timestamp.
    pub(super) fn initiation_answered(&mut self, timestamp: [u8; TIMESTAMP_LEN], now: Instant) {
        self.last_timestamp = Some(timestamp);
        self.last_initiation_received = Some(now);
        self.on_authenticated_receive(now);
        self.on_authenticated_send(now);
    }

    // --- packets waiting for a session

    /// Queues a packet (laid out for sealing in place) until a session exists. Returns
    /// whether an older packet had to be dropped to make room.
    pub(super) fn enqueue(&mut self, packet: Vec<u8>) -> bool {
        let overflow = self.queue.len() >= MAX_QUEUED_PACKETS;
        if overflow {
            self.queue.pop_front();
        }
        self.queue.push_back(packet);
        overflow
    }

    pub(super) fn dequeue(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    pub(super) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    // --- timers

    /// Whether `timer` is due at `now`; a due timer is stopped, so it fires once.
    pub(super) fn take_expired(&mut self, timer: Timer, now: Instant) -> bool {
        self.timers.take_expired(timer, now)
    }

    /// Timers that follow any authenticated packet we send.
    pub(super) fn on_authenticated_send(&mut self, now: Instant) {
        self.timers.stop(Timer::Keepalive);
        self.arm_persistent_keepalive(now);
    }

    /// Timers that follow a data (non-keepalive) packet we send: expect an answer.
    pub(super) fn on_data_sent(&mut self, now: Instant) {
        self.timers
            .start_unless_running(Timer::NewHandshake, now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
    }

    /// Timers that follow any authenticated packet we receive.
    pub(super) fn on_authenticated_receive(&mut self, now: Instant) {
        self.timers.stop(Timer::NewHandshake);
        self.arm_persistent_keepalive(now);
    }

    /// Timers that follow a data packet we receive: answer within KEEPALIVE_TIMEOUT.
    pub(super) fn on_data_received(&mut self, now: Instant) {
        self.timers
            .start_unless_running(Timer::Keepalive, now + KEEPALIVE_TIMEOUT);
    }

    fn arm_persistent_keepalive(&mut self, now: Instant) {
        if let Some(interval) = self.persistent_keepalive {
            self.timers.set(Timer::PersistentKeepalive, now + interval);
        }
    }

    /// The earliest instant at which this tunnel has timer work to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let session_expiry = [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
            .map(|s| s.created + REJECT_AFTER_TIME);
        self.timers
            .next_deadline()
            .into_iter()
            .chain(session_expiry)
            .min()
    }
}
