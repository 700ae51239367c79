//! The WireGuard timers of one tunnel, in one table: each timer is an instant or unset,
//! and the earliest set one is when the tunnel next wants to be woken.

use std::time::Instant;

/// One of a tunnel's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Resend the initiation that got no response (REKEY_TIMEOUT plus jitter).
    RetryHandshake,
    /// Start a handshake, unless something authenticated arrives first (data left, no
    /// answer came).
    NewHandshake,
    /// Send a keepalive, unless something else is sent first (data arrived, none left).
    Keepalive,
    /// The configured persistent keepalive.
    PersistentKeepalive,
}

impl Timer {
    /// In the order they are handled when several are due: a handshake that starts
    /// makes a keepalive unnecessary.
    pub(super) const ALL: [Timer; 4] = [
        Timer::RetryHandshake,
        Timer::NewHandshake,
        Timer::Keepalive,
        Timer::PersistentKeepalive,
    ];

    fn slot(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default, Clone)]
pub(super) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.slot()] = Some(at);
    }

    /// Sets `timer` unless it is already running.
    pub(super) fn start_unless_running(&mut self, timer: Timer, at: Instant) {
        let slot = &mut self.deadlines[timer.slot()];
        slot.get_or_insert(at);
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.slot()] = None;
    }

    /// Whether `timer` is set and due at `now`; a due timer is stopped, so it fires once.
    pub(super) fn take_expired(&mut self, timer: Timer, now: Instant) -> bool {
        let slot = &mut self.deadlines[timer.slot()];
        if slot.is_some_and(|at| at <= now) {
            *slot = None;
            true
        } else {
            false
        }
    }

    /// The earliest deadline of any timer.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_deadline_and_one_shot_expiry() {
        let now = Instant::now();
        let mut timers = TimerTable::default();
        assert_eq!(timers.next_deadline(), None);
        timers.set(Timer::Keepalive, now + Duration::from_secs(10));
        timers.start_unless_running(Timer::NewHandshake, now + Duration::from_secs(15));
        timers.start_unless_running(Timer::NewHandshake, now + Duration::from_secs(20));
        assert_eq!(timers.next_deadline(), Some(now + Duration::from_secs(10)));
        assert!(!timers.take_expired(Timer::Keepalive, now + Duration::from_secs(9)));
        assert!(timers.take_expired(Timer::Keepalive, now + Duration::from_secs(10)));
        assert!(
            !timers.take_expired(Timer::Keepalive, now + Duration::from_secs(11)),
            "fired once"
        );
        assert_eq!(
            timers.next_deadline(),
            Some(now + Duration::from_secs(15)),
            "a running timer keeps its deadline"
        );
        timers.stop(Timer::NewHandshake);
        assert_eq!(timers.next_deadline(), None);
    }
}
