//! The operating-system edge: the TUN device, the UDP socket and interface settings.
//! The only module that talks to the kernel (and the only one allowed `unsafe`).

pub(crate) mod netconf;
pub(crate) mod tun;
pub(crate) mod udp;
