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
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model name (default: the server's default)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--token", default=os.environ.get("VITRAY_API_TOKEN"))
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    params: dict[str, str | int] = {"top_k": args.top_k}
    if args.model:
        params["model"] = args.model
    failed = False
    for path in args.images:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            response = requests.post(
                f"{args.url}/v1/predict",
                data=path.read_bytes(),
                params=params,
                headers={**headers, "Content-Type": content_type},
                timeout=args.timeout,
            )
        except (OSError, requests.RequestException) as error:
            print(f"{path}: {error}", file=sys.stderr)
            failed = True
            continue
        if response.status_code != 200:
            try:
                reason = response.json().get("detail", response.text)
            except ValueError:
                reason = response.text
            print(f"{path}: HTTP {response.status_code}: {reason}", file=sys.stderr)
            failed = True
            continue
        body = response.json()
        model = body["model"]
        print(f"{path}  ({model['name']} v{model['version']}, {body['latency_ms']} ms)")
        for rank, prediction in enumerate(body["predictions"], 1):
            print(f"  {rank}. {prediction['label']:<24} {prediction['score']:.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
