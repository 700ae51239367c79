//! The control socket (`<admin.socket_dir>/<interface>.sock`) that `meshguard status`
//! reads: a client sends `status` and a newline, and gets the daemon's report as one
//! JSON document, then the connection closes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::control::Control;
use super::unix_socket::bind;

/// The request, whole.
pub(crate) const STATUS_REQUEST: &[u8] = b"status\n";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the control socket at `path` until the daemon ends; removes it when dropped.
pub(super) struct StatusSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl StatusSocket {
    pub(super) fn start(directory: &Path, interface: &str, control: Control) -> Result<Self> {
        let path = directory.join(format!("{interface}.sock"));
        let listener = bind(directory, &path)
            .with_context(|| format!("making the control socket {}", path.display()))?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let control = control.clone();
                tokio::spawn(async move { serve(stream, &control).await });
            }
        });
        Ok(StatusSocket { path, task })
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(mut stream: UnixStream, control: &Control) {
    let mut request = [0u8; STATUS_REQUEST.len()];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut request)).await;
    if !matches!(read, Ok(Ok(_))) || request != STATUS_REQUEST {
        let _ = stream
            .write_all(b"{\"error\":\"send `status` and a newline\"}\n")
            .await;
        return;
    }
    let Some(snapshot) = control.snapshot(false).await else {
        return;
    };
    if let Ok(mut json) = serde_json::to_vec(&snapshot.status) {
        json.push(b'\n');
        let _ = stream.write_all(&json).await;
    }
}

/// Asks the daemon behind the control socket at `path` for its report.
pub(crate) fn fetch(path: &Path) -> Result<crate::ops::DaemonStatus> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is meshguard running, and are you its user?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.write_all(STATUS_REQUEST)?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading from {}", path.display()))?;
    serde_json::from_slice(&answer)
        .with_context(|| format!("the answer from {} is not a status report", path.display()))
}
