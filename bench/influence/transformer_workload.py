"""Whole-model influence workload: a small causal transformer built here (pre-norm blocks of
fused QKV attention and a 4x GELU MLP, learned positions, an untied head with bias), every nn.Linear
tracked, next-token cross-entropy summed over tokens (empirical Fisher: real labels).

Sizes (``FULL``: 2 layers, d = 128, 64 tokens, vocab 512, 64 training and 8 query sequences;
``QUICK``: 2 layers, d = 64, 32 tokens, vocab 256, 32 training and 4 query sequences).

Two providers run the same stages on the same model and data, in float32 on the CPU:
pyfast's `Analyzer` and kronfluence 1.0.1's Analyzer at its defaults (EK-FAC, float32, full-rank
queries, its factors and scores written to disk as it always does) except two conventions set equal:
the empirical Fisher and damping 0.1 x mean(Lambda) (its heuristic, ``damping_factor=None``).
"""
from __future__ import annotations

import copy
import functools
import tempfile
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Sizes(NamedTuple):
    layers: int
    d: int
    heads: int
    tokens: int
    vocab: int
    train: int
    queries: int
    batch: int


FULL = Sizes(layers=2, d=128, heads=4, tokens=64, vocab=512, train=64, queries=8, batch=16)
QUICK = Sizes(layers=2, d=64, heads=4, tokens=32, vocab=256, train=32, queries=4, batch=16)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CausalTransformer(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        self.embed, self.position = nn.Embedding(sizes.vocab, sizes.d), nn.Embedding(sizes.tokens, sizes.d)
        self.blocks = nn.ModuleList(Block(sizes.d, sizes.heads) for _ in range(sizes.layers))
        self.norm, self.head = nn.LayerNorm(sizes.d), nn.Linear(sizes.d, sizes.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token, summed over tokens and sequences."""
    logits = model(tokens)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")


class Sequences(Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


class Workload(NamedTuple):
    sizes: Sizes
    model: CausalTransformer
    train: Sequences
    queries: Sequences

    @property
    def linears(self) -> int:
        return sum(isinstance(m, nn.Linear) for m in self.model.modules())

    def describe(self) -> str:
        s = self.sizes
        return f"{s.layers} layers d={s.d} T={s.tokens} vocab={s.vocab} N={s.train} Q={s.queries} batch={s.batch} float32"


@functools.lru_cache(maxsize=2)
def setup(sizes: Sizes) -> Workload:
    torch.manual_seed(0)
    model = CausalTransformer(sizes).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(sizes.vocab, (sizes.train + sizes.queries, sizes.tokens), generator=g)
    return Workload(sizes, model, Sequences(tokens[: sizes.train]), Sequences(tokens[sizes.train :]))


class Pyfast:
    """pyfast's Analyzer on the workload."""

    def __init__(self, work: Workload):
        from pyfast.influence import Analyzer

        self.work = work
        self.analyzer = Analyzer(work.model, batch_size=work.sizes.batch, progress=False)

    def fit(self):
        return self.analyzer.fit_factors(self.work.train, next_token_loss)

    def pairwise_scores(self) -> torch.Tensor:
        w = self.work
        return self.analyzer.pairwise_scores(w.queries, next_token_loss, w.train, next_token_loss)

    def self_scores(self) -> torch.Tensor:
        return self.analyzer.self_scores(self.work.train, next_token_loss)


class Kronfluence:
    """kronfluence's Analyzer on the workload (outputs in a temporary directory)."""

    def __init__(self, work: Workload):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class NextToken(Task):
            def compute_train_loss(self, batch, model, sample=False):
                return next_token_loss(model, batch)

            def compute_measurement(self, batch, model):
                return next_token_loss(model, batch)

        self.work = work
        self.directory = tempfile.TemporaryDirectory(prefix="kronfluence-bench-")
        task = NextToken()
        model = prepare_model(copy.deepcopy(work.model), task)
        self.analyzer = Analyzer("bench", model, task, output_dir=self.directory.name, cpu=True,
                                 disable_model_save=True, disable_tqdm=True)
        self.factor_args = FactorArguments(use_empirical_fisher=True)
        self.score_args = ScoreArguments(damping_factor=None)

    def fit(self):
        self.analyzer.fit_all_factors("factors", self.work.train, per_device_batch_size=self.work.sizes.batch,
                                      factor_args=self.factor_args, overwrite_output_dir=True)
        return self.analyzer.load_lambda_matrices("factors")

    def pairwise_scores(self) -> torch.Tensor:
        w = self.work
        self.analyzer.compute_pairwise_scores("pairwise", "factors", w.queries, w.train, per_device_query_batch_size=w.sizes.queries,
                                              per_device_train_batch_size=w.sizes.batch, score_args=self.score_args,
                                              overwrite_output_dir=True)
        return self.analyzer.load_pairwise_scores("pairwise")["all_modules"]

    def self_scores(self) -> torch.Tensor:
        self.analyzer.compute_self_scores("self", "factors", self.work.train, per_device_train_batch_size=self.work.sizes.batch,
                                          score_args=self.score_args, overwrite_output_dir=True)
        return self.analyzer.load_self_scores("self")["all_modules"]
