"""A working dataset folder: images (as PNG/JPEG) with `.txt` caption sidecars, the way kohya reads them.

File I/O lives here; the caption edits are pure functions on strings.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import re

from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_ZIP_FILES = 5000
MAX_ZIP_BYTES = 4 << 30  # uncompressed
MAX_PIXELS = 64_000_000  # bigger than any camera; more is a decompression bomb
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # `10_name class`: 10 repeats, class text "name class"


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    repeats: int | None = None  # from a kohya `N_name` folder; None = the run's own


@dataclass
class AddResult:
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def to_markdown(self) -> str:
        lines = [f"Added **{len(self.added)}** picture(s)."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)}:")
            lines += [f"- `{name}`: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# --- captions, as pure functions of strings ---

def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger(caption: str, trigger: str) -> str:
    """`trigger` first, once."""
    tags = [t for t in split_tags(caption) if t != trigger.strip()]
    return ", ".join(([trigger.strip()] if trigger.strip() else []) + tags)


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


def read_caption(image: Path, suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> str:
    """The first sidecar that exists, in UTF-8 (with or without BOM), else cp1252, else latin-1; white space folded."""
    for suffix in suffixes:
        side = image.with_suffix(suffix)
        if side.is_file():
            raw = side.read_bytes()
            for encoding in ("utf-8-sig", "cp1252", "latin-1"):
                try:
                    return " ".join(raw.decode(encoding).split())
                except UnicodeDecodeError:
                    continue
    return ""


def set_caption(image: Path, caption: str) -> None:
    image.with_suffix(".txt").write_text(" ".join(caption.split()) + "\n", encoding="utf-8")


def tag_frequency(folder: Path) -> dict[str, int]:
    return count_tags(item.caption for item in items(folder))


def first_tag(folder: Path) -> str:
    tags = [split_tags(i.caption)[0] for i in items(folder) if split_tags(i.caption)]
    return max(set(tags), key=tags.count) if tags else ""


def apply_trigger(folder: Path, trigger: str) -> int:
    for item in items(folder):
        set_caption(item.image, with_trigger(item.caption, trigger))
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


def add_files(paths: list[Path], target: Path, background=(255, 255, 255)) -> AddResult:
    """Copy pictures, the pictures of folders and of zips into `target`; keep their captions; skip and name what
    cannot be read. Nothing is written outside `target`."""
    result = AddResult()
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    # kohya `10_name class` folders keep their name (their repeats) and lend their class text
                    kohya = KOHYA_FOLDER.match(p.parent.name) if p.parent != path else None
                    place = target / p.parent.name if kohya else target
                    caption = read_caption(p) or (kohya.group(2) if kohya else "")
                    _add_image(p, p.read_bytes, caption, place, result, background)
        elif zipfile.is_zipfile(path):
            _add_zip(path, target, result, background)
        elif path.suffix.lower() in CAPTION_SUFFIXES:
            continue  # read beside its picture
        else:
            _add_image(path, path.read_bytes, read_caption(path), target, result, background)
    return result


def _add_zip(path: Path, target: Path, result: AddResult, background) -> None:
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_FILES or sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            result.skipped.append((path.name, f"more than {MAX_ZIP_FILES} files or {MAX_ZIP_BYTES >> 30} GB"))
            return
        names = {i.filename for i in infos}
        for info in infos:
            name = info.filename
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                result.skipped.append((name, "a symbolic link inside the zip"))
                continue
            if name.startswith("/") or ".." in Path(name).parts:
                result.skipped.append((name, "a path that points outside the zip"))
                continue
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            stem = str(Path(name).with_suffix(""))
            caption = next((" ".join(z.read(stem + s).decode("utf-8", "replace").split())
                            for s in CAPTION_SUFFIXES if stem + s in names), "")
            _add_image(Path(name), lambda n=name: z.read(n), caption, target, result, background)


def _add_image(source: Path, read, caption: str, target: Path, result: AddResult, background) -> None:
    import io

    try:
        data = read()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} is too large (a decompression bomb?)")
            im.seek(0)  # animated: the first frame
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im, background)
    except Exception as e:  # one bad file must never stop the import: name it and go on
        result.skipped.append((source.name, _reason(e)))
        return
    target.mkdir(parents=True, exist_ok=True)
    name = _free_name(target, source.stem)
    im.save(target / f"{name}.png")
    if caption:
        set_caption(target / f"{name}.png", caption)
    result.added.append(f"{name}.png")


def _to_rgb(im: Image.Image, background) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        flat = Image.new("RGB", im.size, background)
        flat.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return flat
    return im.convert("RGB")


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if "cannot identify image file" in text:
        return "not an image Pillow can read"
    if "truncated" in text.lower():
        return "the image file is truncated"
    return text[:200]


def _free_name(target: Path, stem: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"
    name, n = safe, 1
    while (target / f"{name}.png").exists():
        n += 1
        name = f"{safe}-{n}"
    return name
