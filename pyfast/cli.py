"""`pyfast info | bench | check`: what is built and which backend runs, the benchmark suites, the
correctness suites."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
from rich.console import Console
from rich.table import Table

import pyfast
from pyfast import _backend, _ext

# Wide tables also when the output is a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


def _source_dir(name: str, given: Optional[str]) -> Path:
    """``bench`` or ``tests`` of a pyfast checkout: the given path, ./name, or beside the package."""
    candidates = [Path(given)] if given else [Path.cwd() / name, Path(pyfast.__file__).resolve().parents[1] / name]
    for path in candidates:
        if path.is_dir():
            return path
    raise SystemExit(f"pyfast: no {name}/ directory found (looked in {', '.join(map(str, candidates))}); "
                     f"run from a pyfast source checkout or pass --{name}-dir")


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as err:  # not installed, or a broken install
        return f"unavailable ({type(err).__name__})"


def _devices() -> List[str]:
    devices = [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return devices


def cmd_info(args) -> int:
    table = Table(title=f"pyfast {pyfast.__version__}", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("triton", _triton_version())
    for device in _devices():
        table.add_row("device", device)
    table.add_row("pyfast._C", "loaded" if _ext.cpu else f"missing: {_ext.cpu_error}")
    cuda_state = f"loaded (CUDA {_ext.cuda.runtime_version()}, archs {_ext.cuda.archs()})" if _ext.cuda else f"missing: {_ext.cuda_error}"
    table.add_row("pyfast._cuda", cuda_state)
    triton_ok, triton_why = _ext.triton_status()
    table.add_row("triton kernels", "usable" if triton_ok else f"unusable: {triton_why}")
    table.add_row("requested backend", pyfast.get_backend())
    console.print(table)

    samples = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float64)]
    if torch.cuda.is_available():
        samples += [("cuda", torch.bfloat16), ("cuda", torch.float32)]
    ops = Table(title="backend per op")
    ops.add_column("op")
    for device, dtype in samples:
        ops.add_column(f"{device} {str(dtype).replace('torch.', '')}")
    for name, kernels in sorted(_backend.registered_ops().items()):
        cells = []
        for device, dtype in samples:
            # Index ops are keyed by their id tensors.
            sample_dtype = torch.int32 if torch.int32 in kernels.dtypes.get("cpu", ()) else dtype
            try:
                choice = pyfast.backend_for(name, torch.empty(0, device=device, dtype=sample_dtype))
                cells.append(choice.backend if choice.backend != "reference" else f"reference ({choice.reason})")
            except RuntimeError as err:
                cells.append(f"[red]{err}[/red]")
        ops.add_row(name, *cells)
    console.print(ops)
    return 0


def cmd_bench(args) -> int:
    from . import _bench_report

    bench_dir = _source_dir("bench", args.bench_dir)
    target = bench_dir / args.family if args.family else bench_dir
    if not target.is_dir():
        raise SystemExit(f"pyfast bench: no benchmark family {args.family!r} in {bench_dir}")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("pyfast bench --gpu: no CUDA device is available")
    os.environ["PYFAST_BENCH_DEVICE"] = "cuda" if args.gpu else os.environ.get("PYFAST_BENCH_DEVICE", "")
    if args.quick:
        os.environ["PYFAST_BENCH_QUICK"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        code = _bench_report.run_pytest_benchmarks(target, raw, console)
        if not raw.exists():
            console.print(f"[red]pyfast bench: the benchmark run failed (pytest exit code {code})[/red]")
            return code or 1
        results = json.loads(raw.read_text())
    report = _bench_report.Report.from_pytest_benchmark(results)
    console.print(report.table())
    if args.json:
        report.write_json(Path(args.json))
    if args.gpu:
        json_path, md_path = report.write_gpu_results(bench_dir / "results")
        console.print(f"wrote {json_path} and {md_path}")
    return code


def cmd_check(args) -> int:
    tests = _source_dir("tests", args.tests_dir).resolve()

    def pytest(*extra: str, env=None) -> int:
        # Run from inside tests/: `python -m` puts the working directory on sys.path, and a
        # checkout's root would shadow the installed package (and its compiled modules).
        return subprocess.call([sys.executable, "-m", "pytest", str(tests), *extra], cwd=tests, env=env)

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("pyfast check --gpu: no CUDA device is available")
        return pytest("-m", "gpu or triton")
    code = pytest()
    triton_installed = _triton_version()[0].isdigit()
    if not triton_installed:
        console.print("[yellow]triton is not installed: skipping the Triton-interpreter suite[/yellow]")
        return code
    # The interpreter must be chosen before any Triton kernel is defined: a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    interpreted = pytest("-m", "triton", env=env)
    return code or interpreted


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, compiled modules and the backend of every op")
    bench = sub.add_parser("bench", help="run the benchmark suites and print pyfast vs reference vs torch")
    bench.add_argument("--family", help="one family, e.g. moe")
    bench.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    bench.add_argument("--gpu", action="store_true", help="run on CUDA and write bench/results/<gpu>-<date>.{json,md}")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.add_argument("--bench-dir", help="the bench/ directory of a pyfast checkout")
    check = sub.add_parser("check", help="run the correctness suites for the available backends")
    check.add_argument("--gpu", action="store_true", help="run the triton and gpu tests on CUDA")
    check.add_argument("--tests-dir", help="the tests/ directory of a pyfast checkout")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
