"""Random MoE inputs shared by the tests."""
import torch


def random_experts(T, E, k, device="cpu", skew=False):
    """(T, k) int32 expert ids, distinct per row; ``skew`` concentrates load on low ids so that
    capacity limits drop assignments."""
    scores = torch.rand(T, E)
    if skew:
        scores = scores + torch.linspace(1.0, 0.0, E)
    return scores.topk(k, dim=1).indices.to(torch.int32).to(device)
