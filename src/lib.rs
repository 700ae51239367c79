//! meshguard: an identity-aware encrypted overlay. `docs/ARCHITECTURE.md` in the
//! repository describes the layers, the path of a packet out and in, and the rules of the
//! house.
//!
//! The public modules are what the binary, the tests and the benches use; the rest
//! serves the daemon from inside the crate.

pub mod cli;
pub mod config;
mod daemon;
#[cfg(feature = "demo")]
mod demo;
pub mod file_error;
pub mod identity;
// System calls that need `unsafe` live here and nowhere else.
#[allow(unsafe_code)]
mod io;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod node;
pub mod ops;
mod packet;
pub mod policy;
pub mod proto;
mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testbed;
