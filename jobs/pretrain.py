"""Pretrain a ViT with Ray Train.

    python -m jobs.pretrain --config configs/pretrain_demo.py [--smoke] [--resume]
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_PRIVATE_IP:5000"}}' \
        -- python -m jobs.pretrain --config configs/pretrain_b16_in21k.py

A run is named by its config's `run_name`. Starting a run whose name already has checkpoints is
refused unless `--resume` says to continue it, so a finished or crashed run is never silently
overwritten nor silently continued; `--resume` of a name with no checkpoint (a typo) is refused
too, naming the runs that have some. A resume keeps the settings the run learns with (see
`pretrain.RESUMABLE_SETTINGS` for those it may change).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.common import add_common_arguments, connect, load_config
from pipelines import pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, set_examples=("learning_rate=3e-4", "model.depth=4"))
    parser.add_argument("--resume", action="store_true", help="continue the run of this name")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.smoke, args.set, pretrain.PretrainConfig)
    resumable = pretrain.has_checkpoints(config)
    if resumable and not args.resume:
        parser.error(
            f"run {config.run_name!r} already has checkpoints under {config.storage_path}; "
            "pass --resume to continue it or --set run_name=NEW for a new run"
        )
    if args.resume and not resumable:  # a misspelt name would otherwise start from step 0
        others = ", ".join(pretrain.checkpointed_runs(config)) or "none"
        parser.error(
            f"run {config.run_name!r} has no checkpoint under {config.storage_path} to resume "
            f"(runs with checkpoints there: {others})"
        )
    connect(args.address)
    result = pretrain.run(config)
    print(f"[pretrain] done: checkpoint {result.checkpoint_path}")
    print(f"[pretrain] MLflow run {result.run_id}; metrics {dataclasses.asdict(result)['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
