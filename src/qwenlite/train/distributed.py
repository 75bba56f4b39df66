"""Data-parallel training under torchrun: the process group, DDP or FSDP2, and full (unsharded) state dicts
for checkpoints.

`torchrun --nproc-per-node N qwenlite/cli.py train pretrain ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; without them everything here is a no-op for one process. Backend: NCCL on CUDA, gloo on
CPU. `--fsdp` shards each decoder layer and then the root (embedding, tied head, final norm) with FSDP2's
`fully_shard`, which runs on gloo/CPU as well as NCCL/CUDA.

Checkpoints go through `torch.distributed.checkpoint.state_dict`, which gathers full tensors from FSDP and
keys the optimizer state by parameter name: a checkpoint written by one world size (DDP or FSDP) resumes at
any other, and in a single process."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, SparseMoeBlock


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment and join the process group (once). `device` None: CUDA when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.device("cuda", local) if kind == "cuda" else torch.device(kind)
    if world > 1 and not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, where)


def shutdown(env: DistEnv, wait_for_others: bool = True) -> None:
    if env.distributed and dist.is_initialized():
        if wait_for_others:
            dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wrap_model(model: Qwen3_5ForCausalLM, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """The module to call in the training loop: DDP around the model, or the model itself sharded in place
    by FSDP2 (each decoder layer, then the root), or the model alone in one process."""
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # A MoE's experts that no token of a rank's micro-batch chose get no gradient there: DDP must look for them.
    moe = any(isinstance(m, SparseMoeBlock) for m in model.modules())
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=moe)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulated step."""
    if enabled:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# torch.distributed.checkpoint is imported where used: it takes half a second, and the CLI imports this module.


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors, gathered into rank 0's CPU memory (other ranks get an empty dict). Collective under FSDP:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, gathered like `full_model_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Every rank passes the full state (read from the checkpoint); FSDP keeps its own shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
