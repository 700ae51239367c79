//! Sans-IO WireGuard protocol: messages, the Noise handshake, sessions, the replay window,
//! cookies, load metering and timers. No sockets, no clock (every call takes `now`), and
//! no randomness but the source the caller hands in.

pub mod constants;
mod cookie;
mod device;
mod load_meter;
mod messages;
mod noise;
mod rate_limiter;
mod replay;
mod report;
mod session;
mod slots;
mod timers;
mod tunnel;

pub use device::{
    Device, DeviceConfig, InitiationJob, InitiationWork, Mac1Screen, Mac1Verdict, ReceiveStep,
    Received, SealStep, Sealed, Transmit, TransportOpen,
};
pub use messages::{is_transport, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
pub use replay::WINDOW as REPLAY_WINDOW;
pub use report::{Event, ProtocolDrop, Stats, Traffic};
pub use session::{OpenError, SealJob, Session};

/// The randomness the core draws from (receiver indices, retry jitter, ephemeral keys,
/// cookie secrets): the daemon passes the operating system's generator, tests pass a
/// seeded one and get one exact, repeatable schedule.
pub type Random = Box<dyn rand_core::CryptoRngCore + Send>;

/// The operating system's generator, for the daemon.
pub fn os_random() -> Random {
    Box::new(rand_core::OsRng)
}

/// A local identity's static key in the device: a slot number, which a key added after
/// this one was removed may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalKeyId(usize);

/// A tunnel in the device: a slot number, which a tunnel added after this one was removed
/// may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId(usize);

impl TunnelId {
    /// The tunnel's slot number (slots are numbered from 0 and reused after removal).
    pub fn index(self) -> usize {
        self.0
    }
}
