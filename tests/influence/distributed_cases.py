"""Per-rank check of the data-parallel Analyzer, run in processes spawned by test_distributed.py (a
module of its own so that the spawned processes can import it): factors, pairwise and self scores
on 2 ranks equal those of one process (float64), for a Dataset (uneven shards, ``train_indices``)
and for ready batches."""
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from pyfast.influence import Analyzer

F64 = torch.float64


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _loss(model, batch):
    x, y, mask = batch
    return ((model(x) - y).square().sum(-1) * mask).sum(), mask


def _results(model, train, queries, batches):
    analyzer = Analyzer(model, batch_size=3, progress=False)
    factors = analyzer.fit_factors(train, _loss)
    pairwise = analyzer.pairwise_scores(queries, _loss, train, _loss, train_indices=[9, 2, 4, 0, 12, 5], train_batch_size=2)
    per_layer = analyzer.self_scores(train, _loss, per_layer=True)
    batched = analyzer.pairwise_scores([queries[:]], _loss, batches, _loss)
    refit = Analyzer(model, progress=False).fit_factors(batches, _loss)
    return factors, pairwise, per_layer, batched, refit


def worker(rank: int, world: int, init_file: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 4, 3, generator=g, dtype=F64), torch.randn(13, 4, 2, generator=g, dtype=F64)
    mask = torch.rand(13, 4, generator=g) > 0.3
    train = TensorDataset(x, y, mask)
    queries = TensorDataset(x[:3] + 0.5, y[:3], mask[:3])
    batches = [train[i : i + 4] for i in range(0, 13, 4)]  # 4 batches: uneven token counts per rank
    model = _model()
    expected = _results(model, train, queries, batches)  # one process: before the group exists

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        actual = _results(model, train, queries, batches)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
