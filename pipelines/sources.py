"""Generic image sources: class-per-folder trees and Parquet shards, local or on object storage.

Every source yields Ray Data rows of ``ROW_SCHEMA``: ``key`` (stable unique id), ``image`` (the
*encoded* file bytes, never decoded here so corrupt files still reach the decoder, which counts
them), ``label`` (index into the class names) and ``split`` ("train" | "dev" | "test").

Paths are URIs read through pyarrow filesystems, so one config runs on a laptop and on a cluster:
``/data/flowers``, ``s3://bucket/flowers`` (pyarrow honours ``AWS_ENDPOINT_URL``), ``gs://...``,
or any path together with an explicit ``pyarrow.fs.FileSystem``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from PIL import Image
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

ROW_SCHEMA = pa.schema(
    [("key", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("split", pa.string())]
)
SPLITS = ("train", "dev", "test")
# Folder and column names that users give their splits, mapped onto ours.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "dev": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
    "test": "test",
    "testing": "test",
}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm")
MANIFEST_NAME = "manifest.json"
# What a manifest says of every shard alike. Its shard list, counts and checksum describe the
# folder as a whole, so a single file given as the source keeps only these.
_SHARED_MANIFEST_KEYS = ("dataset", "class_names", "num_channels")
# The shards `jobs/prepare.py` writes; its manifest, written last, says a set of them is whole.
SHARD_NAME = re.compile(r"^(train|dev|test)-\d{5}-[0-9a-f]{12}\.parquet$")
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())  # also dictionary-encoded
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
_HIDDEN_PREFIXES = (".", "_")  # as Ray's and Hadoop's readers: .DS_Store, _SUCCESS, _tmp/


@dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs before reading any image: class names, channels, split sizes.

    ``split_sizes`` is filled only where it is cheap to know (catalog sets, prepared shards).
    """

    name: str
    class_names: tuple[str, ...]
    num_channels: int
    split_sizes: Mapping[str, int] | None = field(default=None, hash=False)

    @property
    def num_classes(self) -> int:
        """Number of classes, the classifier head's width."""
        return len(self.class_names)


@dataclass(frozen=True)
class SplitFractions:
    """Held-out fractions for sources that do not declare a split themselves.

    ``test`` is the share of all rows held out as test where the source has no test split;
    ``dev`` is the share of the remaining train rows held out for model selection (the ViT paper
    holds out 2% of large sets and 10% of small ones).
    """

    dev: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        if not (0.0 <= self.dev < 1.0 and 0.0 <= self.test < 1.0):
            raise ValueError(f"split fractions must lie in [0, 1): {self}")


def key_units(keys: Iterable[str]) -> np.ndarray:
    """Map each key to [0, 1) through sha256.

    Split membership then depends on the key alone: the same on every read, machine and Ray
    parallelism, independent of file order, and adding files never moves existing ones.
    """
    ints = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") for k in keys]
    return np.array(ints, dtype=np.uint64).astype(np.float64) / 2.0**64


def split_names(values: Iterable[str | None], where: str) -> list[str]:
    """Declared split values as vitray's names ("validation" -> "dev"), or a clear error."""
    names = []
    for value in values:
        name = SPLIT_ALIASES.get(value.lower()) if isinstance(value, str) else None
        if name is None:
            raise ValueError(f"{where}: split {value!r} is not one of {sorted(SPLIT_ALIASES)}")
        names.append(name)
    return names


def split_of_folder(name: str) -> str | None:
    """The split a folder's name gives, as split folders and Hive partitions name it:
    ``train``, ``validation``, ``split=test``."""
    return SPLIT_ALIASES.get(name.lower().removeprefix("split="))


def split_of_path(rel: str) -> str | None:
    """The split a file's path names, as Hugging Face and folder layouts do:
    ``train/part-0.parquet``, ``data/test-00000-of-00001.parquet``, ``validation.parquet``."""
    *folders, name = rel.lower().split("/")
    for folder in folders:
        if split := split_of_folder(folder):
            return split
    return SPLIT_ALIASES.get(re.split(r"[-_.]", name, maxsplit=1)[0])


def holds_parquet(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a folder is a Parquet dataset: files at its top, as `prepare` writes them, or one
    folder down where Hugging Face and Hive put them (``data/``, ``train/``, ``split=train/``).

    Only folders of those names are listed, never an image dataset's class folders: on object
    storage each listing is a request, and an image dataset may have a thousand classes.
    """

    def parquet(infos: list[pafs.FileInfo]) -> bool:
        return any(i.type == pafs.FileType.File and is_parquet(i.base_name) for i in infos)

    children = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if parquet(children):
        return True
    layout = [
        c.path
        for c in children
        if c.type == pafs.FileType.Directory
        and (c.base_name == "data" or split_of_folder(c.base_name))
    ]
    return any(parquet(fs.get_file_info(pafs.FileSelector(d))) for d in layout)


def assign_splits(
    keys: Sequence[str],
    declared: Sequence[str],
    missing: frozenset[str],
    fractions: SplitFractions,
) -> np.ndarray:
    """Final split per row: declared dev/test rows stay; train rows give up the ``missing`` splits.

    Test is carved first (``fractions.test`` of the rows), dev second (``fractions.dev`` of what
    stays in train), so dev is always a subset of the declared train rows.
    """
    return _carve(key_units(keys), declared, missing, fractions)


def _carve(
    units: np.ndarray, declared: Sequence[str], missing: frozenset[str], fractions: SplitFractions
) -> np.ndarray:
    """``assign_splits`` on the keys' hash units (callers that also order rows by them)."""
    test = fractions.test if "test" in missing else 0.0
    dev = fractions.dev if "dev" in missing else 0.0
    carved = np.where(
        units < test, "test", np.where(units < test + dev * (1.0 - test), "dev", "train")
    )
    return np.where(np.asarray(declared, dtype=object) == "train", carved, declared).astype(str)


def resolve_uri(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or ``scheme://`` URI into (filesystem, path inside that filesystem).

    An explicit ``filesystem`` wins (tests and private endpoints: ``S3FileSystem(endpoint_override
    =...)``); otherwise ``FileSystem.from_uri`` picks one, reading credentials and
    ``AWS_ENDPOINT_URL`` from the environment. Local paths become absolute, since Ray workers
    may run in another working directory.
    """
    _, sep, rest = uri.partition("://")
    if filesystem is not None and sep:
        path = rest
    elif sep:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    else:
        filesystem, path = filesystem or pafs.LocalFileSystem(), uri
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = os.path.abspath(os.path.expanduser(path))
    return filesystem, path.rstrip("/") or "/"


def is_hidden(relative: str) -> bool:
    """Files no reader of a dataset should see (``.DS_Store``, ``_SUCCESS``, our ``_tmp/``),
    at any depth: ``split=train/_temporary/``, ``cat/scans/.cache/``."""
    return any(part.startswith(_HIDDEN_PREFIXES) for part in relative.split("/"))


def is_hidden_image(relative: str) -> bool:
    """An image file no reader should see: a dot file (macOS's ``._photo.jpg`` copies of
    resource forks) or one in a hidden folder. A file name's leading underscore is no mark: the
    camera file standard (DCF) names Adobe RGB photos so, ``_DSC0001.JPG`` or ``_MG_1234.JPG``.
    """
    *folders, name = relative.split("/")
    return name.startswith(".") or is_hidden("/".join(folders))


def is_parquet(relative: str) -> bool:
    """A Parquet file a reader of the dataset should see."""
    return relative.endswith(".parquet") and not is_hidden(relative)


def _children(fs: pafs.FileSystem, path: str, kind: pafs.FileType) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == kind and not is_hidden(i.base_name))


def _listing_digest(rows: Iterable[tuple[str, int | None, int | None]]) -> str:
    """sha256 of (relative path, size, mtime) lines: a cheap change detector for a file tree."""
    digest = hashlib.sha256()
    for rel, size, mtime in sorted(rows):
        digest.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def image_channels(blobs: Iterable[bytes]) -> int:
    """1 when every sample that opens is greyscale, else 3 (decoders convert the rest to RGB).

    Only headers are parsed; samples that do not open (corrupt, empty) have no vote, and with
    no vote at all the answer is 3, the safe choice for a decoder.
    """
    modes = []
    for blob in blobs:
        try:
            modes.append(Image.open(io.BytesIO(blob)).mode)
        except Exception:  # corrupt or unknown formats are the decoder's business
            continue
    return 1 if modes and all(m in _GREY_MODES for m in modes) else 3


def open_parquet(f: pa.NativeFile, path: str) -> pq.ParquetFile:
    """``f`` as Parquet, or a ValueError naming ``path``: pyarrow's own error names no file,
    and a source may be a folder of many, or a single file that is not Parquet at all."""
    try:
        return pq.ParquetFile(f)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not a Parquet file ({err})") from err


def read_manifest(fs: pafs.FileSystem, directory: str) -> dict | None:
    """The ``manifest.json`` of a shard folder, or None where there is none.

    A damaged one (cut off by a copy, broken by a hand edit) is a ValueError naming it: the
    JSON decoder's own error names no file. It is not taken as absent: without it a prepared
    folder's shards would be read with the wrong class names, or refused as unfinished.
    """
    path = f"{directory}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        manifest = json.loads(data)
    except ValueError as err:  # not JSON, or bytes that are not text
        raise ValueError(f"{path}: damaged manifest ({err}); fix or delete it") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: damaged manifest (not a JSON object); fix or delete it")
    return manifest


def empty_rows() -> ray.data.Dataset:
    """A dataset with the row schema and no rows (a split a source cannot contain)."""
    return ray.data.from_arrow(ROW_SCHEMA.empty_table())


def _rows(
    keys: list[str],
    image: pa.Array | pa.ChunkedArray,
    labels: Sequence[int] | np.ndarray,
    splits: np.ndarray,
    keep: str | None,
) -> pa.Table:
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image": image.cast(pa.binary()),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "split": pa.array(splits),
        },
        schema=ROW_SCHEMA,
    )
    return table if keep is None else table.filter(pa.array(splits == keep))


class _ReadUnits(Datasource):
    """Independent units of a source (a block of listed files, a Parquet file): a read task each.

    Why a datasource, not paths mapped to rows: Ray Data fuses consecutive maps and bundles the
    first map's input rows up to the last map's batch size, so decoding in batches of 256 would
    read 256 *paths* per task (every file of a mid-sized dataset in one task). A read is never
    fused into a batching map, so the units keep their parallelism.
    """

    def __init__(self, name: str, read: Callable[[Any], Iterable[pa.Table]], units: list) -> None:
        super().__init__()
        self._name = name
        self._read = read
        self._units = units

    def get_name(self) -> str:
        return self._name

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        unknown = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [
            ReadTask(functools.partial(self._read, unit), unknown, ROW_SCHEMA, per_task_row_limit)
            for unit in self._units
        ]

    def dataset(self) -> ray.data.Dataset:
        # One block per unit: Ray would otherwise split them to reach its default 200 blocks.
        return ray.data.read_datasource(self, override_num_blocks=len(self._units))


# ---------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class FolderSource:
    """``root/<class>/**/<file>``, or ``root/<split>/<class>/**/<file>`` when every top folder
    is a split name (train, val/dev, test, also as a Hive partition: ``split=train``). Class
    names are the sorted class folder names.

    ``dirs`` maps each class folder (relative to root) to its label and declared split; splits
    the layout lacks (``missing``) are carved from train by key hash.
    """

    fs: pafs.FileSystem
    root: str
    name: str
    class_names: tuple[str, ...]
    dirs: tuple[tuple[str, int, str], ...]
    missing: frozenset[str]
    key_prefix: str = ""
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    exclude_suffixes: tuple[str, ...] = ()

    @classmethod
    def scan(
        cls,
        fs: pafs.FileSystem,
        root: str,
        *,
        name: str | None = None,
        class_names: Sequence[str] | None = None,
        key_prefix: str = "",
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        exclude_suffixes: tuple[str, ...] = (),
    ) -> FolderSource:
        """List the class folders (not the files) on the driver; ``class_names`` restricts and
        orders the classes (e.g. 6 of Tux Paint's 16 stamp categories)."""
        top = _children(fs, root, pafs.FileType.Directory)
        splits = {d: split_of_folder(d) for d in top}
        if len(set(splits.values()) - {None}) > 1 and not all(splits.values()):
            # Read as classes, every image would be labelled with its split's (or folder's) name.
            raise FileNotFoundError(
                f"{root}: split folders {sorted(d for d in top if splits[d])} beside other "
                f"folders {sorted(d for d in top if not splits[d])}; move the others out of the "
                "dataset's root (expected root/<split>/<class>/*.png or root/<class>/*.png)"
            )
        if top and all(splits.values()) and "train" not in splits.values():
            # Read as classes, every image would be labelled with its split's name.
            raise FileNotFoundError(
                f"{root}: split folders {sorted(top)} but none for training "
                "(expected root/train/<class>/*.png beside them)"
            )
        if top and all(splits.values()):
            per_split = {d: _children(fs, f"{root}/{d}", pafs.FileType.Directory) for d in top}
            found = sorted({c for classes in per_split.values() for c in classes})
            layout = [(f"{d}/{c}", c, splits[d]) for d in top for c in per_split[d]]
            missing = frozenset({"dev", "test"} - set(splits.values()))
        else:
            found = top
            layout = [(c, c, "train") for c in top]
            missing = frozenset({"dev", "test"})
        names = tuple(class_names) if class_names is not None else tuple(found)
        absent = sorted(set(names) - set(found))
        if not names or absent:
            raise FileNotFoundError(
                f"{root}: no class folders"
                + (f" for {absent}" if absent else "")
                + " (expected root/<class>/*.png or root/<train|test>/<class>/*.png)"
            )
        index = {c: i for i, c in enumerate(names)}
        dirs = tuple((d, index[c], s) for d, c, s in layout if c in index)
        return cls(
            fs,
            root,
            name or posixpath.basename(root),
            names,
            dirs,
            missing,
            key_prefix,
            extensions,
            exclude_suffixes,
        )

    def info(self) -> DatasetInfo:
        """Class names from the folder names; channels from a few image headers per class."""
        samples = []
        for d, _, _ in self.dirs[:5]:
            for rel, _, _ in self._files(d)[:3]:
                with self.fs.open_input_file(f"{self.root}/{d}/{rel}") as f:
                    samples.append(f.read())
        return DatasetInfo(self.name, self.class_names, image_channels(samples))

    def _files(self, directory: str) -> list[tuple[str, int | None, int | None]]:
        """(path below directory, size, mtime) of the image files ``read`` will read."""
        base = f"{self.root}/{directory}"
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        out = []
        for i in infos:
            rel = i.path[len(base) + 1 :]
            if (
                i.type == pafs.FileType.File
                and not is_hidden_image(rel)
                and rel.lower().endswith(tuple("." + e for e in self.extensions))
                and not rel.endswith(self.exclude_suffixes)
            ):
                out.append((rel, i.size, i.mtime_ns))
        return sorted(out)

    def listing(self, fractions: SplitFractions, split: str | None = None) -> pa.Table:
        """The image files of ``split`` (all when None) as rows without their bytes: key, path
        below root, label, split; in the order of their keys' hashes.

        Built on the driver from a listing of the folders that can hold ``split`` (paths only),
        so splits and labels are known before any image is read. Listed in folder order, every
        block of files would hold one or two classes, and so would the training batches drawn
        from it; in hash order each block is a fixed random sample of all classes.
        """
        keys, paths, labels, declared = [], [], [], []
        for d, label, s in self.dirs:
            if split is not None and s != split and not (s == "train" and split in self.missing):
                continue
            for rel, _, _ in self._files(d):
                keys.append(f"{self.key_prefix}{d}/{rel}")
                paths.append(f"{d}/{rel}")
                labels.append(label)
                declared.append(s)
        units = key_units(keys)  # hashed once: the splits and the order both come from them
        rows = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.int64()),
                "split": pa.array(_carve(units, declared, self.missing, fractions)),
            }
        ).take(np.argsort(units, kind="stable"))
        return rows if split is None else rows.filter(pc.equal(rows["split"], split))

    def split_sizes(self, fractions: SplitFractions) -> dict[str, int]:
        """Rows per split, as ``read`` would yield them."""
        splits = self.listing(fractions)["split"]
        return {s: pc.sum(pc.equal(splits, s)).as_py() or 0 for s in SPLITS}

    def fingerprint(self) -> str:
        """Digest of the class folders and every file's path, size and mtime: changes whenever
        the tree does. The folders count even when empty: one added renumbers the labels of
        the classes sorted after it."""
        folders = ((f"{d}/", label, None) for d, label, _ in self.dirs)
        files = (
            (f"{d}/{rel}", size, mtime)
            for d, _, _ in self.dirs
            for rel, size, mtime in self._files(d)
        )
        return _listing_digest(itertools.chain(folders, files))

    def read(self, split: str | None, fractions: SplitFractions) -> ray.data.Dataset:
        """Ray tasks read the files of ``split`` alone, in blocks of ``_files_per_block`` files.

        Only paths pass through the driver. Files assigned to other splits are never opened,
        not even those sharing a folder with the wanted ones (dev rows carved from train).
        (``ray.data.read_binary_files`` read every file of the folders that could hold the
        split, and cost seconds of planning per pass.)
        """
        rows = self.listing(fractions, split)
        if rows.num_rows == 0:
            return empty_rows()
        size = _files_per_block(rows.num_rows)
        blocks = [rows.slice(start, size) for start in range(0, rows.num_rows, size)]
        read = functools.partial(_read_files, fs=self.fs, root=self.root)
        return _ReadUnits("Folder", read, blocks).dataset()


def _files_per_block(files: int) -> int:
    """Few large blocks: each Ray task costs milliseconds to schedule, more than reading and
    decoding a few images. But four blocks per CPU of the cluster where there are files enough
    (64 a block), so every worker gets some."""
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    cpus = max(1, int(resources.get("CPU", os.cpu_count() or 1)))
    return min(512, max(64, math.ceil(files / (4 * cpus))))


def _read_files(batch: pa.Table, *, fs: pafs.FileSystem, root: str) -> Iterator[pa.Table]:
    """Listed files -> rows with their bytes.

    A file that cannot be read (gone since the listing, no permission) gets empty bytes, so the
    decoder skips and counts it like any other bad image instead of the whole read failing. Any
    other error (the object store unreachable, throttling) fails the read: the file may be fine,
    and dropping its row would lose it silently.
    """
    blobs = []
    for path in batch["path"].to_pylist():
        try:
            with fs.open_input_stream(f"{root}/{path}") as f:
                blobs.append(f.read())
        except (FileNotFoundError, PermissionError):
            blobs.append(b"")
    yield pa.table(
        {
            "key": batch["key"],
            "image": pa.array(blobs, pa.binary()),
            "label": batch["label"],
            "split": batch["split"],
        },
        schema=ROW_SCHEMA,
    )


# ---------------------------------------------------------------------------- Parquet shards


@dataclass(frozen=True)
class ParquetSource:
    """Parquet file(s) with ``image`` (binary, or a Hugging Face ``{bytes, path}`` struct) and
    ``label`` (int, or str mapped through the class names), optional ``split`` and ``key``.

    A ``manifest.json`` beside the files may give ``class_names`` (and, as ``jobs/prepare.py``
    writes it, the shard list, counts and channels); without one every ``*.parquet`` below the
    path is read and class names come from Hugging Face schema metadata or from the labels.

    A single file given as the source takes its split from its name, as it would in a folder
    (``validation.parquet`` holds dev rows). Of a manifest beside it, only what holds for every
    shard alike is used (dataset name, class names, channels): its counts, shard list and
    checksum describe the whole folder, and reported for one shard they would overstate its
    rows and let a changed shard pass for the unchanged folder.
    """

    fs: pafs.FileSystem
    root: str
    name: str
    files: tuple[tuple[str, str | None], ...]  # (path below root, split if known per file)
    schema: pa.Schema
    manifest: dict  # empty where there is none; for a single file, its shared keys only

    @classmethod
    def scan(cls, fs: pafs.FileSystem, path: str) -> ParquetSource:
        """Find the files and read one footer's schema; no row data is read."""
        is_file = fs.get_file_info(path).type == pafs.FileType.File
        root = posixpath.dirname(path) if is_file else path
        manifest = read_manifest(fs, root) or {}
        if is_file:
            base = posixpath.basename(path)
            files: tuple[tuple[str, str | None], ...] = ((base, split_of_path(base)),)
            manifest = {k: v for k, v in manifest.items() if k in _SHARED_MANIFEST_KEYS}
        elif "shards" in manifest:
            files = tuple((s["path"], s["split"]) for s in manifest["shards"])
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if any(SHARD_NAME.match(i.base_name) for i in infos):
                raise FileNotFoundError(
                    f"{path}: shards of a prepare run that did not finish (no {MANIFEST_NAME}); "
                    "run prepare again"
                )
            rels = (i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File)
            files = tuple((r, split_of_path(r)) for r in sorted(rels) if is_parquet(r))
        if not files:
            raise FileNotFoundError(f"{path}: no Parquet files")
        first = f"{root}/{files[0][0]}"
        with fs.open_input_file(first) as f:
            schema = open_parquet(f, first).schema_arrow
        if not {"image", "label"} <= set(schema.names):
            raise ValueError(f"{path}: Parquet needs columns image and label, has {schema.names}")
        name = manifest.get("dataset") or posixpath.basename(path).removesuffix(".parquet")
        return cls(fs, root, name, files, schema, manifest)

    def info(self) -> DatasetInfo:
        """From the manifest where it says; else from the first images' headers."""
        class_names = self.class_names()  # first: it names a source without rows
        channels = self.manifest.get("num_channels")
        if channels is None:
            channels = image_channels(self._first_images(5))
        return DatasetInfo(self.name, class_names, channels, self.manifest_split_sizes())

    def _first_images(self, count: int) -> list[bytes]:
        """The first ``count`` images of the first file that has rows: a split's file may be
        empty, and sorted by name a test file comes before the train file."""
        for rel, _ in self.files:
            path = f"{self.root}/{rel}"
            with self.fs.open_input_file(path) as f:
                batches = open_parquet(f, path).iter_batches(batch_size=count, columns=["image"])
                for batch in batches:
                    if batch.num_rows:
                        return _image_bytes(batch.column(0), path).to_pylist()
        return []

    def manifest_split_sizes(self) -> dict[str, int] | None:
        """Rows per split from the manifest's counts; None without them (only a read counts)."""
        counts = self.manifest.get("counts")
        return {s: sum(c.values()) for s, c in counts.items()} if counts else None

    def class_names(self) -> tuple[str, ...]:
        """Manifest names, else Hugging Face ``ClassLabel`` names, else derived from the labels
        ("0".."max" for integers, sorted values for strings; this reads the label column)."""
        names = self._named_classes()
        if names is not None:
            return names
        chunks = []
        for rel, _ in self.files:
            path = f"{self.root}/{rel}"
            with self.fs.open_input_file(path) as f:
                chunks += open_parquet(f, path).read(columns=["label"]).column(0).chunks
        # Missing labels name no class; the read refuses their rows, naming them.
        values = pa.chunked_array(chunks, self.schema.field("label").type).drop_null()
        if not len(values):  # nothing to count classes from
            raise ValueError(f"{self.root}: no labelled rows to derive class names from")
        if pa.types.is_integer(values.type):
            return tuple(str(i) for i in range(pc.max(values).as_py() + 1))
        return tuple(sorted(pc.unique(values).to_pylist()))

    def _named_classes(self) -> tuple[str, ...] | None:
        """Class names the manifest or the Hugging Face schema metadata give, without reading
        any label."""
        if "class_names" in self.manifest:
            return tuple(self.manifest["class_names"])
        hf = json.loads((self.schema.metadata or {}).get(b"huggingface", b"{}"))
        names = hf.get("info", {}).get("features", {}).get("label", {}).get("names")
        return tuple(names) if names else None

    def fingerprint(self) -> str:
        """The manifest's checksum where there is one; else the files' sizes and mtimes."""
        if "checksum" in self.manifest:
            return self.manifest["checksum"]
        infos = self.fs.get_file_info([f"{self.root}/{rel}" for rel, _ in self.files])
        return _listing_digest((i.path, i.size, i.mtime_ns) for i in infos)

    def read(self, split: str | None, fractions: SplitFractions) -> ray.data.Dataset:
        """One Ray task per file streams its record batches; shards known to hold another split
        are not opened. (``ray.data.read_parquet`` costs 4-10 s of planning per read in Ray 2.60,
        more than reading a small dataset, and cannot number the rows of keyless files.)"""
        missing = frozenset({"dev", "test"}) - self.declared_splits()
        # A train file also holds the splits carved out of it; a file of another split, only its.
        holds = {split, "train"} if split in missing else {split}
        files = [f for f in self.files if split is None or f[1] is None or f[1] in holds]
        if not files:
            return empty_rows()
        index, num_classes = None, None
        if not pa.types.is_integer(self.schema.field("label").type):
            index = {c: i for i, c in enumerate(self.class_names())}
            num_classes = len(index)
        elif (names := self._named_classes()) is not None:
            num_classes = len(names)  # integer labels checked where their names come first
        read = functools.partial(
            _parquet_rows,
            fs=self.fs,
            root=self.root,
            columns=[c for c in ("key", "image", "label", "split") if c in self.schema.names],
            label_index=index,
            num_classes=num_classes,
            fractions=fractions,
            missing=missing,
            keep=split,
        )
        return _ReadUnits("ParquetShards", read, files).dataset()

    def declared_splits(self) -> frozenset[str]:
        """The splits the files' names and the ``split`` column name: the column's from the
        manifest's counts where it has them, else read from that column alone."""
        named = frozenset(s for _, s in self.files if s is not None)
        if "split" not in self.schema.names:
            return named
        if "counts" in self.manifest:
            return named | frozenset(self.manifest["counts"])
        values: set[str | None] = set()
        for rel, _ in self.files:
            path = f"{self.root}/{rel}"
            with self.fs.open_input_file(path) as f:
                column = open_parquet(f, path).read(columns=["split"]).column(0)
            values.update(pc.unique(column).to_pylist())
        return named | frozenset(split_names(values, self.name))


def _image_bytes(column: pa.Array | pa.ChunkedArray, where: str) -> pa.Array | pa.ChunkedArray:
    """Binary image column, unwrapping Hugging Face's ``struct<bytes, path>`` image feature.

    A struct with a path but no bytes refers to a file outside the Parquet data (how Hugging
    Face keeps local images it has not embedded). It is refused, naming the path, rather than
    read as an empty image: every such row would be counted bad, for a reason that is not
    the image's.
    """
    if not pa.types.is_struct(column.type):
        return column
    images = pc.struct_field(column, "bytes")
    if column.type.get_field_index("path") >= 0:
        paths = pc.struct_field(column, "path")
        by_path = pc.and_(pc.is_null(images), pc.is_valid(paths))
        if pc.any(by_path).as_py():
            first = paths.filter(by_path)[0].as_py()
            raise ValueError(
                f"{where}: images stored as paths without their bytes (first: {first!r}); "
                "write the image bytes into the Parquet data"
            )
    return images


def _parquet_rows(
    file: tuple[str, str | None],
    *,
    fs: pafs.FileSystem,
    root: str,
    columns: list[str],
    label_index: Mapping[str, int] | None,
    num_classes: int | None,
    fractions: SplitFractions,
    missing: frozenset[str],
    keep: str | None,
) -> Iterator[pa.Table]:
    """One Parquet file (its path below root, and the split its name gives) -> rows, one record
    batch at a time.

    Keyless rows are keyed ``<file>#<row index>`` (a key column: see ``_row_keys``). A split
    column is trusted (aliases such as "validation" mapped), else the split the file's name
    gives, else train; the splits none of the data names (``missing``) are hashed out of the
    train rows. A label that is missing, negative (Hugging Face's "no label" -1), not a class
    name or past ``num_classes`` fails the read, naming it: such a row cannot be trained on, and
    scored it would count as a mistake.
    """
    rel, file_split = file
    path = f"{root}/{rel}"
    offset = 0
    with fs.open_input_file(path) as f:
        for rb in open_parquet(f, path).iter_batches(batch_size=256, columns=columns):
            if "key" in columns:
                keys = _row_keys(rb.column("key"), path, offset)
            else:
                keys = [f"{rel}#{offset + i}" for i in range(rb.num_rows)]
            offset += rb.num_rows
            labels = rb.column("label").to_pylist()
            if label_index is not None:
                labels = [label_index.get(v, -1) for v in labels]
            for i, label in enumerate(labels):
                if label is None or label < 0 or label >= (num_classes or math.inf):
                    value = rb.column("label")[i].as_py()
                    known = f"the {num_classes} classes" if num_classes else "the classes"
                    raise ValueError(
                        f"{path}: row {keys[i]!r} has label {value!r}, none of {known}"
                    )
            if "split" in columns:
                declared = split_names(rb.column("split").to_pylist(), path)
            else:
                declared = [file_split or "train"] * rb.num_rows
            splits = assign_splits(keys, declared, missing, fractions)
            images = _image_bytes(rb.column("image"), path)
            yield _rows(keys, images, labels, splits, keep)


def _row_keys(column: pa.Array, path: str, offset: int) -> list[str]:
    """A ``key`` column (of the record batch at row ``offset`` of ``path``) as string keys.

    Integer ids, a table's primary key, read as their decimal text: ``7`` and ``"7"`` are one
    key and hash to one split. Other types are refused (a float's text is not one value's,
    bytes need not be text), and so is a null key: the key decides the row's split, and a
    stand-in such as the row's position would move the row between splits when the file is
    rewritten in another order.
    """
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_integer(kind) or kind in _TEXT_TYPES):
        raise ValueError(
            f"{path}: column key has type {column.type}; keys must be strings or integers"
        )
    keys = column.cast(pa.string()).to_pylist()
    if None in keys:
        raise ValueError(
            f"{path}: column key is null in row {offset + keys.index(None)}; every row needs "
            "a key, which decides its split"
        )
    return keys
