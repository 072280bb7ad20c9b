"""The rules a run config must keep, checked field by field and between fields: each refusal names the field, the value
and what is allowed (`trainer.config.from_dict` calls `validate`). Standard library only, like trainer.config."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import fields
from pathlib import Path

from trainer import methods, optimizer_args, prompts
from trainer.config import (ALL_FAMILIES, MAX_NAME, SECTIONS, ConfigError, DataConfig, NetworkConfig, TrainConfig,
                            bucket_limits, list_presets, range_text)

def validate(cfg: TrainConfig) -> None:
    """Raise the first ConfigError: ranges and choices of every field, then the rules between fields. Every
    combination the worker could only fail on is refused here, naming the field and the fix."""
    from trainer import flow_config  # it reads trainer.config's classes

    flow_config.check_base_family(cfg.family, cfg.model.pretrained_model_name_or_path)
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            _check_field(f"{section}.{f.name}", getattr(obj, f.name), f.metadata)
    _check_data(cfg.data)
    _check_network(cfg)
    flow_config.check_flow(cfg)
    flow_config.check_parts(cfg.model, cfg.family)
    t = cfg.training
    if not t.max_train_epochs and not t.max_train_steps:
        raise ConfigError("training.max_train_epochs", "set max_train_epochs or max_train_steps (both are 0)")
    if t.min_timestep >= t.max_timestep:
        raise ConfigError("training.min_timestep", f"training.min_timestep = {t.min_timestep}: must be below "
                                                   f"max_timestep ({t.max_timestep})")
    _check_text(cfg)
    _check_validation(cfg)
    if not re.fullmatch(r"[\w\-. ]+", t.output_name) or len(t.output_name) > MAX_NAME:
        raise ConfigError("training.output_name", f"training.output_name = {t.output_name[:40]!r}: use at most "
                                                  f"{MAX_NAME} letters, digits, - _ . and spaces")
    if bad := optimizer_args.problems(cfg.optimizer.optimizer_type, cfg.optimizer.optimizer_args):
        raise ConfigError("optimizer.optimizer_args", f"optimizer.optimizer_args: {'; '.join(bad)}")
    _check_prompts(cfg)
    for name in ("sample_width", "sample_height"):
        if getattr(cfg.sample, name) % 64:
            raise ConfigError(f"sample.{name}", f"sample.{name} = {getattr(cfg.sample, name)}: must be a "
                                                "multiple of 64 (or 0 = resolution)")
    if cfg.family not in ALL_FAMILIES:
        raise ConfigError("family", f"family = {cfg.family!r}: choose one of {', '.join(ALL_FAMILIES)}")
    if cfg.preset and cfg.preset not in list_presets():  # it names the run folder: a name, never a path
        raise ConfigError("preset", f"preset = {cfg.preset!r}: choose one of {', '.join(list_presets())}")


def _check_prompts(cfg: TrainConfig) -> None:
    for i, line in enumerate(cfg.sample.sample_prompts):
        try:
            prompts.parse(line, cfg.family)
        except ValueError as e:
            raise ConfigError("sample.sample_prompts", f"sample.sample_prompts, prompt {i + 1} ({line[:40]!r}): "
                                                       f"{e}") from None


def _check_validation(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.validation_split and d.validation_dir:
        raise ConfigError("data.validation_dir", "data.validation_dir and data.validation_split are both set: hold "
                                                 "out a folder or a fraction, not both (set the other to its default)")
    if cfg.training.validation_every_n_steps and not (d.validation_split or d.validation_dir):
        raise ConfigError("training.validation_every_n_steps",
                          f"training.validation_every_n_steps = {cfg.training.validation_every_n_steps}: there are no "
                          "held-out pictures; set data.validation_split (e.g. 0.1) or data.validation_dir")


def _check_text(cfg: TrainConfig) -> None:
    """Text reaches TOML, file names and PNG chunks: no control characters (a newline in a prompt list is fine as
    separate prompts, not inside one)."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            value = getattr(obj, f.name)
            for text in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
                if bad := [c for c in text if unicodedata.category(c) == "Cc"]:
                    raise ConfigError(f"{section}.{f.name}", f"{section}.{f.name}: holds a control character "
                                                             f"({bad[0]!r}); remove it")


def _check_field(where: str, value, meta) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(where, f"{where} = {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
    if "range" in meta:
        lo, hi = meta["range"]
        low_ok = value > lo if meta.get("exclusive_low") else value >= lo
        if not (low_ok and value <= hi):
            raise ConfigError(where, f"{where} = {value!r}: must be {range_text(meta['range'], meta)}")


def _check_data(d: DataConfig) -> None:
    for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
        if getattr(d, name) % 64:
            raise ConfigError(f"data.{name}", f"data.{name} = {getattr(d, name)}: must be a multiple of 64")
    low, high = bucket_limits(d.resolution, d.min_bucket_reso, d.max_bucket_reso)
    if d.enable_bucket and not low <= d.resolution <= high:
        field = "data.min_bucket_reso" if low > d.resolution else "data.max_bucket_reso"
        raise ConfigError(field, f"data.resolution = {d.resolution}: must lie between min_bucket_reso ({low}) and "
                                 f"max_bucket_reso ({high}); set {field.split('.')[1]} = 0 (automatic: follows the "
                                 "resolution)")


def _check_network(cfg: TrainConfig) -> None:
    n, method = cfg.network, methods.CATALOG[cfg.network.network_type]
    if n.network_train_unet_only and n.network_train_text_encoder_only:
        raise ConfigError("network.network_train_unet_only",
                          "network_train_unet_only and network_train_text_encoder_only cannot both be true")
    if n.network_train_text_encoder_only and not cfg.optimizer.text_encoder_lr:
        raise ConfigError("optimizer.text_encoder_lr", "optimizer.text_encoder_lr = 0 leaves nothing to train with "
                                                       "network_train_text_encoder_only = true: set text_encoder_lr "
                                                       "> 0 (e.g. 5e-5) or network_train_text_encoder_only = false")
    if n.lokr_factor == 0:
        raise ConfigError("network.lokr_factor", "network.lokr_factor = 0: use -1 (automatic) or 1..64")
    _check_convs(n, method)
    if n.adalora_init_r and n.network_type == "adalora" and n.adalora_init_r <= n.network_dim:
        raise ConfigError("network.adalora_init_r", f"network.adalora_init_r = {n.adalora_init_r}: AdaLoRA only "
                                                    f"takes rank away, so it must start above network_dim "
                                                    f"({n.network_dim}); set adalora_init_r = 0 (1.5 × network_dim) "
                                                    f"or a larger value")
    peft = methods.names(trained_through="peft")
    peft_only = f"works with {', '.join(peft)}, not with network_type {n.network_type!r}"
    if n.network_bias != "none" and n.network_type not in peft:
        raise ConfigError("network.network_bias", f"network.network_bias = {n.network_bias!r}: peft's bias mode "
                                                  f"{peft_only}")
    if cfg.model.unet_quantization != "none" and n.network_type not in peft:
        raise ConfigError("model.unet_quantization", f"model.unet_quantization = {cfg.model.unet_quantization!r}: "
                                                     f"a quantized UNet {peft_only}")
    lora_form = methods.names(exports_as="lora")
    for name in ("prune_rank", "prune_energy", "prune_drop"):
        if getattr(n, name) and n.network_type not in lora_form:
            raise ConfigError(f"network.{name}", f"network.{name} = {getattr(n, name)}: pruning reduces LoRA-form "
                                                 f"files; it works with {', '.join(lora_form)}, not with network_type "
                                                 f"{n.network_type!r}")
    if n.network_weights:
        _check_start_file(n, method)
    if n.scale_weight_norms and not method.max_norm:
        raise ConfigError("network.scale_weight_norms", f"network.scale_weight_norms = {n.scale_weight_norms}: it "
                                                        f"works with {', '.join(methods.names(max_norm=True))}, not "
                                                        f"with {n.network_type!r}")
    if n.loraplus_lr_ratio and not method.loraplus:
        raise ConfigError("network.loraplus_lr_ratio", f"network.loraplus_lr_ratio = {n.loraplus_lr_ratio}: LoRA+ "
                                                       f"speeds up LoRA's B matrix; it works with "
                                                       f"{', '.join(methods.names(loraplus=True))}, not with "
                                                       f"{n.network_type!r}")


def _check_start_file(n: NetworkConfig, method: methods.Method) -> None:
    path = Path(n.network_weights).expanduser()
    if not method.starts_from_file:
        raise ConfigError("network.network_weights", f"network.network_weights: starting from a file works with "
                                                     f"{', '.join(methods.names(starts_from_file=True))}, not with "
                                                     f"network_type {n.network_type!r}")
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ConfigError("network.network_weights", f"network.network_weights = {n.network_weights!r}: "
                                                     + ("no such file" if not path.is_file() else
                                                        "not a .safetensors file"))
    from trainer.single_file import CheckpointError, read_safetensors_shapes  # standard library only, as this

    try:
        keys = read_safetensors_shapes(path)
    except (CheckpointError, OSError) as e:
        raise ConfigError("network.network_weights", f"network.network_weights: {e}") from None
    if not any(k.endswith(".lora_down.weight") for k in keys):
        raise ConfigError("network.network_weights", f"network.network_weights: {path.name} holds no LoRA "
                                                     "(no lora_down / lora_up keys); a kohya LoRA file is needed")


def _check_convs(n: NetworkConfig, method: methods.Method) -> None:
    if method.convs == "required" and not n.conv_dim:
        raise ConfigError("network.conv_dim", f"network.conv_dim = 0: {method.name} trains 3x3 convs at rank "
                                              f"conv_dim; set conv_dim > 0 (e.g. 8) or network_type = \"lora\"")
    if method.convs == "never" and n.conv_dim:
        what = "adapts linear layers only" if method.linear_only else "adapts no 3x3 convs"
        fix = f'network_type = "{method.with_convs}" (LoRA with 3x3 convs) or ' if method.with_convs else ""
        raise ConfigError("network.conv_dim", f"network.conv_dim = {n.conv_dim}: {method.name} {what}; set "
                                              f"{fix}conv_dim = 0")
