"""The whole pipeline as users run it on a cluster: `ray job submit` to separate node processes.

A head (`ray start --head`) and a worker node (`ray start --address`) run as their own processes
with their own resources and temp dirs; MLflow is a real `mlflow server` on 127.0.0.1 with proxied
artifacts, the cluster set-up of docs/cluster.md. The smoke pipeline is submitted with the repo as
its working dir; pretraining runs two Ray Train workers pinned one per node. A second submission
must skip every finished stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from conftest import SERVE_TEST_ENV
from mlflow.tracking import MlflowClient

from jobs.common import load_config
from pipelines import tracking
from pipelines.pipeline import (
    StageCache,
    keyed_pretrain,
    local_checkpoint,
    prepared_location,
)
from pipelines.pretrain import PretrainConfig
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASETS = ("mnist-5k", "digits", "tuxpaint")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run the `ray` CLI; retries while a fresh cluster's job agent is still starting."""
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        starting = "No available agent" in done.stdout + done.stderr
        if done.returncode == 0 or not starting or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return done.stdout


def node_options(temp_dir: str) -> list[str]:
    """One node: 2 CPUs, one `trainer` slot, its own temp dir (a node's runtime-env agent
    unpacks the job's working dir there) and free ports for the agents, which would otherwise
    all ask for the same defaults on this one machine."""
    return [
        "--num-cpus=2",
        '--resources={"trainer": 1}',
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def kill_processes_mentioning(text: str) -> None:
    """Kill only this test's daemons (their command lines name its temp dirs); `ray stop`
    would stop every other Ray on the machine too."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@dataclass(frozen=True)
class Cluster:
    dashboard: str
    env: dict[str, str]
    mlflow_uri: str
    scratch: Path  # outside the working dir: prepared data, pipeline state


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short paths: Ray's AF_UNIX socket paths under a temp dir must stay within 107 bytes.
    root = tempfile.mkdtemp(prefix="vtr", dir="/tmp")
    head_dir, worker_dir = f"{root}/h", f"{root}/w"
    mlflow_port = free_port()
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    mlflow_server = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", f"{root}/mlartifacts",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # The server's job runners (a dozen processes) serve no purpose here: 2 cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: teardown kills its workers too
    )  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this venv's
        "MLFLOW_TRACKING_URI": mlflow_uri,
        # Ray 2.60 authenticates cluster RPCs with a token: every node and the CLI share one.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        **SERVE_TEST_ENV,  # as cluster.yaml starts its nodes, save a shorter drain
        # HAProxy outlives a killed node: with its files under root, teardown finds it too.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{root}/haproxy/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{root}/haproxy/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": f"{root}/haproxy",
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{root}/haproxy/server-state",
    }
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    try:
        ray_cli(
            "start", "--head", f"--port={port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            *node_options(head_dir), env=env,
        )  # fmt: skip
        ray_cli("start", f"--address=127.0.0.1:{port}", *node_options(worker_dir), env=env)
        deadline = time.monotonic() + 60
        while not answers(f"{mlflow_uri}/health"):
            assert time.monotonic() < deadline, f"the MLflow server at {mlflow_uri} never answered"
            time.sleep(1)
        yield Cluster(f"http://127.0.0.1:{dashboard}", env, mlflow_uri, Path(root) / "out")
    finally:
        kill_processes_mentioning(root)
        os.killpg(mlflow_server.pid, signal.SIGKILL)
        mlflow_server.wait()
        shutil.rmtree(root, ignore_errors=True)


def job_runtime_env(cluster: Cluster) -> str:
    """--runtime-env-json of a submitted job: this checkout, the cluster's MLflow server."""
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache"],
        "env_vars": {"MLFLOW_TRACKING_URI": cluster.mlflow_uri},
    }
    return f"--runtime-env-json={json.dumps(runtime_env)}"


def submit_pipeline(cluster: Cluster, serve_port: int) -> str:
    overrides = {
        "data_dir": cluster.scratch / "data",
        "state_dir": cluster.scratch / "state",
        "serve_port": serve_port,
        "pretrain.num_workers": 2,
        "pretrain.micro_batch_size": 64,  # 128 = 2 workers x 64
        "pretrain.extra_resources_per_worker": {"trainer": 1},  # one worker per node
        "pretrain.storage_path": cluster.scratch / "train",
        "finetune.storage_path": cluster.scratch / "tune",
    }
    settings = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return ray_cli(
        "job", "submit", f"--address={cluster.dashboard}", job_runtime_env(cluster),
        "--", "python", "-m", "jobs.pipeline", "--smoke", *settings,
        env=cluster.env, timeout=1500,
    )  # fmt: skip


def test_submitted_pipeline_runs_across_node_processes_and_records_lineage(
    cluster: Cluster,
) -> None:
    serve_port = free_port()
    logs = submit_pipeline(cluster, serve_port)
    assert "succeeded" in logs
    assert "[pretrain] 2 worker(s)" in logs
    summary = logs[logs.index("==== summary") :]
    for dataset in DATASETS:
        assert f"| {dataset} |" in summary
    assert f"served at http://127.0.0.1:{serve_port}/v1/predict" in summary
    assert "smoke query -> vit-tuxpaint v1" in summary

    mlflow = MlflowClient(tracking_uri=cluster.mlflow_uri, registry_uri=cluster.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("vitray")
    runs = mlflow.search_runs([experiment.experiment_id], max_results=500)
    [parent] = [r for r in runs if r.data.tags.get("vitray_stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags.get("vitray_stage") for r in children}
    assert {"pretrain", "analyze", "fewshot"} <= stages
    [pretrain] = [r for r in children if r.data.tags["vitray_stage"] == "pretrain"]
    assert pretrain.data.metrics["world_size"] == 2
    assert pretrain.data.metrics["dev/accuracy"] > 0.2  # ten classes
    for dataset in DATASETS:
        champion = mlflow.get_model_version_by_alias(f"vit-{dataset}", "champion")
        run = mlflow.get_run(champion.run_id)
        assert run.data.tags["vitray_pretrain_run"] == pretrain.info.run_id
        assert run.data.tags["vitray_served_at"] == f"http://127.0.0.1:{serve_port}"
        assert champion.tags["vitray_served_at"] == f"http://127.0.0.1:{serve_port}"
        figures = {a.path for a in mlflow.list_artifacts(champion.run_id, "figures")}
        assert figures == {"figures/confusion_matrix.png", "figures/test_predictions.png"}
    scratch = [r for r in runs if r.data.tags.get("vitray_stage") == "scratch"]
    assert len(scratch) == 1 + len(DATASETS)  # the sweep and its datasets
    for run in scratch:  # the baseline takes only the architecture: no pretraining lineage
        assert run.data.tags["vitray_architecture_run"] == pretrain.info.run_id
        assert "vitray_pretrain_run" not in run.data.tags
    parent_artifacts = {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.md"} <= parent_artifacts
    [analyze] = [r for r in children if r.data.tags["vitray_stage"] == "analyze"]
    assert len(mlflow.list_artifacts(analyze.info.run_id, "figures")) == 4

    again = submit_pipeline(cluster, free_port())
    # pretrain, analyze, and each of the 3 datasets: few-shot, fine-tuned, from scratch
    assert again.count("reusing the finished result") == 11
    assert "is up to date with" in again  # prepare checked its shards and left them
    assert "succeeded" in again


def answers(url: str) -> bool:
    """Whether the endpoint answers 200; refused or held (HAProxy before a route exists) is no."""
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_stopping_a_submitted_serve_job_takes_its_endpoint_down(cluster: Cluster) -> None:
    """`ray job stop` sends SIGTERM, not Ctrl-C's KeyboardInterrupt: the job must delete its app
    all the same, not leave it serving, also when the stop comes while the app still deploys
    (the endpoint may answer before `serve.run` returns)."""
    model = vit_checkpoint.save(
        VisionTransformer(
            ViTConfig(image_size=8, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2)
        ),
        cluster.scratch / "served-model",
    )
    port, job = free_port(), f"vitray-serve-{secrets.token_hex(4)}"
    ray_cli(
        "job", "submit", f"--address={cluster.dashboard}", f"--submission-id={job}", "--no-wait",
        job_runtime_env(cluster),
        "--", "python", "-m", "jobs.serve", "--model", f"tiny={model}", "--port", str(port),
        env=cluster.env,
    )  # fmt: skip
    health = f"http://127.0.0.1:{port}/v1/health"
    logs = ["job", "logs", f"--address={cluster.dashboard}", job]
    deadline = time.monotonic() + 180
    while not answers(health):
        assert time.monotonic() < deadline, ray_cli(*logs, env=cluster.env)
        time.sleep(2)
    ray_cli("job", "stop", f"--address={cluster.dashboard}", job, env=cluster.env)
    deadline = time.monotonic() + 60
    while answers(health):
        assert time.monotonic() < deadline, ray_cli(*logs, env=cluster.env)
        time.sleep(1)


def test_a_changed_pretraining_config_or_data_starts_a_new_ray_train_run() -> None:
    """Same config and data, same run (a crashed stage resumes); other ones, another run."""
    demo = load_config(str(ROOT / "configs/pretrain_demo.py"), True, [], PretrainConfig)
    key, named = keyed_pretrain(demo, "data-1")
    assert keyed_pretrain(demo, "data-1") == (key, named)
    assert named.run_name.startswith(demo.run_name)
    for other_key, other in (
        keyed_pretrain(dataclasses.replace(demo, learning_rate=3e-4), "data-1"),
        keyed_pretrain(demo, "data-2"),  # the same source, prepared again after it changed
    ):
        assert other_key != key
        assert other.run_name != named.run_name
    wider = dataclasses.replace(demo, num_workers=(1, 4), strategy="fsdp")  # how, not what
    assert keyed_pretrain(wider, "data-1") == (
        key,
        dataclasses.replace(wider, run_name=named.run_name),
    )


def test_a_source_is_prepared_in_a_folder_of_its_own_never_in_itself(tmp_path: Path) -> None:
    data = tmp_path / "data"
    flowers = tmp_path / "photos" / "flowers"
    prepared = Path(prepared_location(str(data), str(flowers)))
    assert prepared.parent == data and prepared.name.startswith("flowers-")
    assert prepared_location(str(data), str(tmp_path / "flowers")) != str(prepared)
    spelled = f"{tmp_path}/photos/../photos/flowers/"
    assert prepared_location(str(data), spelled) == str(prepared)  # one location, one folder
    assert prepared_location("runs/data", "digits") == str(Path("runs/data").resolve() / "digits")
    on_s3 = prepared_location("s3://bucket/prepared/", "s3://bucket/images/flowers/")
    assert on_s3.startswith("s3://bucket/prepared/flowers-")


def test_a_checkpoint_in_object_storage_reaches_later_stages_as_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    small = ViTConfig(image_size=8, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2)
    model = VisionTransformer(small)
    saved = vit_checkpoint.save(model, tmp_path / "saved")
    run_id = tracking.start_run("pretrain")
    tracking.client().log_artifacts(run_id, str(saved), "checkpoint")
    demo = load_config(str(ROOT / "configs/pretrain_demo.py"), True, [], PretrainConfig)
    pretrained = {"run_id": run_id, "checkpoint_path": "s3://bucket/train/run/checkpoint_x"}
    remote = dataclasses.replace(demo, storage_path="s3://bucket/train")
    folder = local_checkpoint(pretrained, remote, tmp_path / "pretrained")
    loaded, _ = vit_checkpoint.load(folder)
    assert Path(folder).is_relative_to(tmp_path / "pretrained")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    on_disk = {"run_id": run_id, "checkpoint_path": "/runs/train/run/checkpoint_x"}
    assert (
        local_checkpoint(on_disk, demo, tmp_path / "unused")
        == on_disk["checkpoint_path"] + "/model"
    )


def test_a_stage_whose_run_the_store_no_longer_holds_runs_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deleted in the MLflow UI, or `runs/mlflow.db` made again: the run could not be hung
    below the next invocation's parent."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = tracking.client(uri)
    runs: list[str] = []

    def compute() -> dict[str, str]:
        runs.append(mlflow.create_run(tracking.experiment_id("vitray", uri)).info.run_id)
        return {"run_id": runs[-1]}

    def cache() -> StageCache:  # as each pipeline invocation makes it
        return StageCache(tmp_path / "state.json", context={}, mlflow=mlflow)

    first = cache().run("analyze", {"checkpoint": "c"}, compute)
    assert cache().run("analyze", {"checkpoint": "c"}, compute) == first  # reused
    mlflow.delete_run(first["run_id"])
    second = cache().run("analyze", {"checkpoint": "c"}, compute)
    assert second != first and len(runs) == 2
    assert f"its finished run {first['run_id']} is not in MLflow" in capsys.readouterr().out
    # A fresh store (in a new process the same address would do: this one keeps the file open).
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    mlflow = tracking.client(uri)
    third = cache().run("analyze", {"checkpoint": "c"}, compute)
    assert third not in (first, second) and len(runs) == 3
