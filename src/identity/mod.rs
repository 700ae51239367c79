//! Workload identities: principals, X25519 keys and key files, and the prefix tables that
//! map addresses to identities (source → local identity, destination → peer identity).

mod ids;
mod keys;
mod principal;
mod table;

pub use ids::{LocalId, PairTable, PeerId};
pub use keys::{
    load_private_key_file, KeyError, KeyFileError, PrivateKey, PublicKey, KEY_BASE64_LEN, KEY_LEN,
};
pub use principal::{Principal, PrincipalError, Segment};
pub use table::{overlaps, PrefixTable};
