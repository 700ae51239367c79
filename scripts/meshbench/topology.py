"""The network every system is measured on: two namespaces joined by a veth pair,
and the resources (namespaces, processes, directories) removed again on close."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .common import (
    BenchError,
    STOP_SIGNALS,
    WG_SOCKET_DIR,
    in_ns,
    log,
    log_tail,
    run_cmd,
    stop_process,
    wait_until,
)

UNDERLAY = ("198.18.10.1", "198.18.10.2")
UNDERLAY_PREFIX = 24
OVERLAY = ("10.77.0.1", "10.77.0.2")
VETH_MTU = 1500
TUNNEL_MTU = 1420
TUNNEL_PORT = 51820
START_TIMEOUT = 20.0  # seconds for a daemon to come up
PING_TIMEOUT = 20.0  # seconds for the first ping through a tunnel


@dataclass
class Testbed:
    """Where iperf3 runs for one system, and which daemon processes to watch."""

    client_ns: str
    server_ns: str
    server_addr: str
    daemons: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


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
