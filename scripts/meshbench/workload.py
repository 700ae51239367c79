"""What traffic through a tunnel leaves to the node's own workloads: CPU-bound
processes, one per core, count loop turns for the run's duration alone and then beside
a transfer through the tunnel; the share of their count they keep."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .common import BenchError, log_tail
from .iperf import measure_run
from .model import Run
from .topology import Resources, Testbed

# The transfer each workload test runs beside the workloads.
WORKLOAD_LOADS = {"cpushare": "tcp", "cpushare1g": "udp1g"}
# Counts loop turns until its time is up, then prints the count.
COUNTER = """\
import sys, time
turns, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    turns += 1
print(turns)
"""


def count_turns(res: Resources, ns: str, seconds: int, logdir: Path, tag: str) -> list:
    """Starts one counter per core (in `ns`; they send nothing); returns (process, log)."""
    counters = []
    for core in range(len(os.sched_getaffinity(0))):
        logfile = logdir / f"workload-{tag}-{core}.log"
        proc = res.spawn(ns, ["python3", "-c", COUNTER, str(seconds)], logfile)
        counters.append((proc, logfile))
    return counters


def total_turns(counters: list, seconds: int) -> int:
    total = 0
    for proc, logfile in counters:
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired as err:
            raise BenchError(f"a workload counter did not end:\n{log_tail(logfile)}") from err
        text = logfile.read_text().strip()
        if proc.returncode != 0 or not text.isdigit():
            raise BenchError(f"a workload counter failed ({proc.returncode}):\n{log_tail(logfile)}")
        total += int(text)
    return total


def measure_workload_share(
    res: Resources, testbed: Testbed, test: str, duration: int, json_path: Path, logdir: Path
) -> Run:
    """The counters alone, then beside the test's transfer (measured as that test's own
    run is, drop counters included); `work_kept_pct` is the second count as a share of
    the first."""
    tag = json_path.stem
    alone = total_turns(
        count_turns(res, testbed.client_ns, duration, logdir, f"{tag}-alone"), duration
    )
    counters: list = []

    def start_counters() -> None:
        counters.extend(count_turns(res, testbed.client_ns, duration, logdir, f"{tag}-beside"))

    load = WORKLOAD_LOADS[test]
    run = measure_run(res, testbed, load, duration, json_path, logdir, beside=start_counters)
    beside = total_turns(counters, duration)
    run.work_kept_pct = 100.0 * beside / alone if alone else None
    return run
