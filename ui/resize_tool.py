"""Runs tab, "Resize a LoRA": any kohya LoRA/LoCon file through `python -m trainer resize` (rank cut by SVD, kept
energy, LoRA-drop). The work runs in a child process, so the UI process never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr

ROOT = Path(__file__).resolve().parent.parent
CLI_PREFIX = "python -m trainer resize: "  # and argparse's "…: error: "


def resize(source: str | None, rank: float, energy: float, drop: float, out_dir: Path,
           saved: str | None = None) -> tuple[str, str | None]:
    """(summary or error message, path of the new file or None) for the dropped file `source`, else the chosen
    run's file `saved`."""
    source = source or saved
    if not source:
        return "⚠ Drop a .safetensors LoRA file, or choose a run and one of its files, first.", None
    if not (rank or energy or drop):
        return "⚠ nothing to do: set Rank cap, Energy to keep and/or Drop this fraction of modules above 0", None
    src = Path(source)
    dst = request_folder(Path(out_dir)) / resized_name(src, rank, energy, drop)
    command = [sys.executable, "-m", "trainer", "resize", str(src), str(dst)]
    if rank:
        command += ["--rank", str(int(rank))]
    if energy:
        command += ["--energy", str(energy)]
    if drop:
        command += ["--drop", str(drop)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["the resize failed"])[-1]
        return f"⚠ {for_the_page(message, src, dst)}", None
    return "```\n" + for_the_page(done.stdout.strip(), src, dst) + "\n```", str(dst)


def resized_name(src: Path, rank: float, energy: float, drop: float) -> str:
    """The new file's name says how it was made: lora-r8.safetensors, lora-e0.9-d0.25.safetensors, ..."""
    parts = [f"r{int(rank)}"] * bool(rank) + [f"e{energy:g}"] * bool(energy) + [f"d{drop:g}"] * bool(drop)
    return f"{src.stem}-{'-'.join(parts)}.safetensors"


def request_folder(out_dir: Path, keep_s: float = 86400) -> Path:
    """A folder of its own for one resize (two at once never write over each other's file); those older than
    `keep_s` are removed, their downloads long served."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > keep_s:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=out_dir))


def for_the_page(text: str, src: Path, dst: Path) -> str:
    """The command's words as the page says them: without the command's name, and the files by their own names
    (an upload's path is a temporary folder of Gradio's)."""
    text = text.removeprefix(CLI_PREFIX).removeprefix("error: ")
    return text.replace(str(src), src.name).replace(str(dst), dst.name)


def build(out_dir: Path) -> gr.Dropdown:
    """The section; returns its chooser of the chosen run's files, which the Runs tab fills."""
    with gr.Accordion("Resize a LoRA file (smaller rank, kept energy, LoRA-drop)", open=False,
                      elem_id="resize-section"):
        gr.Markdown("Works on any kohya-format LoRA / LoCon file, ours or downloaded. Give a rank cap, an energy "
                    "to keep (e.g. 0.9 keeps 90 % of each module's update), a fraction of modules to drop, or several.")
        with gr.Row():
            source = gr.File(label="LoRA file (.safetensors)", file_types=[".safetensors"], elem_id="resize-source")
            saved = gr.Dropdown(label="…or a file of the run chosen above", choices=[], elem_id="resize-saved")
        with gr.Row():
            rank = gr.Number(value=0, label="Rank cap (0 = off)", precision=0, elem_id="resize-rank")
            energy = gr.Number(value=0.9, label="Energy to keep (0 = off)", elem_id="resize-energy")
            drop = gr.Number(value=0, label="Drop this fraction of modules", elem_id="resize-drop")
        button = gr.Button("Resize", elem_id="resize-run")
        report = gr.Markdown(elem_id="resize-report")
        result = gr.File(label="Resized file", interactive=False, elem_id="resize-result")
    button.click(lambda s, r, e, d, f: resize(s, r, e, d, out_dir, f), [source, rank, energy, drop, saved],
                 [report, result])
    return saved


def run_files(paths: list[str] | None) -> dict:
    """The chooser's choices for a newly chosen run: its LoRA files (the best first), by name."""
    files = [p for p in paths or [] if p.endswith(".safetensors")]
    return gr.update(choices=[(Path(p).name, p) for p in files], value=files[0] if files else None)
