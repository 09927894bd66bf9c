"""Serve registered champions over HTTP with Ray Serve.

    python -m jobs.serve --datasets mnist-5k digits tuxpaint            # models:/vit-<d>@champion
    python -m jobs.serve --model my-vit=runs/some/checkpoint/model --port 8000
    python -m jobs.serve --model demo=runs/train/pretrain-demo    # a run: its latest checkpoint

Listens on 127.0.0.1 unless --host says otherwise; set VITRAY_API_TOKEN to require a bearer
token. Runs until interrupted (Ctrl-C, or `ray job stop` of a submitted job) and then takes its
endpoint down, or returns at once with --detach on a cluster and leaves it up.
"""

from __future__ import annotations

import argparse
import sys
import time

from mlflow.exceptions import MlflowException

from jobs.common import add_address_argument, connect
from pipelines.serve import (
    REGISTRY_PREFIX,
    ServeConfig,
    api_token,
    champions,
    check_reference,
    deploy,
    undeploy,
)
from pipelines.training import resolve_checkpoint
from vit.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=[], help="serve vit-<dataset>@champion")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=REF",
        help="a checkpoint, a pretraining run's folder (its latest checkpoint) or a models:/ URI, "
        "under a name",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="HTTP port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="most images of concurrent requests run through a model at once; 1: no batching "
        "(default: %(default)s)",
    )
    parser.add_argument("--detach", action="store_true", help="return once deployed")
    add_address_argument(parser)
    args = parser.parse_args(argv)
    models = champions(args.datasets)
    for item in args.model:
        name, _, reference = item.partition("=")
        if not name or not reference:
            parser.error(f"--model takes NAME=REF (a checkpoint or models:/ URI), got {item!r}")
        try:
            models[name] = model_reference(reference)
        except CheckpointError as error:  # an s3:// path: replicas read local folders
            raise SystemExit(f"[serve] cannot serve {name}: {error}") from None
    if not models:
        parser.error("name at least one model with --datasets or --model")
    if args.detach and args.address is None:
        parser.error("--detach needs a cluster (--address): a local Ray ends with this process")
    try:
        config = ServeConfig(
            models=models,
            default_model=next(iter(models)),
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
        )
    except ValueError as error:
        parser.error(str(error))
    # Checked before Ray starts: an empty token, a mistyped path or a dataset without a champion
    # is a one-line reason and exit 1, not a traceback once Ray and Serve have started.
    try:
        api_token()
    except ValueError as error:
        raise SystemExit(f"[serve] {error}") from None
    for name, reference in models.items():
        try:
            check_reference(reference)
        except (ValueError, OSError, MlflowException) as error:
            raise SystemExit(f"[serve] cannot serve {name}: {error}") from None
    local_ray = connect(args.address)
    try:
        url = deploy(config)
        print(
            f"[serve] {url}/v1/predict serving {sorted(models)}; API docs at {url}/docs",
            flush=True,
        )
        if args.detach:
            return 0
        while True:
            time.sleep(3600)
    except ValueError as error:  # Serve already listens on another host or port
        raise SystemExit(f"[serve] {error}") from None
    # Ctrl-C, or `ray job stop` (a SystemExit, see `connect`), also while the app still deploys.
    except (KeyboardInterrupt, SystemExit):
        if not local_ray:  # a local Ray takes the endpoint down as this process exits
            print("[serve] stopping: deleting the endpoint", flush=True)
            undeploy()
    return 0


def model_reference(reference: str) -> str:
    """A registry URI as given; a local path resolved as the other jobs resolve a checkpoint (a
    run's folder: its latest checkpoint) and made absolute, for replicas whose working directory
    is not this one."""
    if reference.startswith(REGISTRY_PREFIX):
        return reference
    return str(resolve_checkpoint(reference).resolve())


if __name__ == "__main__":
    sys.exit(main())
