"""Agreement with kronfluence (optional test dependency) on a small MLP regression task with the
same conventions: bias column, empirical Fisher from the summed loss, float64 everywhere,
damping 0.1 x mean(Lambda). Factors and scores equal within float64 tolerance."""
import pytest
import torch

from pyfast.influence import Analyzer

kronfluence = pytest.importorskip("kronfluence", reason="kronfluence is an optional test dependency")

from kronfluence.analyzer import Analyzer as KronfluenceAnalyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

F64 = torch.float64


class _Regression(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return (model(x) - y).square().sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _summed_loss(model, batch):
    x, y = batch
    return (model(x) - y).square().sum()


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")
def test_scores_and_lambda_match_kronfluence(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()
    g = torch.Generator().manual_seed(3)
    train = _Pairs(torch.randn(24, 5, generator=g, dtype=F64), torch.randn(24, 2, generator=g, dtype=F64))
    query = _Pairs(torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64))

    ours = Analyzer(model, progress=False)
    ours.fit_factors([train[i : i + 8] for i in range(0, 24, 8)], _summed_loss)
    scores = ours.pairwise_scores([query[:]], _summed_loss, [train[i : i + 6] for i in range(0, 24, 6)], _summed_loss)
    self_scores = ours.self_scores([train[:]], _summed_loss)

    task = _Regression()
    kf_model = prepare_model(model, task)
    analyzer = KronfluenceAnalyzer("agreement", kf_model, task, output_dir=str(tmp_path), cpu=True, disable_model_save=True, disable_tqdm=True)
    dtypes = dict(
        activation_covariance_dtype=F64, gradient_covariance_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64
    )
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(use_empirical_fisher=True, **dtypes), overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64)
    analyzer.compute_pairwise_scores("p", "f", query, train, per_device_query_batch_size=4, per_device_train_batch_size=6,
                                     score_args=score_args, overwrite_output_dir=True)
    analyzer.compute_self_scores("s", "f", train, per_device_train_batch_size=24, score_args=score_args, overwrite_output_dir=True)
    kf_scores = analyzer.load_pairwise_scores("p")["all_modules"]
    kf_self = analyzer.load_self_scores("s")["all_modules"]
    kf_lambda = analyzer.load_lambda_matrices("f")
    for name in ours.names:
        lam = kf_lambda["lambda_matrix"][name] / kf_lambda["num_lambda_processed"][name]
        torch.testing.assert_close(ours.factors[name].Lambda, lam.to(F64), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(scores, kf_scores.to(F64), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(self_scores, kf_self.to(F64), rtol=1e-8, atol=1e-12)
