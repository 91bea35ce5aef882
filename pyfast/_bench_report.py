"""`pyfast bench` internals: run the pytest-benchmark suites in-process behind a progress bar,
describe the machine, and turn the results into tables (terminal, markdown) and JSON.

A benchmark reports through ``benchmark.extra_info`` (see bench/conftest.py): ``suite``,
``workload``, ``provider`` (pyfast | reference | torch-native | another library, e.g. gpytorch),
``bytes_moved``, ``sizes``, ``device``. Each table row is one workload: the provider medians,
pyfast's speedup over the others, pyfast's achieved bandwidth (bytes moved / median) and, where
the device's copy bandwidth is known, the fraction of the memory floor reached (floor = bytes moved / bandwidth).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import pyfast

PROVIDERS = ("pyfast", "reference", "torch-native")
NOISY_IQR = 0.5  # a time is marked * when its interquartile range exceeds this fraction of its median

# Device-copy bandwidth (bytes/s, read + write counted) for GPUs we have a measured figure for:
# ANCHORS.md, H100 80GB (SXM, HBM3): 3.0 TB/s. Other GPUs: `pyfast bench --bandwidth TB/s`.
COPY_BANDWIDTH = {"H100 80GB HBM3": 3.0e12}


# --------------------------------------------------------------------------- machine description
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # not installed, or a broken install
        return None


def gpu_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> Dict[str, str]:
    env = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "pyfast": pyfast.__version__,
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu threads": f"{torch.get_num_threads()} (torch) of {os.cpu_count()}",
    }
    if hasattr(os, "getloadavg"):
        env["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update({"gpu": props.name, "capability": f"sm_{props.major}{props.minor}",
                    "gpu memory": f"{props.total_memory / 2**30:.0f} GiB",
                    "cuda (torch build)": str(torch.version.cuda), "driver": gpu_driver()})
    return env


def copy_bandwidth(env: Dict[str, str], override_tbps: Optional[float]) -> Optional[float]:
    if override_tbps:
        return override_tbps * 1e12
    gpu = env.get("gpu", "")
    return next((bw for name, bw in COPY_BANDWIDTH.items() if name in gpu), None)


# --------------------------------------------------------------------------- running the suites
class _ProgressPlugin:
    """One progress tick per benchmark; remembers the failures."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = progress.add_task("collecting", total=None)
        self.failures: List[Tuple[str, str]] = []

    def pytest_collection_finish(self, session):
        self.progress.update(self.task, total=len(session.items), description="benchmarks")

    def pytest_runtest_logstart(self, nodeid, location):
        self.progress.update(self.task, description=nodeid.split("::")[-1])

    def pytest_runtest_logreport(self, report):
        if report.failed:
            crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
            self.failures.append((report.nodeid, crash or report.longreprtext[-1500:]))
        # A test ends after its call, or at setup when that failed or skipped it.
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.progress.advance(self.task)


def run_suites(bench_dir: Path, target: Path, json_path: Path, console: Console) -> Tuple[int, List[str]]:
    """pytest over ``target`` (``bench_dir`` or a family in it) in this process, writing
    pytest-benchmark's JSON to ``json_path``; returns pytest's exit code and the failed tests.
    pytest's own output is hidden; failures are printed.
    ``--capture=sys`` leaves file descriptor 1 to the progress bar."""
    import pytest  # here: `pyfast info` need not pay for importing it
    args = [str(target), "-q", "-p", "no:cacheprovider", "--capture=sys", f"--rootdir={bench_dir}",
            f"--benchmark-json={json_path}", "--benchmark-quiet"]
    captured = io.StringIO()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        plugin = _ProgressPlugin(progress)
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            code = int(pytest.main(args, plugins=[plugin]))
    for nodeid, text in plugin.failures:
        console.print(f"FAILED {nodeid}: {text}", style="red", markup=False, highlight=False)
    if code not in (0, 5) and not plugin.failures:  # usage or collection errors
        console.print(captured.getvalue()[-6000:])
    return code, [nodeid for nodeid, _ in plugin.failures]


# --------------------------------------------------------------------------- results
def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _percent(x: float) -> str:
    return f"{x:.0%}" if x >= 0.1 else f"{x:.1%}" if x >= 0.001 else f"{x * 100:.2g}%"


def git_commit(checkout: Path) -> Optional[str]:
    """The checkout's commit (with ``+dirty`` when it has local changes), if git can tell."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=checkout, capture_output=True, text=True, timeout=20)  # noqa: E731
        head = run("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Row:
    suite: str
    workload: str
    sizes: Dict[str, object]
    bytes_moved: int
    stats: Dict[str, Dict[str, float]] = field(default_factory=dict)  # provider -> stats

    def median(self, provider: str) -> Optional[float]:
        return self.stats[provider]["median"] if provider in self.stats else None

    def noisy(self, provider: str) -> bool:
        """The rounds spread widely: interquartile range above half the median."""
        s = self.stats.get(provider)
        return bool(s) and s["rounds"] >= 4 and s["iqr"] > NOISY_IQR * s["median"]

    def speedup(self, other: str) -> Optional[float]:
        mine, theirs = self.median("pyfast"), self.median(other)
        return theirs / mine if mine and theirs else None


@dataclass
class Report:
    rows: List[Row]
    environment: Dict[str, str]
    bandwidth: Optional[float]  # bytes/s of a device copy, when known
    skipped: List[str] = field(default_factory=list)

    @classmethod
    def from_pytest_benchmark(cls, results: dict, env: Dict[str, str], bandwidth: Optional[float]) -> "Report":
        rows: Dict[Tuple[str, str], Row] = {}
        skipped = []
        for bench in results.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if not {"suite", "workload", "provider", "bytes_moved"} <= set(info):
                skipped.append(bench.get("fullname", bench.get("name", "?")))
                continue
            key = (info["suite"], info["workload"])
            row = rows.setdefault(key, Row(info["suite"], info["workload"], info.get("sizes", {}), info["bytes_moved"]))
            s = bench["stats"]
            row.stats[info["provider"]] = {k: s[k] for k in ("median", "mean", "min", "max", "stddev", "iqr", "rounds")}
        return cls(list(rows.values()), env, bandwidth, skipped)

    def suites(self) -> Dict[str, List[Row]]:
        by_suite: Dict[str, List[Row]] = {}
        for row in self.rows:
            by_suite.setdefault(row.suite, []).append(row)
        return by_suite

    @staticmethod
    def providers(rows: List[Row]) -> List[str]:
        """pyfast, reference, torch-native, then any other provider of these rows (e.g. gpytorch)."""
        others = sorted({p for row in rows for p in row.stats} - set(PROVIDERS))
        return [*PROVIDERS, *others]

    @staticmethod
    def header(providers: List[str]) -> List[str]:
        return ["workload", "MB moved", *providers, *(f"vs {p}" for p in providers[1:]), "pyfast GB/s", "of memory floor"]

    def cells(self, row: Row, providers: List[str], color: bool) -> List[str]:
        """One table row; ``color``: rich markup for the terminal, else plain markdown."""
        def ratio(other: str) -> str:
            x = row.speedup(other)
            if x is None:
                return "-"
            text = f"{x:.2f}x"
            return f"[{'green' if x >= 1 else 'red'}]{text}[/]" if color else text

        def timing(provider: str) -> str:
            text = fmt_time(row.median(provider))
            return text + ("*" if color else "\\*") if row.noisy(provider) else text  # markdown escapes *

        fast = row.median("pyfast")
        floor = row.bytes_moved / self.bandwidth if self.bandwidth else None
        return [row.workload, f"{row.bytes_moved / 1e6:,.1f}", *(timing(p) for p in providers),
                *(ratio(p) for p in providers[1:]),
                f"{row.bytes_moved / fast / 1e9:.1f}" if fast else "-",
                _percent(floor / fast) if floor and fast else "-"]

    def tables(self) -> List[Table]:
        out = []
        for suite, rows in self.suites().items():
            table = Table(title=f"{suite}\nmedian times on {self._device_name()}", title_justify="left")
            providers = self.providers(rows)
            for name in self.header(providers):
                table.add_column(name, justify="left" if name == "workload" else "right")
            for row in rows:
                table.add_row(*self.cells(row, providers, color=True))
            out.append(table)
        return out

    def _device_name(self) -> str:
        env = self.environment
        return env["gpu"] if "gpu" in env else f"{env['cpu']}, {env['cpu threads']} threads"

    def floor_note(self) -> str:
        if self.bandwidth:
            note = f"memory floor = bytes moved / {self.bandwidth / 1e12:.2f} TB/s device-copy bandwidth"
        else:
            note = "of memory floor: no copy-bandwidth figure for this device (pass --bandwidth TB/s)"
        if any(row.noisy(p) for row in self.rows for p in row.stats):
            note += f"; * noisy: interquartile range over {NOISY_IQR:.0%} of the median"
        return note

    def markdown(self) -> str:
        env = self.environment
        lines = [f"# pyfast {env['pyfast']} benchmarks: {self._device_name()}, {env['date']}", ""]
        lines += [f"- {key}: {value}" for key, value in env.items()]
        lines += ["", "Median times (pytest-benchmark, one call per round, CUDA synchronized inside the timed call); "
                  "`vs X` = X's median / pyfast's median; " + self.floor_note() + ".", ""]
        for suite, rows in self.suites().items():
            providers = self.providers(rows)
            header = self.header(providers)
            lines += [f"## {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
            lines += ["| " + " | ".join(self.cells(row, providers, color=False)) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "environment": self.environment,
            "copy_bandwidth_bytes_per_s": self.bandwidth,
            "results": [{
                "suite": r.suite, "workload": r.workload, "sizes": r.sizes, "bytes_moved": r.bytes_moved,
                "memory_floor_s": r.bytes_moved / self.bandwidth if self.bandwidth else None,
                "seconds": r.stats,
                "speedup_vs": {p: r.speedup(p) for p in self.providers([r])[1:]},
            } for r in self.rows],
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def write_gpu_results(self, directory: Path) -> Tuple[Path, Path]:
        """``<gpu-slug>-<date>.json`` and ``.md`` in ``directory`` (``-2``, ``-3``... on the same day)."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.environment.get("gpu", "gpu").lower()).strip("-")
        stem, n = f"{slug}-{self.environment['date']}", 1
        while (directory / f"{stem}.json").exists() or (directory / f"{stem}.md").exists():
            n += 1
            stem = f"{slug}-{self.environment['date']}-{n}"
        md = directory / f"{stem}.md"
        json_path = self.write_json(directory / f"{stem}.json")
        md.write_text(self.markdown())
        return json_path, md


def console_for(stream=None) -> Console:
    """A console bound to the real stream (pytest's output is redirected while it runs); wide
    tables also in files and CI logs."""
    stream = stream or sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 180)
