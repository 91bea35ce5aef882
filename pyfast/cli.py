"""pyfast command line: `pyfast info | bench | check | demo`.

  pyfast info     versions, devices, compiled modules, and which backend runs each op
  pyfast bench    the benchmark suites (bench/<family>/): pyfast vs reference vs torch-native
  pyfast check    the correctness suites (tests/), plus the Triton kernels under the interpreter
  pyfast demo pde solve a 1-D and a 2-D high-frequency PDE with GP-HM, plot solution / truth / error

`bench` and `check` need a pyfast source checkout (its bench/ and tests/ directories).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from rich.table import Table

import pyfast
from pyfast import _backend, _bench_report, _ext

console = _bench_report.console_for()


def _fail(message: str) -> int:
    console.print(f"[red]pyfast: {message}[/red]")
    return 2


def _source_dir(name: str, given: Optional[str]) -> Path:
    """``bench/`` or ``tests/`` of a pyfast checkout: ``given``, else ./name (or in a directory
    above), else the checkout that holds the imported package. Raises FileNotFoundError."""
    if given:
        if Path(given).is_dir():
            return Path(given).resolve()
        raise FileNotFoundError(f"--{name}-dir {given}: no such directory")
    cwd = Path.cwd().resolve()
    candidates = [cwd, *cwd.parents, Path(pyfast.__file__).resolve().parents[1]]
    for root in candidates:
        if (root / name).is_dir() and (root / "pyfast" / "__init__.py").is_file():
            return root / name
    looked = ", ".join(str(root / name) for root in (cwd, candidates[-1]))
    raise FileNotFoundError(f"no {name}/ directory of a pyfast source checkout found (looked at {looked}); "
                            f"run from a pyfast checkout or pass --{name}-dir DIR")


@contextlib.contextmanager
def _env(**values: Optional[str]) -> Iterator[None]:
    """Set (or, for None, leave alone) environment variables for the duration of the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if value is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- info
def _sample(op: _backend.OpKernels, device: str) -> List[torch.Tensor]:
    """Tiny tensors of the kind the op dispatches on: index tensors for index ops, else floats."""
    covered = {dtype for dtypes in op.dtypes.values() for dtype in dtypes}
    index_op = bool(covered) and all(not dtype.is_floating_point for dtype in covered)
    dtypes = (torch.int32, torch.int64) if index_op else (torch.float32, torch.bfloat16, torch.float64)
    return [torch.zeros(2, 4, dtype=dtype, device=device) for dtype in dtypes]


def cmd_info(args) -> int:
    about = Table(title=f"pyfast {pyfast.__version__}", title_justify="left", show_header=False)
    about.add_row("package", str(Path(pyfast.__file__).parent))
    about.add_row("python", f"{platform.python_version()} ({sys.executable})")
    about.add_row("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    about.add_row("triton", _bench_report.triton_version() or "not installed")
    about.add_row("cpu", f"{_bench_report.cpu_model()}, {torch.get_num_threads()} torch threads, "
                         f"{os.cpu_count()} logical cpus")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        about.add_row(f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    if not torch.cuda.is_available():
        about.add_row("cuda", "no device" if torch.version.cuda else "torch was built without CUDA")
    about.add_row("pyfast._C", "[green]loaded[/]" if _ext.cpu else f"[yellow]unavailable[/]: {_ext.cpu_error}")
    if _ext.cuda:
        extra = ", ".join(f"{name} {getattr(_ext.cuda, name)()}" for name in ("runtime_version", "archs")
                          if hasattr(_ext.cuda, name))
        about.add_row("pyfast._cuda", f"[green]loaded[/]{f' ({extra})' if extra else ''}")
    else:
        about.add_row("pyfast._cuda", f"[yellow]unavailable[/]: {_ext.cuda_error}")
    triton_ok, triton_why = _ext.triton_status()
    about.add_row("Triton kernels", "[green]usable[/]" + (" (interpreter)" if _ext.triton_interpret() else "")
                  if triton_ok else f"[yellow]unusable[/]: {triton_why}")
    try:
        requested = _backend.get_backend()
    except ValueError as err:
        requested = f"[red]{err}[/]"
    about.add_row("requested backend", f"{requested} (PYFAST_BACKEND or pyfast.use_backend)")
    console.print(about)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = Table(title="backend per op (pyfast.backend_for)", title_justify="left")
    for column in ("op", "input", "backend", "reason"):
        ops.add_column(column)
    for name, kernels in sorted(_backend.registered_ops().items()):
        shown = name  # the op name on its first row only
        for device in devices:
            for tensor in _sample(kernels, device):
                label = f"{device} {str(tensor.dtype).replace('torch.', '')}"
                try:
                    choice = pyfast.backend_for(name, tensor)
                    style = "yellow" if choice.backend == "reference" else "green"
                    ops.add_row(shown, label, f"[{style}]{choice.backend}[/]", choice.reason)
                except (RuntimeError, ValueError) as err:  # a forced backend that cannot run it; a bad PYFAST_BACKEND
                    ops.add_row(shown, label, "[red]error[/]", str(err))
                shown = ""
        ops.add_section()
    console.print(ops)
    return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    try:
        bench_dir = _source_dir("bench", args.bench_dir)
    except FileNotFoundError as err:
        return _fail(f"bench: {err}")
    target = bench_dir / args.family if args.family else bench_dir
    if not target.is_dir():
        families = sorted(p.name for p in bench_dir.iterdir() if p.is_dir() and p.name != "results" and not p.name.startswith((".", "_")))
        return _fail(f"bench: no benchmark family {args.family!r} in {bench_dir} (families: {', '.join(families)})")
    if args.gpu and not torch.cuda.is_available():
        return _fail("bench --gpu: no CUDA device is available")
    requested = os.environ.get("PYFAST_BENCH_DEVICE") or None
    if requested not in (None, "cpu", "cuda") or (requested == "cuda" and not torch.cuda.is_available()):
        return _fail(f"bench: PYFAST_BENCH_DEVICE={requested} cannot be used here (cpu, or cuda with a CUDA device)")
    device = "cuda" if args.gpu else (requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or os.environ.get("PYFAST_BENCH_QUICK") == "1"
    env = _bench_report.environment(device)
    env["mode"] = "quick" if quick else "full"
    env["checkout"] = f"{bench_dir.parent} (commit {_bench_report.git_commit(bench_dir.parent) or 'unknown'})"
    console.print(f"pyfast bench: {target} on {env.get('gpu', env['cpu'])} ({device}), {env['mode']} mode")

    with tempfile.TemporaryDirectory() as tmp, _env(PYFAST_BENCH_QUICK="1" if args.quick else None,
                                                    PYFAST_BENCH_DEVICE=device):
        raw = Path(tmp) / "pytest-benchmark.json"
        code, failed = _bench_report.run_suites(bench_dir, target, raw, console)
        if not raw.exists():
            return _fail(f"bench: the benchmark run failed (pytest exit code {code})")
        results = json.loads(raw.read_text())
    if failed:
        env["failed benchmarks"] = ", ".join(failed)

    report = _bench_report.Report.from_pytest_benchmark(results, env, _bench_report.copy_bandwidth(env, args.bandwidth))
    if not report.rows:
        _fail(f"bench: no benchmark results (pytest exit code {code})")
        return code or 1
    for table in report.tables():
        console.print(table)
    console.print(f"[dim]{report.floor_note()}; load average at start {env.get('load average at start', '?')}[/dim]")
    for name in report.skipped:
        console.print(f"[yellow]not in the tables (no pyfast extra_info): {name}[/yellow]")
    if args.json:
        console.print(f"wrote {report.write_json(Path(args.json))}")
    if args.gpu:
        for path in report.write_gpu_results(bench_dir / "results"):
            console.print(f"wrote {path}")
    return code


# --------------------------------------------------------------------------- check
def _pytest(tests: Path, extra: List[str], env: Optional[Dict[str, str]] = None) -> int:
    """pytest in a fresh process, run from the tests directory so that the source tree beside it
    cannot shadow the pyfast this command belongs to."""
    command = [sys.executable, "-m", "pytest", str(tests), *extra]
    console.rule(f"[bold]{' '.join(['pytest', str(tests), *extra])}" + ("  (TRITON_INTERPRET=1)" if env else ""))
    return subprocess.call(command, cwd=tests, env={**os.environ, **(env or {})})


def cmd_check(args) -> int:
    try:
        tests = _source_dir("tests", args.tests_dir)
    except FileNotFoundError as err:
        return _fail(f"check: {err}")
    runs = []  # (suite, exit code, seconds)

    def run(suite: str, extra: List[str], env: Optional[Dict[str, str]] = None) -> None:
        start = time.perf_counter()
        runs.append((suite, _pytest(tests, extra, env), time.perf_counter() - start))

    if args.gpu:
        if not torch.cuda.is_available():
            return _fail("check --gpu: no CUDA device is available")
        run("gpu + triton tests on CUDA", ["-m", "gpu or triton"])
    else:
        run("all tests (CPU kernels, reference)", [])
        if importlib.util.find_spec("triton") is None:
            console.print("[yellow]triton is not installed: the Triton-interpreter suite is skipped[/yellow]")
        else:
            # A fresh process: TRITON_INTERPRET must be set before any Triton kernel is defined.
            run("triton tests, TRITON_INTERPRET=1", ["-m", "triton"], {"TRITON_INTERPRET": "1"})

    title = f"pyfast check: {Path(pyfast.__file__).parent}"
    summary = Table(title=title, title_justify="left", min_width=len(title))
    for column in ("suite", "result", "time"):
        summary.add_column(column)
    for suite, code, seconds in runs:
        result = "[green]passed[/]" if code == 0 else f"[red]failed (exit {code})[/]"
        summary.add_row(suite, result, f"{seconds:.0f} s")
    console.print(summary)
    return next((code for _, code, _ in runs if code != 0), 0)


# --------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from pyfast.gp.pde import demo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        demo.run(args.out, device, log=console.print)
    except RuntimeError as err:
        return _fail(str(err))
    return 0


# --------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyfast {pyfast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, compiled modules and the backend of every op")
    bench = sub.add_parser("bench", help="run the benchmark suites: pyfast vs reference vs torch-native")
    bench.add_argument("--family", help="only this family (a folder of bench/, e.g. moe)")
    bench.add_argument("--quick", action="store_true", help="small sizes, short timing budgets")
    bench.add_argument("--gpu", action="store_true",
                       help="run on CUDA and write bench/results/<gpu>-<date>.json and .md")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--bench-dir", metavar="DIR", help="the bench/ directory of a pyfast checkout")
    bench.add_argument("--bandwidth", type=float, metavar="TB/s",
                       help="device-copy bandwidth for the memory-floor column, for devices without a built-in figure")
    check = sub.add_parser("check", help="run the correctness suites (and the Triton kernels under the interpreter)")
    check.add_argument("--gpu", action="store_true", help="run the tests marked gpu or triton on CUDA")
    check.add_argument("--tests-dir", metavar="DIR", help="the tests/ directory of a pyfast checkout")
    demo = sub.add_parser("demo", help="worked examples: `pyfast demo pde` (GP-HM PDE solver)")
    demo.add_argument("example", choices=["pde"], help="pde: a 1-D and a 2-D GP-HM solve with a plot")
    demo.add_argument("--out", default="pyfast_pde_demo.png", metavar="PATH", help="PNG to write (default %(default)s)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench, "check": cmd_check, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
