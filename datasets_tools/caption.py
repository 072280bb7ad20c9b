"""Caption a dataset folder in its own process, on the GPU when there is one:

    python -m datasets_tools.caption FOLDER --kind wd14 [--source PATH_OR_HUB_ID] [--replace] [--device cuda]

Each caption is written to its `.txt` sidecar as soon as it is made, so a cancel (SIGTERM) keeps what is done.
Progress goes to stdout as JSON lines, one object per line with a `type`:

    {"type": "status", "message": "loading wd14 on cuda"}
    {"type": "start", "total": 8, "device": "cuda"}
    {"type": "caption", "done": 3, "total": 8, "image": "a.png"}
    {"type": "done" | "cancelled", "done": 8, "total": 8, "message": "Captioned 8 pictures with wd14."}
    {"type": "error", "message": "the wd14 captioner model is not here ..."}     (exit status 1)

A SIGTERM while the model loads ends the process at once; during captioning it stops after the current picture.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from PIL import Image

from datasets_tools import dataset_folder
from datasets_tools.captioners import NEEDS, CaptionerUnavailable, load_captioner

ALL_CAPTIONED = "Every picture has a caption (tick “Replace existing captions” to redo them)."


def emit(type_: str, **fields) -> None:
    print(json.dumps({"type": type_, **fields}), flush=True)


def best_device(kind: str) -> str:
    """cuda when this captioner's runtime sees a GPU (onnxruntime for WD14, torch for the others), else cpu."""
    if kind == "wd14":
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_caption(folder: Path, replace: bool) -> list[dataset_folder.Item]:
    return [item for item in dataset_folder.items(folder) if replace or not item.caption]


def run(folder: Path, kind: str, source: str | None, replace: bool, device: str = "auto") -> int:
    todo = to_caption(folder, replace)
    if not todo:
        emit("done", done=0, total=0, message=ALL_CAPTIONED)
        return 0
    device = best_device(kind) if device == "auto" else device
    emit("status", message=f"loading {kind} on {device}")
    try:
        captioner = load_captioner(kind, source, device=device)
    except CaptionerUnavailable as e:
        emit("error", message=str(e))
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    emit("start", total=len(todo), device=device)
    for done, item in enumerate(todo, 1):
        with Image.open(item.image) as image:
            dataset_folder.set_caption(item.image, captioner.caption([image])[0])
        emit("caption", done=done, total=len(todo), image=str(item.image.relative_to(folder)))
        if stop and done < len(todo):
            emit("cancelled", done=done, total=len(todo),
                 message=f"Cancelled: captioned {done} of {len(todo)} pictures with {kind}; those captions are kept.")
            return 0
    emit("done", done=len(todo), total=len(todo), message=f"Captioned {len(todo)} pictures with {kind}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets_tools.caption", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kind", choices=sorted(NEEDS), default="wd14")
    parser.add_argument("--source", default=None, help="model folder or hub id (default: the kind's hub model)")
    parser.add_argument("--replace", action="store_true", help="caption pictures that already have a caption")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    return run(args.folder, args.kind, args.source or None, args.replace, args.device)


if __name__ == "__main__":
    sys.exit(main())
