"""Data sources on a real local Ray: catalog sets, image folders, Parquet, and S3 (moto server)."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray.data
from PIL import Image

from pipelines import sources
from pipelines.datasets import (
    DatasetInfo,
    DatasetNotInstalledError,
    SplitFractions,
    describe,
    fingerprint,
    read_dataset,
    split_sizes,
)
from pipelines.ingest import IngestConfig, image_to_tokens, to_tokens
from pipelines.sources import ROW_SCHEMA
from vit import ViTConfig

if TYPE_CHECKING:
    from conftest import S3Server

# moto first: Ray workers inherit the AWS_* variables only if they exist when Ray starts.
pytestmark = pytest.mark.usefixtures("moto_s3", "ray_local")

TUXPAINT_COUNTS = {
    "animals": 146,
    "food": 67,
    "household": 33,
    "plants": 39,
    "town": 78,
    "vehicles": 34,
}

Rows = dict[str, tuple[bytes, int, str]]


def rows(ds: ray.data.Dataset) -> Rows:
    """key -> (image bytes, label, split), checking the schema every source promises."""
    assert ds.schema().base_schema == ROW_SCHEMA
    taken = ds.take_all()
    out = {r["key"]: (r["image"], r["label"], r["split"]) for r in taken}
    assert len(out) == len(taken), "keys must be unique"
    return out


def catalog(name: str) -> DatasetInfo:
    """``describe`` a catalog set, skipping (with the install command) where it is absent."""
    try:
        return describe(name)
    except DatasetNotInstalledError as err:
        pytest.skip(str(err))


def decode(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


def grey_png() -> bytes:
    """A small valid greyscale PNG."""
    png = io.BytesIO()
    Image.new("L", (8, 8), 128).save(png, format="PNG")
    return png.getvalue()


def test_fashion_mnist_has_official_splits_and_real_class_names() -> None:
    info = catalog("fashion-mnist")
    assert info.class_names[:2] == ("T-shirt/top", "Trouser")
    assert info.class_names[-1] == "Ankle boot" and info.num_channels == 1
    sizes = info.split_sizes
    assert sizes is not None
    assert sizes["train"] + sizes["dev"] == 60_000 and sizes["test"] == 10_000
    assert 0.015 < sizes["dev"] / 60_000 < 0.025  # 2% held out of train
    test = rows(read_dataset("fashion-mnist", "test"))
    assert len(test) == 10_000
    assert all(k.startswith("fashion-mnist/test/") and v[2] == "test" for k, v in test.items())
    image = decode(test["fashion-mnist/test/00000"][0])
    assert image.size == (28, 28) and image.mode == "L"


def test_mnist_5k_has_500_per_class() -> None:
    info = catalog("mnist-5k")
    assert info.split_sizes is not None and sum(info.split_sizes.values()) == 5000
    labels = read_dataset("mnist-5k").select_columns(["label"]).to_pandas()["label"]
    assert Counter(labels.tolist()) == dict.fromkeys(range(10), 500)


def test_digits_splits_are_fixed_disjoint_and_dev_comes_from_train() -> None:
    info = catalog("digits")
    first, second = rows(read_dataset("digits")), rows(read_dataset("digits"))
    assert first == second and len(first) == 1797
    splits = Counter(split for _, _, split in first.values())
    assert dict(splits) == info.split_sizes
    assert 0.15 < splits["test"] / 1797 < 0.25 and 0.07 < splits["dev"] / 1437 < 0.13
    dev = rows(read_dataset("digits", "dev"))
    assert dev == {k: v for k, v in first.items() if v[2] == "dev"}
    expected = pytest.importorskip("sklearn.datasets").load_digits().images[0] * 255 / 16
    assert np.array_equal(np.asarray(decode(first["digits/0000"][0])), np.rint(expected))


def test_catalog_rows_come_in_key_hash_order_not_class_by_class() -> None:
    """mnist-5k's file lists its images class by class; streamed that way, a trainer's shuffle
    buffer would hold one or two classes at a time."""
    labels = [row["label"] for row in read_dataset("mnist-5k", "train").take(300)]
    assert len(set(labels)) == 10


def test_tuxpaint_six_classes_composited_on_white() -> None:
    info = catalog("tuxpaint")
    assert dict(zip(info.class_names, range(6), strict=True)) == {
        c: i for i, c in enumerate(TUXPAINT_COUNTS)
    }
    assert info.num_channels == 3 and info.split_sizes is not None
    data = rows(read_dataset("tuxpaint"))
    counts = Counter(info.class_names[label] for _, label, _ in data.values())
    assert counts == TUXPAINT_COUNTS
    assert Counter(s for _, _, s in data.values()) == info.split_sizes
    assert not any(k.endswith(("_mirror.png", "_flip.png")) for k in data)
    # The stamps are transparent PNGs; the model sees them on white, in RGB.
    config = ViTConfig(image_size=32, patch_size=8, num_classes=6)
    for key in sorted(data)[:5]:
        assert decode(data[key][0]).mode in ("RGBA", "LA", "P")
        tokens = image_to_tokens(data[key][0], config)
        assert tokens.shape == (16, 8 * 8 * 3)
        assert tuple(tokens[0, :3]) == (255, 255, 255)  # the transparent corner


def test_folder_and_s3_sources_yield_the_same_rows(digits_folder: Path, moto_s3: S3Server) -> None:
    local = rows(read_dataset(str(digits_folder)))
    assert describe(str(digits_folder)) == DatasetInfo(
        "digits-folder", ("seven", "three", "zero"), 1
    )
    assert len(local) == 26  # 24 digits + the zero-byte and the corrupt file, nothing else
    assert local["three/empty.png"][0] == b""
    assert local["seven/corrupt.png"][1] == 0
    assert local["zero/scans/zero_6.png"][1] == 2
    assert {s for _, _, s in local.values()} == {"train", "dev", "test"}
    labels = [row["label"] for row in read_dataset(str(digits_folder)).take_all()]
    assert sum(a != b for a, b in itertools.pairwise(labels)) > 8  # classes mixed, not in a row

    uri = moto_s3.upload(digits_folder, "folders/digits")
    assert rows(read_dataset(uri)) == local  # endpoint from AWS_ENDPOINT_URL
    assert rows(read_dataset(uri, filesystem=moto_s3.filesystem)) == local
    assert describe(uri).class_names == ("seven", "three", "zero")
    test_only = rows(read_dataset(uri, "test", filesystem=moto_s3.filesystem))
    assert test_only == {k: v for k, v in local.items() if v[2] == "test"}


def test_hidden_files_are_skipped_at_any_depth_and_camera_names_kept(tmp_path: Path) -> None:
    """macOS leaves ``._name.png`` beside every copied file, tools leave ``.cache/`` folders, in
    nested folders as much as in class folders; cameras name Adobe RGB photos ``_DSC0001.JPG``."""
    png = grey_png()
    images = ["cat/a.png", "cat/_DSC0001.png", "cat/sub/b.png", "dog/c.png"]
    hidden = ["cat/._a.png", "cat/sub/._b.png", "cat/sub/.cache/d.png", "dog/sub/_tmp/e.png"]
    for rel in images + hidden:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png)
    assert set(rows(read_dataset(str(tmp_path)))) == set(images)


def test_folder_fingerprint_follows_files_and_class_folders(tmp_path: Path) -> None:
    """An empty class folder counts: it renumbers the labels of the classes sorted after it."""
    for rel in ("cat/a.png", "dog/b.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    before = fingerprint(str(tmp_path))
    assert fingerprint(str(tmp_path)) == before
    (tmp_path / "cow").mkdir()
    with_cow = fingerprint(str(tmp_path))
    assert describe(str(tmp_path)).class_names == ("cat", "cow", "dog") and with_cow != before
    (tmp_path / "dog/c.png").write_bytes(b"x")
    assert fingerprint(str(tmp_path)) not in (before, with_cow)


def test_split_folders_beside_other_folders_are_refused(tmp_path: Path) -> None:
    """Read as classes, every image would be labelled with its split folder's name."""
    for rel in ("train/cat/a.png", "val/cat/b.png", "annotations/c.png"):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"\['train', 'val'\] beside other folders"):
        describe(str(tmp_path))


def test_a_folder_split_reads_only_its_files_and_survives_a_vanished_one(
    digits_folder: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "digits"
    shutil.copytree(digits_folder, copy)
    everything = rows(read_dataset(str(copy)))
    dev = read_dataset(str(copy), "dev")  # listed now, read when iterated
    dev_keys = sorted(k for k, v in everything.items() if v[2] == "dev")
    for key in everything:
        if key not in dev_keys[1:]:  # every file but the dev rows after the first disappears
            (copy / key).unlink()
    read = rows(dev)
    assert sorted(read) == dev_keys  # no other split's file was opened: they are gone
    assert read[dev_keys[0]][0] == b""  # the vanished dev file: a row the decoder will count
    assert all(read[k] == everything[k] for k in dev_keys[1:])


def test_a_read_error_other_than_a_missing_file_fails_the_read() -> None:
    """An unreachable object store is not a bad image: the file may be fine."""
    unreachable = pafs.S3FileSystem(
        access_key="k",
        secret_key="k",
        region="us-east-1",
        endpoint_override="http://127.0.0.1:1",  # nothing listens on port 1
        connect_timeout=1,
        request_timeout=1,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    batch = pa.table({"path": ["x.png"], "key": ["x.png"], "label": [0], "split": ["train"]})
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        next(sources._read_files(batch, fs=unreachable, root="bucket"))


def test_parquet_with_keys_yields_the_folder_rows(digits_folder: Path, tmp_path: Path) -> None:
    local = rows(read_dataset(str(digits_folder)))
    keys = sorted(local)
    table = pa.table(
        {
            "key": keys,
            "image": [local[k][0] for k in keys],
            "label": pa.array([local[k][1] for k in keys], pa.int32()),
        }
    )
    pq.write_table(table.slice(0, 10), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(10), tmp_path / "part-1.parquet")
    names = '{"class_names": ["seven", "three", "zero"]}'  # a user's manifest: names only
    (tmp_path / "manifest.json").write_text(names)
    assert rows(read_dataset(str(tmp_path))) == local  # same keys -> same hashed splits
    assert describe(str(tmp_path)).class_names == ("seven", "three", "zero")


def test_each_parquet_file_is_decoded_by_a_task_of_its_own(
    digits_folder: Path, tmp_path: Path
) -> None:
    """Fused into one map with the decoding, a file list was bundled up to the decode batch size:
    8 paths a task here, 512 in a real config, so a mid-sized dataset decoded in one task."""
    local = rows(read_dataset(str(digits_folder)))
    keys = sorted(local)
    table = pa.table({"key": keys, "image": [local[k][0] for k in keys], "label": [0] * len(keys)})
    for part in range(3):
        pq.write_table(table.slice(part * 9, 9), tmp_path / f"part-{part}.parquet")
    model = ViTConfig(image_size=16, patch_size=8, width=32, depth=1, mlp_dim=32, num_heads=2)
    ingest = IngestConfig(batch_size=8, max_bad_fraction=0.5)  # each file has 9 rows
    tokens = to_tokens(read_dataset(str(tmp_path)), model, ingest=ingest).materialize()
    assert tokens.num_blocks() == 3
    assert tokens.count() == 24  # 26 files less the empty and the corrupt one


def test_keyless_hugging_face_parquet(tmp_path: Path) -> None:
    blobs = [bytes([i]) * (i + 1) for i in range(12)]
    features = '{"info": {"features": {"label": {"_type": "ClassLabel", "names": ["a", "b"]}}}}'
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)]),
            "label": [i % 2 for i in range(12)],
            "split": ["train"] * 8 + ["validation"] * 2 + ["test"] * 2,
        }
    ).replace_schema_metadata({"huggingface": features})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=5)
    source = str(tmp_path / "data.parquet")
    assert describe(source).class_names == ("a", "b")
    data = rows(read_dataset(source))
    assert sorted(data) == sorted(f"data.parquet#{i}" for i in range(12))
    assert data["data.parquet#7"] == (blobs[7], 1, "train")
    assert data["data.parquet#8"][2] == "dev" and data["data.parquet#11"][2] == "test"
    assert set(rows(read_dataset(source, "dev"))) == {"data.parquet#8", "data.parquet#9"}


def test_hugging_face_images_stored_by_path_are_refused_naming_one(tmp_path: Path) -> None:
    """Rows whose struct holds a path but no bytes: the images are elsewhere, not corrupt."""
    images = [{"bytes": b"x", "path": "0.png"}] * 6 + [{"bytes": None, "path": "/photos/6.png"}]
    table = pa.table({"image": pa.array(images), "label": [0, 1] * 3 + [0]})
    pq.write_table(table, tmp_path / "data.parquet")
    assert describe(str(tmp_path)).class_names == ("0", "1")  # the first 5 images have bytes
    with pytest.raises(ValueError, match=r"data.parquet: images stored as paths .*'/photos/6.png'"):
        rows(read_dataset(str(tmp_path)))


@pytest.mark.parametrize("label_type", [pa.int64(), pa.string()])
def test_parquet_without_rows_is_refused_by_name(tmp_path: Path, label_type: pa.DataType) -> None:
    table = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], label_type)})
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(ValueError, match="no labelled rows to derive class names from"):
        describe(str(tmp_path))


def test_parquet_without_a_dev_split_gets_one_from_its_train_rows(tmp_path: Path) -> None:
    """Hugging Face sets often declare train and test only; dev is carved from train."""
    table = pa.table(
        {
            "image": [bytes([i % 256]) for i in range(400)],
            "label": [i % 2 for i in range(400)],
            "split": ["train"] * 300 + ["test"] * 100,
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    data = rows(read_dataset(str(tmp_path / "data.parquet")))
    splits = {key: split for key, (_, _, split) in data.items()}
    declared_test = {f"data.parquet#{i}" for i in range(300, 400)}
    assert {k for k, s in splits.items() if s == "test"} == declared_test
    dev = {k for k, s in splits.items() if s == "dev"}
    assert 15 < len(dev) < 45 and not dev & declared_test  # about a tenth of train


@pytest.mark.parametrize(
    "layout",
    [
        "{split}-00000-of-00001.parquet",
        "data/{split}-00000-of-00001.parquet",  # a Hugging Face dataset repository
        "{split}/part-0.parquet",
        "split={split}/part-0.parquet",  # Hive partitions
    ],
)
def test_parquet_files_named_by_split_keep_their_split(tmp_path: Path, layout: str) -> None:
    """Hugging Face and Hive layouts: no split column, the split in each file's path."""
    for split, start, count in (("train", 0, 300), ("test", 300, 100)):
        table = pa.table(
            {
                "key": [f"k{i}" for i in range(start, start + count)],
                "image": [bytes([i % 256]) for i in range(start, start + count)],
                "label": [i % 2 for i in range(start, start + count)],
            }
        )
        path = tmp_path / layout.format(split=split)
        path.parent.mkdir(exist_ok=True)
        pq.write_table(table, path)
    assert describe(str(tmp_path)).class_names == ("0", "1")
    splits = {key: split for key, (_, _, split) in rows(read_dataset(str(tmp_path))).items()}
    declared_test = {f"k{i}" for i in range(300, 400)}
    assert {k for k, s in splits.items() if s == "test"} == declared_test
    dev = {k for k, s in splits.items() if s == "dev"}
    assert 15 < len(dev) < 45 and not dev & declared_test  # carved from train only
    assert set(rows(read_dataset(str(tmp_path), "test"))) == declared_test
    assert set(rows(read_dataset(str(tmp_path), "dev"))) == dev


def test_unknown_split_values_are_named_in_the_error(tmp_path: Path) -> None:
    table = pa.table({"image": [b"x", b"y"], "label": [0, 1], "split": ["train", "holdout"]})
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(ValueError, match="split 'holdout' is not one of"):
        read_dataset(str(tmp_path / "data.parquet"))


def test_string_labels_without_manifest_become_sorted_class_names(tmp_path: Path) -> None:
    pq.write_table(
        pa.table(
            {
                "key": ["k0", "k1", "k2"],
                "image": [b"x", b"y", b"z"],
                "label": ["tulip", "daisy", "tulip"],
            }
        ),
        tmp_path / "flowers.parquet",
    )
    assert describe(str(tmp_path)).class_names == ("daisy", "tulip")
    labels = {k: label for k, (_, label, _) in rows(read_dataset(str(tmp_path))).items()}
    assert labels == {"k0": 1, "k1": 0, "k2": 1}


@pytest.mark.parametrize(
    ("labels", "names", "bad"),
    [
        ([0, 1, -1], ["a", "b"], "-1"),  # Hugging Face's "no label" in a test split
        ([0, 1, 2], ["a", "b"], "2"),  # more labels than the manifest names
        (["a", "b", "c"], ["a", "b"], "'c'"),  # a name the manifest lacks
        ([0, 1, None], None, "None"),
        (["a", "b", None], None, "None"),  # class names derived from the others
    ],
)
def test_a_label_that_names_no_class_fails_the_read_naming_it(
    tmp_path: Path, labels: list, names: list[str] | None, bad: str
) -> None:
    """Such a row cannot be trained on; scored, it would count as a wrong prediction."""
    table = pa.table({"key": ["k0", "k1", "k2"], "image": [b"x", b"y", b"z"], "label": labels})
    pq.write_table(table, tmp_path / "data.parquet")
    if names is not None:
        (tmp_path / "manifest.json").write_text(json.dumps({"class_names": names}))
    with pytest.raises(ValueError, match=f"row 'k2' has label {bad}, none of the"):
        rows(read_dataset(str(tmp_path)))


def test_an_empty_split_file_sorted_first_leaves_the_others_to_describe(tmp_path: Path) -> None:
    """Hugging Face layout: ``data/test-...`` sorts before ``data/train-...``; an empty test file
    must not hide the train file's labels or images (grey here: one channel)."""
    png = grey_png()
    (tmp_path / "data").mkdir()
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())})
    pq.write_table(empty, tmp_path / "data" / "test-00000-of-00001.parquet")
    train = pa.table({"image": [png] * 4, "label": [0, 1, 0, 1]})
    pq.write_table(train, tmp_path / "data" / "train-00000-of-00001.parquet")
    assert describe(str(tmp_path)) == DatasetInfo(tmp_path.name, ("0", "1"), 1)


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    """pyarrow's error names no file: neither a single file given as the source nor which
    of a folder's files is broken."""
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a dataset")
    with pytest.raises(ValueError, match=r"photo.jpg: not a Parquet file"):
        describe(str(tmp_path / "photo.jpg"))
    table = pa.table({"image": [b"x", b"y"], "label": [0, 1]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    (tmp_path / "part-1.parquet").write_bytes(b"PAR1 cut off")
    with pytest.raises(ValueError, match=r"part-1.parquet: not a Parquet file"):
        describe(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "split"), [("validation.parquet", "dev"), ("test.parquet", "test")]
)
def test_a_single_parquet_file_keeps_the_split_its_name_gives(
    tmp_path: Path, name: str, split: str
) -> None:
    """Given alone, ``validation.parquet`` was hash-split into train, dev and test."""
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / name)
    local = pafs.LocalFileSystem()
    alone = sources.ParquetSource.scan(local, str(tmp_path / name))
    assert alone.files == sources.ParquetSource.scan(local, str(tmp_path)).files
    assert alone.declared_splits() == {split}


def test_a_manifest_beside_one_shard_names_its_classes_not_its_counts(tmp_path: Path) -> None:
    """The counts and checksum describe the prepared folder, not the one shard given."""
    shards = {split: f"{split}-00000-0123456789ab.parquet" for split in ("train", "test")}
    for split, shard in shards.items():
        table = pa.table({"image": [grey_png()] * 2, "label": [0, 1], "split": [split] * 2})
        pq.write_table(table, tmp_path / shard)
    counts = {"train": {"a": 1, "b": 1}, "dev": {"a": 0, "b": 0}, "test": {"a": 1, "b": 1}}
    manifest = {
        "dataset": "ab",
        "class_names": ["a", "b"],
        "num_channels": 3,
        "shards": [{"path": shard, "split": split} for split, shard in shards.items()],
        "counts": counts,
        "checksum": "0" * 64,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert split_sizes(str(tmp_path)) == {"train": 2, "dev": 0, "test": 2}
    assert fingerprint(str(tmp_path)) == "0" * 64
    one = str(tmp_path / shards["train"])
    assert describe(one) == DatasetInfo("ab", ("a", "b"), 3)  # no split sizes
    assert split_sizes(one) is None
    assert fingerprint(one) not in ("0" * 64, fingerprint(str(tmp_path / shards["test"])))


@pytest.mark.parametrize("text", ['{"class_names": ["a", ', '["a", "b"]'])
def test_a_damaged_manifest_is_named(tmp_path: Path, text: str) -> None:
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / "part-0.parquet")
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=r"manifest\.json: damaged manifest"):
        describe(str(tmp_path))


def parquet_rows(path: Path) -> pa.Table:
    """``path``'s rows as a read task yields them, without Ray: splits carved, nothing kept out."""
    read = sources._parquet_rows(
        (path.name, None),
        fs=pafs.LocalFileSystem(),
        root=str(path.parent),
        columns=["key", "image", "label"],
        label_index=None,
        num_classes=None,
        fractions=SplitFractions(),
        missing=frozenset({"dev", "test"}),
        keep=None,
    )
    return pa.concat_tables(read)


def test_integer_keys_read_as_their_text(tmp_path: Path) -> None:
    """A table's integer ids are keys like any other: ``7`` and ``"7"`` land in one split."""
    ids = list(range(40))
    for name, keys in (("ints.parquet", ids), ("text.parquet", [str(i) for i in ids])):
        table = pa.table({"key": keys, "image": [b"x"] * 40, "label": [0] * 40})
        pq.write_table(table, tmp_path / name)
    assert parquet_rows(tmp_path / "ints.parquet") == parquet_rows(tmp_path / "text.parquet")


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (["k0", None, "k2"], "column key is null in row 1"),
        ([0.5, 1.5, 2.5], "column key has type double; keys must be strings or integers"),
    ],
)
def test_a_null_or_float_key_is_refused_naming_the_file(
    tmp_path: Path, keys: list, error: str
) -> None:
    """The key decides the row's split: no stand-in for a missing one is stable."""
    table = pa.table({"key": keys, "image": [b"x"] * 3, "label": [0] * 3})
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(ValueError, match=f"data.parquet: {error}"):
        parquet_rows(tmp_path / "data.parquet")


def test_split_folders_are_honoured(split_folder: Path) -> None:
    root = split_folder
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*.*g") if not p.name.startswith(".")}
    data = rows(read_dataset(str(root), fractions=SplitFractions(dev=0.3)))
    assert set(data) == on_disk
    assert {k for k, v in data.items() if v[2] == "test"} == {
        k for k in on_disk if k.startswith("test/")
    }
    dev = {k for k, v in data.items() if v[2] == "dev"}
    assert dev and all(k.startswith("train/") for k in dev)
    assert describe(str(root)).class_names == ("seven", "three", "zero")


def test_hive_split_folders_are_splits_not_classes(tmp_path: Path) -> None:
    """Read as classes, ``split=train/`` and ``split=test/`` would label every image by split."""
    png = grey_png()
    files = [
        f"split={s}/{c}/{i}.png" for s in ("train", "test") for c in ("cat", "dog") for i in (0, 1)
    ]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png)
    assert describe(str(tmp_path)).class_names == ("cat", "dog")
    data = rows(read_dataset(str(tmp_path)))
    assert {k: v[1] for k, v in data.items()} == {f: int("/dog/" in f) for f in files}
    assert {k for k, v in data.items() if v[2] == "test"} == {f for f in files if "test" in f}


def test_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRAY_DEB_ROOT", str(tmp_path))  # as if the Debian package were absent
    with pytest.raises(DatasetNotInstalledError, match="apt-get install -y dataset-fashion-mnist"):
        describe("fashion-mnist")
    with pytest.raises(FileNotFoundError, match="neither a catalog dataset"):
        read_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split must be one of"):
        read_dataset("digits", "val")
    with pytest.raises(ValueError, match="fixed splits"):
        read_dataset("digits", fractions=SplitFractions())
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        describe(str(tmp_path / "flat"), filesystem=pafs.LocalFileSystem())
    (tmp_path / "evaluation-only" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "evaluation-only" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"split folders \['test', 'val'\] but none for"):
        describe(str(tmp_path / "evaluation-only"))  # not classes named "test" and "val"
