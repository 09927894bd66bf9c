"""Convert any image source into deterministic Parquet shards plus a ``manifest.json``.

    python -m jobs.prepare tuxpaint /data/shards/tuxpaint --rows-per-shard 200
    ray job submit --working-dir . -- python -m jobs.prepare s3://raw/flowers s3://shards/flowers

Re-running is safe and idempotent; see ``pipelines/prepare.py`` for the guarantees.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ray.exceptions import RayTaskError

from jobs.common import add_address_argument, connect
from pipelines.datasets import SplitFractions
from pipelines.prepare import PrepareConfig, prepare


def _fractions(dev: float | None, test: float | None) -> SplitFractions | None:
    """The held-out shares given on the command line, the defaults filling in the other one;
    None when neither is given (the source's own or the default split then applies)."""
    if dev is None and test is None:
        return None
    default = SplitFractions()
    return SplitFractions(
        dev=default.dev if dev is None else dev, test=default.test if test is None else test
    )


def _reason(err: BaseException) -> BaseException:
    """The error to report: a Ray task's own (a Parquet source's label -1, raised while Ray Data
    reads it) rather than the ``RayTaskError`` around it, whose text is the worker's whole
    traceback with terminal colour codes, not one line naming the bad row."""
    while isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return err


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``prepare.py SOURCE OUTPUT [--rows-per-shard N] [--dev-fraction F]
    [--test-fraction F] [--force] [--address A]``; prints the result as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="catalog name, image folder, Parquet path or URI")
    parser.add_argument("output", help="output folder or URI (s3://bucket/prefix)")
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=PrepareConfig.rows_per_shard,
        help="images per Parquet shard (default: %(default)s)",
    )
    parser.add_argument("--dev-fraction", type=float, help="share of train held out as dev")
    parser.add_argument("--test-fraction", type=float, help="share held out as test")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    add_address_argument(parser)
    args = parser.parse_args(argv)
    try:
        fractions = _fractions(args.dev_fraction, args.test_fraction)
        config = PrepareConfig(args.source, args.output, args.rows_per_shard, fractions, args.force)
    except ValueError as err:
        parser.error(str(err))  # exits 2 with the usage line, before Ray starts
    connect(args.address)
    try:
        result = prepare(config)
    except (FileNotFoundError, ValueError) as err:
        print(f"prepare: error: {_reason(err)}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
