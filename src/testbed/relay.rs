//! A userspace UDP relay between two tunnel endpoints, for impaired links on machines
//! without `netem`: it drops, duplicates, reorders and delays datagrams as asked, from
//! a seeded generator, and measures what passes (count, longest datagram).
//!
//! The relay runs in the namespace of side `a`, on one socket. Side `a`'s daemon sends
//! to the relay's address as its peer's endpoint, and so does side `b`'s; the relay
//! passes what comes from `a`'s daemon on to `b`'s daemon, and everything else to `a`'s.
//! Both daemons therefore see the relay as the other's endpoint.
//!
//! It can also record the transport data messages it passes from `a` to `b` and send
//! them to `b` again later, from the same socket: an on-path replay.

use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Netns;

/// What the relay does to the datagrams of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
    /// Share of datagrams sent twice.
    pub duplicate: f64,
    /// Share of datagrams held back and sent after the next one.
    pub reorder: f64,
    /// Added to every datagram's trip.
    pub delay: Duration,
}

impl Impairment {
    /// A link that only loses `loss` of the datagrams.
    pub fn loss(loss: f64) -> Self {
        Impairment {
            loss,
            ..Impairment::default()
        }
    }
}

/// What one direction of the relay saw.
#[derive(Debug, Default)]
pub struct DirectionStats {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    longest: AtomicUsize,
}

impl DirectionStats {
    /// Datagrams that arrived at the relay.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Datagrams sent on, duplicates included.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn duplicated(&self) -> u64 {
        self.duplicated.load(Ordering::Relaxed)
    }

    /// The longest datagram that arrived, in bytes.
    pub fn longest(&self) -> usize {
        self.longest.load(Ordering::Relaxed)
    }
}

/// A datagram waiting for its delay to pass.
struct Delayed {
    due: Instant,
    sequence: u64,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.sequence) == (other.due, other.sequence)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    /// The heap is a max-heap: the earliest datagram must compare greatest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.sequence).cmp(&(self.due, self.sequence))
    }
}

/// How long a datagram held back for reordering waits for a next one to overtake it.
const MAX_HOLD: Duration = Duration::from_millis(20);

/// One direction's settings, counters and the datagram it holds back for reordering.
struct Direction {
    to: SocketAddr,
    impairment: Impairment,
    stats: Arc<DirectionStats>,
    held: Option<(Instant, Vec<u8>)>,
}

/// Transport data messages from `a` to `b` being recorded for a replay.
#[derive(Default)]
struct Recording {
    /// How many more to record.
    wanted: usize,
    datagrams: Vec<Vec<u8>>,
}

/// WireGuard's transport data message type, in its first byte.
const TRANSPORT_DATA: u8 = 4;

/// The relay; stopped (and its thread joined) on drop.
pub struct UdpRelay {
    address: SocketAddr,
    a_to_b: Arc<DirectionStats>,
    b_to_a: Arc<DirectionStats>,
    recording: Arc<Mutex<Recording>>,
    /// The relay's socket, for replays.
    socket: UdpSocket,
    b: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpRelay {
    /// A relay bound to `listen` in `ns` (side `a`'s namespace) between the daemons at
    /// `a` and `b`, impairing each direction as given. `seed` makes the impairment
    /// repeatable.
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        a: SocketAddr,
        b: SocketAddr,
        a_to_b: Impairment,
        b_to_a: Impairment,
        seed: u64,
    ) -> io::Result<UdpRelay> {
        let socket = ns.udp_bind(listen)?;
        socket.set_read_timeout(Some(Duration::from_millis(5)))?;
        let address = socket.local_addr()?;
        let stats = (
            Arc::new(DirectionStats::default()),
            Arc::new(DirectionStats::default()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let directions = [
            Direction {
                to: b,
                impairment: a_to_b,
                stats: Arc::clone(&stats.0),
                held: None,
            },
            Direction {
                to: a,
                impairment: b_to_a,
                stats: Arc::clone(&stats.1),
                held: None,
            },
        ];
        let recording = Arc::new(Mutex::new(Recording::default()));
        let replay_socket = socket.try_clone()?;
        let thread = {
            let stop = Arc::clone(&stop);
            let recording = Arc::clone(&recording);
            std::thread::Builder::new()
                .name("udp-relay".into())
                .spawn(move || relay(socket, a, directions, seed, &recording, &stop))?
        };
        Ok(UdpRelay {
            address,
            a_to_b: stats.0,
            b_to_a: stats.1,
            recording,
            socket: replay_socket,
            b,
            stop,
            thread: Some(thread),
        })
    }

    /// Records the next `count` transport data messages passed from `a` to `b` (what
    /// was recorded before is forgotten).
    pub fn record_a_to_b(&self, count: usize) {
        let mut recording = self.recording.lock().expect("recording");
        recording.wanted = count;
        recording.datagrams.clear();
    }

    /// How many messages have been recorded.
    pub fn recorded(&self) -> usize {
        self.recording.lock().expect("recording").datagrams.len()
    }

    /// Sends every recorded message to `b` again, from the relay's address, in the
    /// order they passed or reversed, paced (100 every millisecond) so the receiver's
    /// socket takes them all; returns how many were sent.
    pub fn replay_a_to_b(&self, reversed: bool) -> io::Result<usize> {
        let mut datagrams = self.recording.lock().expect("recording").datagrams.clone();
        if reversed {
            datagrams.reverse();
        }
        for (sent, data) in datagrams.iter().enumerate() {
            self.socket.send_to(data, self.b)?;
            if sent % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(datagrams.len())
    }

    /// Where both daemons send: each one's endpoint for the other.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// What went from side `a` towards side `b`.
    pub fn a_to_b(&self) -> &DirectionStats {
        &self.a_to_b
    }

    /// What went from side `b` towards side `a`.
    pub fn b_to_a(&self) -> &DirectionStats {
        &self.b_to_a
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A draw in 0.0..1.0.
fn chance(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u32() as f64) / (u32::MAX as f64 + 1.0)
}

fn relay(
    socket: UdpSocket,
    a: SocketAddr,
    mut directions: [Direction; 2],
    seed: u64,
    recording: &Mutex<Recording>,
    stop: &AtomicBool,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut delayed = BinaryHeap::new();
    let mut sequence = 0u64;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while delayed.peek().is_some_and(|d: &Delayed| d.due <= now) {
            let d = delayed.pop().expect("peeked");
            let _ = socket.send_to(&d.data, d.to);
        }
        for direction in &mut directions {
            if let Some((_, data)) = direction.held.take_if(|(at, _)| now - *at >= MAX_HOLD) {
                direction.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&data, direction.to);
            }
        }
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // ICMP errors for earlier sends surface here; the relay carries on.
            Err(_) => continue,
        };
        let from_a = from == a;
        let direction = &mut directions[usize::from(!from_a)];
        let stats = &direction.stats;
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats.longest.fetch_max(len, Ordering::Relaxed);
        let impairment = direction.impairment;
        if chance(&mut rng) < impairment.loss {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if from_a && len > 0 && buf[0] == TRANSPORT_DATA {
            let mut recording = recording.lock().expect("recording");
            if recording.wanted > 0 {
                recording.wanted -= 1;
                recording.datagrams.push(buf[..len].to_vec());
            }
        }
        let copies = if chance(&mut rng) < impairment.duplicate {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let mut out = vec![buf[..len].to_vec(); copies];
        if chance(&mut rng) < impairment.reorder && direction.held.is_none() {
            direction.held = out.pop().map(|data| (now, data));
        } else if let Some((_, held)) = direction.held.take() {
            out.push(held);
        }
        for data in out {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            if impairment.delay.is_zero() {
                let _ = socket.send_to(&data, direction.to);
            } else {
                sequence += 1;
                delayed.push(Delayed {
                    due: now + impairment.delay,
                    sequence,
                    to: direction.to,
                    data,
                });
            }
        }
    }
}
