"""The training set: images with captions, in aspect-ratio buckets, drawn as batches of one bucket at a time.

The order of every epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted one would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets_tools.buckets import bucket_batches, cover_crop_box, make_buckets, training_bucket
from datasets_tools import dataset_folder
from datasets_tools.dataset_folder import CAPTION_SUFFIXES, count_tags, split_tags



@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # original (w, h)
    bucket: tuple[int, int]  # training (w, h)


class DatasetError(ValueError):
    pass


def scan(folder: Path, caption_extension: str = ".txt") -> list[tuple[Path, str, int | None]]:
    """(image, caption, repeats or None) for the images in `folder` and in kohya `N_name` sub-folders, read by the
    dataset tools' one reader; `caption_extension` is tried first, then the other caption suffixes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"train_data_dir {folder} is not a folder")
    suffixes = (caption_extension,) + tuple(s for s in CAPTION_SUFFIXES if s != caption_extension)
    return [(item.image, item.caption, item.repeats) for item in dataset_folder.items(folder, suffixes)]


def build_items(found, resolution: int, min_reso: int, max_reso: int, no_upscale: bool, repeats: int,
                enable_bucket: bool = True) -> tuple[list[Item], list[str]]:
    """Items with their buckets, and a message for each image that could not be read (it is skipped)."""
    buckets = make_buckets(resolution, min_reso, max_reso) if enable_bucket else [(resolution, resolution)]
    items, skipped = [], []
    for path, caption, own_repeats in found:
        try:
            with Image.open(path) as im:
                w, h = dataset_folder.oriented_size(im)
        except Exception as e:  # a broken file must not stop the run: name it and go on
            skipped.append(f"{path.name}: {str(e).replace(f' {str(path)!r}', '').replace(str(path), path.name)}")
            continue
        bucket = training_bucket((w, h), resolution, buckets, no_upscale, enable_bucket)
        items.append(Item(path, caption, own_repeats or repeats, (w, h), bucket))
    if not items:
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise DatasetError(f"none of the {len(skipped)} picture(s) could be read ({'; '.join(skipped[:3])}{more})"
                           if skipped else "no pictures in the dataset")
    return items, skipped


def load_pixels(item: Item, flip: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image resized to cover its bucket and centre-cropped: [3, h, w] in [-1, 1], and the crop's (top, left)."""
    with Image.open(item.path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB") if im.mode != "RGBA" else _flatten(im)
        bw, bh = item.bucket
        (rw, rh), (left, top) = cover_crop_box(im.width, im.height, bw, bh)
        im = im.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))
    if flip:
        im = ImageOps.mirror(im)
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (top, left)


def _flatten(im: Image.Image) -> Image.Image:
    background = Image.new("RGB", im.size, (255, 255, 255))
    background.paste(im, mask=im.getchannel("A"))
    return background


def epoch_batches(items: list[Item], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of item indices for one epoch: each item `repeats` times, never two bucket sizes in a batch."""
    slots = [i for i, item in enumerate(items) for _ in range(item.repeats)]
    batches = bucket_batches([items[i].bucket for i in slots], batch_size, random.Random(f"{seed}/{epoch}"))
    return [[slots[k] for k in batch] for batch in batches]


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's share; every process gets the same number of batches."""
    usable = len(batches) // world * world
    return batches[rank:usable:world]


def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout: float, rng: random.Random,
                    tag_dropout: float = 0.0) -> str:
    """kohya's caption augmentation: drop the whole caption with probability `dropout`, else shuffle the
    comma-separated tags after the first `keep_tokens`, then leave each of those out with probability
    `tag_dropout` (sd-scripts' order of random draws)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle and not tag_dropout:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(tail)
    if tag_dropout:
        tail = [t for t in tail if rng.random() >= tag_dropout]
    return ", ".join(head + tail)


def by_folder(items: list[Item]) -> dict[str, list[Item]]:
    """The items grouped by the folder their image lies in (kohya's `N_name` sub-folders, or the dataset's own)."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.path.parent.name, []).append(item)
    return groups


def tag_frequency(items: list[Item]) -> dict[str, int]:
    return count_tags(item.caption for item in items)
