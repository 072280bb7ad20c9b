"""SD 3.5 / FLUX.1 LoRA training on a GPU: peak memory and speed per weight mode, beside bench/memory.py's estimate
(issue #17, point 4).

The full-size transformer (random weights: memory and speed do not depend on them) built from the shipped configs in
bf16, LoRA r16 on the blocks' Linears through the trainer's own network (trainer.networks.create), the trainer's
FlowMatchingLoss at 1024 px, batch 1, captions as random tensors of T5-XXL's and CLIP's shapes (cached, as a run
caches them), gradient checkpointing, AdamW. Modes: bf16, and fp8 storage (trainer.quantize.store_fp8, the run's
`unet_quantization = "fp8"`). Prints peak memory (torch.cuda.max_memory_allocated), the estimate for the same mode
and their ratio, and steps/s.

    python bench/flow_gpu.py                  # on a CUDA machine (FLUX.1 dev needs ~30 GB in bf16)
    python bench/flow_gpu.py --smoke          # the same code path on CPU at a tiny size (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu, memory  # noqa: E402

SMOKE = {"flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
         "sd3": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                     caption_projection_dim=32, pooled_projection_dim=32, sample_size=32, pos_embed_max_size=32,
                     qk_norm=None, dual_attention_layers=())}


def transformer(name: str, smoke: bool, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    arch, config_file, _, _ = memory.MODELS[name]
    config = json.loads((ROOT / "trainer" / "model_configs" / config_file).read_text())
    config |= SMOKE[arch] if smoke else {}
    cls = FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel
    with torch.device(device):
        return cls.from_config(config).to(dtype)


def run(name: str, mode: str, steps: int, device: str, smoke: bool) -> dict:
    from trainer import config
    from trainer.loss import FlowMatchingLoss
    from trainer.networks import create
    from trainer.quantize import store_fp8

    arch, _, px, text_tokens = memory.MODELS[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformer(name, smoke, device, dtype)
    model.requires_grad_(False)
    cfg = config.build("character", arch, {"network_dim": memory.RANK, "network_alpha": memory.RANK})
    net = create(cfg.network, arch, {"transformer": model})
    params = net.parameters_of("transformer")
    for p in params:
        p.data = p.data.float()
    if mode == "fp8":
        store_fp8(model, dtype)
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    c = model.config
    side = 16 if smoke else px // 8
    loss_fn = FlowMatchingLoss(arch, shift=3.0, guidance=1.0 if c.get("guidance_embeds") else None)
    latents = torch.randn(1, c.in_channels // (4 if arch == "flux" else 1), side, side, device=device, dtype=dtype)
    hidden = torch.randn(1, 8 if smoke else text_tokens, c.joint_attention_dim, device=device, dtype=dtype)
    pooled = {"pooled": torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype)}

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = loss_fn(model, latents, hidden, pooled)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak_bytes = gpu.timed(step, 1, steps, device)
    peak = peak_bytes / 1e9 if peak_bytes else None
    estimate = memory.estimate(name)  # less what this run does not hold: the CUDA context and the VAE
    expected = estimate["peak_fp8_ckpt" if mode == "fp8" else "peak_bf16_ckpt"] - memory.CONTEXT_GB - \
        memory.vae_gb(arch)
    return {"model": name, "mode": mode, "steps_per_s": round(steps / seconds, 3),
            "peak_gb": round(peak, 2) if peak else None, "estimate_gb": round(expected, 2),
            "ratio": round(peak / expected, 3) if peak else None}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code path only")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default=",".join(memory.MODELS), help="comma-separated, of: " + ", ".join(memory.MODELS))
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/flow_gpu.py needs a CUDA GPU (use --smoke to check the code path on CPU)")
    results = []
    for name in args.models.split(","):
        for mode in ("bf16", "fp8"):
            r = run(name, mode, 1 if args.smoke else args.steps, device, args.smoke)
            results.append(r)
            print(json.dumps(r), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
