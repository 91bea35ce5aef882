"""Data-parallel Analyzer over gloo on 2 local processes: factors (covariance and Lambda sums
all-reduced with their counts) and scores (training set sharded, gathered in order) equal those of
one process (float64). One spawn: starting a process costs seconds of imports."""
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_cases import worker


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
