"""The peers measured against: boringtun-cli and wireguard-go, configured with `wg`."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .common import (
    BenchError,
    WG_SOCKET_DIR,
    in_ns,
    log_tail,
    run_cmd,
    wait_until,
    write_secret,
)
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

# Environment variables that would change what boringtun-cli does if inherited.
BORINGTUN_ENV = ("WG_TUN_FD", "WG_UAPI_FD", "WG_THREADS", "WG_LOG_FILE", "WG_LOG_LEVEL", "WG_SUDO")


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
