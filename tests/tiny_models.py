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


# --- SD 3.5 and FLUX.1: tiny MMDiT / FLUX transformers, CLIP-L (+ CLIP-G), a tiny T5 and its tokenizer ---

T5_WORDS = "a photo of cat dog red blue green circle square ring the on in with and picture".split()


def t5_tokenizer(max_length: int = 512):
    """A tiny sentencepiece-style Unigram T5 tokenizer, built in memory (no download): <pad>=0, </s>=1, <unk>=2,
    whole words, then single letters so any text tokenizes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i) for i, w in enumerate(T5_WORDS)]
    pieces += [(c, -30.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)


def tiny_t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def tiny_flow_vae(scaling: float, shift: float) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16,
                         norm_num_groups=32, sample_size=64, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_flow(arch: str, seed: int = 0, variant: str = ""):
    """A tiny pipeline of `arch` ("sd3": an SD 3.5 Medium-style MMDiT with a dual-attention block and QK norm, or
    "flux": FLUX.1 dev-style with its guidance embedder; variant "schnell" drops it) with random weights."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    torch.manual_seed(seed)
    t5_tok = t5_tokenizer()
    t5 = tiny_t5(len(t5_tok))
    if arch == "sd3":
        clip_l = CLIPTextModelWithProjection(text_config("quick_gelu"))
        with torch.no_grad():  # SD3 pools CLIP-L unprojected: the single files carry no projection (an identity)
            clip_l.text_projection.weight.copy_(torch.eye(64))
        clip_g = CLIPTextModelWithProjection(text_config("gelu", hidden=128))
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=128, pooled_projection_dim=64 + 128,
                                            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_flow_vae(1.5305, 0.0609), text_encoder=clip_l, tokenizer=tokenizer(), text_encoder_2=clip_g,
            tokenizer_2=tokenizer("!"), text_encoder_3=t5, tokenizer_3=t5_tok)
    if arch == "flux":
        dev = variant != "schnell"
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=64, guidance_embeds=dev, axes_dims_rope=(4, 14, 14))
        sched = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                 max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
                 if dev else FlowMatchEulerDiscreteScheduler(shift=1.0))
        return FluxPipeline(transformer=transformer, scheduler=sched, vae=tiny_flow_vae(0.3611, 0.1159),
                            text_encoder=CLIPTextModel(text_config("quick_gelu")), tokenizer=tokenizer(),
                            text_encoder_2=t5, tokenizer_2=t5_tok)
    raise ValueError(arch)


def _chunks(sd: dict, out: dict, target: str, *sources: str) -> None:
    """out[target.weight/bias] = the sources' weights/biases stacked on dim 0 (a fused qkv-style projection)."""
    for kind in ("weight", "bias"):
        out[f"{target}.{kind}"] = torch.cat([sd.pop(f"{s}.{kind}") for s in sources])


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift); the original models' final layers are (shift, scale)."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


def _linear(sd: dict, out: dict, target: str, source: str) -> None:
    for kind in ("weight", "bias"):
        out[f"{target}.{kind}"] = sd.pop(f"{source}.{kind}")


def sd3_to_original(transformer) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel -> Stability AI's MMDiT keys (sd3.5_medium.safetensors, without the prefix)."""
    sd, out = dict(transformer.state_dict()), {}
    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    pairs = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
             ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")]
    for target, source in pairs:
        _linear(sd, out, target, source)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        _chunks(sd, out, o + "x_block.attn.qkv", *(d + f"attn.to_{p}" for p in "qkv"))
        _chunks(sd, out, o + "context_block.attn.qkv", *(d + f"attn.add_{p}_proj" for p in "qkv"))
        _linear(sd, out, o + "x_block.attn.proj", d + "attn.to_out.0")
        _linear(sd, out, o + "x_block.adaLN_modulation.1", d + "norm1.linear")
        _linear(sd, out, o + "x_block.mlp.fc1", d + "ff.net.0.proj")
        _linear(sd, out, o + "x_block.mlp.fc2", d + "ff.net.2")
        for name, key in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                          ("context_block.attn.ln_q", "attn.norm_added_q"),
                          ("context_block.attn.ln_k", "attn.norm_added_k"),
                          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if d + key + ".weight" in sd:
                out[o + name + ".weight"] = sd.pop(d + key + ".weight")
        if d + "attn2.to_q.weight" in sd:
            _chunks(sd, out, o + "x_block.attn2.qkv", *(d + f"attn2.to_{p}" for p in "qkv"))
            _linear(sd, out, o + "x_block.attn2.proj", d + "attn2.to_out.0")
        if i < last:
            _linear(sd, out, o + "context_block.attn.proj", d + "attn.to_add_out")
            _linear(sd, out, o + "context_block.adaLN_modulation.1", d + "norm1_context.linear")
            _linear(sd, out, o + "context_block.mlp.fc1", d + "ff_context.net.0.proj")
            _linear(sd, out, o + "context_block.mlp.fc2", d + "ff_context.net.2")
        else:  # the last context block only modulates (context_pre_only), stored as (shift, scale)
            for kind in ("weight", "bias"):
                out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"{d}norm1_context.linear.{kind}"))
    assert not sd, f"unmapped SD3 keys: {sorted(sd)[:5]}"
    return out


def flux_to_original(transformer) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel -> Black Forest Labs' keys (flux1-dev.safetensors)."""
    sd, out = dict(transformer.state_dict()), {}
    pairs = [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")]
    for emb, name in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{name}.linear_1.weight" in sd:
            pairs += [(f"{emb}.in_layer", f"time_text_embed.{name}.linear_1"),
                      (f"{emb}.out_layer", f"time_text_embed.{name}.linear_2")]
    for target, source in pairs:
        _linear(sd, out, target, source)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _linear(sd, out, o + "img_mod.lin", d + "norm1.linear")
        _linear(sd, out, o + "txt_mod.lin", d + "norm1_context.linear")
        _chunks(sd, out, o + "img_attn.qkv", *(d + f"attn.to_{p}" for p in "qkv"))
        _chunks(sd, out, o + "txt_attn.qkv", *(d + f"attn.add_{p}_proj" for p in "qkv"))
        for name, key in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                          ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[o + name + ".scale"] = sd.pop(d + key + ".weight")
        _linear(sd, out, o + "img_attn.proj", d + "attn.to_out.0")
        _linear(sd, out, o + "txt_attn.proj", d + "attn.to_add_out")
        for j, k in ((0, "net.0.proj"), (2, "net.2")):
            _linear(sd, out, o + f"img_mlp.{j}", d + f"ff.{k}")
            _linear(sd, out, o + f"txt_mlp.{j}", d + f"ff_context.{k}")
    for i in range(transformer.config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _linear(sd, out, o + "modulation.lin", d + "norm.linear")
        _chunks(sd, out, o + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        out[o + "norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
        _linear(sd, out, o + "linear2", d + "proj_out")
    assert not sd, f"unmapped FLUX keys: {sorted(sd)[:5]}"
    return out


def hf_clip(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """A CLIP text encoder in the HF layout people keep as clip_l.safetensors / clip_g.safetensors
    (`text_model.…`, `text_projection.weight`), whatever transformers version flattened."""
    sd = model.state_dict()
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items()}


def flow_layouts(arch: str, root: Path, seed: int = 0, variant: str = "") -> dict[str, Path]:
    """A tiny model of `arch` as people have it: `folder` (diffusers), `single` (one ComfyUI-style file with
    everything: model.diffusion_model.*, first_stage_model.* (SD3) / vae.* (FLUX), text_encoders.*), and the split
    layout: `transformer` (the bare original keys, as BFL/SAI ship them), `clip_l`, `clip_g` (SD3), `t5`, `vae`
    (the original VAE keys, ae.safetensors-style); `t5_tokenizer` is the tiny tokenizer's folder."""
    pipe = build_flow(arch, seed, variant)
    name = arch + (f"-{variant}" if variant else "")
    out = {"folder": root / f"{name}-diffusers", "t5_tokenizer": root / f"{name}-t5-tokenizer"}
    pipe.save_pretrained(out["folder"])
    t5, t5_tok = (pipe.text_encoder_3, pipe.tokenizer_3) if arch == "sd3" else (pipe.text_encoder_2, pipe.tokenizer_2)
    t5_tok.save_pretrained(out["t5_tokenizer"])
    transformer = sd3_to_original(pipe.transformer) if arch == "sd3" else flux_to_original(pipe.transformer)
    vae = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(pipe.vae).items()}
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    parts = {"transformer": transformer, "vae": vae, "clip_l": hf_clip(pipe.text_encoder), "t5": t5_sd}
    if arch == "sd3":
        parts["clip_g"] = hf_clip(pipe.text_encoder_2)
    single = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    single |= {("first_stage_model." if arch == "sd3" else "vae.") + k: v for k, v in vae.items()}
    clip_l = {k: v for k, v in parts["clip_l"].items() if not k.startswith("text_projection")}  # SAI's file has none
    single |= {"text_encoders.clip_l.transformer." + k: v for k, v in clip_l.items()}
    if arch == "sd3":
        single |= {"text_encoders.clip_g.transformer." + k: v for k, v in parts["clip_g"].items()}
    single |= {"text_encoders.t5xxl.transformer." + k: v for k, v in t5_sd.items()}
    for part, sd in parts.items():
        out[part] = root / f"{name}-{part}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out[part]))
    out["single"] = root / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in single.items()}, str(out["single"]))
    return out
