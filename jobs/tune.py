"""Fine-tune a pretrained checkpoint on downstream datasets with Ray Tune.

    python -m jobs.tune --config configs/finetune_demo.py --set checkpoint=CKPT
    python -m jobs.tune --config configs/finetune_demo.py --scratch   # the from-scratch baseline

Prints a results table per dataset (dev and test accuracy, chosen learning rate, trials run,
stopped early, failed, time, registered version) and registers each dataset's best model as a
version of `vit-<dataset>`: `@champion` unless the champion did better on the same data.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.common import add_common_arguments, checked_checkpoint, connect, load_config
from pipelines import finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, set_examples=("steps=100", "ingest.batch_size=128"))
    parser.add_argument(
        "--scratch", action="store_true", help="train from random weights (the baseline)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.smoke, args.set, finetune.FinetuneConfig)
    if args.scratch:
        config = dataclasses.replace(config, from_scratch=True, register=False)
    # The from-scratch baseline reads the checkpoint too: its architecture.
    checkpoint = checked_checkpoint(config.checkpoint, "tune")
    config = dataclasses.replace(config, checkpoint=str(checkpoint))
    connect(args.address)
    outcomes = finetune.run(config)
    print(finetune.format_table(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
