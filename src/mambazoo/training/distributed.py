"""torch.distributed plumbing: env-driven init, DDP / FSDP2 wrapping, block discovery, rank helpers.

Under ``torchrun`` the process group is initialised from the environment (``RANK``, ``WORLD_SIZE``, ...; SLURM too)
with timm's ``init_distributed_device_so``: nccl on CUDA, gloo on CPU. Without those variables everything runs as one
plain process. See ``docs/training.md`` ("Distributed").
"""
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch import nn

__all__ = [
    "BLOCK_PATTERNS",
    "Distributed",
    "find_blocks",
    "init_distributed",
    "no_sync",
    "shard_with_fsdp",
    "shutdown_distributed",
    "wrap_ddp",
]

# The repeated blocks FSDP2 shards one by one, tried in this order; the first pattern matching any module wins.
# Hierarchical families keep blocks inside stages (MambaOut ``stages.i.blocks.j``, MambaVision ``levels.i.blocks.j``,
# Spatial-Mamba ``layers.i.blocks.j``); plain ones list them directly (Vim/PlainMamba ``layers.j``, ViT ``blocks.j``).
BLOCK_PATTERNS = (
    r"(stages|levels|layers)\.\d+\.blocks\.\d+",
    r"layers\.\d+",
    r"blocks\.\d+",
)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: rank, world size and device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place and return it."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def init_distributed(device: Optional[str] = None) -> Distributed:
    """Join the process group described by the environment (torchrun / SLURM), or run as one plain process.

    Args:
        device: ``"cpu"``, ``"cuda"`` (the local rank's GPU under torchrun) or None (CUDA when available).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    if dist.is_available() and dist.is_initialized():  # joined by the caller (e.g. a script running several jobs)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        resolved = f"cuda:{local_rank}" if device.startswith("cuda") else device
        return Distributed(dist.get_rank(), local_rank, dist.get_world_size(), torch.device(resolved))
    info = init_distributed_device_so(device=device)
    return Distributed(info["global_rank"], info["local_rank"], info["world_size"], torch.device(info["device"]))


def shutdown_distributed() -> None:
    """Leave the process group at the end of a successful command-line run: wait for every rank, then destroy it.

    A process that exits with its group alive leaves Gloo's (or NCCL's) threads to be torn down during interpreter
    finalization, which can abort it (SIGABRT, "terminate called without an active exception") after the work is
    done; PyTorch asks every process to call ``destroy_process_group`` before exiting. Not called after an error: a
    rank that failed must not wait in a collective for ranks that may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks (name, module), found with the first of :data:`BLOCK_PATTERNS` that matches."""
    names = dict(model.named_modules())
    for pattern in BLOCK_PATTERNS:
        matcher = re.compile(rf"^(?:.*\.)?{pattern}$")
        blocks = [(name, module) for name, module in names.items() if matcher.match(name)]
        if blocks:
            return blocks
    raise ValueError(f"--fsdp: no block list found in {type(model).__name__} (looked for module names matching "
                     f"{', '.join(BLOCK_PATTERNS)}); add the model's block pattern to BLOCK_PATTERNS")


def shard_with_fsdp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` with FSDP2: each block of :func:`find_blocks` is one unit, the root holds the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for _, block in find_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel (one device per process on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def no_sync(model: nn.Module, skip_sync: bool):
    """Skip the gradient reduction while accumulating micro-batches (DDP ``no_sync``, FSDP2 gradient sync off)."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif skip_sync and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
