"""Hostile uploads cost a bounded amount: each import below runs in a child process whose peak memory (RSS) and CPU
time are measured, and the good picture beside the bad entry still comes in. The corpus is generated here, small on
disk (zeros deflate ~1000:1; a 1 GiB file beside a picture is sparse).

Bounds (2 shared cores): every hostile input < 100 MB peak RSS and < 10 s CPU; one legal picture of MAX_PIXELS
(7999x7999) < 700 MB and < 10 s, and an import stops at Limits.total_pixels. Run with `-s` to see the figures."""

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from datasets_tools import dataset_folder as D

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
HOSTILE_MB, HOSTILE_CPU_S = 100, 10  # the bound on each hostile input (measured: 19-23 MB, <= 0.03 s)
LARGEST_MB = 700  # one legal picture of MAX_PIXELS: 64 MP decoded (RGB 192 MB, RGBA 256 MB + its RGB flattening)
CHILD = """
import json, re, sys, time
from pathlib import Path
from datasets_tools import dataset_folder as D
def peak_mb():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
args = json.loads(sys.argv[1])
base = peak_mb()
wall, cpu = time.perf_counter(), time.process_time()
r = D.add_files([Path(p) for p in args["paths"]], Path(args["target"]), limits=D.Limits(**args["limits"]))
print(json.dumps({"added": r.added, "skipped": r.skipped, "notes": r.notes,
                  "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "rss_mb": peak_mb(), "base_mb": base}))
"""


def measured_import(paths, target, **limits) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"paths": [str(p) for p in paths],
                                                                 "target": str(target), "limits": limits})],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    print(f"\n{Path(paths[0]).name}: peak RSS {out['rss_mb']:.0f} MB (baseline {out['base_mb']:.0f}), "
          f"{out['cpu_s']:.2f} s CPU, {out['wall_s']:.2f} s wall; skipped {out['skipped']}; notes {out['notes']}")
    return out


# --- building the corpus ---

def png(size=(16, 16), color=(5, 5, 250)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "PNG")
    return b.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(side: int, idat: bytes | None = None) -> bytes:
    """A black side x side RGB PNG: honest and tiny (its rows of zeros deflate ~1000:1), or with `idat` instead."""
    if idat is None:
        c, row = zlib.compressobj(9), bytes(1 + 3 * side)
        idat = b"".join(c.compress(row) for _ in range(side)) + c.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def deflated(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def deflated_zeros(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of `mib` MiB of zeros, and its CRC-32, built from one self-contained block (a full flush
    ends it on a byte boundary with no back-references), repeated, then an empty final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    crc, zero = 0, bytes(MIB)
    for _ in range(mib):
        crc = zlib.crc32(zero, crc)
    return block * mib + b"\x03\x00", crc


def write_zip(path: Path, members) -> Path:
    """A zip written by hand, so that its headers can say what we want: members are (name, data as stored, size
    declared, CRC declared, method)."""
    out, central = bytearray(), bytearray()
    for name, data, size, crc, method in members:
        n = name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(n), 0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0)
        out += n + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def honest(name: str, data: bytes):
    return name, deflated(data), len(data), zlib.crc32(data), zipfile.ZIP_DEFLATED


@pytest.fixture(scope="module")
def zeros_1g():
    data, crc = deflated_zeros(1024)
    assert zlib.decompressobj(-15).decompress(deflated_zeros(3)[0]) == bytes(3 * MIB)  # the trick is valid deflate
    return data, crc


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return png_of_zeros(7999)  # 63,984,001 pixels: just under MAX_PIXELS, so legal


def test_stream_of_zeros_is_what_it_says():
    data, crc = deflated_zeros(5)
    assert zlib.decompressobj(-15).decompress(data) == bytes(5 * MIB) and crc == zlib.crc32(bytes(5 * MIB))


def test_a_1_gib_caption_in_a_1_mb_zip(tmp_path, zeros_1g):
    data, crc = zeros_1g
    z = write_zip(tmp_path / "caption_1g.zip", [honest("good.png", png()),
                                                ("good.txt", data, 1 << 30, crc, zipfile.ZIP_DEFLATED)])
    assert z.stat().st_size < 2 * MIB
    out = measured_import([z], tmp_path / "ds")
    assert out["added"] == ["good.png"] and out["skipped"] == []
    assert [n for n, _ in out["notes"]] == ["good.txt"] and "64 KiB" in out["notes"][0][1]
    assert (tmp_path / "ds" / "good.txt").stat().st_size <= D.MAX_CAPTION_BYTES + 1
    assert out["rss_mb"] < HOSTILE_MB and out["cpu_s"] < HOSTILE_CPU_S


def test_a_64_mib_caption_and_an_honest_3_5_gib_member(tmp_path):
    data, crc = deflated_zeros(64)
    huge, _ = deflated_zeros(1)  # declared 3.5 GiB: refused by its header before a byte is read
    z = write_zip(tmp_path / "caption_64m.zip", [honest("a.png", png()),
                                                 ("a.txt", data, 64 * MIB, crc, zipfile.ZIP_DEFLATED),
                                                 ("huge.png", huge, 3584 * MIB, 0, zipfile.ZIP_DEFLATED)])
    assert z.stat().st_size < 100_000
    out = measured_import([z], tmp_path / "ds")
    assert out["added"] == ["a.png"] and [n for n, _ in out["notes"]] == ["a.txt"]
    assert dict(map(tuple, out["skipped"])) == {"huge.png": "3.5 GB expanded, more than the 512 MB a picture may have"}
    assert out["rss_mb"] < HOSTILE_MB and out["cpu_s"] < HOSTILE_CPU_S


def test_lying_headers_bad_crc_truncation_and_bzip2_are_named_and_the_rest_comes_in(tmp_path, zeros_1g):
    data, crc = zeros_1g
    good, pic = png(), deflated(png())
    z = write_zip(tmp_path / "liars.zip", [
        honest("first.png", good),
        ("liar.png", data, 100_000, crc, zipfile.ZIP_DEFLATED),  # says 100 KB, inflates to 1 GiB
        ("short.png", pic, len(good) + 1000, zlib.crc32(good), zipfile.ZIP_DEFLATED),  # says more than it holds
        ("badcrc.png", pic, len(good), zlib.crc32(good) ^ 1, zipfile.ZIP_DEFLATED),
        ("cut.png", pic[: len(pic) // 2], len(good), zlib.crc32(good), zipfile.ZIP_DEFLATED),
        ("packed.png", good, len(good), zlib.crc32(good), zipfile.ZIP_BZIP2),
        honest("last.png", good),
    ])
    out = measured_import([z], tmp_path / "ds")
    skipped = dict(map(tuple, out["skipped"]))
    assert out["added"] == ["first.png", "last.png"]
    assert set(skipped) == {"liar.png", "short.png", "badcrc.png", "cut.png", "packed.png"}
    assert "CRC" in skipped["badcrc.png"] and "bzip2" in skipped["packed.png"]
    assert "CRC" in skipped["liar.png"] or "more than" in skipped["liar.png"]
    assert all("damaged" in skipped[n] or "truncated" in skipped[n] for n in ("short.png", "cut.png"))
    assert out["rss_mb"] < HOSTILE_MB and out["cpu_s"] < HOSTILE_CPU_S


def test_a_lying_header_cannot_get_past_the_copy():
    src = io.BytesIO(bytes(3 * MIB))
    with pytest.raises(D.Refused, match="more than"):
        D.copy_at_most(src, io.BytesIO(), 2 * MIB + 5)
    assert src.tell() <= 3 * MIB  # stopped at the chunk that went over


def test_many_huge_legal_pictures_stop_at_the_pixel_budget(tmp_path, big_png):
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(20):
            z.writestr(f"big{i:02}.png", big_png)
        z.writestr("bomb.png", png_of_zeros(100_000, idat=zlib.compress(bytes(10))))  # claims 10 gigapixels
    assert (tmp_path / "big.zip").stat().st_size < 100_000
    out = measured_import([tmp_path / "big.zip"], tmp_path / "ds", total_pixels=D.MAX_PIXELS)  # one picture's worth
    skipped = dict(map(tuple, out["skipped"]))
    assert out["added"] == ["big00.png"] and len(skipped) == 20
    assert "too large" in skipped["bomb.png"] and "gigapixels are spent" in skipped["big19.png"]
    assert Image.open(tmp_path / "ds" / "big00.png").size == (7999, 7999)
    assert out["rss_mb"] < LARGEST_MB and out["cpu_s"] < HOSTILE_CPU_S  # the most one picture costs


def test_plain_files_a_1_gib_caption_beside_a_picture_and_a_1_gib_picture(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    with open(src / "a.txt", "wb") as f:
        f.write(b"red, circle " * 10)
        f.truncate(1 << 30)  # sparse: no disk used
    with open(src / "huge.png", "wb") as f:
        f.write(png()[:64])
        f.truncate(1 << 30)
    (src / "bomb.png").write_bytes(png_of_zeros(100_000, idat=zlib.compress(bytes(10))))
    out = measured_import([src / "a.png", src / "a.txt", src / "huge.png", src / "bomb.png"], tmp_path / "ds")
    skipped = dict(map(tuple, out["skipped"]))
    assert out["added"] == ["a.png"] and set(skipped) == {"huge.png", "bomb.png"}
    assert "more than the 512 MB" in skipped["huge.png"] and "too large" in skipped["bomb.png"]
    assert D.read_caption(tmp_path / "ds" / "a.png").startswith("red, circle red, circle")
    assert out["rss_mb"] < HOSTILE_MB and out["cpu_s"] < HOSTILE_CPU_S
    folder = measured_import([src], tmp_path / "from_folder")  # the same files as a folder
    assert folder["added"] == ["a.png"] and folder["rss_mb"] < HOSTILE_MB and folder["cpu_s"] < HOSTILE_CPU_S


def test_the_trainer_reads_a_huge_caption_cut_not_whole(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with open(tmp_path / "x.txt", "wb") as f:
        f.write("é".encode() * (D.MAX_CAPTION_BYTES // 2 - 1) + b"a\xc3\xa9tail")  # a character across the cut
        f.truncate(1 << 30)
    caption = D.items(tmp_path)[0].caption
    assert caption == "é" * (D.MAX_CAPTION_BYTES // 2 - 1) + "a"  # cut at 64 KiB, the half character dropped


def test_a_zip_with_too_many_entries_is_refused_from_its_end_record(tmp_path):
    write_zip(tmp_path / "many.zip", [honest(f"{i}.txt", b"x") for i in range(300)])
    write_zip(tmp_path / "ok.zip", [honest("ok.png", png())])
    result = D.add_files([tmp_path / "many.zip", tmp_path / "ok.zip"], tmp_path / "ds", limits=D.Limits(entries=200))
    assert result.added == ["ok.png"] and result.skipped[0][0] == "many.zip" and "300 entries" in result.skipped[0][1]


def test_the_picture_and_byte_budgets_name_what_they_leave_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(png())
    result = D.add_files([src], tmp_path / "a", limits=D.Limits(pictures=3))
    assert result.added == ["0.png", "1.png", "2.png"] and "3 pictures are reached" in result.skipped[0][1]
    size = (src / "0.png").stat().st_size
    result = D.add_files([src], tmp_path / "b", limits=D.Limits(total_bytes=2 * size + size // 2))
    assert result.added == ["0.png", "1.png"] and len(result.skipped) == 3
    assert all("are spent" in why for _, why in result.skipped)
