"""What our trainer costs over the bare loop the diffusers LoRA example writes, on this machine's CPU.

Same SD1.5-shaped model, same images, batch and seed. Runs are interleaved after a warm-up and compared by medians:

- step ratio: median step time through `trainer.train` / the bare loop (goal <= 1.05)
- RSS ratio: peak resident memory of a process that trains through our trainer / one with the bare loop (<= 1.10)
- cache speed-up: one epoch with VAE-encoding every step / with cached latents (>= 1.5)
- first-step ratio: `python -m trainer` start to its first step / loading the model alone

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead.py [--steps 30] [--rounds 3]

The last line is machine-readable: step_ratio=… rss_ratio=… cache_speedup=… first_step_ratio=…
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESOLUTION = 128  # latents 16x16
SOURCE_SIZE = 1024  # the pictures on disk
BATCH = 2


def build_model(root: Path) -> Path:
    """An SD1.5-shaped model sized so a step takes a few hundred ms on one CPU thread."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tests.tiny_models import BETAS, text_config, tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention_dim=128,
                                attention_head_dim=8, norm_num_groups=32, sample_size=16,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config("quick_gelu", hidden=128)),
                                   tokenizer=tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**BETAS, skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "model")
    return root / "model"


def build_images(root: Path, n: int = 8) -> Path:
    from tests.test_training import draw_dataset

    from PIL import Image

    folder = draw_dataset(root / "images", n)
    for p in sorted(folder.glob("*.png")):
        # photos as people bring them: larger than the training size, as JPEG; square, so every image lands in
        # one bucket, as the bare loop assumes
        Image.open(p).convert("RGB").resize((SOURCE_SIZE, SOURCE_SIZE)).save(p.with_suffix(".jpg"), quality=92)
        p.unlink()
    return folder


def bare_loop(model_dir: Path, images: Path, steps: int, cached: bool = True) -> list[float]:
    """The diffusers train_text_to_image_lora.py loop, reduced to its core: step times in seconds."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    from trainer.networks import find_targets  # the same modules our trainer wraps (kohya's defaults)

    targets = [t.path for t in find_targets("sd1", {"unet": unet}, with_convs=False)]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=True, target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    files = sorted(images.glob("*.jpg"))
    captions = [p.with_suffix(".txt").read_text() for p in files]

    def load(p):  # the example's transforms: resize, centre crop, to [-1, 1]
        im = Image.open(p).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)

    pixels = [load(p) for p in files]
    latents_all = None
    if cached:
        with torch.no_grad():
            latents_all = [vae.encode(x[None]).latent_dist.sample()[0] * vae.config.scaling_factor for x in pixels]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [(step * BATCH + k) % len(pixels) for k in range(BATCH)]
        if cached:
            latents = torch.stack([latents_all[i] for i in idx])
        else:
            with torch.no_grad():
                latents = vae.encode(torch.stack([pixels[i] for i in idx])).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        ids = tok([captions[i] for i in idx], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,))
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def our_run(model_dir: Path, images: Path, root: Path, steps: int, cached: bool = True,
            extra: dict | None = None) -> list[float]:
    """The same training through trainer.train (with `extra` settings on top): step times from its own events."""
    from trainer import config
    from trainer.events import read_all
    from trainer.train import train

    run_dir = Path(tempfile.mkdtemp(dir=root, prefix="run-"))
    cfg = config.build("character", "sd15", {
        "pretrained_model_name_or_path": str(model_dir), "train_data_dir": str(images),
        "resolution": RESOLUTION, "min_bucket_reso": 64, "max_bucket_reso": 256, "num_repeats": 1,
        "network_dim": 4, "network_alpha": 2.0, "text_encoder_lr": 0.0, "network_train_unet_only": True,
        "train_batch_size": BATCH, "max_train_epochs": 0, "max_train_steps": steps, "flip_aug": False,
        "cache_latents": cached, "cache_text_encoder_outputs": False, "shuffle_caption": False, "caption_dropout_rate": 0.0, "min_snr_gamma": 0.0,
        "noise_offset": 0.0, "save_every_n_epochs": 0, "save_every_n_steps": 0, "sample_every_n_epochs": 0,
        "sample_every_n_steps": 0, "max_grad_norm": 0.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "mixed_precision": "no"}, extra or {})
    train(cfg, run_dir)
    stamps = [e["time"] for e in read_all(run_dir) if e["type"] == "step"]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def child(kind: str, model_dir: str, images: str, root: str, steps: int) -> None:
    """Run one trainer in this process and print its peak RSS (for the memory ratio)."""
    if kind == "bare":
        bare_loop(Path(model_dir), Path(images), steps)
    else:
        our_run(Path(model_dir), Path(images), Path(root), steps)
    print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss(kind: str, model_dir: Path, images: Path, root: Path, steps: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(model_dir), str(images), str(root),
                          str(steps)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_kb"]


def first_step_ratio(model_dir: Path, images: Path, root: Path) -> tuple[float, float, float]:
    """(seconds from `python -m trainer` start to its first step, seconds to load the model alone, ratio)."""
    from trainer import config
    from trainer.events import read_all

    run_dir = root / "first-step"
    (run_dir).mkdir()
    cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": str(model_dir),
                                             "train_data_dir": str(images), "resolution": RESOLUTION,
                                             "min_bucket_reso": 64, "max_bucket_reso": 256, "num_repeats": 1,
                                             "max_train_epochs": 0, "max_train_steps": 1, "save_every_n_epochs": 0,
                                             "sample_every_n_epochs": 0, "sample_every_n_steps": 0})
    config.save(cfg, run_dir / "config.toml")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "trainer", str(run_dir)], cwd=ROOT, check=True, capture_output=True)
    first = next(e["time"] for e in read_all(run_dir) if e["type"] == "step") - t0
    code = (f"import time, sys; t=time.time(); sys.path.insert(0, {str(ROOT)!r}); "
            f"from trainer.loading import load_base; load_base({str(model_dir)!r}); print(time.time() - t)")
    t0 = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    load = time.time() - t0  # process start + imports + load, the same things the trainer's figure includes
    return first, load, first / load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, model_dir, images, root, steps = args.child
        return child(kind, model_dir, images, root, int(steps))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, images = build_model(root), build_images(root)
        bare_loop(model_dir, images, 3)  # warm-up: imports, allocator, kernels
        ours, bare, uncached_steps = [], [], []
        for _ in range(args.rounds):  # interleaved, so drift in the machine's speed hits all alike
            bare += bare_loop(model_dir, images, args.steps)[2:]
            ours += our_run(model_dir, images, root, args.steps)[2:]  # cached latents (the default)
            uncached_steps += our_run(model_dir, images, root, args.steps, cached=False)[2:]
        step_ratio = statistics.median(ours) / statistics.median(bare)
        uncached, cached = statistics.median(uncached_steps), statistics.median(ours)
        rss_ratio = peak_rss("ours", model_dir, images, root, args.steps) / peak_rss("bare", model_dir, images,
                                                                                     root, args.steps)
        first, load, first_ratio = first_step_ratio(model_dir, images, root)
    print(f"bare step {statistics.median(bare) * 1000:.1f} ms, ours {statistics.median(ours) * 1000:.1f} ms "
          f"(median of {len(bare)} steps each)")
    print(f"uncached step {uncached * 1000:.1f} ms, cached {cached * 1000:.1f} ms")
    print(f"python -m trainer to first step {first:.2f} s; loading the model alone {load:.2f} s")
    print(f"step_ratio={step_ratio:.3f} rss_ratio={rss_ratio:.3f} cache_speedup={uncached / cached:.2f} "
          f"first_step_ratio={first_ratio:.2f}")


if __name__ == "__main__":
    main()
