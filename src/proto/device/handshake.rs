//! The device's side of WireGuard's handshake: sending initiations and their retries,
//! admitting handshake messages (mac1, and mac2 with cookie replies under load), and
//! turning initiations and responses into sessions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use snow::HandshakeState;

use super::{Device, Received, Transmit};
use crate::identity::PrivateKey;
use crate::proto::constants::REKEY_TIMEOUT;
use crate::proto::cookie::MacKeys;
use crate::proto::messages::{classify, Kind};
use crate::proto::messages::{read_u32, INITIATION_LEN, RESPONSE_LEN};
use crate::proto::noise::{self, EphemeralSeed, TransportKeys, TIMESTAMP_LEN};
use crate::proto::report::{Event, ProtocolDrop};
use crate::proto::session::Session;
use crate::proto::tunnel::{InitiationInputs, Released};
use crate::proto::{LocalKeyId, TunnelId};

impl Device {
    /// Starts a handshake now unless one is waiting for its response or was sent within
    /// REKEY_TIMEOUT.
    pub fn initiate(&mut self, now: Instant, tunnel: TunnelId) {
        if !self
            .tunnels
            .get(tunnel.0)
            .is_some_and(|t| t.may_initiate(now))
        {
            return;
        }
        self.tunnels[tunnel.0].begin_attempts(now);
        self.send_initiation(now, tunnel);
        self.fold_deadline(tunnel);
    }

    /// The retry timer fired: send the initiation again, or give up after
    /// REKEY_ATTEMPT_TIME and drop the packets that waited.
    pub(super) fn retry_handshake(&mut self, now: Instant, tunnel: TunnelId) {
        if !self.tunnels[tunnel.0].attempts_exhausted(now) {
            self.send_initiation(now, tunnel);
            return;
        }
        let (released, dropped) = self.tunnels[tunnel.0].give_up();
        self.release(released);
        self.stats.handshake_gave_up += dropped as u64;
        self.events.push_back(Event::HandshakeGaveUp {
            tunnel,
            dropped_packets: dropped,
        });
    }

    fn ephemeral_seed(&mut self) -> EphemeralSeed {
        let mut seed = EphemeralSeed::default();
        self.random.fill_bytes(&mut seed[..]);
        seed
    }

    /// Writes the initiation that `inputs` make into `msg` (without macs); returns the
    /// handshake state that waits for its response.
    fn write_initiation(
        &self,
        tunnel: TunnelId,
        inputs: &InitiationInputs,
        msg: &mut [u8; INITIATION_LEN],
    ) -> HandshakeState {
        let t = &self.tunnels[tunnel.0];
        noise::write_initiation(
            self.locals[t.local().0]
                .private
                .as_static_secret()
                .as_bytes(),
            &inputs.seed,
            t.peer_public(),
            inputs.local_index,
            &inputs.timestamp,
            msg,
        )
    }

    /// Makes the handshake state of the initiation in flight again: writing the same
    /// initiation from the same inputs leaves snow in the same state.
    fn restore_initiation(&mut self, tunnel: TunnelId) {
        let Some(inputs) = self.tunnels[tunnel.0].initiation_inputs() else {
            return;
        };
        let state = self.write_initiation(tunnel, &inputs, &mut [0u8; INITIATION_LEN]);
        self.tunnels[tunnel.0].restore_handshake_state(state);
    }

    /// Writes a fresh initiation (new ephemeral key and index) and arms its retry timer.
    fn send_initiation(&mut self, now: Instant, tunnel: TunnelId) {
        let Some(destination) = self.tunnels[tunnel.0].endpoint() else {
            return;
        };
        let released = self.tunnels[tunnel.0].abandon_initiation();
        self.release(released);
        let inputs = InitiationInputs {
            local_index: self.allocate_index(tunnel),
            seed: self.ephemeral_seed(),
            timestamp: noise::tai64n(self.wall_clock(now)),
        };
        let retry_at = now + REKEY_TIMEOUT + self.retry_jitter();
        let mut msg = [0u8; INITIATION_LEN];
        let handshake = self.write_initiation(tunnel, &inputs, &mut msg);
        let t = &mut self.tunnels[tunnel.0];
        t.write_macs(&mut msg, now);
        let released = t.initiation_sent(handshake, inputs, now, retry_at);
        t.count_sent(INITIATION_LEN, false);
        self.release(released);
        tracing::debug!(tunnel = tunnel.0, %destination, "sending handshake initiation");
        self.outbox.push_back(Transmit {
            destination,
            data: msg.to_vec(),
        });
    }

    /// Checks mac1 (and, under load, mac2 and the source's rate) of a handshake message
    /// addressed to `local` (`mac1_checked`: the caller found `local` by its mac1). Every
    /// message counts as load, whatever its macs. `Ok(false)` means a cookie reply was
    /// sent instead of processing the message.
    fn admit_handshake(
        &mut self,
        now: Instant,
        source: SocketAddr,
        (local, mac1_checked): (LocalKeyId, bool),
        msg: &[u8],
    ) -> Result<bool, ProtocolDrop> {
        let under_load = self.load.record(now);
        if !mac1_checked && !self.locals[local.0].keys.verify_mac1(msg) {
            return Err(ProtocolDrop::BadMac1);
        }
        let random = self.random.as_rngcore();
        let l = &mut self.locals[local.0];
        if under_load && !l.cookies.verify_mac2(now, source, msg, random) {
            let sender_index = read_u32(msg, 4);
            let reply = l
                .cookies
                .cookie_reply(now, source, &l.keys, msg, sender_index, random);
            self.stats.cookie_replies_sent += 1;
            self.outbox.push_back(Transmit {
                destination: source,
                data: reply.to_vec(),
            });
            return Ok(false);
        }
        if under_load && !self.rate.allow(now, source.ip()) {
            return Err(ProtocolDrop::RateLimited);
        }
        Ok(true)
    }

    /// A handshake gave `tunnel` a new session: frees what it replaced, follows the
    /// peer to `source` and reports it.
    fn handshake_completed(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        source: SocketAddr,
        released: Released,
        we_initiated: bool,
    ) {
        self.release(released);
        let wall_clock = self.wall_clock(now);
        let t = &mut self.tunnels[tunnel.0];
        t.handshake_completed_at(wall_clock);
        t.count_received(
            if we_initiated {
                RESPONSE_LEN
            } else {
                INITIATION_LEN
            },
            false,
        );
        self.update_endpoint(tunnel, source);
        self.stats.handshakes_completed += 1;
        self.events.push_back(Event::HandshakeCompleted {
            tunnel,
            we_initiated,
        });
    }

    /// An initiation up to its Diffie-Hellman work: mac1 names the local identity (the
    /// `verdict` of a screen run without the device, or a search here), then admission
    /// (load, mac2 and cookie replies, the source's rate). The returned job does the
    /// expensive part without the device; `finish_initiation` does the rest.
    pub(super) fn begin_initiation(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
        verdict: Mac1Verdict,
    ) -> Result<Option<InitiationJob>, ProtocolDrop> {
        // mac1 is keyed with the responder's public key, so it names the local identity.
        let named = match verdict {
            // A screen of the keys in force: its answer stands.
            Mac1Verdict::Screened { generation, local } if generation == self.screen.generation => {
                local
            }
            _ => self.screen.local_for(msg),
        };
        let Some(local) = named else {
            // The search cost a BLAKE2s per local identity: junk counts as load.
            self.load.record(now);
            return Err(ProtocolDrop::BadMac1);
        };
        if !self.admit_handshake(now, source, (local, true), msg)? {
            return Ok(None);
        }
        Ok(Some(InitiationJob {
            local,
            private: self.locals[local.0].private.clone(),
            seed: self.ephemeral_seed(),
        }))
    }

    /// The rest of an initiation once its job ran: the peer must be one of ours and its
    /// timestamp new; then the response goes out and the new session waits in `next`.
    pub(super) fn finish_initiation_work(
        &mut self,
        now: Instant,
        source: SocketAddr,
        local: LocalKeyId,
        work: InitiationWork,
    ) -> Result<Received, ProtocolDrop> {
        let mut answer = work.0.ok_or(ProtocolDrop::HandshakeFailed)?;
        let tunnel = *self
            .by_peer_key
            .get(&(local, answer.peer_public))
            .ok_or(ProtocolDrop::UnknownPeer)?;
        self.touched = Some(tunnel);
        self.tunnels[tunnel.0].check_initiation(&answer.timestamp, now)?;

        let local_index = self.allocate_index(tunnel);
        noise::set_response_sender(&mut answer.response, local_index);
        let t = &mut self.tunnels[tunnel.0];
        t.write_macs(&mut answer.response, now);
        t.initiation_answered(answer.timestamp, now);
        let session = Session::new(
            now,
            local_index,
            answer.remote_index,
            false,
            &answer.keys.send,
            &answer.keys.receive,
        );
        let released = t.start_responder_session(session);
        t.count_sent(RESPONSE_LEN, false);
        self.handshake_completed(now, tunnel, source, released, false);
        self.outbox.push_back(Transmit {
            destination: source,
            data: answer.response.to_vec(),
        });
        Ok(Received::Control)
    }

    pub(super) fn receive_response(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
    ) -> Result<Received, ProtocolDrop> {
        let receiver = read_u32(msg, 8);
        let tunnel = self.tunnel_of(receiver)?;
        self.touched = Some(tunnel);
        if !self.tunnels[tunnel.0].awaits_response(receiver) {
            return Err(ProtocolDrop::UnknownIndex);
        }
        let local = self.tunnels[tunnel.0].local();
        if !self.admit_handshake(now, source, (local, false), msg)? {
            return Ok(Received::Control);
        }
        let t = &mut self.tunnels[tunnel.0];
        let handshake = t.take_handshake_state().ok_or(ProtocolDrop::UnknownIndex)?;
        let Some(TransportKeys { send, receive }) = noise::read_response(handshake, msg) else {
            // Not the peer's response (a forgery with a valid mac1, say): the real one may
            // still come, so the initiation waits on with its state made again.
            self.restore_initiation(tunnel);
            return Err(ProtocolDrop::HandshakeFailed);
        };
        let t = &mut self.tunnels[tunnel.0];
        let local_index = t.finish_initiation().ok_or(ProtocolDrop::UnknownIndex)?;
        let remote_index = read_u32(msg, 4);
        let session = Session::new(now, local_index, remote_index, true, &send, &receive);
        let released = t.start_initiator_session(session, now);
        self.handshake_completed(now, tunnel, source, released, true);
        // Confirm the session to the responder: with queued data, or a keepalive.
        if self.tunnels[tunnel.0].has_queued() {
            self.flush_queue(now, tunnel);
        } else {
            self.send_keepalive(now, tunnel);
        }
        Ok(Received::Control)
    }

    pub(super) fn receive_cookie_reply(
        &mut self,
        now: Instant,
        msg: &[u8],
    ) -> Result<Received, ProtocolDrop> {
        let receiver = read_u32(msg, 4);
        let tunnel = self.tunnel_of(receiver)?;
        self.tunnels[tunnel.0].accept_cookie_reply(msg, now)?;
        tracing::debug!(
            tunnel = tunnel.0,
            "cookie reply received; peer is under load"
        );
        Ok(Received::Control)
    }
}

/// An admitted initiation's Diffie-Hellman work, to do without the device: decrypting
/// it and writing the response take four X25519 operations.
pub struct InitiationJob {
    local: LocalKeyId,
    private: PrivateKey,
    seed: EphemeralSeed,
}

/// What the job made of the initiation: `None` if it did not decrypt.
pub struct InitiationWork(Option<Answer>);

/// A decrypted initiation and the response to it, still without our index and macs.
struct Answer {
    peer_public: [u8; 32],
    remote_index: u32,
    timestamp: [u8; TIMESTAMP_LEN],
    response: [u8; RESPONSE_LEN],
    keys: TransportKeys,
}

impl InitiationJob {
    pub(crate) fn local(&self) -> LocalKeyId {
        self.local
    }

    /// Decrypts the initiation `msg` and writes the response to it.
    pub fn run(&self, msg: &[u8]) -> InitiationWork {
        let private = self.private.as_static_secret().as_bytes();
        let Some(received) = noise::read_initiation(private, &self.seed, msg) else {
            return InitiationWork(None);
        };
        let (peer_public, remote_index, timestamp) = (
            received.peer_public,
            received.sender_index,
            received.timestamp,
        );
        let mut response = [0u8; RESPONSE_LEN];
        let keys = noise::write_response(received, 0, &mut response);
        InitiationWork(Some(Answer {
            peer_public,
            remote_index,
            timestamp,
            response,
            keys,
        }))
    }
}

/// Which local identity an initiation's mac1 names, found before the device is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mac1Verdict {
    /// Not looked at: the device searches.
    NotScreened,
    /// A screen of the keys of `generation` found `local` (`None`: no local identity).
    /// The device searches again if its keys changed since.
    Screened {
        generation: u64,
        local: Option<LocalKeyId>,
    },
}

/// The mac1 keys of the device's local identities, to find the one an initiation is
/// for without the device: a search costs a BLAKE2s per local identity.
#[derive(Clone, Default)]
pub struct Mac1Screen {
    /// By local identity slot; `None` where the slot is vacant.
    keys: Arc<[Option<MacKeys>]>,
    /// Counts the changes of the device's keys, so a stale screen is noticed.
    generation: u64,
}

impl Mac1Screen {
    pub(super) fn new(keys: Vec<Option<MacKeys>>, generation: u64) -> Self {
        Mac1Screen {
            keys: keys.into(),
            generation,
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    fn local_for(&self, msg: &[u8]) -> Option<LocalKeyId> {
        self.keys
            .iter()
            .position(|keys| keys.as_ref().is_some_and(|k| k.verify_mac1(msg)))
            .map(LocalKeyId)
    }

    /// The verdict for a datagram: which local identity an initiation names (a datagram
    /// that is no initiation is left to the device).
    pub fn verdict(&self, datagram: &[u8]) -> Mac1Verdict {
        if classify(datagram) != Some(Kind::Initiation) {
            return Mac1Verdict::NotScreened;
        }
        Mac1Verdict::Screened {
            generation: self.generation,
            local: self.local_for(datagram),
        }
    }
}
