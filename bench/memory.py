"""Expected peak GPU memory of SD 3.5 / FLUX.1 LoRA training, per family and weight mode (issue #17, point 4), from a
calculation shown here: every count comes from the real models built on the meta device from the configs this
project ships (trainer/model_configs/), with the trainer's own code for what LoRA adapts (trainer.networks.base
.flow_targets) and for what fp8 stores in 8 bits (trainer.quantize.store_fp8, diffusers' layerwise casting).

    peak = transformer weights (bf16: 2 B a parameter; fp8: 1 B for the Linears it stores in fp8, 2 B for the rest)
         + the adapter in fp32: weights 4 B + gradients 4 B + AdamW's two moments 8 B = 16 B a LoRA parameter
         + activations, batch 1, with gradient checkpointing: every block's input (tokens × width × 2 B) and one
           block's working set, ~34 × tokens × width bytes (Korthikanti et al. 2022, "Reducing Activation
           Recomputation in Large Transformer Models", per layer without the attention matrix, which PyTorch's
           SDPA does not keep); without checkpointing every block's working set
         + the VAE in fp32 (it stays for samples)
         + ~1 GB for the CUDA context and the allocator's slack.
    Text encoders: the captions and the sample prompts are encoded once, before the transformer is on the GPU, and
    T5-XXL / CLIP go off the GPU afterwards (samples are drawn from the cached prompt embeddings), so they are not
    in the peak; the caching phase has its own, smaller one: T5-XXL and CLIP in bf16 + the VAE + the context.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py            # the table (markdown) and the counts

Measured peaks (torch.cuda.max_memory_allocated) belong beside it in bench/RESULTS.md once `bench/gpu.py` has run
on a GPU; none has been at hand yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GB = 1e9
RANK = 16
WORK = 34  # bytes per token and width of one block's activations in bf16 (Korthikanti et al. 2022, no attention)
CONTEXT_GB = 1.0
MODELS = {  # name -> (arch, transformer config, resolution, text tokens: T5 + CLIP where they join the sequence)
    "FLUX.1 dev": ("flux", "flux/transformer/flux1-dev.json", 1024, 512),
    "SD 3.5 Large": ("sd3", "sd3/transformer/sd3.5-large.json", 1024, 333),  # 256 T5 + 77 CLIP tokens
    "SD 3.5 Medium": ("sd3", "sd3/transformer/sd3.5-medium.json", 1024, 333),
}


def on_meta(cls, config_file: str):
    config = json.loads((ROOT / "trainer" / "model_configs" / config_file).read_text())
    with torch.device("meta"):
        return cls.from_config(config)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(arch: str, transformer) -> int:
    from trainer.networks.base import flow_targets

    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    return sum(RANK * (linears[t.path].in_features + linears[t.path].out_features)
               for t in flow_targets(arch, {"transformer": transformer}))


def fp8_bytes(transformer) -> tuple[int, int]:
    """(bytes of the transformer stored with fp8 on, parameters left in bf16)."""
    from trainer.quantize import FP8, store_fp8

    store_fp8(transformer.to(torch.bfloat16), torch.bfloat16)
    kept = sum(p.numel() for p in transformer.parameters() if p.dtype != FP8)
    return count(transformer) - kept + 2 * kept, kept


def blocks_and_width(arch: str, transformer) -> tuple[int, int]:
    c = transformer.config
    if arch == "flux":
        return c.num_layers + c.num_single_layers, c.num_attention_heads * c.attention_head_dim
    return c.num_layers, c.num_attention_heads * c.attention_head_dim


def estimate(name: str) -> dict:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    arch, config_file, px, text_tokens = MODELS[name]
    transformer = on_meta(FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel, config_file)
    params, lora = count(transformer), lora_params(arch, transformer)
    blocks, width = blocks_and_width(arch, transformer)
    tokens = (px // 16) ** 2 + text_tokens  # 8x VAE, 2x2 patches
    checkpointed = (blocks * tokens * width * 2 + WORK * tokens * width) / GB
    eager = blocks * WORK * tokens * width / GB
    stored_fp8, kept = fp8_bytes(transformer)
    fixed = 16 * lora / GB + vae_gb(arch) + CONTEXT_GB
    return {"name": name, "params": params, "lora": lora, "tokens": tokens, "blocks": blocks, "width": width,
            "bf16_gb": 2 * params / GB, "fp8_gb": stored_fp8 / GB, "fp8_kept": kept, "adapter_gb": 16 * lora / GB,
            "act_ckpt_gb": checkpointed, "act_eager_gb": eager,
            "peak_bf16_ckpt": 2 * params / GB + checkpointed + fixed,
            "peak_fp8_ckpt": stored_fp8 / GB + checkpointed + fixed,
            "peak_fp8_eager": stored_fp8 / GB + eager + fixed, "t5_gb": 2 * t5_params(arch) / GB,
            "caching_gb": 2 * (t5_params(arch) + clip_params(arch)) / GB + vae_gb(arch) + CONTEXT_GB}


def vae_gb(arch: str) -> float:
    from diffusers import AutoencoderKL

    return 4 * count(on_meta(AutoencoderKL, f"{arch}/vae/config.json")) / GB


def t5_params(arch: str) -> int:
    from transformers import T5Config, T5EncoderModel

    folder = "text_encoder_3" if arch == "sd3" else "text_encoder_2"
    config = T5Config.from_dict(json.loads((ROOT / "trainer" / "model_configs" / arch / folder / "config.json")
                                           .read_text()))
    with torch.device("meta"):
        return count(T5EncoderModel(config))


def clip_params(arch: str) -> int:
    """CLIP-L (+ CLIP-G for SD 3.5), as the pipelines load them (SD 3.5's with their text projections)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for folder in ("text_encoder", "text_encoder_2") if arch == "sd3" else ("text_encoder",):
        config = CLIPTextConfig.from_pretrained(ROOT / "trainer" / "model_configs" / arch / folder)
        with torch.device("meta"):
            total += count((CLIPTextModelWithProjection if arch == "sd3" else CLIPTextModel)(config))
    return total


def table(rows: list[dict]) -> str:
    lines = ["| model (batch 1, 1024 px, LoRA r16) | transformer | bf16 + checkpointing | fp8 + checkpointing | "
             "fp8, no checkpointing | caching the captions (T5-XXL + CLIP) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e9:.2f} B params, bf16 {r['bf16_gb']:.1f} GB / fp8 "
                     f"{r['fp8_gb']:.1f} GB | {r['peak_bf16_ckpt']:.1f} GB | **{r['peak_fp8_ckpt']:.1f} GB** | "
                     f"{r['peak_fp8_eager']:.1f} GB | {r['caching_gb']:.1f} GB |")
    return "\n".join(lines)


def main() -> list[dict]:
    from diffusers.utils import logging

    logging.set_verbosity_error()  # "modules that should be kept in float32: []": none are, on the meta device
    rows = [estimate(name) for name in MODELS]
    print(table(rows))
    for r in rows:
        print(f"{r['name']}: {r['params']:,} params ({r['fp8_kept']:,} kept in bf16 by fp8: norms/modulation, "
              f"embedders), LoRA r{RANK} {r['lora']:,} params = {r['adapter_gb']:.2f} GB with AdamW; "
              f"{r['blocks']} blocks x {r['tokens']} tokens x {r['width']} wide: activations {r['act_ckpt_gb']:.1f} "
              f"GB checkpointed, {r['act_eager_gb']:.1f} GB without")
    return rows


if __name__ == "__main__":
    main()
