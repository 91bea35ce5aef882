"""Runs the pytest-benchmark suites with a progress bar and turns their JSON into the
pyfast-vs-reference-vs-torch table, the JSON and markdown files of `pyfast bench`."""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import pyfast

PROVIDERS = ("pyfast", "reference", "torch-native")
# Device-copy bandwidth (read + write, bytes/s) measured on GPUs we have figures for.
COPY_BANDWIDTH = {"H100": 3.0e12}


class _ProgressPlugin:
    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def pytest_collection_finish(self, session):
        self.task = self.progress.add_task("benchmarks", total=len(session.items))

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.progress.advance(self.task)


def run_pytest_benchmarks(target: Path, json_path: Path, console: Console) -> int:
    """pytest over ``target`` in this process; its own output is shown only when it fails."""
    args = [str(target), "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}", f"--rootdir={target}"]
    captured = io.StringIO()
    with Progress(console=console, transient=True) as progress, contextlib.redirect_stdout(captured):
        code = pytest.main(args, plugins=[_ProgressPlugin(progress)])
    if code != 0:
        console.print(captured.getvalue()[-6000:])
    return int(code)


def _environment() -> Dict[str, str]:
    env = {
        "date": datetime.date.today().isoformat(),
        "pyfast": pyfast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "unavailable"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
        with contextlib.suppress(Exception):
            env["driver"] = str(torch.cuda.driver_version()) if hasattr(torch.cuda, "driver_version") else "unknown"
    return env


@dataclass
class Row:
    workload: str
    device: str
    bytes_moved: int
    median_s: Dict[str, float] = field(default_factory=dict)

    def floor_s(self, gpu: Optional[str]) -> Optional[float]:
        for name, bandwidth in COPY_BANDWIDTH.items():
            if gpu and name in gpu and self.device.startswith("cuda"):
                return self.bytes_moved / bandwidth
        return None


@dataclass
class Report:
    rows: List[Row]
    environment: Dict[str, str]

    @classmethod
    def from_pytest_benchmark(cls, results: dict) -> "Report":
        rows: Dict[str, Row] = {}
        for bench in results.get("benchmarks", []):
            info = bench["extra_info"]
            row = rows.setdefault(info["workload"], Row(info["workload"], info["device"], info["bytes_moved"]))
            row.median_s[info["provider"]] = bench["stats"]["median"]
        return cls(list(rows.values()), _environment())

    def _cells(self, row: Row) -> Tuple[str, ...]:
        ms = lambda p: f"{row.median_s[p] * 1e3:.3f}" if p in row.median_s else "-"  # noqa: E731
        ratio = lambda p: (f"{row.median_s[p] / row.median_s['pyfast']:.2f}x"  # noqa: E731
                           if p in row.median_s and "pyfast" in row.median_s else "-")
        fast = row.median_s.get("pyfast")
        gbps = f"{row.bytes_moved / fast / 1e9:.1f}" if fast else "-"
        floor = row.floor_s(self.environment.get("gpu"))
        of_floor = f"{floor / fast:.0%}" if floor and fast else "-"
        return (row.workload, ms("pyfast"), ms("reference"), ms("torch-native"), ratio("reference"),
                ratio("torch-native"), gbps, of_floor)

    HEADER = ("workload", "pyfast ms", "reference ms", "torch ms", "vs reference", "vs torch",
              "pyfast GB/s", "of memory floor")

    def table(self) -> Table:
        device = self.environment.get("gpu") or self.environment["cpu"]
        table = Table(title=f"pyfast {self.environment['pyfast']} on {device} (medians)")
        for name in self.HEADER:
            table.add_column(name, justify="left" if name == "workload" else "right")
        for row in self.rows:
            table.add_row(*self._cells(row))
        return table

    def markdown(self) -> str:
        lines = [f"# pyfast benchmarks, {self.environment.get('gpu', self.environment['cpu'])}", ""]
        lines += [f"- {key}: {value}" for key, value in self.environment.items()] + [""]
        lines += ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(self._cells(row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"environment": self.environment,
                "rows": [{"workload": r.workload, "device": r.device, "bytes_moved": r.bytes_moved,
                          "median_s": r.median_s} for r in self.rows]}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def write_gpu_results(self, directory: Path) -> Tuple[Path, Path]:
        slug = re.sub(r"[^a-z0-9]+", "-", self.environment.get("gpu", "gpu").lower()).strip("-")
        stem = directory / f"{slug}-{self.environment['date']}"
        self.write_json(stem.with_suffix(".json"))
        stem.with_suffix(".md").write_text(self.markdown())
        return stem.with_suffix(".json"), stem.with_suffix(".md")
