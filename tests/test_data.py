"""Built-in digits data: offline load, shapes, seeded splits and models, argument checks."""

import re

import numpy as np
import pytest
import torch

from lrfind.data import digits, digits_model, load_digits


def test_load_digits_offline_shapes_and_range():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.unique(y), np.arange(10))
    assert np.allclose(x * 16, np.round(x * 16))  # pixels were counts 0..16


def test_split_sizes_and_stratified():
    train_dl, valid_dl, _ = digits(valid_pct=0.2)
    n_train, n_valid = len(train_dl.dataset), len(valid_dl.dataset)
    assert n_train + n_valid == 1797 and n_valid == 359
    y_valid = valid_dl.dataset.tensors[1].numpy()
    counts = np.bincount(y_valid, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # about 20% of each class (174..183)


def test_mlp_batch_and_output():
    train_dl, valid_dl, model = digits(batch_size=32)
    xb, yb = next(iter(train_dl))
    assert xb.shape == (32, 64) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert model(xb).shape == (32, 10)
    assert not valid_dl.dataset.tensors[0].requires_grad


def test_image_cnn_has_batchnorm():
    train_dl, _, model = digits(image=True)
    xb, _ = next(iter(train_dl))
    assert xb.shape == (64, 1, 8, 8)
    assert model(xb).shape == (64, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def _first_batch_and_weights(seed):
    train_dl, valid_dl, model = digits(seed=seed)
    xb, _ = next(iter(train_dl))
    return xb, valid_dl.dataset.tensors[1], torch.cat([p.flatten() for p in model.parameters()])


def test_same_seed_same_everything():
    a, b = _first_batch_and_weights(3), _first_batch_and_weights(3)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_different_seed_differs():
    a, b = _first_batch_and_weights(0), _first_batch_and_weights(1)
    for u, v in zip(a, b, strict=True):
        assert not torch.equal(u, v)


def test_valid_loader_not_shuffled():
    _, valid_dl, _ = digits()
    first = torch.cat([yb for _, yb in valid_dl])
    second = torch.cat([yb for _, yb in valid_dl])
    assert torch.equal(first, second)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digits(seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"valid_pct": 0.0}, "valid_pct"),
        ({"valid_pct": 1.0}, "valid_pct"),
        ({"valid_pct": "0.2"}, "valid_pct"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"valid_pct": 0.001}, "valid_pct"),
        ({"valid_pct": 0.999}, "valid_pct"),
        ({"image": 1}, "image"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_args_raise(kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(repr(value))}"):
        digits(**kwargs)


def test_numpy_numbers_are_accepted_and_the_model_checks_its_arguments():
    a, _, _ = digits(batch_size=np.int64(32), valid_pct=np.float32(0.25), seed=np.int64(1))
    b, _, _ = digits(batch_size=32, valid_pct=0.25, seed=1)
    assert a.batch_size == 32 and len(a.dataset) == len(b.dataset)
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got 1.5"):
        digits_model(seed=1.5)
    with pytest.raises(ValueError, match=r"^image must be a bool, got 'no'"):
        digits_model(image="no")
