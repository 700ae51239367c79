//! The userspace API sockets: `<directory>/<name>.sock` for each local identity, served
//! as wireguard-go serves its own (see `ops::uapi` for the protocol). The socket set
//! follows the identities across reloads. A socket left behind by a daemon that died is
//! replaced; one a live process answers on is left alone and reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::control::Control;
use super::unix_socket::bind;
use crate::ops::uapi::{self, Operation, SetRequest, EMSGSIZE, EPROTO};

/// Connections served at once over all sockets; more wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take over one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct UapiSockets {
    directory: PathBuf,
    private_key: bool,
    control: Control,
    connections: std::sync::Arc<Semaphore>,
    /// Each socket's name with the task accepting on it.
    serving: HashMap<String, JoinHandle<()>>,
}

impl UapiSockets {
    pub(super) fn new(directory: PathBuf, private_key: bool, control: Control) -> UapiSockets {
        UapiSockets {
            directory,
            private_key,
            control,
            connections: std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            serving: HashMap::new(),
        }
    }

    /// Serves exactly the sockets `names` (`None`s skipped): new ones are made, gone
    /// ones closed and removed. A socket that cannot be made is logged and left out.
    pub(super) fn sync(&mut self, names: &[Option<String>]) {
        let wanted: Vec<&String> = names.iter().flatten().collect();
        self.serving.retain(|name, task| {
            let keep = wanted.contains(&name);
            if !keep {
                task.abort();
                let _ = std::fs::remove_file(socket_path(&self.directory, name));
            }
            keep
        });
        for name in wanted {
            if self.serving.contains_key(name) {
                continue;
            }
            let path = socket_path(&self.directory, name);
            match bind(&self.directory, &path) {
                Ok(listener) => {
                    tracing::info!(socket = %path.display(), "userspace API (wg) socket ready");
                    let task = tokio::spawn(accept_loop(
                        listener,
                        name.clone(),
                        self.private_key,
                        self.control.clone(),
                        std::sync::Arc::clone(&self.connections),
                    ));
                    self.serving.insert(name.clone(), task);
                }
                Err(error) => tracing::error!(
                    socket = %path.display(),
                    %error,
                    "userspace API socket not served; `wg` cannot see this identity"
                ),
            }
        }
    }

    /// Closes and removes every socket.
    pub(super) fn close(&mut self) {
        self.sync(&[]);
    }
}

impl Drop for UapiSockets {
    fn drop(&mut self) {
        self.close();
    }
}

fn socket_path(directory: &Path, name: &str) -> PathBuf {
    directory.join(format!("{name}.sock"))
}

async fn accept_loop(
    listener: UnixListener,
    name: String,
    private_key: bool,
    control: Control,
    connections: std::sync::Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = std::sync::Arc::clone(&connections).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "userspace API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (name, control) = (name.clone(), control.clone());
        tokio::spawn(async move {
            serve(stream, &name, private_key, &control).await;
            drop(permit);
        });
    }
}

/// What ended reading a line.
enum LineError {
    /// The connection closed, failed or timed out.
    Gone,
    /// Longer than `MAX_LINE`.
    TooLong,
}

/// One line without its newline, at most `MAX_LINE` bytes.
async fn read_line(
    reader: &mut BufReader<tokio::net::unix::ReadHalf<'_>>,
    line: &mut Vec<u8>,
) -> Result<(), LineError> {
    line.clear();
    let mut limited = reader.take(uapi::MAX_LINE as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', line)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Err(LineError::Gone),
        Ok(Ok(_)) if line.last() == Some(&b'\n') => {
            line.pop();
            Ok(())
        }
        // No newline within the limit: too long, or cut off by the client's close.
        Ok(Ok(n)) if n > uapi::MAX_LINE => Err(LineError::TooLong),
        Ok(Ok(_)) => Err(LineError::Gone),
    }
}

/// Serves requests on one connection until it closes or sends something that is not a
/// request, which is answered with an `errno` and ends the connection.
async fn serve(mut stream: UnixStream, name: &str, private_key: bool, control: &Control) {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        let answer = match read_line(&mut reader, &mut line).await {
            Err(LineError::Gone) => return,
            Err(LineError::TooLong) => errno(EMSGSIZE),
            Ok(()) => match Operation::parse(&line) {
                Err(code) => errno(code),
                Ok(Operation::Get) => match read_line(&mut reader, &mut line).await {
                    Ok(()) if line.is_empty() => get(name, private_key, control).await,
                    Ok(()) => errno(uapi::EINVAL),
                    Err(LineError::TooLong) => errno(EMSGSIZE),
                    Err(LineError::Gone) => return,
                },
                Ok(Operation::Set) => {
                    let mut request = SetRequest::default();
                    loop {
                        match read_line(&mut reader, &mut line).await {
                            Ok(()) if request.line(&line) => continue,
                            Ok(()) => break errno(request.errno()),
                            Err(LineError::TooLong) => break errno(EMSGSIZE),
                            Err(LineError::Gone) => return,
                        }
                    }
                }
            },
        };
        let fatal = answer.fatal;
        if write.write_all(answer.text.as_bytes()).await.is_err() || fatal {
            return;
        }
    }
}

struct Answer {
    text: zeroize::Zeroizing<String>,
    /// The connection ends after it: the request could not be read to its end.
    fatal: bool,
}

fn errno(code: i32) -> Answer {
    Answer {
        text: zeroize::Zeroizing::new(format!("errno={code}\n\n")),
        fatal: code == EPROTO || code == EMSGSIZE,
    }
}

async fn get(name: &str, private_key: bool, control: &Control) -> Answer {
    let Some(snapshot) = control.snapshot(private_key).await else {
        return errno(uapi::EIO);
    };
    let Some(identity) = snapshot.status.identity_of_uapi_name(name) else {
        // The identity went in a reload a moment ago.
        return errno(uapi::ENODEV);
    };
    let key = snapshot.private_keys.get(identity);
    Answer {
        text: uapi::get_response(&snapshot.status, identity, key),
        fatal: false,
    }
}
