"""Convert any image source into deterministic Parquet shards plus a ``manifest.json``.

Used by `jobs/prepare.py` (the command line) and by the whole-pipeline stage runner.

The source is anything ``pipelines.datasets.read_dataset`` reads (catalog name, image folder,
Parquet, ``s3://``/``gs://`` URI); the output is a local folder or object-storage URI that
``read_dataset`` reads back with the manifest's class names.

Re-running is safe. Rows are sorted by split, then by the hash of their key, so the same input
gives byte-identical shards (in key order, a shard of a class-per-folder source would hold one or
two classes, and so would the training batches read from it). Shard names carry their content
hash, so a new shard never overwrites a different one.
Shards are written to ``_tmp/`` and moved into place, the manifest is replaced only after all its
shards exist, and stale shards are deleted only after that: an interrupted run leaves the old
manifest and its shards intact. A run whose source listing and parameters match the existing
manifest does nothing; ``--force`` rebuilds but still leaves identical files untouched.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.context import ShuffleStrategy

from pipelines.datasets import CATALOG, SplitFractions, describe, fingerprint, read_dataset
from pipelines.sources import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    ROW_SCHEMA,
    SHARD_NAME,
    SPLITS,
    DatasetInfo,
    key_units,
    read_manifest,
    resolve_uri,
)

FORMAT = "vitray-shards/1"
TMP_DIR = "_tmp"  # underscore: hidden from every reader (see sources.is_hidden)


@dataclass(frozen=True)
class PrepareConfig:
    """One conversion: ``source`` -> shards of ``rows_per_shard`` rows under ``output``.

    ``fractions`` sets the held-out shares for user sources without declared splits (catalog
    splits are fixed); ``force`` rebuilds even when the manifest says the work is done.
    """

    source: str
    output: str
    rows_per_shard: int = 10_000
    fractions: SplitFractions | None = None
    force: bool = False

    def __post_init__(self) -> None:
        """Refused here, before the job starts Ray or reads the source."""
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be positive, got {self.rows_per_shard}")


@dataclass(frozen=True)
class PrepareResult:
    """What the next stage needs: where the shards are and which data version they hold."""

    output: str
    checksum: str
    num_rows: int
    skipped: bool  # the manifest already matched the source and parameters: nothing ran
    written: tuple[str, ...]  # shard files written by this run (identical ones are kept)


def _put(fs: pafs.FileSystem, path: str, data: pa.Buffer | bytes, tmp_dir: str) -> None:
    """Write to a private temporary file, then move it over ``path`` in one step."""
    tmp = f"{tmp_dir}/{uuid.uuid4().hex}"
    fs.create_dir(tmp_dir, recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


class _ShardWriter:
    """Cuts a (split, key)-sorted row stream into per-split shards of exactly N rows."""

    def __init__(self, fs: pafs.FileSystem, root: str, rows_per_shard: int, num_classes: int):
        self.fs, self.root, self.rows_per_shard = fs, root, rows_per_shard
        self.num_classes = num_classes
        self.pending: list[pa.Table] = []
        self.split: str | None = None
        self.index: Counter[str] = Counter()
        self.counts = {s: np.zeros(num_classes, dtype=np.int64) for s in SPLITS}
        self.shards: list[dict] = []
        self.written: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Queue rows; full shards are written as soon as they are complete."""
        splits = table["split"].to_numpy(zero_copy_only=False)
        edges = [0, *(np.flatnonzero(splits[1:] != splits[:-1]) + 1).tolist(), len(splits)]
        for start, end in itertools.pairwise(edges):
            if splits[start] != self.split:
                self.flush()
                self.split = str(splits[start])
            self.pending.append(table.slice(start, end - start))
            while sum(t.num_rows for t in self.pending) >= self.rows_per_shard:
                rows = pa.concat_tables(self.pending)
                self._write(rows.slice(0, self.rows_per_shard))
                self.pending = [rows.slice(self.rows_per_shard)]

    def flush(self) -> None:
        """Write the rows still queued as the (short) last shard of the current split."""
        rows = pa.concat_tables(self.pending) if self.pending else None
        if rows is not None and rows.num_rows:
            self._write(rows)
        self.pending = []

    def _write(self, rows: pa.Table) -> None:
        assert self.split is not None
        rows = rows.cast(ROW_SCHEMA).combine_chunks()  # chunking must not change the bytes
        labels = rows["label"].to_numpy()
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels outside 0..{self.num_classes - 1} in split {self.split}")
        self.counts[self.split] += np.bincount(labels, minlength=self.num_classes)
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink)
        data = sink.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        name = f"{self.split}-{self.index[self.split]:05d}-{sha[:12]}.parquet"
        self.index[self.split] += 1
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).size != data.size:  # same name and size: same content
            _put(self.fs, path, data, f"{self.root}/{TMP_DIR}")
            self.written.append(name)
        self.shards.append(
            {
                "path": name,
                "split": self.split,
                "num_rows": rows.num_rows,
                "sha256": sha,
                "size_bytes": data.size,
            }
        )


def _intact(fs: pafs.FileSystem, root: str, manifest: dict) -> bool:
    """Every shard the manifest lists exists with its recorded size."""
    infos = fs.get_file_info([f"{root}/{s['path']}" for s in manifest["shards"]])
    return all(i.size == s["size_bytes"] for i, s in zip(infos, manifest["shards"], strict=True))


def _remove_tmp(fs: pafs.FileSystem, root: str) -> None:
    """Delete the temporary folder of ``_put`` (empty unless a write was cut short)."""
    if fs.get_file_info(f"{root}/{TMP_DIR}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{root}/{TMP_DIR}")


def _with_key_hash(batch: pa.Table) -> pa.Table:
    """Ray Data map: each row's key hash as ``order``, the order of rows within a split."""
    return batch.append_column("order", pa.array(key_units(batch["key"].to_pylist())))


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_apart(
    config: PrepareConfig,
    out_fs: pafs.FileSystem,
    root: str,
    source_filesystem: pafs.FileSystem | None,
) -> None:
    """Refuse an output that is, or lies inside, the source (or holds it). Shards and manifest
    written into an image folder would turn it into a Parquet source that hides every image
    added later; a folder inside it would be read as one more class; and a rebuild would
    delete the shards it is reading from. Paths on one filesystem kind are compared, local
    ones with links resolved (``/data`` and a link to it are the same folder).
    """
    if config.source in CATALOG and source_filesystem is None:
        return
    src_fs, src = resolve_uri(config.source, source_filesystem)
    if src_fs.type_name != out_fs.type_name:
        return
    out = root
    if isinstance(src_fs, pafs.LocalFileSystem):
        src, out = os.path.realpath(src), os.path.realpath(root)
    src, out = posixpath.normpath(src), posixpath.normpath(out)
    if _within(out, src) or _within(src, out):
        raise ValueError(
            f"output {config.output!r} and source {config.source!r} overlap: the output must "
            "be a folder outside the source, and must not contain it"
        )


def _check_classes(writer: _ShardWriter, info: DatasetInfo, source: str) -> None:
    """Refuse a dataset no classifier can learn from: no rows at all, as from class folders of
    only unsupported files (``.heic``), or rows of a single class. Caught here it is one clear
    message; written, it would fail every later stage with "no class folders" or a one-way
    classifier."""
    totals = sum(writer.counts.values())
    present = [c for c, n in zip(info.class_names, totals.tolist(), strict=True) if n]
    if len(present) >= 2:
        return
    classes = len(info.class_names)
    found = (
        f"images of only 1 of its {classes} classes ({present[0]})"
        if present
        else f"no images in any of its {classes} classes"
    )
    read = ", ".join(f".{e}" for e in IMAGE_EXTENSIONS)
    raise ValueError(
        f"{source}: {found}; a dataset needs images of at least 2 classes "
        f"(image folders are read for files ending in {read})"
    )


def prepare(
    config: PrepareConfig,
    *,
    source_filesystem: pafs.FileSystem | None = None,
    output_filesystem: pafs.FileSystem | None = None,
) -> PrepareResult:
    """Run one conversion (see the module docstring for the guarantees)."""
    fs, root = resolve_uri(config.output, output_filesystem)
    _check_apart(config, fs, root, source_filesystem)
    params = {
        "format": FORMAT,
        "rows_per_shard": config.rows_per_shard,
        "fractions": asdict(config.fractions) if config.fractions else None,
    }
    source = {"uri": config.source, "fingerprint": fingerprint(config.source, source_filesystem)}
    try:
        old = read_manifest(fs, root)
    except ValueError:  # damaged by hand or a cut-off copy: this run writes it anew
        old = None
    if (
        not config.force
        and old is not None
        and old.get("source") == source
        and old.get("params") == params
        and _intact(fs, root, old)
    ):
        return PrepareResult(config.output, old["checksum"], old["num_rows"], True, ())

    info = describe(config.source, source_filesystem)
    ds = read_dataset(config.source, filesystem=source_filesystem, fractions=config.fractions)
    # Ray 2.60's default SHUFFLE_V2 sort starts actors: 10-20 s even for ten rows on 2 cores;
    # the task-based sort takes well under a second there and scales to datasets of this kind.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.map_batches(_with_key_hash, batch_format="pyarrow").sort(["split", "order", "key"])
    ds = ds.drop_columns(["order"])
    ds.context.execution_options.preserve_order = True  # shard contents follow the sort order
    created = fs.get_file_info(root).type == pafs.FileType.NotFound
    fs.create_dir(root, recursive=True)
    writer = _ShardWriter(fs, root, config.rows_per_shard, info.num_classes)
    for batch in ds.iter_batches(batch_size=config.rows_per_shard, batch_format="pyarrow"):
        writer.add(batch)
    writer.flush()
    try:
        _check_classes(writer, info, config.source)
    except ValueError:
        for name in writer.written:  # keep the output as it was: the old manifest stays valid
            fs.delete_file(f"{root}/{name}")
        _remove_tmp(fs, root)
        if created and not fs.get_file_info(pafs.FileSelector(root)):
            fs.delete_dir(root)  # nor an empty folder where there was none (a first run)
        raise

    data = {
        "dataset": info.name,
        "class_names": list(info.class_names),
        "num_channels": info.num_channels,
        "shards": writer.shards,
    }
    checksum = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    counts = {
        s: dict(zip(info.class_names, c.tolist(), strict=True)) for s, c in writer.counts.items()
    }
    num_rows = sum(s["num_rows"] for s in writer.shards)
    manifest = {
        **data,
        "format": FORMAT,
        "checksum": checksum,
        "num_rows": num_rows,
        "counts": counts,
        "source": source,
        "params": params,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if old != manifest:
        _put(fs, f"{root}/{MANIFEST_NAME}", text.encode(), f"{root}/{TMP_DIR}")

    keep = {s["path"] for s in writer.shards}
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if SHARD_NAME.match(entry.base_name) and entry.base_name not in keep:
            fs.delete_file(entry.path)
    _remove_tmp(fs, root)
    return PrepareResult(config.output, checksum, num_rows, False, tuple(writer.written))
