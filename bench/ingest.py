"""Ingest throughput: Ray Data vs a torch DataLoader, and our transform vs a bare PIL loop.

    .venv/bin/python bench/ingest.py [--workers 2] [--epochs 3]

Data: real images written once to a temporary folder and to Parquet shards: the Tux Paint stamps
as their original PNGs and re-encoded as JPEGs, plus Fashion-MNIST images as PNGs. Every
contender runs the same `pipelines.ingest.image_to_tokens` (decode, resize to 64x64: the
config sets no `resize_size`, so no border is cropped; channels, uint8 patchify) for a 64 px,
patch-8 RGB model, over the same files. The bare PIL loop decodes every JPEG at full size, where
`image_to_tokens` lets Pillow decode a large one at a reduced size.

Timings are whole passes after one warm-up pass, median over passes, alternating contenders.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.datasets import read_dataset
from pipelines.ingest import IngestConfig, image_to_tokens, to_tokens
from vit.config import ViTConfig

CONFIG = ViTConfig(image_size=64, patch_size=8, width=64, depth=1, mlp_dim=64, num_heads=2)
FASHION_IMAGES = 2000


def build_corpus(root: Path) -> tuple[Path, Path, list[Path]]:
    """Write the benchmark images as a class-folder tree and as Parquet; return both + files."""
    folder = root / "images"
    stamps = sorted(Path("/usr/share/tuxpaint/stamps").glob("*/**/*.png"))
    stamps = [p for p in stamps if not p.stem.endswith(("_mirror", "_flip"))]
    for index, path in enumerate(stamps):
        category = path.relative_to("/usr/share/tuxpaint/stamps").parts[0]
        target = folder / category
        target.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        (target / f"{index}.png").write_bytes(data)
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").save(target / f"{index}.jpg", quality=90)
    fashion = read_dataset("fashion-mnist", "test").limit(FASHION_IMAGES).take_all()
    (folder / "fashion").mkdir(parents=True, exist_ok=True)
    for row in fashion:
        (folder / "fashion" / f"{row['key'].replace('/', '_')}.png").write_bytes(row["image"])
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    parquet = root / "parquet"
    parquet.mkdir()
    classes = sorted({p.parent.name for p in files})
    table = pa.table(
        {
            "key": [str(p.relative_to(folder)) for p in files],
            "image": [p.read_bytes() for p in files],
            "label": [classes.index(p.parent.name) for p in files],
        }
    )
    for shard in range(4):  # every file in exactly one shard
        start, stop = shard * len(files) // 4, (shard + 1) * len(files) // 4
        pq.write_table(table.slice(start, stop - start), parquet / f"{shard}.parquet")
    return folder, parquet, files


class FileDataset(torch.utils.data.Dataset):
    """The DataLoader contender: one file read + the same transform per item."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        return image_to_tokens(self.files[index].read_bytes(), CONFIG)


def dataloader_pass(files: list[Path], workers: int) -> Callable[[], int]:
    loader = torch.utils.data.DataLoader(
        FileDataset(files), batch_size=256, num_workers=workers, persistent_workers=True
    )

    def run() -> int:
        return sum(len(batch) for batch in loader)

    return run


def ray_pass(source: str, workers: int) -> Callable[[], int]:
    ingest = IngestConfig(batch_size=64, concurrency=workers)

    def run() -> int:
        dataset = to_tokens(read_dataset(source), CONFIG, ingest=ingest)
        return sum(len(b["label"]) for b in dataset.iter_batches(batch_size=256))

    return run


def transform_loop(blobs: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        for blob in blobs:
            image_to_tokens(blob, CONFIG)
        return len(blobs)

    return run


def pil_ceiling_loop(blobs: list[bytes]) -> Callable[[], int]:
    """The practical ceiling: decode + resize only, nothing else."""
    size = CONFIG.image_size[::-1]

    def run() -> int:
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        return len(blobs)

    return run


def compare(contenders: dict[str, Callable[[], int]], passes: int) -> dict[str, float]:
    """Images/s per contender: one warm-up pass each, then alternating timed passes."""
    for run in contenders.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for index in range(passes):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            images = contenders[name]()
            samples[name].append(images / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        folder, parquet, files = build_corpus(Path(tmp))
        blobs = [p.read_bytes() for p in files]
        print(
            f"# {platform.node()} {platform.machine()}, {len(files)} images, "
            f"{args.workers} workers, {args.epochs} timed passes, model input {CONFIG.image_size}"
        )
        pipelines = compare(
            {
                "ray data, folder": ray_pass(str(folder), args.workers),
                "ray data, parquet": ray_pass(str(parquet), args.workers),
                "torch DataLoader, folder": dataloader_pass(files, args.workers),
            },
            args.epochs,
        )
        baseline = pipelines["torch DataLoader, folder"]
        print("| pipeline | images/s | ratio vs DataLoader |")
        print("|---|---|---|")
        for name, speed in pipelines.items():
            print(f"| {name} | {speed:.0f} | {speed / baseline:.2f} |")
        torch.set_num_threads(1)
        per_core = compare(
            {
                "decode+resize+patchify (ours)": transform_loop(blobs),
                "decode+resize (bare PIL)": pil_ceiling_loop(blobs),
            },
            args.epochs,
        )
        ceiling = per_core["decode+resize (bare PIL)"]
        print("| single core | images/s | share of ceiling |")
        print("|---|---|---|")
        for name, speed in per_core.items():
            print(f"| {name} | {speed:.0f} | {speed / ceiling:.0%} |")
        ray.shutdown()


if __name__ == "__main__":
    main()
