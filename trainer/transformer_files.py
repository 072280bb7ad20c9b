"""SD 3.5 and FLUX.1 from the files people have.

Three layouts load to the same pipeline: a diffusers folder (loading.py reads it); one file with everything in it,
as ComfyUI saves it (`model.diffusion_model.*`, the VAE under `first_stage_model.*` for SD3 and `vae.*` for FLUX,
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`); and the split layout ComfyUI users keep: the transformer as
Stability AI / Black Forest Labs ship it (`joint_blocks.*` / `double_blocks.*`, `single_blocks.*`), beside
`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` and the VAE (`ae.safetensors`). A part given
as its own file wins over the same part inside the main file. Sizes come from the tensors' shapes; what shapes
cannot say (activations, the scheduler, FLUX's rope axes) from the configs in `model_configs/{sd3,flux}/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer import flow_parts, single_file
from trainer.flow_parts import Parts, Source, locate, variant
from trainer.single_file import MODEL_CONFIGS, CheckpointError, Shapes, _count

T5_TOKENIZER_DIR = flow_parts.T5_TOKENIZER_DIR  # not shipped yet: the T5-XXL tokenizer.json goes here


# --- configs from shapes ---

def _json(*parts: str) -> dict:
    return json.loads((MODEL_CONFIGS.joinpath(*parts)).read_text())


def sd3_config(s: Shapes, name: str) -> dict:
    layers = _count(s, "joint_blocks.{}.")
    hidden, joint = s["context_embedder.weight"]
    patch = s["x_embedder.proj.weight"][2]
    cfg = _json("sd3", "transformer", f"{name}.json")
    cfg.update(num_layers=layers, patch_size=patch, in_channels=s["x_embedder.proj.weight"][1],
               out_channels=s["final_layer.linear.weight"][0] // patch ** 2, num_attention_heads=hidden // 64,
               attention_head_dim=64, caption_projection_dim=hidden, joint_attention_dim=joint,
               pooled_projection_dim=s["y_embedder.mlp.0.weight"][1], pos_embed_max_size=math.isqrt(s["pos_embed"][1]),
               dual_attention_layers=[i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in s],
               qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in s else None)
    return cfg


def flux_config(s: Shapes, name: str) -> dict:
    hidden, in_channels = s["img_in.weight"]
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if s["single_blocks.0.linear1.weight"][0] != 7 * hidden:
        raise CheckpointError("a FLUX-style transformer whose single blocks are not 4x wide: not FLUX.1")
    rope = head // 8  # FLUX.1: 128-channel heads, rope axes (16, 56, 56); the same split for any head width
    cfg = _json("flux", "transformer", f"{name}.json")
    cfg.update(in_channels=in_channels, out_channels=s["final_layer.linear.weight"][0], num_attention_heads=hidden // head,
               attention_head_dim=head, num_layers=_count(s, "double_blocks.{}."),
               num_single_layers=_count(s, "single_blocks.{}."), joint_attention_dim=s["txt_in.weight"][1],
               pooled_projection_dim=s["vector_in.in_layer.weight"][1],
               guidance_embeds="guidance_in.in_layer.weight" in s, axes_dims_rope=[rope, (head - rope) // 2, (head - rope) // 2])
    return cfg


def t5_config(s: Shapes, arch: str) -> dict:
    cfg = _json(arch, "text_encoder_3" if arch == "sd3" else "text_encoder_2", "config.json")
    att = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = s[att + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    embed = s["shared.weight"] if "shared.weight" in s else s["encoder.embed_tokens.weight"]
    cfg.update(vocab_size=embed[0], d_model=embed[1], num_heads=heads, d_kv=s[att + "q.weight"][0] // heads,
               num_layers=_count(s, "encoder.block.{}."), relative_attention_num_buckets=buckets,
               d_ff=s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0],
               feed_forward_proj="gated-gelu" if gated else "relu", is_gated_act=gated)
    return cfg


# --- reading and converting weights ---

def read(src: Source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(src.path), framework="pt") as f:
        return {k[len(src.prefix):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(src.prefix)}


def flux_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Black Forest Labs' FLUX.1 keys -> diffusers' FluxTransformer2DModel, for any width (diffusers' own
    converter assumes the full-size 3072). Fused qkv / qkv+mlp projections are split; the final modulation is
    stored (shift, scale) and diffusers reads (scale, shift)."""
    sd, out = dict(sd), {}
    hidden = sd["img_in.weight"].shape[0]

    def lin(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")

    def split(src: str, dsts: list[str], sizes: list[int]) -> None:
        for kind in ("weight", "bias"):
            for dst, t in zip(dsts, torch.split(sd.pop(f"{src}.{kind}"), sizes)):
                out[f"{dst}.{kind}"] = t

    for src, dst in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if f"{src}.in_layer.weight" in sd:
            lin(f"{src}.in_layer", f"time_text_embed.{dst}.linear_1")
            lin(f"{src}.out_layer", f"time_text_embed.{dst}.linear_2")
    for src, dst in (("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out")):
        lin(src, dst)
    for kind in ("weight", "bias"):
        shift, scale = sd.pop(f"final_layer.adaLN_modulation.1.{kind}").chunk(2)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift])
    for i in range(_count(sd, "double_blocks.{}.")):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        lin(s + "img_mod.lin", d + "norm1.linear")
        lin(s + "txt_mod.lin", d + "norm1_context.linear")
        split(s + "img_attn.qkv", [d + f"attn.to_{p}" for p in "qkv"], [hidden] * 3)
        split(s + "txt_attn.qkv", [d + f"attn.add_{p}_proj" for p in "qkv"], [hidden] * 3)
        for src, dst in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[d + dst + ".weight"] = sd.pop(s + src + ".scale")
        lin(s + "img_attn.proj", d + "attn.to_out.0")
        lin(s + "txt_attn.proj", d + "attn.to_add_out")
        for j, dst in ((0, "net.0.proj"), (2, "net.2")):
            lin(s + f"img_mlp.{j}", d + f"ff.{dst}")
            lin(s + f"txt_mlp.{j}", d + f"ff_context.{dst}")
    for i in range(_count(sd, "single_blocks.{}.")):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        lin(s + "modulation.lin", d + "norm.linear")
        mlp = sd[s + "linear1.weight"].shape[0] - 3 * hidden
        split(s + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], [hidden] * 3 + [mlp])
        out[d + "attn.norm_q.weight"] = sd.pop(s + "norm.query_norm.scale")
        out[d + "attn.norm_k.weight"] = sd.pop(s + "norm.key_norm.scale")
        lin(s + "linear2", d + "proj_out")
    _no_leftovers("FLUX.1 transformer", sd)
    return out


def _no_leftovers(what: str, sd: dict) -> None:
    if sd:
        raise CheckpointError(f"the {what} has {len(sd)} weights this loader does not know (e.g. "
                              f"{', '.join(sorted(sd)[:3])}): a variant or a quantised format (fp8 'scaled', NF4, "
                              "GGUF) it cannot read; use the fp16/bf16 release")


def build(cls, config: dict, state: dict[str, torch.Tensor], what: str, src: Source):
    """`cls` from `config` with exactly `state` as its weights (no random init of the full-size model first)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        bad = [f"missing {k}" for k in result.missing_keys[:2]] + [f"unknown {k}" for k in result.unexpected_keys[:2]]
        raise CheckpointError(f"{src.path.name}: the {what} does not match its architecture ({'; '.join(bad)}; "
                              f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unknown)")
    return model.eval()


def transformer(arch: str, src: Source, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    name = variant(arch, src.shapes)
    state = read(src, dtype)
    if arch == "flux":
        return build(FluxTransformer2DModel, flux_config(src.shapes, name), flux_to_diffusers(state), "transformer", src)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(state)  # pops what it converts from `state`
    _no_leftovers("SD 3.5 transformer", state)
    return build(SD3Transformer2DModel, sd3_config(src.shapes, name), converted, "transformer", src)


def vae(arch: str, src: Source, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = read(src, dtype)
    if "encoder.down.0.block.0.conv1.weight" in state:  # the original (LDM) layout, as ae.safetensors has it
        cfg = single_file.vae_config(_json(arch, "vae", "config.json"), src.shapes, prefix="")
        state = convert_ldm_vae_checkpoint(state, cfg)
    else:  # a diffusers VAE file
        cfg = _json(arch, "vae", "config.json")
        cfg["block_out_channels"] = [src.shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0]
                                     for i in range(_count(src.shapes, "encoder.down_blocks.{}."))]
        cfg.update(latent_channels=src.shapes["decoder.conv_in.weight"][1],
                   layers_per_block=_count(src.shapes, "encoder.down_blocks.0.resnets.{}."),
                   down_block_types=["DownEncoderBlock2D"] * len(cfg["block_out_channels"]),
                   up_block_types=["UpDecoderBlock2D"] * len(cfg["block_out_channels"]))
    return build(AutoencoderKL, cfg, state, "VAE", src)


def clip(arch: str, part: str, src: Source, dtype: torch.dtype):
    """CLIP-L or CLIP-G in the HF layout (`text_model.…`). SD3 pools CLIP-L unprojected, as ComfyUI and diffusers'
    single-file loader do: its projection is the identity. FLUX uses CLIP-L's pooled output (no projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}[part]
    flat = {k.removeprefix("text_model."): v for k, v in src.shapes.items()}
    cfg = single_file.text_encoder_config(_json(arch, folder, "config.json"), flat, "", "hf")
    state = {k.removeprefix("text_model."): v for k, v in read(src, dtype).items()}
    if arch == "flux":
        state.pop("text_projection.weight", None)
        cls = CLIPTextModel
    else:
        cls = CLIPTextModelWithProjection
        if part == "clip_l" or "text_projection.weight" not in state:
            state["text_projection.weight"] = torch.eye(cfg["hidden_size"], dtype=dtype)
        cfg["projection_dim"] = state["text_projection.weight"].shape[0]
    config = CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    with_wrapper = cls is CLIPTextModelWithProjection or _has_text_model(CLIPTextModel, config)
    if with_wrapper:
        state = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}
    return build(cls, config, state, f"{part} text encoder", src)


def _has_text_model(cls, config) -> bool:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return hasattr(cls(config), "text_model")


def t5(arch: str, src: Source, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    state = read(src, dtype)
    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared  # tied: files keep one of the two
    config = T5Config(**{k: v for k, v in t5_config(src.shapes, arch).items() if k != "architectures"})
    return build(T5EncoderModel, config, state, "T5 text encoder", src)


def clip_tokenizer(pad: str):
    from transformers import CLIPTokenizer

    words = MODEL_CONFIGS / "clip_tokenizer"
    return CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), pad_token=pad, model_max_length=77)


def t5_tokenizer(given: str | Path | None, near: Path | None = None):
    """T5-XXL's tokenizer: the one given, else `model_configs/t5_tokenizer/`, else the one of the ComfyUI / Forge
    install the model file `near` sits in, else google/t5-v1_1-xxl from the local Hugging Face cache. It is not
    shipped, so a single file without any of these is refused by name."""
    from transformers import T5TokenizerFast

    app = flow_parts.t5_tokenizer_near(near) if near is not None else None
    for place in (Path(given).expanduser() if given else None, T5_TOKENIZER_DIR, app):
        if place is not None and place.is_file():
            return T5TokenizerFast(tokenizer_file=str(place), model_max_length=512)
        if place is not None and place.is_dir() and any(place.glob("tokenizer*")):
            return T5TokenizerFast.from_pretrained(str(place), model_max_length=512)
        if given and place == Path(given).expanduser():
            raise CheckpointError(f"t5_tokenizer: {place}: not a tokenizer folder or tokenizer.json")
    try:  # transformers 5 makes up an empty tokenizer when nothing is cached: only the real vocabulary counts
        cached = T5TokenizerFast.from_pretrained("google/t5-v1_1-xxl", local_files_only=True, model_max_length=512)
    except (OSError, ValueError):
        cached = None
    if cached is not None and len(cached) >= 32000:
        return cached
    raise CheckpointError("the T5-XXL tokenizer is needed and not found offline: give t5_tokenizer (a folder with "
                          f"tokenizer.json of google/t5-v1_1-xxl, such as ComfyUI's {flow_parts.APP_T5_TOKENIZERS[0]}), "
                          f"or put that tokenizer.json in {T5_TOKENIZER_DIR}")


def load(arch: str, path: Path, shapes: Shapes, parts: Parts, dtype: torch.dtype):
    """An SD3 / FLUX pipeline from a single file or the split layout (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    found = locate(arch, path, shapes, parts)
    name = variant(arch, found["transformer"].shapes)
    t5_tok = t5_tokenizer(parts.t5_tokenizer, near=path)
    t5_vocab = t5_config(found["t5"].shapes, arch)["vocab_size"]
    if len(t5_tok) > t5_vocab:
        raise CheckpointError(f"the T5 tokenizer has {len(t5_tok)} tokens, more than the T5 encoder's {t5_vocab}: "
                              "they are not a pair")
    common = dict(transformer=transformer(arch, found["transformer"], dtype), vae=vae(arch, found["vae"], dtype),
                  text_encoder=clip(arch, "clip_l", found["clip_l"], dtype), tokenizer=clip_tokenizer("<|endoftext|>"))
    if arch == "flux":
        sched = FlowMatchEulerDiscreteScheduler.from_config(_json("flux", "scheduler", f"{name}.json"))
        return FluxPipeline(scheduler=sched, text_encoder_2=t5(arch, found["t5"], dtype), tokenizer_2=t5_tok, **common)
    sched = FlowMatchEulerDiscreteScheduler.from_config(_json("sd3", "scheduler", "scheduler_config.json"))
    return StableDiffusion3Pipeline(scheduler=sched, text_encoder_2=clip(arch, "clip_g", found["clip_g"], dtype),
                                    tokenizer_2=clip_tokenizer("!"), text_encoder_3=t5(arch, found["t5"], dtype),
                                    tokenizer_3=t5_tok, **common)
