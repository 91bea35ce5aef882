"""`pyfast demo pde`: solve one 1-D and one 2-D GP-HM problem, print errors and times, plot them."""
from __future__ import annotations

import time
from typing import List, Tuple

import torch

from .problems import PROBLEMS, Problem

# (problem, collocation grid): the 1-D one at the paper's size; the 2-D one on a 64^2 grid instead
# of the paper's 200^2 (`bench/gp/pde_accuracy.py` runs that): on a shared 2-core CPU the 1-D solve
# took 7 s (error 2.6e-7) and the 2-D one 121 s (error 2.8e-4), most of it in CG iterations.
DEMO_CASES: Tuple[Tuple[str, Tuple[int, ...]], ...] = (("poisson1d_sin100", (400,)), ("poisson2d_sin6cos20", (64, 64)))


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("pyfast demo pde: the plot needs matplotlib; install it with "
                           "`pip install 'pyfast-kernels[demo]'` (or `pip install matplotlib`)") from err
    return plt


def run(out: str, device: str, log=print) -> List[Tuple[str, float, float]]:
    """Solve `DEMO_CASES` on ``device``; write ``out`` (PNG: solution, truth, error per problem).
    Returns ``(problem, relative L2 error, seconds)`` per case."""
    plt = _require_matplotlib()
    fig, axes = plt.subplots(len(DEMO_CASES), 3, figsize=(13, 4 * len(DEMO_CASES)))
    results = []
    for row, (name, points) in zip(axes, DEMO_CASES):
        problem: Problem = PROBLEMS[name]
        start = time.perf_counter()
        solver = problem.solver(points, device=device)
        solver.fit(progress=True)
        seconds = time.perf_counter() - start
        error = problem.relative_error(solver)
        log(f"{name} on {' x '.join(map(str, points))} points ({device}): relative L2 error {error:.2e}, {seconds:.1f} s")
        results.append((name, error, seconds))
        test = problem.axes([int(1.5 * n) + 1 for n in points], device=device)
        pred = solver.predict(test).cpu()
        truth = problem.solution(*torch.meshgrid(*test, indexing="ij")).cpu()
        panels = (("GP-HM solution", pred), ("exact solution", truth), ("error", pred - truth))
        for ax, (title, values) in zip(row, panels):
            if problem.dim == 1:
                ax.plot(test[0].cpu().numpy(), values.numpy(), lw=0.8)
            else:
                (lo0, hi0), (lo1, hi1) = problem.domain
                im = ax.imshow(values.numpy().T, origin="lower", extent=(lo0, hi0, lo1, hi1), aspect="auto")
                fig.colorbar(im, ax=ax)
            ax.set_title(f"{name}: {title}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log(f"wrote {out}")
    return results
