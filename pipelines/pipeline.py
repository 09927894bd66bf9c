"""The whole recipe: prepare -> pretrain -> analyze -> few-shot -> tune (+ scratch) -> serve.

Each stage is the same `run()` the single-stage jobs call, fed with the previous stage's result
record. A JSON state file remembers each finished stage with a hash of its inputs, so an
interrupted pipeline re-run skips what is done and still valid and redoes only the rest.

MLflow gets one parent run per invocation; every stage's runs hang below it and carry tags that
link pretraining -> fine-tuning -> registered version -> served deployment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from mlflow import MlflowClient

from pipelines import finetune, pretrain, tracking
from pipelines.analyze import run_analysis
from pipelines.datasets import CATALOG, fingerprint
from pipelines.fewshot import run_fewshot, shots_and_seeds
from pipelines.finetune import FinetuneConfig
from pipelines.prepare import PrepareConfig, prepare
from pipelines.pretrain import PretrainConfig
from pipelines.serve import ServeConfig, deploy

PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class PipelineConfig:
    """The paper's recipe in one object; `pretrain.dataset` is prepared to Parquet first."""

    pretrain: PretrainConfig
    finetune: FinetuneConfig
    fewshot_shots: tuple[int, ...] = (1, 5, 10, 25)
    fewshot_seeds: int = 3
    scratch_baseline: bool = True
    data_dir: str = "runs/data"
    state_dir: str = "runs/pipeline"
    serve_host: str = "127.0.0.1"  # 0.0.0.0 on a cluster, where HAProxy reaches other nodes
    serve_port: int = 8000
    name: str = "demo"
    experiment: str = tracking.DEFAULT_EXPERIMENT

    def __post_init__(self) -> None:
        """Refused here, not after pretraining: no dataset to fine-tune, or a fine-tuning
        sweep that registers nothing (the serve stage serves the versions it registered; the
        from-scratch baseline is `scratch_baseline`), or few-shot settings no run can use."""
        if not self.finetune.datasets:
            raise ValueError("name at least one dataset in finetune.datasets")
        if not self.finetune.register or self.finetune.from_scratch:
            raise ValueError(
                "the serve stage serves the registered fine-tuned models: keep "
                "finetune.register, and leave finetune.from_scratch off (scratch_baseline runs "
                "the from-scratch search)"
            )
        shots_and_seeds(self.fewshot_shots, self.fewshot_seeds)


class StageCache:
    """Finished stages and the hash of their inputs, kept in a JSON file between runs.

    `context` is part of every stage's inputs: the MLflow store and experiment the results were
    recorded in, whose run ids a reused result hands to the later stages. A result whose run
    (its `run_id`) that store (`mlflow`) no longer holds is computed again: the run deleted in
    the UI, or the store made again at the same address (`runs/mlflow.db` deleted, a tracking
    server restarted on a fresh database). Handed on, it would stop the next stage at "The run
    ... must be in the 'active' state" or "Run with id=... not found".
    """

    def __init__(self, path: Path, context: dict[str, str], mlflow: MlflowClient) -> None:
        self.path = path
        self.context = context
        self.mlflow = mlflow
        self.entries: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, stage: str, inputs: Any, compute: Callable[[], Any]) -> Any:
        keyed = {"context": self.context, "inputs": inputs}
        digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode())
        key = digest.hexdigest()[:16]
        entry = self.entries.get(stage)
        if entry and entry["inputs"] == key:
            run_id = entry["result"]["run_id"]
            if tracking.run_is_active(self.mlflow, run_id):
                banner(f"{stage}: inputs unchanged, reusing the finished result")
                return entry["result"]
            print(f"[{stage}] its finished run {run_id} is not in MLflow any more", flush=True)
        banner(stage)
        start = time.perf_counter()
        result = _jsonable(compute())
        self.entries[stage] = {
            "inputs": key,
            "result": result,
            "seconds": time.perf_counter() - start,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, default=str))
        tmp.replace(self.path)
        return result


def banner(text: str) -> None:
    print(f"\n==== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def prepared_location(data_dir: str, source: str) -> str:
    """The folder of `data_dir` where the pipeline prepares `source`.

    A catalog name names its folder. A path or URI gets its last part and a hash of the whole:
    joined as it stands, an absolute path would replace `data_dir` and the shards would land in
    the user's own image folder, and two sources of one name would share a folder. `data_dir`
    may be a URI (object storage every node of a cluster reads); a local one is made absolute,
    since Ray Data tasks on other nodes do not share this driver's working directory.
    """
    if source in CATALOG:
        name = source
    else:  # one folder per location, however it is spelled (relative, trailing slash, ~)
        # `~` expanded as prepare reads it (sources.resolve_uri); unexpanded, it resolved below
        # the working directory, so each directory gave the source another folder (and
        # pretraining, keyed by that folder, another run).
        where = source.rstrip("/") if "://" in source else str(Path(source).expanduser().resolve())
        digest = hashlib.sha256(where.encode()).hexdigest()[:8]
        name = f"{PurePosixPath(where).name or 'source'}-{digest}"
    if "://" in data_dir:
        return f"{data_dir.rstrip('/')}/{name}"
    return str(Path(data_dir).resolve() / name)


def keyed_pretrain(config: PretrainConfig, data_checksum: str) -> tuple[str, PretrainConfig]:
    """The hash of what the config learns and of the data it reads, and the config with its Ray
    Train run named after that hash.

    Ray Train resumes a run of the same name from its checkpoints: right after a crash, wrong
    after a change of what it learns or of the data (the old run's weights and step would come
    back). Where and how wide it runs (`pretrain.RESUMABLE_SETTINGS`: workers, DDP or FSDP, ...)
    is left out, so changing those resumes or reuses the run.
    """
    learns = pretrain.learning_settings(config)
    key = tracking.config_hash({"config": tracking.config_hash(learns), "data": data_checksum})
    return key, dataclasses.replace(config, run_name=f"{config.run_name}-{key[:8]}")


def local_checkpoint(pretrained: dict[str, Any], config: PretrainConfig, target: Path) -> str:
    """The pretrained model as a local folder, which the later stages read.

    With `s3://` storage the checkpoint lies in the bucket; the same files are the pretraining
    run's `checkpoint` artifact in MLflow, downloaded here.
    """
    if "://" not in config.storage_path:
        return str(Path(pretrained["checkpoint_path"]) / "model")
    target.mkdir(parents=True, exist_ok=True)
    return tracking.client().download_artifacts(pretrained["run_id"], "checkpoint", str(target))


def run(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the summary."""
    # Every stage records into the pipeline's experiment, beside its parent run.
    for stage in (config.pretrain, config.finetune):
        if stage.experiment not in (tracking.DEFAULT_EXPERIMENT, config.experiment):
            raise ValueError(
                f"stages record into the pipeline's experiment {config.experiment!r}, not "
                f"{stage.experiment!r}: set the pipeline's `experiment` instead"
            )
    config = dataclasses.replace(
        config,
        pretrain=dataclasses.replace(config.pretrain, experiment=config.experiment),
        finetune=dataclasses.replace(config.finetune, experiment=config.experiment),
    )
    uri = tracking.tracking_uri()
    parent = tracking.start_run(
        f"pipeline-{config.name}",
        experiment=config.experiment,
        tags={"vitray_stage": "pipeline"},
        uri=uri,
    )
    with tracking.ending(parent, uri):
        return _run_stages(config, parent, uri)


def _run_stages(config: PipelineConfig, parent: str, uri: str) -> dict[str, Any]:
    """The stages in order. A stage runs again when its inputs changed, data included: the
    source's files (listing fingerprint) for few-shot and fine-tuning, the prepared shards'
    checksum for pretraining. Prepare compares the source with its own manifest."""
    mlflow = tracking.client(uri)
    cache = StageCache(
        Path(config.state_dir) / config.name / "state.json",
        context={"tracking_uri": uri, "experiment": config.experiment},
        mlflow=mlflow,
    )

    def adopt(run_id: str) -> None:
        """Hang a stage's run below this invocation's parent run (a reused one too)."""
        mlflow.set_tag(run_id, PARENT_TAG, parent)

    def adopt_sweeps(outcomes: list[dict[str, Any]]) -> None:
        """The fine-tuning sweep runs the per-dataset runs hang below: datasets reused from an
        earlier invocation keep the sweep that tuned them."""
        for sweep in {mlflow.get_run(o["run_id"]).data.tags[PARENT_TAG] for o in outcomes}:
            adopt(sweep)

    source = config.pretrain.dataset
    prepared_dir = prepared_location(config.data_dir, source)
    # Not through the stage cache: prepare checks its own shards, and a cached record would
    # outlive shards deleted since. Done and intact, it returns in milliseconds.
    banner("prepare")
    prepared = dataclasses.asdict(prepare(PrepareConfig(source=source, output=prepared_dir)))
    if prepared["skipped"]:
        print(f"[prepare] {prepared_dir} is up to date with {source}", flush=True)
    pretrain_key, pretrain_config = keyed_pretrain(
        dataclasses.replace(config.pretrain, dataset=prepared_dir), prepared["checksum"]
    )
    pretrained = cache.run(
        "pretrain",
        pretrain_key,
        lambda: pretrain.run(pretrain_config, parent_run_id=parent),
    )
    adopt(pretrained["run_id"])
    downloads = cache.path.parent / "pretrained" / pretrained["run_id"]  # one folder per run
    checkpoint = local_checkpoint(pretrained, pretrain_config, downloads)
    analysed = cache.run(
        "analyze",
        {"checkpoint": checkpoint, "dataset": prepared_dir},
        lambda: run_analysis(
            checkpoint, prepared_dir, parent_run_id=parent, experiment=config.experiment
        ),
    )
    adopt(analysed["run_id"])
    downstream = {d: fingerprint(d) for d in config.finetune.datasets}
    fewshot = {}
    for dataset in config.finetune.datasets:
        result = cache.run(
            f"fewshot-{dataset}",
            {
                "checkpoint": checkpoint,
                "shots": config.fewshot_shots,
                "seeds": config.fewshot_seeds,
                "data": downstream[dataset],
            },
            lambda d=dataset: run_fewshot(
                checkpoint,
                d,
                config.fewshot_shots,
                config.fewshot_seeds,
                experiment=config.experiment,
                parent_run_id=parent,
            ),
        )
        adopt(result["run_id"])
        fewshot[dataset] = result
    tune_config = dataclasses.replace(config.finetune, checkpoint=checkpoint)
    transferred = cached_sweep(cache, "finetune", tune_config, downstream, parent)
    adopt_sweeps(transferred)
    scratch: list[dict[str, Any]] = []
    if config.scratch_baseline:
        scratch_config = dataclasses.replace(tune_config, from_scratch=True, register=False)
        scratch = cached_sweep(cache, "scratch", scratch_config, downstream, parent)
        adopt_sweeps(scratch)
    banner("serve")
    # The versions this run registered, not whatever `@champion` names by now: a reused sweep's
    # alias may since have moved to another run's model.
    models = {}
    for outcome in transferred:
        name = tracking.registered_model_name(outcome["dataset"])
        models[name] = f"models:/{name}/{outcome['model_version']}"
    url = deploy(
        ServeConfig(
            models=models,
            default_model=next(iter(models)),
            host=config.serve_host,
            port=config.serve_port,
        )
    )
    reply = _smoke_query(url, transferred[-1]["dataset"])
    for outcome in transferred:  # on the run and on its version, for who browses the registry
        mlflow.set_tag(outcome["run_id"], "vitray_served_at", url)
        name = tracking.registered_model_name(outcome["dataset"])
        mlflow.set_model_version_tag(name, outcome["model_version"], "vitray_served_at", url)
    summary = {
        "pretrain": pretrained,
        "analysis": analysed,
        "fewshot": fewshot,
        "finetune": transferred,
        "scratch": scratch,
        "url": url,
        "smoke_query": reply,
    }
    mlflow.log_dict(parent, summary, "summary.json")
    mlflow.log_text(parent, format_summary(summary), "summary.md")
    return summary


def cached_sweep(
    cache: StageCache,
    stage: str,
    config: FinetuneConfig,
    data: dict[str, str],
    parent_run_id: str | None,
) -> list[dict[str, Any]]:
    """A fine-tuning sweep cached dataset by dataset, each keyed by the sweep's settings and its
    own data (`data`: dataset -> fingerprint).

    A sweep that fails on its seventh dataset keeps the six it finished: the rerun tunes only
    what is left, and adding a dataset to the list tunes only the new one.
    """
    with finetune.Sweep(config, parent_run_id=parent_run_id) as sweep:
        return [
            cache.run(
                f"{stage}-{dataset}",
                {
                    "config": tracking.config_hash(dataclasses.replace(config, datasets=())),
                    "data": data[dataset],
                },
                lambda d=dataset: sweep.tune(d),
            )
            for dataset in config.datasets
        ]


def _smoke_query(url: str, dataset: str) -> dict[str, Any]:
    """Ask the endpoint about a real photo (a scikit-learn sample image)."""
    import sklearn.datasets
    from PIL import Image

    image = sklearn.datasets.load_sample_images().images[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    response = requests.post(
        f"{url}/v1/predict",
        data=buffer.getvalue(),
        params={"model": tracking.registered_model_name(dataset), "top_k": 3},
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )
    response.raise_for_status()
    return response.json()


def format_summary(summary: dict[str, Any]) -> str:
    """The table a newcomer reads at the end of the run."""
    pre = summary["pretrain"]["metrics"]
    lines = [
        f"pretraining dev accuracy: {pre.get('dev/accuracy', float('nan')):.4f} "
        f"(step {int(pre.get('step', 0))})",
        "",
        "| dataset | few-shot 10 | few-shot 25 | fine-tuned test | from scratch test "
        "| registered |",
        "|---|---|---|---|---|---|",
    ]
    scratch = {o["dataset"]: o["test_accuracy"] for o in summary["scratch"]}

    def shot(accuracy: dict[Any, Any], k: int) -> str:
        """JSON turns the int keys into strings; a shot count too large for a set is absent."""
        value = accuracy.get(k) or accuracy.get(str(k))
        return f"{value[0]:.4f}" if value else "-"

    for outcome in summary["finetune"]:
        dataset = outcome["dataset"]
        accuracy = summary["fewshot"][dataset]["accuracy"]
        baseline = f"{scratch[dataset]:.4f}" if dataset in scratch else "-"
        lines.append(
            f"| {dataset} | {shot(accuracy, 10)} | {shot(accuracy, 25)} | "
            f"{outcome['test_accuracy']:.4f} | {baseline} | "
            f"{tracking.registered_model_name(dataset)} v{outcome['model_version']} "
            f"@{outcome.get('alias', 'champion')} |"
        )
    reply = summary["smoke_query"]
    top = reply["predictions"][0]
    lines += [
        "",
        f"attention maps and Fig. 7 analyses: MLflow run {summary['analysis']['run_id']}",
        f"served at {summary['url']}/v1/predict (API docs: {summary['url']}/docs)",
        f"smoke query -> {reply['model']['name']} v{reply['model']['version']}: "
        f"{top['label']} ({top['score']:.3f})",
    ]
    return "\n".join(lines)
