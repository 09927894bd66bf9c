"""The embedded demo: pretrain on Fashion-MNIST, transfer to mnist-5k, digits and tuxpaint.

Command:   make demo        (= .venv/bin/python -m jobs.pipeline --config configs/pipeline_demo.py)
Smoke:     .venv/bin/python -m jobs.pipeline --smoke      (what tests/test_pipeline.py runs)
Expected:  5.6-10.4 minutes on 2 CPU cores, by the VM (plus the one-time venv build); see
           docs/results.md.
"""

import dataclasses

from configs.finetune_demo import get_config as finetune_config
from configs.pretrain_demo import get_config as pretrain_config
from pipelines.pipeline import PipelineConfig


def get_config(smoke: bool = False) -> PipelineConfig:
    return PipelineConfig(
        pretrain=pretrain_config(smoke),
        finetune=dataclasses.replace(finetune_config(smoke), checkpoint=""),
        fewshot_shots=(1, 5, 10, 25),
        fewshot_seeds=2 if smoke else 3,
        name="demo-smoke" if smoke else "demo",
    )
