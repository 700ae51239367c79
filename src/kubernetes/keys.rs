//! The node's keys in Kubernetes mode: one X25519 key per service account, made on the
//! node the first time one of its pods is seen there, and kept in a state directory
//! (a hostPath in the DaemonSet) so a restarted daemon keeps its identities' keys. A key
//! never leaves the node: only its public key is published.
//!
//! Rotation: once a key is `lifetime` old, a next key is made beside it
//! (`NAME.key.next`); both are published and answered. Once the next key is `overlap`
//! old it is renamed over the key, and the old key is gone. The files' modification
//! times are the keys' ages, so a restarted daemon goes on where it was.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::KeyRotation;
use crate::identity::{load_private_key_file, Principal, PrivateKey};

/// A service account's keys: the one in use and, while it rotates, the next one.
pub struct AccountKeys {
    pub current: PrivateKey,
    pub next: Option<PrivateKey>,
}

/// What `KeyStore::rotate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Nothing is due; the next step is due at this time (`None`: never).
    Waiting(Option<SystemTime>),
    /// A next key was made; it becomes the key after the overlap.
    Started,
    /// The next key became the key; the old one is deleted.
    Finished,
}

/// The state directory's keys.
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// Opens `dir`, making it (mode 0700) if it is missing. An existing directory that
    /// the group or others may enter is refused: the keys in it would not be private.
    pub fn open(dir: &Path) -> io::Result<KeyStore> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: mode {:o} lets others in; the key directory must be 0700",
                    dir.display(),
                    mode & 0o777
                ),
            ));
        }
        Ok(KeyStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the key of `principal`'s service account is: `NAMESPACE_SERVICEACCOUNT.key`
    /// (neither name may contain `_`, so no two accounts share a file).
    pub fn path(&self, principal: &Principal) -> PathBuf {
        self.dir.join(format!(
            "{}_{}.key",
            principal.namespace(),
            principal.service_account()
        ))
    }

    /// Where the next key of `principal`'s service account is while it rotates:
    /// `NAMESPACE_SERVICEACCOUNT.key.next` (a name no account's key has, as account names
    /// may contain dots).
    pub fn next_path(&self, principal: &Principal) -> PathBuf {
        with_suffix(&self.path(principal), ".next")
    }

    /// The key of `principal`'s service account: read if it is there (with the checks of
    /// every key file), made and stored if not.
    pub fn key(&self, principal: &Principal) -> io::Result<PrivateKey> {
        let path = self.path(principal);
        if path.exists() {
            return read_key(&path);
        }
        make_key(&path, SystemTime::now())
    }

    /// The keys of `principal`'s service account (the key made if there is none).
    pub fn keys(&self, principal: &Principal) -> io::Result<AccountKeys> {
        let current = self.key(principal)?;
        let next_path = self.next_path(principal);
        let next = match next_path.exists() {
            true => Some(read_key(&next_path)?),
            false => None,
        };
        Ok(AccountKeys { current, next })
    }

    /// Takes the rotation of `principal`'s key one step if one is due at `now`: starts it
    /// (a next key) once the key is `rotation.lifetime` old, finishes it (the next key
    /// becomes the key) once the next key is `rotation.overlap` old.
    pub fn rotate(
        &self,
        principal: &Principal,
        rotation: &KeyRotation,
        now: SystemTime,
    ) -> io::Result<RotationStep> {
        let path = self.path(principal);
        let next_path = self.next_path(principal);
        if next_path.exists() {
            let due = std::fs::metadata(&next_path)?.modified()? + rotation.overlap;
            if now < due {
                return Ok(RotationStep::Waiting(Some(due)));
            }
            read_key(&next_path)?;
            std::fs::rename(&next_path, &path)?;
            return Ok(RotationStep::Finished);
        }
        let Some(lifetime) = rotation.lifetime else {
            return Ok(RotationStep::Waiting(None));
        };
        if !path.exists() {
            make_key(&path, now)?;
        }
        let due = std::fs::metadata(&path)?.modified()? + lifetime;
        if now < due {
            return Ok(RotationStep::Waiting(Some(due)));
        }
        make_key(&next_path, now)?;
        Ok(RotationStep::Started)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn read_key(path: &Path) -> io::Result<PrivateKey> {
    load_private_key_file(path).map_err(|e| io::Error::other(e.to_string()))
}

/// Makes a key and stores it at `path`: 0600, written whole, then renamed into place;
/// its modification time (the key's age) is `made`.
fn make_key(path: &Path, made: SystemTime) -> io::Result<PrivateKey> {
    let key = PrivateKey::generate();
    let encoded = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
    let partial = with_suffix(path, ".partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(encoded.as_bytes())?;
    file.set_modified(made)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    Ok(key)
}
