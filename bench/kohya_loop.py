"""Our whole training loop against kohya sd-scripts' train_network.py, per step, on this machine's CPU.

bench/kohya_unet.py found the two UNets at parity; this times everything a step costs in each trainer: the batch
(data loader, tokenizing), the frozen text encoder, UNet forward and backward, gradient clipping, the optimizer,
the schedule, logging and whatever else runs between two steps. Both train the overhead benchmark's SD1.5-shaped
model (bench/overhead.py: UNet 64/128/128, CLIP hidden 128) on its 8 pictures (1024 px JPEG, square) at 128 px:
LoRA r4 alpha 4 on kohya's default UNet modules, UNet only, batch 2, AdamW lr 1e-4 (weight decay 0.01), constant
schedule, no warm-up, gradient clipping 1.0, fp32, SDPA, latents cached, no samples, saving only at the end, seed 42.

Each run is a fresh process. torch's global optimizer hooks (register_optimizer_step_pre_hook / _post_hook) and a
wrapper round torch.autograd.backward (which Tensor.backward calls) stamp each step in both trainers alike, nothing
of either trainer changed. `step` is (end of the last step - end of step SKIP) / the steps between: start-up,
caching and the final save left out, everything between steps in (epoch ends, every 4 steps here, included);
`median` is the median of those intervals. Its parts, means per step: `to_backward` (end of the last optimizer step
to the backward: batch, tokenizing, text encoder, UNet forward, loss, logging), `backward`, `to_optimizer` (gradient
sync and clipping), `optimizer`. `first_step`, `wall`: ms from process start to the end of the first step,
of the run.
Variants, interleaved over rounds in a rotated order, medians of the rounds:

- ours: the trainer as it ships (fused AdamW on CPU, captions encoded once: cache_text_encoder_outputs = true)
- ours-te: the text encoder run every step, as sd-scripts does for SD1 (cache_text_encoder_outputs = false)
- ours-te-loop: that, with torch's default AdamW (on CPU the per-tensor loop: optimizer_args = ["fused=False"])
- kohya: train_network.py as it ships (torch's default AdamW: the per-tensor loop on CPU)
- kohya-fused: with --optimizer_args fused=True
- kohya-workers (only when named in --variants): kohya with sd-scripts' default data loader
  (--max_data_loader_n_workers 8, capped at the CPU count, the workers not persistent); the others pass 0

What sd-scripts needs to run here; none of it touches its loop (the child sets it up, then calls what
train_network.py's __main__ calls):
- torchvision is not installed beside this torch (PyPI's wheel does not import with it). sd-scripts imports
  `torchvision.transforms` in library/train_util.py (IMAGE_TRANSFORMS = Compose([ToTensor(), Normalize([0.5],
  [0.5])]), used on every picture it caches; functional.pil_to_tensor in a captioning tool's dataset) and in
  library/utils.py (functional.gaussian_blur, for a blur option this run leaves off). WORK/shim/torchvision,
  first on the child's sys.path, provides Compose, ToTensor and Normalize in numpy/torch, pil_to_tensor, and a
  gaussian_blur that raises.
- library/original_unet.py hardcodes SD1.5's widths; its module constants are set to the model's before its UNet is
  built (as bench/kohya_unet.py's small-width check did: outputs bit-identical to diffusers').
- the CLIP tokenizer: --tokenizer_cache_dir WORK/tokenizers, with tests/tiny_models.tokenizer saved as
  openai_clip-vit-large-patch14, plus its vocab.json and merges.txt (transformers 5 saves only tokenizer.json;
  sd-scripts' transformers 4 builds the slow CLIPTokenizer from those two).
- the model: WORK/model-kohya links the UNet, VAE and scheduler of WORK/model and holds the text encoder with its
  keys prefixed `text_model.` (transformers 5 saves CLIPTextModel without it; 4.x would load none of the weights
  and train on a randomly initialised encoder of the same shape).
- the pictures: linked into a DreamBooth folder WORK/kohya_data/1_subject/ with their .txt captions
  (--caption_extension .txt; sd-scripts' default is .caption).

    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts   # 48d368f measured
    python3.11 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 && echo torch==2.13.0 > /tmp/c.txt
    /tmp/kvenv/bin/pip install -c /tmp/c.txt accelerate==1.6.0 transformers==4.54.1 diffusers==0.32.1 safetensors \\
        toml voluptuous imagesize einops opencv-python-headless ftfy huggingface-hub==0.34.3 numpy rich
    OMP_NUM_THREADS=1 .venv/bin/python bench/kohya_loop.py --sd-scripts /tmp/sd-scripts --kohya-python \\
        /tmp/kvenv/bin/python [--work DIR] [--steps 40] [--rounds 3] [--profile]

--profile then runs ours-te-loop and kohya once more with cProfile on 20 steady steps and prints where each spends
them. This file runs under both venvs: at module level it imports the standard library only. The last line is
machine-readable: ours_ms=… ours_te_ms=… ours_te_loop_ms=… kohya_ms=… kohya_fused_ms=… ratio=… (each as it
ships) ratio_fused=… (ours-te / kohya-fused) ratio_like=… (ours-te-loop / kohya).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = 5  # first steps left out: allocator, first-call costs
PROFILED = 20  # steps under cProfile with --profile
SEED = 42
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONHASHSEED": "0"}
VARIANTS = {  # name: (trainer, settings)
    "ours": ("ours", {}),
    "ours-te": ("ours", {"te_every_step": True}),
    "ours-te-loop": ("ours", {"te_every_step": True, "torch_default_adamw": True}),
    "kohya": ("kohya", {}),
    "kohya-fused": ("kohya", {"fused": True}),
    # sd-scripts' default loader (not in the default set): 8 workers, at most the CPU count, started every epoch
    "kohya-workers": ("kohya", {"default_workers": True}),
}
DEFAULT_VARIANTS = ("ours", "ours-te", "ours-te-loop", "kohya", "kohya-fused")
PARTS = ("step", "median", "to_backward", "backward", "to_optimizer", "optimizer", "first_step", "wall")
RATIOS = (("ratio", "ours", "kohya"),  # each as it ships
          ("ratio_fused", "ours-te", "kohya-fused"),  # text encoder every step, fused AdamW both
          ("ratio_like", "ours-te-loop", "kohya"))  # text encoder every step, torch's default AdamW both

SHIM_INIT = "from . import transforms  # a stand-in: see bench/kohya_loop.py in LoRA Studio\n"
SHIM_TRANSFORMS = '''"""torchvision.transforms as sd-scripts uses it: Compose, ToTensor, Normalize (train_util.py's
IMAGE_TRANSFORMS); functional.pil_to_tensor for its caching tools; anything else fails loudly."""
import types

import numpy as np
import torch


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:  # HWC uint8 (array or PIL image) -> CHW float in [0, 1]
    def __call__(self, pic):
        a = np.asarray(pic)
        if a.ndim == 2:
            a = a[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std


def _unsupported(*args, **kwargs):
    raise NotImplementedError("torchvision shim (bench/kohya_loop.py): not provided")


functional = types.SimpleNamespace(
    pil_to_tensor=lambda pic: torch.from_numpy(np.array(pic, np.uint8)).permute(2, 0, 1).contiguous(),
    gaussian_blur=_unsupported)
'''


# --- setup, in our venv ---------------------------------------------------------------------------------------


def prepare(work: Path) -> dict:
    """The model, pictures, sd-scripts' dataset folder, tokenizer and torchvision shim under `work` (kept)."""
    sys.path.insert(0, str(ROOT))
    from bench.overhead import build_images, build_model
    from tests.tiny_models import TOKENIZER, tokenizer

    model = work / "model" if (work / "model" / "model_index.json").exists() else build_model(work)
    images = work / "images" if (work / "images").exists() else build_images(work)
    subject = work / "kohya_data" / "1_subject"
    subject.mkdir(parents=True, exist_ok=True)
    for f in images.iterdir():
        if not (subject / f.name).exists():
            (subject / f.name).symlink_to(f)
    tok = work / "tokenizers" / "openai_clip-vit-large-patch14"
    if not tok.exists():
        tokenizer().save_pretrained(tok)
        for name in ("vocab.json", "merges.txt"):  # transformers 5 saves tokenizer.json alone; 4.x reads these
            shutil.copy(TOKENIZER / name, tok / name)
    shim = work / "shim" / "torchvision"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(SHIM_INIT)
    (shim / "transforms.py").write_text(SHIM_TRANSFORMS)
    return {"model": str(model), "kohya_model": str(kohya_model(model, work / "model-kohya")),
            "images": str(images), "kohya_data": str(subject.parent),
            "tokenizers": str(tok.parent), "shim": str(shim.parent)}


def kohya_model(model: Path, out: Path) -> Path:
    """The same model for sd-scripts' transformers 4: the text encoder's keys as 4.x names them (transformers 5
    saves CLIPTextModel without the `text_model.` prefix, and 4.x would leave it randomly initialised); the other
    parts linked."""
    from safetensors.torch import load_file, save_file

    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    for part in model.iterdir():
        if part.name != "text_encoder" and not (out / part.name).exists():
            (out / part.name).symlink_to(part)
    te = model / "text_encoder"
    shutil.copy(te / "config.json", out / "text_encoder" / "config.json")
    weights = load_file(te / "model.safetensors")
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()},
              out / "text_encoder" / "model.safetensors")
    return out


# --- children: one training run each, stamping every optimizer step -------------------------------------------


def stamp_steps(stamps_file: Path, steps: int, profile_to: str | None) -> None:
    """Record when each step's backward starts and ends and its optimizer step starts and ends (torch's global
    optimizer hooks; torch.autograd.backward, which Tensor.backward calls, wrapped); with `profile_to`, cProfile
    steps SKIP..SKIP+PROFILED there."""
    import cProfile

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    stamps = {"backward": [], "backward_end": [], "optimizer": [], "optimizer_end": []}
    profiler, backward = cProfile.Profile(), torch.autograd.backward

    def timed_backward(*args, **kwargs):
        stamps["backward"].append(time.perf_counter())
        backward(*args, **kwargs)
        stamps["backward_end"].append(time.perf_counter())

    def after_step(optimizer, args, kwargs):
        stamps["optimizer_end"].append(time.perf_counter())
        n = len(stamps["optimizer_end"])
        if profile_to and n == SKIP:
            profiler.enable()
        if profile_to and n == SKIP + PROFILED:
            profiler.disable()
            profiler.dump_stats(profile_to)
        if n == steps:
            stamps_file.write_text(json.dumps(stamps))

    torch.autograd.backward = timed_backward
    register_optimizer_step_pre_hook(lambda *a: stamps["optimizer"].append(time.perf_counter()))
    register_optimizer_step_post_hook(after_step)


def phases(stamps: dict) -> dict:
    """Seconds per step over the steady steps (after SKIP): all of it, and its parts; `median` of the intervals."""
    ends = stamps["optimizer_end"]
    k = range(SKIP, len(ends))
    return {
        "step": (ends[-1] - ends[SKIP - 1]) / len(k),
        "median": statistics.median(ends[i] - ends[i - 1] for i in k),
        # batch, text encoder, forward, loss, logging and all else between two steps
        "to_backward": statistics.fmean([stamps["backward"][i] - ends[i - 1] for i in k]),
        "backward": statistics.fmean([stamps["backward_end"][i] - stamps["backward"][i] for i in k]),
        # gradient sync, clipping
        "to_optimizer": statistics.fmean([stamps["optimizer"][i] - stamps["backward_end"][i] for i in k]),
        "optimizer": statistics.fmean([ends[i] - stamps["optimizer"][i] for i in k]),
    }


def child_ours(spec: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from trainer import config
    from trainer.train import train

    cfg = config.build("character", "sd15", {
        "pretrained_model_name_or_path": spec["model"], "train_data_dir": spec["images"], "resolution": 128,
        "min_bucket_reso": 64, "max_bucket_reso": 256, "num_repeats": 1, "network_type": "lora", "network_dim": 4,
        "network_alpha": 4.0, "conv_dim": 0, "text_encoder_lr": 0.0, "network_train_unet_only": True,
        "train_batch_size": 2, "max_train_epochs": 0, "max_train_steps": spec["steps"], "seed": SEED,
        "flip_aug": False, "cache_latents": True, "cache_latents_to_disk": False,
        "cache_text_encoder_outputs": not spec.get("te_every_step"), "shuffle_caption": False,
        "caption_dropout_rate": 0.0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "optimizer_type": "AdamW",
        "learning_rate": 1e-4, "unet_lr": 0.0, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "optimizer_args": ["fused=False"] if spec.get("torch_default_adamw") else [],
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "gradient_accumulation_steps": 1,
        "save_every_n_epochs": 0, "save_every_n_steps": 0, "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
        "validation_split": 0.0, "mixed_precision": "no", "gradient_checkpointing": False, "attention": "sdpa"})
    train(cfg, Path(tempfile.mkdtemp(dir=spec["out"], prefix="ours-")))


def patch_unet_widths(model: str) -> None:
    """library/original_unet.py's SD1.5 widths -> the model's (read where its UNet is built)."""
    from library import original_unet as ou

    c = json.loads((Path(model) / "unet" / "config.json").read_text())
    ou.BLOCK_OUT_CHANNELS = tuple(c["block_out_channels"])
    ou.TIMESTEP_INPUT_DIM = c["block_out_channels"][0]
    ou.TIME_EMBED_DIM = c["block_out_channels"][0] * 4
    ou.LAYERS_PER_BLOCK = c["layers_per_block"]
    ou.LAYERS_PER_BLOCK_UP = c["layers_per_block"] + 1
    ou.DOWN_BLOCK_TYPES = list(c["down_block_types"])
    ou.UP_BLOCK_TYPES = list(c["up_block_types"])


def kohya_args(spec: dict) -> list[str]:
    out = tempfile.mkdtemp(dir=spec["out"], prefix="kohya-")
    args = ["--pretrained_model_name_or_path", spec["kohya_model"], "--train_data_dir", spec["kohya_data"],
            "--caption_extension", ".txt", "--output_dir", out, "--output_name", "lora",
            "--save_model_as", "safetensors", "--tokenizer_cache_dir", spec["tokenizers"],
            "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
            "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
            "--network_train_unet_only", "--train_batch_size", "2", "--max_train_steps", str(spec["steps"]),
            "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--mixed_precision", "no", "--sdpa",
            "--cache_latents", "--seed", str(SEED)]
    if not spec.get("default_workers"):
        args += ["--max_data_loader_n_workers", "0"]  # batches in the training process, as ours
    if spec.get("fused"):
        args += ["--optimizer_args", "fused=True"]
    return args


def child_kohya(spec: dict) -> None:
    sys.path[:0] = [spec["shim"], spec["sd_scripts"]]
    patch_unet_widths(spec["model"])
    import train_network
    from library import train_util

    parser = train_network.setup_parser()
    args = parser.parse_args(kohya_args(spec))
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    train_network.NetworkTrainer().train(args)


def child(spec: dict) -> None:
    stamp_steps(Path(spec["stamps"]), spec["steps"], spec.get("profile"))
    (child_ours if spec["trainer"] == "ours" else child_kohya)(spec)


# --- the parent: rounds, figures -----------------------------------------------------------------------------


def run_variant(name: str, paths: dict, args, work: Path, profile: str | None = None) -> dict:
    trainer, settings = VARIANTS[name]
    spec = {**paths, **settings, "trainer": trainer, "steps": args.steps, "out": str(work / "runs"),
            "sd_scripts": str(args.sd_scripts), "stamps": str(work / "stamps.json"), "profile": profile}
    Path(spec["stamps"]).unlink(missing_ok=True)
    python = sys.executable if trainer == "ours" else str(args.kohya_python)
    log = work / "logs" / f"{name}-{time.strftime('%H%M%S')}.log"
    start = time.perf_counter()  # CLOCK_MONOTONIC: the children's stamps are on the same clock
    with log.open("w") as f:
        subprocess.run([python, __file__, "--child", json.dumps(spec)], cwd=ROOT, env={**os.environ, **ENV},
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    stamps = json.loads(Path(spec["stamps"]).read_text())
    log.with_suffix(".json").write_text(json.dumps(stamps))
    # start-up: process start to the end of the first step (imports, loading, caching); wall: the whole run
    return {**phases(stamps), "first_step": stamps["optimizer_end"][0] - start, "wall": wall}


def print_profile(path: Path, title: str, top: int = 25) -> None:
    import pstats

    print(f"\n== {title}: {PROFILED} steps, by own time ==")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)
    print(f"== {title}: by cumulative time ==")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top + 15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd-scripts", type=Path, help="an sd-scripts checkout")
    p.add_argument("--kohya-python", type=Path, help="python of a venv with sd-scripts' requirements")
    p.add_argument("--work", type=Path, help="model, pictures, runs and logs (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not (args.sd_scripts and args.kohya_python):
        p.error("--sd-scripts and --kohya-python are required")
    if args.steps < SKIP + 2:
        p.error(f"--steps must be at least {SKIP + 2}: the first {SKIP} are left out")
    work = (args.work or Path(tempfile.mkdtemp(prefix="kohya-loop-"))).resolve()
    for sub in ("runs", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    names = args.variants.split(",")
    results = {n: [] for n in names}
    for r in range(args.rounds):  # rotated order, so drift in the machine's speed hits all alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run_variant(name, paths, args, work))
            print(f"round {r + 1} {name}: {results[name][-1]['step'] * 1000:.1f} ms/step", flush=True)
    ms = {n: {part: statistics.median(x[part] for x in v) * 1000 for part in v[0]} for n, v in results.items()}
    print("\nms per step, median of the rounds (step: mean of the steady steps; median: of their intervals;"
          " first_step, wall: ms of the run from process start)")
    print(f"{'variant':14}" + "".join(f"{part:>13}" for part in PARTS))
    for n in names:
        print(f"{n:14}" + "".join(f"{ms[n][part]:13.1f}" for part in PARTS))
    if args.profile:
        for name in ("ours-te-loop", "kohya"):
            prof = work / f"profile-{name}.pstats"
            run_variant(name, paths, args, work, profile=str(prof))
            print_profile(prof, name)
    key = lambda n: n.replace("-", "_") + "_ms"  # noqa: E731
    step = {n: ms[n]["step"] for n in names}
    line = " ".join(f"{key(n)}={step[n]:.1f}" for n in names)
    for label, a, b in RATIOS:
        if {a, b} <= step.keys():
            line += f" {label}={step[a] / step[b]:.3f}"
    print(line)


if __name__ == "__main__":
    main()
