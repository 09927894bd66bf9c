"""Query a vitray endpoint: send image files, print the top-k table.

    python -m jobs.query photo.jpg other.png --model vit-tuxpaint --top-k 3
    python -m jobs.query photo.jpg --url http://127.0.0.1:8000 --token "$VITRAY_API_TOKEN"

Exits non-zero with the server's reason when a request fails.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
from pathlib import Path

import requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the endpoint (default: %(default)s)"
    )
    parser.add_argument("--model", help="model name (default: the server's default)")
    parser.add_argument("--top-k", type=int, help="predictions to show (default: the server's)")
    parser.add_argument(  # the help names the variable: %(default)s would print the token
        "--token",
        default=os.environ.get("VITRAY_API_TOKEN"),
        help="bearer token, for an endpoint that requires one (default: $VITRAY_API_TOKEN)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60,
        help="seconds to wait for the server on each request (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    token = (args.token or "").strip()  # a token file's newline is not part of it
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = args.url.rstrip("/")
    params: dict[str, str | int] = {}
    if args.top_k is not None:
        params["top_k"] = args.top_k
    if args.model:
        params["model"] = args.model
        # Serve routes a request carrying this header to a replica that has the model loaded.
        headers["serve_multiplexed_model_id"] = args.model
    failed = False
    for path in args.images:
        try:
            response = requests.post(
                f"{url}/v1/predict",
                data=path.read_bytes(),
                params=params,
                headers={**headers, "Content-Type": _content_type(path)},
                timeout=args.timeout,
            )
        # ValueError: a header (--model, --token) that HTTP cannot carry, being beyond Latin-1.
        except (OSError, ValueError, requests.RequestException) as error:
            print(f"{path}: {error}", file=sys.stderr)
            failed = True
            continue
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            reason = body.get("detail") if isinstance(body, dict) else None
            print(
                f"{path}: HTTP {response.status_code}: {reason or response.text}", file=sys.stderr
            )
            failed = True
            continue
        try:
            print(_table(path, body))
        except (TypeError, KeyError, ValueError):
            print(
                f"{path}: not a prediction from a vitray endpoint: {response.text}", file=sys.stderr
            )
            failed = True
    return 1 if failed else 0


def _content_type(path: Path) -> str:
    """The image type the file name suggests, else application/octet-stream: the server reads
    the image from its bytes, and a name that suggests another type (`scan.txt`, `photo.json`)
    must not get the image refused or parsed as something else."""
    guessed = mimetypes.guess_type(path.name)[0]
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def _table(path: Path, body: dict) -> str:
    """The top-k table of one answer."""
    model = body["model"]
    # A model served straight from a checkpoint directory has no registry version.
    version = f" v{model['version']}" if model["version"] is not None else ""
    lines = [f"{path}  ({model['name']}{version}, {body['latency_ms']} ms)"]
    for rank, prediction in enumerate(body["predictions"], 1):
        lines.append(f"  {rank}. {prediction['label']:<24} {prediction['score']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
