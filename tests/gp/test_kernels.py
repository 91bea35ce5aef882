"""Fused mixture kernels vs the reference (values, input derivatives by autograd, parameter grads)."""
import math

import pytest
import torch

import pyfast
from pyfast.gp import COMPONENTS, kernel_matrix, kron_mv, mixture_of_products_mv, product_of_mixtures, reference as R
from kernel_cases import assert_as_accurate_as_reference, assert_close


def _params(Q, with_means, dtype, device="cpu", requires_grad=False):
    lw = (torch.randn(Q, dtype=dtype) * 0.3).to(device)
    ls = (torch.rand(Q, dtype=dtype) * 0.3 + 0.1).to(device)
    mu = (torch.rand(Q, dtype=dtype) * 3.0).to(device) if with_means else None
    if requires_grad:
        for t in (lw, ls, mu):
            if t is not None:
                t.requires_grad_()
    return lw, ls, mu


def _ref(x1, x2, lw, ls, mu, component, derivatives):
    fn = lambda a, b: R.mixture_kernel(a, b, lw, ls, mu, component)  # noqa: E731
    if not derivatives:
        return (fn(x1, x2),)
    K, dK, d2K = (t.detach() for t in R.kernel_derivatives(fn, x1, x2))
    if component.startswith("matern"):  # autograd through |d| misses k''(0): use its limit there
        d2K = torch.where(x1[:, None] == x2[None, :], R.matern_mixed_derivative_at_zero(lw, ls, mu, component), d2K)
    return K, dK, d2K


CASES = [(c, Q, m) for c in COMPONENTS for Q, m in ((1, False), (5, True))]


@pytest.mark.parametrize("component,Q,with_means", CASES)
def test_kernel_values_and_derivatives(kernel, component, Q, with_means):
    derivatives = component != "matern12"
    dtype = torch.float64 if kernel.backend == "cpu" else torch.float32
    x1 = torch.rand(13, dtype=torch.float64)
    x2 = torch.cat([x1[:4], torch.rand(6, dtype=torch.float64)])  # includes d = 0 exactly
    lw, ls, mu = _params(Q, with_means, torch.float64)
    refs = _ref(x1, x2, lw, ls, mu, component, derivatives)
    cast = lambda t: None if t is None else t.to(dtype).to(kernel.device)  # noqa: E731
    with pyfast.use_backend("auto"):
        outs = kernel_matrix(cast(x1), cast(x2), component=component, lengthscales=cast(ls), log_weights=cast(lw),
                             means=cast(mu), derivatives=derivatives)
    outs = outs if derivatives else (outs,)
    # float32 in the (Triton) kernel: derivatives scale like 1/l^2 and cancel; 2x the error of
    # the same math in float32 torch, as DESIGN.md allows for cancellation.
    for name, o, r in zip(("K", "dK/dx", "d2K/dxdx'"), outs, refs):
        if dtype == torch.float64:
            assert_close(o, r, dtype, name)
        else:
            torch_f32 = kernel_matrix(*(cast(t).cpu() for t in (x1, x2)), component=component, lengthscales=cast(ls).cpu(),
                                      log_weights=cast(lw).cpu(), means=None if mu is None else cast(mu).cpu(),
                                      derivatives=derivatives)
            low = (torch_f32 if derivatives else (torch_f32,))[("K", "dK/dx", "d2K/dxdx'").index(name)]
            assert_as_accurate_as_reference(o, r, low, dtype, name)


@pytest.mark.parametrize("component", ["sm_gauss", "matern52", "matern32", "rbf"])
def test_kernel_parameter_gradients(component):
    """Gradients of all three outputs w.r.t. inputs and parameters (component-wise recompute)."""
    x1 = torch.rand(7, dtype=torch.float64, requires_grad=True)
    x2 = torch.rand(5, dtype=torch.float64, requires_grad=True)
    lw, ls, mu = _params(4, True, torch.float64, requires_grad=True)
    outs = kernel_matrix(x1, x2, component=component, lengthscales=ls, log_weights=lw, means=mu, derivatives=True)
    ws = [torch.randn(o.shape, dtype=o.dtype) for o in outs]
    got = torch.autograd.grad(sum((w * o).sum() for w, o in zip(ws, outs)), [lw, ls, mu])
    refs = R.kernel_derivatives(lambda a, b: R.mixture_kernel(a, b, lw, ls, mu, component), x1, x2)
    want = torch.autograd.grad(sum((w * o).sum() for w, o in zip(ws, refs)), [lw, ls, mu], retain_graph=True)
    for g, w, name in zip(got, want, ("log_weights", "lengthscales", "means")):
        assert_close(g, w, torch.float64, name)
    # input gradients (and the parameters again) by finite differences
    assert torch.autograd.gradcheck(
        lambda a, lwt, lst, mut: kernel_matrix(a, x2.detach(), component=component, lengthscales=lst, log_weights=lwt,
                                               means=mut, derivatives=True),
        (x1.detach().requires_grad_(), lw.detach().requires_grad_(), ls.detach().requires_grad_(), mu.detach().requires_grad_()),
    )


def test_product_vs_mixture_of_products():
    xs = [torch.rand(4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)]
    mixtures = [dict(component="sm_gauss", lengthscales=torch.tensor([0.2, 0.5], dtype=torch.float64),
                     log_weights=torch.tensor([0.1, -0.3], dtype=torch.float64),
                     means=torch.tensor([1.0, 2.5], dtype=torch.float64))] * 2
    factors = product_of_mixtures(xs, mixtures)
    v = torch.randn(12, 2, dtype=torch.float64)
    K_pm = R.kron([R.mixture_kernel(x, x, m["log_weights"], m["lengthscales"], m["means"], "sm_gauss") for x, m in zip(xs, mixtures)])
    assert_close(kron_mv(factors, v), K_pm @ v, torch.float64, "product of mixtures")
    lw = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    ls = torch.rand(2, 3, dtype=torch.float64) + 0.2
    mu = torch.rand(2, 3, dtype=torch.float64) * 2
    K_mp = sum(math.exp(lw[q]) * torch.kron(R.mixture_kernel(xs[0], xs[0], torch.zeros(1, dtype=torch.float64), ls[0, q:q + 1], mu[0, q:q + 1], "rbf"),
                                            R.mixture_kernel(xs[1], xs[1], torch.zeros(1, dtype=torch.float64), ls[1, q:q + 1], mu[1, q:q + 1], "rbf"))
               for q in range(3))
    out = mixture_of_products_mv(xs, v, component="rbf", log_weights=lw, lengthscales=ls, means=mu)
    assert_close(out, K_mp @ v, torch.float64, "mixture of products")
    assert rel_diff(K_mp, K_pm) > 1e-3  # the two semantics differ


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def test_kernel_bad_inputs():
    x = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel_matrix: lengthscales must be positive"):
        kernel_matrix(x, x, component="rbf", lengthscales=torch.tensor([-1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel_matrix: component must be one of"):
        kernel_matrix(x, x, component="cauchy", lengthscales=1.0)
    with pytest.raises(ValueError, match="kernel_matrix: component 'matern12' has no derivative"):
        kernel_matrix(x, x, component="matern12", lengthscales=1.0, derivatives=True)
    with pytest.raises(ValueError, match="kernel_matrix: means must have 2 entries"):
        kernel_matrix(x, x, component="sm_gauss", lengthscales=torch.ones(2, dtype=torch.float64),
                      means=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel_matrix: x1 must be 1-D"):
        kernel_matrix(x[:, None], x, component="rbf", lengthscales=1.0)
    with pytest.raises(ValueError, match="kernel_matrix: x2 must be finite"):
        kernel_matrix(x, torch.tensor([float("nan")], dtype=torch.float64), component="rbf", lengthscales=1.0)
