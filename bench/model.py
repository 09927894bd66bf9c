"""Our ViT against timm's and torchvision's, same config, same inputs, side by side.

    .venv/bin/python bench/model.py            # CPU: Ti/16 and S/16 at 224 px, Ti/4 at 32 px
    .venv/bin/python bench/model.py --gpu      # CUDA, bf16: S/16 and B/16 at 224 px, MFU of B/16

Models are timed in one process, alternating in every repetition so that drift in the machine's
speed hits all of them alike; the median over repetitions is reported. Peak memory is measured in
a fresh subprocess per model, because a process's peak cannot be attributed to one of several
models living in it: on CPU the growth of peak RSS over one step after a warm-up step (the kernel
lets a process reset its peak), on CUDA the peak allocated bytes. RSS includes allocator caching
and is noisy on CPU, so training rows also give the activation bytes saved for backward, which
are exact and deterministic (counted on CPU in float32, with --gpu too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vit import VisionTransformer, ViTConfig

H100_BF16_PEAK_FLOPS = 989e12
B16_MACS_PER_IMAGE = 17.56e9


@dataclass(frozen=True)
class Case:
    label: str
    config: ViTConfig
    batch: int


def cpu_cases() -> list[Case]:
    ti4 = ViTConfig.from_name("Ti/16", patch_size=4, image_size=32, num_classes=10)
    return [
        Case("Ti/16 224px", ViTConfig.from_name("Ti/16"), 16),
        Case("S/16 224px", ViTConfig.from_name("S/16"), 8),
        Case("Ti/4 32px", ti4, 64),
    ]


def gpu_cases() -> list[Case]:
    return [
        Case("S/16 224px bf16", ViTConfig.from_name("S/16"), 256),
        Case("B/16 224px bf16", ViTConfig.from_name("B/16"), 128),
    ]


def build(library: str, config: ViTConfig) -> nn.Module:
    """The same architecture from each library (learned positions, class token, LN eps 1e-6)."""
    if library == "vitray":
        return VisionTransformer(config)
    if library == "timm":
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        return TimmViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_dim / config.width,
            num_classes=config.num_classes,
        )
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    return TvViT(
        image_size=config.image_size[0],
        patch_size=config.patch_size,
        num_layers=config.depth,
        num_heads=config.num_heads,
        hidden_dim=config.width,
        mlp_dim=config.mlp_dim,
        num_classes=config.num_classes,
    )


def libraries(config: ViTConfig) -> list[str]:
    square = config.image_size[0] == config.image_size[1]
    return ["vitray", "timm"] + (["torchvision"] if square else [])


def step_fn(model: nn.Module, case: Case, device: str, train: bool) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) or one inference forward."""
    x = torch.randn(case.batch, 3, *case.config.image_size, device=device)
    y = torch.randint(0, case.config.num_classes, (case.batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def timed(fn: Callable[[], None], device: str, iterations: int) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(case: Case, device: str, train: bool, reps: int, iters: int) -> dict[str, float]:
    """Median images/s per library, alternating libraries inside each repetition."""
    names = libraries(case.config)
    fns = {}
    for name in names:
        torch.manual_seed(0)
        fns[name] = step_fn(build(name, case.config).to(device), case, device, train)
        fns[name]()  # warm-up: allocator, kernels, optimizer state
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(case.batch * iters / timed(fns[name], device, iters))
    return {name: statistics.median(values) for name, values in samples.items()}


def activation_mib(library: str, case: Case) -> float:
    """Bytes saved for backward by one training forward pass (deterministic, unlike RSS).

    Parameters are excluded: both models hold the same weights; what differs is the activations.
    """
    torch.manual_seed(0)
    model = build(library, case.config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(case.batch, 3, *case.config.image_size)
    y = torch.randint(0, case.config.num_classes, (case.batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        nn.functional.cross_entropy(model(x), y)
    return sum(saved.values()) / 2**20


def peak_memory_mib(case_index: int, library: str, device: str, train: bool) -> float:
    """Run one model in a fresh interpreter and return its peak memory growth in MiB."""
    args = [sys.executable, __file__, "--probe", json.dumps([case_index, library, train])]
    if device == "cuda":
        args.append("--gpu")
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def probe(spec: str, device: str) -> None:
    case_index, library, train = json.loads(spec)
    case = (gpu_cases() if device == "cuda" else cpu_cases())[case_index]
    model = build(library, case.config).to(device)
    fn = step_fn(model, case, device, train)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        fn()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    fn()  # warm-up: kernels, thread pools and optimizer state are not the model's working set
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    fn()
    print(_status_mib("VmHWM") - base)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="benchmark on CUDA in bf16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.probe:
        probe(args.probe, device)
        return
    cases = gpu_cases() if args.gpu else cpu_cases()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name()}")
    peak = "peak CUDA MiB | CUDA vs timm" if device == "cuda" else "peak RSS MiB | RSS vs timm"
    print(
        f"| config | mode | batch | library | images/s | ratio vs timm | {peak} "
        "| activations MiB | activations vs timm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, case in enumerate(cases):
        for train in (True, False):
            speeds = throughput(case, device, train, args.reps, args.iters)
            memory = {name: peak_memory_mib(index, name, device, train) for name in speeds}
            saved = {name: activation_mib(name, case) if train else 0.0 for name in speeds}
            mode = "train" if train else "infer"
            for name, speed in speeds.items():
                activations = (
                    f"{saved[name]:.0f} | {saved[name] / saved['timm']:.3f}" if train else "- | -"
                )
                print(
                    f"| {case.label} | {mode} | {case.batch} | {name} | {speed:.1f} | "
                    f"{speed / speeds['timm']:.3f} | {memory[name]:.0f} | "
                    f"{memory[name] / memory['timm']:.3f} | {activations} |",
                    flush=True,
                )
            if device == "cuda" and train and case.config.width == 768:
                mfu = speeds["vitray"] * 6 * B16_MACS_PER_IMAGE / H100_BF16_PEAK_FLOPS
                print(f"# {case.label} training MFU vs 989 TFLOP/s dense bf16: {mfu:.1%}")


if __name__ == "__main__":
    main()
