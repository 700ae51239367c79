//! What operators see of a running daemon: its report (`DaemonStatus`), and the forms it
//! takes: WireGuard's userspace API for `wg`, Prometheus metrics, and the text of
//! `meshguard status`. No I/O here; the daemon serves them.

pub mod metrics;
mod report;
pub mod status_text;
pub mod uapi;

pub use report::{DaemonStatus, KubernetesCounts, ReloadCounts};
