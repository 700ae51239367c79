//! Sans-IO WireGuard protocol: messages, handshake, sessions, replay window, cookies and
//! timers. No sockets, no clock: every call takes `now`.

pub mod constants;
pub mod cookie;
pub mod device;
pub mod handshake;
pub mod messages;
pub mod replay;
pub mod session;
pub mod tunnel;

pub use device::{
    Device, DeviceConfig, Drop, Event, LocalId, ReceiveStep, Received, SealStep, Sealed, Stats,
    Transmit, TransportOpen, TunnelId,
};
pub use messages::{is_transport, SEAL_TAILROOM, TRANSPORT_HEADER_LEN};
pub use session::{OpenError, SealJob};
