"""One typed config: the only thing that crosses from the web UI to the training worker (DESIGN §2).

Field names are kohya sd-scripts' wherever kohya has the option, so a kohya user's settings carry over. A config is
built from a preset (data in presets/), then layers on top (a run's TOML, a form, `--set key=value`), then validated
by the rules in trainer/config_checks.py: every error names the field, the value and what is allowed. Standard
library only: the web UI imports this.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence


from trainer import methods, prompts

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
DEMO_SETTINGS = Path(__file__).resolve().parent.parent / "demo" / "settings.toml"
MAX_NAME = 120  # characters of an output file name
FAMILIES = ("sd15", "sdxl")  # preset variants every preset has: sd15 covers SD 1.x and SD 2.x bases
FLOW_FAMILIES = {"sd3": "SD 3.5", "flux": "FLUX.1"}  # flow-matching transformers: LoRA on the transformer trains
ALL_FAMILIES = FAMILIES + tuple(FLOW_FAMILIES)  # a preset has a variant for these when it has their section
# the methods trained and tested on their transformers' Linears: every one but LoCon (3x3 convs: they have none)
FLOW_METHODS = tuple(m for m in methods.NAMES if methods.CATALOG[m].convs != "required")
FLOW_CLIPS = {"sd3": "CLIP-L and CLIP-G", "flux": "CLIP-L"}  # what text-encoder LoRA trains (never T5, as sd-scripts)
NOT_TRAINED = ("SD 3.5 / FLUX.1 train the transformer's Linears with every method but LoCon (LoRA-form files for "
               "lora, rslora, lora_fa, vera, adalora and LoRA+; LyCORIS files for loha, lokr, dora; every preset "
               "has their variant); text-encoder LoRA (network_train_unet_only = false, text_encoder_lr > 0) trains "
               "CLIP with it, never T5: FLUX.1's CLIP-L, SD 3.5's CLIP-L and CLIP-G, with every method; "
               "pruning when saving works on their LoRA-form files; min-SNR and noise offset do not apply to flow "
               "matching; not built for them yet (issue #17): NF4")


class ConfigError(ValueError):
    """A bad value; `str(e)` reads like `network.network_alpha = -1: must be > 0 and <= 1024`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if not message.startswith(field) else message)
        self.field = field


def opt(default, help: str, range: tuple | None = None, choices: tuple | None = None, exclusive_low: bool = False):
    meta = {"help": help}
    if range is not None:
        meta["range"] = range
        meta["exclusive_low"] = exclusive_low
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str = opt("demo", "diffusers folder, .safetensors/.ckpt file, hub id, or 'demo'")
    prediction_type: str = opt("auto", "auto = read from the checkpoint", choices=("auto", "epsilon", "v_prediction"))
    clip_skip: int = opt(1, "text-encoder layer from the end (1 = last; 2 for anime-style SD1 models)", (1, 12))
    mixed_precision: str = opt("auto", "auto = bf16 on a bf16 GPU, fp16 on other GPUs, off on CPU",
                               choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute activations: much less memory, ~30% slower")
    attention: str = opt("sdpa", "attention kernel (xformers when installed on CUDA)", choices=("sdpa", "xformers"))
    unet_quantization: str = opt("none", "hold the frozen UNet / transformer in fewer bits: nf4 = QLoRA, its linear "
                                 "layers in 4-bit NF4 (bitsandbytes, CUDA only); fp8 = stored in float8, computed "
                                 "in the mixed-precision dtype layer by layer (any device; pair it with "
                                 "gradient_checkpointing)", choices=("none", "nf4", "fp8"))
    # the split layout of SD 3.5 / FLUX.1 (ComfyUI's): the transformer file as the base, its other parts beside it
    clip_l: str = opt("", "SD 3.5 / FLUX.1 transformer file: its CLIP-L text encoder file (clip_l.safetensors); "
                          "empty = inside the base file")
    clip_g: str = opt("", "SD 3.5 transformer file: its CLIP-G text encoder file (clip_g.safetensors); empty = "
                          "inside the base file. FLUX.1 has none")
    t5xxl: str = opt("", "SD 3.5 / FLUX.1 transformer file: its T5-XXL text encoder file (t5xxl_fp16.safetensors "
                         "or t5xxl_fp8_e4m3fn.safetensors); empty = inside the base file")
    vae: str = opt("", "SD 3.5 / FLUX.1 transformer file: its VAE file (ae.safetensors for FLUX.1, kohya's --ae; "
                       "the SD 3.5 VAE); empty = inside the base file")
    t5_tokenizer: str = opt("", "SD 3.5 / FLUX.1 single file or split layout: the T5-XXL tokenizer (a folder with "
                                "tokenizer.json of google/t5-v1_1-xxl, or that file); empty = "
                                "trainer/model_configs/t5_tokenizer/, the ComfyUI / Forge install the base sits in, "
                                "or the Hugging Face cache")


@dataclass(frozen=True)
class NetworkConfig:
    network_type: str = opt("lora", methods.help_text(), choices=methods.NAMES)
    network_dim: int = opt(32, "rank of the linear layers", (1, 1024))
    network_alpha: float = opt(16.0, "scale = alpha / dim", (0, 1024), exclusive_low=True)
    conv_dim: int = opt(0, "rank of the 3x3 convs of res-blocks and samplers: required by locon, optional for "
                           f"{', '.join(methods.names(convs='optional'))}; 0 = no convs. Refused with lora (use "
                           "locon, as kohya's networks.lora with conv_dim is LoCon) and the other linear methods",
                        (0, 1024))
    conv_alpha: float = opt(1.0, "scale of 3x3 convs = conv_alpha / conv_dim", (0, 1024), exclusive_low=True)
    lokr_factor: int = opt(-1, "LoKr Kronecker factor; -1 = automatic", (-1, 64))
    network_dropout: float = opt(0.0, "dropout on the adapter's input", (0.0, 1.0))
    scale_weight_norms: float = opt(0.0, "max-norm regularization (kohya's scale_weight_norms): after every step, a "
                                         "module whose ΔW norm is above this is scaled down to it (1 is usual); 0 = "
                                         "off", (0.0, 100.0))
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: B learns this many times faster than A (16 suggested); 0 = off",
                                   (0.0, 1000.0))
    network_bias: str = opt("none", "peft bias mode: also train the biases of adapted layers (lora_only) or of every "
                            "layer (all). Changes training only: no bias key in a LoRA file is read by both ComfyUI "
                            "and WebUI, so the file leaves them out", choices=("none", "lora_only", "all"))
    adalora_init_r: int = opt(0, "AdaLoRA: starting rank of every module, re-allocated during training to average "
                                 "network_dim; 0 = 1.5 × network_dim", (0, 1024))
    prune_rank: int = opt(0, "resize when saving: cap every module's rank by SVD; 0 = off", (0, 1024))
    prune_energy: float = opt(0.0, "resize when saving: keep the smallest rank holding this fraction of each module's "
                                   "update energy (Σσ²); 0 = off", (0.0, 1.0))
    prune_drop: float = opt(0.0, "LoRA-drop when saving: remove this fraction of the modules whose update is "
                                 "smallest", (0.0, 0.99))
    network_weights: str = opt("", "a LoRA file (.safetensors, kohya format) to start from, to train it further: "
                                   "its modules' weights at this run's dim (its update kept whole at this run's "
                                   "alpha); empty = a new LoRA")
    network_train_unet_only: bool = opt(False, "leave the text encoder untouched")
    network_train_text_encoder_only: bool = opt(False, "train only the text encoder")


@dataclass(frozen=True)
class DataConfig:
    train_data_dir: str = opt("", "folder of images with .txt captions (kohya N_name sub-folders allowed)")
    resolution: int = opt(512, "training size, a multiple of 64: a bucket holds at most resolution² pixels",
                          (64, 4096))
    enable_bucket: bool = opt(True, "aspect-ratio buckets instead of square crops")
    min_bucket_reso: int = opt(0, "smallest bucket side; 0 = automatic: resolution / 2 (a multiple of 64, at least "
                                  "64)", (0, 4096))
    max_bucket_reso: int = opt(0, "largest bucket side; 0 = automatic: resolution × 2", (0, 8192))
    bucket_no_upscale: bool = opt(True, "never enlarge a small image to fill a bucket")
    num_repeats: int = opt(0, "times each image is seen per epoch; 0 = auto from repeats_budget", (0, 10000))
    repeats_budget: int = opt(400, "auto repeats = ceil(repeats_budget / number of images)", (1, 100000))
    caption_extension: str = opt(".txt", "caption sidecar extension")
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags each step")
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling", (0, 75))
    caption_dropout_rate: float = opt(0.0, "chance a caption is dropped (trains unconditional)", (0.0, 1.0))
    caption_tag_dropout_rate: float = opt(0.0, "chance each tag after the first keep_tokens is left out of a step's "
                                               "caption (kohya's tag dropout)", (0.0, 1.0))
    max_token_length: int = opt(75, "caption tokens the text encoder reads (sd-scripts' max_token_length): 150 or 225 "
                                "read a longer caption in windows of 75, the rest is cut (SD 1.x/2.x/SDXL; SD 3.5 "
                                "and FLUX.1 read theirs with T5)", choices=(75, 150, 225))
    flip_aug: bool = opt(False, "random horizontal flips (not for asymmetric subjects)")
    cache_latents: bool = opt(True, "encode images once instead of every step")
    cache_latents_to_disk: bool = opt(False, "keep the cached latents on disk for the next run")
    cache_text_encoder_outputs: bool = opt(True, "encode captions once when the text encoder is frozen")
    trigger_word: str = opt("", "word that calls up the concept; kept first in every caption")
    validation_split: float = opt(0.0, "fraction of the pictures held out (at least one, chosen by the seed, never "
                                       "trained on) to measure the held-out loss; 0 = none", (0.0, 0.5))
    validation_dir: str = opt("", "folder of held-out pictures (read like train_data_dir) instead of a split")


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = opt("AdamW", "optimizer", choices=("AdamW", "AdamW8bit", "PagedAdamW8bit",
                                                                         "Prodigy", "Adafactor"))
    learning_rate: float = opt(1e-4, "default learning rate", (0, 1), exclusive_low=True)
    unet_lr: float = opt(0.0, "UNet learning rate; 0 = learning_rate", (0.0, 1.0))
    text_encoder_lr: float = opt(5e-5, "text-encoder learning rate; 0 = text encoder not trained", (0.0, 1.0))
    lr_scheduler: str = opt("cosine", "learning-rate schedule", choices=(
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: float = opt(0.0, "warm-up steps, or a fraction of all steps when below 1", (0.0, 1e6))
    lr_scheduler_num_cycles: int = opt(1, "restarts of cosine_with_restarts", (1, 100))
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 = off", (0.0, 1e4))
    weight_decay: float = opt(0.01, "AdamW weight decay", (0.0, 1.0))
    optimizer_args: list = opt([], 'extra optimizer arguments, e.g. ["betas=0.9,0.99"]')


@dataclass(frozen=True)
class TrainingConfig:
    train_batch_size: int = opt(1, "images per step", (1, 256))
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step", (1, 1024))
    num_gpus: int = opt(1, "GPUs this run trains on, in data parallel (accelerate); the app's queue gives it that "
                           "many free ones (on a machine without a GPU: CPU processes)", (1, 64))
    max_train_epochs: int = opt(10, "epochs; 0 = use max_train_steps", (0, 10000))
    max_train_steps: int = opt(0, "cap on optimizer steps; 0 = no cap", (0, 1_000_000))
    seed: int = opt(42, "random seed", (0, 2**32 - 1))
    min_snr_gamma: float = opt(5.0, "min-SNR loss weighting γ; 0 = off", (0.0, 20.0))
    noise_offset: float = opt(0.0, "noise offset (darker darks, brighter brights); 0 = off", (0.0, 1.0))
    multires_noise_iterations: int = opt(0, "multires (pyramid) noise: noise at this many coarser scales added in, "
                                         "for broad tones and composition (6-10 suggested); 0 = off", (0, 20))
    multires_noise_discount: float = opt(0.3, "weight of each coarser scale of multires noise (kohya's 0.3)",
                                         (0.0, 1.0), exclusive_low=True)
    debiased_estimation_loss: bool = opt(False, "weigh each timestep's loss by 1/√SNR (debiased estimation, "
                                                "arXiv 2310.08442): less weight on the nearly clean timesteps")
    noise_offset_random_strength: bool = opt(False, "each batch's noise offset drawn between 0 and noise_offset")
    ip_noise_gamma: float = opt(0.0, "input perturbation: extra noise γ in the model's input, not in its target "
                                     "(arXiv 2301.11706; 0.1 suggested); 0 = off", (0.0, 1.0))
    ip_noise_gamma_random_strength: bool = opt(False, "each batch's input perturbation drawn between 0 and "
                                                      "ip_noise_gamma")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule so its last timestep is pure noise (arXiv "
                                         "2305.08891, kohya's zero_terminal_snr): for v-prediction models")
    min_timestep: int = opt(0, "lowest timestep trained (0 = clean end)", (0, 999))
    max_timestep: int = opt(1000, "timesteps trained are below this (1000 = pure-noise end); a range such as "
                                  "500-1000 trains composition more than detail", (1, 1000))
    save_every_n_epochs: int = opt(1, "write a .safetensors every N epochs; 0 = only the final", (0, 10000))
    save_every_n_steps: int = opt(0, "write a resumable state every N steps, 0 = never between files (one is "
                                     "written with every saved file, at the end and on cancel)",
                                  (0, 1_000_000))
    validation_every_n_steps: int = opt(0, "held-out loss every N steps; 0 = only at every saved file",
                                        (0, 1_000_000))
    output_name: str = opt("lora", "file name of the LoRA (letters, digits, - _ . and spaces)")
    save_precision: str = opt("fp16", "precision of the saved file", choices=("fp16", "bf16", "float"))


@dataclass(frozen=True)
class SampleConfig:
    sample_every_n_steps: int = opt(0, "sample every N steps; 0 = off", (0, 1_000_000))
    sample_every_n_epochs: int = opt(1, "sample every N epochs; 0 = off", (0, 10000))
    sample_prompts: list = opt(["{trigger}"], "prompts; {trigger} becomes the trigger word; sd-scripts' "
                                "options after one set its picture apart: --n negative prompt, --w, --h, --d seed, "
                                "--s steps, --l CFG scale (FLUX.1: --g guidance), --ss sampler")
    sample_sampler: str = opt("euler_a", "sampler", choices=prompts.SAMPLERS)
    sample_steps: int = opt(20, "sampling steps", (1, 150))
    sample_cfg_scale: float = opt(7.0, "classifier-free guidance scale", (1.0, 30.0))
    sample_seed: int = opt(1234, "seed of every sample", (0, 2**32 - 1))
    sample_width: int = opt(0, "width; 0 = resolution", (0, 4096))
    sample_height: int = opt(0, "height; 0 = resolution", (0, 4096))


SECTIONS = {"model": ModelConfig, "network": NetworkConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "training": TrainingConfig, "sample": SampleConfig}
SECTION_OF = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
TOP_LEVEL = ("preset", "family", "description")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preset: str = ""
    family: str = "sd15"


# --- building ---

def _field(name: str):
    return next(f for f in fields(SECTIONS[SECTION_OF[name]]) if f.name == name)


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(SECTION_OF), n=1)
    return ConfigError(key, f"unknown setting {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))


def _flatten(d: dict) -> dict:
    """Sectioned or flat -> flat {field: value}; unknown keys raise, naming the closest real one."""
    flat = {}
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if SECTION_OF.get(k) != key:
                    raise _unknown(f"{key}.{k}") if k not in SECTION_OF else ConfigError(
                        f"{key}.{k}", f"belongs in [{SECTION_OF[k]}], not [{key}]")
                flat[k] = v
        elif key in TOP_LEVEL:
            flat[key] = value
        elif key in SECTION_OF:
            flat[key] = value
        else:
            raise _unknown(key)
    return flat


def _coerce(name: str, value: Any) -> Any:
    f = _field(name)
    want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str,
                                                     "list": list}[str(f.type)]
    where = f"{SECTION_OF[name]}.{name}"
    if want is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(where, f"{where} = {value!r}: must be true or false")
        return value
    if want in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if want is float or "." in value or "e" in value.lower() else int(value)
            except ValueError:
                raise ConfigError(where, f"{where} = {value!r}: must be a number") from None
        if value is None:  # an emptied number box in the web form
            allowed = f" ({range_text(f.metadata['range'], f.metadata)})" if "range" in f.metadata else ""
            raise ConfigError(where, f"{where} is empty: type a number{allowed}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"{where} = {value!r}: must be a number")
        if want is int:
            if float(value) != int(value):
                raise ConfigError(where, f"{where} = {value!r}: must be a whole number")
            return int(value)
        return float(value)
    if want is list:
        if isinstance(value, str):
            return [value] if value else []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(where, f"{where} = {value!r}: must be a list of strings")
        return list(value)
    return str(value)


def range_text(bounds: tuple, meta) -> str:
    lo, hi = bounds
    return f"{'>' if meta.get('exclusive_low') else '>='} {lo} and <= {hi}"


def from_dict(d: dict) -> TrainConfig:
    flat = _flatten(d)
    sections = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        if key in TOP_LEVEL:
            continue
        sections[SECTION_OF[key]][key] = _coerce(key, value)
    cfg = TrainConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()},
                      preset=str(flat.get("preset", "")), family=str(flat.get("family", "sd15")))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise the first ConfigError (trainer/config_checks.py has the rules)."""
    from trainer import config_checks  # it reads this module's classes

    config_checks.validate(cfg)


PART_FIELDS = ("clip_l", "clip_g", "t5xxl", "vae", "t5_tokenizer")  # [model] fields of the split layout


def bucket_limits(resolution: int, min_bucket_reso: int = 0, max_bucket_reso: int = 0) -> tuple[int, int]:
    """The smallest and largest bucket side: the ones set, and for each left at 0 kohya's 256 / 1024 at 512 px
    scaled to the resolution (resolution / 2 and × 2, multiples of 64, at least 64)."""
    low = min_bucket_reso or max(64, resolution // 2 // 64 * 64)
    return low, max_bucket_reso or max(64, resolution * 2 // 64 * 64)


def deep_merge(*layers: dict) -> dict:
    """Later layers win; each layer may be flat or sectioned."""
    out: dict = {}
    for layer in layers:
        out |= _flatten(layer)
    return out


# --- presets ---

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_dict(name: str, family: str) -> dict:
    if name not in list_presets():  # a name, never a path: "../x" or an absolute file is not a preset
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    path = PRESETS_DIR / f"{name}.toml"
    if family not in ALL_FAMILIES:
        raise ConfigError("family", f"family = {family!r}: choose one of {', '.join(ALL_FAMILIES)}")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    variants = {f: data.pop(f, None) for f in ALL_FAMILIES if f != "sd15"}
    if family in FLOW_FAMILIES and variants[family] is None:
        have = [p for p in list_presets() if family in tomllib.loads((PRESETS_DIR / f"{p}.toml").read_text("utf-8"))]
        raise ConfigError("family", f"family = {family!r}: preset {name!r} has no {FLOW_FAMILIES[family]} variant "
                                    f"yet (issue #17); use {' / '.join(have) or 'none'}")
    variant = variants.get(family) or {} if family != "sd15" else {}
    description = data.pop("description", "")
    flat = deep_merge(data, variant)
    return flat | {"preset": name, "family": family, "description": description}


def zero_terminal_snr_error(base: str) -> ConfigError:
    """zero_terminal_snr on an ε base (`base` describes it): min-SNR / debiased weights would divide by SNR 0."""
    return ConfigError("training.zero_terminal_snr", "training.zero_terminal_snr = true: it is for v-prediction "
                                                     f"models and this base is {base}; set it false, or "
                                                     "model.prediction_type = \"v_prediction\" to train one")


def base_settings(base: str) -> dict:
    """Settings a base model needs whatever the preset: the built-in demo model was trained at 64 px."""
    path = DEMO_SETTINGS if base == "demo" else None
    return tomllib.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def build(preset: str | None, family: str, *layers: dict) -> TrainConfig:
    base = preset_dict(preset, family) if preset else {"family": family}
    model = deep_merge(base, *layers).get("pretrained_model_name_or_path", "")
    merged = deep_merge(base, base_settings(model), *layers)
    merged.pop("description", None)
    return from_dict(merged)


def resolve_repeats(cfg: TrainConfig, num_images: int) -> int:
    d = cfg.data
    return d.num_repeats if d.num_repeats > 0 else max(1, math.ceil(d.repeats_budget / max(num_images, 1)))


def count_steps(batches_per_epoch: int, t: TrainingConfig) -> tuple[int, int]:
    """(optimizer steps an epoch, steps of the whole run) for one process's batches: max_train_steps caps the
    epochs, or sets the length when max_train_epochs is 0."""
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    total = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    return steps_per_epoch, min(total, t.max_train_steps) if t.max_train_steps else total


# --- TOML ---

def parse_overrides(items: Sequence[str]) -> dict:
    """["network_dim=8", "network.network_alpha=4", 'sample_prompts=["a", "b"]'] -> a flat dict."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(item, f"override {item!r}: expected key=value")
        key = key.strip().split(".")[-1]
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key] = value
    return out


def to_dict(cfg: TrainConfig) -> dict:
    out: dict = {"preset": cfg.preset, "family": cfg.family}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        out[section] = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_toml(cfg: TrainConfig) -> str:
    d = to_dict(cfg)
    lines = [f"preset = {_toml_value(d.pop('preset'))}", f"family = {_toml_value(d.pop('family'))}"]
    for section, values in d.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save(cfg: TrainConfig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_toml(cfg), encoding="utf-8")
    os.replace(tmp, path)


def load(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A run's TOML; `preset`/`family` at its top start it from that preset, overrides go on top."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"{path}: not valid TOML ({e})") from None
    preset, family = data.get("preset") or None, data.get("family", "sd15")
    return build(preset, family, data, parse_overrides(overrides))


def field_help(name: str) -> dict:
    """For the UI: help text, range or choices, default and type of one field."""
    f = _field(name.split(".")[-1])
    default = f.default if f.default is not MISSING else f.default_factory()
    info = {"help": f.metadata.get("help", ""), "default": default, "section": SECTION_OF[f.name],
            "type": f.type if isinstance(f.type, str) else f.type.__name__}
    for key in ("range", "choices", "exclusive_low"):
        if key in f.metadata:
            info[key] = f.metadata[key]
    return info
