//! WireGuard's protocol constants (whitepaper §6.1), in one place.

use std::time::Duration;

pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Up to this much random delay is added to every handshake retransmission.
pub const REKEY_TIMEOUT_JITTER_MAX: Duration = Duration::from_millis(333);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// Initiations from one peer closer together than this are dropped (flood guard).
pub const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(20);
/// When we initiated the current session, we rekey on receive once it is this old,
/// so that a fresh session exists before the old one is rejected.
pub const REKEY_ON_RECEIVE_AFTER: Duration = Duration::from_secs(180 - 10 - 5);
/// Packets waiting for a handshake, per tunnel; older ones are dropped first.
pub const MAX_QUEUED_PACKETS: usize = 128;
/// Bits in the replay window bitmap; the usable window is one word less.
pub const REPLAY_WINDOW_BITS: u64 = 8192;

pub const CONSTRUCTION: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
pub const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
pub const LABEL_MAC1: &[u8] = b"mac1----";
pub const LABEL_COOKIE: &[u8] = b"cookie--";
