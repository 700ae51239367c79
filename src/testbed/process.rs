//! Processes started by the testbed: stopped by pid and reaped on drop, output in files.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{context, TempDir};

/// How long a process gets between SIGTERM and SIGKILL when it is dropped.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

const POLL: Duration = Duration::from_millis(10);

/// The child itself, shared with the namespace that started it so the namespace can stop
/// it if the guard outlives the namespace.
#[derive(Debug)]
pub(crate) struct ChildShared {
    pid: u32,
    child: Mutex<Child>,
}

impl ChildShared {
    fn lock(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.lock().try_wait()
    }

    pub(crate) fn wait_timeout(&self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` unless the child has already been reaped. The lock is held from the
    /// check to the signal and only this type reaps, so the pid cannot have been reused.
    pub(crate) fn signal(&self, signal: Signal) -> io::Result<bool> {
        let mut child = self.lock();
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        match kill(Pid::from_raw(self.pid as i32), signal) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ESRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
    pub(crate) fn terminate(&self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let mut child = self.lock();
        // `Child::kill` does nothing harmful if the child exited meanwhile: it is not
        // reaped yet, so the pid is still ours.
        let _ = child.kill();
        child.wait()
    }
}

/// A process started by [`Netns::spawn`](super::Netns::spawn). On drop it is sent SIGTERM,
/// then SIGKILL after a grace period, and reaped. Its stdout and stderr go to files in a
/// temporary directory, readable while it runs and after it ends.
#[derive(Debug)]
pub struct ChildGuard {
    shared: Arc<ChildShared>,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    grace: Duration,
    // Last field: dropped after the process is stopped.
    _logs: TempDir,
}

impl ChildGuard {
    /// Starts `cmd` (already wrapped in `ip netns exec`); `label` names the log files.
    pub(crate) fn spawn(mut cmd: Command, label: &str) -> io::Result<ChildGuard> {
        let logs = TempDir::new("proc")?;
        let stdout_path = logs.path().join(format!("{label}.stdout"));
        let stderr_path = logs.path().join(format!("{label}.stderr"));
        let stdout = File::create(&stdout_path)?;
        let stderr = File::create(&stderr_path)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let child = cmd
            .spawn()
            .map_err(|e| context(e, format_args!("cannot spawn {cmd:?}")))?;
        Ok(ChildGuard {
            shared: Arc::new(ChildShared {
                pid: child.id(),
                child: Mutex::new(child),
            }),
            label: label.to_owned(),
            stdout_path,
            stderr_path,
            grace: DEFAULT_GRACE,
            _logs: logs,
        })
    }

    pub(crate) fn shared(&self) -> &Arc<ChildShared> {
        &self.shared
    }

    /// The process id (of the program itself: `ip netns exec` execs it, no fork).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The name given to the log files: the program's file name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sets how long drop waits between SIGTERM and SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The exit status if the process has ended (it is then reaped).
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.shared.try_wait()
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        matches!(self.shared.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_timeout(&self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        self.shared.wait_timeout(timeout)
    }

    /// Sends `signal` to the process; false if it had already ended.
    pub fn signal(&self, signal: Signal) -> io::Result<bool> {
        self.shared.signal(signal)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the status and everything the
    /// process wrote.
    pub fn terminate_and_wait(&self, grace: Duration) -> io::Result<Output> {
        let status = self.shared.terminate(grace)?;
        Ok(Output {
            status,
            stdout: std::fs::read(&self.stdout_path)?,
            stderr: std::fs::read(&self.stderr_path)?,
        })
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// What the process has written to stdout so far (lossy UTF-8).
    pub fn read_stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// What the process has written to stderr so far (lossy UTF-8).
    pub fn read_stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.shared.terminate(self.grace) {
            eprintln!(
                "testbed: cannot stop {} (pid {}): {e}",
                self.label, self.shared.pid
            );
        }
    }
}
