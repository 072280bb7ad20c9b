"""A kohya sd-scripts training TOML read into our settings: its flat keys (and [sections], flattened as kohya does),
its network_module / network_args as our network_type, its split-layout files as our [model] parts. Standard library
only, like trainer/config.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

from trainer import prompts, single_file
from trainer.config import FLOW_FAMILIES, PART_FIELDS, SECTION_OF, ConfigError

KOHYA_ONLY = {"output_dir", "logging_dir", "save_model_as", "log_with", "log_prefix", "sample_prompts_file",
              "persistent_data_loader_workers", "max_data_loader_n_workers", "save_state", "dataset_config",
              "huggingface_repo_id", "wandb_api_key", "sdpa", "mem_eff_attn", "lowram", "highvram", "v2",
              "v_parameterization", "sdxl", "in_json", "reg_data_dir", "full_fp16", "full_bf16"}
KOHYA_ALGOS = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}
RUN_OWN = ("pretrained_model_name_or_path", "train_data_dir", "validation_dir")  # chosen where the run is made


def read_settings(path: Path, own: str) -> tuple[dict, list[str]]:
    """A kohya TOML file's settings for a new run whose base model and folders are chosen elsewhere (`own` says
    where), and the warnings. A file that is not TOML raises ValueError; an unsupported network, ConfigError."""
    try:
        flat, warnings = import_kohya(Path(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a TOML file ({e})") from None
    for key in RUN_OWN:
        if flat.pop(key, None) is not None:
            warnings.append(f"{key}: {own} instead")
    return flat, warnings


def import_kohya(source) -> tuple[dict, list[str]]:
    """A kohya sd-scripts training TOML (flat keys; its [sections] are ignored, as kohya does) -> (our flat dict,
    warnings). Unknown keys become warnings; an unsupported network is an error."""
    data = tomllib.loads(Path(source).read_text(encoding="utf-8")) if not isinstance(source, dict) else source
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= value
        else:
            flat[key] = value
    out, warnings = {}, []
    args = dict(a.split("=", 1) for a in flat.pop("network_args", []) if "=" in a)
    module = flat.pop("network_module", "networks.lora")
    if module == "networks.lora":
        out["network_type"] = "locon" if int(args.get("conv_dim", 0) or 0) > 0 else "lora"
    elif module == "lycoris.kohya":
        algo = args.get("algo", "lora").lower()
        if algo not in KOHYA_ALGOS:
            raise ConfigError("network_module", f"LyCORIS algo {algo!r} is not supported; use one of "
                                                f"{', '.join(KOHYA_ALGOS)}")
        out["network_type"] = KOHYA_ALGOS[algo]
        if algo in ("lora", "locon") and str(args.get("dora_wd", "")).lower() == "true":
            out["network_type"] = "dora"
    else:
        raise ConfigError("network_module", f"network_module {module!r} is not supported; use networks.lora or "
                                            "lycoris.kohya")
    for key in ("conv_dim", "conv_alpha"):
        if key in args:
            out[key] = float(args[key]) if key == "conv_alpha" else int(args[key])
    if "factor" in args:
        out["lokr_factor"] = int(args["factor"])
    if flat.pop("xformers", False):
        out["attention"] = "xformers"
    if "pretrained_model_name_or_path" in flat:
        out["pretrained_model_name_or_path"] = flat.pop("pretrained_model_name_or_path")
    warnings += _kohya_parts(flat, out.get("pretrained_model_name_or_path", ""))
    if "learning_rate" in flat:  # kohya's default for both rates; ours would take the preset's own
        out["unet_lr"] = flat.pop("unet_lr", None) or flat["learning_rate"]
        out["text_encoder_lr"] = flat.pop("text_encoder_lr", flat["learning_rate"])
    if isinstance(flat.get("sample_prompts"), str):  # kohya's is a file of prompts, one a line
        lines, warning = _prompt_file(flat.pop("sample_prompts"), source)
        out |= {"sample_prompts": lines} if lines else {}
        warnings += [warning] if warning else []
    for key, value in flat.items():
        if key in SECTION_OF:
            out[key] = value
        elif key in KOHYA_ONLY:
            warnings.append(f"{key}: a kohya option with no effect here; ignored")
        else:
            warnings.append(f"{key}: unknown setting; ignored")
    if isinstance(out.get("resolution"), str):  # kohya writes "512" or "512,768"
        out["resolution"] = max(int(v) for v in out["resolution"].split(","))
    return out, warnings


def _prompt_file(name: str, source) -> tuple[list[str], str]:
    """(the prompts of kohya's sample_prompts file, a warning): a relative name is looked for beside the TOML too."""
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and not isinstance(source, dict):
        path = Path(source).parent / path
    if path.suffix.lower() != ".txt":
        return [], f"sample_prompts: {name} is not a .txt prompt file (one prompt a line); ignored"
    try:
        return prompts.read_file(path.read_text(encoding="utf-8")), ""
    except (OSError, UnicodeDecodeError) as e:
        return [], f"sample_prompts: cannot read {name} ({e}); ignored"


def _kohya_parts(flat: dict, base: str) -> list[str]:
    """kohya's clip_l / clip_g / t5xxl / ae (FLUX.1) / vae (SD 3) files, kept for an SD 3.5 / FLUX.1 base; with an
    SD 1.x / 2.x / SDXL base (where kohya's vae replaces the checkpoint's) they are dropped, with a warning."""
    if "ae" in flat:
        flat["vae"] = flat.pop("ae")
    try:
        flow = single_file.family_of(base) in FLOW_FAMILIES if base else False
    except (single_file.CheckpointError, OSError):
        flow = False
    if flow:
        return []
    return [f"{key}: a separate {key} file is read for SD 3.5 / FLUX.1 transformer files only; ignored"
            for key in PART_FIELDS if flat.pop(key, None) is not None]
