"""A working dataset folder: images (as PNG/JPEG) with `.txt` caption sidecars, the way kohya reads them.

File I/O lives here; the caption edits are pure functions on strings. Imports are bounded (`Limits`): a hostile
upload costs at most a stated amount of memory, disk and time, and each thing refused is named with its reason.
"""

from __future__ import annotations

import codecs
import os
import random
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_PIXELS = 64_000_000  # bigger than any camera; more is a decompression bomb
MAX_CAPTION_BYTES = 64 << 10  # CLIP reads 77 tokens x 3 chunks (~1 KB); a longer caption is cut here when read
MIN_TRAIN = 2  # pictures a held-out split must leave to train on
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # `10_name class`: 10 repeats, class text "name class"


@dataclass(frozen=True)
class Limits:
    """What one import (one call of `add_files`) takes in at most. Pictures are decoded one at a time, so memory
    is bounded by one picture of `pixels` (~450 MB for 64 MP RGBA), not by the import."""

    pictures: int = 5000  # more than any LoRA dataset
    entries: int = 20_000  # names looked at in a folder or a zip (a zip's directory is read whole: ~10 MB)
    zip_directory_bytes: int = 8 << 20
    file_bytes: int = 512 << 20  # one picture, expanded (a 64 MP 8-bit TIFF is 192 MB)
    total_bytes: int = 4 << 30  # all pictures read, expanded
    pixels: int = MAX_PIXELS  # one picture, checked from its header before decoding
    # ~37 ms a megapixel to decode and save as PNG (2 cores): 4 GP is ~2.5 min, 62 pictures at MAX_PIXELS, 330
    # phone photos of 12 MP, 4000 of 1 MP. Per import: more is added by a second import.
    total_pixels: int = 4_000_000_000
    caption_bytes: int = MAX_CAPTION_BYTES


LIMITS = Limits()
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}  # bzip2/LZMA inflate a whole block per read: unbounded


class Refused(ValueError):
    """A file or member over a limit, or one that is not what it says it is."""


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    repeats: int | None = None  # from a kohya `N_name` folder; None = the run's own


@dataclass
class AddResult:
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (name, what was done): imported, but not as given

    def to_markdown(self) -> str:
        lines = [f"Added **{len(self.added)}** picture(s)."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)}:")
            lines += [f"- `{name}`: {reason}" for name, reason in self.skipped]
        if self.notes:
            lines.append("Notes:")
            lines += [f"- `{name}`: {note}" for name, note in self.notes]
        return "\n".join(lines)


# --- captions, as pure functions of strings ---

def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger(caption: str, trigger: str, previous: str = "") -> str:
    """`trigger` first, once; `previous` (the trigger it replaces) dropped from the front."""
    tags, trigger = split_tags(caption), trigger.strip()
    if previous.strip() and tags[:1] == [previous.strip()]:
        tags = tags[1:]
    return ", ".join(([trigger] if trigger else []) + [t for t in tags if t != trigger])


def renamed(caption: str, old: str, new: str) -> str:
    """Tag `old` renamed to `new`, or removed when `new` is empty; duplicates collapse."""
    out: list[str] = []
    for t in split_tags(caption):
        t = (new.strip() if t == old.strip() else t)
        if t and t not in out:
            out.append(t)
    return ", ".join(out)


def count_tags(captions) -> dict[str, int]:
    """How many captions carry each tag."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def with_prefix_suffix(caption: str, prefix: str = "", suffix: str = "") -> str:
    """Tags added at the front / end unless already there (the trigger word stays first: use with_trigger after)."""
    tags = split_tags(caption)
    head = [t for t in split_tags(prefix) if t not in tags]
    tail = [t for t in split_tags(suffix) if t not in tags]
    return ", ".join(head + tags + tail)


def replaced(caption: str, find: str, replace: str) -> str:
    """Plain text find and replace over the whole caption."""
    return " ".join(caption.replace(find, replace).split()) if find else caption


def first_tags(caption: str, n: int) -> str:
    return ", ".join(split_tags(caption)[:n])


# --- the folder ---

def items(folder: Path, caption_suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> list[Item]:
    """The pictures of the folder and of its kohya `N_name` sub-folders, each with its caption (a kohya folder's
    class text when it has none) and its folder's repeats. The one reader of a dataset folder: the trainer, the
    health report, the Dataset tab and the command line all see what this returns."""
    out = []
    for place in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name)):
        kohya = KOHYA_FOLDER.match(place.name) if place != folder else None
        for p in sorted(place.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                caption = read_caption(p, caption_suffixes) or (kohya.group(2) if kohya else "")
                out.append(Item(p, caption, int(kohya.group(1)) if kohya else None))
    return out


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is shown: EXIF orientations 5-8 turn it a quarter."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def held_count(count: int, fraction: float) -> int:
    """How many of `count` pictures `validation_split` asks to hold out: at least one, when it is above 0."""
    return max(1, round(fraction * count)) if fraction else 0


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """The indices `validation_split` holds out of `count` pictures (`held_count` of them), chosen by the seed; none
    when fewer than MIN_TRAIN would be left to train on."""
    k = held_count(count, fraction)
    if not k or count - k < MIN_TRAIN:
        return set()
    return set(random.Random(f"{seed}/held-out").sample(range(count), k))


def read_caption(image: Path, suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> str:
    """The first sidecar that exists, in UTF-8 (with or without BOM), else cp1252, else latin-1; white space folded.
    Only its first MAX_CAPTION_BYTES are read: a longer one is cut there (far more than the text encoder reads)."""
    side = sidecar(image, suffixes)
    return read_caption_file(side)[0] if side else ""


def sidecar(image: Path, suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> Path | None:
    return next((side for side in map(image.with_suffix, suffixes) if side.is_file()), None)


def read_caption_file(path: Path, limit: int = MAX_CAPTION_BYTES) -> tuple[str, bool]:
    """The caption text of a file, and whether it was cut at `limit` bytes."""
    with path.open("rb") as f:
        return caption_text(*read_at_most(f, limit))


def read_at_most(f: IO[bytes], limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of `f`, and whether there were more."""
    raw = f.read(limit + 1)
    return raw[:limit], len(raw) > limit


def caption_text(raw: bytes, cut: bool = False) -> tuple[str, bool]:
    """Caption bytes as text (UTF-8 with or without BOM, else cp1252, else latin-1), white space folded; `cut` bytes
    may end in half a UTF-8 character, which is dropped. Returns the text and `cut`."""
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=not cut)
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    return " ".join(text.split()), cut


def set_caption(image: Path, caption: str) -> None:
    image.with_suffix(".txt").write_text(" ".join(caption.split()) + "\n", encoding="utf-8")


def tag_frequency(folder: Path) -> dict[str, int]:
    return count_tags(item.caption for item in items(folder))


def first_tag(folder: Path) -> str:
    tags = [split_tags(i.caption)[0] for i in items(folder) if split_tags(i.caption)]
    return max(set(tags), key=tags.count) if tags else ""


def apply_trigger(folder: Path, trigger: str, previous: str = "") -> int:
    for item in items(folder):
        set_caption(item.image, with_trigger(item.caption, trigger, previous))
    return len(items(folder))


def edit_all(folder: Path, edit) -> int:
    """Apply `edit(caption) -> caption` to every caption; returns how many changed."""
    changed = 0
    for item in items(folder):
        after = edit(item.caption)
        if after != item.caption:
            set_caption(item.image, after)
            changed += 1
    return changed


def rename_tag(folder: Path, old: str, new: str) -> int:
    return edit_all(folder, lambda c: renamed(c, old, new))


# --- importing: bounded by `Limits`, every refusal named ---

def add_files(paths: Sequence[Path], target: Path, background=(255, 255, 255), limits: Limits = LIMITS) -> AddResult:
    """Copy pictures, the pictures of folders and of zips into `target`; keep their captions (beside the picture,
    or uploaded with it under the same name); skip and name what cannot be read or is over `limits`. Nothing is
    written outside `target`."""
    job = _Import(target, background, limits)
    target.mkdir(parents=True, exist_ok=True)
    kinds = [(Path(p), _kind(Path(p))) for p in paths]
    pictures = [p for p, kind in kinds if kind == "picture"]
    captions, unused = _loose_captions(pictures, [p for p, kind in kinds if kind == "caption"])
    job.result.skipped += unused
    for path, kind in kinds:
        if kind != "caption" and not job.room(path.name):
            break
        if kind == "folder":
            _add_folder(path, job)
        elif kind == "zip":
            _add_zip(path, job)
        elif kind == "picture":
            caption = _file_caption(captions.get(path), job)
            _add_image(path.name, lambda p=path: _open_file(p, job), caption, target, job)
    return job.result


def pair_by_stem(pictures: Sequence[Path], captions: Sequence[Path], captioned: Sequence[Path] = (),
                 suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> tuple[dict[Path, Path], list[tuple[str, str]]]:
    """Captions uploaded apart from their pictures (Gradio keeps each upload in a folder of its own) paired by file
    name stem, `.txt` before `.caption`; `captioned` pictures have one beside them already. A stem shared by several
    pictures, or by several captions of one suffix, is not guessed at. Returns the pairs, and each caption left
    unused with the reason."""
    own = {p.stem: p for p in captioned}
    pics: dict[str, list[Path]] = {}
    for p in pictures:
        pics.setdefault(p.stem, []).append(p)
    caps: dict[str, list[Path]] = {}
    for c in sorted(captions, key=lambda c: suffixes.index(c.suffix.lower())):
        caps.setdefault(c.stem, []).append(c)
    pairs, unused = {}, []
    for stem, mine in caps.items():
        used = None
        best = [c for c in mine if c.suffix.lower() == mine[0].suffix.lower()]
        found = pics.get(stem, [])
        if not found:
            reason = (f"{own[stem].name} has its own caption beside it" if stem in own
                      else f"no picture named {stem}.* came with it")
        elif len(found) > 1:
            reason = f"{len(found)} pictures are named {stem}.*: which one it describes is unclear, so none got it"
        elif len(best) > 1:
            reason = f"{len(best)} captions are named {best[0].name}: which one is right is unclear, so none was used"
        else:
            used = pairs[found[0]] = best[0]
            reason = f"{used.name} was used for {found[0].name}"
        unused += [(c.name, reason) for c in mine if c is not used]
    return pairs, unused


@dataclass
class _Import:
    """One call of add_files: where to, and what it has taken so far against its limits."""

    target: Path
    background: tuple
    limits: Limits
    result: AddResult = field(default_factory=AddResult)
    pictures: int = 0
    bytes: int = 0
    pixels: int = 0

    def room(self, name: str) -> bool:
        """Whether another picture may come; the first time not, says so once, against `name`."""
        if self.pictures < self.limits.pictures:
            return True
        full = (f"the import's {self.limits.pictures} pictures are reached: the rest were not imported (add them "
                "in another import)")
        if (name, full) not in self.result.skipped:
            self.result.skipped.append((name, full))
        return False

    def take_picture(self) -> None:
        if self.pictures >= self.limits.pictures:
            raise Refused(f"the import's {self.limits.pictures} pictures are reached (add it in another import)")
        self.pictures += 1

    def take_bytes(self, n: int) -> None:
        if n > self.limits.file_bytes:
            raise Refused(f"{_size(n)} expanded, more than the {_size(self.limits.file_bytes)} a picture may have")
        if self.bytes + n > self.limits.total_bytes:
            raise Refused(f"the import's {_size(self.limits.total_bytes)} are spent (add it in another import)")
        self.bytes += n

    def take_pixels(self, width: int, height: int) -> None:
        if width * height > self.limits.pixels:
            raise Refused(f"{width}x{height} is too large (a decompression bomb?)")
        if self.pixels + width * height > self.limits.total_pixels:
            raise Refused(f"the import's {self.limits.total_pixels / 1e9:g} gigapixels are spent (add it in another "
                          "import)")
        self.pixels += width * height


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":  # a damaged .zip is named as a zip, not a picture
        return "zip"
    return "caption" if path.suffix.lower() in CAPTION_SUFFIXES else "picture"


def _loose_captions(pictures: list[Path], captions: list[Path]) -> tuple[dict[Path, Path], list[tuple[str, str]]]:
    """Each loose picture's caption file: beside it, else one uploaded with it under its name."""
    beside = {p: side for p in pictures if (side := sidecar(p))}
    taken = {side.resolve() for side in beside.values()}
    pairs, unused = pair_by_stem([p for p in pictures if p not in beside],
                                 [c for c in captions if c.resolve() not in taken], list(beside))
    return beside | pairs, unused


def _file_caption(side: Path | None, job: _Import) -> str:
    return _caption(side.name, lambda: read_caption_file(side, job.limits.caption_bytes), job) if side else ""


def _caption(name: str, read: Callable[[], tuple[str, bool]], job: _Import) -> str:
    """A caption's text, read at most `caption_bytes` long (noted when cut); a caption that cannot be read is named
    and the picture goes on without it."""
    try:
        text, cut = read()
    except Exception as e:  # noqa: BLE001 - one bad caption must not stop its picture
        job.result.skipped.append((name, _reason(e)))
        return ""
    if cut:
        job.result.notes.append((name, f"over {job.limits.caption_bytes >> 10} KiB: only its first "
                                       f"{job.limits.caption_bytes >> 10} KiB were kept"))
    return text


def _add_folder(folder: Path, job: _Import) -> None:
    for p in _pictures_in(folder, job):
        if not job.room(folder.name):
            return
        # kohya `10_name class` folders keep their name (their repeats) and lend their class text
        kohya = KOHYA_FOLDER.match(p.parent.name) if p.parent != folder else None
        place = job.target / p.parent.name if kohya else job.target
        caption = _file_caption(sidecar(p), job) or (kohya.group(2) if kohya else "")
        _add_image(p.name, lambda p=p: _open_file(p, job), caption, place, job)


def _pictures_in(folder: Path, job: _Import) -> Iterator[Path]:
    """The picture files under `folder`, folder by folder in name order; at most `limits.entries` names looked at."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        seen += len(dirs) + len(files)
        if seen > job.limits.entries:
            job.result.skipped.append((folder.name, f"more than {job.limits.entries} files and folders: the rest "
                                                    "were not looked at"))
            return
        yield from (Path(root) / n for n in sorted(files) if Path(n).suffix.lower() in IMAGE_SUFFIXES)


def _open_file(path: Path, job: _Import) -> IO[bytes]:
    if not path.is_file():
        raise Refused("not a regular file")
    job.take_bytes(path.stat().st_size)
    return path.open("rb")


def _add_zip(path: Path, job: _Import) -> None:
    try:
        _check_zip_directory(path, job.limits)
        z = zipfile.ZipFile(path)
    except Refused as e:
        job.result.skipped.append((path.name, str(e)))
        return
    except Exception as e:  # noqa: BLE001 - a damaged zip is named, the rest of the import goes on
        job.result.skipped.append((path.name, f"a damaged zip: not a readable zip archive ({_reason(e)})"))
        return
    with z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        members = {i.filename: i for i in infos}
        for info in infos:
            name = info.filename
            refusal = _unsafe(info)
            if refusal:
                job.result.skipped.append((name, refusal))
                continue
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not job.room(path.name):
                return
            stem = str(Path(name).with_suffix(""))
            side = next((members[stem + s] for s in CAPTION_SUFFIXES if stem + s in members), None)
            caption = _caption(side.filename, lambda i=side: _zip_caption(z, i, job), job) if side else ""
            _add_image(name, lambda i=info: _spooled(z, i, job), caption, job.target, job)


def _check_zip_directory(path: Path, limits: Limits) -> None:
    """Refuse a zip whose central directory (read whole by ZipFile) is too big, from its end record alone."""
    with path.open("rb") as f:
        end = zipfile._EndRecData(f)  # noqa: SLF001 - the stdlib's own reader of the end record
    if end is None:
        raise Refused("a damaged zip: not a readable zip archive (its end record is missing: cut short, or not a "
                      "zip at all)")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # noqa: SLF001
    if entries > limits.entries or size > limits.zip_directory_bytes:
        raise Refused(f"{entries} entries ({_size(size)} of directory): more than the {limits.entries} an import "
                      "looks at")


def _unsafe(info: zipfile.ZipInfo) -> str:
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "a symbolic link inside the zip"
    if info.filename.startswith("/") or ".." in Path(info.filename).parts:
        return "a path that points outside the zip"
    if info.compress_type not in ZIP_METHODS:
        return "compressed with bzip2 or LZMA, which this importer does not open: zip it again with Deflate"
    return ""


def _zip_caption(z: zipfile.ZipFile, info: zipfile.ZipInfo, job: _Import) -> tuple[str, bool]:
    with z.open(info) as f:
        return caption_text(*read_at_most(f, job.limits.caption_bytes))


def _spooled(z: zipfile.ZipFile, info: zipfile.ZipInfo, job: _Import) -> IO[bytes]:
    """The member in a temporary file (in memory up to 16 MB, then on disk in the target), taken against the byte
    limits by its declared size and stopped there whatever really comes out."""
    job.take_bytes(info.file_size)
    out = tempfile.SpooledTemporaryFile(16 << 20, dir=job.target)
    try:
        with z.open(info) as f:
            n = copy_at_most(f, out, info.file_size)
        if n < info.file_size:
            raise Refused(f"holds {n} bytes where its header says {info.file_size} (truncated?)")
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def copy_at_most(src: IO[bytes], dst: IO[bytes], limit: int, chunk: int = 1 << 20) -> int:
    """Copy `src` to `dst` in chunks; Refused as soon as more than `limit` bytes come out."""
    n = 0
    while data := src.read(chunk):
        n += len(data)
        if n > limit:
            raise Refused(f"holds more than the {limit} bytes its header says")
        dst.write(data)
    return n


def _add_image(name: str, open_: Callable[[], IO[bytes]], caption: str, place: Path, job: _Import) -> None:
    try:
        job.take_picture()
        with open_() as f, Image.open(f) as im:
            job.take_pixels(im.width, im.height)  # from the header: nothing is decoded yet
            im.seek(0)  # animated: the first frame
            ImageOps.exif_transpose(im, in_place=True)
            saved = _save_png(_to_rgb(im, job.background), place, Path(name).stem)
    except Exception as e:  # noqa: BLE001 - one bad file must never stop the import: name it and go on
        job.result.skipped.append((Path(name).name, _reason(e)))
        return
    if caption:
        set_caption(saved, caption)
    job.result.added.append(saved.name)


def _save_png(im: Image.Image, place: Path, stem: str) -> Path:
    place.mkdir(parents=True, exist_ok=True)
    path = place / f"{_free_name(place, stem)}.png"
    try:
        im.save(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _to_rgb(im: Image.Image, background) -> Image.Image:
    """RGB, alpha laid on `background`; an RGB picture is returned as it is (no copy of a 64 MP picture)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        flat = Image.new("RGB", im.size, background)
        flat.paste(im, mask=im)  # Pillow pastes RGBA/LA onto RGB by their alpha without a converted copy
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, Refused):
        return text
    if isinstance(e, Image.DecompressionBombError):
        return f"too large (a decompression bomb?): {text[:120]}"
    if isinstance(e, zipfile.BadZipFile) and "CRC" in text:
        return "damaged inside the zip (bad CRC-32)"
    if isinstance(e, (EOFError, zlib.error)):
        return f"damaged inside the zip ({text[:120]})"
    if "cannot identify image file" in text:
        return "not an image Pillow can read"
    if "truncated" in text.lower():
        return "the image file is truncated"
    return text[:200]


def _size(n: int) -> str:
    if n < 1 << 20:
        return f"{n} bytes"
    return f"{n / (1 << 30):.3g} GB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MB"


def _free_name(target: Path, stem: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"
    name, n = safe, 1
    while (target / f"{name}.png").exists():
        n += 1
        name = f"{safe}-{n}"
    return name
