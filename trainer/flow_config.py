"""What an SD 3.5 / FLUX.1 run config must hold (issue #17), checked by field: the base and the family agree, what
those families do not train is refused with what to set, and the split layout's part files (clip_l, clip_g, t5xxl,
vae, t5_tokenizer) exist, are of their kind and fit the transformer. trainer.config.validate calls these; standard
library only, like it."""

from __future__ import annotations

from pathlib import Path

from trainer import flow_parts, single_file
from trainer.config import (FLOW_CLIPS, FLOW_FAMILIES, FLOW_METHODS, PART_FIELDS, ConfigError, ModelConfig,
                            TrainConfig)

def check_base_family(family: str, base: str = "") -> None:
    """An SD 3.5 / FLUX.1 base trains with its own preset variant (family "sd3" / "flux"), and those variants with
    such a base: a mismatch is named, with the family to set."""
    try:
        found = single_file.family_of(base) if base else ""
    except (single_file.CheckpointError, OSError):
        return  # not a model we can read: the loader says why when the run starts
    if found in FLOW_FAMILIES and family != found:
        raise ConfigError("model.pretrained_model_name_or_path",
                          f"model.pretrained_model_name_or_path = {base!r} is {FLOW_FAMILIES[found]}: set family = "
                          f"{found!r} (its preset variant), not {family!r}")
    readable = bool(base) and base != "demo" and Path(base).expanduser().exists()  # "demo": the default, unset
    if family in FLOW_FAMILIES and readable and found not in FLOW_FAMILIES:
        raise ConfigError("family", f"family = {family!r} ({FLOW_FAMILIES[family]}), but "
                                    f"model.pretrained_model_name_or_path = {base!r} is not {FLOW_FAMILIES[family]}")


def check_flow(cfg: TrainConfig) -> None:
    """What SD 3.5 / FLUX.1 training does not have yet, refused by field with what to set (issue #17)."""
    if cfg.family not in FLOW_FAMILIES:
        return
    name, n, t = FLOW_FAMILIES[cfg.family], cfg.network, cfg.training
    missing = f"is not built for {name} yet (issue #17)"
    rules = [
        ("network.network_type", n.network_type not in FLOW_METHODS,
         f"network.network_type = {n.network_type!r}: {n.network_type} adapts 3x3 convs, and {name}'s transformer "
         f"has none (only Linears); use one of {', '.join(FLOW_METHODS)}"),
        ("network.conv_dim", n.conv_dim > 0, f"network.conv_dim = {n.conv_dim}: {name}'s transformer has no 3x3 "
                                             "convs (only its Linears are adapted): set conv_dim = 0"),
        ("network.network_train_text_encoder_only", n.network_train_text_encoder_only,
         f"network.network_train_text_encoder_only = true: the text encoders alone are not trained on {name}; set "
         f"it false (text-encoder LoRA trains {FLOW_CLIPS[cfg.family]} with the transformer)"),
        ("training.min_snr_gamma", t.min_snr_gamma > 0,
         f"training.min_snr_gamma = {t.min_snr_gamma}: min-SNR weighs the DDPM noise schedule; {name} trains by "
         "flow matching at logit-normal timesteps: set min_snr_gamma = 0"),
        ("training.noise_offset", t.noise_offset > 0,
         f"training.noise_offset = {t.noise_offset}: noise offset works around the DDPM schedule's never quite "
         f"pure noise; {name}'s rectified flow reaches pure noise at σ = 1: set noise_offset = 0"),
        ("training.multires_noise_iterations", t.multires_noise_iterations > 0,
         f"training.multires_noise_iterations = {t.multires_noise_iterations}: multires noise reshapes the DDPM "
         f"schedule's noise; {name} trains by flow matching: set multires_noise_iterations = 0"),
        ("training.min_timestep", (t.min_timestep, t.max_timestep) != (0, 1000),
         f"training.min_timestep = {t.min_timestep}, max_timestep = {t.max_timestep}: they bound the DDPM "
         f"schedule's timesteps; {name} trains by flow matching, σ from its own shifted distribution: set them to 0 "
         f"and 1000"),
        ("training.zero_terminal_snr", t.zero_terminal_snr,
         f"training.zero_terminal_snr = true: it rescales the DDPM schedule; {name} trains by flow matching, whose "
         "σ = 1 end is pure noise already: set it false"),
        ("training.debiased_estimation_loss", t.debiased_estimation_loss,
         f"training.debiased_estimation_loss = true: it weighs the DDPM schedule's SNR; {name} trains by flow "
         "matching at logit-normal timesteps: set it false"),
        ("model.unet_quantization", cfg.model.unet_quantization == "nf4",
         f"model.unet_quantization = 'nf4': a 4-bit transformer {missing}; \"fp8\" holds it in 8 bits"),
        ("model.prediction_type", cfg.model.prediction_type != "auto",
         f"model.prediction_type = {cfg.model.prediction_type!r}: {name} is a flow-matching model; leave it auto"),
        ("data.max_token_length", cfg.data.max_token_length != 75,
         f"data.max_token_length = {cfg.data.max_token_length}: {name} reads captions with T5 (CLIP-L its first 75 "
         "tokens): set max_token_length = 75"),
        ("model.clip_skip", cfg.model.clip_skip != 1,
         f"model.clip_skip = {cfg.model.clip_skip}: {name} uses its encoders' fixed layers; set clip_skip = 1"),
        ("sample.sample_sampler", cfg.sample.sample_sampler != "euler",
         f"sample.sample_sampler = {cfg.sample.sample_sampler!r}: {name} samples with flow-matching Euler; "
         "set sample_sampler = \"euler\""),
    ]
    for where, bad, message in rules:
        if bad:
            raise ConfigError(where, message)


PART_OF = {f: part for part, f in flow_parts.CONFIG_FIELDS.items()}  # config field -> flow_parts part


def check_parts(m: ModelConfig, family: str) -> None:
    """The split layout's files: each one there and of its kind, given only with an SD 3.5 / FLUX.1 transformer
    file, fitting it; and every part a bare transformer lacks given (named by field, before a run is made)."""
    given = {f: getattr(m, f) for f in PART_FIELDS if getattr(m, f)}
    base, path = m.pretrained_model_name_or_path, Path(m.pretrained_model_name_or_path).expanduser()
    if given and family not in FLOW_FAMILIES:
        raise ConfigError(f"model.{next(iter(given))}", f"model.{', model.'.join(given)}: separate text-encoder / "
                                                        "VAE / tokenizer files go with an SD 3.5 or FLUX.1 "
                                                        f"transformer file; {base!r} is an SD 1.x / 2.x / SDXL base, "
                                                        "which holds its own: clear them")
    if m.t5_tokenizer:
        _check_tokenizer(m.t5_tokenizer)
    if family not in FLOW_FAMILIES or not (path.is_file() and path.suffix.lower() == ".safetensors"):
        if parts := [f for f in given if f != "t5_tokenizer"]:
            raise ConfigError(f"model.{parts[0]}", f"model.{', model.'.join(parts)}: separate text-encoder / VAE "
                                                   f"files go with a transformer .safetensors file (e.g. "
                                                   f"flux1-dev.safetensors); {base!r} is not one: clear them")
        return
    arch = family
    if m.clip_g and arch == "flux":
        raise ConfigError("model.clip_g", f"model.clip_g = {m.clip_g!r}: FLUX.1 has no CLIP-G text encoder (it "
                                          "takes clip_l, t5xxl and vae): clear clip_g")
    for f in given.keys() - {"t5_tokenizer"}:
        try:
            flow_parts.part_source(PART_OF[f], Path(given[f]).expanduser(), arch)
        except (single_file.CheckpointError, OSError) as e:
            raise ConfigError(f"model.{f}", f"model.{f} = {given[f]!r}: {str(e).removeprefix(PART_OF[f] + ': ')}")
    _check_parts_fit(m, arch, path)


def _check_parts_fit(m: ModelConfig, arch: str, path: Path) -> None:
    try:
        shapes = single_file.read_safetensors_shapes(path)
    except (single_file.CheckpointError, OSError):
        return  # the loader names what is wrong with the base itself
    parts = flow_parts.parts_of(m)
    if missing := flow_parts.missing_parts(arch, path, shapes, set(parts.given())):
        fields_ = [f"model.{flow_parts.CONFIG_FIELDS[p]}" for p in missing]
        what, them = "; ".join(flow_parts.PART_NAMES[p] for p in missing), "it" if len(missing) == 1 else "them"
        raise ConfigError(fields_[0], f"{', '.join(fields_)}: not set, and {path.name} is a "
                                      f"{flow_parts.FAMILY_NAMES[arch]} transformer without {what}; set {them} to "
                                      "the files beside it (as ComfyUI keeps them), or use a checkpoint that "
                                      "includes them")
    try:
        flow_parts.locate(arch, path, shapes, parts)
    except single_file.CheckpointError as e:  # a part that does not fit this transformer (its widths)
        text = str(e)
        part = next((p for p in ("clip_l + clip_g", *flow_parts.CONFIG_FIELDS) if text.startswith(p)), "")
        field_ = {"clip_l + clip_g": "clip_g"}.get(part, flow_parts.CONFIG_FIELDS.get(part, ""))
        raise ConfigError(f"model.{field_}" if field_ else "model.pretrained_model_name_or_path",
                          text.removeprefix(f"{part}: ") if part in flow_parts.CONFIG_FIELDS else text) from None


def _check_tokenizer(given: str) -> None:
    place = Path(given).expanduser()
    if place.is_file() or place.is_dir() and any(place.glob("tokenizer*")):
        return
    raise ConfigError("model.t5_tokenizer", f"model.t5_tokenizer = {given!r}: " + (
        "a folder without tokenizer.json" if place.is_dir() else "no such file or folder") +
        " (give the T5-XXL tokenizer folder of google/t5-v1_1-xxl, or its tokenizer.json)")


