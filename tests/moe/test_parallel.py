"""Expert parallelism over gloo on 4 local processes, as one group of 4 ranks and as two groups of 2
ranks: outputs and gradients equal those of the single-process `moe_mlp` / `SparseMoE` with the full
weight set (float64, within 1e-10). One spawn: starting a process costs seconds of imports."""
import socket

import pytest
import torch.multiprocessing as mp

from parallel_cases import worker
from pyfast.moe import expert_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_matches_single_process():
    mp.spawn(worker, args=(4, _free_port()), nprocs=4, join=True)


def test_expert_shard_needs_distributed():
    with pytest.raises(RuntimeError, match="expert_shard: torch.distributed is not initialized"):
        expert_shard(8)
