"""Seeded benchmark tasks for the LR-suggestion study.

Each task is a function ``task(seed) -> (model, train_dl, valid_dl, loss_func)``; with the
epochs in ``EPOCHS`` a one-cycle run takes about 1-3 s on one CPU thread. The seed sets the
model init and the shuffle order (and, for digits, the train/valid split); the synthetic
problems themselves are fixed, so seeds differ like reruns of one experiment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrfind.data import digits

Task = tuple[nn.Module, DataLoader, DataLoader, Callable]


def _loaders(x: torch.Tensor, y: torch.Tensor, n_valid: int, seed: int, bs: int = 64):
    """Last ``n_valid`` rows are valid; train shuffles with a generator seeded by ``seed``."""
    train = TensorDataset(x[:-n_valid], y[:-n_valid])
    valid = TensorDataset(x[-n_valid:], y[-n_valid:])
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, bs, shuffle=True, generator=gen),
            DataLoader(valid, 256, shuffle=False))


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with weights drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def digits_mlp(seed: int) -> Task:
    """(a) MLP 64-128-10 on the 8x8 digits, cross-entropy."""
    train_dl, valid_dl, model = digits(batch_size=64, seed=seed)
    return model, train_dl, valid_dl, nn.functional.cross_entropy


def digits_cnn(seed: int) -> Task:
    """(b) small BatchNorm CNN on the 8x8 digits as 1x8x8 images, cross-entropy."""
    train_dl, valid_dl, model = digits(batch_size=64, seed=seed, image=True)
    return model, train_dl, valid_dl, nn.functional.cross_entropy


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed regression, 2500 rows: y = sin(2x@a) + (x@b)**2/2 - 1/2 + tanh(2x@c) + noise."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2500, 16, generator=g)
    a, b, c = (torch.randn(16, generator=g) / 4 for _ in range(3))
    y = torch.sin(x @ a * 2) + 0.5 * (x @ b) ** 2 - 0.5 + torch.tanh(x @ c * 2)
    y = y + 0.1 * torch.randn(2500, generator=g)
    return x, y.unsqueeze(1)


def regression(seed: int) -> Task:
    """(c) MLP 16-64-64-1 on a fixed nonlinear regression problem, MSE."""
    x, y = _regression_data()
    train_dl, valid_dl = _loaders(x, y, 500, seed)
    model = _seeded(seed, lambda: nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)))
    return model, train_dl, valid_dl, nn.functional.mse_loss


def _sequence_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed sequences (2000 x 24 steps x 4 channels); label = the channel with the largest sum."""
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(2000, 24, 4, generator=g)
    # the signal is spread over time, so the model must integrate along the sequence
    y = (x.sum(1) + 0.5 * torch.randn(2000, 4, generator=g)).argmax(1)
    return x, y


class _GRUClassifier(nn.Module):
    """GRU(4 -> 32) over the sequence, linear head on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[1][-1])


def sequence(seed: int) -> Task:
    """(d) GRU on a fixed synthetic sequence classification task, cross-entropy."""
    x, y = _sequence_data()
    train_dl, valid_dl = _loaders(x, y, 400, seed)
    return _seeded(seed, _GRUClassifier), train_dl, valid_dl, nn.functional.cross_entropy


def _tabular_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed synthetic tabular data: 3 categorical columns (10 levels) + 6 numeric, binary label."""
    g = torch.Generator().manual_seed(99)
    n = 3000
    cats = torch.randint(0, 10, (n, 3), generator=g)
    nums = torch.randn(n, 6, generator=g)
    effects = torch.randn(3, 10, generator=g)
    logit = effects[torch.arange(3), cats].sum(1) + nums[:, 0] * nums[:, 1] + nums[:, 2]
    y = (logit + 0.5 * torch.randn(n, generator=g) > 0).long()
    return torch.cat([cats.float(), nums], 1), y


class _TabularNet(nn.Module):
    """Embeddings for the categorical columns, concatenated with numerics, MLP with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(10, 4) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(12 + 6, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cats = x[:, :3].long()
        parts = [emb(cats[:, i]) for i, emb in enumerate(self.embs)]
        return self.mlp(torch.cat([*parts, x[:, 3:]], 1))


def tabular(seed: int) -> Task:
    """(e) embeddings + BatchNorm MLP on a fixed synthetic tabular problem, cross-entropy."""
    x, y = _tabular_data()
    train_dl, valid_dl = _loaders(x, y, 600, seed)
    return _seeded(seed, _TabularNet), train_dl, valid_dl, nn.functional.cross_entropy


TASKS: dict[str, Callable[[int], Task]] = {
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "regression": regression,
    "sequence": sequence,
    "tabular": tabular,
}
EPOCHS: dict[str, int] = {
    "digits_mlp": 5, "digits_cnn": 5, "regression": 8, "sequence": 5, "tabular": 5,
}
