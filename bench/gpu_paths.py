"""Every path that only a GPU runs in full, on the tiny models, in one short command for a session lent a GPU.

The test suite runs on CPU, where every tensor is on one device and mixed precision is off; a GPU run is where a
module left on the CPU (LyCORIS keeps its modules beside the model), a bf16 / fp8 cast or a text encoder sent off
the device shows. Here each family (SD 1.x, SDXL, FLUX.1, SD 3.5) trains every method it offers for 2 steps on the
device with mixed precision (bf16 on CUDA), a held-out picture and a sample at the end; SD 3.5 / FLUX.1 also with
the transformer in fp8 and with CLIP trained beside it, SD 1.x in NF4 when bitsandbytes is installed; then a sweep
(trials sharing one forward)
and a compare of two of the files, on the same device. Each row says ok, with its last loss, or the error's first
line; the exit status is the number of failures.

    .venv/bin/python bench/gpu_paths.py                # on a CUDA machine: every row (a few minutes)
    .venv/bin/python bench/gpu_paths.py --smoke        # a few rows on CPU: the code path (the test suite runs it)

With $OUT set, the rows are also written to $OUT/gpu_paths.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOW = ("flux", "sd3")
SMOKE = [("sd15", "lora", "none"), ("sd15", "loha", "none"), ("flux", "lokr", "none"), ("flux", "lora", "fp8")]
# (family, network_type, mode): mode "none", "fp8", "nf4" (the denoiser's bits) or "clip" (CLIP trained too)


def settings(base: Path, pictures: Path, family: str, method: str, mode: str) -> dict:
    """Two steps of batch 2 at 64 px, one picture of six held out, a sample after the last step; `mode` "fp8" /
    "nf4" holds the denoiser in those bits, "clip" trains CLIP too (SD 3.5 / FLUX.1)."""
    cuda = torch.cuda.is_available()
    quantization = mode if mode in ("fp8", "nf4") else "none"
    clip = {"network_train_unet_only": False} if mode == "clip" else {}
    return {
        "model": {"pretrained_model_name_or_path": str(base), "mixed_precision": "bf16" if cuda else "no",
                  "unet_quantization": quantization, "gradient_checkpointing": quantization == "fp8"},
        "data": {"train_data_dir": str(pictures), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                 "num_repeats": 1, "bucket_no_upscale": False, "validation_split": 0.17},
        "network": {"network_type": method, "network_dim": 4, "network_alpha": 2.0,
                    "conv_dim": 4 if method == "locon" else 0, "conv_alpha": 2.0, **clip},
        "optimizer": {"text_encoder_lr": 1e-4} if clip else {},
        "training": {"train_batch_size": 2, "max_train_steps": 2, "max_train_epochs": 0, "save_every_n_epochs": 0},
        "sample": {"sample_every_n_epochs": 1, "sample_steps": 2,
                   "sample_sampler": "euler" if family in FLOW else "euler_a"},
    }


def rows_to_run(smoke: bool) -> list[tuple[str, str, str]]:
    from trainer import methods

    if smoke:
        return SMOKE
    rows = []
    for family in ("sd15", "sdxl", "flux", "sd3"):
        rows += [(family, m, "none") for m in methods.NAMES if not (family in FLOW and m == "locon")]
    rows += [("flux", "lora", "fp8"), ("sd3", "lora", "fp8"), ("flux", "vera", "fp8"), ("flux", "lora", "clip"),
             ("sd3", "lokr", "clip")]
    if importlib.util.find_spec("bitsandbytes") and torch.cuda.is_available():
        rows += [("sd15", "lora", "nf4")]
    return rows


def train_one(root: Path, bases: dict, pictures: Path, family: str, method: str, mode: str) -> dict:
    from trainer import config
    from trainer.events import read_all
    from trainer.train import train

    run_dir = root / "runs" / f"{family}-{method}-{mode}"
    cfg = config.build("character", family, settings(bases[family], pictures, family, method, mode))
    config.save(cfg, run_dir / "config.toml")
    final = train(config.load(run_dir / "config.toml"), run_dir)
    events = read_all(run_dir)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    held = [e["loss"] for e in events if e["type"] == "validation"]
    samples = [e for e in events if e["type"] == "sample"]
    if len(losses) != 2 or not all(math.isfinite(v) for v in losses + held) or not held or not samples:
        raise AssertionError(f"losses {losses}, held-out {held}, {len(samples)} sample(s)")
    if final is None or not final.is_file():
        raise AssertionError("no file written")
    return {"loss": losses[-1], "held_out": held[-1], "file": str(final)}


def sweep_one(root: Path, bases: dict, pictures: Path, family: str) -> dict:
    from trainer import config, sweep
    from trainer.sweep_run import train_sweep
    from trainer.train import StopFlag

    cfg = config.build("character", family, settings(bases[family], pictures, family, "lora", "none"))
    config.save(cfg, root / f"sweep-{family}.toml")
    folder = sweep.create(root / "runs", root / f"sweep-{family}.toml",
                          {"network_type": {"values": ["lora", "lokr"]}}, "grid", name=f"sweep-{family}")
    if train_sweep(folder, StopFlag()) != "done":
        raise AssertionError("the sweep did not finish")
    state = sweep.read(folder)
    if [t["state"] for t in state["trials"]] != ["done", "done"]:
        raise AssertionError(f"trials {[(t['name'], t['state']) for t in state['trials']]}")
    return {"loss": state["ranking"][0]["value"], "held_out": state["ranking"][0]["value"], "file": str(folder)}


def compare_two(root: Path, bases: dict, family: str, files: list[str]) -> dict:
    from PIL import Image

    from trainer import compare
    from trainer.compare_spec import SPEC_FILE, checked

    folder = root / "runs" / f"compare-{family}"
    folder.mkdir(parents=True)
    spec = checked({"base": str(bases[family]), "files": files, "strengths": [0, 1], "prompts": ["a red circle"],
                    "seeds": [1], "sampler": "euler" if family in FLOW else "euler_a", "steps": 2,
                    "cfg_scale": 4.0, "width": 64, "height": 64,
                    "precision": "fp16" if torch.cuda.is_available() else "fp32"})
    (folder / SPEC_FILE).write_text(json.dumps(spec), encoding="utf-8")
    if compare.compare(folder, SimpleNamespace(requested=False)) != "done":
        raise AssertionError("the compare did not finish")
    with Image.open(folder / "grid.png") as grid:
        return {"loss": None, "held_out": None, "file": f"grid.png {grid.size[0]}x{grid.size[1]}"}


def attempt(rows: list, name: str, work) -> None:
    start = time.perf_counter()
    try:
        row = {"row": name, "ok": True, **work(), "error": ""}
    except Exception as e:  # a row that fails says why and the others still run
        traceback.print_exc()
        row = {"row": name, "ok": False, "loss": None, "held_out": None, "file": "",
               "error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {name:28s} {row['seconds']:6.1f} s "
          + (f"loss {row['loss']:.4f}" if row["ok"] and row["loss"] is not None else row["error"] or row["file"]),
          flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few rows (what runs on CPU in the test suite)")
    args = p.parse_args(argv)
    from diffusers.utils import logging

    from tests.test_training import draw_dataset
    from tests.tiny_models import flow_layouts, save_both

    logging.set_verbosity_error()
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bases = {"sd15": save_both("sd1", root)[0], "sdxl": save_both("sdxl", root)[0],
                 "flux": flow_layouts("flux", root)["folder"], "sd3": flow_layouts("sd3", root)["folder"]}
        pictures = draw_dataset(root / "pictures", 6)
        for family, method, mode in rows_to_run(args.smoke):
            attempt(rows, f"{family} {method}" + (f" {mode}" if mode != "none" else ""),
                    lambda f=family, m=method, q=mode: train_one(root, bases, pictures, f, m, q))
        for family in ("sd15",) if args.smoke else ("sd15", "flux"):
            attempt(rows, f"{family} sweep lora+lokr", lambda f=family: sweep_one(root, bases, pictures, f))
        for family in ("sd15",) if args.smoke else ("sd15", "sdxl", "flux", "sd3"):
            files = [r["file"] for r in rows if r["ok"] and r["row"] in (f"{family} lora", f"{family} loha",
                                                                           f"{family} lokr")]
            attempt(rows, f"{family} compare", lambda f=family, fs=files[:2]: compare_two(root, bases, f, fs))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} rows ok")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_paths.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(sum(not r["ok"] for r in main()))
