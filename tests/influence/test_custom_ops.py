"""torch.library.opcheck on every pyfast::influence_* op (they back the Triton kernels)."""
import pytest
import torch

from influence_inputs import activations

# The custom ops run Triton: on the GPU, or on the CPU under TRITON_INTERPRET=1.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sample_inputs(device, dtype):
    """(op, args) for every influence custom op, with random, odd-sized inputs."""
    ops = torch.ops.pyfast
    a, s, mask = activations(3, 7, 5, 6, dtype=dtype, device=device)
    x = a.reshape(-1, 5)
    a_rot, s_rot = a.float() @ torch.randn(5, 5, device=device), s.float() @ torch.randn(6, 6, device=device)
    inverse = torch.rand(6, 5, device=device) + 0.5
    exact = dtype == torch.float32
    return [
        (ops.influence_covariance, (x, None, "triton")),
        (ops.influence_covariance, (x, mask.reshape(-1).float(), "triton")),
        (ops.influence_lambda_correction, (a_rot, s_rot, exact, "triton")),
        (ops.influence_self_scores, (a_rot, s_rot, inverse, exact, "triton")),
        (ops.influence_pairwise_scores, (a.float(), s.float(), torch.randn(2, 6, 5, device=device), exact, "triton")),
    ]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype):
    for op, args in sample_inputs(DEVICE, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.triton
def test_statistics_are_not_differentiable():
    a, s, _ = activations(2, 3, 4, 5, dtype=torch.float32, device=DEVICE)
    out = torch.ops.pyfast.influence_lambda_correction(a.requires_grad_(), s, True, "triton")
    with pytest.raises(RuntimeError, match="[Aa]utograd"):
        out.sum().backward()
