//! mac1, mac2 and cookie replies (whitepaper §5.4.4 and §5.4.7).
//!
//! mac1 proves the sender knows the receiver's public key, so anything without a valid
//! mac1 is dropped before any expensive work. mac2 proves the sender can receive at its
//! source address: under load a responder only answers initiations that carry a mac2
//! made with a cookie it handed out, and answers the others with a cookie reply.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::RngCore;
use zeroize::Zeroizing;

use super::constants::{COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1};
use super::messages::{mac_offsets, write_header, COOKIE_REPLY_LEN, TYPE_COOKIE_REPLY};

pub(super) type Mac16 = [u8; 16];

/// BLAKE2s-256 of the concatenated parts.
pub(super) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for part in parts {
        Digest::update(&mut h, part);
    }
    h.finalize().into()
}

/// Keyed BLAKE2s with a 16-byte output.
pub(super) fn mac(key: &[u8], parts: &[&[u8]]) -> Mac16 {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("key of 1..=32 bytes");
    for part in parts {
        Update::update(&mut m, part);
    }
    m.finalize_fixed().into()
}

/// The keys derived from one static public key: for checking or writing mac1 to that
/// key's owner, and for sealing or opening cookie replies from it.
#[derive(Clone)]
pub(super) struct MacKeys {
    mac1: [u8; 32],
    cookie: [u8; 32],
}

impl MacKeys {
    pub(super) fn for_public_key(public: &[u8; 32]) -> Self {
        MacKeys {
            mac1: hash(&[LABEL_MAC1, public]),
            cookie: hash(&[LABEL_COOKIE, public]),
        }
    }

    /// Whether `msg` (a whole handshake message) carries a valid mac1 for this key.
    pub(super) fn verify_mac1(&self, msg: &[u8]) -> bool {
        let (m1, m2) = mac_offsets(msg.len());
        let expected = mac(&self.mac1, &[&msg[..m1]]);
        constant_time_eq(&expected, &msg[m1..m2])
    }

    /// Writes mac1, and mac2 when a fresh cookie is known, into a handshake message.
    /// Returns mac1, which is the associated data of any cookie reply to this message.
    pub(super) fn write_macs(&self, msg: &mut [u8], cookie: Option<&Mac16>) -> Mac16 {
        let (m1, m2) = mac_offsets(msg.len());
        let mac1 = mac(&self.mac1, &[&msg[..m1]]);
        msg[m1..m2].copy_from_slice(&mac1);
        let mac2 = match cookie {
            Some(cookie) => mac(cookie, &[&msg[..m2]]),
            None => [0; 16],
        };
        msg[m2..].copy_from_slice(&mac2);
        mac1
    }

    /// Opens a cookie reply sent by this key's owner in answer to a message whose mac1
    /// was `sent_mac1`.
    pub(super) fn open_cookie_reply(&self, reply: &[u8], sent_mac1: &Mac16) -> Option<Mac16> {
        let nonce = XNonce::from_slice(&reply[8..32]);
        let mut sealed = [0u8; 32];
        sealed.copy_from_slice(&reply[32..64]);
        let (cookie, tag) = sealed.split_at_mut(16);
        let cipher = XChaCha20Poly1305::new((&self.cookie).into());
        cipher
            .decrypt_in_place_detached(nonce, sent_mac1, cookie, (&*tag).into())
            .ok()?;
        Some(cookie.try_into().expect("16 bytes"))
    }
}

/// Responder side: hands out cookies bound to a source address and checks mac2.
pub(super) struct CookieIssuer {
    /// Wiped on drop.
    secret: Zeroizing<[u8; 32]>,
    secret_born: Option<Instant>,
}

impl Default for CookieIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl CookieIssuer {
    pub(super) fn new() -> Self {
        CookieIssuer {
            secret: Zeroizing::new([0; 32]),
            secret_born: None,
        }
    }

    /// The cookie for `source`, from a secret that changes every two minutes.
    fn cookie(&mut self, now: Instant, source: SocketAddr, random: &mut dyn RngCore) -> Mac16 {
        let stale = self
            .secret_born
            .is_none_or(|born| now.saturating_duration_since(born) >= COOKIE_REFRESH_TIME);
        if stale {
            random.fill_bytes(&mut self.secret[..]);
            self.secret_born = Some(now);
        }
        let port = source.port().to_be_bytes();
        match source.ip() {
            IpAddr::V4(ip) => mac(&self.secret[..], &[&ip.octets(), &port]),
            IpAddr::V6(ip) => mac(&self.secret[..], &[&ip.octets(), &port]),
        }
    }

    /// Whether `msg` carries a mac2 made with the current cookie for `source`.
    pub(super) fn verify_mac2(
        &mut self,
        now: Instant,
        source: SocketAddr,
        msg: &[u8],
        random: &mut dyn RngCore,
    ) -> bool {
        let cookie = self.cookie(now, source, random);
        let (_, m2) = mac_offsets(msg.len());
        let expected = mac(&cookie, &[&msg[..m2]]);
        constant_time_eq(&expected, &msg[m2..])
    }

    /// Builds the cookie reply to `msg` (whose mac1 was already checked): sealed with the
    /// key derived from our own public key (`own_keys`), addressed to `receiver_index`.
    pub(super) fn cookie_reply(
        &mut self,
        now: Instant,
        source: SocketAddr,
        own_keys: &MacKeys,
        msg: &[u8],
        receiver_index: u32,
        random: &mut dyn RngCore,
    ) -> [u8; COOKIE_REPLY_LEN] {
        let cookie = self.cookie(now, source, random);
        let (m1, m2) = mac_offsets(msg.len());
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        write_header(&mut reply, TYPE_COOKIE_REPLY);
        reply[4..8].copy_from_slice(&receiver_index.to_le_bytes());
        random.fill_bytes(&mut reply[8..32]);
        let nonce = *XNonce::from_slice(&reply[8..32]);
        reply[32..48].copy_from_slice(&cookie);
        let cipher = XChaCha20Poly1305::new((&own_keys.cookie).into());
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &msg[m1..m2], &mut reply[32..48])
            .expect("16-byte plaintext always seals");
        reply[48..64].copy_from_slice(&tag);
        reply
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_reply_round_trip_and_mac2() {
        let random = &mut rand_core::OsRng;
        let now = Instant::now();
        let responder_pub = [7u8; 32];
        let keys = MacKeys::for_public_key(&responder_pub);
        let source: SocketAddr = "198.18.0.9:4000".parse().unwrap();
        let mut msg = [3u8; 148];
        let mac1 = keys.write_macs(&mut msg, None);
        assert!(keys.verify_mac1(&msg));

        let mut issuer = CookieIssuer::new();
        assert!(!issuer.verify_mac2(now, source, &msg, random));
        let reply = issuer.cookie_reply(now, source, &keys, &msg, 42, random);
        let cookie = keys.open_cookie_reply(&reply, &mac1).expect("opens");
        assert!(keys.open_cookie_reply(&reply, &[0; 16]).is_none());

        keys.write_macs(&mut msg, Some(&cookie));
        assert!(issuer.verify_mac2(now, source, &msg, random));
        let other: SocketAddr = "198.18.0.9:4001".parse().unwrap();
        assert!(!issuer.verify_mac2(now, other, &msg, random));
        // After the secret rotates, the old cookie is worthless.
        assert!(!issuer.verify_mac2(now + COOKIE_REFRESH_TIME, source, &msg, random));
    }

    #[test]
    fn mac1_detects_any_change() {
        let keys = MacKeys::for_public_key(&[1; 32]);
        let mut msg = [5u8; 92];
        keys.write_macs(&mut msg, None);
        assert!(keys.verify_mac1(&msg));
        msg[10] ^= 1;
        assert!(!keys.verify_mac1(&msg));
        assert!(!MacKeys::for_public_key(&[2; 32]).verify_mac1(&msg));
    }
}
