//! systemd's notification protocol (`Type=notify`): READY=1 once the device, its routes
//! and the sockets are up, STOPPING=1 on the way out, and watchdog pings while the
//! control task (which takes the node's lock for every ping) and the workers run.
//! Without `NOTIFY_SOCKET` all of it does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

pub(super) fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(super) fn stopping() {
    notify(&[NotifyState::Stopping]);
}

pub(super) fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half its timeout, if systemd set one.
pub(super) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "systemd notification failed");
    }
}
