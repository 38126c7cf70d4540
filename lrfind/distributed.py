"""Multi-process training under torchrun: the process group, the sampler, the wrapped model."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
from torch import nn


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start the process group when torchrun asks for one; return (world size, rank).

    A group the user started is used as it is and left alone; one started here is closed at
    exit, after a barrier (without it a rank can abort while another still talks to it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(close_distributed)
    return dist.get_world_size(), dist.get_rank()


def is_sharded(model: nn.Module) -> bool:
    """True for a model the user already wrapped for data parallelism (DDP or FSDP)."""
    from torch.distributed import fsdp
    from torch.nn.parallel import DistributedDataParallel

    kinds = [DistributedDataParallel, *(getattr(fsdp, name) for name in
                                        ("FullyShardedDataParallel", "FSDPModule")
                                        if hasattr(fsdp, name))]
    return isinstance(model, tuple(kinds))


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def distributed_loader(dl: Any, world_size: int, rank: int) -> Any:
    """``dl`` with a DistributedSampler (same batch size per process) unless it has one."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if not isinstance(dl, DataLoader) or isinstance(dl.sampler, DistributedSampler):
        return dl
    plain = (type(dl.sampler) in (RandomSampler, SequentialSampler)
             and not getattr(dl.sampler, "replacement", False)
             # no num_samples of its own (torch types Sampler and Dataset without a length)
             and len(dl.sampler) == len(dl.dataset))  # type: ignore[arg-type]
    if dl.batch_size is None or not plain:
        kind = ("batch_sampler (or batch_size=None)" if dl.batch_size is None
                else f"{type(dl.sampler).__name__} settings")
        raise ValueError(f"train_dl has its own {kind}, which sharding for {world_size} "
                         "processes would replace: give it a DistributedSampler yourself, or "
                         "use batch_size and shuffle")
    seed = [dl.generator.initial_seed() if dl.generator is not None else torch.initial_seed()]
    dist.broadcast_object_list(seed, src=0)  # every process must shuffle alike
    sampler: DistributedSampler[Any] = DistributedSampler(
        dl.dataset, world_size, rank, shuffle=isinstance(dl.sampler, RandomSampler),
        seed=seed[0] % 2**63, drop_last=dl.drop_last)
    return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler,
                      num_workers=dl.num_workers, collate_fn=dl.collate_fn,
                      pin_memory=dl.pin_memory, drop_last=dl.drop_last,
                      worker_init_fn=dl.worker_init_fn, persistent_workers=dl.persistent_workers)


def barrier(world_size: int) -> None:
    """Wait for every process (nothing in one process): after rank 0 wrote a file."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def sync_buffers(model: nn.Module, world_size: int) -> None:
    """Give every process the first one's buffers (BatchNorm statistics), as DDP does at each
    forward pass: after an epoch each process has updated them from its own batches, and
    validation, early stopping and checkpoints must see the same model everywhere."""
    if world_size > 1:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def check_same_length(dl: Any) -> None:
    """Raise ValueError unless ``dl`` has as many batches in every process."""
    import torch.distributed as dist

    lengths: list = [None] * dist.get_world_size()
    dist.all_gather_object(lengths, len(dl))
    if len(set(lengths)) > 1:
        raise ValueError(f"train_dl has {lengths} batches in processes 0..{len(lengths) - 1}: "
                         "every process needs the same number, or they wait on each other")
