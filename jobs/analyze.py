"""Attention rollout, attention distance, position similarity and embedding filters of a checkpoint.

    python -m jobs.analyze --checkpoint runs/train/pretrain-demo --dataset fashion-mnist
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_PRIVATE_IP:5000"}}' \
        -- python -m jobs.analyze --checkpoint DIR --dataset NAME

Writes the four figures of the paper's Fig. 6 and Fig. 7 as PNGs under ``--out`` and logs them to
one MLflow run (``vitray_stage=analyze``), linked to the run that produced the checkpoint. Under
``ray job submit`` the driver runs in a temporary copy of the working directory on the head node,
so a relative ``--out`` is gone with it: the MLflow run keeps the figures, or give an absolute path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import add_address_argument, checked_checkpoint, connect
from pipelines.analyze import run_analysis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="vit checkpoint, or a pretraining run or checkpoint"
    )
    parser.add_argument("--dataset", required=True, help="catalog name, folder or shard URI")
    parser.add_argument("--images", type=int, default=8, help="test images to inspect")
    parser.add_argument(
        "--out",
        default="runs/analysis",
        help="folder for the PNG files, on the driver's machine (default: %(default)s)",
    )
    parser.add_argument("--experiment", default="vitray", help="MLflow experiment")
    add_address_argument(parser)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be positive")
    out = Path(args.out).resolve()  # the closing lines name where the files really are
    checkpoint = checked_checkpoint(args.checkpoint, "analyze")
    connect(args.address)
    result = run_analysis(
        checkpoint,
        args.dataset,
        images=args.images,
        output_dir=out,
        experiment=args.experiment,
    )
    distances = ", ".join(f"{d:.1f}" for d in result["mean_attention_distance"])
    print(f"[analyze] mean attention distance per layer (pixels): {distances}")
    print(f"[analyze] figures, also logged to MLflow run {result['run_id']}:")
    for artifact in result["figures"]:  # an MLflow artifact path; the file has its name
        print(f"  {out / Path(artifact).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
