"""Serving throughput and latency: dynamic batching vs max_batch_size=1, and the in-process floor.

    .venv/bin/python bench/serve.py [--seconds 10] [--clients 1 16]

One Serve application per setting on a local Ray (2 CPUs), the same checkpoint (the demo model's
architecture at 42 px, 10 classes) and the same real photo (scikit-learn's sample JPEG), posted
by N closed-loop HTTP clients for T seconds each. The floor is the same preprocessing and forward
pass called in-process, one image at a time.
"""

from __future__ import annotations

import argparse
import io
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import requests
import sklearn.datasets
import torch
from PIL import Image
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.pretrain_demo import MODEL
from pipelines.ingest import image_to_tokens
from pipelines.serve import ServeConfig, build_app
from vit import VisionTransformer
from vit import checkpoint as vit_checkpoint


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(sklearn.datasets.load_sample_images().images[0]).save(buffer, format="JPEG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_loop(url: str, image: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Each client sends its next request as soon as the previous answer arrives."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        nonlocal errors
        session = requests.Session()
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                ok = (
                    session.post(
                        url, data=image, headers={"Content-Type": "image/jpeg"}, timeout=30
                    ).status_code
                    == 200
                )
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    image = photo()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        config = MODEL.replace(image_size=42, num_classes=10, representation_size=None)
        vit_checkpoint.save(VisionTransformer(config), directory)
        floor = in_process_ms(directory, image)
        ray.init(num_cpus=2, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, batch in (("batched", 16), ("unbatched", 1)):
            serve_config = ServeConfig(
                models={"bench": str(directory)}, default_model="bench", max_batch_size=batch
            )
            serve.run(build_app(serve_config), name=name, route_prefix=f"/{name}")
        results = {}
        for clients in args.clients:
            for name in ("batched", "unbatched"):
                url = f"http://127.0.0.1:{port}/{name}/v1/predict"
                closed_loop(url, image, clients, 2)  # warm-up: model load, connections
                results[name, clients] = closed_loop(url, image, clients, args.seconds)
        serve.shutdown()
        ray.shutdown()
    print(
        f"# {platform.node()} {platform.machine()}, 2 CPUs, {args.seconds:.0f} s per setting, "
        f"image {len(image)} bytes JPEG, model {config.depth}x{config.width} at 42 px"
    )
    print(f"# in-process floor (decode + preprocess + forward, 1 image, 1 thread): {floor:.2f} ms")
    print("| setting | clients | requests/s | p50 ms | p99 ms | errors | p50 over floor ms |")
    print("|---|---|---|---|---|---|---|")
    for (name, clients), r in results.items():
        print(
            f"| {name} | {clients} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} | {r['p50_ms'] - floor:.1f} |"
        )
    for clients in args.clients:
        ratio = results["batched", clients]["rps"] / results["unbatched", clients]["rps"]
        print(f"# {clients} clients: batching throughput ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
