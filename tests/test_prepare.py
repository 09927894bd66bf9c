"""jobs/prepare.py on a real local Ray: catalog and folder sources to local and S3 (moto) shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray.data

from jobs import prepare as prepare_job
from pipelines import prepare as prepare_module
from pipelines.datasets import DatasetNotInstalledError, describe, read_dataset
from pipelines.prepare import PrepareConfig, prepare
from pipelines.sources import key_units

if TYPE_CHECKING:
    from conftest import S3Server

# moto first: Ray workers inherit the AWS_* variables only if they exist when Ray starts.
pytestmark = pytest.mark.usefixtures("moto_s3", "ray_local")


def rows(ds: ray.data.Dataset) -> dict[str, tuple[bytes, int, str]]:
    return {r["key"]: (r["image"], r["label"], r["split"]) for r in ds.take_all()}


def snapshot(root: Path) -> dict[str, int]:
    """Every file under root with its mtime in ns: proves a rerun touched nothing."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_prepare_tuxpaint_shards_and_rerun_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        info = describe("tuxpaint")
    except DatasetNotInstalledError as err:
        pytest.skip(str(err))
    out = tmp_path / "tux"
    assert prepare_job.main(["tuxpaint", str(out), "--rows-per-shard", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed["checksum"] == manifest["checksum"] and not printed["skipped"]
    assert manifest["dataset"] == "tuxpaint" and tuple(manifest["class_names"]) == info.class_names
    assert manifest["num_rows"] == 397
    per_class = {
        c: sum(manifest["counts"][s][c] for s in manifest["counts"]) for c in info.class_names
    }
    assert per_class == {
        "animals": 146,
        "food": 67,
        "household": 33,
        "plants": 39,
        "town": 78,
        "vehicles": 34,
    }
    assert {s: sum(c.values()) for s, c in manifest["counts"].items()} == info.split_sizes

    keys = []
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        table = pq.read_table(out / shard["path"])
        assert table.column_names == ["key", "image", "label", "split"]
        assert table.num_rows == shard["num_rows"] <= 64
        assert set(table["split"].to_pylist()) == {shard["split"]}
        keys += [(shard["split"], k) for k in table["key"].to_pylist()]
        if shard["split"] == "train" and shard["num_rows"] == 64:
            assert len(set(table["label"].to_pylist())) >= 4  # in key order: one or two classes
    # Deterministic content: shards in split, then key-hash order.
    assert keys == sorted(keys, key=lambda sk: (sk[0], key_units([sk[1]])[0], sk[1]))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s["path"] for s in manifest["shards"])]
    )  # no temporary files left
    assert describe(str(out)) == info

    before = snapshot(out)
    again = prepare(PrepareConfig("tuxpaint", str(out), rows_per_shard=64))
    assert again.skipped and again.checksum == manifest["checksum"]
    assert snapshot(out) == before


def test_prepare_folder_to_s3_reads_back_and_tracks_changes(
    digits_folder: Path, moto_s3: S3Server, tmp_path: Path
) -> None:
    source = tmp_path / "digits"
    pafs.copy_files(str(digits_folder), str(source))
    output = f"s3://{moto_s3.bucket}/shards/digits"
    first = prepare(PrepareConfig(str(source), output, rows_per_shard=4))
    assert first.num_rows == 26 and len(first.written) >= 7
    fs, root = moto_s3.filesystem, output.removeprefix("s3://")

    def listing() -> dict[str, int | None]:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return {i.path: i.mtime_ns for i in infos if i.type == pafs.FileType.File}

    assert describe(output).class_names == ("seven", "three", "zero")
    before = listing()
    assert prepare(PrepareConfig(str(source), output, rows_per_shard=4)).skipped
    assert listing() == before

    (source / "zero" / "zero_1.png").unlink()  # the source changes: the next run rebuilds
    second = prepare(PrepareConfig(str(source), output, rows_per_shard=4))
    assert not second.skipped and second.num_rows == 25 and second.checksum != first.checksum
    manifest = json.loads(fs.open_input_stream(f"{root}/manifest.json").read())
    assert sorted(listing()) == sorted(
        [f"{root}/manifest.json", *(f"{root}/{s['path']}" for s in manifest["shards"])]
    )  # stale shards and temporary files are gone
    assert rows(read_dataset(output)) == rows(read_dataset(str(source)))


def test_interrupted_run_leaves_the_old_manifest_valid_and_force_rewrites_nothing(
    digits_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "digits", tmp_path / "out"
    pafs.copy_files(str(digits_folder), str(source))
    first = prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    (source / "three" / "three_0.png").unlink()

    calls = []

    def dying_put(fs: pafs.FileSystem, path: str, data: object, tmp_dir: str) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while writing its second shard
        real_put(fs, path, data, tmp_dir)

    real_put = prepare_module._put
    monkeypatch.setattr(prepare_module, "_put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    monkeypatch.undo()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checksum"] == first.checksum
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert len(rows(read_dataset(str(out)))) == 26

    finished = prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    assert finished.num_rows == 25 and not (out / "_tmp").exists()

    before = snapshot(out)
    forced = prepare(PrepareConfig(str(source), str(out), rows_per_shard=5, force=True))
    assert not forced.skipped and forced.written == ()
    assert forced.checksum == finished.checksum
    assert snapshot(out) == before  # same bytes: nothing rewritten, not even the manifest

    intact = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text('{"shards": [')  # damaged: the run writes it anew
    repaired = prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    assert not repaired.skipped and repaired.written == ()  # the shards were whole
    assert (out / "manifest.json").read_text() == intact


def test_the_shards_of_an_unfinished_first_run_are_not_read_as_a_dataset(
    digits_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real_put = prepare_module._put

    def dying_put(fs: pafs.FileSystem, path: str, data: object, tmp_dir: str) -> None:
        if path.endswith("manifest.json"):
            raise KeyboardInterrupt  # killed after its shards, before the manifest
        real_put(fs, path, data, tmp_dir)

    monkeypatch.setattr(prepare_module, "_put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(str(digits_folder), str(out), rows_per_shard=5))
    monkeypatch.undo()
    assert list(out.glob("train-*.parquet"))  # the shards are there, the manifest is not
    with pytest.raises(FileNotFoundError, match=r"did not finish .* run prepare again"):
        read_dataset(str(out))
    prepare(PrepareConfig(str(digits_folder), str(out), rows_per_shard=5))
    assert len(rows(read_dataset(str(out)))) == 26


def test_cli_reports_a_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare_job.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "neither a catalog dataset" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_overlapping_a_folder_source_is_refused(
    digits_folder: Path, tmp_path: Path, where: str
) -> None:
    """Shards in the source would be read back as its images, a folder in it as a class."""
    source = tmp_path / "data" / "digits"
    pafs.copy_files(str(digits_folder), str(source))
    (tmp_path / "link").symlink_to(source)
    output = {"same": source, "inside": source / "shards", "around": tmp_path / "data"}[where]
    before = snapshot(tmp_path)
    spellings = [source, tmp_path / "data" / ".." / "data" / "digits", tmp_path / "link"]
    for spelling in spellings:
        with pytest.raises(ValueError, match="overlap"):
            prepare(PrepareConfig(str(spelling), str(output), rows_per_shard=5))
    assert snapshot(tmp_path) == before  # nothing written


def test_cli_refuses_a_source_without_readable_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / name / f"{i}.heic").write_bytes(b"\0" * 10)
    out = tmp_path / "out"
    assert prepare_job.main([str(tmp_path / "photos"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and ".png" in err and ".jpg" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists()


def test_a_source_with_images_of_one_class_is_refused_and_the_old_output_kept(
    digits_folder: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "digits", tmp_path / "out"
    pafs.copy_files(str(digits_folder), str(source))
    first = prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    before = snapshot(out)
    for name in ("three", "seven"):
        for image in (source / name).rglob("*.*"):
            image.rename(image.with_suffix(".heic"))
    with pytest.raises(
        ValueError, match=r"images of only 1 of its 3 classes \(zero\); .* at least 2"
    ):
        prepare(PrepareConfig(str(source), str(out), rows_per_shard=5))
    assert snapshot(out) == before  # the shards of the refused run are gone
    assert len(rows(read_dataset(str(out)))) == 26
    assert json.loads((out / "manifest.json").read_text())["checksum"] == first.checksum


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--dev-fraction", "1.5", "split fractions must lie in [0, 1)"),
        ("--test-fraction", "1.5", "split fractions must lie in [0, 1)"),
        ("--rows-per-shard", "0", "rows_per_shard must be positive, got 0"),
    ],
)
def test_cli_reports_a_bad_option_as_a_usage_error(
    option: str, value: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the usage line, before Ray starts (argparse's exit 2, not the job's own)."""
    with pytest.raises(SystemExit) as exit_info:
        prepare_job.main(["digits", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage:") and reason in error


def test_cli_reports_a_bad_label_read_by_a_ray_task_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hugging Face marks unlabelled rows -1; the read fails inside a Ray task, and the CLI
    must name the row, not print the worker's traceback wrapped in a RayTaskError."""
    source = tmp_path / "hf"
    source.mkdir()
    images = [b"\x89PNG" + bytes([i]) for i in range(6)]
    pq.write_table(pa.table({"image": images, "label": [0, 1, 0, 1, -1, 1]}), source / "d.parquet")
    assert prepare_job.main([str(source), str(tmp_path / "out")]) == 2
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare: error:")
    ]
    assert len(errors) == 1
    assert "'d.parquet#4' has label -1" in errors[0] and "ray::" not in errors[0]


def test_a_refused_first_run_leaves_no_output_folder(tmp_path: Path) -> None:
    """Refused, a run keeps the output as it was; for a first run, that is no folder at all."""
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        (tmp_path / "photos" / name / "0.heic").write_bytes(b"\0" * 10)
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="no images"):
        prepare(PrepareConfig(str(tmp_path / "photos"), str(out)))
    assert not out.exists()


def test_a_source_under_the_home_folder_is_prepared_in_one_folder_however_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/photos` is read by prepare as $HOME/photos: it is one location, so one folder, from
    any working directory."""
    from pipelines.pipeline import prepared_location

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = str(tmp_path / "data")
    expected = prepared_location(data, str(tmp_path / "home" / "photos"))
    for cwd in (tmp_path, tmp_path / "home"):
        monkeypatch.chdir(cwd)
        assert prepared_location(data, "~/photos") == expected
