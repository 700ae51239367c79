//! One transport session: a pair of ChaCha20-Poly1305 keys from a completed handshake,
//! the send counter and the receive replay window. Sealing and opening work in place.
//!
//! Each is split in two so that the encryption can run without the state: the session
//! hands out a `SealJob` (counter reserved, header written) or an `OpenJob` (counter read,
//! replay pre-checked), which any thread can finish; an opened counter is only accepted
//! into the replay window afterwards, by the session.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

use super::constants::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME};
use super::messages::{read_u64, write_header, AEAD_TAG_LEN, TRANSPORT_HEADER_LEN, TYPE_TRANSPORT};
use super::replay::ReplayWindow;

/// Why a transport message did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    Expired,
    Replayed,
    Forged,
}

pub struct Session {
    pub local_index: u32,
    pub remote_index: u32,
    /// Whether we sent the initiation; only the initiator rekeys on age.
    pub we_initiated: bool,
    pub created: Instant,
    send_key: Arc<LessSafeKey>,
    receive_key: Arc<LessSafeKey>,
    send_counter: u64,
    replay: ReplayWindow,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aead_key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32-byte key"))
}

impl Session {
    pub fn new(
        now: Instant,
        local_index: u32,
        remote_index: u32,
        we_initiated: bool,
        send_key: &[u8; 32],
        receive_key: &[u8; 32],
    ) -> Self {
        Session {
            local_index,
            remote_index,
            we_initiated,
            created: now,
            send_key: Arc::new(aead_key(send_key)),
            receive_key: Arc::new(aead_key(receive_key)),
            send_counter: 0,
            replay: ReplayWindow::new(),
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created)
    }

    pub fn messages_sent(&self) -> u64 {
        self.send_counter
    }

    /// Whether this session may still send: younger than REJECT_AFTER_TIME and under the
    /// message limit.
    pub fn can_send(&self, now: Instant) -> bool {
        self.age(now) < REJECT_AFTER_TIME && self.send_counter < REJECT_AFTER_MESSAGES
    }

    /// Seals the plaintext at `buf[16..16 + len]` in place and writes the transport header
    /// into `buf[..16]`. The plaintext is zero-padded as [`padded_len`] says for `mtu`;
    /// `buf` must hold at least `len + SEAL_TAILROOM` bytes after the header. Returns the
    /// length of the whole message.
    pub fn seal(&mut self, buf: &mut [u8], len: usize, mtu: usize) -> usize {
        self.begin_seal(buf, len, mtu).seal(buf)
    }

    /// The part of sealing that needs the session: reserves the counter and writes the
    /// header into `buf[..16]`. The plaintext will be padded as WireGuard pads it for a
    /// device of `mtu` bytes (0: no MTU).
    pub fn begin_seal(&mut self, buf: &mut [u8], len: usize, mtu: usize) -> SealJob {
        let counter = self.send_counter;
        self.send_counter += 1;
        write_header(buf, TYPE_TRANSPORT);
        buf[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
        SealJob {
            key: Arc::clone(&self.send_key),
            counter,
            len,
            padded: padded_len(len, mtu),
        }
    }

    /// Opens a transport message in place. On success returns the range of `msg` that
    /// holds the (possibly padded) plaintext; an empty range is a keepalive.
    pub fn open(&mut self, now: Instant, msg: &mut [u8]) -> Result<Range<usize>, OpenError> {
        let job = self.begin_open(now, msg)?;
        let plaintext = job.open(msg)?;
        self.accept(job.counter)?;
        Ok(plaintext)
    }

    /// The part of opening that needs the session before decryption: refuses expired
    /// sessions and counters the replay window already rules out.
    pub fn begin_open(&self, now: Instant, msg: &[u8]) -> Result<OpenJob, OpenError> {
        if self.age(now) >= REJECT_AFTER_TIME {
            return Err(OpenError::Expired);
        }
        let counter = read_u64(msg, 8);
        if !self.replay.may_accept(counter) {
            return Err(OpenError::Replayed);
        }
        Ok(OpenJob {
            key: Arc::clone(&self.receive_key),
            counter,
        })
    }

    /// Whether `job` was made by this session (and not by one it replaced).
    pub fn issued(&self, job: &OpenJob) -> bool {
        Arc::ptr_eq(&self.receive_key, &job.key)
    }

    /// After a successful `OpenJob::open`: records the counter, unless a copy of the same
    /// message was accepted in between.
    pub fn accept(&mut self, counter: u64) -> Result<(), OpenError> {
        if self.replay.accept(counter) {
            Ok(())
        } else {
            Err(OpenError::Replayed)
        }
    }
}

/// A seal with its counter reserved and header written, to finish without the session.
pub struct SealJob {
    key: Arc<LessSafeKey>,
    counter: u64,
    len: usize,
    /// `len` with its padding.
    padded: usize,
}

/// The length WireGuard pads a plaintext of `len` bytes to: a multiple of 16, but never
/// past the device's MTU, so that a full-size packet still fits the underlay (the
/// whitepaper's §5.4.6). For a super packet longer than the MTU, its last MTU-sized piece
/// is padded. `mtu` 0 means no MTU.
pub(crate) fn padded_len(len: usize, mtu: usize) -> usize {
    if mtu == 0 {
        return len.next_multiple_of(16);
    }
    let last = if len > mtu { len % mtu } else { len };
    len + (last.next_multiple_of(16).min(mtu) - last)
}

impl SealJob {
    /// Pads and encrypts the plaintext at `buf[16..16 + len]` in place and appends the
    /// tag. Returns the length of the whole message.
    pub fn seal(&self, buf: &mut [u8]) -> usize {
        let end = TRANSPORT_HEADER_LEN + self.padded;
        assert!(
            buf.len() >= end + AEAD_TAG_LEN,
            "caller must reserve tailroom"
        );
        buf[TRANSPORT_HEADER_LEN + self.len..end].fill(0);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(self.counter),
                Aad::empty(),
                &mut buf[TRANSPORT_HEADER_LEN..end],
            )
            .expect("ChaCha20-Poly1305 seals any length we produce");
        buf[end..end + AEAD_TAG_LEN].copy_from_slice(tag.as_ref());
        end + AEAD_TAG_LEN
    }

    /// The length of the sealed message.
    pub fn sealed_len(&self) -> usize {
        TRANSPORT_HEADER_LEN + self.padded + AEAD_TAG_LEN
    }
}

/// A transport message that passed the session's checks, to decrypt without it.
pub struct OpenJob {
    key: Arc<LessSafeKey>,
    counter: u64,
}

impl OpenJob {
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Authenticates and decrypts `msg` in place; returns the plaintext's range.
    pub fn open(&self, msg: &mut [u8]) -> Result<Range<usize>, OpenError> {
        let tag_at = msg.len() - AEAD_TAG_LEN;
        let tag: [u8; AEAD_TAG_LEN] = msg[tag_at..].try_into().expect("16 bytes");
        self.key
            .open_in_place_separate_tag(
                nonce(self.counter),
                Aad::empty(),
                Tag::from(tag),
                &mut msg[TRANSPORT_HEADER_LEN..tag_at],
                0..,
            )
            .map_err(|_| OpenError::Forged)?;
        Ok(TRANSPORT_HEADER_LEN..tag_at)
    }
}

#[cfg(test)]
mod tests {
    use super::padded_len;

    #[test]
    fn padding_is_capped_at_the_mtu() {
        assert_eq!(padded_len(0, 1420), 0, "a keepalive stays empty");
        assert_eq!(padded_len(1, 1420), 16);
        assert_eq!(padded_len(1408, 1420), 1408);
        assert_eq!(padded_len(1409, 1420), 1420);
        assert_eq!(padded_len(1420, 1420), 1420);
        assert_eq!(padded_len(1419, 0), 1424, "no MTU: plain multiple of 16");
        // Longer than the MTU (a super packet): its last MTU-sized piece is padded.
        assert_eq!(padded_len(1420 + 1, 1420), 1420 + 16);
        assert_eq!(padded_len(2 * 1420, 1420), 2 * 1420);
    }
}
