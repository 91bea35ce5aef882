"""Random layer inputs, output gradients and padding masks for the influence tests."""
import torch

from pyfast.influence import EKFACFactors, reference


def activations(b, T, d_in, d_out, dtype=torch.float64, device="cpu", masked=True, seed=0):
    """``a (b, T, d_in)``, ``s (b, T, d_out)`` random (never zero), and a ``(b, T)`` bool padding mask
    (right padding of a random length per example; at least one token kept when T > 0)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(b, T, d_in, generator=g) + 0.3).to(dtype).to(device)
    s = torch.randn(b, T, d_out, generator=g).to(dtype).to(device)
    if not masked:
        return a, s, None
    lengths = torch.randint(1, max(T, 1) + 1, (b,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return a, s, mask


def fitted_factors(a, s, mask=None) -> EKFACFactors:
    """Factors fitted by the reference on float64 copies of ``a`` and ``s``."""
    a64, s64 = a.double().cpu(), s.double().cpu()
    m = None if mask is None else mask.cpu()
    eig = reference.eigen_factors(reference.covariance(a64, m), reference.covariance(s64, m))
    return EKFACFactors(eig.Q_A, eig.Q_S, reference.lambda_correction(a64, s64, eig.Q_A, eig.Q_S, m))


def to_device(factors: EKFACFactors, device) -> EKFACFactors:
    return EKFACFactors(*(t.to(device) for t in factors))


def explicit_influence(stats, train_grads, query_grads, mask=None):
    """The spec computed the slow way from per-layer statistics ``{name: (a, s)}`` (for the factor
    eigenbases) and explicit per-example gradients ``{name: (n, d_out, d_in)}`` (Lambda as the mean
    of the squared rotated gradients; scores through a dense inverse of
    ``(Q_S (x) Q_A) diag(Lambda + damping) (Q_S (x) Q_A)^T``).
    Returns ``({name: Lambda}, pairwise (Q, N), self (N,))``, summed over layers."""
    lambdas, pairwise, self_influence = {}, 0, 0
    for name, (a, s) in stats.items():
        eig = reference.eigen_factors(reference.covariance(a, mask), reference.covariance(s, mask))
        G, Gq = train_grads[name], query_grads[name]
        Lambda = (eig.Q_S.T @ G @ eig.Q_A).square().mean(dim=0)
        K = torch.kron(eig.Q_S, eig.Q_A)
        Hinv = torch.linalg.inv(K @ torch.diag(Lambda.reshape(-1) + reference.default_damping(Lambda)) @ K.T)
        G, Gq = G.reshape(G.shape[0], -1), Gq.reshape(Gq.shape[0], -1)
        lambdas[name] = Lambda
        pairwise = pairwise + Gq @ Hinv @ G.T
        self_influence = self_influence + torch.einsum("bi,ij,bj->b", G, Hinv, G)
    return lambdas, pairwise, self_influence
