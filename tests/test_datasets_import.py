"""Importing a messy set of pictures: every bad input is converted or skipped with its name and a reason, nothing
crashes, nothing is written outside the target folder. Plus bucketing and the health report."""

import io
import math
import random
import re
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from datasets_tools import buckets as B
from datasets_tools import dataset_folder as D
from datasets_tools.health import report


def png_bomb_header(path: Path) -> None:
    """A valid PNG header that claims 100,000 x 100,000 pixels (a decompression bomb), with one tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(src / "good.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buf, "JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("this is not an image")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(src / "tiny.png")
    png_bomb_header(src / "bomb.png")
    Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(src / "cmyk.jpg")  # pure cyan ink
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(src / "deep.png")
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(src / "alpha.png")
    frames = [Image.new("RGB", (12, 12), c) for c in ((0, 0, 255), (255, 255, 0))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    photo = Image.new("RGB", (40, 20), (90, 90, 90))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    photo.save(src / "rotated.jpg", exif=exif)
    (src / "good.txt").write_bytes("café, ünïcode".encode("cp1252"))  # not UTF-8
    with zipfile.ZipFile(src / "pack.zip", "w") as z:
        b = io.BytesIO()
        Image.new("RGB", (16, 16), (5, 5, 250)).save(b, "PNG")
        z.writestr("inside.png", b.getvalue())
        z.writestr("inside.txt", "from the zip")
        z.writestr("../escape.png", b.getvalue())
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/passwd")
    return src


def test_every_bad_input_is_converted_or_named(corpus, tmp_path):
    target = tmp_path / "dataset"
    before = {p for p in tmp_path.rglob("*")}
    result = D.add_files(sorted(corpus.iterdir()), target, background=(255, 255, 255))
    skipped = dict(result.skipped)
    assert set(skipped) == {"truncated.jpg", "empty.png", "notes.png", "bomb.png", "../escape.png", "link.png"}
    assert "not an image" in skipped["notes.png"] or "cannot identify" in skipped["notes.png"]
    assert "too large" in skipped["bomb.png"] or "decompression" in skipped["bomb.png"].lower()
    assert "outside" in skipped["../escape.png"] and "symbolic link" in skipped["link.png"]
    assert sorted(result.added) == sorted(["good.png", "tiny.png", "cmyk.png", "deep.png", "alpha.png", "anim.png",
                                           "rotated.png", "inside.png"])
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(target in p.parents or p == target for p in written)  # nothing outside the target
    px = lambda name, xy=(0, 0): Image.open(target / name).convert("RGB").getpixel(xy)  # noqa: E731
    assert px("alpha.png", (5, 5)) == (255, 255, 255) and px("alpha.png") == (0, 0, 255)  # alpha on the background
    assert Image.open(target / "rotated.png").size == (20, 40)  # EXIF orientation applied
    assert px("anim.png") == (0, 0, 255)  # the first frame
    assert px("deep.png") == (255, 255, 255)  # 16-bit white stays white
    r, g, b = px("cmyk.png")
    assert r < 60 and g > 180 and b > 180  # cyan
    assert D.read_caption(target / "good.png") == "café, ünïcode"
    assert D.read_caption(target / "inside.png") == "from the zip"
    assert result.to_markdown().startswith("Added **8** picture(s).")


def test_caption_edits(tmp_path):
    assert D.with_trigger("red, zxc, circle", "zxc") == "zxc, red, circle"
    assert D.with_prefix_suffix("red, circle", "photo, red", "high quality") == "photo, red, circle, high quality"
    assert D.replaced("a red  circle, red", "red", "blue") == "a blue circle, blue"
    assert D.first_tags("a, b, c, d", 2) == "a, b"
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    D.set_caption(tmp_path / "x.png", "one, two, three")
    assert D.edit_all(tmp_path, lambda c: D.first_tags(c, 1)) == 1 and D.read_caption(tmp_path / "x.png") == "one"
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "one\n"
    assert D.renamed("a, b, c", "b", "c") == "a, c"
    assert D.renamed("a, b, c", "b", "") == "a, c"


@pytest.mark.parametrize("resolution, lo, hi", [(512, 256, 1024), (1024, 512, 2048), (64, 64, 128)])
def test_buckets_keep_the_budget_and_the_steps(resolution, lo, hi):
    buckets = B.make_buckets(resolution, lo, hi)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w * h <= resolution ** 2 and w % 64 == h % 64 == 0 and lo <= w <= hi and lo <= h <= hi
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(300, 4000), rng.randint(300, 4000)
        chosen = B.bucket_for_image(w, h, buckets, no_upscale=False)
        best = min(abs(math.log(b[0] / b[1]) - math.log(w / h)) for b in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == pytest.approx(best)


def test_small_pictures_are_not_upscaled_and_batches_never_mix_sizes():
    buckets = B.make_buckets(512, 256, 1024)
    assert B.bucket_for_image(300, 200, buckets, no_upscale=True) == (256, 192) or \
        B.bucket_for_image(300, 200, buckets, no_upscale=True)[0] <= 300
    sizes = [(800, 600), (600, 800), (512, 512), (1000, 500)] * 5
    assigned = B.assign_buckets(sizes, buckets)
    for batch in B.bucket_batches(assigned, 3, random.Random(1)):
        assert len({assigned[i] for i in batch}) == 1
    (rw, rh), (left, top) = B.cover_crop_box(1000, 500, 512, 448)
    assert rw >= 512 and rh == 448 and left == (rw - 512) // 2 and top == 0
    preview = B.crop_preview(Image.new("RGB", (1000, 500), (200, 200, 200)), (512, 448))
    assert preview.getpixel((500, 250)) == (200, 200, 200) and preview.getpixel((5, 250))[0] < 200  # cut part dimmed


def test_health_report_names_what_to_fix(corpus, tmp_path):
    target = tmp_path / "dataset"
    D.add_files(sorted(corpus.iterdir()), target)
    D.add_files([corpus / "good.jpg"], target)  # a duplicate
    (target / "broken.png").write_bytes(b"junk")
    r = report(target, resolution=64, min_reso=64, max_reso=128, batch_size=10)
    assert r.count == 10 and ("broken.png", ) == tuple(n for n, _ in r.unreadable)
    assert "tiny.png" in r.too_small
    assert ("good-2.png", "good.png", 0) in [tuple(sorted(d[:2])) + (d[2],) for d in r.near_duplicates] or \
        any({"good.png", "good-2.png"} == {a, b} for a, b, _ in r.near_duplicates)
    assert r.tag_frequency["café"] == 2
    text = r.to_markdown()
    assert "**10 pictures**" in text and "nearly identical" in text and "fewer than the batch size 10" in text


def test_kohya_folders_keep_their_repeats_and_class(tmp_path):
    src = tmp_path / "kohya"
    (src / "10_zxc star").mkdir(parents=True)
    (src / "3_scenery").mkdir()
    Image.new("RGB", (16, 16)).save(src / "10_zxc star" / "a.png")
    Image.new("RGB", (16, 16)).save(src / "3_scenery" / "b.png")
    (src / "3_scenery" / "b.txt").write_text("hills, river")
    target = tmp_path / "dataset"
    D.add_files([src], target)
    found = {str(i.image.relative_to(target)): i.caption for i in D.items(target)}
    assert found == {"10_zxc star/a.png": "zxc star", "3_scenery/b.png": "hills, river"}
    from trainer.data import scan

    assert sorted((p.name, c, r) for p, c, r in scan(target)) == [("a.png", "zxc star", 10),
                                                                  ("b.png", "hills, river", 3)]


def test_the_command_line_and_the_dataset_tab_make_the_same_dataset(corpus, tmp_path):
    """One importer: `trainer new --images` and the Dataset tab's "Add folder" give the same files, the same
    caption bytes, the same skipped files, and the trainer reads the captions the tab shows."""
    import subprocess
    import sys

    from trainer import data
    from ui import dataset_tab

    (corpus / "cmyk.caption").write_text("ink, cyan", encoding="utf-8")  # a .caption sidecar
    (corpus / "deep.txt").write_text("grey, " * 40)  # 80 CLIP tokens: more than the 75 the preset reads
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "trainer", "new", "--base", "demo", "--images", str(corpus),
                        "--preset", "character", "--runs-dir", str(tmp_path / "runs"), "--name", "cli",
                        "--no-train"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cli = tmp_path / "runs" / "cli" / "dataset"
    folder, message, gallery, _ = dataset_tab.on_folder(tmp_path / "drafts", str(corpus), "")
    tab = Path(folder)

    def files(root_dir):
        return {str(p.relative_to(root_dir)): p.read_bytes() for p in sorted(root_dir.rglob("*")) if p.is_file()}

    assert files(cli) == files(tab) and len(files(cli)) > 8
    skipped_by_tab = set(re.findall(r"- `([^`]+)`", message))
    assert skipped_by_tab == {"truncated.jpg", "empty.png", "notes.png", "bomb.png"}
    assert all(f"{name} (" in r.stderr for name in skipped_by_tab)
    assert "tiny.png" in r.stderr and "smaller than half the training resolution" in r.stderr  # a health warning
    assert "1 caption(s) longer than 75 CLIP tokens (the longest 80): SD 1.x/2.x and SDXL never read their end " \
           "(deep.png); Max token length 150" in r.stderr
    trained = {p.name: caption for p, caption, _ in data.scan(cli)}
    shown = {Path(path).name: caption for path, caption in gallery}
    assert trained["good.png"] == shown["good.png"] == "café, ünïcode"  # cp1252 read as cp1252, not mojibake
    assert trained["cmyk.png"] == shown["cmyk.png"] == "ink, cyan"


def uploaded(tmp_path: Path, name: str, data: bytes) -> Path:
    """A file as Gradio stores an upload: alone in a folder of its own."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / name).write_bytes(data)
    return folder / name


def png_bytes(color=(9, 9, 9)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(b, "PNG")
    return b.getvalue()


def test_captions_uploaded_apart_from_their_pictures_find_them(tmp_path):
    """`create_run(images=[1.png, 1.txt])` and the Dataset tab's upload box: each file in its own folder."""
    files = [uploaded(tmp_path, "1.png", png_bytes()), uploaded(tmp_path, "1.txt", b"red, circle"),
             uploaded(tmp_path, "2.jpg", png_bytes()), uploaded(tmp_path, "2.caption", b"from .caption"),
             uploaded(tmp_path, "3.png", png_bytes()), uploaded(tmp_path, "3.caption", b"second choice"),
             uploaded(tmp_path, "3.txt", "first choice, café".encode("cp1252")),
             uploaded(tmp_path, "lonely.txt", b"nobody's")]
    result = D.add_files(files, tmp_path / "ds")
    found = {i.image.name: i.caption for i in D.items(tmp_path / "ds")}
    assert found == {"1.png": "red, circle", "2.png": "from .caption", "3.png": "first choice, café"}
    assert dict(result.skipped) == {"3.caption": "3.txt was used for 3.png",
                                    "lonely.txt": "no picture named lonely.* came with it"}


def test_ambiguous_stems_are_not_guessed_and_mixed_inputs_keep_every_caption(tmp_path):
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "1.png").write_bytes(png_bytes())
    (beside / "1.txt").write_text("my own sidecar")  # beside its picture: it wins
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f.png").write_bytes(png_bytes())
    (folder / "f.caption").write_text("from the folder")
    with zipfile.ZipFile(tmp_path / "pack.zip", "w") as z:
        z.writestr("sub/z.png", png_bytes())
        z.writestr("sub/z.caption", "from the zip")
    files = [beside / "1.png", uploaded(tmp_path, "1.txt", b"not mine"), folder, tmp_path / "pack.zip",
             uploaded(tmp_path, "2.png", png_bytes((1, 1, 1))), uploaded(tmp_path, "2.png", png_bytes((2, 2, 2))),
             uploaded(tmp_path, "2.txt", b"whose?"),
             uploaded(tmp_path, "4.png", png_bytes()), uploaded(tmp_path, "4.txt", b"one"),
             uploaded(tmp_path, "4.txt", b"two")]
    result = D.add_files(files, tmp_path / "ds")
    found = {i.image.name: i.caption for i in D.items(tmp_path / "ds")}
    assert found == {"1.png": "my own sidecar", "f.png": "from the folder", "z.png": "from the zip",
                     "2.png": "", "2-2.png": "", "4.png": ""}
    skipped = result.skipped
    assert ("1.txt", "1.png has its own caption beside it") in skipped
    assert ("2.txt", "2 pictures are named 2.*: which one it describes is unclear, so none got it") in skipped
    assert skipped.count(("4.txt", "2 captions are named 4.txt: which one is right is unclear, so none was used")) == 2
    assert D.pair_by_stem([Path("a/1.png")], [Path("b/1.caption"), Path("c/1.txt")]) == \
        ({Path("a/1.png"): Path("c/1.txt")}, [("1.caption", "1.txt was used for 1.png")])


def test_flat_pictures_of_other_colours_are_not_near_duplicates(tmp_path):
    """QA: a green square, a grey and a white picture were 'nearly identical (0/64 bits differ)': the grey
    difference hash of any flat picture is 0. A re-saved copy still is one."""
    target = tmp_path / "dataset"
    target.mkdir()
    Image.new("RGB", (300, 300), (0, 200, 0)).save(target / "green.png")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(target / "grey.png")
    Image.new("RGB", (300, 300), (255, 255, 255)).save(target / "white.png")
    Image.new("RGB", (400, 100), (0, 200, 0)).save(target / "strip.png")  # the same green, another shape
    photo = Image.new("RGB", (300, 300), (200, 40, 30))
    ImageDraw.Draw(photo).ellipse((60, 60, 240, 240), fill=(20, 40, 220))
    photo.save(target / "photo.png")
    photo.save(target / "photo-copy.jpg", quality=80)
    (target / "photo.txt").write_text("a blue circle, red ground")
    r = report(target, resolution=64, min_reso=64, max_reso=128)
    assert [tuple(sorted(d[:2])) for d in r.near_duplicates] == [("photo-copy.jpg", "photo.png")]
    assert "1/6 captioned, 5.0 words a caption on average." in r.to_markdown()  # not 0.8 over all six
