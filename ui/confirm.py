"""A permanent delete is asked twice: the first click turns the button into "Click again to delete X for good", the
second deletes, and choosing something else puts the button back. No dialog: what is at stake is on the button."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

AGAIN = "Click again to delete {} for good"


def ask_twice(label: str, armed: str, chosen: str) -> tuple[bool, str, dict]:
    """(delete now, the item armed after this click, the button's update) for a click on the delete button
    labelled `label`, while `armed` (a gr.State) holds the item the click before asked about."""
    if chosen and armed == chosen:
        return True, "", gr.update(value=label)
    if not chosen:
        return False, "", gr.update(value=label)
    return False, chosen, gr.update(value=AGAIN.format(chosen))


def disarmed(label: str) -> tuple[str, dict]:
    """(no item armed, the button as it was): for a change of the chosen item."""
    return "", gr.update(value=label)


def folder_mb(path: Path) -> float:
    """What deleting `path` frees, in MB: for the first click's message."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20
