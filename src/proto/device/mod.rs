//! The sans-IO protocol engine of one node: its local identities' keys, a tunnel per
//! (local key, peer key) pair, receiver-index dispatch, cookies and timers.
//!
//! Callers feed it datagrams and plaintext packets together with the current instant;
//! it answers with what to send and when it next wants `handle_timeout`. It never reads
//! a clock, never touches a socket and draws randomness only from the source it is given.

mod handshake;

pub use handshake::{InitiationJob, InitiationWork, Mac1Screen, Mac1Verdict};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use ahash::RandomState;

use super::constants::REKEY_TIMEOUT_JITTER_MAX;
use super::cookie::{CookieIssuer, MacKeys};
use super::load_meter::LoadMeter;
use super::messages::{
    classify, read_u32, Kind, AEAD_TAG_LEN, SEAL_TAILROOM, TRANSPORT_HEADER_LEN,
};
use super::rate_limiter::RateLimiter;
use super::report::{Event, ProtocolDrop, Stats, Traffic};
use super::session::{OpenError, OpenJob, SealJob};
use super::slots::Slots;
use super::timers::Timer;
use super::tunnel::{Released, Tunnel};
use super::{LocalKeyId, Random, TunnelId};
use crate::identity::PrivateKey;

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
    Dropped(ProtocolDrop),
}

/// `begin_seal`'s answer: the encryption left to do, or why there is none.
pub enum SealStep {
    /// Finish with `job.seal(buf)`, then send the message to `destination`.
    Seal {
        destination: SocketAddr,
        job: SealJob,
    },
    /// No session yet: the packet waits for the handshake that is now under way.
    Queued,
    Dropped(ProtocolDrop),
}

/// `begin_receive`'s answer: a transport message to decrypt, an initiation to work on,
/// or the outcome.
pub enum ReceiveStep {
    /// Decrypt with `open.open(datagram)`, then hand the result to `finish_receive`.
    Open(TransportOpen),
    /// Run `job.run(datagram)`, then hand the result to `finish_initiation`.
    Initiation(InitiationJob),
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

fn open_drop(error: OpenError) -> ProtocolDrop {
    match error {
        OpenError::Expired => ProtocolDrop::Expired,
        OpenError::Replayed => ProtocolDrop::Replayed,
        OpenError::Forged => ProtocolDrop::Forged,
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
    Dropped(ProtocolDrop),
}

pub struct DeviceConfig {
    /// Handshake messages per second above which initiations need a cookie (mac2). The
    /// default, 2,048, is about half of what one core answers (an initiation's work is
    /// about 0.2 ms): a node whose 1,000 peer identities all shake hands at once (a
    /// restart) answers them all at once, while a flood at several thousand a second
    /// meets cookies and the per-address limit.
    pub under_load_threshold: u32,
    /// The MTU of the device the plaintexts come from: padding never goes past it.
    pub mtu: u16,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            under_load_threshold: 2048,
            mtu: 1420,
        }
    }
}

/// A local identity's static key and what is derived from it.
struct LocalKey {
    /// Shared with the configuration, not copied: one owner of the secret.
    private: PrivateKey,
    /// mac1 and cookie keys of our own public key: for checking what peers send us.
    keys: MacKeys,
    cookies: CookieIssuer,
}

pub struct Device {
    /// Maps monotonic instants to wall-clock time for handshake timestamps.
    wall_clock_anchor: (Instant, Duration),
    random: Random,
    locals: Slots<LocalKey>,
    /// The locals' mac1 keys, shared with whoever screens initiations.
    screen: Mac1Screen,
    tunnels: Slots<Tunnel>,
    by_peer_key: HashMap<(LocalKeyId, [u8; 32]), TunnelId, RandomState>,
    /// Receiver index → tunnel, for sessions and handshakes in progress.
    indices: HashMap<u32, TunnelId, RandomState>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    load: LoadMeter,
    /// Handshake messages per source address, under load.
    rate: RateLimiter,
    mtu: usize,
    /// Never later than the earliest tunnel deadline; may be earlier (a spurious wake-up
    /// recomputes it), so per-packet calls keep it up to date in O(1).
    next_deadline: Option<Instant>,
    /// The tunnel the current `receive` call touched, whose deadline it must fold in.
    touched: Option<TunnelId>,
    stats: Stats,
}

/// Hash state for the device's tables, keyed from the device's random source: lookups by
/// attacker-chosen receiver index stay unpredictable.
fn hash_state(random: &mut Random) -> RandomState {
    RandomState::with_seeds(
        random.next_u64(),
        random.next_u64(),
        random.next_u64(),
        random.next_u64(),
    )
}

impl Device {
    /// `now_unix` is the wall-clock time at `now`, as time since the Unix epoch.
    pub fn new(config: DeviceConfig, mut random: Random, now: Instant, now_unix: Duration) -> Self {
        Device {
            wall_clock_anchor: (now, now_unix),
            locals: Slots::default(),
            screen: Mac1Screen::default(),
            tunnels: Slots::default(),
            by_peer_key: HashMap::with_hasher(hash_state(&mut random)),
            indices: HashMap::with_hasher(hash_state(&mut random)),
            rate: RateLimiter::new(hash_state(&mut random)),
            random,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            load: LoadMeter::new(config.under_load_threshold),
            mtu: usize::from(config.mtu),
            next_deadline: None,
            touched: None,
            stats: Stats::default(),
        }
    }

    pub fn add_local(&mut self, private: PrivateKey) -> LocalKeyId {
        let public = private.public_key();
        let slot = self.locals.insert(LocalKey {
            private,
            keys: MacKeys::for_public_key(public.as_bytes()),
            cookies: CookieIssuer::new(),
        });
        self.renew_screen();
        LocalKeyId(slot)
    }

    /// Removes a local identity and every tunnel it has; its key is wiped once no
    /// handshake in flight holds it any more.
    pub fn remove_local(&mut self, local: LocalKeyId) {
        let tunnels: Vec<TunnelId> = self
            .by_peer_key
            .iter()
            .filter(|((l, _), _)| *l == local)
            .map(|(_, t)| *t)
            .collect();
        for tunnel in tunnels {
            self.remove_tunnel(tunnel);
        }
        if self.locals.remove(local.0).is_some() {
            self.renew_screen();
        }
    }

    /// A new screen for the current local identities; the old one goes stale.
    fn renew_screen(&mut self) {
        self.screen = Mac1Screen::new(
            self.locals
                .slots()
                .map(|l| l.map(|l| l.keys.clone()))
                .collect(),
            self.screen.generation() + 1,
        );
    }

    /// The local identities' mac1 keys, to screen initiations without the device.
    pub fn mac1_screen(&self) -> Mac1Screen {
        self.screen.clone()
    }

    /// Adds the tunnel between a local identity and a peer identity's public key.
    pub fn add_tunnel(
        &mut self,
        now: Instant,
        local: LocalKeyId,
        peer_public: [u8; 32],
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<Duration>,
    ) -> TunnelId {
        let id = TunnelId(self.tunnels.insert(Tunnel::new(
            local,
            peer_public,
            endpoint,
            persistent_keepalive,
            now,
        )));
        self.by_peer_key.insert((local, peer_public), id);
        self.fold_deadline(id);
        id
    }

    /// Removes a tunnel at once: its sessions and their keys, the handshake in flight,
    /// the packets waiting and its timers go; a message for one of its receiver indices
    /// is then unknown. Its number may be given to a tunnel added later.
    pub fn remove_tunnel(&mut self, tunnel: TunnelId) {
        let Some(t) = self.tunnels.remove(tunnel.0) else {
            return;
        };
        self.by_peer_key.remove(&(t.local(), *t.peer_public()));
        self.release(t.retire());
    }

    /// Whether `tunnel` is one of the device's (not removed).
    pub fn has_tunnel(&self, tunnel: TunnelId) -> bool {
        self.tunnels.get(tunnel.0).is_some()
    }

    /// Sets the peer's endpoint, as configuration says (roaming moves it again later).
    pub fn set_endpoint(&mut self, tunnel: TunnelId, endpoint: Option<SocketAddr>) {
        if let Some(t) = self.tunnels.get_mut(tunnel.0) {
            t.set_endpoint(endpoint);
        }
    }

    /// Sets the persistent keepalive interval; a new interval starts counting now.
    pub fn set_persistent_keepalive(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        interval: Option<Duration>,
    ) {
        if let Some(t) = self.tunnels.get_mut(tunnel.0) {
            t.set_persistent_keepalive(interval, now);
            self.fold_deadline(tunnel);
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What `tunnel` carried and when its last handshake completed.
    pub fn traffic(&self, tunnel: TunnelId) -> Option<Traffic> {
        self.tunnels.get(tunnel.0).map(|t| *t.traffic())
    }

    pub fn endpoint(&self, tunnel: TunnelId) -> Option<SocketAddr> {
        self.tunnels.get(tunnel.0).and_then(Tunnel::endpoint)
    }

    pub fn has_session(&self, tunnel: TunnelId) -> bool {
        self.tunnels.get(tunnel.0).is_some_and(Tunnel::has_session)
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

    /// Folds a tunnel's (possibly earlier) deadline into the cached minimum.
    fn fold_deadline(&mut self, tunnel: TunnelId) {
        if let Some(deadline) = self.tunnels[tunnel.0].next_deadline() {
            self.next_deadline = Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
        }
    }

    /// Frees receiver indices a tunnel let go of.
    fn release(&mut self, released: Released) {
        for index in released {
            self.indices.remove(&index);
        }
    }

    /// The tunnel a message addressed to receiver index `index` is for.
    fn tunnel_of(&self, index: u32) -> Result<TunnelId, ProtocolDrop> {
        self.indices
            .get(&index)
            .copied()
            .ok_or(ProtocolDrop::UnknownIndex)
    }

    /// A fresh receiver index for `tunnel`.
    fn allocate_index(&mut self, tunnel: TunnelId) -> u32 {
        loop {
            let index = self.random.next_u32();
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

    /// Random delay added to a handshake retransmission, up to REKEY_TIMEOUT_JITTER_MAX.
    fn retry_jitter(&mut self) -> Duration {
        let max = REKEY_TIMEOUT_JITTER_MAX.as_millis() as u32 + 1;
        Duration::from_millis(u64::from(self.random.next_u32() % max))
    }

    /// Seals the plaintext at `buf[16..16 + len]` in place for `tunnel`. `buf` must hold
    /// `SEAL_TAILROOM` bytes more after the plaintext.
    pub fn seal(&mut self, now: Instant, tunnel: TunnelId, buf: &mut [u8], len: usize) -> Sealed {
        match self.begin_seal(now, tunnel, buf, len) {
            SealStep::Seal { destination, job } => Sealed::Send {
                destination,
                len: job.seal(buf),
            },
            SealStep::Queued => Sealed::Queued,
            SealStep::Dropped(drop) => Sealed::Dropped(drop),
        }
    }

    /// `seal` up to the encryption, which the returned job does without the device.
    pub fn begin_seal(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        buf: &mut [u8],
        len: usize,
    ) -> SealStep {
        // A removed tunnel has no endpoint any more.
        let Some(t) = self.tunnels.get_mut(tunnel.0) else {
            self.stats.count(ProtocolDrop::NoEndpoint);
            return SealStep::Dropped(ProtocolDrop::NoEndpoint);
        };
        let Some(destination) = t.endpoint() else {
            self.stats.count(ProtocolDrop::NoEndpoint);
            return SealStep::Dropped(ProtocolDrop::NoEndpoint);
        };
        let Some(session) = t.sending_session(now) else {
            let mut packet = vec![0u8; TRANSPORT_HEADER_LEN + len + SEAL_TAILROOM];
            packet[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]
                .copy_from_slice(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len]);
            if t.enqueue(packet) {
                self.stats.count(ProtocolDrop::QueueOverflow);
            }
            self.initiate(now, tunnel);
            return SealStep::Queued;
        };
        let job = session.begin_seal(buf, len, self.mtu);
        t.count_sent(job.sealed_len(), len > 0);
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
        match self.begin_receive(now, source, datagram, Mac1Verdict::NotScreened) {
            ReceiveStep::Open(open) => {
                let opened = open.open(datagram);
                self.finish_receive(now, source, open, opened)
            }
            ReceiveStep::Initiation(job) => {
                let work = job.run(datagram);
                self.finish_initiation(now, source, job, work)
            }
            ReceiveStep::Done(received) => received,
        }
    }

    /// `receive` up to the work that needs no device: the decryption of transport data,
    /// and the Diffie-Hellman work of an initiation, which the returned jobs do.
    /// `verdict` is what a [`Mac1Screen`] said of the datagram, if one looked. Other
    /// handshake messages are processed completely.
    pub fn begin_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &mut [u8],
        verdict: Mac1Verdict,
    ) -> ReceiveStep {
        self.touched = None;
        let outcome = match classify(datagram) {
            None => Err(ProtocolDrop::Malformed),
            Some(Kind::Initiation) => match self.begin_initiation(now, source, datagram, verdict) {
                Ok(Some(job)) => return ReceiveStep::Initiation(job),
                Ok(None) => Ok(Received::Control),
                Err(drop) => Err(drop),
            },
            Some(Kind::Response) => self.receive_response(now, source, datagram),
            Some(Kind::CookieReply) => self.receive_cookie_reply(now, datagram),
            Some(Kind::Transport) => match self.begin_transport(now, datagram) {
                Ok(open) => return ReceiveStep::Open(open),
                Err(drop) => Err(drop),
            },
        };
        ReceiveStep::Done(self.conclude(source, outcome))
    }

    /// The rest of `receive` once an initiation's job ran.
    pub fn finish_initiation(
        &mut self,
        now: Instant,
        source: SocketAddr,
        job: InitiationJob,
        work: InitiationWork,
    ) -> Received {
        self.touched = None;
        let outcome = self.finish_initiation_work(now, source, job.local(), work);
        self.conclude(source, outcome)
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
    fn conclude(
        &mut self,
        source: SocketAddr,
        outcome: Result<Received, ProtocolDrop>,
    ) -> Received {
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

    fn begin_transport(&mut self, now: Instant, msg: &[u8]) -> Result<TransportOpen, ProtocolDrop> {
        let receiver = read_u32(msg, 4);
        let tunnel = self.tunnel_of(receiver)?;
        let session = self.tunnels[tunnel.0]
            .session_by_index(receiver)
            .ok_or(ProtocolDrop::UnknownIndex)?;
        let job = session.begin_open(now, msg).map_err(open_drop)?;
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
    ) -> Result<Received, ProtocolDrop> {
        let plaintext = opened.map_err(open_drop)?;
        let (tunnel, receiver) = (open.tunnel, open.receiver);
        self.touched = Some(tunnel);
        // The tunnel may have been removed, or its session replaced, since the job was
        // made.
        let t = self
            .tunnels
            .get_mut(tunnel.0)
            .ok_or(ProtocolDrop::UnknownIndex)?;
        let session = t
            .session_by_index(receiver)
            .filter(|s| s.issued(&open.job))
            .ok_or(ProtocolDrop::UnknownIndex)?;
        session.accept(open.job.counter()).map_err(open_drop)?;
        let (confirmed_next, released) = t.confirm_next(receiver);
        self.release(released);
        self.update_endpoint(tunnel, source);
        let t = &mut self.tunnels[tunnel.0];
        t.on_authenticated_receive(now);
        t.count_received(plaintext.end + AEAD_TAG_LEN, !plaintext.is_empty());
        if confirmed_next {
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
        if self.tunnels[tunnel.0].update_endpoint(source) {
            self.events.push_back(Event::Roamed {
                tunnel,
                new_endpoint: source,
            });
        }
    }

    /// Runs every timer that is due: retransmissions, keepalives, rekeys, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        for index in 0..self.tunnels.len() {
            if self.tunnels.get(index).is_some() {
                self.tunnel_timers(now, TunnelId(index));
            }
        }
        self.next_deadline = self.tunnels.iter().filter_map(Tunnel::next_deadline).min();
    }

    fn tunnel_timers(&mut self, now: Instant, tunnel: TunnelId) {
        let (released, current_expired) = self.tunnels[tunnel.0].expire_sessions(now);
        self.release(released);
        if current_expired {
            self.events.push_back(Event::SessionExpired { tunnel });
        }
        for timer in Timer::ALL {
            if !self.tunnels[tunnel.0].take_expired(timer, now) {
                continue;
            }
            match timer {
                Timer::RetryHandshake => self.retry_handshake(now, tunnel),
                Timer::NewHandshake => self.initiate(now, tunnel),
                Timer::Keepalive | Timer::PersistentKeepalive => self.send_keepalive(now, tunnel),
            }
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

    /// Seals and sends every packet that waited for a session.
    fn flush_queue(&mut self, now: Instant, tunnel: TunnelId) {
        while let Some(mut packet) = self.tunnels[tunnel.0].dequeue() {
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
