"""The Gradio app. The trainer runs in its own process; this module never imports the training loop or models."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

INTRO = """# LoRA Studio
Train a Stable Diffusion LoRA (SD 1.x, SD 2.x, SDXL) from a handful of pictures.

The training interface is being built: for now, train from the command line with `python -m trainer`.
"""


def build_app(runs_dir: Path, models_dir: Path) -> gr.Blocks:
    runs_dir.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown(INTRO, elem_id="intro")
    return demo
