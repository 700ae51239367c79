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
  udp500m, udp1g, udp2g   UDP at a fixed offered rate: rate received and loss
  udpmax   the highest offered UDP rate with loss under 1 %
  ping     1,000 pings through the tunnel; pingload: the same while TCP runs back
On request only (not in the default list):
  cpushare, cpushare1g   CPU-bound workloads, one per core, count loop turns alone
           and then beside TCP (cpushare) or UDP at 1 Gbit/s (cpushare1g) through the
           tunnel: the share of their work they keep, and the transfer's rate

Usage (as root, from anywhere):
  scripts/bench.sh [--duration S] [--runs N] [--systems veth,meshguard,...]
                   [--tests tcp,tcp4,...] [--out DIR] [--no-build]
                   [--workers N] [--queue-length N] [--scheduling realtime|normal]
                   [--realtime-share PERCENT] (meshguard's [interface] keys)

The parts live in scripts/meshbench/: the topology (namespaces, veth, cleanup), each
system under test, the iperf3 measurements and the report, one module each.

Results go to results/<UTC timestamp>/ (or --out): table.md, summary.json, chart.png
and the raw iperf3 JSON of every run. Everything the script creates (namespaces,
processes, temporary files, UAPI sockets of its own interfaces) is removed on exit,
also on Ctrl-C, SIGTERM and errors. Only processes it started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

from meshbench.common import BenchError, Interrupted, REPO_ROOT, STOP_SIGNALS, find_program, log
from meshbench.measure import measure_system
from meshbench.meshguard import start_meshguard
from meshbench.model import (
    ALL_SYSTEMS,
    ALL_TESTS,
    EXTRA_SYSTEMS,
    Options,
    SystemResult,
    WORKLOAD_TESTS,
)
from meshbench.report import machine_info, write_results
from meshbench.topology import Resources, Testbed, UNDERLAY, create_underlay
from meshbench.wireguard import WG_IMPLS, start_wg_peers


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
    if system in ("meshguard", "meshguard-metrics"):
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
    if system in ("meshguard", "meshguard-metrics"):
        metrics = system == "meshguard-metrics"
        return start_meshguard(res, namespaces, index, binary, result, opts.interface, metrics)
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
        type=lambda s: parse_list(s, ALL_SYSTEMS + EXTRA_SYSTEMS, "system"),
        help=f"comma-separated (default {','.join(ALL_SYSTEMS)}; also "
        f"{','.join(EXTRA_SYSTEMS)}: meshguard scraped every second)",
    )
    parser.add_argument(
        "--tests",
        default=",".join(ALL_TESTS),
        type=lambda s: parse_list(s, ALL_TESTS + WORKLOAD_TESTS, "test"),
        help=f"comma-separated (default {','.join(ALL_TESTS)}; also "
        f"{','.join(WORKLOAD_TESTS)}: CPU-bound workloads beside a transfer)",
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
    parser.add_argument(
        "--scheduling",
        choices=("realtime", "normal"),
        help="meshguard's interface.scheduling (default: the daemon's, realtime)",
    )
    parser.add_argument(
        "--realtime-share",
        type=int,
        help="meshguard's interface.realtime_share_percent (default: the daemon's, 50)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.runs < 1:
        parser.error("--duration and --runs must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.realtime_share is not None and not 1 <= args.realtime_share <= 100:
        parser.error("--realtime-share must be 1 to 100")
    interface = {
        key: value
        for key, value in (
            ("workers", args.workers),
            ("queue_length", args.queue_length),
            ("scheduling", args.scheduling),
            ("realtime_share_percent", args.realtime_share),
        )
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
        wants_build = any(s.startswith("meshguard") for s in opts.systems)
        build_error = build_meshguard() if opts.build and wants_build else None
        opts.out.mkdir(parents=True, exist_ok=True)
        machine = machine_info(now)
        results = [bench_system(s, i, opts, build_error) for i, s in enumerate(opts.systems)]
        write_results(results, opts, machine)
    except Interrupted as sig:
        log(f"bench: interrupted by {sig}; everything it made is removed")
        return 130
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
