"""Does training teach the concept? A LoRA trained on the demo dataset, measured on pictures it never saw.

- held-out pictures of the concept: the LoRA lowers their denoising loss (fixed noise and timesteps) by at least
  30 % against the base;
- samples for the trigger prompt (16 seeds, euler, 20 steps, cfg 5) are judged by a detector written from the
  drawing rules (`demo.build_demo.judge`): the LoRA's show the concept on most seeds (9 or more), the base's on
  at most 2;
- at strength 0 the adapter gives the base's numbers back exactly (its loss, and its samples pixel for pixel), so
  the test can fail;
- the run's own held-out loss (`validation_dir` = the same held-out pictures) falls from the base to the final file.
"""

import json
import time

import pytest
import torch
from diffusers import DDPMScheduler

from demo import build_demo as world
from trainer import config, text
from trainer.checkpoint import latest, load_adapter
from trainer.events import read_all
from trainer.loading import DEMO_MODEL, load_base
from trainer.loss import DenoisingLoss
from trainer.networks import create
from trainer.sampling import generate
from trainer.train import train

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="demo/base-model is not built")]
PROMPT = f"{world.TRIGGER}, a yellow {world.CONCEPT} on a black background"
SEEDS = range(16)


def held_out_loss(model, pictures) -> float:
    """Mean denoising loss over held-out pictures, at noise and timesteps fixed by a seed."""
    latents = model.vae.encode(world.to_tensor([im for im, _ in pictures])).latent_dist.mean
    latents = latents * model.vae.config.scaling_factor
    hidden, _ = text.encode("sd1", model.tokenizers, model.text_encoders, [c for _, c in pictures])
    loss = DenoisingLoss(DDPMScheduler.from_config(model.pipeline.scheduler.config), "epsilon")
    values = [loss(model.unet, latents, hidden, generator=torch.Generator().manual_seed(k)).item() for k in range(4)]
    return sum(values) / len(values)


def sample(model, seed: int):
    return generate(model, PROMPT, sampler="euler", steps=20, cfg_scale=5.0, seed=seed, width=64, height=64)


def shows_concept(model) -> int:
    """On how many of the seeds the trigger prompt's sample is judged to show the concept."""
    return sum(world.judge(sample(model, s))["shape"] == world.CONCEPT for s in SEEDS)


@torch.no_grad()
def test_the_lora_learns_the_concept(tmp_path):
    run_dir, held_dir = tmp_path / "run", tmp_path / "held-out"
    held_dir.mkdir()
    for i, (im, caption) in enumerate(world.concept_pictures(seed=1, n=8)):
        im.save(held_dir / f"held-{i}.png")
        (held_dir / f"held-{i}.txt").write_text(caption)
    cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": "demo",
                                             "train_data_dir": str(world.DEMO / "dataset"),
                                             "sample_every_n_epochs": 0, "save_every_n_epochs": 0,
                                             "validation_dir": str(held_dir)})
    started = time.time()
    with torch.enable_grad():
        train(cfg, run_dir)
    minutes = (time.time() - started) / 60

    base = load_base("demo")
    held_out = world.concept_pictures(seed=1, n=8)
    base_loss, base_hits = held_out_loss(base, held_out), shows_concept(base)

    tuned = load_base("demo")
    comps = {"unet": tuned.unet, "text_encoder": tuned.text_encoders[0]}
    net = create(cfg.network, "sd1", comps)
    load_adapter(latest(run_dir), net)
    lora_loss, lora_hits = held_out_loss(tuned, held_out), shows_concept(tuned)
    net.set_multiplier(0.0)
    off_loss = held_out_loss(tuned, held_out)
    off_same = [sample(tuned, s).tobytes() == sample(base, s).tobytes() for s in SEEDS[:2]]

    report = {"concept": world.CONCEPT, "train_minutes": round(minutes, 2), "base_loss": round(base_loss, 4),
              "lora_loss": round(lora_loss, 4), "loss_drop": round(1 - lora_loss / base_loss, 3),
              "base_hits": base_hits, "lora_hits": lora_hits, "strength0_loss": round(off_loss, 4),
              "strength0_same_samples": off_same, "seeds": len(SEEDS)}
    run_held = {e["step"]: e["loss"] for e in read_all(run_dir) if e["type"] == "validation"}
    report |= {"run_held_out_base": round(run_held[0], 4), "run_held_out_final": round(run_held[max(run_held)], 4)}
    print(json.dumps(report))
    assert lora_loss <= 0.7 * base_loss, report
    assert lora_hits > len(SEEDS) // 2, report  # most seeds
    assert base_hits <= 2, report
    assert off_loss == pytest.approx(base_loss, rel=1e-5) and all(off_same), report
    assert sorted(run_held) == [0, max(run_held)] and run_held[max(run_held)] < run_held[0], report
