//! Handshake load: counts handshake messages per second to decide when initiations must
//! carry a cookie (mac2) before the device does any expensive work for them.

use std::time::{Duration, Instant};

/// How long the device stays strict after a burst, as wireguard-go does.
const STRICT_AFTER_BURST: Duration = Duration::from_secs(1);

pub(super) struct LoadMeter {
    /// Handshake messages per second above which the device is under load.
    threshold: u32,
    window_start: Option<Instant>,
    count: u32,
    under_load_until: Option<Instant>,
}

impl LoadMeter {
    pub(super) fn new(threshold: u32) -> Self {
        LoadMeter {
            threshold,
            window_start: None,
            count: 0,
            under_load_until: None,
        }
    }

    /// Records one handshake message and says whether the device is under load.
    pub(super) fn record(&mut self, now: Instant) -> bool {
        let fresh_window = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh_window {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > self.threshold {
            self.under_load_until = Some(now + STRICT_AFTER_BURST);
        }
        self.under_load_until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_follows_the_rate_and_lingers_after_a_burst() {
        let now = Instant::now();
        let mut meter = LoadMeter::new(2);
        assert!(!meter.record(now));
        assert!(!meter.record(now));
        assert!(meter.record(now), "third message in one second");
        let later = now + Duration::from_millis(999);
        assert!(
            meter.record(later),
            "still strict within a second of the burst"
        );
        assert!(!meter.record(now + Duration::from_secs(2)), "calm again");
    }
}
