"""Read a single-file Stable Diffusion checkpoint (CompVis / SGM layout) the way people download them.

SD 3.5 / FLUX.1 files are recognised here by their transformer keys; trainer/transformer_files.py loads them.

Everything here works on the checkpoint's key names and tensor shapes: which architecture it is, whether it
predicts v, and the diffusers config of each component. The shipped configs in `model_configs/<arch>/` give what
shapes cannot say (activation, scheduler, tokenizer); the shapes override the sizes, so fine-tunes, pruned files and
the tiny test models all load through the same code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo" / "base-model"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_ENCODER_PREFIXES = {  # component -> (prefix, kind)
    "sd1": {"text_encoder": ("cond_stage_model.transformer.text_model.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.text_model.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}
SD2_IGNORED_LAYER = 23  # diffusers drops OpenCLIP-H's last layer: SD2 uses the penultimate one


class CheckpointError(ValueError):
    """A file that is not a Stable Diffusion checkpoint we can train on; the message says what was expected."""


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
NOT_SAFETENSORS = "not a safetensors file (it may be a web page or a renamed file)"


def source_problem(source: str | Path) -> str | None:
    """Why a base model source cannot be loaded, found without loading it (the web page asks before it makes a
    run; trainer.loading.load_base asks again): None for a diffusers folder, a checkpoint file, or a hub id this
    machine can reach, or "demo". What a file holds is read later (family_of, the loader)."""
    text = str(source)
    path = Path(text).expanduser()
    if text == "demo":
        return None  # the built-in demo (DEMO_MODEL), as family_of reads it
    if path.is_dir():
        return None if (path / "model_index.json").is_file() else \
            f"{text}: not a diffusers model folder (it has no model_index.json)"
    if path.is_file():
        return None if path.suffix.lower() in SINGLE_FILE_SUFFIXES else \
            f"{path.name}: unknown file type; expected a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint"
    if HUB_ID.match(text):
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
            return None
        return f"{text}: not a local file or folder, and the model hub is offline (HF_HUB_OFFLINE)"
    return (f"{text}: no such file or folder (expected a diffusers folder, a {'/'.join(SINGLE_FILE_SUFFIXES)} "
            "checkpoint, or a hub id like org/name)")


@dataclass(frozen=True)
class Detected:
    arch: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"


Shapes = dict[str, tuple[int, ...]]


def read_safetensors_header(path: Path) -> dict:
    """A .safetensors file's JSON header (key -> dtype/shape/offsets, and `__metadata__`), without reading any
    tensor; CheckpointError says what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name}: the file is empty or truncated ({path.stat().st_size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise CheckpointError(f"{path.name}: {NOT_SAFETENSORS}")  # its 8-byte "header length" is text
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: {NOT_SAFETENSORS}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (its header is not an object)")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > path.stat().st_size:
        raise CheckpointError(
            f"{path.name}: the file is truncated ({path.stat().st_size} bytes, its header promises {8 + n + data_end}); "
            "download it again"
        )
    return header


def read_safetensors_shapes(path: Path) -> Shapes:
    """Key -> shape from a .safetensors header, without reading any tensor."""
    return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path).items() if k != "__metadata__"}


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's `__metadata__` (ss_*, modelspec.*), {} when it has none or cannot be read."""
    try:
        meta = read_safetensors_header(Path(path)).get("__metadata__")
    except (CheckpointError, OSError, KeyError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")  # ComfyUI's checkpoints; SAI / BFL transformer files
FLOW_MARKERS = {"sd3": "joint_blocks.0.context_block.adaLN_modulation.1.bias",  # diffusers' own markers
                "flux": "double_blocks.0.img_attn.norm.key_norm.scale"}


def transformer_prefix(shapes: Shapes) -> str:
    """The prefix of an SD3 / FLUX transformer's keys in this file ("" for the bare SAI / BFL files)."""
    return next((p for p in TRANSFORMER_PREFIXES for m in FLOW_MARKERS.values() if p + m in shapes), "")


def flow_family(shapes: Shapes) -> str | None:
    """"sd3" or "flux" when the file holds such a transformer, else None."""
    p = transformer_prefix(shapes)
    return next((arch for arch, marker in FLOW_MARKERS.items() if p + marker in shapes), None)


def _check_flux(shapes: Shapes, name: str) -> None:
    p = transformer_prefix(shapes)
    if p + "single_stream_modulation.lin.weight" in shapes or any(k.startswith(p + "distilled_guidance_layer.")
                                                                 for k in shapes):
        raise CheckpointError(f"{name}: a FLUX.2 or Chroma transformer; supported are FLUX.1 dev and schnell")
    channels = shapes.get(p + "img_in.weight", (0, 64))[1]
    if channels != 64 and p + "img_in.weight" in shapes:
        raise CheckpointError(f"{name}: a FLUX.1 Fill / Depth / other image-conditioned transformer (in_channels "
                              f"{channels}); LoRAs are trained on FLUX.1 dev or schnell")


def detect(shapes: Shapes, name: str = "checkpoint") -> str:
    """The architecture of a single-file checkpoint, or a CheckpointError that says what the file looks like."""
    family = flow_family(shapes)
    if family == "flux":
        _check_flux(shapes, name)
    if family:
        return family
    if not any(k.startswith(UNET) for k in shapes):
        hint = _what_is_it(shapes)
        raise CheckpointError(
            f"{name}: not a Stable Diffusion checkpoint. Expected a full model (SD 1.x, SD 2.x, SDXL) with "
            f"'{UNET}*' keys, or an SD 3.5 / FLUX.1 transformer ('joint_blocks.*' / 'double_blocks.*'){hint}."
        )
    if UNET + "input_blocks.0.0.weight" in shapes and shapes[UNET + "input_blocks.0.0.weight"][1] != 4:
        raise CheckpointError(f"{name}: an inpainting or other non-standard UNet (in_channels "
                              f"{shapes[UNET + 'input_blocks.0.0.weight'][1]}); train on the base model instead")
    if any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise CheckpointError(f"{name}: an SDXL refiner; LoRAs are trained on the SDXL base model")
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    raise CheckpointError(f"{name}: a UNet without a text encoder; expected a full SD 1.x, SD 2.x or SDXL checkpoint")


def _what_is_it(shapes: Shapes) -> str:
    keys = list(shapes)
    if not keys:
        return "; the file holds no tensors"
    kind = kind_of(shapes)
    if kind == "a LoRA":
        return "; this file is a LoRA, not a base model"
    if kind.startswith("a ") and "keys" not in kind:
        return f"; this file is {kind}, not a base model"
    return f"; its first keys are {', '.join(keys[:3])}"


def kind_of(shapes: Shapes) -> str:
    """What a file holds, in words, for messages: 'an SDXL checkpoint', 'a T5 text encoder', 'a VAE', ..."""
    keys = list(shapes)
    names = {"sd1": "an SD 1.x checkpoint", "sd2": "an SD 2.x checkpoint", "sdxl": "an SDXL checkpoint",
             "sd3": "an SD 3.5 transformer", "flux": "a FLUX.1 transformer"}
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        return "a LoRA"
    if flow_family(shapes) or any(k.startswith(UNET) for k in keys):
        try:
            return names[detect(shapes)]
        except CheckpointError:
            return "a diffusion model checkpoint of a kind this trainer does not load"
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in keys):
        return "a T5 text encoder"
    if any(k.endswith("encoder.layers.0.self_attn.q_proj.weight") for k in keys):
        return "a CLIP text encoder"
    if any(k.startswith(("encoder.down", "decoder.up")) or ".encoder.down." in k for k in keys):
        return "a VAE"
    return f"a file with keys like {', '.join(keys[:3])}" if keys else "an empty file"


def prediction_type(arch: str, shapes: Shapes, path: Path, tensor=None) -> str:
    """v-prediction or epsilon, from the checkpoint alone.

    A `v_pred` key (ComfyUI's marker) or a WebUI sidecar `<name>.yaml` saying `parameterization: "v"` decides.
    Otherwise SD 2.x uses ComfyUI's test: v-models have a spread-out norm bias in the last output block.
    `tensor(key)` returns one tensor of the file, for that test.
    """
    if "v_pred" in shapes:
        return "v_prediction"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        text = sidecar.read_text(errors="replace")
        return "v_prediction" if re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", text, re.M) else "epsilon"
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if arch == "sd2" and tensor is not None and key in shapes:
        return "v_prediction" if float(tensor(key).float().std(unbiased=False)) > 0.09 else "epsilon"
    return "epsilon"


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct integers fill the `{}` in pattern across the keys."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_config(base: dict, arch: str, s: Shapes, pooled_dim: int | None) -> dict:
    p = UNET
    levels = _count(s, p + "input_blocks.{}.0.op.weight") + 1
    # input_blocks = conv_in + `layers` resnets per level + a downsampler between levels
    layers = (_count(s, p + "input_blocks.{}.") - levels) // levels
    first = [1 + level * (layers + 1) for level in range(levels)]
    channels = [s[p + f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first]
    attention = [p + f"input_blocks.{i}.1.proj_in.weight" in s for i in first]
    depth = [max(1, _count(s, p + f"input_blocks.{i}.1.transformer_blocks.{{}}.")) for i in first]
    proj_in = next(s[p + f"input_blocks.{i}.1.proj_in.weight"] for i, a in zip(first, attention) if a)
    cross = next(v[1] for k, v in s.items() if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    cfg = dict(base)
    cfg.update(
        in_channels=s[p + "input_blocks.0.0.weight"][1],
        out_channels=s[p + "out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=cross,
        use_linear_projection=len(proj_in) == 2,
    )
    if arch != "sd1":  # SD 2.x and SDXL use 64-channel heads; SD 1.x has 8 heads everywhere
        cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if arch == "sdxl":
        cfg["transformer_layers_per_block"] = depth
        add_in = s[p + "label_emb.0.0.weight"][1]
        cfg["projection_class_embeddings_input_dim"] = add_in
        cfg["addition_time_embed_dim"] = (add_in - pooled_dim) // 6  # 6 size/crop numbers beside the pooled text
    return cfg


def vae_config(base: dict, s: Shapes, prefix: str = VAE) -> dict:
    p = prefix
    levels = _count(s, p + "encoder.down.{}.")
    cfg = dict(base)
    cfg.update(
        block_out_channels=[s[p + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        layers_per_block=_count(s, p + "encoder.down.0.block.{}."),
        latent_channels=s[p + "decoder.conv_in.weight"][1],
        in_channels=s[p + "encoder.conv_in.weight"][1],
        out_channels=s[p + "decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return cfg


def text_encoder_config(base: dict, s: Shapes, prefix: str, kind: str) -> dict:
    cfg = dict(base)
    if kind == "hf":
        vocab, hidden = s[prefix + "embeddings.token_embedding.weight"]
        layers = _count(s, prefix + "encoder.layers.{}.")
        inner = s[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
        positions = s[prefix + "embeddings.position_embedding.weight"][0]
    else:
        vocab, hidden = s[prefix + "token_embedding.weight"]
        layers = _count(s, prefix + "transformer.resblocks.{}.")
        if prefix == "cond_stage_model.model." and prefix + f"transformer.resblocks.{SD2_IGNORED_LAYER}.ln_1.weight" in s:
            layers -= 1
        inner = s[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = s[prefix + "positional_embedding"][0]
        if "CLIPTextModelWithProjection" in base["architectures"]:
            cfg["projection_dim"] = s[prefix + "text_projection"][1]
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inner,
               max_position_embeddings=positions, num_attention_heads=max(1, hidden // 64))
    return cfg


def write_config_dir(arch: str, shapes: Shapes, pred: str, out: Path) -> Path:
    """A diffusers config folder (no weights) for this checkpoint: what `from_single_file(config=...)` reads."""
    src = MODEL_CONFIGS / arch
    shutil.copytree(src, out, dirs_exist_ok=True)

    def load(component: str) -> dict:
        return json.loads((src / component / "config.json").read_text())

    def dump(component: str, cfg: dict) -> None:
        (out / component / "config.json").write_text(json.dumps(cfg, indent=2))

    pooled = None
    for component, (prefix, kind) in TEXT_ENCODER_PREFIXES[arch].items():
        cfg = text_encoder_config(load(component), shapes, prefix, kind)
        dump(component, cfg)
        if component == "text_encoder_2":
            pooled = cfg["projection_dim"]
        tok = "tokenizer" + component.removeprefix("text_encoder")
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(MODEL_CONFIGS / "clip_tokenizer" / f, out / tok / f)
    dump("unet", unet_config(load("unet"), arch, shapes, pooled))
    dump("vae", vae_config(load("vae"), shapes))
    sched_file = out / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    sched["prediction_type"] = pred
    sched_file.write_text(json.dumps(sched, indent=2))
    return out


def known_prediction(source: str | Path) -> str:
    """A diffusers folder's (or the demo's) prediction type, read from its scheduler config without loading it; ""
    for anything else (a single file is read when the worker loads it)."""
    folder = DEMO_MODEL if str(source) == "demo" else Path(source).expanduser()
    try:
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type", "")
    except (OSError, ValueError):
        return ""


def family_of(source: str | Path) -> str:
    """"sdxl", "sd15" (SD 1.x and 2.x share presets), "sd3" or "flux", read cheaply: a folder's model_index.json or
    a .safetensors header. Needs no torch, so the web UI can pick a preset variant as soon as a model is chosen."""
    path = Path(source)
    if str(source) == "demo":
        return "sd15"
    if path.is_dir() and (path / "model_index.json").is_file():
        cls = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        return next((f for k, f in PIPELINE_FAMILIES.items() if k in cls), "sd15")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        arch = detect(read_safetensors_shapes(path), path.name)
        return arch if arch in ("sdxl", "sd3", "flux") else "sd15"
    name = str(source).lower()  # a .ckpt or hub id: the name is the best cheap hint
    return next((f for k, f in NAME_HINTS.items() if k in name), "sd15")


PIPELINE_FAMILIES = {"StableDiffusion3": "sd3", "Flux": "flux", "XL": "sdxl"}
NAME_HINTS = {"flux": "flux", "stable-diffusion-3": "sd3", "sd3": "sd3", "xl": "sdxl"}
