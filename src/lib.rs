//! meshguard: an identity-aware encrypted overlay. See DESIGN.md for the model.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod identity;
pub mod io;
pub mod node;
pub mod packet;
pub mod policy;
pub mod proto;
pub mod telemetry;
pub mod testbed;
