//! Sliding-window replay protection for transport counters (RFC 6479 style).
//!
//! The bitmap is a ring of 64-bit words; advancing the window clears whole words
//! instead of shifting bits, so each check and update is O(1) for in-order traffic.

use super::constants::{REJECT_AFTER_MESSAGES, REPLAY_WINDOW_BITS};

const WORD_BITS: u64 = 64;
const WORDS: usize = (REPLAY_WINDOW_BITS / WORD_BITS) as usize;
/// How far behind the newest counter a packet may be and still be accepted.
pub const WINDOW: u64 = REPLAY_WINDOW_BITS - WORD_BITS;

pub(super) struct ReplayWindow {
    /// One past the greatest counter accepted so far.
    next: u64,
    bitmap: Box<[u64; WORDS]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub(super) fn new() -> Self {
        ReplayWindow {
            next: 0,
            bitmap: Box::new([0; WORDS]),
        }
    }

    /// Cheap pre-check before decrypting: false when `counter` is surely a replay, too old
    /// or past the message limit.
    pub(super) fn may_accept(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (word, bit) = Self::position(counter);
        self.bitmap[word] & bit == 0
    }

    /// Marks `counter` as seen after the packet authenticated; false if it was a replay.
    pub(super) fn accept(&mut self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        if counter >= self.next {
            // The word holding the newest accepted counter; words after it may hold stale bits.
            let current_word = self.next.saturating_sub(1) / WORD_BITS;
            let new_word = counter / WORD_BITS;
            let to_clear = (new_word - current_word).min(WORDS as u64);
            for i in 1..=to_clear {
                let w = ((current_word + i) % WORDS as u64) as usize;
                self.bitmap[w] = 0;
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::position(counter);
        self.bitmap[word] |= bit;
        true
    }

    fn position(counter: u64) -> (usize, u64) {
        let word = ((counter / WORD_BITS) % WORDS as u64) as usize;
        (word, 1u64 << (counter % WORD_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_reorder_replay_and_too_old() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            assert!(w.accept(c));
        }
        assert!(!w.accept(50), "replay");
        assert!(w.accept(200));
        assert!(w.accept(150), "reordered inside the window");
        assert!(!w.accept(150));
        assert!(w.accept(10_000));
        assert!(!w.accept(10_000 - WINDOW - 1), "too old");
        assert!(
            w.accept(10_000 - WINDOW + 1),
            "oldest still inside the window"
        );
        assert!(!w.may_accept(REJECT_AFTER_MESSAGES));
    }

    #[test]
    fn large_jump_clears_stale_bits() {
        let mut w = ReplayWindow::new();
        for c in 0..WINDOW {
            assert!(w.accept(c));
        }
        let far = 5 * REPLAY_WINDOW_BITS + 3;
        assert!(w.accept(far));
        // Every counter just below the new top is fresh although its bit position was
        // used before the jump.
        for c in (far - 200)..far {
            assert!(w.accept(c), "counter {c}");
        }
    }

    #[test]
    fn matches_a_naive_model_on_a_pseudo_random_walk() {
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut top = 0u64;
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let jump = x % 9000;
            let counter = if x & 1 == 0 {
                top + jump / 8
            } else {
                top.saturating_sub(jump)
            };
            let fresh = !seen.contains(&counter) && (counter >= top || top - counter <= WINDOW);
            assert_eq!(w.accept(counter), fresh, "counter {counter}, top {top}");
            if fresh {
                seen.insert(counter);
                top = top.max(counter + 1);
            }
        }
    }
}
