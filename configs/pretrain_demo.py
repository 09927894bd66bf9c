"""Demo pretraining: a small ViT on Fashion-MNIST (60k real images), on this laptop's CPU.

Command:   .venv/bin/python -m jobs.pretrain --config configs/pretrain_demo.py
Smoke:     .venv/bin/python -m jobs.pretrain --config configs/pretrain_demo.py --smoke
Expected:  about 5 minutes on 2 CPU cores; dev accuracy around 0.8 (chance is 0.1).
           Smoke: under a minute, dev accuracy well above chance only by luck.

Images are 28x28 grey, replicated to RGB so the same model transfers to colour datasets; patches
of 4 pixels give a 7x7 grid, the paper's 14x14-grid regime scaled down to the data.
"""

from pipelines.ingest import Augmentation, IngestConfig
from pipelines.pretrain import PretrainConfig
from vit.config import ViTConfig

MODEL = ViTConfig(
    image_size=28,
    patch_size=4,
    width=128,
    depth=6,
    mlp_dim=512,
    num_heads=4,
    representation_size=128,  # the paper's pretraining-only tanh pre-logits layer
    dropout=0.0,
)


def get_config(smoke: bool = False) -> PretrainConfig:
    return PretrainConfig(
        dataset="fashion-mnist",
        model=MODEL,
        augmentation=Augmentation(crop_scale=(0.6, 1.0), hflip=True),
        ingest=IngestConfig(batch_size=512),
        steps=40 if smoke else 900,
        global_batch_size=128,
        micro_batch_size=128,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=5 if smoke else 60,
        eval_every=40 if smoke else 300,
        checkpoint_every=20 if smoke else 300,
        log_every=10 if smoke else 50,
        num_workers=1,
        cpus_per_worker=1,
        run_name="pretrain-demo-smoke" if smoke else "pretrain-demo",
    )
