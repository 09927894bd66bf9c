"""Optimisation pieces shared by pretraining and fine-tuning.

Both stages follow the paper: parameter groups that keep embeddings, norms and biases out of
weight decay, linear warmup then cosine or linear decay, clipping at global norm 1, bf16 autocast
on accelerators and fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from vit.checkpoint import METADATA_FILE, CheckpointError
from vit.model import VisionTransformer

Decay = Literal["cosine", "linear"]
DECAYS: tuple[Decay, ...] = get_args(Decay)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The `vit.checkpoint` directory behind what a user points at: the directory itself, a
    Ray Train checkpoint holding one under `model/`, or a Ray Train run folder (its latest
    checkpoint; their names are timestamps). A path that is none of these comes back as given,
    for the loader to reject with its own message.

    Local paths only: `Path` would fold `s3://bucket/key` into a local `s3:/bucket/key` and the
    error would name a path the user never gave.
    """
    if "://" in str(path):
        raise CheckpointError(
            f"{path}: checkpoints are read from local folders; copy it to one first (the "
            "pipeline does so itself from the pretraining run's MLflow artifact)"
        )
    directory = Path(path)
    if (directory / METADATA_FILE).is_file():
        return directory
    if (directory / "model" / METADATA_FILE).is_file():
        return directory / "model"
    checkpoints = sorted(directory.glob(f"checkpoint_*/model/{METADATA_FILE}"))
    return checkpoints[-1].parent if checkpoints else directory


def storage_uri(path: str, storage_path: str) -> str:
    """A path Ray Train or Tune gives, as a location users can open: Ray's paths are below the
    storage filesystem's root, which for `s3://bucket/prefix` storage is a bare bucket key."""
    scheme, separator, _ = storage_path.partition("://")
    return f"{scheme}://{path}" if separator else path


def parameter_groups(model: VisionTransformer, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything `no_weight_decay` exempts."""
    exempt = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_then_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay: Decay
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate, then cosine or linear decay to zero at `total_steps`."""
    check_decay(decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_decay(decay: str) -> None:
    """Refuse a decay this schedule does not know: it would otherwise decay linearly, silently
    (a config file builds its dataclass directly, past the job's check of `--set` values)."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be {' or '.join(map(repr, DECAYS))}, got {decay!r}")


def check_schedule(warmup_steps: int, steps: int) -> None:
    """Refuse a warmup that leaves no decay: the rate would never reach its base value nor
    decay, while the run's params record that base rate as the one it trained with."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, got {warmup_steps}")
    if warmup_steps >= steps:
        raise ValueError(
            f"warmup_steps must be fewer than steps (the decay follows the warmup), "
            f"got {warmup_steps} of {steps}"
        )


def check_grad_clip(grad_clip: float) -> None:
    """A clip at 0 zeroes every gradient and below 0 flips them; `inf` turns clipping off."""
    if not grad_clip > 0:
        raise ValueError(
            f"grad_clip must be positive (float('inf') turns clipping off), got {grad_clip}"
        )


def clip_gradients(model: nn.Module, max_norm: float, *, step: int, learning_rate: float) -> float:
    """Clip the gradients to global norm `max_norm`; their norm before clipping.

    A NaN or infinite norm raises FloatingPointError before any update: clipping would scale
    every gradient by NaN, the weights would all become NaN, and the checkpoints written after
    it would replace the last good ones. Under DDP and FSDP the norm is global, so every worker
    raises at the same step.
    """
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if not math.isfinite(norm):
        raise FloatingPointError(
            f"the gradient norm became {norm} at step {step} (lr {learning_rate:.3g}): the loss "
            "diverged or a batch held non-finite values; try a lower learning rate or a longer "
            "warmup"
        )
    return norm


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA (no loss scaling needed), plain fp32 on CPU where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def count_correct(
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], device: torch.device
) -> tuple[int, int]:
    """(correct, seen) over the batches; callers all-reduce across workers when distributed."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    for batch in batches:
        with autocast(device):
            logits = model(batch["tokens"].to(device, non_blocking=True))
        labels = batch["label"].to(device)
        correct += int((logits.argmax(dim=-1) == labels).sum())
        seen += int(labels.numel())
    model.train(was_training)
    return correct, seen
