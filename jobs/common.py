"""What every job shares: loading a config file and connecting to Ray."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import ray

# Serve's high-throughput mode, vitray's default: HAProxy in front of the replicas' own HTTP
# servers instead of Serve's Python proxy actor, and the replica's user code on its main event
# loop (no hop between threads). Ray reads these when a cluster's processes start, so they belong
# in the environment of `ray start` (cluster.yaml); `connect` sets them for a local Ray.
# A value already in the environment wins (`=0` brings back the Python proxy).
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def load_config(path: str, smoke: bool, overrides: list[str]) -> Any:
    """Import a config file, call its `get_config(smoke)`, apply `key=value` overrides."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(smoke=smoke)
    for item in overrides:
        key, _, text = item.partition("=")
        config = _override(config, key.split("."), text, item)
    return config


def _override(config: Any, path: list[str], text: str, item: str) -> Any:
    """Replace the field at a dotted path (`pretrain.num_workers`) in nested frozen dataclasses."""
    name, rest = path[0], path[1:]
    fields = (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else ()
    )
    if name not in fields:  # a property such as `grid_size` is not a field
        raise SystemExit(f"--set {item}: {type(config).__name__} has no field {name!r}")
    current = getattr(config, name)
    value = _override(current, rest, text, item) if rest else _parse(text, current, item)
    return dataclasses.replace(config, **{name: value})


def _parse(text: str, current: Any, item: str) -> Any:
    """Strings stay strings; everything else is a Python literal (numbers, tuples, booleans)."""
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SystemExit(f"--set {item}: {text!r} is not a Python literal") from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file with get_config(smoke)")
    parser.add_argument("--smoke", action="store_true", help="shrink the run to a smoke test")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field; dotted keys reach nested ones (pretrain.num_workers=2)",
    )
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)"
    )


def connect(address: str | None) -> bool:
    """Join a cluster (`--address`, or RAY_ADDRESS as under `ray job submit`) or start a local
    Ray for this run; never a Ray that happens to run on this machine. Returns whether this call
    started a local Ray, which then ends with the process, Serve included.

    A cluster's Serve settings come from the environment of its `ray start`; a local Ray takes
    them from this process, so vitray's serving defaults are put there first.
    """
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return False
    for name, value in HIGH_THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(address="local", log_to_driver=True)
    return True
