"""MLflow as the record of every stage: where it lives, runs, params, and resumable metric logs.

The tracking URI comes from `MLFLOW_TRACKING_URI`; the embedded default is a SQLite database and
an artifact folder under `runs/` (the model registry needs a database backend, and MLflow 3
refuses the plain `file:` store). On a cluster, point the variable at an `mlflow server`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import LifecycleStage, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

RUNS_DIR = Path("runs")
DEFAULT_EXPERIMENT = "vitray"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for its driver


def tracking_uri() -> str:
    """The configured tracking URI, else a SQLite database under ./runs; absolute either way.

    Absolute because the driver hands it to Ray Train workers and Tune trials, which run in
    directories of their own. The default serves one machine, and is refused where it would not
    be the user's database (`_default_store_refusal`), naming the fix.
    """
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return _absolute_sqlite(configured)
    refusal = _default_store_refusal()
    if refusal:
        raise RuntimeError(
            f"MLFLOW_TRACKING_URI is not set {refusal}: set it to a tracking server every node "
            "reaches (cluster.yaml runs one on the head node, port 5000; see docs/cluster.md), "
            "or to a sqlite:/// path if one machine's file is meant"
        )
    RUNS_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{(RUNS_DIR / 'mlflow.db').resolve()}"


def _absolute_sqlite(uri: str) -> str:
    """A `sqlite:///runs/mlflow.db` URI (the form `mlflow ui` is given) made absolute here.

    A worker or trial opening the relative path from its own directory would create another,
    empty database and fail on the driver's runs ("Run with id=... not found").
    """
    if not uri.startswith("sqlite:///"):
        return uri
    database, separator, query = uri.removeprefix("sqlite:///").partition("?")
    if database in ("", ":memory:") or os.path.isabs(database):
        return uri
    return f"sqlite:///{Path(database).resolve()}{separator}{query}"


def _default_store_refusal() -> str | None:
    """Why the default database would not serve this process, or None where it does.

    On a Ray cluster of several nodes it would be a file beside this driver, which the workers
    on the other nodes cannot reach (they would each log to a database of their own). A driver
    started by `ray job submit --working-dir` runs in the job's temporary copy of that folder:
    the file would be left there, a new one for every submission, and the cluster may grow
    after the check (cluster.yaml starts with the head alone and adds GPU nodes on demand).
    """
    if _runs_in_submitted_working_dir():
        return "in a job started by `ray job submit --working-dir`"
    ray = sys.modules.get("ray")  # not imported: no cluster joined, and no import cost
    if ray is not None and ray.is_initialized() and sum(n["Alive"] for n in ray.nodes()) > 1:
        return "on a Ray cluster of several nodes"
    return None


def _runs_in_submitted_working_dir() -> bool:
    """Whether Ray's job supervisor started this driver with a `working_dir` (its job config,
    runtime environment included, is handed to the driver in `RAY_JOB_CONFIG_ENV`)."""
    text = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not text:
        return False
    try:
        runtime_env = json.loads(text).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def client(uri: str | None = None) -> MlflowClient:
    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(name: str = DEFAULT_EXPERIMENT, uri: str | None = None) -> str:
    """Get or create an experiment; with SQLite its artifacts go to `mlartifacts` beside the
    database (runs/mlartifacts for the default one).

    One deleted in the UI keeps its name until removed for good, and MLflow refuses new runs in
    it as "experiment 1 must be in the 'active' state": refused here by name, with the ways out.
    """
    mlflow = client(uri)
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage == LifecycleStage.DELETED:
        number = existing.experiment_id
        raise RuntimeError(
            f"MLflow experiment {name!r} (id {number}) is deleted: restore it (in the UI, or "
            f"`mlflow experiments restore --experiment-id {number}`), or name another "
            "experiment"
        )
    if existing is not None:
        return existing.experiment_id
    location = None
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:"):
        # A Databricks-style name ("/Users/me/vit") is no absolute path: joined as one, it
        # would put the artifacts at /Users/me/vit, outside the store (or fail to create it).
        location = (_sqlite_artifact_root(uri) / name.lstrip("/")).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def _sqlite_artifact_root(uri: str) -> Path:
    """`mlartifacts` beside the database file of a `sqlite:///PATH` URI.

    Not under the working directory: an experiment keeps its artifact location for good, and
    the directory of the first process to log (the temporary copy `ray job submit` runs in, a
    trial's folder) may not outlive it while the database does. In memory: runs/mlartifacts.
    """
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or database in ("", ":memory:"):
        return RUNS_DIR / "mlartifacts"
    return Path(database).resolve().parent / "mlartifacts"


def start_run(
    run_name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Create a run (a child when `parent_run_id` is given) and return its id."""
    all_tags = {MLFLOW_RUN_NAME: run_name, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client(uri).create_run(experiment_id(experiment, uri), run_name=run_name, tags=all_tags)
    return run.info.run_id


@contextlib.contextmanager
def ending(run_id: str, uri: str | None = None) -> Iterator[None]:
    """End ``run_id`` FINISHED when the block completes, FAILED when it raises, KILLED when the
    process is told to stop (Ctrl-C; SIGTERM, which `ray job stop` sends and
    `jobs.common.connect` turns into `sys.exit(15)`), so a stage that dies never leaves its run
    RUNNING in the MLflow UI."""
    mlflow = client(uri)
    try:
        yield
    except KeyboardInterrupt:
        _end_quietly(mlflow, run_id, "KILLED")
        raise
    except SystemExit as exit_:
        status = {None: "FINISHED", 0: "FINISHED", signal.SIGTERM: "KILLED"}.get(exit_.code)
        _end_quietly(mlflow, run_id, status or "FAILED")
        raise
    except BaseException:
        _end_quietly(mlflow, run_id, "FAILED")
        raise
    mlflow.set_terminated(run_id)


def _end_quietly(mlflow: MlflowClient, run_id: str, status: str) -> None:
    """End a run whose stage raised, never in place of the stage's own error: a tracking server
    gone away would otherwise be the error the user sees, not what stopped the stage."""
    try:
        mlflow.set_terminated(run_id, status)
    except Exception as error:
        print(f"[tracking] could not mark run {run_id} {status}: {error}", file=sys.stderr)


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses/dicts -> {"model.width": "768", ...}, the shape MLflow params want."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def config_hash(config: Any) -> str:
    """A short, stable fingerprint of a config: equal configs, equal hashes, across processes."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_params(run_id: str, config: Any, uri: str | None = None) -> None:
    params = flatten(config)
    params["config_hash"] = config_hash(config)
    batch = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    mlflow = client(uri)
    for start in range(0, len(batch), 100):
        mlflow.log_batch(run_id, params=batch[start : start + 100])


class MetricLog:
    """Step metrics for one run that survive restarts without duplicated steps.

    A worker that resumes from a checkpoint replays the steps after it; the steps already on
    record are skipped, so the run's history continues where the crashed attempt left it.
    """

    def __init__(self, run_id: str, uri: str, step_key: str) -> None:
        self.run_id = run_id
        self.client = client(uri)
        history = self.client.get_metric_history(run_id, step_key)
        self.last_logged = max((m.step for m in history), default=-1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        self.last_logged = step


def run_is_active(mlflow: MlflowClient, run_id: str) -> bool:
    """Whether the store holds the run, not deleted: one deleted in the UI, gone for good
    (`mlflow gc`) or recorded in another store is not. Other errors (the server unreachable)
    are raised, not taken for an answer."""
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == LifecycleStage.ACTIVE
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise


def registered_model_name(dataset: str) -> str:
    """`vit-<dataset>`: the registry name of the models fine-tuned on `dataset`.

    MLflow names cannot hold '/' or ':', so a folder or URI is named by its last part:
    `/data/flowers`, `./flowers` and `s3://bucket/flowers/` all register as `vit-flowers`. A
    refreshed copy of a dataset is then the next version of the same model; `@champion` moves to
    it only on the rule of `finetune.registry_alias`, and each version's `vitray_dataset` tag
    keeps the whole path.
    """
    path = dataset.rstrip("/")
    if "://" not in path:  # "." and "data/.." name the folder they mean
        path = os.path.abspath(path)
    return "vit-" + path.rsplit("/", 1)[-1].replace(":", "-")


def check_alias(alias: str) -> None:
    """Refuse an alias the registry would refuse, before a version is made for it: MLflow judges
    an alias only when it is set, which is after the version exists (left without one)."""
    reserved = alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)
    if reserved or not re.fullmatch(r"[\w-]{1,255}", alias):
        raise ValueError(
            f"alias {alias!r}: use letters, digits, _ and - (at most 255), and neither 'latest' "
            "nor v<number>, which the registry keeps for versions"
        )


def register_model(
    name: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str],
    alias: str,
    uri: str | None = None,
) -> str:
    """Register a run's artifact folder as a new version of `name` and point `alias` at it."""
    check_alias(alias)
    mlflow = client(uri)
    # Looked up by name, not with a search filter: a name holding a quote (a dataset folder
    # "bob's pets", `--register "bob's"`) breaks the filter string's syntax.
    try:
        mlflow.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        mlflow.create_registered_model(name)
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = mlflow.create_model_version(name, source, run_id=run_id, tags=tags)
    mlflow.set_registered_model_alias(name, alias, version.version)
    return version.version
