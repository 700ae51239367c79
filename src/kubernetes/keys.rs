//! The node's keys in Kubernetes mode: one X25519 key per service account, made on the
//! node the first time one of its pods is seen there, and kept in a state directory
//! (a hostPath in the DaemonSet) so a restarted daemon keeps its identities' keys. A key
//! never leaves the node: only its public key is published.
//!
//! Rotation: once a key is `lifetime` old, a next key is made beside it
//! (`NAME.key.next`); both are answered and published. Once this node's `MeshNode`, as
//! the API gives it back, lists the next key, a marker (`NAME.key.next.published`)
//! records when; `overlap` after that the next key is renamed over the key, and the old
//! key is gone. The files' modification times are the keys' ages and the publication
//! time, so a restarted daemon goes on where it was.

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

/// A step of a key's rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// A next key was made; it becomes the key once it has been published for the
    /// overlap.
    Started,
    /// The next key became the key; the old one is deleted.
    Finished,
}

/// What `KeyStore::rotate` did, and when it is to be asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub step: Option<RotationStep>,
    /// When the next step is due; `None`: never by time alone (no rotation, or the next
    /// key waits to be seen published, which a change of the cluster's objects reports).
    pub due: Option<SystemTime>,
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
        let next = self.next_key(principal)?;
        Ok(AccountKeys { current, next })
    }

    /// The next key of `principal`'s account, if it is rotating.
    pub fn next_key(&self, principal: &Principal) -> io::Result<Option<PrivateKey>> {
        let next_path = self.next_path(principal);
        match next_path.exists() {
            true => read_key(&next_path).map(Some),
            false => Ok(None),
        }
    }

    /// Takes the rotation of `principal`'s key one step if one is due at `now`: starts it
    /// (a next key) once the key is `rotation.lifetime` old; notes when the next key is
    /// first `next_published` (this node's `MeshNode` lists it); finishes it (the next
    /// key becomes the key) `rotation.overlap` after that. A next key that does not read
    /// is replaced by a new one.
    pub fn rotate(
        &self,
        principal: &Principal,
        rotation: &KeyRotation,
        now: SystemTime,
        next_published: bool,
    ) -> io::Result<Rotation> {
        let path = self.path(principal);
        let next_path = self.next_path(principal);
        let marker = with_suffix(&next_path, ".published");
        let waiting = |due| Ok(Rotation { step: None, due });
        if next_path.exists() && read_key(&next_path).is_err() {
            tracing::warn!(
                principal = %principal,
                file = %next_path.display(),
                "the next key does not read: the rotation starts again with a new one"
            );
            let _ = std::fs::remove_file(&marker);
            std::fs::remove_file(&next_path)?;
        }
        if next_path.exists() {
            if !marker.exists() {
                if !next_published {
                    return waiting(None);
                }
                make_marker(&marker, now)?;
            }
            let due = std::fs::metadata(&marker)?
                .modified()?
                .checked_add(rotation.overlap);
            if due.is_some_and(|due| now < due) {
                return waiting(due);
            }
            let made = std::fs::metadata(&next_path)?.modified()?;
            std::fs::rename(&next_path, &path)?;
            std::fs::remove_file(&marker)?;
            return Ok(Rotation {
                step: Some(RotationStep::Finished),
                due: rotation.lifetime.and_then(|l| made.checked_add(l)),
            });
        }
        let _ = std::fs::remove_file(&marker);
        if !path.exists() {
            make_key(&path, now)?;
        }
        // A lifetime too long to add to a time never ends.
        let Some(due) = rotation.lifetime.and_then(|l| {
            std::fs::metadata(&path)
                .ok()?
                .modified()
                .ok()?
                .checked_add(l)
        }) else {
            return waiting(None);
        };
        if now < due {
            return waiting(Some(due));
        }
        make_key(&next_path, now)?;
        Ok(Rotation {
            step: Some(RotationStep::Started),
            due: None,
        })
    }
}

/// Records the time a next key was first seen published.
fn make_marker(path: &Path, now: SystemTime) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_modified(now)?;
    file.sync_all()
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
