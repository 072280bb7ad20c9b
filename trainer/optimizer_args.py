"""kohya's `optimizer_args` (["betas=0.9,0.99", "decouple=True"]): parsed, and checked against what each optimizer
takes and the values that keep it finite. Standard library only: config validation runs in the web process.

A test checks every name here against the optimizer's own signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


UNIT = Span(0, 1, high_open=True)  # betas: 1 would never forget
EPS = Span(0, 1, low_open=True)  # 0 divides by zero: the NaN LoRA
FRACTION = Span(0, 1)
POSITIVE = Span(0, math.inf, low_open=True, high_open=True)
# name -> (kind, span); kind: float | int | bool | pair (two floats) | float? (a float or None)
ADAM = {"betas": ("pair", UNIT), "eps": ("float", EPS), "weight_decay": ("float", FRACTION), "amsgrad": ("bool", None)}
ALLOWED = {
    "AdamW": ADAM | {"maximize": ("bool", None), "fused": ("bool", None)},
    "AdamW8bit": ADAM | {"min_8bit_size": ("int", Span(1, 2 ** 31)), "percentile_clipping": ("int", Span(1, 100)),
                         "block_wise": ("bool", None)},
    "Prodigy": {"betas": ("pair", UNIT), "beta3": ("float?", UNIT), "eps": ("float", EPS),
                "weight_decay": ("float", FRACTION), "decouple": ("bool", None),
                "use_bias_correction": ("bool", None), "safeguard_warmup": ("bool", None),
                "d0": ("float", POSITIVE), "d_coef": ("float", POSITIVE),
                "growth_rate": ("float", Span(1, math.inf)), "slice_p": ("int", Span(1, 1024))},
    "Adafactor": {"eps": ("pair", POSITIVE), "clip_threshold": ("float", POSITIVE),
                  "decay_rate": ("float", Span(-1, 0)), "beta1": ("float?", UNIT),
                  "weight_decay": ("float", FRACTION), "scale_parameter": ("bool", None),
                  "relative_step": ("bool", None), "warmup_init": ("bool", None)},
}
ALLOWED["PagedAdamW8bit"] = ALLOWED["AdamW8bit"]


def parse(items) -> dict:
    """["betas=0.9,0.99", "weight_decay=0.01", "decouple=True"] -> {"betas": (0.9, 0.99), ...}."""
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        values = [_value(v.strip()) for v in raw.split(",")]
        out[key.strip()] = tuple(values) if len(values) > 1 else values[0]
    return out


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def problems(optimizer: str, items) -> list[str]:
    """What is wrong with `items` for `optimizer`, one message each (empty when all is well)."""
    allowed = ALLOWED.get(optimizer, {})
    out = [f"{item!r}: expected name=value" for item in items if "=" not in item or not item.partition("=")[0]]
    if out:
        return out
    for name, value in parse(items).items():
        if name not in allowed:
            out.append(f"{name!r} is not an argument of {optimizer}; it takes {', '.join(sorted(allowed))}")
            continue
        kind, span = allowed[name]
        if not _fits(kind, span, value):
            out.append(f"{name}={_show(value)}: {optimizer}'s {name} must be {_describe(kind, span)}")
    return out


def _fits(kind: str, span: Span | None, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float?" and value is None:
        return True
    if kind == "pair":
        return isinstance(value, tuple) and len(value) == 2 and all(_fits("float", span, v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and isinstance(value, float)):
        return False
    return span.holds(value)


def _describe(kind: str, span: Span | None) -> str:
    what = {"bool": "True or False", "pair": "two numbers, each in", "float?": "None or a number in",
            "int": "a whole number in"}.get(kind, "a number in")
    return what if span is None else f"{what} {span}"


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
