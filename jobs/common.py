"""What every job shares: loading a config file, checking a checkpoint and connecting to Ray."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import ray

from pipelines.training import resolve_checkpoint
from vit.checkpoint import CheckpointError, read_metadata

# Serve's high-throughput mode, vitray's default: HAProxy in front of the replicas' own HTTP
# servers instead of Serve's Python proxy actor, and the replica's user code on its main event
# loop (no hop between threads). Ray reads these when a cluster's processes start, so they belong
# in the environment of `ray start` (cluster.yaml); `connect` sets them for a local Ray.
# A value already in the environment wins (`=0` brings back the Python proxy).
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

Config = TypeVar("Config")


def load_config(path: str, smoke: bool, overrides: list[str], expected: type[Config]) -> Config:
    """Import a config file, call its `get_config(smoke)`, apply `key=value` overrides.

    A file that makes another job's config (`jobs.tune --config configs/pretrain_demo.py`) is
    refused here, naming both types, not met as an AttributeError once Ray has started.
    """
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise SystemExit(f"config file {path} defines no get_config(smoke)")
    config = module.get_config(smoke=smoke)
    if not isinstance(config, expected):
        raise SystemExit(
            f"config file {path} makes a {type(config).__name__}; this job takes a "
            f"{expected.__name__}"
        )
    changes: dict[str, Any] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        _collect(config, key.split("."), text, item, changes)
    return _rebuild(config, changes, overrides)


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A parsed override of a whole field, told apart from the nested changes of a dataclass
    field (a dict field's value is a dict too)."""

    value: Any


def _collect(config: Any, path: list[str], text: str, item: str, changes: dict[str, Any]) -> None:
    """Parse the override at a dotted path (`pretrain.num_workers`) into `changes`, a tree of
    the config's nested dataclasses."""
    name, rest = path[0], path[1:]
    fields = (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else ()
    )
    if name not in fields:  # a property such as `grid_size` is not a field
        raise SystemExit(f"--set {item}: {type(config).__name__} has no field {name!r}")
    current = getattr(config, name)
    if not rest:
        changes[name] = _Whole(_parse(text, current, _field_type(config, name, current), item))
        return
    nested = changes.setdefault(name, {})
    if isinstance(nested, _Whole):
        raise SystemExit(f"--set {item}: an earlier --set replaces {name} whole")
    _collect(current, rest, text, item, nested)


def _rebuild(config: Any, changes: dict[str, Any], items: list[str], prefix: str = "") -> Any:
    """The config with `changes`, each frozen dataclass rebuilt once with all of its own: its
    checks (`__post_init__`) see them together, so settings checked against each other
    (`steps` and `warmup_steps`) may be given in any order."""
    values = {
        name: change.value
        if isinstance(change, _Whole)
        else _rebuild(getattr(config, name), change, items, f"{prefix}{name}.")
        for name, change in changes.items()
    }
    try:
        return dataclasses.replace(config, **values)
    except ValueError as error:  # the config's own checks
        own = [item for item in items if item.startswith(prefix)]
        raise SystemExit(f"--set {' '.join(own)}: {error}") from None


def _field_type(config: Any, name: str, current: Any) -> Any:
    """The field's declared type; the current value's type where the annotations cannot be
    resolved (a config class whose annotations name types imported only for type checkers)."""
    try:
        return typing.get_type_hints(type(config))[name]
    except (NameError, TypeError, KeyError):
        return Any if current is None else type(current)


def _parse(text: str, current: Any, hint: Any, item: str) -> Any:
    """Parse an override as a Python literal and check it against the field's type, so that
    `1e3` for an int, `0` for a bool or `("digits")` (a str) for a tuple fail here, not as
    a puzzling error (or a run over the letters d, i, g...) deep inside a job.

    Strings stay strings where the field takes a string; an int is accepted for a float (as
    Python does), never a bool for an int, nor an integral float such as `1e3` for an int
    (write 1000). A list becomes a tuple for a tuple field, and a bare element of a
    `tuple[X, ...]` field a 1-tuple. None is accepted where the field is Optional or the config
    has it None.
    """
    key = item.partition("=")[0]
    if hint is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: Literal["cosine", "linear"], `str | None`, a dataset name
    if value is None and current is None:
        return None
    candidates = [value]
    if isinstance(value, list):  # [0.9, 0.95] for a tuple field
        candidates.append(tuple(value))
    if _tuple_element(hint) is not None:  # a bare element of a tuple[X, ...] field
        candidates.append((value,))
    for candidate in candidates:
        if _conforms(candidate, hint):
            return candidate
    raise SystemExit(
        f"--set {item}: {key} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})"
    )


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint``: plain classes, Optional and unions, Literal, tuples
    (fixed or ``...``), dicts. Other generics are checked by their container alone."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return not args or (
            len(args) == len(value)
            and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin is dict:
        return isinstance(value, dict) and (
            not args
            or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
        )
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _tuple_element(hint: Any) -> Any:
    """X for a ``tuple[X, ...]`` field, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _type_name(hint: Any) -> str:
    """`int`, `tuple[float, ...]`, `Literal['cosine', 'linear']`, `ViTConfig`."""
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _config_file(path: str) -> str:
    """argparse type of --config: a missing file is a usage error (exit 2), not a traceback."""
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such config file: {path}")
    return path


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    set_examples: tuple[str, str],
    default_config: str | None = None,
) -> None:
    """--config, --smoke, --set and --address. --config is required unless the job has a
    ``default_config``. ``set_examples`` are a top-level and a dotted override that this job's
    configs take (`learning_rate=3e-4`, `model.depth=4`): another job's fields would be refused."""
    parser.add_argument(
        "--config",
        type=_config_file,
        default=default_config,
        required=default_config is None,
        help="config file with get_config(smoke)"
        + (" (default: %(default)s)" if default_config else ""),
    )
    parser.add_argument("--smoke", action="store_true", help="shrink the run to a smoke test")
    top, nested = set_examples
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. {top}; dotted keys reach nested ones, e.g. {nested} "
        "(repeatable)",
    )
    add_address_argument(parser)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """--address, as `ray job submit` passes it (RAY_ADDRESS) when not given."""
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray for this run)",
    )


def checked_checkpoint(path: str, job: str) -> Path:
    """The vit checkpoint directory behind `path` (a checkpoint, a Ray Train checkpoint holding
    one, or a run's folder: its latest; see `resolve_checkpoint`), read before Ray starts.

    A missing or broken checkpoint ends the job with a one-line reason (exit 1), not a traceback
    once Ray has started.
    """
    try:
        directory = resolve_checkpoint(path)
        read_metadata(directory)
    except CheckpointError as error:
        raise SystemExit(f"[{job}] {error}") from None
    return directory


def connect(address: str | None) -> bool:
    """Join a cluster (`--address`, or RAY_ADDRESS as under `ray job submit`) or start a local
    Ray for this run; never a Ray that happens to run on this machine. Returns whether this call
    started a local Ray, which then ends with the process, Serve included.

    A cluster's Serve settings come from the environment of its `ray start`; a local Ray takes
    them from this process, so vitray's serving defaults are put there first.
    """
    if ray.is_initialized():
        return False
    local = address is None
    if local:
        for name, value in HIGH_THROUGHPUT_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(address="local" if local else address, log_to_driver=True)
    _exit_on_sigterm()
    return local


def _exit_on_sigterm() -> None:
    """Make SIGTERM, which `ray job stop` sends, a `SystemExit(15)` again.

    `ray.init` installs Ray's own handler, which ends the process on the spot: the `finally`
    blocks that mark the job's MLflow runs KILLED and take its endpoint down would never run.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
