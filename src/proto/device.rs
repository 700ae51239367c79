//! The sans-IO protocol engine of one node: its local identities, a tunnel per
//! (local identity, peer identity) pair, index dispatch, cookies and timers.
//!
//! Callers feed it datagrams and plaintext packets together with the current instant;
//! it answers with what to send and when it next wants `handle_timeout`. It never reads
//! a clock and never touches a socket.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use ahash::RandomState;
use rand_core::{OsRng, RngCore};

use super::constants::*;
use super::cookie::{CookieIssuer, MacKeys};
use super::handshake::{self, TransportKeys};
use super::messages::{
    classify, read_u32, Kind, INITIATION_LEN, RESPONSE_LEN, SEAL_TAILROOM, TRANSPORT_HEADER_LEN,
};
use super::session::{OpenError, OpenJob, SealJob, Session};
use super::tunnel::{Initiating, Tunnel};

/// Index of a local identity in the device, in the order they were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalId(pub usize);

/// Index of a tunnel in the device, in the order they were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId(pub usize);

/// Why a datagram or packet was dropped. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
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
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub malformed: u64,
    pub bad_mac1: u64,
    pub handshake_failed: u64,
    pub unknown_peer: u64,
    pub handshake_replay: u64,
    pub handshake_flood: u64,
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
    fn count(&mut self, drop: Drop) {
        let counter = match drop {
            Drop::Malformed => &mut self.malformed,
            Drop::BadMac1 => &mut self.bad_mac1,
            Drop::HandshakeFailed => &mut self.handshake_failed,
            Drop::UnknownPeer => &mut self.unknown_peer,
            Drop::HandshakeReplay => &mut self.handshake_replay,
            Drop::HandshakeFlood => &mut self.handshake_flood,
            Drop::UnknownIndex => &mut self.unknown_index,
            Drop::Forged => &mut self.forged,
            Drop::Replayed => &mut self.replayed,
            Drop::Expired => &mut self.expired,
            Drop::NoEndpoint => &mut self.no_endpoint,
            Drop::QueueOverflow => &mut self.queue_overflow,
            Drop::HandshakeGaveUp => &mut self.handshake_gave_up,
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
            + self.unknown_index
            + self.forged
            + self.replayed
            + self.expired
    }
}

/// Something that happened that an operator may want to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    HandshakeCompleted {
        tunnel: TunnelId,
        we_initiated: bool,
    },
    Roamed {
        tunnel: TunnelId,
        from: SocketAddr,
    },
    SessionExpired {
        tunnel: TunnelId,
    },
    HandshakeGaveUp {
        tunnel: TunnelId,
        dropped_packets: usize,
    },
}

/// A datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub data: Vec<u8>,
}

/// The outcome of sealing a plaintext packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// The buffer now holds a transport message of this length for this endpoint.
    Send {
        destination: SocketAddr,
        len: usize,
    },
    /// No session yet: the packet waits for the handshake that is now under way.
    Queued,
    Dropped(Drop),
}

/// `prepare_seal`'s answer: the encryption left to do, or the outcome.
pub enum SealStep {
    /// Finish with `job.seal(buf)`, then send the message to `destination`.
    Seal {
        destination: SocketAddr,
        job: SealJob,
    },
    Done(Sealed),
}

/// `prepare_receive`'s answer: a transport message to decrypt, or the outcome.
pub enum ReceiveStep {
    /// Decrypt with `open.open(datagram)`, then hand the result to `finish_receive`.
    Open(TransportOpen),
    Done(Received),
}

/// A transport message that passed every check that needs the device.
pub struct TransportOpen {
    tunnel: TunnelId,
    receiver: u32,
    job: OpenJob,
}

impl TransportOpen {
    /// Authenticates and decrypts `datagram` in place; needs no access to the device.
    pub fn open(&self, datagram: &mut [u8]) -> Result<Range<usize>, OpenError> {
        self.job.open(datagram)
    }
}

fn open_drop(error: OpenError) -> Drop {
    match error {
        OpenError::Expired => Drop::Expired,
        OpenError::Replayed => Drop::Replayed,
        OpenError::Forged => Drop::Forged,
    }
}

/// The outcome of a datagram from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// An authenticated plaintext (still padded) at this range of the buffer.
    Data {
        tunnel: TunnelId,
        plaintext: Range<usize>,
    },
    /// A handshake, cookie or keepalive was processed; see `poll_transmit`.
    Control,
    Dropped(Drop),
}

pub struct DeviceConfig {
    /// Handshake messages per second above which initiations need a cookie (mac2).
    pub under_load_threshold: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            under_load_threshold: 256,
        }
    }
}

struct Local {
    private: [u8; 32],
    keys: MacKeys,
    cookies: CookieIssuer,
}

/// Counts handshake messages per second to decide when to demand cookies.
struct LoadMeter {
    threshold: u32,
    window_start: Option<Instant>,
    count: u32,
    under_load_until: Option<Instant>,
}

impl LoadMeter {
    /// Records one handshake message and says whether we are under load.
    fn record(&mut self, now: Instant) -> bool {
        let fresh_window = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh_window {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > self.threshold {
            // Stay strict for a second after the burst, as wireguard-go does.
            self.under_load_until = Some(now + Duration::from_secs(1));
        }
        self.under_load_until.is_some_and(|until| now < until)
    }
}

pub struct Device {
    /// Maps monotonic instants to wall-clock time for handshake timestamps.
    wall_clock_anchor: (Instant, Duration),
    locals: Vec<Local>,
    tunnels: Vec<Tunnel>,
    by_peer_key: HashMap<(usize, [u8; 32]), TunnelId, RandomState>,
    /// Receiver index → tunnel, for sessions and handshakes in progress.
    indices: HashMap<u32, TunnelId, RandomState>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    load: LoadMeter,
    /// Never later than the earliest tunnel deadline; may be earlier (a spurious wake-up
    /// recomputes it), so per-packet calls keep it up to date in O(1).
    next_deadline: Option<Instant>,
    /// The tunnel the current `receive` call touched, whose deadline it must fold in.
    touched: Option<TunnelId>,
    pub stats: Stats,
}

impl Device {
    /// `now_unix` is the wall-clock time at `now`, as time since the Unix epoch.
    pub fn new(config: DeviceConfig, now: Instant, now_unix: Duration) -> Self {
        Device {
            wall_clock_anchor: (now, now_unix),
            locals: Vec::new(),
            tunnels: Vec::new(),
            by_peer_key: HashMap::default(),
            indices: HashMap::default(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            load: LoadMeter {
                threshold: config.under_load_threshold,
                window_start: None,
                count: 0,
                under_load_until: None,
            },
            next_deadline: None,
            touched: None,
            stats: Stats::default(),
        }
    }

    pub fn add_local(&mut self, private: [u8; 32]) -> LocalId {
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
        self.locals.push(Local {
            private,
            keys: MacKeys::for_public_key(public.as_bytes()),
            cookies: CookieIssuer::new(),
        });
        LocalId(self.locals.len() - 1)
    }

    /// Adds the tunnel between a local identity and a peer identity's public key.
    pub fn add_tunnel(
        &mut self,
        now: Instant,
        local: LocalId,
        peer_public: [u8; 32],
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<Duration>,
    ) -> TunnelId {
        let id = TunnelId(self.tunnels.len());
        self.tunnels.push(Tunnel::new(
            local.0,
            peer_public,
            endpoint,
            persistent_keepalive,
            now,
        ));
        self.by_peer_key.insert((local.0, peer_public), id);
        self.fold_deadline(id);
        id
    }

    /// Folds a tunnel's (possibly earlier) deadline into the cached minimum.
    fn fold_deadline(&mut self, tunnel: TunnelId) {
        if let Some(deadline) = self.tunnels[tunnel.0].next_deadline() {
            self.next_deadline = Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
        }
    }

    pub fn endpoint(&self, tunnel: TunnelId) -> Option<SocketAddr> {
        self.tunnels[tunnel.0].endpoint
    }

    pub fn has_session(&self, tunnel: TunnelId) -> bool {
        self.tunnels[tunnel.0].current.is_some()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` next has work to do (possibly earlier, never later).
    pub fn poll_timeout(&self) -> Option<Instant> {
        debug_assert!(
            match (
                self.next_deadline,
                self.tunnels.iter().filter_map(Tunnel::next_deadline).min()
            ) {
                (Some(cached), Some(exact)) => cached <= exact,
                (None, exact) => exact.is_none(),
                (Some(_), None) => true,
            },
            "cached deadline is later than a tunnel's"
        );
        self.next_deadline
    }

    /// Starts a handshake now unless one was sent within REKEY_TIMEOUT.
    pub fn initiate(&mut self, now: Instant, tunnel: TunnelId) {
        let t = &self.tunnels[tunnel.0];
        let recently = t
            .last_initiation_sent
            .is_some_and(|at| now.saturating_duration_since(at) < REKEY_TIMEOUT);
        if t.initiating.is_some() || recently {
            return;
        }
        self.tunnels[tunnel.0].attempts_since = Some(now);
        self.send_initiation(now, tunnel);
        self.fold_deadline(tunnel);
    }

    /// Seals the plaintext at `buf[16..16 + len]` in place for `tunnel`. `buf` must hold
    /// `SEAL_TAILROOM` bytes more after the plaintext.
    pub fn seal(&mut self, now: Instant, tunnel: TunnelId, buf: &mut [u8], len: usize) -> Sealed {
        match self.prepare_seal(now, tunnel, buf, len) {
            SealStep::Seal { destination, job } => Sealed::Send {
                destination,
                len: job.seal(buf),
            },
            SealStep::Done(sealed) => sealed,
        }
    }

    /// `seal` up to the encryption, which the returned job does without the device.
    pub fn prepare_seal(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        buf: &mut [u8],
        len: usize,
    ) -> SealStep {
        let t = &mut self.tunnels[tunnel.0];
        let Some(destination) = t.endpoint else {
            self.stats.count(Drop::NoEndpoint);
            return SealStep::Done(Sealed::Dropped(Drop::NoEndpoint));
        };
        let Some(session) = t.sending_session(now) else {
            let mut packet = vec![0u8; TRANSPORT_HEADER_LEN + len + SEAL_TAILROOM];
            packet[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]
                .copy_from_slice(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]);
            if t.enqueue(packet) {
                self.stats.count(Drop::QueueOverflow);
            }
            self.initiate(now, tunnel);
            return SealStep::Done(Sealed::Queued);
        };
        let job = session.prepare_seal(buf, len);
        t.on_authenticated_send(now);
        if len > 0 {
            t.on_data_sent(now);
        }
        if t.wants_rekey_after_send(now) {
            self.initiate(now, tunnel);
        }
        self.fold_deadline(tunnel);
        SealStep::Seal { destination, job }
    }

    /// Processes one datagram from `source`, decrypting transport data in place.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, datagram: &mut [u8]) -> Received {
        match self.prepare_receive(now, source, datagram) {
            ReceiveStep::Open(open) => {
                let opened = open.open(datagram);
                self.finish_receive(now, source, open, opened)
            }
            ReceiveStep::Done(received) => received,
        }
    }

    /// `receive` up to the decryption of transport data, which the returned job does
    /// without the device. Handshake messages are processed completely.
    pub fn prepare_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &mut [u8],
    ) -> ReceiveStep {
        self.touched = None;
        let outcome = match classify(datagram) {
            None => Err(Drop::Malformed),
            Some(Kind::Initiation) => self.receive_initiation(now, source, datagram),
            Some(Kind::Response) => self.receive_response(now, source, datagram),
            Some(Kind::CookieReply) => self.receive_cookie_reply(now, datagram),
            Some(Kind::Transport) => match self.prepare_transport(now, datagram) {
                Ok(open) => return ReceiveStep::Open(open),
                Err(drop) => Err(drop),
            },
        };
        ReceiveStep::Done(self.conclude(source, outcome))
    }

    /// The rest of `receive` once `open` was tried on the datagram.
    pub fn finish_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        open: TransportOpen,
        opened: Result<Range<usize>, OpenError>,
    ) -> Received {
        self.touched = None;
        let outcome = self.finish_transport(now, source, open, opened);
        self.conclude(source, outcome)
    }

    /// Folds the deadline of the tunnel a datagram touched and counts a drop.
    fn conclude(&mut self, source: SocketAddr, outcome: Result<Received, Drop>) -> Received {
        if let Some(tunnel) = self.touched.take() {
            self.fold_deadline(tunnel);
        }
        match outcome {
            Ok(received) => received,
            Err(drop) => {
                self.stats.count(drop);
                tracing::trace!(?drop, %source, "dropped datagram");
                Received::Dropped(drop)
            }
        }
    }

    /// Runs every timer that is due: retransmissions, keepalives, rekeys, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        for index in 0..self.tunnels.len() {
            self.tunnel_timers(now, TunnelId(index));
        }
        self.next_deadline = self.tunnels.iter().filter_map(Tunnel::next_deadline).min();
    }

    fn tunnel_timers(&mut self, now: Instant, tunnel: TunnelId) {
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        self.expire_sessions(now, tunnel);
        let t = &mut self.tunnels[tunnel.0];

        if due(t.initiating.as_ref().map(|i| i.retry_at)) {
            let gave_up = t
                .attempts_since
                .is_none_or(|since| now.saturating_duration_since(since) >= REKEY_ATTEMPT_TIME);
            if gave_up {
                let dropped = t.queue.len();
                t.queue.clear();
                t.attempts_since = None;
                t.new_handshake_at = None;
                if let Some(old) = t.initiating.take() {
                    self.indices.remove(&old.local_index);
                }
                self.stats.handshake_gave_up += dropped as u64;
                self.events.push_back(Event::HandshakeGaveUp {
                    tunnel,
                    dropped_packets: dropped,
                });
            } else {
                self.send_initiation(now, tunnel);
            }
        }

        let t = &mut self.tunnels[tunnel.0];
        if due(t.new_handshake_at) {
            t.new_handshake_at = None;
            self.initiate(now, tunnel);
        }

        let t = &mut self.tunnels[tunnel.0];
        if due(t.keepalive_at) {
            t.keepalive_at = None;
            self.send_keepalive(now, tunnel);
        }

        let t = &mut self.tunnels[tunnel.0];
        if due(t.persistent_keepalive_at) {
            t.persistent_keepalive_at = None;
            self.send_keepalive(now, tunnel);
        }
    }

    /// Drops sessions past REJECT_AFTER_TIME: their keys can never be used again.
    fn expire_sessions(&mut self, now: Instant, tunnel: TunnelId) {
        let t = &mut self.tunnels[tunnel.0];
        let mut expired_current = false;
        for (slot, is_current) in [
            (&mut t.current, true),
            (&mut t.previous, false),
            (&mut t.next, false),
        ] {
            if slot
                .as_ref()
                .is_some_and(|s| s.age(now) >= REJECT_AFTER_TIME)
            {
                let session = slot.take().expect("checked");
                self.indices.remove(&session.local_index);
                expired_current |= is_current;
            }
        }
        if expired_current {
            self.events.push_back(Event::SessionExpired { tunnel });
        }
    }

    /// Sends a keepalive on the current session, or starts a handshake if there is none.
    fn send_keepalive(&mut self, now: Instant, tunnel: TunnelId) {
        let mut buf = [0u8; TRANSPORT_HEADER_LEN + SEAL_TAILROOM];
        match self.seal(now, tunnel, &mut buf, 0) {
            Sealed::Send { destination, len } => self.outbox.push_back(Transmit {
                destination,
                data: buf[..len].to_vec(),
            }),
            Sealed::Queued | Sealed::Dropped(_) => {}
        }
    }

    fn allocate_index(&mut self, tunnel: TunnelId) -> u32 {
        loop {
            let index = OsRng.next_u32();
            if let std::collections::hash_map::Entry::Vacant(slot) = self.indices.entry(index) {
                slot.insert(tunnel);
                return index;
            }
        }
    }

    fn wall_clock(&self, now: Instant) -> Duration {
        let (anchor, unix) = self.wall_clock_anchor;
        unix + now.saturating_duration_since(anchor)
    }

    /// Writes a fresh initiation (new ephemeral key and index) and arms its retry timer.
    fn send_initiation(&mut self, now: Instant, tunnel: TunnelId) {
        let Some(destination) = self.tunnels[tunnel.0].endpoint else {
            return;
        };
        if let Some(old) = self.tunnels[tunnel.0].initiating.take() {
            self.indices.remove(&old.local_index);
        }
        let local_index = self.allocate_index(tunnel);
        let timestamp = handshake::tai64n(self.wall_clock(now));
        let t = &mut self.tunnels[tunnel.0];
        let mut msg = [0u8; INITIATION_LEN];
        let noise = handshake::write_initiation(
            &self.locals[t.local].private,
            &t.peer_public,
            local_index,
            &timestamp,
            &mut msg,
        );
        let cookie = t.fresh_cookie(now).copied();
        let mac1 = t.peer_keys.write_macs(&mut msg, cookie.as_ref());
        let jitter = Duration::from_millis(u64::from(OsRng.next_u32() % 334));
        t.initiating = Some(Initiating {
            noise: Some(noise),
            local_index,
            mac1,
            retry_at: now + REKEY_TIMEOUT + jitter.min(REKEY_TIMEOUT_JITTER_MAX),
        });
        t.last_initiation_sent = Some(now);
        t.on_authenticated_send(now);
        tracing::debug!(tunnel = tunnel.0, %destination, "sending handshake initiation");
        self.outbox.push_back(Transmit {
            destination,
            data: msg.to_vec(),
        });
    }

    /// Checks mac1 (and mac2 under load) of a handshake message addressed to `local`.
    /// `Ok(false)` means a cookie reply was sent instead of processing the message.
    fn admit_handshake(
        &mut self,
        now: Instant,
        source: SocketAddr,
        local: usize,
        msg: &[u8],
    ) -> Result<bool, Drop> {
        if !self.locals[local].keys.verify_mac1(msg) {
            return Err(Drop::BadMac1);
        }
        let under_load = self.load.record(now);
        let l = &mut self.locals[local];
        if under_load && !l.cookies.verify_mac2(now, source, msg) {
            let sender_index = read_u32(msg, 4);
            let reply = l
                .cookies
                .cookie_reply(now, source, &l.keys, msg, sender_index);
            self.stats.cookie_replies_sent += 1;
            self.outbox.push_back(Transmit {
                destination: source,
                data: reply.to_vec(),
            });
            return Ok(false);
        }
        Ok(true)
    }

    fn receive_initiation(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
    ) -> Result<Received, Drop> {
        // mac1 is keyed with the responder's public key, so it names the local identity.
        let local = (0..self.locals.len())
            .find(|&l| self.locals[l].keys.verify_mac1(msg))
            .ok_or(Drop::BadMac1)?;
        if !self.admit_handshake(now, source, local, msg)? {
            return Ok(Received::Control);
        }
        let received = handshake::read_initiation(&self.locals[local].private, msg)
            .ok_or(Drop::HandshakeFailed)?;
        let tunnel = *self
            .by_peer_key
            .get(&(local, received.peer_public))
            .ok_or(Drop::UnknownPeer)?;
        self.touched = Some(tunnel);
        let t = &self.tunnels[tunnel.0];
        if t.last_timestamp
            .is_some_and(|last| received.timestamp <= last)
        {
            return Err(Drop::HandshakeReplay);
        }
        if t.last_initiation_received
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_INITIATION_INTERVAL)
        {
            return Err(Drop::HandshakeFlood);
        }

        let timestamp = received.timestamp;
        let remote_index = received.sender_index;
        let local_index = self.allocate_index(tunnel);
        let mut response = [0u8; RESPONSE_LEN];
        let keys = handshake::write_response(received, local_index, &mut response);
        let t = &mut self.tunnels[tunnel.0];
        let cookie = t.fresh_cookie(now).copied();
        t.peer_keys.write_macs(&mut response, cookie.as_ref());
        t.last_timestamp = Some(timestamp);
        t.last_initiation_received = Some(now);
        let session = Session::new(
            now,
            local_index,
            remote_index,
            false,
            &keys.send,
            &keys.receive,
        );
        // Responder: the new session waits in `next` until the initiator uses it; the
        // previous one goes, as in WireGuard.
        for old in [t.next.replace(session), t.previous.take()]
            .into_iter()
            .flatten()
        {
            self.indices.remove(&old.local_index);
        }
        self.update_endpoint(tunnel, source);
        let t = &mut self.tunnels[tunnel.0];
        t.on_authenticated_receive(now);
        t.on_authenticated_send(now);
        self.stats.handshakes_completed += 1;
        self.events.push_back(Event::HandshakeCompleted {
            tunnel,
            we_initiated: false,
        });
        self.outbox.push_back(Transmit {
            destination: source,
            data: response.to_vec(),
        });
        Ok(Received::Control)
    }

    fn receive_response(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
    ) -> Result<Received, Drop> {
        let receiver = read_u32(msg, 8);
        let tunnel = *self.indices.get(&receiver).ok_or(Drop::UnknownIndex)?;
        self.touched = Some(tunnel);
        let local = self.tunnels[tunnel.0].local;
        let pending = self.tunnels[tunnel.0]
            .initiating
            .as_ref()
            .filter(|i| i.local_index == receiver && i.noise.is_some());
        if pending.is_none() {
            return Err(Drop::UnknownIndex);
        }
        if !self.admit_handshake(now, source, local, msg)? {
            return Ok(Received::Control);
        }
        let t = &mut self.tunnels[tunnel.0];
        let initiating = t.initiating.as_mut().expect("checked above");
        let noise = initiating.noise.take().expect("checked above");
        let TransportKeys { send, receive } =
            handshake::read_response(noise, msg).ok_or(Drop::HandshakeFailed)?;
        let initiating = t.initiating.take().expect("checked above");
        let remote_index = read_u32(msg, 4);
        let session = Session::new(
            now,
            initiating.local_index,
            remote_index,
            true,
            &send,
            &receive,
        );
        // Initiator: the new session is usable at once; the old current stays as previous
        // for packets still in flight.
        let old_previous = t.previous.take();
        t.previous = t.current.replace(session);
        if let Some(old) = old_previous {
            self.indices.remove(&old.local_index);
        }
        let t = &mut self.tunnels[tunnel.0];
        t.attempts_since = None;
        t.on_authenticated_receive(now);
        self.update_endpoint(tunnel, source);
        self.stats.handshakes_completed += 1;
        self.events.push_back(Event::HandshakeCompleted {
            tunnel,
            we_initiated: true,
        });
        // Confirm the session to the responder: with queued data, or a keepalive.
        if self.tunnels[tunnel.0].queue.is_empty() {
            self.send_keepalive(now, tunnel);
        } else {
            self.flush_queue(now, tunnel);
        }
        Ok(Received::Control)
    }

    fn receive_cookie_reply(&mut self, now: Instant, msg: &[u8]) -> Result<Received, Drop> {
        let receiver = read_u32(msg, 4);
        let tunnel = *self.indices.get(&receiver).ok_or(Drop::UnknownIndex)?;
        let t = &mut self.tunnels[tunnel.0];
        let mac1 = t
            .initiating
            .as_ref()
            .filter(|i| i.local_index == receiver)
            .map(|i| i.mac1)
            .ok_or(Drop::UnknownIndex)?;
        let cookie = t
            .peer_keys
            .open_cookie_reply(msg, &mac1)
            .ok_or(Drop::Forged)?;
        t.cookie = Some((cookie, now));
        tracing::debug!(
            tunnel = tunnel.0,
            "cookie reply received; peer is under load"
        );
        Ok(Received::Control)
    }

    fn prepare_transport(&mut self, now: Instant, msg: &[u8]) -> Result<TransportOpen, Drop> {
        let receiver = read_u32(msg, 4);
        let tunnel = *self.indices.get(&receiver).ok_or(Drop::UnknownIndex)?;
        let t = &mut self.tunnels[tunnel.0];
        let session = t.session_by_index(receiver).ok_or(Drop::UnknownIndex)?;
        let job = session.prepare_open(now, msg).map_err(open_drop)?;
        Ok(TransportOpen {
            tunnel,
            receiver,
            job,
        })
    }

    fn finish_transport(
        &mut self,
        now: Instant,
        source: SocketAddr,
        open: TransportOpen,
        opened: Result<Range<usize>, OpenError>,
    ) -> Result<Received, Drop> {
        let plaintext = opened.map_err(open_drop)?;
        let (tunnel, receiver) = (open.tunnel, open.receiver);
        self.touched = Some(tunnel);
        let t = &mut self.tunnels[tunnel.0];
        // The session may have been replaced since the job was made.
        let session = t
            .session_by_index(receiver)
            .filter(|s| s.issued(&open.job))
            .ok_or(Drop::UnknownIndex)?;
        session.accept(open.job.counter()).map_err(open_drop)?;
        let confirms_next = t.next.as_ref().is_some_and(|s| s.local_index == receiver);
        if confirms_next {
            let next = t.next.take();
            let old_previous = std::mem::replace(&mut t.previous, t.current.take());
            t.current = next;
            if let Some(old) = old_previous {
                self.indices.remove(&old.local_index);
            }
        }
        self.update_endpoint(tunnel, source);
        let t = &mut self.tunnels[tunnel.0];
        t.on_authenticated_receive(now);
        if confirms_next {
            self.flush_queue(now, tunnel);
        }
        if plaintext.is_empty() {
            return Ok(Received::Control);
        }
        let t = &mut self.tunnels[tunnel.0];
        t.on_data_received(now);
        if t.wants_rekey_after_receive(now) {
            self.initiate(now, tunnel);
        }
        Ok(Received::Data { tunnel, plaintext })
    }

    /// Roaming: an authenticated, non-replayed packet moves the peer's endpoint.
    fn update_endpoint(&mut self, tunnel: TunnelId, source: SocketAddr) {
        let t = &mut self.tunnels[tunnel.0];
        if t.endpoint != Some(source) {
            if t.endpoint.is_some() {
                self.events.push_back(Event::Roamed {
                    tunnel,
                    from: source,
                });
            }
            t.endpoint = Some(source);
        }
    }

    /// Seals and sends every packet that waited for a session.
    fn flush_queue(&mut self, now: Instant, tunnel: TunnelId) {
        while let Some(mut packet) = self.tunnels[tunnel.0].queue.pop_front() {
            let len = packet.len() - TRANSPORT_HEADER_LEN - SEAL_TAILROOM;
            match self.seal(now, tunnel, &mut packet, len) {
                Sealed::Send { destination, len } => {
                    packet.truncate(len);
                    self.outbox.push_back(Transmit {
                        destination,
                        data: packet,
                    });
                }
                // No usable session after all: `seal` queued it again; stop here.
                Sealed::Queued | Sealed::Dropped(_) => break,
            }
        }
    }
}
