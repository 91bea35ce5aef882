"""The reference is the spec; these float64 tests prove it is the EK-FAC of Grosse et al. 2023:
per-example gradients against autograd, Lambda against the rotated empirical Fisher, the
inverse-Hessian product against a dense Kronecker solve, scores against explicit gradients."""
import pytest
import torch

from influence_inputs import activations, fitted_factors
from pyfast.influence import EKFACFactors, reference


def _linear_layer_statistics(b, T, d_in, d_out, mask):
    """A float64 nn.Linear with a summed per-token loss over unmasked tokens. Returns
    (a with the bias column, s = dL/dy, explicit per-example gradients of [W | bias])."""
    layer = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    x = torch.randn(b, T, d_in, dtype=torch.float64)
    targets = torch.randn(b, T, d_out, dtype=torch.float64)
    y = layer(x)
    y.retain_grad()
    token_loss = (torch.tanh(y) - targets).square().sum(dim=-1) * mask
    token_loss.sum().backward()  # kronfluence's convention: summed training loss
    grads = []
    for n in range(b):
        layer.zero_grad()
        ((torch.tanh(layer(x[n])) - targets[n]).square().sum(dim=-1) * mask[n]).sum().backward()
        grads.append(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1))
    return reference.append_bias_column(x), y.grad, torch.stack(grads)


def test_per_example_gradients_match_autograd():
    mask = torch.rand(4, 6) > 0.3
    a, s, G = _linear_layer_statistics(4, 6, 5, 3, mask.double())
    s_garbage = s + 7.0 * ~mask[..., None]  # masked tokens must not count, whatever s holds there
    torch.testing.assert_close(reference.per_example_gradients(a, s_garbage, mask), G, rtol=1e-12, atol=1e-12)


def test_covariance_mask_drops_rows():
    a, _, mask = activations(5, 9, 7, 3)
    dropped = a[mask]  # (unmasked rows, d)
    torch.testing.assert_close(reference.covariance(a, mask), dropped.T @ dropped / dropped.shape[0])


def test_eigen_factors_reconstruct_and_guard():
    A = torch.randn(6, 6, dtype=torch.float64)
    S = torch.randn(4, 4, dtype=torch.float32)
    eig = reference.eigen_factors(A, S)
    assert eig.Q_A.dtype == torch.float64 and eig.Q_S.dtype == torch.float64
    torch.testing.assert_close(eig.Q_A @ torch.diag(eig.eigenvalues_A) @ eig.Q_A.T, (A + A.T) / 2)
    torch.testing.assert_close(eig.Q_S @ torch.diag(eig.eigenvalues_S) @ eig.Q_S.T, (S + S.T).double() / 2)
    with pytest.raises(ValueError, match=r"eigen_factors: mlp.fc1: S \(gradient covariance\) has non-finite"):
        reference.eigen_factors(A, S.index_fill(0, torch.tensor([2]), float("nan")), "mlp.fc1")


def _rotation(factors):
    """``K = Q_S (x) Q_A``: row-major vec(Q_S^T G Q_A) = K^T vec(G)."""
    return torch.kron(factors.Q_S, factors.Q_A)


def test_lambda_is_diagonal_of_rotated_empirical_fisher():
    a, s, mask = activations(7, 5, 4, 3)
    factors = fitted_factors(a, s, mask)
    g = reference.per_example_gradients(a, s, mask).reshape(7, -1)
    fisher = g.T @ g / 7
    K = _rotation(factors)
    torch.testing.assert_close(factors.Lambda.reshape(-1), torch.diagonal(K.T @ fisher @ K), rtol=1e-10, atol=1e-12)


def _dense_inverse_hessian(factors, damping):
    K = _rotation(factors)
    return torch.linalg.inv(K @ torch.diag(factors.Lambda.reshape(-1) + damping) @ K.T)


@pytest.mark.parametrize("damping", [None, 0.37])
def test_precondition_matches_dense_kronecker_solve(damping):
    a, s, mask = activations(6, 5, 4, 3)
    factors = fitted_factors(a, s, mask)
    V = torch.randn(2, 3, 4, dtype=torch.float64)
    lam = reference.default_damping(factors.Lambda) if damping is None else damping
    expected = (_dense_inverse_hessian(factors, lam) @ V.reshape(2, -1).T).T.reshape(2, 3, 4)
    torch.testing.assert_close(reference.precondition(V, factors, damping), expected, rtol=1e-10, atol=1e-12)
    assert reference.default_damping(factors.Lambda) == pytest.approx(0.1 * factors.Lambda.mean().item())


def test_scores_match_explicit_gradients_and_per_token_sums():
    a, s, mask = activations(5, 6, 4, 3)
    factors = fitted_factors(a, s, mask)
    G = reference.per_example_gradients(a, s, mask)
    Hinv = _dense_inverse_hessian(factors, reference.default_damping(factors.Lambda))
    queries = torch.randn(3, 3, 4, dtype=torch.float64)
    P = reference.precondition(queries, factors)
    expected = (queries.reshape(3, -1) @ Hinv @ G.reshape(5, -1).T)  # <H^-1 g_q, g_n>
    torch.testing.assert_close(reference.pairwise_scores(P, a, s, mask), expected, rtol=1e-10, atol=1e-12)
    per_token = reference.pairwise_scores(P, a, s, mask, per_token=True)
    torch.testing.assert_close(per_token.sum(dim=-1), expected, rtol=1e-10, atol=1e-12)
    assert bool((per_token[:, ~mask] == 0).all())
    self_expected = torch.einsum("bi,ij,bj->b", G.reshape(5, -1), Hinv, G.reshape(5, -1))
    torch.testing.assert_close(reference.self_scores(a, s, factors, None, mask), self_expected, rtol=1e-10, atol=1e-12)


def test_low_rank_is_truncated_svd():
    P = torch.randn(2, 6, 5, dtype=torch.float64)
    full = reference.low_rank(P, 5)
    torch.testing.assert_close(full.left @ full.right, P)
    r2 = reference.low_rank(P, 2)
    assert r2.left.shape == (2, 6, 2) and r2.right.shape == (2, 2, 5)
    sigma = torch.linalg.svdvals(P)
    torch.testing.assert_close(torch.linalg.matrix_norm(P - r2.left @ r2.right), sigma[:, 2:].norm(dim=-1))


def test_masked_tokens_equal_dropped_tokens():
    a, s, mask = activations(3, 8, 4, 5)
    factors = fitted_factors(a, s, mask)
    P = reference.precondition(torch.randn(2, 5, 4, dtype=torch.float64), factors)
    for n in range(3):
        keep = mask[n]
        one = (a[n : n + 1, keep], s[n : n + 1, keep])
        torch.testing.assert_close(
            reference.pairwise_scores(P, a[n : n + 1], s[n : n + 1], mask[n : n + 1]), reference.pairwise_scores(P, *one)
        )
        torch.testing.assert_close(
            reference.self_scores(a[n : n + 1], s[n : n + 1], factors, None, mask[n : n + 1]),
            reference.self_scores(*one, factors),
        )
