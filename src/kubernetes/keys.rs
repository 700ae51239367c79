//! The node's keys in Kubernetes mode: one X25519 key per service account, made on the
//! node the first time one of its pods is seen there, and kept in a state directory
//! (a hostPath in the DaemonSet) so a restarted daemon keeps its identities' keys. A key
//! never leaves the node: only its public key is published.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::identity::{load_private_key_file, Principal, PrivateKey};

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

    /// The key of `principal`'s service account: read if it is there (with the checks of
    /// every key file), made and stored (0600, written whole, then renamed into place)
    /// if not.
    pub fn key(&self, principal: &Principal) -> io::Result<PrivateKey> {
        let path = self.path(principal);
        if path.exists() {
            return load_private_key_file(&path).map_err(|e| io::Error::other(e.to_string()));
        }
        let key = PrivateKey::generate();
        let encoded = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
        let partial = path.with_extension("key.partial");
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(encoded.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
        Ok(key)
    }
}
