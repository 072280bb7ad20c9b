"""Compare (issue #15): hot-swapping LoRA files on one loaded base against reloading the base for every file.

Both ways draw the same cells through the same code (trainer.compare's checks, HotSwap and cells; the trainer's
sampler): the base once per prompt (strength 0), then each file at each other strength. The naive way loads the
base again before each file; hot-swapping loads it once and swaps each file's ΔW in and out. The files are
LoRA, LoCon, LoKr and DoRA in turn (rank 8, conv rank 4, random factors, fp16), on the UNet and text encoder.
Each way runs in a process of its own, timed from its first load to its last cell, so its peak RSS (and peak CUDA
memory) is its own; "one pipeline" is a process that loads the base and draws one cell. The ways alternate over
--rounds rounds and the fastest run of each counts (on a shared machine another job only ever slows a run down).

    OMP_NUM_THREADS=1 .venv/bin/python bench/compare.py                 # the demo model: 4 files × 3 × 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/compare.py --scaling 1,2,4,8
    OMP_NUM_THREADS=1 .venv/bin/python bench/compare.py --model sd15 --files 4 --strengths 0,1 --prompts 1 \\
        --size 128 --steps 4                                            # full-size SD1.5, random weights
    .venv/bin/python bench/compare.py --quick                           # a tiny model, 2 steps: the code path

The last line is machine-readable: files=<n> hot_s=… naive_s=… speedup=… memory_ratio=… for the main count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("lora", "locon", "lokr", "dora")
PROMPTS = ["a yellow ring on a black background", "a red circle on a white background"]


def random_sd15(root: Path) -> Path:
    """A full-size SD1.5 diffusers folder with random weights, from the configs the project ships."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_models import tokenizer

    configs = ROOT / "trainer" / "model_configs" / "sd1"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")), tokenizer=tokenizer(),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        scheduler=PNDMScheduler.from_pretrained(configs / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15-random")
    return root / "sd15-random"


def model_source(name: str, root: Path) -> str:
    if name == "sd15":
        return str(random_sd15(root))
    if name == "tiny":
        from tests.tiny_models import save_both

        return str(save_both("sd1", root)[0])
    return name  # "demo", or a model folder / file


def make_files(source: str, count: int, root: Path) -> list[Path]:
    """`count` files of the base, LoRA / LoCon / LoKr / DoRA in turn, each on a fresh copy of it."""
    from trainer.config import NetworkConfig
    from trainer.export import save_atomic, to_kohya
    from trainer.loading import load_base
    from trainer.networks import create

    paths = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        base = load_base(source)
        cfg = NetworkConfig(network_type=kind, network_dim=8, network_alpha=4.0, conv_dim=0 if kind == "lora" else 4,
                            conv_alpha=2.0, lokr_factor=4)
        net = create(cfg, base.arch, {"unet": base.unet, "text_encoder": base.text_encoders[0]})
        torch.manual_seed(i)
        with torch.no_grad():
            for component in net.components:
                for p in net.parameters_of(component):
                    p.add_(torch.randn_like(p) * 0.05)
        paths.append(save_atomic(to_kohya(net, torch.float16), {"ss_network_module": "bench"},
                                 root / f"{i:02d}-{kind}.safetensors"))
    return paths


def spec(source: str, files: list[Path], args) -> dict:
    from trainer.compare_spec import checked

    return checked({"base": source, "files": [str(f) for f in files], "strengths": args.strengths,
                    "prompts": PROMPTS[: args.prompts], "seeds": [1], "sampler": "euler_a", "steps": args.steps,
                    "cfg_scale": 5.0, "width": args.size, "height": args.size,
                    "precision": "fp16" if torch.cuda.is_available() else "fp32"})


def loaded(spec: dict):
    from trainer.compare import DTYPES, base_weights
    from trainer.loading import load_base

    base = load_base(spec["base"], dtype=DTYPES[spec["precision"]])
    base.pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    base.pipeline.set_progress_bar_config(disable=True)
    return base, base_weights(base)


def draw_all(spec: dict, reload_per_file: bool) -> int:
    """Every cell of the grid, the base loaded once or again for each file; returns the cells drawn."""
    from trainer.compare import HotSwap, draw, inspect, plan

    base, weights = loaded(spec)
    files = [inspect(i, Path(p).stem, Path(p), base.arch, weights) for i, p in enumerate(spec["files"])]
    assert not any(f.problem for f in files), [f.problem for f in files]
    swap, row, cells = HotSwap(weights), None, plan(spec, files)
    for cell in cells:
        if reload_per_file and cell.file is not None and cell.file is not row:
            del base, weights, swap  # the naive way: a fresh pipeline for every file
            base, weights = loaded(spec)
            swap, row = HotSwap(weights), cell.file
        swap.use(None if cell.file is None else cell.file.path, cell.strength)
        draw(base, spec, cell)
    return len(cells)


def child(mode: str, spec_path: str) -> None:
    """One way, in this process: print its time, cells and peak memory."""
    from trainer.compare import Cell, draw

    settings = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    if mode == "pipeline":
        base, _ = loaded(settings)
        draw(base, settings, Cell(None, 0.0, 0, 1))
        cells = 1
    else:
        cells = draw_all(settings, reload_per_file=mode == "naive")
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"seconds": time.perf_counter() - start, "cells": cells, "cuda_mb": cuda,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(mode: str, settings: dict, root: Path) -> dict:
    path = root / f"spec-{mode}-{len(settings['files'])}.json"
    path.write_text(json.dumps(settings))
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo, sd15 (full size, random weights), or a model path")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--scaling", default="", help="also these file counts, e.g. 1,2,4,8")
    p.add_argument("--strengths", default="0,0.5,1")
    p.add_argument("--prompts", type=int, default=2, choices=(1, 2))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="each way this many times, interleaved; the fastest counts")
    p.add_argument("--quick", action="store_true", help="a tiny model, 2 steps, 2 files, 1 round")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    if args.quick:
        args.model, args.files, args.scaling, args.steps, args.size, args.rounds = "tiny", 2, "", 2, 64, 1
    counts = sorted({args.files, *(int(n) for n in args.scaling.split(",") if n)})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = model_source(args.model, root)
        files = make_files(source, max(counts), root)
        one = measure("pipeline", spec(source, files[:1], args), root)
        runs = {}  # (mode, files) -> the fastest of the rounds: another job on the machine only slows one down
        for r in range(args.rounds):
            for n in counts:
                for mode in ("hot", "naive") if r % 2 == 0 else ("naive", "hot"):
                    run = measure(mode, spec(source, files[:n], args), root)
                    if (mode, n) not in runs or run["seconds"] < runs[mode, n]["seconds"]:
                        runs[mode, n] = run
        for n in counts:
            hot, naive = runs["hot", n], runs["naive", n]
            results.append({"files": n, "cells": hot["cells"], "hot": hot, "naive": naive,
                            "speedup": naive["seconds"] / hot["seconds"],
                            "memory_ratio": hot["rss_mb"] / one["rss_mb"],
                            "cuda_ratio": hot["cuda_mb"] / one["cuda_mb"] if one["cuda_mb"] else None})
    print(f"one pipeline: {one['seconds']:.2f} s for 1 cell, peak RSS {one['rss_mb']:.0f} MB"
          + (f", CUDA {one['cuda_mb']:.0f} MB" if one["cuda_mb"] else ""))
    print(f"{'files':>5} {'cells':>5} {'hot s':>7} {'naive s':>8} {'speed-up':>8} {'hot RSS MB':>10} "
          f"{'naive RSS MB':>12} {'hot / one pipeline':>18}")
    for r in results:
        print(f"{r['files']:5d} {r['cells']:5d} {r['hot']['seconds']:7.2f} {r['naive']['seconds']:8.2f} "
              f"{r['speedup']:8.2f} {r['hot']['rss_mb']:10.0f} {r['naive']['rss_mb']:12.0f} "
              f"{r['memory_ratio']:18.3f}" + (f"  CUDA {r['cuda_ratio']:.3f}" if r["cuda_ratio"] else ""))
    main_row = next(r for r in results if r["files"] == args.files)
    print(f"files={args.files} hot_s={main_row['hot']['seconds']:.2f} naive_s={main_row['naive']['seconds']:.2f} "
          f"speedup={main_row['speedup']:.2f} memory_ratio={main_row['memory_ratio']:.3f}")
    return results


if __name__ == "__main__":
    main()
