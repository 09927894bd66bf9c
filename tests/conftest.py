"""Shared fixtures: a local Ray per module, a real S3-compatible server, real image folders.

The S3 fixture exports `AWS_*` variables (`AWS_ENDPOINT_URL` included) for its module; Ray
workers inherit the environment of the Ray started after it, so request it before `ray_local`.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
from PIL import Image

from jobs.common import HIGH_THROUGHPUT_ENV

# Serve as `jobs.common.connect` and cluster.yaml run it (HAProxy, high throughput), but with a
# 2 s drain when a replica stops, not 30: Serve holds a stopping replica open that long for an
# external load balancer (such as an ALB) to notice, and the tests have none. Each deleted or
# replaced application would otherwise cost 30 s.
SERVE_TEST_ENV = {**HIGH_THROUGHPUT_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

# Files that are not what their name says: a cut-off download, the web page saved in its place,
# an empty file.
DAMAGES = ("truncated", "html", "empty")


def damaged(data: bytes, damage: str) -> bytes:
    """`data` spoiled as `damage` (one of `DAMAGES`) says."""
    return {
        "truncated": data[: len(data) // 2],
        "html": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "empty": b"",
    }[damage]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for the whole module; the dashboard stays on (Tune needs it, see RAY-NOTES).

    It runs Serve the way `jobs.common.connect` does, save the drain (`SERVE_TEST_ENV`).
    """
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SERVE_TEST_ENV.items():
            mp.setenv(name, value)
        ray.init(
            address="local",  # never join another Ray on this machine
            num_cpus=2,
            object_store_memory=512 * 2**20,
            include_dashboard=True,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


BUCKET = "vitray-test"


@dataclass(frozen=True)
class S3Server:
    """A moto server on 127.0.0.1 with one bucket; ``filesystem`` carries explicit settings."""

    endpoint: str
    bucket: str
    filesystem: pafs.S3FileSystem

    def upload(self, local: Path, key_prefix: str) -> str:
        """Copy a local tree through the same pyarrow client the sources use; returns its URI."""
        path = f"{self.bucket}/{key_prefix}"
        pafs.copy_files(str(local), path, pafs.LocalFileSystem(), self.filesystem)
        return f"s3://{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3Server]:
    """Start ``moto_server`` (a real HTTP S3 API), point the AWS variables at it, add a bucket."""
    port = _free_port()
    binary = Path(sys.executable).with_name("moto_server")
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        fs = pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=endpoint,
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            yield S3Server(endpoint, BUCKET, fs)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/<class>/...`` of 24 real handwritten digits (PNG and JPEG, one nested folder),
    plus what real folders contain: a zero-byte and a corrupt image (must come out as rows),
    a hidden file and a text file (must not)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="pip install scikit-learn")
    digits = datasets.load_digits()
    root = tmp_path_factory.mktemp("data") / "digits-folder"
    for label, name in ((0, "zero"), (3, "three"), (7, "seven")):
        images = digits.images[digits.target == label][:8]
        for i, image in enumerate(images):
            pixels = (image * 255 / 16).round().astype("uint8")
            sub = root / name / ("scans" if i >= 6 else "")
            sub.mkdir(parents=True, exist_ok=True)
            if i % 4 == 3:
                Image.fromarray(pixels).save(sub / f"{name}_{i}.jpg", format="JPEG")
            else:
                (sub / f"{name}_{i}.png").write_bytes(_png(pixels))
    (root / "three" / "empty.png").write_bytes(b"")
    (root / "seven" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "zero" / ".DS_Store").write_bytes(b"\0\0")
    (root / "zero" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def split_folder(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits folder re-arranged as ``root/{train,test}/<class>/`` (every third file test)."""
    dest = tmp_path_factory.mktemp("data") / "split-folder"
    for i, f in enumerate(sorted(p for p in digits_folder.rglob("*") if p.is_file())):
        target = dest / ("test" if i % 3 == 0 else "train") / f.relative_to(digits_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return dest
