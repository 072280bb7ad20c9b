"""Module names as kohya sd-scripts writes them, which every LoRA loader (ComfyUI, WebUI, diffusers) reads.

Key = `<prefix>_<module path with "." replaced by "_">`: `lora_unet_…`, `lora_te_…` (SD 1/2) or `lora_te1_…` /
`lora_te2_…` (SDXL). SD 1.x/2.x UNets keep diffusers' module paths; SDXL uses the original SGM paths
(`input_blocks_4_1_…`), because kohya trains SDXL on the SGM model.
"""

from __future__ import annotations

TE_PREFIXES = {"sd1": ["lora_te"], "sd2": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}

# diffusers ResnetBlock2D child -> SGM ResBlock child
RESNET_TO_SGM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_sgm_prefixes(cfg) -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix) pairs for a UNet2DConditionModel config; the layout diffusers converts from."""
    levels, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(levels):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn[i] else 1}."))
    return pairs


def unet_path_to_sgm(path: str, pairs: list[tuple[str, str]]) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (for a parameter or module path)."""
    dotted = path + "."
    for src, dst in pairs:
        if dotted.startswith(src):
            rest = dotted[len(src):]
            if ".resnets." in src:
                rest = next((sgm + rest[len(d):] for d, sgm in RESNET_TO_SGM if rest.startswith(d + ".")), rest)
            return (dst + rest).rstrip(".")
    raise KeyError(f"no SGM name for UNet module {path!r}")


def kohya_name(arch: str, component: str, path: str, unet_config=None) -> str:
    """The kohya module name for `path` inside `component` ("unet", "text_encoder", "text_encoder_2")."""
    if component == "unet":
        if arch == "sdxl":
            path = unet_path_to_sgm(path, unet_sgm_prefixes(unet_config))
        return "lora_unet_" + path.replace(".", "_")
    prefix = TE_PREFIXES[arch][0 if component == "text_encoder" else 1]
    # transformers 5 dropped the `text_model.` level inside CLIPTextModel; the file format keeps it
    return f"{prefix}_text_model_" + path.removeprefix("text_model.").replace(".", "_")


def by_module(tensors: dict) -> dict[str, dict]:
    """A file's tensors by module: `lora_unet_x.lora_up.weight` -> {"lora_unet_x": {"lora_up.weight": tensor}}."""
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, param = key.partition(".")
        modules.setdefault(name, {})[param] = value
    return modules


DIFFUSERS_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def is_diffusers_form(tensors: dict) -> bool:
    """Keyed `<module path>.lora_A.weight` / `.lora_B.weight` with the scale folded into B (SD 3.5 files)."""
    return any(key.endswith(".lora_A.weight") for key in tensors)


def lora_modules(tensors: dict) -> dict[str, dict]:
    """`by_module` for a file in either form: a diffusers-form file's factors come under kohya's param names
    (`transformer.x.lora_B.weight` -> {"transformer.x": {"lora_up.weight": tensor}}); it has no alpha (scale 1)."""
    if not is_diffusers_form(tensors):
        return by_module(tensors)
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix = next((s for s in DIFFUSERS_FACTORS if key.endswith("." + s)), None)
        stem, param = (key[: -len(suffix) - 1], DIFFUSERS_FACTORS[suffix]) if suffix else key.rsplit(".", 1)
        modules.setdefault(stem, {})[param] = value
    return modules
