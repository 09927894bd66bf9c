"""A cluster of separate processes (`ray start --head` + a second `ray start` node) and a job
submitted to it with `ray job submit`, exactly as users run the jobs on a real cluster.

Two CPU-only nodes stand in for GPU nodes: each offers one `trainer` resource, so the two Ray
Train workers of the submitted job run on different nodes (raylets) and talk through gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("cluster")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this venv's
        "RAY_TMPDIR": str(tmp / "ray"),
    }
    port, dashboard = free_port(), free_port()
    ray_cli(
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        '--resources={"trainer": 1}',
        env=env,
    )
    try:
        ray_cli(
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=2",
            '--resources={"trainer": 1}',
            env=env,
        )
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_pretraining_submitted_as_a_job_trains_across_two_node_processes(
    cluster: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, env = cluster
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".venv", "runs", ".git"],
        "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri},
    }
    storage = tmp_path / "train"
    logs = ray_cli(
        "job",
        "submit",
        f"--address={address}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        "python",
        "-m",
        "jobs.pretrain",
        "--config",
        "configs/pretrain_demo.py",
        "--smoke",
        "--set",
        "num_workers=2",
        "--set",
        "extra_resources_per_worker={'trainer': 1}",
        "--set",
        f"storage_path={storage}",
        "--set",
        "global_batch_size=64",
        "--set",
        "micro_batch_size=32",
        env=env,
        timeout=900,
    )
    assert "[pretrain] 2 worker(s)" in logs
    assert "[pretrain] done: checkpoint" in logs
    assert "succeeded" in logs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    runs = tracking.client().search_runs([tracking.experiment_id()])
    [run] = [r for r in runs if r.data.tags.get("vitray_stage") == "pretrain"]
    assert run.data.metrics["dev/accuracy"] > 0.1
