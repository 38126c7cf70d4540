"""Built-in example data: the 8x8 handwritten digits, ready to train on.

The images are the UCI "Optical Recognition of Handwritten Digits" test set
(E. Alpaydin and C. Kaynak, 1998), in the 1,797-image copy that scikit-learn
ships, licensed CC BY 4.0. They are stored in ``lrfind/digits.npz`` as uint8
pixels 0..16 so that examples and tests run offline; see
``lrfind/LICENSE-digits.txt`` for the attribution.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .utils import check_int, check_pct

__all__ = ["digits", "digits_model", "load_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the digits as ``X`` float32 (1797, 64) in [0, 1] (pixel / 16) and ``y`` int64."""
    with resources.files("lrfind").joinpath("digits.npz").open("rb") as f, np.load(f) as npz:
        x, y = npz["X"], npz["y"]
    return (x.astype(np.float32) / 16.0), y.astype(np.int64)


def _stratified_split(y: np.ndarray, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so each class puts ``round(valid_pct * class_size)`` images in valid."""
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_valid = int(round(valid_pct * len(idx)))
        valid.append(idx[:n_valid])
        train.append(idx[n_valid:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


def _check_model_args(image: object, seed: object) -> int:
    """Raise ValueError for a non-bool ``image`` or a seed outside [0, 2**63); return the seed."""
    if not isinstance(image, bool):
        raise ValueError(f"image must be a bool, got {image!r}")
    seed = check_int("seed", seed, low=0)
    if seed >= 2**63:
        raise ValueError(f"seed must be below 2**63, got {seed!r}")
    return seed


def digits_model(image: bool = False, seed: int = 0) -> nn.Module:
    """Small digits classifier: MLP 64-128-10 (default) or, with ``image=True``, a BatchNorm CNN.

    Weights are drawn from ``torch.manual_seed(seed)`` inside ``fork_rng``, so the
    global RNG state is the same after the call as before it.
    """
    seed = _check_model_args(image, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not image:
            return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )


def digits(
    batch_size: int = 64, valid_pct: float = 0.2, seed: int = 0, image: bool = False
) -> tuple[DataLoader, DataLoader, nn.Module]:
    """Digits ``(train_dl, valid_dl, model)``; defaults batch_size=64, valid_pct=0.2, seed=0.

    The split is stratified by class and seeded; the train loader shuffles with its
    own ``torch.Generator`` seeded from ``seed``; valid is not shuffled. With
    ``image=True`` inputs are (N, 1, 8, 8) and the model is a small BatchNorm CNN,
    otherwise inputs are (N, 64) and the model is an MLP. Model init uses ``seed``.

    >>> train_dl, valid_dl, model = digits()
    >>> len(train_dl.dataset), len(valid_dl.dataset)
    (1438, 359)
    """
    batch_size = check_int("batch_size", batch_size)
    valid_pct = check_pct("valid_pct", valid_pct)
    seed = _check_model_args(image, seed)
    x, y = load_digits()
    train_idx, valid_idx = _stratified_split(y, valid_pct, seed)
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise ValueError(f"valid_pct={valid_pct!r} leaves {len(train_idx)} training and "
                         f"{len(valid_idx)} validation images: both need some")
    xt = torch.from_numpy(x)
    if image:
        xt = xt.view(-1, 1, 8, 8)
    yt = torch.from_numpy(y)
    train_ds = TensorDataset(xt[train_idx], yt[train_idx])
    valid_ds = TensorDataset(xt[valid_idx], yt[valid_idx])
    gen = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen)
    valid_dl = DataLoader(valid_ds, batch_size=batch_size, shuffle=False)
    return train_dl, valid_dl, digits_model(image=image, seed=seed)
