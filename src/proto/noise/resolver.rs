//! What snow gets from us instead of its defaults: exactly the randomness the device drew
//! for one handshake (so the core has no randomness of its own), and an X25519 and a
//! ChaCha20-Poly1305 whose keys are wiped when snow drops them (snow's own are not).
//! BLAKE2s, which holds no key, is snow's.

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

/// Random bytes for one handshake's ephemeral key, drawn by the caller; wiped on drop.
pub(crate) type EphemeralSeed = Zeroizing<[u8; 32]>;

pub(super) struct Resolver {
    seed: EphemeralSeed,
}

impl Resolver {
    pub(super) fn new(seed: &EphemeralSeed) -> Self {
        Resolver { seed: seed.clone() }
    }
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededEntropy {
            seed: self.seed.clone(),
            used: 0,
        }))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(WipedX25519::default()) as _)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        matches!(choice, CipherChoice::ChaChaPoly)
            .then(|| Box::new(WipedChaChaPoly::default()) as _)
    }
}

/// Gives snow the caller's bytes for the one ephemeral key of a handshake; asking for
/// more than that is an error, so snow can never draw randomness of its own.
struct SeededEntropy {
    seed: EphemeralSeed,
    used: usize,
}

impl Random for SeededEntropy {
    fn try_fill_bytes(&mut self, out: &mut [u8]) -> Result<(), snow::Error> {
        let end = self.used + out.len();
        let bytes = self.seed.get(self.used..end).ok_or(snow::Error::Rng)?;
        out.copy_from_slice(bytes);
        self.used = end;
        Ok(())
    }
}

/// X25519 holding its private key in a secret that is wiped on drop.
struct WipedX25519 {
    private: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl Default for WipedX25519 {
    fn default() -> Self {
        let private = x25519_dalek::StaticSecret::from([0; 32]);
        let public = x25519_dalek::PublicKey::from(&private).to_bytes();
        WipedX25519 { private, public }
    }
}

impl WipedX25519 {
    fn set_private(&mut self, bytes: &Zeroizing<[u8; 32]>) {
        self.private = x25519_dalek::StaticSecret::from(**bytes);
        self.public = x25519_dalek::PublicKey::from(&self.private).to_bytes();
    }
}

impl Dh for WipedX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&privkey[..32]);
        self.set_private(&bytes);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(&mut bytes[..])?;
        self.set_private(&bytes);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        self.private.as_bytes()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; 32] = pubkey
            .get(..32)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let shared = self
            .private
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        out[..32].copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

/// ChaCha20-Poly1305 as the Noise spec uses it (a 64-bit little-endian counter after
/// four zero bytes), with its key wiped on drop.
#[derive(Default)]
struct WipedChaChaPoly {
    key: Zeroizing<[u8; 32]>,
}

impl WipedChaChaPoly {
    fn cipher(&self) -> chacha20poly1305::ChaCha20Poly1305 {
        use chacha20poly1305::KeyInit;
        chacha20poly1305::ChaCha20Poly1305::new((&*self.key).into())
    }
}

fn noise_nonce(counter: u64) -> chacha20poly1305::Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    nonce.into()
}

impl Cipher for WipedChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key.copy_from_slice(key);
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        use chacha20poly1305::aead::AeadInPlace;
        let len = plaintext.len();
        out[..len].copy_from_slice(plaintext);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&noise_nonce(nonce), authtext, &mut out[..len])
            .expect("handshake payloads are short");
        out[len..len + 16].copy_from_slice(&tag);
        len + 16
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        use chacha20poly1305::aead::AeadInPlace;
        let len = ciphertext
            .len()
            .checked_sub(16)
            .ok_or(snow::Error::Decrypt)?;
        out[..len].copy_from_slice(&ciphertext[..len]);
        self.cipher()
            .decrypt_in_place_detached(
                &noise_nonce(nonce),
                authtext,
                &mut out[..len],
                ciphertext[len..].into(),
            )
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::{Zeroize, ZeroizeOnDrop};

    /// What holds key material in a handshake is wiped when it is dropped: the seed and
    /// the cipher key are `Zeroizing`, and x25519-dalek derives a wiping `Drop` for its
    /// secrets (`zeroize(drop)`, which comes with `Zeroize`).
    #[test]
    fn key_holders_wipe_on_drop() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        fn wipeable<T: Zeroize>() {}
        wiped_on_drop::<EphemeralSeed>();
        wiped_on_drop::<Zeroizing<[u8; 32]>>();
        wipeable::<x25519_dalek::StaticSecret>();
    }

    /// The Noise pattern runs on these primitives: a handshake between two builders of
    /// our resolver completes with matching transport keys.
    #[test]
    fn a_handshake_on_the_wiped_primitives_completes() {
        let seed = |b: u8| Zeroizing::new([b; 32]);
        let alice = x25519_dalek::StaticSecret::from([1; 32]);
        let bob = x25519_dalek::StaticSecret::from([2; 32]);
        let bob_public = x25519_dalek::PublicKey::from(&bob).to_bytes();
        let timestamp = [9u8; 12];
        let mut initiation = [0u8; crate::proto::messages::INITIATION_LEN];
        let noise = super::super::write_initiation(
            alice.as_bytes(),
            &seed(3),
            &bob_public,
            1,
            &timestamp,
            &mut initiation,
        );
        let received =
            super::super::read_initiation(bob.as_bytes(), &seed(4), &initiation).expect("decrypts");
        assert_eq!(received.timestamp, timestamp);
        let mut response = [0u8; crate::proto::messages::RESPONSE_LEN];
        let bob_keys = super::super::write_response(received, 2, &mut response);
        let alice_keys = super::super::read_response(noise, &response).expect("decrypts");
        assert_eq!(*alice_keys.send, *bob_keys.receive);
        assert_eq!(*alice_keys.receive, *bob_keys.send);
    }
}
