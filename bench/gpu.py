"""LoRA training speed on a GPU against what the hardware allows.

Full-size SD1.5 (512 px, batch 32) and SDXL (1024 px, batch 8), randomly initialised (speed does not depend on the
weights), LoRA r16 on the attention projections, bf16 frozen weights, cached latents and text embeddings (random
tensors of the right shapes), SDPA, fused AdamW. Modes: eager, torch.compile, gradient checkpointing, and a
low-VRAM SDXL batch-1 mode (checkpointing). Prints samples/s, MFU against 790 TFLOP/s with model FLOPs per sample
of 1.7245 TFLOP (SD1.5) and 14.188 TFLOP (SDXL), and peak VRAM.

    python bench/gpu.py                 # on a CUDA machine
    python bench/gpu.py --smoke         # the same code path on CPU at a tiny size (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 790.0
FLOPS_PER_SAMPLE = {"sd15": 1.7245e12, "sdxl": 14.188e12}


def unet_config(arch: str, smoke: bool) -> dict:
    cfg = json.loads((ROOT / "trainer" / "model_configs" / ("sd1" if arch == "sd15" else "sdxl") / "unet" /
                      "config.json").read_text())
    if smoke:  # same block structure, tiny widths
        cfg.update(block_out_channels=[32, 64] if arch == "sd15" else [32, 64], layers_per_block=1,
                   cross_attention_dim=64, norm_num_groups=32)
        if arch == "sd15":
            cfg.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
        else:
            cfg.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1],
                       attention_head_dim=[1, 1], addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=32 + 6 * 8)
    return cfg


def run(arch: str, mode: str, batch: int, steps: int, device: str, smoke: bool) -> dict:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    cfg = unet_config(arch, smoke)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_config(cfg).to(device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if mode in ("checkpointing", "lowvram"):
        unet.enable_gradient_checkpointing()
    forward = torch.compile(unet) if mode == "compile" else unet
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    side = (8 if smoke else (64 if arch == "sd15" else 128))
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    context = torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)
    added = None
    if arch == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                 "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            pred = forward(latents, t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), latents.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed(step, 2 if smoke else 5, steps, device)
    samples_per_s = batch * steps / seconds
    return {"arch": arch, "mode": mode, "batch": batch, "samples_per_s": round(samples_per_s, 2),
            "mfu": round(samples_per_s * FLOPS_PER_SAMPLE[arch] / (PEAK_TFLOPS * 1e12), 4),
            "peak_vram_gb": round(peak / 2**30, 2) if peak else None}


def timed(step, warmup: int, steps: int, device: str) -> tuple[float, float | None]:
    """(seconds for `steps` calls of `step` after `warmup` ones, peak GPU memory in bytes over those; None on CPU)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() if device == "cuda" else None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code path only")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (use --smoke to check the code path on CPU)")
    plan = [("sd15", "eager", 32), ("sd15", "compile", 32), ("sd15", "checkpointing", 32),
            ("sdxl", "eager", 8), ("sdxl", "compile", 8), ("sdxl", "checkpointing", 8), ("sdxl", "lowvram", 1)]
    if args.smoke:  # compile needs a C compiler toolchain and minutes on CPU: the smoke run checks the rest
        plan = [(a, m, 2) for a, m, _ in plan if m != "compile"]
    results = []
    for arch, mode, batch in plan:
        r = run(arch, mode, batch, 2 if args.smoke else args.steps, device, args.smoke)
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
