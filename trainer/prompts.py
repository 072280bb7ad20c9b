"""Sample prompts as sd-scripts writes them: `zxq on a beach --n blurry --w 512 --h 768 --d 42 --s 28 --l 6.5`.

Each option after the prompt overrides one [sample] setting for that picture alone. Standard library only, like
trainer/config.py, which checks every line before a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLERS = ("euler_a", "euler", "dpm++_2m_karras", "ddim")
KOHYA_SAMPLERS = {"k_euler_a": "euler_a", "k_euler": "euler"}  # sd-scripts' other names for the same schedulers
OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "CFG scale",
           "g": "FLUX.1's guidance", "ss": "sampler"}
USAGE = ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items())


@dataclass(frozen=True)
class SamplePrompt:
    text: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None  # --l, or --g on FLUX.1 (its distilled guidance is our cfg_scale there)
    sampler: str | None = None


def parse(line: str, family: str = "sd15") -> SamplePrompt:
    """One line -> its prompt and options; ValueError names the option and what it takes."""
    text, *options = line.split(" --")
    fields: dict = {}
    for option in options:
        key, _, value = option.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key not in OPTIONS:
            raise ValueError(f"--{key}: not a sample-prompt option; the options are {USAGE}")
        if not value:
            raise ValueError(f"--{key}: give the {OPTIONS[key]} after it")
        name, parsed = _option(key, value, family)
        fields[name] = parsed
    return SamplePrompt(text.strip(), **fields)


def _option(key: str, value: str, family: str) -> tuple[str, object]:
    if key == "n":
        if family == "flux":
            raise ValueError("--n: FLUX.1 draws without a negative prompt (its guidance is distilled)")
        return "negative", value
    if key == "ss":
        sampler = KOHYA_SAMPLERS.get(value.lower(), value.lower())
        if sampler not in SAMPLERS:
            raise ValueError(f"--ss {value}: choose one of {', '.join(SAMPLERS)}")
        if family in ("sd3", "flux") and sampler != "euler":
            raise ValueError(f"--ss {value}: SD 3.5 and FLUX.1 sample with flow-matching Euler; use --ss euler")
        return "sampler", sampler
    if key in ("l", "g"):
        if (key == "g") != (family == "flux"):
            raise ValueError("--g: the guidance of FLUX.1 alone; use --l for the CFG scale" if key == "g" else
                             "--l: FLUX.1 draws with its distilled guidance; use --g")
        return "cfg_scale", _number(key, value, float, 1.0, 30.0)
    low, high = {"w": (64, 4096), "h": (64, 4096), "d": (0, 2**32 - 1), "s": (1, 150)}[key]
    number = _number(key, value, int, low, high)
    if key in "wh" and number % 64:
        raise ValueError(f"--{key} {value}: the {OPTIONS[key]} must be a multiple of 64")
    return {"w": "width", "h": "height", "d": "seed", "s": "steps"}[key], number


def _number(key: str, value: str, kind: type, low, high):
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"--{key} {value}: the {OPTIONS[key]} must be "
                         f"{'a whole number' if kind is int else 'a number'}") from None
    if not low <= number <= high:
        raise ValueError(f"--{key} {value}: the {OPTIONS[key]} must be from {low} to {high}")
    return number


def settings(prompt: SamplePrompt, sample, resolution: int) -> dict:
    """The generate() options of one prompt: its own where it gives them, else the run's [sample] settings."""
    pick = (lambda own, default: default if own is None else own)
    return dict(sampler=pick(prompt.sampler, sample.sample_sampler), steps=pick(prompt.steps, sample.sample_steps),
                cfg_scale=pick(prompt.cfg_scale, sample.sample_cfg_scale), seed=pick(prompt.seed, sample.sample_seed),
                width=prompt.width or sample.sample_width or resolution,
                height=prompt.height or sample.sample_height or resolution)


def read_file(text: str) -> list[str]:
    """A sd-scripts prompt file (.txt): one prompt a line; empty lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
