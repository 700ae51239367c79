#!/usr/bin/env python3
"""Resident memory of a meshguard daemon with many peer identities.

Builds meshguard in release mode, writes a node file with LOCALS local identities and a
peers directory with PEERS peer files (one identity each, its own /32 and endpoint),
starts `meshguard up` in a network namespace of its own, waits until it is up, and
reports VmRSS and VmHWM from /proc. Removes the namespace, the daemon and the files on
exit (the benchmark's resource tracking, scripts/meshbench/topology.py). Run as root:
  scripts/memory.py [--peers 1000] [--locals 1] [--no-build]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from meshbench.common import REPO_ROOT, BenchError, log, run_cmd, write_secret
from meshbench.meshguard import POLICY_TOML, wait_for_log_line
from meshbench.topology import Resources

BINARY = REPO_ROOT / "target" / "release" / "meshguard"
LISTEN = "198.18.200.1"
UP_TIMEOUT = 60.0  # seconds: thousands of peer files take a moment to load


def genkey() -> tuple[str, str]:
    private = run_cmd([str(BINARY), "genkey"]).strip()
    public = run_cmd([str(BINARY), "pubkey"], input_text=private + "\n").strip()
    return private, public


def write_config(directory: Path, peers: int, locals_: int) -> Path:
    """The node file, key files, an allow-all policy and one file per peer."""
    (directory / "keys").mkdir()
    (directory / "peers").mkdir()
    node = [
        'name = "memory-test"',
        f'listen = "{LISTEN}:51820"',
        'peers_dir = "peers"',
        "",
        "[interface]",
        'name = "mgmem0"',
        "",
        "[policy]",
        'files = ["policy.toml"]',
        "",
    ]
    for i in range(locals_):
        private, _ = genkey()
        write_secret(directory / "keys" / f"local-{i}.key", private + "\n")
        node += [
            "[[identity]]",
            f'principal = "cluster.local/ns/local/sa/workload-{i}"',
            f'private_key_file = "keys/local-{i}.key"',
            f'addresses = ["10.200.{i // 256}.{i % 256}/32"]',
            "",
        ]
    (directory / "node.toml").write_text("\n".join(node))
    (directory / "policy.toml").write_text(POLICY_TOML)
    for i in range(peers):
        _, public = genkey()
        (directory / "peers" / f"peer-{i:05d}.toml").write_text(
            f'name = "peer-{i}"\n'
            f'endpoint = "198.19.{i // 250}.{i % 250 + 1}:51820"\n\n'
            "[[identity]]\n"
            f'principal = "cluster.local/ns/ns-{i % 50}/sa/service-{i}"\n'
            f'public_key = "{public}"\n'
            f'allowed_ips = ["10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32"]\n'
        )
    return directory / "node.toml"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"{field} not in /proc/{pid}/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--locals", type=int, default=1)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon needs a network namespace and a TUN device")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO_ROOT, check=True)
    with Resources() as res:
        directory = res.make_tempdir("meshguard-memory-")
        log(f"writing {args.locals} local and {args.peers} peer identities ...")
        config = write_config(directory, args.peers, args.locals)
        namespace = res.add_netns(f"mgmem-{os.getpid()}")
        run_cmd(["ip", "-n", namespace, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", namespace, "address", "add", f"{LISTEN}/32", "dev", "lo"])
        logfile = directory / "daemon.log"
        daemon = res.spawn(namespace, [str(BINARY), "up", "--config", str(config)], logfile)
        wait_for_log_line(daemon, logfile, "meshguard is up", timeout=UP_TIMEOUT)
        time.sleep(2)
        rss = status_kib(daemon.pid, "VmRSS")
        peak = status_kib(daemon.pid, "VmHWM")
        print(
            f"{args.peers} peer identities x {args.locals} local identities "
            f"({args.peers * args.locals} tunnels): VmRSS {rss / 1024:.1f} MiB, "
            f"peak VmHWM {peak / 1024:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        sys.exit(f"memory: {err}")
