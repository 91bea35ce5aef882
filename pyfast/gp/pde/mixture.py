"""Per-axis spectral-mixture kernels of GP-HM with learnable, log-domain parameters.

    k_d(x, x') = sum_q w_q g(x - x'; l_q) cos(2 pi mu_q (x - x')),   w_q = exp(log w_q)

``g`` is ``sm_gauss`` (``exp(-d^2 / l^2)``: a Gaussian spectral mixture, GP-HM-GM) or
``matern52`` (a Student-t spectral mixture, GP-HM-StM). Estimating ``log w_q`` rather than
``w_q`` is GP-HM's Jeffreys prior on the weights (it prunes unneeded frequencies).

Initialization covers the band the grid can resolve: ``Q`` frequencies evenly spaced on
``[0, nyquist]`` (``nyquist = 1 / (2 h)`` cycles per unit for spacing ``h``), equal weights
``1 / Q`` and lengthscales whose spectral width matches the spacing of the frequencies.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from ..kernels import kernel_matrix

KERNELS = ("sm_gauss", "matern52")


class SpectralMixture(nn.Module):
    """One axis's mixture: parameters ``log_weights``, ``log_lengthscales``, ``means`` (``(Q,)``).

    Args:
        x: ``(n,)`` increasing collocation coordinates of the axis (sets the band and scales).
        num_components: ``Q >= 1``.
        component: ``"sm_gauss"`` or ``"matern52"``.
        max_frequency: top of the initial frequency grid in cycles per unit (default: the grid's
            Nyquist frequency ``1 / (2 h)``).
    """

    def __init__(self, x: Tensor, num_components: int, component: str, max_frequency: float = None):
        super().__init__()
        n = x.shape[0]
        h = float(x[-1] - x[0]) / max(n - 1, 1)
        top = 1.0 / (2.0 * h) if max_frequency is None else float(max_frequency)
        Q = num_components
        spacing = top / max(Q - 1, 1)
        means = torch.linspace(0.0, top, Q, dtype=x.dtype, device=x.device)
        # A component of lengthscale l has spectral width ~ 1 / (pi l): one spacing wide.
        ls = torch.full((Q,), 1.0 / (math.pi * spacing), dtype=x.dtype, device=x.device)
        self.component = component
        self.spacing = spacing  # of the initial frequency grid: the window fit_spectrum searches
        self.log_weights = nn.Parameter(torch.full((Q,), -math.log(Q), dtype=x.dtype, device=x.device))
        self.log_lengthscales = nn.Parameter(torch.log(ls))
        self.means = nn.Parameter(means)
        # On an evenly spaced axis K_ij depends on i - j only: evaluate the 2n - 1 lags and gather.
        steps = x[1:] - x[:-1]
        self.uniform = bool(n > 1 and (steps - steps.mean()).abs().max() <= 1e-9 * steps.mean().abs())

    @torch.no_grad()
    def fit_spectrum(self, x: Tensor, values: Tensor, floor: float = 1e-8, pad: int = 16, span: float = 10.0) -> None:
        """Set the weights, frequencies and lengthscales from the periodogram of ``values``.

        ``values``: ``(n, B)`` samples on ``x`` (evenly spaced), e.g. a grid solution unfolded
        along this axis. Each component's mean moves to the periodogram's peak within half a
        component spacing of it, and its weight becomes the power there (Hann window, ``pad``-fold
        zero padding), normalized to sum 1; weights below ``floor`` times the largest are raised
        to it so every log-weight stays finite and learnable. Lengthscales become ``span`` times
        the axis length: narrow spectral peaks, and a near-constant ``mu = 0`` component (which a
        product kernel needs for terms constant along an axis, e.g. ``a(x) + b(y)``).
        """
        n = values.shape[0]
        window = torch.hann_window(n, periodic=False, dtype=values.dtype, device=values.device)[:, None]
        centered = values * window  # not centered: a constant along this axis needs weight at mu = 0
        h = float(x[1] - x[0])
        m = pad * n
        power = (torch.fft.rfft(centered, n=m, dim=0).abs() ** 2).sum(1)
        freqs = torch.fft.rfftfreq(m, d=h).to(values.dtype)
        mu = self.means.detach().clone()
        half = 0.5 * self.spacing
        w = torch.empty_like(mu)
        for q in range(mu.numel()):
            near = ((freqs - mu[q]).abs() <= half).nonzero().squeeze(1)
            if near.numel() == 0:
                w[q] = 0.0
                continue
            best = near[power[near].argmax()]
            mu[q], w[q] = freqs[best], power[best]
        w = w / w.sum().clamp_min(1e-300)
        w = w.clamp_min(floor * float(w.max()))
        self.means.copy_(mu)
        self.log_lengthscales.fill_(math.log(span * float(x[-1] - x[0])))
        self.log_weights.copy_(torch.log(w / w.sum()))

    def _params(self) -> dict:
        return dict(component=self.component, log_weights=self.log_weights,
                    lengthscales=torch.exp(self.log_lengthscales), means=self.means)

    def matrices(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(K, K_1, K_2)`` on ``x (n,)``: ``K_ij = k(x_i, x_j)``, ``K_1 = dk/dx_i`` and
        ``K_2 = d^2 k / dx_i^2`` (the cross-covariances of ``u'``, ``u''`` with ``u``)."""
        if not self.uniform:
            K, dK, d2K_mixed = kernel_matrix(x, x, derivatives=True, **self._params())
            return K, dK, -d2K_mixed  # k''(d) = -d^2 k / dx dx'
        n = x.shape[0]
        lags = x - x[0]
        lags = torch.cat([-lags.flip(0)[:-1], lags])  # x_i - x_j for i - j = -(n-1) .. n-1
        k, k1, k2_mixed = kernel_matrix(lags, lags[n - 1 : n], derivatives=True, **self._params())
        idx = torch.arange(n, device=x.device)
        gather = (idx[:, None] - idx[None, :]) + (n - 1)
        return k[gather, 0], k1[gather, 0], -k2_mixed[gather, 0]

    def cross(self, x_test: Tensor, x: Tensor) -> Tensor:
        """``(m, n)`` cross-covariance ``k(x_test_i, x_j)``."""
        return kernel_matrix(x_test, x, **self._params())
