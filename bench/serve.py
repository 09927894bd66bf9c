"""Serving throughput and latency: dynamic batching vs max_batch_size=1, per HTTP ingress.

    .venv/bin/python bench/serve.py [--seconds 5] [--rounds 3] [--clients 1 16] [--ingress ...]

Serve's HTTP ingresses, each in its own local Ray (2 CPUs): its Python proxy actor (Ray's
default); HAProxy in front of the replicas' own HTTP servers (`RAY_SERVE_ENABLE_HA_PROXY=1`); and
HAProxy with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` as well, vitray's default
(`jobs.common.HIGH_THROUGHPUT_ENV`). In each, three applications: the demo model's
architecture at 42 px with `max_batch_size=16` and with `max_batch_size=1`, and a deployment that
answers without doing anything (the ingress's own floor). N closed-loop clients post
scikit-learn's sample JPEG for T seconds per setting, the settings taking turns for R rounds (on
a noisy VM a slow spell then hits them all, not one); the replica's `/v1/stats` counts the images
and forward passes the model ran meanwhile. The in-process floor, measured in the same process
before its Ray starts, is the same preprocessing and forward pass called directly, one image at a
time.

The clients are asyncio coroutines speaking HTTP/1.1 with keep-alive: a tenth of a millisecond
of CPU per request, so the load generator does not eat the 2 cores it is measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import ray
import sklearn.datasets
import torch
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.pretrain_demo import MODEL
from jobs.common import HIGH_THROUGHPUT_ENV
from pipelines.ingest import image_to_tokens
from pipelines.serve import TOKEN_ENV, ServeConfig, build_app
from vit import VisionTransformer
from vit import checkpoint as vit_checkpoint

# Each ingress runs in its own local Ray, started with these settings over the caller's.
INGRESSES = {
    "python-proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "haproxy+throughput": HIGH_THROUGHPUT_ENV,
}
# Each setting is an application under its own route prefix; the path its clients post to.
PATHS = {
    "batched": "/batched/v1/predict",
    "unbatched": "/unbatched/v1/predict",
    "no-op": "/no-op",
}


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})  # 2 CPUs taken
class NoOp:
    """Reads the body and answers: what the ingress costs with no work behind it."""

    async def __call__(self, request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(sklearn.datasets.load_sample_images().images[0]).save(buffer, format="JPEG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(
    port: int, path: str, body: bytes, deadline: float, latencies: list[float], errors: list[bytes]
) -> None:
    """One closed-loop client on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if status.split()[1:2] == [b"200"]:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status)
    finally:
        writer.close()


@dataclass
class Run:
    """One closed-loop run of one setting; images and passes are the model's, during the run."""

    latencies: list[float]
    errors: int
    seconds: float
    images: int = 0
    passes: int = 0


def closed_loop(port: int, path: str, body: bytes, clients: int, seconds: float) -> Run:
    """Each client sends its next request as soon as the previous answer arrives."""
    latencies: list[float] = []
    errors: list[bytes] = []

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(_client(port, path, body, deadline, latencies, errors) for _ in range(clients))
        )

    asyncio.run(run())
    return Run(latencies, len(errors), seconds)


def summarise(runs: list[Run]) -> dict:
    """Median requests/s over the rounds; latency percentiles over every request of them."""
    latencies = sorted(latency for run in runs for latency in run.latencies)
    passes = sum(run.passes for run in runs)
    rps_per_round = [len(run.latencies) / run.seconds for run in runs]
    return {
        "rps": statistics.median(rps_per_round),
        "rps_per_round": rps_per_round,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "errors": sum(run.errors for run in runs),
        "mean_batch": sum(run.images for run in runs) / passes if passes else None,
    }


def model_counters(port: int, app: str) -> tuple[int, int]:
    """(images, forward passes) the app's model has run so far (its replica's /v1/stats)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{app}/v1/stats") as response:
        stats = json.load(response)
    return stats["images"], stats["forward_passes"]


def in_process_ms(directory: Path, image: bytes, repeats: int = 200) -> float:
    model, meta = vit_checkpoint.load(directory)
    model.eval()
    torch.set_num_threads(1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = torch.from_numpy(image_to_tokens(image, meta.config)[None])
            model(tokens).softmax(-1)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_ingress(directory: Path, clients: list[int], seconds: float, rounds: int) -> dict:
    """Runs in a child process whose environment picked the ingress before Ray started."""
    image = photo()
    floor = in_process_ms(directory, image)
    ray.init(num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, batch in (("batched", 16), ("unbatched", 1)):
        config = ServeConfig(
            models={"bench": str(directory)}, default_model="bench", max_batch_size=batch
        )
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    serve.run(NoOp.bind(), name="no-op", route_prefix="/no-op")
    results: dict = {"floor_ms": floor}
    for count in clients:
        for path in PATHS.values():
            closed_loop(port, path, image, count, 2)  # warm-up: model load, connections
        runs: dict[str, list[Run]] = {name: [] for name in PATHS}
        for _ in range(rounds):  # settings take turns, so a slow spell of the VM hits them all
            for name, path in PATHS.items():
                if name == "no-op":
                    runs[name].append(closed_loop(port, path, image, count, seconds))
                    continue
                images_before, passes_before = model_counters(port, name)
                run = closed_loop(port, path, image, count, seconds)
                images, passes = model_counters(port, name)
                run.images, run.passes = images - images_before, passes - passes_before
                runs[name].append(run)
        for name, measured in runs.items():
            results[f"{name}/{count}"] = summarise(measured)
    ray.shutdown()  # takes Serve down at once; serve.shutdown() would drain replicas for 30 s
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ingress", nargs="+", choices=list(INGRESSES), default=list(INGRESSES))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # checkpoint dir, in a child process
    args = parser.parse_args()
    if args.child:
        results = measure_ingress(Path(args.child), args.clients, args.seconds, args.rounds)
        print(json.dumps(results))
        return
    image = photo()
    config = MODEL.replace(image_size=42, num_classes=10, representation_size=None)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        vit_checkpoint.save(VisionTransformer(config), directory)
        results = {}
        # The clients send no bearer token: a VITRAY_API_TOKEN here would refuse every request.
        env = {name: value for name, value in os.environ.items() if name != TOKEN_ENV}
        for ingress in args.ingress:
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(directory), "--seconds",
                 str(args.seconds), "--rounds", str(args.rounds),
                 "--clients", *map(str, args.clients)],
                env={**env, **INGRESSES[ingress]}, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            results[ingress] = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {args.rounds} rounds "
        f"of {args.seconds:.0f} s per setting, image {len(image)} bytes JPEG, "
        f"model {config.depth}x{config.width} at 42 px"
    )
    print(
        "| ingress | setting | clients | req/s | p50 ms | p99 ms | errors | p50 over floor ms "
        "| mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for ingress, rows in results.items():
        floor = rows.pop("floor_ms")
        print(f"| {ingress} | in-process floor | 1 |  | {floor:.1f} |  |  |  | 1.0 |")
        for key, r in rows.items():
            name, clients = key.split("/")
            over = "" if name == "no-op" else f"{r['p50_ms'] - floor:.1f}"
            batch = "" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
            print(
                f"| {ingress} | {name} | {clients} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['errors']} | {over} | {batch} |"
            )
    for ingress, rows in results.items():
        for clients in args.clients:
            ratio = rows[f"batched/{clients}"]["rps"] / rows[f"unbatched/{clients}"]["rps"]
            # Batched and unbatched runs of one round are seconds apart: their ratio is
            # the least touched by the VM's slow spells.
            paired = [
                batched / unbatched if unbatched else float("inf")
                for batched, unbatched in zip(
                    rows[f"batched/{clients}"]["rps_per_round"],
                    rows[f"unbatched/{clients}"]["rps_per_round"],
                    strict=True,
                )
            ]
            print(
                f"# {ingress}, {clients} clients: batching throughput ratio {ratio:.2f}x "
                f"(medians); per round {', '.join(f'{r:.2f}' for r in paired)}: "
                f"median {statistics.median(paired):.2f}x"
            )


if __name__ == "__main__":
    main()
