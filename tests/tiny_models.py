"""Tiny, randomly initialised Stable Diffusion pipelines of the real architectures, for tests.

Each is saved as a diffusers folder and as a single-file checkpoint in the original CompVis (SD 1/2) or SGM (SDXL)
layout, so the real loaders run on them. SDXL's two text encoders differ in width, as the real ones do: diffusers
tells them apart by it. Sizes follow the rules the single-file loader relies on (64-channel text
encoder heads, SD2/SDXL UNet heads of 64 channels, VAE groups of 32), like the real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.kohya_names import unet_path_to_sgm, unet_sgm_prefixes

TOKENIZER = Path(__file__).resolve().parent.parent / "trainer" / "model_configs" / "clip_tokenizer"
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


def tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), pad_token=pad, model_max_length=77)


def text_config(act: str, hidden: int = 64) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 64,
                          num_hidden_layers=2, projection_dim=hidden,
                          max_position_embeddings=77, vocab_size=49408, hidden_act=act,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_vae(scaling: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                         norm_num_groups=32, sample_size=64, scaling_factor=scaling,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build(arch: str, seed: int = 0):
    """A tiny pipeline of `arch` ("sd1", "sd2", "sdxl") with random weights."""
    torch.manual_seed(seed)
    if arch == "sd1":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
                                    attention_head_dim=8, sample_size=8, norm_num_groups=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        sched = PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon")
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config("quick_gelu")),
                                       tokenizer=tokenizer(), unet=unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if arch == "sd2":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
                                    attention_head_dim=[1, 1], use_linear_projection=True, sample_size=8,
                                    norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config("gelu")),
                                       tokenizer=tokenizer("!"), unet=unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if arch == "sdxl":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64 + 128,
                                    attention_head_dim=[1, 1], transformer_layers_per_block=[1, 2],
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=128 + 6 * 8,
                                    sample_size=8, norm_num_groups=32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        sched = EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", prediction_type="epsilon")
        return StableDiffusionXLPipeline(
            vae=tiny_vae(0.13025), text_encoder=CLIPTextModel(text_config("quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(text_config("gelu", hidden=128)), tokenizer=tokenizer(),
            tokenizer_2=tokenizer("!"), unet=unet, scheduler=sched)
    raise ValueError(arch)


# --- diffusers -> original (CompVis / SGM) key layout, the inverse of diffusers' single-file conversion ---

def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    pairs = unet_sgm_prefixes(unet.config)
    return {"model.diffusion_model." + unet_path_to_sgm(k, pairs): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels, layers = len(vae.config.block_out_channels), vae.config.layers_per_block
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
                ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
                ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        prefixes += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.")
                     for j in range(layers + 1)]
        if i < levels - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in vae.state_dict().items():
        src, dst = next(((s, d) for s, d in prefixes if key.startswith(s)), ("", ""))
        rest = key[len(src):]
        if "attn_1" in dst:
            rest = next(l + rest[len(h):] for h, l in attn if rest.startswith(h))
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value  # LDM attention is 1x1 conv
        elif "resnets" in src:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + dst + rest] = value
    return out


def hf_clip_to_ldm(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    return {prefix + "text_model." + k: v for k, v in sd.items()}


def openclip_to_ldm(model, prefix: str) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"], prefix + "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(model.config.num_hidden_layers):
        h, o = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
            out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
            out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
            out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
            out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    return out


def to_single_file(pipe, arch: str, path: Path) -> Path:
    sd = unet_to_ldm(pipe.unet) | vae_to_ldm(pipe.vae)
    if arch == "sd1":
        sd |= hf_clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer.")
    elif arch == "sd2":
        sd |= openclip_to_ldm(pipe.text_encoder, "cond_stage_model.model.")
    else:
        sd |= hf_clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        sd |= openclip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    if pipe.scheduler.config.prediction_type == "v_prediction":
        sd["v_pred"] = torch.tensor([])  # ComfyUI's marker for v-prediction checkpoints
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_both(arch: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/<arch>-diffusers/` and `root/<arch>.safetensors` of the same tiny model."""
    pipe = build(arch, seed)
    folder = root / f"{arch}-diffusers"
    pipe.save_pretrained(folder)
    return folder, to_single_file(pipe, arch, root / f"{arch}.safetensors")
