"""Shrink a kohya LoRA/LoCon file: cut each module's rank by SVD and drop the modules whose update matters least.

In the spirit of kohya sd-scripts `networks/resize_lora.py` (fixed rank, or dynamic by kept Frobenius energy with
the rank as a cap), plus LoRA-drop (Zhou et al. 2024, arXiv:2402.07721), which ranks modules by the norm of their
output ΔW·x over data. Without data we rank by ‖ΔW‖_F, the same quantity for inputs with E[xxᵀ] = I
(E‖ΔW·x‖² = ‖ΔW‖_F²): the data-free proxy for LoRA-drop's output norm.

Every function here takes and returns plain state dicts (DESIGN §4 keys); only `resize_file` touches the disk.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.export import DTYPES, rank_metadata, save_atomic
from trainer.kohya_names import is_diffusers_form, lora_modules
from trainer.single_file import CheckpointError, read_safetensors_header

LORA_PARAMS = {"lora_down.weight", "lora_up.weight", "alpha"}
# WebUI applies a text-encoder attention LoRA (SD2's OpenCLIP-H, SDXL's CLIP-G: one fused in_proj) only when q, k,
# v and out of the layer are all present, so LoRA-drop keeps or drops those four together.
ATTENTION = re.compile(r"^(lora_te\d?_.*_self_attn)_(q|k|v|out)_proj$")


class ResizeError(ValueError):
    """Bad arguments or a file this tool cannot reduce; the message says which and why."""


@dataclass
class ModuleReport:
    name: str
    old_rank: int
    new_rank: int  # 0: dropped
    energy: float  # ‖ΔW‖_F² = Σσ² before
    kept: float  # fraction of `energy` kept (1.0 for an all-zero update)


@dataclass
class Report:
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def dropped(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.new_rank == 0]

    @property
    def kept_energy(self) -> float:
        """Kept Σσ² over all modules, as a fraction of the input's."""
        total = sum(m.energy for m in self.modules)
        return sum(m.energy * m.kept for m in self.modules) / total if total > 0 else 1.0


def check_args(rank: int | None, energy: float | None, drop: float) -> None:
    if rank is None and energy is None and not drop:
        raise ResizeError("nothing to do: give --rank N, --energy F and/or --drop F")
    if rank is not None and rank < 1:
        raise ResizeError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ResizeError(f"energy is the fraction of each module's Σσ² to keep: it must be in (0, 1], got {energy}")
    if not 0 <= drop < 1:
        raise ResizeError(f"drop is the fraction of modules to remove: it must be in [0, 1), got {drop}")


def split_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {param: tensor} (kohya's params, for a diffusers-form file too); refuses anything but
    LoRA/LoCon params."""
    modules = lora_modules(tensors)
    if not any(p.startswith(("lora_", "hada_", "lokr_")) for params in modules.values() for p in params):
        raise ResizeError(f"not a LoRA file: it holds no kohya LoRA/LyCORIS weights (first key: "
                          f"{next(iter(tensors), 'none')})")
    for name, params in modules.items():
        if any(p.startswith("hada_") for p in params):
            raise ResizeError(f"{name} is LoHa (hada_* keys): this tool reduces LoRA/LoCon files only")
        if any(p.startswith("lokr_") for p in params):
            raise ResizeError(f"{name} is LoKr (lokr_* keys): this tool reduces LoRA/LoCon files only")
        if "dora_scale" in params:
            raise ResizeError(f"{name} has dora_scale (DoRA renormalises the merged weight, so a truncated update "
                              "is not what gets applied): this tool reduces LoRA/LoCon files only")
        if not {"lora_down.weight", "lora_up.weight"} <= set(params) or set(params) - LORA_PARAMS:
            raise ResizeError(f"{name} holds {sorted(params)}; a LoRA/LoCon module holds lora_down.weight, "
                              "lora_up.weight and alpha")
    if not modules:
        raise ResizeError("no LoRA modules in it")
    return modules


def svd(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vh of ΔW = up @ down · alpha/r (conv flattened to [out, in·kh·kw]), in float64, without forming ΔW:
    QR both factors, then SVD the small core. Gives at most r singular values, exactly those of ΔW."""
    down, up = params["lora_down.weight"].double(), params["lora_up.weight"].double()
    r = down.shape[0]
    scale = params["alpha"].item() / r if "alpha" in params else 1.0  # kohya: no alpha means alpha = r
    q_up, r_up = torch.linalg.qr(up.flatten(1))
    q_down, r_down = torch.linalg.qr(down.flatten(1).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T * scale, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The smallest rank keeping `energy` of Σσ² (all of them without it), capped at `rank`; at least 1."""
    keep = len(s)
    if energy is not None:
        s2 = s.square()
        keep = int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1
    if rank is not None:
        keep = min(keep, rank)
    return max(1, min(keep, len(s)))


def drop_set(energies: dict[str, float], drop: float) -> set[str]:
    """The int(drop·n) modules of least ‖ΔW‖_F², q/k/v/out of a text-encoder attention layer counted as one
    (dropped together, or skipped when they would overshoot the count)."""
    groups: dict[str, list[str]] = {}
    for name in energies:
        m = ATTENTION.match(name)
        groups.setdefault(m[1] if m else name, []).append(name)
    budget = int(drop * len(energies) + 1e-9)
    out: set[str] = set()
    for members in sorted(groups.values(), key=lambda g: sum(energies[n] for n in g)):
        if len(out) + len(members) <= budget:
            out.update(members)
    return out


def shared_alpha(modules: dict[str, dict[str, torch.Tensor]]) -> float:
    """The input's most common alpha, which every module of the output gets: diffusers (0.42) builds its
    per-module alpha_pattern under names that match no attention or text-encoder layer, and silently gives those
    layers the common alpha instead, so a file whose alphas differ loads into diffusers at the wrong strength."""
    alphas = [float(p["alpha"]) if "alpha" in p else float(p["lora_down.weight"].shape[0]) for p in modules.values()]
    positive = [a for a in alphas if a > 0]
    return Counter(positive).most_common(1)[0][0] if positive else 1.0


def resize_tensors(tensors: dict[str, torch.Tensor], rank: int | None = None, energy: float | None = None,
                   drop: float = 0.0) -> tuple[dict[str, torch.Tensor], Report]:
    """Reduce a kohya state dict (e.g. `trainer.export.to_kohya(net, dtype)`): drop a fraction `drop` of the
    modules (least ‖ΔW‖_F first), then give each kept module a fixed `rank`, or the smallest rank keeping `energy`
    of its Σσ², or both (`rank` caps). Factors come back in their input dtype (alpha in fp32) as
    up = U·√σ·c, down = c·√σ·Vh with c = √(new rank / alpha), so a loader's up @ down · alpha/r is the truncated
    ΔW exactly; a diffusers-form file (SD 3.5) comes back in its form, c = 1 and no alpha."""
    check_args(rank, energy, drop)
    modules = split_modules(tensors)
    diffusers = is_diffusers_form(tensors)  # written back as it came: lora_A / lora_B at scale 1, no alpha
    alpha = shared_alpha(modules)
    triplets = {name: svd(params) for name, params in modules.items()}
    dropped = drop_set({name: float(s.square().sum()) for name, (_, s, _) in triplets.items()}, drop)
    out: dict[str, torch.Tensor] = {}
    report = Report()
    for name, params in modules.items():
        u, s, vh = triplets[name]
        down = params["lora_down.weight"]
        total = float(s.square().sum())
        if name in dropped:
            report.modules.append(ModuleReport(name, down.shape[0], 0, total, 0.0))
            continue
        k = choose_rank(s, rank, energy)
        root = s[:k].sqrt() * (1.0 if diffusers else math.sqrt(k / alpha))
        up = params["lora_up.weight"]
        down_key, up_key = ("lora_A.weight", "lora_B.weight") if diffusers else ("lora_down.weight", "lora_up.weight")
        out[f"{name}.{down_key}"] = (root[:, None] * vh[:k]).reshape(k, *down.shape[1:]).to(down.dtype)
        out[f"{name}.{up_key}"] = (u[:, :k] * root).reshape(up.shape[0], k, *up.shape[2:]).to(up.dtype)
        if not diffusers:
            out[f"{name}.alpha"] = torch.tensor(alpha)
        kept = float(s[:k].square().sum()) / total if total > 0 else 1.0
        report.modules.append(ModuleReport(name, down.shape[0], k, total, kept))
    return out, report


def updated_metadata(meta: dict[str, str], tensors: dict[str, torch.Tensor], report: Report,
                     args: dict) -> dict[str, str]:
    """The input's metadata with what the resize changed: ranks and alphas (`rank_metadata`), the module type, and a
    record of the resize. The input's file hashes (sshs_*) no longer match: save_atomic writes the new file's."""
    meta = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    meta["ss_network_module"] = "networks.lora"
    if meta.get("modelspec.architecture", "").endswith("/lycoris"):
        meta["modelspec.architecture"] = meta["modelspec.architecture"].removesuffix("/lycoris") + "/lora"
    kept = sum(1 for m in report.modules if m.new_rank)
    meta["ss_resize"] = json.dumps(args | {"modules_before": len(report.modules), "modules_after": kept,
                                           "kept_energy": round(report.kept_energy, 6)})
    return rank_metadata(tensors, meta)


def resize_file(src: Path, dst: Path, rank: int | None = None, energy: float | None = None, drop: float = 0.0,
                precision: str = "fp16") -> Report:
    """Read a kohya LoRA/LoCon file, reduce it (`resize_tensors`) and write it to `dst` atomically in `precision`
    (fp16, bf16 or float), keeping the input's metadata and recording the resize in `ss_resize`."""
    check_args(rank, energy, drop)
    if precision not in DTYPES:
        raise ResizeError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ResizeError(f"{src}: no such file")
    try:
        read_safetensors_header(src)  # says what is wrong with a renamed, truncated or other file
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = {k: v.float() for k, v in load_file(str(src)).items()}
    except CheckpointError as e:
        raise ResizeError(str(e)) from None
    except Exception as e:  # anything the header check lets through
        raise ResizeError(f"{src}: not a readable .safetensors file ({e})") from e
    try:
        out, meta, report = prune(tensors, meta, rank, energy, drop, precision)
        if all(m.new_rank == m.old_rank for m in report.modules):
            ranks = sorted({m.old_rank for m in report.modules})
            raise ResizeError(f"nothing to do: at these settings every module keeps its rank ({ranks[0]}..{ranks[-1]})"
                              " and none is dropped")
    except ResizeError as e:
        raise ResizeError(f"{src}: {e}") from None
    save_atomic(out, without_held_out(meta), dst)
    return report


def without_held_out(meta: dict[str, str]) -> dict[str, str]:
    """The held-out loss was measured on the file before the resize: kept under another name, so that nothing
    (Compare, a ranking) takes it for this file's."""
    if "ss_validation_loss" in meta:
        meta["ss_validation_loss_before_resize"] = meta.pop("ss_validation_loss")
    return {k: v for k, v in meta.items() if k not in ("ss_validation_step", "ss_validation_images")}


def prune(tensors: dict[str, torch.Tensor], meta: dict[str, str], rank: int | None = None,
          energy: float | None = None, drop: float = 0.0, precision: str = "fp16"):
    """`resize_tensors`, cast to `precision`, and the metadata that records it: what a file gets when it is resized,
    by the command or by the trainer when it saves. Returns (tensors, metadata, report)."""
    out, report = resize_tensors(tensors, rank, energy, drop)
    dtype = DTYPES[precision]
    out = {k: v if k.endswith(".alpha") else v.to(dtype).contiguous() for k, v in out.items()}
    args = {"rank": rank, "energy": energy, "drop": drop, "precision": precision}
    return out, updated_metadata(meta, out, report, args), report


def megabytes(path: Path) -> float:
    return Path(path).stat().st_size / 2**20


def summary(report: Report, src: Path, dst: Path) -> str:
    """One screen for the command line: modules kept and dropped, ranks, sizes, kept energy."""
    kept = [m for m in report.modules if m.new_rank]
    old, new = sorted({m.old_rank for m in report.modules}), sorted({m.new_rank for m in kept})
    worst = min(kept, key=lambda m: m.kept)
    return "\n".join([
        f"{src} -> {dst}",
        f"modules: {len(report.modules)} in, {len(kept)} kept, {len(report.dropped)} dropped (least ‖ΔW‖_F)",
        f"ranks:   {old[0]}..{old[-1]} -> {new[0]}..{new[-1]} (mean {sum(m.new_rank for m in kept) / len(kept):.1f})",
        f"size:    {megabytes(src):.2f} MB -> {megabytes(dst):.2f} MB",
        f"energy:  {report.kept_energy:.1%} of Σσ² kept overall; worst module {worst.kept:.1%} ({worst.name})",
    ])
