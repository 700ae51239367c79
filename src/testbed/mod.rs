//! Test tooling, compiled only for tests, benches and the demo (feature `testing`):
//!
//! - [`fixtures`]: sans-IO pairs of devices and of nodes on a simulated clock, for unit
//!   tests, `tests/` and `benches/`;
//! - throw-away network topologies on this machine, for the namespace tests in `tests/`
//!   and for `meshguard demo`.
//!
//! The topologies need root. The building blocks:
//! - [`Netns`]: a uniquely named network namespace with `lo` up; commands, daemons
//!   ([`ChildGuard`]) and closures ([`Netns::run`]) run inside it.
//! - [`Link`]: a veth pair between two namespaces; [`Lan`]: a switch namespace with a
//!   bridge that several namespaces attach to.
//! - [`WgPeer`]: a WireGuard implementation nobody here wrote (`wireguard-go`,
//!   `boringtun-cli`) running in a namespace, configured with `wg`.
//! - Traffic checks: [`ping`], [`tcp_transfer`], [`udp_roundtrip`], [`UdpEcho`].
//! - [`UdpRelay`]: a userspace relay between two tunnel endpoints that loses, duplicates,
//!   reorders and delays datagrams, and measures them (there is no `netem`).
//! - [`RoguePeer`]: a WireGuard endpoint the test runs from the protocol core, that
//!   sends crafted inner packets through real tunnels; [`InboundCounter`]: the packets a
//!   device handed to its namespace, counted by nftables; [`HandshakeFlood`]:
//!   initiations with valid macs from many keys and addresses, at a set rate.
//!
//! Rules every topology follows:
//! - Names (namespaces, interfaces, WireGuard sockets) come from [`unique_name`]: a tag,
//!   this process's pid and a process-wide counter, so tests running in parallel, in one
//!   process or several, never collide. Interface names stay within 15 bytes.
//! - Underlay addresses come from 198.18.0.0/15, overlay addresses from 10.0.0.0/8 or
//!   100.64.0.0/10, and they exist only inside namespaces made here. Nothing is ever
//!   sent from the root namespace.
//! - Every resource is removed on `Drop`, including while a test unwinds from a panic:
//!   processes are stopped by pid (SIGTERM, then SIGKILL) and reaped, namespaces deleted.
//!
//! Set `MESHGUARD_TESTBED_KEEP=1` to keep the temporary directories (daemon logs) for
//! inspection; set `MESHGUARD_REQUIRE_ROOT=1` to turn [`require_root`]'s skip into a panic.
//!
//! Errors are `std::io::Error`s whose message names the namespace, the command and its
//! output, so a failing test says what went wrong without a debugger.

#![forbid(unsafe_code)]

pub mod coalesce_probe;
pub mod fixtures;
mod flood;
mod inbound;
#[cfg(feature = "kubernetes")]
mod kube_api;
mod link;
mod mesh;
mod netns;
pub mod packet_probe;
pub mod policy_oracle;
mod process;
mod relay;
mod rogue;
mod traffic;
mod wg;

#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use flood::{FloodStats, HandshakeFlood};
pub use inbound::InboundCounter;
#[cfg(feature = "kubernetes")]
pub use kube_api::{rbac_of, Collection, KubeApiServer};
pub use link::{Lan, Link};
pub use mesh::{
    counter, write_config, IdentitySpec, KubeNodeSpec, MeshguardNode, NodeSpec, PeerEntry,
    ALLOW_ALL_POLICY,
};
pub use netns::{Netns, NETNS_DIR};
pub use process::{ChildGuard, DEFAULT_GRACE};
pub use relay::{DirectionStats, Impairment, UdpRelay};
pub use rogue::RoguePeer;
pub use traffic::{
    ping, ping_all, ping_stats, tcp_connect, tcp_transfer, tcp_transfer_patient, udp_roundtrip,
    PacedStream, PingStats, TransferReport, UdpEcho, TRANSFER_IDLE_TIMEOUT,
};
pub use wg::{find_program, genkey, pubkey, WgKind, WgPeer, WgPeerStats, WG_SOCKET_DIR};

/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Environment variable: keep temporary directories (logs, key files) after drop.
pub const KEEP_ENV: &str = "MESHGUARD_TESTBED_KEEP";

/// Environment variable: make [`require_root`] panic instead of skipping.
pub const REQUIRE_ROOT_ENV: &str = "MESHGUARD_REQUIRE_ROOT";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The pid in a name made by [`unique_name`] (`<tag>-<pid>-<n>`, hex), if it is one.
fn creator_of(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let (counter, pid, tag) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let tag_ok = !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric());
    (tag_ok && hex(counter)).then(|| u32::from_str_radix(pid, 16).ok())?
}

/// Removes what test processes that were killed (so their cleanup never ran) left
/// behind: namespaces and WireGuard sockets named by [`unique_name`] whose creating
/// process is gone. A namespace that still holds a process is left alone, and so is
/// anything named otherwise. Runs once per test process.
pub(crate) fn sweep_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| {
            creator_of(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        let names = |dir: &str| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        for name in names(netns::NETNS_DIR).into_iter().filter(|n| dead(n)) {
            let pids = run_checked(Command::new("ip").args(["netns", "pids", &name]));
            if pids.is_ok_and(|out| out.stdout.trim_ascii().is_empty()) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
        for file in names(WG_SOCKET_DIR) {
            let Some(name) = file.strip_suffix(".sock") else {
                continue;
            };
            let path = Path::new(WG_SOCKET_DIR).join(&file);
            if dead(name) && std::os::unix::net::UnixStream::connect(&path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
    });
}

/// A name unique across the tests running on this machine: `<tag>-<pid>-<n>` (pid and
/// counter in hex), at most [`MAX_IFNAME_LEN`] bytes, so it is valid as an interface name,
/// a namespace name and a WireGuard socket name.
///
/// The tag keeps only ASCII letters and digits and is shortened to fit; the dashes make
/// the name unambiguous, since tags never contain one.
///
/// A name whose namespace handle or WireGuard socket already exists (left behind by a
/// killed process that had the same pid) is skipped.
pub fn unique_name(tag: &str) -> String {
    let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let suffix = format!("-{:x}-{:x}", std::process::id(), n);
        let room = MAX_IFNAME_LEN.saturating_sub(suffix.len()).max(1);
        let mut name: String = tag.chars().take(room).collect();
        if name.is_empty() {
            name.push('t');
        }
        name.push_str(&suffix);
        let taken = Path::new(netns::NETNS_DIR).join(&name).exists()
            || Path::new(WG_SOCKET_DIR)
                .join(format!("{name}.sock"))
                .exists();
        if !taken {
            return name;
        }
    }
}

/// Polls `cond` every `interval` until it returns true (→ true) or `timeout` has passed
/// (→ false). `cond` is always called at least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, interval: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // `nix::unistd::geteuid` needs nix's "user" feature, which this crate does not enable.
    // "Uid:" lists real, effective, saved and filesystem uids.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// For tests: true when namespace tests can run here (root, `/dev/net/tun`, `ip`).
/// Otherwise prints why the test is skipped and returns false, or panics when
/// `MESHGUARD_REQUIRE_ROOT=1` is set (CI that must not skip silently).
///
/// ```ignore
/// if !meshguard::testbed::require_root() { return; }
/// ```
pub fn require_root() -> bool {
    let reason = if !is_root() {
        Some("not running as root")
    } else if !Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing")
    } else if find_program("ip").is_none() {
        Some("`ip` (iproute2) is not installed")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) => {
            if std::env::var_os(REQUIRE_ROOT_ENV).is_some_and(|v| v != "0") {
                panic!("namespace test cannot run: {reason} ({REQUIRE_ROOT_ENV} is set)");
            }
            eprintln!("skipping namespace test: {reason}");
            false
        }
    }
}

/// Parses `"198.18.0.1/24"` (or a bare address, meaning a host prefix) into the address
/// and the prefix length.
pub fn parse_cidr(s: &str) -> io::Result<(IpAddr, u8)> {
    let bad = |why: &str| invalid_input(format!("bad address {s:?}: {why}"));
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| bad("not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .map_err(|_| bad("bad prefix length"))?,
        None => max,
    };
    if len > max {
        return Err(bad("prefix length too long"));
    }
    Ok((ip, len))
}

/// `"10.1.2.3/24"` → `"10.1.2.0/24"`: the network in the form `ip route` accepts.
pub fn cidr_network(s: &str) -> io::Result<String> {
    let (ip, len) = parse_cidr(s)?;
    let net = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    };
    Ok(format!("{net}/{len}"))
}

pub(crate) fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Adds `context` in front of an error's message, keeping its kind.
pub(crate) fn context(err: io::Error, context: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// Runs `cmd` to completion; a non-zero exit becomes an error carrying the command line,
/// the status, stdout and stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| context(e, format_args!("cannot run {cmd:?}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_failed(cmd, &out))
    }
}

pub(crate) fn command_failed(cmd: &Command, out: &Output) -> io::Error {
    io::Error::other(format!(
        "{cmd:?} failed ({}); stdout: {:?}; stderr: {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim(),
    ))
}

/// A `Command` for `program` with `args`.
pub(crate) fn command<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// A directory under the system temp dir, removed (with its contents) on drop unless
/// `MESHGUARD_TESTBED_KEEP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> io::Result<TempDir> {
        let base = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("meshguard-{tag}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                // Left behind by an earlier process with the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(context(e, format_args!("create {}", path.display()))),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v != "0") {
            eprintln!("testbed: keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
