//! A rogue peer: a WireGuard endpoint that the test itself runs, from meshguard's
//! protocol core, over a UDP socket in a namespace. It completes real handshakes with a
//! daemon and then sends whatever inner packets the test crafts, so attacks arrive
//! through real tunnels with no kernel on the sending side to tidy them up.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Netns;
use crate::identity::{PrivateKey, PublicKey};
use crate::proto::{self, Device, DeviceConfig, Received, Sealed, TunnelId};

pub struct RoguePeer {
    device: Device,
    socket: UdpSocket,
    tunnels: Vec<TunnelId>,
    buf: Vec<u8>,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl RoguePeer {
    /// A peer with no identities yet, on `listen` in `ns`.
    pub fn bind(ns: &Netns, listen: SocketAddr) -> io::Result<RoguePeer> {
        let socket = ns.udp_bind(listen)?;
        Ok(RoguePeer {
            device: Device::new(
                DeviceConfig::default(),
                proto::os_random(),
                Instant::now(),
                unix_now(),
            ),
            socket,
            tunnels: Vec::new(),
            buf: vec![0; 65536],
        })
    }

    /// Speaks as `private` to the daemon identity `victim` at `endpoint`; returns the
    /// tunnel's number for [`send`](Self::send).
    pub fn add_tunnel(
        &mut self,
        private: &PrivateKey,
        victim: &PublicKey,
        endpoint: SocketAddr,
    ) -> usize {
        let local = self.device.add_local(private.clone());
        let tunnel = self.device.add_tunnel(
            Instant::now(),
            local,
            *victim.as_bytes(),
            Some(endpoint),
            None,
        );
        self.tunnels.push(tunnel);
        self.tunnels.len() - 1
    }

    /// Runs a handshake on `tunnel` (retrying, and using cookies, as any initiator
    /// does); an error if it does not complete within `timeout`.
    pub fn handshake(&mut self, tunnel: usize, timeout: Duration) -> io::Result<()> {
        let id = self.tunnels[tunnel];
        self.device.initiate(Instant::now(), id);
        self.flush()?;
        let deadline = Instant::now() + timeout;
        while !self.device.has_session(id) {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "rogue tunnel {tunnel}: no handshake"
                )));
            }
            self.receive_for(Duration::from_millis(50))?;
        }
        Ok(())
    }

    /// Starts a handshake on every tunnel at once and answers, retries and uses cookies
    /// as any initiator does, until every tunnel has a session or `timeout` passes;
    /// returns how many tunnels have a session.
    pub fn handshake_all(&mut self, timeout: Duration) -> io::Result<usize> {
        let now = Instant::now();
        for id in &self.tunnels {
            self.device.initiate(now, *id);
        }
        self.flush()?;
        let deadline = now + timeout;
        loop {
            let done = self
                .tunnels
                .iter()
                .filter(|id| self.device.has_session(**id))
                .count();
            if done == self.tunnels.len() || Instant::now() > deadline {
                return Ok(done);
            }
            self.receive_for(Duration::from_millis(20))?;
        }
    }

    /// Seals the packet at `buf` (laid out as the fixtures' builders do, `len` bytes)
    /// and sends it on `tunnel`, which must have a session.
    pub fn send(&mut self, tunnel: usize, mut buf: Vec<u8>, len: usize) -> io::Result<()> {
        let id = self.tunnels[tunnel];
        match self.device.seal(Instant::now(), id, &mut buf, len) {
            Sealed::Send { destination, len } => {
                self.socket.send_to(&buf[..len], destination)?;
                self.flush()
            }
            Sealed::Queued => Err(io::Error::other("rogue tunnel without a session")),
            Sealed::Dropped(drop) => Err(io::Error::other(format!("rogue seal: {drop:?}"))),
        }
    }

    /// Receives for `wait`, answering handshakes and keepalives; returns the inner
    /// packets that came in, with the number of their tunnel.
    pub fn receive_for(&mut self, wait: Duration) -> io::Result<Vec<(usize, Vec<u8>)>> {
        let deadline = Instant::now() + wait;
        let mut packets = Vec::new();
        loop {
            let now = Instant::now();
            self.device.handle_timeout(now);
            self.flush()?;
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(packets);
            }
            // Wake for the device's timers (retries, keepalives) too.
            let wake = self
                .device
                .poll_timeout()
                .map_or(left, |at| at.saturating_duration_since(now).min(left));
            self.socket
                .set_read_timeout(Some(wake.max(Duration::from_millis(1))))?;
            let (n, from) = match self.socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            if let Received::Data { tunnel, plaintext } =
                self.device
                    .receive(Instant::now(), from, &mut self.buf[..n])
            {
                if let Some(number) = self.tunnels.iter().position(|t| *t == tunnel) {
                    packets.push((number, self.buf[plaintext].to_vec()));
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        while let Some(transmit) = self.device.poll_transmit() {
            self.socket.send_to(&transmit.data, transmit.destination)?;
        }
        Ok(())
    }
}
