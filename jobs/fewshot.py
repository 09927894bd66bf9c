"""Few-shot linear evaluation of a checkpoint (the ViT paper's ridge-regression probe).

    python -m jobs.fewshot --checkpoint runs/ckpt/model --dataset digits [--shots 1 5 10 25]
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_PRIVATE_IP:5000"}}' \
        -- python -m jobs.fewshot --checkpoint DIR --dataset NAME

``--checkpoint`` is a ``vit.checkpoint`` directory, a pretraining checkpoint holding one under
``model/``, or a pretraining run's folder (its latest checkpoint). Accuracy is the mean (and std)
over ``--seeds`` draws of k training images per class; the L2 strength is chosen on a held-out
slice of the train split, never on test. The run is logged to MLflow with ``vitray_stage=fewshot``
and the checkpoint's own run id as ``vitray_parent_checkpoint_run``.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_address_argument, checked_checkpoint, connect
from pipelines.fewshot import run_fewshot
from vit.evaluate import DEFAULT_SHOTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="vit checkpoint, or a pretraining run or checkpoint"
    )
    parser.add_argument("--dataset", required=True, help="catalog name, folder or shard URI")
    parser.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=list(DEFAULT_SHOTS),
        help="training images per class, one evaluation per count "
        f"(default: {' '.join(map(str, DEFAULT_SHOTS))})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of draws per shot count")
    parser.add_argument(
        "--max-train-rows",
        type=int,
        default=20_000,
        help="cap on train rows featurised, raised to keep enough of every class; 0: none",
    )
    parser.add_argument("--max-test-rows", type=int, default=0, help="cap on test rows; 0: none")
    parser.add_argument("--dev-per-class", type=int, default=10, help="held out to pick L2")
    parser.add_argument("--experiment", default="vitray", help="MLflow experiment")
    add_address_argument(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1 or min(args.shots) < 1:
        parser.error("--seeds and --shots must be positive")
    if args.dev_per_class < 0:
        parser.error("--dev-per-class must be 0 (select L2 on the shots) or more")
    if min(args.max_train_rows, args.max_test_rows) < 0:
        parser.error("--max-train-rows and --max-test-rows take a count, or 0 for no cap")
    checkpoint = checked_checkpoint(args.checkpoint, "fewshot")
    connect(args.address)
    result = run_fewshot(
        checkpoint,
        args.dataset,
        args.shots,
        args.seeds,
        max_train_rows=args.max_train_rows or None,
        max_test_rows=args.max_test_rows or None,
        dev_per_class=args.dev_per_class,
        experiment=args.experiment,
    )
    print(
        f"[fewshot] {args.dataset}: {result['num_classes']} classes, "
        f"{result['train_rows']} train / {result['test_rows']} test images, "
        f"{args.seeds} seeds (chance {1 / result['num_classes']:.1%})"
    )
    print(f"{'shots':>6} {'accuracy':>9} {'std':>7}")
    for shots, (mean, std) in sorted(result["accuracy"].items()):
        print(f"{shots:>6} {mean:>9.2%} {std:>7.2%}")
    if result.get("skipped_shots"):
        print(
            f"[fewshot] skipped {', '.join(map(str, result['skipped_shots']))} shots: the rarest "
            f"class has {result.get('rarest_class_rows', '?')} training images for the shots and "
            f"{args.dev_per_class} dev images"
            + ("; without dev images each class needs 2 shots" if not args.dev_per_class else "")
        )
    print(f"[fewshot] MLflow run {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
