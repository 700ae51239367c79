//! A handshake flood: initiations with a valid mac1 from many fresh static keys and
//! many source addresses, at a set rate. It answers cookie replies the way a real
//! initiator does (later initiations from that address carry mac2), so under load its
//! messages get past the cookie check and cost the target Diffie-Hellman work, up to
//! the target's per-address rate limit. No key it uses is known to the target.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Netns;
use crate::identity::{PrivateKey, PublicKey};
use crate::proto::{self, constants::REKEY_TIMEOUT, Device, DeviceConfig, TunnelId};

/// Keys per source address: each sends one initiation per round.
const KEYS_PER_SOURCE: usize = 8;

/// What a flood did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodStats {
    pub initiations_sent: u64,
    /// Datagrams that came back (cookie replies; a response would mean a known key).
    pub replies: u64,
    pub elapsed: Duration,
}

pub struct HandshakeFlood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
}

/// One source address: its socket, and a device whose identities all initiate to the
/// target. The device runs on a clock of its own that jumps past the retry timeout each
/// round, so every identity sends its next initiation at once.
struct Source {
    socket: UdpSocket,
    device: Device,
    tunnels: Vec<TunnelId>,
    clock: Instant,
}

impl HandshakeFlood {
    /// Starts flooding `target` (whose identity key is `victim`) from each address of
    /// `sources` in `ns`, `per_second` initiations a second in all.
    pub fn start(
        ns: &Netns,
        sources: &[IpAddr],
        target: SocketAddr,
        victim: &PublicKey,
        per_second: u32,
    ) -> io::Result<HandshakeFlood> {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut flood_sources = Vec::new();
        for &address in sources {
            let socket = ns.udp_bind(SocketAddr::new(address, 0))?;
            socket.set_nonblocking(true)?;
            let clock = Instant::now();
            let mut device = Device::new(DeviceConfig::default(), proto::os_random(), clock, unix);
            let tunnels = (0..KEYS_PER_SOURCE)
                .map(|_| {
                    let local = device.add_local(PrivateKey::generate());
                    device.add_tunnel(clock, local, *victim.as_bytes(), Some(target), None)
                })
                .collect();
            flood_sources.push(Source {
                socket,
                device,
                tunnels,
                clock,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let replies = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent, replies) = (stop.clone(), sent.clone(), replies.clone());
            std::thread::Builder::new()
                .name("handshake-flood".into())
                .spawn(move || flood(flood_sources, per_second, &stop, &sent, &replies))?
        };
        Ok(HandshakeFlood {
            stop,
            sent,
            replies,
            started: Instant::now(),
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> FloodStats {
        FloodStats {
            initiations_sent: self.sent.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops the flood and returns what it did.
    pub fn stop(mut self) -> FloodStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HandshakeFlood {
    fn drop(&mut self) {
        self.halt();
    }
}

fn flood(
    mut sources: Vec<Source>,
    per_second: u32,
    stop: &AtomicBool,
    sent: &AtomicU64,
    replies: &AtomicU64,
) {
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for source in &mut sources {
            source.clock += REKEY_TIMEOUT + Duration::from_secs(1);
            let now = source.clock;
            while let Ok((n, from)) = source.socket.recv_from(&mut buf) {
                replies.fetch_add(1, Ordering::Relaxed);
                source.device.receive(now, from, &mut buf[..n]);
            }
            // A retry for each identity whose initiation is out, a first one for each
            // that gave up.
            source.device.handle_timeout(now);
            for &tunnel in &source.tunnels {
                source.device.initiate(now, tunnel);
            }
            while let Some(transmit) = source.device.poll_transmit() {
                if source
                    .socket
                    .send_to(&transmit.data, transmit.destination)
                    .is_ok()
                {
                    count += 1;
                }
            }
            sent.store(count, Ordering::Relaxed);
            // Keep to the rate: sleep while ahead of it.
            let due = Duration::from_secs_f64(count as f64 / f64::from(per_second.max(1)));
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}
