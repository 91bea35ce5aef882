"""The exact solve for the grid values ``U`` at fixed kernel hyperparameters and precisions.

With ``C = K_1 (x) ... (x) K_D`` (jittered factors) and the residual linearized at ``U_0``,
``r(U) ~ r_0 + J (U - U_0)``, the GP-HM objective is quadratic in ``U``:

    1/2 U^T C^{-1} U + beta_b / 2 |B U - g|^2 + beta_r / 2 |r_0 + J (U - U_0)|^2,

so its minimizer is one Gauss-Newton step (exact for a linear PDE). It is solved in whitened
coordinates ``U = S z``, ``S = C^{1/2} = (Q_1 (x) ... (x) Q_D) diag(Lambda)^{1/2}``, where the
system ``(I + S^T (beta_b B^T B + beta_r J^T J) S) z = S^T (beta_b B^T g + beta_r J^T (J U_0 - r_0))``
has all eigenvalues ``>= 1``:

- ``dense``: least squares on ``[sqrt(beta_r) J S; sqrt(beta_b) B S; I] z = [.., .., 0]`` by QR
  (stable at condition numbers where forming ``C^{-1}`` is not); for grids up to a few thousand points.
- ``cg``: matrix-free preconditioned CG; ``J v`` and ``J^T w`` by autograd through the PDE callable.
  The preconditioner is diagonal in the eigenbasis: ``1 + Lambda (beta_b b + beta_r s)`` with
  ``b = diag(Q^T B^T B Q)`` (exact, one Kronecker matvec of squared factors) and ``s`` the
  eigenbasis diagonal of ``J^T J`` for ``J ~ c_0 I + sum_k c_k T_k`` (``T_k`` the derivative terms
  the callable used, each a Kronecker product whose diagonal is exact; coefficients ``c`` fitted by
  least squares on random probes of ``J``; cross terms are dropped).
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Sequence

import torch
from torch import Tensor

from ..._linalg import eigh_threads
from ..ops import kron_mv
from .derivatives import AxisOperators, Term


class InnerResult(NamedTuple):
    """``U (N,)``; ``iterations`` of CG (0 for dense); final relative CG residual (0 for dense)."""

    U: Tensor
    iterations: int
    residual: float


class Eigenbasis:
    """``S = (Q_1 (x) ... (x) Q_D) diag(Lambda)^{1/2}`` of the jittered factors."""

    def __init__(self, ops: Sequence[AxisOperators]):
        with eigh_threads(*(o.K for o in ops)):
            pairs = [torch.linalg.eigh(o.K.detach()) for o in ops]
        self.Q = [Q.contiguous() for _, Q in pairs]
        self.lams = [lam.clamp_min(0) for lam, _ in pairs]  # K is jittered: any clamp is rounding only
        lam = self.lams[0]
        for l in self.lams[1:]:
            lam = torch.outer(lam, l).reshape(-1)
        self.lam = lam
        self.sqrt_lam = lam.sqrt()

    def S(self, z: Tensor) -> Tensor:
        return kron_mv(self.Q, self.sqrt_lam * z)

    def St(self, w: Tensor) -> Tensor:
        return self.sqrt_lam * kron_mv(self.Q, w, transpose=True)

    def dense_S(self) -> Tensor:
        Qs = self.Q[0]
        for Q in self.Q[1:]:
            Qs = torch.kron(Qs, Q)
        return Qs * self.sqrt_lam

    def diag_of(self, mats: Sequence[Tensor]) -> Tensor:
        """Eigenbasis diagonal ``diag(Q^T (M_1 (x) ... (x) M_D) Q)`` of a Kronecker product."""
        out = None
        for Q, M in zip(self.Q, mats):
            d = ((Q.t() @ M) * Q.t()).sum(1)
            out = d if out is None else torch.outer(out, d).reshape(-1)
        return out


class Linearized:
    """``r(U)`` at ``U_0`` with ``J v`` and ``J^T w`` by autograd (double backward for ``J v``)."""

    def __init__(self, residual: Callable[[Tensor], Tensor], U0: Tensor):
        self.U0 = U0.detach().requires_grad_()
        with torch.enable_grad():
            self.r = residual(self.U0)
            self._w = torch.zeros_like(self.r, requires_grad=True)
            (self._Jt_w,) = torch.autograd.grad(self.r, self.U0, self._w, create_graph=True)
        self.r0 = self.r.detach()

    def Jt(self, w: Tensor) -> Tensor:
        return torch.autograd.grad(self.r, self.U0, w, retain_graph=True)[0]

    def J(self, v: Tensor) -> Tensor:
        return torch.autograd.grad(self._Jt_w, self._w, v, retain_graph=True)[0]

    def dense(self) -> Tensor:
        eye = torch.eye(self.r.shape[0], dtype=self.r.dtype, device=self.r.device)
        return torch.stack([self.Jt(e) for e in eye])


def solve_dense(lin: Linearized, eig: Eigenbasis, b_index: Tensor, g: Tensor, beta_b: float, beta_r: float) -> InnerResult:
    S = eig.dense_S()
    J = lin.dense()
    U0 = lin.U0.detach()
    G = torch.cat([math.sqrt(beta_r) * (J @ S), math.sqrt(beta_b) * S[b_index], torch.eye(S.shape[1], dtype=S.dtype, device=S.device)])
    rhs = torch.cat([math.sqrt(beta_r) * (J @ U0 - lin.r0), math.sqrt(beta_b) * g, torch.zeros_like(U0)])
    Qr, R = torch.linalg.qr(G)
    z = torch.linalg.solve_triangular(R, (Qr.t() @ rhs)[:, None], upper=True)[:, 0]
    return InnerResult(S @ z, 0, 0.0)


def _symbol(lin: Linearized, eig: Eigenbasis, terms: List[Term], ops: Sequence[AxisOperators], sizes, interior: Tensor,
            probes: int = 4) -> Tensor:
    """Eigenbasis diagonal of ``J^T J`` for ``J`` fitted as ``c_0 I + sum_k c_k T_k`` (see module doc)."""
    def mats(term, squared):
        out = []
        for axis, o in enumerate(term):
            M = torch.eye(sizes[axis], dtype=eig.lam.dtype, device=eig.lam.device) if o == 0 else (ops[axis].D1 if o == 1 else ops[axis].D2).detach()
            out.append(M.t() @ M if squared else M)
        return out

    terms = [tuple([0] * len(sizes))] + list(terms)
    gen = torch.Generator(device="cpu").manual_seed(0)
    feats, targets = [], []
    for _ in range(probes + len(terms)):
        v = torch.randn(eig.lam.shape[0], generator=gen, dtype=eig.lam.dtype).to(eig.lam.device)
        targets.append(lin.J(v))
        feats.append(torch.stack([kron_mv(mats(t, False), v)[interior] for t in terms], 1))
    c = torch.linalg.lstsq(torch.cat(feats), torch.cat(targets)[:, None]).solution[:, 0]
    frac = float(interior.float().mean())  # the residual covers the interior rows only
    return frac * sum(ck * ck * eig.diag_of(mats(t, True)) for ck, t in zip(c.tolist(), terms))


def solve_cg(lin: Linearized, eig: Eigenbasis, b_mask: Tensor, g_full: Tensor, beta_b: float, beta_r: float,
             terms: List[Term], ops, sizes, interior: Tensor, tol: float, max_iter: int, bar=None) -> InnerResult:
    U0 = lin.U0.detach()
    mask = b_mask.to(U0.dtype)
    b_diag = kron_mv([Q * Q for Q in eig.Q], mask, transpose=True)
    s_diag = _symbol(lin, eig, terms, ops, sizes, interior)
    precond = 1.0 / (1.0 + eig.lam * (beta_b * b_diag + beta_r * s_diag))

    def A(z):
        U = eig.S(z)
        return z + eig.St(beta_b * mask * U + beta_r * lin.Jt(lin.J(U)))

    b = eig.St(beta_b * mask * g_full + beta_r * lin.Jt(lin.J(U0) - lin.r0))
    z = torch.zeros_like(b)
    r = b.clone()
    bn = float(b.norm()) or 1.0
    p = precond * r
    rz = torch.dot(r, p)
    it, res = 0, float(r.norm()) / bn
    while res > tol and it < max_iter:
        Ap = A(p)
        alpha = rz / torch.dot(p, Ap)
        z += alpha * p
        r -= alpha * Ap
        it += 1
        res = float(r.norm()) / bn
        if bar is not None:
            bar(it, res)
        y = precond * r
        rz_new = torch.dot(r, y)
        p = y + (rz_new / rz) * p
        rz = rz_new
    return InnerResult(eig.S(z), it, res)
