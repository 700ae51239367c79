"""iperf3 runs through a testbed, the daemons' CPU time, the kernel's UDP drop
counters on the way, the highest UDP rate with little loss, and ping round trips idle
and under load."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Callable

from .common import BenchError, cpu_seconds, in_ns, log_tail, run_cmd, stop_process, wait_until
from .model import CPU_TEST, UDP_FIXED_RATES, Run
from .topology import Resources, TUNNEL_PORT, Testbed

TEST_ARGS = {
    "tcp": [],
    "tcp4": ["-P", "4"],
    "reverse": ["-R"],
    "udp": ["-u", "-b", "0", "-l", "1300"],
    **{test: ["-u", "-b", f"{rate}M", "-l", "1300"] for test, rate in UDP_FIXED_RATES.items()},
}
# The highest offered UDP rate with loss under MAX_LOSS_PCT: doubled from the first
# rate until the loss is too high (or MAX_RATE), then bisected; at most MAX_PROBES runs
# of at most PROBE_SECONDS each.
MAX_LOSS_PCT = 1.0
FIRST_RATE_MBPS = 250
MAX_RATE_MBPS = 8000
MAX_PROBES = 9
PROBE_SECONDS = 5
# Latency: PINGS pings every PING_INTERVAL seconds (1,000 at 10 ms).
PINGS = 1000
PING_INTERVAL = "0.01"
IPERF_PORT = 5201
PAUSE_BETWEEN_RUNS = 0.5
CLIENT_SLACK = 30.0  # seconds an iperf3 client may take beyond --duration


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
    if not test.startswith("udp"):
        return end["sum_received"]["bits_per_second"], end["sum_received"]["seconds"], None
    loss = end["sum"]["lost_percent"]
    if "sum_received" in end:
        return end["sum_received"]["bits_per_second"], end["sum_received"]["seconds"], loss
    return end["sum"]["bits_per_second"] * (1 - loss / 100), end["sum"]["seconds"], loss


def run_iperf_client(testbed: Testbed, args: list[str], duration: int) -> str:
    argv = f"iperf3 -c {testbed.server_addr} -p {IPERF_PORT} -t {duration} --json".split()
    argv += args
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
    res: Resources,
    testbed: Testbed,
    test: str,
    duration: int,
    json_path: Path,
    logdir: Path,
    args: list[str] | None = None,
    beside: Callable[[], None] | None = None,
) -> Run:
    """One iperf3 run of `test` (with `args` instead of the test's own, if given);
    `beside` is called just before the client starts."""
    udp = test.startswith("udp")
    server = start_iperf_server(res, testbed, logdir / f"iperf3-server-{json_path.stem}.log")
    pids = [p.pid for p in testbed.daemons]
    drops_before = drop_counters(testbed) if udp else {}
    cpu_before = [cpu_seconds(pid) for pid in pids]
    if beside is not None:
        beside()
    output = run_iperf_client(testbed, args if args is not None else TEST_ARGS[test], duration)
    cpu_after = [cpu_seconds(pid) for pid in pids]
    drops_after = drop_counters(testbed) if udp else {}
    stop_process(server)
    json_path.write_text(output)
    data = json.loads(output)
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    bits, seconds, loss = received_rate(test, data)
    run = Run(gbps=bits / 1e9, seconds=seconds, json_file=json_path.name, loss_pct=loss)
    if udp:
        run.datagrams_sent = data["end"]["sum"].get("packets")
        run.sent_gbps = data["end"]["sum"]["bits_per_second"] / 1e9
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
    if run.rtt_p99_ms is not None:
        return (
            f"RTT p50 {run.rtt_p50_ms:.3f} ms, p99 {run.rtt_p99_ms:.3f} ms, "
            f"{run.pings_lost} of {PINGS} lost"
        )
    text = f"{run.gbps:.3f} Gbit/s"
    if run.work_kept_pct is not None:
        text = f"workloads kept {run.work_kept_pct:.0f} % of their work, transfer " + text
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


def measure_udp_max(
    res: Resources, testbed: Testbed, duration: int, json_path: Path, logdir: Path
) -> Run:
    """The probe at the highest offered rate that iperf3 really sent (at least 95 % of
    it) with loss under MAX_LOSS_PCT; its received rate is the result."""
    seconds = min(duration, PROBE_SECONDS)
    good, bad, rate = 0, None, FIRST_RATE_MBPS
    best: Run | None = None
    probes: list[str] = []
    for _ in range(MAX_PROBES):
        path = json_path.with_name(f"{json_path.stem}-{rate}M.json")
        args = ["-u", "-b", f"{rate}M", "-l", "1300"]
        run = measure_run(res, testbed, "udpmax", seconds, path, logdir, args)
        loss = run.loss_pct if run.loss_pct is not None else 100.0
        sent = run.sent_gbps or 0.0
        probes.append(f"{rate}M offered: sent {sent:.3f} Gbit/s, {loss:.2f} % lost")
        if loss < MAX_LOSS_PCT and sent >= 0.95 * rate / 1000:
            good, best = rate, run
        else:
            bad = rate
        if bad is None:
            if rate >= MAX_RATE_MBPS:
                break
            rate = min(rate * 2, MAX_RATE_MBPS)
        elif bad - good <= max(25, good // 20):
            break
        else:
            rate = (good + bad) // 2
        time.sleep(PAUSE_BETWEEN_RUNS)
    json_path.write_text(json.dumps({"probes": probes, "highest_mbps": good}) + "\n")
    received = best.gbps if best else 0.0
    return Run(gbps=received, seconds=seconds, json_file=json_path.name)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted `values`."""
    rank = max(1, math.ceil(share * len(values)))
    return values[rank - 1]


def measure_latency(
    res: Resources, testbed: Testbed, test: str, json_path: Path, logdir: Path
) -> Run:
    """PINGS pings client -> server through the tunnel; for `pingload`, while iperf3
    sends TCP from the server to the client (-R) the whole time."""
    load = None
    if test == "pingload":
        server = start_iperf_server(res, testbed, logdir / f"iperf3-server-{json_path.stem}.log")
        # Stopped when the pings end; long enough for pings slowed by a busy machine.
        seconds = int(PINGS * float(PING_INTERVAL)) * 4 + 10
        argv = f"iperf3 -c {testbed.server_addr} -p {IPERF_PORT} -t {seconds} -R".split()
        load_log = logdir / f"iperf3-load-{json_path.stem}.log"
        load = res.spawn(testbed.client_ns, argv, load_log)
        time.sleep(1.0)
    try:
        argv = ["ping", "-n", "-c", str(PINGS), "-i", PING_INTERVAL, "-W", "1"]
        done = subprocess.run(
            in_ns(testbed.client_ns, [*argv, testbed.server_addr]),
            capture_output=True,
            text=True,
            timeout=PINGS * float(PING_INTERVAL) + CLIENT_SLACK,
        )
        if load is not None and load.poll() is not None:
            raise BenchError(
                "the load's iperf3 ended before the pings did: no load measured:\n"
                + log_tail(load_log)
            )
    finally:
        if load is not None:
            stop_process(load)
            stop_process(server)
    # In the order the pings were sent, so that a slow stretch shows where it was.
    # A duplicated reply ("DUP!") is not a second answer.
    rtts_in_order = [
        float(part.split("=", 1)[1])
        for line in done.stdout.splitlines()
        if "DUP!" not in line
        for part in line.split()
        if part.startswith("time=")
    ]
    json_path.write_text(json.dumps({"rtt_ms": rtts_in_order, "sent": PINGS}) + "\n")
    rtts = sorted(rtts_in_order)
    if not rtts:
        raise BenchError(f"no ping answered: {done.stdout[-300:]} {done.stderr.strip()}")
    return Run(
        gbps=0.0,
        seconds=PINGS * float(PING_INTERVAL),
        json_file=json_path.name,
        rtt_p50_ms=percentile(rtts, 0.50),
        rtt_p99_ms=percentile(rtts, 0.99),
        pings_lost=PINGS - len(rtts),
    )
