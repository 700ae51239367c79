"""What the benchmark measures and the records it keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ALL_SYSTEMS = ("veth", "meshguard", "boringtun", "boringtun-1t", "wireguard-go")
# On request only: meshguard with its admin listener on and /metrics scraped every second
# on both nodes, to compare with plain `meshguard` in the same run.
EXTRA_SYSTEMS = ("meshguard-metrics",)
PEER_SYSTEMS = ("boringtun", "boringtun-1t", "wireguard-go")
ALL_TESTS = (
    "tcp",
    "tcp4",
    "reverse",
    "udp",
    "udp500m",
    "udp1g",
    "udp2g",
    "udpmax",
    "ping",
    "pingload",
)
# On request only: CPU-bound workloads, one per core, beside TCP (cpushare) or UDP at 1
# Gbit/s (cpushare1g) through the tunnel: the share of their work alone they keep.
WORKLOAD_TESTS = ("cpushare", "cpushare1g")
# UDP at a fixed offered rate (Mbit/s), 1300-byte datagrams: received rate and loss.
UDP_FIXED_RATES = {"udp500m": 500, "udp1g": 1000, "udp2g": 2000}
# Round-trip times through the tunnel (ms), idle and while TCP runs the other way.
LATENCY_TESTS = ("ping", "pingload")
# The test during which the daemons' CPU time is measured.
CPU_TEST = "tcp"
# Table columns: key, heading, whether a larger value is better.
METRICS = (
    ("tcp", "TCP 1 stream", True),
    ("tcp4", "TCP 4 streams", True),
    ("reverse", "TCP reverse", True),
    ("udp", "UDP -b 0 received", True),
    ("udp500m", "UDP at 0.5 Gbit/s", True),
    ("udp1g", "UDP at 1 Gbit/s", True),
    ("udp2g", "UDP at 2 Gbit/s", True),
    ("udpmax", "UDP max rate with loss < 1 %", True),
    ("ping", "Ping RTT idle, p50 / p99", False),
    ("pingload", "Ping RTT under TCP load, p50 / p99", False),
    ("cpushare", "Workloads' work kept beside TCP", True),
    ("cpushare1g", "Workloads' work kept beside UDP at 1 Gbit/s", True),
    ("cpu", "Daemon CPU", False),
    ("cpu_per_gbit", "CPU-s per Gbit", False),
)


@dataclass
class Run:
    """One iperf3 run."""

    gbps: float  # received, Gbit/s
    seconds: float  # test duration as iperf3 measured it
    json_file: str
    loss_pct: float | None = None  # UDP only
    sent_gbps: float | None = None  # UDP only: the rate iperf3 managed to send
    cpu: float | None = None  # daemon CPU-seconds per second, all daemons summed
    cpu_per_gbit: float | None = None
    # UDP only: datagrams iperf3 sent, and where the kernel dropped datagrams on the way.
    datagrams_sent: int | None = None
    drops: dict[str, int] | None = None
    # Latency tests: round-trip percentiles (ms) of the answered pings, and the lost ones.
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    pings_lost: int | None = None
    # Workload tests: the workloads' count beside the transfer, as a % of it alone.
    work_kept_pct: float | None = None


@dataclass
class SystemResult:
    name: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    duration: int
    runs: int
    systems: list[str]
    tests: list[str]
    out: Path
    build: bool
    interface: dict[str, int | str] = field(default_factory=dict)  # extra [interface] keys
