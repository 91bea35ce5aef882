"""GP-HM accuracy on the paper's problems: relative L2 error and time of `GPHMSolver.fit`.

    python bench/gp/pde_accuracy.py [--problems NAME ...] [--out bench/gp/pde_accuracy.md]

Writes a markdown table (problem, grid, schedule, solve path, seconds, relative L2 error on a
test grid 1.5x finer than the collocation grid). Default problems: the two of the accuracy claim,
1-D Poisson sin(100x) on 400 points and 2-D Poisson sin(6x)cos(20x) + sin(6y)cos(20y) on 200^2.
"""
import argparse
import platform
import time

import torch

from pyfast.gp.pde.problems import PROBLEMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["poisson1d_sin100", "poisson2d_sin6cos20"], choices=sorted(PROBLEMS))
    parser.add_argument("--out", default="bench/gp/pde_accuracy.md")
    parser.add_argument("--machine", default="2-core CPU, shared")
    args = parser.parse_args()
    rows = []
    for name in args.problems:
        problem = PROBLEMS[name]
        start = time.perf_counter()
        solver = problem.solver()
        solver.fit(progress=False)
        seconds = time.perf_counter() - start
        error = problem.relative_error(solver)
        path = "dense QR" if solver.N <= 3000 else "PCG"
        rows.append(f"| {name} | {' x '.join(map(str, solver.sizes))} | alternating (2 spectral rounds) | {path} | {seconds:.1f} | {error:.2e} |")
        print(rows[-1], flush=True)
    header = [
        "# GP-HM accuracy (`bench/gp/pde_accuracy.py`)",
        "",
        f"Machine: {args.machine} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), float64, Matern-5/2-cos mixture, 30 components per axis. "
        "Error: relative L2 of the posterior mean on an evenly spaced test grid with 1.5x + 1 points per axis.",
        "",
        "| problem | grid | schedule | U solve | seconds | rel. L2 error |",
        "|---|---|---|---|---|---|",
    ]
    with open(args.out, "w") as fh:
        fh.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
