"""Make a run directory from the command line: config.toml + dataset/ (DESIGN §1)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from datasets_tools.dataset_folder import CAPTION_SUFFIXES, IMAGE_SUFFIXES
from trainer import config
from trainer.single_file import family_of

def create_run(runs_dir: Path, base: str, images: Path, preset: str, overrides: list[str],
               name: str | None = None) -> Path:
    images = Path(images)
    if not images.is_dir():
        raise SystemExit(f"--images {images}: not a folder")
    run_dir = Path(runs_dir) / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}")
    if run_dir.exists():
        raise SystemExit(f"{run_dir} already exists; choose another --name")
    family = family_of(base)
    layer = {"model": {"pretrained_model_name_or_path": str(base)},
             "data": {"train_data_dir": str((run_dir / "dataset").resolve())}}
    cfg = config.build(preset, family, layer, config.parse_overrides(overrides))  # validate before writing anything
    dataset = run_dir / "dataset"
    dataset.mkdir(parents=True)
    for src in sorted(images.rglob("*")):
        if src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES | set(CAPTION_SUFFIXES):
            dst = dataset / src.relative_to(images)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    config.save(cfg, run_dir / "config.toml")
    return run_dir
