//! Unix sockets for the daemon's operators: made for the daemon's user alone, and taken
//! over from a daemon that died without removing them.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::stat::{umask, Mode};
use tokio::net::UnixListener;

/// Binds `path` in `directory` (made 0755 if missing), readable and writable by the
/// daemon's user alone. A stale socket (nobody accepts on it) is replaced; a live one is
/// an error.
pub(super) fn bind(directory: &Path, path: &Path) -> io::Result<UnixListener> {
    if !directory.exists() {
        std::fs::create_dir_all(directory)?;
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))?;
    }
    // The socket is made without access for group and others (as wireguard-go makes its
    // own), and its mode set again after: no moment in which another user could connect.
    let previous = umask(Mode::from_bits_truncate(0o077));
    let bound = bind_or_replace(path);
    umask(previous);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn bind_or_replace(path: &Path) -> io::Result<UnixListener> {
    Ok(match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process serves this socket",
                ));
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)?
        }
        Err(e) => return Err(e),
    })
}
