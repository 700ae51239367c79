//! The operating-system edge: the TUN device, the UDP socket, interface settings, the
//! plaintext filter of STRICT mTLS and the threads' scheduling priority.
//! The only module that talks to the kernel (and the only one allowed `unsafe`).

pub(crate) mod netconf;
pub(crate) mod plaintext_filter;
pub(crate) mod scheduling;
pub(crate) mod tun;
pub(crate) mod udp;
