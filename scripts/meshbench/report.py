"""The results as a markdown table with ratios, a JSON summary and a PNG chart."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .common import BenchError, REPO_ROOT, find_program, log, run_cmd
from .iperf import DROP_PLACES, loss_places
from .model import (
    CPU_TEST,
    LATENCY_TESTS,
    METRICS,
    Options,
    PEER_SYSTEMS,
    SystemResult,
    WORKLOAD_TESTS,
)
from .topology import TUNNEL_MTU

# Where matplotlib goes when pip may not install into the running interpreter.
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
MATPLOTLIB_DIR = Path.home() / ".cache" / "meshguard-bench" / f"python{PYTHON_VERSION}"


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def median_loss(runs: list) -> dict:
    """{"loss_pct": median} of the runs that measured loss, or nothing."""
    losses = [r.loss_pct for r in runs if r.loss_pct is not None]
    return {"loss_pct": statistics.median(losses)} if losses else {}


def column_values(result: SystemResult) -> dict[str, dict]:
    """Per metric: median, min, max (and loss for UDP), from the runs that exist."""
    values: dict[str, dict] = {}
    for test, runs in result.runs.items():
        if not runs:
            continue
        if test in LATENCY_TESTS:
            p99 = [r.rtt_p99_ms for r in runs if r.rtt_p99_ms is not None]
            p50 = [r.rtt_p50_ms for r in runs if r.rtt_p50_ms is not None]
            if p99:
                values[test] = {
                    **spread(p99),
                    "p50": statistics.median(p50),
                    "lost": sum(r.pings_lost or 0 for r in runs),
                }
        elif test in WORKLOAD_TESTS:
            kept = [r.work_kept_pct for r in runs if r.work_kept_pct is not None]
            if kept:
                values[test] = {
                    **spread(kept),
                    "gbps": statistics.median(r.gbps for r in runs),
                    **median_loss(runs),
                }
        else:
            values[test] = {**spread([r.gbps for r in runs]), **median_loss(runs)}
    cpu_runs = result.runs.get(CPU_TEST, [])
    for key in ("cpu", "cpu_per_gbit"):
        samples = [getattr(r, key) for r in cpu_runs if getattr(r, key) is not None]
        if samples:
            values[key] = spread(samples)
    return values


def format_cell(metric: str, value: dict | None) -> str:
    if value is None:
        return "—"
    if metric == "cpu":
        return f"{value['median'] * 100:.0f} %"
    if metric == "cpu_per_gbit":
        return f"{value['median']:.2f}"
    if metric in WORKLOAD_TESTS:
        text = f"{value['median']:.0f} %"
        if value["max"] > value["min"]:
            text += f" [{value['min']:.0f}–{value['max']:.0f}]"
        text += f" ({value['gbps']:.2f} Gbit/s"
        if "loss_pct" in value:
            text += f", {value['loss_pct']:.1f} % loss"
        return text + ")"
    if metric in LATENCY_TESTS:
        text = f"{value['p50']:.3f} / {value['median']:.3f} ms"
        return text + (f" ({value['lost']} lost)" if value["lost"] else "")
    text = f"{value['median']:.2f}"
    if value["max"] > value["min"]:
        text += f" [{value['min']:.2f}–{value['max']:.2f}]"
    if "loss_pct" in value:
        text += f" ({value['loss_pct']:.1f} % loss)"
    return text


def metric_text(metric: str, median: float) -> str:
    if metric == "cpu":
        return f"{median * 100:.0f} %"
    if metric == "cpu_per_gbit":
        return f"{median:.2f} CPU-s/Gbit"
    if metric in LATENCY_TESTS:
        return f"{median:.3f} ms p99"
    if metric in WORKLOAD_TESTS:
        return f"{median:.0f} % kept"
    return f"{median:.2f} Gbit/s"


def ratio_lines(columns: dict[str, dict[str, dict]]) -> list[str]:
    """meshguard against the best peer and against veth, per metric."""
    mine = columns.get("meshguard", {})
    lines = []
    for metric, title, higher_better in METRICS:
        if metric not in mine:
            continue
        ours = mine[metric]["median"]
        peers = [
            (s, columns[s][metric]["median"]) for s in PEER_SYSTEMS if metric in columns.get(s, {})
        ]
        parts = []
        if peers:
            pick = max if higher_better else min
            best, theirs = pick(peers, key=lambda p: p[1])
            ratio = f"{ours / theirs:.2f}×" if theirs else "n/a"
            parts.append(f"{ratio} best peer ({best}, {metric_text(metric, theirs)})")
        veth = columns.get("veth", {}).get(metric)
        if veth and veth["median"]:
            parts.append(
                f"{ours / veth['median']:.2f}× veth ({metric_text(metric, veth['median'])})"
            )
        if parts:
            better = "higher" if higher_better else "lower"
            lines.append(
                f"- {title} ({better} is better): meshguard {metric_text(metric, ours)} = "
                + ", ".join(parts)
            )
    return lines


def udp_loss_lines(results: list[SystemResult]) -> list[str]:
    """Per system, where the UDP run with the median loss lost its datagrams."""
    lines = []
    for result in results:
        runs = sorted(
            (r for r in result.runs.get("udp", []) if r.drops is not None),
            key=lambda r: r.loss_pct or 0.0,
        )
        if runs:
            median = runs[len(runs) // 2]
            lines.append(
                f"- {result.name}: {median.loss_pct:.1f} % lost of "
                f"{median.datagrams_sent} sent: {loss_places(median)}"
            )
    return lines


def markdown_report(results: list[SystemResult], opts: Options, machine: dict) -> str:
    columns = {r.name: column_values(r) for r in results}
    measured = [
        (metric, title)
        for metric, title, _ in METRICS
        if any(metric in columns[r.name] for r in results)
    ]
    headings = [title for _, title in measured]
    lines = [
        f"# meshguard throughput, {machine['date']}",
        "",
        f"{machine['description']}; meshguard {machine['meshguard_commit']}. "
        f"iperf3 {opts.duration} s × {opts.runs} runs, Gbit/s received, median [min–max]; "
        "UDP with 1300-byte datagrams, at full speed (-b 0: a sender outrunning two cores) "
        "and at fixed offered rates, with the median loss. UDP max rate: the received rate "
        "at the highest offered rate iperf3 really sent with loss under 1 % (doubling, "
        "then bisection; 5 s probes). Ping: "
        "1,000 pings at 10 ms through the tunnel, p50 / p99 of the round trip, idle and "
        "while iperf3 sends TCP the other way. "
        "Daemon CPU: both daemons summed during the TCP 1-stream runs (100 % = one core)."
        + (
            " Workloads' work kept: one CPU-bound process per core counts loop turns beside "
            "the transfer, as a share of its count alone (the transfer's rate and loss in "
            "brackets)."
            if any(t in WORKLOAD_TESTS for t in opts.tests)
            else ""
        ),
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in machine["versions"].items()) + ".",
        "",
        "| System | " + " | ".join(headings) + " |",
        "|---|" + "---:|" * len(headings),
    ]
    for result in results:
        if result.status == "skipped":
            continue
        cells = [format_cell(m, columns[result.name].get(m)) for m, _ in measured]
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    lines.append("")
    ratios = ratio_lines(columns)
    if ratios:
        lines += ["Ratios, medians (meshguard ÷ other):", *ratios, ""]
    losses = udp_loss_lines(results)
    if losses:
        places = "; ".join(f"{k}: {v}" for k, v in DROP_PLACES.items())
        lines += [
            "UDP loss by place, in the run with the median loss, as shares of the datagrams sent "
            f"(kernel counters; {places}):",
            *losses,
            "",
        ]
    notes = [
        f"- {r.name}: {r.status}: {r.reason.splitlines()[0]}" for r in results if r.status != "ok"
    ]
    notes += [f"- {r.name}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def machine_info(now: datetime.datetime) -> dict:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = platform.uname().release
    cpus = len(os.sched_getaffinity(0))
    return {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": kernel,
        "nproc": cpus,
        "cpu_model": model,
        "description": f"Linux {kernel}, {cpus} CPUs ({model})",
        "meshguard_commit": git_commit(),
        "versions": tool_versions(),
    }


def tool_versions() -> dict[str, str]:
    """First line of `<program> --version` for the programs measured against."""
    versions = {}
    for program in ("iperf3", "boringtun-cli", "wireguard-go"):
        binary = find_program(program)
        if binary:
            try:
                versions[program] = run_cmd([binary, "--version"]).splitlines()[0].strip()
            except (BenchError, IndexError):
                versions[program] = "unknown"
    return versions


def git_commit() -> str:
    try:
        head = run_cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run_cmd(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]
        ).strip()
    except BenchError:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def write_summary(path: Path, results: list[SystemResult], opts: Options, machine: dict) -> None:
    columns = {r.name: column_values(r) for r in results}
    summary = {
        "command": sys.argv,
        "machine": machine,
        "options": {
            "duration": opts.duration,
            "runs": opts.runs,
            "systems": opts.systems,
            "tests": opts.tests,
        },
        "units": {
            "gbps": "Gbit/s received (udpmax: at the highest offered rate with loss under 1 %)",
            "rtt_ms": "ping round trip, milliseconds (ping, pingload)",
            "work_kept_pct": "the workloads' loop turns beside the transfer, % of alone "
            "(cpushare, cpushare1g)",
            "cpu": "CPU-seconds per second (1.0 = one core)",
            "cpu_per_gbit": "CPU-seconds per Gbit",
        },
        "systems": {r.name: {**asdict(r), "columns": columns[r.name]} for r in results},
        "ratios": ratio_lines(columns),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def install_matplotlib() -> bool:
    """pip install --quiet matplotlib; where the interpreter is externally managed
    (Debian's /usr/bin/python3, e.g. under sudo), into MATPLOTLIB_DIR instead."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
    log("matplotlib missing: pip install --quiet matplotlib")
    if subprocess.run(pip, capture_output=True).returncode == 0:
        return True
    log(f"pip may not install into {sys.executable}; trying --target {MATPLOTLIB_DIR}")
    return subprocess.run([*pip, "--target", str(MATPLOTLIB_DIR)]).returncode == 0


def matplotlib_importable() -> bool:
    importlib.invalidate_caches()
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def load_pyplot():
    """matplotlib.pyplot with the Agg backend, installed with pip if missing; or None."""
    if not matplotlib_importable():
        sys.path.append(str(MATPLOTLIB_DIR))  # an earlier --target install
        if not matplotlib_importable() and not (install_matplotlib() and matplotlib_importable()):
            log("could not install matplotlib: no chart written")
            return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_chart(path: Path, results: list[SystemResult], opts: Options, machine: dict) -> bool:
    plt = load_pyplot()
    if plt is None:
        return False
    columns = {r.name: column_values(r) for r in results if r.runs}
    systems = list(columns)
    tests = [
        t
        for t in opts.tests
        if t not in LATENCY_TESTS + WORKLOAD_TESTS and any(t in columns[s] for s in systems)
    ]
    if not systems or not tests:
        log("nothing measured: no chart written")
        return False
    titles = {key: title for key, title, _ in METRICS}
    width = 0.8 / len(tests)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(systems)), 5.5))
    for i, test in enumerate(tests):
        cells = [columns[s].get(test) for s in systems]
        medians = [c["median"] if c else 0 for c in cells]
        errors = [
            [c["median"] - c["min"] if c else 0 for c in cells],
            [c["max"] - c["median"] if c else 0 for c in cells],
        ]
        xs = [x + (i - (len(tests) - 1) / 2) * width for x in range(len(systems))]
        bars = ax.bar(xs, medians, width, yerr=errors, capsize=3, label=titles[test])
        ax.bar_label(
            bars,
            labels=[f"{m:.2f}" if c else "" for m, c in zip(medians, cells)],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(systems)), systems)
    ylabel = "Gbit/s received (median; whiskers min–max)"
    positive = [
        c["median"] for s in systems for t in tests if (c := columns[s].get(t)) and c["median"] > 0
    ]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")  # veth would flatten the tunnels on a linear axis
        ylabel += ", log scale"
    ax.yaxis.set_major_formatter("{x:g}")
    ax.set_ylabel(ylabel)
    ax.set_title(f"meshguard throughput benchmark, {machine['date']}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.text(
        0.01,
        0.01,
        f"{machine['description']}; meshguard {machine['meshguard_commit']}; "
        f"iperf3 {opts.duration} s × {opts.runs}; tunnel MTU {TUNNEL_MTU} over veth",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(results: list[SystemResult], opts: Options, machine: dict) -> None:
    report = markdown_report(results, opts, machine)
    print(report)
    (opts.out / "table.md").write_text(report)
    write_summary(opts.out / "summary.json", results, opts, machine)
    chart = write_chart(opts.out / "chart.png", results, opts, machine)
    log(
        f"results in {opts.out}: table.md, summary.json, {'chart.png, ' if chart else ''}"
        "<system>-<test>-<run>.json"
    )
