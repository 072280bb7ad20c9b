"""Train tab: base model, preset, the main settings up front and the rest under Advanced; Train queues a run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer import config, kohya_import
from trainer.flow_parts import (CONFIG_FIELDS, FAMILY_NAMES, PART_NAMES, T5_TOKENIZER_DIR, USUAL_NAMES, VAE_NAMES,
                                found_beside, missing_parts, t5_tokenizer_found, t5_tokenizer_near)
from trainer.single_file import CheckpointError, family_of, known_prediction, read_safetensors_shapes, source_problem
from ui.run_length import run_length

MAIN_FIELDS = ["network_dim", "network_alpha", "resolution", "max_train_epochs", "num_repeats", "unet_lr",
               "text_encoder_lr", "train_batch_size"]
ADVANCED_FIELDS = [
    "network_type", "conv_dim", "conv_alpha", "lokr_factor", "loraplus_lr_ratio", "adalora_init_r", "network_bias",
    "network_dropout", "scale_weight_norms", "network_weights", "prune_rank", "prune_energy", "prune_drop",
    "unet_quantization", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "optimizer_type",
    "optimizer_args", "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "max_grad_norm", "weight_decay",
    "max_train_steps", "gradient_accumulation_steps", "num_gpus", "mixed_precision", "attention", "prediction_type",
    "gradient_checkpointing", "clip_skip", "min_snr_gamma", "noise_offset", "noise_offset_random_strength",
    "multires_noise_iterations", "multires_noise_discount", "debiased_estimation_loss", "zero_terminal_snr",
    "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "shuffle_caption",
    "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "max_token_length", "flip_aug", "cache_latents",
    "cache_latents_to_disk", "save_every_n_epochs", "save_every_n_steps", "save_precision", "validation_split",
    "validation_every_n_steps", "sample_every_n_epochs", "sample_every_n_steps", "sample_sampler", "sample_steps",
    "sample_cfg_scale", "sample_seed", "sample_prompts", "seed", "output_name"]
PLAN_FIELDS = ("resolution", "max_train_epochs", "num_repeats", "train_batch_size", "enable_bucket", "min_bucket_reso",
               "max_bucket_reso", "bucket_no_upscale", "max_train_steps", "gradient_accumulation_steps", "num_gpus",
               "validation_split", "seed")  # what the run's length depends on
LIST_FIELDS = ("sample_prompts", "optimizer_args")  # one item a line in the form
LABELS = {"network_dim": "Dim (rank)", "network_alpha": "Alpha", "resolution": "Resolution",
          "max_train_epochs": "Epochs", "num_repeats": "Repeats (0 = auto)", "unet_lr": "UNet learning rate",
          "text_encoder_lr": "Text encoder learning rate (0 = frozen)", "train_batch_size": "Batch size",
          "sample_prompts": "Sample prompts (one per line; {trigger} = the trigger word)",
          "optimizer_args": "Optimizer arguments (one per line, e.g. betas=0.9,0.99)",
          "clip_l": "CLIP-L text encoder file (clip_l.safetensors)", "clip_g": "CLIP-G text encoder file "
          "(clip_g.safetensors)", "t5xxl": "T5-XXL text encoder file (t5xxl_fp16.safetensors)",
          "vae": "VAE file (ae.safetensors for FLUX.1)", "t5_tokenizer": "T5-XXL tokenizer (folder or tokenizer.json)",
          # the rest as people who train LoRAs say them (QA: "Lokr factor", "Num gpus", "Min snr gamma")
          "network_type": "Method", "conv_dim": "Conv dim (3×3 convs)", "unet_quantization": "UNet quantization",
          "lokr_factor": "LoKr factor", "loraplus_lr_ratio": "LoRA+ ratio", "adalora_init_r": "AdaLoRA starting rank",
          "min_bucket_reso": "Smallest bucket side", "max_bucket_reso": "Largest bucket side",
          "optimizer_type": "Optimizer", "lr_scheduler": "LR schedule", "lr_warmup_steps": "LR warm-up steps",
          "lr_scheduler_num_cycles": "LR schedule cycles", "num_gpus": "GPUs", "clip_skip": "CLIP skip",
          "min_snr_gamma": "Min-SNR γ", "ip_noise_gamma": "Input perturbation γ (ip_noise_gamma)",
          "ip_noise_gamma_random_strength": "Random input perturbation strength",
          "sample_sampler": "Sampler of the samples", "sample_steps": "Sample steps",
          "sample_cfg_scale": "Sample guidance (CFG)", "sample_seed": "Sample seed", "save_precision": "Saved precision",
          "zero_terminal_snr": "Zero terminal SNR (v-prediction models)", "scale_weight_norms": "Max norm (scale "
          "weight norms)", "caption_tag_dropout_rate": "Tag dropout rate"}
FORM_HINTS = {  # help that names a setting the form does not show
    "num_repeats": "times each picture is seen per epoch; 0 = auto, about 400 picture views an epoch",
    "unet_lr": "UNet learning rate; 0 = the preset's own rate (its learning_rate)",
    "max_train_epochs": "epochs; 0 = as many as Max train steps (under Advanced) takes"}
SUFFIXES = (".safetensors", ".ckpt")
PART_FIELDS = list(config.PART_FIELDS)  # shown for an SD 3.5 / FLUX.1 .safetensors base: ComfyUI's split layout
PART_FILES = {n for names in (*USUAL_NAMES.values(), *VAE_NAMES.values()) for n in names}  # not bases: not listed
FIELDS = MAIN_FIELDS + ADVANCED_FIELDS + PART_FIELDS


@dataclass
class TrainTab:
    base: gr.Dropdown
    preset: gr.Radio
    base_info: gr.Markdown
    preset_info: gr.Markdown
    parts: gr.Group  # the split layout's files, shown for an SD 3.5 / FLUX.1 .safetensors base
    parts_info: gr.Markdown
    fields: dict  # config field name -> its component
    length: gr.Markdown  # the run's steps, as the form stands
    start: gr.Button
    status: gr.Markdown
    kohya: gr.UploadButton  # a kohya sd-scripts training TOML, read into the form
    kohya_info: gr.Markdown

    def form(self) -> list:
        return [self.fields[n] for n in FIELDS]


def build(models_dir: Path) -> TrainTab:
    defaults = flat_preset("character", "sd15", "demo")
    with gr.Row():
        base = gr.Dropdown(choices=base_model_choices(Path(models_dir)), value="demo", allow_custom_value=True,
                           label="Base model (or type a path / hub id)", elem_id="train-base", scale=3)
        preset = gr.Radio(choices=config.list_presets(), value="character", label="Preset", elem_id="train-preset",
                          scale=2)
    base_info = gr.Markdown(explain_base("demo"), elem_id="train-base-info")
    fields = {}
    with gr.Group(visible=False, elem_id="train-parts") as parts:
        parts_info = gr.Markdown(elem_id="train-parts-info")
        for row in (PART_FIELDS[:3], PART_FIELDS[3:]):
            with gr.Row():
                fields |= {name: component_for(name, "") for name in row}
    preset_info = gr.Markdown(elem_id="train-preset-info")
    kohya = gr.UploadButton("Import kohya settings (.toml)", file_types=[".toml"], size="sm", elem_id="train-import")
    kohya_info = gr.Markdown(elem_id="train-import-info")
    for row in (MAIN_FIELDS[:4], MAIN_FIELDS[4:]):
        with gr.Row():
            fields |= {name: component_for(name, defaults[name]) for name in row}
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        for start in range(0, len(ADVANCED_FIELDS), 4):
            with gr.Row():
                fields |= {name: component_for(name, defaults[name]) for name in ADVANCED_FIELDS[start:start + 4]}
    length = gr.Markdown(elem_id="train-length")
    start = gr.Button("Train", variant="primary", elem_id="train-start")
    status = gr.Markdown(elem_id="train-status")
    return TrainTab(base, preset, base_info, preset_info, parts, parts_info, fields, length, start, status, kohya,
                    kohya_info)


def on_preset(preset_name: str, base: str, *parts: str) -> list:
    """The form refilled from a preset for the base's family, then the preset's description. The split layout's
    fields keep `parts` (a new preset, the same base), else are pre-filled from the files beside the base."""
    family = family_or_default(base)
    values = flat_preset(preset_name, family, base)
    values |= dict(zip(PART_FIELDS, parts)) if parts else guess_parts(base)
    info = config.preset_dict(preset_name, family).get("description", "")
    return [gr.update(value=display_value(n, values[n])) for n in FIELDS] + [info]


def on_preset_click(preset_name: str, base: str, *values) -> list:
    """A preset clicked: the form refilled from it (the parts typed are kept), and the note says which values it
    changed, so an edit made before is not dropped without a word."""
    form = dict(zip(FIELDS, values))
    *fields, info = on_preset(preset_name, base, *(form[n] for n in PART_FIELDS))
    changed = [f"{label_of(n).split(' (')[0]} {shown(form[n])} → {shown(u['value'])}" for n, u in zip(FIELDS, fields)
               if n not in PART_FIELDS and u["value"] != form[n]]
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    return [*fields, info + (f"\n\n_The preset set {', '.join(changed[:6])}{more}._" if changed else "")]


def shown(value) -> str:
    text = str(value).replace("\n", " / ")
    return "(empty)" if text == "" else text if len(text) <= 40 else text[:37] + "…"


def settings_key(base: str) -> str:
    """What the preset's values depend on: the base's family, and whether it is the demo (its own settings)."""
    return "demo" if base == "demo" else family_or_default(base)


def on_base(preset_name: str, base: str, refilled_for: str) -> list:
    """A new base: the form refilled from the preset only when the values depend on it (another family, or to or
    from the demo), so what the user typed stays; the split layout's files always follow the base. Answers
    [field updates…, the preset's note, the key refilled for]."""
    key = settings_key(base)
    if key == refilled_for:  # the form is kept: the note says so no more
        parts, info = guess_parts(base), config.preset_dict(preset_name, family_or_default(base)).get("description", "")
        return [gr.update(value=parts[n]) if n in PART_FIELDS else gr.update() for n in FIELDS] + [info, key]
    *fields, info = on_preset(preset_name, base)
    if refilled_for:  # not the page's first fill
        info = f"{info}\n\n_The settings were refilled from the preset for this base: change again what you had._"
    return [*fields, info, key]


def remembered(base: str, preset_name: str, *values) -> dict:
    """What a reload puts back: the base, the preset and every field of the form as the user left them."""
    return {"base": base, "preset": preset_name, "values": dict(zip(FIELDS, values))}


def on_page_load(saved, preset_name: str, base: str) -> list:
    """The form as it was before the page was reloaded (`saved`, from the browser's storage: checked, a value of
    the wrong kind is left to the preset), else the preset for the base. Answers [base, preset, field updates…,
    the preset's note, the key refilled for]."""
    saved = saved if isinstance(saved, dict) else {}
    values = saved.get("values") if isinstance(saved.get("values"), dict) else {}
    if saved.get("preset") not in config.list_presets() or not isinstance(saved.get("base"), str) or not values:
        return [gr.update(), gr.update(), *on_base(preset_name, base, "")]
    base, preset_name = saved["base"], saved["preset"]
    *fields, info, key = on_base(preset_name, base, "")
    plain = (str, int, float, bool, type(None))
    kept = [gr.update(value=values[n]) if isinstance(values.get(n, ...), plain) else field
            for n, field in zip(FIELDS, fields)]
    return [base, preset_name, *kept, info, key]


def on_train(jobs, base: str, preset_name: str, folder: str, trigger: str, *values) -> list:
    """Queue a run from the form: [field updates…, status text, tab switch, the Monitor's run, its view]."""
    no_change = [gr.update(), gr.update(), gr.update()]  # the tab, the Monitor's run and its view as they were
    try:
        cfg = build_config(base, preset_name, Path(folder) if folder else None, trigger, FIELDS, list(values))
        run = jobs.create(cfg, Path(folder))
    except config.ConfigError as e:
        errors = every_error(e, base, preset_name, Path(folder) if folder else None, trigger, list(values))
        return [*field_errors(FIELDS, errors), f"⚠ {in_form_words(e)}{also_marked(errors)}", *no_change]
    except (ValueError, OSError) as e:
        return [*field_errors(FIELDS, None), f"⚠ {e}", *no_change]
    return [*field_errors(FIELDS, None), f"Queued **{run.run_id}**.", gr.Tabs(selected="monitor"), run.run_id, None]


def on_length(base: str, preset_name: str, folder: str, trigger: str, *values) -> str:
    """The run's length above the Train button as the form stands; "" while the form or the dataset is not ready
    (Train then says why)."""
    try:
        return run_length(build_config(base, preset_name, Path(folder) if folder else None, trigger, FIELDS,
                                       list(values)))
    except (ValueError, OSError, CheckpointError):
        return ""


def on_edit(name: str, status: str, base: str, preset_name: str, *values) -> list:
    """A field edited: [its mark gone (the next Train checks it again), the form kept for a reload, the refusal
    under Train gone]."""
    return [unmarked(name), remembered(base, preset_name, *values), stale_status(status)]


def stale_status(status: str):
    """A refusal under the Train button goes once a field is edited: the next Train checks the form again."""
    return "" if status.startswith("⚠") else gr.update()


def also_marked(errors: list[config.ConfigError]) -> str:
    """Where the first bad field is when Advanced holds it (it may be closed), and the other bad fields by label."""
    names = [e.field.split(".")[-1] for e in errors]
    where = [f"{label_of(n).split(' (')[0]}{' (under Advanced)' if n in ADVANCED_FIELDS else ''}" for n in names]
    return (" (under Advanced)" if names[0] in ADVANCED_FIELDS else "") + (
        f"; marked in the form too: {', '.join(where[1:])}" if where[1:] else "")


def every_error(first: config.ConfigError, base: str, preset: str, folder: Path | None, trigger: str, values: list,
                limit: int = 12) -> list[config.ConfigError]:
    """The form's bad fields, all of them at once: each one found is set back to the preset's value and the form
    checked again, until it passes or a field cannot be set back (QA: one error a click)."""
    errors, values = [first], list(values)
    preset_values = {n: display_value(n, v) for n, v in flat_preset(preset, family_or_default(base), base).items()}
    while len(errors) < limit:
        name = errors[-1].field.split(".")[-1]
        if name not in FIELDS or values[FIELDS.index(name)] == preset_values.get(name):
            break
        values[FIELDS.index(name)] = preset_values.get(name)
        try:
            build_config(base, preset, folder, trigger, FIELDS, values)
            break
        except config.ConfigError as e:
            errors.append(e)
        except (ValueError, OSError):
            break
    return errors


def on_import(file, base: str, preset_name: str, *values) -> list:
    """A kohya sd-scripts training TOML over the form: [field updates…, what was taken and what was not]. A value
    the config refuses is left as the form had it and named, with the reason."""
    keep = [gr.update() for _ in FIELDS]
    if not file:
        return [*keep, ""]
    path = Path(file)
    try:
        flat, notes = kohya_import.read_settings(path, "the base above and the Dataset tab's pictures are used")
    except (config.ConfigError, ValueError, OSError) as e:
        return [*keep, f"⚠ {path.name}: {e}"]
    if flat.pop("network_train_unet_only", False):
        flat["text_encoder_lr"] = 0.0  # the form's way to say it
    flat.pop("learning_rate", None)  # already both rates' default (import_kohya)
    form = dict(zip(FIELDS, values))
    notes += [f"{key}: not in the form; ignored" for key in flat if key not in form]
    taken = {key: display_value(key, value) for key, value in flat.items() if key in form}
    while taken and (problem := config_problem(preset_name, base, form | taken)):
        name = problem.field.split(".")[-1]
        if name not in taken:
            notes.append(f"the form with these settings: {problem}")
            break
        notes.append(f"{problem}; left as it was")
        del taken[name]
    form |= taken
    return [gr.update(value=form[n]) for n in FIELDS] + [import_note(path.name, taken, notes)]


def config_problem(preset_name: str, base: str, form: dict) -> config.ConfigError | None:
    """What the config would refuse in these form values (the base's family, the preset under them), or None."""
    layer = form_layer(list(form), list(form.values()))
    if base and family_or_default(base) not in config.FLOW_FAMILIES:
        layer["pretrained_model_name_or_path"] = base
    try:
        config.build(preset_name, family_or_default(base), layer)
    except config.ConfigError as e:
        return e
    return None


def import_note(name: str, taken: dict, notes: list[str]) -> str:
    """The import's account under the Train button's row: the settings now in the form, then what was not taken."""
    shown = ", ".join(f"{k} = {v!r}" for k, v in taken.items()) or "none"
    text = f"Imported **{name}**: {len(taken)} setting(s) into the form ({shown}). Check them, then Train."
    if notes:
        text += "\n\nNot taken:\n" + "\n".join(f"- {note}" for note in notes)
    return text + "\n\nPicking a preset again refills the form from the preset."


def base_model_choices(models_dir: Path) -> list[tuple[str, str]]:
    """("label", value) for the demo and every checkpoint or diffusers folder in the models folder."""
    choices = [("Demo model (built in, tiny, CPU-friendly)", "demo")]
    if models_dir.is_dir():
        for p in sorted(models_dir.iterdir()):
            if p.suffix.lower() in SUFFIXES and p.name not in PART_FILES or (p / "model_index.json").is_file():
                choices.append((p.name, str(p)))
    return choices


def hint_of(name: str) -> str:
    """The field's help with its allowed range, as the form shows it under the field: another setting named by
    its label, and what a setting the form does not show means in its words."""
    info = config.field_help(name)
    hint = FORM_HINTS.get(name, in_form_words(info.get("help", "")))
    if "range" in info:
        low, high = info["range"]
        span = f"above {low}, up to {high}" if info.get("exclusive_low") else f"{low} to {high}"
        hint = f"{hint} ({span})".strip()
    return hint


def component_for(name: str, value):
    """A form component built from the config field's own help, range and choices."""
    info = config.field_help(name)
    label = label_of(name)
    hint = hint_of(name)
    elem = f"train-{name.replace('_', '-')}"
    if name in LIST_FIELDS:
        return gr.Textbox(value="\n".join(value or []), label=label, lines=3, elem_id=elem, info=hint)
    if "choices" in info:
        return gr.Dropdown(choices=list(info["choices"]), value=value, label=label, elem_id=elem, info=hint)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, elem_id=elem, info=hint)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return gr.Number(value=value, label=label, elem_id=elem, info=hint)
    return gr.Textbox(value=str(value), label=label, elem_id=elem, info=hint)


def flat_preset(preset: str, family: str, base: str = "") -> dict:
    """Every field's value from the preset for `family` (an SD 3.5 / FLUX.1 base is left out: its parts are the
    form's, checked when Train is clicked)."""
    layer = {"pretrained_model_name_or_path": base} if base and family not in config.FLOW_FAMILIES else {}
    cfg = config.build(preset, family, layer)
    return {k: v for section in config.to_dict(cfg).values() if isinstance(section, dict) for k, v in section.items()}


def form_layer(names: list[str], values: list) -> dict:
    """Form values -> a flat config layer (lists from text lines, whole numbers back to ints)."""
    layer = {}
    for name, value in zip(names, values):
        if name in LIST_FIELDS:
            value = [line.strip() for line in (value or "").splitlines() if line.strip()]
        elif isinstance(value, float) and value.is_integer() and config.field_help(name).get("type") == "int":
            value = int(value)
        layer[name] = value
    return layer


def family_or_default(base: str) -> str:
    try:
        return family_of(base) if base else "sd15"
    except (CheckpointError, OSError):
        return "sd15"


def display_value(name: str, value):
    return "\n".join(value) if name in LIST_FIELDS else value


def build_config(base: str, preset: str, dataset_dir: Path | None, trigger: str, names: list[str], values: list):
    """The run's config, or a ConfigError naming the field. Raises CheckpointError for an unreadable base."""
    if dataset_dir is None or not Path(dataset_dir).is_dir() or not any(Path(dataset_dir).iterdir()):
        raise ValueError("Add pictures on the Dataset tab first (or click “Try the demo dataset” there).")
    family = family_of(base) if base else "sd15"
    layer = form_layer(names, values)
    layer |= {"pretrained_model_name_or_path": base or "demo", "train_data_dir": str(dataset_dir),
              "trigger_word": trigger or ""}
    if layer.get("text_encoder_lr"):  # the form says "0 = frozen": a rate typed there trains the text encoder,
        layer["network_train_unet_only"] = False  # also where the preset leaves it untouched (style, FLUX.1, ...)
    cfg = config.build(preset, family, layer)
    if cfg.training.zero_terminal_snr and cfg.model.prediction_type == "auto" and \
            known_prediction(base or "demo") == "epsilon":  # refused here, not by the worker after a load
        raise config.zero_terminal_snr_error("an epsilon-prediction model")
    if flow_file(base) and not cfg.model.t5_tokenizer and not t5_tokenizer_found(base):  # the loader would stop
        raise config.ConfigError("model.t5_tokenizer", "model.t5_tokenizer: not set, and the T5-XXL tokenizer is "
                                                       f"not in {T5_TOKENIZER_DIR}, a ComfyUI / Forge install around "
                                                       "the base, nor the Hugging Face cache: give the folder with "
                                                       "tokenizer.json of google/t5-v1_1-xxl")
    return cfg


def label_of(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


# a config key, with its section or bare; not one quoted back as typed ("unet_lr=1e-4:1e-3", a sweep's grid)
SETTING = re.compile(rf"\b(?:(?:{'|'.join(config.SECTIONS)})\.(\w+)|([a-z0-9]+(?:_[a-z0-9]+)+))\b(?!=)")


def in_form_words(error: config.ConfigError | Exception | str) -> str:
    """An error (or help) as the form says it: a setting of the form by its label ("Dim = 0: …", "below Max
    timestep"), not by its config key ("network.network_dim = 0: …", "max_timestep"), which a settings file uses."""
    def label(key: re.Match) -> str:
        name = key[1] or key[2]
        if name == "pretrained_model_name_or_path":
            return "Base model"
        return label_of(name).split(" (")[0] if name in FIELDS else key[0]
    return SETTING.sub(label, str(error))


def field_errors(names: list[str], errors: config.ConfigError | list | None) -> list:
    """One update per form field: the error text beside each bad one (as its info line), normal help elsewhere."""
    errors = [errors] if isinstance(errors, config.ConfigError) else errors or []
    by_field = {}
    for e in errors:
        by_field.setdefault(e.field.split(".")[-1], e)
    return [gr.update(info=f"⚠ {in_form_words(by_field[n])}", elem_classes=["field-error"]) if n in by_field
            else unmarked(n) for n in names]


def unmarked(name: str) -> dict:
    """A field as it is before any error: its help as the info line, no red border (a field once edited)."""
    return gr.update(info=hint_of(name), elem_classes=[])


def explain_base(base: str) -> str:
    if base and (problem := source_problem(base)):
        return f"⚠ {problem}"
    try:
        family = family_of(base)
    except (CheckpointError, OSError) as e:
        return f"⚠ {e}"
    if family in config.FLOW_FAMILIES:
        return f"⚠ Detected: **{config.FLOW_FAMILIES[family]}**. {config.NOT_TRAINED}."
    return f"Detected: **{family.upper().replace('SD15', 'SD 1.x / 2.x')}** presets apply."


def flow_file(base: str) -> str:
    """"sd3" / "flux" when `base` is such a .safetensors file (a bare transformer or all-in-one), else ""."""
    family = family_or_default(base)
    path = Path(base or "").expanduser()
    return family if family in config.FLOW_FAMILIES and path.suffix.lower() == ".safetensors" and path.is_file() \
        else ""


def guess_parts(base: str) -> dict[str, str]:
    """Each split-layout field: "", or the file found beside an SD 3.5 / FLUX.1 transformer under its usual
    ComfyUI name (clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors, …) for a part the base lacks, and
    the T5 tokenizer of the ComfyUI / Forge install it sits in."""
    out = dict.fromkeys(PART_FIELDS, "")
    if arch := flow_file(base):
        try:
            found = found_beside(Path(base), arch)
        except (CheckpointError, OSError):
            found = {}
        out |= {CONFIG_FIELDS[part]: str(path) for part, path in found.items()}
        if tokenizer := t5_tokenizer_near(base):
            out["t5_tokenizer"] = str(tokenizer)
    return out


def on_base_parts(base: str) -> list:
    """[the split layout's group, its note, the CLIP-G field]: shown for an SD 3.5 / FLUX.1 .safetensors base,
    CLIP-G for SD 3.5 only."""
    arch = flow_file(base)
    return [gr.update(visible=bool(arch)), explain_parts(base, arch) if arch else "",
            gr.update(visible=arch == "sd3")]


def explain_parts(base: str, arch: str) -> str:
    path = Path(base).expanduser()
    try:
        lacks = missing_parts(arch, path, read_safetensors_shapes(path), set())
    except (CheckpointError, OSError) as e:
        return f"⚠ {e}"
    name = FAMILY_NAMES[arch]
    found = guess_parts(base)
    if not lacks:
        head = f"**{path.name}** holds every part of {name}; a file given here replaces that part."
    else:
        have = [CONFIG_FIELDS[p] for p in lacks if found[CONFIG_FIELDS[p]]]
        head = (f"**{path.name}** is a {name} transformer without {'; '.join(PART_NAMES[p] for p in lacks)}: give "
                f"{'it' if len(lacks) == 1 else 'them'} here (ComfyUI's split layout)."
                + (f" Found beside it: {', '.join(have)}." if have else ""))
    if found["t5_tokenizer"]:
        return head + f" The T5-XXL tokenizer: {found['t5_tokenizer']} (of the install the file sits in)."
    return head + (" The T5-XXL tokenizer (google/t5-v1_1-xxl's tokenizer.json) is read from the field, else "
                   "trainer/model_configs/t5_tokenizer/, ComfyUI's or Forge's own beside the models folder, or the "
                   "Hugging Face cache.")

