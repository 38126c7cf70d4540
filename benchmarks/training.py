"""Real-training speed: bf16 against fp32 on CPU, and two processes against one.

    python benchmarks/training.py [--quick]

1. ``fit_one_cycle`` time per batch of a small CNN in bf16 (autocast) against fp32, one CPU
   thread, alternating runs, median of pairs.
2. The same global batch (64) in one process against two processes of 32 each under
   ``torchrun`` (gloo), time per epoch of ``fit_one_cycle`` on the small CNN.
On a CUDA machine it also times fp16 and bf16 ``fit_one_cycle`` against a hand-written AMP loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfind

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from overhead import ratio as pairs  # noqa: E402


def cnn() -> nn.Module:
    """A small CNN with BatchNorm on 3x32x32 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def data(n: int, bs: int, device: str = "cpu") -> DataLoader:
    """Random images and labels (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=bs, shuffle=True)


def fit_time(precision: str, dl: DataLoader, device: str = "cpu") -> float:
    """Seconds per batch of one epoch of ``fit_one_cycle``."""
    learn = lrfind.Learner(cnn().to(device), dl, loss_func=F.cross_entropy, progress=False,
                           precision=precision)
    start = time.perf_counter()
    learn.fit_one_cycle(1, 1e-2)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(dl)


def raw_amp_time(precision: str, dl: DataLoader) -> float:
    """Seconds per batch of a hand-written AMP loop with OneCycleLR on CUDA."""
    model = cnn().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=len(dl))
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start = time.perf_counter()
    for xb, yb in dl:
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(dl)


DDP_CHILD = """
import json, os, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {here!r})
import training, lrfind
torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
dl = training.data({n}, 64 // world)
learn = lrfind.Learner(training.cnn(), dl, loss_func=F.cross_entropy, progress=False)
learn.fit_one_cycle(1, 1e-2)  # warm-up epoch
start = time.perf_counter()
learn.fit_one_cycle({epochs}, 1e-2)
if learn.is_main:
    json.dump((time.perf_counter() - start) / {epochs}, open({out!r}, "w"))
"""


def ddp_epoch_time(nproc: int, n: int, epochs: int) -> float:
    """Seconds per epoch with ``nproc`` processes sharing a global batch of 64."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.json")
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(DDP_CHILD.format(here=HERE, n=n, epochs=epochs, out=out))
        cmd = ([sys.executable, script] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                script])
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE),
                                              os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        with open(out) as f:
            return json.load(f)


def tables(quick: bool) -> str:
    """The tables, as markdown."""
    torch.set_num_threads(1)
    n_pairs, n = (3, 512) if quick else (5, 1024)
    dl = data(n, 64)
    r, bf, fp = pairs(lambda: fit_time("bf16", dl), lambda: fit_time("32", dl), n_pairs)
    lines = ["| small CNN, CPU, 1 thread | ms/batch |", "|---|---|",
             f"| fp32 | {fp * 1e3:.1f} |", f"| bf16 (autocast) | {bf * 1e3:.1f} |",
             f"| bf16 / fp32 | {r:.2f}x |", ""]
    one, two = ddp_epoch_time(1, n, 2), ddp_epoch_time(2, n, 2)
    lines += ["| small CNN, global batch 64 | s/epoch |", "|---|---|",
              f"| 1 process | {one:.2f} |", f"| 2 processes (gloo, 32 each) | {two:.2f} |",
              f"| speed-up | {one / two:.2f}x |"]
    if torch.cuda.is_available():
        gdl = data(8192, 256, "cuda")
        lines += ["", "| CUDA, batch 256 | lrfind ms/batch | raw AMP loop ms/batch | ratio |",
                  "|---|---|---|---|"]
        for p in ("fp16", "bf16"):
            fit_time(p, gdl, "cuda")  # warm-up
            r, ours, raw = pairs(lambda p=p: fit_time(p, gdl, "cuda"),
                                 lambda p=p: raw_amp_time(p, gdl), n_pairs)
            lines.append(f"| {p} | {ours * 1e3:.2f} | {raw * 1e3:.2f} | {r:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the tables."""
    parser = argparse.ArgumentParser(description="bf16 vs fp32 on CPU; 2 processes vs 1")
    parser.add_argument("--quick", action="store_true")
    out = tables(parser.parse_args(argv).quick)
    print(out)
    return out


if __name__ == "__main__":
    main()
