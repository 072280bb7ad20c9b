"""How long a run will be, said on the Train tab before Train: the steps the worker will count, from the same
dataset reader, held-out split, repeats and buckets (a run's own length is its Schedule, trainer/setup.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from datasets_tools import buckets as B
from datasets_tools.dataset_folder import held_out, items, oriented_size
from trainer import config


def run_length(cfg: config.TrainConfig) -> str:
    """One line: the run's steps and where they come from; "" when no picture can be read."""
    d, t = cfg.data, cfg.training
    found = items(Path(d.train_data_dir))  # the same pictures whichever caption suffix is tried first
    held = set() if d.validation_dir else held_out(len(found), d.validation_split, t.seed)
    train = [item for i, item in enumerate(found) if i not in held]
    repeats = config.resolve_repeats(cfg, len(train))
    low, high = config.bucket_limits(d.resolution, d.min_bucket_reso, d.max_bucket_reso)
    shapes = B.make_buckets(d.resolution, low, high) if d.enable_bucket else []
    views = []
    for item in train:
        try:
            with Image.open(item.image) as im:
                size = oriented_size(im)
        except Exception:  # the worker skips it too, and says so
            continue
        views.append((B.training_bucket(size, d.resolution, shapes, d.bucket_no_upscale, d.enable_bucket),
                      item.repeats or repeats))
    if not views:
        return ""
    batches = B.batches_per_epoch(views, t.train_batch_size) // t.num_gpus
    per_epoch, total = config.count_steps(batches, t)
    if not per_epoch:
        return ""
    epochs = -(-total // per_epoch)
    own = {r for _, r in views} != {repeats}  # kohya `N_name` folders bring their own repeats
    seen = (f"{len(views)} pictures, {sum(r for _, r in views)} views an epoch" if own
            else f"{len(views)} pictures × {repeats} repeat{'s' * (repeats > 1)}")
    parts = [seen] + ([f"{len(held)} held out"] if held else []) + [f"batch {t.train_batch_size}"]
    if t.gradient_accumulation_steps > 1:
        parts.append(f"{t.gradient_accumulation_steps} batches a step")
    if t.num_gpus > 1:
        parts.append(f"on {t.num_gpus} GPUs")
    capped = t.max_train_epochs and total < t.max_train_epochs * per_epoch
    how = (f"cut short by Max train steps: {epochs} of {t.max_train_epochs} epochs" if capped
           else f"{epochs} epoch{'s' * (epochs > 1)}") + f" of {per_epoch} steps"
    count = len({b for b, _ in views})
    return (f"This run: **{total} steps**, {how} ({', '.join(parts)}, {count} bucket{'s' * (count > 1)}).")
