"""`python -m trainer new`: a run directory from a folder of pictures, imported exactly as the Dataset tab imports
them (the same conversions, the same caption reading, the same skipped files), with the same health warnings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from datasets_tools import dataset_folder
from datasets_tools.health import report
from trainer import config, rundir
from trainer.kohya_import import read_settings
from trainer.single_file import MODEL_CONFIGS, family_of


def create_run(runs_dir: Path, base: str, images: Path, preset: str, overrides: list[str],
               name: str | None = None, out=sys.stderr, kohya: Path | None = None) -> rundir.RunDir:
    """Validate the config, import the pictures, write the run ("created": its own worker trains it). `kohya`: a
    kohya sd-scripts training TOML whose settings go over the preset's (the base, pictures and overrides win)."""
    images = Path(images)
    if not images.is_dir():
        raise SystemExit(f"--images {images}: not a folder")
    local = str(base) != "demo" and Path(base).expanduser().exists()  # absolute: the run may resume from elsewhere
    base = os.path.abspath(Path(base).expanduser()) if local else str(base)
    layer = {"model": {"pretrained_model_name_or_path": base}}
    imported = kohya_settings(kohya, out) if kohya else {}
    family = family_of(base)
    cfg = config.build(preset, family, imported, layer, config.parse_overrides(overrides))  # before writing
    results: list[dataset_folder.AddResult] = []

    def fill(dataset: Path) -> None:
        results.append(dataset_folder.add_files([images], dataset))
        if not results[0].added:
            raise SystemExit(f"--images {images}: no readable pictures. " + skipped_text(results[0]))

    try:
        run = rundir.create(runs_dir, cfg, fill, state="created", name=name)
    except FileExistsError as e:
        raise SystemExit(f"{e} (--name)") from None
    imported = results[0]
    d = cfg.data
    low, high = config.bucket_limits(d.resolution, d.min_bucket_reso, d.max_bucket_reso)
    clip_reads_captions = family in ("sd15", "sdxl")  # SD 3.5 / FLUX.1 read long captions with T5
    health = report(run.dataset, d.resolution, low, high, cfg.training.train_batch_size, d.bucket_no_upscale,
                    tokenizer_dir=MODEL_CONFIGS / "clip_tokenizer" if clip_reads_captions else None,
                    max_tokens=d.max_token_length)
    print(f"Imported {len(imported.added)} picture(s) into {run.dataset}. {skipped_text(imported)}", file=out)
    for warning in health.warnings:
        print(f"warning: {warning}", file=out)
    return run


def kohya_settings(path: Path, out) -> dict:
    """A kohya TOML's settings, its warnings printed; its base model and folders are this run's own (--base,
    --images), so they are left out."""
    if not Path(path).is_file():
        raise SystemExit(f"--kohya {path}: no such file")
    try:
        flat, warnings = read_settings(Path(path), "this run's own (--base, --images) is used")
    except config.ConfigError:
        raise  # the field named, as every config error
    except ValueError as e:
        raise SystemExit(f"--kohya {path}: {e}") from None
    for warning in warnings:
        print(f"--kohya {Path(path).name}: {warning}", file=out)
    return flat


def skipped_text(result: dataset_folder.AddResult) -> str:
    text = f"Skipped {len(result.skipped)}: " + "; ".join(f"{name} ({why})" for name, why in result.skipped) \
        if result.skipped else "Nothing skipped."
    return text + (" Notes: " + "; ".join(f"{n} ({w})" for n, w in result.notes) if result.notes else "")
