"""Small batch sources honouring archlab's batch-source contract, for the training tests.

Contract (the one archlab.data's loaders follow): iterating yields batches (dicts of tensors) forever;
``state_dict()`` / ``load_state_dict()`` (JSON-able) give the position after the last batch handed out;
``rank`` / ``world_size`` pick this rank's contiguous slice ``[r B/W, (r+1) B/W)`` of each global batch.

Global batch ``i`` is a pure function of ``(seed, i)``, so a resumed or sharded source reproduces it.
Imported by the tests (tests/train/conftest.py puts this folder on sys.path) and by the torchrun worker.
"""

from __future__ import annotations

import dataclasses

import torch

from archlab.config import Config


class LMSource:
    """Language-modelling batches of arithmetic sequences ``x_t = (a + t b) mod V``: learnable, so the loss falls.

    ``ragged=True`` replaces a random tail of each row's labels by -100, so micro-batches hold different
    numbers of targets (what loss normalisation must get right).
    """

    def __init__(
        self, *, batch_size: int = 8, seq_len: int = 16, vocab: int = 256, seed: int = 0,
        rank: int = 0, world_size: int = 1, ragged: bool = False,
    ):  # fmt: skip
        assert batch_size % world_size == 0
        self.batch_size, self.seq_len, self.vocab, self.seed = batch_size, seq_len, vocab, seed
        self.rank, self.world_size, self.ragged = rank, world_size, ragged
        self.index = 0

    def global_batch(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        b, n = self.batch_size, self.seq_len + 1
        start = torch.randint(0, self.vocab, (b, 1), generator=g)
        step = torch.randint(1, 5, (b, 1), generator=g)
        seq = (start + step * torch.arange(n)) % self.vocab
        labels = seq[:, 1:].clone()
        if self.ragged:
            keep = torch.randint(1, n, (b, 1), generator=g)
            labels[torch.arange(n - 1) >= keep] = -100
        return {"input_ids": seq[:, :-1], "labels": labels}

    def __iter__(self):
        while True:
            batch = self.global_batch(self.index)
            self.index += 1
            per = self.batch_size // self.world_size
            yield {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


@dataclasses.dataclass(frozen=True)
class RegressionConfig(Config):
    d: int = 4


class RegressionModel(torch.nn.Module):
    """A 'custom' task model: ``compute_loss(batch) -> (mean squared error, metrics)``; a NaN input makes a NaN loss."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.config = RegressionConfig(d)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(d, d), torch.nn.Linear(d, 1)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x))).squeeze(-1)

    def compute_loss(self, batch):
        error = self(batch["x"]) - batch["y"]
        loss = error.pow(2).mean()
        return loss, {"mse": loss.detach(), "tokens": batch["x"].shape[0]}


class ScaledRegressionModel(RegressionModel):
    """:class:`RegressionModel` times a learned 0-dim ``scale``: a parameter FSDP2 cannot shard (it has no
    dimension), which archlab keeps whole on every rank and averages the gradient of."""

    def __init__(self, d: int = 4):
        super().__init__(d)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * super().forward(x)


class RegressionSource:
    """Batches for :class:`RegressionModel`, in ``dtype``; from batch ``nan_at`` on, the inputs are NaN.
    ``rank`` of ``world_size`` takes its contiguous slice of each global batch (module docstring)."""

    def __init__(
        self, *, batch_size: int = 8, d: int = 4, nan_at: int | None = None, rank: int = 0, world_size: int = 1,
        dtype: torch.dtype = torch.float32,
    ):  # fmt: skip
        assert batch_size % world_size == 0
        self.batch_size, self.d, self.nan_at, self.index = batch_size, d, nan_at, 0
        self.rank, self.world_size, self.dtype = rank, world_size, dtype

    def __iter__(self):
        per = self.batch_size // self.world_size
        while True:
            g = torch.Generator().manual_seed(self.index)
            x = torch.randn(self.batch_size, self.d, generator=g).to(self.dtype)
            if self.nan_at is not None and self.index >= self.nan_at:
                x = torch.full_like(x, float("nan"))
            self.index += 1
            x = x[self.rank * per : (self.rank + 1) * per]
            yield {"x": x, "y": x.sum(-1).sin()}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
