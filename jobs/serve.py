"""Serve registered champions over HTTP with Ray Serve.

    python -m jobs.serve --datasets mnist-5k digits tuxpaint            # models:/vit-<d>@champion
    python -m jobs.serve --model my-vit=runs/some/checkpoint/model --port 8000

Listens on 127.0.0.1 unless --host says otherwise; set VITRAY_API_TOKEN to require a bearer
token. Runs until interrupted (Ctrl-C, or `ray job stop` of a submitted job) and then takes its
endpoint down, or returns at once with --detach on a cluster and leaves it up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mlflow.exceptions import MlflowException

from jobs.common import connect
from pipelines.serve import (
    REGISTRY_PREFIX,
    ServeConfig,
    api_token,
    champions,
    check_reference,
    deploy,
    undeploy,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=[], help="serve vit-<dataset>@champion")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=REF",
        help="a checkpoint directory or models:/ URI under a name",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--detach", action="store_true", help="return once deployed")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    args = parser.parse_args(argv)
    models = champions(args.datasets)
    for item in args.model:
        name, _, reference = item.partition("=")
        if not name or not reference:
            parser.error(f"--model takes NAME=REF (a checkpoint or models:/ URI), got {item!r}")
        models[name] = model_reference(reference)
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
    """A registry URI as given; a path made absolute, for replicas whose working directory is
    not this one."""
    return reference if reference.startswith(REGISTRY_PREFIX) else str(Path(reference).resolve())


if __name__ == "__main__":
    sys.exit(main())
