"""The compare worker (trainer.compare, `python -m trainer compare`) on the tiny SD 1.x model: each hot-swapped
cell is the picture a freshly loaded pipeline with the file merged (tests/lora_files, ComfyUI's arithmetic) draws,
the weights come back bit for bit, a file that does not fit is named and skipped, and the command's events, cells,
grid and cancel do what the contract (issue #15) says."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests import lora_files
from tests.test_networks import base_weights as reference_weights
from tests.test_networks import components, net_config
from trainer import compare as engine
from trainer.compare_spec import SPEC_FILE, CompareError, checked
from trainer.events import read_all
from trainer.export import save_atomic, to_kohya
from trainer.loading import load_base
from trainer.networks import create
from trainer.rundir import RunDir
from trainer.sampling import generate
from ui.compares import CompareView

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lora", "locon", "loha", "lokr", "dora")
SIZE = dict(width=64, height=64)
DRAW = dict(sampler="euler", steps=2, cfg_scale=7.0, clip_skip=1, negative="", **SIZE)


def adapter_file(model_path: Path, arch: str, kind: str, path: Path, meta: dict | None = None) -> Path:
    """A file of `kind` whose update is large enough to change the picture (random factors, not zero-initialised)."""
    net = create(net_config(kind, conv_dim=2), arch, components(load_base(model_path)))
    torch.manual_seed(7)
    with torch.no_grad():
        for c in net.components:
            for p in net.parameters_of(c):
                p.add_(torch.randn_like(p) * 0.3)
    version = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
    return save_atomic(to_kohya(net, torch.float32), {"ss_base_model_version": version} | (meta or {}), path)


@pytest.fixture(scope="module")
def sd1(tiny_models) -> Path:
    return tiny_models["sd1"][1]


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-files")
    return {kind: adapter_file(sd1, "sd1", kind, root / f"{kind}.safetensors",
                               {"ss_validation_loss": "0.125"} if kind == "lora" else None) for kind in METHODS}


@pytest.fixture(scope="module")
def bad_files(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-bad")
    sdxl = adapter_file(tiny_models["sdxl"][1], "sdxl", "lora", root / "sdxl.safetensors")
    whole = (root / "lora.safetensors")
    adapter_file(tiny_models["sd1"][1], "sd1", "lora", whole)
    data = whole.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) * 3 // 4])
    (root / "notalora.safetensors").write_text("<!doctype html><html>a web page saved as a LoRA</html>\n" * 50)
    return {"sdxl": sdxl, "checkpoint": tiny_models["sd1"][1], "truncated": root / "truncated.safetensors",
            "notalora": root / "notalora.safetensors"}


def write_spec(folder: Path, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(checked(settings)), encoding="utf-8")
    return folder


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def fresh_merged(source: Path, path: Path, strength: float):
    """A new pipeline with the file merged at `strength`, by the reference arithmetic on kohya's own targets."""
    model = load_base(source)
    weights = reference_weights(model)
    with torch.no_grad():
        for name, params in lora_files.modules(path).items():
            weight = weights[name]
            weight += strength * lora_files.delta(params, weight.shape, weight.detach().clone())
    return model


def cells_by_key(folder: Path) -> dict:
    return {(e["file"], e["strength"], e["prompt"], e["seed"]): folder / e["path"]
            for e in read_all(folder) if e["type"] == "compare_cell"}


def test_a_hot_swapped_cell_is_what_a_fresh_pipeline_with_the_file_merged_draws(sd1, files, tmp_path):
    folder = write_spec(tmp_path / "c", base=str(sd1), files=[str(files[k]) for k in METHODS], labels=list(METHODS),
                        strengths=[0, 0.5, 1], prompts=["a red circle"], seeds=[5], **DRAW)
    assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"
    cells = cells_by_key(folder)
    base = pixels(generate(load_base(sd1), "a red circle", seed=5, **DRAW))
    assert np.array_equal(pixels(Image.open(cells[(None, 0.0, 0, 5)])), base)  # strength 0: the base, exactly
    worst = {}
    for i, kind in enumerate(METHODS):
        for strength in (0.5, 1.0):
            want = pixels(generate(fresh_merged(sd1, files[kind], strength), "a red circle", seed=5, **DRAW))
            got = pixels(Image.open(cells[(i, strength, 0, 5)]))
            worst[kind, strength] = int(np.abs(got - want).max())
            assert np.abs(want - base).max() > 20, f"{kind} at {strength} hardly changes the picture"
    print("largest pixel difference, hot-swapped vs freshly merged:", worst)
    assert max(worst.values()) <= 2, worst


def test_restore_is_bit_exact_and_strengths_are_taken_from_the_original(sd1, files):
    base = load_base(sd1)
    weights = engine.base_weights(base)
    before = {name: w.detach().clone() for name, w in weights.items()}
    swap = engine.HotSwap(weights)
    for kind in METHODS:
        for strength in (1.0, 0.5, -1.0):
            swap.use(files[kind], strength)
            touched = swap.factors.keys()
            assert touched and any(not torch.equal(weights[n], before[n]) for n in touched), kind
            for name, params in lora_files.modules(files[kind]).items():
                want = before[name] + strength * lora_files.delta(params, before[name].shape, before[name])
                assert torch.allclose(weights[name], want, atol=1e-5, rtol=1e-4), (kind, name)
        swap.use(None, 0.0)
        assert all(torch.equal(weights[n], before[n]) for n in weights), f"{kind}: not restored exactly"


def test_a_swapped_file_keeps_the_touched_weights_once_beside_the_model(sd1, files):
    """What HotSwap holds beside the model: a copy of each weight the file touches and the file's factors, no ΔW
    per module (for FLUX.1 dev that would be another ~24 GB of RAM)."""
    weights = engine.base_weights(load_base(sd1))
    swap = engine.HotSwap(weights)
    for kind in METHODS:
        for strength in (0.5, 1.0):
            swap.use(files[kind], strength)
            held = tensors({k: v for k, v in vars(swap).items() if k != "weights"})
            assert nbytes(swap.backup.values()) == nbytes(weights[n] for n in swap.backup), kind
            assert nbytes(held) == nbytes(swap.backup.values()) + nbytes(load_file(str(files[kind])).values()), kind
    swap.restore()


def tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def test_files_that_do_not_fit_are_named_and_the_others_still_draw(sd1, files, bad_files, tmp_path):
    paths = [files["lora"], bad_files["sdxl"], bad_files["checkpoint"], bad_files["truncated"], bad_files["notalora"]]
    folder = write_spec(tmp_path / "c", base=str(sd1), files=[str(p) for p in paths],
                        labels=["good", "sdxl", "checkpoint", "truncated", "notalora"], strengths=[0, 1],
                        prompts=["x"], seeds=[1], **DRAW)
    assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"
    events = read_all(folder)
    problems = {e["label"]: e["problem"] for e in events if e["type"] == "compare_file"}
    assert problems["good"] == ""
    assert problems["sdxl"] == "made for SDXL, the base is SD 1.x"
    assert problems["checkpoint"].startswith("not a LoRA file")
    assert problems["truncated"].startswith("truncated.safetensors: the file is truncated (")
    # QA C2: no "not a readable .safetensors file: …", no 19-digit "header length"
    assert problems["notalora"] == ("notalora.safetensors: not a safetensors file (it may be a web page or a renamed "
                                    "file)")
    assert sorted(k[0] for k in cells_by_key(folder) if k[0] is not None) == [0]
    sheet = Image.open(folder / "grid.png")
    legend = engine.legend_lines(engine.read_spec(folder), sheet.width)
    assert sheet.height == engine.HEADER_HEIGHT + 64 + engine.LINE * len(legend) + 2 * engine.PAD  # one usable row


def test_a_module_the_base_lacks_or_of_another_shape_is_named(sd1, files, tmp_path):
    weights = engine.base_weights(load_base(sd1))
    modules = lora_files.modules(files["lora"])
    flat = {f"{n}.{k}": v for n, p in modules.items() for k, v in p.items()}
    renamed = dict(flat) | {"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8),
                            "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4)}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    reshaped = dict(flat) | {f"{name}.lora_up.weight": torch.zeros(48, 4)}
    problems = {}
    for label, tensors in (("renamed", renamed), ("reshaped", reshaped)):
        path = save_atomic(tensors, {}, tmp_path / f"{label}.safetensors")
        problems[label] = engine.inspect(0, label, path, "sd1", weights).problem
    assert problems["renamed"] == (f"1 of its {len(modules) + 1} modules have no match in this base "
                                   "(first: lora_unet_nowhere)")
    assert problems["reshaped"] == f"{name}: its update is (48, 32), the base's weight (32, 32)"


def test_the_file_tells_its_family_and_method(files, bad_files):
    from trainer.single_file import read_safetensors_metadata

    assert engine.file_arch({"ss_base_model_version": "sd_v2_v"}, []) == "sd2"
    assert engine.file_arch({"modelspec.architecture": "stable-diffusion-v1/lora"}, []) == "sd1"
    assert engine.file_arch({}, ["lora_te2_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"
    assert engine.file_arch({}, ["lora_unet_down_blocks_0_attentions_0_proj_in"]) is None
    assert engine.file_arch(read_safetensors_metadata(bad_files["sdxl"]), []) == "sdxl"
    for kind in METHODS:
        assert engine.method(lora_files.modules(files[kind])) == kind


def test_a_bad_spec_names_the_field(sd1, files, tmp_path):
    good = dict(base=str(sd1), files=[str(files["lora"])], prompts=["x"])
    folder = write_spec(tmp_path / "c", **good)
    spec = json.loads((folder / SPEC_FILE).read_text())
    for field, value, said in (("steps", 0, "steps: must be a whole number in [1, 150]"),
                               ("strengths", [3], "strengths: each must be in [-2, 2]"),
                               ("prompts", [], "prompts: give 1 to 8"),
                               ("files", [str(tmp_path / "gone.safetensors")], "files: no such file")):
        (folder / SPEC_FILE).write_text(json.dumps(spec | {field: value}))
        with pytest.raises(CompareError, match=said.replace("[", r"\[").replace("]", r"\]")):
            engine.compare(folder, SimpleNamespace(requested=False))
    (folder / SPEC_FILE).write_text("{not json")
    with pytest.raises(CompareError, match="compare.json: cannot be read as JSON"):
        engine.compare(folder, SimpleNamespace(requested=False))


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "compare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kwargs)


def draw_args() -> list[str]:
    return ["--steps", "2", "--sampler", "euler", "--width", "64", "--height", "64"]


def test_the_command_draws_the_grid_with_webui_parameters(sd1, files, tmp_path):
    out = tmp_path / "out"
    r = cli("--base", sd1, "--files", files["lora"], files["dora"], "--labels", "epoch 1, best", "dora",
            "--strengths", "0,1", "--prompts", "a red circle", "--seeds", "1,2", *draw_args(), "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    events = read_all(out)
    kinds = [e["type"] for e in events]
    assert kinds.count("compare_file") == 2 and kinds.count("compare_cell") == 2 + 2 * 2 and kinds[-1] == "done"
    assert [e["held_out"] for e in events if e["type"] == "compare_file"] == [0.125, None]
    assert RunDir(out).status()["state"] == "done"
    cells = cells_by_key(out)
    assert Image.open(cells[(0, 1.0, 0, 2)]).info["parameters"].endswith(
        'Lora: "epoch 1, best", Strength: 1')
    assert Image.open(cells[(None, 0.0, 0, 1)]).info["parameters"].endswith("Lora: none, Strength: 0")
    assert "Seed: 2, Size: 64x64" in Image.open(cells[(1, 1.0, 0, 2)]).info["parameters"]
    grid = Image.open(out / "grid.png")
    spec = json.loads((out / SPEC_FILE).read_text())
    legend = engine.legend_lines(spec, grid.width)
    assert grid.size == (engine.LABEL_WIDTH + 4 * 64, engine.HEADER_HEIGHT + 2 * 64 + engine.LINE * len(legend)
                         + 2 * engine.PAD)  # 1 prompt × 2 seeds × 2 strengths, 2 rows, the legend below
    assert grid.info["Description"] == ("prompt 1: a red circle\nbase " + Path(sd1).name + " · sampler euler · 2 "
                                        "steps · guidance (CFG) 7 · 64x64")
    view = CompareView("out", out, spec)
    view.read()
    assert view.counts() == (8, 8) and view.ended == "done" and view.problems_text() == ""
    # QA C4: the worker counts the grid's cells as the page does (the base's 2 pictures fill a cell in each row)
    assert view.progress_text() == "Cell 8 / 8 · done" and RunDir(out).status()["message"] == "8 cells"


def test_no_usable_file_exits_2_saying_why(sd1, bad_files, tmp_path):
    out = tmp_path / "out"
    r = cli("--base", sd1, "--files", bad_files["sdxl"], bad_files["truncated"], "--prompts", "x", *draw_args(),
            "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert ("no usable file: sdxl: made for SDXL, the base is SD 1.x; truncated: truncated.safetensors: the file is "
            "truncated (") in r.stderr
    assert read_all(out)[-1]["type"] == "error" and RunDir(out).status()["state"] == "failed"
    assert not (out / "grid.png").exists()
    bad = cli("--base", sd1, "--files", bad_files["sdxl"], "--prompts", "x", "--steps", "0", "--out", tmp_path / "b")
    assert bad.returncode == 2 and "steps: must be a whole number in [1, 150]" in bad.stderr


def test_sigterm_stops_after_the_current_cell_and_keeps_the_cells(sd1, files, tmp_path):
    folder = write_spec(tmp_path / "c", base=str(sd1), files=[str(files["lora"]), str(files["lokr"])],
                        strengths=[0, 0.25, 0.5, 0.75, 1], prompts=["a", "b"], seeds=[1, 2, 3, 4],
                        **DRAW | {"steps": 6})
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "compare", str(folder)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(e["type"] == "compare_cell" for e in read_all(folder)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3, proc.stderr.read()[-2000:]
    events = read_all(folder)
    drawn = [e for e in events if e["type"] == "compare_cell"]
    # the grid's cells filled: the base's pictures fill one in each of the 2 rows (QA C4 saw "Cell 12 / 96 ·
    # cancelled" on the page beside "stopped after 6 of 88 cells" in status.json)
    filled = sum(2 if e["file"] is None else 1 for e in drawn)
    assert events[-1]["type"] == "cancelled" and events[-1]["step"] == filled < 2 * 5 * 2 * 4
    assert all((folder / e["path"]).is_file() for e in drawn) and not (folder / "grid.png").exists()
    status = RunDir(folder).status()
    assert status["state"] == "cancelled" and status["pid"] is None
    assert status["message"] == f"stopped after {filled} of 80 cells"
    view = CompareView("c", folder, engine.read_spec(folder))
    view.read()
    assert view.progress_text() == f"Cell {filled} / 80 · cancelled"


def test_an_sdxl_file_swaps_into_both_text_encoders_and_the_sgm_named_unet(tiny_models, tmp_path):
    sdxl = tiny_models["sdxl"][1]
    path = adapter_file(sdxl, "sdxl", "lora", tmp_path / "sdxl.safetensors")
    base = load_base(sdxl)
    swap = engine.HotSwap(engine.base_weights(base))
    swap.use(path, 1.0)
    assert {n.split("_")[1] for n in swap.factors} == {"unet", "te1", "te2"}
    got = pixels(generate(base, "a red circle", seed=3, **DRAW))
    want = pixels(generate(fresh_merged(sdxl, path, 1.0), "a red circle", seed=3, **DRAW))
    assert np.abs(got - want).max() <= 2


@pytest.mark.slow
def test_the_benchmark_runs_its_quick_mode():
    from bench import compare as bench

    results = bench.main(["--quick"])
    assert [r["files"] for r in results] == [2]
    assert all(r["hot"]["cells"] == r["naive"]["cells"] and r["speedup"] > 0 for r in results)


def test_the_grid_png_says_what_each_column_was_drawn_with(tmp_path):
    """QA C1: grid.png's headers said "prompt 1", never the prompt, and row labels wrapped inside "(epoch 1, step\n4)".
    Now each prompt × seed is headed by its prompt's text (cut to fit), and a legend below has every prompt in full
    and the settings. Drawn from cells written here: no model."""
    spec = {"prompts": ["zxc, a yellow ring on a black background", "a red circle on a white background"],
            "seeds": [7], "strengths": [0.0, 0.5, 1.0], "width": 64, "height": 64, "negative": "blurry",
            "base": "/models/sd15.safetensors", "sampler": "euler_a", "steps": 20, "cfg_scale": 5.0, "clip_skip": 1}
    label = "20261207-070731-character / lora-000001 (epoch 1, step 4)"
    files = [engine.LoraFile(0, label, tmp_path / "a.safetensors", "sd1", "lora", 0.1568)]
    (tmp_path / "cells").mkdir()
    for cell in engine.plan(spec, files):
        Image.new("RGB", (64, 64), (0, 90, 200)).save(tmp_path / cell.name)
    heads = [engine.group_head(p, text, 7, 3 * 64) for p, text in enumerate(spec["prompts"])]
    assert heads[0][0].startswith("prompt 1: zxc, a yellow ring") and heads[0][0].endswith("… · seed 7")
    assert heads[1][0].startswith("prompt 2: a red circle") and len(heads[0]) == len(heads[1]) == 1
    assert all(engine.text_width(h[0]) <= 3 * 64 - 2 * engine.PAD for h in heads)
    assert engine.row_lines(files[0], 64) == ["20261207-070731-character /", "lora-000001 (epoch 1, step 4)",
                                              "held-out 0.1568"]
    assert engine.save_grid(tmp_path, spec, files) == tmp_path / "grid.png"
    sheet = Image.open(tmp_path / "grid.png")
    assert sheet.info["Description"].splitlines() == [
        "prompt 1: zxc, a yellow ring on a black background", "prompt 2: a red circle on a white background",
        "negative prompt: blurry", "base sd15.safetensors · sampler euler_a · 20 steps · guidance (CFG) 5 · 64x64"]
    ink = pixels(sheet).sum(axis=2) < 200  # black text on white; the cells are blue
    rows_end = engine.HEADER_HEIGHT + 64
    assert sheet.size == (engine.LABEL_WIDTH + 6 * 64, rows_end + engine.LINE * 4 + 2 * engine.PAD)
    # the first prompt's head runs on over its three strength columns (a column's own head is "strength 0.5")
    assert ink[:engine.GROUP_HEIGHT, engine.LABEL_WIDTH + 2 * 64:engine.LABEL_WIDTH + 3 * 64].any()
    assert ink[rows_end:, :].any(axis=1).sum() >= 4 * 8  # four lines of legend under the grid
