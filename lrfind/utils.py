"""Small helpers shared by the trainer and the finder: argument checks, devices, RNG, files."""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
import sys
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from types import FrameType
from typing import Any

import numpy as np
import torch


def warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside lrfind (the user's line)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lrfind."):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def check_number(name: str, value: object) -> float:
    """Return ``value`` (a Python or numpy real) as a float; ValueError naming ``name`` if it
    is not a finite number."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float > 0, or raise ValueError naming ``name``."""
    value = check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_pct(name: str, value: object) -> float:
    """Return ``value`` as a float in the open interval (0, 1), or raise ValueError."""
    value = check_number(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return value


def check_int(name: str, value: object, low: int = 1) -> int:
    """Return ``value`` (a Python or numpy integer) as an int >= ``low``, else raise ValueError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_path(name: str, value: object) -> str:
    """Return ``value`` as a str path, or raise TypeError naming ``name``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    return os.fspath(value)


def map_nested(obj: Any, fn: Callable[[Any], Any], kind: type = torch.Tensor) -> Any:
    """``obj`` with ``fn`` applied to every ``kind`` nested in tuples, lists and mappings.

    A mapping keeps its type and attributes (a ``defaultdict`` its factory, a ``UserDict``
    subclass such as a tokenizer's batch its fields): it is copied, then its values replaced.
    """
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [map_nested(o, fn, kind) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        values = {k: map_nested(v, fn, kind) for k, v in obj.items()}
        if not isinstance(obj, MutableMapping):
            return values
        out = copy.copy(obj)
        out.update(values)
        return out
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors nested in tuples, lists and mappings to ``device``; leave anything else."""
    return map_nested(obj, lambda t: t.to(device, non_blocking=True))


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(
        obj, (list, tuple)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def batch_size(batch: Any) -> int:
    """Length of the first tensor in ``batch`` (depth first, past any non-tensor field), else 1."""
    t = _first_tensor(batch)
    return 1 if t is None or t.ndim == 0 else t.shape[0]


#: generator types a loader or sampler may draw its order from
GENERATORS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def loader_generators(dl: Any) -> list[Any]:
    """The generators a loader draws its order from (any of :data:`GENERATORS`).

    That is the ``generator`` attribute of the loader, its sampler and its batch sampler (and
    the batch sampler's sampler).
    """
    found: list = []
    for owner in (dl, getattr(dl, "sampler", None), getattr(dl, "batch_sampler", None),
                  getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, GENERATORS) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _generator_state(gen: Any) -> Any:
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    return gen.getstate() if isinstance(gen, random.Random) else gen.get_state()


def _set_generator_state(gen: Any, state: Any) -> None:
    if isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    elif isinstance(gen, random.Random):
        gen.setstate(state)
    else:
        gen.set_state(state)


def get_rng_state(dl: Any = None) -> dict:
    """Snapshot of the torch (CPU and CUDA), numpy and Python RNGs and ``dl``'s generators."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(),
             "loader": [_generator_state(g) for g in loader_generators(dl)]
                        if dl is not None else []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, dl: Any = None) -> None:
    """Restore a snapshot taken by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if dl is not None:
        for gen, s in zip(loader_generators(dl), state.get("loader", [])):
            _set_generator_state(gen, s)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a hidden temporary file in the same folder, then rename it to ``path``.

    The rename is atomic: a crash during the write leaves the previous file intact. The
    temporary name is fixed per target (``.NAME.tmp``), so a write cut short is overwritten by
    the next one instead of piling up.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
