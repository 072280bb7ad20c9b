"""The LoRA file people load for SD 3.5 and FLUX.1: diffusers module names -> the keys ComfyUI, Forge and diffusers read.

A LoRA is trained on diffusers' `FluxTransformer2DModel` / `SD3Transformer2DModel` (and the CLIP text encoders), whose
attention splits what the original Black Forest Labs / Stability AI models fuse. The file is written in the original
layout, which every loader reads:

FLUX.1 (kohya sd-scripts' format, `networks/lora_flux.py`: prefix `lora_unet`, CLIP-L `lora_te1`; ComfyUI
`comfy/lora.py` `model_lora_keys_unet` maps `lora_unet_<original key, "." -> "_">` to every weight of the original
model, Forge copies that logic; diffusers reads it through `_convert_kohya_flux_lora_to_diffusers`):

    diffusers (transformer_blocks.{i}.)        kohya (lora_unet_double_blocks_{i}_)
    norm1.linear / norm1_context.linear        img_mod_lin / txt_mod_lin
    attn.to_q + to_k + to_v                    img_attn_qkv          (fused, rows q|k|v)
    attn.add_q_proj + add_k_proj + add_v_proj  txt_attn_qkv          (fused)
    attn.to_out.0 / attn.to_add_out            img_attn_proj / txt_attn_proj
    ff.net.0.proj / ff.net.2                   img_mlp_0 / img_mlp_2
    ff_context.net.0.proj / ff_context.net.2   txt_mlp_0 / txt_mlp_2
    (single_transformer_blocks.{i}.)           (lora_unet_single_blocks_{i}_)
    attn.to_q + to_k + to_v + proj_mlp         linear1               (fused, rows q|k|v|mlp)
    proj_out / norm.linear                     linear2 / modulation_lin
    x_embedder, context_embedder               lora_unet_img_in, lora_unet_txt_in      (kohya's `in_dims`)
    time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}
                                               lora_unet_{time,vector,guidance}_in_{in,out}_layer
    proj_out, norm_out.linear                  lora_unet_final_layer_linear, ..._final_layer_adaLN_modulation_1
                                               (rows swapped: diffusers stores (scale, shift), BFL (shift, scale))
    CLIP-L text_model.encoder.layers.{i}.*     lora_te1_text_model_encoder_layers_{i}_*  (ComfyUI: te1 = clip_l)

SD 3.5 (kohya sd-scripts' format, `networks/lora_sd3.py`: `lora_unet`, CLIP-L `lora_te1`, CLIP-G `lora_te2`; ComfyUI
loads it through the same generic `lora_unet_<original key>` map):

    diffusers (transformer_blocks.{i}.)        kohya (lora_unet_joint_blocks_{i}_)
    attn.to_q + to_k + to_v                    x_block_attn_qkv      (fused)
    attn.add_q_proj + add_k_proj + add_v_proj  context_block_attn_qkv (fused)
    attn2.to_q + to_k + to_v / attn2.to_out.0  x_block_attn2_qkv / x_block_attn2_proj   (SD 3.5 Medium's dual blocks)
    attn.to_out.0 / attn.to_add_out            x_block_attn_proj / context_block_attn_proj
    norm1.linear / norm1_context.linear        x_block_adaLN_modulation_1 / context_block_adaLN_modulation_1
                                               (the last block's context modulation is (shift, scale) in SAI's
                                               layout: rows swapped, as ComfyUI's `mmdit_to_diffusers` does)
    ff.net.0.proj / ff.net.2 (ff_context...)   x_block_mlp_fc1 / _fc2 (context_block_mlp_fc1 / _fc2)
    context_embedder, time_text_embed.timestep_embedder.linear_{1,2}, ....text_embedder.linear_{1,2}
                                               lora_unet_context_embedder, lora_unet_t_embedder_mlp_{0,2},
                                               lora_unet_y_embedder_mlp_{0,2}       (kohya's `emb_dims`)
    proj_out, norm_out.linear                  lora_unet_final_layer_linear, ..._final_layer_adaLN_modulation_1 (swap)

diffusers 0.42's `StableDiffusion3Pipeline.load_lora_weights` converts no kohya keys at all (there is no SD3 branch in
`lora_conversion_utils.py`), so SD 3.5 also has `fmt="diffusers"`: `transformer.<diffusers path>.lora_A/lora_B` and
`text_encoder(_2).text_model.<path>.lora_A/B`, the scale folded in (no alpha). ComfyUI loads that one too
(`model_lora_keys_unet` maps `transformer.<k>` through `comfy.utils.mmdit_to_diffusers`, slicing the fused qkv by
offset; `model_lora_keys_clip` maps `text_encoder.` / `text_encoder_2.`). That is the one file every loader reads for
SD 3.5; `fmt="kohya"` is the sd-scripts/ComfyUI/Forge file.

Fusing a split set (as sd-scripts' `LoRANetwork.state_dict` does with `split_qkv`): lora_down = the parts' downs
stacked (sum r_j, in), lora_up = block-diagonal (sum out_j, sum r_j), so the fused update is exactly the rows of the
split updates concatenated. A part that was not trained gets a zero block. Every loader scales a module by
alpha / lora_down.shape[0] (ComfyUI `weight_adapter/lora.py`, diffusers `_convert_to_ai_toolkit_cat`, kohya
`create_network_from_weights`), and the fused rank is the sum: when the parts share one scale s = alpha_j / r_j the
file's alpha is s * sum(r_j) (kohya's own split_qkv export keeps the part's alpha, which scales the fused module by
1/3 or 1/4 when reloaded); when they differ each part's scale is folded into its up block and alpha = sum(r_j).
diffusers' converter reads such a file exactly either way: a block-diagonal up is chunked back, any other is
applied as up-rows x the whole down, the same product. Parts that share one down (VeRA's shared random A, sliced to
the same width for q, k, v) keep it: lora_down = A, lora_up = the parts' ups (scale folded) stacked, rank r.
The final layer is read by diffusers without its alpha ("TODO: alphas"), so its scale is always folded in
(alpha = rank).

DIFFUSERS_GAP: diffusers 0.42's kohya FLUX converter writes the embedders' and final layer's keys without the
`transformer.` prefix (`x_embedder.lora_A.weight`, `norm_out.linear...`), and `load_lora_adapter` keeps only
`transformer.*`, so `FluxPipeline.load_lora_weights` silently drops them; ComfyUI and Forge apply them. They stay in
the file (kohya's `in_dims` trains them); `diffusers_gaps` names them so the export can say so. The block modules and
CLIP-L load in diffusers exactly. Its converter also hard-codes FLUX.1's widths for `single_blocks.linear1`
(3072 x 3 + 12288), so a narrower FLUX-style model's linear1 is read by ComfyUI but not by diffusers.

Refused, by name: T5 (no loader but ComfyUI reads T5 LoRA, diffusers drops it), SD3's patch embedder (`pos_embed.proj`,
a Conv2d), anything that is not a Linear of these models.

LYCORIS (LoHa, LoKr, DoRA): their update of a fused weight cannot be written as one LyCORIS module of it (a Kronecker
or Hadamard product of q, k and v is not one of the fused rows; DoRA's norm would span them), so a LyCORIS file keeps
one module per split diffusers Linear, named `lycoris_<diffusers path, "." -> "_">` (`lycoris_transformer_blocks_0_
attn_to_q`, `lycoris_single_transformer_blocks_0_proj_mlp`), the prefix LyCORIS itself gives and SimpleTuner writes.
ComfyUI (comfy/lora.py `model_lora_keys_unet`, the `comfy.model_base.Flux` and `SD3` branches) maps
`lycoris_<k>` for every diffusers key k of `comfy/utils.py` `flux_to_diffusers` / `mmdit_to_diffusers`, whose values
are (fused original key, offset (dim 0, start row, rows), function): q/k/v at (0, 0 | h | 2h, h) of
`double_blocks.{i}.img_attn.qkv` / `txt_attn.qkv`, `single_blocks.{i}.linear1` (proj_mlp at (0, 3h, 4h)),
`joint_blocks.{i}.x_block.attn.qkv` / `context_block.attn.qkv` (SD3: h = depth·64), the rest one to one, and
`swap_scale_shift` as the function of `norm_out.linear` and SD3's last `norm1_context.linear`. `calculate_weight`
(comfy/lora.py) narrows the weight to that slice and lets the adapter (comfy/weight_adapter/ lora.py, loha.py,
lokr.py) add its ΔW (function applied) to it in place; DoRA (`weight_decompose`, weight_adapter/base.py) normalises
the slice's columns by `dora_scale` [1, in], so a split DoRA module is decomposed over its own rows, as trained.
Each module keeps its own alpha (loha: alpha / hada_w1_b rows, lokr: alpha / the decomposed factor's rank, scale 1
when neither is, lora/DoRA: alpha / lora_down rows). Forge's lora.py carries the same maps. Gap: at ComfyUI's stored
snapshot (utils.py commit 2ba5cc8) `mmdit_to_diffusers` maps no `attn2` key, so SD 3.5 Medium's attn2 q/k/v have no
LyCORIS key any loader maps and are not trained by LyCORIS methods (`attn2.to_out.0`, a whole weight, takes its kohya
name `lora_unet_joint_blocks_{i}_x_block_attn2_proj`, which the generic `lora_unet_<original key>` map reads).
CLIP modules (text-encoder LoRA) are whole weights: a LyCORIS file keeps their kohya stems `lora_te1_text_model_…` /
`lora_te2_…`, which `model_lora_keys_clip` maps to clip_l / clip_g whatever tensors the stem holds (ComfyUI's
`load_lora` reads hada_* / lokr_* / dora_scale on any mapped stem), as LyCORIS' kohya-format SDXL files do.
diffusers 0.42's `FluxLoraLoaderMixin` / `SD3LoraLoaderMixin` have no LoHa / LoKr reader (only FLUX.2 and Z-Image's
mixins convert lokr_*) and drop DoRA's `dora_scale`: `LYCORIS_LOADERS` says so where the file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

FORMATS = {"flux": ("kohya",), "sd3": ("kohya", "diffusers")}
BLOCK_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_joint_blocks_")
TE_PREFIX = {"flux": {"text_encoder": "lora_te1"}, "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

# (diffusers suffixes fused in this order, original suffix) inside one block
FLUX_DOUBLE = [(("norm1.linear",), "img_mod.lin"), (("norm1_context.linear",), "txt_mod.lin"),
               (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
               (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
               (("attn.to_out.0",), "img_attn.proj"), (("attn.to_add_out",), "txt_attn.proj"),
               (("ff.net.0.proj",), "img_mlp.0"), (("ff.net.2",), "img_mlp.2"),
               (("ff_context.net.0.proj",), "txt_mlp.0"), (("ff_context.net.2",), "txt_mlp.2")]
FLUX_SINGLE = [(("norm.linear",), "modulation.lin"), (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1"),
               (("proj_out",), "linear2")]
FLUX_TOP = [("x_embedder", "img_in"), ("context_embedder", "txt_in"),
            ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
            ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
            ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
            ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
            ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
            ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
            ("proj_out", "final_layer.linear"), ("norm_out.linear", "final_layer.adaLN_modulation.1")]
SD3_BLOCK = [(("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
             (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
             (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv"),
             (("attn.to_out.0",), "x_block.attn.proj"), (("attn.to_add_out",), "context_block.attn.proj"),
             (("attn2.to_out.0",), "x_block.attn2.proj"),
             (("norm1.linear",), "x_block.adaLN_modulation.1"),
             (("norm1_context.linear",), "context_block.adaLN_modulation.1"),
             (("ff.net.0.proj",), "x_block.mlp.fc1"), (("ff.net.2",), "x_block.mlp.fc2"),
             (("ff_context.net.0.proj",), "context_block.mlp.fc1"), (("ff_context.net.2",), "context_block.mlp.fc2")]
SD3_TOP = [("context_embedder", "context_embedder"),
           ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
           ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
           ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
           ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
           ("proj_out", "final_layer.linear"), ("norm_out.linear", "final_layer.adaLN_modulation.1")]


class Lora(NamedTuple):
    """One trained LoRA module: ΔW = (alpha / rank) * up @ down; alpha None = rank (scale 1)."""
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None = None

    @property
    def scale(self) -> float:
        rank = self.down.shape[0]
        return 1.0 if self.alpha is None else float(self.alpha) / rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class FileModule:
    """One module of the file: `name` (kohya), `original` (the base weight it patches, in the BFL/SAI layout, e.g.
    `double_blocks.0.img_attn.qkv.weight`), the diffusers modules fused into it in row order with their widths."""
    name: str
    original: str
    parts: tuple[str, ...]  # "transformer.<path>" / "text_encoder.<path>" ...
    widths: tuple[int, ...]
    in_features: int
    swap_halves: bool = False  # diffusers rows (scale, shift) vs original (shift, scale)
    fold_alpha: bool = False  # a loader reads this module without its alpha
    diffusers_drops: bool = False  # diffusers 0.42's load_lora_weights silently skips it (see DIFFUSERS_GAP)


def _linears(module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _te_path(path: str) -> str:
    """transformers 5 dropped `text_model.` inside CLIPTextModel (not inside ...WithProjection); files keep it."""
    return path.removeprefix("text_model.")


def plan(arch: str, transformer, text_encoders: dict | None = None) -> list[FileModule]:
    """Every file module of `arch` ("flux" / "sd3") for these models; `text_encoders` = {"text_encoder": CLIP-L,
    "text_encoder_2": CLIP-G (SD3)} for text-encoder LoRA."""
    if arch not in FORMATS:
        raise ValueError(f"flow_names covers 'flux' and 'sd3', not {arch!r}")
    lin = _linears(transformer)
    out: list[FileModule] = []

    def add(name_orig: str, parts: tuple[str, ...], **kw) -> None:
        if not all(p in lin for p in parts):
            missing = [p for p in parts if p not in lin]
            if len(missing) < len(parts):
                raise ValueError(f"{name_orig}: the model has {sorted(set(parts) - set(missing))} but not {missing}")
            return
        ins = {lin[p].in_features for p in parts}
        if len(ins) != 1:
            raise ValueError(f"{name_orig}: parts {parts} take different inputs {ins}: cannot fuse")
        out.append(FileModule("lora_unet_" + name_orig.replace(".", "_"), name_orig + ".weight",
                              tuple("transformer." + p for p in parts), tuple(lin[p].out_features for p in parts),
                              ins.pop(), **kw))

    if arch == "flux":
        for i in range(len(transformer.transformer_blocks)):
            for parts, orig in FLUX_DOUBLE:
                add(f"double_blocks.{i}.{orig}", tuple(f"transformer_blocks.{i}.{p}" for p in parts))
        for i in range(len(transformer.single_transformer_blocks)):
            for parts, orig in FLUX_SINGLE:
                add(f"single_blocks.{i}.{orig}", tuple(f"single_transformer_blocks.{i}.{p}" for p in parts))
        top = FLUX_TOP
    else:
        for i, block in enumerate(transformer.transformer_blocks):
            last = getattr(block, "context_pre_only", i == len(transformer.transformer_blocks) - 1)
            for parts, orig in SD3_BLOCK:
                add(f"joint_blocks.{i}.{orig}", tuple(f"transformer_blocks.{i}.{p}" for p in parts),
                    swap_halves=bool(last) and orig == "context_block.adaLN_modulation.1")
        top = SD3_TOP
    for path, orig in top:
        final = orig.startswith("final_layer")
        add(orig, (path,), swap_halves=orig == "final_layer.adaLN_modulation.1", fold_alpha=final,
            diffusers_drops=arch == "flux")
    for component, te in (text_encoders or {}).items():
        prefix = TE_PREFIX[arch].get(component)
        if prefix is None:
            raise ValueError(f"{arch}: no text-encoder LoRA for {component} (T5): no loader but ComfyUI reads it, "
                             "diffusers drops it; train CLIP only")
        for path, m in _linears(te).items():
            flat = _te_path(path)
            if not any(flat.endswith(c) for c in CLIP_LINEARS):
                continue  # CLIP's text_projection: kohya does not train it
            out.append(FileModule(f"{prefix}_text_model_{flat.replace('.', '_')}", f"text_model.{flat}.weight",
                                  (f"{component}.{path}",), (m.out_features,), m.in_features))
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def fuse(parts: list[Lora | None], widths: tuple[int, ...], in_features: int, fold: bool = False) -> Lora:
    """Split LoRAs (row blocks of one fused weight; None = untrained) -> one (down, up, alpha) whose ΔW is their
    ΔWs stacked on dim 0 exactly, under the loaders' alpha / down.shape[0] rule (see the module docstring)."""
    given = [p for p in parts if p is not None]
    if not given:
        raise ValueError("fuse: no part was trained")
    ref = given[0]
    dtype, device = ref.down.dtype, ref.down.device
    if len(given) > 1 and all(p.down.shape == ref.down.shape and torch.equal(p.down, ref.down) for p in given):
        return _fuse_shared_down(parts, widths, ref.down)
    rank = max(p.down.shape[0] for p in given)  # untrained parts get a zero block of the common rank
    scales = {p.scale for p in given}
    same = len(scales) == 1 and not fold
    downs, ups = [], []
    for p, w in zip(parts, widths):
        if p is None:
            downs.append(torch.zeros(rank, in_features, dtype=dtype, device=device))
            ups.append(torch.zeros(w, rank, dtype=dtype, device=device))
            continue
        if tuple(p.up.shape) != (w, p.down.shape[0]) or p.down.shape[1] != in_features:
            raise ValueError(f"fuse: a part of shape up {tuple(p.up.shape)} down {tuple(p.down.shape)} does not fit "
                             f"({w}, r) x (r, {in_features})")
        up = p.up if same else p.up * p.scale
        downs.append(p.down)
        ups.append(up)
    total = sum(d.shape[0] for d in downs)
    down = torch.cat(downs, 0)
    up = torch.zeros(sum(widths), total, dtype=ups[0].dtype, device=device)
    row = col = 0
    for u in ups:
        up[row:row + u.shape[0], col:col + u.shape[1]] = u
        row, col = row + u.shape[0], col + u.shape[1]
    alpha = scales.pop() * total if same else float(total)
    return Lora(down, up, alpha)


def _fuse_shared_down(parts: list[Lora | None], widths: tuple[int, ...], down: torch.Tensor) -> Lora:
    """Parts that share one down (VeRA's shared random A): the fused module keeps that down and stacks the ups, each
    part's scale folded in (alpha = rank): rank r instead of the block-diagonal's sum of the parts' ranks."""
    rank = down.shape[0]
    ups = [torch.zeros(w, rank, dtype=down.dtype, device=down.device) if p is None else p.up * p.scale
           for p, w in zip(parts, widths)]
    for u, w in zip(ups, widths):
        if tuple(u.shape) != (w, rank):
            raise ValueError(f"fuse: a part's up {tuple(u.shape)} does not fit ({w}, {rank})")
    return Lora(down, torch.cat(ups, 0), float(rank))


def export(arch: str, modules: list[FileModule], loras: dict[str, Lora], fmt: str = "kohya") -> dict[str, torch.Tensor]:
    """The state dict of the file: `loras` keyed "transformer.<diffusers path>" / "text_encoder(_2).<path>" as the
    live modules are named. Every key must belong to `modules`, else it is refused by name."""
    if fmt not in FORMATS.get(arch, ()):
        raise ValueError(f"{arch}: file format {fmt!r} unknown; one of {FORMATS.get(arch)}")
    owner = {p: m for m in modules for p in m.parts}
    unknown = sorted(set(loras) - set(owner))
    if unknown:
        raise ValueError(f"{arch}: no file key for {len(unknown)} trained module(s): {', '.join(unknown[:6])} "
                         "(only the Linears of the transformer blocks, embedders, final layer and CLIP are mapped; "
                         "T5 and SD3's pos_embed.proj conv are not loaded by ComfyUI/diffusers as LoRA)")
    sd: dict[str, torch.Tensor] = {}
    if fmt == "diffusers":
        for key, lora in loras.items():
            base = _diffusers_stem(key)
            sd[base + ".lora_A.weight"] = lora.down.contiguous()
            sd[base + ".lora_B.weight"] = (lora.up * lora.scale).contiguous()
        return sd
    for m in modules:
        parts = [loras.get(p) for p in m.parts]
        if all(p is None for p in parts):
            continue
        if len(parts) == 1:
            lora = parts[0]
            if m.fold_alpha:
                lora = Lora(lora.down, lora.up * lora.scale, float(lora.down.shape[0]))
        else:
            lora = fuse(parts, m.widths, m.in_features, fold=m.fold_alpha)
        up = _swap(lora.up) if m.swap_halves else lora.up
        alpha = float(lora.down.shape[0]) if lora.alpha is None else lora.alpha
        sd[m.name + ".lora_down.weight"] = lora.down.contiguous()
        sd[m.name + ".lora_up.weight"] = up.contiguous()
        sd[m.name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return sd


def _diffusers_stem(part: str) -> str:
    """A live module ("transformer.<path>", "text_encoder.<path>") -> its key stem in the diffusers-format file: CLIP
    paths always under `text_model.` (transformers 5's CLIPTextModel has none, CLIPTextModelWithProjection has)."""
    component, path = part.split(".", 1)
    return part if component == "transformer" else f"{component}.text_model.{_te_path(path)}"


def diffusers_gaps(modules: list[FileModule], loras: dict[str, Lora]) -> list[str]:
    """The trained file modules diffusers' `load_lora_weights` would skip (ComfyUI and Forge load them)."""
    return sorted({m.name for m in modules if m.diffusers_drops and any(p in loras for p in m.parts)})


def kohya_names(arch: str, transformer, text_encoders: dict | None = None) -> dict[str, str]:
    """diffusers module ("transformer.<path>") -> the kohya module name that carries it (several map to one fused)."""
    return {p: m.name for m in plan(arch, transformer, text_encoders) for p in m.parts}


def check_file(arch: str, modules: list[FileModule], sd: dict[str, torch.Tensor], fmt: str = "kohya") -> list[str]:
    """What is wrong with a file's state dict against `modules` (planned on the base): every key must belong to a
    module of the base, with the shapes that module takes (kohya: up (sum of the fused widths, r), down (r, in),
    alpha; diffusers: lora_A (r, in), lora_B (out, r) of the live Linear). [] = every key maps."""
    problems = []
    if fmt == "kohya":
        by_name = {m.name: m for m in modules}
        stems: dict[str, set] = {}
        for key in sd:
            name, _, param = key.partition(".")
            stems.setdefault(name, set()).add(param)
        for name, params in stems.items():
            m = by_name.get(name)
            if m is None:
                problems.append(f"{name}: no module of this {arch} model")
                continue
            if params != {"lora_down.weight", "lora_up.weight", "alpha"}:
                problems.append(f"{name}: holds {sorted(params)}, not lora_down / lora_up / alpha")
                continue
            down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
            if (up.shape[0], down.shape[1]) != (sum(m.widths), m.in_features) or up.shape[1] != down.shape[0]:
                problems.append(f"{name}: up {tuple(up.shape)} x down {tuple(down.shape)} does not patch "
                                f"{m.original} ({sum(m.widths)}, {m.in_features})")
        return problems
    shapes = {_diffusers_stem(p): (w, m.in_features) for m in modules for p, w in zip(m.parts, m.widths)}
    stems = {}
    for key in sd:
        stem, _, param = key.rpartition(".lora_")
        stems.setdefault(stem, set()).add(param)
    for stem, params in stems.items():
        if stem not in shapes:
            problems.append(f"{stem}: no Linear of this {arch} model")
            continue
        if params != {"A.weight", "B.weight"}:
            problems.append(f"{stem}: holds {sorted(params)}, not lora_A / lora_B")
            continue
        a, b = sd[stem + ".lora_A.weight"], sd[stem + ".lora_B.weight"]
        if (b.shape[0], a.shape[1]) != shapes[stem] or b.shape[1] != a.shape[0]:
            problems.append(f"{stem}: B {tuple(b.shape)} x A {tuple(a.shape)} does not patch {shapes[stem]}")
    return problems


# --- LyCORIS files (LoHa, LoKr, DoRA): one module per split diffusers Linear, never fused (LYCORIS in the docstring)

LYCORIS_PREFIX = "lycoris_"
# SD 3.5 Medium's second attention: ComfyUI's mmdit_to_diffusers has no attn2 entry, so q/k/v (parts of the fused
# x_block.attn2.qkv) have no key a loader maps; attn2.to_out.0 (the whole x_block.attn2.proj) takes its kohya name
SD3_UNMAPPED = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LYCORIS_FORMS = ({"lora_up.weight", "lora_down.weight"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
LYCORIS_LOADERS = ("ComfyUI and Forge load it (LyCORIS keys on the diffusers module names, sliced into the fused "
                   "weights); diffusers' load_lora_weights (0.42) has no LoHa / LoKr / DoRA reader for SD 3.5 and "
                   "FLUX.1 and cannot load it: use ComfyUI or Forge")


def lycoris_key(arch: str, module: FileModule, part: str) -> str | None:
    """The key stem of one split module ("transformer.<path>") of `module` in a LyCORIS file: `lycoris_<path, "."
    -> "_">`, which ComfyUI maps to the fused weight with its row offset; SD 3.5's attn2.to_out.0 by its kohya name;
    None where no loader maps one (SD 3.5's attn2 q/k/v): such modules are not trained by LyCORIS methods. A CLIP
    module ("text_encoder(_2).<path>", one whole weight) keeps its kohya name `lora_te1_…` / `lora_te2_…`, the stem
    ComfyUI's model_lora_keys_clip maps whatever the adapter's tensors (its load_lora reads hada_* / lokr_* /
    dora_scale on any stem), as LyCORIS' own kohya-format files name SDXL's text encoders."""
    if module.name.startswith(tuple(TE_PREFIX[arch].values())):
        return module.name
    path = part.removeprefix("transformer.")
    if not part.startswith("transformer."):
        raise ValueError(f"{arch}: LyCORIS files cover the transformer and CLIP, not {part}")
    if arch == "sd3" and path.endswith(SD3_UNMAPPED):
        return module.name if len(module.parts) == 1 else None
    return LYCORIS_PREFIX + path.replace(".", "_")


def lycoris_keys(arch: str, modules: list[FileModule]) -> dict[str, str]:
    """diffusers module ("transformer.<path>", "text_encoder.<path>") -> its key stem in a LyCORIS file, for every
    module that has one."""
    keys = {p: lycoris_key(arch, m, p) for m in modules for p in m.parts}
    return {p: k for p, k in keys.items() if k is not None}


def export_lycoris(arch: str, modules: list[FileModule], factors: dict[str, dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """The state dict of a LyCORIS file: each trained module's LyCORIS tensors (hada_*, lokr_*, lora_up/down +
    dora_scale, alpha) under its `lycoris_key`, unchanged: the update is the trained one, module by module."""
    keys = lycoris_keys(arch, modules)
    unknown = sorted(set(factors) - set(keys))
    if unknown:
        raise ValueError(f"{arch}: no LyCORIS file key for {len(unknown)} trained module(s): {', '.join(unknown[:6])} "
                         "(only the transformer's and CLIP's Linears that ComfyUI maps; not SD 3.5's attn2 q/k/v)")
    return {f"{keys[name]}.{param}": t.contiguous() for name, params in factors.items() for param, t in params.items()}


def lycoris_shape(params: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in) of the weight a LoRA / LoHa / LoKr module's tensors rebuild; None when they are no such module."""
    names = set(params) - {"alpha", "dora_scale"}
    if names == LYCORIS_FORMS[0]:
        up, down = params["lora_up.weight"], params["lora_down.weight"]
        return (up.shape[0], down.shape[1]) if up.shape[1] == down.shape[0] else None
    if names == LYCORIS_FORMS[1]:
        a, b = params["hada_w1_a"] @ params["hada_w1_b"], params["hada_w2_a"] @ params["hada_w2_b"]
        return tuple(a.shape) if a.shape == b.shape else None
    sides = []
    for w in ("lokr_w1", "lokr_w2"):
        if names >= {w} and not names & {w + "_a", w + "_b"}:
            sides.append(tuple(params[w].shape))
        elif names >= {w + "_a", w + "_b"} and w not in names:
            sides.append((params[w + "_a"].shape[0], params[w + "_b"].shape[1]))
        else:
            return None
    if names - {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}:
        return None  # lokr_t2 (Tucker) or anything else
    return sides[0][0] * sides[1][0], sides[0][1] * sides[1][1]


def check_lycoris_file(arch: str, modules: list[FileModule], sd: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with a LyCORIS file against `modules` (planned on the base): every key stem must be the
    `lycoris_key` of a module, holding one LoRA / LoHa / LoKr form (+ alpha, DoRA's dora_scale [1, in]) that rebuilds
    that module's (out, in). [] = every key maps."""
    widths = {p: (w, m.in_features) for m in modules for p, w in zip(m.parts, m.widths)}
    owner = {k: p for p, k in lycoris_keys(arch, modules).items()}
    stems: dict[str, dict] = {}
    for key, t in sd.items():
        name, _, param = key.partition(".")
        stems.setdefault(name, {})[param] = t
    problems = []
    for name, params in stems.items():
        if name not in owner:
            problems.append(f"{name}: no module of this {arch} model")
            continue
        want, got = widths[owner[name]], lycoris_shape(params)
        if got != want:
            problems.append(f"{name}: {sorted(params)} rebuild {got}, not {owner[name]}'s {want}")
        elif "dora_scale" in params and tuple(params["dora_scale"].shape) != (1, want[1]):
            problems.append(f"{name}: dora_scale {tuple(params['dora_scale'].shape)}, not (1, {want[1]})")
    return problems
