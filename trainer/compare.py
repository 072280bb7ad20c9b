"""Compare LoRA files on one loaded base (issue #15): files × strengths × prompts × seeds, one picture per cell.

The base is loaded once. Each file is checked first (readable, made for this base's family, every module matching a
weight of the right shape); one that is not gets a named problem and is skipped. Then, file by file, its update ΔW
is built from its factors (lycoris.functional: LoRA/LoCon, LoHa, LoKr; DoRA as ComfyUI merges it, ΔW = W_dora −
W0) at each strength s, on the weight's device, and W = W0 + s·ΔW set in the UNet and the text encoders, in place.
The touched weights are restored exactly, from a CPU copy, before the next file. Strength 0 is the base, drawn once per
prompt × seed.
SD 3.5 / FLUX.1 bases (issue #17) take the files of their family in the layouts we write (kohya with fused q|k|v,
diffusers, LyCORIS keys): trainer/compare_flow.py maps each module to the transformer / CLIP weights it patches, a
fused one's ΔW split back into its diffusers weights by rows.

    FOLDER/compare.json   the spec (trainer.compare_spec)
           events.jsonl   status, compare_file, compare_cell, done, cancelled (trainer.events)
           status.json    running -> done / cancelled (failed: trainer/__main__.py records it)
           cells/*.png    one per cell, with WebUI `parameters` naming the file and strength
           grid.png       rows = usable files, columns = prompt × seed × strength, with labels (each prompt × seed
                          headed by the prompt's text), a legend of the prompts and settings; written when done
Counts are of the grid's cells, as the page shows them: the base's picture fills the strength-0 cell of every row.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from lycoris.functional import locon, loha, lokr, weight_decompose
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from safetensors.torch import load_file
from torch import nn

from trainer.compare_flow import Fused, family_of_names, file_modules, flow_weights, names_a_transformer
from trainer.compare_spec import SPEC_FILE, CompareError, cell_count, checked, number
from trainer.events import EventWriter
from trainer.export import SD3_MODEL_TYPES
from trainer.flow_parts import CONFIG_FIELDS, Parts
from trainer.kohya_names import kohya_name
from trainer.loading import ARCH_NAMES, FLOW_ARCHES, load_base
from trainer.rundir import RunDir
from trainer.sampling import FLOW_SAMPLERS, parameters_text, generate, save_png
from trainer.single_file import CheckpointError, read_safetensors_header

log = logging.getLogger("trainer.compare")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARAMS = {  # what a module of each form stores (kohya / LyCORIS names); alpha and dora_scale may go with any
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
SHARED = {"alpha", "dora_scale"}
FACTORS = set().union(*PARAMS.values())
SGM_UNET = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
# the grid, in pixels: the label column, the header (a band of prompt × seed heads over one of strengths), a line
LABEL_WIDTH, HEADER_HEIGHT, GROUP_HEIGHT, LINE, PAD = 200, 48, 32, 14, 4


class Cancelled(Exception):
    """A stop was asked for (SIGTERM / SIGINT): the cells drawn so far stay."""


@dataclass
class LoraFile:
    index: int  # in the spec's files
    label: str
    path: Path
    arch: str | None  # what the file says it was made for, None when nothing tells
    method: str  # lora | locon | loha | lokr | dora
    held_out: float | None  # ss_validation_loss
    problem: str = ""  # why it is skipped; "" when usable

    def event(self) -> dict:
        return {"index": self.index, "label": self.label, "arch": self.arch, "method": self.method,
                "held_out": self.held_out, "problem": self.problem}


# --- the base's weights under kohya names ---

def base_weights(base) -> dict[str, nn.Parameter | Fused]:
    """kohya name -> weight of every Linear and Conv2d in the UNet and text encoders: every module a file can name
    (kohya's defaults, LoCon's convs, LyCORIS' full preset). SD 3.5 / FLUX.1: every name a file of the family can
    carry (trainer.compare_flow.flow_weights)."""
    if base.arch in FLOW_ARCHES:
        return flow_weights(base)
    components = {"unet": base.unet} | dict(zip(("text_encoder", "text_encoder_2"), base.text_encoders))
    found = {}
    for component, model in components.items():
        unet_config = model.config if component == "unet" else None
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                try:
                    found[kohya_name(base.arch, component, path, unet_config)] = module.weight
                except KeyError:  # an SDXL UNet module without an SGM name: no file can name it
                    continue
    return found


# --- one module's update, from the file's factors ---

def adapter_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The modules that hold adapter factors (a file may carry other tensors beside them)."""
    return {name: params for name, params in file_modules(tensors).items() if FACTORS & set(params)}


def form(params: dict) -> str:
    """"lora", "loha" or "lokr": which factors a module stores; "" for none of them (or a mix)."""
    forms = [f for f, names in PARAMS.items() if names & set(params)]
    known = set().union(*(PARAMS[f] for f in forms), SHARED)
    return forms[0] if len(forms) == 1 and set(params) <= known else ""


def scale(params: dict, rank: int) -> float:
    """alpha / rank; a file without alpha means alpha = rank (kohya)."""
    return params["alpha"].item() / rank if "alpha" in params else 1.0


def low_rank_update(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW at strength 1 of a LoRA / LoHa / LoKr module, as lycoris.functional rebuilds it (any shape)."""
    kind = form(p)
    if kind == "lora":
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        return locon.diff_weight(down, up, p.get("lora_mid.weight"), gamma=scale(p, down.shape[0]))
    if kind == "loha":  # LyCORIS' w1d / w1u are the file's hada_w1_b / hada_w1_a
        return loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], p.get("hada_t1"),
                                p.get("hada_t2"), gamma=scale(p, p["hada_w1_b"].shape[0]))
    if kind == "lokr":  # lycoris divides gamma by the rank of the factorised half itself (by gamma when none is)
        half = p.get("lokr_w1_a", p.get("lokr_w2_a"))
        rank = half.shape[1] if half is not None else 1
        return lokr.diff_weight(*(p.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                     "lokr_w2_b", "lokr_t2")), gamma=scale(p, rank) * rank)
    raise ValueError(f"holds {', '.join(sorted(p))}: not LoRA, LoHa or LoKr factors")


def dora_update(weight: torch.Tensor, plain: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W_dora − W0: the merged weight W0 + ΔW with each input channel's norm (each output row's, when the file's
    magnitude is per output) rescaled to dora_scale, as ComfyUI's weight_decompose does."""
    on_out = dora_scale.shape[0] == weight.shape[0]
    ones = [1] * (weight.dim() - 1)
    magnitude = dora_scale.reshape([weight.shape[0], *ones] if on_out else [1, weight.shape[1], *ones[1:]])
    return weight_decompose(weight + plain, magnitude, wd_on_out=on_out) - weight


def update(params: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1, shaped like `weight`, in float32; ValueError when it cannot be."""
    params = {k: v.float() for k, v in params.items()}
    plain = low_rank_update(params)
    if plain.numel() != weight.numel():
        raise ValueError(f"its update is {tuple(plain.shape)}, the base's weight {tuple(weight.shape)}")
    plain = plain.reshape(weight.shape)
    if "dora_scale" in params:
        return dora_update(weight.float(), plain, params["dora_scale"])
    return plain


# --- checking a file before anything is drawn ---

def file_arch(meta: dict, names) -> str | None:
    """The family a file was made for: as its metadata says (`ss_base_model_version` flux1 / 5-large / sd_v1 ...,
    `modelspec.architecture` flux-1-dev/lora, stable-diffusion-3-5-medium/lora ...), else FLUX.1 / SD 3.5 when its
    names are only that family's (trainer.compare_flow.family_of_names), SDXL when they are (two text encoders, SGM
    UNet names); None when nothing tells (SD 1.x and 2.x files share their names)."""
    if meta.get("ss_base_model_version") in SD3_MODEL_TYPES:  # sd-scripts writes the MMDiT's model type
        return "sd3"
    said = f"{meta.get('ss_base_model_version', '')} {meta.get('modelspec.architecture', '')}".lower()
    for mark, arch in (("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("xl", "sdxl"),
                       ("v2", "sd2"), ("v1", "sd1")):
        if mark in said:
            return arch
    names = list(names)
    if (family := family_of_names(names)) in FLOW_ARCHES:
        return family
    if any(n.startswith(("lora_te2_", *SGM_UNET)) for n in names) or (
            any(n.startswith("lora_te1_") for n in names) and not names_a_transformer(names)):
        return "sdxl"
    return None


def family_problem(arch: str | None, names, base_arch: str) -> str:
    """Why a file is not of the base's family ("" when it is, or nothing tells)."""
    base = ARCH_NAMES[base_arch]
    if arch is not None:
        return "" if arch == base_arch else f"made for {ARCH_NAMES[arch]}, the base is {base}"
    if base_arch in FLOW_ARCHES and family_of_names(names) == "unet":
        return f"made for SD 1.x / 2.x (its modules are a UNet's), the base is {base}"
    if base_arch not in FLOW_ARCHES and names_a_transformer(names):
        return f"made for SD 3.5 or FLUX.1 (its modules are a transformer's), the base is {base}"
    return ""


def method(modules: dict[str, dict]) -> str:
    forms = {form(p) for p in modules.values()}
    if any("dora_scale" in p for p in modules.values()):
        return "dora"
    if forms == {"lora"}:
        convs = any(p["lora_down.weight"].dim() == 4 and p["lora_down.weight"].shape[-1] > 1
                    for p in modules.values())
        return "locon" if convs else "lora"
    return "+".join(sorted(f for f in forms if f)) or "unknown"


def fit_problem(modules: dict[str, dict], weights: dict[str, nn.Parameter]) -> str:
    """Why the modules do not fit the base ("" when they all do), from their shapes alone."""
    missing = [n for n in modules if n not in weights]
    if missing:
        return f"{len(missing)} of its {len(modules)} modules have no match in this base (first: {missing[0]})"
    for name, params in modules.items():
        try:  # alpha only scales the update (and a meta tensor has no value)
            update({k: v for k, v in params.items() if k != "alpha"}, torch.empty(weights[name].shape, device="meta"))
        except (ValueError, RuntimeError) as e:
            return f"{name}: {str(e).splitlines()[0]}"
    return ""


def inspect(index: int, label: str, path: Path, base_arch: str, weights: dict[str, nn.Parameter]) -> LoraFile:
    """The file as the grid will use it, or with the problem that keeps it out. Reads only its header: the checks
    run on the meta device, where tensors have shapes and no data."""
    try:  # the message names the file as the user gave it (a dropped file's copy keeps its name)
        header = read_safetensors_header(path)
    except CheckpointError as e:
        return LoraFile(index, label, path, None, "unknown", None, str(e))
    except OSError as e:
        return LoraFile(index, label, path, None, "unknown", None, f"{path.name}: cannot be read ({e.strerror})")
    meta = header.pop("__metadata__", None) or {}
    held_out = number(meta.get("ss_validation_loss"))
    tensors = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}
    modules = adapter_modules(tensors)
    if not modules or not all(n.startswith(("lora_", "lycoris_", "transformer.", "text_encoder")) for n in modules):
        first = next(iter(header), "none")
        return LoraFile(index, label, path, None, "unknown", held_out,
                        f"not a LoRA file: it holds no kohya LoRA/LyCORIS weights (first key: {first})")
    arch = file_arch(meta, modules)
    found = LoraFile(index, label, path, arch, method(modules), held_out)
    found.problem = family_problem(arch, modules, base_arch) or fit_problem(modules, weights)
    return found


# --- swapping files in and out of the loaded base ---

class HotSwap:
    """The base's weights with at most one file applied, at one strength. `use` keeps a CPU copy of every weight a
    file touches, which `restore` puts back bit for bit, and the file's factors; each strength sets W = W0 + s·ΔW,
    ΔW rebuilt from the factors on the weight's device one module at a time. Held beside the model: the touched
    weights once, in their dtype, and the factors."""

    def __init__(self, weights: dict[str, nn.Parameter | Fused]):
        self.weights = weights
        self.path: Path | None = None
        self.strength = 0.0
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        self.backup: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def use(self, path: Path | None, strength: float) -> None:
        """The file at `path` (None: the base) at `strength`."""
        if path != self.path:
            self.restore()
            self.factors = adapter_modules(load_file(str(path))) if path else {}
            self.backup = {name: snapshot(self.weights[name]) for name in self.factors}
            self.path = path
        if strength != self.strength:
            for name, factors in self.factors.items():
                put(self.weights[name], self.backup[name], factors, strength)
            self.strength = strength

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.backup.items():
            put(self.weights[name], original)
        self.strength = 0.0


def snapshot(target: nn.Parameter | Fused) -> torch.Tensor:
    """A CPU copy of the weight a module patches (a fused one in the original layout)."""
    return target.read() if isinstance(target, Fused) else target.detach().to("cpu", copy=True)


def delta(factors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1 for `weight` (the original), computed on its device, in its dtype."""
    return update({k: v.to(weight.device) for k, v in factors.items()}, weight).to(weight.dtype)


@torch.no_grad()
def put(target: nn.Parameter | Fused, original: torch.Tensor, factors: dict | None = None,
        strength: float = 0.0) -> None:
    """target = original + strength · ΔW(factors), in the target's dtype on its device; `original` alone at
    strength 0."""
    if isinstance(target, Fused):
        value = original.to(target.device, target.dtype, copy=True)
        if strength:
            value.add_(delta(factors, value), alpha=strength)
        target.write(value)
        return
    target.copy_(original)
    if strength:
        target.add_(delta(factors, target), alpha=strength)


# --- the cells ---

@dataclass(frozen=True)
class Cell:
    file: LoraFile | None  # None: the base
    strength: float
    prompt: int  # index into the spec's prompts
    seed: int  # the value

    @property
    def name(self) -> str:
        row = "base" if self.file is None else f"file{self.file.index:02d}_s{self.strength:g}"
        return f"cells/{row}_p{self.prompt}_seed{self.seed}.png"

    def event(self) -> dict:
        return {"file": None if self.file is None else self.file.index, "strength": self.strength,
                "prompt": self.prompt, "seed": self.seed, "path": self.name,
                "held_out": None if self.file is None else self.file.held_out}


def plan(spec: dict, files: list[LoraFile]) -> list[Cell]:
    """Every cell in drawing order: the base first (when strength 0 is asked), then file by file, strength by
    strength, so each file is loaded once and each strength applied once."""
    pictures = [(p, seed) for p in range(len(spec["prompts"])) for seed in spec["seeds"]]
    cells = [Cell(None, 0.0, p, seed) for p, seed in pictures] if 0 in spec["strengths"] else []
    return cells + [Cell(f, s, p, seed) for f in files for s in spec["strengths"] if s != 0 for p, seed in pictures]


def quote(text: str) -> str:
    """A value on WebUI's settings line: JSON-quoted when it holds a comma, colon or line break (as WebUI does)."""
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def cell_parameters(spec: dict, cell: Cell, arch: str = "") -> str:
    lora = "none" if cell.file is None else quote(cell.file.label)
    return (parameters_text(spec["prompts"][cell.prompt], sampler=spec["sampler"], steps=spec["steps"],
                            cfg_scale=spec["cfg_scale"], seed=cell.seed, width=spec["width"], height=spec["height"],
                            model=Path(str(spec["base"])).name, negative=spec["negative"], arch=arch)
            + f", Lora: {lora}, Strength: {cell.strength:g}")


def draw(base, spec: dict, cell: Cell) -> Image.Image:
    return generate(base, spec["prompts"][cell.prompt], sampler=spec["sampler"], steps=spec["steps"],
                    cfg_scale=spec["cfg_scale"], seed=cell.seed, width=spec["width"], height=spec["height"],
                    clip_skip=spec["clip_skip"], negative=spec["negative"])


# --- the grid ---

@lru_cache(maxsize=1)
def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


def text_width(text: str) -> float:
    return font().getlength(text)


def label_tile(lines: list[str], size: tuple[int, int]) -> Image.Image:
    """White tile with black text, clipped to the tile."""
    tile = Image.new("RGB", size, "white")
    ImageDraw.Draw(tile).multiline_text((PAD, 2), "\n".join(lines), fill="black", font=font(), spacing=2)
    return tile


def fit(text: str, width: float) -> str:
    """`text` on one line of at most `width` pixels: cut with "…", at a word's end when one is near."""
    if text_width(text) <= width:
        return text
    cut = len(text)
    while cut and text_width(text[:cut].rstrip() + "…") > width:
        cut -= 1
    kept = text[:cut]
    if " " in kept[len(kept) // 2:]:
        kept = kept[:kept.rindex(" ")]
    return kept.rstrip(" ,;:·") + "…"


def wrap(text: str, width: float) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words. A part in parentheses ("(epoch 1, step 4)")
    stays on one line when it fits on one; a word longer than a line is cut."""
    lines, line = [], ""
    words = re.findall(r"\S*\([^()]*\)\S*|\S+", text)[::-1]
    while words:
        word = words.pop()
        joined = f"{line} {word}" if line else word
        if text_width(joined) <= width:
            line = joined
            continue
        if " " in word and text_width(word) > width:  # a part in parentheses wider than a line: word by word
            words += word.split()[::-1]
            continue
        lines += [line] if line else []
        while len(word) > 1 and text_width(word) > width:  # a word wider than a line: cut it
            cut = 1
            while text_width(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + [line] if line or not lines else lines


def group_head(prompt: int, text: str, seed: int, width: int) -> list[str]:
    """The head over a prompt × seed's strengths, as the page's table has it ("prompt 1: a red circle · seed 7"),
    the prompt cut to fit; on two lines, the prompt's text under its number and seed, when one leaves it no room
    (the legend below the grid has every prompt in full)."""
    inner = width - 2 * PAD
    head, tail = f"prompt {prompt + 1}: ", f" · seed {seed}"
    room = inner - text_width(head + tail)
    if room >= text_width("a yellow…"):
        return [head + fit(text, room) + tail]
    if text_width(said := f"prompt {prompt + 1} · seed {seed}") <= inner:
        return [said, fit(text, inner)]
    return [fit(f"prompt {prompt + 1}", inner), fit(f"seed {seed}", inner)]


def strength_heads(strengths: list[float], width: int) -> list[str]:
    """"strength 0.5" over each column, or the number alone when that does not fit a column (the label column then
    says "strength" on the same line)."""
    said = [f"strength {s:g}" for s in strengths]
    return said if max(map(text_width, said)) <= width - 2 * PAD else [f"{s:g}" for s in strengths]


def row_lines(f: LoraFile, height: int) -> list[str]:
    """The file's label, wrapped between words (never inside its "(epoch …, step …)"), and its held-out loss, in as
    many lines as the row has room for."""
    held = [f"held-out {f.held_out:.4f}"] if f.held_out is not None else []
    room = max(1, (height - 2) // LINE - len(held))
    lines = wrap(f.label, LABEL_WIDTH - 2 * PAD)
    if len(lines) > room:
        lines = lines[:room - 1] + [fit(" ".join(lines[room - 1:]), LABEL_WIDTH - 2 * PAD)]
    return lines + held


def legend(spec: dict) -> list[str]:
    """What every cell was drawn with, in full: the prompts, the negative prompt, the base and the settings."""
    lines = [f"prompt {p + 1}: {text}" for p, text in enumerate(spec["prompts"])]
    lines += [f"negative prompt: {spec['negative']}"] if spec["negative"] else []
    clip = f" · clip skip {spec['clip_skip']}" if spec["clip_skip"] > 1 else ""
    return lines + [f"base {Path(str(spec['base'])).name} · sampler {spec['sampler']} · {spec['steps']} steps · "
                    f"guidance (CFG) {spec['cfg_scale']:g} · {spec['width']}x{spec['height']}{clip}"]


def legend_lines(spec: dict, width: int) -> list[str]:
    """The legend, wrapped to a sheet `width` pixels wide."""
    return [line for said in legend(spec) for line in wrap(said, width - 2 * PAD)]


def grid(folder: Path, spec: dict, files: list[LoraFile]) -> Image.Image:
    """Rows = files, columns = prompt × seed × strength (strength fastest). Above, a head per prompt × seed (its
    prompt's text, cut to fit, and the seed) over the strengths; a label column; below, the legend, wrapped."""
    strengths, w, h = spec["strengths"], spec["width"], spec["height"]
    groups = [(p, seed) for p in range(len(spec["prompts"])) for seed in spec["seeds"]]
    span = w * len(strengths)
    width = LABEL_WIDTH + span * len(groups)
    notes = legend_lines(spec, width)
    body = HEADER_HEIGHT + h * len(files)
    sheet = Image.new("RGB", (width, body + LINE * len(notes) + 2 * PAD), "white")
    heads = strength_heads(strengths, w)
    if not heads[0].startswith("strength"):
        sheet.paste(label_tile(["strength"], (LABEL_WIDTH, HEADER_HEIGHT - GROUP_HEIGHT)), (0, GROUP_HEIGHT))
    for g, (p, seed) in enumerate(groups):
        x = LABEL_WIDTH + g * span
        sheet.paste(label_tile(group_head(p, spec["prompts"][p], seed, span), (span - 1, GROUP_HEIGHT)), (x, 0))
        for i, head in enumerate(heads):
            sheet.paste(label_tile([head], (w, HEADER_HEIGHT - GROUP_HEIGHT)), (x + i * w, GROUP_HEIGHT))
    for r, f in enumerate(files):
        sheet.paste(label_tile(row_lines(f, h), (LABEL_WIDTH, h)), (0, HEADER_HEIGHT + r * h))
        for c, (p, seed, s) in enumerate((p, seed, s) for p, seed in groups for s in strengths):
            cell = Cell(None if s == 0 else f, s, p, seed)
            with Image.open(folder / cell.name) as picture:
                sheet.paste(picture.convert("RGB"), (LABEL_WIDTH + c * w, HEADER_HEIGHT + r * h))
    sheet.paste(label_tile(notes, (width, LINE * len(notes) + 2 * PAD)), (0, body + PAD))
    return sheet


def save_grid(folder: Path, spec: dict, files: list[LoraFile]) -> Path:
    """grid.png, its legend also as the PNG's Description text (what a viewer's file info shows)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Description", "\n".join(legend(spec)))
    grid(folder, spec, files).save(folder / "grid.png", pnginfo=info)
    return folder / "grid.png"


# --- the whole compare ---

def read_spec(folder: Path) -> dict:
    try:
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompareError(f"{SPEC_FILE}: cannot be read as JSON ({e})") from None
    if not isinstance(spec, dict):
        raise CompareError(f"{SPEC_FILE}: expected an object of settings")
    return checked(spec)


def spec_parts(spec: dict) -> Parts:
    """The separate CLIP / T5 / VAE files of an SD 3.5 / FLUX.1 split layout, as the spec's `parts` name them
    (the run's [model] fields: clip_l, clip_g, t5xxl, vae, t5_tokenizer)."""
    given = spec.get("parts") or {}
    return Parts(**{part: given.get(name) or None for part, name in CONFIG_FIELDS.items()},
                 t5_tokenizer=given.get("t5_tokenizer") or None)


def check_drawing(spec: dict, arch: str) -> None:
    """CompareError for settings this base cannot draw with: SD 3.5 / FLUX.1 sample with flow-matching Euler, on
    sides that are multiples of 16 (8 × the VAE, 2 × the transformer's patches)."""
    if arch not in FLOW_ARCHES:
        return
    if spec["sampler"] not in FLOW_SAMPLERS:
        raise CompareError(f"sampler: {ARCH_NAMES[arch]} samples with flow-matching Euler: use 'euler' "
                           f"(got {spec['sampler']!r})")
    for side in ("width", "height"):
        if spec[side] % 16:
            raise CompareError(f"{side}: {ARCH_NAMES[arch]} draws sides that are multiples of 16 (got {spec[side]})")


def check_files(spec: dict, base, weights, events: EventWriter) -> list[LoraFile]:
    """The usable files; a compare_file event for each; CompareError when none is usable."""
    files = [inspect(i, label, Path(path), base.arch, weights)
             for i, (path, label) in enumerate(zip(spec["files"], spec["labels"]))]
    for f in files:
        events.emit("compare_file", **f.event())
        if f.problem:
            log.warning("%s skipped: %s", f.path, f.problem)
    usable = [f for f in files if not f.problem]
    if not usable:
        raise CompareError("no usable file: " + "; ".join(f"{f.label}: {f.problem}" for f in files))
    return usable


def compare(folder: Path, stop) -> str:
    """Run the compare in `folder`: "done", or "cancelled" once `stop.requested` is set (checked before each cell).
    Raises CompareError (bad spec, no usable file) or CheckpointError (a base that cannot be loaded)."""
    folder, events, run_dir = Path(folder), EventWriter(folder), RunDir(folder)

    def say(message: str) -> None:
        events.status("compare", message)
        run_dir.write_status(message=message)

    run_dir.write_status(state="running", pid=os.getpid(), message="reading compare.json")
    spec = read_spec(folder)
    say("loading the base")
    base = load_base(spec["base"], dtype=DTYPES[spec["precision"]], parts=spec_parts(spec))
    check_drawing(spec, base.arch)
    base.pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    base.pipeline.set_progress_bar_config(disable=True)
    weights = base_weights(base)
    say("checking the files")
    files = check_files(spec, base, weights, events)
    cells, swap, filled, row = plan(spec, files), HotSwap(weights), 0, ()
    total = cell_count(spec, len(files))  # the grid's cells, as the page counts them
    try:
        for cell in cells:
            if stop.requested:
                raise Cancelled
            if cell.file is not row:
                row = cell.file
                say("drawing the base" if row is None else f"file {files.index(row) + 1}/{len(files)}: {row.label}")
            swap.use(None if cell.file is None else cell.file.path, cell.strength)
            save_png(draw(base, spec, cell), folder / cell.name, cell_parameters(spec, cell, base.arch))
            events.emit("compare_cell", **cell.event())
            filled += len(files) if cell.file is None else 1  # the base's picture: a cell in every row
    except Cancelled:
        events.emit("cancelled", step=filled, total=total)
        said = f"stopped after {filled} of {total} cells" if filled else "stopped before its first cell"
        run_dir.write_status(state="cancelled", message=said, pid=None)
        return "cancelled"
    finally:
        swap.restore()
    say("writing the grid")
    save_grid(folder, spec, files)
    events.emit("done", path="grid.png")
    run_dir.write_status(state="done", message=f"{filled} cells", pid=None)
    return "done"
