"""Ingest transforms: exact patch tokens, channel handling, crops, and bad data accounting."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import ray
from PIL import Image

from pipelines.ingest import (
    Augmentation,
    BadImageError,
    DataErrorTracker,
    DataQualityError,
    IngestConfig,
    check_bad_fraction,
    image_to_tokens,
    to_tokens,
    tokenize_batch,
)
from vit import ViTConfig
from vit.config import Preprocessing
from vit.patches import patchify


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def config(**overrides: object) -> ViTConfig:
    fields = dict(image_size=32, patch_size=8, width=64, depth=1, mlp_dim=64, num_heads=2)
    fields.update(overrides)
    return ViTConfig(**fields)


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_tokens_equal_patchify_of_the_decoded_image() -> None:
    tokens = image_to_tokens(encode(RGB), config())
    assert tokens.dtype == np.uint8
    assert np.array_equal(tokens, patchify(RGB, 8, channels_last=True))


def test_grey_images_are_replicated_to_rgb_and_rgb_reduced_to_grey() -> None:
    grey = RGB[:, :, 0]
    tokens = image_to_tokens(encode(grey), config())
    assert np.array_equal(tokens, patchify(np.stack([grey] * 3, -1), 8, channels_last=True))
    single = image_to_tokens(encode(RGB), config(in_channels=1))
    luminance = np.asarray(Image.fromarray(RGB).convert("L"))[..., None]  # not one channel
    assert np.array_equal(single, patchify(luminance, 8, channels_last=True))


def test_transparent_pixels_are_composited_on_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    tokens = image_to_tokens(encode(rgba), config())
    assert (tokens == 255).all()


@pytest.mark.parametrize(("mode", "key"), [("RGB", (0, 0, 0)), ("L", 0), ("P", 0)])
def test_a_transparent_colour_is_composited_on_white_too(mode: str, key: object) -> None:
    """PNG and GIF mark a transparent colour (tRNS) in RGB, grey and palette images alike."""
    buffer = io.BytesIO()
    Image.new(mode, (32, 32), key).save(buffer, format="PNG", transparency=key)
    assert (image_to_tokens(buffer.getvalue(), config()) == 255).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(channels: int) -> None:
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))  # dark to bright
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # a 16-bit greyscale PNG
    tokens = image_to_tokens(buffer.getvalue(), config(in_channels=channels))
    image = tokens.reshape(4, 4, 8, 8, channels).transpose(0, 2, 1, 3, 4).reshape(32, 32, -1)
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.abs(image[..., 0].astype(int) - expected).max() <= 1


def test_centre_crop_removes_the_border_and_resize_keeps_the_aspect() -> None:
    framed = np.zeros((48, 64, 3), np.uint8)
    framed[8:40, 16:48] = 200  # a 32x32 centre square on a black frame
    cfg = config(preprocessing=Preprocessing(resize_size=32))
    # Shorter side 48 -> 32 (scale 2/3), centre 32x32 window = the central 48x48 of the source.
    tokens = image_to_tokens(encode(framed), cfg)
    central = Image.fromarray(framed).resize(
        (32, 32), Image.Resampling.BILINEAR, box=(8, 0, 56, 48)
    )
    assert np.array_equal(tokens, patchify(np.asarray(central), 8, channels_last=True))
    squashed = image_to_tokens(encode(framed), config())  # resize_size None: whole image
    assert squashed.shape == tokens.shape and not np.array_equal(squashed, tokens)


def test_a_large_jpeg_is_decoded_large_enough_for_its_centre_crop() -> None:
    """Resize 256 + centre crop 224 keeps 7/8 of the shorter side. Decoded at a reduced size
    meant for 224 px, an 896 px photo's crop would come out 196 px and be enlarged, blurring it;
    decoded at 448 px it matches a full decode closely."""
    sklearn_data = pytest.importorskip("sklearn.datasets", reason="pip install scikit-learn")
    photo = Image.fromarray(sklearn_data.load_sample_images().images[0]).resize((1344, 896))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    cfg = ViTConfig(image_size=224, patch_size=16, preprocessing=Preprocessing(resize_size=256))
    full = Image.open(buffer).convert("RGB")  # no reduced-size decoding
    box = (280.0, 56.0, 1064.0, 840.0)  # shorter side 896 -> 256, then the central 224 x 224
    reference = patchify(np.asarray(full.resize((224, 224), Image.BILINEAR, box=box)), 16,
                         channels_last=True)  # fmt: skip
    tokens = image_to_tokens(buffer.getvalue(), cfg)
    assert np.abs(tokens.astype(int) - reference.astype(int)).mean() < 1.5  # 3.1 when enlarged


# Stored pixels for each EXIF orientation, given the upright image (what a viewer shows).
STORED = {
    1: lambda up: up,
    2: lambda up: up[:, ::-1],
    3: lambda up: up[::-1, ::-1],
    4: lambda up: up[::-1],
    5: lambda up: up.transpose(1, 0, 2),
    6: lambda up: np.rot90(up, 1),  # shown after turning 90 degrees clockwise
    7: lambda up: np.rot90(up, 2).transpose(1, 0, 2),
    8: lambda up: np.rot90(up, -1),
}


@pytest.mark.parametrize("orientation", STORED)
def test_exif_orientation_is_applied_before_resizing(orientation: int) -> None:
    """A phone photo is stored turned and tagged: the model sees it upright, as viewers do.
    The model input is 16 x 32 (wide); a turned image stored 32 x 16 must not be squashed."""
    upright = RNG.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    tokens = image_to_tokens(buffer.getvalue(), config(image_size=(16, 32)))
    assert np.array_equal(tokens, patchify(upright, 8, channels_last=True))


def test_a_turned_jpeg_is_decoded_large_enough_once_upright() -> None:
    """Reduced-size JPEG decoding must ask for the stored (turned) size, else a tall photo for a
    wide model input is decoded too small and enlarged."""
    sklearn_data = pytest.importorskip("sklearn.datasets", reason="pip install scikit-learn")
    upright = Image.fromarray(sklearn_data.load_sample_images().images[0]).resize((1280, 320))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(
        buffer, format="JPEG", quality=95, exif=exif.tobytes()
    )
    cfg = config(image_size=(64, 256))
    reference = patchify(np.asarray(upright.resize((256, 64), Image.BILINEAR)), 8,
                         channels_last=True)  # fmt: skip
    tokens = image_to_tokens(buffer.getvalue(), cfg)
    assert np.abs(tokens.astype(int) - reference.astype(int)).mean() < 2.0


def test_random_augmentation_is_reproducible_from_the_generator() -> None:
    aug = Augmentation(crop_scale=(0.3, 1.0))
    a = image_to_tokens(encode(RGB), config(), augmentation=aug, rng=np.random.default_rng(1))
    b = image_to_tokens(encode(RGB), config(), augmentation=aug, rng=np.random.default_rng(1))
    c = image_to_tokens(encode(RGB), config(), augmentation=aug, rng=np.random.default_rng(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_crop_that_cannot_be_drawn_takes_the_centre_at_the_nearest_ratio() -> None:
    """A 4:1 panorama has no crop of 90-100% of its area at 3:4-4:3: after the misses the crop is
    its centre at 4:3 (torchvision's fallback), not the whole panorama squashed."""
    panorama = np.zeros((100, 400, 3), np.uint8)
    panorama[:, :120] = (255, 0, 0)
    panorama[:, 120:280] = (0, 255, 0)  # holds the 133-pixel-wide centre crop
    panorama[:, 280:] = (0, 0, 255)
    aug = Augmentation(crop_scale=(0.9, 1.0), hflip=False)
    tokens = image_to_tokens(
        encode(panorama), config(), augmentation=aug, rng=np.random.default_rng(0)
    )
    pixels = tokens.reshape(-1, 3).astype(int)
    assert (pixels[:, 1] > 200).all() and (pixels[:, [0, 2]] < 50).all()


@pytest.mark.parametrize(
    "settings",
    [{"crop_scale": (0.0, 1.0)}, {"crop_scale": (0.5, 1.5)}, {"crop_scale": (0.9, 0.5)},
     {"crop_ratio": (0.0, 1.0)}, {"crop_ratio": (2.0, 1.0)}],
)  # fmt: skip
def test_crop_settings_that_cannot_work_are_refused(settings: dict) -> None:
    [(name, value)] = settings.items()
    with pytest.raises(ValueError, match=re.escape(f", got {value}")) as refused:
        Augmentation(**settings)
    assert str(refused.value).startswith(f"{name} needs 0 < low <= high")


def test_each_pass_over_a_batch_draws_new_augmentations() -> None:
    """The same rows in a later epoch get other crops: augmentation is not frozen per image."""
    batch = {
        "key": np.array(["a", "b"]),
        "image": np.array([encode(RGB), encode(RGB[::-1])], dtype=object),
        "label": np.array([0, 1]),
    }
    kwargs = dict(
        config=config(),
        augmentation=Augmentation(crop_scale=(0.3, 1.0)),
        ingest=IngestConfig(),
        tracker=None,
    )
    first = tokenize_batch(batch, **kwargs)["tokens"]
    second = tokenize_batch(batch, **kwargs)["tokens"]
    assert first.shape == second.shape == (2, 16, 192)
    assert not np.array_equal(first, second)


def truncated_png() -> bytes:
    return encode(RGB)[:200]


def valid_pcx() -> bytes:
    """A well-formed image in a format Pillow reads but uploads may not use."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PCX")
    return buffer.getvalue()


BAD_INPUTS = {
    "empty": b"",
    "pcx, a format outside IMAGE_FORMATS": valid_pcx(),
    "truncated": truncated_png(),
    "text": b"this is not an image\n",
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_bytes_raise_bad_image_error(kind: str) -> None:
    with pytest.raises(BadImageError):
        image_to_tokens(BAD_INPUTS[kind], config())


def test_an_image_that_cannot_take_the_model_channels_is_a_bad_image() -> None:
    buffer = io.BytesIO()
    Image.new("LAB", (32, 32)).save(buffer, format="TIFF")  # Pillow cannot convert LAB to grey
    with pytest.raises(BadImageError, match="cannot convert a LAB image to L"):
        image_to_tokens(buffer.getvalue(), config(in_channels=1))


def test_oversized_images_are_refused_before_decoding() -> None:
    with pytest.raises(BadImageError, match="exceeds the limit"):
        image_to_tokens(encode(RGB), config(), max_image_pixels=32 * 31)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_named_as_one_not_as_a_corrupt_file() -> None:
    """Past twice Pillow's own limit (179 M pixels) Pillow refuses on opening; the error must
    still say the image is too large, not that it is corrupt, and name the limit that refused
    it: the configured one, or Pillow's where that is lower."""
    bomb = png_header(20_000, 10_000)
    for configured, named in ((64_000_000, 64_000_000), (10**9, 2 * Image.MAX_IMAGE_PIXELS)):
        with pytest.raises(BadImageError, match=rf"too many pixels to decode: .* of {named}$"):
            image_to_tokens(bomb, config(), max_image_pixels=configured)


def rows(good: int, bad: int) -> list[dict]:
    images = [encode(np.full((32, 32, 3), i, np.uint8)) for i in range(good)]
    broken = list(BAD_INPUTS.values())
    items = [{"key": f"good/{i}", "image": img, "label": i % 3} for i, img in enumerate(images)]
    items += [{"key": f"bad/{i}", "image": broken[i % 3], "label": 0} for i in range(bad)]
    return items


@pytest.mark.usefixtures("ray_local")
def test_ray_pipeline_skips_and_counts_corrupt_rows() -> None:
    tracker = DataErrorTracker.remote()
    dataset = ray.data.from_items(rows(good=40, bad=3))
    ingest = IngestConfig(batch_size=8, max_bad_fraction=0.2, min_rows_before_check=0)
    out = to_tokens(dataset, config(), ingest=ingest, tracker=tracker)
    for _ in range(2):  # two epochs: the same bad rows are read twice, reported once
        batches = list(out.iter_batches(batch_size=None, batch_format="numpy"))
        labels = np.concatenate([b["label"] for b in batches])
        tokens = np.concatenate([b["tokens"] for b in batches])
        assert len(labels) == 40
        assert tokens.shape == (40, 16, 192)
    summary = ray.get(tracker.summary.remote())
    assert (summary["rows_read"], summary["bad_reads"]) == (86, 6)
    assert summary["bad"] == 3
    assert sorted(key for key, _ in summary["samples"]) == ["bad/0", "bad/1", "bad/2"]


@pytest.mark.usefixtures("ray_local")
def test_a_stream_is_judged_on_many_rows_and_a_stage_on_all_it_read() -> None:
    """3 bad in 43 rows is 7%, but a stream's first rows say little about its bad rate; a stage
    that has read everything judges everything, and refuses data none of which is readable."""
    tracker = DataErrorTracker.remote()
    out = to_tokens(ray.data.from_items(rows(good=40, bad=3)), config(), tracker=tracker)
    assert out.materialize().count() == 40
    with pytest.raises(DataQualityError, match="3 of 43 images unreadable"):
        check_bad_fraction(tracker, IngestConfig())
    check_bad_fraction(tracker, IngestConfig(max_bad_fraction=0.1))
    tracker = DataErrorTracker.remote()
    out = to_tokens(ray.data.from_items(rows(good=0, bad=4)), config(), tracker=tracker)
    assert out.materialize().count() == 0
    with pytest.raises(DataQualityError, match="4 of 4 images unreadable"):
        check_bad_fraction(tracker, IngestConfig(max_bad_fraction=1.0))


@pytest.mark.usefixtures("ray_local")
def test_too_many_bad_rows_stop_the_run_with_a_clear_message() -> None:
    tracker = DataErrorTracker.remote()
    dataset = ray.data.from_items(rows(good=10, bad=10))
    ingest = IngestConfig(batch_size=5, max_bad_fraction=0.1, min_rows_before_check=10)
    out = to_tokens(dataset, config(), ingest=ingest, tracker=tracker)
    with pytest.raises(Exception, match=r"images unreadable .* limit 10.0%"):
        out.materialize()
