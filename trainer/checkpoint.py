"""Resumable state: `state/step-NNNNNNNN/` holds the adapter, optimizer, schedule, RNGs and the data position."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

PROGRESS = "progress.json"  # written last: a folder without it is incomplete and ignored
KEEP = 2  # newest states kept; older ones are removed once a newer one is complete


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch consumed by this process

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]


def latest(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "state").glob("step-*") if (p / PROGRESS).is_file())
    return done[-1] if done else None


def save(run_dir: Path, acc, net, progress: Progress) -> Path:
    """Save on every process (accelerate keeps one RNG file per process); the main one writes the rest."""
    folder = run_dir / "state" / f"step-{progress.step:08d}"
    acc.save_state(str(folder))
    if acc.is_main_process:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()},
                  str(folder / "adapter.safetensors"))
        (folder / PROGRESS).write_text(json.dumps(progress.state_dict()))
        older = sorted(p for p in (run_dir / "state").glob("step-*") if p != folder)
        for old in older[: max(0, len(older) - (KEEP - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return folder


def load_adapter(folder: Path, net, device: str = "cpu") -> None:
    net.load_state_dict(load_file(str(folder / "adapter.safetensors"), device=str(device)))


def load(folder: Path, acc, net, progress: Progress) -> None:
    load_adapter(folder, net, acc.device)
    acc.load_state(str(folder))
    progress.load_state_dict(json.loads((folder / PROGRESS).read_text()))
