"""Every test of one system, run by run."""

from __future__ import annotations

import time
from pathlib import Path

from .common import log
from .iperf import (
    PAUSE_BETWEEN_RUNS,
    check_daemons_alive,
    describe_run,
    measure_latency,
    measure_run,
    measure_udp_max,
)
from .model import LATENCY_TESTS, WORKLOAD_TESTS, Options, SystemResult
from .topology import Resources, Testbed
from .workload import measure_workload_share


def measure_system(
    res: Resources, testbed: Testbed, opts: Options, result: SystemResult, logdir: Path
) -> None:
    for test in opts.tests:
        runs = result.runs.setdefault(test, [])
        for number in range(1, opts.runs + 1):
            json_path = opts.out / f"{result.name}-{test}-{number}.json"
            if test in LATENCY_TESTS:
                run = measure_latency(res, testbed, test, json_path, logdir)
            elif test in WORKLOAD_TESTS:
                run = measure_workload_share(
                    res, testbed, test, opts.duration, json_path, logdir
                )
            elif test == "udpmax":
                run = measure_udp_max(res, testbed, opts.duration, json_path, logdir)
            else:
                run = measure_run(res, testbed, test, opts.duration, json_path, logdir)
            check_daemons_alive(testbed)
            runs.append(run)
            log(f"[{result.name}] {test} run {number}/{opts.runs}: {describe_run(run)}")
            time.sleep(PAUSE_BETWEEN_RUNS)
