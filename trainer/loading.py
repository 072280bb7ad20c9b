"""Load a base model: a diffusers folder, a single-file checkpoint, a hub id, or the built-in demo.

The architecture (SD 1.x, SD 2.x, SDXL, SD 3.5, FLUX.1) and the prediction type are read from the model itself,
never asked. SD 3.5 and FLUX.1 also load from the split layout ComfyUI users keep: the transformer file as `source`
and the text encoders / VAE as `parts` (trainer/transformer_files.py).
"""

from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from trainer import flow_parts, single_file, transformer_files
from trainer.single_file import DEMO_MODEL, CheckpointError
from trainer.flow_parts import Parts

ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.5", "flux": "FLUX.1"}
FLOW_ARCHES = ("sd3", "flux")  # flow-matching transformers: no UNet, no epsilon / v choice
FLOW = "flow_matching"
PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)


@dataclass
class BaseModel:
    arch: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    prediction_type: str  # "epsilon" | "v_prediction" | "flow_matching"
    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline
    source: str
    variant: str = ""  # sd3/flux: "sd3.5-large", "sd3.5-medium", "sd3-medium", "flux1-dev", "flux1-schnell"

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def denoiser_name(self) -> str:
        """The pipeline's component that denoises, as the adapter's targets name it."""
        return "transformer" if self.arch in FLOW_ARCHES else "unet"

    @property
    def denoiser(self):
        """The UNet (SD 1/2/XL) or the transformer (SD 3.5, FLUX.1)."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def text_encoders(self) -> list:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    @property
    def tokenizers(self) -> list:
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")
        return [t for t in (getattr(self.pipeline, n, None) for n in names) if t is not None]

    def describe(self) -> str:
        name = flow_parts.VARIANT_NAMES.get(self.variant, ARCH_NAMES[self.arch])
        return f"{name}, {self.prediction_type.replace('_', '-')}"


def load_base(source: str | Path, prediction_type: str = "auto", dtype: torch.dtype = torch.float32,
              parts: Parts = Parts()) -> BaseModel:
    """Load `source` and tell what it is. Raises CheckpointError with a message a user can act on.

    `parts`: for SD 3.5 / FLUX.1, the separate CLIP-L / CLIP-G / T5-XXL / VAE files (and the T5 tokenizer) of the
    split layout, with the transformer file as `source`."""
    text = str(source)
    path = DEMO_MODEL if text == "demo" else Path(text).expanduser()
    if parts.given() and not path.is_file():
        raise CheckpointError(f"{text}: separate text-encoder / VAE files go with a transformer file "
                              "(e.g. flux1-dev.safetensors or sd3.5_large.safetensors), not a folder or hub id")
    if text == "demo" and not path.is_dir():
        raise CheckpointError(f"the demo model is missing from {DEMO_MODEL}; run `python demo/build_demo.py` to make it")
    if problem := single_file.source_problem(path if text == "demo" else text):
        raise CheckpointError(problem)
    if path.is_dir():
        pipe, arch, pred = _from_folder(path, dtype)
    elif path.is_file():
        pipe, arch, pred = _from_file(path, dtype, parts)
    else:
        pipe, arch, pred = _from_hub(text, dtype)
    if arch in FLOW_ARCHES:
        if prediction_type not in ("auto", FLOW):
            raise CheckpointError(f"prediction_type = {prediction_type!r}: {ARCH_NAMES[arch]} is a flow-matching "
                                  "model; epsilon / v-prediction apply to SD 1.x, 2.x and SDXL (leave it on auto)")
        _own_memory(pipe)
        name = flow_parts.variant_of_config(arch, pipe.transformer.config)
        return BaseModel(arch=arch, prediction_type=FLOW, pipeline=pipe, source=text, variant=name)
    if prediction_type != "auto":
        pred = prediction_type
    pipe.scheduler.register_to_config(prediction_type=pred)
    _own_memory(pipe)
    return BaseModel(arch=arch, prediction_type=pred, pipeline=pipe, source=text)


def _own_memory(pipe) -> None:
    """Copy weights out of the file's memory map.

    Mapped tensors sit at whatever alignment the file gives them, and CPU kernels then sum in another order: the
    same weights from a .safetensors and a diffusers folder would give outputs a few ulp apart. Own copies make the
    two loads identical and release the file.
    """
    copies: dict[tuple, torch.Tensor] = {}  # tied weights (T5's shared / embed_tokens) stay one tensor
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()):
                if t.is_meta:
                    raise CheckpointError(f"the {name} of this model has no weights for {key}: the file is "
                                          "incomplete or of an unknown variant")
                same = (t.data_ptr(), t.shape, t.stride(), t.dtype)
                t.data = copies[same] if same in copies else copies.setdefault(same, t.data.clone())


def arch_of_pipeline(pipe) -> str:
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, FluxPipeline):
        return "flux"
    if isinstance(pipe, StableDiffusionXLPipeline) or pipe.unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD 2.x projects in and out of its transformers with Linear layers, SD 1.x with 1x1 convs
    return "sd2" if pipe.unet.config.get("use_linear_projection") else "sd1"


def _from_folder(path: Path, dtype: torch.dtype):
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    _check_pipeline(pipe, str(path))
    return pipe, arch_of_pipeline(pipe), pipe.scheduler.config.get("prediction_type", "epsilon")


def _from_hub(repo_id: str, dtype: torch.dtype):
    pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
    _check_pipeline(pipe, repo_id)
    return pipe, arch_of_pipeline(pipe), pipe.scheduler.config.get("prediction_type", "epsilon")


def _check_pipeline(pipe, name: str) -> None:
    if not isinstance(pipe, PIPELINES):
        raise CheckpointError(f"{name}: a {type(pipe).__name__}; expected an SD 1.x, SD 2.x, SDXL, SD 3.5 or "
                              "FLUX.1 model")


def _from_file(path: Path, dtype: torch.dtype, parts: Parts = Parts()):
    if path.suffix.lower() == ".safetensors":
        shapes = single_file.read_safetensors_shapes(path)
        state = None
    else:
        state = _load_pickled_weights(path)
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    arch = single_file.detect(shapes, path.name)
    if arch in FLOW_ARCHES:
        if state is not None:
            raise CheckpointError(f"{path.name}: {ARCH_NAMES[arch]} is read from .safetensors files only")
        return transformer_files.load(arch, path, shapes, parts, dtype), arch, FLOW
    if parts.given():
        raise CheckpointError(f"{path.name} is {single_file.kind_of(shapes)}, not an SD 3.5 or FLUX.1 transformer: "
                              f"the separate {', '.join(parts.given())} file(s) go with one of those")
    pred = single_file.prediction_type(arch, shapes, path, tensor=lambda key: _tensor(path, state, key))
    state = None  # a .ckpt's tensors are read again by diffusers: do not hold two copies
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="sd-config-") as tmp:
        config = single_file.write_config_dir(arch, shapes, pred, Path(tmp))
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype)
    return pipe, arch, pred


def _load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt's tensors, read with `weights_only=True`: code inside a pickle is never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path.name}: cannot be read as plain weights ({first[:200]}). We never unpickle code from a checkpoint; "
            "if you trust this file, convert it to .safetensors, or use the .safetensors release of the model"
        ) from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: holds a {type(state).__name__}, expected a dict of tensors")
    return state


def _tensor(path: Path, state: dict | None, key: str) -> torch.Tensor:
    if state is not None:
        return state[key]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)
