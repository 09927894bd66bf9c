"""cluster.yaml and configs/serve.yaml must pass Ray's own schemas and consistency checks."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from mlflow.exceptions import MlflowException
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from pipelines import tracking
from pipelines.serve import ServeConfig, app_builder
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_YAML = ROOT / "configs" / "serve.yaml"


def test_cluster_yaml_passes_ray_validation() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["gpu_trainer"]["node_config"]["InstanceType"].startswith("p5")
    assert nodes["cpu_ingest"]["node_config"]["InstanceType"].startswith("c7i")
    assert any("requirements.lock" in command for command in config["setup_commands"])
    assert any("-e ~/vitray" in command for command in config["setup_commands"])  # serve deploy


def test_a_misspelt_field_is_caught_by_the_same_validation() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_trainer"]["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="'max_wrokers' was unexpected"):
        validate_config(prepare_config(config))


def test_serve_yaml_passes_serve_schema_and_builds_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    [application] = config.applications
    assert application.import_path == "pipelines.serve:app_builder"
    ServeConfig(**application.args)  # every arg is a ServeConfig field
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts under ./runs
    with pytest.raises(MlflowException, match="vit-mnist-5k"):  # no champions registered yet
        app_builder(application.args)
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=16, depth=1,
                                        num_heads=1, mlp_dim=16))  # fmt: skip
    for name in application.args["models"]:
        directory = vit_checkpoint.save(model, tmp_path / name)
        run_id = tracking.start_run(f"register-{name}")
        tracking.client().log_artifacts(run_id, str(directory), "checkpoint")
        tracking.register_model(name, run_id, "checkpoint", {}, alias="champion")
    assert isinstance(app_builder(application.args), Application)
