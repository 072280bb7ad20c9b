"""Our UNet (diffusers' UNet2DConditionModel) against kohya sd-scripts' own (library/original_unet.py), same weights.

The question it answers: is diffusers' UNet why a training step here is slower than sd-scripts' on the same CPU run?
Both UNets are built at SD1.5's widths (sd-scripts hardcodes them) from the config this project ships, the diffusers
weights loaded into sd-scripts' model (its parameter names are diffusers'), both on torch's SDPA attention. A step is
what LoRA training costs the UNet: frozen weights, forward and backward to the input, fp32; the two alternate after a
warm-up and the medians count.

    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    OMP_NUM_THREADS=1 .venv/bin/python bench/kohya_unet.py --sd-scripts /tmp/sd-scripts [--latent 16] [--rounds 8]

sd-scripts is not a dependency: the script reads its one file from the checkout given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def kohya_unet_module(sd_scripts: Path):
    """library/original_unet.py of an sd-scripts checkout, with its logging helper stubbed (the rest is torch)."""
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    sys.modules.setdefault("library", types.ModuleType("library"))
    sys.modules["library.utils"] = utils
    spec = importlib.util.spec_from_file_location("original_unet", sd_scripts / "library" / "original_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(unet, x, t, c) -> None:
    x = x.clone().requires_grad_(True)
    unet(x, t, c).sample.pow(2).mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", type=Path, required=True, help="an sd-scripts checkout")
    parser.add_argument("--latent", type=int, default=16, help="latent size (16 = 128 px pictures)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ROOT / "trainer/model_configs/sd1/unet"))
    theirs = kohya_unet_module(args.sd_scripts).UNet2DConditionModel(
        sample_size=64, attention_head_dim=8, cross_attention_dim=768)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.set_use_sdpa(True)
    for unet in (ours, theirs):
        unet.requires_grad_(False).train()
    x, t, c = torch.randn(1, 4, args.latent, args.latent), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.no_grad():
        difference = (ours(x, t, c).sample - theirs(x, t, c).sample).abs().max().item()
    unets = {"diffusers": ours, "sd-scripts": theirs}
    times = {name: [] for name in unets}
    for unet in unets.values():
        step(unet, x, t, c)  # warm-up
    for r in range(args.rounds):
        for name in list(unets)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            step(unets[name], x, t, c)
            times[name].append(time.perf_counter() - start)
    ms = {name: round(statistics.median(v) * 1000, 1) for name, v in times.items()}
    print(json.dumps({"latent": args.latent, "max_abs_difference": difference, "median_step_ms": ms}))
    print(f"latent={args.latent} diffusers_ms={ms['diffusers']} sd_scripts_ms={ms['sd-scripts']} "
          f"ratio={ms['diffusers'] / ms['sd-scripts']:.3f}")


if __name__ == "__main__":
    main()
