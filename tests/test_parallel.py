"""DDP and FSDP behind `pipelines.parallel`: two real gloo processes on this machine, no mocks.

The same seeded weights and the same per-worker batches go through both strategies, so any
difference in the trained weights is the strategy's: sharding, skipped gradient sync during
accumulation, clipping over shards, the sharded optimizer, or the full-state checkpoint.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines import parallel
from pipelines.training import parameter_groups
from vit.config import ViTConfig
from vit.model import VisionTransformer

WORLD = 2
CONFIG = ViTConfig(image_size=8, patch_size=2, width=32, depth=2, mlp_dim=64, num_heads=2)
ACCUMULATION = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps well above the gradients' rounding noise: with Adam's 1e-8 a parameter whose gradient
    # is ~0 moves by +-lr on the sign of that noise, which differs between any two reductions.
    groups = parameter_groups(parallel.unwrap(model), 0.1)
    return torch.optim.AdamW(groups, lr=1e-2, eps=1e-3)


def _worker(
    rank: int,
    world: int,
    port: int,
    strategy: str,
    steps: range,
    resume: Path | None,
    results: Any,
) -> None:
    """Train `steps` (indices into a fixed stream of batches) and hand rank 0's full state back.

    A step's batch is WORLD x ACCUMULATION micro-batches whatever the number of workers: each
    of `world` workers takes its share, so any `world` makes the same update.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank stuck in a collective fails the test in a minute, not in gloo's half hour.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = VisionTransformer(CONFIG)
    if resume:  # each worker reads the checkpoint file itself, as in pretraining
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
    model = parallel.distribute(model, strategy, torch.device("cpu"))
    optimizer = _optimizer(model)
    if resume:
        parallel.load_optimizer_state(model, optimizer, saved["optimizer"])
    local = sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
    )
    held = [0] * world  # parameters each worker holds
    dist.all_gather_object(held, local)
    mine = [(r, i) for r in range(rank, WORLD, world) for i in range(ACCUMULATION)]
    for step in steps:
        for count, (data_rank, index) in enumerate(mine, start=1):
            batch = torch.Generator().manual_seed(1000 * step + 10 * index + data_rank)
            shape = (4, CONFIG.num_patches, CONFIG.patch_dim)
            tokens = torch.randint(0, 256, shape, generator=batch, dtype=torch.uint8)
            labels = torch.randint(0, CONFIG.num_classes, (4,), generator=batch)
            with parallel.gradient_sync(model, count == len(mine)):
                loss = torch.nn.functional.cross_entropy(model(tokens), labels)
                (loss / len(mine)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # binds: the norms are 2-3
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights, optimizer_state = parallel.full_state(model, optimizer)
    divergence = parallel.replica_divergence(model)
    # A replica nudged out of step on the last rank (never rank 0, whose weights go back): the
    # divergence metric must see it (0.0 for it would make the check above say nothing).
    if divergence is not None and world > 1 and rank == world - 1:
        with torch.no_grad():
            next(model.parameters()).add_(0.25)
    nudged = parallel.replica_divergence(model)
    if rank == 0:
        results.put(
            {
                "model": weights,
                "optimizer": optimizer_state,
                "held": held,
                "divergence": divergence,
                "nudged_divergence": nudged,
            }
        )
    dist.barrier()
    dist.destroy_process_group()
    # The result is delivered: end without interpreter teardown, where gloo threads that objects
    # FSDP caches keep alive can abort a finished process (seen once, under load).
    os._exit(0)


def train(strategy: str, steps: range, resume: Path | None = None, world: int = WORLD) -> dict:
    with mp.get_context("spawn").Manager() as manager:
        results = manager.Queue()
        args = (world, _free_port(), strategy, steps, resume, results)
        mp.spawn(_worker, args=args, nprocs=world)
        return results.get(timeout=10)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def ddp_run() -> dict:
    return train("ddp", range(3))


def test_fsdp_trains_exactly_as_ddp_holding_half_the_weights_on_each_worker(ddp_run: dict) -> None:
    fsdp_run = train("fsdp", range(3))
    assert_same_weights(fsdp_run["model"], ddp_run["model"])
    total = sum(t.numel() for t in ddp_run["model"].values())
    assert ddp_run["held"] == [total] * WORLD  # replicas
    assert sum(fsdp_run["held"]) == total and max(fsdp_run["held"]) < 0.55 * total  # shards
    assert ddp_run["divergence"] == 0.0
    assert ddp_run["nudged_divergence"] > 0.0  # the metric does see replicas that differ
    assert fsdp_run["divergence"] is None  # no replicas to compare
    untrained = VisionTransformer(CONFIG).state_dict()
    assert any((untrained[k] - ddp_run["model"][k]).abs().max() > 1e-3 for k in untrained)


@pytest.mark.parametrize(("first", "then"), [("fsdp", "ddp"), ("ddp", "fsdp")])
def test_a_full_state_checkpoint_resumes_under_either_strategy(
    ddp_run: dict, first: str, then: str, tmp_path: Path
) -> None:
    """Two steps under one strategy, the third from their checkpoint under the other: the same
    weights as three steps straight, so the optimizer's moments and step count came back."""
    checkpoint = tmp_path / "train_state.pt"
    torch.save(train(first, range(2)), checkpoint)
    resumed = train(then, range(2, 3), resume=checkpoint)
    assert_same_weights(resumed["model"], ddp_run["model"])


def test_an_fsdp_checkpoint_resumes_on_fewer_workers(ddp_run: dict, tmp_path: Path) -> None:
    """As an elastic run does after losing a node: the one worker left takes the whole batch."""
    checkpoint = tmp_path / "train_state.pt"
    torch.save(train("fsdp", range(2)), checkpoint)
    resumed = train("fsdp", range(2, 3), resume=checkpoint, world=1)
    assert resumed["held"] == [sum(t.numel() for t in ddp_run["model"].values())]
    assert_same_weights(resumed["model"], ddp_run["model"])


def test_a_checkpoint_from_before_fsdp_resumes_its_optimizer_state() -> None:
    """Such checkpoints hold `optimizer.state_dict()`, keyed by position: one process here."""

    def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, indices: range) -> None:
        for step in indices:
            batch = torch.Generator().manual_seed(step)
            shape = (4, CONFIG.num_patches, CONFIG.patch_dim)
            tokens = torch.randint(0, 256, shape, generator=batch, dtype=torch.uint8)
            labels = torch.randint(0, CONFIG.num_classes, (4,), generator=batch)
            torch.nn.functional.cross_entropy(model(tokens), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    straight = VisionTransformer(CONFIG)
    straight_optimizer = _optimizer(straight)
    steps(straight, straight_optimizer, range(2))
    saved = copy.deepcopy(  # a checkpoint, not views of the tensors trained on below
        {"model": straight.state_dict(), "optimizer": straight_optimizer.state_dict()}
    )
    assert all(isinstance(key, int) for key in saved["optimizer"]["state"])
    steps(straight, straight_optimizer, range(2, 3))

    resumed = VisionTransformer(CONFIG)
    resumed.load_state_dict(saved["model"])
    optimizer = _optimizer(resumed)
    parallel.load_optimizer_state(resumed, optimizer, saved["optimizer"])
    steps(resumed, optimizer, range(2, 3))
    assert_same_weights(resumed.state_dict(), straight.state_dict())
