"""Sample images during training with the adapter in place, under the sampler names WebUI and ComfyUI use."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from trainer import text
from trainer.flow_parts import MAX_SEQUENCE

FLOW_ARCHES = ("sd3", "flux")
FLOW_SAMPLERS = ("euler",)  # flow-matching Euler, what ComfyUI / Forge call Euler for these models

SAMPLERS = {  # config name -> (WebUI label, scheduler class, extra config)
    "euler_a": ("Euler a", EulerAncestralDiscreteScheduler, {}),
    "euler": ("Euler", EulerDiscreteScheduler, {}),
    "dpm++_2m_karras": ("DPM++ 2M Karras", DPMSolverMultistepScheduler,
                        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    # x0 is never clipped, as in WebUI's and ComfyUI's DDIM: diffusers clips it to [-1, 1] unless the model's
    # scheduler config says otherwise, and a diffusers folder saved from PNDMScheduler does not say
    "ddim": ("DDIM", DDIMScheduler, {"clip_sample": False}),
}


@torch.no_grad()
def generate(base, prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int, width: int, height: int,
             clip_skip: int = 1, negative: str = "", encode=None) -> Image.Image:
    """One image from the base model as it is now (with whatever adapter is injected into it).

    SD 3.5 / FLUX.1 sample with the flow-matching Euler of their own scheduler ('euler'); for FLUX.1 dev
    `cfg_scale` is the distilled guidance fed to the transformer (no negative pass), schnell has none. Their
    prompts go through `encode` (texts -> (embeddings, pooled)) when given: a run's caption encoder, which holds
    the sample prompts' embeddings, so T5-XXL need not be on the device; else through the pipeline's encoders."""
    if base.arch in FLOW_ARCHES:
        return _generate_flow(base, prompt, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed, width=width,
                              height=height, negative=negative, encode=encode)
    pipe = base.pipeline
    _, cls, extra = SAMPLERS[sampler]
    scheduler = cls.from_config(pipe.scheduler.config, **extra)
    device = base.denoiser.device
    length = max(text.tokens_needed(t, [prompt, negative]) for t in base.tokenizers)  # the whole prompt, as WebUI
    embeds, pooled = text.encode(base.arch, base.tokenizers, base.text_encoders, [prompt, negative], clip_skip, device,
                                 length)
    kwargs = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:])
    if base.arch == "sdxl":
        kwargs |= dict(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        generator = torch.Generator("cpu").manual_seed(seed)  # the same picture on any device
        return pipe(num_inference_steps=steps, guidance_scale=cfg_scale, width=width, height=height,
                    generator=generator, output_type="pil", **kwargs).images[0]
    finally:
        pipe.scheduler = original


def _generate_flow(base, prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int, width: int,
                   height: int, negative: str, encode=None) -> Image.Image:
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: SD 3.5 / FLUX.1 sample with flow-matching Euler; use 'euler'")
    pipe, device = base.pipeline, base.denoiser.device
    length = MAX_SEQUENCE.get(base.variant, MAX_SEQUENCE["sd3"])
    encode = encode or (lambda texts: text.encode_flow(pipe, base.arch, texts, length, device))
    generator = torch.Generator("cpu").manual_seed(seed)  # the same picture on any device
    common = dict(num_inference_steps=steps, width=width, height=height, generator=generator, output_type="pil")
    if base.arch == "flux":  # guidance-distilled: one pass, the guidance goes in as an input
        embeds, pooled = encode([prompt])
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=cfg_scale,
                    max_sequence_length=length, **common).images[0]
    embeds, pooled = encode([prompt, negative])
    return pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
                negative_pooled_prompt_embeds=pooled[1:], guidance_scale=cfg_scale, max_sequence_length=length,
                **common).images[0]


def parameters_text(prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int, width: int, height: int,
                    model: str, negative: str = "", arch: str = "") -> str:
    """The PNG `parameters` chunk in WebUI's format, so its PNG Info tab (and ComfyUI's readers) show them.
    FLUX.1's guidance is written as Forge writes it: `CFG scale: 1, Distilled CFG Scale: <g>`."""
    lines = [prompt]
    if negative and arch != "flux":
        lines.append(f"Negative prompt: {negative}")
    guidance = f"CFG scale: 1, Distilled CFG Scale: {cfg_scale}" if arch == "flux" else f"CFG scale: {cfg_scale}"
    lines.append(f"Steps: {steps}, Sampler: {SAMPLERS[sampler][0]}, {guidance}, Seed: {seed}, "
                 f"Size: {width}x{height}, Model: {model}")
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
