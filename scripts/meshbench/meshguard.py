"""meshguard as a system under test: keys, node and peer files, two daemons."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from .common import BenchError, log_tail, run_cmd, wait_until, write_secret
from .model import SystemResult
from .topology import (
    OVERLAY,
    Resources,
    START_TIMEOUT,
    TUNNEL_MTU,
    TUNNEL_PORT,
    Testbed,
    UNDERLAY,
    wait_for_ping,
)

PRINCIPALS = ("cluster.local/ns/bench/sa/one", "cluster.local/ns/bench/sa/two")
POLICY_TOML = """\
[[policy]]
name = "allow-all"
namespace = "istio-system"
action = "ALLOW"
[[policy.rules]]
"""


ADMIN_PORT = 9586
# Scrapes /metrics every second, inside a node's namespace, as a busy Prometheus would.
SCRAPER = f"""\
import time, urllib.request
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:{ADMIN_PORT}/metrics", timeout=5).read()
    except OSError:
        pass
    time.sleep(1)
"""


def meshguard_node_toml(
    side: int, iface: str, interface: dict[str, int | str], metrics: bool
) -> str:
    # A JSON number or plain string is the same in TOML.
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in interface.items())
    admin = f'[admin]\nlisten = "127.0.0.1:{ADMIN_PORT}"\n\n' if metrics else ""
    text = f"""\
name = "bench-{'ab'[side]}"
listen = "{UNDERLAY[side]}:{TUNNEL_PORT}"
peers_dir = "peers"

{admin}[interface]
name = "{iface}"
mtu = {TUNNEL_MTU}
addresses = ["{OVERLAY[side]}/32"]
{extra}
[[identity]]
principal = "{PRINCIPALS[side]}"
private_key_file = "key"
addresses = ["{OVERLAY[side]}/32"]
"""
    return text + '\n[policy]\nfiles = ["policy.toml"]\n'


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
    interface: dict[str, int | str],
    metrics: bool,
) -> None:
    """Writes both node files, with the allow-all policy; `meshguard check` must accept them."""
    for side, node_dir in enumerate(dirs):
        toml = meshguard_node_toml(side, ifaces[side], interface, metrics)
        (node_dir / "node.toml").write_text(toml)
        try:
            run_cmd([binary, "check", "--config", str(node_dir / "node.toml")])
        except BenchError as err:
            raise BenchError(f"meshguard check rejected the config: {err}") from err


def wait_for_log_line(
    proc: subprocess.Popen, logfile: Path, line: str, timeout: float = START_TIMEOUT
) -> None:
    """Waits until the daemon logs `line`; fails if it exits first or takes too long."""

    def logged() -> bool:
        if proc.poll() is not None:
            raise BenchError(
                f"daemon exited ({proc.returncode}) before `{line}`:\n{log_tail(logfile)}"
            )
        return line in logfile.read_text(errors="replace")

    if not wait_until(logged, timeout):
        raise BenchError(f"no `{line}` within {timeout:.0f} s:\n{log_tail(logfile)}")


def start_meshguard(
    res: Resources,
    namespaces: tuple[str, str],
    index: int,
    binary: str,
    result: SystemResult,
    interface: dict[str, int | str],
    metrics: bool = False,
) -> Testbed:
    workdir = res.make_tempdir(f"mgbench-{os.getpid()}-meshguard-")
    ifaces = tuple(f"mg{os.getpid() % 10000}{index}{side}" for side in "ab")
    dirs = write_meshguard_configs(binary, workdir)
    check_meshguard_configs(binary, dirs, ifaces, interface, metrics)
    result.notes.append("allow-all policy loaded")
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
    if metrics:
        for ns in namespaces:
            res.spawn(ns, ["python3", "-c", SCRAPER], workdir / f"{ns}-scraper.log")
        result.notes.append("admin listener on, /metrics scraped every second on both nodes")
    log_text = testbed.logs[0].read_text(errors="replace")
    started = re.search(r"workers=(\d+)", log_text)
    if started:
        result.notes.append(f"{started.group(1)} data-path worker(s) per daemon")
    priority = re.search(r"threads run at (real-time|normal) priority", log_text)
    if priority:
        result.notes.append(f"threads at {priority.group(1)} priority (interface.scheduling)")
    share = re.search(r"share_percent=(\d+)", log_text)
    if share and priority and priority.group(1) == "real-time":
        result.notes.append(
            f"real-time priority up to {share.group(1)} % of a core per thread"
            " (interface.realtime_share_percent)"
        )
    if "queue_length" in interface:
        result.notes.append(f"TUN queue length {interface['queue_length']} (--queue-length)")
    wait_for_ping(namespaces[0], OVERLAY[1], testbed)
    return testbed
