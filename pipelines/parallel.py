"""Data parallelism for pretraining: DDP replicas or FSDP shards behind one interface.

DDP keeps a whole copy of the model, its gradients and its Adam state on every worker, enough up
to ViT-B on one GPU. FSDP (PyTorch's `fully_shard`, one unit per transformer block) keeps
1/world of the weights and of the Adam state, and gathers a block's weights only while it runs,
so ViT-L and ViT-H fit; gradients are whole until the step's last micro-batch reduce-scatters
them (see `gradient_sync`). The training loop calls the same few functions for both, and
checkpoints hold full, unsharded state dicts keyed by parameter name: a run resumes at any worker
count, under either strategy.

Plain PyTorch on an initialised process group (Ray Train sets one up; tests use
`torch.distributed` directly), so the same code runs on CPU with gloo and on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from vit.model import Block, VisionTransformer

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")


def distribute(model: VisionTransformer, strategy: Strategy, device: torch.device) -> nn.Module:
    """Move `model` to `device` and wrap it for data-parallel training over the process group.

    Build the optimizer afterwards, over `unwrap(distributed).parameters()`: FSDP replaces the
    parameters with sharded ones. Every worker must pass identical weights (seed the
    initialisation alike, or load the same checkpoint): FSDP keeps each worker's own slice.
    """
    check_strategy(strategy)
    model = model.to(device)
    if world_size() == 1:
        return model
    if strategy == "ddp":
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in model.modules():
        if isinstance(block, Block):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the embeddings, final norm and head
    return model


def unwrap(model: nn.Module) -> VisionTransformer:
    """The model inside a DDP wrapper (FSDP modifies the model in place: it is its own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
    micro-batch of an accumulated step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model, optimizer) state dicts, whole and on the CPU, keyed by parameter name.

    A collective: every worker must call it. Under FSDP only rank 0 gets the gathered state
    (the others get empty dicts), which is the rank that writes checkpoints.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a `full_state` optimizer state dict, each worker keeping its own shard under FSDP.

    The tensors go to the parameters' device, whichever device they were saved from. A state
    keyed by position, as `optimizer.state_dict()` writes it (checkpoints from before FSDP), is
    read in the optimizer's own parameter order, which `parameter_groups` keeps.
    """
    groups = state.get("param_groups", [])
    if any(isinstance(index, int) for group in groups for index in group["params"]):
        state = _keyed_by_name(model, optimizer, state)
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def _keyed_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    names = {id(param): name for name, param in unwrap(model).named_parameters()}
    ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(ordered):
        raise ValueError(
            f"the checkpoint's optimizer state covers {saved} parameters, the model has "
            f"{len(ordered)}"
        )
    return {
        "state": {ordered[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [ordered[index] for index in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def replica_divergence(model: nn.Module) -> float | None:
    """Largest difference of per-tensor parameter sums between this rank and the others.

    DDP replicas must hold identical weights; anything but 0.0 means a broken all-reduce or a
    non-deterministic update and is worth a loud metric. FSDP holds no replicas: None.
    """
    if isinstance(model, FSDPModule):
        return None
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    if world_size() == 1:
        return 0.0
    gathered = [torch.empty_like(sums) for _ in range(world_size())]
    dist.all_gather(gathered, sums)
    return float(max((g - gathered[0]).abs().max() for g in gathered))
