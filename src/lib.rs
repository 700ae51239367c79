//! meshguard: an identity-aware encrypted overlay. `docs/ARCHITECTURE.md` describes the
//! layers, the path of a packet and the rules of the house.

pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod file_error;
pub mod identity;
#[allow(unsafe_code)]
pub mod io;
pub mod node;
pub mod packet;
pub mod policy;
pub mod proto;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testbed;
