"""Demo pretraining: a small ViT on Fashion-MNIST (60k real images), on this laptop's CPU.

Command:   .venv/bin/python -m jobs.pretrain --config configs/pretrain_demo.py
Smoke:     .venv/bin/python -m jobs.pretrain --config configs/pretrain_demo.py --smoke
Expected:  about 4 minutes on 2 CPU cores (one trainer core, one decoding core); dev accuracy
           0.69-0.75 in docs/results.md (chance is 0.1). Smoke: about a minute, above chance.

Images are 28x28 grey, replicated to RGB so the same model transfers to colour datasets; patches
of 7 pixels give a 4x4 grid. (Patch 4, a 7x7 grid, is closer to the paper's 14x14 regime but
three times slower: it does not fit the 15-minute budget of the whole demo on 2 cores.)
"""

from pipelines.ingest import Augmentation, IngestConfig
from pipelines.pretrain import PretrainConfig
from vit.config import ViTConfig

MODEL = ViTConfig(
    image_size=28,
    patch_size=7,
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
        steps=40 if smoke else 500,
        global_batch_size=128,
        micro_batch_size=128,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=5 if smoke else 50,
        eval_every=40 if smoke else 250,
        checkpoint_every=20 if smoke else 250,
        log_every=10 if smoke else 50,
        num_workers=1,
        cpus_per_worker=1,
        run_name="pretrain-demo-smoke" if smoke else "pretrain-demo",
    )
