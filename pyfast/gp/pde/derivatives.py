"""Derivatives of a grid function through GP-HM's derivative operators.

For a product kernel on a full grid the GP conditional mean of ``d^k u / dx_d^k`` at the grid
given the grid values ``U`` is ``(K_d^(k) K_d^{-1}) U`` applied along axis ``d`` alone, since
``(K_1 (x) .. K_d^(k) .. (x) K_D)(K_1 (x) ... (x) K_D)^{-1} = I (x) .. K_d^(k) K_d^{-1} .. (x) I``.
`AxisOperators` holds those ``(n_d, n_d)`` matrices; `Derivatives` applies them with
`pyfast.gp.mode_product` and is what a PDE callable receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from ..ops import mode_product


@dataclass
class AxisOperators:
    """One axis: the jittered covariance ``K`` and ``D1 = K_1 K^{-1}``, ``D2 = K_2 K^{-1}``."""

    K: Tensor
    D1: Tensor
    D2: Tensor

    @staticmethod
    def build(K: Tensor, K1: Tensor, K2: Tensor, jitter: float) -> "AxisOperators":
        """From the kernel and its derivative cross-covariances; ``jitter`` (relative to the mean
        diagonal of ``K``) is added to ``K``'s diagonal before solving."""
        n = K.shape[0]
        scale = float(K.detach().diagonal().mean())
        Kj = K + (jitter * scale) * torch.eye(n, dtype=K.dtype, device=K.device)
        # D = K_k Kj^{-1} = (Kj^{-1} K_k^T)^T, Kj symmetric.
        sol = torch.linalg.solve(Kj, torch.cat([K1.t(), K2.t()], 1))
        return AxisOperators(Kj, sol[:, :n].t(), sol[:, n:].t())


Term = Tuple[int, ...]  # derivative orders per axis, e.g. (2, 0) for u_xx, (1, 1) for u_xy


class Derivatives:
    """Derivatives of the grid function ``u`` a PDE callable is given.

    ``d.x(a)``, ``d.xx(a)`` are ``du/dx_a`` and ``d^2u/dx_a^2``; ``d.xy(a, b)`` the mixed
    derivative; ``d.laplacian()`` the sum of ``d.xx`` over the axes; ``d.of(orders)`` the general
    ``d^{o_1 + ... + o_D} u / dx_1^{o_1} ... dx_D^{o_D}`` with orders 0, 1 or 2 per axis. Every
    result has the grid's shape ``(n_1, ..., n_D)``. Each term used is recorded in ``terms``.
    """

    def __init__(self, u_flat: Tensor, ops: Sequence[AxisOperators], sizes: Sequence[int]):
        self._u, self._ops, self._sizes = u_flat, list(ops), list(sizes)
        self.terms: Dict[Term, Tensor] = {}

    def of(self, orders: Sequence[int]) -> Tensor:
        orders = tuple(int(o) for o in orders)
        D = len(self._sizes)
        if len(orders) != D or any(o not in (0, 1, 2) for o in orders):
            raise ValueError(f"Derivatives.of: orders must be {D} ints in (0, 1, 2), got {orders}")
        if orders not in self.terms:
            v = self._u
            for axis, o in enumerate(orders):
                if o:
                    op = self._ops[axis].D1 if o == 1 else self._ops[axis].D2
                    v = mode_product(op, v, self._sizes, axis)
            self.terms[orders] = v
        return self.terms[orders].reshape(self._sizes)

    def _axis(self, fn: str, a) -> int:
        D = len(self._sizes)
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < D:
            raise ValueError(f"Derivatives.{fn}: axis must be an int in [0, {D}), got {a!r}")
        return a

    def _single(self, fn: str, axis, order: int) -> Tensor:
        orders = [0] * len(self._sizes)
        orders[self._axis(fn, axis)] = order
        return self.of(orders)

    def x(self, axis: int = 0) -> Tensor:
        return self._single("x", axis, 1)

    def xx(self, axis: int = 0) -> Tensor:
        return self._single("xx", axis, 2)

    def xy(self, a: int, b: int) -> Tensor:
        a, b = self._axis("xy", a), self._axis("xy", b)
        if a == b:
            raise ValueError(f"Derivatives.xy: axes must differ (use xx for a second derivative), got {a}, {b}")
        orders = [0] * len(self._sizes)
        orders[a] = orders[b] = 1
        return self.of(orders)

    def laplacian(self) -> Tensor:
        return sum(self.xx(a) for a in range(len(self._sizes)))

    def used(self) -> List[Term]:
        return [t for t in self.terms if any(t)]
