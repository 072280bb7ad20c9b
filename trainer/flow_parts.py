"""What the files of an SD 3.5 / FLUX.1 model are, from their safetensors headers alone (no torch, no tensor read).

The split layout ComfyUI users keep is a transformer file beside `clip_l.safetensors`, `clip_g.safetensors` (SD 3.5),
`t5xxl_fp16.safetensors` and the VAE (`ae.safetensors` for FLUX.1). This module says where each part comes from
(`locate`), names a missing or wrong part, and checks the parts fit the transformer; trainer/transformer_files.py
reads the weights, and trainer/config.py runs the same checks on a run's `clip_l` / `clip_g` / `t5xxl` / `vae` fields
before a run is made, so the web UI can name a missing part without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer import single_file
from trainer.single_file import CheckpointError, Shapes

FAMILY_NAMES = {"sd3": "SD 3.5", "flux": "FLUX.1"}
VARIANT_NAMES = {"sd3.5-large": "SD 3.5 Large", "sd3.5-medium": "SD 3.5 Medium", "sd3-medium": "SD 3 Medium",
                 "flux1-dev": "FLUX.1 dev", "flux1-schnell": "FLUX.1 schnell"}
MAX_SEQUENCE = {"sd3": 256, "flux1-dev": 512, "flux1-schnell": 256}  # T5 tokens, as the pipelines' defaults
NEEDS = {"sd3": ("clip_l", "clip_g", "t5", "vae"), "flux": ("clip_l", "t5", "vae")}
PART_NAMES = {"clip_l": "the CLIP-L text encoder (clip_l.safetensors)",
              "clip_g": "the CLIP-G text encoder (clip_g.safetensors)",
              "t5": "the T5-XXL text encoder (t5xxl_fp16.safetensors)",
              "vae": "the VAE (ae.safetensors for FLUX.1, the SD 3.5 VAE for SD 3.5)"}
IN_FILE = {  # part -> its prefixes inside an all-in-one file (ComfyUI's checkpoint layout)
    "clip_l": ("text_encoders.clip_l.transformer.",), "clip_g": ("text_encoders.clip_g.transformer.",),
    "t5": ("text_encoders.t5xxl.transformer.",), "vae": ("first_stage_model.", "vae."),
}
CLIP_MARKERS = ("text_model.encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.weight")
MARKERS = {  # part -> a key that ends every file of that kind, after its prefix
    "clip_l": CLIP_MARKERS, "clip_g": CLIP_MARKERS,
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "vae": ("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"),
}
CONFIG_FIELDS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl", "vae": "vae"}  # part -> model.<field>
USUAL_NAMES = {  # text-encoder part -> the names ComfyUI users give its file, in order of preference
    "clip_l": ("clip_l.safetensors",), "clip_g": ("clip_g.safetensors",),
    "t5": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl.safetensors"),
}
VAE_NAMES = {"flux": ("ae.safetensors",), "sd3": ("sd3_vae.safetensors", "sd3.5_vae.safetensors")}  # both 16-ch
T5_TOKENIZER_DIR = single_file.MODEL_CONFIGS / "t5_tokenizer"  # not shipped yet: the T5-XXL tokenizer.json goes here
T5_HUB_ID = "google/t5-v1_1-xxl"
APP_T5_TOKENIZERS = (  # where the apps people keep these files in ship T5-XXL's tokenizer.json, under their folder
    "comfy/text_encoders/t5_tokenizer",  # ComfyUI
    "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2",  # Forge
    "backend/huggingface/stabilityai/stable-diffusion-3.5-large/tokenizer_3",  # Forge
)
COMFY_FOLDERS = ("clip", "text_encoders", "vae")  # models/unet/x.safetensors beside models/clip/, models/vae/


@dataclass(frozen=True)
class Parts:
    """The separate files of the split layout; None = take that part from the main file."""
    clip_l: str | Path | None = None
    clip_g: str | Path | None = None
    t5: str | Path | None = None
    vae: str | Path | None = None
    t5_tokenizer: str | Path | None = None  # a tokenizer folder or tokenizer.json of google/t5-v1_1-xxl

    def given(self) -> dict[str, Path]:
        return {k: Path(v).expanduser() for k, v in asdict(self).items() if v and k != "t5_tokenizer"}


@dataclass(frozen=True)
class Source:
    path: Path
    prefix: str  # stripped from the keys of this part
    shapes: Shapes  # of this part only, prefix stripped


# --- what each file is, without reading a tensor ---

def variant(arch: str, s: Shapes) -> str:
    """sd3.5-large / sd3.5-medium / sd3-medium / flux1-dev / flux1-schnell, from a transformer's (unprefixed) keys."""
    if arch == "flux":
        return "flux1-dev" if "guidance_in.in_layer.weight" in s else "flux1-schnell"
    if any(".x_block.attn2." in k for k in s):
        return "sd3.5-medium"  # MMDiT-X: dual attention in the first blocks
    return "sd3.5-large" if any(".attn.ln_q." in k for k in s) else "sd3-medium"


def variant_of_config(arch: str, config) -> str:
    if arch == "flux":
        return "flux1-dev" if config.get("guidance_embeds") else "flux1-schnell"
    if config.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if config.get("qk_norm") else "sd3-medium"


def part_source(part: str, path: Path, arch: str) -> Source:
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{part}: {path.name}: give the {part} part as a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{part}: {path}: no such file (expected {PART_NAMES[part]})")
    shapes = single_file.read_safetensors_shapes(path)
    kind = single_file.kind_of(shapes)
    if kind.endswith(("checkpoint", "transformer")):  # a whole model holds a VAE / CLIP too, but is not the part
        raise CheckpointError(f"{part}: {path.name} is {kind}, not {PART_NAMES[part]}")
    for marker in MARKERS[part]:
        key = next((k for k in shapes if k.endswith(marker)), None)
        if key is not None:
            prefix = key[: -len(marker)]
            return Source(path, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    raise CheckpointError(f"{part}: {path.name} is {kind}, not {PART_NAMES[part]} "
                          f"that {FAMILY_NAMES[arch]} needs")


def in_file(part: str, path: Path, shapes: Shapes) -> Source | None:
    for prefix in IN_FILE[part]:
        if any(k.startswith(prefix) and k.endswith(MARKERS[part]) for k in shapes):
            return Source(path, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    return None


def locate(arch: str, path: Path, shapes: Shapes, parts: Parts) -> dict[str, Source]:
    """Where each part of an `arch` model comes from; CheckpointError names every part that is missing or wrong."""
    prefix = single_file.transformer_prefix(shapes)
    found = {"transformer": Source(path, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})}
    given, missing = parts.given(), []
    extra = sorted(set(given) - set(NEEDS[arch]))
    if extra:
        raise CheckpointError(f"{path.name} is a {FAMILY_NAMES[arch]} model, which has no {' or '.join(extra)} part "
                              f"(it takes {', '.join(NEEDS[arch])})")
    for part in NEEDS[arch]:
        src = part_source(part, given[part], arch) if part in given else in_file(part, path, shapes)
        if src is None:
            missing.append(part)
        else:
            found[part] = src
    if missing:
        what = "; ".join(PART_NAMES[p] for p in missing)
        raise CheckpointError(
            f"{path.name}: a {VARIANT_NAMES[variant(arch, found['transformer'].shapes)]} transformer without "
            f"{what}. Give {'it' if len(missing) == 1 else 'them'} as separate files ({', '.join(missing)}), as "
            "ComfyUI keeps them, or use a checkpoint that includes them")
    check_widths(arch, found)
    return found


def _clip_widths(s: Shapes) -> tuple[int, int]:
    hidden = s[_clip_key(s, "embeddings.token_embedding.weight")][1]
    return hidden, s["text_projection.weight"][0] if "text_projection.weight" in s else hidden


def _clip_key(s: Shapes, rest: str) -> str:
    return "text_model." + rest if "text_model." + rest in s else rest


def check_widths(arch: str, found: dict[str, Source]) -> None:
    """Each part must fit the transformer: the same widths the model was trained with."""
    t = found["transformer"].shapes
    t5_width = found["t5"].shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][1]
    vae_key = next(k for k in found["vae"].shapes if k.endswith(("decoder.conv_in.weight",)))
    latent = found["vae"].shapes[vae_key][1]
    if arch == "flux":
        want = {"t5": (t["txt_in.weight"][1], t5_width), "clip_l": (t["vector_in.in_layer.weight"][1],
                                                                    _clip_widths(found["clip_l"].shapes)[0]),
                "vae": (t["img_in.weight"][1] // 4, latent)}
    else:
        (l_hidden, l_proj), (g_hidden, g_proj) = (_clip_widths(found[p].shapes) for p in ("clip_l", "clip_g"))
        if l_hidden > g_hidden:
            raise CheckpointError(f"clip_l ({found['clip_l'].path.name}, width {l_hidden}) is wider than clip_g "
                                  f"({found['clip_g'].path.name}, width {g_hidden}): the two look swapped")
        want = {"t5": (t["context_embedder.weight"][1], t5_width),
                "clip_l + clip_g": (t["y_embedder.mlp.0.weight"][1], l_proj + g_proj),
                "vae": (t["x_embedder.proj.weight"][1], latent)}
    for part, (expected, got) in want.items():
        if expected != got:
            name = found[part].path.name if part in found else f"{found['clip_l'].path.name} + {found['clip_g'].path.name}"
            raise CheckpointError(f"{part}: {name} has width {got} where this {FAMILY_NAMES[arch]} transformer takes "
                                  f"{expected}" + (": a 4-channel SD VAE? use the family's 16-channel VAE"
                                                   if part == "vae" else ""))


def parts_of(model) -> Parts:
    """The Parts a run's [model] section names (trainer.config.ModelConfig: clip_l, clip_g, t5xxl, vae,
    t5_tokenizer; "" = from the base)."""
    return Parts(**{part: getattr(model, f) or None for part, f in CONFIG_FIELDS.items()},
                 t5_tokenizer=model.t5_tokenizer or None)


def missing_parts(arch: str, path: Path, shapes: Shapes, given: set[str]) -> list[str]:
    """The parts an `arch` file needs that are neither given as files nor inside it (a bare transformer: all)."""
    return [p for p in NEEDS[arch] if p not in given and in_file(p, path, shapes) is None]


def found_beside(path: Path, arch: str) -> dict[str, Path]:
    """The parts a bare transformer file is missing that sit beside it under their usual names (in its folder, or
    in ComfyUI's sibling clip/, text_encoders/ and vae/ folders), each checked to be that kind of file."""
    path = Path(path).expanduser()
    shapes = single_file.read_safetensors_shapes(path)
    folders = [path.parent] + [path.parent.parent / name for name in COMFY_FOLDERS]
    found = {}
    for part in missing_parts(arch, path, shapes, set()):
        names = VAE_NAMES[arch] if part == "vae" else USUAL_NAMES[part]
        for candidate in (folder / name for name in names for folder in folders):
            if candidate.is_file() and _is_part(part, candidate, arch):
                found[part] = candidate
                break
    return found


def _is_part(part: str, path: Path, arch: str) -> bool:
    try:
        part_source(part, path, arch)
    except (CheckpointError, OSError):
        return False
    return True


def t5_tokenizer_near(path: str | Path) -> Path | None:
    """The T5-XXL tokenizer folder of the ComfyUI or Forge install a model file sits in (ComfyUI/models/unet/x,
    webui/models/Stable-diffusion/x: up to four folders up), or None."""
    for root in list(Path(path).expanduser().absolute().parents)[:4]:
        for place in APP_T5_TOKENIZERS:
            if (root / place / "tokenizer.json").is_file():
                return root / place
    return None


def t5_tokenizer_found(near: str | Path | None = None) -> bool:
    """Whether the loader finds the T5-XXL tokenizer without being given one: in T5_TOKENIZER_DIR, in the ComfyUI /
    Forge install the base file `near` sits in, or google/t5-v1_1-xxl in the local Hugging Face cache (its
    tokenizer.json or spiece.model), read from the folders alone."""
    if T5_TOKENIZER_DIR.is_dir() and any(T5_TOKENIZER_DIR.glob("tokenizer*")):
        return True
    if near is not None and t5_tokenizer_near(near) is not None:
        return True
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    snapshots = cache / f"models--{T5_HUB_ID.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/tokenizer.json")) or any(snapshots.glob("*/spiece.model"))

