"""The whole pipeline at smoke size on local Ray: every stage, the summary, a served answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import requests

from configs.pipeline_demo import get_config
from pipelines import pipeline, tracking


@pytest.mark.usefixtures("ray_local")
def test_smoke_pipeline_runs_end_to_end_and_a_rerun_skips_finished_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    smoke = get_config(smoke=True)
    config = dataclasses.replace(
        smoke,
        pretrain=dataclasses.replace(smoke.pretrain, storage_path=str(tmp_path / "train")),
        finetune=dataclasses.replace(smoke.finetune, storage_path=str(tmp_path / "tune")),
        data_dir=str(tmp_path / "data"),
        state_dir=str(tmp_path / "state"),
        serve_port=8123,
    )
    summary = pipeline.run(config)
    table = pipeline.format_summary(summary)
    for dataset in ("mnist-5k", "digits", "tuxpaint"):
        assert f"| {dataset} |" in table
    assert [o["dataset"] for o in summary["finetune"]] == ["mnist-5k", "digits", "tuxpaint"]
    assert len(summary["scratch"]) == 3
    assert summary["pretrain"]["metrics"]["dev/accuracy"] > 0.2  # ten classes
    assert summary["smoke_query"]["model"]["name"] == "vit-tuxpaint"
    health = requests.get(f"{summary['url']}/v1/health", timeout=30).json()
    assert health["models"] == ["vit-digits", "vit-mnist-5k", "vit-tuxpaint"]
    mlflow = tracking.client()
    champion = mlflow.get_model_version_by_alias("vit-digits", "champion")
    assert (
        mlflow.get_run(champion.run_id).data.tags["vitray_pretrain_run"]
        == (summary["pretrain"]["run_id"])
    )
    capsys.readouterr()
    again = pipeline.run(config)
    out = capsys.readouterr().out
    assert out.count("reusing the finished result") == 7  # prepare, pretrain, 3 few-shot, 2 tunes
    assert again["finetune"] == summary["finetune"]
