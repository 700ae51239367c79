//! How the operator-facing servers (userspace API, metrics, control socket) read the
//! running daemon: they ask the control task, which owns the reload state and the
//! plaintext filter, and it answers with a [`Snapshot`] made under one short hold of the
//! node's lock. Nothing on the data path changes for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::identity::PrivateKey;
use crate::io::plaintext_filter;
use crate::ops::DaemonStatus;

/// What the control task answers with.
pub(super) struct Snapshot {
    pub(super) status: DaemonStatus,
    /// Each local identity's current private key, in `status.node.identities` order;
    /// empty unless asked for.
    pub(super) private_keys: Vec<PrivateKey>,
}

/// A request to the control task.
pub(super) struct Request {
    pub(super) private_keys: bool,
    pub(super) reply: oneshot::Sender<Snapshot>,
}

/// A handle on the running daemon, for the servers.
#[derive(Clone)]
pub(super) struct Control {
    requests: mpsc::Sender<Request>,
    /// The device, its routes and the sockets are up and the workers run.
    ready: Arc<AtomicBool>,
    /// The STRICT filter's table, whose counter is read outside the control task (there
    /// is none while no identity is STRICT).
    filter_table: Arc<str>,
}

/// Requests waiting for the control task; more wait in the servers' tasks.
const QUEUED_REQUESTS: usize = 16;

impl Control {
    pub(super) fn new(filter_table: &str) -> (Control, mpsc::Receiver<Request>) {
        let (requests, receiver) = mpsc::channel(QUEUED_REQUESTS);
        let control = Control {
            requests,
            ready: Arc::new(AtomicBool::new(false)),
            filter_table: Arc::from(filter_table),
        };
        (control, receiver)
    }

    /// The daemon's report, or `None` if the daemon is stopping.
    pub(super) async fn snapshot(&self, private_keys: bool) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                private_keys,
                reply,
            })
            .await
            .ok()?;
        let mut snapshot = answer.await.ok()?;
        // `nft` is a process: run it off the runtime's threads.
        let table = Arc::clone(&self.filter_table);
        snapshot.status.plaintext_dropped =
            tokio::task::spawn_blocking(move || plaintext_filter::read_dropped(&table))
                .await
                .ok()
                .flatten();
        Some(snapshot)
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}
