"""patch_hf on tiny randomly initialized Hugging Face MoE models (no downloads)."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close

transformers = pytest.importorskip("transformers", minversion="5.0")


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
        shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=7, num_experts_per_tok=3, max_position_embeddings=64, norm_topk_prob=False,
    )
    return transformers.Qwen2MoeForCausalLM(config)


@pytest.mark.parametrize("make", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_patch_hf_keeps_outputs_and_gradients(make):
    torch.manual_seed(0)
    model = make().eval()
    tokens = torch.randint(0, 64, (2, 9))
    before = model(tokens).logits
    grads_before = torch.autograd.grad(before.square().sum(), list(model.parameters()), allow_unused=True)
    assert pyfast.moe.patch_hf(model) == model.config.num_hidden_layers
    after = model(tokens).logits
    grads_after = torch.autograd.grad(after.square().sum(), list(model.parameters()), allow_unused=True)
    assert_close(after, before, torch.float32, "logits")
    for name, (g, r) in zip([n for n, _ in model.named_parameters()], zip(grads_after, grads_before)):
        if r is not None:
            assert_close(g, r, torch.float32, name)


def test_patch_hf_rejects_non_modules():
    with pytest.raises(TypeError, match="patch_hf: model must be a torch.nn.Module, got dict"):
        pyfast.moe.patch_hf({})
