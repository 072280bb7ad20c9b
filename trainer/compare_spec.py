"""What a compare is (issue #15): the settings of `compare.json`, checked, shared by the compare worker
(trainer.compare) and the app (ui.compares). A bad setting is a CompareError naming the field and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path

from trainer import config, events
from trainer.single_file import read_safetensors_metadata as metadata  # noqa: F401  (re-exported for both sides)

SPEC_FILE = "compare.json"
LIMITS = {"files": (1, 16), "prompts": (1, 8), "seeds": (1, 4), "strengths": (1, 16)}
DEFAULTS = {"strengths": [0, 0.5, 0.75, 1], "seeds": [1234], "negative": "", "sampler": "euler_a", "steps": 20,
            "cfg_scale": 7.0, "width": 512, "height": 512, "clip_skip": 1, "precision": "fp32", "parts": {}}
SETTINGS = tuple(DEFAULTS) + ("prompts",)  # what a form or a script may set; base, files and labels are chosen
PRECISIONS = ("fp32", "fp16", "bf16")
# an SD 3.5 / FLUX.1 base in the split layout: its separate files, under the run's [model] field names
PARTS = config.PART_FIELDS
# The compare worker's events (trainer.compare), added to the one event schema: the worker and the app both import
# this module, so both write and read them (an EventReader skips a type it does not know).
EVENTS = {"compare_file": ("index", "label", "arch", "method", "held_out", "problem"),
          "compare_cell": ("file", "strength", "prompt", "seed", "path", "held_out")}
events.TYPES.update(EVENTS)


class CompareError(ValueError):
    """A setting a user can fix; the message names it and what is allowed."""


def number(value, kind=float):
    try:
        result = kind(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def parse_list(text, kind, what: str) -> list:
    """"0, 0.5 1" -> [0.0, 0.5, 1.0]; a list passes through; CompareError names `what`."""
    items = text if isinstance(text, (list, tuple)) else str(text or "").replace(",", " ").split()
    try:
        values = [kind(v) for v in items]
    except (TypeError, ValueError):
        raise CompareError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise CompareError(f"{what}: every value must be a finite number")
    return values


def checked(spec: dict) -> dict:
    """The spec with defaults filled in, or CompareError naming the first bad field and its allowed range."""
    spec = DEFAULTS | {k: v for k, v in spec.items() if v is not None}
    if not str(spec.get("base") or "").strip():
        raise CompareError("base: choose the base model the files were trained on")
    spec["strengths"] = parse_list(spec["strengths"], float, "strengths")
    spec["seeds"] = parse_list(spec["seeds"], int, "seeds")
    spec["prompts"] = [str(p).strip() for p in spec.get("prompts") or [] if str(p).strip()]
    spec["labels"] = list(spec.get("labels") or [Path(f).stem for f in spec.get("files", [])])
    if options := [p for p in spec["prompts"] if " --" in p]:
        raise CompareError(f"prompts: {options[0][:40]!r} holds sample-prompt options (--n, --w, …); a compare "
                           "draws every prompt with its own negative prompt, size, seeds, sampler and steps")
    for name, (low, high) in LIMITS.items():
        if not low <= len(spec.get(name, [])) <= high:
            raise CompareError(f"{name}: give {low} to {high} (got {len(spec.get(name, []))})")
    if bad := [s for s in spec["strengths"] if not -2 <= s <= 2]:
        raise CompareError(f"strengths: each must be in [-2, 2] (got {bad[0]})")
    if bad := [s for s in spec["seeds"] if not 0 <= s < 2**32]:
        raise CompareError(f"seeds: each must be in [0, {2**32 - 1}] (got {bad[0]})")
    check_range(spec, "steps", 1, 150, int)
    check_range(spec, "cfg_scale", 1.0, 30.0, float)
    check_range(spec, "clip_skip", 1, 12, int)
    for side in ("width", "height"):
        if check_range(spec, side, 64, 4096, int) % 8:
            raise CompareError(f"{side}: must be a multiple of 8 (got {spec[side]})")
    if spec["sampler"] not in config.field_help("sample_sampler")["choices"]:
        raise CompareError(f"sampler: one of {', '.join(config.field_help('sample_sampler')['choices'])}")
    if spec["precision"] not in PRECISIONS:
        raise CompareError(f"precision: one of {', '.join(PRECISIONS)}")
    if len(spec["labels"]) != len(spec["files"]):
        raise CompareError("labels: one per file")
    if missing := [f for f in spec["files"] if not Path(f).is_file()]:
        raise CompareError(f"files: no such file {missing[0]}")
    spec["parts"] = checked_parts(spec["parts"])
    return {k: spec[k] for k in ("base", "files", "labels", *DEFAULTS, "prompts")}


def checked_parts(parts) -> dict[str, str]:
    """The split layout's files ({clip_l, clip_g, t5xxl, vae, t5_tokenizer: path}, "" = inside the base), each
    there; CompareError names the bad one."""
    if not isinstance(parts, dict):
        raise CompareError(f"parts: expected {{{', '.join(PARTS)}: path}}, got {type(parts).__name__}")
    if unknown := sorted(set(parts) - set(PARTS)):
        raise CompareError(f"parts: {unknown[0]} is none of {', '.join(PARTS)}")
    given = {k: str(v) for k, v in parts.items() if v}
    for name, path in given.items():
        there = Path(path).exists() if name == "t5_tokenizer" else Path(path).is_file()
        if not there:
            raise CompareError(f"parts: {name}: no such {'file or folder' if name == 't5_tokenizer' else 'file'} "
                               f"{path}")
    return given


def check_range(spec: dict, name: str, low, high, kind):
    value = number(spec[name], kind)
    if value is None or not low <= value <= high or (kind is int and value != number(spec[name])):
        raise CompareError(f"{name}: must be {'a whole number ' if kind is int else ''}in [{low}, {high}] "
                           f"(got {spec[name]!r})")
    spec[name] = value
    return value


def cell_count(spec: dict, rows: int | None = None) -> int:
    rows = len(spec["files"]) if rows is None else rows
    return rows * len(spec["strengths"]) * len(spec["prompts"]) * len(spec["seeds"])
