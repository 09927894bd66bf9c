"""The README's main command: the paper's recipe end to end on the embedded data.

    python -m jobs.pipeline                          # configs/pipeline_demo.py, 6-10 min, 2 cores
    python -m jobs.pipeline --smoke                  # minutes: what the tests run
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_PRIVATE_IP:5000"}}' \
        -- python -m jobs.pipeline --config configs/pipeline_demo.py

Prepares Fashion-MNIST as Parquet shards, pretrains a small ViT on it, measures few-shot transfer,
fine-tunes with Ray Tune on mnist-5k, digits and tuxpaint (and the same search from scratch),
registers each dataset's champion in MLflow and serves them all behind one HTTP endpoint.
A re-run skips the stages that finished with unchanged inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from jobs.common import add_common_arguments, connect, load_config
from pipelines import pipeline
from pipelines.serve import undeploy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(
        parser,
        set_examples=("fewshot_seeds=1", "pretrain.num_workers=2"),
        default_config="configs/pipeline_demo.py",
    )
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the endpoint up until Ctrl-C or `ray job stop`",
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.smoke, args.set, pipeline.PipelineConfig)
    local_ray = connect(args.address)
    start = time.perf_counter()
    summary = pipeline.run(config)
    pipeline.banner(f"summary ({(time.perf_counter() - start) / 60:.1f} min)")
    print(pipeline.format_summary(summary), flush=True)
    try:
        if args.keep_serving:
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    finally:  # also on `ray job stop`: its SIGTERM ends a Ray driver with SystemExit
        if not local_ray:  # a cluster's Serve outlives this job: drain and stop our endpoint
            undeploy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
