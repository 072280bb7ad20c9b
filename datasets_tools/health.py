"""A health report of a dataset folder before training: what a user should fix, and where each picture trains."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_tools import buckets as B
from datasets_tools.dataset_folder import count_tags, items


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: 64 bits of 'is this pixel brighter than its right neighbour' on a 9x8 grey thumbnail."""
    a = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def mean_colour(image: Image.Image) -> tuple[float, float, float]:
    return tuple(np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
                 .reshape(-1, 3).mean(axis=0))


def look_alike(a: tuple, b: tuple, duplicate_bits: int, colour_levels: float = 24.0) -> int | None:
    """The differing bits of two pictures' (dhash, mean colour, aspect) when they look like copies of one another,
    else None: the grey difference hash alone calls any two flat pictures of different colours identical."""
    (hash_a, colour_a, aspect_a), (hash_b, colour_b, aspect_b) = a, b
    bits = hamming(hash_a, hash_b)
    same_colour = max(abs(x - y) for x, y in zip(colour_a, colour_b)) <= colour_levels
    return bits if bits <= duplicate_bits and same_colour and abs(aspect_a / aspect_b - 1) < 0.1 else None


@lru_cache(maxsize=2)
def clip_tokenizer(folder: Path):
    """The CLIP BPE tokenizer every SD text encoder uses (vocab.json, merges.txt in `folder`)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def long_captions(captions: dict[str, str], tokenizer_dir: Path, max_tokens: int) -> dict[str, int]:
    """name -> CLIP tokens, for the captions longer than `max_tokens`: the text encoder never reads their end."""
    tokenizer = clip_tokenizer(Path(tokenizer_dir))
    counts = {name: len(tokenizer(c, truncation=False).input_ids) - 2 for name, c in captions.items() if c}
    return {name: n for name, n in counts.items() if n > max_tokens}


def long_caption_warning(long: dict[str, int], max_tokens: int) -> str:
    names = sorted(long, key=lambda n: -long[n])
    longest = long[names[0]]
    fix = ("" if max_tokens >= 225 else f"; Max token length {150 if longest <= 150 else 225} (Train tab, Advanced) "
           f"reads {'them whole' if longest <= 225 else '225 of them'}")
    return (f"{len(long)} caption(s) longer than {max_tokens} CLIP tokens (the longest {longest}): SD 1.x/2.x and "
            f"SDXL never read their end ({', '.join(names[:5])}{', …' if len(names) > 5 else ''}){fix}")


@dataclass
class Report:
    count: int
    sizes: dict[str, tuple[int, int]]  # name -> (w, h)
    too_small: list[str]
    near_duplicates: list[tuple[str, str, int]]  # (a, b, differing bits of 64)
    unreadable: list[tuple[str, str]]
    captioned: int
    mean_caption_words: float
    tag_frequency: dict[str, int]
    bucket_of: dict[str, tuple[int, int]]
    bucket_fill: dict[tuple[int, int], int]
    batch_size: int
    warnings: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        if not self.count:
            return "No pictures yet."
        shorts = sorted(min(s) for s in self.sizes.values())
        lines = [f"**{self.count} pictures**, shorter side {shorts[0]}–{shorts[-1]} px "
                 f"(median {int(statistics.median(shorts))}); "
                 f"{self.captioned}/{self.count} captioned"
                 + (f", {self.mean_caption_words:.1f} words a caption on average." if self.captioned else ".")]
        lines += [f"- ⚠ {w}" for w in self.warnings]
        lines.append("\n| bucket (w×h) | pictures |\n|---|---|")
        lines += [f"| {w}×{h} | {n} |" for (w, h), n in sorted(self.bucket_fill.items())]
        return "\n".join(lines)


def report(folder: Path, resolution: int, min_reso: int = 256, max_reso: int = 1024, batch_size: int = 1,
           no_upscale: bool = True, duplicate_bits: int = 5, tokenizer_dir: Path | None = None,
           max_tokens: int = 75) -> Report:
    """What to fix before training; captions are measured in CLIP tokens when `tokenizer_dir` is given."""
    found = items(folder)
    buckets = B.make_buckets(resolution, min_reso, max_reso)
    sizes, hashes, unreadable = {}, {}, []
    for item in found:
        try:
            with Image.open(item.image) as im:
                sizes[item.image.name] = im.size
                hashes[item.image.name] = (dhash(im), mean_colour(im), im.width / im.height)
        except Exception as e:  # a report never crashes on a bad file: it names it
            unreadable.append((item.image.name, str(e) or type(e).__name__))
    small = sorted((n for n, (w, h) in sizes.items() if min(w, h) < resolution // 2), key=lambda n: min(sizes[n]))
    names = sorted(hashes)
    pairs = [(a, b, look_alike(hashes[a], hashes[b], duplicate_bits)) for i, a in enumerate(names)
             for b in names[i + 1:]]
    dupes = [(a, b, bits) for a, b, bits in pairs if bits is not None]
    captions = {i.image.name: i.caption for i in found}
    tags = count_tags(captions.values())
    bucket_of = {n: B.bucket_for_image(w, h, buckets, no_upscale) for n, (w, h) in sizes.items()}
    fill: dict[tuple[int, int], int] = {}
    for b in bucket_of.values():
        fill[b] = fill.get(b, 0) + 1
    written = [len(c.split()) for c in captions.values() if c]  # the words of the captions there are
    r = Report(len(found), sizes, small, dupes, unreadable, len(written),
               statistics.mean(written) if written else 0.0, tags, bucket_of, fill, batch_size)
    if small:
        r.warnings.append(f"{len(small)} picture(s) smaller than half the training resolution ({resolution} px), "
                          "the smallest first: " + ", ".join(small[:5]) + (", …" if len(small) > 5 else ""))
    for a, b, bits in dupes:
        r.warnings.append(f"{a} and {b} look nearly identical ({bits}/64 bits differ)")
    for name, why in unreadable:
        r.warnings.append(f"{name} cannot be read ({why}); it will be skipped")
    if r.captioned < r.count:
        r.warnings.append(f"{r.count - r.captioned} picture(s) have no caption")
    if tokenizer_dir and (long := long_captions(captions, tokenizer_dir, max_tokens)):
        r.warnings.append(long_caption_warning(long, max_tokens))
    for b, n in sorted(fill.items()):
        if n < batch_size:
            r.warnings.append(f"bucket {b[0]}×{b[1]} holds {n} picture(s), fewer than the batch size {batch_size}: "
                              "its batches will be smaller")
    return r
