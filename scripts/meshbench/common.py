"""Commands, processes and the few constants every part of the benchmark shares."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
WG_SOCKET_DIR = Path("/var/run/wireguard")
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop, clean up, exit."""


class BenchError(Exception):
    """A system could not be set up or measured; the others still run."""


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


def write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
