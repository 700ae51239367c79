//! WireGuard's handshake messages around the Noise IKpsk2 state machine from `snow`.
//!
//! `snow` runs the Noise pattern (hashes, DH, AEAD of the static key and timestamp);
//! this module frames its output as WireGuard messages 1 and 2 and pulls the transport
//! keys out when the pattern completes. mac1/mac2 are written by the caller, which knows
//! the cookie state. The ephemeral key's randomness comes from the caller too: snow is
//! handed exactly the bytes the device drew, never a generator of its own (see
//! `resolver`, which also gives snow key holders that are wiped when dropped).

mod resolver;

use std::sync::OnceLock;

use snow::params::NoiseParams;
use snow::HandshakeState;
use zeroize::Zeroizing;

use super::constants::{CONSTRUCTION, IDENTIFIER};
use super::messages::{
    read_u32, write_header, INITIATION_LEN, INITIATION_NOISE, RESPONSE_LEN, RESPONSE_NOISE,
    TYPE_INITIATION, TYPE_RESPONSE,
};

/// WireGuard without a preshared key uses 32 zero bytes in its place.
const NO_PRESHARED_KEY: [u8; 32] = [0; 32];
pub(super) const TIMESTAMP_LEN: usize = 12;

pub(crate) use resolver::EphemeralSeed;
use resolver::Resolver;

/// Transport keys from a completed handshake, from our point of view; wiped on drop.
pub(crate) struct TransportKeys {
    pub(crate) send: Zeroizing<[u8; 32]>,
    pub(crate) receive: Zeroizing<[u8; 32]>,
}

fn params() -> NoiseParams {
    static PARAMS: OnceLock<NoiseParams> = OnceLock::new();
    PARAMS
        .get_or_init(|| {
            CONSTRUCTION
                .parse()
                .expect("WireGuard's Noise pattern parses")
        })
        .clone()
}

fn builder<'a>(local_private: &'a [u8; 32], seed: &EphemeralSeed) -> snow::Builder<'a> {
    snow::Builder::with_resolver(params(), Box::new(Resolver::new(seed)))
        .prologue(IDENTIFIER)
        .and_then(|b| b.psk(2, &NO_PRESHARED_KEY))
        .and_then(|b| b.local_private_key(local_private))
        .expect("static builder settings are valid")
}

/// Writes an initiation (without macs) into `out` and returns the Noise state that
/// waits for the response.
pub(super) fn write_initiation(
    local_private: &[u8; 32],
    seed: &EphemeralSeed,
    peer_public: &[u8; 32],
    sender_index: u32,
    timestamp: &[u8; TIMESTAMP_LEN],
    out: &mut [u8; INITIATION_LEN],
) -> HandshakeState {
    let mut noise = builder(local_private, seed)
        .remote_public_key(peer_public)
        .and_then(|b| b.build_initiator())
        .expect("initiator from valid keys");
    out.fill(0);
    write_header(out, TYPE_INITIATION);
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
    let written = noise
        .write_message(timestamp, &mut out[INITIATION_NOISE])
        .expect("initiation fits its fixed size");
    debug_assert_eq!(written, INITIATION_NOISE.len());
    noise
}

/// An initiation that decrypted under one of our static keys.
pub(super) struct ReceivedInitiation {
    pub noise: HandshakeState,
    pub peer_public: [u8; 32],
    pub sender_index: u32,
    pub timestamp: [u8; TIMESTAMP_LEN],
}

/// Runs the responder's half of message 1; `None` if it does not decrypt. `seed` is for
/// the ephemeral key of the response.
pub(super) fn read_initiation(
    local_private: &[u8; 32],
    seed: &EphemeralSeed,
    msg: &[u8],
) -> Option<ReceivedInitiation> {
    let mut noise = builder(local_private, seed).build_responder().ok()?;
    let mut timestamp = [0u8; TIMESTAMP_LEN];
    let n = noise
        .read_message(&msg[INITIATION_NOISE], &mut timestamp)
        .ok()?;
    if n != TIMESTAMP_LEN {
        return None;
    }
    let peer_public: [u8; 32] = noise.get_remote_static()?.try_into().ok()?;
    Some(ReceivedInitiation {
        noise,
        peer_public,
        sender_index: read_u32(msg, 4),
        timestamp,
    })
}

/// Writes the response (without macs) to an accepted initiation and returns the keys.
pub(super) fn write_response(
    mut received: ReceivedInitiation,
    sender_index: u32,
    out: &mut [u8; RESPONSE_LEN],
) -> TransportKeys {
    out.fill(0);
    write_header(out, TYPE_RESPONSE);
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
    out[8..12].copy_from_slice(&received.sender_index.to_le_bytes());
    let written = received
        .noise
        .write_message(&[], &mut out[RESPONSE_NOISE])
        .expect("response fits its fixed size");
    debug_assert_eq!(written, RESPONSE_NOISE.len());
    let (initiator_to_responder, responder_to_initiator) =
        received.noise.dangerously_get_raw_split();
    TransportKeys {
        send: Zeroizing::new(responder_to_initiator),
        receive: Zeroizing::new(initiator_to_responder),
    }
}

/// Puts our sender index into a response written before the index was allocated.
pub(crate) fn set_response_sender(response: &mut [u8; RESPONSE_LEN], sender_index: u32) {
    response[4..8].copy_from_slice(&sender_index.to_le_bytes());
}

/// Runs the initiator's half of message 2; `None` if it does not decrypt.
pub(super) fn read_response(mut noise: HandshakeState, msg: &[u8]) -> Option<TransportKeys> {
    let mut payload = [0u8; 0];
    let n = noise
        .read_message(&msg[RESPONSE_NOISE], &mut payload)
        .ok()?;
    if n != 0 || !noise.is_handshake_finished() {
        return None;
    }
    let (initiator_to_responder, responder_to_initiator) = noise.dangerously_get_raw_split();
    Some(TransportKeys {
        send: Zeroizing::new(initiator_to_responder),
        receive: Zeroizing::new(responder_to_initiator),
    })
}

/// The TAI64N label of a wall-clock time given as time since the Unix epoch.
pub(super) fn tai64n(since_unix_epoch: std::time::Duration) -> [u8; TIMESTAMP_LEN] {
    let stamp = tai64::Tai64N::from_system_time(&(std::time::UNIX_EPOCH + since_unix_epoch));
    stamp.to_bytes()
}
