"""Aspect-ratio bucketing as pure functions of sizes (DESIGN §5).

A bucket is a (width, height) with both sides multiples of 64 inside [min, max] and at most resolution² pixels.
Each image goes to the bucket whose aspect ratio is closest (in log space); it is resized to cover the bucket and
centre-cropped. Without upscaling, an image smaller than its bucket gets a bucket of its own size, rounded down.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw

STEP = 64
Size = tuple[int, int]


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int = STEP) -> list[Size]:
    """For every width, the tallest height that keeps the area within resolution² (kohya's rule)."""
    budget = resolution * resolution
    buckets = set()
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (budget // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(b for b in buckets if b[0] * b[1] <= budget and min_reso <= min(b) and max(b) <= max_reso)


def aspect_error(w: int, h: int, bucket: Size) -> float:
    return abs(math.log(bucket[0] / bucket[1]) - math.log(w / h))


def nearest_bucket(w: int, h: int, buckets: Sequence[Size]) -> Size:
    return min(buckets, key=lambda b: (aspect_error(w, h, b), -b[0] * b[1]))


def bucket_for_image(w: int, h: int, buckets: Sequence[Size], no_upscale: bool = True, step: int = STEP) -> Size:
    """The bucket an image of w×h trains in."""
    bucket = nearest_bucket(w, h, buckets)
    if no_upscale and w * h < bucket[0] * bucket[1]:
        # too small for any bucket of its shape: train at its own size, sides rounded down to the step
        scale = min(1.0, math.sqrt(bucket[0] * bucket[1] / (w * h)))
        bw, bh = max(step, int(w * scale) // step * step), max(step, int(h * scale) // step * step)
        return (bw, bh)
    return bucket


def cover_crop_box(w: int, h: int, bw: int, bh: int) -> tuple[Size, tuple[int, int]]:
    """((resized w, h), (left, top)): scale to cover the bucket, then the centred bw×bh window."""
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (rw, rh), ((rw - bw) // 2, (rh - bh) // 2)


def assign_buckets(sizes: Iterable[Size], buckets: Sequence[Size], no_upscale: bool = True) -> list[Size]:
    return [bucket_for_image(w, h, buckets, no_upscale) for w, h in sizes]


def training_bucket(size: Size, resolution: int, buckets: Sequence[Size], no_upscale: bool, enable_bucket: bool) -> Size:
    """The bucket a picture trains in; without bucketing every picture is cropped to resolution²."""
    return tuple(bucket_for_image(*size, buckets, no_upscale)) if enable_bucket else (resolution, resolution)


def batches_per_epoch(views: Iterable[tuple[Size, int]], batch_size: int) -> int:
    """How many batches `bucket_batches` makes of an epoch, given each picture's (bucket, repeats)."""
    per_bucket: Counter = Counter()
    for bucket, repeats in views:
        per_bucket[tuple(bucket)] += repeats
    return sum(math.ceil(n / batch_size) for n in per_bucket.values())


def bucket_batches(assignments: Sequence[Size], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices, each from one bucket only, in a shuffled order."""
    by_bucket: dict[Size, list[int]] = {}
    for i, b in enumerate(assignments):
        by_bucket.setdefault(tuple(b), []).append(i)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def crop_preview(image: Image.Image, bucket: Size) -> Image.Image:
    """The picture with the part that is cut away dimmed and the kept window outlined."""
    (rw, rh), (left, top) = cover_crop_box(image.width, image.height, *bucket)
    sx, sy = image.width / rw, image.height / rh
    box = (left * sx, top * sy, (left + bucket[0]) * sx, (top + bucket[1]) * sy)
    preview = image.convert("RGB")
    shade = Image.new("RGB", preview.size, (0, 0, 0))
    mask = Image.new("L", preview.size, 140)
    ImageDraw.Draw(mask).rectangle(box, fill=0)
    preview = Image.composite(shade, preview, mask)
    ImageDraw.Draw(preview).rectangle(box, outline=(255, 200, 0), width=max(1, min(preview.size) // 100))
    return preview
