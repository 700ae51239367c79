#!/usr/bin/env python3
"""Resident memory of a meshguard daemon with many peer identities.

Builds meshguard in release mode, writes a node file with LOCALS local identities and a
peers directory with PEERS peer files (one identity each, its own /32 and endpoint),
starts `meshguard up` in a network namespace of its own, waits until it is up, and
reports VmRSS and VmHWM from /proc. Removes the namespace, the daemon and the files on
exit. Run as root:  scripts/memory.py [--peers 1000] [--locals 1] [--no-build]
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "target", "release", "meshguard")


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def genkey():
    private = run(BINARY, "genkey").stdout.strip()
    public = run(BINARY, "pubkey", input=private).stdout.strip()
    return private, public


def write_config(directory, peers, locals_):
    keys = os.path.join(directory, "keys")
    peer_dir = os.path.join(directory, "peers")
    os.makedirs(keys)
    os.makedirs(peer_dir)
    node = [
        'name = "memory-test"',
        'listen = "198.18.200.1:51820"',
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
        path = os.path.join(keys, f"local-{i}.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private + "\n")
        node += [
            "[[identity]]",
            f'principal = "cluster.local/ns/local/sa/workload-{i}"',
            f'private_key_file = "keys/local-{i}.key"',
            f'addresses = ["10.200.{i // 256}.{i % 256}/32"]',
            "",
        ]
    with open(os.path.join(directory, "node.toml"), "w") as f:
        f.write("\n".join(node))
    with open(os.path.join(directory, "policy.toml"), "w") as f:
        f.write(
            '[[policy]]\nname = "allow-all"\nnamespace = "istio-system"\n'
            'action = "ALLOW"\n[[policy.rules]]\n'
        )
    for i in range(peers):
        _, public = genkey()
        with open(os.path.join(peer_dir, f"peer-{i:05d}.toml"), "w") as f:
            f.write(
                f'name = "peer-{i}"\n'
                f'endpoint = "198.19.{i // 250}.{i % 250 + 1}:51820"\n\n'
                "[[identity]]\n"
                f'principal = "cluster.local/ns/ns-{i % 50}/sa/service-{i}"\n'
                f'public_key = "{public}"\n'
                f'allowed_ips = ["10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32"]\n'
            )


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--locals", type=int, default=1)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon needs a network namespace and a TUN device")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)

    namespace = f"mgmem{os.getpid()}"
    directory = tempfile.mkdtemp(prefix="meshguard-memory-")
    daemon = None
    try:
        print(f"writing {args.locals} local and {args.peers} peer identities ...", flush=True)
        write_config(directory, args.peers, args.locals)
        run("ip", "netns", "add", namespace)
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", namespace, "address", "add", "198.18.200.1/32", "dev", "lo")
        log = open(os.path.join(directory, "daemon.log"), "w+")
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", namespace, BINARY, "up", "--config",
             os.path.join(directory, "node.toml")],
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            log.seek(0)
            if "meshguard is up" in log.read():
                break
            if daemon.poll() is not None:
                log.seek(0)
                sys.exit("daemon exited:\n" + log.read())
            time.sleep(0.1)
        else:
            sys.exit("daemon did not come up in 60 s")
        time.sleep(2)
        rss = status_kib(daemon.pid, "VmRSS")
        peak = status_kib(daemon.pid, "VmHWM")
        print(
            f"{args.peers} peer identities x {args.locals} local identities "
            f"({args.peers * args.locals} tunnels): VmRSS {rss / 1024:.1f} MiB, "
            f"peak VmHWM {peak / 1024:.1f} MiB"
        )
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
