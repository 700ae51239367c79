//! X25519 static keys and private-key files.
//!
//! Keys are written as standard base64 with padding (44 characters for 32 bytes), exactly
//! as `wg genkey` and `wg pubkey` write them, so keys are interchangeable with WireGuard
//! tools. Private key material never appears in `Debug` output or in any error message.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use zeroize::Zeroize;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a base64-encoded key (standard alphabet, with padding).
pub const KEY_BASE64_LEN: usize = 44;

/// Why a base64 key string was rejected. Never carries key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty key")]
    Empty,
    #[error("expected {KEY_BASE64_LEN} base64 characters (a 32-byte key), got {0}")]
    Length(usize),
    #[error("not valid base64 (standard alphabet with \"=\" padding, as written by `wg genkey`)")]
    Base64,
}

fn decode_key(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    if s.len() != KEY_BASE64_LEN {
        return Err(KeyError::Length(s.chars().count()));
    }
    let mut out = [0u8; KEY_LEN];
    match STANDARD.decode_slice(s.as_bytes(), &mut out) {
        Ok(KEY_LEN) => Ok(out),
        // Errors from the base64 crate quote the offending byte: do not pass them on.
        _ => Err(KeyError::Base64),
    }
}

/// An X25519 private (static secret) key.
///
/// `Debug` prints `PrivateKey(<redacted>)`; there is deliberately no `Display`.
/// Clones share one copy of the secret, whose bytes are zeroed when the last goes.
#[derive(Clone)]
pub struct PrivateKey(Arc<x25519_dalek::StaticSecret>);

impl PrivateKey {
    /// Generates a new key from the operating system's random source, clamped like
    /// `wg genkey` output.
    pub fn generate() -> Self {
        let random = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        let mut bytes = random.to_bytes();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        let secret = x25519_dalek::StaticSecret::from(bytes);
        bytes.zeroize();
        PrivateKey(Arc::new(secret))
    }

    /// Wraps raw key bytes (clamping happens when the key is used, as in WireGuard).
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let key = PrivateKey(Arc::new(x25519_dalek::StaticSecret::from(bytes)));
        bytes.zeroize();
        key
    }

    /// Parses a base64 private key, as written by `wg genkey`.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self::from_bytes)
    }

    /// The key in base64, as `wg genkey` writes it. Handle the result as a secret.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// The matching public key (what `wg pubkey` prints).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&*self.0).to_bytes())
    }

    /// The raw key bytes. Handle the result as a secret.
    pub fn as_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// The underlying x25519-dalek secret.
    pub fn as_static_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Compares in constant time (no early exit on the first differing byte).
impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        let a = self.0.as_bytes();
        let b = other.0.as_bytes();
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for PrivateKey {}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

/// An X25519 public key. Any 32 bytes are a valid public key.
///
/// `Display` and `Debug` print base64, as `wg pubkey` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses a base64 public key, as printed by `wg pubkey`.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(PublicKey)
    }

    /// The key in base64, as `wg pubkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl From<[u8; KEY_LEN]> for PublicKey {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(bytes)
    }
}

impl From<PublicKey> for [u8; KEY_LEN] {
    fn from(key: PublicKey) -> Self {
        key.0
    }
}

impl From<&PrivateKey> for PublicKey {
    fn from(key: &PrivateKey) -> Self {
        key.public_key()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        PublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// Serializes as the base64 string.
impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Why a private key file could not be used. Every message names the file; none carries
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read private key file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "private key file {} is a symbolic link; meshguard does not follow links to keys: \
         point private_key_file at the key file itself", .path.display()
    )]
    SymbolicLink { path: PathBuf },
    #[error("private key file {} is not a regular file (it is a {kind})", .path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "private key file {p} is owned by uid {uid}, not by the user meshguard runs as \
         (uid {euid}) or root; run chown {euid} {p}",
        p = .path.display()
    )]
    Owner { path: PathBuf, uid: u32, euid: u32 },
    #[error(
        "private key file {p} is readable by group or others (mode {mode:04o}); run chmod 600 {p}",
        p = .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("private key file {} is not one base64 key (as written by `wg genkey`): {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
}

impl KeyFileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            KeyFileError::Io { path, .. }
            | KeyFileError::SymbolicLink { path }
            | KeyFileError::NotAFile { path, .. }
            | KeyFileError::Owner { path, .. }
            | KeyFileError::Permissions { path, .. }
            | KeyFileError::Malformed { path, .. } => path,
        }
    }
}

/// Reads a private key file written by `wg genkey > file`.
///
/// The file must be a regular file (not a symbolic link, which is not followed), owned
/// by the user meshguard runs as or by root, that neither group nor others can access
/// (`mode & 0o077 == 0`, e.g. `chmod 600`), holding exactly one base64 key; surrounding
/// whitespace (such as the trailing newline) is ignored. It is opened without following
/// a link and without blocking (a FIFO is refused at once, not waited on), and type,
/// owner and mode are checked on the opened file, before its contents are read.
pub fn load_private_key_file(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(Errno::ELOOP as i32) {
                KeyFileError::SymbolicLink {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(e)
            }
        })?;
    // Check the opened file, not the path, so the file checked is the file read.
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(KeyFileError::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
            euid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // A key file is 45 bytes; refuse to slurp something huge by mistake.
    const MAX_LEN: u64 = 4096;
    let mut buf = Vec::with_capacity(64);
    (&mut file)
        .take(MAX_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    let result = parse_key_file_contents(&buf).map_err(|reason| KeyFileError::Malformed {
        path: path.to_path_buf(),
        reason,
    });
    buf.zeroize();
    result
}

/// What a file that is not a regular file is, for the error message.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

fn parse_key_file_contents(buf: &[u8]) -> Result<PrivateKey, String> {
    let text = std::str::from_utf8(buf).map_err(|_| "not UTF-8 text".to_owned())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("the file is empty".to_owned());
    }
    if text.split_whitespace().nth(1).is_some() {
        return Err("found more than one word".to_owned());
    }
    PrivateKey::from_base64(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Generated with `wg genkey | tee k | wg pubkey`.
    const PRIV: &str = "eIrVdPCQT3S14Ka9DvQhT8ZT4iAKfYFZR67M6mSbPlY=";
    const PUB: &str = "MBwd9EYqaXDeOZlQMxDDTH7vQrcvvkjjdcQmE3vymT4=";

    fn temp_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!(
            "meshguard-keys-test-{}-{}-{tag}",
            std::process::id(),
            n
        ))
    }

    fn write_file(contents: &[u8], mode: u32) -> PathBuf {
        let path = temp_path("key");
        let mut f = File::create(&path).unwrap();
        f.write_all(contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn known_vector_matches_wg() {
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(k.to_base64(), PRIV);
        assert_eq!(k.public_key().to_string(), PUB);
        assert_eq!(k.public_key(), PublicKey::from_base64(PUB).unwrap());
        assert_eq!(k.public_key().to_base64(), PUB);
        assert_eq!(STANDARD.encode(k.as_bytes()), PRIV);
    }

    #[test]
    fn generated_keys_round_trip() {
        let k = PrivateKey::generate();
        let b = k.to_base64();
        assert_eq!(b.len(), KEY_BASE64_LEN);
        let k2: PrivateKey = b.parse().unwrap();
        assert_eq!(k, k2);
        assert_eq!(k.public_key(), k2.public_key());
        let bytes = k.as_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        assert_ne!(k, PrivateKey::generate());
        let p = k.public_key();
        assert_eq!(PublicKey::from(*p.as_bytes()), p);
        assert_eq!(p.to_base64().parse::<PublicKey>().unwrap(), p);
    }

    #[test]
    fn debug_never_shows_private_key() {
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(format!("{k:?}"), "PrivateKey(<redacted>)");
        let p = k.public_key();
        assert_eq!(format!("{p}"), PUB);
        assert_eq!(format!("{p:?}"), format!("PublicKey({PUB})"));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert_eq!(PublicKey::from_base64(""), Err(KeyError::Empty));
        assert_eq!(PublicKey::from_base64("abc"), Err(KeyError::Length(3)));
        // 43 characters: the padding is missing.
        assert_eq!(
            PublicKey::from_base64(&PUB[..43]),
            Err(KeyError::Length(43))
        );
        // URL-safe alphabet.
        let url = "Rvr2Fzd-4Gm5CgbnNgYHZRjK5YWt5O8wVLYWbiOZUFw=";
        assert_eq!(PublicKey::from_base64(url), Err(KeyError::Base64));
        // 44 characters that decode to 33 bytes.
        let long = "Rvr2Fzd+4Gm5CgbnNgYHZRjK5YWt5O8wVLYWbiOZUFwA";
        assert_eq!(PublicKey::from_base64(long), Err(KeyError::Base64));
        // Non-canonical trailing bits.
        let noncanon = "Rvr2Fzd+4Gm5CgbnNgYHZRjK5YWt5O8wVLYWbiOZUFx=";
        assert_eq!(PublicKey::from_base64(noncanon), Err(KeyError::Base64));
        assert!(PrivateKey::from_base64("not a key").is_err());
        let e = PrivateKey::from_base64("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('!'), "{e}");
    }

    #[test]
    fn public_key_deserializes_from_base64() {
        #[derive(serde::Deserialize)]
        struct T {
            k: PublicKey,
        }
        let t: T = toml::from_str(&format!("k = \"{PUB}\"")).unwrap();
        assert_eq!(t.k.to_string(), PUB);
        assert!(toml::from_str::<T>("k = \"short\"").is_err());
    }

    #[test]
    fn key_file_permissions_are_checked() {
        let path = write_file(format!("{PRIV}\n").as_bytes(), 0o644);
        let e = load_private_key_file(&path).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, KeyFileError::Permissions { mode: 0o644, .. }));
        assert_eq!(
            msg,
            format!(
                "private key file {p} is readable by group or others (mode 0644); \
                 run chmod 600 {p}",
                p = path.display()
            )
        );
        assert!(!msg.contains(PRIV));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_private_key_file(&path).is_err());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = load_private_key_file(&path).unwrap();
        assert_eq!(k.public_key().to_string(), PUB);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_private_key_file(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn key_file_errors_name_the_path() {
        let missing = temp_path("missing");
        let e = load_private_key_file(&missing).unwrap_err();
        assert!(matches!(e, KeyFileError::Io { .. }));
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");

        for (contents, want) in [
            (&b""[..], "the file is empty"),
            (b"  \n", "the file is empty"),
            (b"abc\n", "expected 44 base64 characters"),
            (b"\xff\xfe", "not UTF-8"),
        ] {
            let path = write_file(contents, 0o600);
            let e = load_private_key_file(&path).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, KeyFileError::Malformed { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert_eq!(e.path(), path);
            std::fs::remove_file(&path).unwrap();
        }

        // Two keys in one file: the message must not quote either of them.
        let path = write_file(format!("{PRIV}\n{PRIV}\n").as_bytes(), 0o600);
        let msg = load_private_key_file(&path).unwrap_err().to_string();
        assert!(msg.contains("more than one"), "{msg}");
        assert!(!msg.contains(PRIV), "{msg}");
        std::fs::remove_file(&path).unwrap();

        // Surrounding whitespace is fine.
        let path = write_file(format!("  {PRIV}\r\n\n").as_bytes(), 0o600);
        assert!(load_private_key_file(&path).is_ok());
        std::fs::remove_file(&path).unwrap();

        let dir = temp_path("dir");
        std::fs::create_dir(&dir).unwrap();
        let e = load_private_key_file(&dir).unwrap_err();
        assert!(matches!(e, KeyFileError::NotAFile { .. }), "{e}");
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A link to a key file is refused (the file behind a link can be swapped for
    /// another one without touching the configured path).
    #[test]
    fn a_symbolic_link_to_a_key_is_refused() {
        let target = write_file(format!("{PRIV}\n").as_bytes(), 0o600);
        let link = temp_path("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let msg = load_private_key_file(&link).unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(msg.contains(&link.display().to_string()), "{msg}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&target).unwrap();
    }

    /// A FIFO is refused at once; opening it must not wait for a writer.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let fifo = temp_path("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (done, result) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = done.send(load_private_key_file(&path).map(|_| ()));
        });
        let outcome = result
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("loading a FIFO returns at once");
        let msg = outcome.unwrap_err().to_string();
        assert!(
            msg.contains("not a regular file") && msg.contains("FIFO"),
            "{msg}"
        );
        std::fs::remove_file(&fifo).unwrap();
    }

    /// A key file someone else owns is refused: its owner could swap the key.
    #[test]
    fn a_key_file_owned_by_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: chown to another user needs root");
            return;
        }
        let path = write_file(format!("{PRIV}\n").as_bytes(), 0o600);
        let other = nix::unistd::Uid::from_raw(4242);
        nix::unistd::chown(&path, Some(other), None).unwrap();
        let msg = load_private_key_file(&path).unwrap_err().to_string();
        assert!(
            msg.contains("owned by uid 4242") && msg.contains("chown"),
            "{msg}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
