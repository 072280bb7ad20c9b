"""Resumable state: `state/step-NNNNNNNN/` holds the adapter, optimizer, schedule, RNGs and the data position.

Nothing in it is a pickle: run folders are copied between machines and shared, and unpickling runs code. Tensors
go into safetensors files, everything else into JSON, and a state is read back only from those:

    adapter.safetensors         the adapter's tensors
    optimizer.safetensors/.json the optimizer's state dict: its tensors, and the rest with each tensor named
    schedule.json               the learning-rate schedule's state dict
    rng-<rank>.safetensors/.json  each process's torch (CPU and CUDA), numpy and Python random states
    progress.json               step, epoch, batch: written last, so a folder without it is incomplete and ignored
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.rundir import PROGRESS, RunDir
KEEP = 2  # newest states kept; older ones are removed once a newer one is complete


class StateError(RuntimeError):
    """A state folder that cannot be read without unpickling, or is damaged; the message says which."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch consumed by this process

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


# --- a state dict as safetensors + JSON ---

def split(obj, tensors: dict[str, torch.Tensor], path: str = "t"):
    """`obj` with every tensor moved into `tensors` and replaced by {"__tensor__": its key}; tuples become lists."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{path}: keys must be str or int")
        return {"__dict__": [[k, split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be saved without pickle")


def join(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of `split` (dict keys keep their type: optimizer states are keyed by int)."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join(v, tensors) for v in obj]
    return obj


def write(folder: Path, name: str, state) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split(state, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def read(folder: Path, name: str, device="cpu"):
    path = folder / f"{name}.json"
    if not path.is_file():
        raise StateError(f"{folder}: {name}.json is missing")
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file), device=str(device)) if tensor_file.is_file() else {}
    return join(json.loads(path.read_text()), tensors)


# --- random states ---

def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- the state folder ---

def latest(run_dir: Path) -> Path | None:
    return RunDir(run_dir).latest_state()


def save(run_dir: Path, acc, net, progress: Progress, optimizer, schedule) -> Path:
    """Every process writes its RNG state; the main one writes the rest, then progress.json, then prunes."""
    folder = RunDir(run_dir).state_folder(progress.step)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder, f"rng-{acc.process_index}", rng_state())
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()},
                  str(folder / "adapter.safetensors"))
        write(folder, "optimizer", optimizer.state_dict())
        write(folder, "schedule", schedule.state_dict())
        if acc.scaler is not None:
            write(folder, "grad_scaler", acc.scaler.state_dict())
        (folder / PROGRESS).write_text(json.dumps(progress.state_dict()))
        older = sorted(p for p in (run_dir / "state").glob("step-*") if p != folder)
        for old in older[: max(0, len(older) - (KEEP - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return folder


def load_adapter(folder: Path, net, device: str = "cpu") -> None:
    net.load_state_dict(load_file(str(folder / "adapter.safetensors"), device=str(device)))


def load(folder: Path, acc, net, progress: Progress, optimizer, schedule) -> None:
    """Restore a state written by `save`; a folder in accelerate's pickled form is refused, never unpickled."""
    if any(folder.glob("*.pkl")) or (folder / "optimizer.bin").is_file():
        raise StateError(f"{folder} holds pickled files (an older version's state); this version never unpickles "
                         "a run folder's files. Delete the state/ folder to train the run again from the start.")
    load_adapter(folder, net, acc.device)
    optimizer.load_state_dict(read(folder, "optimizer", acc.device))
    schedule.load_state_dict(read(folder, "schedule"))
    if acc.scaler is not None and (folder / "grad_scaler.json").is_file():
        acc.scaler.load_state_dict(read(folder, "grad_scaler"))
    rng = folder / f"rng-{acc.process_index}.json"
    if rng.is_file():
        set_rng_state(read(folder, f"rng-{acc.process_index}"))
    progress.load_state_dict(json.loads((folder / PROGRESS).read_text()))
