"""The SD 3.5 / FLUX.1 LoRA file (trainer/flow_names.py), module by module, on the tiny models: every trained Linear
has a file name; every file name patches a weight of the original (BFL/SAI) layout of the right shape, found the way
ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` find it; patching those weights as ComfyUI does and
converting back equals the split updates; diffusers' `load_lora_weights` changes the outputs by the merged update."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import build_flow, flux_to_original, hf_clip, sd3_to_original
from trainer.flow_names import BLOCK_PREFIXES, FORMATS, Lora, diffusers_gaps, export, fuse, plan
from trainer.kohya_names import by_module
from trainer.transformer_files import flux_to_diffusers

TOL = 1e-5
CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
            "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
            "self_attn.out_proj": "self_attn_out_proj"}  # comfy/lora.py LORA_CLIP_MAP


@pytest.fixture(scope="module")
def pipes():
    return {"flux": build_flow("flux"), "sd3": build_flow("sd3")}


def tes(arch, pipe):
    return {"text_encoder": pipe.text_encoder} | ({"text_encoder_2": pipe.text_encoder_2} if arch == "sd3" else {})


def linears(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def random_loras(arch, pipe, rank=4, seed=1, skip=()):
    """A random LoRA on every mapped module (varying alphas, one part of a fused qkv left untrained)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, module in ({"transformer": pipe.transformer} | tes(arch, pipe)).items():
        for path, m in linears(module).items():
            key = f"{component}.{path}"
            if path.endswith("text_projection") or any(s in key for s in skip):
                continue
            r = rank + (len(out) % 3 == 0)  # some modules of another rank
            alpha = [None, 2.0, 8.0][len(out) % 3]
            out[key] = Lora(torch.randn(r, m.in_features, generator=g) * 0.1,
                            torch.randn(m.out_features, r, generator=g) * 0.1, alpha)
    return out


def merged(module, component, loras):
    """`module` with each split ΔW added to its diffusers weight by hand."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for path, m in linears(module).items():
            lora = loras.get(f"{component}.{path}")
            if lora is not None:
                m.weight += lora.delta()
    return module


# --- ComfyUI's key logic, as comfy/lora.py writes it (model_lora_keys_unet / model_lora_keys_clip) ---

def comfy_unet_keys(original: dict) -> dict[str, str]:
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}


def comfy_clip_keys(arch: str, clips: dict[str, dict]) -> dict[str, str]:
    """clips: "clip_l"/"clip_g" -> HF-layout state dict. SDXL/SD3 rule: te1 = clip_l, te2 = clip_g when clip_l is there."""
    out = {}
    for b in range(32):
        for c, name in CLIP_MAP.items():
            k = f"text_model.encoder.layers.{b}.{c}.weight"
            if k in clips.get("clip_l", {}):
                out[f"lora_te_text_model_encoder_layers_{b}_{name}"] = "clip_l." + k
                out[f"lora_te1_text_model_encoder_layers_{b}_{name}"] = "clip_l." + k
            if k in clips.get("clip_g", {}):
                out[f"lora_te2_text_model_encoder_layers_{b}_{name}"] = "clip_g." + k
    return out


def comfy_mmdit_to_diffusers(depth: int) -> dict[str, tuple]:
    """comfy.utils.mmdit_to_diffusers for weights: diffusers key -> (original key, row offset or None, swap).
    NB: its attn2 entries are not ComfyUI's: mmdit_to_diffusers (commit 2ba5cc8) maps no attn2 key (comfy_mmdit_keys
    below follows it), so ComfyUI skips SD 3.5 Medium's attn2 keys of the diffusers-format LoRA file."""
    off = depth * 64
    block = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
             "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
    out = {}
    for i in range(depth):
        f, t = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for j, p in enumerate("qkv"):
            out[f"{f}attn.to_{p}.weight"] = (t + "x_block.attn.qkv.weight", (off * j, off), False)
            out[f"{f}attn.add_{p}_proj.weight"] = (t + "context_block.attn.qkv.weight", (off * j, off), False)
            out[f"{f}attn2.to_{p}.weight"] = (t + "x_block.attn2.qkv.weight", (off * j, off), False)
        for d, o in block.items():
            out[f"{f}{d}.weight"] = (t + o + ".weight", None, False)
    basic = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for d, o in basic.items():
        out[d + ".weight"] = (o + ".weight", None, False)
    out["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, True)
    out[f"transformer_blocks.{depth - 1}.norm1_context.linear.weight"] = (
        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight", None, True)
    return out


def swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def comfy_apply_kohya(original: dict, keymap: dict, sd: dict) -> tuple[dict, set]:
    """Patch `original` as ComfyUI does: W += (alpha / down.shape[0]) * up @ down; returns the patched keys."""
    out, hit = dict(original), set()
    for name in {k.split(".")[0] for k in sd}:
        target = keymap[name]
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        alpha = sd[name + ".alpha"].item() / down.shape[0]
        out[target] = out[target] + alpha * (up @ down)
        hit.add(target)
    return out, hit


# --- ComfyUI's LyCORIS path: comfy/utils.py's diffusers maps (fused key, offset (dim, start, size), function), the
# `lycoris_<k>` keys comfy/lora.py model_lora_keys_unet adds for them, and calculate_weight + weight_adapter/ ---

FLUX_BLOCK = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
MMDIT_BLOCK = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
               "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
               "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
               "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}  # MMDIT_MAP_BLOCK: no attn2
EMBEDDERS = {f"time_text_embed.{e}.linear_{j}": (e, j) for e in ("timestep_embedder", "text_embedder",
                                                                   "guidance_embedder") for j in (1, 2)}
FLUX_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"} | {
    d: f"{dict(timestep_embedder='time', text_embedder='vector', guidance_embedder='guidance')[e]}_in."
       f"{'in' if j == 1 else 'out'}_layer" for d, (e, j) in EMBEDDERS.items()}
MMDIT_BASIC = {"proj_out": "final_layer.linear", "context_embedder": "context_embedder",
               "pos_embed.proj": "x_embedder.proj"} | {d: f"{'t' if e == 'timestep_embedder' else 'y'}_embedder.mlp.{2 * j - 2}"
                    for d, (e, j) in EMBEDDERS.items() if e != "guidance_embedder"}


def comfy_flux_to_diffusers(transformer) -> dict[str, tuple]:
    """comfy.utils.flux_to_diffusers for weights: diffusers key -> (original key, offset or None, function or None);
    hidden_size as ComfyUI detects it (img_in's rows)."""
    h = transformer.x_embedder.out_features
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        f, t = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for j, p in enumerate("qkv"):
            out[f"{f}attn.to_{p}.weight"] = (t + "img_attn.qkv.weight", (0, h * j, h), None)
            out[f"{f}attn.add_{p}_proj.weight"] = (t + "txt_attn.qkv.weight", (0, h * j, h), None)
        out |= {f"{f}{d}.weight": (f"{t}{o}.weight", None, None) for d, o in FLUX_BLOCK.items()}
    for i in range(len(transformer.single_transformer_blocks)):
        f, t = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, p in enumerate("qkv"):
            out[f"{f}attn.to_{p}.weight"] = (t + "linear1.weight", (0, h * j, h), None)
        out[f"{f}proj_mlp.weight"] = (t + "linear1.weight", (0, h * 3, h * 4), None)
        out |= {f"{f}norm.linear.weight": (t + "modulation.lin.weight", None, None),
                f"{f}proj_out.weight": (t + "linear2.weight", None, None)}
    out |= {f"{d}.weight": (f"{o}.weight", None, None) for d, o in FLUX_BASIC.items()}
    out["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, swap)  # swap_scale_shift
    return out


def comfy_mmdit_keys(transformer) -> dict[str, tuple]:
    """comfy.utils.mmdit_to_diffusers for weights (offset = depth * 64, depth = x_embedder rows / 64), the same triples."""
    off = transformer.pos_embed.proj.out_channels // 64 * 64
    n = len(transformer.transformer_blocks)
    out = {}
    for i in range(n):
        f, t = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for j, p in enumerate("qkv"):
            out[f"{f}attn.to_{p}.weight"] = (t + "x_block.attn.qkv.weight", (0, off * j, off), None)
            out[f"{f}attn.add_{p}_proj.weight"] = (t + "context_block.attn.qkv.weight", (0, off * j, off), None)
        out |= {f"{f}{d}.weight": (f"{t}{o}.weight", None, None) for d, o in MMDIT_BLOCK.items()}
    out |= {f"{d}.weight": (f"{o}.weight", None, None) for d, o in MMDIT_BASIC.items()}
    out["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, swap)
    out[f"transformer_blocks.{n - 1}.norm1_context.linear.weight"] = (
        f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1.weight", None, swap)
    return out


def comfy_lycoris_keys(arch: str, transformer, original: dict) -> dict[str, tuple]:
    """model_lora_keys_unet for these models: `lora_unet_<original>` (no offset) and `lycoris_<diffusers key>`."""
    keys = {k: (v, None, None) for k, v in comfy_unet_keys(original).items()}
    diffusers = comfy_flux_to_diffusers(transformer) if arch == "flux" else comfy_mmdit_keys(transformer)
    return keys | {"lycoris_" + k[:-len(".weight")].replace(".", "_"): v for k, v in diffusers.items()}


def comfy_adapter_diff(p: dict) -> tuple[torch.Tensor, float]:
    """(ΔW before scaling, alpha scale) of one module, as weight_adapter/lora.py, loha.py, lokr.py compute it."""
    alpha = p["alpha"].item() if "alpha" in p else None
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"].float(), p["lora_down.weight"].float()
        return up @ down, alpha / down.shape[0] if alpha is not None else 1.0
    if "hada_w1_a" in p:
        w1 = p["hada_w1_a"].float() @ p["hada_w1_b"].float()
        return w1 * (p["hada_w2_a"].float() @ p["hada_w2_b"].float()), alpha / p["hada_w1_b"].shape[0]
    dim, sides = None, []
    for w in ("lokr_w1", "lokr_w2"):
        if w in p:
            sides.append(p[w].float())
        else:
            dim = p[w + "_b"].shape[0]
            sides.append(p[w + "_a"].float() @ p[w + "_b"].float())
    return torch.kron(*sides), alpha / dim if alpha is not None and dim is not None else 1.0


def comfy_weight_decompose(dora_scale, weight, diff, alpha, function):
    """weight_adapter/base.py weight_decompose at strength 1: the slice's columns renormalised to dora_scale."""
    calc = weight + function(diff * alpha)
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(calc.shape[1], 1)
    weight[:] = calc * (dora_scale.float() / norm.transpose(0, 1))


def comfy_apply_lycoris(original: dict, keymap: dict, sd: dict) -> dict:
    """calculate_weight at strength 1: each module's ΔW into weight.narrow(*offset), through its function."""
    out = {k: v.clone().float() for k, v in original.items()}
    for name, params in by_module(sd).items():
        target, offset, function = keymap[name]
        weight = out[target] if offset is None else out[target].narrow(*offset)
        function = function or (lambda t: t)
        diff, alpha = comfy_adapter_diff(params)
        diff = diff.reshape(weight.shape)  # ComfyUI logs an error and skips the module when this fails
        if "dora_scale" in params:
            comfy_weight_decompose(params["dora_scale"], weight, diff, alpha, function)
        else:
            weight += function(alpha * diff)
    return out


def weights(module, prefix=""):
    return {prefix + k: v for k, v in module.state_dict().items()}


# --- the tests ---

@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_every_linear_has_a_file_name(pipes, arch):
    pipe = pipes[arch]
    mods = plan(arch, pipe.transformer, tes(arch, pipe))
    covered = {p for m in mods for p in m.parts}
    want = {"transformer." + p for p in linears(pipe.transformer)}
    for component, te in tes(arch, pipe).items():
        want |= {f"{component}.{p}" for p in linears(te) if not p.endswith("text_projection")}
    assert covered == want
    assert len({m.name for m in mods}) == len(mods)
    names = {m.name for m in mods}
    if arch == "flux":
        assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_mlp_0",
                "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_linear1",
                "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= names
    else:
        assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
                "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
                "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= names


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_every_file_name_patches_an_original_weight_of_its_shape(pipes, arch):
    pipe = pipes[arch]
    original = flux_to_original(pipe.transformer) if arch == "flux" else sd3_to_original(pipe.transformer)
    clips = {"clip_l": hf_clip(pipe.text_encoder)} | ({"clip_g": hf_clip(pipe.text_encoder_2)} if arch == "sd3" else {})
    keymap = comfy_unet_keys(original) | comfy_clip_keys(arch, clips)
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    shapes |= {f"{c}.{k}": tuple(v.shape) for c, sd in clips.items() for k, v in sd.items()}
    sd = export(arch, plan(arch, pipe.transformer, tes(arch, pipe)), random_loras(arch, pipe))
    names = {k.split(".")[0] for k in sd}
    assert names and all(n in keymap for n in names), sorted(n for n in names if n not in keymap)
    for n in names:
        up, down = sd[n + ".lora_up.weight"], sd[n + ".lora_down.weight"]
        assert (up.shape[0], down.shape[1]) == shapes[keymap[n]], n
        assert up.shape[1] == down.shape[0]
    # every trainable base weight of the original layout is reached (SD3's patch-embedder conv aside)
    reached = {keymap[n] for n in names}
    unet_2d = {k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2 and "." in k
               and not k.startswith("clip_") and not k.endswith(("_norm.scale", "ln_q.weight", "ln_k.weight"))}
    assert unet_2d <= reached, sorted(unet_2d - reached)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_patching_the_original_as_comfyui_equals_the_split_updates(pipes, arch):
    """Rows, offsets, the (shift, scale) swaps and alpha: patch BFL/SAI weights with the file as ComfyUI does, convert
    back to diffusers with the real single-file converters, compare to diffusers weights + split ΔWs."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    pipe = pipes[arch]
    loras = random_loras(arch, pipe, skip=("text_encoder", "attn.to_k", "attn.add_v_proj"))  # partial qkv
    original = flux_to_original(pipe.transformer) if arch == "flux" else sd3_to_original(pipe.transformer)
    sd = export(arch, plan(arch, pipe.transformer), loras)
    patched, _ = comfy_apply_kohya(original, comfy_unet_keys(original), sd)
    back = (flux_to_diffusers(patched) if arch == "flux"
            else convert_sd3_transformer_checkpoint_to_diffusers(dict(patched)))
    want = merged(pipe.transformer, "transformer", loras).state_dict()
    worst = max((back[k] - want[k]).abs().max().item() for k in want)
    assert worst <= TOL, worst
    moved = max((back[k] - v).abs().max().item() for k, v in pipe.transformer.state_dict().items())
    assert moved > 1e-2


def test_sd3_diffusers_format_through_comfyui_mmdit_map(pipes):
    pipe = pipes["sd3"]
    loras = random_loras("sd3", pipe, skip=("text_encoder",))
    sd = export("sd3", plan("sd3", pipe.transformer), loras, fmt="diffusers")
    original = sd3_to_original(pipe.transformer)
    keymap = comfy_mmdit_to_diffusers(pipe.transformer.config.num_layers)
    patched = dict(original)
    for key in {k.rsplit(".lora_", 1)[0] for k in sd}:
        target, offset, swapped = keymap[key.removeprefix("transformer.") + ".weight"]
        delta = sd[key + ".lora_B.weight"] @ sd[key + ".lora_A.weight"]  # no alpha: ComfyUI's scale is 1
        delta = swap(delta) if swapped else delta
        w = patched[target].clone()
        rows = slice(offset[0], offset[0] + offset[1]) if offset else slice(None)
        assert w[rows].shape == delta.shape, key
        w[rows] += delta
        patched[target] = w
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    back = convert_sd3_transformer_checkpoint_to_diffusers(patched)
    want = merged(pipe.transformer, "transformer", loras).state_dict()
    assert max((back[k] - want[k]).abs().max().item() for k in want) <= TOL


def test_fused_equals_split():
    g = torch.Generator().manual_seed(0)
    widths, n_in = (6, 6, 6, 10), 5
    same = [Lora(torch.randn(3, n_in, generator=g), torch.randn(w, 3, generator=g), 6.0) for w in widths]
    mixed = [Lora(torch.randn(2, n_in, generator=g), torch.randn(6, 2, generator=g), None), None,
             Lora(torch.randn(4, n_in, generator=g), torch.randn(6, 4, generator=g), 1.0),
             Lora(torch.randn(3, n_in, generator=g), torch.randn(10, 3, generator=g), 7.0)]
    for parts in (same, mixed):
        fused = fuse(parts, widths, n_in)
        split = torch.cat([p.delta() if p is not None else torch.zeros(w, n_in) for p, w in zip(parts, widths)])
        loader = fused.alpha / fused.down.shape[0] * (fused.up @ fused.down)  # every loader's rule
        assert (loader - split).abs().max().item() <= 1e-6
    fused = fuse(same, widths, n_in)
    assert fused.down.shape == (12, n_in) and fused.alpha == 2.0 * 12  # shared scale 6/3 kept, weights untouched
    assert torch.equal(fused.up[:6, :3], same[0].up) and not fused.up[:6, 3:].any()  # block-diagonal
    a = torch.randn(3, n_in, generator=g)  # VeRA: q, k, v (and mlp) share one A
    shared = [Lora(a, torch.randn(w, 3, generator=g), 3.0) for w in widths[:3]] + [None]
    fused = fuse(shared, widths, n_in)
    split = torch.cat([p.delta() if p is not None else torch.zeros(w, n_in) for p, w in zip(shared, widths)])
    assert fused.down.shape == (3, n_in) and fused.alpha == 3.0  # rank r, not 3r
    assert (fused.alpha / 3 * (fused.up @ fused.down) - split).abs().max().item() <= 1e-6


def flux_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 64, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5]), return_dict=False)


def sd3_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 192, generator=g), timestep=torch.tensor([500.0]), return_dict=False)


def te_out(te):
    ids = torch.tensor([[0, 5, 9, 2, 1, 1]])
    return te(ids, output_hidden_states=True).hidden_states[-2]


@pytest.mark.parametrize("arch,fmt", [("flux", "kohya"), ("sd3", "diffusers")])
def test_diffusers_load_lora_weights_applies_the_merged_update(arch, fmt, tmp_path):
    # diffusers' kohya FLUX converter hard-codes FLUX.1's widths for single_blocks.linear1 (3072 x 3 + 12288), so on
    # the tiny model that module is left out here and checked at full width in the next test
    skip = ("single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp") if arch == "flux" else ()
    pipe = build_flow(arch)
    loras = random_loras(arch, pipe, skip=skip)
    mods = plan(arch, pipe.transformer, tes(arch, pipe))
    sd = export(arch, mods, loras, fmt=fmt)
    dropped = diffusers_gaps(mods, loras)  # FLUX's embedders and final layer: ComfyUI applies them, diffusers not
    assert bool(dropped) == (arch == "flux")
    owners = {p: m.name for m in mods for p in m.parts}
    applied = {k: v for k, v in loras.items() if owners[k] not in dropped}
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    inputs = flux_inputs() if arch == "flux" else sd3_inputs()
    want_tr = merged(pipe.transformer, "transformer", applied)
    want_te = {c: merged(te, c, applied) for c, te in tes(arch, pipe).items()}
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        want = want_tr(**inputs)[0]
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.transformer(**inputs)[0]
        assert (want - base).abs().max().item() > 1e-2  # the update is not lost in the tolerance
        assert (got - want).abs().max().item() <= TOL, (got - want).abs().max().item()
        for c, te in tes(arch, pipe).items():
            d = (te_out(te) - te_out(want_te[c])).abs().max().item()
            assert d <= TOL, (c, d)
            assert (te_out(want_te[c]) - te_out(getattr(build_flow(arch), c))).abs().max().item() > 1e-3


def test_flux_linear1_at_full_width_through_diffusers_converter():
    """single_blocks.{i}.linear1 fuses q, k, v (3072 each) and the 12288-wide MLP input: the file module diffusers'
    `FluxLoraLoaderMixin.lora_state_dict` splits back into the four ΔWs exactly (and the double block's qkv)."""
    from diffusers import FluxPipeline
    from trainer.flow_names import FileModule

    g = torch.Generator().manual_seed(3)
    widths, n_in = (3072, 3072, 3072, 12288), 3072
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    loras = {f"transformer.single_transformer_blocks.0.{p}": Lora(torch.randn(4, n_in, generator=g) * 0.1,
                                                                  torch.randn(w, 4, generator=g) * 0.1, 2.0)
             for p, w in zip(parts, widths)}
    loras["transformer.single_transformer_blocks.0.attn.to_k"] = Lora(torch.randn(2, n_in, generator=g),
                                                                      torch.randn(3072, 2, generator=g), 8.0)
    mod = FileModule("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight",
                     tuple(f"transformer.single_transformer_blocks.0.{p}" for p in parts), widths, n_in)
    sd = export("flux", [mod], loras)
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (sum(widths), 14)
    converted = FluxPipeline.lora_state_dict(sd)
    for key, lora in loras.items():
        a, b = converted[key + ".lora_A.weight"], converted[key + ".lora_B.weight"]
        assert (b.float() @ a.float() - lora.delta()).abs().max().item() <= TOL, key


def test_refused_by_name(pipes):
    pipe = pipes["flux"]
    with pytest.raises(ValueError, match="T5"):
        plan("flux", pipe.transformer, {"text_encoder_2": pipe.text_encoder_2})
    mods = plan("flux", pipe.transformer)
    with pytest.raises(ValueError, match="text_encoder_2.encoder.block.0"):
        export("flux", mods, {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": Lora(torch.ones(1, 32),
                                                                                              torch.ones(32, 1))})
    with pytest.raises(ValueError, match="format"):
        export("flux", mods, {}, fmt="diffusers")
    with pytest.raises(ValueError, match="sdxl"):
        plan("sdxl", pipe.transformer)
    assert FORMATS == {"flux": ("kohya",), "sd3": ("kohya", "diffusers")}


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_lycoris_keys_are_the_ones_comfyui_maps(pipes, arch):
    """Every split Linear of the blocks has a LyCORIS key ComfyUI maps to its fused weight at the right rows (SD 3.5's
    attn2 q/k/v excepted: no ComfyUI key), and the file check names a module of the wrong shape or an unknown key."""
    from trainer.flow_names import check_lycoris_file, export_lycoris, lycoris_keys

    pipe = pipes[arch]
    mods = plan(arch, pipe.transformer)
    original = flux_to_original(pipe.transformer) if arch == "flux" else sd3_to_original(pipe.transformer)
    comfy = comfy_lycoris_keys(arch, pipe.transformer, original)
    keys = lycoris_keys(arch, mods)
    blocks = {p for m in mods if m.name.startswith(BLOCK_PREFIXES) for p in m.parts}
    left = {f"transformer.transformer_blocks.0.attn2.to_{p}" for p in "qkv"} if arch == "sd3" else set()
    assert set(keys) >= blocks - left and not set(keys) & left
    lin = linears(pipe.transformer)
    for part, key in keys.items():
        target, offset, _ = comfy[key]
        rows = original[target].shape[0] if offset is None else offset[2]
        assert (rows, original[target].shape[1]) == tuple(lin[part.removeprefix("transformer.")].weight.shape), key
    if arch == "flux":
        assert keys["transformer.single_transformer_blocks.0.proj_mlp"] == \
            "lycoris_single_transformer_blocks_0_proj_mlp"
    else:
        assert keys["transformer.transformer_blocks.0.attn2.to_out.0"] == "lora_unet_joint_blocks_0_x_block_attn2_proj"
    part = "transformer.transformer_blocks.0.attn.to_q"
    q = lin[part.removeprefix("transformer.")]
    good = {"hada_w1_a": torch.ones(q.out_features, 2), "hada_w1_b": torch.ones(2, q.in_features),
            "alpha": torch.tensor(2.0)}
    good |= {"hada_w2_a": good["hada_w1_a"], "hada_w2_b": good["hada_w1_b"]}
    sd = export_lycoris(arch, mods, {part: good})
    assert check_lycoris_file(arch, mods, sd) == []
    bad = dict(sd) | {keys[part] + ".hada_w2_b": torch.ones(2, 3), "lycoris_nowhere.hada_w1_a": torch.ones(1, 1)}
    problems = sorted(check_lycoris_file(arch, mods, bad))
    assert len(problems) == 2 and problems[1].startswith(keys[part] + ": ") and "rebuild None" in problems[1]
    assert problems[0].startswith("lycoris_nowhere: no module"), problems
    if arch == "sd3":
        with pytest.raises(ValueError, match="attn2"):
            export_lycoris(arch, mods, {"transformer.transformer_blocks.0.attn2.to_q": good})
