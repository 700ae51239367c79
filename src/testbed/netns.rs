//! Uniquely named network namespaces that delete themselves.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use super::process::{ChildGuard, ChildShared, DEFAULT_GRACE};
use super::{command, command_failed, context, run_checked, unique_name};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A network namespace named `<prefix>-<pid>-<n>` with `lo` up.
///
/// Dropping it stops the processes spawned through it that still run (by pid, SIGTERM
/// then SIGKILL) and deletes the namespace. Objects that work inside the namespace
/// ([`Link`](super::Link), [`WgPeer`](super::WgPeer)) keep it alive until they are
/// dropped too, so drop order does not matter.
#[derive(Debug)]
pub struct Netns {
    inner: Arc<NsInner>,
}

#[derive(Debug)]
pub(crate) struct NsInner {
    name: String,
    children: Mutex<Vec<Weak<ChildShared>>>,
}

impl NsInner {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`, checked.
    pub(crate) fn ip<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = command("ip", ["-n", &self.name]);
        cmd.args(args);
        run_checked(&mut cmd)
    }

    /// `ip netns exec NAME program args...`, not started yet.
    pub(crate) fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = command("ip", ["netns", "exec", &self.name]);
        cmd.arg(program).args(args);
        cmd
    }

    pub(crate) fn exec_ok<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_checked(&mut self.command(program, args))
    }
}

impl Drop for NsInner {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for child in children.iter().filter_map(Weak::upgrade) {
            if let Err(e) = child.terminate(DEFAULT_GRACE) {
                eprintln!("testbed: netns {}: cannot stop a child: {e}", self.name);
            }
        }
        // `ip netns del` can fail transiently (EBUSY on the bind mount); retry a little.
        let mut last = None;
        for _ in 0..5 {
            match run_checked(&mut command("ip", ["netns", "del", &self.name])) {
                Ok(_) => return,
                Err(e) if !Path::new(NETNS_DIR).join(&self.name).exists() => {
                    let _ = e;
                    return;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(e) = last {
            eprintln!("testbed: cannot delete netns {}: {e}", self.name);
        }
    }
}

impl Netns {
    /// Creates a namespace `<prefix>-<pid>-<n>` (prefix: letters and digits, shortened
    /// to fit 15 bytes) and sets `lo` up in it.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        super::sweep_leftovers();
        let mut last_err = None;
        for _ in 0..10 {
            let name = unique_name(prefix);
            let mut cmd = command("ip", ["netns", "add", &name]);
            let out = cmd
                .output()
                .map_err(|e| context(e, "cannot run `ip netns add`"))?;
            if out.status.success() {
                let ns = Netns {
                    inner: Arc::new(NsInner {
                        name,
                        children: Mutex::new(Vec::new()),
                    }),
                };
                ns.ip(["link", "set", "lo", "up"])?;
                return Ok(ns);
            }
            // "File exists": left behind by a dead process that had our pid; take the
            // next name. Otherwise (e.g. several first-time `ip netns add` racing to
            // set up the /run/netns mount) retry shortly.
            last_err = Some(command_failed(&cmd, &out));
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("ip netns add failed")))
    }

    pub(crate) fn inner(&self) -> &Arc<NsInner> {
        &self.inner
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `/var/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.inner.name)
    }

    /// A `Command` for `ip netns exec NAME program args...`, for callers that want to
    /// set more options before running it.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.command(program, args)
    }

    /// Runs `program args...` inside the namespace and returns its output, whatever the
    /// exit status.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program, args);
        cmd.output()
            .map_err(|e| context(e, format_args!("cannot run {cmd:?}")))
    }

    /// Like [`exec`](Self::exec), but a non-zero exit status is an error whose message
    /// holds the command, the status, stdout and stderr.
    pub fn exec_ok<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.exec_ok(program, args)
    }

    /// `ip -n NAME args...` (e.g. `["addr", "add", "198.18.0.1/24", "dev", "eth0"]`),
    /// checked like [`exec_ok`](Self::exec_ok).
    pub fn ip<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.ip(args)
    }

    /// Starts `cmd` inside the namespace (as `ip netns exec NAME <program> <args>`, keeping
    /// its environment changes and working directory). Stdin is null; stdout and stderr
    /// go to files, see [`ChildGuard`]. The process is stopped when the guard or the
    /// namespace is dropped, whichever comes first.
    ///
    /// The process enters the namespace shortly after this returns (`ip` does `setns`
    /// then `exec`): wait for the program's own sign of readiness (a socket, a file),
    /// not for the return of `spawn`.
    pub fn spawn(&self, cmd: &Command) -> io::Result<ChildGuard> {
        let program = cmd.get_program();
        let label = Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy()
            .into_owned();
        let mut wrapped = self.command(program, cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let guard = ChildGuard::spawn(wrapped, &label)?;
        let mut children = self
            .inner
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        children.retain(|c| c.strong_count() > 0);
        children.push(Arc::downgrade(guard.shared()));
        Ok(guard)
    }

    /// Runs `f` on a new thread that has joined this namespace (`setns(CLONE_NEWNET)`), and
    /// returns its result; a panic in `f` is resumed on the caller's thread. Sockets made
    /// in `f` belong to the namespace for their whole life and may be returned and used
    /// from any thread.
    ///
    /// Only the network namespace changes: the thread keeps the process's mount
    /// namespace, so `/proc/self/net` and `/sys/class/net` still show the root namespace
    /// (`/proc/thread-self/net` shows this one).
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let file =
            File::open(&path).map_err(|e| context(e, format_args!("open {}", path.display())))?;
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("ns-{}", self.name()))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        context(e.into(), format_args!("setns into {}", path.display()))
                    })?;
                    drop(file);
                    Ok(f())
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))?
            .map_err(|e| context(e, format_args!("netns {}: bind udp {addr}", self.name())))
    }

    /// A TCP listener bound to `addr` inside the namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run(|| TcpListener::bind(addr))?
            .map_err(|e| context(e, format_args!("netns {}: listen tcp {addr}", self.name())))
    }

    /// Sets a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`, by writing
    /// `/proc/sys/...` from a thread inside the namespace.
    pub fn sysctl_set(&self, key: &str, value: &str) -> io::Result<()> {
        let path = sysctl_path(key);
        self.run(|| std::fs::write(&path, value))?.map_err(|e| {
            context(
                e,
                format_args!("netns {}: write {}", self.name(), path.display()),
            )
        })
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> io::Result<String> {
        let path = sysctl_path(key);
        let value = self.run(|| std::fs::read_to_string(&path))?.map_err(|e| {
            context(
                e,
                format_args!("netns {}: read {}", self.name(), path.display()),
            )
        })?;
        Ok(value.trim().to_owned())
    }

    /// Pids of the processes inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let out = run_checked(&mut command("ip", ["netns", "pids", self.name()]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}
