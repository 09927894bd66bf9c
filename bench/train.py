"""Ray Train step throughput vs a plain single-process PyTorch loop: the framework's overhead.

    .venv/bin/python bench/train.py [--steps 60] [--reps 3]

Both run the demo pretraining model (configs/pretrain_demo.py) on the same in-memory uint8 token
batches with the same AdamW step, gradient clipping and a metrics report every 10 steps; Ray
Train runs one worker holding all the machine's CPUs, so both use the same threads. Steady-state
images/s is timed inside the loop after warm-up steps, alternating the two, median over reps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.pretrain_demo import MODEL
from pipelines.training import parameter_groups
from vit.model import VisionTransformer

BATCH = 128
WARMUP = 5


def timed_steps(steps: int, report: Any) -> float:
    """Build the model and batches from fixed seeds, train, return steady-state images/s."""
    torch.manual_seed(0)
    config = MODEL.replace(num_classes=10)
    model = VisionTransformer(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-3)
    tokens = torch.randint(
        0, 256, (8, BATCH, config.num_patches, config.patch_dim), dtype=torch.uint8
    )
    labels = torch.randint(0, 10, (8, BATCH))
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(tokens[step % 8]), labels[step % 8])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            report({"loss": float(loss.detach()), "step": step})
    return steps * BATCH / (time.perf_counter() - start)


def ray_train_loop(config: dict[str, Any]) -> None:
    speed = timed_steps(config["steps"], ray.train.report)
    Path(config["out"]).write_text(json.dumps({"images_per_s": speed}))


def ray_train_speed(steps: int, cpus: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speed.json")
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"steps": steps, "out": out},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name="bench-train", storage_path=os.path.join(tmp, "store")),
        )
        trainer.fit()
        return json.loads(Path(out).read_text())["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, log_to_driver=False)
    plain, framework = [], []
    for rep in range(args.reps):
        order = ("plain", "ray") if rep % 2 == 0 else ("ray", "plain")
        for name in order:
            if name == "plain":
                plain.append(timed_steps(args.steps, lambda metrics: None))
            else:
                framework.append(ray_train_speed(args.steps, cpus))
    ray.shutdown()
    p, r = statistics.median(plain), statistics.median(framework)
    print(
        f"# {platform.node()} {platform.machine()}, {cpus} CPUs, torch threads "
        f"{torch.get_num_threads()}, demo model, batch {BATCH}, {args.steps} steps x {args.reps}"
    )
    print("| loop | images/s (median) | ratio vs plain |")
    print("|---|---|---|")
    print(f"| plain PyTorch, one process | {p:.0f} | 1.00 |")
    print(f"| Ray Train, 1 worker x {cpus} CPUs | {r:.0f} | {r / p:.2f} |")


if __name__ == "__main__":
    main()
