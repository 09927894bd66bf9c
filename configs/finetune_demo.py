"""Demo transfer: the Fashion-MNIST demo checkpoint fine-tuned on mnist-5k, digits and tuxpaint.

Command:   .venv/bin/python -m jobs.tune --config configs/finetune_demo.py
           (after `jobs.pretrain --config configs/pretrain_demo.py`: its latest checkpoint)
Baseline:  add --scratch (same search and budget, random initial weights)
Expected:  a few minutes per dataset on 2 CPU cores; see docs/results.md for measured accuracy.

The paper's protocol (SGD momentum 0.9, no weight decay, clip 1, cosine, zero-init head, lr from
{0.001, 0.003, 0.01, 0.03} on dev) with a step budget scaled to these small sets, at a higher
resolution than pretraining as the paper does: 35 px instead of 28, so the position embedding is
resampled from a 4x4 to a 5x5 grid (42 px, a 6x6 grid, costs about 1.5x the compute per step).
"""

from pipelines.finetune import FinetuneConfig
from pipelines.ingest import IngestConfig


def get_config(smoke: bool = False) -> FinetuneConfig:
    return FinetuneConfig(
        # A pretraining run's folder stands for its latest checkpoint.
        checkpoint="runs/train/pretrain-demo-smoke" if smoke else "runs/train/pretrain-demo",
        datasets=("mnist-5k", "digits", "tuxpaint"),
        learning_rates=(0.01, 0.03) if smoke else (0.001, 0.003, 0.01, 0.03),
        steps=20 if smoke else 40,
        batch_size=64,
        warmup_steps=2 if smoke else 4,
        eval_every=10 if smoke else 20,
        reduction_factor=2,  # stop the weaker half of the learning rates after one evaluation
        image_size=35,
        cpus_per_trial=1,
        sweep_name="finetune-demo-smoke" if smoke else "finetune-demo",
        ingest=IngestConfig(batch_size=512),
    )
