//! Writes the kernel refused: UDP sends, counted by kind, and TUN writes. Each is
//! packets lost, which must never go unnoticed: all are counted and logged at warn, at
//! most once per kind every ten seconds.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one warning per kind this often; the rest are counted.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why the kernel refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFailure {
    /// EMSGSIZE: larger than the path allows.
    TooLarge,
    /// ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL: no route to the endpoint.
    Unreachable,
    /// ECONNREFUSED: an ICMP port unreachable came back for an earlier datagram.
    Refused,
    /// ENOBUFS, ENOMEM: the kernel's buffers are full.
    NoBuffers,
    /// Anything else.
    Other,
}

impl SendFailure {
    const ALL: [SendFailure; 5] = [
        SendFailure::TooLarge,
        SendFailure::Unreachable,
        SendFailure::Refused,
        SendFailure::NoBuffers,
        SendFailure::Other,
    ];

    pub(crate) fn of(error: &io::Error) -> SendFailure {
        match error.raw_os_error() {
            Some(libc_errno::EMSGSIZE) => SendFailure::TooLarge,
            Some(
                libc_errno::ENETUNREACH | libc_errno::EHOSTUNREACH | libc_errno::EADDRNOTAVAIL,
            ) => SendFailure::Unreachable,
            Some(libc_errno::ECONNREFUSED) => SendFailure::Refused,
            Some(libc_errno::ENOBUFS | libc_errno::ENOMEM) => SendFailure::NoBuffers,
            _ => SendFailure::Other,
        }
    }

    /// The counter's name in the counter line.
    fn name(self) -> &'static str {
        match self {
            SendFailure::TooLarge => "send_too_large",
            SendFailure::Unreachable => "send_unreachable",
            SendFailure::Refused => "send_refused",
            SendFailure::NoBuffers => "send_no_buffers",
            SendFailure::Other => "send_other_errors",
        }
    }
}

/// errno values, from nix (which re-exports the platform's).
mod libc_errno {
    use nix::errno::Errno;

    pub(super) const EMSGSIZE: i32 = Errno::EMSGSIZE as i32;
    pub(super) const ENETUNREACH: i32 = Errno::ENETUNREACH as i32;
    pub(super) const EHOSTUNREACH: i32 = Errno::EHOSTUNREACH as i32;
    pub(super) const EADDRNOTAVAIL: i32 = Errno::EADDRNOTAVAIL as i32;
    pub(super) const ECONNREFUSED: i32 = Errno::ECONNREFUSED as i32;
    pub(super) const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub(super) const ENOMEM: i32 = Errno::ENOMEM as i32;
}

/// When a kind of failure was last logged, and how many went unlogged since.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    unlogged: u64,
}

impl Warnings {
    /// For `count` more failures at `now`: `Some(failures not logged before these)` if
    /// they are to be logged, else `None` (and they join the unlogged).
    fn due(&mut self, now: Instant, count: u64) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < WARN_INTERVAL)
        {
            self.unlogged += count;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Counts of failed sends, shared by every worker; touched only when a send fails.
#[derive(Default)]
pub(crate) struct SendErrors {
    counts: [AtomicU64; SendFailure::ALL.len()],
    warned: Mutex<[Warnings; SendFailure::ALL.len()]>,
}

impl SendErrors {
    /// Counts a failed send of `datagrams` datagrams to `destination`, and warns about
    /// it unless a warning of the same kind went out within WARN_INTERVAL.
    pub(crate) fn record(&self, error: &io::Error, destination: SocketAddr, datagrams: usize) {
        let kind = SendFailure::of(error);
        let slot = kind as usize;
        self.counts[slot].fetch_add(datagrams as u64, Ordering::Relaxed);
        let due = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[slot]
            .due(Instant::now(), datagrams as u64);
        if let Some(not_logged) = due {
            tracing::warn!(
                %error,
                %destination,
                datagrams,
                similar_failures_not_logged = not_logged,
                counter = kind.name(),
                "UDP send failed; datagrams lost"
            );
        }
    }

    /// Each kind's name (`send_too_large`, ...) with its count.
    pub(crate) fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        SendFailure::ALL.iter().map(|kind| {
            (
                kind.name(),
                self.counts[*kind as usize].load(Ordering::Relaxed),
            )
        })
    }

    /// `send_too_large=N send_unreachable=N ...`, for the counter line.
    pub(crate) fn counters(&self) -> String {
        self.counts()
            .map(|(name, count)| format!("{name}={count}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Packets lost in TUN writes the kernel refused, shared by every worker.
#[derive(Default)]
pub(crate) struct TunWriteErrors {
    packets: AtomicU64,
    warned: Mutex<Warnings>,
}

impl TunWriteErrors {
    /// Counts a failed write that carried `packets` packets, and warns about it unless
    /// a warning went out within WARN_INTERVAL.
    pub(crate) fn record(&self, error: &io::Error, packets: usize) {
        self.packets.fetch_add(packets as u64, Ordering::Relaxed);
        let due = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .due(Instant::now(), packets as u64);
        if let Some(not_logged) = due {
            tracing::warn!(
                %error,
                packets,
                similar_failures_not_logged = not_logged,
                counter = "tun_write_errors",
                "writing to the TUN device failed; packets lost"
            );
        }
    }

    /// Packets lost so far.
    pub(crate) fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_kind() {
        let errors = SendErrors::default();
        let to: SocketAddr = "198.18.0.2:51820".parse().unwrap();
        let too_large = io::Error::from_raw_os_error(libc_errno::EMSGSIZE);
        errors.record(&too_large, to, 3);
        errors.record(&too_large, to, 1);
        errors.record(
            &io::Error::from_raw_os_error(libc_errno::ENETUNREACH),
            to,
            1,
        );
        errors.record(&io::Error::other("odd"), to, 2);
        assert_eq!(
            errors.counters(),
            "send_too_large=4 send_unreachable=1 send_refused=0 send_no_buffers=0 \
             send_other_errors=2"
        );
    }

    #[test]
    fn tun_write_failures_count_the_packets_they_carried() {
        let errors = TunWriteErrors::default();
        errors.record(
            &io::Error::from_raw_os_error(nix::errno::Errno::EINVAL as i32),
            40,
        );
        errors.record(
            &io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32),
            1,
        );
        assert_eq!(errors.packets(), 41);
    }

    #[test]
    fn a_warning_at_most_every_interval_says_how_many_went_unlogged() {
        let mut warnings = Warnings::default();
        let start = Instant::now();
        assert_eq!(warnings.due(start, 3), Some(0));
        assert_eq!(warnings.due(start + Duration::from_secs(1), 5), None);
        assert_eq!(warnings.due(start + Duration::from_secs(9), 2), None);
        assert_eq!(warnings.due(start + WARN_INTERVAL, 1), Some(7));
        assert_eq!(warnings.due(start + WARN_INTERVAL, 1), None);
    }
}
