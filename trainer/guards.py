"""What every save goes through: no non-finite weight is ever written, and a full disk says so in words.

Both leave what was saved before as it was, so a run stopped here resumes from its last good state.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.loss import TrainingError
from trainer.rundir import free_bytes

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_WORDS = ("no space left", "storagefull", "disk quota", "os error 28", "unexpected pos")  # torch, safetensors
LOW_SPACE = 64 << 20  # bytes: any write error with less than this free is taken for a full disk


class DiskFull(TrainingError):
    """The disk filled up while the worker was writing; the message says what, how much is free, what is intact."""


def check_finite(net, step: int, cfg, run_dir: Path) -> None:
    """Refuse to save an adapter holding NaN or inf, naming the likely cause and the last good state."""
    bad = [name for name, t in net.state_dict().items() if not torch.isfinite(t).all()]
    if not bad:
        return
    o, m = cfg.optimizer, cfg.model
    latest = checkpoint.latest(run_dir)
    causes = [f"a learning rate too high (unet_lr {o.unet_lr or o.learning_rate:g}, text_encoder_lr "
              f"{o.text_encoder_lr:g})"]
    if o.optimizer_args:
        causes.append(f"optimizer_args {o.optimizer_args}")
    if m.mixed_precision in ("fp16", "auto"):
        causes.append("fp16 overflow (mixed_precision = \"bf16\", or \"no\")")
    raise TrainingError(
        f"The adapter's weights are not finite at step {step} ({len(bad)} of {len(net.state_dict())} tensors, "
        f"e.g. {bad[0]}), so nothing was saved. Likely: {'; or '.join(causes)}. "
        + (f"The last good state, {latest.name}, is kept: change the setting and resume from it."
           if latest else "No earlier state exists: change the setting and start again."))


def disk_full(error: BaseException, where: Path) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(w in text for w in DISK_FULL_WORDS) or free_bytes(where) < LOW_SPACE


@contextmanager
def writing(what: str, run_dir: Path, partial: Path | None = None):
    """Run a save; when it fails for want of space, remove `partial` and raise DiskFull saying what is intact."""
    try:
        yield
    except Exception as e:
        if not disk_full(e, run_dir):
            raise
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        raise DiskFull(full_message(what, run_dir)) from e


def full_message(what: str, run_dir: Path) -> str:
    latest = checkpoint.latest(run_dir)
    files = sorted(p.name for p in (run_dir / "output").glob("*.safetensors"))
    intact = ", ".join(([f"state {latest.name}"] if latest else []) + files) or "nothing saved yet"
    return (f"The disk is full: writing {what} failed with {free_bytes(run_dir) / 2**20:.1f} MB free on "
            f"{run_dir}. Nothing half-written was kept; intact: {intact}. Free some space, then resume: the run "
            f"continues from {'its last state' if latest else 'the start'}.")
