//! meshguard: an identity-aware encrypted overlay. See DESIGN.md for the model.

pub mod config;
pub mod identity;
pub mod proto;
