"""Captioning backends behind one small interface: `load_captioner(kind, source).caption(images, progress)`.

- "wd14": a WD14-style tagger, ONNX through onnxruntime: a folder with `model.onnx` and `selected_tags.csv`.
- "blip": BLIP image captioning through transformers.
- "florence2": Florence-2 through transformers.

Each loads from a local folder, or from a hub id when online; offline with no model it says what to download and
where. Each runs on `device` ("cuda" or "cpu"). Heavy libraries are imported inside the backends: importing this
module stays light. The web app runs them in a child process, `python -m datasets_tools.caption`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

HUB_DEFAULTS = {"wd14": "SmilingWolf/wd-vit-tagger-v3", "blip": "Salesforce/blip-image-captioning-base",
                "florence2": "florence-community/Florence-2-base"}
Progress = Callable[[int, int], None]


class CaptionerUnavailable(RuntimeError):
    pass


class Captioner(Protocol):
    name: str

    def caption(self, images: list[Image.Image], progress: Progress | None = None) -> list[str]: ...


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve(kind: str, source: str | Path | None, needs: tuple[str, ...]) -> Path:
    """A local folder holding `needs`, downloading `source` (a hub id) first when online."""
    source = str(source or HUB_DEFAULTS[kind])
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [n for n in needs if not (path / n).exists()]
        if missing:
            raise CaptionerUnavailable(f"{path} lacks {', '.join(missing)} for the {kind} captioner")
        return path
    if _offline() or "/" not in source:
        raise CaptionerUnavailable(
            f"the {kind} captioner model is not here and the model hub is offline. Download it on a machine with "
            f"internet: `huggingface-cli download {source} --local-dir models/captioners/{kind}`, copy that folder "
            f"here and give its path")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


# --- WD14 tagger ---

def clean_tag(name: str) -> str:
    """Underscores to spaces, except in kaomoji such as ^_^ where they are the face."""
    return name if len(name) <= 3 and not name.replace("_", "").isalnum() else name.replace("_", " ")


def select_tags(probs: np.ndarray, names: list[str], categories: list[int], general: float,
                character: float) -> list[str]:
    """Tags over their category's threshold, most confident first; rating tags (category 9) are dropped."""
    chosen = [(p, n) for p, n, c in zip(probs, names, categories)
              if (c == 0 and p >= general) or (c == 4 and p >= character)]
    return [clean_tag(n) for _, n in sorted(chosen, key=lambda pn: -pn[0])]


@dataclass
class WD14:
    folder: Path
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    device: str = "cpu"
    name: str = "wd14"
    _session: object = field(default=None, repr=False)

    def __post_init__(self):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=providers)
        with open(self.folder / "selected_tags.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.names = [r["name"] for r in rows]
        self.categories = [int(r["category"]) for r in rows]
        self.size = self._session.get_inputs()[0].shape[1]

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Square on white, resized to the model's input, BGR 0-255 float32, NHWC: as the WD14 models expect."""
        image = image.convert("RGBA")
        side = max(image.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
        rgb = canvas.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.float32)[:, :, ::-1]

    def caption(self, images: list[Image.Image], progress: Progress | None = None) -> list[str]:
        out = []
        input_name = self._session.get_inputs()[0].name
        for i, image in enumerate(images):
            probs = self._session.run(None, {input_name: self.prepare(image)[None]})[0][0]
            out.append(", ".join(select_tags(probs, self.names, self.categories, self.general_threshold,
                                             self.character_threshold)))
            if progress:
                progress(i + 1, len(images))
        return out


# --- transformers captioners ---

@dataclass
class Seq2Seq:
    """BLIP or Florence-2: a processor and a generate() model from one folder."""

    folder: Path
    name: str
    prompt: str = ""
    max_new_tokens: int = 40
    device: str = "cpu"
    _model: object = field(default=None, repr=False)
    _processor: object = field(default=None, repr=False)

    def __post_init__(self):
        import transformers

        cls = {"blip": "BlipForConditionalGeneration", "florence2": "Florence2ForConditionalGeneration"}[self.name]
        self._processor = transformers.AutoProcessor.from_pretrained(self.folder)
        self._model = getattr(transformers, cls).from_pretrained(self.folder).eval().to(self.device)

    def caption(self, images: list[Image.Image], progress: Progress | None = None) -> list[str]:
        import torch

        out = []
        for i, image in enumerate(images):
            kwargs = {"text": self.prompt} if self.prompt else {}
            inputs = self._processor(images=image.convert("RGB"), return_tensors="pt", **kwargs).to(self.device)
            with torch.no_grad():
                ids = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=3,
                                           do_sample=False)
            text = self._processor.batch_decode(ids, skip_special_tokens=True)[0]
            out.append(" ".join(text.replace(self.prompt, "").split()))
            if progress:
                progress(i + 1, len(images))
        return out


NEEDS = {"wd14": ("model.onnx", "selected_tags.csv"), "blip": ("config.json",), "florence2": ("config.json",)}


def load_captioner(kind: str, source: str | Path | None = None, **options) -> Captioner:
    """The captioner `kind` from `source`; CaptionerUnavailable says why not (no model, or one that won't load)."""
    if kind not in NEEDS:
        raise CaptionerUnavailable(f"unknown captioner {kind!r}; choose wd14, blip or florence2")
    folder = resolve(kind, source, NEEDS[kind])
    try:
        if kind == "wd14":
            return WD14(folder, **options)
        return Seq2Seq(folder, kind, prompt="<MORE_DETAILED_CAPTION>" if kind == "florence2" else "", **options)
    except Exception as e:  # a broken or foreign model folder: say which, keep the cause for the log
        raise CaptionerUnavailable(f"the {kind} captioner in {folder} could not be loaded: "
                                   f"{(str(e).strip() or type(e).__name__).splitlines()[0]}") from e
