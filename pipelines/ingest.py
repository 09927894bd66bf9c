"""Ray Data transforms: encoded image bytes -> uint8 patch tokens, streamed to the trainers.

`image_to_tokens` is the one preprocessing function of the project: the training pipeline maps it
over Ray Data batches and serving calls it on each request, both with the checkpoint's own
`ViTConfig`, so what the model sees in production is exactly what it saw in training.

Tokens leave the CPU workers as uint8 (N, P*P*C); normalisation happens on the accelerator inside
the model, which moves 4x fewer bytes than float32 images.

Bad inputs (zero-byte, truncated, not an image, absurd dimensions) are skipped and recorded in a
`DataErrorTracker` actor shared by every map task, so a stage can report how many rows it lost and
which ones, and stop with a clear error once too large a fraction is bad.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vit.config import ViTConfig
from vit.patches import patchify

# What an uploaded or crawled file may be. Pillow would otherwise try every plugin it has,
# EPS among them, which hands the bytes to Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG and TIFF greyscale
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that turns stored pixels upright (ImageOps.exif_transpose's).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset(
    {
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    }
)


class BadImageError(ValueError):
    """The bytes are not an image this pipeline can use; the message says why."""


class DataQualityError(RuntimeError):
    """Too large a fraction of the input is unreadable: the run stops rather than train on it."""


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; evaluation always resizes and centre-crops deterministically.

    Defaults follow the Inception-style crop used to train the original ViT; small or centred
    datasets (digits, clothing) call for a milder `crop_scale` and no flip.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self) -> None:
        """Refused here, not as a division by zero inside a decoding task."""
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale needs 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio needs 0 < low <= high, got {self.crop_ratio}")


@dataclass(frozen=True)
class IngestConfig:
    """How the streaming pipeline runs; every value is a deliberate knob, not a magic number."""

    batch_size: int = 256  # rows per map task call
    concurrency: int | None = None  # decode tasks in flight; None lets Ray Data choose
    max_bad_fraction: float = 0.01  # above this fraction of bad rows the stage stops
    # A stream is judged while it runs only from this many rows on: the fraction in a first
    # batch or two is noise (a 0.5% bad rate shows 3 in 256 rows one time in seven). Every stage
    # also judges all the rows it read at the end (`check_bad_fraction`).
    min_rows_before_check: int = 20_000
    # Rejects decompression bombs before decoding; Pillow's own guard caps it at 2x its limit.
    max_image_pixels: int = 64_000_000


def image_to_tokens(
    data: bytes,
    config: ViTConfig,
    *,
    augmentation: Augmentation | None = None,
    rng: np.random.Generator | None = None,
    max_image_pixels: int = IngestConfig.max_image_pixels,
) -> np.ndarray:
    """Decode, crop/resize, convert channels and patchify one image -> uint8 (N, P*P*C).

    With `augmentation` (training) the crop and flip are random, drawn from `rng`; without it
    (evaluation and serving) the image is resized and centre-cropped as the checkpoint's
    preprocessing says. Raises `BadImageError` for anything that is not a usable image.
    """
    # Decode (JPEG: at a reduced size) large enough that the crop is still shrunk to the
    # model's size, not enlarged. A random crop may keep as little as `crop_scale[0]` of the
    # area; the centre crop keeps image_size / resize_size of the shorter side.
    grow = 1.0
    if augmentation is not None:
        grow = 1 / math.sqrt(augmentation.crop_scale[0])
    elif config.preprocessing.resize_size is not None:
        grow = max(1.0, config.preprocessing.resize_size / min(config.image_size))
    target = tuple(math.ceil(side * grow) for side in config.image_size)
    image = _decode(data, max_image_pixels, target)
    image = _to_channels(image, config.in_channels)
    height, width = config.image_size
    resample = _RESAMPLE[config.preprocessing.interpolation]
    if augmentation is None:
        image = image.resize((width, height), resample, box=_centre_box(image.size, config))
    else:
        rng = rng or np.random.default_rng()
        box = _random_box(image.size, augmentation, rng)
        image = image.resize((width, height), resample, box=box)
        if augmentation.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return patchify(pixels, config.patch_size, channels_last=True)


def _decode(data: bytes, max_pixels: int, target: tuple[int, int]) -> Image.Image:
    """Decode upright: a camera's EXIF orientation is applied, as every image viewer does."""
    if not data:
        raise BadImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(f"{width}x{height} pixels exceeds the limit of {max_pixels}")
        transpose = _ORIENTATION.get(_orientation(image))
        if transpose in _SWAPS_AXES:
            target = (target[1], target[0])  # the stored image is the upright one turned
        # JPEG can decode straight to a reduced size: far cheaper than decoding then shrinking.
        image.draft(image.mode, (target[1], target[0]))
        image.load()
        if transpose is not None:
            image = image.transpose(transpose)
    except BadImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, on opening: past 2x its limit
        # Named by the limit that refused it: Pillow's, where the configured one is higher.
        limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
        raise BadImageError(f"too many pixels to decode: more than the limit of {limit}") from None
    except Exception:  # a decoder plugin fed hostile bytes may raise anything
        raise BadImageError("not a readable image (corrupt, truncated or unknown format)") from None
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: stored upright); unreadable EXIF counts as upright."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # metadata is optional: a broken EXIF block does not spoil the pixels
        return 1


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grey (8 or 16 bits), palette and transparent images become what the model expects
    (alpha on white)."""
    if channels not in (1, 3):
        raise ValueError(f"images can feed 1 or 3 channels, not {channels}")
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's conversion clips these at 255, turning most of a 16-bit image white.
        # x/257 rounded, in integers: 4 bytes a pixel where floats took 8 (40 MP: 160 MB).
        pixels = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((pixels + 128) // 257).astype(np.uint8))
    # "transparency": a palette entry, or the one transparent colour of an RGB or grey image.
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    target = "RGB" if channels == 3 else "L"
    try:
        return image if image.mode == target else image.convert(target)
    except ValueError:  # modes Pillow cannot convert, e.g. CIELAB to grey
        raise BadImageError(f"cannot convert a {image.mode} image to {target}") from None


def _centre_box(size: tuple[int, int], config: ViTConfig) -> tuple[float, float, float, float]:
    """The source box whose resize to the model input equals resize-shorter-side + centre crop."""
    width, height = size
    resize = config.preprocessing.resize_size
    out_h, out_w = config.image_size
    if resize is None:
        return (0.0, 0.0, float(width), float(height))
    # Shorter side -> `resize` pixels, then an out_h x out_w window from the centre.
    scale = resize / min(width, height)
    box_w, box_h = min(out_w / scale, width), min(out_h / scale, height)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def _random_box(
    size: tuple[int, int], augmentation: Augmentation, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """Inception-style random resized crop. After 10 misses (a panorama, a narrow scale range)
    it takes the centre crop at the nearest allowed aspect ratio, as torchvision does, rather
    than squash the whole image."""
    width, height = size
    area = width * height
    log_ratio = (math.log(augmentation.crop_ratio[0]), math.log(augmentation.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*augmentation.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        box_w = math.sqrt(target * ratio)
        box_h = math.sqrt(target / ratio)
        if box_w <= width and box_h <= height:
            left = rng.uniform(0, width - box_w)
            top = rng.uniform(0, height - box_h)
            return (left, top, left + box_w, top + box_h)
    low, high = augmentation.crop_ratio
    box_w = min(float(width), height * high)
    box_h = min(float(height), width / low)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


@ray.remote(num_cpus=0)
class DataErrorTracker:
    """Counts rows read and rows skipped across every map task of a stage.

    The reads count every pass over the data (epochs, retried tasks) and give the bad fraction;
    the bad images themselves are reported once each, however often they were read.
    """

    def __init__(self, max_samples: int = 20) -> None:
        self.rows_read = 0
        self.bad_reads = 0
        self.bad_images: dict[str, str] = {}  # key -> why, in the order first seen
        self.max_samples = max_samples

    def record(self, rows: int, bad: list[tuple[str, str]]) -> tuple[int, int]:
        self.rows_read += rows
        self.bad_reads += len(bad)
        for key, why in bad:
            self.bad_images.setdefault(key, why)
        return self.rows_read, self.bad_reads

    def summary(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "bad_reads": self.bad_reads,
            "bad": len(self.bad_images),
            "samples": list(self.bad_images.items())[: self.max_samples],
        }


def start_error_tracker() -> ray.actor.ActorHandle:
    """A `DataErrorTracker` pinned to this driver's node.

    Left to the scheduler it may land on a worker node; when that node goes away (spot
    reclaim, an elastic run shrinking) the counts vanish and every later map task fails on the
    dead actor, so no retry of the stage can succeed. The driver's node lives as long as the job.
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DataErrorTracker.options(scheduling_strategy=here).remote()


def tokenize_batch(
    batch: dict[str, np.ndarray],
    *,
    config: ViTConfig,
    augmentation: Augmentation | None,
    ingest: IngestConfig,
    tracker: ray.actor.ActorHandle | None,
) -> dict[str, np.ndarray]:
    """Ray Data map function: rows {key, image, label} -> rows {tokens, label}, bad rows dropped."""
    keys = batch["key"]
    # Fresh entropy for every batch, so each pass over the data draws new crops and flips. A
    # seed derived from the rows would hand every image the same augmentation every epoch.
    rng = np.random.default_rng()
    tokens, labels, bad = [], [], []
    for key, data, label in zip(keys, batch["image"], batch["label"], strict=True):
        try:
            tokens.append(
                image_to_tokens(
                    data,
                    config,
                    augmentation=augmentation,
                    rng=rng,
                    max_image_pixels=ingest.max_image_pixels,
                )
            )
            labels.append(label)
        except BadImageError as error:
            bad.append((str(key), str(error)))
    if tracker is not None:
        rows, bad_total = ray.get(tracker.record.remote(len(keys), bad))
        if rows >= ingest.min_rows_before_check:
            judge_bad_fraction(rows, bad_total, bad, ingest)
    shape = (0, config.num_patches, config.patch_dim)
    return {
        "tokens": np.stack(tokens) if tokens else np.zeros(shape, np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
    }


def check_bad_fraction(tracker: ray.actor.ActorHandle, ingest: IngestConfig) -> None:
    """Raise `DataQualityError` if the rows read so far hold too many unreadable images.

    Every row counts, however few: stages that read their rows up front call it before they
    train, pretraining once its stream ends. A dataset none of whose images could be read is
    refused rather than trained on as an empty one.
    """
    summary = ray.get(tracker.summary.remote())
    judge_bad_fraction(summary["rows_read"], summary["bad_reads"], summary["samples"], ingest)


def judge_bad_fraction(
    rows: int, bad_total: int, examples: list[tuple[str, str]], ingest: IngestConfig
) -> None:
    """Raise `DataQualityError` if `bad_total` of `rows` reads is over the limit, or all of them."""
    if bad_total > ingest.max_bad_fraction * rows or (rows and bad_total == rows):
        shown = "; ".join(f"{k}: {why}" for k, why in examples[:3])
        raise DataQualityError(
            f"{bad_total} of {rows} images unreadable ({bad_total / rows:.1%}, limit "
            f"{ingest.max_bad_fraction:.1%})" + (f"; for example {shown}" if shown else "")
        )


def to_tokens(
    dataset: ray.data.Dataset,
    config: ViTConfig,
    *,
    augmentation: Augmentation | None = None,
    ingest: IngestConfig | None = None,
    tracker: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """Lazily map a {key, image, label} dataset to {tokens, label}; nothing runs until iterated."""
    ingest = ingest or IngestConfig()
    compute = None
    if ingest.concurrency is not None:
        compute = ray.data.TaskPoolStrategy(size=ingest.concurrency)
    return dataset.map_batches(
        tokenize_batch,
        batch_size=ingest.batch_size,
        batch_format="numpy",
        compute=compute,
        fn_kwargs={
            "config": config,
            "augmentation": augmentation,
            "ingest": ingest,
            "tracker": tracker,
        },
    )
