//! The device's side of WireGuard's handshake: sending initiations and their retries,
//! admitting handshake messages (mac1, and mac2 with cookie replies under load), and
//! turning initiations and responses into sessions.

use std::net::SocketAddr;
use std::time::Instant;

use snow::HandshakeState;

use super::{Device, Received, Transmit};
use crate::proto::constants::REKEY_TIMEOUT;
use crate::proto::messages::{read_u32, INITIATION_LEN, RESPONSE_LEN};
use crate::proto::noise::{self, EphemeralSeed, TransportKeys};
use crate::proto::report::{Event, ProtocolDrop};
use crate::proto::session::Session;
use crate::proto::tunnel::{InitiationInputs, Released};
use crate::proto::{LocalKeyId, TunnelId};

impl Device {
    /// Starts a handshake now unless one is waiting for its response or was sent within
    /// REKEY_TIMEOUT.
    pub fn initiate(&mut self, now: Instant, tunnel: TunnelId) {
        if !self.tunnels[tunnel.0].may_initiate(now) {
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
        tunnel: TunnelId,
        source: SocketAddr,
        released: Released,
        we_initiated: bool,
    ) {
        self.release(released);
        self.update_endpoint(tunnel, source);
        self.stats.handshakes_completed += 1;
        self.events.push_back(Event::HandshakeCompleted {
            tunnel,
            we_initiated,
        });
    }

    pub(super) fn receive_initiation(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
    ) -> Result<Received, ProtocolDrop> {
        // mac1 is keyed with the responder's public key, so it names the local identity.
        let Some(local) = (0..self.locals.len())
            .map(LocalKeyId)
            .find(|l| self.locals[l.0].keys.verify_mac1(msg))
        else {
            // The search cost a BLAKE2s per local identity: junk counts as load.
            self.load.record(now);
            return Err(ProtocolDrop::BadMac1);
        };
        if !self.admit_handshake(now, source, (local, true), msg)? {
            return Ok(Received::Control);
        }
        let seed = self.ephemeral_seed();
        let received = noise::read_initiation(
            self.locals[local.0].private.as_static_secret().as_bytes(),
            &seed,
            msg,
        )
        .ok_or(ProtocolDrop::HandshakeFailed)?;
        let tunnel = *self
            .by_peer_key
            .get(&(local, received.peer_public))
            .ok_or(ProtocolDrop::UnknownPeer)?;
        self.touched = Some(tunnel);
        self.tunnels[tunnel.0].check_initiation(&received.timestamp, now)?;

        let timestamp = received.timestamp;
        let remote_index = received.sender_index;
        let local_index = self.allocate_index(tunnel);
        let mut response = [0u8; RESPONSE_LEN];
        let keys = noise::write_response(received, local_index, &mut response);
        let t = &mut self.tunnels[tunnel.0];
        t.write_macs(&mut response, now);
        t.initiation_answered(timestamp, now);
        let session = Session::new(
            now,
            local_index,
            remote_index,
            false,
            &keys.send,
            &keys.receive,
        );
        let released = t.start_responder_session(session);
        self.handshake_completed(tunnel, source, released, false);
        self.outbox.push_back(Transmit {
            destination: source,
            data: response.to_vec(),
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
        self.handshake_completed(tunnel, source, released, true);
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
