#!/usr/bin/env python3
"""Throughput benchmark: meshguard next to boringtun, wireguard-go and plain veth.

Every system gets a fresh pair of network namespaces joined by one veth pair
(underlay 198.18.10.1/24 <-> 198.18.10.2/24, MTU 1500). The tunnel systems put a
tunnel with MTU 1420 on top (overlay 10.77.0.1 <-> 10.77.0.2); `veth` runs iperf3
straight over the underlay and is the ceiling. iperf3's server runs in the second
namespace, its client in the first.

Tests (each repeated --runs times, median reported):
  tcp      one TCP stream; the daemons' CPU time is sampled during these runs
  tcp4     four parallel TCP streams (-P 4)
  reverse  one TCP stream, server to client (-R)
  udp      UDP at full speed (-b 0) with 1300-byte datagrams: rate received and loss

Usage (as root, from anywhere):
  scripts/bench.sh [--duration S] [--runs N] [--systems veth,meshguard,...]
                   [--tests tcp,tcp4,reverse,udp] [--out DIR] [--no-build]
                   [--workers N] [--queue-length N]   (meshguard's [interface] keys)

Results go to results/<UTC timestamp>/ (or --out): table.md, summary.json, chart.png
and the raw iperf3 JSON of every run. Everything the script creates (namespaces,
processes, temporary files, UAPI sockets of its own interfaces) is removed on exit,
also on Ctrl-C, SIGTERM and errors. Only processes it started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent

ALL_SYSTEMS = ("veth", "meshguard", "boringtun", "boringtun-1t", "wireguard-go")
PEER_SYSTEMS = ("boringtun", "boringtun-1t", "wireguard-go")
ALL_TESTS = ("tcp", "tcp4", "reverse", "udp")
TEST_ARGS = {
    "tcp": [],
    "tcp4": ["-P", "4"],
    "reverse": ["-R"],
    "udp": ["-u", "-b", "0", "-l", "1300"],
}
# The test during which the daemons' CPU time is measured.
CPU_TEST = "tcp"

UNDERLAY = ("198.18.10.1", "198.18.10.2")
UNDERLAY_PREFIX = 24
OVERLAY = ("10.77.0.1", "10.77.0.2")
VETH_MTU = 1500
TUNNEL_MTU = 1420
TUNNEL_PORT = 51820
IPERF_PORT = 5201
PRINCIPALS = ("cluster.local/ns/bench/sa/one", "cluster.local/ns/bench/sa/two")
POLICY_TOML = """\
[[policy]]
name = "allow-all"
namespace = "istio-system"
action = "ALLOW"
[[policy.rules]]
"""
WG_SOCKET_DIR = Path("/var/run/wireguard")
# Where matplotlib goes when pip may not install into the running interpreter.
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
MATPLOTLIB_DIR = Path.home() / ".cache" / "meshguard-bench" / f"python{PYTHON_VERSION}"
# Environment variables that would change what boringtun-cli does if inherited.
BORINGTUN_ENV = ("WG_TUN_FD", "WG_UAPI_FD", "WG_THREADS", "WG_LOG_FILE", "WG_LOG_LEVEL", "WG_SUDO")

START_TIMEOUT = 20.0  # seconds for a daemon to come up
PING_TIMEOUT = 20.0  # seconds for the first ping through a tunnel
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
PAUSE_BETWEEN_RUNS = 0.5
CLIENT_SLACK = 30.0  # seconds an iperf3 client may take beyond --duration

# Table columns: key, heading, whether a larger value is better.
METRICS = (
    ("tcp", "TCP 1 stream", True),
    ("tcp4", "TCP 4 streams", True),
    ("reverse", "TCP reverse", True),
    ("udp", "UDP received", True),
    ("cpu", "Daemon CPU", False),
    ("cpu_per_gbit", "CPU-s per Gbit", False),
)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop, clean up, exit."""


class BenchError(Exception):
    """A system could not be set up or measured; the others still run."""


# ---------------------------------------------------------------------------- data


@dataclass
class Run:
    """One iperf3 run."""

    gbps: float  # received, Gbit/s
    seconds: float  # test duration as iperf3 measured it
    json_file: str
    loss_pct: float | None = None  # UDP only
    cpu: float | None = None  # daemon CPU-seconds per second, all daemons summed
    cpu_per_gbit: float | None = None
    # UDP only: datagrams iperf3 sent, and where the kernel dropped datagrams on the way.
    datagrams_sent: int | None = None
    drops: dict[str, int] | None = None


@dataclass
class SystemResult:
    name: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Testbed:
    """Where iperf3 runs for one system, and which daemon processes to watch."""

    client_ns: str
    server_ns: str
    server_addr: str
    daemons: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


@dataclass
class Options:
    duration: int
    runs: int
    systems: list[str]
    tests: list[str]
    out: Path
    build: bool
    interface: dict[str, int] = field(default_factory=dict)  # extra [interface] keys


# ---------------------------------------------------------------------- utilities


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_cmd(argv: list[str], *, input_text: str | None = None, timeout: float = 30.0) -> str:
    """Runs a command to completion; returns stdout, raises BenchError on failure."""
    try:
        done = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BenchError(f"`{' '.join(argv)}`: {err}") from err
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise BenchError(f"`{' '.join(argv)}` failed ({done.returncode}): {detail}")
    return done.stdout


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """argv run inside namespace ns (`ip netns exec` execs, so the PID stays the same)."""
    return ["ip", "netns", "exec", ns, *argv]


def find_program(name: str) -> str | None:
    """PATH first, then where `cargo install` puts things."""
    found = shutil.which(name)
    if found:
        return found
    for base in (os.environ.get("CARGO_HOME"), str(Path.home() / ".cargo")):
        if base and os.access(Path(base) / "bin" / name, os.X_OK):
            return str(Path(base) / "bin" / name)
    return None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty log)"


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE; only this PID."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------- resources


@contextmanager
def signals_deferred():
    """Holds SIGINT/SIGTERM/SIGHUP back (they arrive afterwards), so that creating a
    resource and registering its removal, or a cleanup, is never cut in half."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def unblock_signals_in_child() -> None:
    """preexec_fn: a child must not inherit the mask of signals_deferred()."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Resources:
    """Everything one testbed made; close() undoes it in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __enter__(self) -> "Resources":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_close(self, what: str, action: Callable[[], None]) -> None:
        self._undo.append((what, action))

    def add_netns(self, name: str) -> str:
        with signals_deferred():
            run_cmd(["ip", "netns", "add", name])
            self.on_close(f"namespace {name}", lambda: run_cmd(["ip", "netns", "del", name]))
        return name

    def make_tempdir(self, prefix: str) -> Path:
        with signals_deferred():
            path = Path(tempfile.mkdtemp(prefix=prefix))
            self.on_close(f"directory {path}", lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def own_socket(self, iface: str) -> None:
        """Removes /var/run/wireguard/<iface>.sock on close, if its process left it."""
        path = WG_SOCKET_DIR / f"{iface}.sock"
        if path.exists():
            raise BenchError(f"{path} already exists: interface name {iface} is in use")
        self.on_close(f"socket {path}", lambda: path.unlink(missing_ok=True))

    def spawn(
        self, ns: str, argv: list[str], logfile: Path, env: dict | None = None
    ) -> subprocess.Popen:
        """Starts argv in ns, output to logfile; stopped by PID on close."""
        with open(logfile, "wb") as out, signals_deferred():
            proc = subprocess.Popen(
                in_ns(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
                preexec_fn=unblock_signals_in_child,
            )
            self.on_close(f"process {proc.pid} ({Path(argv[0]).name})", lambda: stop_process(proc))
        return proc

    def close(self) -> None:
        with signals_deferred():
            while self._undo:
                what, action = self._undo.pop()
                try:
                    action()
                except Exception as err:  # keep cleaning up the rest
                    log(f"cleanup: could not remove {what}: {err}")


# ------------------------------------------------------------------------ underlay


def create_underlay(res: Resources, system: str, index: int) -> tuple[str, str]:
    """Two fresh namespaces joined by a veth pair with the underlay addresses."""
    pid = os.getpid()
    namespaces = tuple(res.add_netns(f"mgbench-{pid}-{system}-{side}") for side in "ab")
    veths = tuple(f"mgb{pid % 100000}v{index}{side}" for side in "ab")
    run_cmd(
        f"ip link add {veths[0]} netns {namespaces[0]} type veth"
        f" peer name {veths[1]} netns {namespaces[1]}".split()
    )
    for ns, veth, addr in zip(namespaces, veths, UNDERLAY):
        run_cmd(["ip", "-n", ns, "addr", "add", f"{addr}/{UNDERLAY_PREFIX}", "dev", veth])
        run_cmd(["ip", "-n", ns, "link", "set", veth, "mtu", str(VETH_MTU), "up"])
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
    return namespaces


def wait_for_ping(ns: str, addr: str, testbed: Testbed) -> None:
    """Pings addr from ns until one answer comes back (the first triggers the handshake)."""

    def answered() -> bool:
        for proc, logfile in zip(testbed.daemons, testbed.logs):
            if proc.poll() is not None:
                raise BenchError(f"daemon exited ({proc.returncode}):\n{log_tail(logfile)}")
        ping = subprocess.run(in_ns(ns, ["ping", "-c", "1", "-W", "1", addr]), capture_output=True)
        return ping.returncode == 0

    if not wait_until(answered, PING_TIMEOUT, interval=0.2):
        tails = "\n".join(f"  {p}:\n{log_tail(p)}" for p in testbed.logs)
        raise BenchError(f"no ping answer from {addr} within {PING_TIMEOUT:.0f} s\n{tails}")


# ----------------------------------------------------------------------- meshguard


def meshguard_node_toml(
    side: int, iface: str, with_policy: bool, interface: dict[str, int]
) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in interface.items())
    text = f"""\
name = "bench-{'ab'[side]}"
listen = "{UNDERLAY[side]}:{TUNNEL_PORT}"
peers_dir = "peers"

[interface]
name = "{iface}"
mtu = {TUNNEL_MTU}
addresses = ["{OVERLAY[side]}/32"]
{extra}
[[identity]]
principal = "{PRINCIPALS[side]}"
private_key_file = "key"
addresses = ["{OVERLAY[side]}/32"]
"""
    if with_policy:
        text += '\n[policy]\nfiles = ["policy.toml"]\n'
    return text


def meshguard_peer_toml(side: int, public_key: str) -> str:
    other = 1 - side
    return f"""\
name = "bench-{'ab'[other]}"
endpoint = "{UNDERLAY[other]}:{TUNNEL_PORT}"

[[identity]]
principal = "{PRINCIPALS[other]}"
public_key = "{public_key}"
allowed_ips = ["{OVERLAY[other]}/32"]
"""


def write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def write_meshguard_configs(binary: str, workdir: Path) -> list[Path]:
    """Keys, peer files and policy file for both nodes; returns the node directories."""
    dirs = [workdir / f"node-{side}" for side in "ab"]
    public_keys = []
    for node_dir in dirs:
        (node_dir / "peers").mkdir(parents=True)
        private = run_cmd([binary, "genkey"]).strip()
        write_secret(node_dir / "key", private + "\n")
        public_keys.append(run_cmd([binary, "pubkey"], input_text=private + "\n").strip())
        (node_dir / "policy.toml").write_text(POLICY_TOML)
    for side, node_dir in enumerate(dirs):
        (node_dir / "peers" / "other.toml").write_text(
            meshguard_peer_toml(side, public_keys[1 - side])
        )
    return dirs


def check_meshguard_configs(
    binary: str,
    dirs: list[Path],
    ifaces: tuple[str, str],
    with_policy: bool,
    interface: dict[str, int],
) -> str | None:
    """Writes both node files; returns None if `meshguard check` accepts them, else its error."""
    for side, node_dir in enumerate(dirs):
        toml = meshguard_node_toml(side, ifaces[side], with_policy, interface)
        (node_dir / "node.toml").write_text(toml)
        try:
            run_cmd([binary, "check", "--config", str(node_dir / "node.toml")])
        except BenchError as err:
            return str(err)
    return None


def choose_policy_section(
    binary: str,
    dirs: list[Path],
    ifaces: tuple[str, str],
    result: SystemResult,
    interface: dict[str, int],
) -> None:
    """Keeps an allow-all [policy] section if this build knows the key, drops it otherwise."""
    error = check_meshguard_configs(binary, dirs, ifaces, True, interface)
    if error is None:
        result.notes.append(
            "allow-all policy loaded ([policy] section accepted by meshguard check)"
        )
        return
    if not re.search(r"unknown (field|key) `?policy\b", error):
        raise BenchError(f"meshguard check rejected the config: {error}")
    error = check_meshguard_configs(binary, dirs, ifaces, False, interface)
    if error is not None:
        raise BenchError(f"meshguard check rejected the config: {error}")
    result.notes.append("no [policy] section: this build rejects the key (no allow lists yet)")


def wait_for_log_line(proc: subprocess.Popen, logfile: Path, line: str) -> None:
    def logged() -> bool:
        if proc.poll() is not None:
            raise BenchError(
                f"daemon exited ({proc.returncode}) before `{line}`:\n{log_tail(logfile)}"
            )
        return line in logfile.read_text(errors="replace")

    if not wait_until(logged, START_TIMEOUT):
        raise BenchError(f"no `{line}` within {START_TIMEOUT:.0f} s:\n{log_tail(logfile)}")


def start_meshguard(
    res: Resources,
    namespaces: tuple[str, str],
    index: int,
    binary: str,
    result: SystemResult,
    interface: dict[str, int],
) -> Testbed:
    workdir = res.make_tempdir(f"mgbench-{os.getpid()}-meshguard-")
    ifaces = tuple(f"mg{os.getpid() % 10000}{index}{side}" for side in "ab")
    dirs = write_meshguard_configs(binary, workdir)
    choose_policy_section(binary, dirs, ifaces, result, interface)
    testbed = Testbed(namespaces[0], namespaces[1], OVERLAY[1])
    env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
    for ns, node_dir, iface in zip(namespaces, dirs, ifaces):
        res.own_socket(iface)  # in case a later version adds a wg-compatible UAPI socket
        logfile = workdir / f"{ns}.log"
        proc = res.spawn(ns, [binary, "up", "--config", str(node_dir / "node.toml")], logfile, env)
        testbed.daemons.append(proc)
        testbed.logs.append(logfile)
    for proc, logfile in zip(testbed.daemons, testbed.logs):
        wait_for_log_line(proc, logfile, "meshguard is up")
    started = re.search(r"workers=(\d+)", testbed.logs[0].read_text(errors="replace"))
    if started:
        result.notes.append(f"{started.group(1)} data-path worker(s) per daemon")
    if "queue_length" in interface:
        result.notes.append(f"TUN queue length {interface['queue_length']} (--queue-length)")
    wait_for_ping(namespaces[0], OVERLAY[1], testbed)
    return testbed


# ------------------------------------------------------- boringtun and wireguard-go


@dataclass(frozen=True)
class WgImpl:
    """A userspace WireGuard implementation configured with `wg`."""

    program: str
    iface_prefix: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    remove_env: tuple[str, ...] = ()


WG_IMPLS = {
    "boringtun": WgImpl(
        "boringtun-cli", "bt", ("-f", "--disable-drop-privileges"), (), BORINGTUN_ENV
    ),
    "boringtun-1t": WgImpl(
        "boringtun-cli",
        "bt",
        ("-f", "--disable-drop-privileges", "--threads", "1"),
        (),
        BORINGTUN_ENV,
    ),
    "wireguard-go": WgImpl(
        "wireguard-go",
        "wg",
        ("-f",),
        (("WG_PROCESS_FOREGROUND", "1"), ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")),
    ),
}


def wg_environment(impl: WgImpl) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in impl.remove_env}
    env.update(impl.env)
    return env


def wg_keypair(workdir: Path, side: str) -> tuple[Path, str]:
    private = run_cmd(["wg", "genkey"]).strip()
    key_file = workdir / f"{side}.key"
    write_secret(key_file, private + "\n")
    return key_file, run_cmd(["wg", "pubkey"], input_text=private + "\n").strip()


def configure_wg_iface(ns: str, iface: str, side: int, key_file: Path, peer_public: str) -> None:
    other = 1 - side
    wg_set = (
        f"wg set {iface} private-key {key_file} listen-port {TUNNEL_PORT}"
        f" peer {peer_public} allowed-ips {OVERLAY[other]}/32"
        f" endpoint {UNDERLAY[other]}:{TUNNEL_PORT}"
    )
    run_cmd(in_ns(ns, wg_set.split()))
    run_cmd(["ip", "-n", ns, "addr", "add", f"{OVERLAY[side]}/32", "dev", iface])
    run_cmd(["ip", "-n", ns, "link", "set", iface, "mtu", str(TUNNEL_MTU), "up"])
    run_cmd(["ip", "-n", ns, "route", "add", f"{OVERLAY[other]}/32", "dev", iface])


def wait_for_socket(proc: subprocess.Popen, logfile: Path, iface: str) -> None:
    path = WG_SOCKET_DIR / f"{iface}.sock"

    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{iface}: process exited ({proc.returncode}):\n{log_tail(logfile)}")
        return path.exists()

    if not wait_until(ready, START_TIMEOUT):
        raise BenchError(
            f"{path} did not appear within {START_TIMEOUT:.0f} s:\n{log_tail(logfile)}"
        )


def start_wg_peers(
    res: Resources, namespaces: tuple[str, str], index: int, impl: WgImpl, binary: str
) -> Testbed:
    workdir = res.make_tempdir(f"mgbench-{os.getpid()}-{impl.iface_prefix}-")
    ifaces = tuple(f"{impl.iface_prefix}{os.getpid() % 10000}{index}{side}" for side in "ab")
    keys = [wg_keypair(workdir, side) for side in "ab"]
    testbed = Testbed(namespaces[0], namespaces[1], OVERLAY[1])
    for ns, iface in zip(namespaces, ifaces):
        res.own_socket(iface)
        logfile = workdir / f"{iface}.log"
        argv = [binary, *impl.args]
        if impl.program == "boringtun-cli":
            argv += ["--log", str(workdir / f"{iface}.out")]  # default /tmp/boringtun.out is shared
        proc = res.spawn(ns, [*argv, iface], logfile, wg_environment(impl))
        testbed.daemons.append(proc)
        testbed.logs.append(logfile)
        wait_for_socket(proc, logfile, iface)
    for side, (ns, iface) in enumerate(zip(namespaces, ifaces)):
        configure_wg_iface(ns, iface, side, keys[side][0], keys[1 - side][1])
    wait_for_ping(namespaces[0], OVERLAY[1], testbed)
    return testbed


# -------------------------------------------------------------------------- iperf3


def iperf_listening(ns: str) -> bool:
    out = subprocess.run(
        in_ns(ns, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]), capture_output=True, text=True
    )
    return bool(out.stdout.strip())


def start_iperf_server(res: Resources, testbed: Testbed, logfile: Path) -> subprocess.Popen:
    """A one-off server (-1), so a failed run never leaves a stuck server behind."""
    proc = res.spawn(testbed.server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], logfile)
    if not wait_until(lambda: proc.poll() is not None or iperf_listening(testbed.server_ns), 10):
        raise BenchError("iperf3 server did not start listening")
    if proc.poll() is not None:
        raise BenchError(f"iperf3 server exited:\n{log_tail(logfile)}")
    return proc


def received_rate(test: str, data: dict) -> tuple[float, float, float | None]:
    """(received bit/s, seconds, loss %) from the client's JSON.

    TCP: end.sum_received. UDP: end.sum_received too where it exists (iperf3 3.12 has
    it: the datagrams the server got, packets - lost_packets); otherwise end.sum, whose
    bits_per_second is the sender's rate, scaled by (1 - lost_percent / 100)."""
    end = data["end"]
    if test != "udp":
        return end["sum_received"]["bits_per_second"], end["sum_received"]["seconds"], None
    loss = end["sum"]["lost_percent"]
    if "sum_received" in end:
        return end["sum_received"]["bits_per_second"], end["sum_received"]["seconds"], loss
    return end["sum"]["bits_per_second"] * (1 - loss / 100), end["sum"]["seconds"], loss


def run_iperf_client(testbed: Testbed, test: str, duration: int) -> str:
    argv = f"iperf3 -c {testbed.server_addr} -p {IPERF_PORT} -t {duration} --json".split()
    argv += TEST_ARGS[test]
    done = subprocess.run(
        in_ns(testbed.client_ns, argv),
        capture_output=True,
        text=True,
        timeout=duration + CLIENT_SLACK,
    )
    if not done.stdout.strip():
        raise BenchError(
            f"iperf3 client printed nothing ({done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def measure_run(
    res: Resources, testbed: Testbed, test: str, duration: int, json_path: Path, logdir: Path
) -> Run:
    server = start_iperf_server(res, testbed, logdir / f"iperf3-server-{json_path.stem}.log")
    pids = [p.pid for p in testbed.daemons]
    drops_before = drop_counters(testbed) if test == "udp" else {}
    cpu_before = [cpu_seconds(pid) for pid in pids]
    output = run_iperf_client(testbed, test, duration)
    cpu_after = [cpu_seconds(pid) for pid in pids]
    drops_after = drop_counters(testbed) if test == "udp" else {}
    stop_process(server)
    json_path.write_text(output)
    data = json.loads(output)
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    bits, seconds, loss = received_rate(test, data)
    run = Run(gbps=bits / 1e9, seconds=seconds, json_file=json_path.name, loss_pct=loss)
    if test == "udp":
        run.datagrams_sent = data["end"]["sum"].get("packets")
        run.drops = {k: drops_after[k] - drops_before[k] for k in DROP_PLACES}
    if pids and test == CPU_TEST:
        run.cpu = sum(a - b for a, b in zip(cpu_after, cpu_before)) / seconds
        run.cpu_per_gbit = run.cpu / run.gbps if run.gbps > 0 else None
    return run


# Where a UDP datagram can be lost, as the kernel counts it, in path order.
DROP_PLACES = {
    "sender_tunnel_queue": "sender's tunnel device queue full (TX dropped)",
    "tunnel_sockets": "tunnel's own UDP socket full (receiving node)",
    "iperf3_socket": "receiving iperf3 socket full (UdpRcvbufErrors of the rest)",
}


def tunnel_tx_drops(ns: str) -> int:
    """TX drops of the tunnel devices in ns: every device but loopback and Ethernet (veth)."""
    links = json.loads(run_cmd(["ip", "-n", ns, "-s", "-j", "link", "show"]))
    return sum(
        link.get("stats64", {}).get("tx", {}).get("dropped", 0)
        for link in links
        if link.get("link_type") not in ("loopback", "ether")
    )


def udp_receive_buffer_errors(ns: str) -> int:
    """UdpRcvbufErrors of ns, IPv4 and IPv6 (a dual-stack socket counts in either)."""
    total = 0
    for table, prefix in (("/proc/net/snmp", "Udp:"), ("/proc/net/snmp6", "Udp6RcvbufErrors")):
        lines = run_cmd(in_ns(ns, ["cat", table])).splitlines()
        if prefix == "Udp:":
            rows = [line.split()[1:] for line in lines if line.startswith(prefix)]
            if len(rows) == 2 and "RcvbufErrors" in rows[0]:
                total += int(rows[1][rows[0].index("RcvbufErrors")])
        else:
            total += sum(int(line.split()[1]) for line in lines if line.startswith(prefix))
    return total


def tunnel_socket_drops(ns: str) -> int:
    """Drops of the UDP sockets bound to the tunnel port in ns (last column of /proc/net/udp)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in run_cmd(in_ns(ns, ["cat", table])).splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and int(fields[1].rsplit(":", 1)[1], 16) == TUNNEL_PORT:
                total += int(fields[-1])
    return total


def drop_counters(testbed: Testbed) -> dict[str, int]:
    tunnel_sockets = tunnel_socket_drops(testbed.server_ns)
    return {
        "sender_tunnel_queue": tunnel_tx_drops(testbed.client_ns),
        "tunnel_sockets": tunnel_sockets,
        "iperf3_socket": udp_receive_buffer_errors(testbed.server_ns) - tunnel_sockets,
    }


def check_daemons_alive(testbed: Testbed) -> None:
    for proc, logfile in zip(testbed.daemons, testbed.logs):
        if proc.poll() is not None:
            raise BenchError(f"daemon {proc.pid} exited ({proc.returncode}):\n{log_tail(logfile)}")


def describe_run(run: Run) -> str:
    text = f"{run.gbps:.3f} Gbit/s"
    if run.loss_pct is not None:
        text += f", loss {run.loss_pct:.1f} %"
    if run.cpu is not None:
        text += f", daemon CPU {run.cpu * 100:.0f} %"
    if run.drops is not None and run.datagrams_sent:
        text += " (" + loss_places(run) + ")"
    return text


def loss_places(run: Run) -> str:
    """Where a UDP run's datagrams were dropped, as shares of those iperf3 sent."""
    sent = run.datagrams_sent or 0
    parts = []
    for key, count in (run.drops or {}).items():
        share = f"{100 * count / sent:.1f} %" if sent else "n/a"
        parts.append(f"{key} {share}")
    return ", ".join(parts)


def udp_loss_lines(results: list[SystemResult]) -> list[str]:
    """Per system, where the UDP run with the median loss lost its datagrams."""
    lines = []
    for result in results:
        runs = sorted(
            (r for r in result.runs.get("udp", []) if r.drops is not None),
            key=lambda r: r.loss_pct or 0.0,
        )
        if runs:
            median = runs[len(runs) // 2]
            lines.append(
                f"- {result.name}: {median.loss_pct:.1f} % lost of "
                f"{median.datagrams_sent} sent: {loss_places(median)}"
            )
    return lines


def measure_system(
    res: Resources, testbed: Testbed, opts: Options, result: SystemResult, logdir: Path
) -> None:
    for test in opts.tests:
        runs = result.runs.setdefault(test, [])
        for number in range(1, opts.runs + 1):
            json_path = opts.out / f"{result.name}-{test}-{number}.json"
            run = measure_run(res, testbed, test, opts.duration, json_path, logdir)
            check_daemons_alive(testbed)
            runs.append(run)
            log(f"[{result.name}] {test} run {number}/{opts.runs}: {describe_run(run)}")
            time.sleep(PAUSE_BETWEEN_RUNS)


# ------------------------------------------------------------------------ systems


def build_meshguard() -> str | None:
    """`cargo build --release`; returns why it failed, or None."""
    cargo = find_program("cargo")
    if cargo is None:
        return "cargo not found"
    log("building meshguard: cargo build --release")
    done = subprocess.run([cargo, "build", "--release"], cwd=REPO_ROOT)
    return None if done.returncode == 0 else f"cargo build --release failed ({done.returncode})"


def system_binary(system: str, build_error: str | None) -> tuple[str | None, str]:
    """(binary, why it is missing)."""
    if system == "veth":
        return "", ""
    if system == "meshguard":
        if build_error:
            return None, build_error
        binary = REPO_ROOT / "target" / "release" / "meshguard"
        return (
            (str(binary), "")
            if os.access(binary, os.X_OK)
            else (None, f"{binary} not found (build it, or drop --no-build)")
        )
    if find_program("wg") is None:
        return None, "wg (wireguard-tools) not found"
    program = WG_IMPLS[system].program
    binary = find_program(program)
    return (binary, "") if binary else (None, f"{program} not found on PATH or in ~/.cargo/bin")


def start_system(
    res: Resources, system: str, index: int, binary: str, result: SystemResult, opts: Options
) -> Testbed:
    namespaces = create_underlay(res, system, index)
    if system == "veth":
        return Testbed(namespaces[0], namespaces[1], UNDERLAY[1])
    if system == "meshguard":
        return start_meshguard(res, namespaces, index, binary, result, opts.interface)
    return start_wg_peers(res, namespaces, index, WG_IMPLS[system], binary)


def bench_system(system: str, index: int, opts: Options, build_error: str | None) -> SystemResult:
    result = SystemResult(system)
    binary, missing = system_binary(system, build_error)
    if binary is None:
        result.status, result.reason = "skipped", missing
        log(f"[{system}] skipped: {missing}")
        return result
    log(f"[{system}] setting up")
    with Resources() as res:
        try:
            logdir = res.make_tempdir(f"mgbench-{os.getpid()}-iperf-")
            testbed = start_system(res, system, index, binary, result, opts)
            measure_system(res, testbed, opts, result, logdir)
        except (BenchError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as err:
            result.status, result.reason = "failed", str(err)
            log(f"[{system}] FAILED: {err}")
    return result


# ---------------------------------------------------------------------- reporting


def column_values(result: SystemResult) -> dict[str, dict]:
    """Per metric: median, min, max (and loss for UDP), from the runs that exist."""
    values: dict[str, dict] = {}
    for test, runs in result.runs.items():
        if not runs:
            continue
        rates = [r.gbps for r in runs]
        values[test] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
        losses = [r.loss_pct for r in runs if r.loss_pct is not None]
        if losses:
            values[test]["loss_pct"] = statistics.median(losses)
    cpu_runs = result.runs.get(CPU_TEST, [])
    for key in ("cpu", "cpu_per_gbit"):
        samples = [getattr(r, key) for r in cpu_runs if getattr(r, key) is not None]
        if samples:
            values[key] = {
                "median": statistics.median(samples),
                "min": min(samples),
                "max": max(samples),
            }
    return values


def format_cell(metric: str, value: dict | None) -> str:
    if value is None:
        return "—"
    if metric == "cpu":
        return f"{value['median'] * 100:.0f} %"
    if metric == "cpu_per_gbit":
        return f"{value['median']:.2f}"
    text = f"{value['median']:.2f}"
    if value["max"] > value["min"]:
        text += f" [{value['min']:.2f}–{value['max']:.2f}]"
    if "loss_pct" in value:
        text += f" ({value['loss_pct']:.1f} % loss)"
    return text


def metric_text(metric: str, median: float) -> str:
    if metric == "cpu":
        return f"{median * 100:.0f} %"
    if metric == "cpu_per_gbit":
        return f"{median:.2f} CPU-s/Gbit"
    return f"{median:.2f} Gbit/s"


def ratio_lines(columns: dict[str, dict[str, dict]]) -> list[str]:
    """meshguard against the best peer and against veth, per metric."""
    mine = columns.get("meshguard", {})
    lines = []
    for metric, title, higher_better in METRICS:
        if metric not in mine:
            continue
        ours = mine[metric]["median"]
        peers = [
            (s, columns[s][metric]["median"]) for s in PEER_SYSTEMS if metric in columns.get(s, {})
        ]
        parts = []
        if peers:
            pick = max if higher_better else min
            best, theirs = pick(peers, key=lambda p: p[1])
            ratio = f"{ours / theirs:.2f}×" if theirs else "n/a"
            parts.append(f"{ratio} best peer ({best}, {metric_text(metric, theirs)})")
        veth = columns.get("veth", {}).get(metric)
        if veth and veth["median"]:
            parts.append(
                f"{ours / veth['median']:.2f}× veth ({metric_text(metric, veth['median'])})"
            )
        if parts:
            better = "higher" if higher_better else "lower"
            lines.append(
                f"- {title} ({better} is better): meshguard {metric_text(metric, ours)} = "
                + ", ".join(parts)
            )
    return lines


def markdown_report(results: list[SystemResult], opts: Options, machine: dict) -> str:
    columns = {r.name: column_values(r) for r in results}
    headings = [
        "TCP 1 stream, Gbit/s",
        "TCP 4 streams",
        "TCP reverse",
        "UDP received (loss)",
        "Daemon CPU",
        "CPU-s per Gbit",
    ]
    lines = [
        f"# meshguard throughput, {machine['date']}",
        "",
        f"{machine['description']}; meshguard {machine['meshguard_commit']}. "
        f"iperf3 {opts.duration} s × {opts.runs} runs, Gbit/s received, median [min–max]. "
        "Daemon CPU: both daemons summed during the TCP 1-stream runs (100 % = one core).",
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in machine["versions"].items()) + ".",
        "",
        "| System | " + " | ".join(headings) + " |",
        "|---|" + "---:|" * len(headings),
    ]
    for result in results:
        if result.status == "skipped":
            continue
        cells = [format_cell(m, columns[result.name].get(m)) for m, _, _ in METRICS]
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    lines.append("")
    ratios = ratio_lines(columns)
    if ratios:
        lines += ["Ratios, medians (meshguard ÷ other):", *ratios, ""]
    losses = udp_loss_lines(results)
    if losses:
        places = "; ".join(f"{k}: {v}" for k, v in DROP_PLACES.items())
        lines += [
            "UDP loss by place, in the run with the median loss, as shares of the datagrams sent "
            f"(kernel counters; {places}):",
            *losses,
            "",
        ]
    notes = [
        f"- {r.name}: {r.status}: {r.reason.splitlines()[0]}" for r in results if r.status != "ok"
    ]
    notes += [f"- {r.name}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def machine_info(now: datetime.datetime) -> dict:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = platform.uname().release
    cpus = len(os.sched_getaffinity(0))
    return {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": kernel,
        "nproc": cpus,
        "cpu_model": model,
        "description": f"Linux {kernel}, {cpus} CPUs ({model})",
        "meshguard_commit": git_commit(),
        "versions": tool_versions(),
    }


def tool_versions() -> dict[str, str]:
    """First line of `<program> --version` for the programs measured against."""
    versions = {}
    for program in ("iperf3", "boringtun-cli", "wireguard-go"):
        binary = find_program(program)
        if binary:
            try:
                versions[program] = run_cmd([binary, "--version"]).splitlines()[0].strip()
            except (BenchError, IndexError):
                versions[program] = "unknown"
    return versions


def git_commit() -> str:
    try:
        head = run_cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run_cmd(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]
        ).strip()
    except BenchError:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def write_summary(path: Path, results: list[SystemResult], opts: Options, machine: dict) -> None:
    columns = {r.name: column_values(r) for r in results}
    summary = {
        "command": sys.argv,
        "machine": machine,
        "options": {
            "duration": opts.duration,
            "runs": opts.runs,
            "systems": opts.systems,
            "tests": opts.tests,
        },
        "units": {
            "gbps": "Gbit/s received",
            "cpu": "CPU-seconds per second (1.0 = one core)",
            "cpu_per_gbit": "CPU-seconds per Gbit",
        },
        "systems": {r.name: {**asdict(r), "columns": columns[r.name]} for r in results},
        "ratios": ratio_lines(columns),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def install_matplotlib() -> bool:
    """pip install --quiet matplotlib; where the interpreter is externally managed
    (Debian's /usr/bin/python3, e.g. under sudo), into MATPLOTLIB_DIR instead."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
    log("matplotlib missing: pip install --quiet matplotlib")
    if subprocess.run(pip, capture_output=True).returncode == 0:
        return True
    log(f"pip may not install into {sys.executable}; trying --target {MATPLOTLIB_DIR}")
    return subprocess.run([*pip, "--target", str(MATPLOTLIB_DIR)]).returncode == 0


def matplotlib_importable() -> bool:
    importlib.invalidate_caches()
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def load_pyplot():
    """matplotlib.pyplot with the Agg backend, installed with pip if missing; or None."""
    if not matplotlib_importable():
        sys.path.append(str(MATPLOTLIB_DIR))  # an earlier --target install
        if not matplotlib_importable() and not (install_matplotlib() and matplotlib_importable()):
            log("could not install matplotlib: no chart written")
            return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_chart(path: Path, results: list[SystemResult], opts: Options, machine: dict) -> bool:
    plt = load_pyplot()
    if plt is None:
        return False
    columns = {r.name: column_values(r) for r in results if r.runs}
    systems = list(columns)
    tests = [t for t in opts.tests if any(t in columns[s] for s in systems)]
    if not systems or not tests:
        log("nothing measured: no chart written")
        return False
    titles = {key: title for key, title, _ in METRICS}
    width = 0.8 / len(tests)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(systems)), 5.5))
    for i, test in enumerate(tests):
        cells = [columns[s].get(test) for s in systems]
        medians = [c["median"] if c else 0 for c in cells]
        errors = [
            [c["median"] - c["min"] if c else 0 for c in cells],
            [c["max"] - c["median"] if c else 0 for c in cells],
        ]
        xs = [x + (i - (len(tests) - 1) / 2) * width for x in range(len(systems))]
        bars = ax.bar(xs, medians, width, yerr=errors, capsize=3, label=titles[test])
        ax.bar_label(
            bars,
            labels=[f"{m:.2f}" if c else "" for m, c in zip(medians, cells)],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(systems)), systems)
    ylabel = "Gbit/s received (median; whiskers min–max)"
    positive = [
        c["median"] for s in systems for t in tests if (c := columns[s].get(t)) and c["median"] > 0
    ]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")  # veth would flatten the tunnels on a linear axis
        ylabel += ", log scale"
    ax.yaxis.set_major_formatter("{x:g}")
    ax.set_ylabel(ylabel)
    ax.set_title(f"meshguard throughput benchmark, {machine['date']}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.text(
        0.01,
        0.01,
        f"{machine['description']}; meshguard {machine['meshguard_commit']}; "
        f"iperf3 {opts.duration} s × {opts.runs}; tunnel MTU {TUNNEL_MTU} over veth",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown}; choose from {','.join(allowed)}"
        )
    return items


def parse_options(argv: list[str], now: datetime.datetime) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per iperf3 run (default 10)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per test (default 3)")
    parser.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        type=lambda s: parse_list(s, ALL_SYSTEMS, "system"),
        help=f"comma-separated (default {','.join(ALL_SYSTEMS)})",
    )
    parser.add_argument(
        "--tests",
        default=",".join(ALL_TESTS),
        type=lambda s: parse_list(s, ALL_TESTS, "test"),
        help=f"comma-separated (default {','.join(ALL_TESTS)})",
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default results/<UTC timestamp>/)"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="use the existing target/release/meshguard"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="meshguard's interface.workers (default: the daemon's own choice)",
    )
    parser.add_argument(
        "--queue-length",
        type=int,
        help="meshguard's interface.queue_length (default: the daemon's, 4000)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.runs < 1:
        parser.error("--duration and --runs must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    interface = {
        key: value
        for key, value in (("workers", args.workers), ("queue_length", args.queue_length))
        if value is not None
    }
    out = args.out or REPO_ROOT / "results" / now.strftime("%Y%m%dT%H%M%SZ")
    return Options(
        args.duration,
        args.runs,
        args.systems,
        args.tests,
        out.resolve(),
        not args.no_build,
        interface,
    )


def check_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "run as root (network namespaces, TUN devices)"
    missing = [p for p in ("ip", "iperf3", "ping", "ss") if find_program(p) is None]
    if missing:
        return (
            f"missing programs: {', '.join(missing)} "
            "(apt-get install --no-install-recommends iproute2 iperf3 iputils-ping)"
        )
    return None


def raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    opts = parse_options(argv, now)
    problem = check_prerequisites()
    if problem:
        log(f"bench: {problem}")
        return 2
    for signum in STOP_SIGNALS:
        signal.signal(signum, raise_interrupted)
    try:
        build_error = build_meshguard() if opts.build and "meshguard" in opts.systems else None
        opts.out.mkdir(parents=True, exist_ok=True)
        machine = machine_info(now)
        results = [bench_system(s, i, opts, build_error) for i, s in enumerate(opts.systems)]
        write_results(results, opts, machine)
    except Interrupted as sig:
        log(f"bench: interrupted by {sig}; everything it made is removed")
        return 130
    return 0 if all(r.status != "failed" for r in results) else 1


def write_results(results: list[SystemResult], opts: Options, machine: dict) -> None:
    report = markdown_report(results, opts, machine)
    print(report)
    (opts.out / "table.md").write_text(report)
    write_summary(opts.out / "summary.json", results, opts, machine)
    chart = write_chart(opts.out / "chart.png", results, opts, machine)
    log(
        f"results in {opts.out}: table.md, summary.json, {'chart.png, ' if chart else ''}"
        "<system>-<test>-<run>.json"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
