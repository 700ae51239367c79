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
    /// into `buf[..16]`. The plaintext is zero-padded to a multiple of 16 bytes, bounded
    /// by `buf`, which must hold at least `len + SEAL_TAILROOM` bytes after the header.
    /// Returns the length of the whole message.
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> usize {
        self.begin_seal(buf, len).seal(buf)
    }

    /// The part of sealing that needs the session: reserves the counter and writes the
    /// header into `buf[..16]`.
    pub fn begin_seal(&mut self, buf: &mut [u8], len: usize) -> SealJob {
        let counter = self.send_counter;
        self.send_counter += 1;
        write_header(buf, TYPE_TRANSPORT);
        buf[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
        SealJob {
            key: Arc::clone(&self.send_key),
            counter,
            len,
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
}

impl SealJob {
    /// Pads and encrypts the plaintext at `buf[16..16 + len]` in place and appends the
    /// tag. Returns the length of the whole message.
    pub fn seal(&self, buf: &mut [u8]) -> usize {
        let padded = self.len.next_multiple_of(16);
        let end = TRANSPORT_HEADER_LEN + padded;
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
        TRANSPORT_HEADER_LEN + self.len.next_multiple_of(16) + AEAD_TAG_LEN
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
