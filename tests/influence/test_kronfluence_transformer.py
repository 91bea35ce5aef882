"""Agreement with kronfluence (optional test dependency) on a tiny causal transformer (a randomly
initialized Hugging Face Llama: attention, gated MLP and head, every nn.Linear tracked) with
right-padded sequences: the padding mask counts in the covariances, the loss is the next-token
cross-entropy summed over real tokens (empirical Fisher), float64, damping 0.1 x mean(Lambda).
Lambda, pairwise and self scores equal within float64 tolerance."""
import pytest
import torch
import torch.nn.functional as F

from pyfast.influence import Analyzer

kronfluence = pytest.importorskip("kronfluence", reason="kronfluence is an optional test dependency")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

from kronfluence.analyzer import Analyzer as KronfluenceAnalyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

F64 = torch.float64
VOCAB, T = 32, 7


def _loss(model, batch):
    """Next-token cross-entropy summed over real tokens, and the padding mask."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return (per_token * mask[:, 1:].reshape(-1)).sum(), mask


class _NextToken(Task):
    def compute_train_loss(self, batch, model, sample=False):
        return _loss(model, batch)[0]

    def compute_measurement(self, batch, model):
        return _loss(model, batch)[0]

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def _sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    return _Sequences(ids, (torch.arange(T)[None] < lengths[:, None]).long())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_transformer_scores_match_kronfluence(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(F64).eval()
    train, queries = _sequences(10, 1), _sequences(3, 2)

    ours = Analyzer(model, batch_size=4, progress=False)
    ours.fit_factors(train, _loss)
    scores = ours.pairwise_scores(queries, _loss, train, _loss)
    self_scores = ours.self_scores(train, _loss)
    assert len(ours.names) == 2 * 7 + 1

    task = _NextToken()
    analyzer = KronfluenceAnalyzer("agreement", prepare_model(model, task), task, output_dir=str(tmp_path), cpu=True,
                                   disable_model_save=True, disable_tqdm=True)
    dtypes = dict(activation_covariance_dtype=F64, gradient_covariance_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64)
    analyzer.fit_all_factors("f", train, per_device_batch_size=4, factor_args=FactorArguments(use_empirical_fisher=True, **dtypes),
                             overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64)
    analyzer.compute_pairwise_scores("p", "f", queries, train, per_device_query_batch_size=3, per_device_train_batch_size=4,
                                     score_args=score_args, overwrite_output_dir=True)
    analyzer.compute_self_scores("s", "f", train, per_device_train_batch_size=4, score_args=score_args, overwrite_output_dir=True)
    kf_lambda = analyzer.load_lambda_matrices("f")
    for name in ours.names:
        lam = kf_lambda["lambda_matrix"][name] / kf_lambda["num_lambda_processed"][name]
        torch.testing.assert_close(ours.factors[name].Lambda, lam.to(F64), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(scores, analyzer.load_pairwise_scores("p")["all_modules"].to(F64), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(self_scores, analyzer.load_self_scores("s")["all_modules"].to(F64), rtol=1e-8, atol=1e-12)
