"""Pure functions from a trained network to the `.safetensors` file that ComfyUI and WebUI load (DESIGN §4)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from trainer.config import bucket_limits
from trainer.kohya_names import is_diffusers_form, lora_modules
from trainer.optim import warmup_steps

BASE_MODEL_VERSION = {("sd1", "epsilon"): "sd_v1", ("sd2", "epsilon"): "sd_v2", ("sd2", "v_prediction"): "sd_v2_v",
                      ("sd1", "v_prediction"): "sd_v1_v", ("sdxl", "epsilon"): "sdxl_base_v1-0",
                      ("sdxl", "v_prediction"): "sdxl_base_v1-0"}
# SD 3.5 / FLUX.1 by variant, as sd-scripts writes them: flux_utils.MODEL_VERSION_FLUX_V1, and for SD3 the MMDiT's
# model_type (library/sd3_utils.analyze_state_dict_state: "medium", "5-medium", "5-large")
FLOW_MODEL_VERSION = {"flux1-dev": "flux1", "flux1-schnell": "flux1", "sd3-medium": "medium",
                      "sd3.5-medium": "5-medium", "sd3.5-large": "5-large"}
SD3_MODEL_TYPES = tuple(v for variant, v in FLOW_MODEL_VERSION.items() if variant.startswith("sd3"))
# sd-scripts library/sai_model_spec.py: ARCH_SD3_M + "-" + model type, ARCH_FLUX_1_DEV / _SCHNELL
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                  "sd2_v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                  "flux1-dev": "flux-1-dev", "flux1-schnell": "flux-1-schnell",
                  "sd3-medium": "stable-diffusion-3-medium", "sd3.5-medium": "stable-diffusion-3-5-medium",
                  "sd3.5-large": "stable-diffusion-3-5-large"}
IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models",
                  "flux": "https://github.com/black-forest-labs/flux"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
NETWORK_MODULE = {"lora": "networks.lora", "lycoris": "lycoris.kohya"}
# kohya names of the 3x3 convs LoCon adapts: res-block convs and samplers (SD1/2 diffusers names, SDXL SGM names)
CONV3X3 = re.compile(r"^lora_unet_.*_(conv|conv1|conv2|in_layers_2|out_layers_3|op)$")


FLOW_FORMAT = {"flux": "kohya", "sd3": "diffusers"}  # the file every loader reads (trainer/flow_names.py)


def to_kohya(net, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every wrapped module's factors under `<kohya name>.<param>`; alpha stays fp32 like kohya's. SD 3.5 / FLUX.1
    go through trainer/flow_names.py: FLUX.1 in kohya's format (q/k/v fused), SD 3.5 in diffusers' format."""
    if getattr(net, "file_modules", None) is not None:
        return to_flow_file(net, dtype)
    out: dict[str, torch.Tensor] = {}
    for name in net.names():
        for param, tensor in net.factors(name).items():
            t = tensor.detach().to("cpu").contiguous()
            out[f"{name}.{param}"] = t.float() if param == "alpha" else t.to(dtype)
    return out


def to_flow_file(net, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from trainer import flow_names

    if net.exports_as == "lycoris":
        return to_flow_lycoris(net, dtype)
    loras = {}
    for name in net.names():
        f = net.factors(name)
        loras[name] = flow_names.Lora(f["lora_down.weight"].detach().cpu().float(),
                                      f["lora_up.weight"].detach().cpu().float(), float(f["alpha"]))
    sd = flow_names.export(net.arch, net.file_modules, loras, FLOW_FORMAT[net.arch])
    return {k: t.float().contiguous() if k.endswith(".alpha") else t.to(dtype).contiguous() for k, t in sd.items()}


def to_flow_lycoris(net, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SD 3.5 / FLUX.1 LoHa / LoKr / DoRA: LyCORIS' tensors per split module (trainer/flow_names.py, LYCORIS)."""
    from trainer import flow_names

    factors = {name: {k: t.detach().cpu() for k, t in net.factors(name).items()} for name in net.names()}
    sd = flow_names.export_lycoris(net.arch, net.file_modules, factors)
    logging.getLogger(__name__).warning("%s file (%s): %s", net.kind, net.arch, flow_names.LYCORIS_LOADERS)
    return {k: t.float().contiguous() if k.endswith(".alpha") else t.to(dtype).contiguous() for k, t in sd.items()}


def metadata(cfg, *, arch: str, prediction_type: str, net, base_name: str, dataset_dirs: dict[str, dict],
             epoch: int, step: int, schedule, processes: int, optimizer: str, session_id: int,
             tag_frequency: dict[str, dict[str, int]], bucket_info: dict, started_at: float, resolution: int,
             mixed_precision: str, held_out: tuple[float, int, int] | None = None) -> dict[str, str]:
    """The `ss_*` (kohya) and `modelspec.*` fields, all strings as the safetensors header demands, with kohya's
    meanings: `dataset_dirs` {folder: {"n_repeats", "img_count"}}, `tag_frequency` {folder: {tag: pictures}},
    `schedule` the run's (trainer.setup.Schedule), `epoch` the epochs trained into this file (a partial one counts),
    `optimizer` as trainer.optim.description names it. With `held_out` (loss, step, pictures) also
    `ss_validation_loss`, `ss_validation_step` and `ss_validation_images`."""
    n, o, t = cfg.network, cfg.optimizer, cfg.training
    v2 = arch == "sd2"
    if arch in FLOW_FORMAT:
        from trainer.flow_parts import variant_of_config
        variant = variant_of_config(arch, net.components["transformer"].config)
        spec_arch, version = MODELSPEC_ARCH[variant], FLOW_MODEL_VERSION[variant]
    else:
        spec_arch = MODELSPEC_ARCH["sd2_v" if v2 and prediction_type == "v_prediction" else arch]
        version = BASE_MODEL_VERSION[(arch, prediction_type)]
    now = datetime.now(timezone.utc)
    fields = {
        "ss_session_id": str(session_id),  # one per run: the files of its epochs share it
        "ss_network_module": NETWORK_MODULE[net.exports_as],
        "ss_network_dim": str(n.network_dim),  # what was asked; save_atomic writes what the tensors hold
        "ss_network_alpha": str(n.network_alpha),
        "ss_network_args": json.dumps(net.network_args()),
        "ss_network_dropout": str(n.network_dropout),
        "ss_scale_weight_norms": str(n.scale_weight_norms),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_output_name": t.output_name,
        "ss_sd_model_name": base_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_num_batches_per_epoch": str(schedule.batches_per_epoch),
        "ss_num_epochs": str(schedule.epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_max_train_steps": str(schedule.total_steps),
        "ss_learning_rate": str(o.learning_rate),
        "ss_unet_lr": str(o.unet_lr or o.learning_rate),
        "ss_text_encoder_lr": str(o.text_encoder_lr),
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_lr_warmup_steps": str(warmup_steps(o, schedule.total_steps)),
        "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_mixed_precision": mixed_precision,
        "ss_gradient_checkpointing": str(cfg.model.gradient_checkpointing),
        "ss_seed": str(t.seed),
        "ss_batch_size_per_device": str(t.train_batch_size),
        "ss_total_batch_size": str(t.train_batch_size * processes * t.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/{net.exports_as}",
        "modelspec.implementation": IMPLEMENTATION.get(arch, "diffusers"),
        "modelspec.title": f"{t.output_name} (epoch {epoch})",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": cfg.data.trigger_word,
    } | loss_fields(t) | data_fields(cfg.data, resolution, dataset_dirs, tag_frequency, bucket_info)
    if cfg.model.clip_skip > 1:  # as sd-scripts: the text encoder's layer the model reads, when not the last
        fields["modelspec.encoder_layer"] = str(cfg.model.clip_skip)
    if arch in FLOW_FORMAT:  # as sd-scripts: no epsilon / v for a flow-matching model
        del fields["modelspec.prediction_type"]
    if held_out is not None:
        loss, held_step, pictures = held_out
        fields |= {"ss_validation_loss": repr(loss), "ss_validation_step": str(held_step),
                   "ss_validation_images": str(pictures)}
    return fields


def loss_fields(t) -> dict[str, str]:
    """The `ss_*` fields of how the loss was drawn and weighed (`t` the config's [training])."""
    return {
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_noise_offset": str(t.noise_offset),
        "ss_noise_offset_random_strength": str(t.noise_offset_random_strength),
        "ss_multires_noise_iterations": str(t.multires_noise_iterations),
        "ss_multires_noise_discount": str(t.multires_noise_discount),
        "ss_ip_noise_gamma": str(t.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(t.ip_noise_gamma_random_strength),
        "ss_debiased_estimation": str(t.debiased_estimation_loss),
        "ss_zero_terminal_snr": str(t.zero_terminal_snr),
        "ss_min_timestep": str(t.min_timestep),
        "ss_max_timestep": str(t.max_timestep),
    }


def data_fields(d, resolution: int, dataset_dirs: dict[str, dict], tag_frequency: dict[str, dict[str, int]],
                bucket_info: dict) -> dict[str, str]:
    """The dataset's `ss_*` fields: what was trained on and how it was read (`d` the config's [data])."""
    low, high = bucket_limits(resolution, d.min_bucket_reso, d.max_bucket_reso)
    return {
        "ss_num_train_images": str(sum(f["n_repeats"] * f["img_count"] for f in dataset_dirs.values())),
        "ss_cache_latents": str(d.cache_latents),
        "ss_shuffle_caption": str(d.shuffle_caption),
        "ss_keep_tokens": str(d.keep_tokens),
        "ss_caption_dropout_rate": str(d.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(d.caption_tag_dropout_rate),
        "ss_max_token_length": str(d.max_token_length),
        "ss_flip_aug": str(d.flip_aug),
        "ss_enable_bucket": str(d.enable_bucket),
        "ss_bucket_no_upscale": str(d.bucket_no_upscale),
        "ss_min_bucket_reso": str(low),
        "ss_max_bucket_reso": str(high),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_bucket_info": json.dumps(bucket_info),
    }


def model_name(source: str) -> str:
    """`ss_sd_model_name` as sd-scripts writes it: a local checkpoint's or folder's name, a hub id whole."""
    return Path(source).name if Path(source).exists() else source


def module_rank(params: dict[str, torch.Tensor]) -> tuple[int, float] | None:
    """(rank, alpha) a loader reads from one module's tensors; None for a LoKr whose factors are both full (it
    applies at scale 1 whatever alpha says)."""
    for rank_of in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if rank_of in params:
            rank = params[rank_of].shape[0]
            return rank, float(params["alpha"]) if "alpha" in params else float(rank)
    return None


def uniform(values: list) -> str:
    """One value as kohya writes it, or "Dynamic" when modules differ (as kohya writes for dynamic ranks)."""
    return str(values[0]) if len(set(values)) == 1 else "Dynamic"


def rank_metadata(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """`meta` with the ranks and alphas the tensors hold: ss_network_dim / ss_network_alpha of the linear modules,
    conv_dim / conv_alpha in ss_network_args of the 3x3 convs (removed when the file has none). A diffusers-form
    file (SD 3.5) folds alpha into its factors, so only its ranks are read and the trained alpha stays."""
    modules = lora_modules(tensors)
    ranks = {name: module_rank(params) for name, params in modules.items()}
    convs = {name for name in modules if CONV3X3.match(name)}
    linear = [r for name, r in ranks.items() if r and name not in convs]
    conv = [r for name, r in ranks.items() if r and name in convs]
    out = dict(meta)
    if linear:
        out["ss_network_dim"] = uniform([r for r, _ in linear])
        if not is_diffusers_form(tensors):
            out["ss_network_alpha"] = uniform([a for _, a in linear])
    try:
        args = json.loads(meta.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        return out
    if isinstance(args, dict) and (conv or not convs):
        args = {k: v for k, v in args.items() if k not in ("conv_dim", "conv_alpha")}
        if conv:
            args |= {"conv_dim": uniform([r for r, _ in conv]), "conv_alpha": uniform([a for _, a in conv])}
        out["ss_network_args"] = json.dumps(args)
    return out


def file_hashes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as sd-scripts precomputes them (train_util.precalculate_safetensors_
    hashes), over the file as it would be with only its `ss_*` fields. WebUI takes sshs_model_hash for the LoRA's
    hash (the "Lora hashes" of a picture's parameters, which Civitai matches) instead of reading the file again."""
    data = safetensors_bytes(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def save_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file under its name. The
    header's ranks and alphas are set from the tensors (`rank_metadata`), whoever wrote the rest of it, and its
    hashes from the tensors and that header. Written through open(), so the file has the umask's permissions
    (safetensors' own save_file makes it readable by its owner alone: a ComfyUI running as another user could not
    read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in rank_metadata(tensors, meta).items() if not k.startswith("sshs_")}
    meta |= file_hashes(tensors, meta)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(safetensors_bytes(tensors, meta))
    os.replace(tmp, path)
    return path
