"""Compare on SD 3.5 / FLUX.1 bases (issue #17): which weight of the loaded diffusers models each module of a file
patches, in every layout trainer/flow_names.py writes.

    kohya (FLUX.1; SD 3.5 by sd-scripts)   lora_unet_<original module>: one module of the BFL / SAI layout, which may
                                           fuse several diffusers Linears (q|k|v rows, single blocks' q|k|v|proj_mlp),
                                           with the modulation halves of the final layer swapped
    diffusers (SD 3.5)                     transformer.<diffusers path>.lora_A / lora_B, text_encoder(_2).text_model.
                                           <path>.lora_A / lora_B: one diffusers Linear each, scale folded in
    LyCORIS (LoHa, LoKr, DoRA)             lycoris_<diffusers path, "." -> "_">: one diffusers Linear each (SD 3.5's
                                           attn2.to_out.0 under its kohya name)

A fused module is a `Fused`: its ΔW is computed on the fused weight in the original layout (as ComfyUI patches the
original model), then split back into the diffusers weights by rows (the widths flow_names.plan reads off the
model), swapped halves swapped back. Reading and writing it move the same numbers: cat, split and the swap are
copies, so a restore is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer import flow_names
from trainer.kohya_names import by_module

DIFFUSERS_PARAMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
DIFFUSERS_STEMS = ("transformer.", "text_encoder.", "text_encoder_2.", "unet.")  # unet.*: SD's peft files
FLUX_MARKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_img_in", "lora_unet_txt_in",
              "lora_unet_guidance_in", "lycoris_single_transformer_blocks_", "transformer.single_transformer_blocks.",
              "lycoris_time_text_embed_guidance_embedder", "transformer.time_text_embed.guidance_embedder")
SD3_MARKS = ("lora_unet_joint_blocks_", "lora_unet_context_embedder", "lora_unet_t_embedder", "lora_unet_y_embedder",
             "lycoris_pos_embed", "transformer.pos_embed")
UNET_MARKS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_unet_conv_in",
              "lora_unet_time_embedding")


@dataclass
class Fused:
    """One module of the original layout made of several diffusers weights, stacked by rows in `parts`' order;
    `swap`: the original stores the two halves of the rows the other way round (shift, scale)."""
    parts: tuple[nn.Parameter, ...]
    swap: bool = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size([sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:]])

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def read(self) -> torch.Tensor:
        """The fused weight, in the original layout, as a new CPU tensor."""
        whole = torch.cat([p.detach().to("cpu") for p in self.parts])
        return swapped(whole) if self.swap else whole

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        """Set the parts from a fused weight in the original layout."""
        value = swapped(value) if self.swap else value
        for part, rows in zip(self.parts, value.split([p.shape[0] for p in self.parts])):
            part.copy_(rows)


def swapped(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


def text_encoders(base) -> dict[str, nn.Module]:
    """The CLIP text encoders a file may patch: CLIP-L (and CLIP-G for SD 3.5); T5 never (no file names it)."""
    names = ("text_encoder", "text_encoder_2") if base.arch == "sd3" else ("text_encoder",)
    return {n: getattr(base.pipeline, n) for n in names if getattr(base.pipeline, n, None) is not None}


def flow_weights(base) -> dict[str, nn.Parameter | Fused]:
    """File module name -> what it patches, for every name a file of this base's family can carry: the kohya names
    (fused modules as `Fused`), the diffusers-format stems and the LyCORIS keys (one diffusers weight each)."""
    encoders = text_encoders(base)
    components = {"transformer": base.denoiser} | encoders
    modules = flow_names.plan(base.arch, base.denoiser, encoders)

    def weight(part: str) -> nn.Parameter:
        component, path = part.split(".", 1)
        return components[component].get_submodule(path).weight

    found: dict[str, nn.Parameter | Fused] = {}
    for m in modules:
        parts = tuple(weight(p) for p in m.parts)
        found[m.name] = parts[0] if len(parts) == 1 and not m.swap_halves else Fused(parts, m.swap_halves)
        for part in m.parts:
            found[diffusers_stem(part)] = weight(part)
    for part, key in flow_names.lycoris_keys(base.arch, modules).items():
        found[key] = weight(part)
    return found


def diffusers_stem(part: str) -> str:
    """"transformer.<path>" stays; a text encoder's "text_encoder.<path>" is written "text_encoder.text_model.<path>"
    (transformers 5 dropped the `text_model.` level inside CLIPTextModel, the files keep it)."""
    component, path = part.split(".", 1)
    return part if component == "transformer" else f"{component}.text_model.{path.removeprefix('text_model.')}"


def file_modules(tensors: dict) -> dict[str, dict]:
    """A file's tensors by module. kohya / LyCORIS keys split at the first dot (`lora_unet_x.lora_up.weight`);
    diffusers-format keys (`transformer.<path>.lora_A.weight`) at the last `.lora_` (or `.alpha`), their A / B
    renamed lora_down / lora_up: without an alpha the scale is 1, as diffusers reads them."""
    kohya = {k: v for k, v in tensors.items() if not k.startswith(DIFFUSERS_STEMS)}
    modules = by_module(kohya)
    for key, value in tensors.items():
        if key in kohya:
            continue
        if ".lora_" in key:
            stem, param = key.rsplit(".lora_", 1)
            param = "lora_" + param
        else:
            stem, param = key.rsplit(".", 1)
        modules.setdefault(stem, {})[DIFFUSERS_PARAMS.get(param, param)] = value
    return modules


def family_of_names(names) -> str | None:
    """"flux" / "sd3" when a file's module names tell (blocks, embedders only one family has), "unet" for the
    UNet names of SD 1.x / 2.x files, else None (transformer_blocks.* are in both FLUX.1 and SD 3.5)."""
    names = list(names)
    for marks, family in ((FLUX_MARKS, "flux"), (SD3_MARKS, "sd3"), (UNET_MARKS, "unet")):
        if any(n.startswith(marks) for n in names):
            return family
    if any(n.startswith(("transformer.", "lycoris_")) and "attn2" in n for n in names):
        return "sd3"  # SD 3.5 Medium's second attention
    return None


def names_a_transformer(names) -> bool:
    """Do a file's module names name an SD 3.5 / FLUX.1 transformer's diffusers modules?"""
    return any(n.startswith(("lycoris_", "transformer.")) for n in names)
